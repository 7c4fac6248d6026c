"""The pass events the page follows live, fanned out to each open event stream.

`EventHub` is a reporter (`agent.progress.Reporter`): the daemon calls it with every event
of a pass. It keeps the manifest the last pass loaded (the page draws units in its
dependency order) and hands a small, redacted summary of the events a page cares about
(a pass starting or ending, a unit finishing, a revision rejected) to every subscriber.
Terraform's own lines (`unit-line`) are never sent: the unit page reads them from the run
directory, redacted, when it is loaded.

A subscriber that does not keep up is dropped rather than slowing the pass: its queue is
bounded, and the browser reconnects (EventSource does so by itself) and reloads.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.config.manifest import Manifest
from agent.core.progress import Event, EventKind

__all__ = ["EventHub", "Subscription"]

_QUEUE_SIZE = 256
_SENT = {
    EventKind.PASS_STARTED: "pass-started",
    EventKind.UNIT_STARTED: "unit-started",
    EventKind.UNIT_FINISHED: "unit-finished",
    EventKind.PASS_FINISHED: "pass-finished",
    EventKind.REJECTED: "rejected",
}


class Subscription:
    """One open event stream: `next(timeout)` gives the next message or None."""

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(_QUEUE_SIZE)
        self.dropped = False

    def next(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None after `timeout` seconds (or once dropped)."""
        if self.dropped and self._queue.empty():
            return None
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._hub._remove(self)

    def _put(self, message: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.dropped = True
            self._hub._remove(self)


class EventHub:
    """Fans pass events out to subscribers; every text is passed through `redact` first."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        self._redact = redact
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []
        self.manifest: Manifest | None = None
        self.running: str | None = None  # the run in progress, if any

    def __call__(self, event: Event) -> None:
        if event.kind is EventKind.MANIFEST_LOADED and isinstance(event.result, Manifest):
            self.manifest = event.result
        if event.kind is EventKind.PASS_STARTED:
            self.running = event.run_id
        elif event.kind is EventKind.PASS_FINISHED:
            self.running = None
        name = _SENT.get(event.kind)
        if name is None:
            return
        message = {
            "event": name,
            "run": event.run_id,
            "unit": event.unit,
            "message": self._redact(event.message)[:500],
            "seconds": event.seconds,
            "at": time.time(),
        }
        with self._lock:
            subscribers = list(self._subscribers)
        for subscription in subscribers:
            subscription._put(message)

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        with self._lock:
            self._subscribers.append(subscription)
        return subscription

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def _remove(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)


def sse_frame(message: dict[str, Any]) -> bytes:
    """One server-sent event: its name, and its data as one JSON line."""
    data = json.dumps(message, separators=(",", ":"))
    return f"event: {message['event']}\ndata: {data}\n\n".encode()
