"""Pull/merge request webhook events: GitHub and Gitea `pull_request`, GitLab `Merge Request
Hook`, parsed into a ProposalEvent after the same signature/token checks as pushes.

The payloads are trimmed from each forge's documented examples (the keys the agent reads,
with their nesting), signed here as the forge signs them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest

from agent.service.webhooks import (
    ProposalEvent,
    WebhookRejected,
    WebhookSource,
    parse_event,
    verify_and_parse,
)

SECRET = "hook-secret-5f1c"
HEAD = "9f2c1e0d8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e"


def github_payload(action: str = "synchronize", **pull: Any) -> dict[str, Any]:
    return {
        "action": action,
        "number": 12,
        "pull_request": {
            "number": 12,
            "state": "open",
            "merged": False,
            "user": {"login": "alice"},
            "head": {"ref": "feature/vpc", "sha": HEAD, "repo": {"full_name": "acme/infra"}},
            "base": {"ref": "main", "sha": "1" * 40, "repo": {"full_name": "acme/infra"}},
            **pull,
        },
        "sender": {"login": "bob"},
    }


def gitea_payload(action: str = "synchronized") -> dict[str, Any]:
    return {
        "action": action,
        "number": 4,
        "pull_request": {
            "number": 4,
            "user": {"login": "carol"},
            "merged": False,
            "head": {"label": "fix", "ref": "fix", "sha": HEAD, "repo_id": 3},
            "base": {"label": "main", "ref": "main", "sha": "2" * 40, "repo_id": 3},
        },
        "sender": {"login": "carol"},
    }


def gitlab_payload(action: str = "update", **attrs: Any) -> dict[str, Any]:
    return {
        "object_kind": "merge_request",
        "event_type": "merge_request",
        "user": {"id": 5, "name": "Dave", "username": "dave"},
        "object_attributes": {
            "iid": 31,
            "action": action,
            "author_id": 5,
            "source_branch": "add-db",
            "target_branch": "main",
            "source_project_id": 14,
            "target_project_id": 14,
            "oldrev": "3" * 40,
            "last_commit": {"id": HEAD, "message": "add db"},
            **attrs,
        },
    }


def signed(kind: str, event: str, payload: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    body = json.dumps(payload).encode()
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json"}
    if kind == "github":
        headers |= {"X-GitHub-Event": event, "X-Hub-Signature-256": f"sha256={digest}"}
    elif kind == "gitea":
        headers |= {"X-Gitea-Event": event, "X-Gitea-Signature": digest}
    else:
        headers |= {"X-Gitlab-Event": event, "X-Gitlab-Token": SECRET}
    return headers, body


def parse(kind: str, event: str, payload: dict[str, Any]) -> ProposalEvent:
    headers, body = signed(kind, event, payload)
    parsed = parse_event(WebhookSource(kind, SECRET), headers, body)
    assert isinstance(parsed, ProposalEvent)
    return parsed


def test_github_pull_request() -> None:
    event = parse("github", "pull_request", github_payload())
    assert (event.number, event.head_sha, event.head_ref) == (12, HEAD, "feature/vpc")
    assert (event.author, event.sender, event.action) == ("alice", "bob", "updated")
    assert event.ref == "refs/pull/12/head" and event.base_ref == "main"
    assert not event.from_fork and event.is_open


def test_github_fork_and_merged() -> None:
    fork_head = {"ref": "x", "sha": HEAD, "repo": {"full_name": "mallory/infra"}}
    assert parse("github", "pull_request", github_payload(head=fork_head)).from_fork
    merged = parse("github", "pull_request", github_payload("closed", merged=True))
    assert merged.action == "merged" and not merged.is_open
    # A deleted fork: the forge no longer says where the head lives.
    gone = {"ref": "x", "sha": HEAD, "repo": None}
    assert parse("github", "pull_request", github_payload(head=gone)).from_fork


def test_gitea_pull_request_and_sync_header() -> None:
    event = parse("gitea", "pull_request", gitea_payload("opened"))
    assert (event.number, event.action, event.author, event.ref) == (
        4,
        "opened",
        "carol",
        "refs/pull/4/head",
    )
    synced = parse("gitea", "pull_request_sync", gitea_payload())
    assert synced.action == "updated" and synced.head_sha == HEAD and not synced.from_fork


def test_gitlab_merge_request_hook() -> None:
    event = parse("gitlab", "Merge Request Hook", gitlab_payload())
    assert (event.number, event.head_sha, event.head_ref) == (31, HEAD, "add-db")
    assert (event.action, event.author, event.sender) == ("updated", "dave", "dave")
    assert event.ref == "refs/merge-requests/31/head" and not event.from_fork
    # Another user's update: the author is known only by id, so not named.
    other = gitlab_payload()
    other["user"] = {"id": 9, "username": "erin"}
    assert parse("gitlab", "Merge Request Hook", other).author is None
    # An update without new commits (a title change) is an edit; a fork is a fork.
    assert parse("gitlab", "Merge Request Hook", gitlab_payload(oldrev=None)).action == "edited"
    forked = gitlab_payload(source_project_id=99)
    assert parse("gitlab", "Merge Request Hook", forked).from_fork
    assert parse("gitlab", "Merge Request Hook", gitlab_payload("merge")).action == "merged"


def test_gitlab_system_hook_merge_request() -> None:
    event = parse("gitlab", "System Hook", gitlab_payload("open"))
    assert event.action == "opened" and event.number == 31


@pytest.mark.parametrize(
    ("kind", "event", "payload", "reason"),
    [
        ("github", "pull_request", github_payload(head={"ref": "x", "sha": "zz"}), "head"),
        ("github", "pull_request", {"action": "opened"}, "pull_request"),
        ("gitea", "pull_request", {**gitea_payload(), "action": None}, "no action"),
        ("gitlab", "Merge Request Hook", gitlab_payload(iid=0), "number"),
        ("gitlab", "Merge Request Hook", gitlab_payload(source_branch="a b"), "branch name"),
    ],
)
def test_malformed_events_are_400(kind, event, payload, reason) -> None:
    headers, body = signed(kind, event, payload)
    with pytest.raises(WebhookRejected) as caught:
        parse_event(WebhookSource(kind, SECRET), headers, body)
    assert caught.value.status == 400 and reason in caught.value.reason


@pytest.mark.parametrize("kind", ["github", "gitea", "gitlab"])
def test_a_bad_signature_is_401_before_the_payload_is_read(kind: str) -> None:
    event = {"github": "pull_request", "gitea": "pull_request", "gitlab": "Merge Request Hook"}
    headers, _ = signed(kind, event[kind], {})
    if kind == "gitlab":
        headers["X-Gitlab-Token"] = "not-the-token"  # GitLab sends a token, not a signature
    with pytest.raises(WebhookRejected) as caught:
        parse_event(WebhookSource(kind, SECRET), headers, b'{"tampered": true}')
    assert caught.value.status == 401


def test_verify_and_parse_still_ignores_pull_requests() -> None:
    headers, body = signed("github", "pull_request", github_payload())
    with pytest.raises(WebhookRejected) as caught:
        verify_and_parse(WebhookSource("github", SECRET), headers, body)
    assert caught.value.status == 202 and "is not a push" in caught.value.reason
