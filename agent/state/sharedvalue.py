"""A value every agent of a shared store must agree on (the first agent's wins), kept in
the store's `agent_state` table: e.g. the fingerprint key (agent/units/fingerprint.py)."""

from __future__ import annotations

from agent.state.store import RunStore


def shared_value(store: RunStore, name: str, mine: str) -> str:
    """The store's value of `name`; `mine` becomes it when the store has none yet."""
    with store.transaction() as db:
        db.execute(
            "INSERT INTO agent_state (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
            (name, mine),
        )
        row = db.execute("SELECT value FROM agent_state WHERE key = ?", (name,)).fetchone()
    return str(row[0]) if row and row[0] else mine
