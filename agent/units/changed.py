"""Changed-only passes: which units a push or a poll must plan. Pure, tested as a table
(tests/cases/changed_only.json).

A changed-only pass plans a unit when:

    its inputs changed      any part of its fingerprint (agent.units.fingerprint) differs
                            from the one of its last clean plan or apply, or cannot be known
                            without Terraform (a state kept by a remote backend)
    its last result was     anything but ok (failed, held, interrupted, blocked, never
    not clean               run): it has no clean plan to stand on
    its drift check is due  the last real plan is at least its drift interval old (the
                            unit's own `intervals.units.NAME.drift`, else `intervals.drift`)

and records every other unit `unchanged`, with no Terraform run and no host contacted;
its last real result stays what it was. A wrong "unchanged" is a correctness bug, so
every doubt plans.

The daemon runs push (webhook) and poll passes changed-only; drift timers, restarts,
approvals, resumes and `agent reconcile --now` plan every unit, unless the CLI asked
`--changed-only`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from agent.state.store import UnitStatus

# The triggers whose passes look only at what changed; a CLI request with `--changed-only`
# is queued under its own trigger name so that it never turns a full request into one.
CLI_CHANGED_ONLY = "cli-changed-only"
# `cluster`: a pass for units this agent gained from another (docs/scale-out.md): its own
# units converged already; a unit the other left mid-way did not, and is planned.
CHANGED_ONLY_TRIGGERS = frozenset({"webhook", "poll", "cluster", CLI_CHANGED_ONLY})


def plan_reason(
    *,
    changed: Collection[str],
    last_status: str | None,
    planned_at: float | None,
    drift_interval: float | None,
    now: float,
) -> str | None:
    """Why a changed-only pass must plan the unit, or None: it is unchanged.

    `changed` holds the fingerprint parts that differ (Fingerprint.changed_from);
    `drift_interval` is None for a unit that is never checked for drift (`drift: ignore`).
    """
    if changed:
        return "its inputs changed: " + ", ".join(sorted(changed))
    if last_status is None or planned_at is None:
        return "it has no plan on record"
    if last_status != UnitStatus.OK:
        return f"its last result was {last_status}"
    if drift_interval is not None and now - planned_at >= drift_interval:
        return "its drift check is due"
    return None


def changed_only_pass(
    triggers: Iterable[str], *, drift_timer: bool, unit_drift_timers: bool
) -> bool:
    """Whether the daemon runs a batch of coalesced triggers as a changed-only pass: only
    when every trigger is a push, a poll or a `--changed-only` request, and no drift timer
    fired (a drift check always plans)."""
    if drift_timer or unit_drift_timers:
        return False
    kinds = set(triggers)
    return bool(kinds) and kinds <= CHANGED_ONLY_TRIGGERS
