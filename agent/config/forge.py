"""The host config's `forge:` section: where commit statuses and pull request comments go.

    forge:
      kind: github | gitlab | gitea
      url: https://api.github.com      # the API root; optional for github
      repo: acme/infra                 # OWNER/NAME; for gitlab a project id or GROUP/PROJECT
      token_file: /etc/gitops-agent/forge-token
      context: gitops-agent            # the status name on the forge (optional)
      timeout: 10s                     # per API call (optional)
      ca_bundle: /etc/ssl/forge-ca.pem # a private CA (optional)

The token is never in the config: it is read from `token_file` (mode 0600, like every
secret file the host config names) when the client is opened, and never logged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent.config.service import PathReader, read_secret_file
from agent.config.yamlnodes import Value
from agent.errors import ConfigError
from providers.forge import FORGE_KINDS, ForgeClient, ForgeKind, make_client

DEFAULT_CONTEXT = "gitops-agent"
DEFAULT_FORGE_TIMEOUT = 10.0
MAX_FORGE_TIMEOUT = 120.0

_OWNER_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
_GITLAB_PROJECT_RE = re.compile(r"\d+|[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)+")
_CONTEXT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _./:-]{0,99}")
_API_HINT = {
    "github": "https://api.github.com (GitHub Enterprise: https://HOST/api/v3)",
    "gitlab": "https://HOST/api/v4",
    "gitea": "https://HOST/api/v1",
}


@dataclass(frozen=True, slots=True)
class ForgeConfig:
    """A validated `forge:` section; `url` None means GitHub's public API."""

    kind: ForgeKind
    url: str | None
    repo: str
    token_file: Path
    context: str = DEFAULT_CONTEXT
    timeout: float = DEFAULT_FORGE_TIMEOUT
    ca_bundle: Path | None = None
    where: str = ""  # "agent.yaml:40: forge.token_file", for errors at open time


def read_forge(value: Value | None, base_dir: Path, path_of: PathReader) -> ForgeConfig | None:
    """Read `forge:`; problems are recorded on the values (file, line, key)."""
    if value is None:
        return None
    fields = value.mapping(["kind", "url", "repo", "token_file", "context", "timeout", "ca_bundle"])
    if fields is None:
        return None
    kind: ForgeKind | None = None
    if found := fields.require("kind", f"one of {', '.join(FORGE_KINDS)}"):
        text = found.string(f"one of {', '.join(FORGE_KINDS)}")
        if text is not None and text not in FORGE_KINDS:
            found.fail(f"one of {', '.join(FORGE_KINDS)}")
        elif text is not None:
            kind = text  # type: ignore[assignment]
    url = None
    if found := fields.get("url"):
        url = _api_url(found, kind)
    elif kind in ("gitlab", "gitea"):
        fields.require("url", f"the API root, {_API_HINT[kind]}")
    repo = None
    if found := fields.require("repo", "the repository, OWNER/NAME"):
        repo = _repo(found, kind)
    token_file, where = None, ""
    if found := fields.require("token_file", "a file holding the forge's API token"):
        token_file = path_of(found, base_dir)
        where = f"{found.problems.filename}:{found.line}: {found.path}"
    context = DEFAULT_CONTEXT
    if found := fields.get("context"):
        text = found.string("a status name")
        if text is not None and not _CONTEXT_RE.fullmatch(text):
            found.fail("a status name (letters, digits, space and _./:-, at most 100)")
        context = text or context
    timeout = DEFAULT_FORGE_TIMEOUT
    if found := fields.get("timeout"):
        timeout = (
            found.duration(maximum=MAX_FORGE_TIMEOUT, why_maximum="a bounded API call") or timeout
        )
    ca_bundle = path_of(found, base_dir) if (found := fields.get("ca_bundle")) else None
    if kind is None or repo is None or token_file is None:
        return None
    if url is None and kind != "github":
        return None
    return ForgeConfig(kind, url, repo, token_file, context, timeout, ca_bundle, where)


def open_forge(
    config: ForgeConfig, *, register: Callable[[str], None] | None = None
) -> ForgeClient:
    """A client for the configured forge, with its token read from `token_file` now (and
    given to `register`, the redactor's, before anything can log it). Raises ConfigError
    naming the config key when the file cannot be used."""
    token = read_secret_file(config.token_file, config.where, "the forge's API token")
    if register is not None:
        register(token.strip())
    try:
        return make_client(
            config.kind,
            config.url,
            config.repo,
            token.strip(),
            timeout=config.timeout,
            ca_bundle=str(config.ca_bundle) if config.ca_bundle else None,
        )
    except ValueError as exc:  # checked at load already; kept as a user-facing error
        raise ConfigError(f"{config.where}: {exc}") from None


def _api_url(value: Value, kind: str | None) -> str | None:
    expected = f"the API root, {_API_HINT.get(kind or '', 'an https:// URL')}"
    text = value.string(expected)
    if text is None:
        return None
    try:
        parts = urlsplit(text.strip())
        parts.port  # noqa: B018 - parsing the port is what validates it
    except ValueError:
        return value.fail(expected)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return value.fail(expected)
    if parts.username or parts.password or parts.query or parts.fragment:
        # The token goes in a header, from token_file: never in the URL.
        return value.fail(f"{expected}, without credentials or a query", "a URL with them")
    return text.strip().rstrip("/")


def _repo(value: Value, kind: str | None) -> str | None:
    if kind == "gitlab":
        text = value.string("a project id or GROUP/PROJECT")
        if text is not None and not _GITLAB_PROJECT_RE.fullmatch(text):
            return value.fail("a project id or GROUP/PROJECT")
        return text
    text = value.string("the repository, OWNER/NAME")
    if text is not None and not _OWNER_NAME_RE.fullmatch(text):
        return value.fail("the repository, OWNER/NAME")
    return text
