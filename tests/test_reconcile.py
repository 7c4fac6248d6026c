"""The reconcile pass end to end: real Git repos, the embedded Terraform, our provider.

Each test pushes to a bare remote as a user would, runs passes with the real
`Reconciler`, and checks what a user checks: the managed files, the run store,
the logs kept in the state directory.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.store import RunStatus, UnitStatus
from tests.support.infra import InfraRepo, write_host_config
from tests.tfhelpers import LOCALFILE_REQUIRED

PROVIDER = LOCALFILE_REQUIRED

BASE_TF = (
    PROVIDER
    + """
variable "dir" { type = string }
variable "motd" {
  type    = string
  default = "hello"
}
resource "localfile_file" "motd" {
  path    = "${var.dir}/motd.txt"
  content = "${var.motd}\\n"
}
resource "terraform_data" "env" { input = "test" }
output "dir" { value = var.dir }
"""
)

APP_TF = (
    PROVIDER
    + """
variable "dir" { type = string }
variable "replicas" { type = number }
resource "localfile_file" "conf" {
  path    = "${var.dir}/app.conf"
  content = "replicas = ${var.replicas}\\n"
}
"""
)


def manifest(managed: Path, *, replicas: int = 2, base_drift: str = "revert") -> str:
    return f"""\
        version: 1
        units:
          - name: base
            stack: stacks/base
            drift: {base_drift}
            vars: {{dir: "{managed}"}}
          - name: app
            stack: stacks/app
            depends_on: [base]
            vars:
              dir: {{from_stack: {{unit: base, output: dir}}}}
              replicas: {replicas}
        """


class World:
    """An infra repo, a host config and a state dir; runs passes like the agent does."""

    def __init__(self, tmp: Path, extra_config: str = "") -> None:
        self.tmp = tmp
        self.repo = InfraRepo(tmp / "git")
        self.managed = tmp / "managed"
        self.state = tmp / "state"
        self.config = write_host_config(tmp / "agent.yaml", self.repo.url, self.state, extra_config)

    def seed(self, **kwargs: object) -> str:
        self.repo.write("stacks/base/main.tf", BASE_TF)
        self.repo.write("stacks/app/main.tf", APP_TF)
        self.repo.write("gitops.yaml", manifest(self.managed, **kwargs))  # type: ignore[arg-type]
        return self.repo.push("seed")

    def reconcile(self, **kwargs: object):
        reconciler = Reconciler(load_host_config(self.config))
        try:
            return reconciler.run_pass(PassRequest(trigger="test", **kwargs))  # type: ignore[arg-type]
        finally:
            reconciler.close()

    def store(self):
        from agent.state.store import RunStore

        return RunStore(self.state)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_first_pass_applies_stacks_in_dependency_order(world: World) -> None:
    head = world.seed()
    result = world.reconcile()

    assert result.status is RunStatus.SUCCEEDED, result.error
    assert result.revision == head
    assert (world.managed / "motd.txt").read_text() == "hello\n"
    assert (world.managed / "app.conf").read_text() == "replicas = 2\n"
    assert {n: o.decision for n, o in result.outcomes.items()} == {"base": "apply", "app": "apply"}
    rows = {r.unit: r for r in world.store().unit_runs(result.run_id)}
    assert rows["base"].finished_at <= rows["app"].started_at  # app waited for base
    assert rows["base"].plan_add == 2 and rows["app"].plan_add == 1
    # Plan output, plan JSON and apply output are kept, private.
    run_dir = world.state / "runs" / result.run_id / "base"
    assert "Plan: 2 to add" in (run_dir / "plan.txt").read_text()
    assert "Apply complete!" in (run_dir / "apply.txt").read_text()
    assert json.loads((run_dir / "plan.json").read_text())["resource_changes"]
    for path in run_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(world.state.stat().st_mode) == 0o700
    # Terraform's state lives in the state dir, never in the agent's checkout.
    assert (world.state / "units" / "base" / "terraform.tfstate").exists()
    assert not list((world.state / "checkout").rglob("terraform.tfstate"))


def test_second_pass_changes_nothing(world: World) -> None:
    world.seed()
    world.reconcile()
    motd_mtime = (world.managed / "motd.txt").stat().st_mtime_ns

    result = world.reconcile()

    assert result.status is RunStatus.SUCCEEDED
    assert {o.decision for o in result.outcomes.values()} == {"nothing"}
    assert not list((world.state / "runs" / result.run_id).glob("*/apply.txt"))
    assert (world.managed / "motd.txt").stat().st_mtime_ns == motd_mtime
    assert len(world.store().runs()) == 2


def test_a_pushed_change_is_applied(world: World) -> None:
    world.seed()
    world.reconcile()
    world.repo.write("gitops.yaml", manifest(world.managed, replicas=5))
    head = world.repo.push("5 replicas")

    result = world.reconcile()

    assert result.status is RunStatus.SUCCEEDED, result.error
    assert result.revision == head
    assert result.outcomes["app"].decision == "apply"
    assert result.outcomes["app"].drift is False
    assert result.outcomes["base"].decision == "nothing"
    assert (world.managed / "app.conf").read_text() == "replicas = 5\n"


def test_drift_is_reverted_under_revert(world: World) -> None:
    world.seed()
    world.reconcile()
    (world.managed / "motd.txt").write_text("edited by hand\n")

    result = world.reconcile()

    assert result.outcomes["base"].decision == "apply"
    assert result.outcomes["base"].drift is True
    assert (world.managed / "motd.txt").read_text() == "hello\n"
    state = world.store().unit_state("base")
    assert state is not None and state.drift is True  # recorded for status


def test_drift_is_recorded_and_left_under_report(world: World) -> None:
    world.seed(base_drift="report")
    world.reconcile()
    (world.managed / "motd.txt").write_text("edited by hand\n")

    result = world.reconcile()

    assert result.status is RunStatus.SUCCEEDED
    assert result.outcomes["base"].decision == "report"
    assert result.outcomes["base"].drift is True
    assert (world.managed / "motd.txt").read_text() == "edited by hand\n"
    state = world.store().unit_state("base")
    assert state is not None and state.drift is True and state.last_decision == "report"


def test_a_deleted_file_is_recreated(world: World) -> None:
    world.seed()
    world.reconcile()
    (world.managed / "app.conf").unlink()

    result = world.reconcile()

    assert result.outcomes["app"].decision == "apply"
    assert (world.managed / "app.conf").read_text() == "replicas = 2\n"


def test_a_destroy_is_held_under_the_destroy_policy(tmp_path: Path) -> None:
    world = World(tmp_path, "policy:\n  destroy: hold\n")
    world.seed()
    world.reconcile()
    # Removing the resource from the stack makes a plan that destroys it.
    world.repo.write("stacks/app/main.tf", PROVIDER + 'variable "dir" {}\nvariable "replicas" {}\n')
    world.repo.push("drop app.conf")

    result = world.reconcile()

    app = result.outcomes["app"]
    assert app.status is UnitStatus.HELD and app.decision == "hold"
    assert app.plan_destroy == 1
    assert (world.managed / "app.conf").exists()  # nothing destroyed
    again = world.reconcile()  # still held, never applied by itself
    assert again.outcomes["app"].status is UnitStatus.HELD
    assert (world.managed / "app.conf").exists()


def test_a_dry_run_applies_nothing(world: World) -> None:
    world.seed()
    world.reconcile()
    world.repo.write("gitops.yaml", manifest(world.managed, replicas=5))
    world.repo.push("5 replicas")
    (world.managed / "motd.txt").write_text("drifted\n")

    result = world.reconcile(dry_run=True)

    assert result.outcomes["app"].decision == "plan-only"
    assert result.outcomes["base"].decision == "plan-only"
    assert result.outcomes["base"].drift is True
    assert (world.managed / "app.conf").read_text() == "replicas = 2\n"
    assert (world.managed / "motd.txt").read_text() == "drifted\n"
    # The unit did not converge at the new revision: a real pass still applies it.
    assert world.reconcile().outcomes["app"].decision == "apply"


def test_a_first_dry_run_names_the_output_that_does_not_exist_yet(world: World) -> None:
    world.seed()
    result = world.reconcile(dry_run=True)

    assert result.outcomes["base"].decision == "plan-only"
    app = result.outcomes["app"]
    assert app.status is UnitStatus.FAILED
    assert "output 'dir' of stack unit 'base'" in (app.error or "")
    assert not world.managed.exists()


def test_only_the_named_unit_runs(world: World) -> None:
    world.seed()
    world.reconcile()
    (world.managed / "motd.txt").write_text("x\n")
    (world.managed / "app.conf").write_text("x\n")

    result = world.reconcile(unit="app")

    assert list(result.outcomes) == ["app"]
    assert (world.managed / "app.conf").read_text() == "replicas = 2\n"
    assert (world.managed / "motd.txt").read_text() == "x\n"


@pytest.mark.parametrize(
    ("bad_manifest", "expected"),
    [
        ("version: 1\nunits:\n  - name: base\n    stack: [\n", "YAML syntax error"),
        (
            "version: 1\nunits:\n  - name: base\n    stack: stacks/base\n    stak: x\n",
            "units[0].stak: unknown key",
        ),
        ("version: 1\nunits:\n  - name: base\n    stack: 42\n", "units[0].stack: expected"),
        (
            "version: 1\nunits:\n  - {name: a, stack: stacks/base, depends_on: [b]}\n"
            "  - {name: b, stack: stacks/app, depends_on: [a]}\n",
            "cycle",
        ),
        (
            "version: 1\nunits:\n  - {name: a, stack: stacks/base}\n"
            "  - {name: a, stack: stacks/app}\n",
            "expected a unique unit name",
        ),
        ("version: 1\nunits:\n  - {name: a, stack: ../../etc}\n", "units[0].stack"),
    ],
    ids=["yaml-syntax", "unknown-key", "wrong-type", "cycle", "duplicate", "outside-repo"],
)
def test_an_invalid_revision_is_rejected_and_the_last_good_one_stays(
    world: World, bad_manifest: str, expected: str
) -> None:
    good = world.seed()
    world.reconcile()
    (world.managed / "motd.txt").write_text("drifted\n")
    world.repo.write("gitops.yaml", bad_manifest)
    bad = world.repo.push("broken manifest")

    result = world.reconcile()

    assert result.status is RunStatus.FAILED
    assert result.head == bad and result.revision == good
    assert result.error and expected in result.error and "gitops.yaml:" in result.error
    # The last good revision stays in force: its drift is still reverted.
    assert result.outcomes["base"].decision == "apply"
    assert (world.managed / "motd.txt").read_text() == "hello\n"
    store = world.store()
    assert store.current_revision() == good
    status = store.revision_status(bad)
    assert status is not None and status[0] == "rejected"


def test_an_invalid_first_revision_fails_the_pass_and_applies_nothing(world: World) -> None:
    world.repo.write("gitops.yaml", "version: 2\nunits: []\n")
    world.repo.push("bad")

    result = world.reconcile()

    assert result.status is RunStatus.FAILED
    assert result.outcomes == {}
    assert result.error and "gitops.yaml:1: version" in result.error


def test_a_terraform_error_fails_its_unit_and_blocks_only_its_dependents(world: World) -> None:
    world.seed()
    world.repo.write("stacks/lone/main.tf", 'resource "terraform_data" "x" { input = 1 }\n')
    world.repo.write(
        "gitops.yaml",
        manifest(world.managed) + "  - {name: lone, stack: stacks/lone}\n",
    )
    world.repo.write("stacks/base/main.tf", BASE_TF + 'resource "terraform_data" "y" {\n')
    world.repo.push("syntax error in base")

    result = world.reconcile()

    assert result.status is RunStatus.FAILED
    base, app, lone = (result.outcomes[n] for n in ("base", "app", "lone"))
    assert base.status is UnitStatus.FAILED
    assert "terraform" in (base.error or "") and "main.tf" in (base.error or "")
    assert app.status is UnitStatus.BLOCKED and "base" in (app.error or "")
    assert lone.status is UnitStatus.OK and lone.decision == "apply"


def test_a_history_rewrite_is_refused(world: World) -> None:
    world.seed()
    world.reconcile()
    world.repo.write("gitops.yaml", manifest(world.managed, replicas=3))
    applied = world.repo.push("3 replicas")
    world.reconcile()
    world.repo.write("gitops.yaml", manifest(world.managed, replicas=9))
    rewritten = world.repo.rewrite_history("9 replicas, history rewritten")

    result = world.reconcile()

    assert result.status is RunStatus.FAILED
    assert result.revision == applied and result.head == rewritten
    assert result.error and "not a fast-forward" in result.error
    assert (world.managed / "app.conf").read_text() == "replicas = 3\n"


def test_a_history_rewrite_is_taken_when_the_host_allows_it(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.config.write_text(
        world.config.read_text().replace(
            "branch: main", "branch: main\n  allow_history_rewrite: true"
        )
    )
    world.seed()
    world.reconcile()
    world.repo.write("gitops.yaml", manifest(world.managed, replicas=7))
    rewritten = world.repo.rewrite_history("rewritten")

    result = world.reconcile()

    assert result.status is RunStatus.SUCCEEDED, result.error
    assert result.revision == rewritten
    assert (world.managed / "app.conf").read_text() == "replicas = 7\n"


def test_drift_is_still_reverted_while_the_git_remote_is_away(world: World) -> None:
    good = world.seed()
    world.reconcile()
    world.repo.remote.rename(world.tmp / "moved.git")
    (world.managed / "motd.txt").write_text("drifted\n")

    result = world.reconcile()

    assert result.status is RunStatus.FAILED  # the user must learn that Git is unreachable
    assert result.error and "fetch failed" in result.error
    assert result.revision == good
    assert result.outcomes["base"].decision == "apply"
    assert (world.managed / "motd.txt").read_text() == "hello\n"
