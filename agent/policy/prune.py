"""What happens to a unit the repository removed (`policy.prune` of the host config)."""

from __future__ import annotations

from enum import StrEnum


class PruneMode(StrEnum):
    """The host's choice for what a removed unit created (docs/policy.md, "Prune")."""

    HOLD = "hold"  # plan the removal and hold it for `agent approve` (the default)
    AUTO = "auto"  # remove it (a stack's destroy, a fleet's removals on its hosts)
    ORPHAN = "orphan"  # forget the unit, leave what it created, and record that

    # Strictness is what the agent may destroy without a person: `auto` destroys, `hold`
    # destroys once someone approves, `orphan` never destroys. A unit's own `prune:` in
    # gitops.yaml may only be as strict as the host config's policy.prune, or stricter.
    @property
    def rank(self) -> int:
        return _ORDER.index(self)

    def allows(self, other: PruneMode) -> bool:
        """Whether a unit may ask for `other` under this ceiling (only as strict or stricter)."""
        return other.rank >= self.rank

    def stricter(self, other: PruneMode) -> PruneMode:
        """The stricter of the two."""
        return other if other.rank > self.rank else self


_ORDER = (PruneMode.AUTO, PruneMode.HOLD, PruneMode.ORPHAN)


def prune_within(ceiling: PruneMode) -> tuple[PruneMode, ...]:
    """The modes a manifest may choose under `ceiling`, loosest first."""
    return tuple(mode for mode in _ORDER if ceiling.allows(mode))


class RemovedStatus(StrEnum):
    """Where a removed unit stands (`agent status`)."""

    PRUNING = "pruning"  # its removal runs, or failed and is tried again next pass
    HELD = "held"  # its removal waits for `agent approve`
    ORPHANED = "orphaned"  # left as it is, by policy
    PRUNED = "pruned"  # removed; its history stays in `agent history`
