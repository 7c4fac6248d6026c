"""A PostgreSQL run store outlives a dropped connection and a server restart: statements
and whole transactions run again on a new connection, a transaction whose reads would come
back different is refused, the pass lock is taken again (or its loss is an error), and a
server that is down is a clear error, never a traceback. A real server (tests/support)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, PassResult, Reconciler
from agent.errors import StoreError
from agent.state.pgconn import _PASS_LOCK
from agent.state.store import RunStatus, RunStore, UnitOutcome, UnitStatus
from agent.units.decide import Decision
from tests.support.infra import InfraRepo, write_host_config
from tests.support.postgres import PostgresCluster, server_bin


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    """A cluster of this module's own: its tests stop and start it."""
    if server_bin() is None:
        pytest.skip("no PostgreSQL server installed (tests/run.sh installs it)")
    with PostgresCluster() as pg:
        yield pg


_numbers = iter(range(1, 1000))


@pytest.fixture
def url(cluster: PostgresCluster) -> str:
    return cluster.create_database(f"reconnect_{next(_numbers)}")


def drop_sessions(url: str) -> int:
    """End the store's sessions from outside, as a failover or a network cut does."""
    with psycopg.connect(url, autocommit=True) as db:
        rows = db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


def test_a_transaction_cut_in_the_middle_is_made_whole_once(tmp_path: Path, url: str) -> None:
    store = RunStore(tmp_path, url=url)
    try:
        run = store.start_run(trigger="cli")
        with store.transaction() as db:
            db.execute("INSERT INTO agent_state (key, value) VALUES ('a', '1')")
            assert drop_sessions(url) == 1
            db.execute("INSERT INTO agent_state (key, value) VALUES ('b', '2')")
        store.finish_unit(run, "app", "abc", UnitOutcome(status=UnitStatus.OK, decision="apply"))
        assert store.query("SELECT key, value FROM agent_state WHERE key IN ('a', 'b')") == [
            ("a", "1"),
            ("b", "2"),
        ]
        assert [r.status for r in store.unit_runs(run)] == ["ok"]
        assert store._db.reconnects == 1  # type: ignore[attr-defined]
    finally:
        store.close()


def test_a_transaction_whose_reads_changed_meanwhile_is_refused(tmp_path: Path, url: str) -> None:
    store = RunStore(tmp_path, url=url)
    try:
        store.suspensions.add("app", reason="first")
        refused = pytest.raises(StoreError, match="changed while the server was away")
        with refused, store.transaction() as db:
            seen = db.execute("SELECT reason FROM suspended_units").fetchall()
            drop_sessions(url)
            with psycopg.connect(url, autocommit=True) as other:
                other.execute("UPDATE suspended_units SET reason = 'someone else'")
            db.execute("UPDATE suspended_units SET reason = ?", (f"{seen[0][0]}+1",))
        assert store.suspensions.by_unit()["app"].reason == "someone else"  # nothing half-written
    finally:
        store.close()


def test_the_pass_lock_survives_a_restart_unless_another_agent_takes_it(
    tmp_path: Path, cluster: PostgresCluster, url: str
) -> None:
    store = RunStore(tmp_path, url=url)
    try:
        with store.exclusive(wait=False):
            cluster.pause()
            cluster.resume()
            run = store.start_run(trigger="cli")  # waits for the server, locks again
            with psycopg.connect(url, autocommit=True) as other:
                held = other.execute("SELECT pg_try_advisory_lock(%s)", [_PASS_LOCK]).fetchone()
                assert held == (False,)  # still this agent's
            drop_sessions(url)
            with psycopg.connect(url, autocommit=True) as other:
                other.execute("SELECT pg_advisory_lock(%s)", [_PASS_LOCK])  # another agent
                with pytest.raises(StoreError, match="another agent took the pass lock"):
                    store.finish_run(run, RunStatus.SUCCEEDED)
                assert store.get_run(run).status == RunStatus.RUNNING  # type: ignore[union-attr]
    finally:
        store.close()


def test_a_server_that_is_down_is_waited_for_then_a_clear_error(
    tmp_path: Path, cluster: PostgresCluster, url: str
) -> None:
    cluster.pause()
    try:
        config = write_host_config(tmp_path / "agent.yaml", "file:///nowhere", tmp_path / "s")
        url_file = tmp_path / "store-url"
        url_file.write_text(url + "\n")
        url_file.chmod(0o600)
        config.write_text(config.read_text() + f"store:\n  url_file: {url_file}\n  retry_for: 2s\n")
        env = {k: v for k, v in os.environ.items() if k != "GITOPS_AGENT_CONFIG"}
        for command in ("status", "run"):  # a reading command, and the agent itself
            started = time.monotonic()
            ended = subprocess.run(
                [sys.executable, "-m", "agent.cli", "--config", str(config), command],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env=env,
            )
            assert ended.returncode != 0, command
            assert "could not open the run store" in ended.stderr, ended.stderr
            assert "Traceback" not in ended.stderr
            assert time.monotonic() - started < 30
        assert "not reachable" in ended.stderr  # the agent said it was waiting
        # A writer (the agent) waits for the server to come back.
        threading.Timer(1.0, cluster.resume).start()
        store = RunStore(tmp_path / "s", url=url)
    finally:
        if not (cluster.data / "postmaster.pid").exists():
            cluster.resume()
    try:
        assert store.start_run(trigger="cli")
        assert store._db.reconnects == 0  # type: ignore[attr-defined]
    finally:
        store.close()


def sleepy_agent(tmp: Path, url: str, marker: Path) -> Reconciler:
    """An agent on the store `url` whose one stack's apply says it started, then sleeps."""
    repo = InfraRepo(tmp / "git")
    repo.write(
        "stacks/app/main.tf",
        'resource "terraform_data" "slow" {\n  input = "v1"\n'
        '  provisioner "local-exec" {\n'
        f'    command = "echo started > {marker}.started; sleep 2; echo applied >> {marker}"\n'
        "  }\n}\n",
    )
    repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    repo.push("seed")
    url_file = tmp / "store-url"
    url_file.write_text(url + "\n")
    url_file.chmod(0o600)
    config = write_host_config(tmp / "agent.yaml", repo.url, tmp / "state")
    config.write_text(config.read_text() + f"store:\n  url_file: {url_file}\n")
    return Reconciler(load_host_config(config))


def pass_in_thread(reconciler: Reconciler) -> tuple[threading.Thread, dict[str, object]]:
    ended: dict[str, object] = {}

    def run() -> None:
        try:
            ended["result"] = reconciler.run_pass(PassRequest(trigger="cli"))
        except Exception as exc:  # what the daemon would log
            ended["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, ended


def wait_for(path: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_restart_mid_pass_is_waited_for_and_the_pass_recorded_right(
    tmp_path: Path, cluster: PostgresCluster, url: str
) -> None:
    marker = tmp_path / "applied.txt"
    reconciler = sleepy_agent(tmp_path, url, marker)
    try:
        thread, ended = pass_in_thread(reconciler)
        wait_for(Path(f"{marker}.started"))
        cluster.pause()  # while Terraform applies
        cluster.resume()
        thread.join(120)
        result = ended.get("result")
        assert isinstance(result, PassResult), ended
        assert result.ok, result.error
        assert result.outcomes["app"].decision == Decision.APPLY
        run = reconciler.store.get_run(result.run_id)
        assert run is not None and run.status == RunStatus.SUCCEEDED
        [unit] = reconciler.store.unit_runs(result.run_id)
        assert (unit.status, unit.decision) == (UnitStatus.OK, Decision.APPLY)
        assert reconciler.store._db.reconnects >= 1  # type: ignore[attr-defined]
    finally:
        reconciler.close()
    assert marker.read_text() == "applied\n"


def test_a_pass_that_cannot_record_its_outcome_is_never_recorded_as_succeeded(
    tmp_path: Path, cluster: PostgresCluster, url: str
) -> None:
    marker = tmp_path / "applied.txt"
    reconciler = sleepy_agent(tmp_path, url, marker)
    reconciler.store._db.retry_for = 1.0  # type: ignore[attr-defined]
    try:
        thread, ended = pass_in_thread(reconciler)
        wait_for(Path(f"{marker}.started"))
        cluster.pause()  # and it stays down longer than the store waits
        thread.join(120)
        cluster.resume()
        # The pass stops with the store's error (the daemon logs it); nothing says it worked.
        assert isinstance(ended.get("error"), StoreError), ended
        assert "could not write to the run store" in str(ended["error"])
        runs = reconciler.store.runs()
        assert [r.status for r in runs] != [RunStatus.SUCCEEDED]
        again = reconciler.run_pass(PassRequest(trigger="cli"))
    finally:
        reconciler.close()
    assert again.ok, again.error
    statuses = {r.id: r.status for r in RunStore(tmp_path, url=url, read_only=True).runs()}
    assert statuses.pop(again.run_id) == RunStatus.SUCCEEDED
    assert list(statuses.values()) == [RunStatus.INTERRUPTED], statuses  # marked by the next
    assert marker.read_text() == "applied\n"  # applied once: the next pass found it done
