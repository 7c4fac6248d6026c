"""What the policy layer adds to a plan's decision: pure, tested as a table
(tests/cases/policy_decide.json through `agent.units.decide.decide(gate=...)`).

Order: a denying rule wins over everything (the unit fails, nothing applied); then
every reason to hold is collected (the apply mode, holding rules, a closed change
window); warnings never change the decision.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.policy.apply import ApplyMode, hold_reason
from agent.policy.rules import Effect, RuleResult
from agent.policy.windows import FreezeDrift


@dataclass(frozen=True, slots=True)
class Gate:
    """The policy inputs of one unit's decision."""

    apply: ApplyMode | None = None  # None: only the host's `policy.destroy` (as before)
    rules: tuple[RuleResult, ...] = ()
    window: str | None = None  # why the change window is closed; None: open or overridden
    window_drift: FreezeDrift = FreezeDrift.HOLD

    def denial(self) -> str | None:
        """Why the plan must not apply at all, or None."""
        denied = [r.reason() for r in self.rules if r.effect is Effect.DENY]
        return "denied by " + "; ".join(denied) if denied else None

    def holds(self, *, destroys_anything: bool, is_drift: bool) -> tuple[str, ...]:
        """Why a plan with changes waits for `agent approve` (empty: it may apply)."""
        reasons: list[str] = []
        if self.apply is not None:
            reason = hold_reason(self.apply, has_changes=True, destroys_anything=destroys_anything)
            if reason:
                reasons.append(reason)
        reasons += [r.reason() for r in self.rules if r.effect is Effect.HOLD]
        if self.window and not (is_drift and self.window_drift is FreezeDrift.REVERT):
            reasons.append(self.window)
        return tuple(reasons)

    def warnings(self) -> tuple[str, ...]:
        return tuple(r.reason() for r in self.rules if r.effect is Effect.WARN)
