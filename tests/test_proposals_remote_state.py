"""Proposal plans of units whose state is in the host's `terraform.state_backend` (S3 on
moto server with Terraform's own lock file; PostgreSQL). The agent pulls the state outside
the sandbox; the proposal's Terraform plans in bubblewrap against that copy, with no backend
credential, and the stored state is never written. No mocks: a real main pass applies into
the backend first, then a pushed proposal is planned by the real planner.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from agent.config import load_host_config
from agent.engine.proposals import ProposalPlanner
from agent.engine.reconcile import PassRequest, Reconciler
from tests.support.infra import InfraRepo, git, write_host_config
from tests.support.moto import REGION, MotoServer, fake_aws_credentials
from tests.support.postgres import PostgresCluster, server_bin
from tests.support.sshd import SshServer, chown_tree, ensure_user, make_client_key, public_key

BUCKET = "infra-state"
KEYS = ("team/app.tfstate", "team/web.tfstate")

APP_TF = """
variable "size" {
  type    = string
  default = "small"
}
resource "terraform_data" "app" {
  input = var.size
}
output "size" {
  value = terraform_data.app.output
}
"""
WEB_TF = """
variable "app_size" {
  type = string
}
resource "terraform_data" "web" {
  input = "web for ${var.app_size}"
}
"""
MANIFEST = """\
version: 1
units:
  - {name: app, stack: stacks/app}
  - name: web
    stack: stacks/web
    depends_on: [app]
    vars: {app_size: {from_stack: {unit: app, output: size}}}
"""
NEW_UNIT = "  - {name: extra, stack: stacks/web, vars: {app_size: tiny}}\n"
# The environment of the proposal's Terraform, as every provider and `external` program it
# starts inherits it (the `external` provider cannot be downloaded here: no registry).
ENV_PROBE = 'output "environment" {\n  value = file("/proc/self/environ")\n}\n'


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, moto_server: MotoServer) -> object:
    moto_server.reset()
    fake_aws_credentials(monkeypatch)  # the agent's credentials: the main pass uses them
    client = boto3.client("s3", endpoint_url=moto_server.url, region_name=REGION)
    client.create_bucket(Bucket=BUCKET)
    return client


def objects(client: object) -> dict[str, str]:
    """Every object in the bucket: key -> sha256 of its bytes."""
    listing = client.list_objects_v2(Bucket=BUCKET)  # type: ignore[attr-defined]
    found = {}
    for item in listing.get("Contents", []):
        body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()  # type: ignore[attr-defined]
        found[item["Key"]] = hashlib.sha256(body).hexdigest()
    return found


def host_config(tmp_path: Path, repo: InfraRepo, backend: str) -> Path:
    """`backend`: the `state_backend` mapping (flow style), under `terraform:`."""
    proposals = 'proposals: {refs: ["refs/pull/*/head"], authors: ["*@example.invalid"]}\n'
    config = write_host_config(tmp_path / "agent.yaml", repo.url, tmp_path / "state", proposals)
    block = f"terraform:\n  state_backend: {backend}\n"
    config.write_text(config.read_text().replace("terraform:\n", block, 1))
    return config


def seed(tmp_path: Path, manifest: str) -> InfraRepo:
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/app/main.tf", APP_TF)
    repo.write("stacks/web/main.tf", WEB_TF)
    repo.write("gitops.yaml", manifest)
    repo.push("seed")
    return repo


def main_pass(config: Path) -> None:
    reconciler = Reconciler(load_host_config(config))
    try:
        result = reconciler.run_pass(PassRequest(trigger="test"))
    finally:
        reconciler.close()
    assert result.ok, result.error


def propose_bigger_app(repo: InfraRepo, manifest: str | None = None) -> None:
    """refs/pull/3/head: the app's default size changes, and the environment probe."""
    git(repo.work, "checkout", "-q", "-b", "proposal")
    repo.write("stacks/app/main.tf", APP_TF.replace('"small"', '"large"'))
    repo.write("stacks/app/probe.tf", ENV_PROBE)
    if manifest is not None:
        repo.write("gitops.yaml", manifest)
    git(repo.work, "add", "-A")
    git(repo.work, "commit", "-q", "-m", "bigger app")
    git(repo.work, "push", "-q", "origin", "HEAD:refs/pull/3/head")
    git(repo.work, "checkout", "-q", "main")


def plan_proposal(config: Path) -> tuple[dict[str, object], str]:
    """Poll once: the units of the one proposal, and the app unit's plan output."""
    planner = ProposalPlanner(load_host_config(config))
    try:
        (row,) = planner.poll().planned
    finally:
        planner.close()
    units = {u.unit: u for u in row.units}
    assert row.status == "planned", (row.detail, units)
    app = units["app"]
    assert (app.status, app.plan_add, app.plan_change, app.plan_destroy) == (
        "changes", 0, 1, 0,
    ), app.detail  # fmt: skip
    runs = config.parent / "state" / "proposals" / "runs" / app.plan_id
    plan = (runs / "app" / "plan.txt").read_text()
    # The real diff against the applied state: one in-place change, not a re-create.
    assert '~ input  = "small" -> "large"' in plan, plan
    assert "HOME=" in plan, plan  # the probe printed the sandbox's environment
    left = (config.parent / "state" / "proposals").rglob("*.tfstate")
    # The copies are gone once planned (tfdata/ holds only Terraform's backend settings).
    assert [p for p in left if p.parent.name != "tfdata"] == []
    return units, plan  # type: ignore[return-value]


def test_a_proposal_plans_against_a_pulled_copy_of_the_s3_state(
    tmp_path: Path, s3: object, moto_server: MotoServer
) -> None:
    repo = seed(tmp_path, MANIFEST)
    bucket = (
        f'{{bucket: {BUCKET}, region: {REGION}, key_prefix: team/, endpoint: "{moto_server.url}"}}'
    )
    config = host_config(tmp_path, repo, f"{{s3: {bucket}}}")
    main_pass(config)
    before = objects(s3)
    assert sorted(before) == list(KEYS)
    # A new unit too: the backend has no state for it yet, so it plans a create.
    propose_bigger_app(repo, MANIFEST + NEW_UNIT)

    units, plan = plan_proposal(config)
    web = units["web"]
    assert web.status == "no-changes", web.detail  # its upstream's output, read from S3
    new = units["extra"]
    assert (new.status, new.plan_add, new.plan_change) == ("changes", 1, 0), new.detail
    # The agent had AWS credentials (the main pass used them); the sandbox has none.
    assert "AWS_" not in plan and "testing" not in plan, plan
    # Never written: the objects are byte for byte as the main pass left them, and no lock.
    assert objects(s3) == before


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    if server_bin() is None:
        pytest.skip("no PostgreSQL server installed (tests/run.sh installs it)")
    with PostgresCluster() as cluster:
        yield cluster


def test_a_proposal_plans_against_a_pulled_copy_of_the_pg_state(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    url = postgres.create_database("proposalstate") + "&application_name=conn-canary-9b2e"
    conn_file = tmp_path / "state-db.conn"
    conn_file.write_text(url + "\n")
    conn_file.chmod(0o600)
    repo = seed(tmp_path, "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    config = host_config(tmp_path, repo, f"{{pg: {{conn_str_file: {conn_file}}}}}")
    main_pass(config)
    query = ["psql", url.split("&")[0], "-tAc", "SELECT md5(data) FROM gitops_agent_app.states"]

    def stored() -> str:
        return subprocess.run(query, check=True, capture_output=True, text=True).stdout

    before = stored()
    assert before.strip()
    propose_bigger_app(repo)

    _, plan = plan_proposal(config)
    # The connection string reached the agent's pull, never the sandbox.
    assert "PG_CONN_STR" not in plan and "conn-canary-9b2e" not in plan, plan
    assert stored() == before
    written = [p for p in (tmp_path / "state").rglob("*") if p.is_file() and not p.is_symlink()]
    assert not [p for p in written if b"conn-canary-9b2e" in p.read_bytes()]


def test_a_fleet_proposal_reads_its_stack_output_from_the_pg_state(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    """A fleet var `from_stack` of a unit whose state is in the backend: the proposal's plan
    reads the output as applied there (the agent keeps no local state file for it)."""
    reason = SshServer.available()
    if reason:
        pytest.skip(reason)
    ensure_user()
    url = postgres.create_database("fleetoutputs")
    conn_file = tmp_path / "state-db.conn"
    conn_file.write_text(url + "\n")
    conn_file.chmod(0o600)
    key = make_client_key(tmp_path / "id_ed25519")
    target = Path(tempfile.mkdtemp(prefix="gitops-fleetout-", dir="/tmp"))
    with SshServer() as web1:
        web1.add_authorized_key(web1.user, public_key(key))
        chown_tree(target, web1.user)
        known_hosts = web1.write_known_hosts(tmp_path / "known_hosts")
        manifest = (
            "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n"
            "  - name: conf\n    depends_on: [app]\n"
            "    vars: {size: {from_stack: {unit: app, output: size}}}\n"
            "    fleet:\n      user: gitops-test\n"
            f"      hosts: {{static: [{{name: web1, address: 127.0.0.1, port: {web1.port}}}]}}\n"
            f"      resources:\n        - template: {target}/size.conf\n"
            "          source: templates/size.j2\n"
        )
        repo = InfraRepo(tmp_path / "git")
        repo.write("stacks/app/main.tf", APP_TF)
        repo.write("templates/size.j2", "size={{ size }}\n")
        repo.write("gitops.yaml", manifest)
        repo.push("seed")
        config = host_config(tmp_path, repo, f"{{pg: {{conn_str_file: {conn_file}}}}}")
        hosts = f"hosts:\n  key_file: {key}\n  known_hosts: {known_hosts}\n"
        config.write_text(config.read_text() + hosts)
        main_pass(config)
        assert (target / "size.conf").read_text() == "size=small\n"
        # The state is only in PostgreSQL (tfdata/ holds Terraform's backend settings).
        assert not (tmp_path / "state" / "units" / "app" / "terraform.tfstate").exists()

        git(repo.work, "checkout", "-q", "-b", "proposal")
        repo.write("templates/size.j2", "size={{ size }}\nmore=1\n")
        git(repo.work, "add", "-A")
        git(repo.work, "commit", "-q", "-m", "one more line")
        git(repo.work, "push", "-q", "origin", "HEAD:refs/pull/4/head")
        git(repo.work, "checkout", "-q", "main")
        planner = ProposalPlanner(load_host_config(config))
        try:
            (row,) = planner.poll().planned
        finally:
            planner.close()
        conf = {u.unit: u for u in row.units}["conf"]
        assert (conf.status, conf.plan_change) == ("changes", 1), conf.detail
        assert (target / "size.conf").read_text() == "size=small\n"  # nothing applied
        # The pulled copy is gone once read.
        assert not list((tmp_path / "state" / "proposals").rglob("upstream-*.tfstate"))
