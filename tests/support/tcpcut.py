"""A TCP forwarder on 127.0.0.1 that a test can cut, as a network partition cuts one host
off: put it between one agent and PostgreSQL (the agent's store URL names its port).

    with TcpCut("127.0.0.1", pg.port) as cut:
        url = pg_url_with_port(cut.port)   # this agent's way to the server
        cut.cut()                          # live connections closed, new ones refused
        cut.heal()                         # new connections go through again
        cut.cut_after(b"unit_leases", then=b"COMMIT")
                                           # on a connection that sent the first bytes, forward
                                           # the next chunk that holds `then`, and cut before
                                           # its answer comes back

Threads only, every wait bounded (0.2 s polls); it stops by itself after `lifetime`
seconds, and at the end of the `with` block. "Refused" is an accept closed at once: the
client sees the server close the connection, as it would after a reset.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

from tests.support.service import TestService

_POLL = 0.2


class _Pair:
    """One client connection and its connection to the server."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.closed = threading.Event()
        self.mute = False  # answers from the server are dropped (cut_after: being cut)
        self.primed = False  # it sent cut_after's first marker

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class TcpCut(TestService):
    """Forwards 127.0.0.1:`port` to `host`:`target_port` until cut."""

    def __init__(self, host: str, target_port: int, *, lifetime: float = 300.0) -> None:
        self.target = (host, target_port)
        self.lifetime = lifetime
        self.port = 0
        self.cuts = 0  # how many times it was cut (tests)
        self._listener: socket.socket | None = None
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._cut = False
        self._marker: tuple[bytes, bytes | None] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(_POLL)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._spawn(self._accept)

    def stop(self) -> None:
        self._stop.set()
        self._close_all()
        for thread in self._threads:
            thread.join(2)
        if self._listener is not None:
            self._listener.close()

    # --- what a test does ------------------------------------------------------------

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        """Close every live connection; refuse new ones until `heal`."""
        with self._lock:
            self._cut = True
            self._marker = None
            self.cuts += 1
        self._close_all()

    def heal(self) -> None:
        with self._lock:
            self._cut = False

    def cut_after(self, marker: bytes, *, then: bytes | None = None) -> None:
        """Cut once a chunk from a client that holds `marker` has reached the server (with
        `then`: the first chunk holding `then` that the same connection sends after it),
        before the server's answer reaches the client: the request is made, its answer lost."""
        with self._lock:
            self._marker = (marker, then)

    # --- the forwarding ----------------------------------------------------------------

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _running(self, deadline: float) -> bool:
        return not self._stop.is_set() and time.monotonic() < deadline

    def _accept(self) -> None:
        assert self._listener is not None
        deadline = time.monotonic() + self.lifetime
        while self._running(deadline):
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setblocking(True)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.append(pair)
            self._spawn(self._pump, pair, deadline)
        self._close_all()

    def _pump(self, pair: _Pair, deadline: float) -> None:
        """Both directions of one pair, until either side closes or it is cut."""
        ends = {pair.client: pair.server, pair.server: pair.client}
        while self._running(deadline) and not pair.closed.is_set():
            try:
                ready, _, _ = select.select(list(ends), [], [], _POLL)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        pair.close()
                        break
                    if sock is pair.server:
                        if not pair.mute:
                            pair.client.sendall(data)
                        continue
                    hit = self._hits(pair, data)
                    if hit:
                        pair.mute = True  # before the server can answer
                    pair.server.sendall(data)
                    if hit:
                        self.cut()
                        break
            except (OSError, ValueError):
                pair.close()
        pair.close()
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)

    def _hits(self, pair: _Pair, data: bytes) -> bool:
        """Whether this chunk from the client is the one cut_after waits for."""
        armed = self._marker
        if armed is None:
            return False
        first, then = armed
        if then is None:
            return first in data
        if pair.primed:
            return then in data
        at = data.find(first)
        pair.primed = at >= 0
        return pair.primed and then in data[at:]  # (both in one chunk: a pipeline)

    def _close_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()
