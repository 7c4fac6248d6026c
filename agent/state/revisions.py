"""The revisions the agent has seen: each one accepted or rejected (with why), and the
revision in force, shared by every agent of one store (`RunStore` inherits them)."""

from __future__ import annotations

import time

from agent.state.database import StoreDatabase
from agent.state.records import RevisionStatus


class RevisionLog(StoreDatabase):
    """The `revisions` table and `agent_state.current_revision`."""

    def record_revision(
        self, sha: str, status: RevisionStatus, error: str | None = None, run_id: str | None = None
    ) -> None:
        with self._tx() as db:
            # One statement (not a delete and an insert): agents sharing a PostgreSQL store
            # record the same revision at once (docs/scale-out.md).
            db.execute(
                "INSERT INTO revisions (sha, status, error, seen_at, run_id)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha) DO UPDATE SET status = excluded.status,"
                " error = excluded.error, seen_at = excluded.seen_at, run_id = excluded.run_id",
                (sha, status, self._clean(error), time.time(), run_id),
            )
            if status is RevisionStatus.ACCEPTED:
                db.execute(
                    "INSERT INTO agent_state (key, value) VALUES ('current_revision', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (sha,),
                )

    def revision_status(self, sha: str) -> tuple[RevisionStatus, str | None] | None:
        row = self._one("SELECT status, error FROM revisions WHERE sha = ?", (sha,))
        return (RevisionStatus(row["status"]), row["error"]) if row else None

    def last_rejected(self) -> tuple[str, str | None, float] | None:
        """The revision last rejected (sha, reason, when), or None."""
        row = self._one(
            "SELECT sha, error, seen_at FROM revisions WHERE status = ?"
            " ORDER BY seen_at DESC LIMIT 1",
            (RevisionStatus.REJECTED.value,),
        )
        return (row["sha"], row["error"], row["seen_at"]) if row else None

    def current_revision(self) -> str | None:
        """The last revision accepted (validated and taken into force)."""
        row = self._one("SELECT value FROM agent_state WHERE key = 'current_revision'")
        return row["value"] if row else None
