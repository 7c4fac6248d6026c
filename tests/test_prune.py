"""Prune: what happens to what a unit created once a commit removes it from gitops.yaml.

No mocks: a real Git remote and real commits that remove a unit (and its stack's files),
the embedded Terraform with the localfile provider (its resources are files the test can
look at), a fleet converging this machine (`address: local`), `agent status` and `agent
approve` through the CLI as a user runs them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.store import RunStore, UnitStatus
from tests.support.infra import InfraRepo, write_host_config
from tests.tfhelpers import LOCALFILE_REQUIRED


def files_stack(directory: Path, names: list[str]) -> str:
    return LOCALFILE_REQUIRED + "".join(
        f'resource "localfile_file" "{name}" {{\n'
        f'  path    = "{directory / name}"\n'
        '  content = "managed\\n"\n'
        "}\n"
        for name in names
    )


class World:
    """An infra repo with two stacks (`keep` and `gone`) and a fleet (`web`, on this
    machine); `prune` is the host config's policy.prune (None: the default)."""

    def __init__(self, tmp: Path, prune: str | None = None) -> None:
        self.tmp = tmp
        self.repo = InfraRepo(tmp / "git")
        self.files = tmp / "managed"
        self.hostdir = tmp / "host"
        self.state = tmp / "state"
        policy = f"policy:\n  prune: {prune}\n" if prune else ""
        self.config = write_host_config(
            tmp / "agent.yaml",
            self.repo.url,
            self.state,
            f"control_socket: {tmp}/no.sock\n"
            f"hosts: {{allow_local: true, python: {sys.executable}}}\n" + policy,
        )

    def manifest(self, *units: str) -> None:
        entries = {
            "keep": "  - {name: keep, stack: stacks/keep}\n",
            "gone": "  - {name: gone, stack: stacks/gone}\n",
            "web": (
                "  - name: web\n"
                "    fleet:\n"
                "      hosts: {static: [{name: bastion, address: local}]}\n"
                "      resources:\n"
                f"        - directory: {self.hostdir}\n"
                f"        - file: {self.hostdir}/site.conf\n"
                "          content: served\n"
            ),
        }
        self.repo.write("gitops.yaml", "version: 1\nunits:\n" + "".join(entries[u] for u in units))

    def start(self) -> None:
        """Three units applied: files keep/k1, gone/g1 and g2, the fleet's site.conf."""
        self.repo.write("stacks/keep/main.tf", files_stack(self.files, ["k1"]))
        self.repo.write("stacks/gone/main.tf", files_stack(self.files, ["g1", "g2"]))
        self.manifest("keep", "gone", "web")
        self.repo.push("three units")
        outcomes = self.run_pass()
        assert all(o.status is UnitStatus.OK for o in outcomes.values()), outcomes
        assert sorted(p.name for p in self.files.iterdir()) == ["g1", "g2", "k1"]
        assert (self.hostdir / "site.conf").read_text() == "served"

    def remove(self, *units: str) -> str:
        """A commit that removes `units` from gitops.yaml (a removed stack's files too)."""
        kept = [u for u in ("keep", "gone", "web") if u not in units]
        self.manifest(*kept)
        if "gone" in units:
            self.repo.remove("stacks/gone")
        return self.repo.push(f"remove {', '.join(units)}")

    def run_pass(self) -> dict:
        reconciler = Reconciler(load_host_config(self.config))
        try:
            return reconciler.run_pass(PassRequest(trigger="test")).outcomes
        finally:
            reconciler.close()

    def agent(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={k: v for k, v in os.environ.items() if k != "GITOPS_AGENT_CONFIG"},
        )

    def status(self) -> dict:
        result = self.agent("status", "--json")
        assert result.returncode == 0, result.stderr
        return {u["unit"]: u for u in json.loads(result.stdout)["units"]}

    def history_of(self, unit: str) -> list[dict]:
        store = RunStore(self.state, read_only=True)
        try:
            return [
                {"status": r.status, "decision": r.decision, "error": r.error}
                for r in store.unit_history(unit)
            ]
        finally:
            store.close()


def test_by_default_a_removed_stacks_destroy_is_held_until_approved(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.start()
    world.remove("gone")

    outcomes = world.run_pass()
    gone = outcomes["gone"]
    assert gone.status is UnitStatus.HELD, gone.error
    assert (gone.plan_add, gone.plan_change, gone.plan_destroy) == (0, 0, 2)
    assert "policy.prune: hold" in (gone.error or "")
    assert outcomes["keep"].status is UnitStatus.OK
    # Nothing destroyed yet; status says why it is still listed.
    assert sorted(p.name for p in world.files.iterdir()) == ["g1", "g2", "k1"]
    status = world.status()
    assert status["gone"]["removed"]["status"] == "held"
    text = world.agent("status").stdout
    assert "removed: held" in text
    match = re.search(r"`agent approve (r-\S+) --unit gone`", text)
    assert match, text

    # Another pass re-plans and holds it again; nothing is applied meanwhile.
    again = world.run_pass()
    assert again["gone"].status is UnitStatus.HELD
    assert sorted(p.name for p in world.files.iterdir()) == ["g1", "g2", "k1"]
    run_id = re.search(r"`agent approve (r-\S+) --unit gone`", world.agent("status").stdout)
    assert run_id

    approved = world.agent("approve", run_id.group(1), "--unit", "gone")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert sorted(p.name for p in world.files.iterdir()) == ["k1"]
    # Pruned: it leaves status, its history stays.
    assert "gone" not in world.status()
    history = world.history_of("gone")
    assert history[0]["status"] == "ok" and history[0]["decision"] == "apply"
    assert any(h["status"] == "held" for h in history)
    # The next pass has nothing left to do with it.
    assert "gone" not in world.run_pass()


def test_a_revert_before_approval_brings_the_unit_back_without_destroying(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    world.start()
    world.remove("gone", "web")
    held = world.run_pass()
    assert held["gone"].status is UnitStatus.HELD and held["web"].status is UnitStatus.HELD
    held_run = world.status()["gone"]["removed"]["run"]

    subprocess.run(["git", "-C", str(world.repo.work), "revert", "--no-edit", "HEAD"], check=True)
    subprocess.run(
        ["git", "-C", str(world.repo.work), "push", "-q", "origin", "HEAD:main"], check=True
    )
    outcomes = world.run_pass()
    assert outcomes["gone"].status is UnitStatus.OK, outcomes["gone"].error
    assert outcomes["gone"].plan_destroy in (None, 0)
    assert sorted(p.name for p in world.files.iterdir()) == ["g1", "g2", "k1"]
    assert outcomes["web"].status is UnitStatus.OK, outcomes["web"].error
    status = world.status()
    assert "removed" not in status["gone"] and "removed" not in status["web"]
    # The held removals can no longer be approved.
    for unit in ("gone", "web"):
        refused = world.agent("approve", held_run, "--unit", unit)
        assert refused.returncode != 0
        assert "stale" in refused.stderr or "gone" in refused.stderr, refused.stderr
    assert sorted(p.name for p in world.files.iterdir()) == ["g1", "g2", "k1"]
    assert (world.hostdir / "site.conf").read_text() == "served"


def test_auto_destroys_a_removed_stack_and_removes_a_removed_fleets_files(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, prune="auto")
    world.start()
    world.remove("gone", "web")

    outcomes = world.run_pass()
    assert outcomes["gone"].status is UnitStatus.OK, outcomes["gone"].error
    assert outcomes["gone"].plan_destroy == 2
    assert outcomes["web"].status is UnitStatus.OK, outcomes["web"].error
    assert sorted(p.name for p in world.files.iterdir()) == ["k1"]
    # The fleet created the directory and the file: both go.
    assert not world.hostdir.exists()
    status = world.status()
    assert "gone" not in status and "web" not in status and "keep" in status
    # The Terraform state is kept (empty now), with its backup.
    state = json.loads((world.state / "units" / "gone" / "terraform.tfstate").read_text())
    assert state["resources"] == []


def test_a_held_fleet_removal_is_shown_then_applied_by_approve(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.start()
    world.remove("web")

    outcomes = world.run_pass()
    web = outcomes["web"]
    assert web.status is UnitStatus.HELD, web.error
    assert web.plan_destroy == 2
    assert (world.hostdir / "site.conf").exists()
    run_id = world.status()["web"]["removed"]["run"]

    approved = world.agent("approve", run_id, "--unit", "web")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert not world.hostdir.exists()
    assert "web" not in world.status()


def test_orphan_keeps_everything_and_records_it_once(tmp_path: Path) -> None:
    world = World(tmp_path, prune="orphan")
    world.start()
    world.remove("gone", "web")

    outcomes = world.run_pass()
    assert outcomes["gone"].decision == "orphan"
    assert sorted(p.name for p in world.files.iterdir()) == ["g1", "g2", "k1"]
    assert (world.hostdir / "site.conf").read_text() == "served"
    status = world.status()
    assert status["gone"]["removed"]["status"] == "orphaned"
    assert status["web"]["removed"]["status"] == "orphaned"
    assert "orphaned: what it created was left as it is" in world.agent("status").stdout
    # Recorded once: later passes do not touch it again.
    assert "gone" not in world.run_pass()
    assert (world.state / "units" / "gone" / "terraform.tfstate").exists()


def test_prune_policy_is_validated(tmp_path: Path) -> None:
    world = World(tmp_path, prune="destroy")
    result = world.agent("status")
    assert result.returncode == 3
    line = world.config.read_text().splitlines().index("  prune: destroy") + 1
    assert (
        f"{world.config}:{line}: policy.prune: expected one of hold, auto, orphan; got 'destroy'"
        in result.stderr
    ), result.stderr


def test_a_definition_the_host_config_no_longer_allows_is_shown_not_skipped(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, prune="auto")
    world.start()
    # The operator narrows what the repository may use; then `gone` is removed.
    text = world.config.read_text()
    world.config.write_text(text + "allowed_paths: [stacks/keep]\n")
    world.manifest("keep")
    world.repo.remove("stacks/gone")
    world.repo.push("remove gone and web")

    outcomes = world.run_pass()
    gone = outcomes["gone"]
    assert gone.status is UnitStatus.FAILED
    assert "not valid under this host config" in (gone.error or "")
    assert sorted(p.name for p in world.files.iterdir()) == ["g1", "g2", "k1"]
    removed = world.status()["gone"]["removed"]
    assert removed["status"] == "pruning"
    assert "stacks/gone" in removed["error"]
    assert "removed: pruning" in world.agent("status").stdout


@pytest.mark.parametrize("prune", ["hold", "auto"])
def test_a_dry_run_never_prunes(tmp_path: Path, prune: str) -> None:
    world = World(tmp_path, prune=prune)
    world.start()
    world.remove("gone")
    result = world.agent("reconcile", "--now", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in world.files.iterdir()) == ["g1", "g2", "k1"]
    assert "removed" not in world.status()["gone"]


def test_a_removed_stack_is_planned_with_its_secrets_which_never_reach_the_log(
    tmp_path: Path,
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    token = secrets / "token"
    token.write_text("s3cr3t-prune-value\n")
    token.chmod(0o600)
    world = World(tmp_path)
    world.config.write_text(world.config.read_text() + f"secrets: {{allowed: [file:{secrets}/]}}\n")
    # A variable with no default: Terraform needs its value for a destroy plan too.
    world.repo.write(
        "stacks/gone/main.tf",
        LOCALFILE_REQUIRED
        + 'variable "token" {}\n'
        + f'resource "localfile_file" "g1" {{\n  path = "{world.files}/g1"\n'
        + "  content = var.token\n}\n",
    )
    world.repo.write("stacks/keep/main.tf", files_stack(world.files, ["k1"]))
    world.repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - {name: keep, stack: stacks/keep}\n"
        f"  - {{name: gone, stack: stacks/gone, secrets: {{token: 'file:{token}'}}}}\n",
    )
    world.repo.push("a stack with a secret")
    assert world.run_pass()["gone"].status is UnitStatus.OK
    assert (world.files / "g1").read_text() == "s3cr3t-prune-value"

    world.manifest("keep")
    world.repo.remove("stacks/gone")
    world.repo.push("remove gone")
    held = world.run_pass()["gone"]
    assert held.status is UnitStatus.HELD, held.error
    run_id = world.status()["gone"]["removed"]["run"]
    plan_log = world.agent("logs", "gone", "--run", run_id)
    assert plan_log.returncode == 0, plan_log.stderr
    assert "localfile_file.g1 will be destroyed" in plan_log.stdout
    assert "s3cr3t-prune-value" not in plan_log.stdout
    for path in (world.state / "runs" / run_id / "gone").iterdir():
        if path.name != "tfplan":  # Terraform's own plan file, 0600, gone once applied
            assert b"s3cr3t-prune-value" not in path.read_bytes(), path

    approved = world.agent("approve", run_id)
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert not (world.files / "g1").exists()
    assert not (world.state / "runs" / run_id / "gone" / "tfplan").exists()


def test_a_deny_rule_on_the_destroy_plan_stops_the_prune(tmp_path: Path) -> None:
    world = World(tmp_path, prune="auto")
    world.config.write_text(
        world.config.read_text()
        + "  rules:\n"
        + "    - name: keep-g1\n"
        + "      expression: >-\n"
        + '        changes.exists(c, "delete" in c.actions && c.address.endsWith(".g1"))\n'
        + "      message: g1 is never destroyed by the agent\n"
        + "      effect: deny\n"
    )
    world.start()
    world.remove("gone")

    gone = world.run_pass()["gone"]
    assert gone.status is UnitStatus.FAILED
    assert "keep-g1" in (gone.error or "") and "g1 is never destroyed" in (gone.error or "")
    assert sorted(p.name for p in world.files.iterdir()) == ["g1", "g2", "k1"]
    removed = world.status()["gone"]["removed"]
    assert removed["status"] == "pruning" and "keep-g1" in removed["error"]
