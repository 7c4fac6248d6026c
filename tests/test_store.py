"""The run store, the pass lock and crash-safe files, on a real SQLite file."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core.fsutil import INTERRUPTED_MARKER, StreamedFile, atomic_write, finish_partial
from agent.errors import PassBusyError, StoreError
from agent.state.passlock import PassLock
from agent.state.store import (
    RevisionStatus,
    RunStatus,
    RunStore,
    UnitOutcome,
    UnitStatus,
)


def test_store_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    state = tmp_path / "state"
    RunStore(state).close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "agent.db").stat().st_mode) == 0o600
    mode = sqlite3.connect(state / "agent.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_unit_result_moves_its_state_only_when_converged(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
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


def test_revisions_accepted_and_rejected(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    assert store.current_revision() is None
    store.record_revision("aaa", RevisionStatus.ACCEPTED)
    store.record_revision("bbb", RevisionStatus.REJECTED, "gitops.yaml:3: bad")
    assert store.current_revision() == "aaa"
    assert store.revision_status("bbb") == (RevisionStatus.REJECTED, "gitops.yaml:3: bad")


def test_a_dead_pass_is_marked_interrupted(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    run = store.start_run(trigger="test")
    store.start_unit(run, "net", "aaa")
    store.close()

    reopened = RunStore(tmp_path)
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
