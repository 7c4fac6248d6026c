"""Forge clients: commit statuses and one comment per pull/merge request, for GitHub,
GitLab and Gitea. Plain values in (kind, API URL, repository, token), `ForgeError` out.

    client = make_client("gitlab", "https://gitlab.example.com/api/v4", "infra/live", token)
    client.set_status(sha, "success", "applied: +2 ~1 -0", "gitops-agent")
    client.upsert_comment(42, "plan", "### Plan\\n...")
"""

from __future__ import annotations

from typing import Literal

from providers.errors import ForgeError
from providers.forge.base import (
    COMMIT_STATES,
    DEFAULT_TIMEOUT,
    MAX_COMMENT_CHARS,
    CommitState,
    ForgeClient,
    ForgeHttp,
    comment_text,
    marker_line,
)
from providers.forge.gitea import GiteaClient
from providers.forge.github import GITHUB_API, GitHubClient
from providers.forge.gitlab import GitLabClient

__all__ = [
    "COMMIT_STATES",
    "FORGE_KINDS",
    "MAX_COMMENT_CHARS",
    "CommitState",
    "ForgeClient",
    "ForgeError",
    "ForgeKind",
    "GitHubClient",
    "GitLabClient",
    "GiteaClient",
    "comment_text",
    "make_client",
    "marker_line",
]

ForgeKind = Literal["github", "gitlab", "gitea"]
FORGE_KINDS: tuple[ForgeKind, ...] = ("github", "gitlab", "gitea")


def make_client(
    kind: ForgeKind,
    base_url: str | None,
    repo: str,
    token: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ca_bundle: str | None = None,
) -> ForgeClient:
    """A client for `repo` on the forge whose API root is `base_url`:
    `https://api.github.com` (the default for github; GitHub Enterprise:
    `https://HOST/api/v3`), `https://HOST/api/v4` (gitlab), `https://HOST/api/v1` (gitea).
    Raises ValueError for an unknown kind, a missing URL or a malformed repo."""
    if not token:
        raise ValueError(f"{kind}: the token is empty")
    if kind == "github":
        http = ForgeHttp(
            kind,
            base_url or GITHUB_API,
            ("Authorization", f"Bearer {token}"),
            token,
            timeout=timeout,
            ca_bundle=ca_bundle,
        )
        return GitHubClient(http, repo)
    if not base_url:
        raise ValueError(f"{kind}: the API URL is required (https://HOST/api/v4 or /api/v1)")
    if kind == "gitlab":
        http = ForgeHttp(
            kind, base_url, ("PRIVATE-TOKEN", token), token, timeout=timeout, ca_bundle=ca_bundle
        )
        return GitLabClient(http, repo)
    if kind == "gitea":
        http = ForgeHttp(
            kind,
            base_url,
            ("Authorization", f"token {token}"),
            token,
            timeout=timeout,
            ca_bundle=ca_bundle,
        )
        return GiteaClient(http, repo)
    raise ValueError(f"forge kind {kind!r}: expected one of {', '.join(FORGE_KINDS)}")
