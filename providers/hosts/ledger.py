"""The per-host record of what the agent manages there, and the removals it implies.

One record per host, shared by every fleet unit that converges it. An object is keyed by
what it is on the host, not by how the manifest names it: a path (whatever its kind:
file, template, directory or link), a user, a group, a package. Each entry says which
unit owns it, whether the agent created it or adopted one that was already there, what
to do when the repo drops it (`on_drop`), and the error of a removal that has not
finished. The record also keeps each unit's handlers that failed and are still due.

    {"objects": {"path:/etc/app.conf": {"kind": "template", "name": "/etc/app.conf",
                 "unit": "web", "created": true, "on_drop": null, "error": null}},
     "handlers": {"web": ["restart app"]}}

Rules (docs/resources.md, "What the agent removes"):
- nothing is removed while any current resource (any kind, any unit on the host) owns it;
- an object the repo stops listing is removed only if the agent created it (or its last
  definition said `on_drop: remove`); an adopted one is let go, left as it is;
- progress is recorded per resource: a removal that fails stays in the record with its
  error and is tried again, and never holds back what the rest of the apply recorded;
- removals run in reverse dependency order: deeper paths first, then users, then
  groups, then packages.

Pure functions over plain JSON values: the agent stores the record (agent/units/fleets.py).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from providers.hosts.model import Resource, ResourceOutcome

Record = dict[str, Any]
PATH_KINDS = frozenset({"file", "template", "directory", "link"})
NAMED_KINDS = frozenset({"user", "group", "package"})
ON_DROP = ("remove", "keep")
# Removals of these kinds run in this order, after paths (deepest first): a user before
# its primary group, packages last (a package's files may hold what earlier kinds use).
_ORDER = {"user": 1, "group": 2, "package": 3}


def object_key(kind: str, name: str) -> str | None:
    """The object a resource manages on the host, or None for kinds that own nothing
    removable (services, commands)."""
    if kind in PATH_KINDS:
        return f"path:{posixpath.normpath(name)}"
    if kind in NAMED_KINDS:
        return f"{kind}:{name}"
    return None


def new_record() -> Record:
    """An empty record."""
    return {"objects": {}, "handlers": {}}


def keys_of(resources: Iterable[Resource]) -> set[str]:
    """The objects `resources` own."""
    return {key for r in resources if (key := object_key(r.kind, r.name)) is not None}


def _drops_it(entry: Mapping[str, Any]) -> bool:
    on_drop = entry.get("on_drop")
    if on_drop in ON_DROP:
        return on_drop == "remove"
    return bool(entry.get("created"))


def removal_order(resources: Sequence[Resource]) -> list[Resource]:
    """Removals in reverse dependency order: a directory's files before it, then users,
    groups and packages (stable otherwise)."""

    def rank(resource: Resource) -> tuple[int, int]:
        if resource.kind in PATH_KINDS:
            depth = posixpath.normpath(resource.name).count("/")
            return (0, -depth)
        return (_ORDER.get(resource.kind, 4), 0)

    return sorted(resources, key=rank)


def implied_removals(
    record: Mapping[str, Any],
    unit: str,
    desired: Sequence[Resource],
    owned_elsewhere: set[str],
) -> tuple[list[Resource], list[str]]:
    """What `unit` must remove from the host because the repo no longer lists it, and the
    keys it lets go without touching (adopted objects).

    `desired` are the unit's current resources on the host; `owned_elsewhere` the keys that
    other units' current resources own there (those are never removed, nor let go: the
    other unit takes the entry over when it converges).
    """
    current = keys_of(desired)
    removals: list[Resource] = []
    released: list[str] = []
    for key, entry in record.get("objects", {}).items():
        if entry.get("unit") != unit or key in current or key in owned_elsewhere:
            continue
        if not _drops_it(entry):
            released.append(key)
            continue
        kind = "file" if entry["kind"] == "template" else str(entry["kind"])
        removals.append(Resource(kind=kind, name=str(entry["name"]), attrs={"state": "absent"}))
    return removal_order(removals), released


def updated(
    record: Mapping[str, Any],
    unit: str,
    desired: Sequence[Resource],
    removals: Sequence[Resource],
    released: Sequence[str],
    outcomes: Mapping[str, ResourceOutcome],
    *,
    applied: bool,
    handlers_run: Sequence[str] = (),
    handlers_failed: Sequence[str] = (),
    due: Sequence[str] | None = None,
) -> Record:
    """The record after `unit` converged the host (`outcomes` by resource id).

    Each resource is recorded on its own outcome, so a partly failed apply still records
    everything that did happen. Without `applied` (a dry run, drift reported) nothing on
    the host changed: only let-go entries leave the record. `due`: the unit's handlers
    that were owed before this apply (default: the record's; a handler the manifest no
    longer defines is no longer owed).
    """
    objects: dict[str, dict[str, Any]] = {
        key: dict(entry) for key, entry in record.get("objects", {}).items()
    }
    handlers = {name: list(due) for name, due in record.get("handlers", {}).items()}
    for key in released:
        if objects.get(key, {}).get("unit") == unit:
            del objects[key]
    if applied:
        for resource in desired:
            _record_desired(objects, unit, resource, outcomes.get(resource.id))
        for resource in removals:
            _record_removal(objects, resource, outcomes.get(resource.id))
        owed = set(handlers.get(unit, ()) if due is None else due)
        owed = (owed - set(handlers_run)) | set(handlers_failed)
        if owed:
            handlers[unit] = sorted(owed)
        else:
            handlers.pop(unit, None)
    return {"objects": objects, "handlers": handlers}


def _record_desired(
    objects: dict[str, dict[str, Any]],
    unit: str,
    resource: Resource,
    outcome: ResourceOutcome | None,
) -> None:
    key = object_key(resource.kind, resource.name)
    if key is None or outcome is None:
        return
    entry = objects.get(key)
    if resource.attrs.get("state") == "absent":
        if outcome.status in ("ok", "changed") and entry is not None:
            del objects[key]  # removed as the repo asked: nothing left to manage
        elif outcome.status == "failed" and entry is not None:
            entry["error"] = outcome.error
        return
    on_drop = resource.attrs.get("on_drop")
    if entry is not None:
        # Taken over (from another unit, or another kind at the same path): whether the
        # agent created the object stays as it was first recorded.
        entry.update(kind=resource.kind, name=resource.name, unit=unit, on_drop=on_drop)
        entry["error"] = None
        return
    if outcome.existed is None:
        return  # its facts could not be read: nothing known, nothing recorded
    objects[key] = {
        "kind": resource.kind,
        "name": resource.name,
        "unit": unit,
        "created": not outcome.existed,
        "on_drop": on_drop,
        "error": None,
    }


def _record_removal(
    objects: dict[str, dict[str, Any]], resource: Resource, outcome: ResourceOutcome | None
) -> None:
    key = object_key(resource.kind, resource.name)
    if key is None or outcome is None or key not in objects:
        return
    if outcome.status in ("ok", "changed"):
        del objects[key]
    elif outcome.status == "failed":
        objects[key]["error"] = outcome.error  # reported, and tried again next pass


def unfinished(record: Mapping[str, Any], unit: str) -> list[str]:
    """The errors of `unit`'s removals that have not finished, for status."""
    return [
        str(entry["error"])
        for entry in record.get("objects", {}).values()
        if entry.get("unit") == unit and entry.get("error")
    ]
