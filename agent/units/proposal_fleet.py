"""Planning one fleet unit of a proposed change: read each host, change nothing.

    the aim rule (`aim_refusal`): the unit is a fleet at the revision in force, with the
      same hosts (names, addresses, ports, users; or the same stack output or EC2 filter),
      user, port and become -- else skipped, nothing contacted
    secrets: none unless `proposals.secrets_for` lists the unit (else skipped if it needs any)
    hosts and `from_stack` vars: stack outputs as applied now (the main state: the local
      file, or a copy pulled from `terraform.state_backend` by the agent's own Terraform)
    per host, in parallel (hosts.parallelism), each bounded by the unit's timeout:
      plan the host (fleetplan.HostPlanner: the proposal's templates, rendered in Jinja's
        sandbox inside the proposal's tree) -> connect with the host config's transport
        settings -> one facts round trip for every resource but commands -> diff locally
    plan.txt: "+N ~M -K" and the resources that would change, per host

What a proposal can never make the agent do on a host: run anything of its own. The facts
round trip runs the engine's own queries (stat, dpkg-query, systemctl show, getent); a
`command` resource's guards (`creates`, `unless`, `onlyif`) are shell the proposal wrote,
so they are never sent: every command is reported "would run (guard not evaluated in a
proposal)". No apply round trip exists here, and no handler runs. Files and templates are
read as sensitive (the host answers with hashes, never the file's text) and no content
diff is shown: a proposal may name any path, and a forge comment must not print a host's
file that its author may not read. Nothing is
written to the agent's state: host records are read (to show the removals a merge would
make), never written.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.config import HostConfig, Manifest, Unit
from agent.config.fleet import HostSpec
from agent.core.fsutil import atomic_write, ensure_private_dir
from agent.core.redact import Redactor, Secret
from agent.errors import AgentError
from agent.state.hostrecords import FileHostRecords, HostRecords
from agent.state.layout import StateLayout
from agent.state.proposals import ProposalUnitStatus
from agent.units.context import StackContext
from agent.units.ec2fleet import Ec2Hosts
from agent.units.fingerprint import Hasher, load_key
from agent.units.fleetledger import FleetLedger
from agent.units.fleetplan import HostPlanner
from agent.units.fleetreport import outcome_lines
from agent.units.fleettransport import LOCAL_ADDRESS, host_transport
from agent.units.fleettypes import FleetError, PlannedHost
from agent.units.proposal_unit import NeedsSecrets, UnitPlan, applied_outputs
from agent.units.secrets import ResolvedSecrets
from providers.errors import ProviderError
from providers.hosts.engine import converge
from providers.hosts.model import HostReport, ResourceOutcome
from providers.hosts.templates import render_deadline
from providers.text import plural

NOT_EVALUATED = "would run (guard not evaluated in a proposal)"


def aim_refusal(unit: Unit, main: Unit | None) -> str | None:
    """Why the proposal's fleet `unit` may not be planned on hosts (None: it may).

    The rule: the hosts a proposal's plan connects to, and as whom, are those of the
    revision in force. The unit must be a fleet there too, with the same `hosts` (a static
    list: the same names with the same address, port and user; or the same stack output,
    or the same EC2 filter) and the same fleet-wide `user`, `port` and `become`. Roles,
    resources, vars and templates may differ: that is what a proposal proposes. The SSH
    identity, known_hosts and jump host always come from the host config."""
    assert unit.fleet is not None
    if main is None or main.fleet is None:
        return (
            "skipped: not a fleet unit at the revision in force; a proposal cannot choose"
            " the hosts the agent connects to"
        )
    new, old = unit.fleet, main.fleet
    for field in ("user", "port", "become"):
        if getattr(new, field) != getattr(old, field):
            return (
                f"skipped: fleet.{field} differs from the revision in force"
                f" ({getattr(old, field)!r} -> {getattr(new, field)!r}); a proposal cannot"
                " change how the agent connects"
            )
    if isinstance(new.hosts, tuple) and isinstance(old.hosts, tuple):
        proposed, current = _aims(new.hosts), _aims(old.hosts)
        if proposed != current:
            return (
                "skipped: fleet.hosts differ from the revision in force"
                f" ({_first_difference(proposed, current)}); a proposal cannot choose the"
                " hosts the agent connects to"
            )
        return None
    if new.hosts != old.hosts:
        return (
            "skipped: fleet.hosts differ from the revision in force (where the hosts come"
            " from); a proposal cannot choose the hosts the agent connects to"
        )
    return None


def _aims(hosts: Sequence[HostSpec]) -> dict[str, tuple[str, int | None, str | None]]:
    return {h.name: (h.address, h.port, h.user) for h in hosts}


def _first_difference(
    proposed: Mapping[str, tuple[str, int | None, str | None]],
    current: Mapping[str, tuple[str, int | None, str | None]],
) -> str:
    for name in sorted(set(proposed) | set(current)):
        if name not in current:
            return f"host {name} added"
        if name not in proposed:
            return f"host {name} removed"
        if proposed[name] != current[name]:
            (a, p, u), (a2, p2, u2) = current[name], proposed[name]
            return f"host {name}: {u or ''}@{a}:{p or ''} -> {u2 or ''}@{a2}:{p2 or ''}"
    return "?"


# (tree, requester, upstream's name, upstream's definition or None, deadline) -> outputs
CurrentOutputs = Callable[[Path, str, str, Unit | None, float], dict[str, Any]]


class ProposalFleetPlanner:
    """Plans fleet units of proposals: one read-only round trip per host."""

    def __init__(
        self,
        host: HostConfig,
        layout: StateLayout,
        redactor: Redactor,
        current_outputs: CurrentOutputs,
        *,
        timeout: float,
        records: HostRecords | None = None,
    ) -> None:
        """`current_outputs(tree, requester, upstream_name, upstream, deadline)`: a stack's
        outputs as applied now, wherever its state is (ProposalUnitPlanner.current_outputs).
        `records`: where the main passes keep the fleets' host records (default: the state
        directory's files)."""
        self.host = host
        self.current_outputs = current_outputs
        self.layout = layout
        self.redactor = redactor
        self.timeout = timeout
        hasher = Hasher(lambda: load_key(layout.root))
        records = records or FileHostRecords(layout)
        self.ledger = FleetLedger(layout, hasher, redactor, records)  # read only, here
        self.ec2 = Ec2Hosts(host.hosts)
        self._stop = threading.Event()

    def interrupt(self) -> None:
        """Contact no new host (the agent stops); the hosts being read finish their trip."""
        self._stop.set()

    def plan(
        self,
        tree: Path,
        manifest: Manifest,
        unit: Unit,
        main: Manifest | None,
        run_dir: Path,
        secrets: Mapping[str, Secret] | None,
        plan_id: str,
    ) -> UnitPlan:
        """Plan fleet `unit` of the proposal checked out at `tree`. `main` is the manifest
        in force (None: unreadable); `secrets` None: the unit gets none."""
        main_unit = main.get_unit(unit.name) if main is not None else None
        refused = aim_refusal(unit, main_unit)
        if refused:
            return UnitPlan(ProposalUnitStatus.SKIPPED, detail=refused)
        assert main_unit is not None and main_unit.fleet is not None
        if unit.secrets and secrets is None:
            names = ", ".join(sorted(unit.secrets))
            return UnitPlan(
                ProposalUnitStatus.SKIPPED,
                detail=f"skipped: needs secrets ({names}); proposals.secrets_for does not list it",
            )
        trusted = secrets is not None

        deadline = time.monotonic() + self.timeout

        def outputs(_ctx: StackContext, requester: Unit, upstream: str) -> dict[str, Any]:
            definition = manifest.get_unit(upstream)
            current = self.current_outputs(tree, requester.name, upstream, definition, deadline)
            return applied_outputs(current, upstream, self.redactor, trusted)

        planner = HostPlanner(self.ledger, self.redactor, outputs, self.ec2)
        ctx = StackContext(
            run_id=plan_id,
            revision="proposal",
            tree=tree,
            manifest=manifest,
            dry_run=True,
            secrets=ResolvedSecrets(values={unit.name: dict(secrets or {})}),
        )
        fleet = unit.fleet
        assert fleet is not None
        try:
            hosts = planner.hosts(ctx, unit, fleet)
            unit_vars = planner.unit_vars(ctx, unit)
        except NeedsSecrets as exc:
            return UnitPlan(ProposalUnitStatus.SKIPPED, detail=f"skipped: needs secrets ({exc})")
        except (AgentError, ProviderError) as exc:
            message = exc.message if isinstance(exc, AgentError) else str(exc)
            return UnitPlan(ProposalUnitStatus.FAILED, detail=self.redactor.redact(message))
        # Each round trip within the unit's timeout (and the proposals' own).
        timeout = min(self.timeout, main_unit.timeout, self.host.hosts.command_timeout)

        def one(spec: HostSpec) -> HostPlan:
            if spec.address == LOCAL_ADDRESS:
                return HostPlan(spec.name, skipped="the agent's own machine is not planned")
            if self._stop.is_set():
                error = HostReport(spec.name, error="interrupted: the agent stops")
                return HostPlan(spec.name, error)
            # The proposal's templates, like its round trip, within the timeout.
            with render_deadline(time.monotonic() + timeout):
                plan = planner.plan_host(ctx, unit, fleet, spec, unit_vars)
            removals = frozenset(r.id for r in plan.removals)
            return HostPlan(spec.name, self._read_host(main_unit, plan, timeout), None, removals)

        limit = min(fleet.parallelism or self.host.hosts.parallelism, self.host.hosts.parallelism)
        with ThreadPoolExecutor(max_workers=max(1, limit), thread_name_prefix="phost") as pool:
            done = list(pool.map(one, hosts))
        ensure_private_dir(run_dir)
        text = self.redactor.redact(render_host_plans(done))
        atomic_write(run_dir / "plan.txt", text)
        add = sum(h.counts[0] for h in done)
        change = sum(h.counts[1] for h in done)
        destroy = sum(h.counts[2] for h in done)
        failed = [h for h in done if h.error]
        if failed:
            detail = "; ".join(f"{h.host}: {h.error}" for h in failed)
            return UnitPlan(
                ProposalUnitStatus.FAILED,
                (add, change, destroy),
                self.redactor.redact(
                    f"{len(failed)} of {plural(len(done), 'host')} not planned: {detail}"
                ),
            )
        status = (
            ProposalUnitStatus.CHANGES if add + change + destroy else ProposalUnitStatus.NO_CHANGES
        )
        skipped = [h.host for h in done if h.skipped]
        note = f"not planned on {', '.join(skipped)} (local)" if skipped else None
        return UnitPlan(status, (add, change, destroy), note)

    def _read_host(self, unit: Unit, plan: PlannedHost, timeout: float) -> HostReport:
        """One facts round trip, never a command's guard, never an apply."""
        if plan.error is not None:
            return HostReport(host=plan.spec.name, error=plan.error)
        fleet = unit.fleet
        assert fleet is not None
        try:
            # The revision in force's fleet: its port, user and become (equal, checked).
            transport = host_transport(self.host.hosts, self.ec2, unit, fleet, plan.spec)
        except FleetError as exc:
            return HostReport(host=plan.spec.name, error=exc.message)
        # Files as sensitive: the host sends back hashes, never its file text.
        resources = [
            replace(r, sensitive=True) if r.kind in ("file", "template") else r
            for r in plan.resources
            if r.kind != "command"
        ]
        report = converge(
            transport,
            resources,
            {},
            apply=False,  # no apply round trip, no handler
            become=fleet.become,
            timeout=timeout,
            python=self.host.hosts.python,
        )
        read = iter(report.outcomes)
        outcomes = []
        for resource in plan.resources:
            if resource.kind == "command":
                outcomes.append(ResourceOutcome(resource.id, "would-change", (NOT_EVALUATED,)))
            elif (outcome := next(read, None)) is not None:
                outcomes.append(replace(outcome, diff=""))  # hashes only, even so
        return replace(report, outcomes=tuple(outcomes))


@dataclass(frozen=True, slots=True)
class HostPlan:
    """One host's part of a fleet's proposal plan."""

    host: str
    report: HostReport | None = None
    skipped: str | None = None
    removals: frozenset[str] = frozenset()  # resource ids the merge would remove

    @property
    def error(self) -> str | None:
        """Why the host could not be read, or a resource not planned (None: neither)."""
        if self.report is None:
            return None
        errors = [self.report.error.removeprefix(f"{self.host}: ")] if self.report.error else []
        errors += [o.error for o in self.report.outcomes if o.error]
        return "; ".join(errors) or None

    @property
    def counts(self) -> tuple[int, int, int]:
        """(+add, ~change, -destroy) the merge would make here: a resource created, one
        changed (a command: it might run), one the repository no longer lists removed."""
        add = change = destroy = 0
        for outcome in self.report.outcomes if self.report else ():
            if outcome.status != "would-change":
                continue
            if outcome.resource_id in self.removals:
                destroy += 1
            elif outcome.existed is False:
                add += 1
            else:
                change += 1
        return add, change, destroy


def render_host_plans(hosts: Sequence[HostPlan]) -> str:
    """plan.txt of a fleet's proposal plan: per host its counts, then what would change."""
    lines: list[str] = []
    for host in hosts:
        if host.skipped:
            lines.append(f"== {host.host}: skipped: {host.skipped}")
            continue
        report = host.report
        assert report is not None
        if report.error:
            lines.append(f"== {host.host}: not read: {host.error}")
            continue
        add, change, destroy = host.counts
        trips = plural(report.round_trips, "round trip")
        lines.append(
            f"== {host.host}: +{add} ~{change} -{destroy} ({trips}, {report.duration_s:.2f} s)"
        )
        # No content diffs: a proposal's comment must not print a host's files.
        lines += outcome_lines(report.outcomes, diffs=False)
    return "\n".join(lines) + "\n"
