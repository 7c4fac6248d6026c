"""The host config's `cluster`: this agent as one of several sharing a PostgreSQL store
(docs/scale-out.md). Absent: the agents on a shared store take turns for whole passes.

    cluster:
      agent: bastion-a            # default: the hostname
      labels: {zone: eu-west-1a}
      lease_ttl: 30s
      affinity:
        "prod-*": {zone: eu-west-1a}   # units matching it run only on agents so labelled
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from agent.config.yamlnodes import INVALID, Value

DEFAULT_LEASE_TTL = 30.0
MIN_LEASE_TTL = 1.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,99}")
KEYS = ("agent", "labels", "lease_ttl", "affinity")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """This agent's name and labels, the lease TTL, and which units need which labels."""

    agent: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    lease_ttl: float = DEFAULT_LEASE_TTL
    # (unit-name glob, the labels an agent must have to run a unit it matches), in file order
    affinity: tuple[tuple[str, Mapping[str, str]], ...] = ()

    def affinity_hash(self) -> str:
        """A canonical hash of the affinity rules: the same rules give the same hash on
        every agent (labels sorted; the globs' order kept, as a later glob wins a key)."""
        rules = [[glob, sorted(labels.items())] for glob, labels in self.affinity]
        text = json.dumps(rules, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def required_labels(self, unit: str) -> dict[str, str]:
        """The labels an agent needs to run `unit`: those of every glob that matches it."""
        needed: dict[str, str] = {}
        for glob, labels in self.affinity:
            if fnmatch.fnmatchcase(unit, glob):
                needed.update(labels)
        return needed


def _labels(value: Value) -> Mapping[str, str] | None:
    fields = value.mapping()
    if fields is None:
        return None
    labels: dict[str, str] = {}
    for key, item in fields:
        text = item.scalar()
        if text is INVALID:
            continue
        if isinstance(text, bool) or not isinstance(text, str | int | float):
            item.fail("a string label value")
            continue
        labels[key] = str(text)
    return MappingProxyType(labels)


def read_cluster(value: Value | None, *, has_store: bool) -> ClusterConfig | None:
    """`cluster`, or None; problems go to the problem list. `has_store`: the host config
    names a PostgreSQL store (`store.url_file`), without which agents cannot share units."""
    fields = value.mapping(list(KEYS)) if value else None
    if fields is None or value is None:
        return None
    if not has_store:
        value.problems.note(
            value.line,
            value.path,
            "needs `store: {url_file: ...}` beside it: agents share units through a"
            " PostgreSQL store, and this host config keeps the SQLite file (one host's)",
        )
    agent = socket.gethostname()
    if found := fields.get("agent"):
        name = found.string("an agent name")
        if name is not None and not _NAME.fullmatch(name):
            found.fail("an agent name of letters, digits and _.@:- (at most 100)")
        elif name is not None:
            agent = name
    labels: Mapping[str, str] = MappingProxyType({})
    if found := fields.get("labels"):
        labels = _labels(found) or labels
    ttl = DEFAULT_LEASE_TTL
    if found := fields.get("lease_ttl"):
        seconds = found.duration(maximum=3600.0)
        if seconds is not None and seconds < MIN_LEASE_TTL:
            found.fail("a duration of at least 1s")
        elif seconds is not None:
            ttl = seconds
    affinity: list[tuple[str, Mapping[str, str]]] = []
    if found := fields.get("affinity"):
        globs = found.mapping()
        for glob, needed in globs or ():
            if (wanted := _labels(needed)) is not None:
                affinity.append((glob, wanted))
    return ClusterConfig(agent, labels, ttl, tuple(affinity))
