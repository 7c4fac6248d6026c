"""Terraform's own sensitivity marks applied to a plan's JSON before anyone keeps it.

`terraform show -json PLAN` prints every value in clear, sensitive ones included, beside
marks saying which are sensitive (`before_sensitive`/`after_sensitive` of a change,
`sensitive_values` of a resource, `sensitive` of an output or a variable's declaration).
The agent's redactor masks the strings it was given, but not a number or a boolean read
from a sensitive output (masking every "1" would mask everything): what Terraform marks is
masked here, so the plan JSON the agent stores says what Terraform's plan text says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SENSITIVE_VALUE = "(sensitive value)"  # as Terraform prints it


def mask_value(value: Any, sensitive: Any, mask: str = SENSITIVE_VALUE) -> Any:
    """`value` with every part that `sensitive` (Terraform's mark tree) marks replaced."""
    if sensitive is True:
        return mask
    if isinstance(value, Mapping):
        marks = sensitive if isinstance(sensitive, Mapping) else {}
        return {str(k): mask_value(v, marks.get(k), mask) for k, v in value.items()}
    if isinstance(value, list):
        marks = sensitive if isinstance(sensitive, list) else []
        return [
            mask_value(v, marks[i] if i < len(marks) else None, mask) for i, v in enumerate(value)
        ]
    return value


def mask_plan(plan: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `plan` (show -json) with the values Terraform marks sensitive masked."""
    out = dict(plan)
    declared = _get(plan, "configuration", "root_module", "variables")
    variables = plan.get("variables")
    if isinstance(variables, Mapping):
        out["variables"] = {
            name: _mask_variable(entry, _get(declared, name, "sensitive") is True)
            for name, entry in variables.items()
        }
    for key in ("resource_changes", "resource_drift"):
        if isinstance(plan.get(key), list):
            out[key] = [_mask_change_item(item) for item in plan[key]]
    if isinstance(plan.get("output_changes"), Mapping):
        out["output_changes"] = {
            name: _mask_change(change) for name, change in plan["output_changes"].items()
        }
    for key in ("planned_values", "prior_state"):
        if isinstance(plan.get(key), Mapping):
            out[key] = _mask_state(plan[key])
    return out


def _mask_variable(entry: Any, sensitive: bool) -> Any:
    if sensitive and isinstance(entry, Mapping) and "value" in entry:
        return {**entry, "value": SENSITIVE_VALUE}
    return entry


def _mask_change_item(item: Any) -> Any:
    if not isinstance(item, Mapping) or not isinstance(item.get("change"), Mapping):
        return item
    return {**item, "change": _mask_change(item["change"])}


def _mask_change(change: Any) -> Any:
    if not isinstance(change, Mapping):
        return change
    masked = dict(change)
    for side in ("before", "after"):
        if side in change:
            masked[side] = mask_value(change[side], change.get(f"{side}_sensitive"))
    return masked


def _mask_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """planned_values / prior_state: {values: {outputs, root_module}} or {outputs, root_module}."""
    out = dict(state)
    if isinstance(state.get("values"), Mapping):
        out["values"] = _mask_state(state["values"])
    if isinstance(state.get("outputs"), Mapping):
        out["outputs"] = {
            name: {**entry, "value": SENSITIVE_VALUE}
            if isinstance(entry, Mapping) and entry.get("sensitive") and "value" in entry
            else entry
            for name, entry in state["outputs"].items()
        }
    if isinstance(state.get("root_module"), Mapping):
        out["root_module"] = _mask_module(state["root_module"])
    return out


def _mask_module(module: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(module)
    if isinstance(module.get("resources"), list):
        out["resources"] = [
            {**r, "values": mask_value(r.get("values"), r.get("sensitive_values"))}
            if isinstance(r, Mapping) and "values" in r
            else r
            for r in module["resources"]
        ]
    if isinstance(module.get("child_modules"), list):
        out["child_modules"] = [
            _mask_module(m) if isinstance(m, Mapping) else m for m in module["child_modules"]
        ]
    return out


def _get(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value
