"""The `gitops_agent_cluster_*` metrics of an agent in a cluster (docs/metrics.md), read from
its membership at scrape time: nothing to keep in step between passes."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.engine.membership import Membership

PREFIX = "gitops_agent_cluster"


class ClusterCollector(Collector):
    """Live agents, units owned, leases held, lease renewal failures; label `agent`."""

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


def register(registry: CollectorRegistry, membership: Membership) -> None:
    registry.register(ClusterCollector(membership))
