"""Reconciling one stack unit: init, plan, decide, apply, record.

Every Terraform line is streamed into the run directory as it comes (plan.txt,
apply.txt, init.txt, written as `.partial` until complete); the plan JSON and the
saved plan file are kept beside them, 0600. Nothing is applied but the saved plan.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.config import DestroyPolicy, HostConfig, Unit
from agent.core.fsutil import StreamedFile, atomic_write, ensure_private_dir, finish_partial
from agent.core.progress import Event, EventKind, Reporter
from agent.core.redact import LineRedactor, Redactor
from agent.errors import AgentError, TerraformError
from agent.policy.prune import PruneMode
from agent.state.layout import StateLayout
from agent.state.store import RunStore, UnitOutcome, UnitStatus
from agent.units.context import StackContext
from agent.units.decide import Decision, PlanFacts, decide
from agent.units.fingerprint import agent_key
from agent.units.policy_check import now_utc, stack_policy
from agent.units.stackinputs import StackInputs
from agent.units.stackwork import StackWorkspaces
from agent.units.unitrun import finish_unit, run_unit
from providers.errors import ProviderError
from providers.proctrack import ChildTracker
from providers.terraform import (
    summarize_plan,
)
from providers.terraform.sensitive import mask_plan

PLAN_FILE = "tfplan"
PRUNE_HELD = "removed from gitops.yaml: its destroy waits for `agent approve` (policy.prune: hold)"


class StackReconciler:
    """Reconciles stack units with Terraform; one instance serves many passes."""

    def __init__(
        self,
        host: HostConfig,
        layout: StateLayout,
        store: RunStore,
        reporter: Reporter,
        redactor: Redactor,
        *,
        children: ChildTracker | None = None,
    ) -> None:
        self.host = host
        self.children = children
        self.redactor = redactor
        self.layout = layout
        self.store = store
        self.report = reporter
        self._stop = threading.Event()
        # A shared store's key: a stack that moves to another agent does not look moved.
        self.workspaces = StackWorkspaces(
            host, layout, redactor, children=children, key=lambda: agent_key(store, layout.root)
        )
        self.inputs = StackInputs(self.workspaces, redactor)

    def interrupt(self) -> None:
        """No new Terraform command starts; the running ones get one SIGINT each."""
        self._stop.set()
        self.workspaces.interrupt()

    def _check_stop(self, unit: Unit) -> None:
        if self._stop.is_set():
            raise TerraformError(f"unit {unit.name}: interrupted before the next Terraform step")

    # --- one unit -----------------------------------------------------------------

    def block(
        self, ctx: StackContext, name: str, dependency: str, dep_outcome: UnitOutcome
    ) -> UnitOutcome:
        """Record that `name` did not run because `dependency` did not converge."""
        outcome = UnitOutcome(
            status=UnitStatus.BLOCKED,
            error=f"not run: it depends on {dependency!r}, which is {dep_outcome.status}",
            preview=ctx.dry_run,  # a dry run's block says nothing about the last real result
        )
        return finish_unit(
            ctx,
            name,
            outcome,
            store=self.store,
            report=self.report,
            redactor=self.redactor,
            describe=describe_outcome,
            started=None,
        )

    def reconcile(self, ctx: StackContext, name: str) -> UnitOutcome:
        """Plan, decide and (maybe) apply one unit; never raises for the unit's own failure."""
        return run_unit(
            ctx,
            name,
            store=self.store,
            report=self.report,
            redactor=self.redactor,
            stop=self._stop,
            work=lambda unit, moved, started: self._plan_and_apply(ctx, unit, moved, started),
            describe=describe_outcome,
            inputs=lambda unit: self.inputs.fingerprint(ctx, unit),
            observed=lambda unit: {"state": self.workspaces.state_part(ctx, unit)},
        )

    def destroy_removed(
        self, ctx: StackContext, unit: Unit, mode: PruneMode, started: float
    ) -> UnitOutcome:
        """Plan the destroy of a unit the repository removed (`ctx` holds its last
        definition) and apply it, or hold it, as `policy.prune` says (agent/units/prune.py)."""
        return self._plan_and_apply(ctx, unit, True, started, prune=mode)

    def _plan_and_apply(
        self,
        ctx: StackContext,
        unit: Unit,
        revision_moved: bool,
        started: float,
        *,
        prune: PruneMode | None = None,
    ) -> UnitOutcome:
        runner = self.workspaces.runner()
        deadline = started + unit.timeout
        variables, sensitive = self.inputs.variables(ctx, unit, deadline)
        ws = self.workspaces.workspace(ctx, unit, sensitive)
        run_dir = ensure_private_dir(self.layout.unit_run_dir(ctx.run_id, unit.name))

        self._phase(ctx, unit, "init")
        with self._log(ctx, unit, run_dir / "init.txt") as init_log:
            self._terraform("init", unit, lambda: runner.init_if_needed(ws, init_log, deadline))
        if not (run_dir / "init.txt").stat().st_size:
            (run_dir / "init.txt").unlink()

        self._check_stop(unit)
        self._phase(ctx, unit, "plan")
        plan_file = run_dir / PLAN_FILE
        with self._log(ctx, unit, run_dir / "plan.txt") as plan_log:
            planned = self._terraform(
                "plan",
                unit,
                lambda: runner.plan(
                    ws, plan_file, variables, plan_log, deadline, destroy=prune is not None
                ),
            )
        plan_file.chmod(0o600)
        held = False
        try:
            if planned.has_changes:
                self._check_stop(unit)
                plan_json = self._terraform(
                    "show", unit, lambda: runner.show_json(ws, plan_file, deadline)
                )
                # Terraform's sensitivity marks first: they cover numbers and booleans too.
                redacted = self.redactor.redact_obj(mask_plan(plan_json))
                atomic_write(run_dir / "plan.json", json.dumps(redacted, indent=1))
            else:
                # An empty plan needs no reading (and `show` costs as much as a plan).
                plan_json = redacted = {}
            summary = summarize_plan(plan_json)
            # Rules read the redacted plan only; their report follows the plan in `agent logs`.
            policy = stack_policy(
                self.host,
                ctx.manifest,
                unit,
                redacted,
                override=ctx.override_window,
                now=now_utc(),
            )
            if policy.report:
                atomic_write(run_dir / "policy.txt", self.redactor.redact(policy.report))
            gate, destroy = policy.gate, self.host.policy.destroy
            if prune is not None:
                # A removed unit's destroy follows policy.prune, not its apply mode (the
                # repository no longer defines it); rules and windows still count.
                gate = replace(gate, apply=None)
                destroy = DestroyPolicy.HOLD if prune is PruneMode.HOLD else DestroyPolicy.ALLOW
            verdict = decide(
                PlanFacts(
                    revision_moved=revision_moved,
                    has_changes=summary.has_changes,
                    destroys_anything=summary.destroys_anything,
                    resources_drifted=bool(summary.drift),
                ),
                drift=unit.drift,
                destroy=destroy,
                dry_run=ctx.dry_run,
                gate=gate,
            )
            if prune is PruneMode.HOLD and verdict.decision is Decision.HOLD:
                # Held by policy.prune, and by whatever else holds it (rules, a window).
                others = gate.holds(destroys_anything=True, is_drift=False)
                verdict = replace(verdict, reason="; ".join([PRUNE_HELD, *others]))
            notes = "; ".join(policy.notes) or None
            counts = {
                "plan_add": summary.add,
                "plan_change": summary.change,
                "plan_destroy": summary.destroy,
            }
            drift = verdict.drift or bool(summary.drift)
            held = verdict.decision is Decision.HOLD
            if verdict.decision is Decision.APPLY:
                self._check_stop(unit)
                if ctx.guard is not None:
                    ctx.guard(unit.name)  # cluster mode: the lease, checked before apply
                self._phase(ctx, unit, "apply")
                with self._log(ctx, unit, run_dir / "apply.txt") as apply_log:
                    self._terraform(
                        "apply",
                        unit,
                        lambda: runner.apply(ws, plan_file, variables, apply_log, deadline),
                    )
                return UnitOutcome(
                    status=UnitStatus.OK,
                    decision=verdict.decision,
                    drift=drift,
                    converged=True,
                    error=notes,
                    drift_overwritten=verdict.overwrites_drift,
                    **counts,
                )
            denied = verdict.decision is Decision.DENY
            stopped = held or denied
            return UnitOutcome(
                status=UnitStatus.HELD if held else UnitStatus.FAILED if denied else UnitStatus.OK,
                decision=verdict.decision,
                drift=drift and verdict.decision is not Decision.NOTHING,
                converged=verdict.decision is Decision.NOTHING,
                error="; ".join([verdict.reason, *policy.notes]) if stopped else notes,
                **counts,
            )
        finally:
            # Terraform's plan file holds the variables' values (secrets too): it is kept
            # only while a held plan waits for approval.
            if not held:
                plan_file.unlink(missing_ok=True)
            else:
                self._drop_older_plans(unit.name, ctx.run_id)

    # --- approvals ----------------------------------------------------------------

    def apply_saved(
        self, ctx: StackContext, name: str, held_run_id: str, plan_file: Path
    ) -> UnitOutcome:
        """Apply the plan that run `held_run_id` saved and held for `name` (`agent approve`),
        and nothing else. The plan file is removed once Terraform has tried it."""
        unit = ctx.manifest.get_unit(name)
        assert unit is not None
        started = time.monotonic()
        held = next((r for r in self.store.unit_runs(held_run_id) if r.unit == name), None)
        counts = {
            "plan_add": held.plan_add if held else None,
            "plan_change": held.plan_change if held else None,
            "plan_destroy": held.plan_destroy if held else None,
        }
        self.store.start_unit(ctx.run_id, name, ctx.revision)
        self.report(Event(EventKind.UNIT_STARTED, run_id=ctx.run_id, unit=name))
        try:
            self._check_stop(unit)
            runner = self.workspaces.runner()
            ws = self.workspaces.workspace(ctx, unit)
            run_dir = ensure_private_dir(self.layout.unit_run_dir(ctx.run_id, name))
            self._phase(ctx, unit, "apply")
            try:
                with self._log(ctx, unit, run_dir / "apply.txt") as apply_log:
                    self._terraform(
                        "apply",
                        unit,
                        lambda: runner.apply(ws, plan_file, {}, apply_log, started + unit.timeout),
                    )
            finally:
                plan_file.unlink(missing_ok=True)
            outcome = UnitOutcome(
                status=UnitStatus.OK, decision=Decision.APPLY, converged=True, **counts
            )
        except AgentError as exc:
            message = exc.message
            if "Saved plan is stale" in message:
                message = (
                    f"the plan is stale: the state changed since run {held_run_id}; run"
                    " `agent reconcile --now` to plan again"
                )
            outcome = UnitOutcome(
                status=UnitStatus.INTERRUPTED if self._stop.is_set() else UnitStatus.FAILED,
                decision=Decision.APPLY,
                error=message,
                **counts,
            )
        # Applied, the unit is at the inputs the held plan was made from: the next pass
        # sees nothing moved (unless something moved since).
        return finish_unit(
            ctx,
            name,
            outcome,
            store=self.store,
            report=self.report,
            redactor=self.redactor,
            describe=describe_outcome,
            started=started,
            fingerprint=held.fingerprint if held else None,
        )

    def _drop_older_plans(self, unit: str, run_id: str) -> None:
        """A unit held again: the plans earlier runs held for it can no longer be approved
        (they hold secrets too), so only the newest is kept."""
        for plan in self.layout.runs.glob(f"*/{unit}/{PLAN_FILE}"):
            if plan.parent.parent.name != run_id:
                plan.unlink(missing_ok=True)

    # --- helpers ------------------------------------------------------------------

    def _terraform(self, command: str, unit: Unit, call: Any) -> Any:
        try:
            return call()
        except ProviderError as exc:
            if command == "apply" and not self._stop.is_set():
                self.report(Event(EventKind.APPLY_FAILED, unit=unit.name, message=str(exc)))
            raise TerraformError(f"unit {unit.name}: terraform {command} failed: {exc}") from exc

    def _log(self, ctx: StackContext, unit: Unit, path: Path) -> _LineSink:
        return _LineSink(path, self.redactor, lambda line: self._line(ctx, unit, line))

    def _line(self, ctx: StackContext, unit: Unit, line: str) -> None:
        self.report(Event(EventKind.UNIT_LINE, run_id=ctx.run_id, unit=unit.name, message=line))

    def _phase(self, ctx: StackContext, unit: Unit, phase: str) -> None:
        self.report(Event(EventKind.UNIT_PHASE, run_id=ctx.run_id, unit=unit.name, message=phase))

    def finish_cut_logs(self, run_id: str) -> None:
        """Close the logs a killed pass left half written, with a marker line."""
        run_dir = self.layout.run_dir(run_id)
        for partial in sorted(run_dir.glob("*/*.partial")):
            finish_partial(partial)


class _LineSink:
    """A callable that streams each line, redacted, to a file and to a progress callback.

    Redacted by a `LineRedactor`: a line ending with the first words of a secret waits
    for the next one, so that a secret Terraform word-wrapped is masked whole.
    """

    def __init__(self, path: Path, redactor: Redactor, on_line: Any) -> None:
        self._file = StreamedFile(path)
        self._on_line = on_line
        self._lines = LineRedactor(redactor, self._emit)

    def __call__(self, line: str) -> None:
        self._lines(line)

    def _emit(self, line: str) -> None:
        self._file.write_line(line)
        self._on_line(line)

    def __enter__(self) -> _LineSink:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._lines.flush()
        finally:
            self._file.close()


def describe_outcome(outcome: UnitOutcome) -> str:
    """One line for a person: what happened to the unit."""
    counts = ""
    if outcome.plan_add is not None:
        counts = f" (+{outcome.plan_add} ~{outcome.plan_change} -{outcome.plan_destroy})"
    drift = " drift" if outcome.drift else ""
    if outcome.drift_overwritten:
        drift = " drift overwritten by a change from Git"
    if outcome.status in (UnitStatus.FAILED, UnitStatus.BLOCKED, UnitStatus.INTERRUPTED):
        return f"{outcome.status}: {outcome.error}"
    # The policy warnings (or a window override) of a plan that went ahead.
    notes = f"; {outcome.error}" if outcome.error and outcome.status is UnitStatus.OK else ""
    labels = {
        Decision.APPLY: "applied",
        Decision.HOLD: "held for approval",
        Decision.REPORT: "drift reported, left as it is",
        Decision.NOTHING: "no changes",
        Decision.SKIP: "drift check skipped",
        Decision.PLAN_ONLY: "planned (dry run)",
        Decision.UNCHANGED: "unchanged: inputs as at the last clean plan, nothing run",
        Decision.ORPHAN: "orphaned",
    }
    label = (
        labels.get(Decision(outcome.decision), str(outcome.decision)) if outcome.decision else ""
    )
    return f"{label}{counts}{drift}{notes}"
