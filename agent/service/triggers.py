"""What waits for the daemon's pass worker: coalesced triggers, approvals, and the control
clients waiting on them.

Triggers that arrive while a pass runs are coalesced into exactly one follow-up pass (a
full pass if any of them asked for one; a dry run is never merged with a real pass).
Approvals are never merged and go first.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from agent.core.progress import Event, EventKind
from agent.engine.reconcile import PassResult
from agent.errors import AgentError
from agent.service.control import Reply, encode_result, is_internal
from agent.units.changed import CLI_CHANGED_ONLY

# Which trigger names a pass when several were coalesced: the most deliberate one.
_TRIGGER_RANK = (
    "cli",
    CLI_CHANGED_ONLY,
    "approve",
    "resume",
    "webhook",
    "start",
    "cluster",  # the live agents changed and this one gained units (docs/scale-out.md)
    "drift",
    "poll",
)


class Waiter:
    """A control client waiting for the pass that serves its request: it gets that pass's
    events as they happen, then its result (or an error)."""

    def __init__(self, *, lines: bool = False) -> None:
        self.lines = lines  # wants every line of Terraform output too
        self._items: queue.Queue[tuple[str, Any]] = queue.Queue()

    def event(self, event: Event) -> None:
        if is_internal(event) or (event.kind is EventKind.UNIT_LINE and not self.lines):
            return
        self._items.put(("event", event))

    def info(self, message: str) -> None:
        self._items.put(("info", message))

    def result(self, result: PassResult) -> None:
        self._items.put(("result", result))

    def error(self, exc: AgentError) -> None:
        self._items.put(("error", exc))

    def relay(self, reply: Reply) -> None:
        """Forward everything to `reply` until the result or error (or the client leaves)."""
        while True:
            kind, item = self._items.get()
            if kind == "event":
                reply.event(item)
            elif kind == "info":
                reply.info(item)
            elif kind == "result":
                reply.result(encode_result(item))
                return
            else:
                reply.error(item)
                return
            if reply.gone:
                return  # the pass goes on; nobody reads its events any more


@dataclass
class Batch:
    """Triggers waiting for the next pass, coalesced."""

    dry_run: bool = False
    triggers: set[str] = field(default_factory=set)
    full: bool = False  # someone explicitly asked for every unit
    units: set[str] = field(default_factory=set)  # explicitly asked units
    unit_drifts: set[str] = field(default_factory=set)  # units whose own drift timer fired
    drift: bool = False  # the global drift timer fired
    poll: bool = False  # the poll timer fired
    waiters: list[Waiter] = field(default_factory=list)
    count: int = 0
    override_window: str | None = None  # "by USER: REASON" (`--override-window`)

    @property
    def explicit(self) -> bool:
        """Asked for by a person or a push: backoff does not apply."""
        return self.full or bool(self.units)

    @property
    def trigger(self) -> str:
        return next((t for t in _TRIGGER_RANK if t in self.triggers), "poll")


@dataclass
class Approval:
    """`agent approve RUN [--unit U]`, waiting for the worker (approvals are never merged)."""

    run_id: str
    unit: str | None
    by: str
    waiter: Waiter


class TriggerQueue:
    """At most one pending pass (and one pending dry run); approvals in arrival order."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: Batch | None = None
        self._pending_dry: Batch | None = None
        self._approvals: deque[Approval] = deque()
        self._closed = False

    def add(
        self,
        trigger: str,
        *,
        full: bool = False,
        unit: str | None = None,
        dry_run: bool = False,
        drift: bool = False,
        unit_drift: str | None = None,
        poll: bool = False,
        waiter: Waiter | None = None,
        override_window: str | None = None,
    ) -> bool:
        """Queue a trigger; False when the daemon is stopping."""
        with self._cond:
            if self._closed:
                return False
            if dry_run:
                self._pending_dry = batch = self._pending_dry or Batch(dry_run=True)
            else:
                self._pending = batch = self._pending or Batch()
            batch.triggers.add(trigger)
            batch.count += 1
            batch.full |= full
            batch.drift |= drift
            batch.poll |= poll
            if unit is not None:
                batch.units.add(unit)
            if unit_drift is not None:
                batch.unit_drifts.add(unit_drift)
            if waiter is not None:
                batch.waiters.append(waiter)
            batch.override_window = override_window or batch.override_window
            self._cond.notify_all()
            return True

    def add_approval(self, approval: Approval) -> bool:
        with self._cond:
            if self._closed:
                return False
            self._approvals.append(approval)
            self._cond.notify_all()
            return True

    def pending(self) -> bool:
        with self._cond:
            return bool(self._pending or self._pending_dry or self._approvals)

    def take(self) -> Batch | Approval | None:
        """The next work (approvals first, then passes, then dry runs); None once closed."""
        with self._cond:
            while not self._closed:
                if self._approvals:
                    return self._approvals.popleft()
                if self._pending is not None:
                    batch, self._pending = self._pending, None
                    return batch
                if self._pending_dry is not None:
                    batch, self._pending_dry = self._pending_dry, None
                    return batch
                self._cond.wait()
            return None

    def close(self) -> list[Waiter]:
        """Take no more work; the waiters of work not started (to tell them)."""
        with self._cond:
            self._closed = True
            waiters = [a.waiter for a in self._approvals]
            for batch in (self._pending, self._pending_dry):
                waiters += batch.waiters if batch else []
            self._approvals.clear()
            self._pending = self._pending_dry = None
            self._cond.notify_all()
            return waiters
