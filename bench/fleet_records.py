"""What a fleet's per-host records cost per host: files (a SQLite store) against rows of a
PostgreSQL store (agent/state/hostrecords.py, docs/store.md "Fleet records").

Per host and pass a fleet unit reads the host's ledger (plan), updates it (one
read-modify-write transaction, `SELECT ... FOR UPDATE` on PostgreSQL), reads and writes
its last result, reads and writes the desired hashes; `agent status` reads the results and
ledgers. This runs exactly those calls of the FleetLedger's records for N hosts, on each
backend, in one thread (as one unit's records, without SSH). The server is a throwaway
cluster on 127.0.0.1 (tests/support/postgres.py).

    .venv/bin/python bench/fleet_records.py [--hosts 500] [--objects 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.state.hostrecords import (
    DESIRED,
    LEDGER,
    RESULT,
    FileHostRecords,
    HostRecords,
    StoreHostRecords,
)
from agent.state.layout import StateLayout
from agent.state.store import RunStore


def one_pass(records: HostRecords, hosts: int, objects: int) -> tuple[float, float]:
    """Seconds for a pass's record calls over `hosts`, and for `agent status`'s reads."""
    ledger = {
        "objects": {
            f"path:/etc/app/{i}": {"kind": "file", "name": f"/etc/app/{i}", "unit": "web"}
            for i in range(objects)
        },
        "handlers": {},
    }
    desired = {f"file:/etc/app/{i}": "0" * 64 for i in range(objects)}
    started = time.perf_counter()
    for n in range(hosts):
        host = f"web{n}"
        records.read(LEDGER, "", host)  # the plan
        records.update(LEDGER, "", host, lambda found: found or ledger)
        records.read(RESULT, "web", host)
        records.write(RESULT, "web", host, {"host": host, "status": "ok", "revision": "x"})
        records.read(DESIRED, "web", host)
        records.write(DESIRED, "web", host, desired)
    passed = time.perf_counter() - started
    started = time.perf_counter()
    for host in records.all(RESULT, "web"):
        records.read(LEDGER, "", host)
    return passed, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=500)
    parser.add_argument("--objects", type=int, default=20)
    args = parser.parse_args()
    from tests.support.postgres import PostgresCluster

    with tempfile.TemporaryDirectory() as tmp, PostgresCluster() as cluster:
        sqlite_store = RunStore(Path(tmp) / "files")
        pg_store = RunStore(Path(tmp) / "pg", url=cluster.create_database("bench_records"))
        backends: dict[str, HostRecords] = {
            "files": FileHostRecords(StateLayout(Path(tmp) / "files")),
            "postgresql": StoreHostRecords(pg_store),
        }
        print(f"{args.hosts} hosts, {args.objects} objects each")
        for name, records in backends.items():
            first = one_pass(records, args.hosts, args.objects)  # makes the records
            trips = getattr(pg_store._db, "round_trips", 0)
            again = one_pass(records, args.hosts, args.objects)
            per_host = again[0] / args.hosts * 1000
            counted = ""
            if name == "postgresql":  # (the pass's and the status reads')
                trips = (pg_store._db.round_trips - trips) / args.hosts  # type: ignore[attr-defined]
                counted = f"; {trips:.1f} round trips per host"
            print(
                f"{name:11} pass: first {first[0]:.2f}s, again {again[0]:.2f}s"
                f" ({per_host:.2f} ms/host); status reads {again[1]:.2f}s{counted}"
            )
        sqlite_store.close()
        pg_store.close()


if __name__ == "__main__":
    main()
