"""Progress events of a pass, and the reporters that show them.

The pass emits events; what shows them is chosen by the caller: nothing (library
use), a line per unit (CLI, not a TTY), or live lines (CLI on a TTY). Reporters are
called from worker threads, so they serialize their own output.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TextIO


class EventKind(StrEnum):
    RECOVERED = "recovered"
    PASS_STARTED = "pass-started"
    FETCHED = "fetched"
    REJECTED = "rejected"
    UNIT_STARTED = "unit-started"
    UNIT_PHASE = "unit-phase"  # init, plan, apply
    UNIT_LINE = "unit-line"  # one line of Terraform output
    UNIT_FINISHED = "unit-finished"
    PASS_FINISHED = "pass-finished"
    # For the daemon's metrics; reporters for people ignore them.
    MANIFEST_LOADED = "manifest-loaded"  # result: the Manifest the pass reconciles
    SECRET_FAILED = "secret-failed"  # a unit's reference could not be read; message: scheme
    APPLY_FAILED = "apply-failed"  # a unit's `terraform apply` failed


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    run_id: str | None = None
    unit: str | None = None
    message: str = ""
    seconds: float | None = None
    result: Any = None  # UnitOutcome or PassResult, for the finishing events


Reporter = Callable[[Event], None]


def silent(event: Event) -> None:
    """A reporter that shows nothing."""


class ConsoleReporter:
    """Writes progress for a person on a TTY: phases and results of units as they happen.

    Off a TTY only what needs attention (recovered passes, rejected revisions) is
    written: the caller prints the pass's result itself.
    """

    def __init__(self, stream: TextIO = sys.stderr, *, live: bool | None = None) -> None:
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        line = self._format(event)
        if line is None:
            return
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def _format(self, event: Event) -> str | None:
        kind = event.kind
        if kind is EventKind.RECOVERED:
            return f"recovered: {event.message}"
        if kind is EventKind.REJECTED:
            return f"! {event.message}"
        if kind is EventKind.FETCHED and self.live:
            return f"fetched {event.message[:12]}"
        if kind is EventKind.UNIT_PHASE and self.live:
            return f"  {event.unit}: {event.message}..."
        if kind is EventKind.UNIT_FINISHED and self.live:
            took = f" ({event.seconds:.1f}s)" if event.seconds is not None else ""
            return f"  {event.unit}: {event.message}{took}"
        return None
