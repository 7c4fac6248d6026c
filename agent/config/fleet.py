"""Fleet units of the manifest: hosts, the resources each must have, roles and handlers.

    units:
      - name: web
        fleet:
          hosts: {static: [{name: web1, address: 10.0.0.5}]}   # or {from_stack: {unit, output}}
          user: deploy
          become: true
          roles: [nginx]
    roles:
      nginx:
        - package: nginx
        - template: /etc/nginx/nginx.conf
          source: templates/nginx.conf.j2
          notify: [reload nginx]
    handlers:
      reload nginx: {service: nginx, action: reload}

Resource items are read by `fleetresources.ResourceReader` into `ResourceSpec`s.
Everything here is checked against the file, line and key.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent.config.ec2hosts import read_ec2_hosts
from agent.config.fleetresources import (
    PATH_KINDS,
    ResourceReader,
    ResourceSpec,
    SourceCheck,
    names,
    read_vars,
)
from agent.config.yamlnodes import INVALID, Fields, Value
from providers.hosts.ec2 import Ec2Filter

HOST_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
FLEET_KEYS = ("hosts", "user", "port", "become", "roles", "resources", "vars", "parallelism")
HOST_KEYS = ("name", "address", "port", "user", "roles", "vars")


@dataclass(frozen=True, slots=True)
class HostSpec:
    """A host of a static list (or of a stack output, read at reconcile time)."""

    name: str
    address: str
    port: int | None = None
    user: str | None = None
    roles: tuple[str, ...] = ()
    vars: Mapping[str, Any] = field(hash=False, default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class HostsFromStack:
    """Hosts listed by an output of a stack unit (the fleet depends on that unit)."""

    unit: str
    output: str


@dataclass(frozen=True, slots=True)
class HostsFromEc2:
    """Hosts are the running EC2 instances a filter selects (read at reconcile time)."""

    filter: Ec2Filter


# Hosts known only at reconcile time.
DynamicHosts = HostsFromStack | HostsFromEc2


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    name: str
    service: str
    action: str  # restart | reload


@dataclass(frozen=True, slots=True)
class Fleet:
    """A fleet unit's hosts and what each must have."""

    hosts: tuple[HostSpec, ...] | HostsFromStack | HostsFromEc2
    user: str | None
    port: int | None
    become: bool
    roles: tuple[str, ...]
    resources: tuple[ResourceSpec, ...]
    vars: Mapping[str, Any] = field(hash=False)
    parallelism: int | None = None


class FleetReader:
    """Reads `fleet:` sections, `roles:` and `handlers:` (problems go to the Values)."""

    def __init__(self, check_source: SourceCheck, filename: str) -> None:
        self.check_source = check_source
        self.filename = filename
        self.resources = ResourceReader(check_source, filename)

    # --- top level -------------------------------------------------------------------

    def roles(self, value: Value) -> dict[str, tuple[ResourceSpec, ...]]:
        fields = value.mapping()
        if fields is None:
            return {}
        roles = {}
        for name, item in fields:
            items = item.sequence()
            roles[name] = tuple(r for r in (self.resources.read(i) for i in items or ()) if r)
        return roles

    def handlers(self, value: Value) -> dict[str, HandlerSpec]:
        fields = value.mapping()
        if fields is None:
            return {}
        handlers = {}
        for name, item in fields:
            spec = item.mapping(["service", "action"])
            if spec is None:
                continue
            service = spec.require("service", "a systemd service name")
            action = spec.require("action", "restart or reload")
            service_name = service.string("a systemd service name") if service else None
            action_name = action.string("restart or reload") if action else None
            if action and action_name not in (None, "restart", "reload"):
                action.fail("restart or reload")
                continue
            if service_name and action_name:
                handlers[name] = HandlerSpec(name, service_name, action_name)
        return handlers

    # --- a fleet -----------------------------------------------------------------------

    def fleet(self, value: Value) -> tuple[Fleet | None, HostsFromStack | None, Value | None]:
        """The fleet, and its `from_stack` reference (with where it is) if it has one."""
        fields = value.mapping(FLEET_KEYS)
        if fields is None:
            return None, None, None
        hosts_value = fields.require("hosts", "a mapping with static, from_stack or ec2")
        hosts: tuple[HostSpec, ...] | HostsFromStack | HostsFromEc2 | None = None
        ref_where: Value | None = None
        sources = ["static", "from_stack", "ec2"]
        if hosts_value and (host_fields := hosts_value.mapping(sources)):
            given = [key for key in sources if host_fields.get(key) is not None]
            static, from_stack = host_fields.get("static"), host_fields.get("from_stack")
            ec2 = host_fields.get("ec2")
            if len(given) != 1:
                got = " and ".join(given) if given else "none"
                hosts_value.fail("exactly one of static, from_stack or ec2", got)
            elif static is not None:
                hosts = self._static_hosts(static)
            elif from_stack is not None:
                hosts, ref_where = self._from_stack(from_stack)
            elif ec2 is not None and (ec2_filter := read_ec2_hosts(ec2)) is not None:
                hosts = HostsFromEc2(ec2_filter)
        user = self._optional(fields, "user", lambda v: v.string("a login user name"))
        port = self._optional(fields, "port", _port)
        become = self._optional(fields, "become", lambda v: v.boolean())
        parallelism = self._optional(fields, "parallelism", lambda v: v.integer(minimum=1))
        roles = names(fields.get("roles"), "a role name")
        items = fields.get("resources")
        resources = (
            tuple(r for r in (self.resources.read(i) for i in (items.sequence() or ())) if r)
            if items
            else ()
        )
        fleet_vars = read_vars(fields.get("vars"))
        if hosts is None or fleet_vars is INVALID:
            return None, None, None
        fleet = Fleet(
            hosts=hosts,
            user=user,
            port=port,
            become=bool(become),
            roles=roles,
            resources=resources,
            vars=fleet_vars,  # type: ignore[arg-type]
            parallelism=parallelism,
        )
        return fleet, hosts if isinstance(hosts, HostsFromStack) else None, ref_where

    def check_names(
        self,
        fleet_value: Value,
        fleet: Fleet,
        roles: Mapping[str, tuple[ResourceSpec, ...]],
        handlers: Mapping[str, HandlerSpec],
    ) -> None:
        """Roles a fleet or host names must exist; notified handlers must exist."""
        wanted = list(fleet.roles)
        if isinstance(fleet.hosts, tuple):
            wanted += [role for host in fleet.hosts for role in host.roles]
        for role in dict.fromkeys(wanted):
            if role not in roles:
                fleet_value.fail(
                    f"roles defined under roles: ({', '.join(roles) or 'none'})", repr(role)
                )
        self._check_paths(fleet_value, fleet, roles)
        for spec in [*fleet.resources, *(r for name in wanted for r in roles.get(name, ()))]:
            for handler in spec.notify:
                if handler not in handlers:
                    fleet_value.problems.note(
                        _line_of(spec.where),
                        spec.where.partition(": ")[2],
                        f"notifies {handler!r}, which is not under handlers:"
                        f" ({', '.join(handlers) or 'none'})",
                    )

    @staticmethod
    def _check_paths(
        fleet_value: Value, fleet: Fleet, roles: Mapping[str, tuple[ResourceSpec, ...]]
    ) -> None:
        """One path, one kind, on every host: a `file` in one role and a `link` (or a
        `template`, a `directory`) at the same path in another would replace each other on
        every pass. Each host's list is checked (the fleet's roles, its own, the fleet's
        resources); hosts read from a stack output get their roles at reconcile time."""
        per_host: list[tuple[str, ...]] = [()]
        if isinstance(fleet.hosts, tuple):
            per_host += [host.roles for host in fleet.hosts]
        for extra in dict.fromkeys(per_host):
            names = dict.fromkeys((*fleet.roles, *extra))
            specs = [*(r for name in names for r in roles.get(name, ())), *fleet.resources]
            first: dict[str, ResourceSpec] = {}
            for spec in specs:
                if spec.kind not in PATH_KINDS:
                    continue
                seen = first.setdefault(posixpath.normpath(spec.name), spec)
                if seen.kind != spec.kind:
                    fleet_value.problems.note(
                        _line_of(spec.where),
                        spec.where.partition(": ")[2],
                        f"{spec.kind} {spec.name} is also a {seen.kind} at {seen.where};"
                        " a path can have one kind only (the two would replace each other"
                        " on every pass)",
                    )

    def _static_hosts(self, value: Value) -> tuple[HostSpec, ...] | None:
        items = value.sequence(non_empty=True)
        if items is None:
            return None
        hosts: list[HostSpec] = []
        seen: dict[str, int] = {}
        for item in items:
            fields = item.mapping(HOST_KEYS)
            if fields is None:
                continue
            name_value = fields.require("name", "a host name")
            name = name_value.string("a host name") if name_value else None
            if name_value and name and not HOST_NAME_RE.fullmatch(name):
                name_value.fail("a host name of letters, digits, ., _ and - (up to 63)")
                continue
            if name_value and name in seen:
                name_value.fail("a unique host name", f"{name!r} again (line {seen[name]})")
                continue
            address_value = fields.require("address", "an address or DNS name")
            address = address_value.string("an address or DNS name") if address_value else None
            host_vars = read_vars(fields.get("vars"))
            if not name or not address or host_vars is INVALID:
                continue
            seen[name] = item.line
            hosts.append(
                HostSpec(
                    name=name,
                    address=address,
                    port=self._optional(fields, "port", _port),
                    user=self._optional(fields, "user", lambda v: v.string("a login user name")),
                    roles=names(fields.get("roles"), "a role name"),
                    vars=host_vars,  # type: ignore[arg-type]
                )
            )
        return tuple(hosts)

    def _from_stack(self, value: Value) -> tuple[HostsFromStack | None, Value | None]:
        fields = value.mapping(["unit", "output"])
        if fields is None:
            return None, None
        unit_value = fields.require("unit", "the name of a stack unit in this file")
        output_value = fields.require("output", "the name of an output of that stack")
        unit = unit_value.string("a unit name") if unit_value else None
        output = output_value.string("an output name") if output_value else None
        if unit is None or output is None:
            return None, None
        return HostsFromStack(unit, output), unit_value

    # --- small readers -----------------------------------------------------------------

    @staticmethod
    def _optional(fields: Fields, key: str, read: Callable[[Value], Any]) -> Any:
        found = fields.get(key)
        return read(found) if found else None


def _port(value: Value) -> int | None:
    port = value.integer(minimum=1)
    if port is not None and port > 65535:
        return value.fail("a port number (1-65535)")
    return port


def _line_of(where: str) -> int:
    return int(where.split(":")[1])
