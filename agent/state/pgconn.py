"""The run store on PostgreSQL: a psycopg 3 connection that speaks the subset of
`sqlite3.Connection` the store uses, so that one body of SQL serves both backends.

What differs, and is handled here: `?` placeholders (`%s` for psycopg), booleans (stored
as 0/1 integers as in SQLite), `REAL` columns (float8 here: PostgreSQL's `real` is float4,
which would round a timestamp to minutes), the schema version (a table, not
`PRAGMA user_version`), and transactions (`with connection:` is one transaction, as in
sqlite3). Migrations take an advisory lock, so agents starting together migrate once.
"""

from __future__ import annotations

import enum
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import psycopg
from psycopg.rows import RowMaker

# Advisory lock keys: schema migrations ("gitops" in ASCII), and passes ("gitopp").
_MIGRATION_LOCK = 0x6769746F7073
_PASS_LOCK = 0x6769746F7070
_REAL = re.compile(r"\bREAL\b")
_BLOB = re.compile(r"\bBLOB\b")


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


class PgConnection:
    """One PostgreSQL connection shaped like the sqlite3 connection the store uses."""

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.where = safe_url(url)
        self._conn: psycopg.Connection[Row] = psycopg.connect(
            url, autocommit=True, row_factory=_rows, connect_timeout=10
        )
        if read_only:
            self._conn.execute("SET default_transaction_read_only = on")
        self._tx: psycopg.Transaction | None = None

    # --- what sqlite3.Connection offers ---------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Row]:
        return self._conn.execute(_sql(sql), [_param(p) for p in params])

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> psycopg.Cursor[Row]:
        cursor = self._conn.cursor()
        cursor.executemany(_sql(sql), [[_param(p) for p in params] for params in seq])
        return cursor

    def __enter__(self) -> PgConnection:
        self._tx = self._conn.transaction()
        self._tx.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tx, self._tx = self._tx, None
        assert tx is not None
        tx.__exit__(exc_type, exc, tb)

    def close(self) -> None:
        self._conn.close()

    def try_lock(self) -> bool:
        """Take the pass lock of this database (held by this session until `unlock`, or
        until the connection ends: a dead agent's lock is freed by the server)."""
        row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", [_PASS_LOCK]).fetchone()
        return bool(row and row[0])

    def unlock(self) -> None:
        self._conn.execute("SELECT pg_advisory_unlock(%s)", [_PASS_LOCK])

    # --- the schema -------------------------------------------------------------------

    def schema_version(self) -> int:
        """0 for a database the agent has not set up yet."""
        found = self._conn.execute("SELECT to_regclass('gitops_agent_schema')").fetchone()
        if found is None or found[0] is None:
            return 0
        row = self._conn.execute("SELECT max(version) FROM gitops_agent_schema").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def migrate(self, steps: Sequence[str], check: Any) -> None:
        """Run the steps this database has not had, each in one transaction, under a lock
        (`check(version)` refuses a schema newer than this code's)."""
        with self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", [_MIGRATION_LOCK])
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS gitops_agent_schema (version INTEGER NOT NULL)"
            )
            version = self.schema_version()
            check(version)
            for number in range(version, len(steps)):
                self._conn.execute(_pg_types(steps[number]).encode())
                self._conn.execute(
                    "INSERT INTO gitops_agent_schema (version) VALUES (%s)", [number + 1]
                )
