"""Suspended units: every pass leaves them out until `agent resume` (`agent suspend`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from agent.state.records import SuspensionRow

if TYPE_CHECKING:
    from agent.state.store import RunStore


class Suspensions:
    """The `suspended_units` table of a run store (reached as `store.suspensions`)."""

    def __init__(self, store: RunStore) -> None:
        self._store = store

    def add(self, unit: str, *, by: str | None = None, reason: str | None = None) -> bool:
        """Mark `unit` suspended (every pass leaves it out); False if it already was."""
        with self._store.transaction() as db:
            cursor = db.execute(
                "INSERT INTO suspended_units (unit, since, by, reason) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (unit) DO NOTHING",
                (unit, time.time(), by, self._store.scrub(reason)),
            )
            changed = cursor.rowcount == 1
        # Suspensions must survive a damaged store: back up right away, not after a pass.
        if changed:
            self._store.backup()
        return changed

    def remove(self, unit: str) -> bool:
        """Lift a suspension; False if `unit` was not suspended."""
        with self._store.transaction() as db:
            changed = (
                db.execute("DELETE FROM suspended_units WHERE unit = ?", (unit,)).rowcount == 1
            )
        if changed:
            self._store.backup()
        return changed

    def by_unit(self) -> dict[str, SuspensionRow]:
        """The suspended units, by name."""
        rows = self._store.query("SELECT * FROM suspended_units ORDER BY unit")
        return {r["unit"]: SuspensionRow(r["unit"], r["since"], r["by"], r["reason"]) for r in rows}
