"""The agents sharing a PostgreSQL run store, and the unit leases (docs/scale-out.md).

Two tables (store schema step `_SCHEMA_CLUSTER`): `cluster_agents`, one row per agent name
with its labels and last heartbeat, and `unit_leases`, one row per unit ever leased. A lease
is held by one agent until `expires_at`; its fencing `token` grows by one on every change
of holder (and on a re-take after the holder's own lease ran out), so an agent that lost a
lease finds out by comparing tokens, whatever the clocks say. Every time here is the
DATABASE's clock (`clock_timestamp()`): bastions whose clocks differ still agree on who is
alive and which lease has run out. A released lease keeps its row (expired at once), so
the token keeps growing.

Each agent also records the settings every agent must share (`Settings`: its lease TTL,
a hash of its affinity rules, the sharding version), so that agents whose host configs
differ find out (agent/engine/agreement.py). A row's own TTL says whether that agent is
live, and a lease row keeps its holder's TTL: nobody judges another agent by its own TTL.

Only a PostgreSQL store has a cluster (the host config refuses `cluster:` without one).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import StoreError
from agent.state.store import RunStatus, RunStore, UnitStatus

# The database's clock, in epoch seconds (double precision, as the REAL columns are).
_NOW = "CAST(extract(epoch FROM clock_timestamp()) AS DOUBLE PRECISION)"


@dataclass(frozen=True, slots=True)
class Settings:
    """What every agent of a cluster must have the same, else they disagree on who owns a
    unit or on when an agent is dead (docs/scale-out.md, "Same settings everywhere")."""

    lease_ttl: float
    affinity: str  # ClusterConfig.affinity_hash()
    sharding: int  # agent/engine/sharding.py's SHARDING_VERSION

    def describe(self, setting: str) -> str:
        """One setting's value for people: `30s`, `affinity 3f2a...`, `v1`."""
        if setting == "lease_ttl":
            return f"{self.lease_ttl:g}s"
        if setting == "affinity":
            return self.affinity
        return f"v{self.sharding}"

    def differences(self, other: Settings) -> list[str]:
        """The names of the settings that differ, in a fixed order."""
        return [n for n in SETTINGS if getattr(self, n) != getattr(other, n)]


SETTINGS = ("lease_ttl", "affinity", "sharding")  # as the host config / code calls them


@dataclass(frozen=True, slots=True)
class AgentRow:
    """One agent as the registry has it; ages in seconds by the database's clock."""

    name: str
    labels: dict[str, str]
    started_at: float
    heartbeat_age: float
    draining: bool
    pid: int | None
    host: str | None
    live: bool  # a heartbeat within its own TTL, and not draining
    ttl: float  # its lease TTL (the reader's, for a row of an agent that recorded none)
    settings: Settings | None  # None: an agent of a version that did not record them


@dataclass(frozen=True, slots=True)
class LeaseRow:
    unit: str
    agent: str
    token: int
    age: float  # since this holder took it
    expires_in: float  # negative: run out (or released)
    ttl: float | None = None  # the holder's lease TTL (renewals extend it by that much)


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease this agent holds: the token its checks compare."""

    unit: str
    token: int
    took_over: str | None = None  # the agent whose expired lease this one replaced


@dataclass(frozen=True, slots=True)
class Refused:
    """Another agent holds the unit's lease."""

    unit: str
    holder: str
    token: int
    expires_in: float


def _alive(pid: int | None) -> bool:
    """Whether process `pid` exists on this host."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ClusterStore:
    """Registry and leases for agent `agent` on `store` (a PostgreSQL RunStore)."""

    def __init__(self, store: RunStore, agent: str, ttl: float) -> None:
        if not store.postgres:
            raise StoreError("a cluster needs the run store on PostgreSQL (store.url_file)")
        self.store = store
        self.agent = agent
        self.ttl = ttl

    # --- the registry ---------------------------------------------------------------

    def register(
        self, labels: Mapping[str, str], *, pid: int, host: str, settings: Settings
    ) -> None:
        """Join (or re-join) as a live agent, with the settings every agent must share. A
        StoreError if another live process already uses this name: two agents of one name
        would each think the other's leases theirs."""
        with self.store.transaction() as db:
            row = db.execute(
                f"SELECT pid, host, heartbeat_at > {_NOW} - COALESCE(lease_ttl, ?) AS fresh,"
                " draining FROM cluster_agents WHERE name = ? FOR UPDATE",
                (self.ttl, self.agent),
            ).fetchone()
            if (
                row is not None
                and row["fresh"]
                and (row["pid"], row["host"]) != (pid, host)
                # (the same host's previous process, killed: restarted at once by systemd)
                and not (row["host"] == host and not _alive(row["pid"]))
            ):
                raise StoreError(
                    f"cluster.agent {self.agent!r} is in use by pid {row['pid']} on"
                    f" {row['host']} (its heartbeat is fresh)",
                    hint="give each agent its own cluster.agent name in its host config",
                )
            db.execute(
                "INSERT INTO cluster_agents (name, labels, started_at, heartbeat_at, draining,"
                " pid, host, lease_ttl, affinity_hash, sharding_version)"
                f" VALUES (?, ?, {_NOW}, {_NOW}, 0, ?, ?, ?, ?, ?) ON CONFLICT (name) DO"
                " UPDATE SET labels = excluded.labels, started_at = excluded.started_at,"
                " heartbeat_at = excluded.heartbeat_at, draining = 0, pid = excluded.pid,"
                " host = excluded.host, lease_ttl = excluded.lease_ttl,"
                " affinity_hash = excluded.affinity_hash,"
                " sharding_version = excluded.sharding_version",
                (
                    self.agent,
                    json.dumps(dict(labels), sort_keys=True),
                    pid,
                    host,
                    settings.lease_ttl,
                    settings.affinity,
                    settings.sharding,
                ),
            )

    def heartbeat(self, held: Mapping[str, int]) -> list[str]:
        """Renew this agent's row and every lease in `held` (unit -> token), in one
        transaction; the units whose lease another agent took (lost)."""
        lost = []
        with self.store.transaction() as db:
            db.execute(
                f"UPDATE cluster_agents SET heartbeat_at = {_NOW} WHERE name = ?", (self.agent,)
            )
            for unit, token in sorted(held.items()):
                if not self._renew(db, unit, token):
                    lost.append(unit)
        return lost

    def _renew(self, db: object, unit: str, token: int) -> bool:
        # By the TTL stored with the lease (the one it was taken with): the row alone
        # says when it runs out, for the holder and any agent that would take it.
        cursor = db.execute(  # type: ignore[attr-defined]
            f"UPDATE unit_leases SET expires_at = {_NOW} + COALESCE(ttl, ?)"
            " WHERE unit = ? AND agent = ? AND token = ?",
            (self.ttl, unit, self.agent, token),
        )
        return bool(cursor.rowcount == 1)

    def set_draining(self, draining: bool) -> None:
        """Draining: the others count this agent out at once (it takes no unit)."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE cluster_agents SET draining = ? WHERE name = ?",
                (int(draining), self.agent),
            )

    def agents(self) -> list[AgentRow]:
        """Every agent ever registered, by name (the dead ones too: `live` says)."""
        rows = self.store.query(
            f"SELECT *, {_NOW} - heartbeat_at AS age FROM cluster_agents ORDER BY name"
        )
        return [self._agent_row(r) for r in rows]

    def _agent_row(self, r: Any) -> AgentRow:
        # Live by its own TTL: an agent that runs a longer one is not dead to the others
        # before it would itself consider its leases run out.
        ttl = float(r["lease_ttl"] if r["lease_ttl"] is not None else self.ttl)
        settings = None
        if r["lease_ttl"] is not None and r["sharding_version"] is not None:
            settings = Settings(ttl, str(r["affinity_hash"]), int(r["sharding_version"]))
        return AgentRow(
            name=r["name"],
            labels=json.loads(r["labels"] or "{}"),
            started_at=r["started_at"],
            heartbeat_age=max(0.0, r["age"]),
            draining=bool(r["draining"]),
            pid=r["pid"],
            host=r["host"],
            live=r["age"] < ttl and not r["draining"],
            ttl=ttl,
            settings=settings,
        )

    def forget(self, names: Iterable[str]) -> None:
        """Drop dead agents' rows (`agent cluster --forget`)."""
        with self.store.transaction() as db:
            for name in names:
                db.execute("DELETE FROM cluster_agents WHERE name = ?", (name,))

    # --- leases ---------------------------------------------------------------------

    def leases(self) -> list[LeaseRow]:
        """Every lease row, by unit (released and run-out ones have expires_in <= 0)."""
        rows = self.store.query(
            f"SELECT unit, agent, token, {_NOW} - acquired_at AS age,"
            f" expires_at - {_NOW} AS left, ttl FROM unit_leases ORDER BY unit"
        )
        return [
            LeaseRow(r["unit"], r["agent"], r["token"], r["age"], r["left"], r["ttl"]) for r in rows
        ]

    def acquire(self, unit: str) -> Lease | Refused:
        """Take `unit`'s lease for one TTL, unless another agent holds it unexpired. Taking
        over a run-out lease of another agent marks that agent's running results of the
        unit interrupted (it is dead, or cut off: its check before apply fails)."""
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO unit_leases (unit, agent, token, acquired_at, expires_at)"
                " VALUES (?, '', 0, 0, 0) ON CONFLICT (unit) DO NOTHING",
                (unit,),
            )
            row = db.execute(
                f"SELECT agent, token, expires_at - {_NOW} AS left FROM unit_leases"
                " WHERE unit = ? FOR UPDATE",
                (unit,),
            ).fetchone()
            holder, token, left = row["agent"], int(row["token"]), float(row["left"])
            if holder and holder != self.agent and left > 0:
                return Refused(unit, holder, token, left)
            if holder == self.agent and left > 0:
                self._renew(db, unit, token)
                return Lease(unit, token)
            token += 1
            db.execute(
                f"UPDATE unit_leases SET agent = ?, token = ?, acquired_at = {_NOW},"
                f" expires_at = {_NOW} + ?, ttl = ? WHERE unit = ?",
                (self.agent, token, self.ttl, self.ttl, unit),
            )
            # A lease that ran out rather than being released: its holder stopped mid-unit.
            cut = holder and holder != self.agent and left > -1e8
            took_over = holder if cut and self._interrupt_unit(db, holder, unit) else None
            return Lease(unit, token, took_over)

    def check(self, lease: Lease) -> bool:
        """Whether this agent still holds `lease` (renewed for one more TTL if so): the
        guard immediately before anything is applied."""
        with self.store.transaction() as db:
            return self._renew(db, lease.unit, lease.token)

    def release(self, lease: Lease) -> None:
        """Give the lease back (it expires now); a lease already taken over is left."""
        with self.store.transaction() as db:
            db.execute(
                f"UPDATE unit_leases SET expires_at = {_NOW} - 1e9"
                " WHERE unit = ? AND agent = ? AND token = ?",
                (lease.unit, self.agent, lease.token),
            )

    def release_all(self) -> None:
        """Give back every lease this agent holds (drain)."""
        with self.store.transaction() as db:
            db.execute(
                f"UPDATE unit_leases SET expires_at = {_NOW} - 1e9"
                f" WHERE agent = ? AND expires_at > {_NOW}",
                (self.agent,),
            )

    def _interrupt_unit(self, db: object, agent: str, unit: str) -> bool:
        """End `agent`'s running results of `unit` as interrupted; whether there were any."""
        now = time.time()
        cursor = db.execute(  # type: ignore[attr-defined]
            "UPDATE unit_runs SET status = ?, finished_at = ?, error = COALESCE(error, ?)"
            " WHERE unit = ? AND status = ? AND run_id IN (SELECT id FROM runs WHERE agent = ?)",
            (
                UnitStatus.INTERRUPTED,
                now,
                f"agent {agent} stopped while this unit ran; agent {self.agent} took it over",
                unit,
                UnitStatus.RUNNING,
                agent,
            ),
        )
        if cursor.rowcount:
            db.execute(  # type: ignore[attr-defined]
                "UPDATE unit_state SET last_status = ?, updated_at = ? WHERE unit = ?",
                (UnitStatus.INTERRUPTED, now, unit),
            )
        return bool(cursor.rowcount)

    # --- runs -----------------------------------------------------------------------

    def tag_run(self, run_id: str) -> None:
        """Record that this agent runs `run_id` (`agent history` shows it)."""
        with self.store.transaction() as db:
            db.execute("UPDATE runs SET agent = ? WHERE id = ?", (self.agent, run_id))

    def end_runs_of(self, agent: str, why: str) -> list[str]:
        """Mark `agent`'s runs still `running` interrupted, with their running units: at
        this agent's own start (`agent` is itself), or for an agent found dead."""
        now = time.time()
        with self.store.transaction() as db:
            ids = [
                r["id"]
                for r in db.execute(
                    "SELECT id FROM runs WHERE status = ? AND agent = ?",
                    (RunStatus.RUNNING, agent),
                )
            ]
            for run_id in ids:
                db.execute(
                    "UPDATE runs SET status = ?, finished_at = ?, error = COALESCE(error, ?)"
                    " WHERE id = ?",
                    (RunStatus.INTERRUPTED, now, why, run_id),
                )
                db.execute(
                    "UPDATE unit_runs SET status = ?, finished_at = ?, error = COALESCE(error, ?)"
                    " WHERE run_id = ? AND status = ?",
                    (UnitStatus.INTERRUPTED, now, why, run_id, UnitStatus.RUNNING),
                )
        return ids

    def result_at(self, unit: str, revision: str) -> tuple[str, str | None] | None:
        """The newest real result of `unit` at `revision` (any agent's): (status, error),
        or None when there is none yet or it still runs."""
        rows = self.store.query(
            "SELECT status, error FROM unit_runs WHERE unit = ? AND revision = ? AND preview = 0"
            " ORDER BY started_at DESC LIMIT 1",
            (unit, revision),
        )
        # Running, or cut by a dead agent (the agent that takes it over runs it again).
        if not rows or rows[0]["status"] in (UnitStatus.RUNNING, UnitStatus.INTERRUPTED):
            return None
        return rows[0]["status"], rows[0]["error"]
