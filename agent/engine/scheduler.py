"""The units step of a pass: walk the dependency graph, start a unit when all it depends
on converged, run independent units in parallel (bounded by the host config), and block
the dependents of a unit that failed or is held, and no other unit."""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from agent.config import DriftPolicy, HostConfig, Manifest
from agent.engine.clustermode import ClusterMode
from agent.engine.passes import CONVERGED, PassContext
from agent.state.layout import StateLayout
from agent.state.store import RunStore, UnitOutcome, UnitStatus
from agent.units.context import StackContext
from agent.units.fleets import FleetReconciler
from agent.units.secrets import SecretResolver
from agent.units.stacks import StackReconciler


class UnitScheduler:
    """Runs the selected units of a pass in dependency order."""

    def __init__(
        self,
        host: HostConfig,
        layout: StateLayout,
        store: RunStore,
        stacks: StackReconciler,
        fleets: FleetReconciler,
        stop: threading.Event,
    ) -> None:
        self.host = host
        self.layout = layout
        self.store = store
        self.stacks = stacks
        self.fleets = fleets
        self._stop = stop
        # Scale-out mode (set by the Reconciler): units run through the pass's ClusterPass.
        self.cluster: ClusterMode | None = None
        self.secrets: SecretResolver | None = None

    def run(self, ctx: PassContext, names: list[str]) -> None:
        """Reconcile the units in dependency order, independent ones in parallel."""
        assert ctx.manifest is not None and ctx.target is not None
        manifest = ctx.manifest
        alone = ctx.cluster is None
        stack_ctx = StackContext(
            run_id=ctx.run_id,
            revision=ctx.target,
            tree=self.layout.checkout,
            manifest=manifest,
            dry_run=ctx.request.dry_run,
            secrets=ctx.secrets,
            override_window=ctx.request.override_window,
            outcomes=ctx.outcomes,
            hosts_only=ctx.request.hosts,
            changed_only=ctx.request.changed_only,
            drift_intervals=self.drift_intervals(manifest),
            guard=ctx.cluster.guard if ctx.cluster else None,
            states={s.unit: s for s in self.store.unit_states()} if alone else None,
            batch_unchanged=alone
            and ctx.request.changed_only
            and not ctx.request.dry_run
            and self.store.batches_unchanged,
        )
        selected = set(names)
        pending = set(names)
        running: dict[Future[UnitOutcome], str] = {}
        if (cluster := ctx.cluster) is not None and self.cluster is not None:
            mode, secrets = self.cluster, self.secrets
            assert secrets is not None
            cluster.work = lambda n: mode.unit_work(
                cluster, stack_ctx, n, self.stacks, self.fleets, secrets
            )
        with ThreadPoolExecutor(
            max_workers=self.host.terraform.parallelism, thread_name_prefix="unit"
        ) as pool:
            while pending or running:
                if cluster is not None:  # units gained from an agent that died meanwhile
                    for name in cluster.gained():
                        if name not in ctx.outcomes and name not in running.values():
                            pending.add(name)
                            selected.add(name)
                    names = [n for n in cluster.candidates if n in selected]
                self._block_dependents(stack_ctx, pending, ctx.outcomes, selected)
                if self._stop.is_set():
                    pending.clear()
                for name in [n for n in names if n in pending]:
                    deps = manifest.get_unit(name).depends_on
                    if all(d not in selected or d in ctx.outcomes for d in deps):
                        pending.discard(name)
                        kind = manifest.get_unit(name).kind
                        reconciler = self.fleets if kind == "fleet" else self.stacks
                        if cluster is not None and cluster.work is not None:
                            running[pool.submit(cluster.work(name))] = name
                        else:
                            running[pool.submit(reconciler.reconcile, stack_ctx, name)] = name
                if not running:
                    continue
                # (in a cluster, a look every second for units gained meanwhile)
                tick = 1.0 if cluster is not None else None
                done, _ = wait(running, timeout=tick, return_when=FIRST_COMPLETED)
                for future in done:
                    ctx.outcomes[running.pop(future)] = future.result()
        if stack_ctx.batch_unchanged:
            self.store.flush_unchanged()
        if cluster is not None:
            cluster.finish(ctx.outcomes)

    def drift_intervals(self, manifest: Manifest) -> dict[str, float | None]:
        """Each unit's drift interval (its own, else the host's); None for `drift: ignore`."""
        own = self.host.intervals.units
        return {
            unit.name: None
            if unit.drift is DriftPolicy.IGNORE
            else (own[unit.name].drift if unit.name in own else self.host.intervals.drift)
            for unit in manifest.units
        }

    def _block_dependents(
        self,
        stack_ctx: StackContext,
        pending: set[str],
        outcomes: dict[str, UnitOutcome],
        selected: set[str],
    ) -> None:
        """Block pending units whose dependency finished without converging (transitively).
        A dependency this pass leaves out (`--unit`, backoff) counts by its last real
        result: held or failed, it blocks its dependents here as in a full pass."""
        manifest = stack_ctx.manifest
        changed = True
        while changed:
            changed = False
            for name in sorted(pending):
                failed: list[tuple[str, UnitOutcome]] = []
                for d in manifest.get_unit(name).depends_on:
                    if d in selected and d in outcomes and outcomes[d].status not in CONVERGED:
                        failed.append((d, outcomes[d]))
                    elif d not in selected and (last := self._last_real(stack_ctx, d)) is not None:
                        failed.append((d, last))
                if failed:
                    pending.discard(name)
                    outcomes[name] = self.stacks.block(stack_ctx, name, *failed[0])
                    changed = True

    def _last_real(self, stack_ctx: StackContext, unit: str) -> UnitOutcome | None:
        """The last real result of a unit left out of this pass, if it did not converge."""
        if stack_ctx.states is not None:
            state = stack_ctx.states.get(unit)
        else:
            state = self.store.unit_state(unit)
        blocking = (UnitStatus.HELD, UnitStatus.FAILED, UnitStatus.BLOCKED)
        if state is None or state.last_status not in blocking:
            return None
        return UnitOutcome(status=UnitStatus(state.last_status))
