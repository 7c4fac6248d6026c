"""Plans of proposed changes, end to end: a real bare remote with proposal refs pushed to it
(`refs/pull/N/head`, a feature branch), the agent's clone, the embedded Terraform, the run
store. No mocks: the main pass applies for real, then proposals are planned against it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.core.redact import Redactor
from agent.engine.proposals import ProposalPlanner
from agent.engine.reconcile import PassRequest, Reconciler
from agent.service.proposals import ProposalWorker
from agent.state.passlock import PassLock
from agent.state.proposals import ProposalRecords
from agent.state.store import RunStore
from agent.units.proposal_unit import copy_state
from tests.support.infra import InfraRepo, git, write_host_config

CANARY = "pr-canary-5c1d0e77-secret-value"

APP_TF = """
variable "size" {
  type    = string
  default = "small"
}
resource "terraform_data" "app" {
  input = var.size
}
"""
DB_TF = """
variable "db_password" {
  type = string
}
resource "terraform_data" "db" {
  input = var.db_password
}
"""
OTHER_TF = 'resource "terraform_data" "other" {\n  input = "same"\n}\n'


def manifest(size: str = "small") -> str:
    return f"""\
    version: 1
    units:
      - {{name: app, stack: stacks/app, vars: {{size: {size}}}}}
      - name: db
        stack: stacks/db
        secrets: {{db_password: "file:SECRETS/db"}}
      - {{name: web, stack: stacks/other, depends_on: [app]}}
      - {{name: lone, stack: stacks/lone}}
    """


@pytest.fixture
def world(tmp_path: Path):
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "db").write_text(CANARY)
    (secrets / "db").chmod(0o600)
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/app/main.tf", APP_TF)
    repo.write("stacks/db/main.tf", DB_TF)
    repo.write("stacks/other/main.tf", OTHER_TF)
    repo.write("stacks/lone/main.tf", OTHER_TF)
    repo.write("gitops.yaml", manifest().replace("SECRETS", str(secrets)))
    repo.push("seed")
    return repo, secrets


def host_config(tmp_path: Path, repo: InfraRepo, secrets: Path, proposals: str) -> Path:
    extra = f"secrets: {{allowed: ['file:{secrets}/']}}\n" + proposals
    return write_host_config(tmp_path / "agent.yaml", repo.url, tmp_path / "state", extra)


def main_pass(config: Path) -> None:
    reconciler = Reconciler(load_host_config(config))
    try:
        result = reconciler.run_pass(PassRequest(trigger="test"))
    finally:
        reconciler.close()
    assert result.ok, result.error


def propose(repo: InfraRepo, ref: str, files: dict[str, str], *, email: str = "") -> str:
    """Commit `files` on a branch off main and push it to `ref` of the remote."""
    git(repo.work, "checkout", "-q", "-B", "proposal", "main")
    for path, text in files.items():
        repo.write(path, text)
    git(repo.work, "add", "-A")
    author = [f"--author=Someone <{email}>"] if email else []
    git(repo.work, "commit", "-q", *author, "-m", "proposal")
    git(repo.work, "push", "-q", "--force", "origin", f"HEAD:{ref}")
    sha = repo.head()
    git(repo.work, "checkout", "-q", "main")
    return sha


def digests(state: Path) -> dict[str, str]:
    """Every unit's state file, and the main checkout's HEAD, byte for byte."""
    found = {
        str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((state / "units").glob("*/terraform.tfstate*"))
    }
    found["checkout HEAD"] = git(state / "checkout", "rev-parse", "HEAD")
    return found


PROPOSALS = """\
proposals:
  refs: ["refs/pull/*/head", "feature/*"]
  authors: ["*@example.invalid"]
"""


def test_a_proposal_is_planned_and_never_changes_state(tmp_path: Path, world) -> None:
    repo, secrets = world
    config = host_config(tmp_path, repo, secrets, PROPOSALS)
    main_pass(config)
    state = tmp_path / "state"
    before = digests(state)
    head = propose(
        repo,
        "refs/pull/7/head",
        {"gitops.yaml": manifest("large").replace("SECRETS", str(secrets))},
    )

    planner = ProposalPlanner(load_host_config(config))
    try:
        result = planner.poll()
    finally:
        planner.close()

    (row,) = result.planned
    assert (row.ref, row.head, row.status) == ("refs/pull/7/head", head, "planned")
    units = {u.unit: u for u in row.units}
    # app's vars changed; web depends on it; db and lone are untouched.
    assert set(units) == {"app", "web"}
    assert units["app"].status == "changes" and units["app"].counts == "+0 ~1 -0"
    assert units["web"].status == "no-changes"
    plan = (state / "proposals" / "runs" / units["app"].plan_id / "app" / "plan.txt").read_text()
    assert '"small" -> "large"' in plan
    assert digests(state) == before  # state files and the main checkout: untouched
    assert not list(state.rglob("tfplan"))  # saved plans hold variable values: removed
    assert not list((state / "proposals" / "units").glob("*/terraform.tfstate"))
    # Nothing was recorded as a pass: `agent history` does not show proposals.
    assert [r.trigger for r in RunStore(state).runs()] == ["test"]


def test_a_second_poll_plans_only_new_heads_and_closes_gone_refs(tmp_path: Path, world) -> None:
    repo, secrets = world
    config = host_config(tmp_path, repo, secrets, PROPOSALS)
    main_pass(config)
    propose(repo, "refs/heads/feature/x", {"stacks/lone/main.tf": OTHER_TF.replace("same", "new")})
    planner = ProposalPlanner(load_host_config(config))
    try:
        first = planner.poll()
        again = planner.poll()
        git(repo.work, "push", "-q", "origin", ":refs/heads/feature/x")
        gone = planner.poll()
        listed = planner.records.all()
    finally:
        planner.close()
    assert [r.ref for r in first.planned] == ["refs/heads/feature/x"]
    assert [u.unit for u in first.planned[0].units] == ["lone"]
    assert again.planned == []
    assert gone.closed == ["refs/heads/feature/x"] and listed == []


def test_a_disallowed_author_is_not_planned(tmp_path: Path, world) -> None:
    repo, secrets = world
    config = host_config(
        tmp_path,
        repo,
        secrets,
        'proposals: {refs: ["refs/pull/*/head"], authors: ["alice@example.org"]}\n',
    )
    main_pass(config)
    # The stack would run a command on the bastion at plan time: it must not run.
    marker = tmp_path / "ran"
    evil = f"""
    data "external" "x" {{
      program = ["sh", "-c", "touch {marker}; echo '{{}}'"]
    }}
    """
    propose(repo, "refs/pull/9/head", {"stacks/lone/evil.tf": evil}, email="mallory@evil.invalid")
    planner = ProposalPlanner(load_host_config(config))
    try:
        (row,) = planner.poll().planned
    finally:
        planner.close()
    assert row.status == "refused"
    assert "mallory@evil.invalid is not allowed" in (row.detail or "")
    assert row.units == ()
    assert not marker.exists()
    assert not (tmp_path / "state" / "proposals" / "runs").exists()


def test_a_unit_needing_secrets_is_skipped_unless_the_host_allows_it(tmp_path: Path, world) -> None:
    repo, secrets = world
    # The change shows the secret's value in the plan (the variable is not `sensitive`).
    db_change = {"stacks/db/main.tf": DB_TF.replace("var.db_password", '"${var.db_password}-v2"')}
    config = host_config(tmp_path, repo, secrets, PROPOSALS)
    main_pass(config)
    propose(repo, "refs/pull/3/head", db_change)
    planner = ProposalPlanner(load_host_config(config))
    try:
        (row,) = planner.poll().planned
    finally:
        planner.close()
    (db,) = row.units
    assert db.unit == "db" and db.status == "skipped"
    assert (db.detail or "").startswith("skipped: needs secrets (db_password)")

    # Opted in: the plan gets the secret, and it shows nowhere the agent writes.
    config = host_config(tmp_path, repo, secrets, PROPOSALS + "  secrets_for: [db]\n")
    propose(repo, "refs/pull/3/head", {**db_change, "stacks/db/extra.tf": "# again\n"})
    planner = ProposalPlanner(load_host_config(config))
    try:
        (row,) = planner.poll().planned
    finally:
        planner.close()
    (db,) = row.units
    assert db.status == "changes", db.detail
    state = tmp_path / "state"
    written = [
        p
        for p in (state / "proposals").rglob("*")
        if p.is_file() and CANARY.encode() in p.read_bytes()
    ]
    assert written == []
    assert CANARY.encode() not in (state / "agent.db").read_bytes()
    plan = (state / "proposals" / "runs" / db.plan_id / "db" / "plan.txt").read_text()
    assert '"***" -> "***-v2"' in plan


def test_an_invalid_manifest_is_reported_and_nothing_planned(tmp_path: Path, world) -> None:
    repo, secrets = world
    config = host_config(tmp_path, repo, secrets, PROPOSALS)
    main_pass(config)
    propose(repo, "refs/pull/4/head", {"gitops.yaml": "version: 1\nunits: [{name: x}]\n"})
    planner = ProposalPlanner(load_host_config(config))
    try:
        (row,) = planner.poll().planned
    finally:
        planner.close()
    assert row.status == "invalid"
    assert "gitops.yaml:2" in (row.detail or "")
    assert row.units == ()


def agent(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_commands_a_reviewer_uses(tmp_path: Path, world) -> None:
    repo, secrets = world
    config = host_config(tmp_path, repo, secrets, PROPOSALS)
    main_pass(config)
    head = propose(repo, "refs/pull/7/head", {"stacks/other/main.tf": APP_TF})

    planned = agent(config, "proposals", "--plan")
    listed = agent(config, "proposals", "--json")
    logs = agent(config, "logs", "web", "--proposal", "pull/7/head")
    missing = agent(config, "logs", "app", "--proposal", "7")

    assert planned.returncode == 0, planned.stderr
    assert f"refs/pull/7/head  {head[:12]}  planned  +1 ~0 -1" in planned.stdout
    assert "  web: changes +1 ~0 -1" in planned.stdout
    (entry,) = json.loads(listed.stdout)
    assert entry["units"][0] == {
        "unit": "web", "status": "changes", "add": 1, "change": 0, "destroy": 1, "detail": None
    }  # fmt: skip
    assert logs.returncode == 0, logs.stderr
    assert "terraform_data.app will be created" in logs.stdout
    assert "terraform_data.other will be destroyed" in logs.stdout
    assert missing.returncode == 5
    assert "did not plan unit 'app'" in missing.stderr and "its units: web" in missing.stderr


def test_a_proposal_reads_nothing_outside_its_repository(tmp_path: Path, world) -> None:
    repo, secrets = world
    config = host_config(tmp_path, repo, secrets, PROPOSALS)
    main_pass(config)
    state = tmp_path / "state"
    # Files the agent's user can read: a secret, the host config, the run store, state.
    targets = {
        "secret": secrets / "db",
        "config": config,
        "store": state / "agent.db",
        "state": state / "units" / "app" / "terraform.tfstate",
    }
    outputs = "".join(
        f'output "{name}" {{\n  value = fileexists("{path}") ? "READ {name}" : "none"\n}}\n'
        for name, path in targets.items()
    )
    outputs += 'output "inside" {\n  value = file("${path.module}/../app/main.tf")\n}\n'
    propose(repo, "refs/pull/5/head", {"stacks/lone/outputs.tf": outputs})

    planner = ProposalPlanner(load_host_config(config))
    try:
        (row,) = planner.poll().planned
    finally:
        planner.close()
    (lone,) = row.units
    assert lone.status == "changes", lone.detail
    plan = (state / "proposals" / "runs" / lone.plan_id / "lone" / "plan.txt").read_text()
    assert "READ" not in plan
    assert plan.count('= "none"') == len(targets)
    assert 'resource "terraform_data" "app"' in plan  # files of the repository: readable


def test_a_poll_runs_while_a_main_pass_holds_the_pass_lock(tmp_path: Path, world) -> None:
    repo, secrets = world
    config = host_config(tmp_path, repo, secrets, PROPOSALS)
    main_pass(config)
    propose(repo, "refs/pull/8/head", {"stacks/lone/main.tf": APP_TF})
    main_lock = PassLock(tmp_path / "state")
    main_lock.acquire(wait=False)
    planner = ProposalPlanner(load_host_config(config))
    try:
        with main_lock:
            (row,) = planner.poll().planned
    finally:
        planner.close()
    assert row.status == "planned" and [u.status for u in row.units] == ["changes"]


HOLDER = """
import fcntl, sys, time
with open(sys.argv[1], "rb+") as f:
    fcntl.lockf(f, fcntl.LOCK_EX)  # as Terraform locks a local state it writes
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_the_state_copy_waits_while_terraform_holds_the_state(tmp_path: Path) -> None:
    state = tmp_path / "terraform.tfstate"
    state.write_text('{"version": 4, "serial": 3}')
    copy = tmp_path / "copy" / "terraform.tfstate"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert copy_state(state, copy, wait=0.5) is False
        assert not copy.exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.write("done\n")
        holder.stdin.close()
        holder.wait(timeout=30)
    assert copy_state(state, copy, wait=0.5) is True
    assert copy.read_bytes() == state.read_bytes()
    assert copy.stat().st_mode & 0o777 == 0o600


def test_the_worker_plans_when_triggered_and_stops(tmp_path: Path, world) -> None:
    repo, secrets = world
    config = host_config(tmp_path, repo, secrets, PROPOSALS)
    main_pass(config)
    head = propose(repo, "refs/pull/2/head", {"stacks/lone/main.tf": APP_TF})
    host = load_host_config(config)
    worker = ProposalWorker.from_host(host, Redactor())
    assert worker is not None
    worker.start()
    try:
        worker.trigger("refs/pull/2/head")
        assert worker.wait_for_polls(1, timeout=240)
    finally:
        worker.stop()
    store = RunStore(tmp_path / "state")
    (row,) = ProposalRecords(store).all()
    assert (row.head, row.status) == (head, "planned")
    no_proposals = load_host_config(host_config(tmp_path, repo, secrets, ""))
    assert ProposalWorker.from_host(no_proposals, Redactor()) is None


def ssh_key(path: Path, name: str) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path


def test_with_repo_signing_only_heads_signed_by_an_allowed_key_are_planned(
    tmp_path: Path, world
) -> None:
    repo, secrets = world
    allowed = ssh_key(tmp_path / "ops", "ops@example.org")
    stranger = ssh_key(tmp_path / "stranger", "stranger@example.org")
    signers = tmp_path / "allowed_signers"
    signers.write_text(f"ops@example.org {allowed.with_suffix('.pub').read_text()}")
    config = host_config(tmp_path, repo, secrets, PROPOSALS)
    signing = f"  branch: main\n  signing: {{ssh_allowed_signers: {signers}}}\n"
    config.write_text(config.read_text().replace("  branch: main\n", signing))
    git(repo.work, "config", "gpg.format", "ssh")
    git(repo.work, "config", "commit.gpgsign", "true")
    heads = {}
    for ref, key in (("refs/pull/1/head", allowed), ("refs/pull/2/head", stranger)):
        git(repo.work, "config", "user.signingkey", str(key))
        heads[ref] = propose(repo, ref, {"stacks/lone/main.tf": APP_TF})

    planner = ProposalPlanner(load_host_config(config))
    try:
        rows = {row.ref: row for row in planner.poll().planned}
    finally:
        planner.close()
    assert rows["refs/pull/1/head"].status == "planned"
    assert [u.unit for u in rows["refs/pull/1/head"].units] == ["lone"]
    refused = rows["refs/pull/2/head"]
    assert refused.status == "refused" and refused.units == ()
    assert (refused.detail or "").startswith("not signed by an allowed key")
