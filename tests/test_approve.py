"""`agent approve` without a daemon, as a user runs it: a destroy held by the default policy,
approved and applied; approvals refused when the plan went stale (the state or the revision
moved) or cannot be found. Real repos, the embedded Terraform, files as resources.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.state.store import RunStore
from tests.support.infra import InfraRepo, write_host_config
from tests.tfhelpers import LOCALFILE_REQUIRED

PROVIDER = LOCALFILE_REQUIRED


def data_stack(names: list[str], content: str) -> str:
    """terraform_data resources: no provider to start, so a plan takes ~0.2 s."""
    return "".join(
        f'resource "terraform_data" "{name}" {{\n  input = "{content}"\n}}\n' for name in names
    )


def files_stack(directory: Path, names: list[str], content: str = "managed") -> str:
    resources = "".join(
        f'resource "localfile_file" "{name}" {{\n'
        f'  path    = "{directory / name}"\n'
        f'  content = "{content}\\n"\n'
        "}\n"
        for name in names
    )
    return PROVIDER + resources


class World:
    """An infra repo with one stack of files, and the CLI in direct mode (no daemon)."""

    def __init__(self, tmp: Path, *, files: bool = False) -> None:
        self.use_files = files
        self.repo = InfraRepo(tmp / "git")
        self.files = tmp / "managed"
        self.state = tmp / "state"
        self.config = write_host_config(
            tmp / "agent.yaml", self.repo.url, self.state, f"control_socket: {tmp}/no.sock\n"
        )
        self.allow_config = write_host_config(
            tmp / "allow.yaml",
            self.repo.url,
            self.state,
            f"control_socket: {tmp}/no.sock\npolicy: {{destroy: allow}}\n",
        )

    def push(self, names: list[str], content: str = "managed") -> str:
        stack = (
            files_stack(self.files, names, content)
            if self.use_files
            else data_stack(names, content)
        )
        self.repo.write("stacks/files/main.tf", stack)
        self.repo.write(
            "gitops.yaml", "version: 1\nunits:\n  - {name: files, stack: stacks/files}\n"
        )
        return self.repo.push(f"files: {', '.join(names)}")

    def agent(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "--config", str(config or self.config), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={k: v for k, v in os.environ.items() if k != "GITOPS_AGENT_CONFIG"},
        )

    def reconcile(self, config: Path | None = None) -> str:
        """A pass; the run id it printed."""
        result = self.agent("reconcile", "--now", config=config)
        assert result.returncode == 0, result.stdout + result.stderr
        match = re.search(r"^run (r-\S+): ", result.stdout, re.M)
        assert match, result.stdout
        return match.group(1)

    def held_destroy(self) -> str:
        """Files a and b applied, then b removed from the repo: the destroy is held."""
        self.push(["a", "b"])
        self.reconcile()
        self.push(["a"])
        held = self.agent("reconcile", "--now")
        assert held.returncode == 0, held.stderr
        assert "files: held for approval (+0 ~0 -1)" in held.stdout
        return re.search(r"^run (r-\S+): ", held.stdout, re.M).group(1)  # type: ignore[union-attr]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_a_held_destroy_is_applied_by_approve_and_only_once(tmp_path: Path) -> None:
    world = World(tmp_path, files=True)
    run = world.held_destroy()
    assert (world.files / "b").exists()
    status = world.agent("status").stdout
    assert "held/hold" in status

    approved = world.agent("approve", run)

    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert "files: applied (+0 ~0 -1)" in approved.stdout
    assert not (world.files / "b").exists() and (world.files / "a").exists()
    history = world.agent("history").stdout
    assert re.search(r"r-\S+\s+approve\s", history), history
    # The approval applied the saved plan: nothing was planned in that run.
    approve_run = re.search(r"^run (r-\S+): ", approved.stdout, re.M).group(1)  # type: ignore[union-attr]
    logs = world.agent("logs", "files", "--run", approve_run).stdout
    assert "Apply complete! Resources: 0 added, 0 changed, 1 destroyed." in logs
    assert "plan.txt" not in logs
    # The held plan (it holds the variables' values) is gone once applied.
    assert not list(world.state.glob(f"runs/{run}/files/tfplan"))

    again = world.agent("approve", run)
    assert again.returncode == 1
    assert f"the plan of files in run {run} was already approved" in again.stderr
    # The approval converged the unit to the inputs its plan was made from (issue 13): the
    # next pass finds nothing to do and nothing moved.
    store = RunStore(world.state)
    (held_row,) = store.unit_runs(run)
    state = store.unit_state("files")
    assert state is not None and held_row.fingerprint
    assert state.fingerprint == held_row.fingerprint and state.last_run_id == approve_run
    after = world.agent("reconcile", "--now")
    assert "files: no changes" in after.stdout
    after_run = re.search(r"^run (r-\S+): ", after.stdout, re.M).group(1)  # type: ignore[union-attr]
    (row,) = store.unit_runs(after_run)
    assert (row.decision, row.moved) == ("nothing", None)


def test_an_approval_after_the_state_moved_is_refused_as_stale(world: World) -> None:
    run = world.held_destroy()
    # Someone applied with another policy meanwhile: the state the plan was made on moved.
    applied = world.agent("reconcile", "--now", config=world.allow_config)
    assert "files: applied (+0 ~0 -1)" in applied.stdout

    refused = world.agent("approve", run)

    assert refused.returncode == 1
    assert (
        f"the plan is stale: the state changed since run {run}; run `agent reconcile --now`"
        " to plan again" in refused.stdout
    )
    assert "files: failed" in refused.stdout


def test_an_approval_after_the_revision_moved_is_refused(world: World) -> None:
    run = world.held_destroy()
    world.push(["a"], content="changed")
    newer = world.agent("reconcile", "--now")
    assert "files: held for approval" in newer.stdout  # still destroys b

    refused = world.agent("approve", run)

    assert refused.returncode == 1
    assert (
        f"error[approval-refused]: the plan is stale: the revision in force moved since run {run}"
        in refused.stderr
    )
    assert "agent reconcile --now" in refused.stderr
    assert "approve" not in world.agent("history").stdout  # refused before anything ran


def test_approve_names_what_it_cannot_find(world: World) -> None:
    run = world.held_destroy()
    unknown = world.agent("approve", "r-20200101T000000-0000")
    assert unknown.returncode == 5 and "no run with id 'r-20200101T000000-0000'" in unknown.stderr
    no_unit = world.agent("approve", run, "--unit", "nope")
    assert (
        no_unit.returncode == 5 and f"unit 'nope' did not take part in run {run}" in no_unit.stderr
    )

    assert world.agent("suspend", "files").returncode == 0
    suspended = world.agent("approve", run)
    assert suspended.returncode == 1 and "unit files is suspended" in suspended.stderr
    assert world.agent("resume", "files").returncode == 0
    approved = world.agent("approve", run, "--unit", "files")
    assert approved.returncode == 0 and "files: applied (+0 ~0 -1)" in approved.stdout
