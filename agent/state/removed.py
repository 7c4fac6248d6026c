"""Units the repository removed and where their prune stands (agent/units/prune.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from agent.state.records import RemovedUnitRow

if TYPE_CHECKING:
    from agent.state.store import RunStore


class RemovedUnits:
    """The `removed_units` table of a run store (reached as `store.removed`)."""

    def __init__(self, store: RunStore) -> None:
        self._store = store

    def mark(
        self, unit: str, *, kind: str, defined_at: str, removed_at: str, policy: str, status: str
    ) -> None:
        """Record that the repository no longer has `unit` (once: a row kept is left)."""
        now = time.time()
        with self._store.transaction() as db:
            db.execute(
                "INSERT INTO removed_units (unit, kind, defined_at, removed_at, since, policy,"
                " status, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (unit) DO NOTHING",
                (unit, kind, defined_at, removed_at, now, policy, status, now),
            )

    def set_status(
        self, unit: str, status: str, *, run_id: str | None, error: str | None = None
    ) -> None:
        """Where a removed unit stands after a run acted on it. `pruned` also forgets the
        unit's state row (its runs stay in the history): a unit of that name added again
        starts afresh."""
        with self._store.transaction() as db:
            db.execute(
                "UPDATE removed_units SET status = ?, run_id = ?, error = ?, updated_at = ?"
                " WHERE unit = ?",
                (status, run_id, self._store.scrub(error), time.time(), unit),
            )
            if status == "pruned":
                db.execute("DELETE FROM unit_state WHERE unit = ?", (unit,))

    def returned(self, unit: str) -> bool:
        """The repository has `unit` again: it is no longer removed. False if it was not."""
        with self._store.transaction() as db:
            return db.execute("DELETE FROM removed_units WHERE unit = ?", (unit,)).rowcount == 1

    def by_unit(self) -> dict[str, RemovedUnitRow]:
        """The units the repository removed, by name (pruned ones too)."""
        rows = self._store.query("SELECT * FROM removed_units ORDER BY unit")
        return {
            r["unit"]: RemovedUnitRow(**{key: r[key] for key in r.keys()})  # noqa: SIM118
            for r in rows
        }
