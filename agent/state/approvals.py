"""Approvals: which run applied the plans another run held, and who asked (`agent approve`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from agent.state.records import ApprovalRow

if TYPE_CHECKING:
    from agent.state.store import RunStore


class ApprovalLog:
    """The `approvals` table of a run store (reached as `store.approvals`)."""

    def __init__(self, store: RunStore) -> None:
        self._store = store

    def record(
        self, run_id: str, held_run_id: str, units: list[str], *, by: str | None = None
    ) -> None:
        """Record that run `run_id` applies the plans `held_run_id` held for `units`."""
        now = time.time()
        with self._store.transaction() as db:
            db.executemany(
                "INSERT INTO approvals (run_id, held_run_id, unit, approved_at, by)"
                " VALUES (?, ?, ?, ?, ?)",
                [(run_id, held_run_id, unit, now, by) for unit in units],
            )

    def of(self, held_run_id: str) -> list[ApprovalRow]:
        """The approvals of the plans `held_run_id` held, oldest first."""
        rows = self._store.query(
            "SELECT * FROM approvals WHERE held_run_id = ? ORDER BY approved_at", (held_run_id,)
        )
        return [
            ApprovalRow(r["run_id"], r["held_run_id"], r["unit"], r["approved_at"], r["by"])
            for r in rows
        ]
