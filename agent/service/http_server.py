"""The agent's HTTP listener: Git webhooks, Prometheus scrapes and a health check.

Routes:

    POST /hooks/<name>   a push from the sender configured as <name> (see agent.service.webhooks)
    GET  /metrics        the body and content type the `metrics` callback returns
    GET  /healthz        "ok", and the last pass's outcome from the `health` callback

Built on the standard library's `ThreadingHTTPServer`: three small routes need no
framework and no new dependency, and the defences a listener on a network needs are a
few lines each here:

- one request per connection (`Connection: close`), so a connection cannot linger idle;
- a short deadline for the request line and headers (`header_timeout`, 5 s), then one for
  the whole request (`request_timeout`, 10 s), both for the total, not per read: a client
  that opens connections and sends nothing, or trickles a byte at a time, frees its slot
  within seconds; it is answered 408 and logged as a warning;
- a body needs `Content-Length`, checked against `max_body` before the body is read
  (also when the client sends `Expect: 100-continue`, which then never sends it); a body
  answered unread is discarded for at most a second so that the client reads the 413.
  A request with neither `Content-Length` nor `Transfer-Encoding` has no body (RFC 9112
  6.3): `curl -X POST URL` sends that, and it is a valid generic trigger; chunked bodies
  are refused (411), since their length is not known before reading;
- at most `max_connections` requests in progress, and at most `max_connections_per_client`
  from one remote address, so that one address holding idle connections cannot take the
  slots every sender needs (the 64 slots used to be one idle client's for the taking);
  beyond either, a 503 at once;
- `on_push` runs on a dispatcher thread of its own: the sender gets its 202 at once and
  never waits for the daemon.

Every rejection is logged as one line (remote address, route, status, reason, delivery
id); never the body, never a header value (a token or signature) and never the query
string.
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from agent.errors import AgentError
from agent.service.webhooks import (
    ProposalEvent,
    PushEvent,
    WebhookRejected,
    WebhookSource,
    delivery_id,
    parse_event,
    sanitize,
    verify_and_parse,
)

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_CONNECTIONS_PER_CLIENT",
    "DEFAULT_REQUEST_TIMEOUT",
    "AgentHTTPServer",
    "ListenError",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1024 * 1024  # GitHub push payloads are a few KiB; 1 MiB is generous
DEFAULT_REQUEST_TIMEOUT = 10.0  # seconds for a whole request to arrive
# Seconds for the request line and headers: a sender writes them at once, so a few
# seconds is generous, and an idle connection frees its slot twice as soon.
DEFAULT_HEADER_TIMEOUT = 5.0
DEFAULT_MAX_CONNECTIONS = 64
# A quarter of the slots: a burst from one forge address still fits, and one address
# alone cannot take them all. (Behind a reverse proxy, every request comes from the proxy's
# address: raise it there, the proxy buffers requests before passing them on anyway.)
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 16
DEFAULT_STOP_TIMEOUT = 2.0
# How soon serve_forever notices stop(): its select() only wakes on a connection or after
# this long. 20 idle wakeups a second cost nothing measurable and keep stop() prompt.
_POLL_INTERVAL = 0.05
_QUEUE_SIZE = 256  # pushes waiting for on_push; the daemon coalesces them anyway
_LINGER = 1.0  # seconds to discard an unread body after answering (see _Handler._linger)
_LINGER_CHUNK = 64 * 1024
_TEXT = "text/plain; charset=utf-8"


class ListenError(AgentError):
    """The listener could not bind its address (in use, not permitted, no such address)."""

    reference = "listen-failed"
    retryable = True


class AgentHTTPServer:
    """The daemon's HTTP listener, served from background threads.

    `hooks` maps the `<name>` of `/hooks/<name>` to its sender. A verified push to
    `tracked_branch` (or a generic trigger naming no ref) is handed to `on_push` on a
    dispatcher thread, one call at a time, in arrival order; `on_push` should only
    record the trigger (the pass runs elsewhere). `metrics` returns the exposition body
    and its content type (None: no /metrics route); `health` returns a one-line
    summary of the last pass for /healthz.

    Port 0 picks a free port; read it from `port` after `start()`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tracked_branch: str,
        hooks: Mapping[str, WebhookSource],
        on_push: Callable[[PushEvent], None],
        on_proposal: Callable[[ProposalEvent], None] | None = None,
        metrics: Callable[[], tuple[bytes, str]] | None = None,
        health: Callable[[], str] | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    ) -> None:
        if (
            max_body < 0
            or request_timeout <= 0
            or header_timeout <= 0
            or max_connections < 1
            or max_connections_per_client < 1
        ):
            raise ValueError(
                "max_body >= 0, request_timeout > 0, header_timeout > 0, "
                "max_connections >= 1 and max_connections_per_client >= 1"
            )
        self.host = host
        self.tracked_branch = tracked_branch
        self.hooks = dict(hooks)
        self.metrics = metrics
        self.health = health
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        # The headers' deadline never runs past the whole request's.
        self.header_timeout = min(header_timeout, request_timeout)
        self._requested_port = port
        self._on_push = on_push
        # Pull/merge request events (None: answered 202 and ignored, as before). It must
        # only record a trigger: it runs on the request's thread.
        self.on_proposal = on_proposal
        self._dispatcher = _Dispatcher(on_push)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one picked, when constructed with port 0)."""
        if self._server is None:
            raise RuntimeError("the HTTP listener is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8080``."""
        host = self.host or "0.0.0.0"
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    def start(self) -> None:
        """Bind the address and serve in the background; raises `ListenError` if it cannot."""
        if self._server is not None:
            raise RuntimeError("the HTTP listener is already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            self._server = _Server((self.host, self._requested_port), self, family)
        except OSError as err:
            raise ListenError(
                f"cannot listen on {self.host or '*'}:{self._requested_port}: {err.strerror}",
                hint="another process may hold the port; or change the listen address "
                "in the host config",
            ) from None
        self._dispatcher = _Dispatcher(self._on_push)  # a fresh one: start after stop works
        self._dispatcher.start()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=f"http-{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.info("listening on %s (webhooks: %s)", self.url, ", ".join(self.hooks) or "none")

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop listening, give requests in progress up to `timeout` seconds, free the port.

        Connections still open after that are cut. Pushes not yet handed to `on_push`
        are dropped (the next poll finds the revision anyway). Safe to call twice.
        """
        server, self._server = self._server, None
        if server is None:
            return
        deadline = time.monotonic() + timeout
        server.shutdown()  # returns once serve_forever has left its loop
        server.server_close()  # the listening socket: the port is free from here
        server.drain(deadline)
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        self._dispatcher.stop(max(0.0, deadline - time.monotonic()))
        log.info("stopped listening on port %d", server.server_address[1])

    def __enter__(self) -> AgentHTTPServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _submit(self, event: PushEvent) -> bool:
        return self._dispatcher.submit(event)


class _Dispatcher:
    """Calls `on_push` on a thread of its own so that no request waits for the daemon."""

    def __init__(self, on_push: Callable[[PushEvent], None]) -> None:
        self._on_push = on_push
        self._queue: queue.Queue[PushEvent | None] = queue.Queue(_QUEUE_SIZE)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-dispatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, event: PushEvent) -> bool:
        """Queue a push; False when the queue is full (the daemon is stuck)."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            return False
        return True

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        with contextlib.suppress(queue.Full):  # when full, the thread sees the flag
            self._queue.put_nowait(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                event = self._queue.get(timeout=0.5)  # stop() also wakes it with None
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            if event is None or self._stopping.is_set():
                dropped = self._queue.qsize()
                if dropped:
                    log.info("stopping: %d queued webhook push(es) not delivered", dropped)
                return
            try:
                self._on_push(event)
            except Exception:
                log.exception("the push trigger failed for delivery %s", event.delivery or "-")


class _DeadlineReader(io.RawIOBase):
    """A socket reader that gives up at a fixed moment, however slowly bytes arrive.

    The moment (`deadline`) can be moved: the handler moves it from the headers' deadline
    to the whole request's once the headers are in. `timed_out` tells that it gave up.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self.deadline = deadline
        self.timed_out = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.timed_out = True
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv_into(buffer)
        except TimeoutError:
            self.timed_out = True
            raise


class _Server(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` that counts its connections, refuses beyond a limit, and
    can cut the ones left when it stops."""

    daemon_threads = True
    block_on_close = False  # stop() waits itself, with a bound
    # socketserver's default backlog of 5 makes a burst of deliveries wait for SYN
    # retransmits (1 s each); the kernel caps this at net.core.somaxconn anyway.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: AgentHTTPServer, family: int) -> None:
        self.address_family = family
        self.app = app
        self._active: set[socket.socket] = set()
        self._per_client: dict[str, int] = {}  # remote address -> requests in progress
        self._client_of: dict[socket.socket, str] = {}
        self._changed = threading.Condition()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        client = str(client_address[0])
        with self._changed:
            busy = None
            if self._per_client.get(client, 0) >= self.app.max_connections_per_client:
                busy = (
                    f"more than {self.app.max_connections_per_client} requests in progress "
                    "from this address"
                )
            elif len(self._active) >= self.app.max_connections:
                busy = f"more than {self.app.max_connections} requests in progress"
            else:
                self._active.add(request)
                self._client_of[request] = client
                self._per_client[client] = self._per_client.get(client, 0) + 1
        if busy:
            _refuse_busy(request)
            log.warning(
                "http request rejected: remote=%s route=- status=503 reason=%s delivery=-",
                client,
                busy,
            )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._changed:
            if request in self._active:
                self._active.discard(request)
                client = self._client_of.pop(request)
                left = self._per_client[client] - 1
                if left:
                    self._per_client[client] = left
                else:
                    del self._per_client[client]
            self._changed.notify_all()
        super().shutdown_request(request)

    def drain(self, deadline: float) -> None:
        """Wait until no request is in progress or `deadline`; then cut what is left."""
        with self._changed:
            while self._active and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            stragglers = list(self._active)
        for sock in stragglers:
            with contextlib.suppress(OSError):  # its thread's next read or write fails
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up is not the agent's problem; anything else is a bug.
        level = logging.DEBUG if _is_disconnect() else logging.ERROR
        log.log(level, "http: error serving %s", client_address[0], exc_info=True)


def _is_disconnect() -> bool:
    err = sys.exc_info()[1]
    return isinstance(err, ConnectionError | TimeoutError)


def _is_length(text: str) -> bool:
    # str.isdigit alone accepts "²", which int() refuses.
    return text.isascii() and text.isdigit()


def _raw_answer(status: str, text: str, extra: str = "") -> bytes:
    """A whole answer, for when the request was not parsed far enough for send_response."""
    body = text.encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {_TEXT}\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode() + body


def _refuse_busy(request: socket.socket) -> None:
    answer = _raw_answer(
        "503 Service Unavailable",
        "too many requests in progress, retry later\n",
        "Retry-After: 1\r\n",
    )
    try:
        request.setblocking(False)  # a fresh socket's send buffer is empty: never blocks
        request.send(answer)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # for Expect: 100-continue; every answer closes anyway
    server_version = "gitops-agent"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body go out as two writes
    _unread_body = False  # a body was announced and answered without being read
    _headers_in = False  # the request line and headers were read in time
    command: str | None = None

    def setup(self) -> None:
        super().setup()
        self._started = time.monotonic()
        self._reader = _DeadlineReader(
            self.connection, self._started + self.server.app.header_timeout
        )
        self.rfile.close()
        self.rfile = io.BufferedReader(self._reader)

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers
        self._headers_in = True
        # The body (if any) may take until the whole request's deadline.
        self._reader.deadline = self._started + self.server.app.request_timeout
        return parsed

    def handle_one_request(self) -> None:
        super().handle_one_request()
        if self._reader.timed_out and not self._headers_in:
            self._answer_header_timeout()

    def _answer_header_timeout(self) -> None:
        """408 for a request whose line or headers did not arrive in time (the stock
        handler closes such a connection without a word and logs it at info)."""
        limit = self.server.app.header_timeout
        reason = f"the request headers did not arrive within {limit:g} s"
        route = "-"
        if self.command:  # the request line was in; the headers were not
            route = f"{self.command} {sanitize(self._path())}"
        log.warning(
            "http request rejected: remote=%s route=%s status=408 reason=%s delivery=-",
            self.client_address[0],
            route,
            reason,
        )
        with contextlib.suppress(OSError):
            self.connection.settimeout(1.0)  # a client that reads nothing cannot hold us
            self.connection.sendall(_raw_answer("408 Request Timeout", reason + "\n"))
        self.close_connection = True

    def finish(self) -> None:
        super().finish()
        if self._unread_body:
            self._linger()

    def _linger(self) -> None:
        """Discard what the client still sends, for a moment, before the socket closes.

        Closing a socket with unread data makes the kernel send a reset, and the client
        then loses the answer it has not read yet (a 413 becomes "connection reset"
        for a body of a few MiB). Nothing is kept; the time is bounded (`_LINGER`).
        """
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)  # the answer is complete: FIN
            deadline = time.monotonic() + _LINGER
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(_LINGER_CHUNK):
                    break

    # -- routing ------------------------------------------------------------------

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_PUT(self) -> None:
        self._route()

    def do_DELETE(self) -> None:
        self._route()

    def do_PATCH(self) -> None:
        self._route()

    def do_OPTIONS(self) -> None:
        self._route()

    def _route(self) -> None:
        length = self.headers.get("Content-Length", "").strip()
        self._unread_body = "Transfer-Encoding" in self.headers or length not in ("", "0")
        path = self._path()
        if path.startswith("/hooks/"):
            allowed, serve = ("POST",), lambda: self._hook(path[len("/hooks/") :])
        elif path == "/metrics":
            allowed, serve = ("GET", "HEAD"), self._metrics
        elif path == "/healthz":
            allowed, serve = ("GET", "HEAD"), self._healthz
        else:
            self._reject(404, "no such route (try /hooks/<name>, /metrics, /healthz)")
            return
        if self.command not in allowed:
            self._reject(
                405, f"{self.command} is not allowed here", headers={"Allow": ", ".join(allowed)}
            )
            return
        serve()

    def _path(self) -> str:
        # urlsplit also copes with the absolute form (`POST http://host/hooks/x`).
        return urlsplit(self.path).path

    def handle_expect_100(self) -> bool:
        # Refuse an oversized body before the client sends it.
        length = self.headers.get("Content-Length", "").strip()
        if _is_length(length) and int(length) > self.server.app.max_body:
            self._unread_body = True  # in case it sends the body anyway
            self._reject_too_large(int(length))
            return False
        return super().handle_expect_100()

    # -- routes -------------------------------------------------------------------

    def _hook(self, name: str) -> None:
        app = self.server.app
        source = app.hooks.get(name)
        if source is None:
            self._reject(404, f"no webhook named {sanitize(name)!r} is configured")
            return
        delivery = delivery_id(source.kind, dict(self.headers.items()))
        body = self._read_body(delivery)
        if body is None:
            return
        parse = verify_and_parse if app.on_proposal is None else parse_event
        try:
            event = parse(source, dict(self.headers.items()), body)
        except WebhookRejected as rejected:
            text = rejected.reason + (f" ({rejected.hint})" if rejected.hint else "")
            self._reject(rejected.status, text, delivery=delivery)
            return
        if event is None:
            log.info("webhook %s: ping answered (delivery %s)", name, delivery or "-")
            self._answer(200, "pong: the webhook reaches the agent and its secret matches\n")
            return
        if isinstance(event, ProposalEvent):
            assert app.on_proposal is not None
            app.on_proposal(event)
            what = f"{sanitize(event.ref)} at {event.head_sha[:12]} ({sanitize(event.action)})"
            log.info("webhook %s: proposal %s (delivery %s)", name, what, delivery or "-")
            self._answer(202, f"accepted: proposal {what}\n")
            return
        what = f"{sanitize(event.ref) or 'a trigger'} at {(event.revision or '-')[:12]}"
        if not event.concerns(app.tracked_branch):
            reason = f"push to {what} ignored: this agent follows {app.tracked_branch}"
            self._reject(202, reason, delivery=delivery)
            return
        if not app._submit(event):
            self._reject(503, "the agent is not taking triggers now, retry", delivery=delivery)
            return
        log.info("webhook %s: %s, reconcile triggered (delivery %s)", name, what, delivery or "-")
        self._answer(202, f"accepted: {what}, reconcile triggered\n")

    def _read_body(self, delivery: str | None) -> bytes | None:
        """The body, or None after answering why it was not read."""
        if "Transfer-Encoding" in self.headers:
            self._reject(
                411, "chunked bodies are not accepted: send Content-Length", delivery=delivery
            )
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            # Neither a length nor chunks: the request has no body (RFC 9112, 6.3), as
            # `curl -X POST URL` sends it.
            return b""
        if not _is_length(raw.strip()):
            self._reject(400, "Content-Length is not a number", delivery=delivery)
            return None
        length = int(raw)
        if length > self.server.app.max_body:
            self._reject_too_large(length, delivery)
            return None
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self._unread_body = False  # it stopped sending: nothing to wait for
            self._reject(
                408, "the body did not arrive within the request timeout", delivery=delivery
            )
            return None
        self._unread_body = False
        if len(body) < length:
            self._log_rejection(
                400, "the client closed the connection before the whole body", delivery
            )
            self.close_connection = True
            return None
        return body

    def _metrics(self) -> None:
        if self.server.app.metrics is None:
            self._reject(404, "metrics are not enabled")
            return
        try:
            body, content_type = self.server.app.metrics()
        except Exception:
            log.exception("http: the metrics callback failed")
            self._answer(500, "metrics are unavailable, see the agent's log\n")
            return
        self._answer(200, body, content_type)

    def _healthz(self) -> None:
        text = "ok\n"
        if self.server.app.health is not None:
            try:
                text += f"last pass: {self.server.app.health()}\n"
            except Exception:
                log.exception("http: the health callback failed")
                text += "last pass: unknown (see the agent's log)\n"
        self._answer(200, text)

    # -- answers and logs ---------------------------------------------------------

    def _reject_too_large(self, length: int, delivery: str | None = None) -> None:
        limit = self.server.app.max_body
        self._reject(
            413, f"body of {length} bytes is over the {limit}-byte limit", delivery=delivery
        )

    def _reject(
        self,
        status: int,
        reason: str,
        *,
        delivery: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._log_rejection(status, reason, delivery)
        self._answer(status, reason + "\n", headers=headers)

    def _log_rejection(self, status: int, reason: str, delivery: str | None) -> None:
        # 404/405 are mostly scanners and 202 is a normal "not for us": keep them quiet.
        level = logging.WARNING if status not in (202, 404, 405) else logging.INFO
        log.log(
            level,
            "http request rejected: remote=%s route=%s status=%d reason=%s delivery=%s",
            self.client_address[0],
            f"{self.command} {sanitize(self._path())}",
            status,
            reason,
            delivery or "-",
        )

    def _answer(
        self,
        status: int,
        body: bytes | str,
        content_type: str = _TEXT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.connection.settimeout(self.server.app.request_timeout)  # for the write
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The stock line quotes the raw request line (query string included): not that.
        log.debug(
            "http: %s %s %s -> %s",
            self.client_address[0],
            self.command,
            sanitize(self._path()),
            code,
        )

    def log_message(self, format: str, *args: Any) -> None:
        # Errors http.server answers by itself (malformed request line, timeouts).
        if self._reader.timed_out and not self._headers_in:
            return  # logged as a warning with its 408 (handle_one_request)
        text = (format % args)[:200]
        log.info("http request rejected: remote=%s reason=%s", self.client_address[0], text)
