"""The run store's file on disk: opening it safely, its backup, checking and restoring it.

`agent.state.store` keeps the rows; this module keeps the file they live in honest:

- A store that existed is never silently recreated. The first open writes a marker
  (`agent.db.created`) beside it; a missing, empty or non-SQLite `agent.db` with the
  marker present is a damaged store (`StoreDamaged`), not a new one: a fresh store would
  forget suspensions and holds, and the next pass would apply a suspended unit.
- A writer checks the file (`PRAGMA quick_check`) when it opens it; readers open it
  read-only (`mode=ro`), never migrate and never wait on a writer (WAL readers do not
  block; their busy timeout is short).
- Every SQLite error becomes a `StoreError` that names the file and says what to do
  (disk full, damaged, locked by another process, not writable), never a traceback.
- A backup (`agent.db.backup`, 0600) is taken with SQLite's online backup API, checked,
  and renamed into place; a damaged store never replaces a good backup.
  `agent store check` and `agent store restore` (see docs/recovery.md) use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from agent.core.fsutil import PRIVATE_FILE_MODE, atomic_write, fsync_dir
from agent.errors import StoreError

DB_FILENAME = "agent.db"
MARKER_FILENAME = "agent.db.created"
BACKUP_FILENAME = "agent.db.backup"
RESERVE_FILENAME = "agent.db.reserve"
RESERVE_BYTES = 256 * 1024  # room to record a pass's end when the disk has filled up
SQLITE_HEADER = b"SQLite format 3\x00"

READ_BUSY_TIMEOUT = 2.0  # WAL readers do not wait on writers; this only covers a checkpoint

RECOVERY_HINT = (
    "see what is wrong with `agent store check`; `agent store restore` puts back the last"
    " backup (docs/recovery.md)"
)


class StoreDamaged(StoreError):
    """The run store existed and is now missing, empty, truncated or malformed."""

    reference = "store-damaged"


class StoreFull(StoreError):
    """The filesystem holding the run store has no space left."""

    reference = "store-disk-full"


def sqlite_error(path: Path, exc: sqlite3.Error, doing: str) -> StoreError:
    """The StoreError for `exc`, raised while `doing` something with the store at `path`."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    low = text.lower()
    # A full disk shows as SQLITE_FULL, or as an I/O error when SQLite cannot even
    # size its shared-memory file: ask the filesystem.
    full = name.startswith("SQLITE_FULL") or "disk is full" in low
    if full or (name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN")) and _nearly_full(path)):
        return StoreFull(
            f"cannot {doing}: the disk holding the run store {path} is full",
            hint=f"free space on that filesystem (`df -h {path.parent}`); nothing is lost,"
            " the next pass records again once it can write",
        )
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in low:
        return StoreDamaged(
            f"cannot {doing}: the run store {path} is damaged ({text})", hint=RECOVERY_HINT
        )
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in low:
        return StoreError(
            f"cannot {doing}: the run store is locked: another agent process holds a write"
            f" transaction on {path}",
            hint=f"wait for it to finish and retry; `fuser -v {path}` shows which process holds it",
        )
    if name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_CANTOPEN")) or "readonly" in low:
        return StoreError(
            f"cannot {doing}: the run store {path} cannot be opened for writing ({text})",
            hint=f"the agent's user needs read and write access to {path.parent} and its files",
        )
    if name.startswith("SQLITE_IOERR"):
        return StoreError(
            f"cannot {doing}: an I/O error on the run store {path} ({text})",
            hint="check the disk (`dmesg`, `df -h`); then `agent store check`",
        )
    if isinstance(exc, sqlite3.IntegrityError):  # a bug of ours, not a damaged file
        return StoreError(
            f"cannot {doing}: the run store {path} refused the change ({text})",
            hint="the store itself is fine; please report this with the output of `agent --debug`",
        )
    return StoreError(f"cannot {doing}: the run store {path} failed ({text})", hint=RECOVERY_HINT)


def _nearly_full(path: Path) -> bool:
    """Whether the filesystem holding `path` has (almost) no space left for SQLite."""
    try:
        fs = os.statvfs(path.parent)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < 64 * 1024


# --- opening --------------------------------------------------------------------------


def _db_state(path: Path) -> str:
    """'absent', 'empty', 'not-sqlite' or 'present', from the file itself."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return "absent"
    if not head:
        return "empty"
    return "present" if head == SQLITE_HEADER else "not-sqlite"


def _created_at(state_dir: Path) -> float | None:
    """When the marker says the store was created, or None if there is no marker."""
    marker = state_dir / MARKER_FILENAME
    try:
        return (
            float(json.loads(marker.read_text() or "{}").get("created_at") or 0)
            or marker.stat().st_mtime
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return marker.stat().st_mtime if marker.exists() else None


def _write_marker(state_dir: Path) -> None:
    note = {
        "created_at": time.time(),
        "note": "the run store agent.db was created here; if it is missing or empty, do not"
        " delete this file: run `agent store restore` (docs/recovery.md)",
    }
    atomic_write(state_dir / MARKER_FILENAME, json.dumps(note) + "\n")


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def check_file(state_dir: Path) -> bool:
    """Raise StoreDamaged if the store existed and its file is gone, empty or not SQLite.

    Returns True when there is no store yet and none ever was (a new one may be made).
    """
    path = state_dir / DB_FILENAME
    state = _db_state(path)
    created = _created_at(state_dir)
    if state == "present":
        return False
    if state == "not-sqlite":
        raise StoreDamaged(
            f"the run store {path} is not an SQLite database (truncated or overwritten)",
            hint=RECOVERY_HINT,
        )
    if created is None:
        return True
    what = "missing" if state == "absent" else "empty"
    raise StoreDamaged(
        f"the run store {path} existed (created {_when(created)}) and is now {what};"
        " the agent will not start a new one: it would forget suspensions and held plans",
        hint=RECOVERY_HINT,
    )


def open_writer(state_dir: Path, *, busy_timeout: float) -> tuple[sqlite3.Connection, bool]:
    """Open (or create) the store for writing; return it and whether it is new. A write
    waits up to `busy_timeout` seconds for another process's transaction.

    An existing store is checked with `PRAGMA quick_check` first: a pass must not start
    on a damaged store. The marker is written once the new store has its schema (by the
    caller, with `mark_created`).
    """
    path = state_dir / DB_FILENAME
    new = check_file(state_dir)
    if new:
        # Create the file 0600 before SQLite does (SQLite uses the umask's mode).
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE))
    os.chmod(path, PRIVATE_FILE_MODE)
    try:
        db = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False)
    except sqlite3.Error as exc:
        raise sqlite_error(path, exc, "open the run store") from exc
    try:
        db.row_factory = sqlite3.Row
        if not new:
            problems = _quick_check(db)
            if problems:
                raise StoreDamaged(
                    f"the run store {path} is damaged: {'; '.join(problems[:3])}",
                    hint=RECOVERY_HINT,
                )
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error as exc:
        db.close()
        raise sqlite_error(path, exc, "open the run store") from exc
    except StoreError:
        db.close()
        raise
    return db, new


def mark_created(state_dir: Path) -> None:
    """Record that the store exists (once); from now on losing it is an error."""
    if not (state_dir / MARKER_FILENAME).exists():
        _write_marker(state_dir)


def open_reader(state_dir: Path) -> sqlite3.Connection:
    """Open the store read-only: no schema write, no migration, no wait on a writer.

    Checked like a writer's open: a reading command on a damaged store says so.
    """
    path = state_dir / DB_FILENAME
    if check_file(state_dir):
        raise StoreError(
            f"no run store in {state_dir}: the agent has not run yet",
            hint="run `agent reconcile --now` first",
        )
    try:
        db = sqlite3.connect(
            f"file:{quote(str(path))}?mode=ro",
            uri=True,
            timeout=READ_BUSY_TIMEOUT,
            check_same_thread=False,
        )
        db.row_factory = sqlite3.Row
        # Reads every page once (milliseconds for a store of a few MB): a damaged page
        # the query at hand would not touch is still reported, not shown as "no rows".
        problems = _quick_check(db)
    except sqlite3.Error as exc:
        raise sqlite_error(path, exc, "read the run store") from exc
    if problems:
        db.close()
        raise StoreDamaged(
            f"the run store {path} is damaged: {'; '.join(problems[:3])}", hint=RECOVERY_HINT
        )
    return db


def _quick_check(db: sqlite3.Connection, *, full: bool = False) -> list[str]:
    """What SQLite finds wrong with the database (empty when it is intact)."""
    pragma = "integrity_check" if full else "quick_check"
    rows = [r[0] for r in db.execute(f"PRAGMA {pragma}").fetchall()]
    return [] if rows == ["ok"] else rows


# --- the reserve: room to finish a pass on a full disk ---------------------------------


def keep_reserve(state_dir: Path) -> None:
    """Make sure the reserve file exists (best effort: not on an already full disk).

    When the disk fills up mid-pass, releasing it leaves room to record the pass's end,
    so no run stays `running` (see `RunStore.finish_run`).
    """
    reserve = state_dir / RESERVE_FILENAME
    if reserve.exists():
        return
    tmp = state_dir / f".{RESERVE_FILENAME}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)  # real blocks, not a sparse file
        finally:
            os.close(fd)
        os.replace(tmp, reserve)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def release_reserve(state_dir: Path) -> bool:
    """Free the reserve's space; True if there was one to free."""
    try:
        (state_dir / RESERVE_FILENAME).unlink()
    except FileNotFoundError:
        return False
    return True


# --- backup ---------------------------------------------------------------------------


def write_backup(db: sqlite3.Connection, state_dir: Path) -> Path:
    """Copy the open store `db` to `agent.db.backup` (online backup API, checked, 0600).

    The copy is written beside the backup and renamed over it only when SQLite finds it
    intact, so a damaged store never replaces a good backup.
    """
    target = state_dir / BACKUP_FILENAME
    tmp = state_dir / f".{BACKUP_FILENAME}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE))
    try:
        copy = sqlite3.connect(tmp)
        try:
            db.backup(copy)
            # A plain rollback-journal file: one file, readable without -wal/-shm.
            copy.execute("PRAGMA journal_mode=DELETE")
            problems = _quick_check(copy)
        finally:
            copy.close()
        if problems:
            raise StoreDamaged(
                f"the run store {state_dir / DB_FILENAME} is damaged ({'; '.join(problems[:3])});"
                f" the last good backup {target} was kept",
                hint=RECOVERY_HINT,
            )
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(state_dir)
    except sqlite3.Error as exc:
        raise sqlite_error(target, exc, "back up the run store") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target


# --- check and restore ----------------------------------------------------------------


@dataclass
class StoreReport:
    """What `agent store check` found about a store file (the live one or the backup)."""

    path: str
    state: str  # ok, damaged, missing, empty, new (none yet, none ever)
    problems: list[str] = field(default_factory=list)
    schema: int | None = None
    runs: int | None = None
    last_run: str | None = None
    last_run_at: str | None = None
    suspended: list[str] = field(default_factory=list)
    written_at: str | None = None  # the file's modification time (for the backup: when taken)


def inspect(path: Path, *, immutable: bool = False) -> StoreReport:
    """Open `path` read-only, run `integrity_check` and count what it holds."""
    report = StoreReport(path=str(path), state="ok")
    state = _db_state(path)
    if state in ("absent", "empty"):
        report.state = "missing" if state == "absent" else "empty"
        return report
    report.written_at = _when(path.stat().st_mtime)
    if state == "not-sqlite":
        report.state = "damaged"
        report.problems = ["not an SQLite database (truncated or overwritten)"]
        return report
    flags = "mode=ro&immutable=1" if immutable else "mode=ro"
    try:
        db = sqlite3.connect(
            f"file:{quote(str(path))}?{flags}", uri=True, timeout=READ_BUSY_TIMEOUT
        )
    except sqlite3.Error as exc:
        report.state, report.problems = "damaged", [str(exc)]
        return report
    try:
        report.problems = _quick_check(db, full=True)
        report.schema = db.execute("PRAGMA user_version").fetchone()[0]
        report.runs = db.execute("SELECT count(*) FROM runs").fetchone()[0]
        last = db.execute(
            "SELECT id, started_at FROM runs ORDER BY started_at DESC, id DESC LIMIT 1"
        ).fetchone()
        if last:
            report.last_run, report.last_run_at = last[0], _when(last[1])
        report.suspended = [
            r[0] for r in db.execute("SELECT unit FROM suspended_units ORDER BY unit")
        ]
    except sqlite3.Error as exc:
        report.problems.append(str(exc))
    finally:
        db.close()
    if report.problems:
        report.state = "damaged"
    return report


def check_store(state_dir: Path) -> tuple[StoreReport, StoreReport, str | None]:
    """The live store's report, the backup's, and when the store was created (marker)."""
    live = inspect(state_dir / DB_FILENAME)
    created = _created_at(state_dir)
    if live.state in ("missing", "empty") and created is None:
        live.state = "new"
    backup = inspect(state_dir / BACKUP_FILENAME, immutable=True)
    return live, backup, None if created is None else _when(created)


def restore_backup(state_dir: Path) -> tuple[StoreReport, Path | None]:
    """Put the backup in place of `agent.db`; return the backup's report and where the
    store it replaced was kept (None if there was nothing to keep).

    The caller makes sure no agent process uses the store (pass lock, no daemon).
    """
    backup = state_dir / BACKUP_FILENAME
    report = inspect(backup, immutable=True)
    if report.state in ("missing", "empty"):
        raise StoreError(
            f"there is no backup of the run store to restore ({backup} is {report.state})",
            hint="without a backup, move the damaged agent.db and agent.db.created aside to"
            " start a new store (suspensions and held plans are then forgotten: suspend again)",
        )
    if report.state != "ok":
        raise StoreDamaged(
            f"the backup {backup} is damaged too: {'; '.join(report.problems[:3])}",
            hint="move agent.db and agent.db.created aside to start a new store, then suspend"
            " again what was suspended",
        )
    db = state_dir / DB_FILENAME
    kept: Path | None = None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    # The file it replaces and its -wal/-shm are kept (renamed), never deleted: a stale
    # WAL beside the restored file would be replayed onto it.
    for suffix in ("", "-wal", "-shm"):
        old = state_dir / f"{DB_FILENAME}{suffix}"
        if not old.exists():
            continue
        if old.stat().st_size == 0:
            old.unlink()
            continue
        moved = state_dir / f"{DB_FILENAME}.replaced-{stamp}{suffix}"
        os.replace(old, moved)
        if suffix == "":
            kept = moved
    tmp = state_dir / f".{DB_FILENAME}.restore.tmp"
    shutil.copyfile(backup, tmp)
    os.chmod(tmp, PRIVATE_FILE_MODE)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, db)
    fsync_dir(state_dir)
    mark_created(state_dir)
    return report, kept
