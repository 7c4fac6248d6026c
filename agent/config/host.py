"""The host config, `/etc/gitops-agent/agent.yaml`: the operator's trust boundary.

It says which repository to follow and with which credentials, where state lives, how
often to look, how to run Terraform, and the limits the repo manifest must stay within.
"""

from __future__ import annotations

import os
import posixpath
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType

from agent.config.cluster import ClusterConfig, read_cluster
from agent.config.forge import ForgeConfig, read_forge
from agent.config.policy import read_repo_rules_path, read_rules, read_windows
from agent.config.proposals import ProposalsConfig, read_proposals
from agent.config.secrets import SecretsConfig, read_secrets
from agent.config.service import (
    SERVICE_KEYS,
    ServiceConfig,
    UnitIntervals,
    read_service,
    read_unit_intervals,
)
from agent.config.ssh import HostsConfig, read_hosts
from agent.config.statebackend import StateBackendConfig, read_state_backend
from agent.config.store import StoreConfig, read_store
from agent.config.yamlnodes import Fields, Problems, Value, compose, decode, quote
from agent.errors import ConfigError
from agent.policy.apply import ApplyMode
from agent.policy.prune import PruneMode
from agent.policy.rules import Rule
from agent.policy.windows import Windows
from providers.errors import RepoFileError
from providers.git_verify import SigningPolicy
from providers.repofiles import MAX_HOST_CONFIG_BYTES, format_size, read_bounded

DEFAULT_HOST_CONFIG_PATH = Path("/etc/gitops-agent/agent.yaml")
CONFIG_ENV_VAR = "GITOPS_AGENT_CONFIG"
DEFAULT_STATE_DIR = Path("/var/lib/gitops-agent")
DEFAULT_POLL = 60.0
DEFAULT_DRIFT = 600.0
DEFAULT_HOSTS = 60.0
DEFAULT_TIMEOUT = 1800.0
DEFAULT_LOCK_TIMEOUT = 300.0
DEFAULT_PARALLELISM = 4
DEFAULT_MAX_UNIT_TIMEOUT = 7200.0

_HINT = "see docs/host-config.md for every key of the host config"
# What git itself refuses in a ref name, plus a leading `-` (it would read as an option).
_BRANCH_RE = re.compile(
    r"(?!-)(?!/)(?!.*//)(?!.*\.\.)(?!.*@\{)(?!.*(?:/|\.lock|\.)$)[^\x00-\x20\x7f~^:?*\[\\]+"
)
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class DestroyPolicy(StrEnum):
    """What to do with a plan that destroys or replaces anything."""

    HOLD = "hold"  # wait for `agent approve`
    ALLOW = "allow"


@dataclass(frozen=True, slots=True)
class RepoConfig:
    """The repository the agent follows."""

    url: str
    branch: str = "main"
    deploy_key: Path | None = None
    known_hosts: Path | None = None
    https_ca_bundle: Path | None = None
    allow_history_rewrite: bool = False
    # When set, a revision is applied only if signed by a key it allows (docs/signed-commits.md).
    signing: SigningPolicy | None = None

    @property
    def is_ssh(self) -> bool:
        """True for `ssh://` and scp-like `user@host:path` URLs."""
        return is_ssh_url(self.url)


@dataclass(frozen=True, slots=True)
class Intervals:
    """How often to look for new commits and for drift, in seconds."""

    poll: float = DEFAULT_POLL
    drift: float = DEFAULT_DRIFT
    # A unit's own drift interval (`intervals.units`); the daemon runs it on its own timer.
    units: Mapping[str, UnitIntervals] = field(default_factory=lambda: MappingProxyType({}))
    # How often the daemon looks for new instances of EC2 fleets (agent/service/hostwatch.py).
    hosts: float = DEFAULT_HOSTS


@dataclass(frozen=True, slots=True)
class TerraformConfig:
    """How to run Terraform; `binary` None means search PATH, then the embedded engine."""

    binary: str | None
    timeout: float
    lock_timeout: float
    parallelism: int
    plugin_cache_dir: Path
    # `state_backend`: remote state for every stack without a backend of its own.
    state_backend: StateBackendConfig | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """Limits the repo manifest cannot widen."""

    destroy: DestroyPolicy = DestroyPolicy.HOLD
    max_unit_timeout: float = DEFAULT_MAX_UNIT_TIMEOUT
    # `policy.apply` as written; `ceiling` is the mode in force (agent/policy/apply.py).
    apply: ApplyMode | None = None
    rules: tuple[Rule, ...] = ()  # evaluated on every plan; the repository cannot remove them
    repo_rules: str | None = None  # a file of the repository with more rules
    # What happens to a unit the repository removed (agent/units/prune.py).
    prune: PruneMode = PruneMode.HOLD

    @property
    def ceiling(self) -> ApplyMode:
        """The loosest apply mode a unit may have, and the default: `policy.apply`, else
        today's behaviour (`destroy: hold` is approve-destroy, `destroy: allow` is auto)."""
        if self.apply is not None:
            return self.apply
        return ApplyMode.AUTO if self.destroy is DestroyPolicy.ALLOW else ApplyMode.APPROVE_DESTROY


@dataclass(frozen=True, slots=True)
class HostConfig:
    """The validated host config."""

    path: Path
    repo: RepoConfig
    state_dir: Path
    intervals: Intervals
    terraform: TerraformConfig
    allowed_paths: tuple[str, ...]
    policy: Policy
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    hosts: HostsConfig = field(default_factory=HostsConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)  # what `agent run` needs
    windows: Windows | None = None  # None: applies are allowed at any time
    proposals: ProposalsConfig | None = None  # None: proposed changes are never planned
    forge: ForgeConfig | None = None  # commit statuses and comments (docs/forges.md)
    store: StoreConfig | None = None  # None: the SQLite file in state_dir
    cluster: ClusterConfig | None = None  # None: agents on a shared store take turns


def resolve_host_config_path(cli_value: str | None, environ: Mapping[str, str]) -> Path:
    """Where the host config is: `--config`, else $GITOPS_AGENT_CONFIG, else the default."""
    if cli_value:
        return Path(cli_value)
    if environ.get(CONFIG_ENV_VAR):
        return Path(environ[CONFIG_ENV_VAR])
    return DEFAULT_HOST_CONFIG_PATH


def load_host_config(path: Path) -> HostConfig:
    """Read and validate the host config at `path`; relative paths in it resolve against
    the file's directory. Raises ConfigError (a missing file names how to point elsewhere).
    """
    try:
        # Bounded: a host config is short; a huge file is a mistake refused before parsing.
        data = read_bounded(path, limit=MAX_HOST_CONFIG_BYTES)
    except RepoFileError as exc:
        if exc.kind == "missing":
            raise ConfigError(
                f"{path}: expected a host config file; got no such file",
                hint=f"write one (see docs/host-config.md) or point elsewhere with "
                f"--config PATH or {CONFIG_ENV_VAR}=PATH",
            ) from None
        if exc.kind == "too-large":
            raise ConfigError(
                f"{path}:1: (file): the host config has more than"
                f" {format_size(MAX_HOST_CONFIG_BYTES)} (the limit)",
                hint="a host config is a short YAML file; check the path",
            ) from None
        raise ConfigError(
            f"{path}: expected a readable host config file; got {exc.reason}",
            hint=f"point elsewhere with --config PATH or {CONFIG_ENV_VAR}=PATH",
        ) from None
    filename = str(path)
    return parse_host_config(decode(data, filename), filename, path.absolute().parent)


def parse_host_config(text: str, filename: str, base_dir: Path) -> HostConfig:
    """Validate host config text. `filename` is used in error messages; relative paths
    resolve against `base_dir`. Raises ConfigValidationError listing every error.
    """
    problems = Problems(filename)
    root = Value.root(compose(text, filename), problems)
    config = _read(root, problems, filename, base_dir) if root else None
    problems.raise_if_any(_HINT)
    assert config is not None  # no problems means every part was read
    return config


def _read(root: Value, problems: Problems, filename: str, base_dir: Path) -> HostConfig | None:
    fields = root.mapping(
        [
            "repo",
            "state_dir",
            "intervals",
            "terraform",
            "allowed_paths",
            "policy",
            "secrets",
            "hosts",
            "windows",
            "proposals",
            "forge",
            "store",
            "cluster",
            *SERVICE_KEYS,
        ]
    )
    if fields is None:
        return None
    repo_value = fields.require("repo", "a mapping with at least url")
    repo = _repo(repo_value, base_dir) if repo_value else None

    state_dir = DEFAULT_STATE_DIR
    if found := fields.get("state_dir"):
        state_dir = _path(found, base_dir) or state_dir

    intervals = _intervals(fields.get("intervals"))
    policy = _policy(fields.get("policy"), Path(filename).name)
    windows = read_windows(fields.get("windows"))
    terraform = _terraform(fields.get("terraform"), base_dir, state_dir, policy)
    allowed = _allowed_paths(fields.get("allowed_paths"))
    secrets = read_secrets(fields.get("secrets"), base_dir, _path)
    hosts = read_hosts(fields.get("hosts"), base_dir, _path)
    service = read_service({key: fields.get(key) for key in SERVICE_KEYS}, base_dir, _path)
    proposals = read_proposals(fields.get("proposals"), policy.max_unit_timeout)
    forge = read_forge(fields.get("forge"), base_dir, _path)
    store = read_store(fields.get("store"), base_dir, _path)
    cluster = read_cluster(fields.get("cluster"), has_store=fields.get("store") is not None)
    if problems or repo is None:
        return None
    return HostConfig(
        path=base_dir / Path(filename).name,
        repo=repo,
        state_dir=state_dir,
        intervals=intervals,
        terraform=terraform,
        allowed_paths=allowed,
        policy=policy,
        secrets=secrets,
        hosts=hosts,
        service=service,
        windows=windows,
        proposals=proposals,
        forge=forge,
        store=store,
        cluster=cluster,
    )


def _repo(value: Value, base_dir: Path) -> RepoConfig | None:
    fields = value.mapping(
        [
            "url",
            "branch",
            "deploy_key",
            "known_hosts",
            "https_ca_bundle",
            "allow_history_rewrite",
            "signing",
        ]
    )
    if fields is None:
        return None
    url = None
    if found := fields.require("url", "a Git URL (file://, ssh://, https://, user@host:path)"):
        url = _url(found, base_dir)
    branch = "main"
    if found := fields.get("branch"):
        text = found.string("a Git branch name")
        if text is not None and not _BRANCH_RE.fullmatch(text):
            found.fail("a Git branch name")
        branch = text or branch
    paths = {key: _optional_path(fields, key, base_dir) for key in ("deploy_key", "known_hosts")}
    ca_bundle = _optional_path(fields, "https_ca_bundle", base_dir)
    rewrite = False
    if found := fields.get("allow_history_rewrite"):
        rewrite = bool(found.boolean())
    signing = _signing(fields.get("signing"), base_dir)
    if url is not None and is_ssh_url(url) and fields.get("known_hosts") is None:
        fields.require("known_hosts", "a known_hosts file for an ssh URL")
    if url is None:
        return None
    return RepoConfig(
        url=url,
        branch=branch,
        deploy_key=paths["deploy_key"],
        known_hosts=paths["known_hosts"],
        https_ca_bundle=ca_bundle,
        allow_history_rewrite=rewrite,
        signing=signing,
    )


def _signing(value: Value | None, base_dir: Path) -> SigningPolicy | None:
    """`repo.signing`: a GPG keyring, an SSH allowed-signers file, or both."""
    fields = value.mapping(["gpg_keyring", "ssh_allowed_signers"]) if value else None
    if value is None or fields is None:
        return None
    keyring = _optional_path(fields, "gpg_keyring", base_dir)
    signers = _optional_path(fields, "ssh_allowed_signers", base_dir)
    if fields.get("gpg_keyring") is None and fields.get("ssh_allowed_signers") is None:
        value.fail("a mapping with gpg_keyring, ssh_allowed_signers or both", "neither")
        return None
    return SigningPolicy(gpg_keyring=keyring, ssh_allowed_signers=signers)


def is_ssh_url(url: str) -> bool:
    """True for `ssh://...` and scp-like `[user@]host:path` (normalized URLs only)."""
    return url.lower().startswith("ssh://") or "://" not in url


def _url(value: Value, base_dir: Path) -> str | None:
    """Check a repository URL; a bare local path becomes a file:// URL."""
    raw = value.string("a Git URL")
    if raw is None:
        return None
    expected = "a Git URL (file://, ssh://, https://, user@host:path) or a local path"
    if raw.startswith("-") or any(ch.isspace() or ord(ch) < 0x20 for ch in raw):
        return value.fail(expected)
    if scheme := _SCHEME_RE.match(raw):
        return _scheme_url(value, raw, scheme.group(1).lower(), expected)
    colon, slash = raw.find(":"), raw.find("/")
    if colon > 0 and (slash < 0 or colon < slash):
        # scp-like, as git reads it: a colon before any slash.
        host = raw[:colon].rpartition("@")[2]
        if not host or host.startswith("-") or colon == len(raw) - 1:
            return value.fail(expected)
        return raw
    local = Path(raw) if Path(raw).is_absolute() else base_dir / raw
    return Path(os.path.normpath(local.absolute())).as_uri()


def _scheme_url(value: Value, raw: str, scheme: str, expected: str) -> str | None:
    try:
        parts = urllib.parse.urlsplit(raw)
        parts.port  # noqa: B018 - parsing the port is what validates it
    except ValueError:
        return value.fail(expected)
    if parts.password is not None:
        # Never echo the secret back, and keep it out of logs: use a credential helper.
        shown = raw.replace(f":{parts.password}@", ":***@")
        return value.fail("a URL without a password (use a git credential helper)", quote(shown))
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            return value.fail("a file:// URL with an absolute path (file:///srv/infra.git)")
        return raw
    if scheme in ("ssh", "https"):
        host = parts.hostname or ""
        if not host or host.startswith("-") or parts.path in ("", "/"):
            return value.fail(expected)
        return raw
    return value.fail(expected)


def _path(value: Value, base_dir: Path) -> Path | None:
    text = value.string("a path")
    if text is None:
        return None
    if "\x00" in text:
        return value.fail("a path")
    path = Path(text)
    return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))


def _optional_path(fields: Fields, key: str, base_dir: Path) -> Path | None:
    found = fields.get(key)
    return _path(found, base_dir) if found else None


def _intervals(value: Value | None) -> Intervals:
    fields = value.mapping(["poll", "drift", "units", "hosts"]) if value else None
    if fields is None:
        return Intervals()
    poll = fields.get("poll")
    drift = fields.get("drift")
    hosts = fields.get("hosts")
    return Intervals(
        poll=(poll.duration() if poll else None) or DEFAULT_POLL,
        drift=(drift.duration() if drift else None) or DEFAULT_DRIFT,
        units=read_unit_intervals(fields.get("units")),
        hosts=(hosts.duration() if hosts else None) or DEFAULT_HOSTS,
    )


def _policy(value: Value | None, source_name: str) -> Policy:
    keys = ["destroy", "max_unit_timeout", "apply", "rules", "repo_rules", "prune"]
    fields = value.mapping(keys) if value else None
    if fields is None:
        return Policy()
    destroy_value = fields.get("destroy")
    limit = fields.get("max_unit_timeout")
    destroy = (destroy_value.choice(DestroyPolicy) if destroy_value else None) or DestroyPolicy.HOLD
    apply_value = fields.get("apply")
    apply = apply_value.choice(ApplyMode) if apply_value else None
    if apply is not None and destroy_value is None:
        destroy = DestroyPolicy.ALLOW if apply is ApplyMode.AUTO else DestroyPolicy.HOLD
    elif apply is ApplyMode.AUTO and destroy is DestroyPolicy.HOLD:
        assert apply_value is not None
        apply_value.fail("approve-destroy or approve (policy.destroy is hold)", "'auto'")
    prune_value = fields.get("prune")
    prune = (prune_value.choice(PruneMode) if prune_value else None) or PruneMode.HOLD
    return Policy(
        destroy=destroy,
        max_unit_timeout=(limit.duration() if limit else None) or DEFAULT_MAX_UNIT_TIMEOUT,
        apply=apply,
        rules=read_rules(fields.get("rules"), source_name),
        repo_rules=read_repo_rules_path(fields.get("repo_rules")),
        prune=prune,
    )


def _terraform(
    value: Value | None, base_dir: Path, state_dir: Path, policy: Policy
) -> TerraformConfig:
    fields = (
        value.mapping(
            [
                "binary",
                "timeout",
                "lock_timeout",
                "parallelism",
                "plugin_cache_dir",
                "state_backend",
            ]
        )
        if value
        else None
    )
    binary = None
    timeout, lock_timeout, parallelism = DEFAULT_TIMEOUT, DEFAULT_LOCK_TIMEOUT, DEFAULT_PARALLELISM
    cache_dir = state_dir / "plugin-cache"
    backend = None
    if fields is not None:
        backend = read_state_backend(fields.get("state_backend"), base_dir, _path)
        if found := fields.get("binary"):
            binary = _binary(found, base_dir)
        if found := fields.get("timeout"):
            # The default for units must itself be a timeout a unit may have.
            limit = policy.max_unit_timeout
            why = "policy.max_unit_timeout"
            timeout = found.duration(maximum=limit, why_maximum=why) or timeout
        if found := fields.get("lock_timeout"):
            lock_timeout = found.duration(positive=False)
            lock_timeout = DEFAULT_LOCK_TIMEOUT if lock_timeout is None else lock_timeout
        if found := fields.get("parallelism"):
            parallelism = found.integer(minimum=1) or parallelism
        if found := fields.get("plugin_cache_dir"):
            cache_dir = _path(found, base_dir) or cache_dir
    return TerraformConfig(binary, timeout, lock_timeout, parallelism, cache_dir, backend)


def _binary(value: Value, base_dir: Path) -> str | None:
    """A command name is looked up on PATH later; anything with a slash is a path."""
    text = value.string("a path or a command name")
    if text is None or "/" not in text:
        return text
    path = _path(value, base_dir)
    return str(path) if path else None


def _allowed_paths(value: Value | None) -> tuple[str, ...]:
    if value is None:
        return (".",)
    items = value.sequence(non_empty=True)
    if items is None:
        return (".",)
    allowed: dict[str, None] = {}
    for item in items:
        text = item.string("a repository-relative directory")
        if text is None:
            continue
        normal = posixpath.normpath(text)
        if text.startswith("/") or normal == ".." or normal.startswith("../") or "\x00" in text:
            item.fail("a relative directory inside the repository (no leading / or ..)")
            continue
        allowed[normal] = None
    return tuple(allowed) or (".",)
