"""What the units of one pass share: the pass context and the stack outputs read in it.

Its own module so that the stack reconciler, the fleet reconciler and the unit runner all
depend on it and not on each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Manifest
from agent.state.store import UnitOutcome, UnitStateRow
from agent.units.secrets import ResolvedSecrets


@dataclass(frozen=True, slots=True)
class StackContext:
    """What every unit of one pass shares."""

    run_id: str
    revision: str
    tree: Path  # the checkout at `revision`
    manifest: Manifest
    dry_run: bool
    secrets: ResolvedSecrets = field(default_factory=ResolvedSecrets)
    # Set by `agent reconcile --now --override-window --reason TEXT`: "by USER: TEXT".
    override_window: str | None = None
    # The results of this pass so far (the pass fills it; a unit reads its dependencies').
    outcomes: Mapping[str, UnitOutcome] = field(default_factory=dict)
    # Stack outputs read in this pass, by unit: a unit's outputs do not change once it
    # has finished, and its dependents start only after that.
    outputs: dict[str, dict[str, StackOutput]] = field(default_factory=dict)
    # Converge only these hosts of the fleet (new instances); None: every host.
    hosts_only: frozenset[str] | None = None
    # A changed-only pass (agent.units.changed): units whose inputs did not change since
    # their last clean plan, and whose drift check is not due, run nothing.
    changed_only: bool = False
    # Each unit's drift interval in seconds (None: `drift: ignore`), for changed-only.
    drift_intervals: Mapping[str, float | None] = field(default_factory=dict)
    # Cluster mode: called with the unit's name immediately before anything is applied;
    # raises LeaseLostError when another agent took the unit over (agent/engine/clusterpass.py).
    guard: Callable[[str], None] | None = None
    # Every unit's stored state as the units step began, read in one query (a unit's row
    # changes only by its own run, and one agent runs the pass alone); None: each unit
    # reads its own (cluster mode: another agent may have run it meanwhile).
    states: Mapping[str, UnitStateRow] | None = None
    # Record the units a changed-only pass leaves `unchanged` together at the end of the
    # units step (RunStore.batches_unchanged), not with two writes each.
    batch_unchanged: bool = False


@dataclass(frozen=True, slots=True)
class StackOutput:
    value: Any
    sensitive: bool
