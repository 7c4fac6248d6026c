"""The resource kinds, and the pure functions the engine calls for each resource.

For every kind: `query(resource)` says what the host must report (the facts round
trip), `diff(resource, facts)` compares that report with the desired state, and
`operation(resource, facts, changes)` says how the host applies the changes. None of
them touches a host; tests/cases/hosts/<kind>/*.json drive them as a table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from providers.errors import ResourceConflictError
from providers.hosts import accounts, commands, files, packages, services
from providers.hosts.model import Change, Resource

Facts = Mapping[str, Any]
Op = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    """The three pure functions of one resource kind."""

    query: Callable[[Resource], dict[str, Any]]
    diff: Callable[[Resource, Facts], list[Change]]
    operation: Callable[[Resource, Facts, list[Change]], Op]


_FILE = Kind(files.file_query, files.file_diff, files.file_operation)
KINDS: Mapping[str, Kind] = {
    "file": _FILE,
    "template": _FILE,  # the agent renders it; on the host it is a file
    "directory": Kind(files.directory_query, files.directory_diff, files.directory_operation),
    "link": Kind(files.link_query, files.link_diff, files.link_operation),
    "package": Kind(packages.query, packages.diff, packages.operation),
    "service": Kind(services.query, services.diff, services.operation),
    "user": Kind(accounts.user_query, accounts.user_diff, accounts.user_operation),
    "group": Kind(accounts.group_query, accounts.group_diff, accounts.group_operation),
    "command": Kind(commands.query, commands.diff, commands.operation),
}


def kind_of(resource: Resource) -> Kind:
    """The kind's functions; an unknown kind is a conflict (the manifest layer should stop it)."""
    try:
        return KINDS[resource.kind]
    except KeyError:
        raise ResourceConflictError(f"unknown resource kind {resource.kind!r}") from None


def query(resource: Resource) -> dict[str, Any]:
    """What the facts round trip must report about `resource`."""
    return kind_of(resource).query(resource)


def diff(resource: Resource, facts: Facts) -> list[Change]:
    """The changes that bring `resource` from `facts` to its desired state ([] if none).

    Raises ResourceConflictError when only a person can resolve the difference.
    """
    return kind_of(resource).diff(resource, facts)


def recheck(resource: Resource, facts: Facts, earlier: Sequence[Resource]) -> Op | None:
    """For a resource the facts found in its desired state: the operation that asks the host
    again at its turn, when `earlier` (resources changing before it in this apply) may have
    moved it; None when the facts stand.

    A command's guards may now say "run" (`onlyif: test -f F` after file F); a service may
    have been enabled or started by the postinst of a package installed before it.
    """
    if resource.kind == "command" and earlier:
        return kind_of(resource).operation(resource, facts, [])
    if resource.kind == "service" and any(r.kind == "package" for r in earlier):
        return services.recheck_operation(resource)
    return None


def operation(resource: Resource, facts: Facts, changes: list[Change]) -> Op:
    """How the host applies `changes` (steps, or one package-manager item)."""
    return kind_of(resource).operation(resource, facts, changes)
