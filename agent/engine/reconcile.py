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
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.config import DriftPolicy, HostConfig, Manifest, ManifestCache, ManifestLimits
from agent.core.progress import Event, EventKind, Reporter, silent
from agent.core.redact import Redactor
from agent.errors import (
    AgentError,
    ConfigError,
    NotFoundError,
    SourceError,
    VerificationError,
)
from agent.policy.windows import WINDOW_CLOSED
from agent.state.layout import StateLayout
from agent.state.passlock import PassLock, end_leftovers
from agent.state.store import RevisionStatus, RunStatus, UnitOutcome, UnitStatus, open_run_store
from agent.units.context import StackContext
from agent.units.fleets import HELD_FILE, FleetReconciler
from agent.units.prune import Pruner, PruneRequest
from agent.units.secrets import ResolvedSecrets, SecretResolver
from agent.units.stacks import PLAN_FILE, StackReconciler
from providers.errors import GitSourceError, SignatureError
from providers.git_source import GitSource
from providers.git_verify import verify_revision
from providers.proctrack import ChildTracker

log = logging.getLogger(__name__)

# Unit statuses after which a dependent may start.
_CONVERGED = {UnitStatus.OK}


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


class Reconciler:
    """Runs reconcile passes for one host config. One pass at a time per state dir."""

    def __init__(self, host: HostConfig, *, reporter: Reporter = silent) -> None:
        self.host = host
        self.layout = StateLayout(host.state_dir)
        self.layout.prepare()
        # One redactor for everything this agent writes or shows (see agent.core.redact).
        self.redactor = Redactor()
        self.store = open_run_store(host, redactor=self.redactor)
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
        self.stacks = StackReconciler(
            host, self.layout, self.store, self.report, self.redactor, children=self.children
        )
        self.fleets = FleetReconciler(
            host, self.layout, self.store, self.report, self.redactor, self.stacks.outputs_of
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
        # A revision is validated once: later passes at it reuse the manifest.
        self._manifests = ManifestCache()
        self._stop = threading.Event()
        self.steps: list[tuple[str, Step]] = [
            ("fetch", self._fetch),
            ("verify", self._verify),
            ("load-manifest", self._load_manifest),
            ("secrets", self._resolve_secrets),
            ("units", self._units),
            ("prune", self._prune),
        ]

    def close(self) -> None:
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
            return self._manifest_at(current, ManifestLimits.from_host(self.host))

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
                ctx.manifest = self._manifest_at(current, limits)

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
        with lock, self.store.exclusive(wait=wait):
            yield lock

    def _recover(self) -> None:
        """End what a dead pass left running, then mark its runs interrupted (the caller
        holds the pass lock)."""
        for note in end_leftovers(self.children, self.layout.root / "units"):
            log.warning("%s", note)
            self.report(Event(EventKind.RECOVERED, message=note))
        for run_id in self.store.recover_interrupted():
            self.stacks.finish_cut_logs(run_id)
            self.report(Event(EventKind.RECOVERED, message=f"run {run_id} was interrupted"))

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
            revision, held = self._held_plans(run_id, unit)
            approve_id = self.store.start_run(trigger="approve", unit_filter=unit, pid=os.getpid())
            lock.record(approve_id)
            self.store.record_approval(approve_id, run_id, list(held), by=by)
            ctx = PassContext(request=PassRequest(trigger="approve", unit=unit), run_id=approve_id)

            def load(ctx: PassContext) -> None:
                ctx.head = ctx.target = revision
                ctx.manifest = self._manifest_at(revision, ManifestLimits.from_host(self.host))

            def apply(ctx: PassContext) -> None:
                assert ctx.manifest is not None
                stack_ctx = StackContext(
                    approve_id, revision, self.layout.checkout, ctx.manifest, False
                )
                removed = [n for n in held if ctx.manifest.get_unit(n) is None]
                if removed:
                    request = PruneRequest(approve_id, revision, ctx.manifest)
                    for name in removed:
                        if not self._stop.is_set():
                            ctx.outcomes[name] = self.pruner.apply_held(
                                request, name, run_id, held[name]
                            )
                for name in [n for n in ctx.manifest.order() if n in held]:
                    if self._stop.is_set():
                        break
                    unit_kind = ctx.manifest.get_unit(name)
                    # A fleet holds the removals it showed; a stack, its Terraform plan.
                    apply_saved = (
                        self.fleets.apply_saved
                        if unit_kind is not None and unit_kind.fleet is not None
                        else self.stacks.apply_saved
                    )
                    ctx.outcomes[name] = apply_saved(stack_ctx, name, run_id, held[name])

            try:
                return self._run_steps(ctx, [("load-manifest", load), ("apply", apply)])
            except Exception as exc:
                self._close_failed(approve_id, exc)
                raise

    def _held_plans(self, run_id: str, unit: str | None) -> tuple[str, dict[str, Path]]:
        """The revision of run `run_id` and the plan files of its held units (or `unit`'s)."""
        run = self.store.get_run(run_id)
        if run is None:
            raise NotFoundError(f"no run with id {run_id!r}", hint="see `agent history`")
        rows = {row.unit: row for row in self.store.unit_runs(run_id)}
        if unit is not None and unit not in rows:
            raise NotFoundError(
                f"unit {unit!r} did not take part in run {run_id}",
                hint=f"its units: {', '.join(rows) or 'none'}",
            )
        names = [unit] if unit else [n for n, r in rows.items() if r.status == UnitStatus.HELD]
        if not names:
            results = ", ".join(f"{n}: {r.status}" for n, r in rows.items()) or "no units"
            raise ApprovalRefused(f"run {run_id} held no plan for approval ({results})")
        for name in names:
            if rows[name].status != UnitStatus.HELD:
                raise ApprovalRefused(
                    f"unit {name} was not held for approval in run {run_id}"
                    f" (its result: {rows[name].status})"
                )
        suspended = [n for n in names if n in self.store.suspended()]
        if suspended:
            name = suspended[0]
            raise ApprovalRefused(
                f"unit {name} is suspended", hint=f"`agent resume {name}`, then approve again"
            )
        current = self.store.current_revision()
        if run.revision is None or run.revision != current:
            raise ApprovalRefused(
                f"the plan is stale: the revision in force moved since run {run_id}"
                f" (it planned {(run.revision or 'nothing')[:12]}, {(current or 'none')[:12]} is"
                " in force now); run `agent reconcile --now` to plan again"
            )
        plans = {n: _held_file(self.layout.unit_run_dir(run_id, n)) for n in names}
        for name, plan in plans.items():
            if not plan.exists() and (rows[name].error or "").startswith(WINDOW_CLOSED):
                # A fleet waiting for its change window saved nothing to approve.
                raise ApprovalRefused(
                    f"unit {name} waits for its change window in run {run_id}"
                    f" ({rows[name].error}): there is no saved plan to approve; it applies in"
                    " the first pass after the window opens",
                    hint="to apply now: agent reconcile --now --override-window --reason TEXT",
                )
            if not plan.exists():
                raise ApprovalRefused(self._why_no_plan(run_id, name))
        return run.revision, plans

    def _why_no_plan(self, run_id: str, unit: str) -> str:
        for approval in self.store.approvals(run_id):
            if approval.unit == unit:
                by = f" by {approval.by}" if approval.by else ""
                return (
                    f"the plan of {unit} in run {run_id} was already approved{by}"
                    f" (run {approval.run_id})"
                )
        state = self.store.unit_state(unit)
        later = state.last_run_id if state and state.last_run_id != run_id else None
        if later:
            return (
                f"the plan of {unit} in run {run_id} was replaced: run {later} planned it again"
                f" ({state.last_status}); approve that run if it holds a plan"
            )
        return f"the saved plan of {unit} in run {run_id} is gone; run `agent reconcile --now`"

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

    def _fetch(self, ctx: PassContext) -> None:
        """Fetch the branch and pin its head for the whole pass."""
        try:
            ctx.head = self.source.fetch()
        except GitSourceError as exc:
            current = self.store.current_revision()
            if current is None or not self.source.has_commit(current):
                raise SourceError(
                    str(exc),
                    hint="check the repo URL, the deploy key and known_hosts in the host config",
                ) from exc
            # Drift is still checked against the revision in force while Git is away.
            ctx.fetch_error = f"fetch failed, reconciled {current[:12]} again: {exc}"
            ctx.head = current
        self.report(Event(EventKind.FETCHED, run_id=ctx.run_id, message=ctx.head))

    def _verify(self, ctx: PassContext) -> None:
        """Refuse a head that is not signed by an allowed key (when the host config asks
        for signatures) or that does not fast-forward from the revision in force."""
        assert ctx.head is not None
        current = self.store.current_revision()
        ctx.target = ctx.head
        if not self._signed(ctx, ctx.head, current):
            return
        if current is None or current == ctx.head:
            return
        if not self.source.has_commit(current):
            # Only a fresh clone lacks it (the state dir's checkout was removed, and the
            # remote dropped the commit): nothing to compare with, so say so and go on.
            ctx.warnings.append(
                f"cannot check that {ctx.head[:12]} fast-forwards {current[:12]}:"
                " that revision is no longer in the repository"
            )
            return
        if self.source.is_ancestor(current, ctx.head):
            return
        if self.host.repo.allow_history_rewrite:
            ctx.warnings.append(
                f"history rewritten: {ctx.head[:12]} does not descend from {current[:12]};"
                " accepted because the host config allows history rewrites"
            )
            return
        error = VerificationError(
            f"revision {ctx.head[:12]} is not a fast-forward of {current[:12]}, the revision"
            f" in force: the history of {self.host.repo.branch} was rewritten",
            hint="push a commit on top of the revision in force, or set"
            " repo.allow_history_rewrite: true in the host config",
        )
        self._reject(ctx, ctx.head, error.message)
        ctx.target = current

    def _signed(self, ctx: PassContext, revision: str, current: str | None) -> bool:
        """Check `revision`'s signature before anything reads it. False: it was rejected and
        the revision in force (`current`) stays the target."""
        policy = self.host.repo.signing
        if policy is None:
            return True
        try:
            verified = verify_revision(self.layout.checkout, revision, policy)
        except SignatureError as exc:
            if exc.kind == "config":
                raise VerificationError(
                    str(exc), hint="fix repo.signing in the host config"
                ) from exc
            if current is None or current == revision:
                self._reject(ctx, revision, str(exc))
                raise PassFailed(
                    f"revision {revision[:12]} is not signed by an allowed key and no earlier"
                    f" revision was accepted: {exc}"
                ) from exc
            self._reject(ctx, revision, str(exc))
            ctx.target = current
            return False
        except GitSourceError as exc:
            raise SourceError(f"cannot verify {revision[:12]}: {exc}") from exc
        log.info("revision %s signed by %s (%s)", revision[:12], verified.signer, verified.kind)
        return True

    def _load_manifest(self, ctx: PassContext) -> None:
        """Check out the target and validate its manifest; fall back to the last good one."""
        assert ctx.target is not None
        limits = ManifestLimits.from_host(self.host)
        current = self.store.current_revision()
        try:
            ctx.manifest = self._manifest_at(ctx.target, limits)
        except ConfigError as exc:
            self._reject(ctx, ctx.target, exc.message)
            if current is None or current == ctx.target:
                raise PassFailed(
                    f"revision {ctx.target[:12]} is invalid and no earlier revision was accepted:"
                    f"\n{exc.message}"
                ) from exc
            ctx.target = current
            ctx.manifest = self._manifest_at(current, limits)
            self.report(Event(EventKind.MANIFEST_LOADED, run_id=ctx.run_id, result=ctx.manifest))
            return
        # Only a real pass takes a revision into force: a dry run previews it.
        if ctx.target != current and not ctx.request.dry_run:
            self.store.record_revision(ctx.target, RevisionStatus.ACCEPTED, run_id=ctx.run_id)
        self.report(Event(EventKind.MANIFEST_LOADED, run_id=ctx.run_id, result=ctx.manifest))

    def _manifest_at(self, revision: str, limits: ManifestLimits) -> Manifest:
        try:
            tree = self.source.checkout(revision)
        except GitSourceError as exc:
            raise SourceError(f"cannot check out {revision[:12]}: {exc}") from exc
        return self._manifests.load(tree, limits, revision)

    def _reject(self, ctx: PassContext, revision: str, reason: str) -> None:
        ctx.rejected = f"revision {revision[:12]} rejected: {reason}"
        self.store.record_revision(revision, RevisionStatus.REJECTED, reason, run_id=ctx.run_id)
        self.report(Event(EventKind.REJECTED, run_id=ctx.run_id, message=ctx.rejected))

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
        suspended = set(self.store.suspended())
        left_out = [n for n in wanted if n in suspended or n in ctx.request.skip]
        ctx.suspended = [n for n in wanted if n in suspended]
        if left_out:
            log.info("run %s: left out: %s", ctx.run_id, ", ".join(left_out))
        ctx.selected = [n for n in wanted if n not in left_out]
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
        """Reconcile the units in dependency order, independent ones in parallel."""
        assert ctx.manifest is not None and ctx.target is not None
        manifest = ctx.manifest
        names = self._selected(ctx)
        stack_ctx = StackContext(
            run_id=ctx.run_id,
            revision=ctx.target,
            tree=self.layout.checkout,
            manifest=manifest,
            dry_run=ctx.request.dry_run,
            secrets=ctx.secrets,
            override_window=ctx.request.override_window,
            outcomes=ctx.outcomes,
            hosts_only=ctx.request.hosts,
            changed_only=ctx.request.changed_only,
            drift_intervals=self._drift_intervals(manifest),
        )
        selected = set(names)
        pending = set(names)
        running: dict[Future[UnitOutcome], str] = {}
        with ThreadPoolExecutor(
            max_workers=self.host.terraform.parallelism, thread_name_prefix="unit"
        ) as pool:
            while pending or running:
                self._block_dependents(stack_ctx, pending, ctx.outcomes, selected)
                if self._stop.is_set():
                    pending.clear()
                for name in [n for n in names if n in pending]:
                    deps = manifest.get_unit(name).depends_on
                    if all(d not in selected or d in ctx.outcomes for d in deps):
                        pending.discard(name)
                        kind = manifest.get_unit(name).kind
                        reconciler = self.fleets if kind == "fleet" else self.stacks
                        running[pool.submit(reconciler.reconcile, stack_ctx, name)] = name
                if not running:
                    continue
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    ctx.outcomes[running.pop(future)] = future.result()

    def _drift_intervals(self, manifest: Manifest) -> dict[str, float | None]:
        """Each unit's drift interval (its own, else the host's); None for `drift: ignore`."""
        own = self.host.intervals.units
        return {
            unit.name: None
            if unit.drift is DriftPolicy.IGNORE
            else (own[unit.name].drift if unit.name in own else self.host.intervals.drift)
            for unit in manifest.units
        }

    def _prune(self, ctx: PassContext) -> None:
        """Prune, hold or orphan the units the repository removed (a full, real pass only:
        a dry run or a pass of one unit leaves them as they are)."""
        assert ctx.manifest is not None and ctx.target is not None
        if ctx.request.dry_run or ctx.request.unit is not None or self._stop.is_set():
            return
        request = PruneRequest(
            ctx.run_id, ctx.target, ctx.manifest, override_window=ctx.request.override_window
        )
        ctx.outcomes.update(self.pruner.run(request, self._stop.is_set))

    def _block_dependents(
        self,
        stack_ctx: StackContext,
        pending: set[str],
        outcomes: dict[str, UnitOutcome],
        selected: set[str],
    ) -> None:
        """Block pending units whose dependency finished without converging (transitively).
        A dependency this pass leaves out (`--unit`, backoff) counts by its last real
        result: held or failed, it blocks its dependents here as in a full pass."""
        manifest = stack_ctx.manifest
        changed = True
        while changed:
            changed = False
            for name in sorted(pending):
                failed: list[tuple[str, UnitOutcome]] = []
                for d in manifest.get_unit(name).depends_on:
                    if d in selected and d in outcomes and outcomes[d].status not in _CONVERGED:
                        failed.append((d, outcomes[d]))
                    elif d not in selected and (last := self._last_real(d)) is not None:
                        failed.append((d, last))
                if failed:
                    pending.discard(name)
                    outcomes[name] = self.stacks.block(stack_ctx, name, *failed[0])
                    changed = True

    def _last_real(self, unit: str) -> UnitOutcome | None:
        """The last real result of a unit left out of this pass, if it did not converge."""
        state = self.store.unit_state(unit)
        blocking = (UnitStatus.HELD, UnitStatus.FAILED, UnitStatus.BLOCKED)
        if state is None or state.last_status not in blocking:
            return None
        return UnitOutcome(status=UnitStatus(state.last_status))


def _held_file(unit_run_dir: Path) -> Path:
    """What a held unit saved for approval: a fleet's removals (its run dir has the hosts'
    report), or a stack's Terraform plan."""
    if (unit_run_dir / "hosts.txt").exists():
        return unit_run_dir / HELD_FILE
    return unit_run_dir / PLAN_FILE
