"""The crash battery's lab: an agent whose passes apply, killed at random points.

Used by tests/test_crash_battery.py (a few dozen kills in the suite) and by
bench/crash_battery.py (hundreds, on demand). One infra repo with one stack that applies
something every pass: a `localfile_file` (the provider is a real process, as a cloud
provider would be; or, cheaper, a `local-exec` writes the file), and a `terraform_data`
replaced each generation whose `local-exec` runs two `sleep`s from a shell, one in the
background, so there is time to hit mid-apply and a grandchild to leave behind. Each
episode bumps the generation, starts `agent reconcile --now` or `agent run`, sends SIGKILL
or SIGTERM after a random delay (seeded), then checks what is left:

- no process of the dead pass alive (by the agent's records of its children, and by a scan
  of /proc for any process whose cwd, command line or environment is inside the lab);
- the next pass succeeds (run in this process, as `agent reconcile --now` runs it when no
  daemon answers), with no pass lock and no Terraform state lock left after it;
- the store is readable, no run is left `running`, and the file the stack manages holds the
  generation the repository says.

Everything runs under the lab's directory; only processes this module started are signalled
(by PID), and a leftover is reported, never hunted down by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import load_host_config
from agent.core.progress import Event, EventKind
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.store import RunStore
from providers.proctrack import MARKER
from tests.support.infra import InfraRepo, write_host_config

PROVIDER_STACK = """
terraform {
  required_providers {
    localfile = { source = "gitops-agent.local/builtin/localfile" }
  }
}
resource "localfile_file" "marker" {
  path    = "TARGET"
  content = "generation GEN\\n"
}
"""
# Without the provider, the local-exec writes the file (the suite's cheaper variant: a
# provider process costs ~0.3 s of CPU at each of its five starts a pass).
LOCAL_STACK = """
resource "terraform_data" "marker" {
  triggers_replace = "GEN"
  provisioner "local-exec" {
    command = "printf 'generation GEN\\n' > TARGET.tmp && mv TARGET.tmp TARGET"
  }
}
"""
SLOW = """
resource "terraform_data" "slow" {
  triggers_replace = "GEN"
  provisioner "local-exec" {
    command = "sleep SLEEP & sleep SLEEP; wait"
  }
}
"""
# Where a cut is aimed: right after launch, or once this file of the pass appears.
ANCHORS = {
    "launch": None,
    "plan": "runs/*/app/plan.txt.partial",
    "apply": "runs/*/app/apply.txt.partial",
}
ANCHOR_WAIT = 60.0
EXIT_WAIT = 30.0  # how long a SIGTERM-ed agent may take to exit (its stop_timeout + margin)
STOP_TIMEOUT = 20  # daemon.stop_timeout of the lab's agent, seconds


@dataclass
class Episode:
    number: int
    mode: str  # cli-kill, run-kill, cli-term, run-term
    anchor: str  # what to wait for before the delay: launch, plan or apply (see ANCHORS)
    delay: float
    phase: str = ""  # where the pass was cut: start, plan, apply, done
    exit_code: int | None = None
    exit_seconds: float | None = None
    cut_status: str | None = None  # what the store says of the pass that was cut
    problems: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)  # what the next pass found and ended

    def describe(self) -> str:
        return f"episode {self.number}: {self.mode} {self.delay:.2f}s after {self.anchor}"


class CrashLab:
    def __init__(self, root: Path, *, sleep: float = 1.0, provider: bool = True) -> None:
        self.root = root
        self.repo = InfraRepo(root / "git")
        self.state = root / "state"
        self.target = root / "managed" / "marker.txt"
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.socket = root / "ctl.sock"
        self.log = root / "agent.log"
        self.config = write_host_config(
            root / "agent.yaml",
            self.repo.url,
            self.state,
            textwrap.dedent(f"""\
            intervals: {{poll: 1h, drift: 1h}}
            control_socket: {self.socket}
            daemon: {{jitter: 0, stop_timeout: {STOP_TIMEOUT}s, backoff_max: 10m}}
            policy: {{destroy: allow}}
            """),
        )
        self.sleep = sleep
        self.stack = (PROVIDER_STACK if provider else LOCAL_STACK) + SLOW
        self.generation = 0
        self.procs: list[subprocess.Popen[bytes]] = []
        self.repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
        self.bump()

    # --- the repository -------------------------------------------------------------------

    def bump(self) -> None:
        """A new generation in the repository: the next pass has something to apply."""
        self.generation += 1
        stack = (
            self.stack.replace("GEN", str(self.generation))
            .replace("TARGET", str(self.target))
            .replace("SLEEP", f"{self.sleep:g}")
        )
        self.repo.write("stacks/app/main.tf", stack)
        self.repo.push(f"generation {self.generation}")

    # --- the agent ----------------------------------------------------------------------------

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--config", str(self.config), *args],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
            )
        self.procs.append(proc)
        return proc

    def converge(self, swept: list[str] | None = None) -> None:
        """One pass in this process (what `agent reconcile --now` runs with no daemon); what
        its recovery did goes to `swept`."""

        def report(event: Event) -> None:
            if event.kind is EventKind.RECOVERED and swept is not None:
                swept.append(event.message)

        reconciler = Reconciler(load_host_config(self.config), reporter=report)
        try:
            result = reconciler.run_pass(PassRequest(trigger="cli"))
        finally:
            reconciler.close()
        if result.status != "succeeded":
            raise AssertionError(f"the next pass {result.status}: {result.error}")

    def episode(self, number: int, mode: str, anchor: str, delay: float) -> Episode:
        """Cut one pass with `mode`'s signal `delay` s after `anchor` was seen (the machine's
        load moves every absolute time), then check what is left."""
        episode = Episode(number, mode, anchor, delay)
        self.bump()
        before = {run.id for run in self.runs()}
        proc = self.start("run") if mode.startswith("run") else self.start("reconcile", "--now")
        self._wait_for(anchor, proc)
        time.sleep(delay)
        sig = signal.SIGTERM if mode.endswith("term") else signal.SIGKILL
        sent = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            episode.exit_code = proc.wait(EXIT_WAIT)
        except subprocess.TimeoutExpired:
            episode.problems.append(f"did not exit within {EXIT_WAIT:.0f}s of {sig.name}")
            proc.kill()
            proc.wait()
        episode.exit_seconds = time.monotonic() - sent
        cut = [run for run in self.runs() if run.id not in before]
        episode.cut_status = cut[0].status if cut else None
        episode.phase = self._phase(cut[0].id if cut else None)
        if sig is signal.SIGTERM:
            self._check_term(episode, cut)
        self._check_after(episode)
        return episode

    def _wait_for(self, anchor: str, proc: subprocess.Popen[bytes]) -> None:
        """Until the pass reaches `anchor` (its Terraform output file appears), the process
        exits, or ANCHOR_WAIT passes."""
        pattern = ANCHORS[anchor]
        if pattern is None:
            return
        known = set(self.state.glob(pattern))
        deadline = time.monotonic() + ANCHOR_WAIT
        while time.monotonic() < deadline and proc.poll() is None:
            if set(self.state.glob(pattern)) - known:
                return
            time.sleep(0.02)

    def _phase(self, run_id: str | None) -> str:
        if run_id is None:
            return "start"
        unit = self.state / "runs" / run_id / "app"
        for name, phase in (("apply.txt", "done"), ("apply.txt.partial", "apply")):
            if (unit / name).exists():
                return phase
        return "plan" if unit.exists() else "start"

    def _check_term(self, episode: Episode, cut: list) -> None:
        if episode.mode == "run-term" and episode.exit_code not in (0, -signal.SIGTERM):
            episode.problems.append(f"exit code {episode.exit_code} after SIGTERM")
        for run in cut:
            if run.status not in ("interrupted", "succeeded"):
                episode.problems.append(f"run {run.id} left {run.status} by SIGTERM")
        # A graceful stop ends its own children: nothing may be left before the next pass.
        if left := self.leftovers():
            episode.problems.append(f"alive after SIGTERM: {left}")

    def _check_after(self, episode: Episode) -> None:
        try:
            self.converge(episode.swept)
        except AssertionError as exc:
            episode.problems.append(str(exc))
        if left := self.leftovers():
            episode.problems.append(f"alive after the next pass: {left}")
        if list(self.state.glob("units/*/.*.lock.info")):
            episode.problems.append("a Terraform state lock is left")
        if self.pass_lock_held():
            episode.problems.append("the pass lock is held")
        if list((self.state / "children").glob("*.json")):
            episode.problems.append("child records are left")
        running = [run.id for run in self.runs() if run.status == "running"]
        if running:
            episode.problems.append(f"runs left running: {running}")
        want = f"generation {self.generation}\n"
        have = self.target.read_text() if self.target.exists() else None
        if have != want:
            episode.problems.append(f"the managed file holds {have!r}, not {want!r}")

    # --- what is left -------------------------------------------------------------------------

    def runs(self) -> list:
        store = RunStore(self.state)
        try:
            return store.runs(limit=1000)
        finally:
            store.close()

    def pass_lock_held(self) -> bool:
        fd = os.open(self.state / "pass.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def leftovers(self) -> list[str]:
        """Processes (not this one) whose cwd, command line or environment is in the lab, or
        that carry the agent's child marker from a process of the lab."""
        me = os.getpid()
        root = str(self.root).encode()
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            pid = int(entry.name)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                cwd = os.readlink(f"/proc/{pid}/cwd").encode()
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state == "Z":
                continue
            inside = root in cmdline or cwd.startswith(root)
            if inside or (MARKER.encode() in environ and root in environ):
                command = cmdline.replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{pid} {command[:120]}")
        return found

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # by PID: only what this lab started
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        # What the lab's agents left (a failing check already reported it): by PID, each one
        # seen inside the lab's directory.
        for line in self.leftovers():
            with contextlib.suppress(OSError):
                os.kill(int(line.split()[0]), signal.SIGKILL)


def plan_episodes(
    seed: int, kills: int, terms: int, span: tuple[float, float]
) -> list[tuple[str, str, float]]:
    """The episodes of a battery: `kills` SIGKILLs and `terms` SIGTERMs, each half of
    `agent reconcile --now` and half of `agent run`, in a seeded random order, each after a
    delay drawn from `span` (seconds) after an anchor: launch, plan started, or apply started
    (half of the cuts aim at the apply)."""
    rng = random.Random(seed)
    modes = ["cli-kill"] * ((kills + 1) // 2) + ["run-kill"] * (kills // 2)
    modes += ["cli-term"] * ((terms + 1) // 2) + ["run-term"] * (terms // 2)
    rng.shuffle(modes)
    anchors = ["launch", "plan", "apply", "apply"]
    return [(mode, rng.choice(anchors), round(rng.uniform(*span), 2)) for mode in modes]
