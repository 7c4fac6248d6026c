"""The run store's database connection: the SQLite file in the state directory (WAL,
agent/state/storefile.py) or a PostgreSQL database (agent/state/pgconn.py) behind one
interface. It opens, checks and migrates the schema (agent/state/schema.py), runs one
write transaction at a time, holds the store for a pass, and backs the file up; every
database error leaves it as a StoreError naming the store and what to do."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from agent.core.fsutil import ensure_private_dir
from agent.errors import PassBusyError, StoreError
from agent.state.pgconn import READER_RETRY_FOR, RETRY_FOR, PgConnection, safe_url
from agent.state.schema import MIGRATIONS, SCHEMA_VERSION
from agent.state.storefile import (
    DB_FILENAME,
    keep_reserve,
    mark_created,
    open_reader,
    open_writer,
    sqlite_error,
    write_backup,
)

log = logging.getLogger(__name__)

_DB_ERRORS = (sqlite3.Error, psycopg.Error)
_SHARED_LOCK_RETRY = 1.0  # seconds between tries for a PostgreSQL store's pass lock

BUSY_TIMEOUT = 30.0  # seconds a write waits for another process's transaction


class StoreDatabase:
    """The run store's database: opened, checked and migrated, with one write
    transaction at a time, every error a StoreError that names the store."""

    def __init__(
        self,
        state_dir: Path,
        *,
        scrub: Callable[[str], str] | None = None,
        read_only: bool = False,
        url: str | None = None,
        retry_for: float = RETRY_FOR,
    ) -> None:
        """Open (or create) the store; `scrub` redacts every message before it is stored.

        `url` (`postgresql://...`): the store is that PostgreSQL database instead of the
        SQLite file in `state_dir` (pgconn.py); the same tables, the same migrations. A
        writer waits up to `retry_for` seconds for a server that went away; a reader less.

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
        self._retry_for = retry_for
        self.agent: str | None = None  # recorded with each run (which agent ran it)
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
            wait = min(READER_RETRY_FOR, self._retry_for) if self.read_only else self._retry_for
            self._db = PgConnection(url, read_only=self.read_only, retry_for=wait)  # type: ignore[assignment]
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
