"""Reconciling one fleet unit: hosts, their resources, drift, and what was removed.

Per host: the manifest's resources (the fleet's roles, the host's own roles, the
fleet's inline resources) become the engine's `Resource`s (templates rendered with the
fleet, unit and host variables and the unit's secrets; sources read from the checkout);
resources this host had at its last converge that the repo no longer lists are added
as `state: absent`, so a `git revert` really rolls back. The engine converges each host
in one round trip when nothing changed; hosts run in parallel and one failing host
never stops the others. The per-host diff goes to `hosts.txt` in the run directory.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import HostConfig, StackOutputRef, Unit
from agent.config.fleet import Fleet, HostsFromStack, HostSpec, ResourceSpec
from agent.config.manifest import plain_value
from agent.decide import Decision
from agent.errors import AgentError
from agent.fsutil import atomic_write, ensure_private_dir
from agent.layout import StateLayout
from agent.progress import Event, EventKind, Reporter
from agent.redact import Redactor
from agent.stacks import StackContext
from agent.store import RunStore, UnitOutcome, UnitStatus
from agent.unitrun import run_unit
from providers.errors import ProviderError, RepoFileError
from providers.hosts.engine import converge
from providers.hosts.model import Handler, HostReport, Resource
from providers.hosts.templates import render_string, render_template
from providers.repofiles import MAX_SOURCE_BYTES, read_repo_file
from providers.transport import LocalTransport, Transport
from providers.transport.ssh import SSHSettings, SSHTarget, SSHTransport

LOCAL_ADDRESS = "local"
# Kinds that can be removed when the repo stops listing them (services and commands
# cannot: stopping a service is said explicitly, a command has no "undo").
_REMOVABLE = ("file", "template", "directory", "link", "package", "user", "group")

# A command's string fields rendered with the host's variables (its `env` values too).
_COMMAND_TEMPLATES = ("command", "creates", "unless", "onlyif", "cwd")

StackOutputs = Callable[[StackContext, Unit, str], Mapping[str, Any]]


class FleetError(AgentError):
    """A fleet could not be set up (hosts from a stack output, a missing SSH config)."""

    reference = "fleet-failed"


class CommandLineSecretError(FleetError):
    """A rendered command line holds a secret value (refused before it reaches a host)."""


@dataclass(frozen=True, slots=True)
class PlannedHost:
    """One host of a fleet with what it must have (or why it cannot be built)."""

    spec: HostSpec
    resources: tuple[Resource, ...]
    handlers: Mapping[str, Handler]
    error: str | None = None


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
            describe=_describe,
        )

    # --- the steps ------------------------------------------------------------------

    def _converge(
        self, ctx: StackContext, unit: Unit, fleet: Fleet, revision_moved: bool
    ) -> UnitOutcome:
        hosts = self._hosts(ctx, unit, fleet)
        # Drift with `report` looks without touching; a dry run never touches.
        apply = not ctx.dry_run and (revision_moved or unit.drift.value == "revert")
        unit_vars = self._unit_vars(ctx, unit)
        planned = [self._plan_host(ctx, unit, fleet, spec, unit_vars) for spec in hosts]
        limit = min(fleet.parallelism or self.host.hosts.parallelism, self.host.hosts.parallelism)
        with ThreadPoolExecutor(max_workers=max(1, limit), thread_name_prefix="host") as pool:
            reports = list(pool.map(lambda p: self._run_host(ctx, unit, fleet, p, apply), planned))
        run_dir = ensure_private_dir(self.layout.unit_run_dir(ctx.run_id, unit.name))
        atomic_write(run_dir / "hosts.txt", self.redactor.redact(_render_reports(reports)))
        for plan, report in zip(planned, reports, strict=True):
            self._remember(unit, plan, report, ctx.revision, applied=apply)
        return _outcome(reports, apply=apply, dry_run=ctx.dry_run, revision_moved=revision_moved)

    def _hosts(self, ctx: StackContext, unit: Unit, fleet: Fleet) -> tuple[HostSpec, ...]:
        if not isinstance(fleet.hosts, HostsFromStack):
            return fleet.hosts
        ref = fleet.hosts
        outputs = self.stack_outputs(ctx, unit, ref.unit)
        if ref.output not in outputs:
            known = ", ".join(sorted(outputs)) or "none"
            raise FleetError(
                f"unit {unit.name}: hosts come from output {ref.output!r} of stack unit"
                f" {ref.unit!r}, which has no such output (outputs: {known})"
            )
        return hosts_from_output(unit.name, ref, outputs[ref.output])

    def _unit_vars(self, ctx: StackContext, unit: Unit) -> dict[str, Any]:
        """The unit's `vars`, each `from_stack` one read from its stack's outputs (once per
        pass, for every host)."""
        values: dict[str, Any] = {}
        outputs: dict[str, Mapping[str, Any]] = {}
        for name, value in unit.vars.items():
            if not isinstance(value, StackOutputRef):
                values[name] = value
                continue
            if value.unit not in outputs:
                outputs[value.unit] = self.stack_outputs(ctx, unit, value.unit)
            if value.output not in outputs[value.unit]:
                known = ", ".join(sorted(outputs[value.unit])) or "none"
                raise FleetError(
                    f"unit {unit.name}: vars.{name} reads output {value.output!r} of stack unit"
                    f" {value.unit!r}, which has no such output (outputs: {known})",
                    hint=f"has {value.unit!r} been applied? is the output declared?",
                )
            values[name] = outputs[value.unit][value.output]
        return values

    def _plan_host(
        self,
        ctx: StackContext,
        unit: Unit,
        fleet: Fleet,
        spec: HostSpec,
        unit_vars: Mapping[str, Any],
    ) -> PlannedHost:
        """The engine's resources for one host (templates rendered), or why not."""
        roles = ctx.manifest.roles
        specs = [r for name in (*fleet.roles, *spec.roles) for r in roles.get(name, ())]
        specs += fleet.resources
        variables = self._variables(ctx, unit, fleet, spec, unit_vars)
        resources: list[Resource] = []
        try:
            for item in _last_wins(specs):
                resources.append(self._resource(ctx, item, variables))
        except (ProviderError, CommandLineSecretError, OSError) as exc:
            return PlannedHost(spec, (), {}, error=f"{spec.name}: {exc}")
        wanted = {r.id for r in resources}
        for kind, name in self._previous(unit.name, spec.name):
            if f"{kind}:{name}" not in wanted and kind in _REMOVABLE:
                attrs: dict[str, Any] = {"state": "absent"}
                resources.append(
                    Resource(kind="file" if kind == "template" else kind, name=name, attrs=attrs)
                )
        handlers = {
            h.name: Handler(h.name, h.service, h.action) for h in ctx.manifest.handlers.values()
        }
        return PlannedHost(spec, tuple(resources), handlers)

    def _variables(
        self,
        ctx: StackContext,
        unit: Unit,
        fleet: Fleet,
        spec: HostSpec,
        unit_vars: Mapping[str, Any],
    ) -> dict[str, Any]:
        secrets = {
            name: secret.reveal() for name, secret in ctx.secrets.values.get(unit.name, {}).items()
        }
        user = spec.user or fleet.user or "root"
        return {
            **plain_value(fleet.vars),
            **plain_value(unit_vars),
            **plain_value(spec.vars),
            "host": {"name": spec.name, "address": spec.address, "user": user},
            "secrets": secrets,
        }

    def _resource(
        self, ctx: StackContext, item: ResourceSpec, variables: dict[str, Any]
    ) -> Resource:
        attrs = dict(item.attrs)
        where = item.where
        if item.kind == "template" and attrs.get("state") != "absent":
            source = attrs.pop("source")
            text = render_template(
                ctx.tree / source,
                {**variables, **plain_value(attrs.pop("vars", {}))},
                display_name=source,
                root=ctx.tree,
            )
            attrs["content"] = text.encode()
        elif item.kind == "file" and "source" in attrs:
            try:
                attrs["content"] = read_repo_file(
                    ctx.tree, attrs.pop("source"), limit=MAX_SOURCE_BYTES
                )
            except RepoFileError as exc:
                raise RepoFileError(
                    f"{where}.source: {exc.path}", exc.reason, kind=exc.kind
                ) from None
        elif item.kind == "file" and "content" in attrs:
            attrs["content"] = str(attrs["content"]).encode()
        if item.kind == "command":
            # Every string field is a template, guards and cwd as much as the command itself:
            # `creates: "{{ app_dir }}/log"` must name the path the command makes.
            for key in _COMMAND_TEMPLATES:
                if attrs.get(key) is not None:
                    name = where if key == "command" else f"{where}.{key}"
                    attrs[key] = render_string(attrs[key], variables, display_name=name)
                    # Validation refuses `secrets` in command lines; this catches a value that
                    # reached one another way (a var equal to a secret): /proc/PID/cmdline is
                    # public.
                    if self.redactor.redact(attrs[key]) != attrs[key]:
                        field = "run" if key == "command" else key
                        raise CommandLineSecretError(
                            f"{where}.{field}: the command line would hold a secret value, which"
                            " every user of the host can read in /proc/PID/cmdline; pass it in"
                            " env:"
                        )
            attrs["env"] = {
                key: render_string(value, variables, display_name=f"{where}.env.{key}")
                for key, value in dict(attrs.get("env") or {}).items()
            }
        sensitive = bool(attrs.pop("sensitive", False)) or self._holds_secret(attrs)
        return Resource(
            kind=item.kind, name=item.name, attrs=attrs, notify=item.notify, sensitive=sensitive
        )

    def _holds_secret(self, attrs: Mapping[str, Any]) -> bool:
        """True when any text of the resource holds a registered secret (diffs show hashes)."""
        texts = []
        for value in attrs.values():
            if isinstance(value, bytes):
                texts.append(value.decode("utf-8", "replace"))
            elif isinstance(value, str):
                texts.append(value)
            elif isinstance(value, Mapping):
                texts.extend(str(v) for v in value.values())
        return any(self.redactor.redact(text) != text for text in texts)

    def _run_host(
        self, ctx: StackContext, unit: Unit, fleet: Fleet, plan: PlannedHost, apply: bool
    ) -> HostReport:
        if plan.error is not None:
            return HostReport(host=plan.spec.name, error=plan.error)
        if self._stop.is_set():
            return HostReport(host=plan.spec.name, error="interrupted before it was converged")
        try:
            transport = self._transport(unit, fleet, plan.spec)
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
        )
        self.report(
            Event(
                EventKind.UNIT_LINE,
                run_id=ctx.run_id,
                unit=unit.name,
                message=self.redactor.redact(_host_line(report)),
            )
        )
        return report

    def _transport(self, unit: Unit, fleet: Fleet, spec: HostSpec) -> Transport:
        settings = self.host.hosts
        if spec.address == LOCAL_ADDRESS:
            if not settings.allow_local:
                raise FleetError(
                    f"{spec.name}: address 'local' (the agent's own machine) needs"
                    " hosts.allow_local: true in the host config"
                )
            return LocalTransport(spec.name)
        if settings.key_file is None or settings.known_hosts is None:
            raise FleetError(
                f"{spec.name}: no SSH identity: set hosts.key_file and hosts.known_hosts"
                " in the host config"
            )
        jump = settings.jump
        return SSHTransport(
            SSHTarget(
                host=spec.name,
                address=spec.address,
                port=spec.port or fleet.port or 22,
                user=spec.user or fleet.user or "root",
            ),
            SSHSettings(
                key_file=settings.key_file,
                known_hosts=settings.known_hosts,
                trust_on_first_use=settings.trust_on_first_use,
                connect_timeout=settings.connect_timeout,
                jump=SSHTarget(f"jump {jump.address}", jump.address, jump.port, jump.user)
                if jump
                else None,
            ),
        )

    # --- what each host had -----------------------------------------------------------

    def _host_file(self, unit: str, host: str) -> Path:
        return self.layout.unit_dir(unit) / "hosts" / f"{host}.json"

    def _previous(self, unit: str, host: str) -> list[tuple[str, str]]:
        try:
            data = json.loads(self._host_file(unit, host).read_text())
        except (OSError, ValueError):
            return []
        return [(r["kind"], r["name"]) for r in data.get("resources", [])]

    def _remember(
        self, unit: Unit, plan: PlannedHost, report: HostReport, revision: str, *, applied: bool
    ) -> None:
        """Keep each host's last result (for status) and, after a clean apply, what it has."""
        path = self._host_file(unit.name, plan.spec.name)
        ensure_private_dir(path.parent)
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = {}
        resources = previous.get("resources", [])
        if applied and report.ok:
            resources = [
                {"kind": r.kind, "name": r.name}
                for r in plan.resources
                if r.attrs.get("state") != "absent"
            ]
        record = {
            "host": plan.spec.name,
            "address": plan.spec.address,
            "revision": revision if applied and report.ok else previous.get("revision"),
            "at": time.time(),
            "status": "ok" if report.ok else "failed",
            "changed": report.changed,
            "pending": report.pending,
            "failed": report.failed,
            "round_trips": report.round_trips,
            "error": self.redactor.redact(_host_error(report)) or None,
            "resources": resources,
        }
        atomic_write(path, json.dumps(record, indent=1))


def host_states(layout: StateLayout, unit: str) -> list[dict[str, Any]]:
    """The last recorded result of every host of fleet `unit` (for `agent status`)."""
    states = []
    for path in sorted((layout.unit_dir(unit) / "hosts").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        data.pop("resources", None)
        states.append(data)
    return states


def _fleet(unit: Unit) -> Fleet:
    assert unit.fleet is not None
    return unit.fleet


def hosts_from_output(unit: str, ref: HostsFromStack, value: Any) -> tuple[HostSpec, ...]:
    """Hosts from a stack output: a list of {name, address, port?, user?, vars?, roles?},
    or a map of name -> address."""
    where = f"unit {unit}: output {ref.output!r} of stack unit {ref.unit!r}"
    items: list[dict[str, Any]]
    if isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values()):
        items = [{"name": k, "address": v} for k, v in value.items()]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = [dict(v) if isinstance(v, Mapping) else {} for v in value]
    else:
        raise FleetError(
            f"{where}: expected a list of hosts ({{name, address}}) or a map of name to address"
        )
    hosts = []
    for index, item in enumerate(items):
        name, address = item.get("name"), item.get("address")
        if not isinstance(name, str) or not isinstance(address, str) or not name or not address:
            raise FleetError(f"{where}: item {index} has no name and address strings")
        port = item.get("port")
        hosts.append(
            HostSpec(
                name=name,
                address=address,
                port=int(port)
                if isinstance(port, int | float | str) and str(port).isdigit()
                else None,
                user=item.get("user") if isinstance(item.get("user"), str) else None,
                roles=tuple(r for r in item.get("roles", ()) if isinstance(r, str)),
                vars=dict(item.get("vars") or {}),
            )
        )
    return tuple(hosts)


def _last_wins(specs: Sequence[ResourceSpec]) -> list[ResourceSpec]:
    """One resource per id: a later definition (the host's roles, the fleet's own list)
    replaces an earlier one in place."""
    chosen: dict[str, ResourceSpec] = {}
    for spec in specs:
        chosen.pop(spec.id, None)
        chosen[spec.id] = spec
    return list(chosen.values())


def _host_error(report: HostReport) -> str:
    errors = [report.error] if report.error else []
    # An outcome's error starts with its resource id already (`package:x: E: ...`).
    errors += [o.error for o in report.outcomes if o.error]
    errors += list(report.handler_errors)
    return "; ".join(e for e in errors if e)


def _host_line(report: HostReport) -> str:
    if report.error:
        return f"{report.host}: failed: {report.error}"
    parts = []
    if report.changed:
        parts.append(f"{report.changed} changed")
    if report.pending:
        parts.append(f"{report.pending} would change")
    if report.failed or report.handler_errors:
        parts.append(f"{report.failed + len(report.handler_errors)} failed")
    summary = ", ".join(parts) or "in its desired state"
    return f"{report.host}: {summary} ({report.round_trips} round trips, {report.duration_s:.2f} s)"


def _render_reports(reports: Sequence[HostReport]) -> str:
    """The per-host diff of a run, as `agent logs FLEET` shows it."""
    lines: list[str] = []
    for report in reports:
        lines.append(f"== {_host_line(report)}")
        for outcome in report.outcomes:
            if outcome.status == "ok":
                continue
            lines.append(f"  {outcome.resource_id}: {outcome.status}")
            lines.extend(f"    {change}" for change in outcome.changes)
            if outcome.error:
                lines.append(f"    error: {outcome.error}")
            if outcome.diff:
                lines.extend(f"    {line}" for line in outcome.diff.rstrip("\n").split("\n"))
        if report.handlers_run:
            lines.append(f"  handlers run: {', '.join(report.handlers_run)}")
        lines.extend(f"  handler failed: {error}" for error in report.handler_errors)
    return "\n".join(lines) + "\n"


def _outcome(
    reports: Sequence[HostReport], *, apply: bool, dry_run: bool, revision_moved: bool
) -> UnitOutcome:
    changed = sum(r.changed for r in reports)
    pending = sum(r.pending for r in reports)
    failed = [r for r in reports if not r.ok]
    found = changed + pending
    if dry_run:
        decision = Decision.PLAN_ONLY
    elif not found:
        decision = Decision.NOTHING
    elif apply:
        decision = Decision.APPLY
    else:
        decision = Decision.REPORT
    drift = bool(found) and not revision_moved
    if failed:
        names = ", ".join(r.host for r in failed)
        detail = "; ".join(f"{r.host}: {_host_error(r)}" for r in failed)
        return UnitOutcome(
            status=UnitStatus.FAILED,
            decision=decision,
            drift=drift,
            plan_change=found,
            error=f"{len(failed)} of {len(reports)} hosts failed ({names}): {detail}",
        )
    return UnitOutcome(
        status=UnitStatus.OK,
        decision=decision,
        drift=drift,
        plan_change=found,
        converged=apply or not found,
    )


def _describe(outcome: UnitOutcome) -> str:
    if outcome.status is UnitStatus.FAILED:
        return f"failed: {outcome.error}"
    if outcome.decision == Decision.NOTHING:
        return "hosts in their desired state"
    count = outcome.plan_change or 0
    verb = {
        Decision.APPLY: "changed",
        Decision.REPORT: "drifted (reported)",
        Decision.PLAN_ONLY: "would change",
    }.get(Decision(outcome.decision) if outcome.decision else Decision.SKIP, str(outcome.decision))
    return f"{count} resources {verb}" if outcome.decision != Decision.SKIP else "skipped"
