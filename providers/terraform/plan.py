"""Reading a saved plan: the JSON of `terraform show -json PLANFILE`, summarized.

Format: https://developer.hashicorp.com/terraform/internals/json-format. Actions per
resource are one of ["no-op"], ["create"], ["read"], ["update"], ["delete"],
["delete", "create"] / ["create", "delete"] (replace), ["forget"].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_IGNORED = frozenset({("no-op",), ("read",)})


@dataclass(frozen=True)
class ResourceChange:
    address: str
    actions: tuple[str, ...]

    @property
    def is_replace(self) -> bool:
        return "create" in self.actions and "delete" in self.actions


@dataclass(frozen=True)
class PlanSummary:
    add: int
    change: int
    destroy: int
    replace: int
    forget: int
    changes: tuple[ResourceChange, ...]  # what apply would do; no-op and read left out
    replaced: tuple[str, ...]  # addresses of replaced resources (counted in add AND destroy)
    drift: tuple[ResourceChange, ...]  # `resource_drift`: changed outside Terraform
    output_changes: bool

    @property
    def has_changes(self) -> bool:
        return bool(self.changes) or self.output_changes

    @property
    def destroys_anything(self) -> bool:
        return any("delete" in c.actions for c in self.changes)

    def __str__(self) -> str:
        text = f"{self.add} to add, {self.change} to change, {self.destroy} to destroy"
        if self.forget:
            text += f", {self.forget} to forget"
        return text


def summarize_plan(plan_json: Mapping[str, Any]) -> PlanSummary:
    changes = tuple(_changes(plan_json.get("resource_changes")))
    add = change = destroy = forget = 0
    replaced: list[str] = []
    for rc in changes:
        if rc.is_replace:
            replaced.append(rc.address)
            add += 1
            destroy += 1
        elif "create" in rc.actions:
            add += 1
        elif "delete" in rc.actions:
            destroy += 1
        elif "update" in rc.actions:
            change += 1
        elif "forget" in rc.actions:
            forget += 1
    outputs = plan_json.get("output_changes") or {}
    return PlanSummary(
        add=add,
        change=change,
        destroy=destroy,
        replace=len(replaced),
        forget=forget,
        changes=changes,
        replaced=tuple(replaced),
        drift=tuple(_changes(plan_json.get("resource_drift"))),
        output_changes=any(
            tuple(oc.get("actions") or ()) not in _IGNORED for oc in outputs.values()
        ),
    )


def _changes(entries: Iterable[Mapping[str, Any]] | None) -> Iterable[ResourceChange]:
    for entry in entries or ():
        actions = tuple((entry.get("change") or {}).get("actions") or ())
        if not actions or actions in _IGNORED:
            continue
        address = str(entry.get("address", "?"))
        if entry.get("deposed"):
            address += f" (deposed {entry['deposed']})"
        yield ResourceChange(address=address, actions=actions)
