"""The `gitops_agent_cluster_*` metrics of an agent in a cluster (docs/metrics.md), read from
its membership at scrape time: nothing to keep in step between passes."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.engine.membership import Membership
from agent.state.cluster import SETTINGS

PREFIX = "gitops_agent_cluster"


class ClusterCollector(Collector):
    """Live agents, units owned, leases held, lease renewal failures, settings that differ
    from the agreed ones; label `agent`."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        m = self.membership
        labels = [m.name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["agent"])
            family.add_metric(labels, value)
            return family

        yield gauge("live_agents", "Live agents this agent saw at its last heartbeat", m.live_count)
        yield gauge("units_owned", "Units this agent owned in its last pass", m.owned)
        yield gauge("leases_held", "Unit leases this agent holds now", len(m.held()))
        yield gauge("draining", "1 while this agent is draining", int(m.draining))
        failures = CounterMetricFamily(
            f"{PREFIX}_lease_renew_failures",
            "Heartbeats and lease renewals that failed or found the lease taken over",
            labels=["agent"],
        )
        failures.add_metric(labels, m.renew_failures)
        yield failures
        differ = {x.setting for x in m.mismatch}
        mismatch = GaugeMetricFamily(
            f"{PREFIX}_settings_mismatch",
            "1 while this agent's setting differs from the live agents' agreed one (it takes"
            " no lease)",
            labels=["agent", "setting"],
        )
        for setting in (*SETTINGS, "recorded"):
            mismatch.add_metric([m.name, setting], int(setting in differ))
        yield mismatch


def register(registry: CollectorRegistry, membership: Membership) -> None:
    registry.register(ClusterCollector(membership))
