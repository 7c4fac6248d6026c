"""What each host of a fleet must have: the fleet's hosts (listed, from a stack output or
from EC2), and per host the manifest's resources (the fleet's roles, the host's own roles,
the fleet's inline resources) as the engine's `Resource`s, templates rendered with the
fleet, unit and host variables and the unit's secrets, sources read from the checkout, and
the removals implied by what the host's record says this unit put there before."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agent.config import StackOutputRef, Unit
from agent.config.fleet import (
    HOST_NAME_RE,
    Fleet,
    HostsFromEc2,
    HostsFromStack,
    HostSpec,
)
from agent.config.fleetresources import ResourceSpec
from agent.config.manifest import plain_value
from agent.core.redact import Redactor
from agent.units.context import StackContext
from agent.units.ec2fleet import Ec2Hosts
from agent.units.fleetledger import FleetLedger
from agent.units.fleettypes import CommandLineSecretError, FleetError, PlannedHost
from providers.errors import ProviderError, RepoFileError
from providers.hosts import ledger
from providers.hosts.model import Handler, Resource
from providers.hosts.templates import render_string, render_template
from providers.repofiles import MAX_SOURCE_BYTES, read_repo_file

# A command's string fields rendered with the host's variables (its `env` values too).
COMMAND_TEMPLATES = ("command", "creates", "unless", "onlyif", "cwd")

StackOutputs = Callable[[StackContext, Unit, str], Mapping[str, Any]]


class HostPlanner:
    """Lists a fleet's hosts and builds each host's plan (no host is contacted)."""

    def __init__(
        self,
        records: FleetLedger,
        redactor: Redactor,
        stack_outputs: StackOutputs,
        ec2: Ec2Hosts,
    ) -> None:
        self.ledger = records
        self.redactor = redactor
        self.stack_outputs = stack_outputs
        self.ec2 = ec2

    def hosts(self, ctx: StackContext, unit: Unit, fleet: Fleet) -> tuple[HostSpec, ...]:
        if isinstance(fleet.hosts, HostsFromEc2):
            return self.ec2.hosts(unit.name, fleet.hosts, ctx.run_id)
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

    def unit_vars(self, ctx: StackContext, unit: Unit) -> dict[str, Any]:
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

    def plan_host(
        self,
        ctx: StackContext,
        unit: Unit,
        fleet: Fleet,
        spec: HostSpec,
        unit_vars: Mapping[str, Any],
    ) -> PlannedHost:
        """The engine's resources for one host (templates rendered), or why not."""
        variables = self._variables(ctx, unit, fleet, spec, unit_vars)
        resources: list[Resource] = []
        try:
            for item in host_resources(ctx.manifest.roles, fleet, spec):
                resources.append(self._resource(ctx, item, variables))
        except (ProviderError, CommandLineSecretError, OSError) as exc:
            return PlannedHost(spec, (), {}, error=str(exc))  # the report names the host
        record = self.ledger.record(unit.name, spec.name)
        elsewhere = self._owned_elsewhere(ctx, unit.name, spec, record)
        removals, released = ledger.implied_removals(record, unit.name, resources, elsewhere)
        handlers = {
            h.name: Handler(h.name, h.service, h.action) for h in ctx.manifest.handlers.values()
        }
        return PlannedHost(
            spec,
            (*resources, *removals),
            handlers,
            desired=tuple(resources),
            removals=tuple(removals),
            released=tuple(released),
            # Owed from an earlier pass; one the manifest no longer defines is dropped.
            pending_handlers=tuple(
                name for name in record.get("handlers", {}).get(unit.name, ()) if name in handlers
            ),
        )

    def _owned_elsewhere(
        self, ctx: StackContext, unit: str, spec: HostSpec, record: Mapping[str, Any]
    ) -> set[str]:
        """What the current resources of the other fleet units on this host own.

        Static hosts are matched by name or address; a fleet whose hosts come from a
        stack counts when the record shows it on this host (its host roles are not known
        without its stack's outputs, so its fleet-wide roles and resources count)."""
        recorded = {e.get("unit") for e in record.get("objects", {}).values()}
        keys: set[str] = set()
        for other in ctx.manifest.units:
            if other.name == unit or other.fleet is None:
                continue
            fleet = other.fleet
            roles: tuple[str, ...] = ()
            if not isinstance(fleet.hosts, tuple):  # known at reconcile time only
                seen = self.ledger.has_result(other.name, spec.name)
                if other.name not in recorded and not seen:
                    continue
            else:
                match = [h for h in fleet.hosts if h.name == spec.name or h.address == spec.address]
                if not match:
                    continue
                roles = tuple(r for h in match for r in h.roles)
            names = (*fleet.roles, *roles)
            items = [r for name in names for r in ctx.manifest.roles.get(name, ())]
            items += fleet.resources
            keys |= {k for r in items if (k := ledger.object_key(r.kind, r.name)) is not None}
        return keys

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
        return host_variables(fleet, spec, unit_vars, secrets)

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
            for key in COMMAND_TEMPLATES:
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
        if not HOST_NAME_RE.fullmatch(name):
            # The name names the host's record files: never a path.
            raise FleetError(f"{where}: item {index}: {name!r} is not a host name")
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


def host_resources(
    roles: Mapping[str, Sequence[ResourceSpec]], fleet: Fleet, spec: HostSpec
) -> list[ResourceSpec]:
    """What a host must have, as the manifest writes it: the fleet's roles, the host's own
    roles, then the fleet's inline resources (a later definition of a resource wins)."""
    specs = [r for name in (*fleet.roles, *spec.roles) for r in roles.get(name, ())]
    return _last_wins([*specs, *fleet.resources])


def host_variables(
    fleet: Fleet, spec: HostSpec, unit_vars: Mapping[str, Any], secrets: Mapping[str, Any]
) -> dict[str, Any]:
    """The variables a host's templates (and command lines) are rendered with."""
    user = spec.user or fleet.user or "root"
    return {
        **plain_value(fleet.vars),
        **plain_value(unit_vars),
        **plain_value(spec.vars),
        "host": {"name": spec.name, "address": spec.address, "user": user},
        "secrets": dict(secrets),
    }


def _last_wins(specs: Sequence[ResourceSpec]) -> list[ResourceSpec]:
    """One resource per id: a later definition (the host's roles, the fleet's own list)
    replaces an earlier one and keeps its first place (a user defined early stays before
    the files it owns)."""
    chosen: dict[str, ResourceSpec] = {}
    for spec in specs:
        chosen[spec.id] = spec  # a dict keeps the first insertion's position
    return list(chosen.values())
