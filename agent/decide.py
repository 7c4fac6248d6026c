"""What to do with a unit's plan: a pure function, tested as a table.

A change is *drift* when the revision did not move for this unit (it already
converged at this revision) but the plan is not empty. A moved revision is a
change someone pushed: it is applied, unless the host policy holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent.config import DestroyPolicy, DriftPolicy
from agent.policy.gate import Gate


class Decision(StrEnum):
    APPLY = "apply"
    HOLD = "hold"  # waits for `agent approve`
    REPORT = "report"  # recorded (and notified), left as it is
    NOTHING = "nothing"  # the plan is empty
    SKIP = "skip"  # drift check skipped (drift: ignore)
    PLAN_ONLY = "plan-only"  # a dry run: planned, never applied
    DENY = "deny"  # a policy rule denied the plan: the unit fails, nothing applied


@dataclass(frozen=True, slots=True)
class PlanFacts:
    """The facts about one unit's plan that the decision depends on."""

    revision_moved: bool
    has_changes: bool
    destroys_anything: bool


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    drift: bool
    reason: str


def needs_plan(revision_moved: bool, drift: DriftPolicy) -> bool:
    """Whether to plan at all: `drift: ignore` skips the check at an unchanged revision."""
    return revision_moved or drift is not DriftPolicy.IGNORE


def decide(
    facts: PlanFacts,
    *,
    drift: DriftPolicy,
    destroy: DestroyPolicy,
    dry_run: bool = False,
    gate: Gate | None = None,
) -> Verdict:
    """The decision for one unit's plan; `gate` adds the apply mode, policy rules and
    change windows (agent/policy) to a plan that would otherwise apply."""
    is_drift = facts.has_changes and not facts.revision_moved
    if not facts.has_changes:
        return Verdict(Decision.NOTHING, False, "no changes")
    if dry_run:
        return Verdict(Decision.PLAN_ONLY, is_drift, "dry run: nothing applied")
    if is_drift and drift is DriftPolicy.REPORT:
        return Verdict(Decision.REPORT, True, "drift found; the unit's policy is to report it")
    if is_drift and drift is DriftPolicy.IGNORE:
        return Verdict(Decision.SKIP, True, "drift ignored by the unit's policy")
    if gate is not None:
        if denied := gate.denial():
            return Verdict(Decision.DENY, is_drift, denied)
        holds = gate.holds(destroys_anything=facts.destroys_anything, is_drift=is_drift)
        if holds:
            return Verdict(Decision.HOLD, is_drift, "; ".join(holds))
    if facts.destroys_anything and destroy is DestroyPolicy.HOLD:
        return Verdict(
            Decision.HOLD,
            is_drift,
            "the plan destroys or replaces resources; the host policy holds it for approval",
        )
    if is_drift:
        return Verdict(Decision.APPLY, True, "drift found; the unit's policy is to revert it")
    return Verdict(Decision.APPLY, False, "a new revision")
