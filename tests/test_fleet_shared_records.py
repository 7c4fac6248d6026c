"""A fleet's per-host records in a shared PostgreSQL store (docs/store.md, "Fleet records"):
agent A converges fleets over real SSH; agents B and C, with the same store and empty state
directories, take them over in turn and know what was put on the host before them: a hand
edit is drift (and put back: `drift: revert`) on B; on C a file the manifest dropped and a
removed fleet's file are removed, and a hand edit overwritten by a change from Git is said
so; `agent status` on B shows the host as C left it. In a cluster, a fleet that moves off a
drained agent is converged with its records. Also: a removal held by one agent is
approved on another; the records are the same on disk and in either store; concurrent
writers of one host's ledger lose nothing; the report a pass killed with SIGKILL left on
its agent's disk reaches the store at that agent's next pass. No mocks."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.config import load_host_config
from agent.config.cluster import ClusterConfig
from agent.core.fsutil import INTERRUPTED_MARKER
from agent.engine.reconcile import PassRequest, PassResult, Reconciler
from agent.engine.sharding import Member, assign
from agent.state.hostrecords import (
    DESIRED,
    GONE,
    LEDGER,
    RESULT,
    FileHostRecords,
    HostRecords,
    StoreHostRecords,
    host_records,
)
from agent.state.layout import StateLayout
from agent.state.runfiles import RunFiles
from agent.state.store import RunStore, UnitStatus
from agent.web.pages import unit_page
from tests.support.infra import InfraRepo, agent_cli, write_host_config
from tests.support.postgres import PostgresCluster
from tests.support.sshd import SshServer, chown_tree, ensure_user, make_client_key, public_key

_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    reason = SshServer.available()
    if reason:
        pytest.skip(reason)
    ensure_user()
    key = make_client_key(tmp_path_factory.mktemp("keys") / "id_ed25519")
    with SshServer() as web1:
        web1.add_authorized_key(web1.user, public_key(key))
        yield {"web1": web1, "key": key}


@pytest.fixture
def world(server: dict, tmp_path: Path, postgres_cluster: PostgresCluster) -> Iterator[dict]:
    root = Path(tempfile.mkdtemp(prefix="gitops-shared-", dir="/tmp"))  # the host's files
    chown_tree(root, server["web1"].user)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(server["web1"].known_hosts_line() + "\n")
    url = postgres_cluster.create_database(f"fleet_records_{next(_numbers)}")
    url_file = tmp_path / "store-url"
    url_file.write_text(url + "\n")
    url_file.chmod(0o600)
    repo = InfraRepo(tmp_path / "git")

    def settings(destroy: str, cluster: str = "") -> str:
        return f"""\
            control_socket: {tmp_path}/none.sock
            store: {{url_file: {url_file}}}
            hosts:
              key_file: {server["key"]}
              known_hosts: {known_hosts}
              connect_timeout: 3s
            policy: {{prune: auto, destroy: {destroy}}}
            {cluster}
            """

    # Agents a, b and c apply removals; agent `hold` holds them for `agent approve`.
    configs = {
        name: write_host_config(tmp_path / f"{name}.yaml", repo.url, tmp_path / name, settings(d))
        for name, d in (("a", "allow"), ("b", "allow"), ("c", "allow"), ("hold", "hold"))
    }
    for name in ("x", "y"):  # agents of a cluster (scale-out.md), sharing the units out
        text = settings("allow", f"cluster: {{agent: {name}, lease_ttl: 3s}}")
        configs[name] = write_host_config(
            tmp_path / f"{name}.yaml", repo.url, tmp_path / name, text
        )
    yield {"repo": repo, "root": root, "server": server, "configs": configs, "url": url}
    shutil.rmtree(root, ignore_errors=True)


def fleet(world: dict, name: str, files: dict[str, str]) -> str:
    web1 = world["server"]["web1"]
    items = "".join(
        f"        - file: {world['root']}/{path}\n          content: {json.dumps(text)}\n"
        for path, text in files.items()
    )
    return f"""\
  - name: {name}
    drift: revert
    fleet:
      user: {web1.user}
      hosts: {{static: [{{name: web1, address: 127.0.0.1, port: {web1.port}}}]}}
      resources:
{items}"""


def push(world: dict, *units: str) -> None:
    world["repo"].write("gitops.yaml", "version: 1\nunits:\n" + "".join(units))
    world["repo"].push("change")


def run(world: dict, agent: str) -> PassResult:
    reconciler = Reconciler(load_host_config(world["configs"][agent]))
    try:
        return reconciler.run_pass(PassRequest(trigger="test"))
    finally:
        reconciler.close()


def hand_edit(path: Path, text: str) -> None:
    # As the host's user would (the files are its own): content only, mode and owner kept.
    with open(path, "r+") as handle:
        handle.truncate(0)
        handle.write(text)


def test_agent_b_takes_over_a_fleet_agent_a_converged(world: dict) -> None:
    root = world["root"]
    push(
        world,
        fleet(world, "web", {"a.conf": "a\n", "b.conf": "b\n"}),
        fleet(world, "old", {"old.conf": "old\n"}),
    )
    first = run(world, "a")
    assert first.ok, first.outcomes
    assert {p.name for p in root.iterdir()} == {"a.conf", "b.conf", "old.conf"}
    state_a, state_c = (world["configs"][n].parent / n for n in ("a", "c"))
    assert not (state_a / "hosts").exists()  # the records are in the store, not on A's disk

    # A is gone; B (empty disk) runs the same revision: the hand edit is drift, put back.
    hand_edit(root / "a.conf", "edited by hand\n")
    drift = run(world, "b")
    web = drift.outcomes["web"]
    assert web.status is UnitStatus.OK and web.drift, web
    assert web.moved == ()  # same inputs as A converged: B hashes with the store's key
    assert (root / "a.conf").read_text() == "a\n"
    assert drift.outcomes["old"].status is UnitStatus.OK and not drift.outcomes["old"].drift

    # B is gone too. A commit drops b.conf and the whole `old` fleet, and a.conf is edited
    # by hand again: C (empty disk) removes what A created, and says the change from Git
    # overwrote the hand edit (what B last converged, read from the store).
    hand_edit(root / "a.conf", "edited again\n")
    push(world, fleet(world, "web", {"a.conf": "a\n"}))
    change = run(world, "c")
    web = change.outcomes["web"]
    assert web.status is UnitStatus.OK, web
    assert web.drift_overwritten, web
    assert change.outcomes["old"].status is UnitStatus.OK, change.outcomes["old"]
    assert {p.name for p in root.iterdir()} == {"a.conf"}
    assert (root / "a.conf").read_text() == "a\n"
    assert not (state_c / "hosts").exists() and not (state_c / "units" / "web").exists()

    # `agent status` on B shows the fleet's host as C last converged it.
    status = cli(world["configs"]["b"], "status", "--json")
    units = {u["unit"]: u for u in json.loads(status)["units"]}
    (host,) = units["web"]["hosts"]
    assert (host["host"], host["status"], host["revision"]) == (
        "web1",
        "ok",
        change.revision,
    )
    assert "web1" in cli(world["configs"]["b"], "status")
    reader = RunStore(world["configs"]["b"].parent / "b", url=world["url"], read_only=True)
    try:  # and B's web page
        page = unit_page(reader, StateLayout(reader.state_dir), None, lambda sha: None, "web")
    finally:
        reader.close()
    assert [(h["host"], h["status"]) for h in page["hosts"]] == [("web1", "ok")]
    assert page["kind"] == "fleet" and "web1" in "".join(t for _, t in page["host_diff"])


def test_in_a_cluster_a_fleet_moves_off_a_drained_agent_with_its_records(world: dict) -> None:
    root = world["root"]
    push(world, fleet(world, "web", {"a.conf": "a\n", "b.conf": "b\n"}))
    owner = assign(["web"], [Member.of("x", {}), Member.of("y", {})], ClusterConfig("x"))["web"]
    other = "y" if owner == "x" else "x"
    agents = {n: Reconciler(load_host_config(world["configs"][n])) for n in ("x", "y")}
    try:
        for agent in agents.values():
            assert agent.cluster is not None
            agent.cluster.join()
        first = agents[owner].run_pass(PassRequest(trigger="test"))
        assert first.outcomes["web"].status is UnitStatus.OK, first.outcomes
        assert (root / "b.conf").exists()

        agents[owner].cluster.membership.drain()  # type: ignore[union-attr]
        push(world, fleet(world, "web", {"a.conf": "a\n"}))
        moved = agents[other].run_pass(PassRequest(trigger="test"))
    finally:
        for agent in agents.values():
            agent.close()
    assert moved.outcomes["web"].status is UnitStatus.OK, moved.outcomes
    assert {p.name for p in root.iterdir()} == {"a.conf"}  # the owner's file, removed here


def test_a_removal_held_on_one_agent_is_approved_on_another(world: dict) -> None:
    root = world["root"]
    push(world, fleet(world, "web", {"a.conf": "a\n", "b.conf": "b\n"}))
    assert run(world, "a").ok
    push(world, fleet(world, "web", {"a.conf": "a\n"}))
    held = run(world, "hold")  # an empty disk: what A created is known from the store
    assert held.outcomes["web"].status is UnitStatus.HELD, held.outcomes["web"]
    assert (root / "b.conf").exists()

    reconciler = Reconciler(load_host_config(world["configs"]["b"]))
    try:
        approved = reconciler.approve(held.run_id)
    finally:
        reconciler.close()
    assert approved.outcomes["web"].status is UnitStatus.OK, approved.outcomes["web"]
    assert {p.name for p in root.iterdir()} == {"a.conf"}
    assert run(world, "c").outcomes["web"].status is UnitStatus.OK  # nothing left owed


def test_host_records_are_the_same_on_disk_and_in_either_store(
    tmp_path: Path, open_store: Any
) -> None:
    store: RunStore = open_store()
    layout = StateLayout(tmp_path / "state")
    chosen = host_records(store, layout)
    # The default SQLite store keeps the files as they were; PostgreSQL keeps rows.
    assert isinstance(chosen, StoreHostRecords if store.postgres else FileHostRecords)
    kinds: list[HostRecords] = [FileHostRecords(layout), StoreHostRecords(store)]
    for records in kinds:
        assert records.read(LEDGER, "", "web1") is None
        records.write(RESULT, "web", "web2", {"host": "web2"})
        records.write(RESULT, "web", "web1", {"host": "web1"})
        records.write(DESIRED, "web", "web1", {"file:/a": "h1"})
        grown = records.update(LEDGER, "", "web1", lambda b: {"n": (b or {"n": 0})["n"] + 1})
        assert grown == {"n": 1} and records.update(
            LEDGER, "", "web1", lambda b: {"n": (b or {"n": 0})["n"] + 1}
        ) == {"n": 2}
        assert list(records.all(RESULT, "web")) == ["web1", "web2"]
        records.retire("web", "web2")
        assert list(records.all(RESULT, "web")) == ["web1"]
        assert records.all(GONE, "web") == {"web2": {"host": "web2"}}
        assert records.read(DESIRED, "web", "web1") == {"file:/a": "h1"}
        assert records.all(RESULT, "db") == {}
    assert (layout.root / "hosts" / "web1.json").is_file()  # the files' layout, as before
    assert (layout.unit_dir("web") / "hosts-gone" / "web2.json").is_file()


def test_writers_of_one_hosts_ledger_on_two_agents_lose_nothing(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    url = postgres_cluster.create_database("records_concurrent")
    stores = [RunStore(tmp_path / name, url=url) for name in ("a", "b")]  # two connections
    seen: list[int] = []

    def writer(store: RunStore, unit: str) -> None:
        records = StoreHostRecords(store)

        def add(found: dict[str, Any] | None) -> dict[str, Any]:
            body = found or {"objects": {}}
            seen.append(len(body["objects"]))
            threading.Event().wait(0.002)  # widen the window a lost update would need
            return {"objects": {**body["objects"], f"{unit}-{len(body['objects'])}": unit}}

        for _ in range(20):
            records.update(LEDGER, "", "web1", add)

    try:
        threads = [
            threading.Thread(target=writer, args=(store, unit))
            for store, unit in zip(stores, ("web", "db"), strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        record = StoreHostRecords(stores[0]).read(LEDGER, "", "web1")
    finally:
        for store in stores:
            store.close()
    assert record is not None
    assert len(record["objects"]) == 40, sorted(record["objects"])
    assert sorted(seen) == list(range(40))  # each writer saw the other's commit


def test_a_killed_pass_leaves_its_logs_for_its_agents_next_pass_to_store(world: dict) -> None:
    web1 = world["server"]["web1"]
    root = world["root"]
    # web1 converges first (one host at a time), then web2 runs a command that waits: the
    # agent is killed while it does, with web1's report on disk only.
    world["repo"].write(
        "gitops.yaml",
        f"""\
version: 1
units:
  - name: web
    fleet:
      user: {web1.user}
      parallelism: 1
      hosts:
        static:
          - {{name: web1, address: 127.0.0.1, port: {web1.port}}}
          - {{name: web2, address: 127.0.0.1, port: {web1.port}, roles: [slow]}}
      resources:
        - file: {root}/a.conf
          content: "a\\n"
roles:
  slow:
    - command: wait
      run: sleep 30
      creates: {root}/never
""",
    )
    world["repo"].push("a slow host")
    state_a = world["configs"]["a"].parent / "a"
    errors = state_a.parent / "agent-a.err"
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(world["configs"]["a"]), "reconcile"],
        stdout=subprocess.DEVNULL,
        stderr=errors.open("wb"),
        env={k: v for k, v in os.environ.items() if k != "GITOPS_AGENT_CONFIG"},
    )
    try:
        spool = wait_for_host_report(state_a, "web1", agent, errors)
    finally:
        agent.kill()  # SIGKILL, mid-unit: the pass records nothing more
        agent.wait(timeout=30)
    dead = spool.parent.parent.name
    push(world, fleet(world, "web", {"a.conf": "a\n"}))  # (the slow host is gone)

    # B's pass marks the run interrupted (A is gone) but has none of its files; A's next
    # pass finds them on its disk, closes the cut report and stores it.
    assert run(world, "b").ok
    with psycopg.connect(world["url"]) as db:
        status = db.execute("SELECT status FROM runs WHERE id = %s", [dead]).fetchone()
        stored = db.execute("SELECT count(*) FROM run_files WHERE run_id = %s", [dead]).fetchone()
    assert (status, stored) == (("interrupted",), (0,))
    assert run(world, "a").ok

    reader = RunStore(world["configs"]["b"].parent / "b", url=world["url"], read_only=True)
    try:
        text = RunFiles(reader).read_text(dead, "web", "hosts.txt")  # B's disk has nothing
    finally:
        reader.close()
    assert text is not None and text.startswith("== web1: 1 changed"), text
    assert "web2" not in text and text.endswith(INTERRUPTED_MARKER + "\n"), text


def wait_for_host_report(
    state: Path, host: str, agent: subprocess.Popen[bytes], errors: Path
) -> Path:
    """The spool of the fleet report once `host`'s part is in it (bounded: 60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and agent.poll() is None:
        for spool in state.glob("runs/*/web/hosts.txt.partial"):
            if spool.read_text().startswith(f"== {host}:"):
                return spool
        time.sleep(0.05)
    raise AssertionError(f"no report of {host} in time (exit {agent.poll()}): {errors.read_text()}")


def cli(config: Path, *args: str) -> str:
    done = agent_cli(config, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout
