"""Three `agent run` daemons as separate processes on one PostgreSQL store (Terraform state
in S3 on moto server, with Terraform's lock file): kill -9 of one while it applies, and another
agent reconciles its units within one short lease TTL, with no unit applied twice."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest

from agent.config.cluster import ClusterConfig
from agent.engine.sharding import Member, assign
from tests.support.infra import InfraRepo, write_host_config
from tests.support.moto import REGION, MotoServer, fake_aws_credentials
from tests.support.postgres import PostgresCluster

UNITS = ["net", "db", "cache", "mail"]
TTL = 2.0
_numbers = itertools.count(1)


def stack(marker: Path, version: str) -> str:
    # The marker line is written at the END of the apply: an apply cut by the kill writes
    # none, and every line is one complete apply.
    return f"""
    resource "terraform_data" "once" {{
      triggers_replace = "{version}"
      provisioner "local-exec" {{
        command = "sleep 1; echo {version} >> {marker}"
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


class Daemons:
    def __init__(self, tmp: Path, pg: PostgresCluster, moto: MotoServer) -> None:
        self.moto = moto
        self.tmp = tmp
        self.url = pg.create_database(f"daemons_{next(_numbers)}")
        self.url_file = tmp / "store-url"
        self.url_file.write_text(self.url + "\n")
        self.url_file.chmod(0o600)
        self.repo = InfraRepo(tmp / "git")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def push(self, version: str) -> None:
        for unit in UNITS:
            self.repo.write(f"stacks/{unit}/main.tf", stack(self.marker(unit), version))
        units = "\n".join(f"  - {{name: {u}, stack: stacks/{u}}}" for u in UNITS)
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
            + f"cluster: {{agent: {name}, lease_ttl: {TTL:g}s}}\n"
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


@pytest.fixture
def daemons(
    tmp_path: Path, postgres_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Daemons]:
    fake_aws_credentials(monkeypatch)  # (the agents inherit the environment)
    with MotoServer() as moto:
        boto3.client("s3", endpoint_url=moto.url, region_name=REGION).create_bucket(Bucket="state")
        made = Daemons(tmp_path, postgres_cluster, moto)
        try:
            yield made
        finally:
            made.stop_all()


def test_kill_9_of_one_agent_moves_its_units_within_one_ttl_without_a_double_apply(
    daemons: Daemons,
) -> None:
    daemons.push("v1")
    names = ["a", "b", "c"]
    for name in names:
        daemons.start(name)
    # All three live, and every unit applied once at v1 (by whichever agent had it then).
    wait_until(
        lambda: daemons.psql("SELECT count(*) FROM cluster_agents") == "3", 60, "three agents"
    )
    wait_until(lambda: all(daemons.lines(u, "v1") for u in UNITS), 120, "v1 applied")
    owners = assign(UNITS, [Member.of(n, {}) for n in names], ClusterConfig(agent="x"))
    victim = next(n for n in names if sum(o == n for o in owners.values()) >= 1)

    daemons.push("v2")  # each agent's poll (1s) sees it and applies its share
    held_sql = (
        f"SELECT count(*) FROM unit_leases WHERE agent = '{victim}'"
        " AND expires_at > extract(epoch FROM clock_timestamp())"
    )
    wait_until(lambda: daemons.psql(held_sql) != "0", 60, f"{victim} holds a lease (mid-unit)")
    daemons.procs[victim].kill()  # kill -9, by PID
    daemons.procs[victim].wait(10)
    killed_at = time.monotonic()

    wait_until(lambda: all(daemons.lines(u, "v2") for u in UNITS), 90, "v2 everywhere")
    took = time.monotonic() - killed_at
    assert [daemons.lines(u, "v1") for u in UNITS] == [1] * len(UNITS)
    assert [daemons.lines(u, "v2") for u in UNITS] == [1] * len(UNITS)  # no double apply
    victims_units = [u for u, o in owners.items() if o == victim]
    ran_by = daemons.psql(
        "SELECT DISTINCT runs.agent FROM unit_runs JOIN runs ON runs.id = unit_runs.run_id"
        f" WHERE unit_runs.unit IN ({','.join(repr(u) for u in victims_units)})"
        " AND unit_runs.revision = (SELECT value FROM agent_state WHERE key = 'current_revision')"
        " AND unit_runs.status = 'ok'"
    ).split()
    assert set(ran_by) - {victim}, ran_by  # a survivor converged the victim's units
    assert took < 60, took

    # `agent cluster` on a survivor shows the dead agent, and the survivors' units.
    survivor = next(n for n in names if n != victim)
    view = json.loads(daemons.cli(survivor, "cluster", "--json"))
    states = {a["name"]: a["live"] for a in view["agents"]}
    assert states == {n: n != victim for n in names}
    owned = sorted(u for a in view["agents"] for u in a["units"])
    assert owned == sorted(UNITS)
