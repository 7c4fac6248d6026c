"""The policy inputs of one unit at one moment: the glue between the host config, the
manifest and the pure parts (apply, rules, windows, gate)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.config import HostConfig, Manifest, Unit
from agent.policy.apply import ApplyMode
from agent.policy.gate import Gate
from agent.policy.rules import evaluate, plan_input, render
from agent.policy.windows import FreezeDrift


@dataclass(frozen=True, slots=True)
class UnitPolicy:
    gate: Gate
    report: str  # the policy section of `agent logs` (policy.txt); "" when nothing to say
    notes: tuple[str, ...]  # lines for the unit's outcome that do not change the decision


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def window_reason(
    host: HostConfig, override: str | None, now: dt.datetime
) -> tuple[str | None, str | None]:
    """(why the change window holds plans, a note when an override lifted it)."""
    if host.windows is None:
        return None, None
    closed = host.windows.closed_reason(now)
    if closed and override:
        return None, f"{closed}: overridden {override}"
    return closed, None


def stack_policy(
    host: HostConfig,
    manifest: Manifest,
    unit: Unit,
    redacted_plan: Mapping[str, Any] | None,
    *,
    override: str | None,
    now: dt.datetime,
) -> UnitPolicy:
    """The gate for a stack's plan. `redacted_plan` is the plan JSON after the redactor
    (None for an empty plan: nothing to evaluate)."""
    rules = (*host.policy.rules, *manifest.rules)
    results = evaluate(rules, plan_input(redacted_plan, unit.name)) if redacted_plan else ()
    window, override_note = window_reason(host, override, now)
    if not redacted_plan:
        override_note = None  # nothing to apply: the override lifted nothing
    gate = Gate(
        apply=unit.apply,
        rules=results,
        window=window,
        window_drift=host.windows.drift if host.windows else FreezeDrift.HOLD,
    )
    notes = (*gate.warnings(), *([override_note] if override_note else []))
    report = render(results)
    if override_note:
        report += f"change window: {override_note}\n"
    return UnitPolicy(gate=gate, report=report, notes=notes)


def fleet_hold(
    host: HostConfig, *, is_drift: bool, override: str | None, now: dt.datetime
) -> tuple[str | None, str | None]:
    """(why a fleet's changes must wait, a note when a window override lifted the wait).

    A fleet has no saved plan to approve: what waits is simply not applied, and reported,
    until the window opens (or, under a host ceiling of `approve`, always)."""
    if host.policy.ceiling is ApplyMode.APPROVE:
        return (
            "the host config's policy.apply is approve and a fleet's changes cannot be held"
            " for `agent approve`: they are reported, not applied",
            None,
        )
    window, note = window_reason(host, override, now)
    if window and is_drift and host.windows and host.windows.drift is FreezeDrift.REVERT:
        return None, None
    return window, note
