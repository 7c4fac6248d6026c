"""The host config's `forge:` section: parsed, and the token read from its file at open
time (mode checked, never shown). Bad sections are table cases in tests/cases/config/host/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import parse_host_config
from agent.config.forge import open_forge
from agent.errors import ConfigError
from tests.support.forge_standin import ForgeStandin

SHA = "0123456789abcdef0123456789abcdef01234567"


def host_config(tmp_path: Path, forge_yaml: str):
    text = f"repo:\n  url: file:///srv/infra.git\nforge:\n{forge_yaml}"
    return parse_host_config(text, str(tmp_path / "agent.yaml"), tmp_path)


def test_github_needs_no_url_and_has_defaults(tmp_path: Path) -> None:
    config = host_config(tmp_path, "  kind: github\n  repo: acme/infra\n  token_file: tok\n")
    forge = config.forge
    assert forge is not None
    assert (forge.kind, forge.url, forge.repo) == ("github", None, "acme/infra")
    assert forge.token_file == tmp_path / "tok"
    assert (forge.context, forge.timeout) == ("gitops-agent", 10.0)
    assert forge.where.endswith(":6: forge.token_file")


def test_open_forge_reads_the_token_file_and_talks_to_the_forge(tmp_path: Path) -> None:
    token_file = tmp_path / "forge-token"
    token_file.write_text("s3cr3t-forge-token\n")
    token_file.chmod(0o600)
    with ForgeStandin("gitea", token="s3cr3t-forge-token") as standin:
        config = host_config(
            tmp_path,
            f"  kind: gitea\n  url: {standin.api_url}\n  repo: acme/infra\n"
            "  token_file: forge-token\n  timeout: 5s\n",
        )
        assert config.forge is not None
        client = open_forge(config.forge)
        client.set_status(SHA, "success", "applied", config.forge.context)
        assert [s["state"] for s in standin.statuses(SHA)] == ["success"]


def test_a_token_file_others_can_read_is_refused_by_its_key(tmp_path: Path) -> None:
    token_file = tmp_path / "forge-token"
    token_file.write_text("s3cr3t-forge-token\n")
    token_file.chmod(0o644)
    config = host_config(
        tmp_path, "  kind: github\n  repo: acme/infra\n  token_file: forge-token\n"
    )
    assert config.forge is not None
    with pytest.raises(ConfigError) as caught:
        open_forge(config.forge)
    shown = caught.value.render()
    assert "agent.yaml:6: forge.token_file" in shown and "chmod 600" in shown
    assert "s3cr3t-forge-token" not in shown
