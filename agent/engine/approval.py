"""`agent approve`: find the plans a run held for approval, refuse a stale or missing one
with the reason, and apply exactly them (nothing is planned again)."""

from __future__ import annotations

import functools
import threading
from dataclasses import replace
from pathlib import Path

from agent.config import HostConfig
from agent.engine.clustermode import ClusterMode
from agent.engine.passes import ApprovalRefused, PassContext
from agent.errors import NotFoundError
from agent.policy.windows import WINDOW_CLOSED
from agent.state.layout import StateLayout
from agent.state.runfiles import RunFiles
from agent.state.store import RunStore, UnitStatus
from agent.units.context import StackContext
from agent.units.fleetledger import HELD_FILE
from agent.units.fleets import FleetReconciler
from agent.units.lastdefinition import PruneRequest
from agent.units.prune import Pruner
from agent.units.stacks import PLAN_FILE, StackReconciler


class Approvals:
    """The held plans of past runs, and their apply."""

    def __init__(
        self,
        host: HostConfig,
        layout: StateLayout,
        store: RunStore,
        stacks: StackReconciler,
        fleets: FleetReconciler,
        pruner: Pruner,
        stop: threading.Event,
    ) -> None:
        self.host = host
        self.layout = layout
        self.store = store
        self.stacks = stacks
        self.fleets = fleets
        self.pruner = pruner
        self._stop = stop
        self.cluster: ClusterMode | None = None  # scale-out mode (set by the Reconciler)

    def held_plans(self, run_id: str, unit: str | None) -> tuple[str, dict[str, Path]]:
        """The revision of run `run_id` and the plan files of its held units (or `unit`'s)."""
        run = self.store.get_run(run_id)
        if run is None:
            raise NotFoundError(f"no run with id {run_id!r}", hint="see `agent history`")
        rows = {row.unit: row for row in self.store.unit_runs(run_id)}
        if unit is not None and unit not in rows:
            raise NotFoundError(
                f"unit {unit!r} did not take part in run {run_id}",
                hint=f"its units: {', '.join(rows) or 'none'}",
            )
        names = [unit] if unit else [n for n, r in rows.items() if r.status == UnitStatus.HELD]
        if not names:
            results = ", ".join(f"{n}: {r.status}" for n, r in rows.items()) or "no units"
            raise ApprovalRefused(f"run {run_id} held no plan for approval ({results})")
        for name in names:
            if rows[name].status != UnitStatus.HELD:
                raise ApprovalRefused(
                    f"unit {name} was not held for approval in run {run_id}"
                    f" (its result: {rows[name].status})"
                )
        suspended = [n for n in names if n in self.store.suspensions.by_unit()]
        if suspended:
            name = suspended[0]
            raise ApprovalRefused(
                f"unit {name} is suspended", hint=f"`agent resume {name}`, then approve again"
            )
        current = self.store.current_revision()
        if current and all(self.pruner.hold_in_force(run_id, n) for n in names):
            run = replace(run, revision=current)  # a removed stack's hold outlives commits
        if run.revision is None or run.revision != current:
            raise ApprovalRefused(
                f"the plan is stale: the revision in force moved since run {run_id}"
                f" (it planned {(run.revision or 'nothing')[:12]}, {(current or 'none')[:12]} is"
                " in force now); run `agent reconcile --now` to plan again"
            )
        approved, files = {a.unit for a in self.store.approvals.of(run_id)}, RunFiles(self.store)
        for name in names:
            if name in approved and not files.still_held(run_id, name):  # applied elsewhere
                raise ApprovalRefused(self._why_no_plan(run_id, name))
            files.restore(run_id, name)  # a plan held on another agent of a shared store
        plans = {n: _held_file(self.layout.unit_run_dir(run_id, n)) for n in names}
        for name, plan in plans.items():
            if not plan.exists() and (rows[name].error or "").startswith(WINDOW_CLOSED):
                # A fleet waiting for its change window saved nothing to approve.
                raise ApprovalRefused(
                    f"unit {name} waits for its change window in run {run_id}"
                    f" ({rows[name].error}): there is no saved plan to approve; it applies in"
                    " the first pass after the window opens",
                    hint="to apply now: agent reconcile --now --override-window --reason TEXT",
                )
            if not plan.exists():
                raise ApprovalRefused(self._why_no_plan(run_id, name))
        return run.revision, plans

    def _why_no_plan(self, run_id: str, unit: str) -> str:
        for approval in self.store.approvals.of(run_id):
            if approval.unit == unit:
                by = f" by {approval.by}" if approval.by else ""
                return (
                    f"the plan of {unit} in run {run_id} was already approved{by}"
                    f" (run {approval.run_id})"
                )
        state = self.store.unit_state(unit)
        later = state.last_run_id if state and state.last_run_id != run_id else None
        if later:
            return (
                f"the plan of {unit} in run {run_id} was replaced: run {later} planned it again"
                f" ({state.last_status}); approve that run if it holds a plan"
            )
        return f"the saved plan of {unit} in run {run_id} is gone; run `agent reconcile --now`"

    def apply(self, ctx: PassContext, run_id: str, revision: str, held: dict[str, Path]) -> None:
        """Apply the held plans `held` of run `run_id` in pass `ctx` (a stack's saved
        Terraform plan, a fleet's saved removals, a removed unit's destroy plan)."""
        assert ctx.manifest is not None
        stack_ctx = StackContext(ctx.run_id, revision, self.layout.checkout, ctx.manifest, False)
        removed = [n for n in held if ctx.manifest.get_unit(n) is None]
        if removed:
            request = PruneRequest(ctx.run_id, revision, ctx.manifest)
            for name in removed:
                if not self._stop.is_set():
                    ctx.outcomes[name] = self.pruner.apply_held(request, name, run_id, held[name])
        for name in [n for n in ctx.manifest.order() if n in held]:
            if self._stop.is_set():
                break
            unit_kind = ctx.manifest.get_unit(name)
            # A fleet holds the removals it showed; a stack, its Terraform plan.
            apply_saved = (
                self.fleets.apply_saved
                if unit_kind is not None and unit_kind.fleet is not None
                else self.stacks.apply_saved
            )
            work = functools.partial(apply_saved, stack_ctx, name, run_id, held[name])
            # In a cluster, under the unit's lease as any apply.
            cluster = self.cluster
            ctx.outcomes[name] = cluster.leased(name, work) if cluster else work()
        RunFiles(self.store, self.layout).drop_consumed(run_id, held)


def _held_file(unit_run_dir: Path) -> Path:
    """What a held unit saved for approval: a fleet's removals (its run dir has the hosts'
    report), or a stack's Terraform plan."""
    if (unit_run_dir / "hosts.txt").exists():
        return unit_run_dir / HELD_FILE
    return unit_run_dir / PLAN_FILE
