"""What to do with a unit's plan: a pure function, tested as a table.

A change is *drift* when the unit's inputs did not move (its input fingerprint,
see agent.units.fingerprint, is the one it last converged at) but the plan is not empty.
Moved inputs are a change from the source of truth (a push that touches the unit, a
rotated secret, a new output it reads): applied, unless the host policy holds it. A
commit elsewhere in the repository moves nothing. When the inputs moved and the
resources drifted too, the apply puts the drift back with the change (Terraform
cannot apply half a plan): the verdict says so, for the record.
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
    UNCHANGED = "unchanged"  # a changed-only pass found nothing to plan (agent.units.changed)
    ORPHAN = "orphan"  # a removed unit left as it is (policy.prune: orphan, agent/units/prune.py)


@dataclass(frozen=True, slots=True)
class PlanFacts:
    """The facts about one unit's plan that the decision depends on."""

    revision_moved: bool  # the unit's inputs moved since it last converged
    has_changes: bool
    destroys_anything: bool
    resources_drifted: bool = False  # the plan found resources changed outside of it


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    drift: bool
    reason: str
    overwrites_drift: bool = False  # an apply of moved inputs that also puts drift back


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
    if facts.resources_drifted:
        return Verdict(
            Decision.APPLY,
            True,
            "the unit's inputs moved; the apply overwrites drift found in its resources",
            overwrites_drift=True,
        )
    return Verdict(Decision.APPLY, False, "the unit's inputs moved")
