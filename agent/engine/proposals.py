"""Plans of proposed changes: the refs the host config names as proposals, planned at their
heads against the real current state, never applied (docs/proposals.md).

    poll: fetch (own clone) -> list proposal refs -> fetch their heads -> close the gone
      each new head (or a head whose base moved):
        allowed? author, then signature (repo.signing) -- before anything of it is read
        -> base manifest and head manifest (head invalid: `invalid`, nothing planned)
        -> affected units: files changed since the revision in force, entries changed in
           gitops.yaml, and their dependents
        -> each affected stack unit, in order: ProposalUnitPlanner (agent.units.proposal_unit)
           each affected fleet unit: ProposalFleetPlanner (agent.units.proposal_fleet), one
           read-only round trip per host of the revision in force's fleet
        -> record (agent.state.proposals); `on_planned` (forge status and comment)

A poll takes the lock of the proposals' work area (`proposals/pass.lock`), never the main
pass lock: a main pass is never delayed by a proposal, and two polls never run at once.
The work area (`proposals/`: a clone of its own, TF_DATA_DIRs, state copies, logs) is apart
from the main checkout, which is never read or moved by a proposal.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import providers
from agent.config import HostConfig, Manifest, ManifestCache, ManifestLimits
from agent.config.proposals import ProposalsConfig
from agent.core.fsutil import ensure_private_dir
from agent.core.redact import Redactor
from agent.errors import AgentError, ConfigError, PassBusyError, SourceError
from agent.state.hostrecords import host_records
from agent.state.layout import StateLayout
from agent.state.passlock import PassLock
from agent.state.proposals import (
    SETTLED,
    ProposalRecords,
    ProposalRow,
    ProposalStatus,
    ProposalUnitStatus,
)
from agent.state.runfiles import RunFiles
from agent.state.store import RunStore, new_run_id
from agent.units.fingerprint import stack_paths, unit_entry
from agent.units.proposal_fleet import ProposalFleetPlanner
from agent.units.proposal_unit import ProposalUnitPlanner, UnitPlan, proposal_environment
from agent.units.remote_state_pull import RemoteStatePuller
from agent.units.secrets import SecretResolver
from agent.units.stackwork import StackWorkspaces
from providers.errors import GitSourceError, SignatureError
from providers.git_source import GitSource
from providers.git_verify import verify_revision
from providers.sandbox import Sandbox, SandboxError
from providers.terraform import TerraformRunner, UnitWorkspace

log = logging.getLogger(__name__)

MANIFEST = "gitops.yaml"
_EMAIL = re.compile(r"<([^<>]*)>\s*$")

# Called after each proposal plan, with its row (the forge: agent.service.proposal_forge).
PlannedHook = Callable[[ProposalRow], None]
# Called when the plan of an allowed head begins: (ref, head).
StartedHook = Callable[[str, str], None]


@dataclass
class PollResult:
    """What one poll did: proposals planned, closed, left for later."""

    planned: list[ProposalRow] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    over_limit: list[str] = field(default_factory=list)  # more open refs than max_open


def _under_systemd_hint() -> str:
    """Where a service's sandbox is what stops bwrap, what fixes it."""
    if not os.environ.get("INVOCATION_ID"):  # set by systemd for the processes of a unit
        return ""
    return (
        "; under systemd, `agent service install` writes the drop-in that lets bubblewrap"
        " start (gitops-agent.service.d/proposals-sandbox.conf, docs/systemd.md), then"
        " `systemctl restart gitops-agent`"
    )


class ProposalPlanner:
    """Finds and plans proposals for one host config (`proposals:` must be set)."""

    def __init__(
        self,
        host: HostConfig,
        *,
        store: RunStore | None = None,
        redactor: Redactor | None = None,
        on_planned: PlannedHook | None = None,
        on_started: StartedHook | None = None,
    ) -> None:
        if host.proposals is None:
            raise ConfigError(
                f"{host.path}: proposals: is not set, so no proposal is planned",
                hint="see docs/proposals.md",
            )
        self.host = host
        self.config: ProposalsConfig = host.proposals
        self.layout = StateLayout(host.state_dir)
        self.layout.prepare()
        self.root = ensure_private_dir(self.layout.root / "proposals")
        self.redactor = redactor or Redactor()
        self._own_store = store is None
        self.store = store or RunStore(host.state_dir, scrub=self.redactor.redact)
        self.records = ProposalRecords(self.store)
        self.on_planned = on_planned
        self.on_started = on_started
        self.secrets = SecretResolver(host.secrets, self.redactor)
        self.source = GitSource(
            host.repo.url,
            host.repo.branch,
            self.root / "checkout",
            deploy_key=host.repo.deploy_key,
            known_hosts=host.repo.known_hosts,
            https_ca_bundle=host.repo.https_ca_bundle,
        )
        self._manifests = ManifestCache()
        self._runner: TerraformRunner | None = None
        self._runner_lock = threading.Lock()
        self._stop = threading.Event()
        self._main_runner: TerraformRunner | None = None
        self._sandbox_reported = False
        backend = host.terraform.state_backend
        self.units = ProposalUnitPlanner(
            self.runner,
            self.root,
            self.layout.unit_state_file,
            self.redactor,
            timeout=self.config.timeout,
            # The agent's own Terraform and environment, outside the sandbox: it pulls
            # the states the proposals' Terraform plans against without the credentials.
            remote_state=RemoteStatePuller(
                self.main_runner, backend.open(self.redactor.register), self.root
            )
            if backend is not None
            else None,
        )
        self.fleets = ProposalFleetPlanner(
            host,
            self.layout,
            self.redactor,
            self.units.current_outputs,
            timeout=self.config.timeout,
            records=host_records(self.store, self.layout),
        )

    def interrupt(self) -> None:
        """Start no new unit; the running Terraform processes get one SIGINT each."""
        self._stop.set()
        self.fleets.interrupt()
        for runner in (self._runner, self._main_runner):
            if runner is not None:
                runner.interrupt()

    def close(self) -> None:
        if self._own_store:
            self.store.close()

    def runner(self) -> TerraformRunner:
        """The main passes' Terraform and CLI config, with the proposals' own environment."""
        with self._runner_lock:
            return self._make_runner()

    def main_runner(self) -> TerraformRunner:
        """The main passes' Terraform, environment and credentials: never for proposal code."""
        with self._runner_lock:
            return self._trusted_runner()

    def _trusted_runner(self) -> TerraformRunner:
        if self._main_runner is None:
            self._main_runner = StackWorkspaces(self.host, self.layout, self.redactor).runner()
        return self._main_runner

    def _make_runner(self) -> TerraformRunner:
        if self._runner is None:
            main = self._trusted_runner()
            home, cache = self.root / "home", ensure_private_dir(self.root / "plugin-cache")
            wrap = None
            if self.config.sandbox:
                sandbox = Sandbox.find(
                    read_only=[
                        *(Path(a) for a in main.binary.argv if a.startswith("/")),
                        Path(sys.prefix),  # the embedded engine's venv, and its Python
                        Path(sys.base_prefix),
                        Path(providers.__file__).parent,  # the embedded engine, our providers
                        self.layout.cli_config.parent,  # the CLI config, the provider mirror
                    ],
                    writable=[home, cache],
                )
                try:
                    sandbox.check()
                except SandboxError as exc:
                    failed = SandboxError(f"{exc}{_under_systemd_hint()}")
                    if not self._sandbox_reported:  # each unit fails with it; the journal once
                        self._sandbox_reported = True
                        log.error("proposals: no plan can run: %s", failed)
                    raise failed from None

                def wrap(ws: UnitWorkspace, argv: list[str]) -> list[str]:
                    assert ws.root is not None and ws.work_dir is not None
                    return sandbox.wrap(argv, read_only=[ws.root], writable=[ws.work_dir.parent])

            # A plugin cache of their own: a proposal must not plant providers that main
            # passes would then run.
            self._runner = TerraformRunner(
                main.binary,
                cli_config=main.cli_config,
                plugin_cache_dir=cache,
                base_env=proposal_environment(home),
                grace_period=10.0,
                wrap=wrap,
            )
        return self._runner

    def run_dir(self, plan_id: str, unit: str) -> Path:
        """Where a proposal plan keeps one unit's logs (`agent logs UNIT --proposal REF`)."""
        return self.root / "runs" / plan_id / unit

    # --- polling ------------------------------------------------------------------

    def poll(self, *, only: str | None = None, wait: bool = False) -> PollResult:
        """Fetch the proposal refs and plan each new head (or only `only`, a ref name).

        Raises PassBusyError when another poll runs (with `wait`, waits for it), SourceError
        when the remote cannot be read."""
        lock = PassLock(self.root)
        try:
            lock.acquire(wait=wait, timeout=self.config.timeout * 2 if wait else None)
        except PassBusyError:
            raise PassBusyError(
                f"proposals are being planned already (pid {lock.holder().get('pid', '?')})",
                hint="see `agent proposals` when it is done",
            ) from None
        with lock:
            lock.record("proposals")
            return self._poll(only)

    def _poll(self, only: str | None) -> PollResult:
        result = PollResult()
        try:
            branch_head = self.source.fetch()
            found = self.source.remote_refs(self.config.refs)
            # The followed branch is never a proposal of itself.
            found.pop(f"refs/heads/{self.host.repo.branch}", None)
            chosen = sorted(found)[: self.config.max_open]
            result.over_limit = sorted(found)[self.config.max_open :]
            self.source.fetch_refs(chosen)
        except GitSourceError as exc:
            raise SourceError(f"proposals: {exc}") from exc
        result.closed = self.records.close_missing(set(chosen))
        base = self.store.current_revision() or branch_head
        for ref in chosen:
            if only is not None and ref != only:
                continue
            known = self.records.get(ref)
            if known is not None and known.status == ProposalStatus.CLOSED:
                if known.head == found[ref]:
                    continue  # closed on the forge; a new head (reopened) is planned
            elif self.source.is_ancestor(found[ref], branch_head):
                continue  # merged already: the branch has it (forges keep the refs)
            settled = known is not None and ProposalStatus(known.status) in SETTLED
            if settled and known.head == found[ref] and known.base == base and only is None:
                continue
            result.planned.append(self.plan(ref, found[ref], base))
        for ref in result.over_limit:
            log.warning("proposal %s not planned: more than %d proposals", ref, len(chosen))
        return result

    # --- one proposal -------------------------------------------------------------

    def plan(self, ref: str, head: str, base: str) -> ProposalRow:
        """Plan proposal `ref` at `head` (fetched) against `base`, the revision in force."""
        plan_id = new_run_id().replace("r-", "p-", 1)
        try:
            author = self.source.commit_info(head).author
        except GitSourceError as exc:
            author = "?"
            self.records.start(ref, head, base, author, plan_id)
            self.records.finish(ref, ProposalStatus.FAILED, str(exc))
            return self._done(ref)
        self.records.start(ref, head, base, author, plan_id)
        refused = self._refusal(head, author)
        if refused:
            log.warning("proposal %s at %s refused: %s", ref, head[:12], refused)
            self.records.finish(ref, ProposalStatus.REFUSED, refused)
            return self._done(ref)
        if self.on_started is not None:
            try:
                self.on_started(ref, head)
            except Exception:  # the forge is told later, or not: the plan goes on
                log.exception("proposal %s: reporting the start of its plan failed", ref)
        try:
            status = self._plan_units(ref, head, base, plan_id)
            self.records.finish(ref, status)
        except ConfigError as exc:
            self.records.finish(ref, ProposalStatus.INVALID, exc.message)
        except (AgentError, GitSourceError, SandboxError) as exc:
            message = exc.message if isinstance(exc, AgentError) else str(exc)
            self.records.finish(ref, ProposalStatus.FAILED, message)
        return self._done(ref)

    def _done(self, ref: str) -> ProposalRow:
        row = self.records.get(ref)
        assert row is not None
        if self.on_planned is not None:
            try:
                self.on_planned(row)
            except Exception:  # a forge that fails must not stop the next proposal's plan
                log.exception("proposal %s: reporting the plan failed", ref)
        return row

    def _refusal(self, head: str, author: str) -> str | None:
        """Why `head` may not be planned, or None. Checked before anything of it is read."""
        match = _EMAIL.search(author)
        email = (match.group(1) if match else author).lower()
        if not any(fnmatch.fnmatchcase(email, pattern) for pattern in self.config.authors):
            return f"author {email} is not allowed (proposals.authors)"
        policy = self.host.repo.signing
        if policy is None:
            return None
        try:
            verified = verify_revision(self.source.checkout_dir, head, policy)
        except SignatureError as exc:
            return f"not signed by an allowed key: {exc}"
        except GitSourceError as exc:
            return f"cannot verify its signature: {exc}"
        log.info("proposal head %s signed by %s", head[:12], verified.signer)
        return None

    def _plan_units(self, ref: str, head: str, base: str, plan_id: str) -> ProposalStatus:
        limits = ManifestLimits.from_host(self.host)
        main = self._base_manifest(base, limits)
        before = {unit.name: unit_entry(unit, main) for unit in main.units} if main else None
        tree = self._checkout(head)
        manifest = self._manifests.load(tree, limits, head)  # ConfigError: invalid
        changed = set(self.source.changed_paths(base, head)) if before is not None else None
        names = affected_units(tree, manifest, changed, before)
        # Units of a proposal are independent of each other (a dependent reads its
        # dependencies' outputs as applied now), so they plan in parallel, bounded.
        secrets = self._secrets(manifest, names)
        workers = max(1, min(self.host.terraform.parallelism, len(names)))

        def plan_unit(name: str) -> UnitPlan:
            unit = manifest.get_unit(name)
            assert unit is not None
            if self._stop.is_set():
                return UnitPlan(ProposalUnitStatus.FAILED, detail="interrupted: the agent stops")
            if isinstance(found := secrets.get(name), str):
                return UnitPlan(ProposalUnitStatus.FAILED, detail=found)
            run_dir = self.run_dir(plan_id, name)
            if unit.fleet is not None:
                return self.fleets.plan(tree, manifest, unit, main, run_dir, found, plan_id)
            return self.units.plan(tree, manifest, unit, run_dir, found)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="proposal") as pool:
            outcomes = list(pool.map(plan_unit, names))
        status = ProposalStatus.PLANNED
        for name, outcome in zip(names, outcomes, strict=True):
            if outcome.detail and "main pass holds its state" in outcome.detail:
                status = ProposalStatus.INCOMPLETE
            # Its logs for `agent logs --proposal` on any agent of a shared store.
            RunFiles(self.store, self.layout, runs_dir=self.root / "runs").save_unit(plan_id, name)
            self.records.record_unit(
                ref, head, plan_id, name, outcome.status, outcome.counts, outcome.detail
            )
        return status

    def _secrets(self, manifest: Manifest, names: list[str]) -> dict[str, Any]:
        """The secrets of the units `secrets_for` lists (a dict of values, or why not as a
        string); the others get none (None: skipped if they need any)."""
        units = [u for n in names if n in self.config.secrets_for and (u := manifest.get_unit(n))]
        resolved = self.secrets.resolve(units)
        found: dict[str, Any] = {}
        for unit in units:
            error = resolved.errors.get(unit.name)
            found[unit.name] = error if error else resolved.values.get(unit.name, {})
        return found

    def _base_manifest(self, base: str, limits: ManifestLimits) -> Manifest | None:
        """The manifest at the revision in force; None when it cannot be read (then every
        unit of the proposal counts as affected, and no fleet unit is planned)."""
        try:
            return self._manifests.load(self._checkout(base), limits, base)
        except (AgentError, GitSourceError) as exc:
            log.info("proposals: the manifest at %s is not readable: %s", base[:12], exc)
            return None

    def _checkout(self, sha: str) -> Path:
        try:
            return self.source.checkout(sha)
        except GitSourceError as exc:
            raise SourceError(f"cannot check out {sha[:12]}: {exc}") from exc


def affected_units(
    tree: Path,
    manifest: Manifest,
    changed: set[str] | None,
    before: dict[str, object] | None,
) -> list[str]:
    """The units a proposal touches, in dependency order: a unit whose stack (or a local
    module it uses) or fleet file changed, whose manifest entry is new or different, and
    every unit that depends on one of those. `changed` None: all units."""
    order = list(manifest.order())
    if changed is None or before is None:
        return order
    hit: set[str] = set()
    for name in order:
        unit = manifest.get_unit(name)
        assert unit is not None
        if before.get(name) != unit_entry(unit, manifest):
            hit.add(name)
            continue
        roots = stack_paths(tree, unit.stack) if unit.fleet is None else []
        if any(_under(path, root) for path in changed for root in roots):
            hit.add(name)
        elif unit.fleet is not None and any(
            path != MANIFEST and not path.startswith(".") for path in changed
        ):
            hit.add(name)  # a fleet's templates and sources: any file may be one
    for name in order:  # in order: a dependency is decided before its dependents
        unit = manifest.get_unit(name)
        assert unit is not None
        if any(dep in hit for dep in unit.depends_on):
            hit.add(name)
    return [name for name in order if name in hit]


def _under(path: str, root: str) -> bool:
    root = root.strip("/")
    return root in ("", ".") or path == root or path.startswith(root + "/")
