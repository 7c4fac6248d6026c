"""GitHub (REST v3) and, with a few settings changed, Gitea (API v1).

    POST  /repos/{owner}/{repo}/statuses/{sha}            {state, description, context, target_url}
    GET   /repos/{owner}/{repo}/issues/{n}/comments       (a pull request is an issue here)
    POST  /repos/{owner}/{repo}/issues/{n}/comments       {body}
    PATCH /repos/{owner}/{repo}/issues/comments/{id}      {body}
    GET   /user                                           who the token is (login)

GitHub's states are pending/success/failure/error, Gitea's the same plus warning: ours map
one to one. A GitHub App installation token may not read `/user` (403): then our comment is
found by its marker alone.
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

GITHUB_API = "https://api.github.com"
_UNKNOWN = object()


class GitHubClient:
    """A `ForgeClient` for one GitHub repository `owner/name`."""

    kind = "github"
    _page_param, _page_size = "per_page", 100

    def __init__(self, http: ForgeHttp, repo: str) -> None:
        owner, _, name = repo.partition("/")
        if not owner or not name or "/" in name:
            raise ValueError(f"{self.kind} repo {repo!r}: expected OWNER/NAME")
        self._http = http
        self._repo = f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}"
        self._me: object = _UNKNOWN

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._http.base_url!r}, {self._repo!r})"

    def state_name(self, state: CommitState) -> str:
        """The forge's word for `state`."""
        return state

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
            "description": short(description, MAX_DESCRIPTION_CHARS),
            "context": short(context, MAX_CONTEXT_CHARS),
        }
        if target_url:
            body["target_url"] = target_url
        self._http.call("POST", f"{self._repo}/statuses/{quote(sha, safe='')}", json_body=body)

    def upsert_comment(self, change: int, marker: str, body: str) -> None:
        text = comment_text(marker, body)
        found = self._find(change, marker_line(marker))
        if found is None:
            self._http.call(
                "POST", f"{self._repo}/issues/{int(change)}/comments", json_body={"body": text}
            )
        elif found.get("body") != text:
            comment_id = int(found["id"])
            self._http.call(
                "PATCH", f"{self._repo}/issues/comments/{comment_id}", json_body={"body": text}
            )

    def _find(self, change: int, line: str) -> Mapping[str, Any] | None:
        me = self._whoami()
        path = f"{self._repo}/issues/{int(change)}/comments"
        for page in self._http.pages(path, size_param=self._page_param, size=self._page_size):
            for comment in page:
                if line not in str(comment.get("body") or ""):
                    continue
                if me is not None and _login(comment) != me:
                    continue  # someone quoted our marker: not ours to edit
                if isinstance(comment.get("id"), int):
                    return comment
        return None

    def _whoami(self) -> str | None:
        if self._me is _UNKNOWN:
            try:
                user, _ = self._http.call("GET", "/user")
            except ForgeError as exc:
                if exc.status not in (403, 404):
                    raise  # 401 is a bad token: every other call would fail too
                user = None
            login = user.get("login") if isinstance(user, Mapping) else None
            self._me = login if isinstance(login, str) and login else None
        return self._me  # type: ignore[return-value]


def _login(comment: Mapping[str, Any]) -> str | None:
    user = comment.get("user")
    return user.get("login") if isinstance(user, Mapping) else None
