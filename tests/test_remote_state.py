"""Terraform state in a remote backend the host config names (S3 on moto server, with
Terraform's own lock file): the agent writes the backend into the unit's shadow, keeps no
local state, shares the state between agents, and a double run never applies twice."""

from __future__ import annotations

import subprocess
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import psycopg
import pytest

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, PassResult, Reconciler
from agent.errors import ConfigError
from agent.state.store import UnitStatus
from agent.units.decide import Decision
from tests.support.infra import InfraRepo, write_host_config
from tests.support.moto import REGION, MotoServer, fake_aws_credentials
from tests.support.postgres import PostgresCluster, server_bin

BUCKET = "infra-state"


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, moto_server: MotoServer) -> object:
    moto_server.reset()
    fake_aws_credentials(monkeypatch)
    client = boto3.client("s3", endpoint_url=moto_server.url, region_name=REGION)
    client.create_bucket(Bucket=BUCKET)
    return client


def stack(marker: Path, *, delay: float = 0) -> str:
    """One resource whose creation appends a line to `marker`: an apply is counted."""
    return f"""
    resource "terraform_data" "once" {{
      input = "v1"
      provisioner "local-exec" {{
        command = "sleep {delay}; echo applied >> {marker}"
      }}
    }}
    output "id" {{ value = terraform_data.once.id }}
    """


def agent(tmp: Path, name: str, repo: InfraRepo, moto: MotoServer | None) -> Reconciler:
    backend = ""
    if moto is not None:
        backend = f"""\
          state_backend:
            s3: {{bucket: {BUCKET}, region: {REGION}, key_prefix: team/, endpoint: "{moto.url}"}}
        """
    config = write_host_config(tmp / f"{name}.yaml", repo.url, tmp / name)
    text = config.read_text().replace("  lock_timeout: 10s\n", "  lock_timeout: 20s\n")
    # `state_backend` sits under `terraform:`, the last mapping write_host_config writes.
    config.write_text(text + textwrap.indent(textwrap.dedent(backend), "  "))
    return Reconciler(load_host_config(config))


def seeded(tmp: Path, marker: Path, *, delay: float = 0) -> InfraRepo:
    repo = InfraRepo(tmp / "git")
    repo.write("stacks/app/main.tf", stack(marker, delay=delay))
    repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    repo.push("seed")
    return repo


def keys(client: object) -> list[str]:
    listing = client.list_objects_v2(Bucket=BUCKET)  # type: ignore[attr-defined]
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_state_lives_in_the_bucket_and_another_agent_sees_it(
    tmp_path: Path, s3: object, moto_server: MotoServer
) -> None:
    marker = tmp_path / "applied.txt"
    repo = seeded(tmp_path, marker)
    first = agent(tmp_path, "a", repo, moto_server)
    try:
        result = first.run_pass(PassRequest(trigger="cli"))
        assert result.ok, result.error
        assert result.outcomes["app"].decision == Decision.APPLY
    finally:
        first.close()
    assert keys(s3) == ["team/app.tfstate"]
    assert not (tmp_path / "a" / "units" / "app" / "terraform.tfstate").exists()
    assert marker.read_text() == "applied\n"

    second = agent(tmp_path, "b", repo, moto_server)  # another bastion, its own state dir
    try:
        result = second.run_pass(PassRequest(trigger="cli"))
    finally:
        second.close()
    assert result.ok, result.error
    assert result.outcomes["app"].decision == Decision.NOTHING
    assert marker.read_text() == "applied\n"


def test_two_agents_at_once_apply_once(tmp_path: Path, s3: object, moto_server: MotoServer) -> None:
    """The state lock is the guard even when two agents run the same unit at once."""
    marker = tmp_path / "applied.txt"
    repo = seeded(tmp_path, marker, delay=2)
    agents = [agent(tmp_path, name, repo, moto_server) for name in ("a", "b")]
    results: dict[str, PassResult] = {}

    def run(name: str, reconciler: Reconciler) -> None:
        results[name] = reconciler.run_pass(PassRequest(trigger="cli"))

    threads = [
        threading.Thread(target=run, args=(name, r)) for name, r in zip("ab", agents, strict=True)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
    finally:
        for reconciler in agents:
            reconciler.close()
    assert set(results) == {"a", "b"}
    assert marker.read_text() == "applied\n"  # created once, whatever the interleaving
    decisions = [results[name].outcomes["app"].decision for name in "ab"]
    assert decisions.count(Decision.APPLY) == 1, decisions
    # The other one either planned after the apply (no changes) or had its saved plan
    # refused as stale: never a second apply.
    other = next(
        o for o in (results[n].outcomes["app"] for n in "ab") if o.decision != Decision.APPLY
    )
    assert other.status is UnitStatus.FAILED or other.decision == Decision.NOTHING, other


def test_local_state_is_not_left_behind_silently(
    tmp_path: Path, s3: object, moto_server: MotoServer
) -> None:
    """A unit with state in the agent's directory does not start afresh remotely."""
    marker = tmp_path / "applied.txt"
    repo = seeded(tmp_path, marker)
    local = agent(tmp_path, "a", repo, None)
    try:
        assert local.run_pass(PassRequest(trigger="cli")).ok
    finally:
        local.close()
    remote = agent(tmp_path, "a", repo, moto_server)  # the same state dir, a backend now
    try:
        result = remote.run_pass(PassRequest(trigger="cli"))
    finally:
        remote.close()
    outcome = result.outcomes["app"]
    assert outcome.status is UnitStatus.FAILED
    assert "s3://infra-state/team/app.tfstate" in (outcome.error or "")
    assert "terraform state push" in (outcome.error or "")
    assert keys(s3) == []  # nothing written remotely
    assert marker.read_text() == "applied\n"  # nothing created again


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("{s3: {bucket: b-1, region: r}, pg: {conn_str_file: x}}", "exactly one of s3 or pg"),
        ("{s3: {region: eu-west-1}}", "terraform.state_backend.s3.bucket: expected an S3"),
        ("{s3: {bucket: Bad_Bucket, region: r}}", "terraform.state_backend.s3.bucket"),
        ("{s3: {bucket: ok-bucket, region: r, key_prefix: ../up}}", "key_prefix"),
        ("{pg: {schema_prefix: x}}", "terraform.state_backend.pg.conn_str_file"),
    ],
)
def test_a_wrong_state_backend_names_the_line_and_key(
    tmp_path: Path, backend: str, message: str
) -> None:
    config = write_host_config(tmp_path / "agent.yaml", "file:///nowhere", tmp_path / "s")
    config.write_text(config.read_text() + f"  state_backend: {backend}\n")
    with pytest.raises(ConfigError) as caught:
        load_host_config(config)
    text = str(caught.value)
    assert message in text
    assert "agent.yaml:" in text


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    if server_bin() is None:
        pytest.skip("no PostgreSQL server installed (tests/run.sh installs it)")
    with PostgresCluster() as cluster:
        yield cluster


def test_state_in_postgresql_shared_by_two_agents(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    """The `pg` backend: a schema per unit; the connection string is in no file we write."""
    url = postgres.create_database("state1") + "&application_name=conn-canary-5e1f"
    conn_file = tmp_path / "state-db.conn"
    conn_file.write_text(url + "\n")
    conn_file.chmod(0o600)
    marker = tmp_path / "applied.txt"
    repo = seeded(tmp_path, marker)
    backend = f"""\
      state_backend:
        pg: {{conn_str_file: {conn_file}, schema_prefix: team_}}
    """
    results = []
    for name in ("a", "b"):
        config = write_host_config(tmp_path / f"{name}.yaml", repo.url, tmp_path / name)
        config.write_text(config.read_text() + textwrap.indent(textwrap.dedent(backend), "  "))
        reconciler = Reconciler(load_host_config(config))
        try:
            results.append(reconciler.run_pass(PassRequest(trigger="cli")))
        finally:
            reconciler.close()
    assert [r.outcomes["app"].decision for r in results] == [Decision.APPLY, Decision.NOTHING]
    assert marker.read_text() == "applied\n"
    schemas = subprocess.run(
        ["psql", url.split("&")[0], "-tAc", "SELECT schema_name FROM information_schema.schemata"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert "team_app" in schemas
    for state_dir in (tmp_path / "a", tmp_path / "b"):
        written = [p for p in state_dir.rglob("*") if p.is_file() and not p.is_symlink()]
        assert not [p for p in written if b"conn-canary-5e1f" in p.read_bytes()]
        assert not (state_dir / "units" / "app" / "terraform.tfstate").exists()


def test_a_changed_only_pass_plans_units_whose_state_is_in_the_bucket(
    tmp_path: Path, s3: object, moto_server: MotoServer
) -> None:
    """Another agent (or a person) may have written the state: its serial cannot be read
    without Terraform, so a changed-only pass never calls such a unit unchanged, and a
    dependent reads the outputs from the bucket, not from a local file that is not there."""
    marker = tmp_path / "applied.txt"
    repo = seeded(tmp_path, marker)
    repo.write(
        "stacks/reader/main.tf",
        'variable "id" { type = string }\noutput "seen" { value = var.id }\n',
    )
    repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n"
        "  - {name: reader, stack: stacks/reader, depends_on: [app],"
        " vars: {id: {from_stack: {unit: app, output: id}}}}\n",
    )
    repo.push("reader")
    reconciler = agent(tmp_path, "a", repo, moto_server)
    try:
        assert reconciler.run_pass(PassRequest(trigger="cli")).ok
        result = reconciler.run_pass(PassRequest(trigger="poll", changed_only=True))
    finally:
        reconciler.close()
    assert result.ok, result.error
    assert result.outcomes["app"].decision == Decision.NOTHING  # planned, not "unchanged"
    assert result.outcomes["reader"].decision == Decision.NOTHING  # same output as applied
    assert marker.read_text() == "applied\n"


FAIL_FIRST_DDL = """
CREATE SEQUENCE fault_count;
CREATE FUNCTION fail_first_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
  -- nextval is not rolled back with the failing statement: this fires once.
  IF nextval('fault_count') = 1 THEN
    RAISE {error} USING MESSAGE = '{message}';
  END IF;
END $$;
CREATE EVENT TRIGGER fail_first_ddl ON ddl_command_start EXECUTE FUNCTION fail_first_ddl();
"""


# The two ways lib/pq reports the race, as seen in CI.
CATALOG_RACES = [
    (
        "unique_violation",
        'duplicate key value violates unique constraint "pg_class_relname_nsp_index"',
    ),
    ("duplicate_table", 'relation "global_states_id_seq" already exists'),
]


@pytest.mark.parametrize(("error", "message"), CATALOG_RACES)
def test_a_first_init_that_lost_a_catalog_race_is_run_again(
    tmp_path: Path, postgres: PostgresCluster, error: str, message: str
) -> None:
    """Two units' first `init` on the `pg` backend at once: one `CREATE ... IF NOT EXISTS`
    can lose to the other with a duplicate key of PostgreSQL's catalog. The database
    answers the first DDL statement so (an event trigger), as that race does."""
    url = postgres.create_database(f"state_race_{error}")
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(FAIL_FIRST_DDL.replace("{error}", error).replace("{message}", message))
    conn_file = tmp_path / "state-db.conn"
    conn_file.write_text(url + "\n")
    conn_file.chmod(0o600)
    marker = tmp_path / "applied.txt"
    repo = seeded(tmp_path, marker)
    config = write_host_config(tmp_path / "agent.yaml", repo.url, tmp_path / "state")
    config.write_text(
        config.read_text() + f"  state_backend:\n    pg: {{conn_str_file: {conn_file}}}\n"
    )
    reconciler = Reconciler(load_host_config(config))
    try:
        result = reconciler.run_pass(PassRequest(trigger="cli"))
    finally:
        reconciler.close()
    assert result.ok, result.outcomes["app"].error
    assert marker.read_text() == "applied\n"
    init = (tmp_path / "state" / "runs" / result.run_id / "app" / "init.txt").read_text()
    assert message in init, init
    assert "another unit created the same state tables: init again" in init, init
