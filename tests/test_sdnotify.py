"""agent.service.sdnotify against a real AF_UNIX datagram socket, as systemd's notify socket is.

Each test binds its own socket (a file path, or an abstract `@name` like systemd's
`/run/systemd/notify` and nspawn's `@...` sockets) and points $NOTIFY_SOCKET at it.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.service import sdnotify


class NotifySocket:
    """The service manager's end: a bound datagram socket that collects messages."""

    def __init__(self, address: str) -> None:
        self.address = address  # as $NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(bind_to)

    def receive(self, timeout: float = 2.0) -> list[str]:
        """The fields of the next message (fails the test if none arrives in time)."""
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode().split("\n")

    def receive_all(self, until: float) -> list[tuple[float, list[str]]]:
        """Every message until the monotonic time `until`, with its arrival time."""
        got = []
        while (left := until - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            got.append((time.monotonic(), data.decode().split("\n")))
        return got

    def drain(self) -> list[list[str]]:
        """Every message already queued, without waiting."""
        got = []
        self.sock.setblocking(False)
        try:
            while True:
                got.append(self.sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return got
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def manager(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NotifySocket]:
    if request.param == "path":
        address = str(tmp_path / "notify")
    else:
        address = f"@gitops-agent-test/{uuid.uuid4().hex}"
    server = NotifySocket(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield server
    server.close()


def test_ready_with_status(manager: NotifySocket) -> None:
    assert sdnotify.ready("listening on 127.0.0.1:9100") is True
    assert manager.receive() == ["READY=1", "STATUS=listening on 127.0.0.1:9100"]


def test_ready_alone(manager: NotifySocket) -> None:
    assert sdnotify.ready()
    assert manager.receive() == ["READY=1"]


def test_status_stopping_watchdog(manager: NotifySocket) -> None:
    assert sdnotify.status("pass 42: planning network")
    assert sdnotify.stopping()
    assert sdnotify.watchdog()
    assert manager.receive() == ["STATUS=pass 42: planning network"]
    assert manager.receive() == ["STOPPING=1"]
    assert manager.receive() == ["WATCHDOG=1"]


def test_notify_sends_fields_as_one_message(manager: NotifySocket) -> None:
    assert sdnotify.notify("RELOADING=1", "MONOTONIC_USEC=123")
    assert manager.receive() == ["RELOADING=1", "MONOTONIC_USEC=123"]


def test_status_cannot_forge_other_fields(manager: NotifySocket) -> None:
    # A unit name or error text with a newline must not become a second field.
    sdnotify.status("unit web failed\nREADY=1")
    assert manager.receive() == ["STATUS=unit web failed READY=1"]


def test_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("x") is False
    assert sdnotify.watchdog() is False
    assert sdnotify.notify("READY=1") is False


def test_unreachable_socket_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "no-such-socket"
    monkeypatch.setenv("NOTIFY_SOCKET", str(missing))
    with caplog.at_level(logging.WARNING, logger="agent.service.sdnotify"):
        assert sdnotify.ready() is False
    assert str(missing) in caplog.text


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),  # WatchdogSec= not set
        ("4000000", None, 2.0),  # half of WatchdogSec=4s
        ("4000000", "self", 2.0),  # meant for us
        ("4000000", "other", None),  # meant for another process (e.g. our parent)
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            own = str(os.getpid())
            monkeypatch.setenv(name, {"self": own, "other": str(os.getpid() + 1)}.get(value, value))
    assert sdnotify.watchdog_interval() == expected


def test_watchdog_thread_pings_at_half_the_timeout_and_stops(
    manager: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2s: ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    dog = sdnotify.Watchdog()
    assert dog.interval == pytest.approx(0.1)
    started = time.monotonic()
    assert dog.start()
    pings = manager.receive_all(until=started + 1.0)
    stop_began = time.monotonic()
    dog.stop()
    assert time.monotonic() - stop_began < 0.5, "stop() must not wait for the next tick"
    assert all(fields == ["WATCHDOG=1"] for _, fields in pings)
    assert 7 <= len(pings) <= 12, f"{len(pings)} pings in 1 s at a 0.1 s interval"
    assert pings[0][0] - started < 0.1, "the first ping goes out at once"
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(pings)]
    assert statistics.median(gaps) == pytest.approx(0.1, abs=0.03)
    # A ping sent after the window above but before stop() returned is still queued: at most
    # one. Stopped means stopped: once stop() has joined the thread, nothing more arrives.
    assert len(manager.drain()) <= 1
    assert manager.receive_all(until=time.monotonic() + 0.3) == []


def test_watchdog_does_nothing_without_a_watchdog(manager: NotifySocket) -> None:
    with sdnotify.Watchdog() as dog:  # no WATCHDOG_USEC
        assert dog.interval is None
    assert manager.receive_all(until=time.monotonic() + 0.2) == []


def test_watchdog_restarts_after_stop(manager: NotifySocket) -> None:
    dog = sdnotify.Watchdog(interval=0.05)
    for _ in range(2):
        assert dog.start()
        assert manager.receive() == ["WATCHDOG=1"]
        dog.stop()
    manager.receive_all(until=time.monotonic() + 0.1)  # drain pings sent before stop
    assert manager.receive_all(until=time.monotonic() + 0.2) == []
