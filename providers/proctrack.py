"""Children tied to the agent's life: Terraform, its providers and their local-exec commands.

Terraform runs in a session of its own (a terminal's Ctrl-C must not reach it: the runner
sends the one SIGINT that lets it release its state lock). Nothing else would tie it to the
agent, so a kill -9 of the agent left Terraform and its provider running. Three things fix it:

- `tie_to_parent`, a `preexec_fn`: the kernel sends the child SIGTERM when the thread that
  started it exits (PR_SET_PDEATHSIG; Terraform stops gracefully on SIGTERM, ends its
  providers and releases its state lock). It fires on the *thread's* exit: start children
  from a thread that waits for them (the runner does).
- A marker in every child's environment, `GITOPS_AGENT_CHILD=<token>`. Providers and
  local-exec commands inherit it, even when they leave the process group, so what a child
  started is found in /proc by the marker and nothing else is ever signalled.
- `ChildTracker` records each child in `<state_dir>/children/<token>.json` (owner pid and
  start time, the child's pid, process group and start time) until it is done. `sweep`, run
  by the next pass under the pass lock, ends what an agent that died left, after checking
  that the owner is really dead (pid plus /proc start time: a reused pid is not the owner).

Processes are signalled through a pidfd opened before their marker is checked, so a pid
reused between the check and the signal is never hit.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from providers.atomic import atomic_write

MARKER = "GITOPS_AGENT_CHILD"
PR_SET_PDEATHSIG = 1
_POLL = 0.05

_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: no parent-death signal, the sweep remains
    _prctl = None


def tie_to_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send `sig` to the child when its parent thread
    exits (None where prctl is missing). Runs in the forked child: no locks, no logging."""
    if _prctl is None:
        return None
    parent = os.getpid()
    prctl = _prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the agent died between fork and prctl
            os.kill(os.getpid(), sig)

    return preexec


# --- /proc -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    pgid: int
    start: int  # clock ticks after boot: with the pid, names one process for ever


def proc_stat(pid: int) -> ProcStat | None:
    """The process's group and start time from /proc/PID/stat; None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None  # a zombie has ended; only its parent's wait is missing
    return ProcStat(pid=pid, pgid=int(fields[2]), start=int(fields[19]))


def is_alive(pid: int, start: int) -> bool:
    """True if process `pid` runs and is the one that started at `start` (not a reused pid)."""
    found = proc_stat(pid)
    return found is not None and found.start == start


def _has_marker(pid: int, token: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or another user's
        return False
    return f"{MARKER}={token}".encode() in environ.split(b"\0")


def marked(token: str) -> list[int]:
    """The live processes that carry `token` in their environment (never this process)."""
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != me and _has_marker(int(entry.name), token):
            found.append(int(entry.name))
    return found


def signal_marked(token: str, sig: int) -> list[int]:
    """Send `sig` to every live process carrying `token`; the pids signalled."""
    hit = []
    for pid in marked(token):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue  # gone already
        try:
            if _has_marker(pid, token):  # checked again now that the pidfd pins the process
                signal.pidfd_send_signal(fd, sig)
                hit.append(pid)
        except OSError:
            pass
        finally:
            os.close(fd)
    return hit


def end_marked(token: str, grace: float = 0.0, *, group: ProcStat | None = None) -> list[int]:
    """End every process carrying `token`: wait up to `grace` s for them to exit on their
    own (a SIGTERM is already on its way, or Terraform is stopping), then SIGKILL the rest,
    and the process group `group` leads if its leader is still that process (a child that
    cleared its environment stays in the group). The pids that had to be killed."""
    deadline = time.monotonic() + grace
    while marked(token) and time.monotonic() < deadline:
        time.sleep(_POLL)
    killed = signal_marked(token, signal.SIGKILL)
    if group is not None and is_alive(group.pid, group.start):
        with contextlib.suppress(OSError):
            os.killpg(group.pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0  # SIGKILL is not refused; reaping may lag a moment
    while killed and marked(token) and time.monotonic() < deadline:
        time.sleep(_POLL)
    return killed


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _verified_group(record: dict[str, object]) -> ProcStat | None:
    """The recorded child as a group leader, if the record says it led its own group."""
    pid, pgid, start = _int(record.get("pid")), _int(record.get("pgid")), _int(record.get("start"))
    return ProcStat(pid, pgid, start) if pid and pid == pgid else None


# --- the records -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Leftover:
    """What a dead agent left running, and what the sweep did about it."""

    what: str
    owner_pid: int
    found: list[int]  # still running when the sweep looked
    killed: list[int]  # had to be killed after the grace period


class ChildTracker:
    """Marks the agent's children and records them in `directory` (None: mark, not record)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        me = proc_stat(os.getpid())
        self._owner = (os.getpid(), me.start if me else 0)

    def begin(self, what: str) -> tuple[str, dict[str, str]]:
        """A token for a child about to start, and the environment entry that marks it.
        The record is written before the child starts: a kill between the two leaves a
        record with no process, which the sweep drops."""
        token = secrets.token_hex(8)
        self._write(token, {"what": what})
        return token, {MARKER: token}

    def started(self, token: str, pid: int, what: str) -> None:
        """Add the child's pid, process group and start time to its record."""
        found = proc_stat(pid)
        if found is not None:
            self._write(token, {"what": what, "pid": pid, "pgid": found.pgid, "start": found.start})

    def done(self, token: str) -> list[int]:
        """The child has exited: end what it left (a local-exec grandchild still running),
        then drop its record. The pids killed."""
        killed = end_marked(token)
        if self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{token}.json").unlink()
        return killed

    def running(self) -> list[str]:
        """Tokens of this process's children that are not done."""
        return [token for token, record in self._records() if self._is_mine(record)]

    def end_running(self) -> list[int]:
        """SIGKILL every child of this process and what they started (a stop that could not
        wait any longer); their records go too."""
        killed: list[int] = []
        for token in self.running():
            killed += self.done(token)
        return killed

    def sweep(self, grace: float) -> list[Leftover]:
        """End what agents that are no longer alive left running; drop their records.
        Records of a live agent (this one, or another process still exiting) are kept."""
        leftovers = []
        for token, record in self._records():
            owner_pid = _int(record.get("owner_pid"))
            if self._is_mine(record) or is_alive(owner_pid, _int(record.get("owner_start"))):
                continue
            found = marked(token)
            if found:
                killed = end_marked(token, grace, group=_verified_group(record))
                leftovers.append(Leftover(str(record.get("what", "?")), owner_pid, found, killed))
            if self.directory is not None:
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / f"{token}.json").unlink()
        return leftovers

    def _is_mine(self, record: dict[str, object]) -> bool:
        return (record.get("owner_pid"), record.get("owner_start")) == self._owner

    def _write(self, token: str, fields: dict[str, object]) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = {"owner_pid": self._owner[0], "owner_start": self._owner[1], **fields}
        atomic_write(self.directory / f"{token}.json", json.dumps(record))

    def _records(self) -> list[tuple[str, dict[str, object]]]:
        if self.directory is None:
            return []
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                record = {}  # half-written by a crash: nobody owns it, the sweep drops it
            if isinstance(record, dict):
                records.append((path.stem, record))
        return records
