"""Webhook verification: is this request from the configured sender, and what does it announce?

Pure functions over the raw request (headers and body bytes), no I/O, so the whole
decision table is tested without a socket (tests/cases/webhooks.json). The HTTP side
lives in `agent.service.http_server`.

Each configured sender is one `WebhookSource`:

- ``github``: ``X-Hub-Signature-256: sha256=<hex>``, the HMAC-SHA256 of the raw body
  keyed with the secret; ``X-GitHub-Event: push`` (``ping`` is answered, nothing runs).
- ``gitea`` (and Forgejo, which sends the same headers): ``X-Gitea-Signature: <hex>``,
  the same HMAC without a prefix; ``X-Gitea-Event: push``.
- ``gitlab``: ``X-Gitlab-Token`` equal to the secret token; ``X-Gitlab-Event: Push Hook``
  (or ``System Hook`` whose body has ``object_kind: push``).
- ``generic``: ``Authorization: Bearer <token>``; a body is optional, and when present it
  is JSON ``{"ref": "refs/heads/BRANCH", "after": "<commit>"}``, both keys optional. A
  generic request without a ref means "reconcile the tracked branch now".

Pull/merge request events (GitHub and Gitea ``pull_request``, GitLab ``Merge Request
Hook``) are parsed by `parse_event` into a `ProposalEvent` (number, head commit, head
branch, author, action); `verify_and_parse` answers them 202 "not a push", as before, for
callers that only follow pushes.

The request is authenticated before anything else about it is looked at, so a sender
without the secret learns nothing but 401. Every comparison with a secret is
constant-time. No message here contains a secret, a header value that carries one, or
the body.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import AgentError

__all__ = [
    "KINDS",
    "PROPOSAL_ACTIONS",
    "ProposalEvent",
    "PushEvent",
    "WebhookRejected",
    "WebhookSource",
    "delivery_id",
    "parse_event",
    "sanitize",
    "verify_and_parse",
]

KINDS = ("github", "gitlab", "gitea", "generic")
BRANCH_PREFIX = "refs/heads/"
# A commit id as Git prints it: SHA-1 (40 hex digits) or SHA-256 (64).
_COMMIT_RE = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
_HEX_RE = re.compile(r"[0-9a-fA-F]+")
# What a sender may name in a log line (event names, delivery ids): printable ASCII only.
_UNPRINTABLE_RE = re.compile(r"[^\x21-\x7e]")
_MAX_SHOWN = 80
# A branch name as a sender may give it: no control characters or spaces, bounded.
_BRANCH_NAME_RE = re.compile(r"[^\x00-\x20\x7f]{1,255}")
# Normalized actions; anything else keeps the forge's own word (sanitized), e.g. "labeled".
PROPOSAL_ACTIONS = ("opened", "updated", "reopened", "edited", "closed", "merged")
_ACTIONS = {
    "github": {
        "opened": "opened",
        "synchronize": "updated",
        "reopened": "reopened",
        "edited": "edited",
        "closed": "closed",
    },
    "gitea": {
        "opened": "opened",
        "synchronized": "updated",
        "reopened": "reopened",
        "edited": "edited",
        "closed": "closed",
    },
    "gitlab": {
        "open": "opened",
        "update": "updated",
        "reopen": "reopened",
        "close": "closed",
        "merge": "merged",
    },
}

# Delivery-id headers, first found wins. GitLab's Idempotency-Key stays the same when a
# delivery is retried, which is what a person correlating logs wants.
_DELIVERY_HEADERS = {
    "github": ("x-github-delivery",),
    "gitea": ("x-gitea-delivery", "x-forgejo-delivery"),
    "gitlab": ("idempotency-key", "x-gitlab-event-uuid"),
    "generic": ("x-request-id", "x-delivery-id"),
}


@dataclass(frozen=True)
class WebhookSource:
    """One configured sender, from the operator's host config.

    `secret` is the HMAC key (github, gitea) or the token (gitlab, generic). It is kept
    out of `repr()` so that it cannot reach a log through a stray `%r`.
    """

    kind: str
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"webhook kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.secret:
            # An empty HMAC key or token would accept anyone who knows it is empty.
            raise ValueError(f"a {self.kind} webhook needs a non-empty secret")


@dataclass(frozen=True)
class PushEvent:
    """A verified push, as the daemon's trigger sees it.

    `ref` is the full ref pushed (``refs/heads/main``, ``refs/tags/v1``), or "" when a
    generic request named none. `branch` is the branch name for ``refs/heads/*`` refs,
    else None. `revision` is the new commit, or None when the sender gave none or the
    branch was deleted. `delivery` is the sender's delivery id, for correlating logs.
    """

    source: str
    ref: str
    branch: str | None
    revision: str | None
    delivery: str | None

    def concerns(self, tracked_branch: str) -> bool:
        """True if this push should wake the agent that follows `tracked_branch`."""
        return self.ref == "" or self.branch == tracked_branch


@dataclass(frozen=True)
class ProposalEvent:
    """A verified pull/merge request event, as the proposal planner sees it.

    `number` is the pull request's number (GitLab: the merge request's iid); `head_sha`
    the head commit; `head_ref` the source branch name as the sender gave it (for a
    log line and a match against patterns, never a command argument); `ref` the forge's
    own ref for the head (``refs/pull/N/head``, GitLab ``refs/merge-requests/N/head``);
    `base_ref` the target branch. `author` is the login of who opened it (GitLab names
    the author only by id: it is known when the event's actor is the author, else None);
    `sender` is who caused this event (for an update, who pushed). `action` is one of
    `PROPOSAL_ACTIONS` or the forge's own word. `from_fork` is True when the head lives
    in another repository (or the forge no longer says which).
    """

    source: str
    number: int
    action: str
    head_sha: str
    head_ref: str
    ref: str
    base_ref: str | None
    author: str | None
    sender: str | None
    from_fork: bool
    delivery: str | None

    @property
    def is_open(self) -> bool:
        """Whether the proposal is still to be planned (not closed or merged)."""
        return self.action not in ("closed", "merged")


class WebhookRejected(AgentError):
    """A webhook request that does not trigger a pass, with the HTTP status to answer.

    401: not from the configured sender; 400: malformed; 415: not JSON; 202: verified
    but not a push (another event type), nothing to do. `reason` is safe to log and to
    send back: it never holds a secret, a secret-bearing header or the body.
    """

    reference = "webhook-rejected"

    def __init__(self, status: int, reason: str, *, hint: str | None = None) -> None:
        super().__init__(reason, hint=hint)
        self.status = status
        self.reason = reason


def sanitize(value: str | None) -> str | None:
    """A sender-controlled string made safe for one log line: printable ASCII, bounded."""
    if value is None:
        return None
    cleaned = _UNPRINTABLE_RE.sub("?", value)
    return cleaned if len(cleaned) <= _MAX_SHOWN else cleaned[:_MAX_SHOWN] + "..."


def verify_and_parse(
    source: WebhookSource, headers: Mapping[str, str], body: bytes
) -> PushEvent | None:
    """Authenticate a webhook request and return the push it announces.

    Returns None for a verified request that needs only a 200 answer (GitHub's ``ping``).
    Raises `WebhookRejected` with the status to answer for anything else that is not a
    push: 401 (missing or wrong signature/token), 415 (a body that is not declared as
    JSON), 400 (malformed JSON or ref, a missing event header), 202 (another event type,
    pull/merge request events included).
    Header names are matched case-insensitively.
    """
    event = _dispatch(source, headers, body, proposals=False)
    assert not isinstance(event, ProposalEvent)
    return event


def parse_event(
    source: WebhookSource, headers: Mapping[str, str], body: bytes
) -> PushEvent | ProposalEvent | None:
    """Like `verify_and_parse`, but a pull/merge request event gives a `ProposalEvent`
    (400 when its payload lacks the number, head commit or head branch)."""
    return _dispatch(source, headers, body, proposals=True)


def _dispatch(
    source: WebhookSource, headers: Mapping[str, str], body: bytes, *, proposals: bool
) -> PushEvent | ProposalEvent | None:
    lowered = {name.lower(): value for name, value in headers.items()}
    delivery = delivery_id(source.kind, lowered)
    if source.kind == "github":
        return _github(source, lowered, body, delivery, proposals)
    if source.kind == "gitea":
        return _gitea(source, lowered, body, delivery, proposals)
    if source.kind == "gitlab":
        return _gitlab(source, lowered, body, delivery, proposals)
    return _generic(source, lowered, body, delivery)


def _github(
    source: WebhookSource,
    headers: dict[str, str],
    body: bytes,
    delivery: str | None,
    proposals: bool,
) -> PushEvent | ProposalEvent | None:
    given = headers.get("x-hub-signature-256")
    if given is None:
        hint = None
        if "x-hub-signature" in headers:
            hint = "only the SHA-256 signature is accepted; GitHub sends it when a secret is set"
        raise WebhookRejected(401, "no X-Hub-Signature-256 header", hint=hint)
    scheme, _, digest = given.partition("=")
    if scheme != "sha256" or not _hmac_matches(source.secret, body, digest):
        raise WebhookRejected(401, "X-Hub-Signature-256 does not match the body and secret")
    event = _event(headers, "x-github-event", "X-GitHub-Event")
    if event == "ping":
        return None
    if proposals and event == "pull_request":
        return _pull_request("github", _json_body(headers, body), delivery)
    if event != "push":
        raise _ignored(event)
    return _push("github", _json_body(headers, body), delivery)


def _gitea(
    source: WebhookSource,
    headers: dict[str, str],
    body: bytes,
    delivery: str | None,
    proposals: bool,
) -> PushEvent | ProposalEvent | None:
    given = headers.get("x-gitea-signature")
    if given is None:
        raise WebhookRejected(401, "no X-Gitea-Signature header")
    if not _hmac_matches(source.secret, body, given):
        raise WebhookRejected(401, "X-Gitea-Signature does not match the body and secret")
    event = _event(headers, "x-gitea-event", "X-Gitea-Event")
    # Gitea names a push to the head `pull_request_sync` in the header, `synchronized` inside.
    if proposals and event in ("pull_request", "pull_request_sync"):
        return _pull_request("gitea", _json_body(headers, body), delivery)
    if event != "push":
        raise _ignored(event)
    return _push("gitea", _json_body(headers, body), delivery)


def _gitlab(
    source: WebhookSource,
    headers: dict[str, str],
    body: bytes,
    delivery: str | None,
    proposals: bool,
) -> PushEvent | ProposalEvent | None:
    given = headers.get("x-gitlab-token")
    if given is None:
        raise WebhookRejected(401, "no X-Gitlab-Token header")
    if not _token_matches(source.secret, given):
        raise WebhookRejected(401, "X-Gitlab-Token does not match the configured token")
    event = _event(headers, "x-gitlab-event", "X-Gitlab-Event")
    if proposals and event == "Merge Request Hook":
        return _merge_request(_json_body(headers, body), delivery)
    if event not in ("Push Hook", "System Hook"):
        raise _ignored(event)
    payload = _json_body(headers, body)
    if proposals and event == "System Hook" and payload.get("object_kind") == "merge_request":
        return _merge_request(payload, delivery)
    # A system hook carries every kind of event under one header; the body says which.
    if event == "System Hook" and payload.get("object_kind") != "push":
        raise _ignored(f"System Hook {payload.get('object_kind')!s}")
    return _push("gitlab", payload, delivery)


def _generic(
    source: WebhookSource, headers: dict[str, str], body: bytes, delivery: str | None
) -> PushEvent | None:
    given = headers.get("authorization")
    if given is None:
        raise WebhookRejected(401, "no Authorization header (expected: Bearer <token>)")
    scheme, _, token = given.strip().partition(" ")
    if scheme.lower() != "bearer" or not _token_matches(source.secret, token.strip()):
        raise WebhookRejected(401, "Authorization bearer token does not match the configured one")
    if not body.strip():
        return PushEvent(source="generic", ref="", branch=None, revision=None, delivery=delivery)
    payload = _json_body(headers, body)
    if "ref" not in payload:
        return PushEvent(
            source="generic",
            ref="",
            branch=None,
            revision=_revision(payload.get("after")),
            delivery=delivery,
        )
    return _push("generic", payload, delivery)


def _hmac_matches(secret: str, body: bytes, given_hex: str) -> bool:
    """Constant-time check of a hex HMAC-SHA256 of `body` keyed with `secret`."""
    given_hex = given_hex.strip()
    if not _HEX_RE.fullmatch(given_hex):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), given_hex.lower().encode())


def _token_matches(secret: str, given: str) -> bool:
    """Constant-time token comparison; hashing first keeps the secret's length private too."""
    expected = hashlib.sha256(secret.encode()).digest()
    return hmac.compare_digest(expected, hashlib.sha256(given.encode()).digest())


def _event(headers: dict[str, str], name: str, shown: str) -> str:
    event = headers.get(name)
    if not event:
        raise WebhookRejected(400, f"no {shown} header: cannot tell which event this is")
    return event.strip()


def _ignored(event: str) -> WebhookRejected:
    return WebhookRejected(202, f"event {sanitize(event)!r} is not a push: ignored")


def _json_body(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise WebhookRejected(
            415,
            "the body is not declared as JSON (Content-Type must be application/json)",
            hint="GitHub: set the webhook's content type to application/json",
        )
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WebhookRejected(400, f"the body is not valid JSON ({_where(err)})") from None
    if not isinstance(payload, dict):
        raise WebhookRejected(400, "the body is JSON but not an object")
    return payload


def _where(err: UnicodeDecodeError | json.JSONDecodeError) -> str:
    # Position only: the exception's own text could quote the body.
    if isinstance(err, json.JSONDecodeError):
        return f"line {err.lineno} column {err.colno}"
    return f"invalid UTF-8 at byte {err.start}"


def _push(source: str, payload: dict[str, Any], delivery: str | None) -> PushEvent:
    ref = payload.get("ref")
    if not isinstance(ref, str) or not ref.startswith("refs/") or len(ref) <= len("refs/"):
        raise WebhookRejected(400, "the push has no ref of the form refs/heads/BRANCH")
    branch = ref[len(BRANCH_PREFIX) :] if ref.startswith(BRANCH_PREFIX) else None
    return PushEvent(
        source=source,
        ref=ref,
        branch=branch or None,
        revision=_revision(payload.get("after")),
        delivery=delivery,
    )


def _pull_request(source: str, payload: dict[str, Any], delivery: str | None) -> ProposalEvent:
    """GitHub's and Gitea's `pull_request` payload (the same shape for what is read)."""
    pull = _mapping(payload.get("pull_request"), "pull_request")
    number = pull.get("number", payload.get("number"))
    head = _mapping(pull.get("head"), "pull_request.head")
    base = pull.get("base") if isinstance(pull.get("base"), dict) else {}
    action = _action(source, payload.get("action"))
    if action == "closed" and pull.get("merged") is True:
        action = "merged"
    if source == "github":
        head_repo = _get(head, "repo", "full_name")
        from_fork = head_repo is None or head_repo != _get(base, "repo", "full_name")
    else:
        head_repo_id = head.get("repo_id", _get(head, "repo", "id"))
        from_fork = head_repo_id is None or head_repo_id != base.get(
            "repo_id", _get(base, "repo", "id")
        )
    number = _number(number)
    return ProposalEvent(
        source=source,
        number=number,
        action=action,
        head_sha=_head_sha(head.get("sha")),
        head_ref=_branch_name(head.get("ref"), "pull_request.head.ref"),
        ref=f"refs/pull/{number}/head",
        base_ref=_optional_name(base.get("ref")),
        author=_optional_name(_get(pull, "user", "login")),
        sender=_optional_name(_get(payload, "sender", "login")),
        from_fork=from_fork,
        delivery=delivery,
    )


def _merge_request(payload: dict[str, Any], delivery: str | None) -> ProposalEvent:
    """GitLab's `Merge Request Hook` payload."""
    attrs = _mapping(payload.get("object_attributes"), "object_attributes")
    number = _number(attrs.get("iid"))
    action = _action("gitlab", attrs.get("action"))
    if action == "updated" and not attrs.get("oldrev"):
        action = "edited"  # GitLab sends `oldrev` only when the update brought new commits
    user = payload.get("user") if isinstance(payload.get("user"), dict) else {}
    sender = _optional_name(user.get("username"))
    author_id = attrs.get("author_id")
    author = sender if author_id is not None and user.get("id") == author_id else None
    source_id, target_id = attrs.get("source_project_id"), attrs.get("target_project_id")
    return ProposalEvent(
        source="gitlab",
        number=number,
        action=action,
        head_sha=_head_sha(_get(attrs, "last_commit", "id")),
        head_ref=_branch_name(attrs.get("source_branch"), "object_attributes.source_branch"),
        ref=f"refs/merge-requests/{number}/head",
        base_ref=_optional_name(attrs.get("target_branch")),
        author=author,
        sender=sender,
        from_fork=source_id is None or source_id != target_id,
        delivery=delivery,
    )


def _mapping(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WebhookRejected(400, f"the event has no {where} object")
    return value


def _get(mapping: object, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _number(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WebhookRejected(400, "the event has no pull/merge request number")
    return value


def _head_sha(value: object) -> str:
    if not isinstance(value, str) or not _COMMIT_RE.fullmatch(value):
        raise WebhookRejected(400, "the event's head is not a commit id (40 or 64 hex digits)")
    return value


def _branch_name(value: object, where: str) -> str:
    if not isinstance(value, str) or not _BRANCH_NAME_RE.fullmatch(value):
        raise WebhookRejected(400, f"the event's {where} is not a branch name")
    return value


def _optional_name(value: object) -> str | None:
    return value if isinstance(value, str) and _BRANCH_NAME_RE.fullmatch(value) else None


def _action(source: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise WebhookRejected(400, "the event has no action")
    return _ACTIONS[source].get(value) or sanitize(value) or "?"


def _revision(after: object) -> str | None:
    if after is None or after == "":
        return None
    if not isinstance(after, str) or not _COMMIT_RE.fullmatch(after):
        raise WebhookRejected(400, "'after' is not a commit id (40 or 64 lowercase hex digits)")
    # All zeros: the branch was deleted; there is no new revision to name.
    return None if after.strip("0") == "" else after


def delivery_id(kind: str, headers: Mapping[str, str]) -> str | None:
    """The sender's delivery id (sanitized for logs), or None; for a `kind` of `KINDS`."""
    lowered = {name.lower(): value for name, value in headers.items()}
    for name in _DELIVERY_HEADERS[kind]:
        if value := lowered.get(name):
            return sanitize(value.strip())
    return None
