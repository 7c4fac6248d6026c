"""Changed-only passes end to end: a push plans what it touched, and nothing else.

Real Git repos, the embedded Terraform behind a wrapper executable that logs each of its
invocations (the agent's configured `terraform.binary`), so the test counts the Terraform
runs that really happened per unit. No mocks.

Each input of a stack's plan is changed in turn and must make exactly its units plan: a
module outside the stack directory, a var, a secret's version, an upstream output, the
Terraform binary, the state's serial, a due drift check. An untouched unit must not start
Terraform at all, and its last real result must stay what it was.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from agent.cli.views import render_status, status_view
from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.store import RunStore, UnitStatus
from tests.support.docblocks import block
from tests.support.infra import InfraRepo, embedded_terraform
from tests.test_cli import agent

A_TF = """
variable "greeting" { type = string }
variable "token" {
  type      = string
  sensitive = true
}
module "m" { source = "../../modules/m" }
resource "terraform_data" "a" {
  input = "${var.greeting} ${module.m.word} ${sha256(var.token)}"
}
"""
MODULE_TF = 'output "word" { value = "%s" }\n'
B_TF = 'resource "terraform_data" "b" { input = "%s" }\noutput "name" { value = "%s" }\n'
C_TF = """
variable "name" { type = string }
resource "terraform_data" "c" { input = var.name }
"""
D_TF = 'resource "terraform_data" "d" { input = "untouched" }\n'

UNITS = ("a", "b", "c", "d")


def manifest(secret: Path, greeting: str = "hello") -> str:
    return f"""\
        version: 1
        units:
          - name: a
            stack: stacks/a
            vars: {{greeting: {greeting}}}
            secrets: {{token: "file:{secret}"}}
          - name: b
            stack: stacks/b
          - name: c
            stack: stacks/c
            depends_on: [b]
            vars: {{name: {{from_stack: {{unit: b, output: name}}}}}}
          - name: d
            stack: stacks/d
        """


class World:
    """An infra repo, a host config whose Terraform logs its runs, a state dir."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.repo = InfraRepo(tmp / "git")
        self.state = tmp / "state"
        self.log = tmp / "terraform-runs.log"
        self.wrapper = tmp / "bin" / "terraform"
        self.secrets = tmp / "secrets"
        self.secrets.mkdir(mode=0o700)
        self.secret = self.secrets / "token"
        self.write_secret("horse-battery-staple-v1")
        self.write_wrapper("")
        self.write_config("")

    def write_wrapper(self, comment: str) -> None:
        self.wrapper.parent.mkdir(exist_ok=True)
        self.wrapper.write_text(
            f"#!/bin/sh\n# {comment}\nprintf '%s\\n' \"$*\" >> {self.log}\n"
            f'exec {embedded_terraform()} "$@"\n'
        )
        self.wrapper.chmod(0o755)

    def write_secret(self, value: str) -> None:
        self.secret.write_text(value)
        self.secret.chmod(0o600)

    def write_config(self, units: str) -> None:
        self.config = self.tmp / "agent.yaml"
        self.config.write_text(
            f"repo: {{url: {self.repo.url}, branch: main}}\n"
            f"state_dir: {self.state}\n"
            f"terraform: {{binary: {self.wrapper}, parallelism: 4, timeout: 5m}}\n"
            f"secrets: {{allowed: ['file:{self.secrets}/']}}\n"
            f"intervals: {{drift: 1h{units}}}\n"
        )

    def seed(self) -> None:
        self.repo.write("stacks/a/main.tf", A_TF)
        self.repo.write("modules/m/main.tf", MODULE_TF % "world")
        self.repo.write("stacks/b/main.tf", B_TF % ("one", "one"))
        self.repo.write("stacks/c/main.tf", C_TF)
        self.repo.write("stacks/d/main.tf", D_TF)
        self.repo.write("gitops.yaml", manifest(self.secret))
        self.repo.push("seed")

    def reconcile(self, *, changed_only: bool) -> tuple[object, dict[str, list[str]]]:
        """Run a pass; return its result and the Terraform commands each unit ran."""
        before = self.log.read_text().splitlines() if self.log.exists() else []
        reconciler = Reconciler(load_host_config(self.config))
        try:
            result = reconciler.run_pass(PassRequest(trigger="test", changed_only=changed_only))
        finally:
            reconciler.close()
        lines = self.log.read_text().splitlines()[len(before) :]
        runs: dict[str, list[str]] = {u: [] for u in UNITS}
        for line in lines:
            for unit in UNITS:
                if f"/units/{unit}/" in line:
                    runs[unit].append(next(w for w in line.split() if not w.startswith("-")))
        return result, runs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    w = World(tmp_path_factory.mktemp("changed"))
    w.seed()
    result, runs = w.reconcile(changed_only=False)
    assert result.ok, result.error  # type: ignore[attr-defined]
    assert all("apply" in runs[u] for u in UNITS), runs
    return w


def planned(runs: dict[str, list[str]]) -> set[str]:
    return {unit for unit, commands in runs.items() if "plan" in commands}


def started_terraform(runs: dict[str, list[str]]) -> set[str]:
    return {unit for unit, commands in runs.items() if commands}


def check(world: World, expected: set[str], what: str) -> dict[str, object]:
    result, runs = world.reconcile(changed_only=True)
    assert result.ok, f"{what}: {result.error}"  # type: ignore[attr-defined]
    assert planned(runs) == expected, f"{what}: planned {sorted(planned(runs))}"
    # An untouched unit starts no Terraform at all (not even `output` or `init`).
    assert started_terraform(runs) == expected, f"{what}: Terraform ran for {runs}"
    outcomes = result.outcomes  # type: ignore[attr-defined]
    for unit in set(UNITS) - expected:
        assert outcomes[unit].decision == "unchanged", f"{what}: {unit}: {outcomes[unit]}"
    return outcomes


def test_an_untouched_repository_runs_no_terraform(world: World) -> None:
    store = RunStore(world.state)
    before = {s.unit: s for s in store.unit_states()}
    check(world, set(), "no change")
    after = {s.unit: s for s in RunStore(world.state).unit_states()}
    for unit in UNITS:
        # The last real result stays what it was; the unchanged pass is recorded apart.
        assert after[unit].last_run_id == before[unit].last_run_id
        assert after[unit].last_decision == before[unit].last_decision
        assert after[unit].unchanged_run_id is not None
    text = render_status(status_view(RunStore(world.state)))
    # The line docs/daemon.md quotes, naming every unit the pass left alone.
    documented = block("output", "status-unchanged")
    quoted = documented.text.splitlines()[-1]
    shape = re.escape(quoted.split("run r-")[0]) + r"run r-\d{8}T\d{6}-[0-9a-f]{4}, [^)]+\): "
    assert re.search(shape + "a, b, c, d$", text, re.MULTILINE), (documented.where, text)


def test_the_cli_asks_for_a_changed_only_pass(world: World) -> None:
    before = world.log.read_text()
    result = agent("reconcile", "--now", "--changed-only", config=world.config, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for unit in UNITS:
        assert f"{unit}: unchanged: inputs as at the last clean plan, nothing run" in (
            result.stdout
        ), result.stdout
    assert world.log.read_text() == before  # not one Terraform command
    run = RunStore(world.state).runs(limit=1)[0]
    assert run.trigger == "cli-changed-only"


def test_a_module_outside_the_stack_dir_plans_its_stack(world: World) -> None:
    world.repo.write("modules/m/main.tf", MODULE_TF % "there")
    world.repo.push("module")
    outcomes = check(world, {"a"}, "module outside the stack dir")
    assert outcomes["a"].decision == "apply"


def test_a_var_plans_its_unit(world: World) -> None:
    world.repo.write("gitops.yaml", manifest(world.secret, greeting="bonjour"))
    world.repo.push("var")
    check(world, {"a"}, "a var")


def test_a_new_secret_version_plans_its_unit(world: World) -> None:
    world.write_secret("horse-battery-staple-v2")
    outcomes = check(world, {"a"}, "a secret version")
    assert outcomes["a"].decision == "apply"


def test_an_upstream_output_plans_its_readers(world: World) -> None:
    world.repo.write("stacks/b/main.tf", B_TF % ("two", "two"))
    world.repo.push("output")
    outcomes = check(world, {"b", "c"}, "an upstream output")
    assert outcomes["c"].decision == "apply"  # c's input moved: applied, not drift


def test_a_new_terraform_binary_plans_every_stack(world: World) -> None:
    world.write_wrapper("replaced")
    check(world, set(UNITS), "the terraform binary")


def test_a_state_written_by_someone_else_plans_its_unit(world: World) -> None:
    state_file = world.state / "units" / "d" / "terraform.tfstate"
    document = json.loads(state_file.read_text())
    document["serial"] += 1
    state_file.write_text(json.dumps(document, indent=2))
    outcomes = check(world, {"d"}, "the state serial")
    assert outcomes["d"].decision == "nothing"
    assert outcomes["d"].moved == ()  # not a change from Git: a plan here finds drift


def test_a_due_drift_check_plans_and_the_others_wait(world: World) -> None:
    world.write_config(", units: {d: {drift: 1s}}")
    store = RunStore(world.state)
    planned_at = store.unit_state("d").planned_at  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while time.time() < planned_at + 1.05 and time.monotonic() < deadline:
        time.sleep(0.05)
    check(world, {"d"}, "a due drift check")


def test_a_failed_unit_is_planned_again(world: World) -> None:
    world.write_config("")
    world.write_secret("")
    os.chmod(world.secret, 0o644)  # unreadable as a secret: the unit fails before Terraform
    result, runs = world.reconcile(changed_only=True)
    assert result.outcomes["a"].status is UnitStatus.FAILED  # type: ignore[attr-defined]
    assert not started_terraform(runs)
    world.write_secret("horse-battery-staple-v2")
    outcomes = check(world, {"a"}, "after a failure")
    assert outcomes["a"].decision == "nothing"
