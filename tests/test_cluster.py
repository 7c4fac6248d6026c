"""Scale-out mode in one process: several Reconcilers (each its own state dir, as on its own
bastion) share a real PostgreSQL run store, and Terraform state in PostgreSQL's `pg`
backend on the same server. They split the units, each unit runs under a lease, a lease
taken over stops the old holder before apply, a dependency another agent runs is waited
for, and a drained agent's units move.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.cli.views import render_status, status_view
from agent.config import load_host_config
from agent.config.cluster import ClusterConfig
from agent.engine.clusterpass import LEASE_LOST
from agent.engine.reconcile import PassRequest, PassResult, Reconciler
from agent.engine.sharding import Member, assign
from agent.state.cluster import Lease, Refused
from agent.state.store import UnitStatus
from tests.support.infra import InfraRepo, write_host_config
from tests.support.postgres import PostgresCluster

_numbers = itertools.count(1)


def marked_stack(marker: Path, gate: Path | None = None) -> str:
    """One resource whose creation appends a line to `marker` (an apply is counted); with
    `gate`, the plan reads that FIFO first, so it waits until the test writes to it."""
    gated = f'file("{gate}")' if gate else '"v1"'
    return f"""
    resource "terraform_data" "once" {{
      input = {gated}
      provisioner "local-exec" {{
        command = "echo applied >> {marker}"
      }}
    }}
    """


class Cluster:
    """One store database, one infra repo, and agents made on demand."""

    def __init__(self, tmp: Path, pg: PostgresCluster) -> None:
        self.tmp = tmp
        self.url = pg.create_database(f"cluster_{next(_numbers)}")
        self.url_file = tmp / "store-url"
        self.url_file.write_text(self.url + "\n")
        self.url_file.chmod(0o600)
        self.repo = InfraRepo(tmp / "git")
        self.agents: list[Reconciler] = []

    def manifest(self, units: dict[str, list[str]], gates: dict[str, Path] | None = None) -> None:
        lines = ["version: 1", "units:"]
        for name, deps in units.items():
            gate = (gates or {}).get(name)
            self.repo.write(f"stacks/{name}/main.tf", marked_stack(self.marker(name), gate))
            lines.append(f"  - {{name: {name}, stack: stacks/{name}, depends_on: {deps}}}")
        self.repo.write("gitops.yaml", "\n".join(lines) + "\n")
        self.repo.push("units")

    def marker(self, unit: str) -> Path:
        return self.tmp / f"applied-{unit}.txt"

    def applies(self, unit: str) -> int:
        path = self.marker(unit)
        return path.read_text().count("applied") if path.exists() else 0

    def agent(
        self, name: str, *, ttl: str = "3s", labels: str = "{}", extra: str = ""
    ) -> Reconciler:
        config = write_host_config(self.tmp / f"{name}.yaml", self.repo.url, self.tmp / name)
        # A unit's first plan in `pg` locks the whole database (docs/terraform.md): four
        # units' first plans at once take turns, longer than the shared 10 s under load.
        config.write_text(
            config.read_text().replace("lock_timeout: 10s", "lock_timeout: 2m")
            + f"  state_backend:\n    pg: {{conn_str_file: {self.url_file}, schema_prefix: st_}}\n"
            + f"store: {{url_file: {self.url_file}}}\n"
            + f"cluster:\n  agent: {name}\n  lease_ttl: {ttl}\n  labels: {labels}\n"
            + extra
        )
        reconciler = Reconciler(load_host_config(config))
        self.agents.append(reconciler)
        return reconciler

    def close(self) -> None:
        for reconciler in self.agents:
            reconciler.close()

    def psql(self, sql: str) -> str:
        command = ["psql", self.url, "-tAc", sql]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def cluster(tmp_path: Path, postgres_cluster: PostgresCluster) -> Iterator[Cluster]:
    made = Cluster(tmp_path, postgres_cluster)
    yield made
    made.close()


def run_all(agents: dict[str, Reconciler]) -> dict[str, PassResult]:
    """One pass on every agent at once."""
    results: dict[str, PassResult] = {}

    def run(name: str, reconciler: Reconciler) -> None:
        results[name] = reconciler.run_pass(PassRequest(trigger="cli"))

    threads = [threading.Thread(target=run, args=item) for item in agents.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    assert set(results) == set(agents)
    return results


def owners(units: list[str], agents: list[str]) -> dict[str, str | None]:
    config = ClusterConfig(agent="x")
    return assign(units, [Member.of(a, {}) for a in agents], config)


def feed(gate: Path, thread: threading.Thread, timeout: float = 120) -> None:
    """Answer every read of the FIFO `gate` with "v1" until `thread` ends."""
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        try:
            fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader yet (ENXIO)
            time.sleep(0.05)
            continue
        try:
            os.write(fd, b"v1")
        finally:
            os.close(fd)
        time.sleep(0.2)
    thread.join(5)
    assert not thread.is_alive()


def wait_until(predicate: Callable[[], object], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


def test_three_agents_split_the_units_and_each_runs_once(cluster: Cluster) -> None:
    units = ["net", "db", "cache", "mail"]  # one agent runs two, the others one each
    cluster.manifest({u: [] for u in units})
    agents = {name: cluster.agent(name) for name in ("a", "b", "c")}
    for reconciler in agents.values():
        assert reconciler.cluster is not None
        reconciler.cluster.join()  # all three live before any pass picks its share
    results = run_all(agents)

    expected = owners(units, list(agents))
    for name, result in results.items():
        assert result.ok, result.error or {u: o.error for u, o in result.outcomes.items()}
        assert sorted(result.outcomes) == sorted(u for u in units if expected[u] == name)
    assert [cluster.applies(u) for u in units] == [1] * len(units)
    # Which agent ran what is in the store, for `agent history` on any host.
    ran = cluster.psql(
        "SELECT unit_runs.unit || '=' || runs.agent FROM unit_runs JOIN runs"
        " ON runs.id = unit_runs.run_id ORDER BY unit_runs.unit"
    ).split()
    assert ran == sorted(f"{u}={expected[u]}" for u in units)
    # `agent status` on any of them says which agent ran each unit last.
    view = status_view(agents["a"].store)
    assert {u["unit"]: u["agent"] for u in view["units"]} == expected
    table = render_status(view).splitlines()
    header = next(line for line in table if line.startswith("UNIT"))
    assert header.split()[-1] == "AGENT"
    for unit in units:
        row = next(line for line in table if line.split()[:1] == [unit])
        assert row.split()[-1] == expected[unit], row

    # A second round: nothing to do anywhere, nothing applied again.
    again = run_all(agents)
    assert all(r.ok for r in again.values())
    assert [cluster.applies(u) for u in units] == [1] * len(units)


def test_a_lease_another_live_agent_holds_is_not_taken(cluster: Cluster) -> None:
    cluster.manifest({"app": []})
    a = cluster.agent("a", labels="{role: main}", extra='  affinity: {"*": {role: main}}\n')
    b = cluster.agent("b")
    assert a.cluster is not None and b.cluster is not None
    a.cluster.join()
    b.cluster.join()
    held = b.cluster.membership.acquire("app")  # b thinks app is its own (an older view)
    assert isinstance(held, Lease)

    result = a.run_pass(PassRequest(trigger="cli"))

    assert "app" not in result.outcomes
    assert any("agent b holds its lease" in w for w in result.warnings), result.warnings
    assert cluster.applies("app") == 0
    refused = a.cluster.membership.leases.acquire("app")
    assert isinstance(refused, Refused) and refused.holder == "b"


def test_an_expired_lease_is_taken_over_and_the_old_holder_applies_nothing(
    cluster: Cluster,
) -> None:
    gate = cluster.tmp / "gate"
    os.mkfifo(gate)
    cluster.manifest({"app": []}, gates={"app": gate})
    a = cluster.agent("a", ttl="1s")
    b = cluster.agent("b", ttl="1s")
    assert a.cluster is not None and b.cluster is not None
    a.cluster.join()
    results: dict[str, PassResult] = {}
    thread = threading.Thread(target=lambda: results.update(a=a.run_pass(PassRequest())))
    thread.start()
    try:
        # a holds the lease and plans (its plan waits on the gate); then it is cut off:
        # its heartbeat stops, as on a bastion whose network went away.
        wait_until(lambda: "app" in a.cluster.membership.held(), what="a takes the lease")
        a.cluster.membership.stop_heartbeat()
        first = a.cluster.membership.held()["app"]

        def taken() -> bool:
            return isinstance(b.cluster.membership.leases.acquire("app"), Lease)

        wait_until(taken, timeout=10, what="b takes the run-out lease over")
    finally:
        feed(gate, thread)  # let a's plan go on (to its check before apply)

    outcome = results["a"].outcomes["app"]
    assert outcome.status is UnitStatus.FAILED
    assert LEASE_LOST in (outcome.error or "")
    assert cluster.applies("app") == 0  # nothing applied
    states = cluster.psql("SELECT count(*) FROM st_app.states WHERE data LIKE '%terraform_data%'")
    assert states in ("", "0")  # the Terraform state has no resource: unchanged
    tokens = cluster.psql("SELECT agent || ':' || token FROM unit_leases WHERE unit = 'app'")
    assert tokens == f"b:{first + 1}"


def test_a_dependency_another_agent_owns_is_awaited_at_the_same_revision(
    cluster: Cluster,
) -> None:
    # Names whose owners differ between a and b: base on b, app (depends on it) on a.
    pairs = [(f"base{i}", f"app{i}") for i in range(50)]
    base, app = next((x, y) for x, y in pairs if owners([x, y], ["a", "b"]) == {x: "b", y: "a"})
    cluster.manifest({base: [], app: [base]})
    a, b = cluster.agent("a"), cluster.agent("b")
    assert a.cluster is not None and b.cluster is not None
    a.cluster.join()
    b.cluster.join()
    results: dict[str, PassResult] = {}
    thread = threading.Thread(target=lambda: results.update(a=a.run_pass(PassRequest())))
    thread.start()
    try:
        time.sleep(1.0)  # (a's pass is waiting: it cannot have run app without base)
        assert cluster.applies(app) == 0
        results["b"] = b.run_pass(PassRequest())
    finally:
        thread.join(120)
    assert results["b"].ok and sorted(results["b"].outcomes) == [base]
    assert results["a"].ok, results["a"].error
    assert sorted(results["a"].outcomes) == [app]  # base's result was read, not recorded
    assert results["a"].outcomes[app].status is UnitStatus.OK
    assert cluster.marker(base).stat().st_mtime <= cluster.marker(app).stat().st_mtime


def test_a_drained_agent_hands_its_units_over(cluster: Cluster) -> None:
    units = ["net", "db", "cache"]
    cluster.manifest({u: [] for u in units})
    a, b = cluster.agent("a"), cluster.agent("b")
    assert a.cluster is not None and b.cluster is not None
    a.cluster.join()
    b.cluster.join()
    first = b.run_pass(PassRequest())
    assert first.ok and 0 < len(first.outcomes) < len(units)  # b's share only

    a.cluster.membership.drain()
    drained = a.run_pass(PassRequest())
    assert drained.outcomes == {}  # a takes no unit
    result = b.run_pass(PassRequest())
    assert result.ok and sorted(result.outcomes) == sorted(units)
    assert [cluster.applies(u) for u in units] == [1] * len(units)


def test_rendezvous_moves_only_a_leaving_agents_units_and_keeps_affinity() -> None:
    units = [f"unit-{i}" for i in range(200)]
    config = ClusterConfig(agent="x", affinity=(("prod-*", {"zone": "a"}),))
    three = [Member.of("a", {"zone": "a"}), Member.of("b", {}), Member.of("c", {})]
    before = assign(units, three, config)
    assert set(before.values()) == {"a", "b", "c"}  # spread over all three
    assert min(list(before.values()).count(n) for n in "abc") > 40
    after = assign(units, three[:2], config)  # c leaves
    assert all(after[u] == before[u] for u in units if before[u] != "c")
    # A unit whose affinity no live agent matches has no owner (reported, not run).
    prod = assign(["prod-db"], three, config)
    assert prod == {"prod-db": "a"}
    assert assign(["prod-db"], three[1:], config) == {"prod-db": None}


def test_the_cluster_metrics_docs_metrics_md_names_exist(cluster: Cluster) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from agent.service.clustermetrics import register

    a = cluster.agent("a")
    assert a.cluster is not None
    a.cluster.join()
    registry = CollectorRegistry()
    register(registry, a.cluster.membership)
    text = generate_latest(registry).decode()
    page = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    names = set(re.findall(r"\bgitops_agent_cluster_[a-z_]+", page))
    assert len(names) == 6
    assert [n for n in sorted(names) if not re.search(rf"^{n}\{{", text, re.M)] == []
    assert 'gitops_agent_cluster_live_agents{agent="a"} 1.0' in text
