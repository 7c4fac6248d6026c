"""New hosts soon: the daemon's look for new EC2 instances between passes.

Every `intervals.hosts` the daemon calls `HostWatch.tick()`. For each fleet whose hosts
come from EC2 (at the revision in force), it lists the instances and decides, with the
pure `schedule`:

    listed, never converged here        -> converge now (only these hosts, no full pass)
    failed before (booting, sshd down)  -> converge again once its backoff has passed
    tracked, no longer listed           -> dropped: out of status, never contacted again
    converged                           -> nothing (the passes keep it in shape)

A host that cannot be converged yet is retried after 10 s, 20 s, 40 s ... up to 10 min
(`retry_delay`), not failed for ever. The converge runs as a run of its own (trigger
`hosts`) at the revision in force, so `agent history` shows it; if a pass is running the
tick is skipped (that pass lists the instances itself).

The daemon (agent/service/daemon.py) makes one `HostWatch` and runs `tick` every
`intervals.hosts` when the host config has `hosts.aws`. It runs beside the pass worker:
everything it does that touches the checkout or the hosts holds the pass lock without
waiting, so it never runs during a pass.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from agent.config.fleet import HostsFromEc2
from agent.engine.reconcile import PassResult, Reconciler
from agent.errors import AgentError, PassBusyError
from agent.units.fleetledger import host_states, retire_hosts
from agent.units.fleettypes import FleetOutcome

log = logging.getLogger(__name__)

RETRY_BASE = 10.0
RETRY_CAP = 600.0


@dataclass(frozen=True, slots=True)
class Tracked:
    """What the watcher knows of one host of a fleet."""

    converged: bool
    attempts: int = 0  # failed converges in a row
    next_try: float = 0.0  # when a failed host is due again (clock seconds)


@dataclass(frozen=True, slots=True)
class HostsDecision:
    """What to do for one fleet at one tick."""

    converge: tuple[str, ...]  # new hosts, and failed ones whose backoff has passed
    dropped: tuple[str, ...]  # tracked hosts the inventory no longer lists
    waiting: tuple[str, ...]  # failed hosts not due yet


def retry_delay(attempts: int, *, base: float = RETRY_BASE, cap: float = RETRY_CAP) -> float:
    """Seconds before a host that failed `attempts` times in a row is tried again."""
    if attempts <= 0:
        return 0.0
    return float(min(cap, base * 2 ** min(attempts - 1, 30)))


def schedule(tracked: Mapping[str, Tracked], listed: Iterable[str], now: float) -> HostsDecision:
    """The decision for one fleet: pure, so it is tested as a table."""
    names = sorted(set(listed))
    converge, waiting = [], []
    for name in names:
        seen = tracked.get(name)
        if seen is None or (not seen.converged and seen.next_try <= now):
            converge.append(name)
        elif not seen.converged:
            waiting.append(name)
    dropped = sorted(set(tracked) - set(names))
    return HostsDecision(tuple(converge), tuple(dropped), tuple(waiting))


def after_attempt(
    previous: Tracked | None,
    ok: bool,
    now: float,
    *,
    base: float = RETRY_BASE,
    cap: float = RETRY_CAP,
) -> Tracked:
    """What is known of a host after a converge of it succeeded (`ok`) or failed."""
    if ok:
        return Tracked(converged=True)
    attempts = (previous.attempts if previous is not None else 0) + 1
    return Tracked(
        converged=False,
        attempts=attempts,
        next_try=now + retry_delay(attempts, base=base, cap=cap),
    )


class HostWatch:
    """Looks for new instances of EC2 fleets and converges only those (see above)."""

    def __init__(
        self,
        reconciler: Reconciler,
        *,
        base: float = RETRY_BASE,
        cap: float = RETRY_CAP,
        clock: Callable[[], float] = time.monotonic,
        on_result: Callable[[PassResult], None] | None = None,
    ) -> None:
        self.reconciler = reconciler
        # Metrics, notifications and forge statuses of each hosts run, as of a pass.
        self.on_result = on_result
        self.base = base
        self.cap = cap
        self.clock = clock
        self.tracked: dict[str, dict[str, Tracked]] = {}
        self._ticks = itertools.count(1)

    def tick(self) -> dict[str, HostsDecision]:
        """One look at every EC2 fleet; returns what was decided, by unit."""
        try:
            manifest = self.reconciler.manifest_in_force()
        except PassBusyError:
            return {}  # that pass lists the instances itself
        except AgentError as exc:  # the checkout cannot be read: the next pass says why
            log.warning("looking for new hosts: %s", exc.message)
            return {}
        if manifest is None:
            return {}  # no pass has taken a revision into force yet
        token = f"hostwatch-{next(self._ticks)}"  # one inventory read per unit per tick
        decisions = {}
        for unit in manifest.units:
            fleet = unit.fleet
            if fleet is None or not isinstance(fleet.hosts, HostsFromEc2):
                continue
            try:
                listed = self.reconciler.fleets.ec2.hosts(unit.name, fleet.hosts, token)
            except AgentError as exc:
                log.warning("unit %s: looking for new hosts: %s", unit.name, exc.message)
                continue
            decisions[unit.name] = self._one(unit.name, [h.name for h in listed])
        return decisions

    def _one(self, unit: str, listed: list[str]) -> HostsDecision:
        tracked = self.tracked.get(unit)
        if tracked is None:  # first look since start: what the passes converged counts
            tracked = self.tracked[unit] = {
                state["host"]: Tracked(converged=True)
                for state in host_states(self.reconciler.fleets.ledger.records, unit)
                if state.get("status") == "ok" and isinstance(state.get("host"), str)
            }
        now = self.clock()
        decision = schedule(tracked, listed, now)
        if decision.dropped:
            retired = retire_hosts(self.reconciler.fleets.ledger.records, unit, set(listed))
            for name in decision.dropped:
                tracked.pop(name, None)
            log.info("unit %s: instances gone: %s", unit, ", ".join(retired or decision.dropped))
        if not decision.converge:
            return decision
        try:
            result = self.reconciler.converge_hosts(unit, frozenset(decision.converge), wait=False)
        except PassBusyError:
            log.info("unit %s: a pass is running; new hosts are left to it", unit)
            return decision
        except AgentError as exc:  # the unit left the manifest in between, ...
            log.warning("unit %s: converging new hosts: %s", unit, exc.message)
            return decision
        if self.on_result is not None:
            self.on_result(result)
        outcome = result.outcomes.get(unit)
        ok = {
            h.host
            for h in (outcome.hosts if isinstance(outcome, FleetOutcome) else ())
            if h.status == "ok"
        }
        after = self.clock()
        for name in decision.converge:
            tracked[name] = after_attempt(
                tracked.get(name), name in ok, after, base=self.base, cap=self.cap
            )
        return decision
