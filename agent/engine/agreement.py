"""Whether the live agents of a cluster share the settings they must agree on (lease TTL,
affinity rules, sharding version: `Settings`), and which agents go on when they do not.

Each agent reads its own host config, so two agents can disagree: on who owns a unit (two
affinity maps or sharding rules: a unit run by both, or by none) or on when an agent is
dead (two TTLs). Every agent records its settings in `cluster_agents`, and every agent
computes the same answer from the same rows, with no coordination:

- the live agents are grouped by their settings; the **largest group** wins, and a tie
  goes to the group of the **oldest** agent (earliest start, then name);
- the agents of that group share the units out as before; every other live agent takes no
  lease (it says why in its log, in `agent cluster` and in a metric) and owns nothing, so
  the others do not count it when they shard.

A majority rather than "the oldest agent's": a rolling change of the settings keeps most
agents working (the group that has been changed takes over once it is the larger), and one
agent started with a stray config cannot impose it on the others. Pure: tested as a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.state.cluster import SETTINGS, AgentRow, Settings

# How each setting is named for people (the host config key, or what sets it).
SETTING_NAMES = {
    "lease_ttl": "cluster.lease_ttl",
    "affinity": "cluster.affinity (hash)",
    "sharding": "the sharding version (the agent's version)",
    "recorded": "recorded settings",
}


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One setting an agent has otherwise than the agreed settings."""

    setting: str  # a name of SETTINGS, or "recorded" (an agent that recorded none)
    value: str  # the agent's, as `Settings.describe` shows it
    agreed: str

    def describe(self) -> str:
        return f"{SETTING_NAMES[self.setting]} is {self.value} here, {self.agreed} agreed"


@dataclass(frozen=True, slots=True)
class Agreement:
    """The settings the live agents agreed on, who has them, and who does not."""

    settings: Settings | None  # None: no live agent, or the winners recorded none
    reference: str | None  # the oldest agent of the winning group
    agreeing: tuple[str, ...] = ()  # live agents with the agreed settings, by name
    refusing: dict[str, tuple[Mismatch, ...]] = field(default_factory=dict)  # live, not

    def mismatches(self, settings: Settings | None) -> tuple[Mismatch, ...]:
        """How `settings` (an agent's) differ from the agreed ones; () when they agree or
        nothing was agreed (no live agent)."""
        if self.reference is None or settings == self.settings:
            return ()
        if settings is None or self.settings is None:
            return (Mismatch("recorded", _show(settings), _show(self.settings)),)
        return tuple(
            Mismatch(n, settings.describe(n), self.settings.describe(n))
            for n in settings.differences(self.settings)
        )

    def explain(self, mismatches: Sequence[Mismatch]) -> str:
        """Why an agent takes no lease, for its log, its pass and `agent cluster`."""
        differ = "; ".join(m.describe() for m in mismatches)
        who = ", ".join(self.agreeing)
        return f"{differ} (by the live agents {who}: the larger group, reference {self.reference})"


def _show(settings: Settings | None) -> str:
    if settings is None:
        return "none (an older agent version)"
    return ", ".join(f"{n}={settings.describe(n)}" for n in SETTINGS)


def agree(agents: Sequence[AgentRow]) -> Agreement:
    """The agreement of the live agents among `agents` (every agent computes the same)."""
    live = sorted((a for a in agents if a.live), key=lambda a: (a.started_at, a.name))
    if not live:
        return Agreement(None, None)
    groups: dict[Settings | None, list[AgentRow]] = {}
    for agent in live:  # oldest first: each group's first agent is its oldest
        groups.setdefault(agent.settings, []).append(agent)
    # The largest group; on a tie, the one whose oldest agent started first.
    rank = {key: i for i, key in enumerate(groups)}  # in order of their oldest agents
    winner = max(groups, key=lambda key: (len(groups[key]), -rank[key]))
    agreement = Agreement(
        settings=winner,
        reference=groups[winner][0].name,
        agreeing=tuple(sorted(a.name for a in groups[winner])),
    )
    for agent in live:
        if agent.settings != winner:
            agreement.refusing[agent.name] = agreement.mismatches(agent.settings)
    return agreement
