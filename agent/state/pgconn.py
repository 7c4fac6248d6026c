"""The run store on PostgreSQL: a psycopg 3 connection that speaks the subset of
`sqlite3.Connection` the store uses, so that one body of SQL serves both backends.

What differs, and is handled here: `?` placeholders (`%s` for psycopg), booleans (stored
as 0/1 integers as in SQLite), `REAL` columns (float8 here: PostgreSQL's `real` is float4,
which would round a timestamp to minutes), the schema version (a table, not
`PRAGMA user_version`), and transactions (`with connection:` is one transaction, as in
sqlite3). Migrations take an advisory lock, so agents starting together migrate once.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import psycopg
from psycopg.rows import RowMaker

# Advisory lock keys: schema migrations ("gitops" in ASCII), and passes ("gitopp").
_MIGRATION_LOCK = 0x6769746F7073
_PASS_LOCK = 0x6769746F7070
_REAL = re.compile(r"\bREAL\b")
_BLOB = re.compile(r"\bBLOB\b")

# How long a statement waits for the server to come back (a restart takes seconds); the
# reading commands wait less (agent.state.store).
RETRY_FOR = 60.0
READER_RETRY_FOR = 3.0
_FIRST_DELAY, _MAX_DELAY = 0.2, 5.0

# A server cut off by the network (no reset ever comes) is found out in ~30 s, not after
# the kernel's 15 minutes: TCP keepalives for an idle connection, a user timeout for
# unacknowledged writes. Unless the URL sets them (its parameters win).
_DEAD_PEER = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30000,
}

log = logging.getLogger(__name__)
T = TypeVar("T")


class Row(tuple):
    """A row readable by position and by column name, as `sqlite3.Row` is."""

    _names: dict[str, int]

    def __new__(cls, values: Sequence[Any], names: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return super().__getitem__(self._names[key])
        return super().__getitem__(key)

    def keys(self) -> list[str]:
        return list(self._names)


def _rows(cursor: psycopg.Cursor[Any]) -> RowMaker[Row]:
    names = {column.name: i for i, column in enumerate(cursor.description or [])}
    return lambda values: Row(values, names)


def _param(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _sql(text: str) -> str:
    return text.replace("%", "%%").replace("?", "%s")


def _pg_types(step: str) -> str:
    """A migration step's SQLite types as PostgreSQL spells them."""
    return _BLOB.sub("BYTEA", _REAL.sub("DOUBLE PRECISION", step))


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class PassLockLost(psycopg.OperationalError):
    """The server went away during a pass and another agent took the pass lock before this
    one was back: nothing more of the pass may be recorded (its run is then `interrupted`)."""


class _Result:
    """A statement's rows, fetched at once (so that a replay can compare them). A statement
    of a transaction is queued: its result is filled when the transaction's queue is sent,
    at the first look at any queued result or at commit (`PgConnection._send`)."""

    def __init__(self, send: Callable[[], None] | None = None) -> None:
        self._send = send
        self._rows: list[Row] = []
        self._rowcount = -1
        self.filled = send is None

    def fill(self, cursor: psycopg.Cursor[Row]) -> _Result:
        self._rows = cursor.fetchall() if cursor.description else []
        self._rowcount = cursor.rowcount
        self.filled = True
        return self

    def _ready(self) -> None:
        if not self.filled and self._send is not None:
            self._send()

    @property
    def rows(self) -> list[Row]:
        self._ready()
        return self._rows

    @property
    def rowcount(self) -> int:
        self._ready()
        return self._rowcount

    def fetchone(self) -> Row | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Row]:
        return list(self.rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(list(self.rows))

    def same_as(self, other: _Result) -> bool:
        return self.rowcount == other.rowcount and [tuple(r) for r in self.rows] == [
            tuple(r) for r in other.rows
        ]


_Step = tuple[str, Any, bool, _Result]  # (sql, params, many, what it returned)


class PgConnection:
    """One PostgreSQL connection shaped like the sqlite3 connection the store uses.

    It outlives a server restart: a statement that finds the connection broken reconnects
    (backoff from 0.2 s to 5 s, for at most `retry_for` seconds) and runs again. A statement
    outside a transaction is a read or a lock call, safe to repeat. A transaction is retried
    whole: its statements are replayed on the new connection with the values first sent, and
    every result must come back as it did (else the store changed meanwhile, and the
    transaction fails). A commit whose answer was lost is looked up by its transaction id
    (`txid_status`), so it is never applied twice. The pass lock, if held, is taken again on
    the new connection; if another agent took it meanwhile, PassLockLost.

    Round trips are what a store on a server costs (docs/store.md, "Round trips"): a
    transaction's statements are queued and sent in one pipeline, with its `BEGIN` and its
    id, when a result is first looked at or at commit (two round trips for a write nobody
    reads back; none for a transaction with no statement). `round_trips` counts them (the
    bench and the tests read it). One thread uses the connection at a time: a read from
    another thread waits for an open transaction to end rather than running inside it.
    """

    def __init__(self, url: str, *, read_only: bool = False, retry_for: float = RETRY_FOR) -> None:
        self.where = safe_url(url)
        self._url = url
        self._dead_peer = {k: v for k, v in _DEAD_PEER.items() if f"{k}=" not in url}
        self._read_only = read_only
        self.retry_for = retry_for
        self.reconnects = 0  # how many times the server was found gone (logs, tests)
        self.round_trips = 0  # waits for the server's answer (bench/store_overhead.py, tests)
        self._generation = 0  # which connection this is (+1 at each reconnect)
        self._reconnecting = threading.Lock()
        # One user of the connection at a time, a transaction for its whole length: another
        # thread's read waits for it rather than joining it (and its pipeline).
        self._serial = threading.RLock()
        # The open transaction: its thread, statements, id, and the connection it began on.
        self._steps: list[_Step] | None = None
        self._tx_thread = 0
        self._tx_generation = 0
        self._xid: int | None = None
        self._begun = False  # whether the open transaction's BEGIN went to the server
        self._locked = False
        self._lock_lost = False
        self._conn = self._connect_retrying(time.monotonic() + retry_for)

    # --- connecting -----------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Row]:
        conn: psycopg.Connection[Row] = psycopg.connect(
            self._url, autocommit=True, row_factory=_rows, connect_timeout=10, **self._dead_peer
        )
        if self._read_only:
            conn.execute("SET default_transaction_read_only = on")
            self.round_trips += 1
        return conn

    def _connect_retrying(self, deadline: float) -> psycopg.Connection[Row]:
        delay = _FIRST_DELAY
        while True:
            try:
                return self._connect()
            except psycopg.OperationalError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "the run store %s is not reachable (%s): trying again in %.1fs",
                    self.where,
                    _first_line(exc),
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, _MAX_DELAY)

    def _reconnect(self, deadline: float, generation: int) -> None:
        """A new connection for the broken one (unless another thread made it already);
        the pass lock taken again if it was held."""
        with self._reconnecting:
            if generation != self._generation:
                return
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = self._connect_retrying(deadline)
            self._generation += 1
            self.reconnects += 1
            log.warning("the run store %s is back: reconnected", self.where)
            if self._locked:
                self.round_trips += 1
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", [_PASS_LOCK]).fetchone()
                if not (row and row[0]):
                    self._locked, self._lock_lost = False, True
                    log.error("the pass lock was taken by another agent while the server was away")

    def _retrying(self, call: Callable[[], T]) -> T:
        """`call()`, again on a new connection each time the connection breaks."""
        deadline = time.monotonic() + self.retry_for
        while True:
            conn, generation = self._conn, self._generation
            try:
                return call()
            except PassLockLost:
                raise
            except psycopg.Error as exc:
                gone = conn.broken or conn.closed or generation != self._generation
                if not gone or time.monotonic() >= deadline:
                    raise
                log.warning("the run store %s went away: %s", self.where, _first_line(exc))
                self._reconnect(deadline, generation)

    # --- statements -------------------------------------------------------------------

    def _run(self, sql: str, params: Any, many: bool = False) -> _Result:
        self.round_trips += 1  # (executemany too: psycopg pipelines its rows)
        cursor = self._conn.cursor()
        if many:
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
        return _Result().fill(cursor)

    def _step(self, sql: str, params: Any, many: bool) -> _Result:
        if self._steps is None or self._tx_thread != threading.get_ident():
            # A read or a lock call (not part of a transaction): run again as it is.
            with self._serial:
                return self._retrying(lambda: self._run(sql, params, many))
        # In a transaction: queued, sent with the others when a result is looked at or at
        # commit (`_send`), so that writes nobody reads cost no round trip of their own.
        result = _Result(self._send_queued)
        self._steps.append((sql, params, many, result))
        return result

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Result:
        return self._step(_sql(sql), [_param(p) for p in params], False)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> _Result:
        rows = [[_param(p) for p in params] for params in seq]
        return self._step(_sql(sql), rows, True)

    # --- transactions (`with connection:`, as with sqlite3) ----------------------------

    def _check_lock(self) -> None:
        if self._lock_lost:
            raise PassLockLost(
                "the server restarted during this pass and another agent took the pass lock"
                " meanwhile: nothing more of this pass is recorded"
            )

    def _send_queued(self) -> None:
        self._retrying(self._send)

    def _send(self) -> None:
        """Send the transaction's queued statements in one pipeline (one round trip), after
        `BEGIN` and `txid_current()` for a transaction not begun yet: its id is then known
        before COMMIT is ever sent, as `_commit` needs. A statement that fails aborts the
        transaction on the server (`__exit__` rolls it back); a connection that breaks here
        committed nothing (COMMIT was not sent): the transaction is made again, `_replay`."""
        assert self._steps is not None
        if self._begun and self._tx_generation != self._generation:
            self._replay()  # the transaction began on a connection that is gone
        queued = [step for step in self._steps if not step[3].filled]
        if not queued and self._begun:
            return
        if not self._begun:
            self._check_lock()
            self._tx_generation, self._begun = self._generation, True
        self.round_trips += 1
        xid: psycopg.Cursor[Row] | None = None
        cursors = []
        with self._conn.pipeline():
            if self._xid is None:
                self._conn.cursor().execute("BEGIN")
                xid = self._conn.cursor()
                xid.execute("SELECT txid_current()")
            for sql, params, many, _ in queued:
                cursor = self._conn.cursor()
                if many:
                    cursor.executemany(sql, params)
                else:
                    cursor.execute(sql, params)
                cursors.append(cursor)
        if xid is not None:
            row = xid.fetchone()
            self._xid = int(row[0]) if row else None
        for (_, _, _, result), cursor in zip(queued, cursors, strict=True):
            result.fill(cursor)

    def _begin(self) -> None:
        """`BEGIN` and the transaction's id, alone (a replay)."""
        self._check_lock()
        self._tx_generation = self._generation
        self._begun = True
        self.round_trips += 1
        cursor = self._conn.cursor()
        cursor.execute("BEGIN; SELECT txid_current()")  # one round trip
        cursor.nextset()
        row = cursor.fetchone()
        self._xid = int(row[0]) if row else None

    def _replay(self) -> None:
        """The open transaction again on this (new) connection: each statement sent before
        must give what it gave the first time, else nothing of it is written (one never
        answered is simply sent again: nothing was made of its result)."""
        assert self._steps is not None
        self._begin()
        for sql, params, many, first in self._steps:
            if not first.filled:
                break  # (queued ones come last, in order)
            if not self._run(sql, params, many).same_as(first):
                self._run("ROLLBACK", None)
                raise psycopg.OperationalError(
                    "the store changed while the server was away: this write was not made"
                )

    def __enter__(self) -> PgConnection:
        # Nothing is sent yet: BEGIN goes with the first statements (`_send`).
        self._check_lock()
        self._serial.acquire()
        self._steps, self._tx_thread, self._begun = [], threading.get_ident(), False
        self._xid = None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and self._steps:
                try:
                    self._send_queued()
                except BaseException:
                    self._rollback()
                    raise
                self._retrying(self._commit)
            elif exc_type is not None:
                self._rollback()
            # (no statement: nothing began on the server, nothing to end)
        finally:
            self._steps, self._xid, self._begun = None, None, False
            self._serial.release()

    def _rollback(self) -> None:
        if self._begun and self._tx_generation == self._generation:
            with contextlib.suppress(psycopg.Error):
                self._run("ROLLBACK", None)

    def _commit(self) -> None:
        if self._tx_generation != self._generation:
            if self._xid is not None:
                found = self._run("SELECT txid_status(%s)", [self._xid]).fetchone()
                if found and found[0] == "committed":
                    return  # the answer to COMMIT was lost, not the commit
            self._replay()
        self._run("COMMIT", None)

    def close(self) -> None:
        self._conn.close()

    def try_lock(self) -> bool:
        """Take the pass lock of this database (held by this session until `unlock`, or
        until the connection ends: a dead agent's lock is freed by the server; a restart of
        the server is survived, see the class)."""
        self._lock_lost = False
        row = self.execute("SELECT pg_try_advisory_lock(?)", [_PASS_LOCK]).fetchone()
        self._locked = bool(row and row[0])
        return self._locked

    def unlock(self) -> None:
        self._locked, self._lock_lost = False, False
        self.execute("SELECT pg_advisory_unlock(?)", [_PASS_LOCK])

    # --- the schema -------------------------------------------------------------------

    def schema_version(self) -> int:
        """0 for a database the agent has not set up yet."""
        with self._serial:
            return self._retrying(self._schema_version)

    def _schema_version(self) -> int:
        self.round_trips += 2
        found = self._conn.execute("SELECT to_regclass('gitops_agent_schema')").fetchone()
        if found is None or found[0] is None:
            return 0
        row = self._conn.execute("SELECT max(version) FROM gitops_agent_schema").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def migrate(self, steps: Sequence[str], check: Any) -> None:
        """Run the steps this database has not had, in one transaction (retried whole if the
        server goes away), under a lock (`check(version)` refuses a schema newer than this
        code's)."""

        def run() -> None:
            with self._conn.transaction():
                self._conn.execute("SELECT pg_advisory_xact_lock(%s)", [_MIGRATION_LOCK])
                self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS gitops_agent_schema (version INTEGER NOT NULL)"
                )
                version = self._schema_version()
                check(version)
                for number in range(version, len(steps)):
                    self._conn.execute(_pg_types(steps[number]).encode())
                    self._conn.execute(
                        "INSERT INTO gitops_agent_schema (version) VALUES (%s)", [number + 1]
                    )

        with self._serial:
            self._retrying(run)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
