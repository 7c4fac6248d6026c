"""Three `agent run` daemons as separate processes on one PostgreSQL store (Terraform state
in S3 on moto server, with Terraform's lock file): kill -9 of one while it applies, and another
agent reconciles its units within one short lease TTL, with no unit applied twice."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from agent.config.cluster import ClusterConfig
from agent.engine.sharding import Member, assign
from tests.support.clusterlab import UNITS, ClusterLab, wait_until
from tests.support.moto import REGION, MotoServer, fake_aws_credentials
from tests.support.postgres import PostgresCluster

TTL = 2.0


@pytest.fixture
def daemons(
    tmp_path: Path, postgres_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ClusterLab]:
    fake_aws_credentials(monkeypatch)  # (the agents inherit the environment)
    with MotoServer() as moto:
        boto3.client("s3", endpoint_url=moto.url, region_name=REGION).create_bucket(Bucket="state")
        made = ClusterLab(tmp_path, postgres_cluster, moto, ttl=TTL)
        try:
            yield made
        finally:
            made.stop_all()


def test_kill_9_of_one_agent_moves_its_units_within_one_ttl_without_a_double_apply(
    daemons: ClusterLab,
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

    victims_units = [u for u, o in owners.items() if o == victim]

    def ran_by() -> list[str]:
        return daemons.psql(
            "SELECT DISTINCT runs.agent FROM unit_runs JOIN runs ON runs.id = unit_runs.run_id"
            f" WHERE unit_runs.unit IN ({','.join(repr(u) for u in victims_units)})"
            " AND unit_runs.revision = (SELECT value FROM agent_state"
            " WHERE key = 'current_revision') AND unit_runs.status = 'ok'"
        ).split()

    # The victim may have applied v2 to its unit just before it died: "v2 everywhere" alone
    # does not show the take-over, a survivor's result at v2 does.
    wait_until(lambda: all(daemons.lines(u, "v2") for u in UNITS), 90, "v2 everywhere")
    wait_until(lambda: set(ran_by()) - {victim}, 90, "a survivor converged the victim's units")
    took = time.monotonic() - killed_at
    assert [daemons.lines(u, "v1") for u in UNITS] == [1] * len(UNITS)
    assert [daemons.lines(u, "v2") for u in UNITS] == [1] * len(UNITS)  # no double apply
    assert took < 60, took

    # `agent cluster` on a survivor shows the dead agent, and the survivors' units.
    survivor = next(n for n in names if n != victim)
    view = json.loads(daemons.cli(survivor, "cluster", "--json"))
    states = {a["name"]: a["live"] for a in view["agents"]}
    assert states == {n: n != victim for n in names}
    owned = sorted(u for a in view["agents"] for u in a["units"])
    assert owned == sorted(UNITS)

    # `agent drain` on that survivor: counted out at once, the last agent owns every unit.
    assert "is draining" in daemons.cli(survivor, "drain")
    view = json.loads(daemons.cli(survivor, "cluster", "--json"))
    last = next(n for n in names if n not in (victim, survivor))
    units = {a["name"]: a["units"] for a in view["agents"]}
    assert units == {victim: [], survivor: [], last: sorted(UNITS)}
