"""Webhook verification as a table of literal requests (tests/cases/webhooks.json).

Each case is one sender's request: headers, body and secret exactly as they travel, and the
outcome a user would check: the push (ref, branch, revision, delivery id), a ping, or the
HTTP status and reason of a rejection. The first cases are GitHub's documented test vector
("Validating webhook deliveries": secret "It's a Secret to Everybody", payload
"Hello, World!"). The literal signatures were computed once and are frozen in the file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import AgentError
from agent.service.webhooks import (
    KINDS,
    PushEvent,
    WebhookRejected,
    WebhookSource,
    delivery_id,
    verify_and_parse,
)

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "cases" / "webhooks.json").read_text(encoding="utf-8")
)


def _body(case: dict[str, Any]) -> bytes:
    if "body_hex" in case:
        return bytes.fromhex(case["body_hex"])
    return case["body"].encode("utf-8")


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_webhook_table(case: dict[str, Any]) -> None:
    source = WebhookSource(case["kind"], case["secret"])
    expect = case["expect"]
    if "status" in expect:
        with pytest.raises(WebhookRejected) as caught:
            verify_and_parse(source, case["headers"], _body(case))
        rejected = caught.value
        assert rejected.status == expect["status"]
        assert expect["reason_contains"] in rejected.reason
        # What is logged and sent back never holds the secret or the body.
        shown = rejected.render()
        assert case["secret"] not in shown
        if len(_body(case)) > 8:
            assert _body(case).decode("utf-8", "replace") not in shown
        return
    event = verify_and_parse(source, case["headers"], _body(case))
    if expect.get("ping"):
        assert event is None
        return
    assert event == PushEvent(source=case["kind"], **expect["event"])


def test_the_table_covers_every_kind_and_outcome() -> None:
    kinds = {c["kind"] for c in CASES}
    statuses = {c["expect"].get("status") for c in CASES}
    assert kinds == set(KINDS)
    assert {None, 202, 400, 401, 415} <= statuses


def test_a_source_keeps_its_secret_out_of_repr() -> None:
    source = WebhookSource("github", "hunter2-but-longer")
    assert "hunter2" not in repr(source)
    assert "github" in repr(source)


@pytest.mark.parametrize(
    ("kind", "secret", "message"),
    [("bitbucket", "x", "not one of github"), ("github", "", "non-empty secret")],
)
def test_a_source_must_be_usable(kind: str, secret: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WebhookSource(kind, secret)


def test_rejections_are_agent_errors_with_a_reference() -> None:
    with pytest.raises(WebhookRejected) as caught:
        verify_and_parse(WebhookSource("gitlab", "tok"), {}, b"")
    assert isinstance(caught.value, AgentError)
    assert caught.value.render().startswith("error[webhook-rejected]: no X-Gitlab-Token")


@pytest.mark.parametrize(
    ("event", "tracked", "concerns"),
    [
        (PushEvent("github", "refs/heads/main", "main", None, None), "main", True),
        (PushEvent("github", "refs/heads/dev", "dev", None, None), "main", False),
        (PushEvent("github", "refs/tags/main", None, None, None), "main", False),
        (PushEvent("generic", "", None, None, None), "main", True),
    ],
)
def test_which_pushes_concern_the_tracked_branch(
    event: PushEvent, tracked: str, concerns: bool
) -> None:
    assert event.concerns(tracked) is concerns


def test_delivery_id_is_read_case_insensitively() -> None:
    assert delivery_id("github", {"x-github-delivery": "d-1"}) == "d-1"
    assert delivery_id("gitlab", {"X-Gitlab-Event-UUID": "u-2"}) == "u-2"
    assert delivery_id("generic", {}) is None


_header_names = st.sampled_from(
    [
        "X-Hub-Signature-256",
        "X-GitHub-Event",
        "X-Gitea-Signature",
        "X-Gitea-Event",
        "X-Gitlab-Token",
        "X-Gitlab-Event",
        "Authorization",
        "Content-Type",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    headers=st.dictionaries(_header_names, st.text(max_size=80), max_size=6),
    body=st.binary(max_size=200),
)
def test_arbitrary_requests_are_rejected_cleanly(kind: str, headers: dict, body: bytes) -> None:
    """Whatever arrives, the answer is a rejection with a status, never a crash."""
    secret = "fuzz-secret-value-1234"
    try:
        verify_and_parse(WebhookSource(kind, secret), headers, body)
    except WebhookRejected as rejected:
        assert rejected.status in (202, 400, 401, 415)
        assert secret not in rejected.render()


@settings(max_examples=200, deadline=None)
@given(
    branch=st.from_regex(r"[a-z][a-z0-9._/-]{0,30}", fullmatch=True),
    after=st.binary(min_size=20, max_size=20),
)
def test_any_signed_github_push_round_trips(branch: str, after: bytes) -> None:
    secret = "round-trip-secret"
    body = json.dumps({"ref": f"refs/heads/{branch}", "after": after.hex()}).encode()
    headers = {
        "X-Hub-Signature-256": "sha256="
        + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
        "X-GitHub-Event": "push",
        "Content-Type": "application/json",
    }
    event = verify_and_parse(WebhookSource("github", secret), headers, body)
    assert event is not None
    assert event.branch == branch
    assert event.revision == (None if after == bytes(20) else after.hex())
