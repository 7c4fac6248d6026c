"""Issue 22 "outcome on every commit": a pass's result becomes one commit status, sent to
the forge stand-in over a real socket (no mocks). The outcomes are what a pass records;
the table says what a person sees on the commit.
"""

from __future__ import annotations

import time

import pytest

from agent.core.redact import Redactor
from agent.engine.reconcile import PassResult
from agent.service.forge_report import ForgeReporter, outcome_of, outcomes_of, report_outcome
from agent.state.store import RunStatus, UnitOutcome, UnitStatus
from providers.forge import make_client
from tests.support.forge_standin import ForgeStandin

REV = "a" * 40
HEAD = "b" * 40
TOKEN = "forge-token-canary-77"


def applied(add: int, change: int, destroy: int) -> UnitOutcome:
    return UnitOutcome(
        UnitStatus.OK, "apply", plan_add=add, plan_change=change, plan_destroy=destroy
    )


UNCHANGED = UnitOutcome(UnitStatus.OK, "none", plan_add=0, plan_change=0, plan_destroy=0)
HELD = UnitOutcome(UnitStatus.HELD, "hold", plan_add=0, plan_change=0, plan_destroy=1)
FAILED = UnitOutcome(UnitStatus.FAILED, error="terraform plan failed: boom")


def result(status: RunStatus, outcomes: dict[str, UnitOutcome], **kw: object) -> PassResult:
    fields: dict = {"revision": REV, "head": REV, "error": None, "warnings": ()}
    fields.update(kw)
    return PassResult(run_id="r-1", status=status, outcomes=outcomes, **fields)


CASES = [
    (
        "applied",
        result(RunStatus.SUCCEEDED, {"network": applied(2, 1, 0), "web": UNCHANGED}),
        REV,
        "success",
        "applied +2 ~1 -0 (network)",
    ),
    (
        "nothing to do",
        result(RunStatus.SUCCEEDED, {"web": UNCHANGED}),
        REV,
        "success",
        "no changes",
    ),
    (
        "held",
        result(RunStatus.SUCCEEDED, {"db": HELD, "network": applied(1, 0, 0)}),
        REV,
        "pending",
        "held: db (+0 ~0 -1); applied +1 ~0 -0 (network)",
    ),
    (
        "failed",
        result(RunStatus.FAILED, {"db": FAILED, "network": applied(1, 0, 0)}),
        REV,
        "failure",
        "failed: db; applied +1 ~0 -0 (network)",
    ),
    ("interrupted", result(RunStatus.INTERRUPTED, {}), REV, "error", "interrupted"),
]


@pytest.mark.parametrize(
    ("case", "pass_result", "sha", "state", "description"), CASES, ids=[c[0] for c in CASES]
)
def test_outcome_table(case, pass_result, sha, state, description) -> None:
    outcome = outcome_of(pass_result.revision, pass_result)
    assert outcome is not None
    assert (outcome.sha, outcome.state, outcome.description) == (sha, state, description)


def test_a_refused_head_gets_a_failure_and_the_revision_in_force_its_outcome() -> None:
    error = f"revision {HEAD[:12]} rejected: gitops.yaml:3: units: bad\nmore"
    refused = result(RunStatus.FAILED, {"web": UNCHANGED}, head=HEAD, error=error)
    found = [(o.sha, o.state, o.description) for o in outcomes_of(REV, refused)]
    assert found == [
        (HEAD, "failure", "not applied: gitops.yaml:3: units: bad"),
        (REV, "success", "no changes"),
    ]


@pytest.mark.parametrize("kind", ["github", "gitlab", "gitea"])
def test_report_outcome_sets_the_commit_status(kind: str) -> None:
    with ForgeStandin(kind, token=TOKEN) as forge:
        client = make_client(kind, forge.api_url, "acme/infra", TOKEN)  # type: ignore[arg-type]
        report_outcome(client, REV, CASES[3][1], context="gitops-agent/prod")
        (status,) = forge.statuses(REV)
        assert status["state"] == ("failed" if kind == "gitlab" else "failure")
        assert status["description"] == "failed: db; applied +1 ~0 -0 (network)"
        assert status[("name" if kind == "gitlab" else "context")] == "gitops-agent/prod"


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_reporter_retries_redacts_and_keeps_a_reported_status() -> None:
    redactor = Redactor()
    redactor.register("sup3r-s3cret-unit-error")
    with ForgeStandin("github", token=TOKEN) as forge:
        client = make_client("github", forge.api_url, "acme/infra", TOKEN)
        reporter = ForgeReporter(client, redact=redactor.redact, retry_delays=(0.05, 0.05))
        reporter.start()
        try:
            forge.fail_next(502)  # the first try fails, the retry goes through
            reporter.submit(result(RunStatus.SUCCEEDED, {"network": applied(2, 0, 0)}))
            wait_for(lambda: len(forge.statuses(REV)) == 1)
            # A quiet drift pass later: "applied" is not overwritten by "no changes".
            reporter.submit(result(RunStatus.SUCCEEDED, {"network": UNCHANGED}))
            # A failure on the next revision, whose error holds a secret.
            leaky = UnitOutcome(UnitStatus.FAILED, error="x")
            reporter.submit(
                result(
                    RunStatus.FAILED,
                    {"sup3r-s3cret-unit-error": leaky},
                    revision=HEAD,
                    head=HEAD,
                )
            )
            wait_for(lambda: len(forge.statuses(HEAD)) == 1)
        finally:
            reporter.stop(5)
        assert [s["description"] for s in forge.statuses(REV)] == ["applied +2 ~0 -0 (network)"]
        (failure,) = forge.statuses(HEAD)
        assert failure["state"] == "failure"
        assert "sup3r-s3cret-unit-error" not in failure["description"]
        assert reporter.sent == 2 and reporter.failed == 0


def test_a_held_status_is_replaced_once_the_next_pass_converges() -> None:
    with ForgeStandin("gitlab", token=TOKEN) as forge:
        client = make_client("gitlab", forge.api_url, "acme/infra", TOKEN)
        reporter = ForgeReporter(client)
        reporter.start()
        reporter.submit(result(RunStatus.SUCCEEDED, {"db": HELD}))
        # Approved (a run of its own, not reported), then a full pass: nothing left to do.
        reporter.submit(result(RunStatus.SUCCEEDED, {"db": UNCHANGED}))
        reporter.stop(5)
        assert [(s["state"], s["description"]) for s in forge.statuses(REV)] == [
            ("pending", "held: db (+0 ~0 -1)"),
            ("success", "no changes"),
        ]


def test_reporter_gives_up_on_a_refusal_and_goes_on() -> None:
    with ForgeStandin("gitea", token=TOKEN) as forge:
        client = make_client("gitea", forge.api_url, "acme/infra", "not-the-token")
        reporter = ForgeReporter(client, retry_delays=(0.05,))
        reporter.start()
        reporter.submit(result(RunStatus.SUCCEEDED, {"network": applied(1, 0, 0)}))
        reporter.stop(5)
        assert reporter.failed == 1 and forge.statuses(REV) == []
        # A 401 is not retried: one request.
        assert [r.status for r in forge.requests] == [401]
