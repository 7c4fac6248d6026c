"""Reconciling one fleet unit: hosts, their resources, drift, and what was removed.

Per host: the manifest's resources (the fleet's roles, the host's own roles, the
fleet's inline resources) become the engine's `Resource`s (templates rendered with the
fleet, unit and host variables and the unit's secrets; sources read from the checkout).
Each host has one record of what the agent manages there (providers/hosts/ledger.py,
stored under `<state>/hosts/`), shared by every fleet unit: objects this unit created
that the repo no longer lists, and that no current resource of any unit owns, are
added as `state: absent` (in reverse dependency order), so a `git revert` really rolls
back; adopted objects are let go. The record is updated per resource after every apply,
so a partly failed apply still records what it did. With `policy.destroy: hold` those
removals are shown and held for `agent approve`; the rest converges. The engine converges
each host in one round trip when nothing changed; hosts run in parallel and one failing
host never stops the others. The per-host diff goes to `hosts.txt` in the run directory.

The parts, each in its own module:

    fleetplan.HostPlanner      the hosts, and each host's resources (nothing contacted)
    fleettransport             how a host is reached (host config's SSH settings)
    providers.hosts.converge   one host's facts, diff, apply
    fleetledger.FleetLedger    what each host has, per unit and resource; held removals
    fleetreport                each host's line and diff, the unit's outcome
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from agent.config import DestroyPolicy, HostConfig, StackOutputRef, Unit
from agent.config.fleet import Fleet, HostsFromEc2, HostSpec
from agent.core.fsutil import atomic_write, ensure_private_dir
from agent.core.progress import Event, EventKind, Reporter
from agent.core.redact import Redactor
from agent.errors import AgentError
from agent.state.hostrecords import host_records
from agent.state.layout import StateLayout
from agent.state.store import RunStore, UnitOutcome, UnitStatus
from agent.units.context import StackContext
from agent.units.decide import Decision
from agent.units.ec2fleet import Ec2Hosts
from agent.units.fingerprint import Fingerprint, Hasher, agent_key, fleet_fingerprint
from agent.units.fleetledger import (
    HELD_FILE,
    HOST_RESULTS_FILE,
    FleetLedger,
    held_removals,
    retire_hosts,
)
from agent.units.fleetlog import HostLog
from agent.units.fleetplan import HostPlanner, StackOutputs
from agent.units.fleetreport import (
    describe_fleet,
    fleet_outcome,
    host_line,
    host_result,
    render_reports,
)
from agent.units.fleettransport import host_transport
from agent.units.fleettypes import FleetError, FleetOutcome, HostResult, PlannedHost
from agent.units.policy_check import fleet_hold, now_utc
from agent.units.unitrun import finish_unit, held_fingerprint, run_unit
from providers.hosts.engine import converge
from providers.hosts.model import HostReport, Resource


class FleetReconciler:
    """Converges fleet units over SSH (or locally); one instance serves many passes."""

    def __init__(
        self,
        host: HostConfig,
        layout: StateLayout,
        store: RunStore,
        reporter: Reporter,
        redactor: Redactor,
        stack_outputs: StackOutputs,
    ) -> None:
        self.host = host
        self.layout = layout
        self.store = store
        self.report = reporter
        self.redactor = redactor
        self.stack_outputs = stack_outputs
        self._stop = threading.Event()
        self.hasher = Hasher(lambda: agent_key(store, layout.root))
        self.ledger = FleetLedger(layout, self.hasher, redactor, host_records(store, layout))
        self.ec2 = Ec2Hosts(host.hosts)
        self.planner = HostPlanner(self.ledger, redactor, stack_outputs, self.ec2)

    def interrupt(self) -> None:
        """Start no new host; the hosts converging now finish their round trip."""
        self._stop.set()

    def reconcile(self, ctx: StackContext, name: str) -> UnitOutcome:
        """Converge every host of fleet unit `name`; never raises for the unit's failure."""
        return run_unit(
            ctx,
            name,
            store=self.store,
            report=self.report,
            redactor=self.redactor,
            stop=self._stop,
            work=lambda unit, moved, _: self._converge(ctx, unit, _fleet(unit), moved),
            describe=describe_fleet,
            inputs=lambda unit: self.fingerprint(ctx, unit),
        )

    def fingerprint(self, ctx: StackContext, unit: Unit) -> Fingerprint:
        """The fleet unit's inputs in this pass (its hosts read from a stack, if so)."""
        return fleet_fingerprint(
            self.hasher,
            ctx.tree,
            unit,
            ctx.manifest,
            hosts=self.planner.hosts(ctx, unit, _fleet(unit)),
            upstream={
                name: value
                for name, value in self.planner.unit_vars(ctx, unit).items()
                if isinstance(unit.vars[name], StackOutputRef)
            },
            secrets=ctx.secrets.values.get(unit.name, {}),
        )

    def apply_saved(
        self, ctx: StackContext, name: str, held_run_id: str, held_file: Path
    ) -> UnitOutcome:
        """Apply exactly the removals run `held_run_id` held for fleet `name` (`agent
        approve`), host by host. A removal whose change on the host is no longer the one
        shown (the host moved) is not applied: it fails as stale. The file is then gone."""
        unit = ctx.manifest.get_unit(name)
        assert unit is not None
        fleet = _fleet(unit)
        started = time.monotonic()
        self.store.start_unit(ctx.run_id, name, ctx.revision)
        self.report(Event(EventKind.UNIT_STARTED, run_id=ctx.run_id, unit=name))
        try:
            held = json.loads(held_file.read_text())
            specs = {spec.name: spec for spec in self.planner.hosts(ctx, unit, fleet)}
            planned, expected = [], {}
            for host, entry in held.items():
                removals = tuple(
                    Resource(kind=r["kind"], name=r["name"], attrs=r["attrs"])
                    for r in entry["removals"]
                )
                expected[host] = {
                    f"{r['kind']}:{r['name']}": tuple(r["changes"]) for r in entry["removals"]
                }
                spec = specs.get(host)
                if spec is None:
                    spec = HostSpec(name=host, address=str(entry["address"]))
                    error = f"{host}: no longer in the fleet; nothing removed"
                    planned.append(PlannedHost(spec, (), {}, error=error))
                    continue
                planned.append(PlannedHost(spec, removals, {}, removals=removals))
            reports = [
                self._run_host(ctx, unit, fleet, p, True, expected=expected[p.spec.name])
                for p in planned
            ]
            run_dir = ensure_private_dir(self.layout.unit_run_dir(ctx.run_id, name))
            atomic_write(run_dir / "hosts.txt", self.redactor.redact(render_reports(reports)))
            for plan, report in zip(planned, reports, strict=True):
                self.ledger.remember(unit, plan, report, ctx.revision, applied=True)
            outcome = self._scrub_hosts(
                fleet_outcome(
                    [host_result(r) for r in reports],
                    apply=True,
                    dry_run=False,
                    revision_moved=True,
                )
            )
        except (AgentError, OSError, ValueError, KeyError) as exc:
            message = exc.message if isinstance(exc, AgentError) else f"held removals: {exc}"
            outcome = UnitOutcome(status=UnitStatus.FAILED, decision=Decision.APPLY, error=message)
        finally:
            held_file.unlink(missing_ok=True)
        # Converged, the fleet is at the inputs of the pass that held the removals.
        return finish_unit(
            ctx,
            name,
            outcome,
            store=self.store,
            report=self.report,
            redactor=self.redactor,
            describe=describe_fleet,
            started=started,
            fingerprint=held_fingerprint(self.store, held_run_id, name),
        )

    def remove_all(self, ctx: StackContext, unit: Unit, *, hold: bool) -> UnitOutcome:
        """Remove from its hosts what a unit the repository removed put there (`unit` is its
        last definition with no resources and static hosts, see agent/units/prune.py), or show
        the removals and hold them for `agent approve`."""
        return self._converge(ctx, unit, _fleet(unit), True, hold_removals=hold)

    # --- the steps ------------------------------------------------------------------

    def _converge(
        self,
        ctx: StackContext,
        unit: Unit,
        fleet: Fleet,
        revision_moved: bool,
        *,
        hold_removals: bool | None = None,
    ) -> UnitOutcome:
        hosts = self.planner.hosts(ctx, unit, fleet)
        if isinstance(fleet.hosts, HostsFromEc2) and ctx.hosts_only is None:
            retire_hosts(self.ledger.records, unit.name, {h.name for h in hosts})
        if ctx.hosts_only is not None:
            # New instances get the revision in force, as if it had just moved: they have
            # never had it (drift `report` would otherwise only look at them).
            hosts = tuple(h for h in hosts if h.name in ctx.hosts_only)
            revision_moved = True
        # Drift with `report` looks without touching; a dry run never touches.
        apply = not ctx.dry_run and (revision_moved or unit.drift.value == "revert")
        # Outside a change window (or under a host ceiling of `approve`) nothing is applied.
        wait, note = (
            fleet_hold(
                self.host, is_drift=not revision_moved, override=ctx.override_window, now=now_utc()
            )
            if apply
            else (None, None)
        )
        apply = apply and wait is None
        if hold_removals is None:
            hold_removals = self.host.policy.destroy is DestroyPolicy.HOLD
        hold = apply and hold_removals
        unit_vars = self.planner.unit_vars(ctx, unit)

        run_dir = ensure_private_dir(self.layout.unit_run_dir(ctx.run_id, unit.name))
        log = HostLog(run_dir / "hosts.txt")

        def one(place: int, spec: HostSpec) -> tuple[HostResult, dict[str, dict[str, Any]], int]:
            # Each host is prepared, converged, recorded and written to hosts.txt by its
            # worker, and only its counts come back: a pass holds the facts, diffs and
            # rendered files of the hosts being converged, not of the whole fleet.
            plan = self.planner.plan_host(ctx, unit, fleet, spec, unit_vars)
            report = self._run_host(ctx, unit, fleet, plan, apply, hold=hold)
            # Drift put back by a change from Git: counted before the new desired state
            # replaces the one recorded at the last converge.
            overwritten = (
                self.ledger.drift_overwritten(unit.name, plan, report)
                if revision_moved and apply
                else 0
            )
            self.ledger.remember(unit, plan, report, ctx.revision, applied=apply)
            self.ledger.remember_desired(unit.name, plan, report, applied=apply)
            log.add(place, self.redactor.redact(render_reports([report])))
            return host_result(report), held_removals([plan], [report]), overwritten

        limit = min(fleet.parallelism or self.host.hosts.parallelism, self.host.hosts.parallelism)
        with (
            log,
            ThreadPoolExecutor(max_workers=max(1, limit), thread_name_prefix="host") as pool,
        ):
            done = list(pool.map(one, range(len(hosts)), hosts))
        # Each host's SSH connection leaves reference cycles (paramiko's transport, its
        # thread and packetizer) that only a full collection frees; without one here the
        # daemon's RSS rose 10-15 MiB a pass until the collector's own threshold came
        # around. About 0.3 s with a 1,000-host manifest in memory.
        gc.collect()
        results = [result for result, _, _ in done]
        held = {host: entry for _, found, _ in done for host, entry in found.items()}
        overwritten = sum(count for _, _, count in done)
        if held:
            atomic_write(run_dir / HELD_FILE, json.dumps(held, indent=1))
            self.ledger.drop_older_holds(unit.name, ctx.run_id)
        outcome = self._scrub_hosts(
            fleet_outcome(results, apply=apply, dry_run=ctx.dry_run, revision_moved=revision_moved)
        )
        if overwritten:
            outcome = replace(outcome, drift=True, drift_overwritten=True)
        # Each host's counts in this run, for `agent history` (the store keeps the totals).
        atomic_write(
            run_dir / HOST_RESULTS_FILE, json.dumps([asdict(h) for h in outcome.hosts], indent=1)
        )
        if wait and outcome.status is UnitStatus.OK and outcome.plan_change:
            return replace(
                outcome,
                status=UnitStatus.HELD,
                decision=Decision.HOLD,
                converged=False,
                error=wait,
                waiting=True,
            )
        if note and outcome.status is UnitStatus.OK and outcome.plan_change:
            return replace(outcome, error=note)  # the override lifted the window for these
        return outcome

    def _scrub_hosts(self, outcome: UnitOutcome) -> UnitOutcome:
        """Mask secrets in each host's error (they quote command output and file text)."""
        if not isinstance(outcome, FleetOutcome):
            return outcome
        hosts = tuple(
            replace(h, error=self.redactor.redact(h.error) if h.error else None)
            for h in outcome.hosts
        )
        return replace(outcome, hosts=hosts)

    def _run_host(
        self,
        ctx: StackContext,
        unit: Unit,
        fleet: Fleet,
        plan: PlannedHost,
        apply: bool,
        *,
        hold: bool = False,
        expected: Mapping[str, Sequence[str]] | None = None,
    ) -> HostReport:
        if plan.error is not None:
            return HostReport(host=plan.spec.name, error=plan.error)
        if self._stop.is_set():
            return HostReport(host=plan.spec.name, error="interrupted before it was converged")
        if apply and ctx.guard is not None:
            try:
                ctx.guard(unit.name)  # cluster mode: the lease, checked before each host
            except AgentError as exc:
                return HostReport(host=plan.spec.name, error=exc.message)
        try:
            transport = host_transport(self.host.hosts, self.ec2, unit, fleet, plan.spec)
        except FleetError as exc:
            return HostReport(host=plan.spec.name, error=exc.message)
        self.report(
            Event(
                EventKind.UNIT_LINE,
                run_id=ctx.run_id,
                unit=unit.name,
                message=f"{plan.spec.name}: converging",
            )
        )
        report = converge(
            transport,
            plan.resources,
            plan.handlers,
            apply=apply,
            become=fleet.become,
            timeout=self.host.hosts.command_timeout,
            python=self.host.hosts.python,
            pending_handlers=plan.pending_handlers or (),
            hold_removals=hold,
            expected=expected,
        )
        self.report(
            Event(
                EventKind.UNIT_LINE,
                run_id=ctx.run_id,
                unit=unit.name,
                message=self.redactor.redact(host_line(report)),
            )
        )
        return report


def _fleet(unit: Unit) -> Fleet:
    assert unit.fleet is not None
    return unit.fleet
