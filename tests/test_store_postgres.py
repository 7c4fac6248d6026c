"""The run store in PostgreSQL (`store: {url_file}`): a real pass records there, and the
reading commands of another agent host (another state directory) see it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, Reconciler
from agent.errors import ConfigError, PassBusyError
from tests.support.infra import InfraRepo, write_host_config
from tests.support.postgres import PostgresCluster

PASSWORD = "store-pw-canary-91c4"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GITOPS_AGENT_CONFIG": str(config)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def host_config(tmp: Path, name: str, repo: InfraRepo, url_file: Path) -> Path:
    config = write_host_config(tmp / f"{name}.yaml", repo.url, tmp / name)
    config.write_text(config.read_text() + f"store:\n  url_file: {url_file}\n")
    return config


def test_a_pass_on_one_host_is_seen_from_another(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    url = postgres_cluster.create_database("shared")
    # trust authentication ignores the password; it stands for a real one here
    url_file = tmp_path / "store-url"
    url_file.write_text(url.replace("agent@", f"agent:{PASSWORD}@") + "\n")
    url_file.chmod(0o600)
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/app/main.tf", 'resource "terraform_data" "x" { input = "v1" }\n')
    repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    head = repo.push("seed")

    first = host_config(tmp_path, "bastion-a", repo, url_file)
    reconciler = Reconciler(load_host_config(first))
    try:
        result = reconciler.run_pass(PassRequest(trigger="cli"))
    finally:
        reconciler.close()
    assert result.ok, result.error
    assert not (tmp_path / "bastion-a" / "agent.db").exists()  # nothing kept in SQLite

    second = host_config(tmp_path, "bastion-b", repo, url_file)
    status = cli(second, "status", "--json")
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert view["revision"] == head
    [unit] = view["units"]
    assert (unit["unit"], unit["revision"], unit["last_result"]) == ("app", head, "ok")
    history = cli(second, "history")
    assert history.returncode == 0 and result.run_id in history.stdout
    for out in (status, history):
        assert PASSWORD not in out.stdout + out.stderr


def test_the_url_file_is_checked_and_never_shown(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    repo = InfraRepo(tmp_path / "git")
    url_file = tmp_path / "store-url"
    url_file.write_text(f"postgresql://agent:{PASSWORD}@127.0.0.1:1/x\n")
    url_file.chmod(0o644)  # others may read it: refused
    config = host_config(tmp_path, "a", repo, url_file)
    with pytest.raises(ConfigError) as caught:
        Reconciler(load_host_config(config))
    assert "a.yaml:" in caught.value.message and "store.url_file" in caught.value.message
    assert "chmod 600" in (caught.value.hint or "")

    url_file.write_text("mysql://nope\n")
    url_file.chmod(0o600)
    refused = cli(config, "status")
    assert refused.returncode != 0 and "postgresql:// URL" in refused.stderr

    url_file.write_text(f"postgresql://agent:{PASSWORD}@127.0.0.1:1/x?connect_timeout=2\n")
    down = cli(config, "status")
    assert down.returncode != 0
    assert "PostgreSQL" in down.stderr and PASSWORD not in down.stderr + down.stdout


def test_two_agents_on_one_store_take_turns(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    """Until units are shared out by leases, agents on one store run passes in turn; a
    dead agent's lock goes with its connection, and the next pass marks its run cut."""
    url_file = tmp_path / "store-url"
    url_file.write_text(postgres_cluster.create_database("turns") + "\n")
    url_file.chmod(0o600)
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/app/main.tf", 'resource "terraform_data" "x" { input = "v1" }\n')
    repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    repo.push("seed")
    a = Reconciler(load_host_config(host_config(tmp_path, "a", repo, url_file)))
    b = Reconciler(load_host_config(host_config(tmp_path, "b", repo, url_file)))
    try:
        with a.store.exclusive(wait=False):
            cut = a.store.start_run(trigger="cli")  # a's pass, as its agent dies in it
            with pytest.raises(PassBusyError, match="another agent"):
                b.run_pass(PassRequest(trigger="cli"), wait=False)
        a.close()  # the dead agent's session ends

        result = b.run_pass(PassRequest(trigger="cli"), wait=False)
        assert result.ok, result.error
        cut_run = b.store.get_run(cut)
        assert cut_run is not None and cut_run.status == "interrupted"
    finally:
        a.close()
        b.close()
