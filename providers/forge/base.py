"""What every forge client shares: the interface, comment markers, size caps and the wire.

`ForgeClient` is the interface the agent codes against (one implementation per forge in
this package). The wire (`ForgeHttp`) owns `requests` for this package: JSON in and out,
one bounded timeout per call, no redirects (a redirect could carry the token to another
host), a capped response, and errors as `ForgeError` naming forge, method, endpoint and
HTTP status, never the token.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, Protocol

import requests

from providers.errors import ForgeError

CommitState = Literal["pending", "success", "failure", "error"]
COMMIT_STATES: tuple[CommitState, ...] = ("pending", "success", "failure", "error")

# GitHub's limit on an issue comment's body (characters); GitLab allows 1,000,000 in a
# note and Gitea documents none: the smallest holds for all three.
MAX_COMMENT_CHARS = 65536
# GitHub refuses a status description over 140 characters (HTTP 422).
MAX_DESCRIPTION_CHARS = 140
MAX_CONTEXT_CHARS = 255
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_PAGES = 50  # comments listed: at most this many pages, then the marker is "not found"
DEFAULT_TIMEOUT = 10.0

_MARKER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,99}")
_QUOTABLE = re.compile(r"[\x20-\x7e]{1,160}")
_TRUNCATED = "\n\n… (cut: {left} more characters; the whole text is in `agent logs`)"


class ForgeClient(Protocol):
    """A forge's API for one repository, as the agent uses it."""

    kind: str

    def set_status(
        self,
        sha: str,
        state: CommitState,
        description: str,
        context: str,
        target_url: str | None = None,
    ) -> None:
        """Set the commit status `context` of `sha` (mapped to the forge's state names).
        `description` is cut to 140 characters. Raises ForgeError."""
        ...

    def upsert_comment(self, change: int, marker: str, body: str) -> None:
        """Keep exactly one comment of ours on pull/merge request `change`: the one that
        holds `marker_line(marker)` (among comments by the token's own user, where the
        API says who that is) is updated in place, else one is created. `body` is cut to
        fit the forge's limit. Raises ForgeError."""
        ...


def marker_line(marker: str) -> str:
    """The hidden line that finds our comment again: `<!-- gitops-agent:MARKER -->`."""
    if not _MARKER_RE.fullmatch(marker):
        raise ValueError(
            f"comment marker {marker!r}: expected 1-100 of letters, digits and _.:/- "
            "(starting with a letter or digit)"
        )
    return f"<!-- gitops-agent:{marker} -->"


def comment_text(marker: str, body: str, limit: int = MAX_COMMENT_CHARS) -> str:
    """The comment as sent: the marker line, then `body`, cut to `limit` characters with a
    note saying how much was left out."""
    head = marker_line(marker) + "\n"
    room = limit - len(head)
    if len(body) <= room:
        return head + body
    # Reserve room for the note (its digits included) before cutting.
    note_room = len(_TRUNCATED.format(left=len(body)))
    kept = body[: max(0, room - note_room)]
    return head + kept + _TRUNCATED.format(left=len(body) - len(kept))


def short(text: str, limit: int) -> str:
    """One line of at most `limit` characters (an ellipsis marks a cut)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class ForgeHttp:
    """JSON over HTTPS to one forge's API, with the auth header set on every request."""

    def __init__(
        self,
        kind: str,
        base_url: str,
        auth_header: tuple[str, str],
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        ca_bundle: str | None = None,
    ) -> None:
        self.kind = kind
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        # One request at a time: the pass reporter and the proposal planner share a client,
        # and a requests.Session is not documented as thread-safe.
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._session.trust_env = False  # no ~/.netrc or proxy settings from the environment
        self._session.headers.update(
            {
                auth_header[0]: auth_header[1],
                "Accept": "application/json",
                "User-Agent": "gitops-agent",
            }
        )
        if ca_bundle:
            self._session.verify = ca_bundle

    def __repr__(self) -> str:  # the session's headers hold the token
        return f"ForgeHttp({self.kind!r}, {self.base_url!r})"

    def close(self) -> None:
        self._session.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        params: Mapping[str, str | int] | None = None,
        accept: Callable[[int, Any], bool] | None = None,
    ) -> tuple[Any, Mapping[str, str]]:
        """Send one request to `path` (below the API base) and return (JSON, headers).

        A non-2xx answer raises ForgeError, unless `accept(status, json)` says it is fine.
        """
        with self._lock:
            return self._call(method, path, json_body, params, accept)

    def _call(
        self,
        method: str,
        path: str,
        json_body: Mapping[str, Any] | None,
        params: Mapping[str, str | int] | None,
        accept: Callable[[int, Any], bool] | None,
    ) -> tuple[Any, Mapping[str, str]]:
        endpoint = f"{method} {path}"
        try:
            response = self._session.request(
                method,
                self.base_url + path,
                json=json_body,
                params=params,
                timeout=self._timeout,
                allow_redirects=False,
                stream=True,
            )
        except requests.Timeout:
            raise self._error(
                endpoint, None, f"no answer within {self._timeout:g}s", True
            ) from None
        except requests.RequestException as exc:
            raise self._error(endpoint, None, _connection_reason(exc), True) from None
        with response:
            data = _read_capped(response)
            payload = _json_or_none(data)
            status = response.status_code
            if 200 <= status < 300 or (accept is not None and accept(status, payload)):
                return payload, response.headers
            said = self._said(payload)
            # GitHub's secondary rate limit answers 403 with Retry-After: wait, then retry.
            limited = status == 403 and "retry-after" in {k.lower() for k in response.headers}
            retryable = status == 429 or status >= 500 or limited
            reason = f"HTTP {status}{f' ({said})' if said else ''}"
            if 300 <= status < 400:
                reason += ": a redirect (configure the API's final URL)"
            raise self._error(endpoint, status, reason, retryable)

    def pages(self, path: str, *, size_param: str, size: int) -> Iterator[list[Mapping[str, Any]]]:
        """Each page of a listing, until a short page (bounded by MAX_PAGES)."""
        for page in range(1, MAX_PAGES + 1):
            items, _ = self.call("GET", path, params={size_param: size, "page": page})
            if not isinstance(items, list):
                raise self._error(f"GET {path}", 200, "expected a JSON list", False)
            yield [item for item in items if isinstance(item, Mapping)]
            if len(items) < size:
                return

    def _error(self, endpoint: str, status: int | None, reason: str, retryable: bool) -> ForgeError:
        message = f"{self.kind}: {endpoint}: {reason}"
        if self._token:
            message = message.replace(self._token, "***")
        return ForgeError(
            message, forge=self.kind, endpoint=endpoint, status=status, retryable=retryable
        )

    def _said(self, payload: Any) -> str:
        """The forge's own error message, when short and printable (and without the token)."""
        if not isinstance(payload, Mapping):
            return ""
        said = payload.get("message") or payload.get("error")
        if isinstance(said, list):
            said = "; ".join(str(item) for item in said)
        if not isinstance(said, str):
            return ""
        said = " ".join(said.split())
        if self._token and self._token in said:
            said = said.replace(self._token, "***")
        return short(said, 160) if _QUOTABLE.fullmatch(short(said, 160)) else ""


def _read_capped(response: requests.Response) -> bytes:
    chunks, size = [], 0
    for chunk in response.iter_content(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            break  # a listing this large is not one we asked for; parse what is whole
        chunks.append(chunk)
    return b"".join(chunks)


def _json_or_none(data: bytes) -> Any:
    if not data:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def _connection_reason(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS failed (is the forge's certificate trusted?)"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect"
    return f"request failed ({type(exc).__name__})"
