"""What checking and backing up the run store costs, by the size of its history.

A writer checks the store (`PRAGMA quick_check`) when it opens it, a reading command
too, and every finished pass (and suspend/resume) refreshes `agent.db.backup` (online
backup API + a check of the copy). All three read the whole file, so they grow with the
history. This fills a real store with N passes of 5 units each and times them.

    .venv/bin/python bench/store_overhead.py --runs 2000,20000,100000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from agent.state.store import RunStore


def fill(state: Path, runs: int) -> int:
    store = RunStore(state)
    db = store._db  # bulk insert in one transaction: the public API commits per row
    with db:
        for i in range(runs):
            run_id = f"r-{i:08d}"
            db.execute(
                "INSERT INTO runs (id, started_at, trigger, status, error) VALUES (?, ?, ?, ?, ?)",
                (run_id, i, "poll", "succeeded", "x" * 100),
            )
            db.executemany(
                "INSERT INTO unit_runs (run_id, unit, status, started_at) VALUES (?, ?, ?, ?)",
                [(run_id, f"unit{u}", "ok", i) for u in range(5)],
            )
    store.close()
    return (state / "agent.db").stat().st_size


def measure(state: Path) -> tuple[float, float, float]:
    """Milliseconds for a writer's open, a reader's open and one backup."""
    started = time.monotonic()
    writer = RunStore(state)
    opened = time.monotonic()
    RunStore(state, read_only=True).close()
    read = time.monotonic()
    writer.backup()
    backed_up = time.monotonic()
    writer.close()
    return (opened - started) * 1000, (read - opened) * 1000, (backed_up - read) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", default="2000,20000", help="comma-separated history sizes")
    args = parser.parse_args()
    print("  passes  store MB  writer open ms  reader open ms  backup ms")
    for runs in [int(n) for n in args.runs.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            size = fill(Path(tmp), runs)
            open_ms, read_ms, backup_ms = measure(Path(tmp))
        print(f"{runs:>8} {size / 1e6:>9.1f} {open_ms:>15.0f} {read_ms:>15.0f} {backup_ms:>10.0f}")


if __name__ == "__main__":
    main()
