"""One pass of an agent in a cluster (docs/scale-out.md): which of the selected units it
runs, the lease around each, the check before apply, and waiting for a dependency another
agent runs.

- The units this agent owns (agent/engine/sharding.py, over the live agents) run here,
  each under a lease taken first. A lease another live agent holds is respected: the unit
  is left to it (a warning in the pass). A lease whose holder is dead is waited out (at
  most one TTL) and taken over.
- Immediately before anything is applied (a stack's apply, each host of a fleet) the lease
  is checked against the store, token and all: lost, the unit stops with "lease lost before
  apply; nothing applied".
- A unit that another agent came to own since the pass chose (it joined: agents that start
  together see each other a moment apart) is left to it when its turn comes, not run
  here too.
- A unit whose dependency another agent owns waits for that dependency's result at the
  same revision in the store (bounded by the dependent's timeout, and interruptible), then
  runs or is blocked as it would be after a local dependency. Those results are read, not
  recorded again: the pass's outcomes list only the units this agent ran.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.config import Manifest
from agent.config.cluster import ClusterConfig
from agent.engine.membership import Membership
from agent.engine.sharding import Member, assign, owner
from agent.errors import LeaseLostError
from agent.state.cluster import Lease
from agent.state.store import UnitOutcome, UnitStatus

log = logging.getLogger(__name__)

PRUNE_SHARD = "<prune>"  # the name whose owner prunes removed units
_WAIT_POLL = 0.5  # seconds between looks at the store for a dependency's result
LEASE_LOST = "lease lost before apply; nothing applied"
NO_LOCAL_STATE = (
    "in cluster mode a stack's Terraform state must be remote (units move between"
    " agents): set terraform.state_backend in the host config, or give the stack a"
    " backend block"
)


@dataclass
class ClusterPass:
    """The cluster's part of one pass; made when the pass's units are selected."""

    membership: Membership
    manifest: Manifest
    revision: str
    stop: threading.Event
    warn: Callable[[str], None]
    owners: dict[str, str | None] = field(default_factory=dict)
    remote: set[str] = field(default_factory=set)  # units run elsewhere, read here
    # What runs a unit here (set by the pass): for a unit gained in the middle of the pass.
    work: Callable[[str], Callable[[], UnitOutcome]] | None = None
    candidates: list[str] = field(default_factory=list)  # the pass's units, every owner's
    taken: set[str] = field(default_factory=set)  # units this pass runs (or ran) here
    _generation: int = -1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def config(self) -> ClusterConfig:
        return self.membership.config

    def select(self, names: Sequence[str]) -> list[str]:
        """Of `names` (dependency order), those this pass handles: the ones this agent
        owns, and the others that one of those depends on (their results are awaited)."""
        self.candidates = list(names)
        self._generation = self.membership.generation
        self.owners = assign(names, _members(self.membership), self.config)
        me = self.membership.name
        mine = [n for n in names if self.owners[n] == me]
        self.taken = set(mine)
        self.membership.owned = len(mine)
        chosen = set(names)
        needed = {
            d
            for n in mine
            for d in self.manifest.get_unit(n).depends_on  # type: ignore[union-attr]
            if d in chosen and self.owners.get(d) != me
        }
        if refusal := self.membership.refusal():
            self.warn(f"{refusal}: its units are left to the others")
        for name in names:
            if self.owners[name] is None:
                labels = ", ".join(f"{k}={v}" for k, v in self.config.required_labels(name).items())
                self.warn(
                    f"unit {name} not run: no live agent has the labels its affinity needs"
                    f" ({labels})"
                )
        self.remote = set(needed)
        log.info(
            "cluster: %s runs %d of %d units (%s)",
            me,
            len(mine),
            len(names),
            ", ".join(mine) or "none",
        )
        return [n for n in names if n in set(mine) | needed]

    def gained(self) -> list[str]:
        """Units this agent came to own since the pass chose (an agent died or drained in
        the middle of it), not taken yet, in dependency order: the pass runs them too
        rather than leave them to the next one."""
        if self.membership.generation == self._generation or self.membership.draining:
            return []
        self._generation = self.membership.generation
        self.owners = assign(self.candidates, _members(self.membership), self.config)
        me = self.membership.name
        with self._lock:
            # (a dependency being waited for is left to its waiter: see `wait_for`)
            new = [
                n
                for n in self.candidates
                if self.owners[n] == me and n not in self.taken and n not in self.remote
            ]
            self.taken.update(new)
            self.remote.difference_update(new)
        if new:
            log.info("cluster: %s takes over %s in this pass", me, ", ".join(new))
        return new

    def owns_prune(self) -> bool:
        return owner(PRUNE_SHARD, _members(self.membership), {}) == self.membership.name

    def is_remote(self, name: str) -> bool:
        with self._lock:
            return name in self.remote

    # --- running a unit -------------------------------------------------------------

    def run(
        self,
        name: str,
        reconcile: Callable[[], UnitOutcome],
        *,
        fail: Callable[[str], UnitOutcome],
        local_state: bool,
    ) -> UnitOutcome:
        """Run one unit this agent owns under its lease; `fail(error)` records a failure
        without running it; `local_state`: a stack whose state would stay on this host."""
        if self.membership.draining:
            return self._left(name, f"unit {name} left to the other agents: this one is draining")
        if refusal := self.membership.refusal():
            return self._left(name, f"unit {name} left to the other agents: {refusal}")
        # Looked up again as the unit starts (one query): the heartbeat thread's look at
        # the live set may be up to TTL/6 old.
        now = owner(name, _members(self.membership), self.config.required_labels(name))
        if now not in (self.membership.name, None):
            # An agent joined since the pass chose (its row was not live yet: agents that
            # start together): the unit is its own now, and it runs it. Left, not run here
            # too: every agent shards by the same live set once each has seen it.
            log.info("cluster: %s leaves %s to %s, which joined", self.membership.name, name, now)
            with self._lock:
                self.taken.discard(name)
            return self._left(name, None)
        if local_state:
            return fail(NO_LOCAL_STATE)
        lease = self._acquire(name)
        if lease is None:
            return self._left(name, None)
        if lease.took_over:
            self.warn(f"unit {name}: took over the lease of agent {lease.took_over} (stopped)")
        try:
            return reconcile()
        finally:
            self.membership.release(name)

    def _acquire(self, name: str) -> Lease | None:
        """The unit's lease, or None when another live agent holds it (warned). A dead
        holder's lease is waited out, at most one TTL."""
        deadline: float | None = None
        while True:
            got = self.membership.acquire(name)
            if isinstance(got, Lease):
                return got
            # Waited out by the lease row's own expiry (its holder's TTL), never this
            # agent's TTL; a holder that renews meanwhile is live again, and not waited for.
            deadline = deadline or time.monotonic() + got.expires_in + 1
            live = {a.name for a in self.membership.agents() if a.live}
            if got.holder in live or time.monotonic() >= deadline:
                self.warn(
                    f"unit {name} not run here: agent {got.holder} holds its lease"
                    f" (token {got.token}, {got.expires_in:.0f}s left)"
                )
                return None
            if self.stop.wait(min(max(got.expires_in, 0.05) + 0.05, 1.0)):
                return None

    def _left(self, name: str, why: str | None) -> UnitOutcome:
        if why:
            self.warn(why)
        with self._lock:
            self.remote.add(name)
        return self.wait_for(name)

    def guard(self, unit: str) -> None:
        """The check immediately before anything of `unit` is applied."""
        if not self.membership.still_holds(unit):
            raise LeaseLostError(
                f"unit {unit}: {LEASE_LOST}",
                hint="another agent took the unit over (this one was cut off or too slow);"
                " it reconciles the unit",
            )

    # --- a dependency another agent runs -------------------------------------------

    def wait_for(self, name: str) -> UnitOutcome:
        """The result of `name` at this revision, as another agent records it: waits for
        it up to the longest timeout of the units that depend on it here."""
        dependents = [u for u in self.manifest.units if name in u.depends_on]
        if not dependents:
            return UnitOutcome(status=UnitStatus.OK, decision="skip")  # nobody here waits
        timeout = max(u.timeout for u in dependents)
        if self.owners.get(name, "") is None:
            return UnitOutcome(
                status=UnitStatus.BLOCKED, error=f"no live agent may run {name} (affinity)"
            )
        deadline = time.monotonic() + timeout
        leases = self.membership.leases
        while True:
            if self.work is not None and name in self.gained_now(name):
                return self.work(name)()  # its owner died: it runs here, in this pass
            found = leases.result_at(name, self.revision)
            if found is not None:
                status, error = found
                return UnitOutcome(status=UnitStatus(status), error=error)
            if time.monotonic() >= deadline:
                return UnitOutcome(
                    status=UnitStatus.BLOCKED,
                    error=f"no result of {name} at {self.revision[:12]} from another agent"
                    f" within {timeout:g}s",
                )
            if self.stop.wait(_WAIT_POLL):
                return UnitOutcome(status=UnitStatus.INTERRUPTED, error="interrupted")

    def gained_now(self, name: str) -> set[str]:
        """`gained()`, for a dependency being waited for: whether it is this agent's now
        (the other units gained are left to the pass's loop)."""
        with self._lock:
            if name in self.taken:
                return set()
        self.owners = assign(self.candidates, _members(self.membership), self.config)
        if self.owners.get(name) != self.membership.name or self.membership.draining:
            return set()
        with self._lock:
            self.taken.add(name)
            self.remote.discard(name)
        return {name}

    def finish(self, outcomes: dict[str, UnitOutcome]) -> None:
        """Drop the results read from other agents from this pass's outcomes."""
        for name in list(outcomes):
            if self.is_remote(name):
                del outcomes[name]


def _members(membership: Membership) -> list[Member]:
    """The live agents; this one counts while it is not draining and its settings agree
    (its own heartbeat may lag a moment behind its start)."""
    live = {m.name: m for m in membership.live()}
    me = membership.name
    if membership.draining or membership.mismatch:
        live.pop(me, None)
    else:
        live[me] = Member.of(me, membership.config.labels)
    return list(live.values())
