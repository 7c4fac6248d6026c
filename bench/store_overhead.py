"""What checking and backing up the run store costs, by the size of its history.

A writer checks the store (`PRAGMA quick_check`) when it opens it, a reading command
too, and every finished pass (and suspend/resume) refreshes `agent.db.backup` (online
backup API + a check of the copy). All three read the whole file, so they grow with the
history. This fills a real store with N passes of 5 units each and times them.

    .venv/bin/python bench/store_overhead.py --runs 2000,20000,100000

`--pass` measures instead what a PostgreSQL store (docs/store.md) costs a one-agent
no-change pass against the SQLite file: N stacks applied once into each, then no-change
passes in the agent's process (as the daemon runs them), SQLite and PostgreSQL in turn,
both a full pass (every stack planned) and a changed-only pass (the poll's: nothing
moved, so no Terraform runs and the store's round trips are most of the pass). The server
is a throwaway cluster on 127.0.0.1 (tests/support/postgres.py). A changed-only pass is
short (~0.1 s), so it runs `--changed-repeat` times per round (default 5) for a steadier
median; the PostgreSQL store's round trips per pass are counted too (PgConnection).

    .venv/bin/python bench/store_overhead.py --pass [--stacks 20] [--repeat 5] [--changed-repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, Reconciler
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


def stack_tf(resources: int) -> str:
    return "".join(
        f'resource "terraform_data" "r{i}" {{\n  input = "value-{i}"\n}}\n'
        for i in range(resources)
    )


def pass_overhead(stacks: int, repeat: int, changed_repeat: int) -> None:
    from tests.support.infra import InfraRepo, write_host_config
    from tests.support.postgres import PostgresCluster

    with tempfile.TemporaryDirectory(prefix="bench-store-pass-") as tmp, PostgresCluster() as pg:
        root = Path(tmp)
        repo = InfraRepo(root / "git")
        for i in range(stacks):
            repo.write(f"stacks/s{i:02d}/main.tf", stack_tf(5))
        units = "".join(f"  - {{name: s{i:02d}, stack: stacks/s{i:02d}}}\n" for i in range(stacks))
        repo.write("gitops.yaml", "version: 1\nunits:\n" + units)
        repo.push("bench")
        url_file = root / "store-url"
        url_file.write_text(pg.create_database("store") + "\n")
        url_file.chmod(0o600)
        agents = {}
        for kind, extra in (("sqlite", ""), ("postgresql", f"store:\n  url_file: {url_file}\n")):
            config = write_host_config(root / f"{kind}.yaml", repo.url, root / kind, extra)
            agents[kind] = Reconciler(load_host_config(config))
            first = agents[kind].run_pass(PassRequest(trigger="bench-setup"))
            assert first.ok, first.error
        times: dict[tuple[str, bool], list[float]] = {}
        trips: dict[bool, list[int]] = {}
        try:
            for round_ in range(repeat):
                # Each store goes first every other round: a load that rises or falls
                # during a round weighs on both alike.
                order = list(agents.items())[:: 1 if round_ % 2 == 0 else -1]
                for changed_only in (False, True):
                    for _ in range(changed_repeat if changed_only else 1):
                        for kind, reconciler in order:
                            db = reconciler.store._db
                            before = getattr(db, "round_trips", 0)
                            start = time.perf_counter()
                            result = reconciler.run_pass(
                                PassRequest(trigger="poll", changed_only=changed_only)
                            )
                            elapsed = time.perf_counter() - start
                            decisions = {o.decision for o in result.outcomes.values()}
                            assert result.ok and decisions <= {"nothing", "unchanged"}, result
                            times.setdefault((kind, changed_only), []).append(elapsed)
                            if kind == "postgresql":
                                count = getattr(db, "round_trips", 0) - before
                                trips.setdefault(changed_only, []).append(count)
        finally:
            for reconciler in agents.values():
                reconciler.close()
    print(
        f"{stacks} stacks, {repeat} full passes and {repeat * changed_repeat} changed-only"
        " passes per store (median seconds; round trips of the PostgreSQL store per pass)"
    )
    print("  pass           sqlite  postgresql  overhead  round trips")
    for changed_only, name in ((False, "full"), (True, "changed-only")):
        lite = statistics.median(times[("sqlite", changed_only)])
        post = statistics.median(times[("postgresql", changed_only)])
        count = statistics.median(trips[changed_only])
        print(
            f"  {name:<13} {lite:>7.3f} {post:>11.3f} {(post / lite - 1) * 100:>8.1f} %"
            f" {count:>12.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", default="2000,20000", help="comma-separated history sizes")
    parser.add_argument("--pass", dest="pass_", action="store_true", help="see above")
    parser.add_argument("--stacks", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--changed-repeat", type=int, default=5)
    args = parser.parse_args()
    if args.pass_:
        pass_overhead(args.stacks, args.repeat, args.changed_repeat)
        return
    print("  passes  store MB  writer open ms  reader open ms  backup ms")
    for runs in [int(n) for n in args.runs.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            size = fill(Path(tmp), runs)
            open_ms, read_ms, backup_ms = measure(Path(tmp))
        print(f"{runs:>8} {size / 1e6:>9.1f} {open_ms:>15.0f} {read_ms:>15.0f} {backup_ms:>10.0f}")


if __name__ == "__main__":
    main()
