"""The values a fleet unit's parts pass to each other: its errors, each host's plan and
result, and the unit's outcome (agent/units/fleets.py and the modules beside it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.config.fleet import HostSpec
from agent.errors import AgentError
from agent.state.store import UnitOutcome
from providers.hosts.model import Handler, Resource


class FleetError(AgentError):
    """A fleet could not be set up (hosts from a stack output, a missing SSH config)."""

    reference = "fleet-failed"


class CommandLineSecretError(FleetError):
    """A rendered command line holds a secret value (refused before it reaches a host)."""


@dataclass(frozen=True, slots=True)
class HostResult:
    """One host's part of a fleet unit's result (in `reconcile --json` and history)."""

    host: str
    status: str  # ok | failed
    changed: int = 0
    pending: int = 0  # would change (dry run, or drift only reported)
    failed: int = 0
    held: int = 0  # removals waiting for approval (policy.destroy: hold)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class FleetOutcome(UnitOutcome):
    """A fleet unit's outcome: the store's fields (`plan_change` counts the resources
    changed or found to change on all hosts) and each host's own result."""

    hosts: tuple[HostResult, ...] = ()

    @property
    def changed_hosts(self) -> list[str]:
        return [h.host for h in self.hosts if h.changed or h.pending or h.held]

    @property
    def failed_hosts(self) -> list[str]:
        return [h.host for h in self.hosts if h.status != "ok"]


@dataclass(frozen=True, slots=True)
class PlannedHost:
    """One host of a fleet with what it must have (or why it cannot be built)."""

    spec: HostSpec
    resources: tuple[Resource, ...]  # what the engine gets: desired, then removals
    handlers: Mapping[str, Handler]
    error: str | None = None
    desired: tuple[Resource, ...] = ()
    removals: tuple[Resource, ...] = ()
    released: tuple[str, ...] = ()  # record keys let go (adopted objects the repo dropped)
    pending_handlers: tuple[str, ...] | None = None  # owed from earlier passes (None: keep)
