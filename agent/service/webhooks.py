"""Webhook verification: is this request from the configured sender, and is it a push?

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
    "PushEvent",
    "WebhookRejected",
    "WebhookSource",
    "delivery_id",
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
    JSON), 400 (malformed JSON or ref, a missing event header), 202 (another event type).
    Header names are matched case-insensitively.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    delivery = delivery_id(source.kind, lowered)
    if source.kind == "github":
        return _github(source, lowered, body, delivery)
    if source.kind == "gitea":
        return _gitea(source, lowered, body, delivery)
    if source.kind == "gitlab":
        return _gitlab(source, lowered, body, delivery)
    return _generic(source, lowered, body, delivery)


def _github(
    source: WebhookSource, headers: dict[str, str], body: bytes, delivery: str | None
) -> PushEvent | None:
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
    if event != "push":
        raise _ignored(event)
    return _push("github", _json_body(headers, body), delivery)


def _gitea(
    source: WebhookSource, headers: dict[str, str], body: bytes, delivery: str | None
) -> PushEvent | None:
    given = headers.get("x-gitea-signature")
    if given is None:
        raise WebhookRejected(401, "no X-Gitea-Signature header")
    if not _hmac_matches(source.secret, body, given):
        raise WebhookRejected(401, "X-Gitea-Signature does not match the body and secret")
    event = _event(headers, "x-gitea-event", "X-Gitea-Event")
    if event != "push":
        raise _ignored(event)
    return _push("gitea", _json_body(headers, body), delivery)


def _gitlab(
    source: WebhookSource, headers: dict[str, str], body: bytes, delivery: str | None
) -> PushEvent | None:
    given = headers.get("x-gitlab-token")
    if given is None:
        raise WebhookRejected(401, "no X-Gitlab-Token header")
    if not _token_matches(source.secret, given):
        raise WebhookRejected(401, "X-Gitlab-Token does not match the configured token")
    event = _event(headers, "x-gitlab-event", "X-Gitlab-Event")
    if event not in ("Push Hook", "System Hook"):
        raise _ignored(event)
    payload = _json_body(headers, body)
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
