"""A damaged, full or locked run store, and file modes, as an operator meets them.

No mocks: the real `agent` command in subprocesses, the embedded Terraform, real SQLite
files damaged the way disks and people damage them, a real tmpfs that fills up, and a
real second process holding a write transaction.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import StoreError
from agent.state import database as store_database
from agent.state import storefile
from agent.state.passlock import PassLock
from agent.state.store import SCHEMA_VERSION, RevisionStatus, RunStatus, RunStore
from agent.state.storefile import BACKUP_FILENAME, MARKER_FILENAME, StoreDamaged
from tests.support.infra import InfraRepo, write_host_config

APP_TF = """
variable "generation" {
  type    = string
  default = "1"
}
resource "terraform_data" "app" {
  input = var.generation
}
"""


def agent(
    *args: str, config: Path, umask: int | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GITOPS_AGENT_CONFIG": str(config)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def app_world(tmp_path: Path, state: Path | None = None) -> tuple[InfraRepo, Path, Path]:
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/app/main.tf", APP_TF)
    repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    repo.push("seed")
    state = state or tmp_path / "state"
    return repo, write_host_config(tmp_path / "agent.yaml", repo.url, state), state


def applied_generation(state: Path) -> str:
    tfstate = json.loads((state / "units" / "app" / "terraform.tfstate").read_text())
    (resource,) = [r for r in tfstate["resources"] if r["type"] == "terraform_data"]
    return resource["instances"][0]["attributes"]["input"]["value"]


def bump_generation(repo: InfraRepo, generation: str) -> None:
    repo.write("stacks/app/main.tf", APP_TF.replace('default = "1"', f'default = "{generation}"'))
    repo.push(f"app generation {generation}")


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


# --- item 10: a store that existed is never recreated -------------------------------------


def test_a_truncated_store_stops_the_agent_and_restore_brings_the_suspension_back(
    tmp_path: Path,
) -> None:
    """The issue's reproduction: suspend; truncate agent.db; rm -wal/-shm; push; reconcile."""
    repo, config, state = app_world(tmp_path)
    assert agent("reconcile", "--now", config=config).returncode == 0
    assert applied_generation(state) == "1"
    assert agent("suspend", "app", "--reason", "db migration", config=config).returncode == 0

    (state / "agent.db").write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        (state / f"agent.db{suffix}").unlink(missing_ok=True)
    bump_generation(repo, "2")

    refused = agent("reconcile", "--now", config=config)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    no_traceback(refused)
    assert "error[store-damaged]" in refused.stderr
    assert f"the run store {state / 'agent.db'} existed" in refused.stderr
    assert "agent store restore" in refused.stderr
    assert applied_generation(state) == "1"  # app was NOT applied
    assert (state / "agent.db").stat().st_size == 0  # and no new store was made

    check = agent("store", "check", config=config)
    assert check.returncode == 3
    assert "run store" in check.stdout and ": empty" in check.stdout
    assert "agent store restore" in check.stderr

    restored = agent("store", "restore", config=config)
    assert restored.returncode == 0, restored.stderr
    assert "restored" in restored.stdout and "from the backup taken" in restored.stdout
    assert "suspended units: app" in restored.stdout

    status = json.loads(agent("status", "--json", config=config).stdout)
    assert status["suspended"]["app"]["reason"] == "db migration"
    again = agent("reconcile", "--now", config=config)
    assert again.returncode == 0, again.stderr
    assert applied_generation(state) == "1"  # the next pass leaves app alone
    assert agent("store", "check", config=config).returncode == 0


@pytest.mark.parametrize("damage", ["missing", "empty", "half", "garbage-at-8192", "not-sqlite"])
def test_a_store_that_existed_is_never_silently_recreated(tmp_path: Path, damage: str) -> None:
    store = RunStore(tmp_path)
    for n in range(40):  # a few pages of rows, so offset 8192 lands inside the tables
        store.record_revision(f"{n:040x}", RevisionStatus.REJECTED, "bad " * 60)
    store.finish_run(store.start_run(trigger="test"), RunStatus.SUCCEEDED)
    store.suspensions.add("app", reason="held")
    store.close()
    db = tmp_path / "agent.db"
    assert db.stat().st_size > 3 * 8192
    if damage == "missing":
        db.unlink()
    elif damage == "empty":
        db.write_bytes(b"")
    elif damage == "half":
        os.truncate(db, db.stat().st_size // 2)
    elif damage == "garbage-at-8192":
        with open(db, "r+b") as handle:
            handle.seek(8192)
            handle.write(os.urandom(4096))
    else:
        db.write_bytes(b"this is not a database\n" * 10)

    with pytest.raises(StoreDamaged) as caught:
        RunStore(tmp_path)
    assert str(db) in caught.value.message
    assert caught.value.hint and "agent store restore" in caught.value.hint
    assert damage in ("missing", "empty") or db.stat().st_size > 0
    assert damage != "missing" or not db.exists()  # nothing was created in its place


def test_garbage_in_the_store_is_reported_by_every_command(tmp_path: Path) -> None:
    _, config, state = app_world(tmp_path)
    for _ in range(3):
        assert agent("reconcile", "--now", config=config).returncode == 0
    db = state / "agent.db"
    assert db.stat().st_size > 8192 + 4096
    with open(db, "r+b") as handle:
        handle.seek(8192)
        handle.write(b"\xde\xad\xbe\xef" * 1024)

    for command in (["reconcile", "--now"], ["history", "--json"], ["status"], ["store", "check"]):
        result = agent(*command, config=config)
        no_traceback(result)
        assert result.returncode == 3, (command, result.stdout, result.stderr)
        output = result.stdout + result.stderr
        assert "damaged" in output or "malformed" in output, (command, output)

    restored = agent("store", "restore", config=config)
    assert restored.returncode == 0, restored.stderr
    (kept,) = state.glob("agent.db.replaced-*[0-9]")  # the damaged file, kept for a look
    assert "kept as" in restored.stdout and str(kept) in restored.stdout
    assert agent("reconcile", "--now", config=config).returncode == 0
    assert agent("history", "--json", config=config).returncode == 0


def test_the_backup_is_private_checked_and_never_replaced_by_a_damaged_store(
    tmp_path: Path,
) -> None:
    store = RunStore(tmp_path)
    backup = tmp_path / BACKUP_FILENAME
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / MARKER_FILENAME).stat().st_mode) == 0o600
    for n in range(40):
        store.record_revision(f"{n:040x}", RevisionStatus.REJECTED, "bad " * 80)
    store.finish_run(store.start_run(trigger="test"), RunStatus.SUCCEEDED)  # refreshes it
    good = backup.read_bytes()
    assert sqlite3.connect(backup).execute("SELECT count(*) FROM revisions").fetchone()[0] == 40

    store.close()

    # A bad disk damages a page of the store; the next backup's copy fails its check.
    with open(tmp_path / "agent.db", "r+b") as handle:
        handle.seek(8192)
        handle.write(b"\x00\xff" * 2048)
    damaged = sqlite3.connect(tmp_path / "agent.db")
    with pytest.raises(StoreDamaged, match=r"the last good backup .* was kept"):
        storefile.write_backup(damaged, tmp_path)
    damaged.close()
    assert backup.read_bytes() == good
    assert not list(tmp_path.glob(".agent.db.backup*"))


def test_restore_is_refused_while_a_pass_holds_the_lock(tmp_path: Path) -> None:
    _, config, state = app_world(tmp_path)
    assert agent("reconcile", "--now", config=config).returncode == 0
    lock = PassLock(state)
    lock.acquire(wait=False)
    try:
        refused = agent("store", "restore", config=config)
    finally:
        lock.release()
    assert refused.returncode == 4
    assert "another reconcile pass is running" in refused.stderr
    no_traceback(refused)


def test_restore_without_a_backup_says_what_to_do(tmp_path: Path) -> None:
    RunStore(tmp_path).close()
    (tmp_path / BACKUP_FILENAME).unlink()
    with pytest.raises(StoreError, match="no backup"):
        storefile.restore_backup(tmp_path)


# --- item 11: disk full, for real ---------------------------------------------------------


@contextlib.contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` at `mount`, unmounted afterwards."""
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 600 KB filesystem: room for a store, not for much more."""
    with tmpfs(tmp_path / "small", "600k") as mount:
        yield mount


def fill(directory: Path, name: str = "filler") -> Path:
    """Fill the filesystem of `directory` to the last byte."""
    filler = directory / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(100_000):  # bounded: 400 MB, far more than the tmpfs holds
            try:
                os.write(fd, b"\0" * 4096)
            except OSError:
                break
        for _ in range(4096):  # the last partial block, byte by byte
            try:
                os.write(fd, b"\0")
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


def assert_disk_full(error: StoreError, state: Path) -> None:
    assert f"the disk holding the run store {state / 'agent.db'} is full" in error.message
    assert error.hint and "df -h" in error.hint


def test_a_full_disk_is_a_clear_error_and_the_store_goes_on_afterwards(small_fs: Path) -> None:
    state = small_fs / "state"
    store = RunStore(state)  # open, as the daemon keeps it, when the disk fills up
    store.suspensions.add("app")
    filler = fill(small_fs)
    with pytest.raises(StoreError) as caught:
        for n in range(1000):  # bounded: the WAL runs into the full disk long before
            store.record_revision(f"{n:040x}", RevisionStatus.REJECTED, "z" * 4000)
    assert_disk_full(caught.value, state)
    store.close()  # (closing checkpoints the WAL and frees its space)

    more = fill(small_fs, "more")
    with pytest.raises(StoreError) as caught:  # a new opener: at open, or at its first write
        again = RunStore(state)
        try:
            again.record_revision("f" * 40, RevisionStatus.REJECTED, "z" * 4000)
        finally:
            again.close()
    assert_disk_full(caught.value, state)

    filler.unlink()
    more.unlink()
    reopened = RunStore(state)  # nothing was damaged: it opens and takes writes again
    assert "app" in reopened.suspensions.by_unit()
    run = reopened.start_run(trigger="test")
    reopened.finish_run(run, RunStatus.SUCCEEDED)
    reopened.close()


def test_a_pass_on_a_full_disk_exits_with_the_reason_not_a_traceback(
    tmp_path: Path, small_fs: Path
) -> None:
    _, config, state = app_world(tmp_path, state=small_fs / "state")
    RunStore(state).close()
    fill(small_fs)
    result = agent("reconcile", "--now", config=config)
    no_traceback(result)
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"the disk holding the run store {state / 'agent.db'} is full" in result.stderr
    assert not (state / "units" / "app" / "terraform.tfstate").exists()  # nothing applied


FILL_TF = """
resource "terraform_data" "fill" {
  provisioner "local-exec" {
    command = "[ -e %(once)s ] || { touch %(once)s; head -c 100M /dev/zero > %(filler)s; }; true"
  }
}
"""


def test_a_disk_that_fills_up_mid_pass_leaves_no_run_or_unit_running(tmp_path: Path) -> None:
    """A unit's apply fills the state dir's filesystem; its result cannot be recorded."""
    with tmpfs(tmp_path / "fs", "4m") as fs:
        repo, config, state = app_world(tmp_path, state=fs / "state")
        assert agent("reconcile", "--now", config=config).returncode == 0
        repo.write(
            "stacks/filler/main.tf",
            FILL_TF % {"once": tmp_path / "filled-once", "filler": fs / "filler"},
        )
        repo.write(
            "gitops.yaml",
            "version: 1\nunits:\n  - {name: filler, stack: stacks/filler}\n"
            "  - {name: app, stack: stacks/app, depends_on: [filler]}\n",
        )
        bump_generation(repo, "2")

        full = agent("reconcile", "--now", config=config)
        no_traceback(full)
        assert full.returncode in (1, 3), full.stdout + full.stderr
        assert f"the disk holding the run store {state / 'agent.db'} is full" in full.stderr
        assert applied_generation(state) == "1"

        (fs / "filler").unlink()
        history = json.loads(agent("history", "--json", config=config).stdout)
        last = history["runs"][0]
        assert last["status"] == "failed"
        assert "running" not in last["units"].values(), last
        assert agent("reconcile", "--now", config=config).returncode == 0
        assert applied_generation(state) == "2"


# --- item 12: readers never wait on a writer ----------------------------------------------


@pytest.fixture
def writer_holding_lock(tmp_path: Path) -> Iterator[Path]:
    """A second process that holds BEGIN IMMEDIATE on agent.db until the test ends."""
    _, config, state = app_world(tmp_path)
    assert agent("reconcile", "--now", config=config).returncode == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "db.execute(\"INSERT INTO agent_state VALUES ('held', 'yes')\")\n"
            "print('holding', flush=True)\n"
            "time.sleep(120)\n",
            str(state / "agent.db"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        yield config
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", ["status", "history", "history --json", "logs app"])
def test_read_commands_answer_while_another_process_writes(
    writer_holding_lock: Path, command: str
) -> None:
    started = time.monotonic()
    result = agent(*command.split(), config=writer_holding_lock, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    # The CLI's own start-up takes about a second; a reader that waited on the writer
    # would take the 30 s busy timeout (or fail).
    assert elapsed < 15, f"{command} took {elapsed:.1f}s"


def test_a_locked_store_names_the_lock_not_permissions(
    writer_holding_lock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_database, "BUSY_TIMEOUT", 0.2)
    state = writer_holding_lock.parent / "state"
    store = RunStore(state)
    with pytest.raises(StoreError) as caught:
        store.suspensions.add("app")
    store.close()
    assert f"another agent process holds a write transaction on {state / 'agent.db'}" in (
        caught.value.message
    )
    assert caught.value.hint and "permission" not in caught.value.hint


def set_schema(state: Path, version: int) -> None:
    db = sqlite3.connect(state / "agent.db")
    db.execute(f"PRAGMA user_version={version}")
    db.commit()
    db.close()


def test_a_reader_neither_upgrades_nor_writes_the_store(tmp_path: Path) -> None:
    RunStore(tmp_path).close()
    set_schema(tmp_path, 0)
    with pytest.raises(StoreError, match="older than this gitops-agent's"):
        RunStore(tmp_path, read_only=True)
    set_schema(tmp_path, SCHEMA_VERSION)
    reader = RunStore(tmp_path, read_only=True)
    with pytest.raises(StoreError, match="read-only"):
        reader.suspensions.add("app")
    assert reader.suspensions.by_unit() == {}


# --- item 4: file modes do not depend on the umask ----------------------------------------


def loose_paths(state: Path) -> list[str]:
    """Every path under `state` that its group or others may read, write or enter."""
    loose = []
    for root, dirs, files in os.walk(state):
        for name in [*dirs, *files]:
            path = Path(root) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            if stat.S_IMODE(mode) & 0o077:
                loose.append(f"{path.relative_to(state)} {stat.S_IMODE(mode):04o}")
    if stat.S_IMODE(state.stat().st_mode) & 0o077:
        loose.append(f". {stat.S_IMODE(state.stat().st_mode):04o}")
    return loose


SLOW_TF = """
resource "terraform_data" "slow" {
  input = "1"
  provisioner "local-exec" {
    command = "sleep 8"
  }
}
"""

FAILING_TF = """
variable "size" {
  type    = number
  default = 1
}
resource "terraform_data" "bad" {
  input = var.size
  lifecycle {
    precondition {
      condition     = var.size > 5
      error_message = "the plan of this stack fails on purpose"
    }
  }
}
"""


def test_nothing_in_the_state_dir_is_readable_by_others_whatever_the_umask(
    tmp_path: Path,
) -> None:
    repo, config, state = app_world(tmp_path)
    ok = agent("reconcile", "--now", config=config, umask=0o022)
    assert ok.returncode == 0, ok.stderr

    repo.write("stacks/bad/main.tf", FAILING_TF)
    repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n"
        "  - {name: bad, stack: stacks/bad}\n",
    )
    repo.push("a stack whose plan fails")
    failed = agent("reconcile", "--now", config=config, umask=0o022)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "fails on purpose" in agent("logs", "bad", config=config).stdout

    repo.write("stacks/slow/main.tf", SLOW_TF)
    repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n"
        "  - {name: slow, stack: stacks/slow}\n",
    )
    repo.push("a slow stack")
    env = {**os.environ, "GITOPS_AGENT_CONFIG": str(config)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "reconcile", "--now"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.umask(0o022),
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(
            "local-exec" in p.read_text(errors="replace")
            for p in state.glob("runs/*/slow/apply.txt.partial")
        ):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(state.glob("runs/*/slow/apply.txt.partial")), "the pass was not killed mid-apply"

    assert loose_paths(state) == []


# --- the daemon ------------------------------------------------------------------------------


def test_the_daemon_refuses_a_damaged_store_and_restore_refuses_a_running_daemon(
    tmp_path: Path,
) -> None:
    from tests.test_daemon import AgentProcess

    daemon = AgentProcess(tmp_path)
    daemon.repo.write("stacks/app/main.tf", APP_TF)
    daemon.repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    daemon.repo.push("seed")
    try:
        daemon.start()
        refused = daemon.cli("store", "restore")
        assert refused.returncode == 4, refused.stdout + refused.stderr
        assert "the agent service" in refused.stderr and "is running" in refused.stderr
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    (daemon.state / "agent.db").write_bytes(b"")
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(daemon.config), "run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 3, run.stdout + run.stderr
    assert "error[store-damaged]" in run.stderr and "agent store restore" in run.stderr
    no_traceback(run)
    assert (daemon.state / "agent.db").stat().st_size == 0


def test_check_says_what_it_found_and_a_damaged_backup_is_not_restored(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.suspensions.add("app")
    store.close()
    live, backup, created = storefile.check_store(tmp_path)
    assert (live.state, backup.state) == ("ok", "ok")
    assert live.suspended == backup.suspended == ["app"] and created

    (tmp_path / "agent.db").write_bytes(b"")
    (tmp_path / BACKUP_FILENAME).write_bytes(b"SQLite format 3\x00" + b"\xff" * 5000)
    live, backup, _ = storefile.check_store(tmp_path)
    assert (live.state, backup.state) == ("empty", "damaged")
    with pytest.raises(StoreDamaged, match=r"the backup .* is damaged too"):
        storefile.restore_backup(tmp_path)
    assert (tmp_path / "agent.db").stat().st_size == 0  # nothing was put in its place


def test_a_new_state_dir_gets_a_new_store(tmp_path: Path) -> None:
    live, backup, created = storefile.check_store(tmp_path / "state")
    assert (live.state, backup.state, created) == ("new", "missing", None)
    RunStore(tmp_path / "state").close()
    assert (tmp_path / "state" / MARKER_FILENAME).exists()
