"""What reconciling any unit shares, stack or fleet: the record around the work.

A unit is started in the store, its input fingerprint taken (see agent.units.fingerprint),
skipped when its secrets could not be read or its drift policy says no check is needed,
worked on, and finished in the store with one event each side. The work itself
(Terraform, or hosts) is the caller's. A changed-only pass on a store that batches
(RunStore.batches_unchanged) records a unit `running` only once it is sure to run, and
the units it leaves `unchanged` all at once, at the end of its units step.

What the record may claim: a dry run records a preview and nothing else; a real
result moves the unit's converged revision and fingerprint only when the unit
converged and every unit it depends on ran in this pass and converged too (else the
inputs it read may not be the ones its dependencies will have).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from agent.config import Unit
from agent.core.progress import Event, EventKind, Reporter
from agent.core.redact import Redactor
from agent.errors import AgentError
from agent.state.runfiles import RunFiles
from agent.state.store import RunStore, UnitOutcome, UnitStateRow, UnitStatus
from agent.units.changed import plan_reason
from agent.units.context import StackContext
from agent.units.decide import Decision, needs_plan
from agent.units.fingerprint import Fingerprint

# (the unit, whether its inputs moved since it last converged, when it started)
Work = Callable[[Unit, bool, float], UnitOutcome]
# The unit's input fingerprint for this pass (may raise AgentError: the unit fails).
Inputs = Callable[[Unit], Fingerprint]
# The observed parts of the fingerprint (see agent.units.fingerprint.OBSERVED), read again after
# the work: the unit's own apply moves them.
Observed = Callable[[Unit], Mapping[str, str]]


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
    inputs: Inputs,
    observed: Observed | None = None,
) -> UnitOutcome:
    """Record, check and run one unit's `work`; never raises for the unit's own failure."""
    unit = ctx.manifest.get_unit(name)
    assert unit is not None
    started = time.monotonic()
    state = ctx.states.get(name) if ctx.states is not None else store.unit_state(name)
    if not ctx.batch_unchanged:
        store.start_unit(ctx.run_id, name, ctx.revision)
    report(Event(EventKind.UNIT_STARTED, run_id=ctx.run_id, unit=name))
    fingerprint: Fingerprint | None = None
    moved: tuple[str, ...] = ()
    if name in ctx.secrets.errors:
        outcome = UnitOutcome(status=UnitStatus.FAILED, error=ctx.secrets.errors[name])
    else:
        try:
            fingerprint = inputs(unit)
            moved = moved_inputs(fingerprint, state, ctx.revision)
            if (
                ctx.changed_only
                and not ctx.dry_run
                and not _must_plan(ctx, unit, fingerprint, state)
            ):
                outcome = UnitOutcome(status=UnitStatus.OK, decision=Decision.UNCHANGED)
            else:
                if ctx.batch_unchanged:  # (not recorded `running` until it was sure to run)
                    store.start_unit(ctx.run_id, name, ctx.revision)
                if not needs_plan(bool(moved), unit.drift):
                    outcome = UnitOutcome(status=UnitStatus.OK, decision=Decision.SKIP)
                else:
                    outcome = work(unit, bool(moved), started)
                if observed is not None and outcome.converged:
                    fingerprint = fingerprint.with_parts(observed(unit))
        except AgentError as exc:
            outcome = UnitOutcome(status=UnitStatus.FAILED, error=exc.message)
        if stop.is_set() and outcome.status is UnitStatus.FAILED:
            outcome = replace(outcome, status=UnitStatus.INTERRUPTED)
    outcome = replace(outcome, moved=moved)
    if ctx.dry_run:
        outcome = replace(outcome, preview=True, converged=False)
    elif outcome.converged and not dependencies_converged(ctx, unit):
        outcome = replace(outcome, converged=False)
    return finish_unit(
        ctx,
        name,
        outcome,
        store=store,
        report=report,
        redactor=redactor,
        describe=describe,
        started=started,
        fingerprint=fingerprint.encode() if fingerprint else None,
    )


def finish_unit(
    ctx: StackContext,
    name: str,
    outcome: UnitOutcome,
    *,
    store: RunStore,
    report: Reporter,
    redactor: Redactor,
    describe: Callable[[UnitOutcome], str],
    started: float | None,
    fingerprint: str | None = None,
) -> UnitOutcome:
    """Record a unit's result (and the inputs it planned with) and report it: the end of
    every unit's run, a pass's or an approval's. Returns the outcome as recorded."""
    # Errors quote Terraform's output, command output and file text: mask secrets here.
    if outcome.error:
        outcome = replace(outcome, error=redactor.redact(outcome.error))
    if ctx.batch_unchanged and outcome.decision == Decision.UNCHANGED and not outcome.preview:
        # Nothing ran and no file was written: recorded with the pass's other unchanged
        # units at the end of its units step (RunStore.defer_unchanged).
        began = time.time() - (time.monotonic() - started) if started is not None else None
        store.defer_unchanged(
            ctx.run_id, name, ctx.revision, outcome, fingerprint=fingerprint, started_at=began
        )
    else:
        # Its files first: a result any agent sees has its logs and plan (shared store).
        RunFiles(store).save_unit(ctx.run_id, name)
        store.finish_unit(ctx.run_id, name, ctx.revision, outcome, fingerprint=fingerprint)
    report(
        Event(
            EventKind.UNIT_FINISHED,
            run_id=ctx.run_id,
            unit=name,
            message=describe(outcome),
            seconds=None if started is None else time.monotonic() - started,
            result=outcome,
        )
    )
    return outcome


def moved_inputs(
    fingerprint: Fingerprint, state: UnitStateRow | None, revision: str
) -> tuple[str, ...]:
    """The kinds of input that moved since the unit last converged."""
    if state is not None and state.fingerprint is None and state.revision == revision:
        # Converged by an agent that kept no fingerprint, at this very revision: nothing
        # can have moved but secrets and outputs, which that agent did not track either.
        return ()
    return fingerprint.moved_from(Fingerprint.decode(state.fingerprint if state else None))


def _must_plan(
    ctx: StackContext, unit: Unit, fingerprint: Fingerprint, state: UnitStateRow | None
) -> bool:
    """Whether a changed-only pass plans `unit` (see agent.units.changed)."""
    previous = Fingerprint.decode(state.fingerprint if state else None)
    reason = plan_reason(
        changed=fingerprint.changed_from(previous),
        last_status=state.last_status if state else None,
        planned_at=state.planned_at if state else None,
        drift_interval=ctx.drift_intervals.get(unit.name),
        now=time.time(),
    )
    return reason is not None


def dependencies_converged(ctx: StackContext, unit: Unit) -> bool:
    """Whether every unit `unit` depends on ran in this pass for real and converged."""
    for dependency in unit.depends_on:
        outcome = ctx.outcomes.get(dependency)
        if outcome is None or outcome.preview or outcome.status is not UnitStatus.OK:
            return False
    return True


def held_fingerprint(store: RunStore, run_id: str, unit: str) -> str | None:
    """The inputs `unit` planned with in run `run_id` (None: not recorded)."""
    return next((r.fingerprint for r in store.unit_runs(run_id) if r.unit == unit), None)
