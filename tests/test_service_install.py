"""`agent service install/uninstall` into a root of the test's own, and the credential check
of `agent run`. The real thing, on a booted Debian with systemd as PID 1, is in
tests/test_service_systemd.py; these cover what the command writes and says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

AGENT = [sys.executable, "-m", "agent.cli"]
REPO = Path(__file__).resolve().parents[1]


def agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT, *args], capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_install_puts_each_file_where_systemd_reads_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = agent("service", "install", "--root", str(root))
    assert result.returncode == 0, result.stderr
    files = tree(root)
    assert set(files) == {
        "etc/systemd/system/gitops-agent.service",
        "etc/sysusers.d/gitops-agent.conf",  # stock Debian 12 has no /etc/sysusers.d: made
        "etc/tmpfiles.d/gitops-agent.conf",
        "etc/gitops-agent/agent.yaml",
    }
    unit = files["etc/systemd/system/gitops-agent.service"]
    exec_lines = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_lines == [f"ExecStart={Path(sys.executable).parent / 'agent'} run"]
    # Credentials: the directory, so that only what exists is loaded (no Vault, no secret-id).
    creds = [line for line in unit.splitlines() if line.startswith("LoadCredential=")]
    assert creds == ["LoadCredential=gitops:/etc/gitops-agent/credentials"]
    shipped = (REPO / "systemd/gitops-agent.sysusers").read_text()
    assert files["etc/sysusers.d/gitops-agent.conf"] == shipped
    assert (root / "etc/gitops-agent/agent.yaml").stat().st_mode & 0o777 == 0o640
    assert "Still yours to provide:" in result.stdout
    assert "repo.url" in result.stdout


def test_install_twice_changes_nothing_and_keeps_the_operators_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert agent("service", "install", "--root", str(root)).returncode == 0
    config = root / "etc/gitops-agent/agent.yaml"
    config.write_text("repo: {url: file:///srv/infra.git}\n")
    before = tree(root)
    again = agent("service", "install", "--root", str(root))
    assert again.returncode == 0, again.stderr
    assert tree(root) == before
    assert "  do " not in again.stdout  # every step says ok
    assert f"{config}: exists, left as it is" in again.stdout


def test_dry_run_says_what_it_would_do_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = agent("service", "install", "--dry-run", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert not root.exists()
    assert f"would    install {root}/etc/sysusers.d/gitops-agent.conf" in result.stdout


def test_uninstall_removes_the_files_and_keeps_config_and_state(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert agent("service", "install", "--root", str(root)).returncode == 0
    result = agent("service", "uninstall", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert set(tree(root)) == {"etc/gitops-agent/agent.yaml"}
    assert "Kept: /etc/gitops-agent" in result.stdout


DROPIN = "etc/systemd/system/gitops-agent.service.d/proposals-sandbox.conf"
PROPOSALS = 'repo: {url: file:///srv/infra.git}\nproposals: {refs: [feature/*], authors: ["*"]}\n'


def test_proposals_in_the_host_config_bring_the_sandbox_dropin_and_take_it_away(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    config = root / "etc/gitops-agent/agent.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(PROPOSALS)
    result = agent("service", "install", "--root", str(root))
    assert result.returncode == 0, result.stderr
    dropin = root / DROPIN
    directives = [line for line in dropin.read_text().splitlines() if "=" in line[:30]]
    assert directives == [
        "RestrictNamespaces=user mnt pid ipc uts cgroup",
        "SystemCallFilter=mount umount2 pivot_root capset",
    ]
    assert f"install {dropin} ({config} has proposals: with the bubblewrap sandbox)" in (
        result.stdout
    )
    assert "RestrictNamespaces=user mnt pid ipc uts cgroup: bubblewrap puts" in result.stdout
    assert "systemctl restart gitops-agent" in result.stdout

    config.write_text(PROPOSALS.replace('["*"]}', '["*"], sandbox: none}'))
    result = agent("service", "install", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert f"remove {dropin} ({config} has proposals: with sandbox: none)" in result.stdout
    assert not dropin.exists()

    config.write_text(PROPOSALS)
    assert agent("service", "install", "--root", str(root)).returncode == 0
    result = agent("service", "uninstall", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert set(tree(root)) == {"etc/gitops-agent/agent.yaml"}


def test_the_install_output_quoted_in_the_docs(tmp_path: Path) -> None:
    from tests.support.docblocks import block

    quoted = block("output", "service-install-proposals-dropin")
    root = tmp_path / "root"
    config = root / "etc/gitops-agent/agent.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(PROPOSALS)
    result = agent("service", "install", "--root", str(root))
    assert result.returncode == 0, result.stderr
    printed = result.stdout.replace(str(root), "")
    assert quoted.text.strip() in printed, f"{quoted.where}: not what install prints:\n{printed}"


def test_a_host_config_that_is_not_yaml_stops_the_install_with_its_line(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = root / "etc/gitops-agent/agent.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("repo: {url: file:///x}\nproposals: [unclosed\n")
    result = agent("service", "install", "--root", str(root))
    assert result.returncode != 0
    assert f"{config}:3: not valid YAML" in result.stderr, result.stderr


def test_the_starter_config_names_what_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert agent("service", "install", "--root", str(root)).returncode == 0
    config = root / "etc/gitops-agent/agent.yaml"
    result = agent("--config", str(config), "status")
    assert result.returncode == 3
    assert f"{config}:" in result.stderr and "repo.url" in result.stderr


def test_run_names_a_credential_systemd_did_not_hand_over(tmp_path: Path) -> None:
    """A host config pointing at a credential that is not there: `agent run` stops before it
    reports ready, naming the key and the file to create (not systemd's 243/CREDENTIALS)."""
    config = tmp_path / "agent.yaml"
    config.write_text(
        "repo:\n"
        "  url: ssh://git@git.example.com/infra.git\n"
        "  deploy_key: /run/credentials/gitops-agent.service/gitops_deploy-key\n"
        f"  known_hosts: {tmp_path / 'known_hosts'}\n"
        f"state_dir: {tmp_path / 'state'}\n"
    )
    if Path("/run/credentials/gitops-agent.service/gitops_deploy-key").exists():
        pytest.skip("this machine runs a gitops-agent service with a deploy key")
    result = agent("--config", str(config), "run")
    assert result.returncode == 3, result.stderr
    assert (
        f"{config}: deploy_key: /run/credentials/gitops-agent.service/gitops_deploy-key "
        "was not handed over by systemd" in result.stderr
    )
    assert "create /etc/gitops-agent/credentials/deploy-key (root:root, 0600)" in result.stderr


def test_a_vault_credential_name_is_checked_too(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        "repo: {url: file:///srv/infra.git}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "secrets:\n"
        "  allowed: ['vault:kv/']\n"
        "  vault:\n"
        "    address: http://127.0.0.1:8200\n"
        "    auth: {approle: {role_id: r, secret_id_credential: gitops_vault-secret-id}}\n"
    )
    creds = tmp_path / "creds"
    creds.mkdir()
    result = agent("--config", str(config), "run", env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert result.returncode == 3, result.stderr
    named = f"{config}: secret_id_credential: {creds}/gitops_vault-secret-id was not handed over"
    assert named in result.stderr
    assert "create /etc/gitops-agent/credentials/vault-secret-id" in result.stderr
