"""Faults of the agent's processes: a pass that raises under a daemon (issue 10 item 8), and
children that must not outlive the agent (item 9). The crash battery
(tests/test_crash_battery.py) kills whole agents at random; these pin each mechanism down.

Real processes, the real store (a second process holds `BEGIN IMMEDIATE` on agent.db), the
embedded Terraform, real signals. Every process is started here and signalled by its PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.service.daemon import Daemon
from agent.state import database as store_database
from agent.state.store import RunStore
from providers.proctrack import MARKER, ChildTracker, marked, proc_stat
from providers.terraform.runner import clear_dead_lock, lock_info_file
from tests.support.infra import InfraRepo, write_host_config
from tests.tfhelpers import Lines, deadline_in, make_runner, make_workspace

WAIT = 30.0
BUSY = 2.0  # the store's busy timeout in these tests (30 s in service)


def wait_for(predicate, timeout: float = WAIT, what: str = ""):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s: {what}")


def inside(root: Path) -> list[int]:
    """Live processes (not this one) whose cwd or command line is under `root`."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if proc_stat(pid) is not None and (
            cwd.startswith(str(root)) or str(root).encode() in cmdline
        ):
            found.append(pid)
    return found


@contextlib.contextmanager
def started(argv: list[str], **kwargs: object) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(argv, text=True, **kwargs)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --- item 8: every waiting client gets an answer --------------------------------------------------

SLOW_TF = """
resource "terraform_data" "slow" {
  triggers_replace = var.generation
  provisioner "local-exec" {
    command = "sleep 1"
  }
}
variable "generation" {
  type    = string
  default = "GEN"
}
"""

HOLD = """
import select, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("held", flush=True)
select.select([sys.stdin], [], [], float(sys.argv[2]))  # a line on stdin releases it sooner
"""


class DaemonLab:
    """A Daemon in this process (as `agent run` runs it, without the signal handlers), its
    repo and host config; the CLI talks to it over its control socket."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.repo = InfraRepo(tmp / "git")
        self.state = tmp / "state"
        self.config = write_host_config(
            tmp / "agent.yaml",
            self.repo.url,
            self.state,
            textwrap.dedent(f"""\
            intervals: {{poll: 1h, drift: 1h}}
            control_socket: {tmp / "ctl.sock"}
            daemon: {{jitter: 0, stop_timeout: 30s, backoff_max: 10m}}
            policy: {{destroy: allow}}
            """),
        )
        self.generation = 0
        self.repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
        self.bump()
        self.daemon = Daemon(load_host_config(self.config))

    def bump(self) -> None:
        self.generation += 1
        self.repo.write("stacks/app/main.tf", SLOW_TF.replace("GEN", str(self.generation)))
        self.repo.push(f"generation {self.generation}")

    def hold_store(self, seconds: float) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(self.state / "agent.db"), str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc

    def reconcile_now(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "--config",
                str(self.config),
                "reconcile",
                "--now",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def runs(self) -> list:
        store = RunStore(self.state)
        try:
            return store.runs(limit=50)
        finally:
            store.close()


@pytest.fixture
def daemon_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaemonLab]:
    monkeypatch.setattr(store_database, "BUSY_TIMEOUT", BUSY)
    lab = DaemonLab(tmp_path)
    lab.daemon.start()
    try:
        wait_for(lambda: lab.daemon.worker.last is not None, what="the first pass")
        assert lab.daemon.worker.last is not None and lab.daemon.worker.last.status == "succeeded"
        yield lab
    finally:
        assert lab.daemon.stop() == 0


def test_reconcile_through_the_daemon_answers_when_the_store_is_locked(
    daemon_lab: DaemonLab,
) -> None:
    # Held far longer than the answer may take, even on a loaded machine: the answer must
    # come while the store is still locked (the holder is killed only afterwards).
    held_for = BUSY * 30
    with daemon_lab.hold_store(held_for) as holder:
        asked = time.monotonic()
        cli = daemon_lab.reconcile_now()
        try:
            _out, err = cli.communicate(timeout=held_for)
        finally:
            if cli.poll() is None:
                cli.kill()
        answered = time.monotonic() - asked
        holder.kill()
    assert cli.returncode != 0
    assert "locked" in err and str(daemon_lab.state / "agent.db") in err, err
    assert "Traceback" not in err
    assert answered < held_for, f"answered after {answered:.1f}s, after the store was released"
    # The store works again: the daemon serves the next request, and no run stays running.
    retry = daemon_lab.reconcile_now()
    _out, err = retry.communicate(timeout=120)
    assert retry.returncode == 0, err
    assert all(run.status != "running" for run in daemon_lab.runs())


def test_a_store_locked_mid_pass_answers_and_leaves_no_run_running(
    daemon_lab: DaemonLab,
) -> None:
    daemon_lab.bump()
    cli = daemon_lab.reconcile_now()
    try:
        partial = "runs/*/app/apply.txt.partial"
        wait_for(lambda: list(daemon_lab.state.glob(partial)), what="the apply under way")
        # Held until the client has its answer: the unit's result cannot be written, nor
        # can the run be closed.
        with daemon_lab.hold_store(120) as holder:
            _out, err = cli.communicate(timeout=60)
            holder.kill()
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode != 0
    assert "locked" in err and "Traceback" not in err, err
    (cut,) = [run for run in daemon_lab.runs() if run.status == "running"]

    retry = daemon_lab.reconcile_now()  # the next pass closes the cut run, then converges
    _out, err = retry.communicate(timeout=120)
    assert retry.returncode == 0, err
    runs = {run.id: run for run in daemon_lab.runs()}
    assert runs[cut.id].status == "interrupted"
    assert all(run.status != "running" for run in runs.values())


# --- item 9: children tied to the agent --------------------------------------------------------

PARENT = """
import subprocess, sys, signal
from providers.proctrack import tie_to_parent
child = subprocess.Popen(["sleep", "60"], start_new_session=True, preexec_fn=tie_to_parent())
print(child.pid, flush=True)
child.wait()
"""


def test_a_child_started_with_tie_to_parent_dies_with_a_killed_parent(tmp_path: Path) -> None:
    with started([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, cwd=tmp_path) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert proc_stat(child) is not None
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: proc_stat(child) is None, 10, "the child to die with its parent")


OWNER = """
import subprocess, sys, os
from pathlib import Path
from providers.proctrack import ChildTracker
tracker = ChildTracker(Path(sys.argv[1]))
token, marker = tracker.begin("sleep for the test")
child = subprocess.Popen(["sleep", "60"], env={**os.environ, **marker}, start_new_session=True)
tracker.started(token, child.pid, "sleep for the test")
print(child.pid, flush=True)
child.wait()
"""


def test_the_sweep_ends_what_a_dead_agent_left_and_nothing_else(tmp_path: Path) -> None:
    records = tmp_path / "children"
    with (
        started([sys.executable, "-c", OWNER, str(records)], stdout=subprocess.PIPE) as owner,
        started(["sleep", "60"], env={**os.environ, MARKER: "not-a-recorded-token"}) as stranger,
    ):
        assert owner.stdout is not None
        orphan = int(owner.stdout.readline())
        mine = ChildTracker(records)
        assert mine.sweep(grace=0.2) == []  # its owner is alive: not touched
        assert proc_stat(orphan) is not None
        owner.send_signal(signal.SIGKILL)  # no parent-death signal here: the orphan lives on
        owner.wait(10)
        assert proc_stat(orphan) is not None

        (left,) = mine.sweep(grace=0.2)
        assert left.found == [orphan] and left.killed == [orphan], left
        assert left.owner_pid == owner.pid and left.what == "sleep for the test"
        wait_for(lambda: proc_stat(orphan) is None, 10, "the orphan to be ended")
        assert stranger.poll() is None  # not recorded: never signalled
        assert list(records.glob("*.json")) == []


def test_a_lock_note_is_cleared_only_when_its_holder_is_gone(tmp_path: Path) -> None:
    state = tmp_path / "terraform.tfstate"
    state.write_text("{}")
    info = lock_info_file(state)
    info.write_text(json.dumps({"ID": "x", "Operation": "OperationTypeApply"}))
    hold = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX)\n"  # what Terraform's local backend takes
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    with started([sys.executable, "-c", hold, str(state)], stdout=subprocess.PIPE) as holder:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert clear_dead_lock(state) is False
        assert info.exists()
        holder.kill()
        holder.wait(10)
    assert clear_dead_lock(state) is True
    assert not info.exists()
    # Taking and dropping the lock to look left nothing held.
    fd = os.open(state, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


LEAVES_A_CHILD = """
resource "terraform_data" "x" {
  provisioner "local-exec" {
    command = "sleep 60 & sleep 60; wait"
  }
}
"""


def test_an_interrupted_apply_leaves_no_local_exec_grandchild(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    ws = make_workspace(tmp_path, {"main.tf": LEAVES_A_CHILD})
    plan = tmp_path / "state" / "tfplan"
    runner.init_if_needed(ws, Lines(), deadline_in(120))
    runner.plan(ws, plan, {}, Lines(), deadline_in(120))
    lines = Lines()
    failure: list[BaseException] = []

    def apply() -> None:
        try:
            runner.apply(ws, plan, {}, lines, deadline_in(120))
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=apply)
    worker.start()
    wait_for(lambda: inside(ws.run_dir) and "Provisioning with" in "\n".join(lines), 60, "sleep")
    runner.interrupt()  # what a SIGTERM to the agent does: one SIGINT to Terraform
    worker.join(60)
    assert not worker.is_alive() and failure, "the apply was not interrupted"
    assert inside(tmp_path) == [], "a process of the interrupted apply is still running"
    assert not any(marked(t) for t in runner.children.running())
