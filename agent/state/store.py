"""The run store: SQLite (WAL) in the state directory.

What is kept: every pass (`runs`), each unit's result in it (`unit_runs`), each
revision seen and whether it was accepted (`revisions`), and per unit where it stands
(`unit_state`: the revision and input fingerprint it last converged at, its drift, its
last real result, and apart from those its last preview). Every
change is one transaction, so a pass killed at any point leaves rows that are either
there or not; `recover_interrupted` turns the rows of a dead pass into `interrupted`.

The file itself (never silently recreated, checked on open, read-only for readers,
backed up after each pass and each suspend/resume) is `agent.state.storefile`'s job; every
SQLite error leaves this module as a `StoreError` naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import psycopg

from agent.config import HostConfig
from agent.core.fsutil import ensure_private_dir
from agent.core.redact import Redactor
from agent.errors import PassBusyError, StoreError
from agent.state.pgconn import PgConnection, safe_url
from agent.state.schema import MIGRATIONS, SCHEMA_VERSION
from agent.state.storefile import (
    DB_FILENAME,
    StoreFull,
    keep_reserve,
    mark_created,
    open_reader,
    open_writer,
    release_reserve,
    sqlite_error,
    write_backup,
)

log = logging.getLogger(__name__)

_DB_ERRORS = (sqlite3.Error, psycopg.Error)
_SHARED_LOCK_RETRY = 1.0  # seconds between tries for a PostgreSQL store's pass lock

BUSY_TIMEOUT = 30.0  # seconds a write waits for another process's transaction

__all__ = ["DB_FILENAME", "SCHEMA_VERSION", "RunStore"]


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


class RunStore:
    """The SQLite run store of one state directory. Safe to share between threads."""

    def __init__(
        self,
        state_dir: Path,
        *,
        scrub: Callable[[str], str] | None = None,
        read_only: bool = False,
        url: str | None = None,
    ) -> None:
        """Open (or create) the store; `scrub` redacts every message before it is stored.

        `url` (`postgresql://...`): the store is that PostgreSQL database instead of the
        SQLite file in `state_dir` (pgconn.py); the same tables, the same migrations.

        `read_only` (the reading commands): open without writing anything, without
        migrating, and without waiting on a writer; a store that does not exist yet, or
        whose schema is older than this code's, is a StoreError that says so.
        """
        self._scrub = scrub or (lambda text: text)
        self.state_dir = state_dir
        self.path = state_dir / DB_FILENAME
        self.location = str(self.path)  # where the store is, for messages
        self.read_only = read_only
        self._lock = threading.Lock()
        self.postgres = url is not None
        if url is not None:
            self._open_postgres(url)
            return
        if read_only:
            self._db = open_reader(state_dir)
            self._check_schema(self._user_version(), read_only=True)
            return
        ensure_private_dir(state_dir)
        self._db, new = open_writer(state_dir, busy_timeout=BUSY_TIMEOUT)
        try:
            self._migrate()
            mark_created(state_dir)
        except BaseException:
            self._db.close()
            raise
        keep_reserve(state_dir)
        if new:
            self.backup()

    def _open_postgres(self, url: str) -> None:
        self.location = safe_url(url)
        try:
            self._db = PgConnection(url, read_only=self.read_only)  # type: ignore[assignment]
            if self.read_only:
                self._check_schema(self._user_version(), read_only=True)
            else:
                self._db.migrate(MIGRATIONS, lambda v: self._check_schema(v, read_only=False))
        except psycopg.Error as exc:
            raise self._error(exc, "open the run store") from exc

    def close(self) -> None:
        self._db.close()

    def _error(self, exc: Exception, doing: str) -> StoreError:
        """A database error as a StoreError naming the store and what failed."""
        if isinstance(exc, sqlite3.Error):
            return sqlite_error(self.path, exc, doing)
        return StoreError(
            f"the run store {self.location} (PostgreSQL): could not {doing}:"
            f" {str(exc).strip() or type(exc).__name__}",
            hint="check that the database is up and the agent's role may use it",
        )

    def _clean(self, text: str | None) -> str | None:
        return None if text is None else self._scrub(text)

    def _user_version(self) -> int:
        if self.postgres:
            return self._db.schema_version()  # type: ignore[attr-defined]
        row = self._one("PRAGMA user_version")
        return int(row[0]) if row else 0

    def _check_schema(self, version: int, *, read_only: bool) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the run store {self.path} was written by a newer gitops-agent "
                f"(schema {version}, this one knows {SCHEMA_VERSION})",
                hint="run the gitops-agent version that wrote it, or `agent store restore`"
                " an older backup",
            )
        if read_only and version < SCHEMA_VERSION:
            raise StoreError(
                f"the run store {self.path} has schema {version}, older than this"
                f" gitops-agent's {SCHEMA_VERSION}: reading commands do not upgrade it",
                hint="the next pass upgrades it (`agent reconcile --now`, or wait for the service)",
            )

    def _migrate(self) -> None:
        """Run the migration steps this store has not had, each in one transaction."""
        version = self._user_version()
        self._check_schema(version, read_only=False)
        for number in range(version, SCHEMA_VERSION):
            step = MIGRATIONS[number]
            script = f"BEGIN IMMEDIATE;\n{step}\nPRAGMA user_version={number + 1};\nCOMMIT;"
            try:
                self._db.executescript(script)
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.rollback()
                raise sqlite_error(
                    self.path, exc, f"upgrade the run store to schema {number + 1}"
                ) from exc

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction, for the records kept beside the runs (agent.state.proposals)."""
        return self._tx()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows of a read (StoreError on failure), for the records kept beside the runs."""
        return self._all(sql, params)

    def scrub(self, text: str | None) -> str | None:
        """`text` as the store keeps it: redacted."""
        return self._clean(text)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            raise StoreError(f"the run store {self.path} was opened read-only")
        try:
            with self._lock, self._db:
                yield self._db
        except _DB_ERRORS as exc:
            raise self._error(exc, "write to the run store") from exc

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._db.execute(sql, params).fetchall()
        except _DB_ERRORS as exc:
            raise self._error(exc, "read the run store") from exc

    def _one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    @contextmanager
    def exclusive(self, *, wait: bool) -> Iterator[None]:
        """Hold the store for one pass. A PostgreSQL store is shared by every agent that
        names it: a session advisory lock (freed by the server if the agent dies) makes
        their passes take turns; PassBusyError when it is held and `wait` is False. A
        SQLite store is one host's, guarded by the state directory's pass lock."""
        if not self.postgres:
            yield
            return
        db: PgConnection = self._db  # type: ignore[assignment]
        told = False
        try:
            while not db.try_lock():
                if not wait:
                    raise PassBusyError(
                        f"another agent is running a pass on the run store {self.location}",
                        hint="wait for it; `agent status` shows its run",
                    )
                if not told:
                    log.info("waiting: another agent is running a pass on %s", self.location)
                    told = True
                time.sleep(_SHARED_LOCK_RETRY)
        except psycopg.Error as exc:
            raise self._error(exc, "take the run store's pass lock") from exc
        try:
            yield
        finally:
            with contextlib.suppress(psycopg.Error):
                db.unlock()

    def backup(self) -> None:
        """Refresh `agent.db.backup` from this store. Best effort: a failed backup (disk
        full, store damaged) is logged and the previous backup kept; it never fails the
        change it follows."""
        if self.read_only or self.postgres:
            return  # a PostgreSQL store is backed up the way the database is
        try:
            with self._lock:
                write_backup(self._db, self.state_dir)
        except (StoreError, OSError) as exc:
            log.warning("the run store backup was not refreshed: %s", exc)

    # --- runs -----------------------------------------------------------------

    def start_run(
        self, *, trigger: str, dry_run: bool = False, unit_filter: str | None = None, pid: int = 0
    ) -> str:
        run_id = new_run_id()
        with self._tx() as db:
            db.execute(
                "INSERT INTO runs (id, started_at, trigger, dry_run, unit_filter, status, pid)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, time.time(), trigger, int(dry_run), unit_filter, RunStatus.RUNNING, pid),
            )
        return run_id

    def discard_run(self, run_id: str) -> None:
        """Forget a run that reconciled nothing (it named a unit the manifest lacks)."""
        with self._tx() as db:
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
            with self._tx() as db:
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
        # A finished pass is the natural point to refresh the backup recovery uses.
        self.backup()

    def get_run(self, run_id: str) -> RunRow | None:
        row = self._one("SELECT * FROM runs WHERE id = ?", (run_id,))
        return _run_row(row) if row else None

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
        return [_run_row(r) for r in rows]

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
        drift last seen).
        """
        now = time.time()
        with self._tx() as db:
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
                db.execute(
                    "INSERT INTO unit_state (unit, updated_at, unchanged_run_id, unchanged_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (unit) DO UPDATE SET"
                    " unchanged_run_id = excluded.unchanged_run_id,"
                    " unchanged_at = excluded.unchanged_at",
                    (unit, now, run_id, now),
                )
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
            if _plan_looked(outcome):
                planned_at = now
            if outcome.converged:
                state_revision, converged_at = revision, now
                state_fingerprint = fingerprint or state_fingerprint
            if outcome.drift or _plan_looked(outcome):
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

    def unit_runs(self, run_id: str) -> list[UnitRunRow]:
        rows = self._all(
            "SELECT * FROM unit_runs WHERE run_id = ? ORDER BY started_at, unit", (run_id,)
        )
        return [_unit_run_row(r) for r in rows]

    def unit_history(self, unit: str, limit: int = 50, offset: int = 0) -> list[UnitRunRow]:
        """A unit's results, newest first; `offset` skips that many (pages)."""
        rows = self._all(
            "SELECT * FROM unit_runs WHERE unit = ? ORDER BY started_at DESC LIMIT ? OFFSET ?",
            (unit, limit, offset),
        )
        return [_unit_run_row(r) for r in rows]

    def count_unit_runs(self, unit: str) -> int:
        """How many results a unit has (for pages)."""
        row = self._one("SELECT count(*) FROM unit_runs WHERE unit = ?", (unit,))
        return int(row[0]) if row else 0

    def last_unit_runs(self) -> dict[str, UnitRunRow]:
        """Each unit's last real result (the run `unit_state.last_run_id` names)."""
        rows = self._all(
            # CROSS JOIN keeps unit_state outside: one primary-key lookup per unit.
            "SELECT unit_runs.* FROM unit_state CROSS JOIN unit_runs"
            " ON unit_runs.run_id = unit_state.last_run_id AND unit_runs.unit = unit_state.unit"
        )
        return {r["unit"]: _unit_run_row(r) for r in rows}

    def drift_events(self, unit: str, limit: int = 20) -> list[UnitRunRow]:
        """The unit's results whose plan found drift, newest first."""
        rows = self._all(
            "SELECT * FROM unit_runs WHERE unit = ? AND drift = 1 ORDER BY started_at DESC LIMIT ?",
            (unit, limit),
        )
        return [_unit_run_row(r) for r in rows]

    def drift_counts(self, since: float = 0.0) -> dict[str, int]:
        """How many results found drift since `since`, per unit."""
        rows = self._all(
            # The partial index holds exactly the drift events (else: a scan of the history).
            "SELECT unit, count(*) FROM unit_runs INDEXED BY unit_runs_drift"
            " WHERE drift = 1 AND started_at >= ? GROUP BY unit ORDER BY unit",
            (since,),
        )
        return {r[0]: int(r[1]) for r in rows}

    def unit_states(self) -> list[UnitStateRow]:
        rows = self._all("SELECT * FROM unit_state ORDER BY unit")
        return [_unit_state_row(r) for r in rows]

    def unit_state(self, unit: str) -> UnitStateRow | None:
        row = self._one("SELECT * FROM unit_state WHERE unit = ?", (unit,))
        return _unit_state_row(row) if row else None

    def last_unit_run(self, unit: str) -> UnitRunRow | None:
        history = self.unit_history(unit, limit=1)
        return history[0] if history else None

    # --- revisions --------------------------------------------------------------

    def record_revision(
        self, sha: str, status: RevisionStatus, error: str | None = None, run_id: str | None = None
    ) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM revisions WHERE sha = ?", (sha,))
            db.execute(
                "INSERT INTO revisions (sha, status, error, seen_at, run_id)"
                " VALUES (?, ?, ?, ?, ?)",
                (sha, status, self._clean(error), time.time(), run_id),
            )
            if status is RevisionStatus.ACCEPTED:
                db.execute(
                    "INSERT INTO agent_state (key, value) VALUES ('current_revision', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (sha,),
                )

    def revision_status(self, sha: str) -> tuple[RevisionStatus, str | None] | None:
        row = self._one("SELECT status, error FROM revisions WHERE sha = ?", (sha,))
        return (RevisionStatus(row["status"]), row["error"]) if row else None

    def last_rejected(self) -> tuple[str, str | None, float] | None:
        """The revision last rejected (sha, reason, when), or None."""
        row = self._one(
            "SELECT sha, error, seen_at FROM revisions WHERE status = ?"
            " ORDER BY seen_at DESC LIMIT 1",
            (RevisionStatus.REJECTED.value,),
        )
        return (row["sha"], row["error"], row["seen_at"]) if row else None

    def current_revision(self) -> str | None:
        """The last revision accepted (validated and taken into force)."""
        row = self._one("SELECT value FROM agent_state WHERE key = 'current_revision'")
        return row["value"] if row else None

    # --- suspensions and approvals ----------------------------------------------

    def suspend(self, unit: str, *, by: str | None = None, reason: str | None = None) -> bool:
        """Mark `unit` suspended (every pass leaves it out); False if it already was."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO suspended_units (unit, since, by, reason) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (unit) DO NOTHING",
                (unit, time.time(), by, self._clean(reason)),
            )
            changed = cursor.rowcount == 1
        # Suspensions must survive a damaged store: back up right away, not after a pass.
        if changed:
            self.backup()
        return changed

    def resume(self, unit: str) -> bool:
        """Lift a suspension; False if `unit` was not suspended."""
        with self._tx() as db:
            changed = (
                db.execute("DELETE FROM suspended_units WHERE unit = ?", (unit,)).rowcount == 1
            )
        if changed:
            self.backup()
        return changed

    def suspended(self) -> dict[str, SuspensionRow]:
        """The suspended units, by name."""
        rows = self._all("SELECT * FROM suspended_units ORDER BY unit")
        return {r["unit"]: SuspensionRow(r["unit"], r["since"], r["by"], r["reason"]) for r in rows}

    def record_approval(
        self, run_id: str, held_run_id: str, units: list[str], *, by: str | None = None
    ) -> None:
        """Record that run `run_id` applies the plans `held_run_id` held for `units`."""
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT INTO approvals (run_id, held_run_id, unit, approved_at, by)"
                " VALUES (?, ?, ?, ?, ?)",
                [(run_id, held_run_id, unit, now, by) for unit in units],
            )

    def approvals(self, held_run_id: str) -> list[ApprovalRow]:
        """The approvals of the plans `held_run_id` held, oldest first."""
        rows = self._all(
            "SELECT * FROM approvals WHERE held_run_id = ? ORDER BY approved_at", (held_run_id,)
        )
        return [
            ApprovalRow(r["run_id"], r["held_run_id"], r["unit"], r["approved_at"], r["by"])
            for r in rows
        ]

    # --- removed units (agent/units/prune.py) -----------------------------------------

    def mark_removed(
        self, unit: str, *, kind: str, defined_at: str, removed_at: str, policy: str, status: str
    ) -> None:
        """Record that the repository no longer has `unit` (once: a row kept is left)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO removed_units (unit, kind, defined_at, removed_at, since, policy,"
                " status, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (unit) DO NOTHING",
                (unit, kind, defined_at, removed_at, now, policy, status, now),
            )

    def set_removed_status(
        self, unit: str, status: str, *, run_id: str | None, error: str | None = None
    ) -> None:
        """Where a removed unit stands after a run acted on it. `pruned` also forgets the
        unit's state row (its runs stay in the history): a unit of that name added again
        starts afresh."""
        with self._tx() as db:
            db.execute(
                "UPDATE removed_units SET status = ?, run_id = ?, error = ?, updated_at = ?"
                " WHERE unit = ?",
                (status, run_id, self._clean(error), time.time(), unit),
            )
            if status == "pruned":
                db.execute("DELETE FROM unit_state WHERE unit = ?", (unit,))

    def unit_returned(self, unit: str) -> bool:
        """The repository has `unit` again: it is no longer removed. False if it was not."""
        with self._tx() as db:
            return db.execute("DELETE FROM removed_units WHERE unit = ?", (unit,)).rowcount == 1

    def removed_units(self) -> dict[str, RemovedUnitRow]:
        """The units the repository removed, by name (pruned ones too)."""
        rows = self._all("SELECT * FROM removed_units ORDER BY unit")
        return {
            r["unit"]: RemovedUnitRow(**{key: r[key] for key in r.keys()})  # noqa: SIM118
            for r in rows
        }

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


# The decision of a unit a changed-only pass left alone (agent.decide.Decision.UNCHANGED).
UNCHANGED = "unchanged"


def _plan_looked(outcome: UnitOutcome) -> bool:
    """Whether the outcome comes from a plan (or host facts) that looked at the resources:
    only such a result can say that drift is gone."""
    return outcome.status in (UnitStatus.OK, UnitStatus.HELD) and outcome.decision not in (
        None,
        "skip",
        UNCHANGED,
    )


def _run_row(row: sqlite3.Row) -> RunRow:
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
    )


def _unit_run_row(row: sqlite3.Row) -> UnitRunRow:
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


def _unit_state_row(row: sqlite3.Row) -> UnitStateRow:
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
    return RunStore(host.state_dir, scrub=scrub, read_only=read_only, url=url)
