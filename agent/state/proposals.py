"""What the store keeps of proposed changes: each proposal ref's last head and how its plan
went, and per unit it affected the plan's summary (`agent proposals`, `agent logs UNIT
--proposal REF`). Rows live in the run store's `proposals` and `proposal_units` tables;
every message is redacted on its way in, as for runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

from agent.state.store import RunStore


class ProposalStatus(StrEnum):
    PLANNING = "planning"
    PLANNED = "planned"  # every affected unit planned, skipped or failed on its own
    INCOMPLETE = "incomplete"  # a unit could not be planned now (state busy): again next poll
    REFUSED = "refused"  # author or signature not allowed: nothing of it was read
    INVALID = "invalid"  # its manifest does not validate
    FAILED = "failed"  # the plan could not start (checkout, Git)
    CLOSED = "closed"  # the ref is gone from the remote


class ProposalUnitStatus(StrEnum):
    CHANGES = "changes"
    NO_CHANGES = "no-changes"
    SKIPPED = "skipped"  # needs secrets, a fleet, or its state is busy
    FAILED = "failed"


# A head in one of these states is not planned again until the head or the base moves.
SETTLED = {
    ProposalStatus.PLANNED,
    ProposalStatus.REFUSED,
    ProposalStatus.INVALID,
    ProposalStatus.FAILED,
}


@dataclass(frozen=True, slots=True)
class ProposalUnitRow:
    ref: str
    unit: str
    head: str
    plan_id: str
    status: str
    plan_add: int | None
    plan_change: int | None
    plan_destroy: int | None
    detail: str | None
    finished_at: float

    @property
    def counts(self) -> str:
        """`+2 ~1 -0`, or "" when nothing was planned."""
        if self.plan_add is None:
            return ""
        return f"+{self.plan_add} ~{self.plan_change} -{self.plan_destroy}"


@dataclass(frozen=True, slots=True)
class ProposalRow:
    ref: str
    head: str
    base: str | None
    author: str | None
    status: str
    detail: str | None
    plan_id: str | None
    seen_at: float
    planned_at: float | None
    units: tuple[ProposalUnitRow, ...] = ()

    @property
    def summary(self) -> str:
        """`+2 ~1 -0` over every unit (a forge's commit status, `agent proposals`)."""
        add = sum(u.plan_add or 0 for u in self.units)
        change = sum(u.plan_change or 0 for u in self.units)
        destroy = sum(u.plan_destroy or 0 for u in self.units)
        return f"+{add} ~{change} -{destroy}"


class ProposalRecords:
    """Proposal rows in one run store."""

    def __init__(self, store: RunStore) -> None:
        self.store = store

    def start(self, ref: str, head: str, base: str | None, author: str, plan_id: str) -> None:
        """A plan of `head` begins: the units of the previous head are forgotten."""
        with self.store.transaction() as db:
            db.execute("DELETE FROM proposal_units WHERE ref = ?", (ref,))
            db.execute(
                "INSERT INTO proposals (ref, head, base, author, status, plan_id, seen_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(ref) DO UPDATE SET head = excluded.head,"
                " base = excluded.base, author = excluded.author, status = excluded.status,"
                " detail = NULL, plan_id = excluded.plan_id, seen_at = excluded.seen_at",
                (ref, head, base, author, ProposalStatus.PLANNING, plan_id, time.time()),
            )

    def finish(self, ref: str, status: ProposalStatus, detail: str | None = None) -> None:
        with self.store.transaction() as db:
            db.execute(
                "UPDATE proposals SET status = ?, detail = ?, planned_at = ? WHERE ref = ?",
                (status, self.store.scrub(detail), time.time(), ref),
            )

    def record_unit(
        self,
        ref: str,
        head: str,
        plan_id: str,
        unit: str,
        status: ProposalUnitStatus,
        counts: tuple[int, int, int] | None = None,
        detail: str | None = None,
    ) -> None:
        add, change, destroy = counts if counts is not None else (None, None, None)
        with self.store.transaction() as db:
            db.execute(
                # Portable SQL: the store may be PostgreSQL (agent/state/pgconn.py).
                "INSERT INTO proposal_units (ref, unit, head, plan_id, status,"
                " plan_add, plan_change, plan_destroy, detail, finished_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (ref, unit) DO UPDATE SET"
                " head = excluded.head, plan_id = excluded.plan_id, status = excluded.status,"
                " plan_add = excluded.plan_add, plan_change = excluded.plan_change,"
                " plan_destroy = excluded.plan_destroy, detail = excluded.detail,"
                " finished_at = excluded.finished_at",
                (
                    ref,
                    unit,
                    head,
                    plan_id,
                    status,
                    add,
                    change,
                    destroy,
                    self.store.scrub(detail),
                    time.time(),
                ),
            )

    def close(self, ref: str) -> None:
        """The forge says the proposal was closed or merged: it is no longer listed."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE proposals SET status = ? WHERE ref = ?", (ProposalStatus.CLOSED, ref)
            )

    def close_missing(self, open_refs: set[str]) -> list[str]:
        """Mark closed every proposal whose ref is no longer on the remote; their names."""
        rows = self.store.query("SELECT ref FROM proposals WHERE status != ?", ("closed",))
        gone = [row["ref"] for row in rows if row["ref"] not in open_refs]
        if gone:
            with self.store.transaction() as db:
                db.executemany(
                    "UPDATE proposals SET status = ? WHERE ref = ?",
                    [(ProposalStatus.CLOSED, ref) for ref in gone],
                )
        return gone

    def get(self, ref: str) -> ProposalRow | None:
        rows = self.store.query("SELECT * FROM proposals WHERE ref = ?", (ref,))
        return self._with_units(rows[0]) if rows else None

    def all(self, *, closed: bool = False) -> list[ProposalRow]:
        """Every proposal (open ones only unless `closed`), by ref."""
        rows = self.store.query("SELECT * FROM proposals ORDER BY ref")
        return [self._with_units(r) for r in rows if closed or r["status"] != "closed"]

    def unit(self, ref: str, unit: str) -> ProposalUnitRow | None:
        rows = self.store.query(
            "SELECT * FROM proposal_units WHERE ref = ? AND unit = ?", (ref, unit)
        )
        return ProposalUnitRow(**dict(rows[0])) if rows else None

    def _with_units(self, row: object) -> ProposalRow:
        data = dict(row)  # type: ignore[call-overload]
        units = self.store.query(
            "SELECT * FROM proposal_units WHERE ref = ? ORDER BY unit", (data["ref"],)
        )
        return ProposalRow(**data, units=tuple(ProposalUnitRow(**dict(u)) for u in units))
