"""The web page's HTTP listener: pages rendered on the server, one event stream, two assets.

Routes (all GET but the login form's POST):

    /                  overview: units in dependency order, revision in force, branch head
    /units/<name>      a unit: its runs (?page=N), one run's output (?run=ID), drift, a held plan
    /activity          pass durations and outcomes, drift per unit (SVG drawn here)
    /events            server-sent events: pass started/finished, unit finished, rejected
    /static/<file>     style.css and live.js (the only script, loaded from here)
    /login             the token form, for browsers (a link cannot carry a bearer header)

Defences, each for a reason:

- off unless the host config has `web:`; open only on loopback, else a bearer token (from a
  file) or a trusted reverse proxy's user header (agent.web.auth);
- every text is redacted twice: each value the templates print (Jinja's `finalize`, before
  escaping, so a secret with `<` or `&` in it is still found) and then the whole answer;
  the event stream's messages too (agent.web.events);
- Jinja2 autoescape; a Content-Security-Policy that allows nothing but this origin's own
  style sheet and script (no inline script or style, no frames, no other origin);
- a per-request read deadline and a cap on connections (event streams are long-lived, so
  they have a cap of their own), so idle clients cannot take every thread;
- read-only: nothing here changes the agent's state; the page shows the CLI command for
  an action (`agent approve ...`) instead of doing it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import jinja2

from agent.config.web import WebConfig
from agent.errors import AgentError, NotFoundError
from agent.state.layout import StateLayout
from agent.state.store import RunStore
from agent.units.views import rfc3339
from agent.web import auth, charts, pages
from agent.web.events import EventHub, sse_frame
from providers.git_source import CommitInfo

__all__ = ["CSP", "WebApp", "WebListenError", "WebServer"]

log = logging.getLogger(__name__)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
STATIC = {"style.css": "text/css; charset=utf-8", "live.js": "text/javascript; charset=utf-8"}
HEARTBEAT = 15.0  # seconds between keep-alive comments on an idle event stream
REQUEST_TIMEOUT = 10.0  # seconds for a request's line, headers and form body
MAX_CONNECTIONS = 64
MAX_STREAMS = 32  # open event streams (each holds a thread)
MAX_FORM = 4096
_HTML = "text/html; charset=utf-8"
_ESCAPED = re.compile(r"[&<>\"']")  # what Jinja's autoescape rewrites

Answer = tuple[int, dict[str, str], bytes]


class WebListenError(AgentError):
    """The page's listener could not bind its address."""

    reference = "listen-failed"
    retryable = True


class WebApp:
    """Renders the pages from the store; no socket here (WebServer serves it).

    `redact` is the agent's redactor (`Redactor.redact`); `commit` looks up a revision's
    subject and author (None when unknown); `hub` gives the manifest order and the events.
    """

    def __init__(
        self,
        store: RunStore,
        layout: StateLayout,
        *,
        redact: Callable[[str], str],
        hub: EventHub,
        commit: Callable[[str], CommitInfo | None] | None = None,
    ) -> None:
        self.store = store
        self.layout = layout
        self.redact = redact
        self.hub = hub
        self._commit = commit or (lambda sha: None)
        self._commits: dict[str, CommitInfo | None] = {}
        self._lock = threading.Lock()  # one page at a time reads the store's connection
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("agent.web", "templates"),
            autoescape=True,
            finalize=self._finalize,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = _when
        self.env.filters["iso"] = lambda t: rfc3339(t) if t else ""
        self.env.filters["seconds"] = _seconds
        # Redacted before it is cut: a secret cut in half would no longer be recognised.
        self.env.filters["short"] = lambda text, size=200: _cut(self.redact(text or ""), size)
        self.env.globals["pass_chart"] = charts.pass_chart
        self.env.globals["drift_chart"] = charts.drift_chart

    def _finalize(self, value: Any) -> Any:
        # Only a value that escaping changes needs it here: any other is in the page as it
        # is, and the redaction of the whole page (`_page`) finds it there.
        if isinstance(value, str) and not value.isalnum() and _ESCAPED.search(value):
            return self.redact(value)
        return value

    def commit(self, sha: str) -> CommitInfo | None:
        """A revision's subject and author, looked up once (commits never change)."""
        if sha not in self._commits:
            try:
                self._commits[sha] = self._commit(sha)
            except Exception:  # gone from the clone, or no clone: the sha alone is shown
                self._commits[sha] = None
            if len(self._commits) > 4096:
                self._commits.pop(next(iter(self._commits)))
        return self._commits[sha]

    def render(self, path: str, query: Mapping[str, list[str]]) -> Answer:
        """The answer for a GET of a page."""
        try:
            with self._lock:
                if path == "/":
                    data = pages.overview_page(
                        self.store, self.layout, self.hub.manifest, self.commit, self.hub.running
                    )
                    body = self._page("overview.html", data, "overview")
                elif path == "/activity":
                    body = self._page("activity.html", pages.activity_page(self.store), "activity")
                elif path.startswith("/units/") and path.count("/") == 2:
                    name = unquote(path[len("/units/") :])
                    data = pages.unit_page(
                        self.store,
                        self.layout,
                        self.hub.manifest,
                        self.commit,
                        name,
                        page=_int(query.get("page", ["1"])[0]),
                        run=query["run"][0] if "run" in query else None,
                    )
                    body = self._page("unit.html", data, "unit")
                else:
                    return self.error(404, "No such page.")
        except NotFoundError as err:
            return self.error(404, err.message)
        except AgentError as err:
            log.warning("web: %s", self.redact(err.message))
            return self.error(503, err.message)
        return 200, {"Content-Type": _HTML}, body

    def _page(self, template: str, data: dict[str, Any], tab: str) -> bytes:
        html = self.env.get_template(template).render(page=data, tab=tab, now=time.time())
        return self.redact(html).encode()

    def error(self, status: int, message: str) -> Answer:
        html = self.env.get_template("error.html").render(
            status=status, message=message, tab="", now=time.time()
        )
        return status, {"Content-Type": _HTML}, self.redact(html).encode()

    def login_page(self, failed: bool = False) -> Answer:
        html = self.env.get_template("login.html").render(failed=failed, tab="", now=time.time())
        return (401 if failed else 200), {"Content-Type": _HTML}, html.encode()

    def static(self, name: str) -> Answer:
        if name not in STATIC:
            return self.error(404, "No such file.")
        data = (resources.files("agent.web") / "static" / name).read_bytes()
        return 200, {"Content-Type": STATIC[name], "Cache-Control": "max-age=300"}, data


def _int(text: str) -> int:
    return int(text) if text.isascii() and text.isdigit() and len(text) < 9 else 1


def _cut(text: str, size: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= size else line[: size - 1] + "…"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f} s"
    return f"{int(value // 60)} min {int(value % 60)} s"


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    seconds = max(0.0, time.time() - timestamp)
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h ago"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


class WebServer:
    """The web page's listener, served from background threads. Port 0 picks a free port."""

    def __init__(self, app: WebApp, config: WebConfig, *, token: str | None = None) -> None:
        if not config.open and token is None and not config.trusted_proxies:
            raise ValueError("a token or a trusted proxy is needed off loopback")
        self.app = app
        self.config = config
        self.token = token
        self.stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._streams = threading.BoundedSemaphore(MAX_STREAMS)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the web listener is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self.config.host or "0.0.0.0"
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in the background; raises `ListenError` if the address is taken."""
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        self.stopping.clear()
        try:
            self._server = _Server((self.config.host, self.config.port), self, family)
        except OSError as err:
            raise WebListenError(
                f"web: cannot listen on {self.config.host}:{self.config.port}: {err.strerror}",
                hint="another process may hold the port; or change web.listen in the host config",
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"web-{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.info("web page on %s (%s)", self.url, "open: loopback" if self.config.open else "auth")

    def stop(self, timeout: float = 2.0) -> None:
        """Stop listening, end the event streams, free the port. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        self.stopping.set()
        server.shutdown()
        server.server_close()
        server.cut(time.monotonic() + timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> WebServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], web: WebServer, family: int) -> None:
        self.address_family = family
        self.web = web
        self._active: set[socket.socket] = set()
        self._changed = threading.Condition()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._changed:
            full = len(self._active) >= MAX_CONNECTIONS
            if not full:
                self._active.add(request)
        if full:
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._changed:
            self._active.discard(request)
            self._changed.notify_all()
        super().shutdown_request(request)

    def cut(self, deadline: float) -> None:
        with self._changed:
            while self._active and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            left_over = list(self._active)
        for sock in left_over:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("web: error serving %s", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "gitops-agent"
    sys_version = ""
    timeout = REQUEST_TIMEOUT  # per read: the line, headers and a form body

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        web = self.server.web
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if path.startswith("/static/") and self.command in ("GET", "HEAD"):
            self._send(*web.app.static(path[len("/static/") :]))
            return
        if path == "/login" and not web.config.open and web.token:
            self._login()
            return
        verdict = auth.check(
            web.config, web.token, self.client_address[0], dict(self.headers.items())
        )
        if not verdict.allowed:
            log.info("web: refused %s %s from %s", self.command, path, self.client_address[0])
            status, headers, body = web.app.error(
                401,
                "Authentication required: sign in with the page's token at /login,"
                " or send Authorization: Bearer <token>.",
            )
            self._send(status, {**headers, "WWW-Authenticate": 'Bearer realm="gitops-agent"'}, body)
            return
        if self.command not in ("GET", "HEAD"):
            self._send(405, {"Allow": "GET, HEAD", "Content-Type": "text/plain"}, b"read-only\n")
            return
        if path == "/events":
            self._events()
            return
        self._send(*web.app.render(path, query))

    def _login(self) -> None:
        web = self.server.web
        assert web.token is not None
        if self.command != "POST":
            self._send(*web.app.login_page())
            return
        length = self.headers.get("Content-Length", "")
        if not (length.isascii() and length.isdigit()) or int(length) > MAX_FORM:
            self._send(413, {"Content-Type": "text/plain"}, b"form too large\n")
            return
        form = parse_qs(self.rfile.read(int(length)).decode("utf-8", "replace"))
        given = form.get("token", [""])[0].strip()
        headers = {"Authorization": f"Bearer {given}"}
        if not given or not auth.check(web.config, web.token, "", headers).allowed:
            log.info("web: a wrong token at /login from %s", self.client_address[0])
            self._send(*web.app.login_page(failed=True))
            return
        cookie = f"{auth.COOKIE}={auth.session_value(web.token)}; Path=/; HttpOnly; SameSite=Strict"
        self._send(303, {"Location": "/", "Set-Cookie": cookie, "Content-Length": "0"}, b"")

    def _events(self) -> None:
        web = self.server.web
        if not web._streams.acquire(blocking=False):
            self._send(503, {"Content-Type": "text/plain", "Retry-After": "5"}, b"busy\n")
            return
        subscription = web.app.hub.subscribe()
        try:
            self.connection.settimeout(REQUEST_TIMEOUT)  # for each write
            self.send_response(200)
            for name, value in {
                **SECURITY_HEADERS,
                "Content-Type": "text/event-stream",
                "Connection": "close",
                "X-Accel-Buffering": "no",  # nginx: pass each event on at once
            }.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(b"retry: 2000\n: connected\n\n")
            self.wfile.flush()
            while not web.stopping.is_set():
                message = subscription.next(timeout=min(HEARTBEAT, 0.5))
                if message is None:
                    if subscription.dropped:
                        return  # too slow: the browser reconnects and reloads
                    self._idle = getattr(self, "_idle", 0.0) + 0.5
                    if self._idle >= HEARTBEAT:
                        self._idle = 0.0
                        self.wfile.write(b": keep-alive\n\n")
                        self.wfile.flush()
                    continue
                self._idle = 0.0
                self.wfile.write(web.app.redact(sse_frame(message).decode()).encode())
                self.wfile.flush()
        except OSError:
            return  # the browser went away
        finally:
            subscription.close()
            web._streams.release()
            self.close_connection = True

    def _send(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.send_response(status)
        merged = {**SECURITY_HEADERS, **headers}
        merged.setdefault("Content-Length", str(len(body)))
        merged["Connection"] = "close"
        for name, value in merged.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("web: %s %s -> %s", self.client_address[0], urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("web: %s: %s", self.client_address[0], (format % args)[:200])
