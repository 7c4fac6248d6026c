"""Gitea (and Forgejo) API v1: the same endpoints and shapes as GitHub's for what we use,
under `https://HOST/api/v1`, with `Authorization: token TOKEN`. Its listing pages hold at
most 50 items by default (`limit`), and its states add `warning` (not used).
"""

from __future__ import annotations

from providers.forge.github import GitHubClient


class GiteaClient(GitHubClient):
    """A `ForgeClient` for one Gitea repository `owner/name`."""

    kind = "gitea"
    _page_param, _page_size = "limit", 50
