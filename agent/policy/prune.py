"""What happens to a unit the repository removed (`policy.prune` of the host config)."""

from __future__ import annotations

from enum import StrEnum


class PruneMode(StrEnum):
    """The host's choice for what a removed unit created (docs/policy.md, "Prune")."""

    HOLD = "hold"  # plan the removal and hold it for `agent approve` (the default)
    AUTO = "auto"  # remove it (a stack's destroy, a fleet's removals on its hosts)
    ORPHAN = "orphan"  # forget the unit, leave what it created, and record that


class RemovedStatus(StrEnum):
    """Where a removed unit stands (`agent status`)."""

    PRUNING = "pruning"  # its removal runs, or failed and is tried again next pass
    HELD = "held"  # its removal waits for `agent approve`
    ORPHANED = "orphaned"  # left as it is, by policy
    PRUNED = "pruned"  # removed; its history stays in `agent history`
