"""Agents as `agent run` processes on one PostgreSQL store, Terraform state in S3 on moto
server: for tests/test_cluster_daemons.py and bench/cluster_failover.py.

    lab = ClusterLab(tmp, postgres_cluster, moto, ttl=2.0)
    lab.push("v1"); lab.start("a"); ...; lab.stop_all()

Each unit's resource appends its version to a marker file at the END of its create (so a
line is one complete apply, and an apply cut by a kill writes none).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.infra import InfraRepo, write_host_config
from tests.support.moto import REGION, MotoServer
from tests.support.postgres import PostgresCluster

UNITS = ["net", "db", "cache", "mail"]  # with agents a, b, c: two on a, one each on b, c
_numbers = itertools.count(1)


def stack(marker: Path, version: str, seconds: float = 1.0) -> str:
    # The marker line is written at the END of the apply: an apply cut by the kill writes
    # none, and every line is one complete apply.
    return f"""
    resource "terraform_data" "once" {{
      triggers_replace = "{version}"
      provisioner "local-exec" {{
        command = "sleep {seconds:g}; echo {version} >> {marker}"
      }}
    }}
    """


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


class ClusterLab:
    def __init__(
        self,
        tmp: Path,
        pg: PostgresCluster,
        moto: MotoServer,
        *,
        ttl: float = 2.0,
        units: list[str] | None = None,
        apply_seconds: float = 1.0,
    ) -> None:
        self.moto = moto
        self.ttl = ttl
        self.units = units or UNITS
        self.apply_seconds = apply_seconds
        self.tmp = tmp
        self.url = pg.create_database(f"lab_{next(_numbers)}")
        self.url_file = tmp / "store-url"
        self.url_file.write_text(self.url + "\n")
        self.url_file.chmod(0o600)
        self.repo = InfraRepo(tmp / "git")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def push(self, version: str) -> None:
        for unit in self.units:
            self.repo.write(
                f"stacks/{unit}/main.tf", stack(self.marker(unit), version, self.apply_seconds)
            )
        units = "\n".join(f"  - {{name: {u}, stack: stacks/{u}}}" for u in self.units)
        self.repo.write("gitops.yaml", f"version: 1\nunits:\n{units}\n")
        self.repo.push(version)

    def marker(self, unit: str) -> Path:
        return self.tmp / f"applied-{unit}.txt"

    def lines(self, unit: str, version: str) -> int:
        path = self.marker(unit)
        return path.read_text().split().count(version) if path.exists() else 0

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def start(self, name: str) -> None:
        config = write_host_config(
            self.tmp / f"{name}.yaml", self.repo.url, self.tmp / name, parallelism=3
        )
        config.write_text(
            config.read_text()
            + f"  state_backend:\n    s3: {{bucket: state, region: {REGION},"
            + f" endpoint: {self.moto.url}}}\n"
            + "intervals: {poll: 1s, drift: 1h}\n"
            + "policy: {destroy: allow}\n"  # a new version replaces the resource
            + f"control_socket: {self.tmp / name}.sock\n"
            + "daemon: {jitter: 0, stop_timeout: 30s}\n"
            + f"store: {{url_file: {self.url_file}}}\n"
            + f"cluster: {{agent: {name}, lease_ttl: {self.ttl:g}s}}\n"
        )
        with (self.tmp / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
                stdout=log,
                stderr=log,
                env=dict(os.environ),
            )

    def psql(self, sql: str) -> str:
        """The answer; "" while the agents have not made the tables yet."""
        command = ["psql", self.url, "-tAc", sql]
        return subprocess.run(command, capture_output=True, text=True).stdout.strip()

    def cli(self, name: str, *args: str) -> str:
        command = [sys.executable, "-m", "agent.cli", "--config", str(self.tmp / f"{name}.yaml")]
        done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def stop_all(self) -> None:
        for proc in self.procs.values():  # only the processes this test started, by PID
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
