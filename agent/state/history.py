"""The run store's reads of unit results: a run's units, a unit's history and drift, each
unit's state and last run, and which agent ran it (`RunStore` inherits them)."""

from __future__ import annotations

from agent.state.database import StoreDatabase
from agent.state.records import UnitRunRow, UnitStateRow, unit_run_row, unit_state_row


class UnitHistory(StoreDatabase):
    """Reads of `unit_runs` and `unit_state`."""

    def unit_runs(self, run_id: str) -> list[UnitRunRow]:
        rows = self._all(
            "SELECT * FROM unit_runs WHERE run_id = ? ORDER BY started_at, unit", (run_id,)
        )
        return [unit_run_row(r) for r in rows]

    def unit_history(self, unit: str, limit: int = 50, offset: int = 0) -> list[UnitRunRow]:
        """A unit's results, newest first; `offset` skips that many (pages)."""
        rows = self._all(
            "SELECT * FROM unit_runs WHERE unit = ? ORDER BY started_at DESC LIMIT ? OFFSET ?",
            (unit, limit, offset),
        )
        return [unit_run_row(r) for r in rows]

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
        return {r["unit"]: unit_run_row(r) for r in rows}

    def drift_events(self, unit: str, limit: int = 20) -> list[UnitRunRow]:
        """The unit's results whose plan found drift, newest first."""
        rows = self._all(
            "SELECT * FROM unit_runs WHERE unit = ? AND drift = 1 ORDER BY started_at DESC LIMIT ?",
            (unit, limit),
        )
        return [unit_run_row(r) for r in rows]

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
        return [unit_state_row(r) for r in rows]

    def unit_state(self, unit: str) -> UnitStateRow | None:
        row = self._one("SELECT * FROM unit_state WHERE unit = ?", (unit,))
        return unit_state_row(row) if row else None

    def last_unit_run(self, unit: str) -> UnitRunRow | None:
        history = self.unit_history(unit, limit=1)
        return history[0] if history else None

    def last_run_agents(self) -> dict[str, str | None]:
        """The agent that ran each unit's last run, by unit (several agents on one store)."""
        rows = self._all(
            "SELECT unit_state.unit AS unit, runs.agent AS agent FROM unit_state"
            " JOIN runs ON runs.id = unit_state.last_run_id"
        )
        return {r["unit"]: r["agent"] for r in rows}
