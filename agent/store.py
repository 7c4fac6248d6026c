"""The run store: SQLite (WAL) in the state directory.

What is kept: every pass (`runs`), each unit's result in it (`unit_runs`), each
revision seen and whether it was accepted (`revisions`), and per unit where it stands
(`unit_state`: the revision and input fingerprint it last converged at, its drift, its
last real result, and apart from those its last preview). Every
change is one transaction, so a pass killed at any point leaves rows that are either
there or not; `recover_interrupted` turns the rows of a dead pass into `interrupted`.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from agent.errors import StoreError
from agent.fsutil import PRIVATE_FILE_MODE, ensure_private_dir

DB_FILENAME = "agent.db"
BUSY_TIMEOUT = 30.0  # seconds a write waits for another process's transaction
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    finished_at REAL,
    trigger TEXT NOT NULL,
    dry_run INTEGER NOT NULL DEFAULT 0,
    unit_filter TEXT,
    revision TEXT,
    head_revision TEXT,
    status TEXT NOT NULL,
    error TEXT,
    pid INTEGER
);
CREATE TABLE IF NOT EXISTS unit_runs (
    run_id TEXT NOT NULL REFERENCES runs(id),
    unit TEXT NOT NULL,
    revision TEXT,
    status TEXT NOT NULL,
    decision TEXT,
    drift INTEGER NOT NULL DEFAULT 0,
    plan_add INTEGER,
    plan_change INTEGER,
    plan_destroy INTEGER,
    started_at REAL NOT NULL,
    finished_at REAL,
    error TEXT,
    PRIMARY KEY (run_id, unit)
);
CREATE INDEX IF NOT EXISTS unit_runs_by_unit ON unit_runs (unit, started_at);
CREATE TABLE IF NOT EXISTS revisions (
    sha TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    error TEXT,
    seen_at REAL NOT NULL,
    run_id TEXT
);
CREATE TABLE IF NOT EXISTS unit_state (
    unit TEXT PRIMARY KEY,
    revision TEXT,
    converged_at REAL,
    last_run_id TEXT,
    last_status TEXT,
    last_decision TEXT,
    drift INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_state (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS suspended_units (
    unit TEXT PRIMARY KEY,
    since REAL NOT NULL,
    by TEXT,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS approvals (
    run_id TEXT NOT NULL,
    held_run_id TEXT NOT NULL,
    unit TEXT NOT NULL,
    approved_at REAL NOT NULL,
    by TEXT,
    PRIMARY KEY (run_id, unit)
);
"""

# Columns added after the first release: (table, column, declaration). Added when missing,
# so a store written by an older agent is upgraded in place.
_ADDED_COLUMNS = (
    # A dry run's result: recorded beside the real ones, never read as one.
    ("unit_runs", "preview", "INTEGER NOT NULL DEFAULT 0"),
    # The kinds of input that moved since the unit last converged (comma-separated).
    ("unit_runs", "moved", "TEXT"),
    # Drift the plan showed, applied over because the unit's inputs moved too.
    ("unit_runs", "drift_overwritten", "INTEGER NOT NULL DEFAULT 0"),
    ("unit_state", "fingerprint", "TEXT"),  # the input fingerprint at the last converge
    ("unit_state", "preview_run_id", "TEXT"),
    ("unit_state", "preview_status", "TEXT"),
    ("unit_state", "preview_decision", "TEXT"),
    ("unit_state", "preview_at", "REAL"),
)


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
    moved: tuple[str, ...] = ()  # the kinds of input that moved (see agent.fingerprint)
    drift_overwritten: bool = False  # drift applied over by a change from Git


def new_run_id(now: float | None = None) -> str:
    """A sortable, unique run id: r-20261123T091502-3f9a."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"r-{stamp}-{secrets.token_hex(2)}"


class RunStore:
    """The SQLite run store of one state directory. Safe to share between threads."""

    def __init__(self, state_dir: Path, *, scrub: Callable[[str], str] | None = None) -> None:
        """Open (or create) the store; `scrub` redacts every message before it is stored."""
        self._scrub = scrub or (lambda text: text)
        ensure_private_dir(state_dir)
        self.path = state_dir / DB_FILENAME
        try:
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, check_same_thread=False)
            self.path.chmod(PRIVATE_FILE_MODE)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"cannot open the run store {self.path}: {exc}",
                hint="check the state directory's permissions and free space",
            ) from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def _clean(self, text: str | None) -> str | None:
        return None if text is None else self._scrub(text)

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the run store {self.path} was written by a newer gitops-agent "
                f"(schema {version}, this one knows {SCHEMA_VERSION})"
            )
        with self._db:
            self._db.executescript(_SCHEMA)
            _add_missing_columns(self._db)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db:
            yield self._db

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
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                (status, self._clean(error), time.time(), run_id),
            )

    def get_run(self, run_id: str) -> RunRow | None:
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return _run_row(row) if row else None

    def runs(self, *, unit: str | None = None, limit: int = 50) -> list[RunRow]:
        """Newest first; with `unit`, only passes in which that unit took part."""
        if unit is None:
            rows = self._db.execute(
                "SELECT * FROM runs ORDER BY started_at DESC, id DESC LIMIT ?", (limit,)
            )
        else:
            rows = self._db.execute(
                "SELECT runs.* FROM runs JOIN unit_runs ON unit_runs.run_id = runs.id"
                " WHERE unit_runs.unit = ? ORDER BY runs.started_at DESC, runs.id DESC LIMIT ?",
                (unit, limit),
            )
        return [_run_row(r) for r in rows.fetchall()]

    # --- units ----------------------------------------------------------------

    def start_unit(self, run_id: str, unit: str, revision: str | None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO unit_runs (run_id, unit, revision, status, started_at)"
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
        result; the converged revision and `fingerprint` move only when the outcome says
        it converged; the drift flag changes only when a plan looked (a skipped, failed
        or blocked unit keeps the drift last seen).
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
                " moved = ?, drift_overwritten = ? WHERE run_id = ? AND unit = ?",
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
            previous = db.execute(
                "SELECT revision, converged_at, fingerprint, drift FROM unit_state WHERE unit = ?",
                (unit,),
            ).fetchone()
            state_revision = previous["revision"] if previous else None
            converged_at = previous["converged_at"] if previous else None
            state_fingerprint = previous["fingerprint"] if previous else None
            drift = bool(previous["drift"]) if previous else False
            if outcome.converged:
                state_revision, converged_at = revision, now
                state_fingerprint = fingerprint or state_fingerprint
            if outcome.drift or _plan_looked(outcome):
                drift = outcome.drift
            db.execute(
                "INSERT INTO unit_state (unit, revision, converged_at, last_run_id,"
                " last_status, last_decision, drift, updated_at, fingerprint)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (unit) DO UPDATE SET"
                " revision = excluded.revision, converged_at = excluded.converged_at,"
                " last_run_id = excluded.last_run_id, last_status = excluded.last_status,"
                " last_decision = excluded.last_decision, drift = excluded.drift,"
                " updated_at = excluded.updated_at, fingerprint = excluded.fingerprint",
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
                ),
            )

    def unit_runs(self, run_id: str) -> list[UnitRunRow]:
        rows = self._db.execute(
            "SELECT * FROM unit_runs WHERE run_id = ? ORDER BY started_at, unit", (run_id,)
        )
        return [_unit_run_row(r) for r in rows.fetchall()]

    def unit_history(self, unit: str, limit: int = 50) -> list[UnitRunRow]:
        rows = self._db.execute(
            "SELECT * FROM unit_runs WHERE unit = ? ORDER BY started_at DESC LIMIT ?",
            (unit, limit),
        )
        return [_unit_run_row(r) for r in rows.fetchall()]

    def unit_states(self) -> list[UnitStateRow]:
        rows = self._db.execute("SELECT * FROM unit_state ORDER BY unit")
        return [_unit_state_row(r) for r in rows.fetchall()]

    def unit_state(self, unit: str) -> UnitStateRow | None:
        row = self._db.execute("SELECT * FROM unit_state WHERE unit = ?", (unit,)).fetchone()
        return _unit_state_row(row) if row else None

    def last_unit_run(self, unit: str) -> UnitRunRow | None:
        history = self.unit_history(unit, limit=1)
        return history[0] if history else None

    # --- revisions --------------------------------------------------------------

    def record_revision(
        self, sha: str, status: RevisionStatus, error: str | None = None, run_id: str | None = None
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO revisions (sha, status, error, seen_at, run_id)"
                " VALUES (?, ?, ?, ?, ?)",
                (sha, status, self._clean(error), time.time(), run_id),
            )
            if status is RevisionStatus.ACCEPTED:
                db.execute(
                    "INSERT OR REPLACE INTO agent_state (key, value)"
                    " VALUES ('current_revision', ?)",
                    (sha,),
                )

    def revision_status(self, sha: str) -> tuple[RevisionStatus, str | None] | None:
        row = self._db.execute(
            "SELECT status, error FROM revisions WHERE sha = ?", (sha,)
        ).fetchone()
        return (RevisionStatus(row["status"]), row["error"]) if row else None

    def current_revision(self) -> str | None:
        """The last revision accepted (validated and taken into force)."""
        row = self._db.execute(
            "SELECT value FROM agent_state WHERE key = 'current_revision'"
        ).fetchone()
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
            return cursor.rowcount == 1

    def resume(self, unit: str) -> bool:
        """Lift a suspension; False if `unit` was not suspended."""
        with self._tx() as db:
            return db.execute("DELETE FROM suspended_units WHERE unit = ?", (unit,)).rowcount == 1

    def suspended(self) -> dict[str, SuspensionRow]:
        """The suspended units, by name."""
        rows = self._db.execute("SELECT * FROM suspended_units ORDER BY unit").fetchall()
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
        rows = self._db.execute(
            "SELECT * FROM approvals WHERE held_run_id = ? ORDER BY approved_at", (held_run_id,)
        ).fetchall()
        return [
            ApprovalRow(r["run_id"], r["held_run_id"], r["unit"], r["approved_at"], r["by"])
            for r in rows
        ]

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
                dry = db.execute("SELECT dry_run FROM runs WHERE id = ?", (run_id,)).fetchone()
                db.execute(
                    "UPDATE runs SET status = ?, finished_at = ?,"
                    " error = COALESCE(error, 'the agent stopped during this pass') WHERE id = ?",
                    (RunStatus.INTERRUPTED, now, run_id),
                )
                units = db.execute(
                    "SELECT unit FROM unit_runs WHERE run_id = ? AND status = ?",
                    (run_id, UnitStatus.RUNNING),
                ).fetchall()
                db.execute(
                    "UPDATE unit_runs SET status = ?, finished_at = ?,"
                    " error = 'the agent stopped while this unit ran'"
                    " WHERE run_id = ? AND status = ?",
                    (UnitStatus.INTERRUPTED, now, run_id, UnitStatus.RUNNING),
                )
                # A dry run's units keep their last real result (nothing was applied).
                for unit in [] if dry and dry["dry_run"] else units:
                    db.execute(
                        "UPDATE unit_state SET last_status = ?, last_run_id = ?, updated_at = ?"
                        " WHERE unit = ?",
                        (UnitStatus.INTERRUPTED, run_id, now, unit["unit"]),
                    )
        return ids


def _plan_looked(outcome: UnitOutcome) -> bool:
    """Whether the outcome comes from a plan (or host facts) that looked at the resources:
    only such a result can say that drift is gone."""
    return outcome.status in (UnitStatus.OK, UnitStatus.HELD) and outcome.decision not in (
        None,
        "skip",
    )


def _add_missing_columns(db: sqlite3.Connection) -> None:
    for table, column, declaration in _ADDED_COLUMNS:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


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
    )
