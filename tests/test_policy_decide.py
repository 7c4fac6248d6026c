"""The policy part of the decision as a table (tests/cases/policy_decide.json): apply modes,
rule effects, change windows, drift during a freeze. Real compiled CEL rules; no plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import DestroyPolicy, DriftPolicy
from agent.policy.apply import ApplyMode, within
from agent.policy.gate import Gate
from agent.policy.rules import Effect, RuleResult, compile_rule
from agent.policy.windows import FreezeDrift
from agent.units.decide import Decision, PlanFacts, decide

CASES = json.loads((Path(__file__).parent / "cases" / "policy_decide.json").read_text())


def _results(spec: list[list[object]]) -> tuple[RuleResult, ...]:
    results = []
    for index, (effect, outcome) in enumerate(spec):
        rule = compile_rule(f"r{index}", "true", f"message of r{index}", Effect(effect), "test:1")
        if outcome == "error":
            results.append(RuleResult(rule, True, "boom"))
        else:
            results.append(RuleResult(rule, bool(outcome)))
    return tuple(results)


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_policy_decision_table(case: dict) -> None:
    gate = Gate(
        apply=ApplyMode(case["apply"]),
        rules=_results(case.get("rules", [])),
        window=case.get("window"),
        window_drift=FreezeDrift(case.get("window_drift", "hold")),
    )
    verdict = decide(
        PlanFacts(
            revision_moved=case["moved"],
            has_changes=case["changes"],
            destroys_anything=case["destroys"],
        ),
        drift=DriftPolicy(case["drift"]),
        destroy=DestroyPolicy(case["destroy"]),
        dry_run=case.get("dry_run", False),
        gate=gate,
    )
    assert verdict.decision is Decision(case["decision"])
    assert case["reason"] in verdict.reason
    assert verdict.drift is case.get("is_drift", False)


def test_a_ceiling_allows_only_stricter_modes() -> None:
    assert within(ApplyMode.AUTO) == tuple(ApplyMode)
    assert within(ApplyMode.APPROVE_DESTROY) == (ApplyMode.APPROVE_DESTROY, ApplyMode.APPROVE)
    assert within(ApplyMode.APPROVE) == (ApplyMode.APPROVE,)


def test_warnings_are_listed_apart() -> None:
    gate = Gate(rules=_results([["warn", True], ["warn", False], ["deny", False]]))
    assert gate.warnings() == ("policy rule r0 (test:1): message of r0",)
    assert gate.denial() is None


def test_notifications_carry_the_policy_line() -> None:
    from agent.service.notify import unit_events
    from agent.state.store import UnitOutcome, UnitStatus

    warned = UnitOutcome(
        status=UnitStatus.OK,
        decision="apply",
        plan_add=1,
        plan_change=0,
        plan_destroy=0,
        error="policy rule count-changes (agent.yaml:7): this plan changes something",
        converged=True,
    )
    (applied,) = unit_events("data", warned, run_id="r-1", revision="abc")
    assert applied.kind == "apply"
    assert applied.detail == "policy rule count-changes (agent.yaml:7): this plan changes something"

    denied = UnitOutcome(
        status=UnitStatus.FAILED,
        decision="deny",
        error="denied by policy rule keep-protected (agent.yaml:4): never",
    )
    (failure,) = unit_events("data", denied, run_id="r-2", revision="abc")
    assert failure.kind == "failure"
    assert failure.summary == "denied by policy rule keep-protected (agent.yaml:4): never"
