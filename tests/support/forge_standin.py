"""A forge stand-in for tests: a threaded HTTP server on 127.0.0.1 that speaks the parts of
GitHub's REST v3, GitLab's v4 and Gitea's v1 APIs the agent uses, with their documented
request and response shapes:

    github (API root /):        POST /repos/O/R/statuses/SHA
                                GET|POST /repos/O/R/issues/N/comments   (per_page, page)
                                PATCH /repos/O/R/issues/comments/ID
                                GET /user
    gitea  (API root /api/v1):  the same paths; pages with `limit`
    gitlab (API root /api/v4):  POST /projects/ID/statuses/SHA          (ID may be %2F-encoded)
                                GET|POST /projects/ID/merge_requests/IID/notes
                                PUT /projects/ID/merge_requests/IID/notes/NOTE_ID
                                GET /user

Auth is checked on every request (`Authorization: Bearer|token T` for GitHub, `token T`
for Gitea, `PRIVATE-TOKEN: T` for GitLab); anything else answers 401 as the forge does.
States are checked against each forge's list (422 / 400 otherwise), and GitLab refuses to
set a status to the state it already has (400 "Cannot transition status ..."), as GitLab
does. Every request is recorded; comments are kept per change with their author, so an
upsert can be checked to leave exactly one comment, updated in place.

    with ForgeStandin("gitlab", token="t0k") as forge:
        client = make_client("gitlab", forge.api_url, "infra/live", "t0k")
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.service import TestService

API_ROOTS = {"github": "", "gitea": "/api/v1", "gitlab": "/api/v4"}
STATES = {
    "github": {"pending", "success", "failure", "error"},
    "gitea": {"pending", "success", "failure", "error", "warning"},
    "gitlab": {"pending", "running", "success", "failed", "canceled", "skipped"},
}
SOCKET_TIMEOUT = 10.0


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str  # below the API root, as sent (still %-encoded)
    query: dict[str, str]
    authorized: bool
    body: Any
    status: int


@dataclass
class Comment:
    id: int
    body: str
    author: str
    author_id: int


@dataclass
class _State:
    requests: list[Recorded] = field(default_factory=list)
    statuses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # sha -> posted
    comments: dict[int, list[Comment]] = field(default_factory=dict)
    next_id: int = 1000
    fail_next: list[tuple[int, dict[str, str]]] = field(default_factory=list)


class ForgeStandin(TestService):
    """One forge of `kind`, serving repository `repo` to holders of `token`."""

    def __init__(
        self,
        kind: str,
        *,
        token: str = "forge-token",
        user: str = "gitops-bot",
        user_id: int = 7,
        whoami_status: int = 200,
    ) -> None:
        if kind not in API_ROOTS:
            raise ValueError(kind)
        self.kind = kind
        self.token = token
        self.user = user
        self.user_id = user_id
        self.whoami_status = whoami_status  # 403: as a GitHub App installation token gets
        self.state = _State()
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        standin = self

        class Handler(_Handler):
            forge = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._server = None

    @property
    def api_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{API_ROOTS[self.kind]}"

    # --- what tests set up and read ---------------------------------------------------

    def add_comment(self, change: int, body: str, *, author: str, author_id: int = 99) -> int:
        """A comment written by someone (a person quoting our marker, say)."""
        with self.lock:
            return self._add(change, body, author, author_id).id

    def comments(self, change: int) -> list[Comment]:
        with self.lock:
            return list(self.state.comments.get(change, []))

    def statuses(self, sha: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.state.statuses.get(sha, []))

    @property
    def requests(self) -> list[Recorded]:
        with self.lock:
            return list(self.state.requests)

    def fail_next(self, *statuses: int, headers: dict[str, str] | None = None) -> None:
        """The next requests answer these statuses (in order, with `headers`), whatever
        they ask."""
        with self.lock:
            self.state.fail_next.extend((status, dict(headers or {})) for status in statuses)

    def _add(self, change: int, body: str, author: str, author_id: int) -> Comment:
        self.state.next_id += 1
        comment = Comment(self.state.next_id, body, author, author_id)
        self.state.comments.setdefault(change, []).append(comment)
        return comment

    # --- the API ----------------------------------------------------------------------

    def authorized(self, headers: Any) -> bool:
        if self.kind == "gitlab":
            return headers.get("PRIVATE-TOKEN") == self.token
        given = headers.get("Authorization") or ""
        schemes = ("token",) if self.kind == "gitea" else ("token", "Bearer")
        return any(given == f"{scheme} {self.token}" for scheme in schemes)

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        with self.lock:
            if self.state.fail_next:
                status, headers = self.state.fail_next.pop(0)
                return status, {"message": "injected failure"}, headers
            if method == "GET" and path == "/user":
                if self.whoami_status != 200:
                    return self.whoami_status, {"message": "Resource not accessible"}, {}
                if self.kind == "gitlab":
                    return 200, {"id": self.user_id, "username": self.user}, {}
                return 200, {"id": self.user_id, "login": self.user}, {}
            if self.kind == "gitlab":
                return (*self._gitlab(method, path, query, body), {})
            return (*self._github(method, path, query, body), {})

    def _github(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        if m := re.fullmatch(r"/repos/[^/]+/[^/]+/statuses/([0-9a-f]{7,64})", path):
            if method != "POST":
                return 405, {"message": "Method Not Allowed"}
            if not isinstance(body, dict) or body.get("state") not in STATES[self.kind]:
                return 422, {"message": "Validation Failed"}
            if len(body.get("description") or "") > 140:
                return 422, {"message": "description is too long (maximum is 140 characters)"}
            self.state.statuses.setdefault(m.group(1), []).append(body)
            return 201, {"id": len(self.state.statuses), **body}
        if m := re.fullmatch(r"/repos/[^/]+/[^/]+/issues/(\d+)/comments", path):
            change = int(m.group(1))
            if method == "GET":
                size_key = "limit" if self.kind == "gitea" else "per_page"
                return 200, self._page(change, query, size_key, 30, self._github_comment)
            if method == "POST":
                text = self._body_text(body)
                if text is None:
                    return 422, {"message": "Validation Failed"}
                return 201, self._github_comment(self._add(change, text, self.user, self.user_id))
        if m := re.fullmatch(r"/repos/[^/]+/[^/]+/issues/comments/(\d+)", path):
            if method != "PATCH":
                return 405, {"message": "Method Not Allowed"}
            comment = self._comment(int(m.group(1)))
            text = self._body_text(body)
            if comment is None:
                return 404, {"message": "Not Found"}
            if comment.author != self.user:
                return 403, {"message": "Must have admin rights to Repository."}
            if text is None:
                return 422, {"message": "Validation Failed"}
            comment.body = text
            return 200, self._github_comment(comment)
        return 404, {"message": "Not Found"}

    def _gitlab(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        if m := re.fullmatch(r"/projects/[^/]+/statuses/([0-9a-f]{7,64})", path):
            if method != "POST":
                return 405, {"message": "405 Method Not Allowed"}
            if not isinstance(body, dict) or body.get("state") not in STATES["gitlab"]:
                return 400, {"error": "state does not have a valid value"}
            sha, name = m.group(1), body.get("name") or "default"
            previous = [
                s for s in self.state.statuses.get(sha, []) if s.get("name", "default") == name
            ]
            if previous and previous[-1]["state"] == body["state"]:
                state = body["state"]
                return 400, {"message": f"Cannot transition status via :{state} from :{state}"}
            self.state.statuses.setdefault(sha, []).append(body)
            return 201, {"id": 1, "sha": sha, "status": body["state"], "name": name}
        if m := re.fullmatch(r"/projects/[^/]+/merge_requests/(\d+)/notes", path):
            change = int(m.group(1))
            if method == "GET":
                return 200, self._page(change, query, "per_page", 20, self._gitlab_note)
            if method == "POST":
                text = self._body_text(body)
                if text is None:
                    return 400, {"error": "body is missing"}
                return 201, self._gitlab_note(self._add(change, text, self.user, self.user_id))
        if m := re.fullmatch(r"/projects/[^/]+/merge_requests/(\d+)/notes/(\d+)", path):
            if method != "PUT":
                return 405, {"message": "405 Method Not Allowed"}
            comment = self._comment(int(m.group(2)))
            text = self._body_text(body)
            if comment is None:
                return 404, {"message": "404 Not found"}
            if comment.author_id != self.user_id:
                return 403, {"message": "403 Forbidden"}
            if text is None:
                return 400, {"error": "body is missing"}
            comment.body = text
            return 200, self._gitlab_note(comment)
        return 404, {"message": "404 Not Found"}

    def _page(
        self, change: int, query: dict[str, str], size_key: str, default: int, shape: Any
    ) -> list[Any]:
        size = min(int(query.get(size_key, default)), 100)
        page = max(int(query.get("page", 1)), 1)
        items = self.state.comments.get(change, [])
        return [shape(c) for c in items[(page - 1) * size : page * size]]

    def _comment(self, comment_id: int) -> Comment | None:
        for comments in self.state.comments.values():
            for comment in comments:
                if comment.id == comment_id:
                    return comment
        return None

    @staticmethod
    def _body_text(body: Any) -> str | None:
        text = body.get("body") if isinstance(body, dict) else None
        return text if isinstance(text, str) and text else None

    @staticmethod
    def _github_comment(c: Comment) -> dict[str, Any]:
        return {"id": c.id, "body": c.body, "user": {"login": c.author, "id": c.author_id}}

    @staticmethod
    def _gitlab_note(c: Comment) -> dict[str, Any]:
        return {
            "id": c.id,
            "body": c.body,
            "system": False,
            "author": {"id": c.author_id, "username": c.author},
        }


class _Handler(BaseHTTPRequestHandler):
    forge: ForgeStandin
    timeout = SOCKET_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        forge = self.forge
        parts = urlsplit(self.path)
        root = API_ROOTS[forge.kind]
        path = parts.path[len(root) :] if parts.path.startswith(root) else None
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        authorized = forge.authorized(self.headers)
        headers: dict[str, str] = {}
        if path is None:
            status, answer = 404, {"message": "Not Found"}
        elif not authorized:
            status, answer = (
                401,
                {"message": "Bad credentials" if forge.kind == "github" else "401 Unauthorized"},
            )
        else:
            status, answer, headers = forge.handle(self.command, path, query, body)
        with forge.lock:
            forge.state.requests.append(
                Recorded(self.command, path or parts.path, query, authorized, body, status)
            )
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_PUT = _serve
