"""A fleet's per-host records: on this agent's disk, or in a shared PostgreSQL store.

Four kinds of record, each a JSON object per host:

    ledger    what the agent manages on the host, every fleet unit's (one per host;
              providers/hosts/ledger.py)                     `<state>/hosts/<host>.json`
    result    a unit's last result on the host (`agent status`)
                                                   `<state>/units/<unit>/hosts/<host>.json`
    gone      the last result of a host the inventory no longer lists
                                              `<state>/units/<unit>/hosts-gone/<host>.json`
    desired   keyed hashes of what the unit last converged the host to (to tell drift
              from a change from Git)            `<state>/units/<unit>/desired/<host>.json`

With the default SQLite store they are those files, as they always were. With a PostgreSQL
store (several agents, units that move between them) they are rows of the table
`host_records`, so that the agent that takes a fleet over knows what the one before it put
on the hosts (docs/store.md, "Fleet records").

One host's ledger is written by every fleet unit that converges the host, and in a cluster
those units may run on different agents at once. `update` is therefore a read-modify-write
in one transaction: the row is made if missing, then read with `SELECT ... FOR UPDATE`, so
a second writer waits for the first's commit and changes what it wrote (rows per unit
would not do: a unit takes over an object another unit recorded, which changes that
unit's entries too). Result, gone and desired rows have a single writer: the unit's runner.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from agent.core.fsutil import atomic_write, ensure_private_dir
from agent.state.layout import StateLayout
from agent.state.store import RunStore

__all__ = [
    "DESIRED",
    "GONE",
    "LEDGER",
    "RESULT",
    "FileHostRecords",
    "HostRecords",
    "StoreHostRecords",
    "host_records",
]

Body = dict[str, Any]
Change = Callable[[Body | None], Body]  # the record as found (None: none) -> as written

LEDGER = "ledger"
RESULT = "result"
GONE = "gone"
DESIRED = "desired"
_UNIT_DIRS = {RESULT: "hosts", GONE: "hosts-gone", DESIRED: "desired"}


class HostRecords(Protocol):
    """Where a fleet's per-host records are kept. `unit` is "" for the ledger."""

    shared: bool  # True: in a store every agent reads

    def read(self, kind: str, unit: str, host: str) -> Body | None:
        """The record, or None when there is none (or it cannot be read)."""
        ...

    def write(self, kind: str, unit: str, host: str, body: Body) -> None:
        """Replace the record (atomically)."""
        ...

    def update(self, kind: str, unit: str, host: str, change: Change) -> Body:
        """Replace the record with `change(current)`, safe against a concurrent writer of
        the same record; returns what was written."""
        ...

    def all(self, kind: str, unit: str) -> dict[str, Body]:
        """Every readable record of `kind` for `unit`, by host name (sorted)."""
        ...

    def retire(self, unit: str, host: str) -> None:
        """Move the unit's result for `host` to `gone` (the host left the inventory)."""
        ...


class FileHostRecords:
    """The records as files in the state directory (a SQLite store: one agent)."""

    shared = False

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout

    def _dir(self, kind: str, unit: str) -> Path:
        if kind == LEDGER:
            return self.layout.root / "hosts"
        return self.layout.unit_dir(unit) / _UNIT_DIRS[kind]

    def path(self, kind: str, unit: str, host: str) -> Path:
        return self._dir(kind, unit) / f"{host}.json"

    def read(self, kind: str, unit: str, host: str) -> Body | None:
        return _load(self.path(kind, unit, host))

    def write(self, kind: str, unit: str, host: str, body: Body) -> None:
        path = self.path(kind, unit, host)
        ensure_private_dir(path.parent)
        atomic_write(path, json.dumps(body, indent=1))

    def update(self, kind: str, unit: str, host: str, change: Change) -> Body:
        # One agent writes these files; its writers take turns (FleetLedger's lock).
        body = change(self.read(kind, unit, host))
        self.write(kind, unit, host, body)
        return body

    def all(self, kind: str, unit: str) -> dict[str, Body]:
        found = {}
        folder = self._dir(kind, unit)
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            if (body := _load(path)) is not None:
                found[path.stem] = body
        return found

    def retire(self, unit: str, host: str) -> None:
        source = self.path(RESULT, unit, host)
        target = self.path(GONE, unit, host)
        ensure_private_dir(target.parent)
        source.replace(target)


class StoreHostRecords:
    """The records as rows of the store's `host_records` table (a PostgreSQL store)."""

    shared = True

    def __init__(self, store: RunStore) -> None:
        self.store = store
        # SQLite has no FOR UPDATE: its writers take turns on the whole database anyway.
        self._lock_row = " FOR UPDATE" if store.postgres else ""

    def read(self, kind: str, unit: str, host: str) -> Body | None:
        rows = self.store.query(
            "SELECT body FROM host_records WHERE kind = ? AND unit = ? AND host = ?",
            (kind, unit, host),
        )
        return _parse(rows[0][0]) if rows else None

    def write(self, kind: str, unit: str, host: str, body: Body) -> None:
        with self.store.transaction() as db:
            _upsert(db, kind, unit, host, body)

    def update(self, kind: str, unit: str, host: str, change: Change) -> Body:
        with self.store.transaction() as db:
            # The row first (an empty body if new), so that there is a row to lock: two
            # agents making the same host's first record would otherwise both insert.
            db.execute(
                "INSERT INTO host_records (kind, unit, host, body, updated_at)"
                " VALUES (?, ?, ?, '', ?) ON CONFLICT (kind, unit, host) DO NOTHING",
                (kind, unit, host, time.time()),
            )
            row = db.execute(
                "SELECT body FROM host_records WHERE kind = ? AND unit = ? AND host = ?"
                + self._lock_row,
                (kind, unit, host),
            ).fetchone()
            body = change(_parse(row[0]) if row else None)
            _upsert(db, kind, unit, host, body)
        return body

    def all(self, kind: str, unit: str) -> dict[str, Body]:
        rows = self.store.query(
            "SELECT host, body FROM host_records WHERE kind = ? AND unit = ? ORDER BY host",
            (kind, unit),
        )
        return {str(r[0]): body for r in rows if (body := _parse(r[1])) is not None}

    def retire(self, unit: str, host: str) -> None:
        with self.store.transaction() as db:
            db.execute(
                "DELETE FROM host_records WHERE kind = ? AND unit = ? AND host = ?",
                (GONE, unit, host),
            )
            db.execute(
                "UPDATE host_records SET kind = ? WHERE kind = ? AND unit = ? AND host = ?",
                (GONE, RESULT, unit, host),
            )


def host_records(store: RunStore, layout: StateLayout) -> HostRecords:
    """The records of the agent whose store is `store`: in the store when it is shared
    (PostgreSQL), else in the state directory `layout`."""
    return StoreHostRecords(store) if store.postgres else FileHostRecords(layout)


def _upsert(db: Any, kind: str, unit: str, host: str, body: Body) -> None:
    db.execute(
        "INSERT INTO host_records (kind, unit, host, body, updated_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (kind, unit, host) DO UPDATE SET body = excluded.body,"
        " updated_at = excluded.updated_at",
        (kind, unit, host, json.dumps(body, separators=(",", ":")), time.time()),
    )


def _load(path: Path) -> Body | None:
    try:
        return _parse(path.read_text())
    except OSError:
        return None


def _parse(text: str | None) -> Body | None:
    try:
        body = json.loads(text or "")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
