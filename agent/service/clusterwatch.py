"""The daemon's side of a cluster: a pass when the live agents change and this agent gains
units (failover within one lease TTL), and draining before a stop (docs/scale-out.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.config import Manifest
from agent.engine.clustermode import ClusterMode
from agent.engine.sharding import Member, assign

# A part of the daemon: its lines say `daemon:` as the rest of it does.
log = logging.getLogger("agent.service.daemon")


def gained_units(
    units: list[str], before: frozenset[Member], after: frozenset[Member], cluster: ClusterMode
) -> list[str]:
    """The units this agent owns with the live set `after` and did not with `before`."""
    me = cluster.name
    old = assign(units, before, cluster.config)
    new = assign(units, after, cluster.config)
    return sorted(u for u in units if new[u] == me and old[u] != me)


class ClusterWatch:
    """Queues a `cluster` pass when a change of the live set gives this agent units."""

    def __init__(
        self,
        cluster: ClusterMode,
        manifest: Callable[[], Manifest | None],
        queue_pass: Callable[[], object],
    ) -> None:
        self.cluster = cluster
        self._manifest = manifest
        self._queue_pass = queue_pass
        cluster.membership.on_change = self.changed

    def changed(self, before: frozenset[Member], after: frozenset[Member]) -> None:
        manifest = self._manifest()
        if self.cluster.membership.draining:
            return
        if manifest is None:  # no pass has loaded one yet: the first pass covers it
            return
        gained = gained_units(list(manifest.names()), before, after, self.cluster)
        if gained:
            log.info("cluster: this agent gained %s: a pass now", ", ".join(gained))
            self._queue_pass()
