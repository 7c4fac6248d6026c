"""Signed commits in a real pass: SSH keys made with ssh-keygen, commits signed by git,
the agent's verify step refusing what an allowed key did not sign."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.store import RevisionStatus, RunStore
from tests.support.infra import InfraRepo, git, write_host_config

TF = 'resource "terraform_data" "v" {\n  input = "%s"\n}\n'


def _key(path: Path, name: str) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path


def _sign_with(repo: InfraRepo, key: Path | None) -> None:
    if key is None:
        git(repo.work, "config", "commit.gpgsign", "false")
        return
    git(repo.work, "config", "gpg.format", "ssh")
    git(repo.work, "config", "user.signingkey", str(key))
    git(repo.work, "config", "commit.gpgsign", "true")


def _push(repo: InfraRepo, value: str, key: Path | None) -> str:
    _sign_with(repo, key)
    repo.write("stacks/app/main.tf", TF % value)
    return repo.push(f"value {value}")


def _pass(config: Path):
    reconciler = Reconciler(load_host_config(config))
    try:
        return reconciler.run_pass(PassRequest(trigger="test"))
    finally:
        reconciler.close()


@pytest.fixture
def world(tmp_path: Path) -> dict:
    allowed = _key(tmp_path / "ops", "ops@example.org")
    stranger = _key(tmp_path / "stranger", "stranger@example.org")
    signers = tmp_path / "allowed_signers"
    signers.write_text(f"ops@example.org {allowed.with_suffix('.pub').read_text()}")
    repo = InfraRepo(tmp_path / "git")
    repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    config = write_host_config(tmp_path / "agent.yaml", repo.url, tmp_path / "state")
    signing = f"  branch: main\n  signing: {{ssh_allowed_signers: {signers}}}\n"
    config.write_text(config.read_text().replace("  branch: main\n", signing))
    return {
        "repo": repo,
        "config": config,
        "allowed": allowed,
        "stranger": stranger,
        "tmp": tmp_path,
    }


def _applied_value(tmp: Path) -> str:
    state = (tmp / "state" / "units" / "app" / "terraform.tfstate").read_text()
    return state.split('"input": {')[1].split('"value": "')[1].split('"')[0]


def test_a_revision_signed_by_an_allowed_key_is_applied(world: dict) -> None:
    head = _push(world["repo"], "one", world["allowed"])

    result = _pass(world["config"])

    assert result.ok, result.error
    assert result.revision == head
    assert _applied_value(world["tmp"]) == "one"


@pytest.mark.parametrize("signer", ["unsigned", "stranger"])
def test_an_unsigned_or_wrongly_signed_revision_is_rejected_and_the_last_good_stays(
    world: dict, signer: str
) -> None:
    good = _push(world["repo"], "one", world["allowed"])
    assert _pass(world["config"]).ok
    bad = _push(world["repo"], "two", None if signer == "unsigned" else world["stranger"])

    result = _pass(world["config"])

    assert not result.ok
    assert result.revision == good
    assert _applied_value(world["tmp"]) == "one"
    expected = "is not signed" if signer == "unsigned" else "not listed in allowed signers"
    assert result.error and bad[:12] in result.error
    status, error = RunStore(world["tmp"] / "state").revision_status(bad) or (None, None)
    assert status is RevisionStatus.REJECTED
    assert error and expected in error, error


def test_the_first_revision_unsigned_applies_nothing(world: dict) -> None:
    _push(world["repo"], "one", None)

    result = _pass(world["config"])

    assert not result.ok and result.outcomes == {}
    assert "no earlier revision was accepted" in (result.error or "")
    assert not (world["tmp"] / "state" / "units" / "app" / "terraform.tfstate").exists()
