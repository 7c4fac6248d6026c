"""Which live agent owns which unit: rendezvous (highest random weight) hashing.

Every agent computes the same answer from the same inputs (the unit's name, the live
agents' names and labels, the affinity rules), with no coordination: each unit goes to
the agent with the highest hash of (agent, unit) among the agents whose labels satisfy
the unit's affinity. When an agent leaves, only its units move; when one joins, it takes
about 1/N of the units from the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.config.cluster import ClusterConfig

# The version of the rule below (the hash, its input, the tie-break). Agents that run
# different rules would each own units the other thinks its own: one more on any change,
# and agents of two versions refuse to share units (agent/engine/agreement.py).
SHARDING_VERSION = 1


@dataclass(frozen=True, slots=True)
class Member:
    """A live agent as sharding sees it."""

    name: str
    labels: tuple[tuple[str, str], ...]  # sorted (key, value) pairs: a Member is hashable

    @classmethod
    def of(cls, name: str, labels: Mapping[str, str]) -> Member:
        return cls(name, tuple(sorted(labels.items())))


def weight(agent: str, unit: str) -> int:
    """The agent's weight for the unit (the same on every host and Python)."""
    digest = hashlib.sha256(f"{agent}\0{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def eligible(member: Member, required: Mapping[str, str]) -> bool:
    have = dict(member.labels)
    return all(have.get(key) == value for key, value in required.items())


def owner(unit: str, members: Iterable[Member], required: Mapping[str, str]) -> str | None:
    """The agent that owns `unit`, or None when no live agent has the labels it needs."""
    candidates = [m.name for m in members if eligible(m, required)]
    if not candidates:
        return None
    return max(candidates, key=lambda name: (weight(name, unit), name))


def assign(
    units: Iterable[str], members: Iterable[Member], config: ClusterConfig
) -> dict[str, str | None]:
    """Each unit's owner (None: no live agent matches its affinity)."""
    live = list(members)
    return {unit: owner(unit, live, config.required_labels(unit)) for unit in units}
