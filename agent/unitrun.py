"""What reconciling any unit shares, stack or fleet: the record around the work.

A unit is started in the store, skipped when its secrets could not be read or its drift
policy says no check is needed, worked on, and finished in the store with one event
each side. The work itself (Terraform, or hosts) is the caller's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from agent.config import Unit
from agent.decide import Decision, needs_plan
from agent.errors import AgentError
from agent.progress import Event, EventKind, Reporter
from agent.redact import Redactor
from agent.store import RunStore, UnitOutcome, UnitStatus

if TYPE_CHECKING:
    from agent.stacks import StackContext

# (the unit, whether its revision moved since it last converged, when it started)
Work = Callable[[Unit, bool, float], UnitOutcome]


def run_unit(
    ctx: StackContext,
    name: str,
    *,
    store: RunStore,
    report: Reporter,
    redactor: Redactor,
    stop: threading.Event,
    work: Work,
    describe: Callable[[UnitOutcome], str],
) -> UnitOutcome:
    """Record, check and run one unit's `work`; never raises for the unit's own failure."""
    unit = ctx.manifest.get_unit(name)
    assert unit is not None
    started = time.monotonic()
    state = store.unit_state(name)
    revision_moved = state is None or state.revision != ctx.revision
    store.start_unit(ctx.run_id, name, ctx.revision)
    report(Event(EventKind.UNIT_STARTED, run_id=ctx.run_id, unit=name))
    if name in ctx.secrets.errors:
        outcome = UnitOutcome(status=UnitStatus.FAILED, error=ctx.secrets.errors[name])
    elif not needs_plan(revision_moved, unit.drift):
        outcome = UnitOutcome(status=UnitStatus.OK, decision=Decision.SKIP)
    else:
        try:
            outcome = work(unit, revision_moved, started)
        except AgentError as exc:
            outcome = UnitOutcome(status=UnitStatus.FAILED, error=exc.message)
        # Errors quote Terraform's output, command output and file text: mask secrets here.
        if outcome.error:
            outcome = replace(outcome, error=redactor.redact(outcome.error))
        if stop.is_set() and outcome.status is UnitStatus.FAILED:
            outcome = replace(outcome, status=UnitStatus.INTERRUPTED)
    store.finish_unit(ctx.run_id, name, ctx.revision, outcome)
    report(
        Event(
            EventKind.UNIT_FINISHED,
            run_id=ctx.run_id,
            unit=name,
            message=describe(outcome),
            seconds=time.monotonic() - started,
            result=outcome,
        )
    )
    return outcome
