"""The apply mode of a unit: which non-empty plans wait for `agent approve`."""

from __future__ import annotations

from enum import StrEnum


class ApplyMode(StrEnum):
    """From the loosest to the strictest."""

    AUTO = "auto"  # every plan applies (rules and windows still apply)
    APPROVE_DESTROY = "approve-destroy"  # a plan that destroys or replaces waits
    APPROVE = "approve"  # every non-empty plan waits

    @property
    def rank(self) -> int:
        return _ORDER.index(self)

    def allows(self, other: ApplyMode) -> bool:
        """Whether a unit may ask for `other` under this ceiling (only as strict or stricter)."""
        return other.rank >= self.rank


_ORDER = (ApplyMode.AUTO, ApplyMode.APPROVE_DESTROY, ApplyMode.APPROVE)


def within(ceiling: ApplyMode) -> tuple[ApplyMode, ...]:
    """The modes a manifest may choose under `ceiling`, loosest first."""
    return tuple(mode for mode in _ORDER if ceiling.allows(mode))


def hold_reason(mode: ApplyMode, *, has_changes: bool, destroys_anything: bool) -> str | None:
    """Why `mode` holds a plan for approval, or None when it lets the plan apply."""
    if not has_changes:
        return None
    if mode is ApplyMode.APPROVE:
        return "the unit's apply policy is approve: every plan waits for `agent approve`"
    if mode is ApplyMode.APPROVE_DESTROY and destroys_anything:
        return "the plan destroys or replaces resources; the apply policy holds it for approval"
    return None
