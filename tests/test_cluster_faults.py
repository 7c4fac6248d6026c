"""Failures with `cluster:` on (docs/scale-out.md, "What happens when something fails"):
PostgreSQL restarts in the middle of a pass, one agent is cut off from PostgreSQL by the
network (a TCP forwarder between it and the server, tests/support/tcpcut.py), and the
answer to a lease check is lost. Agents are Reconcilers in this process (each with a state
directory of its own, as on its own bastion) on a real PostgreSQL run store; Terraform
state is in PostgreSQL's `pg` backend on the session's server, which the agents always
reach: what stops a cut-off agent is its lease, not a lost state backend.

Each unit's resource appends "VERSION CWD" to a marker file at the END of its apply, so a
line is one complete apply and names the agent whose work area ran it. No mocks.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.config.cluster import ClusterConfig
from agent.engine.clustermode import ClusterMode
from agent.engine.clusterpass import LEASE_LOST
from agent.engine.membership import Membership
from agent.engine.reconcile import PassRequest, PassResult, Reconciler
from agent.engine.sharding import Member, assign
from agent.errors import AgentError, LeaseLostError
from agent.state.cluster import Lease
from agent.state.store import RunStore, UnitOutcome, UnitStatus
from tests.support.infra import InfraRepo, write_host_config
from tests.support.postgres import PostgresCluster, server_bin
from tests.support.tcpcut import TcpCut

TTL = 2.0
_numbers = itertools.count(1)


def stack(unit: str, marker: Path, version: str, *, gated: bool = False, seconds: float = 0) -> str:
    """A resource replaced on each version; its apply writes `marker`.started first and its
    line at the end. `gated`: planning (and applying) it reads the FIFO `gate-UNIT` in the
    agent's state directory first (Gate), five levels above the stack's work directory
    (STATE/units/UNIT/workdir/stacks/UNIT), so that each agent waits on a FIFO of its own."""
    root = "${abspath(path.root)}"
    gate = f'file("{root}/../../../../../gate-{unit}")'
    line = f"echo {version} {root} >> {marker}"
    return f"""
    resource "terraform_data" "once" {{
      triggers_replace = "{version}"
      input            = {gate if gated else '"open"'}
      provisioner "local-exec" {{
        command = "echo {version} > {marker}.started; sleep {seconds:g}; {line}"
      }}
    }}
    """


class Lab:
    """A store database, a state database, an infra repo, and agents made on demand."""

    def __init__(self, tmp: Path, store_url: str, state_url: str) -> None:
        self.tmp = tmp
        self.store_url = store_url
        self.state_file = self._secret("state-url", state_url)
        self.repo = InfraRepo(tmp / "git")
        self.agents: dict[str, Reconciler] = {}
        self.units: list[str] = []

    def _secret(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text + "\n")
        path.chmod(0o600)
        return path

    def push(
        self, version: str, units: list[str], *, gated: Collection[str] = (), seconds: float = 0
    ) -> str:
        """Commit `version` of `units`; the plans of those in `gated` wait on the Gate; each
        apply takes `seconds` at least."""
        self.units = units
        for unit in units:
            self.repo.write(
                f"stacks/{unit}/main.tf",
                stack(unit, self.marker(unit), version, gated=unit in gated, seconds=seconds),
            )
        lines = "\n".join(f"  - {{name: {u}, stack: stacks/{u}}}" for u in units)
        self.repo.write("gitops.yaml", f"version: 1\nunits:\n{lines}\n")
        self.repo.push(version)
        return self.repo.head()

    def agent(self, name: str, *, port: int | None = None) -> Reconciler:
        """Agent `name`; with `port`, its store connections go to that port (a forwarder)."""
        url = self.store_url
        if port is not None:
            url = url.replace(url.split("@", 1)[1].split("/", 1)[0], f"127.0.0.1:{port}")
        url_file = self._secret(f"store-url-{name}", url)
        config = write_host_config(self.tmp / f"{name}.yaml", self.repo.url, self.tmp / name)
        # A unit's first plan in `pg` locks the whole database (docs/terraform.md): four
        # units' first plans at once take turns, longer than the shared 10 s under load.
        config.write_text(
            config.read_text().replace("lock_timeout: 10s", "lock_timeout: 2m")
            + "  state_backend:\n"
            + f"    pg: {{conn_str_file: {self.state_file}, schema_prefix: st_}}\n"
            + "policy: {destroy: allow}\n"  # a new version replaces the resource
            + f"store: {{url_file: {url_file}}}\n"
            + f"cluster: {{agent: {name}, lease_ttl: {TTL:g}s}}\n"
        )
        reconciler = Reconciler(load_host_config(config))
        self.agents[name] = reconciler
        return reconciler

    def close(self) -> None:
        for reconciler in self.agents.values():
            reconciler.close()

    def marker(self, unit: str) -> Path:
        return self.tmp / f"applied-{unit}.txt"

    def applied(self, unit: str, version: str) -> list[str]:
        """The agents that applied `unit` at `version`, one per complete apply."""
        path = self.marker(unit)
        lines = path.read_text().splitlines() if path.exists() else []
        return [self._agent_of(line) for line in lines if line.split()[0] == version]

    def _agent_of(self, line: str) -> str:
        cwd = line.split(maxsplit=1)[1]
        return next(n for n in self.agents if cwd.startswith(f"{self.tmp / n}/"))

    def started(self, unit: str, version: str) -> bool:
        path = Path(f"{self.marker(unit)}.started")
        return path.exists() and path.read_text().strip() == version

    def psql(self, sql: str) -> list[list[str]]:
        command = ["psql", self.store_url, "-tAF", "|", "-c", sql]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        return [line.split("|") for line in out.splitlines() if line]


def owners(units: list[str], agents: list[str]) -> dict[str, str | None]:
    return assign(units, [Member.of(a, {}) for a in agents], ClusterConfig(agent="x"))


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


class Pass:
    """One pass of an agent in a thread: its result, or the exception it raised."""

    def __init__(self, reconciler: Reconciler) -> None:
        self.result: PassResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(reconciler,), daemon=True)
        self.thread.start()

    def _run(self, reconciler: Reconciler) -> None:
        try:
            self.result = reconciler.run_pass(PassRequest(trigger="cli"))
        except Exception as exc:  # what the daemon would log
            self.error = exc

    def join(self, timeout: float = 120) -> PassResult | BaseException:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the pass did not end"
        ended = self.result or self.error
        assert ended is not None
        return ended


def assert_ok(ended: PassResult | BaseException) -> PassResult:
    """The pass succeeded; else its units' errors."""
    assert isinstance(ended, PassResult), ended
    errors = "\n".join(f"{u}: {o.status} {o.error}" for u, o in ended.outcomes.items())
    assert ended.ok, f"{ended.error}\n{errors}"
    return ended


def run_all(agents: dict[str, Reconciler]) -> dict[str, PassResult | BaseException]:
    passes = {name: Pass(r) for name, r in agents.items()}
    return {name: p.join() for name, p in passes.items()}


class Gate:
    """Answers every read of the FIFOs `gate-UNIT` in agents' state directories (the plans
    of gated stacks) while open; one FIFO per agent and unit, so that no two Terraform
    processes read one FIFO at once, and each agent's plans can be let go on their own."""

    def __init__(self, lab: Lab, agents: Collection[str] | None = None) -> None:
        """The FIFOs of `agents` (all of the lab's by default)."""
        self.paths = [
            lab.tmp / name / f"gate-{unit}"
            for name in (lab.agents if agents is None else agents)
            for unit in lab.units
        ]
        for path in self.paths:
            os.mkfifo(path)
        self._open = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, daemon=True)
        self._thread.start()

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _feed(self) -> None:
        deadline = time.monotonic() + 300  # stops by itself
        while not self._stop.is_set() and time.monotonic() < deadline:
            if not self._open.wait(0.1):
                continue
            for path in self.paths:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # no reader now (ENXIO)
                    continue
                try:
                    os.write(fd, b"g")
                finally:
                    os.close(fd)
            time.sleep(0.1)


def live(agent: Reconciler) -> set[str]:
    assert agent.cluster is not None
    return {m.name for m in agent.cluster.membership.live()}


def unit_states(lab: Lab) -> dict[str, tuple[str, str, str]]:
    """unit -> (revision, last_status, agent of its last run)."""
    rows = lab.psql(
        "SELECT unit_state.unit, unit_state.revision, unit_state.last_status, runs.agent"
        " FROM unit_state JOIN runs ON runs.id = unit_state.last_run_id"
    )
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def assert_records_true(lab: Lab, version: str, revision: str) -> None:
    """No run recorded as succeeded that did not, no apply recorded that did not happen,
    no run left `running`."""
    rows = lab.psql("SELECT id, status FROM runs")
    assert [r for r in rows if r[1] == "running"] == []
    bad = lab.psql(
        "SELECT runs.id, unit_runs.unit, unit_runs.status FROM runs JOIN unit_runs"
        " ON unit_runs.run_id = runs.id WHERE runs.status = 'succeeded'"
        " AND unit_runs.status <> 'ok'"
    )
    assert bad == [], bad
    recorded = lab.psql(
        "SELECT unit_runs.unit, runs.agent FROM unit_runs JOIN runs ON runs.id = unit_runs.run_id"
        f" WHERE unit_runs.revision = '{revision}' AND unit_runs.status = 'ok'"
        " AND unit_runs.decision = 'apply' AND unit_runs.preview = 0"
    )
    for unit, agent in recorded:
        assert agent in lab.applied(unit, version), (unit, agent, lab.applied(unit, version))


# --- PostgreSQL restarts mid-pass ----------------------------------------------------------


@pytest.fixture(scope="module")
def store_server() -> Iterator[PostgresCluster]:
    """A server of this module's own for the run store: its test restarts it (the session's
    server keeps the Terraform state)."""
    if server_bin() is None:
        pytest.skip("no PostgreSQL server installed (tests/run.sh installs it)")
    with PostgresCluster() as pg:
        yield pg


def test_postgresql_restarting_mid_pass_is_waited_for_and_nothing_is_applied_twice(
    tmp_path: Path, postgres_cluster: PostgresCluster, store_server: PostgresCluster
) -> None:
    n = next(_numbers)
    lab = Lab(
        tmp_path,
        store_server.create_database(f"restart_{n}"),
        postgres_cluster.create_database(f"restart_state_{n}"),
    )
    units = ["net", "db", "cache", "mail"]
    split = owners(units, ["a", "b"])
    gated = [next(u for u in units if split[u] == name) for name in ("a", "b")]
    gate: Gate | None = None
    try:
        lab.push("v1", units)
        agents = {name: lab.agent(name) for name in ("a", "b")}
        gate = Gate(lab)
        for reconciler in agents.values():
            assert reconciler.cluster is not None
            reconciler.cluster.join()
        for ended in run_all(agents).values():
            assert_ok(ended)

        # Each agent has a unit applying and a unit planning (its plan waits on the gate)
        # when the server goes; the gate opens during the outage, so those units' checks
        # before apply wait for the server.
        v2 = lab.push("v2", units, gated=gated, seconds=1.5)
        passes = {name: Pass(r) for name, r in agents.items()}
        applying = [u for u in units if u not in gated]
        wait_until(lambda: any(lab.started(u, "v2") for u in applying), 90, "an apply at v2")
        store_server.pause()
        try:
            gate.open()
            time.sleep(2 * TTL)  # the outage: longer than the lease TTL
        finally:
            store_server.resume()
        ended = {name: p.join() for name, p in passes.items()}
        # Every agent waited for the store and ended its pass with a result.
        assert all(isinstance(r, PassResult) for r in ended.values()), ended
        for reconciler in agents.values():
            assert reconciler.store._db.reconnects >= 1  # type: ignore[attr-defined]

        # Passes until every unit is at v2 (a unit whose lease was lost runs again).
        for _ in range(3):
            states = unit_states(lab)
            if all(states.get(u, ("", ""))[:2] == (v2, "ok") for u in units):
                break
            run_all(agents)
        states = unit_states(lab)
        assert {u: states[u][:2] for u in units} == {u: (v2, "ok") for u in units}
        assert [len(lab.applied(u, "v1")) for u in units] == [1] * len(units)
        assert [len(lab.applied(u, "v2")) for u in units] == [1] * len(units)  # never twice
        assert_records_true(lab, "v2", v2)
    finally:
        if gate is not None:
            gate.close()
        lab.close()


# --- a network partition of one agent ------------------------------------------------------


def test_an_agent_cut_off_from_postgresql_applies_nothing_and_rejoins(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    n = next(_numbers)
    lab = Lab(
        tmp_path,
        postgres_cluster.create_database(f"cut_{n}"),
        postgres_cluster.create_database(f"cut_state_{n}"),
    )
    names = [f"unit{i}" for i in range(12)]
    split = owners(names, ["a", "b"])
    units = [u for u in names if split[u] == "a"][:2] + [u for u in names if split[u] == "b"][:1]
    mine = sorted(u for u in units if split[u] == "a")
    gates: list[Gate] = []
    with TcpCut("127.0.0.1", postgres_cluster.port) as link:
        try:
            lab.push("v1", units)
            a, b = lab.agent("a", port=link.port), lab.agent("b")
            gates += [Gate(lab, ["a"]), Gate(lab, ["b"])]
            assert a.cluster is not None and b.cluster is not None
            a.cluster.join()
            b.cluster.join()
            for ended in run_all(lab.agents).values():
                assert_ok(ended)

            v2 = lab.push("v2", units, gated=units)  # plans wait on the agent's gate
            before = set(a.layout.runs.glob("*/*/plan.json"))
            cut_off = Pass(a)
            held = a.cluster.membership.held
            wait_until(lambda: sorted(held()) == mine, 60, "a holds its units' leases")
            link.cut()  # a is mid-plan: its live connections closed, new ones refused
            cut_at = time.time()
            gates[0].open()  # a's plans end; its checks before apply wait for the store

            def planned() -> int:
                return len(set(a.layout.runs.glob("*/*/plan.json")) - before)

            wait_until(lambda: planned() == len(mine), 60, "a planned its units")
            wait_until(lambda: "a" not in live(b), 3 * TTL, "b sees a leave")
            survivor = Pass(b)
            gates[1].open()
            taken = assert_ok(survivor.join())
            assert sorted(taken.outcomes) == sorted(units)  # b ran a's units too
            took = lab.psql(
                "SELECT max(unit_runs.started_at) FROM unit_runs JOIN runs"
                f" ON runs.id = unit_runs.run_id WHERE runs.id = '{taken.run_id}'"
                f" AND unit_runs.unit IN ({','.join(repr(u) for u in mine)})"
            )[0][0]
            assert float(took) - cut_at < 3 * TTL  # one TTL after a's leases ran out
            assert cut_off.thread.is_alive()  # a waits for the store

            link.heal()
            ended = cut_off.join()
            assert isinstance(ended, PassResult), ended
            assert not ended.ok
            # (b may have marked it interrupted when a left: a records what it did)
            assert lab.psql(f"SELECT status FROM runs WHERE id = '{ended.run_id}'") == [["failed"]]
            for unit in mine:
                outcome = ended.outcomes[unit]
                assert outcome.status is UnitStatus.FAILED
                assert LEASE_LOST in (outcome.error or ""), outcome.error
            assert [lab.applied(u, "v2") for u in units] == [["b"]] * len(units)
            # a's "lease lost" is in its run's history, not over b's result.
            assert {u: unit_states(lab)[u] for u in units} == {u: (v2, "ok", "b") for u in units}

            # Healed: a beats again, is live, and takes its share back.
            wait_until(lambda: "a" in live(b), 3 * TTL, "a rejoins")
            v3 = lab.push("v3", units)
            again = {name: assert_ok(r) for name, r in run_all(lab.agents).items()}
            assert sorted(again["a"].outcomes) == mine
            assert [lab.applied(u, "v3") for u in units] == [[split[u]] for u in units]
            assert [len(lab.applied(u, "v2")) for u in units] == [1] * len(units)
            assert_records_true(lab, "v2", v2)
            assert_records_true(lab, "v3", v3)
        finally:
            link.heal()
            for gate in gates:
                gate.close()
            lab.close()


def test_a_lease_check_answered_too_late_proves_nothing_and_the_stale_result_stays_in_history(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    """The answer to a's check before apply is lost (the commit renewed the lease, then the
    network went); by the time a is back the lease has run out and b applied the unit."""
    n = next(_numbers)
    lab = Lab(
        tmp_path,
        postgres_cluster.create_database(f"late_{n}"),
        postgres_cluster.create_database(f"late_state_{n}"),
    )
    gate: Gate | None = None
    with TcpCut("127.0.0.1", postgres_cluster.port) as link:
        try:
            revision = lab.push("v1", ["app"], gated=["app"])
            a, b = lab.agent("a", port=link.port), lab.agent("b")
            gate = Gate(lab)
            assert a.cluster is not None and b.cluster is not None
            a.cluster.join()  # alone: a owns app
            cut_off = Pass(a)
            wait_until(lambda: "app" in a.cluster.membership.held(), 60, "a takes the lease")
            # The one lease write left on a's connections is its check before apply.
            a.cluster.membership.stop_heartbeat()
            link.cut_after(b"unit_leases", then=b"COMMIT")
            gate.open()
            wait_until(lambda: link.is_cut, 60, "a's check commits, and its answer is lost")

            b.cluster.join()
            wait_until(lambda: live(b) == {"b"}, 3 * TTL, "b sees a leave")
            assert_ok(Pass(b).join())
            assert lab.applied("app", "v1") == ["b"]

            link.heal()  # a's check: committed (looked up), but long after it was sent
            ended = cut_off.join()
            assert isinstance(ended, PassResult), ended
            outcome = ended.outcomes["app"]
            assert outcome.status is UnitStatus.FAILED
            assert LEASE_LOST in (outcome.error or ""), outcome.error
            assert lab.applied("app", "v1") == ["b"]  # a applied nothing
            # a's failure is in its run's history; the unit's state is still b's result.
            history = lab.psql(f"SELECT status FROM unit_runs WHERE run_id = '{ended.run_id}'")
            assert history == [["failed"]]
            assert unit_states(lab)["app"] == (revision, "ok", "b")
        finally:
            link.heal()
            if gate is not None:
                gate.close()
            lab.close()


def test_an_approval_whose_lease_was_taken_with_a_lost_answer_applies_nothing(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    """`agent approve` in a cluster applies under the unit's lease: a take of the lease whose
    answer came back only after another agent took the unit over does not run the apply."""
    url = postgres_cluster.create_database(f"approve_{next(_numbers)}")
    with TcpCut("127.0.0.1", postgres_cluster.port) as link:
        port = url.split("@", 1)[1].split("/", 1)[0]
        mode = ClusterMode(
            ClusterConfig(agent="a", lease_ttl=TTL),
            Membership(
                ClusterConfig(agent="a", lease_ttl=TTL),
                RunStore(tmp_path / "a", url=url.replace(port, f"127.0.0.1:{link.port}")),
            ),
        )
        b_config = ClusterConfig(agent="b", lease_ttl=TTL)
        other = Membership(b_config, RunStore(tmp_path / "b", url=url))
        applied: list[str] = []
        ended: dict[str, object] = {}

        def approve() -> None:
            def work() -> UnitOutcome:
                applied.append("a")
                return UnitOutcome(status=UnitStatus.OK, decision="apply")

            try:
                ended["outcome"] = mode.leased("app", work)
            except AgentError as exc:
                ended["error"] = exc

        try:
            link.cut_after(b"unit_leases", then=b"COMMIT")
            thread = threading.Thread(target=approve, daemon=True)
            thread.start()
            wait_until(lambda: link.is_cut, 30, "a's take of the lease commits, its answer lost")
            wait_until(
                lambda: isinstance(other.acquire("app"), Lease), 3 * TTL, "b takes the lease over"
            )
            link.heal()
            thread.join(60)
            assert not thread.is_alive()
            error = ended.get("error")
            assert isinstance(error, LeaseLostError), ended
            assert LEASE_LOST in error.message
            assert applied == []
        finally:
            link.heal()
            mode.close()
            other.close()
