"""A small sd_notify(3) client: tell systemd we are ready, stopping, alive.

Stdlib only. The libraries were weighed: `sdnotify` (2017, unmaintained) swallows every
error with a bare `except` and has no watchdog helpers; `cysystemd` is kept up but bundles
~5 MB of C libraries (libsystemd, libgcrypt...) and ships wheels only for glibc >= 2.34
(elsewhere it needs a C toolchain); `systemd-python` is source-only (C toolchain and
libsystemd-dev). The protocol is one datagram of `KEY=VALUE` lines, so it lives here.

Every call is a no-op returning False outside systemd (no `$NOTIFY_SOCKET`), so the
daemon calls these unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=...") as one message to `$NOTIFY_SOCKET`.

    Returns True if sent, False if not under systemd or the send failed (logged: a lost
    notification must never take the daemon down).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not fields:
        return False
    if address.startswith("@"):  # abstract namespace: leading NUL instead of '@'
        address = "\0" + address[1:]
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Report that start-up is complete (Type=notify), with an optional status line."""
    return notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))


def stopping() -> bool:
    """Report that a clean shutdown has begun."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Set the free-text status shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    """Ping the service manager's watchdog."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec=), or None if it is off for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None  # no watchdog, or it is meant for another process
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a whole number", usec)
        return None
    return value / 2_000_000 if value > 0 else None


class Watchdog:
    """Pings the watchdog from a daemon thread every `interval` seconds until `stop()`.

    `interval` defaults to `watchdog_interval()`; with no watchdog, `start()` does nothing.
    The thread sleeps on an Event, so `stop()` returns at once rather than after a tick.
    """

    def __init__(self, interval: float | None = None) -> None:
        self.interval = watchdog_interval() if interval is None else interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start pinging (first ping at once); False if there is no watchdog to ping."""
        if not self.interval or self._thread is not None:
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop pinging and join the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        interval = self.interval or 1.0  # start() refused a missing interval
        while True:
            watchdog()
            if self._stop.wait(interval):
                return

    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE field and could forge READY=1 or MAINPID=.
    return " ".join(text.splitlines())
