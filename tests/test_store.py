"""The run store (on a real SQLite file, and where it holds for both, on a real PostgreSQL
database too), the pass lock and crash-safe files."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from agent.core.fsutil import INTERRUPTED_MARKER, StreamedFile, atomic_write, finish_partial
from agent.errors import PassBusyError, StoreError
from agent.state.passlock import PassLock
from agent.state.schema import MIGRATIONS, SCHEMA_VERSION
from agent.state.store import (
    RevisionStatus,
    RunStatus,
    RunStore,
    UnitOutcome,
    UnitStatus,
)
from tests.support.postgres import PostgresCluster

OpenStore = Callable[..., RunStore]


def test_store_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    state = tmp_path / "state"
    RunStore(state).close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "agent.db").stat().st_mode) == 0o600
    mode = sqlite3.connect(state / "agent.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_unit_result_moves_its_state_only_when_converged(open_store: OpenStore) -> None:
    store = open_store()
    run = store.start_run(trigger="test")
    store.finish_unit(
        run,
        "net",
        "aaa",
        UnitOutcome(status=UnitStatus.OK, decision="apply", plan_add=2, converged=True),
    )
    run2 = store.start_run(trigger="test")
    store.finish_unit(
        run2, "net", "bbb", UnitOutcome(status=UnitStatus.HELD, decision="hold", plan_destroy=1)
    )
    state = store.unit_state("net")
    assert state is not None
    assert state.revision == "aaa"  # held: still converged at the old revision
    assert state.last_status == "held" and state.last_run_id == run2
    history = store.unit_history("net")
    assert [h.run_id for h in history] == [run2, run]
    assert history[1].plan_add == 2


def test_revisions_accepted_and_rejected(open_store: OpenStore) -> None:
    store = open_store()
    assert store.current_revision() is None
    store.record_revision("aaa", RevisionStatus.ACCEPTED)
    store.record_revision("bbb", RevisionStatus.REJECTED, "gitops.yaml:3: bad")
    assert store.current_revision() == "aaa"
    assert store.revision_status("bbb") == (RevisionStatus.REJECTED, "gitops.yaml:3: bad")
    store.record_revision("bbb", RevisionStatus.ACCEPTED)  # seen again, now accepted
    assert store.current_revision() == "bbb"
    assert store.revision_status("bbb") == (RevisionStatus.ACCEPTED, None)


def test_suspensions_and_approvals(open_store: OpenStore) -> None:
    store = open_store()
    assert store.suspensions.add("app", by="ops", reason="maintenance") is True
    assert store.suspensions.add("app", by="ops") is False  # already suspended
    assert (
        set(store.suspensions.by_unit()) == {"app"}
        and store.suspensions.by_unit()["app"].by == "ops"
    )
    assert store.suspensions.remove("app") is True and store.suspensions.by_unit() == {}
    held = store.start_run(trigger="test")
    applied = store.start_run(trigger="approve")
    store.approvals.record(applied, held, ["app", "db"], by="alice")
    assert sorted(a.unit for a in store.approvals.of(held)) == ["app", "db"]


def test_a_dead_pass_is_marked_interrupted(open_store: OpenStore) -> None:
    store = open_store()
    run = store.start_run(trigger="test")
    store.start_unit(run, "net", "aaa")
    store.close()

    reopened = open_store()
    assert reopened.recover_interrupted() == [run]
    got = reopened.get_run(run)
    assert got is not None and got.status == RunStatus.INTERRUPTED
    assert reopened.unit_runs(run)[0].status == UnitStatus.INTERRUPTED
    assert reopened.recover_interrupted() == []


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    RunStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "agent.db")
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer gitops-agent"):
        RunStore(tmp_path)


def test_postgresql_migrates_from_the_first_schema_and_refuses_a_newer_one(
    postgres_cluster: PostgresCluster,
) -> None:
    url = postgres_cluster.create_database("migrations")
    with psycopg.connect(url, autocommit=True) as db:  # a store as version 1 left it
        db.execute("CREATE TABLE gitops_agent_schema (version INTEGER NOT NULL)")
        db.execute(MIGRATIONS[0].replace("REAL", "DOUBLE PRECISION"))
        db.execute("INSERT INTO gitops_agent_schema VALUES (1)")
        db.execute(
            "INSERT INTO runs (id, started_at, trigger, status) VALUES ('r-1', 1, 't', 'ok')"
        )
    store = RunStore(Path("/nonexistent"), url=url)
    try:
        run = store.get_run("r-1")
        assert run is not None and run.trigger == "t"  # the old rows are kept
        store.finish_unit(store.start_run(trigger="x"), "u", "a", UnitOutcome(UnitStatus.OK))
    finally:
        store.close()
    with psycopg.connect(url, autocommit=True) as db:
        versions = [r[0] for r in db.execute("SELECT version FROM gitops_agent_schema")]
        assert max(versions) == SCHEMA_VERSION
        db.execute("INSERT INTO gitops_agent_schema VALUES (99)")
    with pytest.raises(StoreError, match="newer gitops-agent"):
        RunStore(Path("/nonexistent"), url=url)


def test_an_unreachable_postgresql_store_is_a_clear_error_without_the_password(
    tmp_path: Path,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    url = f"postgresql://agent:hunter2-canary@127.0.0.1:{port}/agent?connect_timeout=2"
    with pytest.raises(StoreError) as caught:
        RunStore(tmp_path, url=url, retry_for=1.0)  # the agent would wait longer
    text = f"{caught.value.message} {caught.value.hint}"
    assert "PostgreSQL" in text and f"127.0.0.1:{port}" in text
    assert "hunter2-canary" not in text


def test_pass_lock_excludes_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    first = PassLock(tmp_path)
    first.acquire(wait=False)
    first.record("r-1")
    with pytest.raises(PassBusyError, match=r"pid \d+, run r-1"):
        PassLock(tmp_path).acquire(wait=False)
    with pytest.raises(PassBusyError):
        PassLock(tmp_path).acquire(wait=True, timeout=0.3)
    first.release()
    second = PassLock(tmp_path)
    second.acquire(wait=False)
    second.release()


def test_pass_lock_is_freed_when_its_holder_is_killed(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from agent.state.passlock import PassLock\n"
        "lock = PassLock(Path(sys.argv[1])); lock.acquire(wait=False); print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(PassBusyError):
            PassLock(tmp_path).acquire(wait=False)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        lock = PassLock(tmp_path)
        lock.acquire(wait=True, timeout=5)
        lock.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_atomic_write_replaces_whole_files_with_private_mode(tmp_path: Path) -> None:
    target = tmp_path / "d" / "plan.json"
    atomic_write(target, "one")
    atomic_write(target, "two")
    assert target.read_text() == "two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["plan.json"]


def test_streamed_file_is_partial_until_closed_and_recovered_with_a_marker(
    tmp_path: Path,
) -> None:
    log = StreamedFile(tmp_path / "plan.txt")
    log.write_line("Terraform will perform the following actions:")
    assert not (tmp_path / "plan.txt").exists()
    assert (tmp_path / "plan.txt.partial").read_text().startswith("Terraform will")
    # As if the pass died here: recovery finishes the file with a marker.
    finish_partial(tmp_path / "plan.txt.partial")
    text = (tmp_path / "plan.txt").read_text()
    assert text.endswith(INTERRUPTED_MARKER + "\n")
    assert not (tmp_path / "plan.txt.partial").exists()

    whole = StreamedFile(tmp_path / "apply.txt")
    whole.write_line("Apply complete!")
    whole.close()
    assert (tmp_path / "apply.txt").read_text() == "Apply complete!\n"
    assert not (tmp_path / "apply.txt.partial").exists()
