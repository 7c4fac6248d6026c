"""Prune, what issue 17.4 left open: a dry run previews removals, a held removal that is
still valid is not planned again, a unit's own `prune:` key, and the export of a removed
unit's last definition does not outlive its removal.

No mocks: the worlds of tests/test_prune.py (a real Git remote, the embedded Terraform with
the localfile provider, a fleet on this machine), with the Terraform behind a wrapper that
logs each invocation (as tests/test_changed_only.py does), so that "not planned again"
counts real Terraform runs. One world per scenario, its steps in order.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from agent.cli.views import status_view
from agent.config import ManifestLimits, parse_manifest
from agent.config.yamlnodes import ConfigValidationError
from agent.policy.prune import PruneMode
from agent.service.notify import unit_events
from agent.state.store import RunStore, UnitStatus
from tests.support.docblocks import block
from tests.support.infra import embedded_terraform
from tests.test_prune import World


def wrapped(world: World) -> Path:
    """Run `world`'s Terraform through a wrapper that logs its arguments; the log."""
    log = world.tmp / "terraform-runs.log"
    wrapper = world.tmp / "bin" / "terraform"
    wrapper.parent.mkdir(exist_ok=True)
    wrapper.write_text(
        f'#!/bin/sh\nprintf \'%s\\n\' "$*" >> {log}\nexec {embedded_terraform()} "$@"\n'
    )
    wrapper.chmod(0o755)
    text = world.config.read_text()
    world.config.write_text(text.replace(f"binary: {embedded_terraform()}", f"binary: {wrapper}"))
    return log


def terraform_runs(log: Path, unit: str, since: int) -> list[str]:
    """The Terraform commands run for `unit` after line `since` of the log."""
    lines = log.read_text().splitlines()[since:] if log.exists() else []
    return [
        next(w for w in line.split() if not w.startswith("-"))
        for line in lines
        if f"/units/{unit}/" in line
    ]


def lines(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def digests(state: Path) -> dict[str, str]:
    """Every state file the agent keeps for units and hosts, by path, as sha256."""
    found = [*state.glob("units/*/terraform.tfstate*"), *state.glob("hosts/*.json")]
    return {str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest() for p in found}


def status_of(world: World) -> dict[str, dict]:
    """`agent status --json`'s units, built in-process (the CLI's own view)."""
    store = RunStore(world.state, read_only=True)
    try:
        return {u["unit"]: u for u in status_view(store)["units"]}
    finally:
        store.close()


def exports(world: World) -> list[str]:
    return sorted(p.parent.name for p in (world.state / "units").glob("*/removed"))


def test_dry_run_preview_then_a_hold_kept_across_passes_and_commits(tmp_path: Path) -> None:
    world = World(tmp_path)
    log = wrapped(world)
    world.start()
    world.remove("gone", "web")
    before = digests(world.state)

    # 1. The dry run previews both removals and touches nothing.
    preview = world.agent("reconcile", "--now", "--dry-run")
    assert preview.returncode == 0, preview.stderr
    gone_line = next(line for line in preview.stdout.splitlines() if "gone:" in line)
    assert "planned (dry run) (+0 ~0 -2)" in gone_line, preview.stdout
    assert "policy.prune hold would hold this removal" in gone_line
    web_line = next(line for line in preview.stdout.splitlines() if "web:" in line)
    assert "policy.prune hold would hold this removal" in web_line, preview.stdout
    assert digests(world.state) == before
    assert sorted(p.name for p in world.files.iterdir()) == ["g1", "g2", "k1"]
    assert (world.hostdir / "site.conf").read_text() == "served"
    status = status_of(world)
    assert "removed" not in status["gone"] and "removed" not in status["web"]
    assert exports(world) == []  # the dry run's export went with it
    preview_run = re.search(r"run (r-\S+):", preview.stdout)
    assert preview_run
    refused = world.agent("approve", preview_run.group(1), "--unit", "gone")
    assert refused.returncode != 0  # a preview holds nothing to approve

    # 2. The first real pass holds both; the next keeps the holds without Terraform.
    held = world.run_pass()
    assert held["gone"].status is UnitStatus.HELD and held["web"].status is UnitStatus.HELD
    held_run = status_of(world)["gone"]["removed"]["run"]
    assert status_of(world)["web"]["removed"]["run"] == held_run
    assert exports(world) == ["gone", "web"]
    mark = lines(log)
    again = world.run_pass()
    assert again["gone"].status is UnitStatus.HELD, again["gone"].error
    assert again["gone"].plan_destroy == 2
    assert again["web"].status is UnitStatus.HELD, again["web"].error
    assert terraform_runs(log, "gone", mark) == []
    assert f"`agent approve {held_run} --unit gone`" in (again["gone"].error or "")
    # Its notification names the run that holds the plan, not this pass.
    (note,) = unit_events("gone", again["gone"], run_id="r-this-pass", revision=None)
    assert note.kind == "hold" and held_run in note.detail and "r-this-pass" not in note.detail
    status = status_of(world)
    assert status["gone"]["removed"]["run"] == held_run
    assert status["web"]["removed"]["run"] == held_run
    assert f"`agent approve {held_run} --unit gone`" in world.agent("status").stdout
    # A dry run of a kept hold says so without Terraform either.
    mark = lines(log)
    preview = world.agent("reconcile", "--now", "--dry-run")
    assert "gone: held for approval (+0 ~0 -2)" in preview.stdout, preview.stdout
    assert terraform_runs(log, "gone", mark) == []

    # 3. A commit elsewhere: the stack's hold stays and its run can still be approved.
    world.repo.write("README.md", "a commit that changes no unit\n")
    world.repo.push("docs")
    mark = lines(log)
    moved = world.agent("reconcile", "--now")
    assert moved.returncode == 0, moved.stderr
    gone_line = next(line for line in moved.stdout.splitlines() if "gone:" in line)
    assert gone_line.startswith("  gone: held for approval (+0 ~0 -2)"), moved.stdout
    assert f"still held by run {held_run}" in gone_line
    assert terraform_runs(log, "gone", mark) == []
    assert status_of(world)["gone"]["removed"]["run"] == held_run

    # 4. Someone else wrote the state: the removal is planned again, by a new run.
    state_file = world.state / "units" / "gone" / "terraform.tfstate"
    document = json.loads(state_file.read_text())
    document["serial"] += 1
    state_file.write_text(json.dumps(document))
    mark = lines(log)
    replanned = world.run_pass()
    assert replanned["gone"].status is UnitStatus.HELD
    assert "plan" in terraform_runs(log, "gone", mark)
    new_run = status_of(world)["gone"]["removed"]["run"]
    assert new_run != held_run
    stale = world.agent("approve", held_run, "--unit", "gone")
    assert stale.returncode != 0 and "stale" in stale.stderr, stale.stderr

    # 5. Approved (after another commit), it is pruned and its export goes.
    world.repo.write("README.md", "another commit that changes no unit\n")
    world.repo.push("docs again")
    assert world.run_pass()["gone"].status is UnitStatus.HELD
    approved = world.agent("approve", new_run, "--unit", "gone")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert sorted(p.name for p in world.files.iterdir()) == ["k1"]
    assert "gone" not in status_of(world)
    assert exports(world) == ["web"]


def test_a_units_own_prune_key_then_the_exports_lifetime(tmp_path: Path) -> None:
    world = World(tmp_path)  # the host's policy.prune: hold (the default)
    world.start()
    # A looser value than the host's is refused, naming the file, the line and the key.
    text = (world.repo.work / "gitops.yaml").read_text()
    loose = text.replace(
        "{name: gone, stack: stacks/gone}", "{name: gone, stack: stacks/gone, prune: auto}"
    )
    (world.repo.work / "gitops.yaml").write_text(loose)
    result = world.agent("validate", str(world.repo.work))
    line = loose.splitlines().index(next(x for x in loose.splitlines() if "prune: auto" in x)) + 1
    assert result.returncode != 0
    assert (
        f"gitops.yaml:{line}: units[1].prune: expected one of hold, orphan (the host config's"
        " policy.prune is hold: a unit may only be stricter); got 'auto'"
    ) in result.stderr + result.stdout, result.stderr + result.stdout

    # A stricter one is kept: `gone` says orphan, and that is what its removal does,
    # though the commit that removes it takes the key away with it.
    (world.repo.work / "gitops.yaml").write_text(
        text.replace(
            "{name: gone, stack: stacks/gone}", "{name: gone, stack: stacks/gone, prune: orphan}"
        )
    )
    world.repo.push("gone: never destroyed by the agent")
    assert world.run_pass()["gone"].status is UnitStatus.OK
    removal = world.remove("gone", "web")
    outcomes = world.run_pass()
    assert outcomes["gone"].decision == "orphan", outcomes["gone"]
    assert outcomes["web"].status is UnitStatus.HELD  # the host's hold, as before
    assert sorted(p.name for p in world.files.iterdir()) == ["g1", "g2", "k1"]
    assert status_of(world)["gone"]["removed"]["status"] == "orphaned"
    # Exports: the orphan's went at once; the held fleet's stays while it waits.
    assert exports(world) == ["web"]

    # A pass killed after making an export leaves it (here: made by hand for `keep`,
    # which is in force); the agent, started again, sweeps it in its next pass.
    leftover = world.state / "units" / "keep" / "removed" / "tree"
    leftover.mkdir(parents=True)
    (leftover / "gitops.yaml").write_text("version: 1\n")
    world.run_pass()
    assert exports(world) == ["web"]

    # Both come back: the held removal is dropped with its export; nothing was destroyed.
    git = ["git", "-C", str(world.repo.work)]
    subprocess.run([*git, "revert", "--no-edit", removal], check=True, capture_output=True)
    subprocess.run([*git, "push", "-q", "origin", "HEAD:main"], check=True)
    back = world.run_pass()
    assert back["web"].status is UnitStatus.OK, back["web"].error
    assert back["gone"].status is UnitStatus.OK, back["gone"].error
    assert exports(world) == []
    assert sorted(p.name for p in world.files.iterdir()) == ["g1", "g2", "k1"]
    assert (world.hostdir / "site.conf").read_text() == "served"


def test_the_prune_ceiling_error_docs_policy_md_quotes(tmp_path: Path) -> None:
    documented = block("output", "policy-prune-ceiling").text.strip()
    (tmp_path / "stacks" / "db").mkdir(parents=True)
    (tmp_path / "stacks" / "db" / "main.tf").write_text("")
    text = "version: 1\nunits:\n  - {name: db, stack: stacks/db, prune: auto}\n"
    with pytest.raises(ConfigValidationError) as caught:
        parse_manifest(text, "gitops.yaml", tmp_path, ManifestLimits())
    assert caught.value.errors == [documented]
    # Under a host ceiling of orphan, only orphan; under auto, anything (defaults too).
    orphan_only = ManifestLimits(prune_ceiling=PruneMode.ORPHAN)
    with pytest.raises(ConfigValidationError) as caught:
        parse_manifest(text.replace("auto", "hold"), "gitops.yaml", tmp_path, orphan_only)
    assert "expected one of orphan (the host config's policy.prune is orphan" in str(
        caught.value.errors
    )
    loose = ManifestLimits(prune_ceiling=PruneMode.AUTO)
    defaults = "version: 1\ndefaults: {prune: orphan}\nunits:\n  - {name: db, stack: stacks/db}\n"
    assert parse_manifest(defaults, "gitops.yaml", tmp_path, loose).units[0].prune == "orphan"
    assert parse_manifest(text, "gitops.yaml", tmp_path, loose).units[0].prune == "auto"
