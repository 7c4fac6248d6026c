"""What the run store keeps, as Python values: run and unit statuses, the rows it returns,
and the outcome of a unit's reconcile that it records."""

from __future__ import annotations

import secrets
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # at least one unit failed, or the pass could not start
    INTERRUPTED = "interrupted"


class UnitStatus(StrEnum):
    RUNNING = "running"
    OK = "ok"  # planned, and applied / reported / nothing to do as decided
    HELD = "held"  # a plan waits for approval
    FAILED = "failed"
    BLOCKED = "blocked"  # a unit it depends on failed or is held
    INTERRUPTED = "interrupted"


class RevisionStatus(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class RunRow:
    id: str
    started_at: float
    finished_at: float | None
    trigger: str
    dry_run: bool
    unit_filter: str | None
    revision: str | None
    head_revision: str | None
    status: str
    error: str | None
    agent: str | None = None  # the agent (cluster.agent, or the host name) that ran it


@dataclass(frozen=True, slots=True)
class UnitRunRow:
    run_id: str
    unit: str
    revision: str | None
    status: str
    decision: str | None
    drift: bool
    plan_add: int | None
    plan_change: int | None
    plan_destroy: int | None
    started_at: float
    finished_at: float | None
    error: str | None
    preview: bool = False
    moved: str | None = None
    drift_overwritten: bool = False
    fingerprint: str | None = None  # the inputs it planned with (agent.fingerprint, encoded)


@dataclass(frozen=True, slots=True)
class UnitStateRow:
    unit: str
    revision: str | None
    converged_at: float | None
    last_run_id: str | None
    last_status: str | None
    last_decision: str | None
    drift: bool
    updated_at: float
    fingerprint: str | None = None
    preview_run_id: str | None = None
    preview_status: str | None = None
    preview_decision: str | None = None
    preview_at: float | None = None
    planned_at: float | None = None  # when a real plan (or host facts) last looked
    unchanged_run_id: str | None = None  # the last pass that found nothing to plan
    unchanged_at: float | None = None


@dataclass(frozen=True, slots=True)
class SuspensionRow:
    unit: str
    since: float
    by: str | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class ApprovalRow:
    run_id: str  # the run that applied the plan (trigger `approve`)
    held_run_id: str  # the run that made and held it
    unit: str
    approved_at: float
    by: str | None


@dataclass(frozen=True, slots=True)
class RemovedUnitRow:
    unit: str
    kind: str
    defined_at: str
    removed_at: str
    since: float
    policy: str
    status: str
    run_id: str | None
    error: str | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class UnitOutcome:
    """What a unit's reconcile came to, as the store records it."""

    status: UnitStatus
    decision: str | None = None
    drift: bool = False
    plan_add: int | None = None
    plan_change: int | None = None
    plan_destroy: int | None = None
    error: str | None = None
    converged: bool = False  # the unit now matches `revision` (update unit_state.revision)
    # A dry run: recorded as a preview; the unit's converged state and last real result
    # are left as they were.
    preview: bool = False
    moved: tuple[str, ...] = ()  # the kinds of input that moved (see agent.units.fingerprint)
    drift_overwritten: bool = False  # drift applied over by a change from Git
    # Held with nothing to approve: a fleet's changes wait for the change window (not stored:
    # it words the pass's notification).
    waiting: bool = False


def new_run_id(now: float | None = None) -> str:
    """A sortable, unique run id: r-20261123T091502-3f9a."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"r-{stamp}-{secrets.token_hex(2)}"


UNCHANGED = "unchanged"


def plan_looked(outcome: UnitOutcome) -> bool:
    """Whether the outcome comes from a plan (or host facts) that looked at the resources:
    only such a result can say that drift is gone."""
    return outcome.status in (UnitStatus.OK, UnitStatus.HELD) and outcome.decision not in (
        None,
        "skip",
        UNCHANGED,
    )


def run_row(row: sqlite3.Row) -> RunRow:
    return RunRow(
        id=row["id"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        trigger=row["trigger"],
        dry_run=bool(row["dry_run"]),
        unit_filter=row["unit_filter"],
        revision=row["revision"],
        head_revision=row["head_revision"],
        status=row["status"],
        error=row["error"],
        agent=row["agent"],
    )


def unit_run_row(row: sqlite3.Row) -> UnitRunRow:
    return UnitRunRow(
        run_id=row["run_id"],
        unit=row["unit"],
        revision=row["revision"],
        status=row["status"],
        decision=row["decision"],
        drift=bool(row["drift"]),
        plan_add=row["plan_add"],
        plan_change=row["plan_change"],
        plan_destroy=row["plan_destroy"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        preview=bool(row["preview"]),
        moved=row["moved"],
        drift_overwritten=bool(row["drift_overwritten"]),
        fingerprint=row["fingerprint"],
    )


def unit_state_row(row: sqlite3.Row) -> UnitStateRow:
    return UnitStateRow(
        unit=row["unit"],
        revision=row["revision"],
        converged_at=row["converged_at"],
        last_run_id=row["last_run_id"],
        last_status=row["last_status"],
        last_decision=row["last_decision"],
        drift=bool(row["drift"]),
        updated_at=row["updated_at"],
        fingerprint=row["fingerprint"],
        preview_run_id=row["preview_run_id"],
        preview_status=row["preview_status"],
        preview_decision=row["preview_decision"],
        preview_at=row["preview_at"],
        planned_at=row["planned_at"],
        unchanged_run_id=row["unchanged_run_id"],
        unchanged_at=row["unchanged_at"],
    )
