"""One reconcile pass at a time per state directory.

An exclusive `flock` on `<state_dir>/pass.lock`. The kernel drops the lock when the
holder dies (even on kill -9), so a stale lock cannot block the next start. The file
holds the holder's PID and run id, only to tell a waiting user who holds it.

The processes a dead holder left are another matter: `end_leftovers`, run by the next holder,
ends the Terraform processes (and what they started) that a killed agent recorded, and
removes a Terraform state lock note whose holder is gone, so a kill -9 cannot make every
later pass fail.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from types import TracebackType

from agent.errors import PassBusyError
from providers.proctrack import ChildTracker
from providers.terraform.runner import clear_dead_lock

LOCK_FILENAME = "pass.lock"
_POLL_SECONDS = 0.1
# How long a left-over Terraform gets to finish its graceful stop (the kernel sent it SIGTERM
# when the agent died) before it is killed.
LEFTOVER_GRACE = 10.0


class PassLock:
    """The state directory's pass lock. Use as a context manager after `acquire`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILENAME
        self._fd: int | None = None

    def holder(self) -> dict[str, object]:
        """What the current holder wrote (pid, run id, since), or {} if unknown."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, *, wait: bool, timeout: float | None = None) -> None:
        """Take the lock; wait for it (up to `timeout` s) or raise PassBusyError."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                expired = deadline is not None and time.monotonic() >= deadline
                if not wait or expired:
                    os.close(fd)
                    raise PassBusyError(
                        f"another reconcile pass is running in {self.path.parent} "
                        f"({_describe(self.holder())})",
                        hint="wait for it to finish (`agent reconcile --now --wait`), "
                        "or follow it with `agent status`",
                    ) from None
                time.sleep(_POLL_SECONDS)
        self._fd = fd

    def record(self, run_id: str) -> None:
        """Write who holds the lock (for a waiting user's message)."""
        if self._fd is None:
            return
        info = json.dumps({"pid": os.getpid(), "run": run_id, "since": time.time()})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, info.encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> PassLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _describe(info: dict[str, object]) -> str:
    if not info:
        return "holder unknown"
    since = info.get("since")
    age = f", for {time.time() - float(since):.0f} s" if isinstance(since, int | float) else ""
    return f"pid {info.get('pid')}, run {info.get('run')}{age}"


def end_leftovers(
    children: ChildTracker, units_dir: Path, grace: float = LEFTOVER_GRACE
) -> list[str]:
    """End what a dead pass left running and clear the Terraform state locks it left;
    what was done, one line each, for the log. Call it only while holding the pass lock."""
    notes = []
    for left in children.sweep(grace):
        killed = f", killed pid {', '.join(map(str, left.killed))}" if left.killed else ""
        notes.append(
            f"{left.what} of a dead agent (pid {left.owner_pid}) was still running"
            f" (pid {', '.join(map(str, left.found))}){killed}: ended"
        )
    for info in sorted(units_dir.glob("*/.*.lock.info")):
        state = info.with_name(info.name.removeprefix(".").removesuffix(".lock.info"))
        if clear_dead_lock(state):
            notes.append(f"removed the Terraform state lock {info}: its holder is gone")
    return notes
