"""This agent as a member of a cluster (docs/scale-out.md): registered in the store, a
heartbeat thread, the leases it holds, and a watcher of the live set.

Every `lease_ttl / 3` the heartbeat renews this agent's row and every lease it holds, in
one transaction on a connection of its own (a long pass never delays it). A lease whose
token no longer matches was taken over: it is marked lost, and the unit's check before
apply fails. When the live set changes (an agent joined, drained or stopped beating),
`on_change(before, after)` is called from the heartbeat thread: the daemon uses it to run
a pass when this agent gained units.

The live set counts only the agents that share the agreed settings (agent/engine/
agreement.py). When this agent's settings are not the agreed ones it takes no lease
(`mismatch` says why; logged once when it starts, and once when it ends).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from agent.config.cluster import ClusterConfig
from agent.engine.agreement import Agreement, Mismatch, agree
from agent.engine.sharding import SHARDING_VERSION, Member
from agent.errors import AgentError
from agent.state.cluster import AgentRow, ClusterStore, Lease, Refused, Settings
from agent.state.store import RunStore

log = logging.getLogger(__name__)

# How many times the check before apply is asked when its answers come back too late to
# prove the lease (see `still_holds`).
_CHECKS = 3

OnChange = Callable[[frozenset[Member], frozenset[Member]], None]


class Membership:
    """Registration, heartbeat and held leases of one agent."""

    def __init__(self, config: ClusterConfig, store: RunStore) -> None:
        """`store`: a PostgreSQL run store opened for this membership alone."""
        self.config = config
        self.name = config.agent
        self.store = store
        self.leases = ClusterStore(store, config.agent, config.lease_ttl)
        self.settings = Settings(config.lease_ttl, config.affinity_hash(), SHARDING_VERSION)
        self.agreement = Agreement(None, None)  # as of the last look at the live set
        self.mismatch: tuple[Mismatch, ...] = ()  # this agent's settings vs the agreed
        self.on_change: OnChange | None = None
        self._held: dict[str, Lease] = {}
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: frozenset[Member] | None = None
        self.draining = False
        self.renew_failures = 0  # heartbeats or lease renewals that failed (metrics)
        self.owned = 0  # units this agent owned in its last pass (metrics)
        self.beats = 0
        self.generation = 0  # one more on every change of the live set a look found

    @property
    def interval(self) -> float:
        return self.config.lease_ttl / 3

    def join(self) -> None:
        """Register (StoreError if the name is in use) and start the heartbeat; once."""
        if self._thread is not None:
            return
        self.leases.register(
            self.config.labels, pid=os.getpid(), host=socket.gethostname(), settings=self.settings
        )
        self._live = self.live()
        self._thread = threading.Thread(target=self._beat, name="cluster-heartbeat", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the heartbeat; leases still held are released and the agent counted out at
        once (so the others need not wait one TTL)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)
            try:
                self.leases.release_all()
                self.leases.set_draining(True)
            except AgentError as exc:
                log.warning("cluster: could not hand over at stop: %s", exc.message)
        self.store.close()

    def stop_heartbeat(self) -> None:
        """No more heartbeats (the leases held run out within one TTL); `close` also."""
        self._stop.set()

    def drain(self) -> None:
        """Take no more units; count this agent out (the running unit's lease is released
        when the unit ends)."""
        self.draining = True
        self.leases.set_draining(True)

    def live(self) -> frozenset[Member]:
        """The live agents now (heartbeat within their TTL, not draining) that share the
        agreed settings; updates `agreement` and `mismatch`."""
        agents = self.leases.agents()
        agreement = agree(agents)
        self._agreed(agreement)
        return frozenset(
            Member.of(a.name, a.labels) for a in agents if a.name in agreement.agreeing
        )

    def _agreed(self, agreement: Agreement) -> None:
        mismatch = agreement.mismatches(self.settings)
        with self._lock:
            before, self.mismatch, self.agreement = self.mismatch, mismatch, agreement
        if mismatch and mismatch != before:
            log.error(
                "cluster: agent %s takes no lease: %s; give every agent the same cluster"
                " settings (docs/scale-out.md)",
                self.name,
                agreement.explain(mismatch),
            )
        elif before and not mismatch:
            log.warning("cluster: agent %s agrees with the live agents again", self.name)

    def refusal(self) -> str | None:
        """Why this agent takes no lease now, or None when it may."""
        with self._lock:
            mismatch, agreement = self.mismatch, self.agreement
        if not mismatch:
            return None
        return f"agent {self.name} takes no lease: {agreement.explain(mismatch)}"

    @property
    def live_count(self) -> int:
        """How many agents were live at the last look (metrics)."""
        return len(self._live or ())

    def agents(self) -> list[AgentRow]:
        return self.leases.agents()

    # --- leases ---------------------------------------------------------------------

    def acquire(self, unit: str) -> Lease | Refused:
        lease = self.leases.acquire(unit)
        if isinstance(lease, Lease):
            with self._lock:
                self._held[unit] = lease
                self._lost.discard(unit)
        return lease

    def still_holds(self, unit: str) -> bool:
        """Check the unit's lease against the store now (token compare, renewing it).

        The check proves the lease only for one TTL from when it was SENT (the renewal
        happened at some point after that): an answer that came back later than half a TTL
        (the store was away and the commit was looked up after a reconnect) may describe a
        lease that has run out since, and been taken over. It is asked again; an unchanged
        token then proves that no other agent held the unit in between."""
        with self._lock:
            lease = self._held.get(unit)
            if lease is None or unit in self._lost:
                return False
        held = False
        for _ in range(_CHECKS):
            sent = time.monotonic()
            try:
                held = self.leases.check(lease)
            except AgentError as exc:
                log.warning("cluster: the lease of %s could not be checked: %s", unit, exc.message)
                held = False
            took = time.monotonic() - sent
            if not held or took < self.config.lease_ttl / 2:
                break
            log.warning(
                "cluster: the lease check of %s took %.1fs (lease TTL %gs): checking again",
                unit,
                took,
                self.config.lease_ttl,
            )
            held = False  # not proven unless a later check answers in time
        if not held:
            with self._lock:
                self._lost.add(unit)
                self.renew_failures += 1
        return held

    def token_of(self, unit: str) -> int | None:
        """The fencing token of the unit's lease this agent took (held, or lost and not yet
        released); None when it took none. The store records the unit's current state only
        under this token (RunStore.lease_token)."""
        with self._lock:
            lease = self._held.get(unit)
        return lease.token if lease is not None else None

    def release(self, unit: str) -> None:
        with self._lock:
            lease = self._held.pop(unit, None)
            self._lost.discard(unit)
        if lease is not None:
            self.leases.release(lease)

    def held(self) -> dict[str, int]:
        with self._lock:
            return {unit: lease.token for unit, lease in self._held.items()}

    # --- the heartbeat --------------------------------------------------------------

    def _beat(self) -> None:
        # Writes every TTL/3; looks at the live set twice as often (a dead agent is seen
        # at most TTL/6 after its last heartbeat ran out, not TTL/3).
        ticks = itertools.count()
        while not self._stop.wait(self.interval / 2):
            try:
                if next(ticks) % 2:
                    self.beat()
                else:
                    self.look()
            except Exception:  # the thread must outlive a bad beat (the store down)
                log.exception("cluster: heartbeat failed")

    def beat(self) -> None:
        """One heartbeat: renew, then look at the live set."""
        try:
            lost = self.leases.heartbeat(self.held())
        except AgentError as exc:
            self.renew_failures += 1
            log.warning("cluster: heartbeat not written: %s", exc.message)
            return
        self.beats += 1
        if lost:
            self.renew_failures += len(lost)
            log.warning("cluster: lease lost (another agent took it): %s", ", ".join(lost))
            with self._lock:
                self._lost.update(lost)
        self.look()

    def look(self) -> None:
        """Compare the live set with the last one; on a change, end the runs of agents
        found dead and tell `on_change`."""
        now = self.live()
        before, self._live = self._live, now
        if before is not None and now != before:
            self.generation += 1
            gone = sorted(m.name for m in before - now)
            came = sorted(m.name for m in now - before)
            log.info(
                "cluster: live agents changed (left: %s; joined: %s)",
                ", ".join(gone) or "none",
                ", ".join(came) or "none",
            )
            for agent in self.leases.agents():
                dead = agent.heartbeat_age >= agent.ttl  # by its own TTL
                if agent.name in gone and dead and agent.name != self.name:
                    self.leases.end_runs_of(
                        agent.name, f"agent {agent.name} stopped beating during this pass"
                    )
            if self.on_change is not None:
                self.on_change(before, now)
