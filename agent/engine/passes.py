"""What a reconcile pass is asked (`PassRequest`), learns (`PassContext`) and returns
(`PassResult`), and the errors that stop one. Shared by the pass's steps in agent/engine/."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agent.config import Manifest
from agent.engine.clusterpass import ClusterPass
from agent.errors import AgentError
from agent.state.store import RunStatus, UnitOutcome, UnitStatus
from agent.units.secrets import ResolvedSecrets

# Unit statuses after which a dependent may start.
CONVERGED = {UnitStatus.OK}


@dataclass(frozen=True, slots=True)
class PassRequest:
    """What was asked of a pass."""

    trigger: str = "cli"
    dry_run: bool = False
    unit: str | None = None  # reconcile only this unit
    # Units this pass leaves out (the daemon's backoff: a unit failing again and again, and
    # its dependents; or units on a drift schedule of their own). Suspended units are always.
    skip: frozenset[str] = frozenset()
    # `--override-window --reason`: "by USER: REASON"; plans apply outside the change window.
    override_window: str | None = None
    # With `unit`: converge only these hosts of that fleet, at the revision in force and
    # without fetching (the daemon's look for new EC2 instances, agent/service/hostwatch.py).
    hosts: frozenset[str] | None = None
    # Plan only the units whose inputs changed or whose drift check is due (agent.units.changed);
    # the others are recorded `unchanged`. The daemon asks it for pushes and polls.
    changed_only: bool = False


@dataclass
class PassContext:
    """What the steps of one pass learn, in order."""

    request: PassRequest
    run_id: str
    head: str | None = None  # the branch head fetched
    target: str | None = None  # the revision this pass reconciles
    manifest: Manifest | None = None
    warnings: list[str] = field(default_factory=list)
    rejected: str | None = None  # why the head revision was refused, if it was
    fetch_error: str | None = None  # the fetch failed; the revision in force was used
    outcomes: dict[str, UnitOutcome] = field(default_factory=dict)
    secrets: ResolvedSecrets = field(default_factory=ResolvedSecrets)
    selected: list[str] | None = None  # the units this pass reconciles, once chosen
    suspended: list[str] = field(default_factory=list)  # units it left out as suspended
    cluster: ClusterPass | None = None  # cluster mode: this pass's part (clusterpass.py)


@dataclass(frozen=True, slots=True)
class PassResult:
    run_id: str
    status: RunStatus
    revision: str | None
    head: str | None
    outcomes: dict[str, UnitOutcome]
    error: str | None
    warnings: tuple[str, ...]
    suspended: tuple[str, ...] = ()  # units left out because they are suspended

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.SUCCEEDED


class PassFailed(AgentError):
    """A step stopped the pass before any unit could run."""

    reference = "pass-failed"


class ApprovalRefused(AgentError):
    """`agent approve` cannot apply the plan asked for (stale, not held, already applied)."""

    reference = "approval-refused"


Step = Callable[[PassContext], None]
