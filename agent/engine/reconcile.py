"""The reconcile pass: an ordered list of named steps.

    fetch -> verify -> load manifest -> units (plan, decide, apply per unit)
          -> prune (units the repository removed, agent/units/prune.py) -> record

Each step reads and fills a `PassContext`; a step that cannot go on raises, and the
pass records why. The unit step walks the dependency graph: a unit starts when all
it depends on converged, independent units run in parallel (bounded by the host
config), and a failed or held unit blocks its dependents and no other unit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

from agent.config import HostConfig, Manifest, ManifestLimits
from agent.core.progress import Event, EventKind, Reporter, silent
from agent.core.redact import Redactor
from agent.engine.approval import Approvals
from agent.engine.clustermode import ClusterMode
from agent.engine.passes import (
    ApprovalRefused,
    PassContext,
    PassFailed,
    PassRequest,
    PassResult,
    Step,
)
from agent.engine.revision import RevisionGate
from agent.engine.scheduler import UnitScheduler
from agent.errors import AgentError, NotFoundError, SourceError
from agent.state.layout import StateLayout
from agent.state.passlock import PassLock, end_leftovers
from agent.state.runfiles import RunFiles
from agent.state.store import RunStatus, UnitStatus, open_run_store
from agent.units.fleets import FleetReconciler
from agent.units.lastdefinition import PruneRequest
from agent.units.prune import Pruner
from agent.units.secrets import SecretResolver
from agent.units.stacks import StackReconciler
from providers.errors import GitSourceError
from providers.git_source import GitSource
from providers.proctrack import ChildTracker

# The pass's types are part of this module's interface (callers import them from here).
__all__ = [
    "ApprovalRefused",
    "PassContext",
    "PassFailed",
    "PassRequest",
    "PassResult",
    "Reconciler",
]

log = logging.getLogger(__name__)


class Reconciler:
    """Runs reconcile passes for one host config. One pass at a time per state dir."""

    def __init__(self, host: HostConfig, *, reporter: Reporter = silent) -> None:
        self.host = host
        self.layout = StateLayout(host.state_dir)
        self.layout.prepare()
        # One redactor for everything this agent writes or shows (see agent.core.redact).
        self.redactor = Redactor()
        self.store = open_run_store(host, redactor=self.redactor)
        self.store.agent = host.cluster.agent if host.cluster else socket.gethostname()
        self.cluster = ClusterMode.from_host(host, self.redactor)  # None: one agent
        if self.cluster is not None:  # a unit's state is recorded under its lease only
            self.store.lease_token = self.cluster.membership.token_of
        self.report: Reporter = lambda event: reporter(
            replace(event, message=self.redactor.redact(event.message))
        )
        self.secrets = SecretResolver(host.secrets, self.redactor)
        self.source = GitSource(
            host.repo.url,
            host.repo.branch,
            self.layout.checkout,
            deploy_key=host.repo.deploy_key,
            known_hosts=host.repo.known_hosts,
            https_ca_bundle=host.repo.https_ca_bundle,
        )
        # Every Terraform process a pass starts is recorded, so the next pass can end
        # what a killed agent left running (see agent.state.passlock.end_leftovers).
        self.children = ChildTracker(self.layout.children)
        self._left_files_stored = False  # what killed passes left (see _recover)
        self.stacks = StackReconciler(
            host, self.layout, self.store, self.report, self.redactor, children=self.children
        )
        self.fleets = FleetReconciler(
            host, self.layout, self.store, self.report, self.redactor, self.stacks.inputs.outputs_of
        )
        self.pruner = Pruner(
            host,
            self.layout,
            self.store,
            self.source,
            self.secrets,
            self.stacks,
            self.fleets,
            self.report,
            self.redactor,
        )
        self._stop = threading.Event()
        self.scheduler = UnitScheduler(
            host, self.layout, self.store, self.stacks, self.fleets, self._stop
        )
        self.scheduler.cluster, self.scheduler.secrets = self.cluster, self.secrets
        self.approvals = Approvals(
            host, self.layout, self.store, self.stacks, self.fleets, self.pruner, self._stop
        )
        self.approvals.cluster = self.cluster
        self.revisions = RevisionGate(host, self.layout, self.store, self.source, self.report)
        self.steps: list[tuple[str, Step]] = [
            ("fetch", self.revisions.fetch),
            ("verify", self.revisions.verify),
            ("load-manifest", self.revisions.load_manifest),
            ("secrets", self._resolve_secrets),
            ("units", self._units),
            ("prune", self._prune),
        ]

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        self.store.close()

    def interrupt(self) -> None:
        """Stop taking new units; send the running Terraform processes one SIGINT each;
        fleets start no new host (a host already converging finishes its round trip)."""
        self._stop.set()
        self.stacks.interrupt()
        self.fleets.interrupt()

    def run_pass(self, request: PassRequest, *, wait: bool = True) -> PassResult:
        """Take the pass lock (waiting for it, or not), recover, and run one pass."""
        with self._exclusive(wait=wait) as lock:
            self._recover()
            run_id = self.store.start_run(
                trigger=request.trigger,
                dry_run=request.dry_run,
                unit_filter=request.unit,
                pid=os.getpid(),
            )
            lock.record(run_id)
            ctx = PassContext(request=request, run_id=run_id)
            if request.override_window:
                # Kept with the run (`agent history`): who lifted the change window, and why.
                ctx.warnings.append(f"change window override asked {request.override_window}")
                log.warning("run %s: change window override %s", run_id, request.override_window)
            try:
                return self._run_steps(ctx)
            except Exception as exc:
                self._close_failed(run_id, exc)
                raise

    def manifest_in_force(self, *, wait: bool = False) -> Manifest | None:
        """The manifest at the revision in force (None before the first pass took one).
        It checks the revision out, so it holds the pass lock (PassBusyError if a pass
        runs and not `wait`)."""
        with self._exclusive(wait=wait):
            current = self.store.current_revision()
            if current is None:
                return None
            return self.revisions.manifest_at(current, ManifestLimits.from_host(self.host))

    def converge_hosts(
        self, unit: str, hosts: frozenset[str], *, trigger: str = "hosts", wait: bool = True
    ) -> PassResult:
        """Converge only `hosts` of fleet `unit` (new instances), at the revision in force:
        no fetch, no other unit, no other host. Raises PassFailed when no revision is in
        force yet (a full pass comes first)."""
        request = PassRequest(trigger=trigger, unit=unit, hosts=hosts)
        with self._exclusive(wait=wait) as lock:
            self._recover()
            run_id = self.store.start_run(trigger=trigger, unit_filter=unit, pid=os.getpid())
            lock.record(run_id)
            ctx = PassContext(request=request, run_id=run_id)

            def in_force(ctx: PassContext) -> None:
                current = self.store.current_revision()
                if current is None:
                    raise PassFailed("no revision is in force yet: a full pass comes first")
                ctx.head = ctx.target = current
                limits = ManifestLimits.from_host(self.host)
                ctx.manifest = self.revisions.manifest_at(current, limits)

            steps: list[tuple[str, Step]] = [
                ("load-manifest", in_force),
                ("secrets", self._resolve_secrets),
                ("units", self._units),
            ]
            try:
                return self._run_steps(ctx, steps)
            except Exception as exc:
                self._close_failed(run_id, exc)
                raise

    @contextlib.contextmanager
    def _exclusive(self, *, wait: bool) -> Iterator[PassLock]:
        """One pass at a time: the state directory's lock, and with a shared (PostgreSQL)
        store, the store's too, so that two agents on one store never run at once."""
        lock = PassLock(self.layout.root)
        lock.acquire(wait=wait)
        # In a cluster the agents run at once: unit leases keep them apart instead.
        alone = self.cluster is None
        with lock, self.store.exclusive(wait=wait) if alone else contextlib.nullcontext():
            yield lock

    def _recover(self) -> None:
        """End what a dead pass left running, then mark its runs interrupted (the caller
        holds the pass lock)."""
        for note in end_leftovers(self.children, self.layout.root / "units"):
            log.warning("%s", note)
            self.report(Event(EventKind.RECOVERED, message=note))
        ended = self.cluster.recover() if self.cluster else self.store.recover_interrupted()
        for run_id in ended:
            self.stacks.finish_cut_logs(run_id)
            self.report(Event(EventKind.RECOVERED, message=f"run {run_id} was interrupted"))
        # What killed passes left on this disk, into a shared store (whoever marked them):
        # a dead process's passes, so looked for at this process's first pass, and after one
        # of its own ends here.
        if ended or not self._left_files_stored:
            files = RunFiles(self.store, self.layout)
            for run_id, units in files.interrupted_here().items():
                self.stacks.finish_cut_logs(run_id)
                files.save_interrupted(run_id, units)
            self._left_files_stored = True

    def _close_failed(self, run_id: str, exc: Exception) -> None:
        """A pass raised something other than an AgentError (the store locked or the disk
        full): record the run failed if the store lets us now, so that it does not stay
        `running`; if it does not, the next pass marks it interrupted."""
        try:
            self.store.finish_run(run_id, RunStatus.FAILED, f"the pass failed: {exc}")
        except Exception:
            log.warning("run %s could not be marked failed; the next pass marks it", run_id)

    def fetch_head(self) -> str:
        """Fetch the branch and return its head: the daemon's poll, which runs a pass only
        if something moved. Takes the pass lock without waiting (PassBusyError while a pass
        runs elsewhere); SourceError if the fetch fails."""
        with self._exclusive(wait=False):
            try:
                return self.source.fetch()
            except GitSourceError as exc:
                raise SourceError(str(exc)) from exc

    def approve(
        self, run_id: str, unit: str | None = None, *, by: str | None = None, wait: bool = True
    ) -> PassResult:
        """Apply exactly the plans that run `run_id` held (all of them, or `unit`'s), as a new
        run with trigger `approve`. Nothing is planned again.

        Raises NotFoundError (no such run, or unit not in it) and ApprovalRefused (nothing
        held, plan already applied or replaced, unit suspended, or the revision in force
        moved since: the plan is stale). A state that moved under the plan is found by
        Terraform itself; that unit then fails with "the plan is stale".
        """
        with self._exclusive(wait=wait) as lock:
            self._recover()
            revision, held = self.approvals.held_plans(run_id, unit)
            approve_id = self.store.start_run(trigger="approve", unit_filter=unit, pid=os.getpid())
            lock.record(approve_id)
            self.store.approvals.record(approve_id, run_id, list(held), by=by)
            ctx = PassContext(request=PassRequest(trigger="approve", unit=unit), run_id=approve_id)

            def load(ctx: PassContext) -> None:
                ctx.head = ctx.target = revision
                if not self.source.has_commit(revision):
                    # Held on another agent of a shared store (which verified it): fetch it.
                    self._fetch_for_approval(revision)
                ctx.manifest = self.revisions.manifest_at(
                    revision, ManifestLimits.from_host(self.host)
                )

            def apply(ctx: PassContext) -> None:
                self.approvals.apply(ctx, run_id, revision, held)

            try:
                return self._run_steps(ctx, [("load-manifest", load), ("apply", apply)])
            except Exception as exc:
                self._close_failed(approve_id, exc)
                raise

    def _fetch_for_approval(self, revision: str) -> None:
        try:
            self.source.fetch()
        except GitSourceError as exc:
            raise SourceError(f"cannot fetch {revision[:12]} to apply its plan: {exc}") from exc

    def _run_steps(
        self, ctx: PassContext, steps: list[tuple[str, Step]] | None = None
    ) -> PassResult:
        started = time.monotonic()
        self.report(Event(EventKind.PASS_STARTED, run_id=ctx.run_id))
        error: str | None = None
        try:
            for name, step in steps or self.steps:
                if self._stop.is_set():
                    raise PassFailed(f"interrupted before the {name} step")
                log.debug("run %s: step %s", ctx.run_id, name)
                step(ctx)
        except NotFoundError:
            # A unit named on the command line that the manifest lacks: nothing was
            # reconciled, so no run is kept (exit 5, as `agent logs NAME` does).
            self.store.discard_run(ctx.run_id)
            raise
        except AgentError as exc:
            error = self.redactor.redact(exc.message)
        status = self._pass_status(ctx, error)
        messages = [m for m in (error, ctx.fetch_error, ctx.rejected, *ctx.warnings) if m]
        stored_error = self.redactor.redact("\n".join(messages)) or None
        self.store.set_run_revision(ctx.run_id, ctx.target, ctx.head)
        self.store.finish_run(ctx.run_id, status, stored_error)
        result = PassResult(
            run_id=ctx.run_id,
            status=status,
            revision=ctx.target,
            head=ctx.head,
            outcomes=dict(ctx.outcomes),
            error=stored_error,
            warnings=tuple(ctx.warnings),
            suspended=tuple(ctx.suspended),
        )
        self.report(
            Event(
                EventKind.PASS_FINISHED,
                run_id=ctx.run_id,
                message=status,
                seconds=time.monotonic() - started,
                result=result,
            )
        )
        return result

    def _pass_status(self, ctx: PassContext, error: str | None) -> RunStatus:
        if self._stop.is_set():
            return RunStatus.INTERRUPTED
        failed = any(o.status is UnitStatus.FAILED for o in ctx.outcomes.values())
        if error or failed or ctx.rejected or ctx.fetch_error:
            return RunStatus.FAILED
        return RunStatus.SUCCEEDED

    # --- steps ------------------------------------------------------------------

    def _selected(self, ctx: PassContext) -> list[str]:
        """The units this pass reconciles, in dependency order (chosen once per pass)."""
        assert ctx.manifest is not None and ctx.target is not None
        if ctx.selected is not None:
            return ctx.selected
        names = list(ctx.manifest.order())
        if ctx.request.unit is not None and ctx.manifest.get_unit(ctx.request.unit) is None:
            raise NotFoundError(
                f"no unit named {ctx.request.unit!r} in {ctx.manifest.path.name}"
                f" at {ctx.target[:12]}",
                hint=f"its units: {', '.join(names)}",
            )
        wanted = names if ctx.request.unit is None else [ctx.request.unit]
        suspended = set(self.store.suspensions.by_unit())
        left_out = [n for n in wanted if n in suspended or n in ctx.request.skip]
        ctx.suspended = [n for n in wanted if n in suspended]
        if left_out:
            log.info("run %s: left out: %s", ctx.run_id, ", ".join(left_out))
        ctx.selected = [n for n in wanted if n not in left_out]
        if self.cluster is not None:
            ctx.cluster, ctx.selected = self.cluster.for_pass(
                ctx.manifest, ctx.target, ctx.selected, self._stop, ctx.warnings.append
            )
        return ctx.selected

    def _resolve_secrets(self, ctx: PassContext) -> None:
        """Fetch every secret the selected units need, before anything is planned."""
        assert ctx.manifest is not None
        units = [ctx.manifest.get_unit(name) for name in self._selected(ctx)]
        ctx.secrets = self.secrets.resolve(u for u in units if u is not None)
        for unit in units:
            if unit is None or unit.name not in ctx.secrets.errors:
                continue
            read = ctx.secrets.values.get(unit.name, {})
            for scheme in sorted({ref.scheme for n, ref in unit.secrets.items() if n not in read}):
                self.report(
                    Event(
                        EventKind.SECRET_FAILED, run_id=ctx.run_id, unit=unit.name, message=scheme
                    )
                )

    def _units(self, ctx: PassContext) -> None:
        """Reconcile the selected units in dependency order (agent/engine/scheduler.py)."""
        self.scheduler.run(ctx, self._selected(ctx))

    def _prune(self, ctx: PassContext) -> None:
        """Prune, hold or orphan the units the repository removed (a full pass only: a pass
        of one unit leaves them as they are; a dry run previews them)."""
        assert ctx.manifest is not None and ctx.target is not None
        if ctx.request.unit is not None or self._stop.is_set():
            return
        if ctx.cluster is not None and not ctx.cluster.owns_prune():
            return  # one agent of a cluster prunes
        request = PruneRequest(
            ctx.run_id,
            ctx.target,
            ctx.manifest,
            override_window=ctx.request.override_window,
            dry_run=ctx.request.dry_run,
        )
        ctx.outcomes.update(self.pruner.run(request, self._stop.is_set))
