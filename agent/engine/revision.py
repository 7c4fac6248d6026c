"""Which revision a pass reconciles: fetch the branch, check the head's signature and
that it fast-forwards the revision in force, check it out and validate its manifest, and
fall back to the revision in force when the head is refused (recorded for all to see)."""

from __future__ import annotations

import logging

from agent.config import HostConfig, Manifest, ManifestCache, ManifestLimits
from agent.core.progress import Event, EventKind, Reporter
from agent.engine.passes import PassContext, PassFailed
from agent.errors import ConfigError, SourceError, VerificationError
from agent.state.layout import StateLayout
from agent.state.store import RevisionStatus, RunStore
from providers.errors import GitSourceError, SignatureError
from providers.git_source import GitSource
from providers.git_verify import verify_revision

log = logging.getLogger(__name__)


class RevisionGate:
    """The fetch, verify and load-manifest steps of a pass."""

    def __init__(
        self,
        host: HostConfig,
        layout: StateLayout,
        store: RunStore,
        source: GitSource,
        report: Reporter,
    ) -> None:
        self.host = host
        self.layout = layout
        self.store = store
        self.source = source
        self.report = report
        # A revision is validated once: later passes at it reuse the manifest.
        self.manifests = ManifestCache()

    def fetch(self, ctx: PassContext) -> None:
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

    def verify(self, ctx: PassContext) -> None:
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
            # Only a fresh clone lacks it (the state dir's checkout was removed, or a new
            # agent joined a shared store, and the remote dropped the commit). An agent
            # that could compare already refused this head: its rejection stands for all.
            recorded = self.store.revision_status(ctx.head)
            rejected = recorded is not None and recorded[0] is RevisionStatus.REJECTED
            if rejected and not self.host.repo.allow_history_rewrite:
                assert recorded is not None
                raise PassFailed(
                    f"revision {ctx.head[:12]} was rejected ({recorded[1]}), and the revision"
                    f" in force {current[:12]} is not in this agent's clone (the remote no"
                    f" longer has it): nothing to reconcile until {self.host.repo.branch} holds"
                    f" {current[:12]} again (push it back), or the host config allows history"
                    " rewrites (repo.allow_history_rewrite)"
                )
            # Nothing to compare with: say so and go on.
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
        self.reject(ctx, ctx.head, error.message)
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
                self.reject(ctx, revision, str(exc))
                raise PassFailed(
                    f"revision {revision[:12]} is not signed by an allowed key and no earlier"
                    f" revision was accepted: {exc}"
                ) from exc
            self.reject(ctx, revision, str(exc))
            ctx.target = current
            return False
        except GitSourceError as exc:
            raise SourceError(f"cannot verify {revision[:12]}: {exc}") from exc
        log.info("revision %s signed by %s (%s)", revision[:12], verified.signer, verified.kind)
        return True

    def load_manifest(self, ctx: PassContext) -> None:
        """Check out the target and validate its manifest; fall back to the last good one."""
        assert ctx.target is not None
        limits = ManifestLimits.from_host(self.host)
        current = self.store.current_revision()
        try:
            ctx.manifest = self.manifest_at(ctx.target, limits)
        except ConfigError as exc:
            self.reject(ctx, ctx.target, exc.message)
            if current is None or current == ctx.target:
                raise PassFailed(
                    f"revision {ctx.target[:12]} is invalid and no earlier revision was accepted:"
                    f"\n{exc.message}"
                ) from exc
            ctx.target = current
            ctx.manifest = self.manifest_at(current, limits)
            self.report(Event(EventKind.MANIFEST_LOADED, run_id=ctx.run_id, result=ctx.manifest))
            return
        # Only a real pass takes a revision into force: a dry run previews it.
        if ctx.target != current and not ctx.request.dry_run:
            self.store.record_revision(ctx.target, RevisionStatus.ACCEPTED, run_id=ctx.run_id)
        self.report(Event(EventKind.MANIFEST_LOADED, run_id=ctx.run_id, result=ctx.manifest))

    def manifest_at(self, revision: str, limits: ManifestLimits) -> Manifest:
        try:
            tree = self.source.checkout(revision)
        except GitSourceError as exc:
            raise SourceError(f"cannot check out {revision[:12]}: {exc}") from exc
        return self.manifests.load(tree, limits, revision)

    def reject(self, ctx: PassContext, revision: str, reason: str) -> None:
        ctx.rejected = f"revision {revision[:12]} rejected: {reason}"
        self.store.record_revision(revision, RevisionStatus.REJECTED, reason, run_id=ctx.run_id)
        self.report(Event(EventKind.REJECTED, run_id=ctx.run_id, message=ctx.rejected))
