"""Agents of a cluster agree on the settings they must share (lease TTL, affinity rules,
sharding version), or the ones that differ take no lease and say so; and a lease runs out
by its holder's TTL, whatever the TTL of the agent that looks at it.

The agreement itself is a table (pure); the rest runs in-process agents on the session's
real PostgreSQL, with Terraform state in its `pg` backend, as tests/test_cluster.py does.
No mocks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.cli.cluster import cluster_view, render_cluster
from agent.engine.agreement import agree
from agent.engine.reconcile import PassRequest, PassResult
from agent.errors import AgentError
from agent.service.clustermetrics import register
from agent.state.cluster import AgentRow, ClusterStore, Lease, Refused, Settings
from agent.state.store import UnitStatus
from tests.support.postgres import PostgresCluster
from tests.test_cluster import Cluster, feed, owners, run_all, wait_until

# --- the agreement, as a table ------------------------------------------------------

S30 = Settings(30.0, "aaaa", 1)
S10 = Settings(10.0, "aaaa", 1)
OTHER_AFFINITY = Settings(30.0, "bbbb", 1)


def row(name: str, settings: Settings | None, started: float, *, live: bool = True) -> AgentRow:
    return AgentRow(
        name=name,
        labels={},
        started_at=started,
        heartbeat_age=1.0,
        draining=False,
        pid=1,
        host="h",
        live=live,
        ttl=settings.lease_ttl if settings else 30.0,
        settings=settings,
    )


AGREEMENT_CASES = [
    # (agents, agreeing, reference, {refusing agent: [(setting, its value, agreed)]})
    ([row("a", S30, 1), row("b", S30, 2)], ["a", "b"], "a", {}),
    # The larger group wins, even against the oldest agent.
    (
        [row("a", S10, 1), row("b", S30, 2), row("c", S30, 3)],
        ["b", "c"],
        "b",
        {"a": [("lease_ttl", "10s", "30s")]},
    ),
    # A tie goes to the group of the oldest agent.
    ([row("b", S30, 2), row("a", S10, 1)], ["a"], "a", {"b": [("lease_ttl", "30s", "10s")]}),
    (
        [row("a", S30, 1), row("b", OTHER_AFFINITY, 2)],
        ["a"],
        "a",
        {"b": [("affinity", "bbbb", "aaaa")]},
    ),
    # Dead agents do not vote.
    ([row("a", S10, 1, live=False), row("b", S30, 2)], ["b"], "b", {}),
    # An agent of a version that recorded no settings is a group of its own.
    (
        [row("a", S30, 1), row("b", S30, 2), row("old", None, 0)],
        ["a", "b"],
        "a",
        {
            "old": [
                (
                    "recorded",
                    "none (an older agent version)",
                    "lease_ttl=30s, affinity=aaaa, sharding=v1",
                )
            ]
        },
    ),
    ([row("a", S10, 1, live=False)], [], None, {}),
]


@pytest.mark.parametrize(("agents", "agreeing", "reference", "refusing"), AGREEMENT_CASES)
def test_the_larger_group_of_live_agents_sets_the_settings(
    agents: list[AgentRow],
    agreeing: list[str],
    reference: str | None,
    refusing: dict[str, list[tuple[str, str, str]]],
) -> None:
    got = agree(agents)
    assert list(got.agreeing) == agreeing
    assert got.reference == reference
    found = {
        name: [(m.setting, m.value, m.agreed) for m in ms] for name, ms in got.refusing.items()
    }
    assert found == refusing


# --- agents on PostgreSQL ---------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path, postgres_cluster: PostgresCluster) -> Iterator[Cluster]:
    made = Cluster(tmp_path, postgres_cluster)
    yield made
    made.close()


def metrics(reconciler: object) -> str:
    registry = CollectorRegistry()
    register(registry, reconciler.cluster.membership)  # type: ignore[attr-defined]
    return generate_latest(registry).decode()


def test_an_agent_whose_settings_differ_takes_no_lease_and_says_why(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    units = ["net", "db", "cache"]
    # A chain: one first plan at a time (the `pg` state backend's lock for creating a
    # workspace is one per database, so two first plans at once may fail on it).
    cluster.manifest({"net": [], "db": ["net"], "cache": ["db"]})
    a, b = cluster.agent("a"), cluster.agent("b")
    c = cluster.agent("c", ttl="5s")  # every other agent runs 3s
    d = cluster.agent("d", extra='  affinity: {"db": {zone: x}}\n')
    agents = {"a": a, "b": b, "c": c, "d": d}
    for reconciler in agents.values():
        assert reconciler.cluster is not None
    caplog.set_level(logging.ERROR, logger="agent.engine.membership")
    for reconciler in agents.values():
        reconciler.cluster.join()  # type: ignore[union-attr]

    results = run_all({"a": a, "b": b, "c": c})

    # a and b share every unit out between them; c runs nothing, and says why.
    for r in results.values():
        assert r.ok, {u: o.error for u, o in r.outcomes.items()}
    assert sorted([*results["a"].outcomes, *results["b"].outcomes]) == sorted(units)
    assert results["c"].outcomes == {}
    why = "cluster.lease_ttl is 5s here, 3s agreed"
    assert any(why in w for w in results["c"].warnings), results["c"].warnings
    assert [cluster.applies(u) for u in units] == [1, 1, 1]
    logged = [r.getMessage() for r in caplog.records if r.name == "agent.engine.membership"]
    assert any("agent c takes no lease" in m and why in m for m in logged), logged
    # d's affinity rules differ: both hashes named.
    refusal = d.cluster.membership.refusal()  # type: ignore[union-attr]
    ours = a.cluster.membership.settings.affinity  # type: ignore[union-attr]
    theirs = d.cluster.membership.settings.affinity  # type: ignore[union-attr]
    assert ours != theirs
    assert f"cluster.affinity (hash) is {theirs} here, {ours} agreed" in (refusal or "")
    assert a.cluster.membership.refusal() is None  # type: ignore[union-attr]
    # An approval through c is refused too (it would take a lease).
    with pytest.raises(AgentError, match="takes no lease"):
        c.cluster.leased("net", lambda: pytest.fail("ran"))  # type: ignore[union-attr]

    # `agent cluster` on any host: c and d refusing, the setting and both values named.
    view = cluster_view(a.host)
    states = {x["name"]: (x["live"], x["refusing"]) for x in view["agents"]}
    assert states == {"a": (True, False), "b": (True, False), "c": (True, True), "d": (True, True)}
    assert view["settings"]["agreeing"] == ["a", "b"]
    text = render_cluster(view)
    assert "c takes no lease: cluster.lease_ttl is 5s there, 3s agreed" in text
    assert f"d takes no lease: cluster.affinity (hash) is {theirs} there, {ours} agreed" in text
    lines = text.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("AGENT"))) + 1 :]
    rows = {x.split()[0]: x.split()[1] for x in table[: table.index("")]}
    assert rows == {"a": "live", "b": "live", "c": "refusing", "d": "refusing"}
    assert [u for x in view["agents"] if x["name"] in "cd" for u in x["units"]] == []
    # ... and from c's own host config, which differs: said too.
    assert "this host config (c): cluster.lease_ttl is 5s, 3s agreed" in render_cluster(
        cluster_view(c.host)
    )

    # The metric, per setting.
    assert 'gitops_agent_cluster_settings_mismatch{agent="c",setting="lease_ttl"} 1.0' in metrics(c)
    assert 'gitops_agent_cluster_settings_mismatch{agent="c",setting="affinity"} 0.0' in metrics(c)
    assert 'gitops_agent_cluster_settings_mismatch{agent="a",setting="lease_ttl"} 0.0' in metrics(a)


def test_a_lease_runs_out_by_its_holders_ttl(cluster: Cluster) -> None:
    cluster.manifest({"app": []})
    b = cluster.agent("b", ttl="1s")
    assert b.cluster is not None
    b.cluster.join()
    # Agent a (another bastion, TTL 30s) holds app's lease.
    a = ClusterStore(b.store, "a", 30.0)
    a.register({}, pid=1, host="elsewhere", settings=Settings(30.0, "x", 1))
    held = a.acquire("app")
    assert isinstance(held, Lease)

    # b (TTL 1s) judges it by a's TTL: refused for about 30s, not 1s.
    refused = b.cluster.membership.leases.acquire("app")
    assert isinstance(refused, Refused) and refused.holder == "a"
    assert refused.expires_in > 20
    lease = next(x for x in b.cluster.membership.leases.leases() if x.unit == "app")
    assert lease.ttl == 30.0
    # a's last heartbeat 5s ago: dead by b's TTL, live by its own.
    cluster.psql("UPDATE cluster_agents SET heartbeat_at = heartbeat_at - 5 WHERE name = 'a'")
    seen = {x.name: x.live for x in b.cluster.membership.agents()}
    assert seen["a"] is True

    # a dies (its heartbeat stops long ago) with 4s left on the lease: longer than b's
    # TTL + 1. b's pass waits the lease out by the row's own expiry, and takes it over.
    cluster.psql(
        "UPDATE cluster_agents SET heartbeat_at = heartbeat_at - 60 WHERE name = 'a';"
        " UPDATE unit_leases SET expires_at ="
        " extract(epoch FROM clock_timestamp()) + 4 WHERE unit = 'app'"
    )
    started = time.monotonic()
    result = b.run_pass(PassRequest())
    assert result.ok, result.warnings
    assert result.outcomes["app"].status is UnitStatus.OK
    assert time.monotonic() - started >= 3.5  # it waited the lease out
    assert cluster.applies("app") == 1
    ttl = cluster.psql("SELECT agent || ':' || ttl FROM unit_leases WHERE unit = 'app'")
    assert ttl == "b:1"


def test_units_of_an_agent_that_joins_during_a_pass_are_left_to_it(cluster: Cluster) -> None:
    # Agents that start together see each other a moment apart: the first pass may choose
    # every unit. Once it sees the other agent, the units that are now that agent's are
    # left to it (no unit run by both). `first` holds a's pass (its plan reads a FIFO)
    # while b joins; the others follow it in a chain (one first plan at a time: see above),
    # so they start only after a has seen b.
    chain = ["first", "u0", "u1", "u2", "u3"]
    split = owners(chain, ["a", "b"])
    assert split["first"] == "a" and {split[u] for u in chain[1:]} == {"a", "b"}
    gate = cluster.tmp / "gate"
    os.mkfifo(gate)
    cluster.manifest({u: chain[i - 1 : i] for i, u in enumerate(chain)}, gates={"first": gate})
    a, b = cluster.agent("a"), cluster.agent("b")
    assert a.cluster is not None and b.cluster is not None
    a.cluster.join()
    results: dict[str, PassResult] = {}
    first = threading.Thread(target=lambda: results.update(a=a.run_pass(PassRequest())))
    first.start()
    second = threading.Thread(target=lambda: results.update(b=b.run_pass(PassRequest())))
    try:
        wait_until(lambda: "first" in a.cluster.membership.held(), what="a plans first")
        seen = a.cluster.membership.generation
        b.cluster.join()
        wait_until(lambda: a.cluster.membership.generation > seen, timeout=10, what="a sees b")
        second.start()
    finally:
        feed(gate, first)
        second.join(120)

    for name in "ab":
        assert results[name].ok, results[name].error
        assert sorted(results[name].outcomes) == sorted(u for u in chain if split[u] == name)
        assert not [w for w in results[name].warnings if "holds its lease" in w]
    assert [cluster.applies(u) for u in chain] == [1] * len(chain)
