"""The run store: SQLite (WAL) in the state directory, or a PostgreSQL database that
several agents share (agent/state/database.py opens either).

What is kept: every pass (`runs`), each unit's result in it (`unit_runs`), each
revision seen and whether it was accepted (`revisions`), and per unit where it stands
(`unit_state`: the revision and input fingerprint it last converged at, its drift, its
last real result, and apart from those its last preview). Every
change is one transaction, so a pass killed at any point leaves rows that are either
there or not; `recover_interrupted` turns the rows of a dead pass into `interrupted`.

The file itself (never silently recreated, checked on open, read-only for readers,
backed up after each pass and each suspend/resume) is `agent.state.storefile`'s job; the
schema is agent/state/schema.py's and the rows it returns, agent/state/records.py's.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from agent.config import HostConfig
from agent.core.redact import Redactor
from agent.state.approvals import ApprovalLog
from agent.state.history import UnitHistory
from agent.state.pgconn import RETRY_FOR
from agent.state.records import (
    UNCHANGED,
    ApprovalRow,
    RemovedUnitRow,
    RevisionStatus,
    RunRow,
    RunStatus,
    SuspensionRow,
    UnitOutcome,
    UnitRunRow,
    UnitStateRow,
    UnitStatus,
    new_run_id,
    plan_looked,
    run_row,
)
from agent.state.removed import RemovedUnits
from agent.state.revisions import RevisionLog
from agent.state.schema import SCHEMA_VERSION
from agent.state.storefile import (
    DB_FILENAME,
    StoreFull,
    release_reserve,
)
from agent.state.suspensions import Suspensions

log = logging.getLogger(__name__)


# The records are part of this module's interface (callers import them from here).
__all__ = [
    "DB_FILENAME",
    "SCHEMA_VERSION",
    "UNCHANGED",
    "ApprovalRow",
    "RemovedUnitRow",
    "RevisionStatus",
    "RunRow",
    "RunStatus",
    "RunStore",
    "SuspensionRow",
    "UnitOutcome",
    "UnitRunRow",
    "UnitStateRow",
    "UnitStatus",
    "new_run_id",
    "open_run_store",
]


class RunStore(UnitHistory, RevisionLog):
    """The run store of one state directory (SQLite) or of every agent that names it
    (PostgreSQL): runs, unit results, unit state, revisions, suspensions, approvals and
    removed units. Safe to share between threads."""

    # The small stores of one table each; made on first use, they share this connection.
    @functools.cached_property
    def suspensions(self) -> Suspensions:
        return Suspensions(self)

    @functools.cached_property
    def approvals(self) -> ApprovalLog:
        return ApprovalLog(self)

    @functools.cached_property
    def removed(self) -> RemovedUnits:
        return RemovedUnits(self)

    # `unchanged` results kept for one write (defer_unchanged), in the order they came.
    # Read and changed only under this lock (one for every store: held for a list
    # operation only), which also makes the list's creation on first use safe.
    _unchanged_lock = threading.Lock()

    @functools.cached_property
    def _unchanged(self) -> list[_Unchanged]:
        return []

    # Cluster mode: the fencing token of the lease this agent holds on a unit (None: none;
    # set by the Reconciler). A result recorded under a token another agent has replaced
    # goes to the run's history only, never over the new holder's `unit_state`
    # (docs/scale-out.md).
    lease_token: Callable[[str], int | None] | None = None

    # --- runs -----------------------------------------------------------------

    def start_run(
        self, *, trigger: str, dry_run: bool = False, unit_filter: str | None = None, pid: int = 0
    ) -> str:
        run_id = new_run_id()
        with self._tx() as db:
            db.execute(
                "INSERT INTO runs (id, started_at, trigger, dry_run, unit_filter, status, pid,"
                " agent) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    time.time(),
                    trigger,
                    int(dry_run),
                    unit_filter,
                    RunStatus.RUNNING,
                    pid,
                    self.agent,
                ),
            )
        return run_id

    def discard_run(self, run_id: str) -> None:
        """Forget a run that reconciled nothing (it named a unit the manifest lacks)."""
        with self._unchanged_lock:
            self._unchanged = [u for u in self._unchanged if u.run_id != run_id]
        with self._tx() as db:
            db.execute("DELETE FROM run_files WHERE run_id = ?", (run_id,))
            db.execute("DELETE FROM unit_runs WHERE run_id = ?", (run_id,))
            db.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    def set_run_revision(self, run_id: str, revision: str | None, head: str | None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET revision = ?, head_revision = ? WHERE id = ?",
                (revision, head, run_id),
            )

    def finish_run(self, run_id: str, status: RunStatus, error: str | None = None) -> None:
        """Record the pass's end. A unit still `running` in it is one whose result could
        not be recorded (the store failed mid-unit, e.g. a full disk): it ends `failed`
        (or `interrupted`) with the run, never stays `running`."""
        now = time.time()
        unit_status = (
            UnitStatus.INTERRUPTED if status is RunStatus.INTERRUPTED else UnitStatus.FAILED
        )

        def record() -> None:
            with self._unchanged_lock:
                unchanged = [u for u in self._unchanged if u.run_id == run_id]
            with self._tx() as db:
                self._write_unchanged(db, unchanged)  # (left by a units step that failed)
                db.execute(
                    "UPDATE runs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                    (status, self._clean(error), now, run_id),
                )
                self._end_running_units(
                    db, run_id, unit_status, "the result of this unit could not be recorded", now
                )

        try:
            record()
        except StoreFull:
            # The disk filled up during the pass: spend the reserve to record its end.
            if not release_reserve(self.state_dir):
                raise
            log.warning("the disk of %s is full: the store's reserve was used", self.path)
            record()
        self._forget_unchanged(run_id)
        # A finished pass is the natural point to refresh the backup recovery uses.
        self.backup()

    def get_run(self, run_id: str) -> RunRow | None:
        row = self._one("SELECT * FROM runs WHERE id = ?", (run_id,))
        return run_row(row) if row else None

    def runs(self, *, unit: str | None = None, limit: int = 50) -> list[RunRow]:
        """Newest first; with `unit`, only passes in which that unit took part."""
        if unit is None:
            rows = self._all(
                "SELECT * FROM runs ORDER BY started_at DESC, id DESC LIMIT ?", (limit,)
            )
        else:
            rows = self._all(
                "SELECT runs.* FROM runs JOIN unit_runs ON unit_runs.run_id = runs.id"
                " WHERE unit_runs.unit = ? ORDER BY runs.started_at DESC, runs.id DESC LIMIT ?",
                (unit, limit),
            )
        return [run_row(r) for r in rows]

    # --- units ----------------------------------------------------------------

    def start_unit(self, run_id: str, unit: str, revision: str | None) -> None:
        with self._tx() as db:
            # (a replace, written so that PostgreSQL runs it too)
            db.execute("DELETE FROM unit_runs WHERE run_id = ? AND unit = ?", (run_id, unit))
            db.execute(
                "INSERT INTO unit_runs (run_id, unit, revision, status, started_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (run_id, unit, revision, UnitStatus.RUNNING, time.time()),
            )

    def finish_unit(
        self,
        run_id: str,
        unit: str,
        revision: str | None,
        outcome: UnitOutcome,
        fingerprint: str | None = None,
    ) -> None:
        """Record a unit's result and move its `unit_state`, in one transaction.

        A preview (dry run) sets only the preview columns. A real result sets the last
        result; the converged revision and `fingerprint` (kept with the unit's run too, for
        an approval of its plan) move only when the outcome says it converged; the drift
        flag changes only when a plan looked (a skipped, failed or blocked unit keeps the
        drift last seen). In a cluster, `unit_state` moves only if no other agent took the
        unit's lease since this one did (`lease_token`).
        """
        now = time.time()
        with self._tx() as db:
            # First, as a take-over does (lease, then results): no deadlock between them.
            holds = self._holds_lease(db, unit)
            db.execute(
                "INSERT INTO unit_runs (run_id, unit, revision, status, started_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id, unit) DO NOTHING",
                (run_id, unit, revision, UnitStatus.RUNNING, now),
            )
            db.execute(
                "UPDATE unit_runs SET status = ?, decision = ?, drift = ?, plan_add = ?,"
                " plan_change = ?, plan_destroy = ?, error = ?, finished_at = ?, preview = ?,"
                " moved = ?, drift_overwritten = ?, fingerprint = ? WHERE run_id = ? AND unit = ?",
                (
                    outcome.status,
                    outcome.decision,
                    int(outcome.drift),
                    outcome.plan_add,
                    outcome.plan_change,
                    outcome.plan_destroy,
                    self._clean(outcome.error),
                    now,
                    int(outcome.preview),
                    ",".join(outcome.moved) or None,
                    int(outcome.drift_overwritten),
                    fingerprint,
                    run_id,
                    unit,
                ),
            )
            if not holds:
                log.warning(
                    "run %s: %s was taken over by another agent: its result here is kept in"
                    " the run's history only",
                    run_id,
                    unit,
                )
                return
            if outcome.preview:
                db.execute(
                    "INSERT INTO unit_state (unit, updated_at, preview_run_id, preview_status,"
                    " preview_decision, preview_at) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (unit) DO UPDATE SET preview_run_id = excluded.preview_run_id,"
                    " preview_status = excluded.preview_status,"
                    " preview_decision = excluded.preview_decision,"
                    " preview_at = excluded.preview_at",
                    (unit, now, run_id, outcome.status, outcome.decision, now),
                )
                return
            if outcome.decision == UNCHANGED:
                # Nothing ran: the last real result, drift and converged state stay.
                db.execute(_UNCHANGED_STATE, (unit, now, run_id, now))
                return
            previous = db.execute(
                "SELECT revision, converged_at, fingerprint, drift, planned_at"
                " FROM unit_state WHERE unit = ?",
                (unit,),
            ).fetchone()
            state_revision = previous["revision"] if previous else None
            converged_at = previous["converged_at"] if previous else None
            state_fingerprint = previous["fingerprint"] if previous else None
            drift = bool(previous["drift"]) if previous else False
            planned_at = previous["planned_at"] if previous else None
            if plan_looked(outcome):
                planned_at = now
            if outcome.converged:
                state_revision, converged_at = revision, now
                state_fingerprint = fingerprint or state_fingerprint
            if outcome.drift or plan_looked(outcome):
                drift = outcome.drift
            db.execute(
                "INSERT INTO unit_state (unit, revision, converged_at, last_run_id,"
                " last_status, last_decision, drift, updated_at, fingerprint, planned_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (unit) DO UPDATE SET"
                " revision = excluded.revision, converged_at = excluded.converged_at,"
                " last_run_id = excluded.last_run_id, last_status = excluded.last_status,"
                " last_decision = excluded.last_decision, drift = excluded.drift,"
                " updated_at = excluded.updated_at, fingerprint = excluded.fingerprint,"
                " planned_at = excluded.planned_at",
                (
                    unit,
                    state_revision,
                    converged_at,
                    run_id,
                    outcome.status,
                    outcome.decision,
                    int(drift),
                    now,
                    state_fingerprint,
                    planned_at,
                ),
            )

    # --- units a changed-only pass left alone, recorded together ------------------

    @property
    def batches_unchanged(self) -> bool:
        """Whether a changed-only pass records the units it leaves `unchanged` together, in
        one transaction at the end of its units step (defer_unchanged, flush_unchanged),
        instead of two transactions per unit. On PostgreSQL, where each write is round trips
        to a server (bench/README.md: ~5 per unit); a SQLite commit costs microseconds, so
        it records each unit at once, as it always did."""
        return self.postgres

    def defer_unchanged(
        self,
        run_id: str,
        unit: str,
        revision: str | None,
        outcome: UnitOutcome,
        *,
        fingerprint: str | None = None,
        started_at: float | None = None,
    ) -> None:
        """Keep the result of a unit a changed-only pass left `unchanged` (nothing ran, so
        nothing is lost if the pass dies first) until `flush_unchanged`, or `finish_run` of
        its run, writes it: the same rows as `finish_unit` would."""
        now = time.time()
        row = _Unchanged(run_id, unit, revision, outcome, fingerprint, started_at or now, now)
        with self._unchanged_lock:
            self._unchanged.append(row)

    def flush_unchanged(self) -> None:
        """Write the kept `unchanged` results, all in one transaction."""
        with self._unchanged_lock:
            batch = list(self._unchanged)
        if not batch:
            return
        with self._tx() as db:
            self._write_unchanged(db, batch)
        with self._unchanged_lock:
            self._unchanged = [u for u in self._unchanged if u not in batch]

    def _forget_unchanged(self, run_id: str) -> None:
        with self._unchanged_lock:
            self._unchanged = [u for u in self._unchanged if u.run_id != run_id]

    def _write_unchanged(self, db: sqlite3.Connection, batch: list[_Unchanged]) -> None:
        if not batch:
            return
        db.executemany(
            "INSERT INTO unit_runs (run_id, unit, revision, status, decision, drift, plan_add,"
            " plan_change, plan_destroy, error, started_at, finished_at, preview, moved,"
            " drift_overwritten, fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?) ON CONFLICT (run_id, unit) DO UPDATE SET status = excluded.status,"
            " decision = excluded.decision, drift = excluded.drift, plan_add = excluded.plan_add,"
            " plan_change = excluded.plan_change, plan_destroy = excluded.plan_destroy,"
            " error = excluded.error, finished_at = excluded.finished_at,"
            " preview = excluded.preview, moved = excluded.moved,"
            " drift_overwritten = excluded.drift_overwritten, fingerprint = excluded.fingerprint",
            [
                (
                    u.run_id,
                    u.unit,
                    u.revision,
                    u.outcome.status,
                    u.outcome.decision,
                    int(u.outcome.drift),
                    u.outcome.plan_add,
                    u.outcome.plan_change,
                    u.outcome.plan_destroy,
                    self._clean(u.outcome.error),
                    u.started_at,
                    u.finished_at,
                    int(u.outcome.preview),
                    ",".join(u.outcome.moved) or None,
                    int(u.outcome.drift_overwritten),
                    u.fingerprint,
                )
                for u in batch
            ],
        )
        db.executemany(
            _UNCHANGED_STATE, [(u.unit, u.finished_at, u.run_id, u.finished_at) for u in batch]
        )

    def _holds_lease(self, db: sqlite3.Connection, unit: str) -> bool:
        """Whether no other agent took `unit`'s lease since this one did (true without a
        cluster, or when this agent took no lease on it). The row is locked until the
        transaction ends, so a take-over cannot slip in between."""
        token = self.lease_token(unit) if self.lease_token is not None else None
        if token is None:
            return True
        lock = " FOR UPDATE" if self.postgres else ""
        row = db.execute(
            f"SELECT agent, token FROM unit_leases WHERE unit = ?{lock}", (unit,)
        ).fetchone()
        return row is not None and (row["agent"], int(row["token"])) == (self.agent, token)

    # --- recovery -------------------------------------------------------------

    def recover_interrupted(self) -> list[str]:
        """Mark passes left `running` by a dead process as interrupted; return their ids.

        Call it only while holding the pass lock: then no live pass can own a
        `running` row.
        """
        now = time.time()
        with self._tx() as db:
            ids = [
                r["id"]
                for r in db.execute("SELECT id FROM runs WHERE status = ?", (RunStatus.RUNNING,))
            ]
            for run_id in ids:
                db.execute(
                    "UPDATE runs SET status = ?, finished_at = ?,"
                    " error = COALESCE(error, 'the agent stopped during this pass') WHERE id = ?",
                    (RunStatus.INTERRUPTED, now, run_id),
                )
                self._end_running_units(
                    db, run_id, UnitStatus.INTERRUPTED, "the agent stopped while this unit ran", now
                )
        return ids

    @staticmethod
    def _end_running_units(
        db: sqlite3.Connection, run_id: str, status: UnitStatus, error: str, now: float
    ) -> None:
        """Give every unit of `run_id` still `running` its end `status` (in `db`'s
        transaction), and move its `unit_state` with it, unless the run was a dry run (its
        units keep their last real result: nothing was applied)."""
        dry = db.execute("SELECT dry_run FROM runs WHERE id = ?", (run_id,)).fetchone()
        units = db.execute(
            "SELECT unit FROM unit_runs WHERE run_id = ? AND status = ?",
            (run_id, UnitStatus.RUNNING),
        ).fetchall()
        db.execute(
            "UPDATE unit_runs SET status = ?, finished_at = ?, error = COALESCE(error, ?)"
            " WHERE run_id = ? AND status = ?",
            (status, now, error, run_id, UnitStatus.RUNNING),
        )
        for unit in [] if dry and dry["dry_run"] else units:
            db.execute(
                "UPDATE unit_state SET last_status = ?, last_run_id = ?, updated_at = ?"
                " WHERE unit = ?",
                (status, run_id, now, unit["unit"]),
            )


# A unit a changed-only pass left alone: only when it was last found unchanged moves.
_UNCHANGED_STATE = (
    "INSERT INTO unit_state (unit, updated_at, unchanged_run_id, unchanged_at)"
    " VALUES (?, ?, ?, ?) ON CONFLICT (unit) DO UPDATE SET"
    " unchanged_run_id = excluded.unchanged_run_id, unchanged_at = excluded.unchanged_at"
)


@dataclass(frozen=True)
class _Unchanged:
    """An `unchanged` result kept for RunStore.flush_unchanged."""

    run_id: str
    unit: str
    revision: str | None
    outcome: UnitOutcome
    fingerprint: str | None
    started_at: float
    finished_at: float


def open_run_store(
    host: HostConfig, *, redactor: Redactor | None = None, read_only: bool = False
) -> RunStore:
    """The run store the host config names: a PostgreSQL database (`store.url_file`) or
    the SQLite file in `state_dir`. The URL and its password go to `redactor` first; it
    also scrubs every message the store keeps."""
    url = host.store.url() if host.store is not None else None
    if url is not None and redactor is not None:
        redactor.register(url)
        if password := urllib.parse.urlsplit(url).password:
            redactor.register(urllib.parse.unquote(password))
    scrub = redactor.redact if redactor is not None else None
    wait = host.store.retry_for if host.store is not None else RETRY_FOR
    return RunStore(host.state_dir, scrub=scrub, read_only=read_only, url=url, retry_for=wait)
