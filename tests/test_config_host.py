"""The host config as an operator writes it: defaults, every key, and the errors shown."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.config import (
    DEFAULT_HOST_CONFIG_PATH,
    ConfigValidationError,
    DestroyPolicy,
    HostConfig,
    Intervals,
    ManifestLimits,
    Policy,
    RepoConfig,
    TerraformConfig,
    load_host_config,
    parse_host_config,
    resolve_host_config_path,
)
from agent.errors import ConfigError


def write_config(directory: Path, text: str) -> Path:
    path = directory / "agent.yaml"
    path.write_text(text)
    return path


def test_a_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, "repo:\n  url: file:///srv/infra.git\n")

    config = load_host_config(path)

    state_dir = Path("/var/lib/gitops-agent")
    assert config == HostConfig(
        path=path,
        repo=RepoConfig(url="file:///srv/infra.git", branch="main"),
        state_dir=state_dir,
        intervals=Intervals(poll=60.0, drift=600.0),
        terraform=TerraformConfig(
            binary=None,
            timeout=1800.0,
            lock_timeout=300.0,
            parallelism=4,
            plugin_cache_dir=state_dir / "plugin-cache",
        ),
        allowed_paths=(".",),
        policy=Policy(destroy=DestroyPolicy.HOLD, max_unit_timeout=7200.0),
    )


def test_every_key_with_relative_paths_against_the_config_directory(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """\
repo:
  url: git@git.example.com:platform/infra.git
  branch: production
  deploy_key: keys/deploy_key
  known_hosts: /etc/ssh/ssh_known_hosts
  https_ca_bundle: ca.pem
  allow_history_rewrite: true
state_dir: state
intervals: {poll: 30s, drift: 1h30m}
terraform:
  binary: bin/tofu
  timeout: 45m
  lock_timeout: 0
  parallelism: 8
  plugin_cache_dir: /var/cache/terraform-plugins
allowed_paths: [stacks/, envs/prod]
policy:
  destroy: allow
  max_unit_timeout: 3h
""",
    )

    config = load_host_config(path)

    assert config.repo == RepoConfig(
        url="git@git.example.com:platform/infra.git",
        branch="production",
        deploy_key=tmp_path / "keys" / "deploy_key",
        known_hosts=Path("/etc/ssh/ssh_known_hosts"),
        https_ca_bundle=tmp_path / "ca.pem",
        allow_history_rewrite=True,
    )
    assert config.repo.is_ssh
    assert config.state_dir == tmp_path / "state"
    assert config.intervals == Intervals(poll=30.0, drift=5400.0)
    assert config.terraform == TerraformConfig(
        binary=str(tmp_path / "bin" / "tofu"),
        timeout=2700.0,
        lock_timeout=0.0,
        parallelism=8,
        plugin_cache_dir=Path("/var/cache/terraform-plugins"),
    )
    assert config.allowed_paths == ("stacks", "envs/prod")
    assert config.policy == Policy(destroy=DestroyPolicy.ALLOW, max_unit_timeout=10800.0)


def test_plugin_cache_defaults_under_the_state_dir(tmp_path: Path) -> None:
    text = "repo: {url: file:///srv/infra.git}\nstate_dir: /srv/agent\n"

    config = parse_host_config(text, "agent.yaml", tmp_path)

    assert config.terraform.plugin_cache_dir == Path("/srv/agent/plugin-cache")


@pytest.mark.parametrize(
    ("written", "url", "is_ssh"),
    [
        ("file:///srv/infra.git", "file:///srv/infra.git", False),
        ("https://git.example.com/infra.git", "https://git.example.com/infra.git", False),
        ("ssh://git@git.example.com:22/x.git", "ssh://git@git.example.com:22/x.git", True),
        ("git@github.com:example/infra.git", "git@github.com:example/infra.git", True),
        ("/srv/infra.git", "file:///srv/infra.git", False),
        ("../repos/infra", "file:///etc/repos/infra", False),
    ],
)  # fmt: skip
def test_repository_url_forms(written: str, url: str, is_ssh: bool) -> None:
    text = f"repo:\n  url: {written}\n  known_hosts: /etc/gitops-agent/known_hosts\n"

    repo = parse_host_config(text, "agent.yaml", Path("/etc/gitops-agent")).repo

    assert (repo.url, repo.is_ssh) == (url, is_ssh)


def test_a_command_name_as_terraform_binary_is_kept_for_a_path_lookup(tmp_path: Path) -> None:
    text = "repo: {url: file:///srv/infra.git}\nterraform: {binary: tofu}\n"

    assert parse_host_config(text, "agent.yaml", tmp_path).terraform.binary == "tofu"


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1h30m", 5400.0), ("90", 90.0),
     ("'90'", 90.0), ("2.5", 2.5), ("1.5h", 5400.0), ("1d", 86400.0)],
)  # fmt: skip
def test_durations(written: str, seconds: float, tmp_path: Path) -> None:
    text = f"repo: {{url: file:///srv/infra.git}}\nintervals: {{poll: {written}}}\n"

    assert parse_host_config(text, "agent.yaml", tmp_path).intervals.poll == seconds


def test_every_error_of_the_file_is_reported_at_once_sorted_by_line(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """\
policy:
  destroy: never
intervals:
  poll: soon
repo:
  url: ssh://git@git.example.com/infra.git
  brnch: main
""",
    )

    with pytest.raises(ConfigError) as caught:
        load_host_config(path)

    assert isinstance(caught.value, ConfigValidationError)
    assert caught.value.errors == [
        f"{path}:2: policy.destroy: expected one of hold, allow; got 'never'",
        f"{path}:4: intervals.poll: expected a duration like 30s, 5m, 2h; got 'soon'",
        f"{path}:5: repo.known_hosts: expected a known_hosts file for an ssh URL (required);"
        " got nothing",
        f"{path}:7: repo.brnch: unknown key; expected one of url, branch, deploy_key,"
        " known_hosts, https_ca_bundle, allow_history_rewrite, signing",
    ]
    assert str(caught.value) == "\n".join(caught.value.errors)
    assert "docs/host-config.md" in caught.value.render()


def test_a_missing_file_says_where_it_looked_and_how_to_point_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as caught:
        load_host_config(path)

    assert str(caught.value) == f"{path}: expected a host config file; got no such file"
    assert "--config PATH or GITOPS_AGENT_CONFIG=PATH" in caught.value.render()


def test_yaml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "repo:\n  url: [file:///srv/infra.git\n")

    with pytest.raises(ConfigError) as caught:
        load_host_config(path)

    assert str(caught.value).startswith(f"{path}:3: YAML syntax error: ")


def test_a_file_that_is_not_utf8_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"repo:\n  url: file:///srv/\xff\n")

    with pytest.raises(ConfigError) as caught:
        load_host_config(path)

    expected = f"{path}:2: (file): expected UTF-8 text; got the byte 0xff at offset 25"
    assert str(caught.value) == expected


def test_the_path_comes_from_the_flag_then_the_environment_then_the_default() -> None:
    environ = {"GITOPS_AGENT_CONFIG": "/env/agent.yaml"}

    assert resolve_host_config_path("/cli/agent.yaml", environ) == Path("/cli/agent.yaml")
    assert resolve_host_config_path(None, environ) == Path("/env/agent.yaml")
    assert resolve_host_config_path(None, {}) == DEFAULT_HOST_CONFIG_PATH
    assert resolve_host_config_path("", {"GITOPS_AGENT_CONFIG": ""}) == DEFAULT_HOST_CONFIG_PATH


def test_the_result_is_frozen(tmp_path: Path) -> None:
    config = parse_host_config("repo: {url: file:///srv/infra.git}\n", "agent.yaml", tmp_path)

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.state_dir = Path("/tmp")  # type: ignore[misc]
    assert isinstance(config.allowed_paths, tuple)


def test_manifest_limits_come_from_the_host_config(tmp_path: Path) -> None:
    text = (
        "repo: {url: file:///srv/infra.git}\nallowed_paths: [stacks]\n"
        "terraform: {timeout: 10m}\npolicy: {max_unit_timeout: 1h}\n"
    )

    limits = ManifestLimits.from_host(parse_host_config(text, "agent.yaml", tmp_path))

    assert limits == ManifestLimits(
        allowed_paths=("stacks",),
        max_unit_timeout=3600.0,
        default_timeout=600.0,
        secret_backends=frozenset({"file"}),  # files on the bastion need no set-up
    )


def test_a_relative_config_path_is_named_as_given_and_stored_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    write_config(tmp_path / "conf", "repo: {url: file:///srv/infra.git}\nstate_dir: state\n")
    monkeypatch.chdir(tmp_path)

    config = load_host_config(Path("conf/agent.yaml"))

    assert config.path == tmp_path / "conf" / "agent.yaml"
    assert config.state_dir == tmp_path / "conf" / "state"
    (tmp_path / "conf" / "agent.yaml").write_text("repo: {url: 42}\n")
    with pytest.raises(ConfigError, match=r"^conf/agent.yaml:1: repo.url: expected a Git URL"):
        load_host_config(Path("conf/agent.yaml"))
