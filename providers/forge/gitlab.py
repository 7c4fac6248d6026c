"""GitLab (API v4), under `https://HOST/api/v4`, with the `PRIVATE-TOKEN` header.

    POST /projects/{id}/statuses/{sha}                       {state, name, description, target_url}
    GET  /projects/{id}/merge_requests/{iid}/notes           (paged: per_page, page)
    POST /projects/{id}/merge_requests/{iid}/notes           {body}
    PUT  /projects/{id}/merge_requests/{iid}/notes/{note_id} {body}
    GET  /user                                               who the token is (id)

`{id}` is the project's number or its path `group/project`, sent URL-encoded. GitLab's
states are pending/running/success/failed/canceled: failure and error both become
`failed`. GitLab answers 400 "Cannot transition status via :X from :Y" when a status is
set to the state it already has; that is success here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from providers.errors import ForgeError
from providers.forge.base import (
    MAX_CONTEXT_CHARS,
    MAX_DESCRIPTION_CHARS,
    CommitState,
    ForgeHttp,
    comment_text,
    marker_line,
    short,
)

_STATES: dict[str, str] = {
    "pending": "pending",
    "success": "success",
    "failure": "failed",
    "error": "failed",
}
_UNKNOWN = object()


class GitLabClient:
    """A `ForgeClient` for one GitLab project (number or `group/project` path)."""

    kind = "gitlab"

    def __init__(self, http: ForgeHttp, repo: str) -> None:
        if not repo or repo.startswith("/") or repo.endswith("/"):
            raise ValueError(f"gitlab repo {repo!r}: expected a project id or GROUP/PROJECT")
        self._http = http
        self._project = f"/projects/{quote(repo, safe='')}"
        self._me: object = _UNKNOWN

    def __repr__(self) -> str:
        return f"GitLabClient({self._http.base_url!r}, {self._project!r})"

    def state_name(self, state: CommitState) -> str:
        """GitLab's word for `state`."""
        return _STATES[state]

    def set_status(
        self,
        sha: str,
        state: CommitState,
        description: str,
        context: str,
        target_url: str | None = None,
    ) -> None:
        body: dict[str, Any] = {
            "state": self.state_name(state),
            "name": short(context, MAX_CONTEXT_CHARS),
            "description": short(description, MAX_DESCRIPTION_CHARS),
        }
        if target_url:
            body["target_url"] = target_url
        self._http.call(
            "POST",
            f"{self._project}/statuses/{quote(sha, safe='')}",
            json_body=body,
            accept=_same_state,
        )

    def upsert_comment(self, change: int, marker: str, body: str) -> None:
        text = comment_text(marker, body)
        notes = f"{self._project}/merge_requests/{int(change)}/notes"
        found = self._find(notes, marker_line(marker))
        if found is None:
            self._http.call("POST", notes, json_body={"body": text})
        elif found.get("body") != text:
            self._http.call("PUT", f"{notes}/{int(found['id'])}", json_body={"body": text})

    def _find(self, notes: str, line: str) -> Mapping[str, Any] | None:
        me = self._whoami()
        for page in self._http.pages(notes, size_param="per_page", size=100):
            for note in page:
                if note.get("system") or line not in str(note.get("body") or ""):
                    continue
                author = note.get("author")
                if me is not None and (not isinstance(author, Mapping) or author.get("id") != me):
                    continue
                if isinstance(note.get("id"), int):
                    return note
        return None

    def _whoami(self) -> int | None:
        if self._me is _UNKNOWN:
            try:
                user, _ = self._http.call("GET", "/user")
            except ForgeError as exc:
                if exc.status not in (403, 404):
                    raise
                user = None
            user_id = user.get("id") if isinstance(user, Mapping) else None
            self._me = user_id if isinstance(user_id, int) else None
        return self._me  # type: ignore[return-value]


def _same_state(status: int, payload: Any) -> bool:
    message = payload.get("message") if isinstance(payload, Mapping) else None
    return status == 400 and isinstance(message, str) and "Cannot transition status" in message
