"""The host config's `proposals:` section: which refs are proposed changes, whose heads the
agent may plan, and what a proposal plan may be given.

Absent means no proposal is ever planned. Present, it must name the refs and the authors
explicitly: planning a proposal runs its stack code on this host (docs/proposals.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.config.yamlnodes import Value

DEFAULT_PROPOSAL_TIMEOUT = 600.0
DEFAULT_MAX_PROPOSALS = 20
_REF_EXPECTED = (
    "a ref pattern with at most one '*' (refs/pull/*/head, refs/merge-requests/*/head,"
    " refs/heads/feature/*, or a branch pattern such as feature/*)"
)
# What git refuses in a ref name (but the one `*` a pattern may hold), and `..`.
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?\[\\]|\.\.|//|@\{|\.lock(/|$)|/$|^/|^-")
_UNIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, slots=True)
class ProposalsConfig:
    """Validated `proposals:`; `refs` are full ref patterns (`refs/...`)."""

    refs: tuple[str, ...]
    authors: tuple[str, ...]  # fnmatch patterns on the head commit's author e-mail
    secrets_for: frozenset[str] = frozenset()  # units whose proposal plans get their secrets
    timeout: float = DEFAULT_PROPOSAL_TIMEOUT  # per unit plan, init included
    max_open: int = DEFAULT_MAX_PROPOSALS  # proposals planned per poll, by ref name
    sandbox: bool = True  # Terraform runs under bwrap (providers/sandbox.py); False: `none`


def read_proposals(value: Value | None, max_timeout: float) -> ProposalsConfig | None:
    """Validate `proposals:` (None when absent: proposals are off)."""
    if value is None or value.is_null:
        return None
    fields = value.mapping(["refs", "authors", "secrets_for", "timeout", "max_open", "sandbox"])
    if fields is None:
        return None
    refs: list[str] = []
    if found := fields.require("refs", "a list of ref patterns"):
        for item in found.sequence(non_empty=True) or ():
            text = item.string(_REF_EXPECTED)
            if text is None:
                continue
            ref = text if text.startswith("refs/") else f"refs/heads/{text}"
            if text.count("*") > 1 or _BAD_REF.search(text) or ref in ("refs/", "refs/heads/"):
                item.fail(_REF_EXPECTED)
                continue
            refs.append(ref)
    authors: list[str] = []
    expected = "a list of author e-mail patterns (alice@example.org, *@example.org, or '*')"
    if found := fields.require("authors", expected):
        for item in found.sequence(non_empty=True) or ():
            text = item.string("an e-mail pattern")
            if text is not None:
                authors.append(text.lower())
    secrets_for: list[str] = []
    if found := fields.get("secrets_for"):
        for item in found.sequence() or ():
            text = item.string("a unit name")
            if text is not None and not _UNIT_NAME.match(text):
                item.fail("a unit name")
            elif text is not None:
                secrets_for.append(text)
    timeout = DEFAULT_PROPOSAL_TIMEOUT
    if found := fields.get("timeout"):
        why = "policy.max_unit_timeout"
        timeout = found.duration(maximum=max_timeout, why_maximum=why) or timeout
    max_open = DEFAULT_MAX_PROPOSALS
    if found := fields.get("max_open"):
        max_open = found.integer(minimum=1) or max_open
    sandbox = True
    if found := fields.get("sandbox"):
        text = found.string("bwrap or none")
        if text not in (None, "bwrap", "none"):
            found.fail("bwrap or none")
        sandbox = text != "none"
    if not refs or not authors:
        return None
    return ProposalsConfig(
        refs=tuple(dict.fromkeys(refs)),
        authors=tuple(dict.fromkeys(authors)),
        secrets_for=frozenset(secrets_for),
        timeout=timeout,
        max_open=max_open,
        sandbox=sandbox,
    )
