"""What a Reconciler does differently in a cluster (host config `cluster:`): its membership
(agent/engine/membership.py) lives as long as the Reconciler, a pass takes no store-wide
turn lock, start-up recovery ends only this agent's runs, and each pass's units go
through a ClusterPass (agent/engine/clusterpass.py). The Reconciler calls in here at a
few points; everything else of a pass is as on one agent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from agent.config import HostConfig, Manifest
from agent.config.cluster import ClusterConfig
from agent.core.redact import Redactor
from agent.engine.clusterpass import LEASE_LOST, ClusterPass
from agent.engine.membership import Membership
from agent.errors import AgentError, LeaseLostError
from agent.state.cluster import Refused
from agent.state.store import UnitOutcome, UnitStatus, open_run_store
from agent.units.context import StackContext
from agent.units.fleets import FleetReconciler
from agent.units.secrets import SecretResolver
from agent.units.stacks import StackReconciler, describe_outcome
from agent.units.unitrun import finish_unit
from providers.terraform import keeps_agent_state


class ClusterMode:
    """One agent's part in a cluster, for the Reconciler."""

    def __init__(self, config: ClusterConfig, membership: Membership) -> None:
        self.config = config
        self.membership = membership
        self._joined = threading.Lock()

    @classmethod
    def from_host(cls, host: HostConfig, redactor: Redactor) -> ClusterMode | None:
        """None without `cluster:`. The membership gets a store connection of its own."""
        if host.cluster is None:
            return None
        store = open_run_store(host, redactor=redactor)
        return cls(host.cluster, Membership(host.cluster, store))

    @property
    def name(self) -> str:
        return self.config.agent

    def join(self) -> None:
        with self._joined:
            self.membership.join()

    def recover(self) -> list[str]:
        """Join, and end this agent's own runs a crash left `running` (never another's:
        they may be running right now)."""
        self.join()
        return self.membership.leases.end_runs_of(self.name, "the agent stopped during this pass")

    def tag_run(self, run_id: str) -> None:
        self.membership.leases.tag_run(run_id)

    def close(self) -> None:
        self.membership.close()

    def leased(self, name: str, work: Callable[[], UnitOutcome]) -> UnitOutcome:
        """Run `work` (an approved plan's apply) under the unit's lease; an AgentError when
        another agent holds it (it is reconciling the unit right now), or when this agent's
        settings differ from the agreed ones (it takes no lease)."""
        self.membership.live()  # (the agreement as of now)
        if refusal := self.membership.refusal():
            raise AgentError(
                f"unit {name}: {refusal}",
                hint="approve on an agent that agrees (`agent cluster` shows which), or give"
                " this one the same cluster settings",
            )
        got = self.membership.acquire(name)
        if isinstance(got, Refused):
            raise AgentError(
                f"unit {name}: agent {got.holder} is reconciling it (it holds the unit's lease)",
                hint="approve again once that agent's pass is done (`agent cluster` shows leases)",
            )
        try:
            # The answer to the take may have come back late (the store away, the commit
            # looked up after a reconnect): proven as before any apply, or nothing is run.
            if not self.membership.still_holds(name):
                raise LeaseLostError(
                    f"unit {name}: {LEASE_LOST}",
                    hint="another agent took the unit over; approve again once it is done",
                )
            return work()
        finally:
            self.membership.release(name)

    def for_pass(
        self,
        manifest: Manifest,
        revision: str,
        names: list[str],
        stop: threading.Event,
        warn: Callable[[str], None],
    ) -> tuple[ClusterPass, list[str]]:
        """The pass's cluster part, and which of `names` it handles."""
        cluster = ClusterPass(self.membership, manifest, revision, stop, warn)
        return cluster, cluster.select(names)

    def unit_work(
        self,
        cluster: ClusterPass,
        ctx: StackContext,
        name: str,
        stacks: StackReconciler,
        fleets: FleetReconciler,
        secrets: SecretResolver,
    ) -> Callable[[], UnitOutcome]:
        """What the pass's unit loop runs for `name`: wait for another agent's result, or
        reconcile it here under its lease."""
        if cluster.is_remote(name):
            return lambda: cluster.wait_for(name)
        unit = ctx.manifest.get_unit(name)
        assert unit is not None
        known = ctx.secrets
        if unit.secrets and name not in known.values and name not in known.errors:
            # A unit gained in the middle of the pass: its secrets were not read with the
            # pass's own (agent/units/secrets.py reads them before anything is planned).
            got = secrets.resolve([unit])
            known.values.update(got.values)
            known.errors.update(got.errors)
        reconciler = fleets if unit.kind == "fleet" else stacks
        local = (
            unit.kind == "stack"
            and stacks.workspaces.state_backend is None
            and keeps_agent_state(ctx.tree / unit.stack)
        )

        def fail(error: str) -> UnitOutcome:
            return finish_unit(
                ctx,
                name,
                UnitOutcome(status=UnitStatus.FAILED, error=error, preview=ctx.dry_run),
                store=stacks.store,
                report=stacks.report,
                redactor=stacks.redactor,
                describe=describe_outcome,
                started=None,
            )

        return lambda: cluster.run(
            name, lambda: reconciler.reconcile(ctx, name), fail=fail, local_state=local
        )
