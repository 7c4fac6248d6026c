"""Units the repository removed: what happens to what they created (`policy.prune`).

A unit that has a real result in the store but is not in the manifest in force was
removed from `gitops.yaml`. Once per pass (a full, real one), after the units step:

    found removed -> its last definition (the revision it last converged at, exported
    apart from the checkout) -> per policy.prune:
      hold    plan the removal and hold it for `agent approve` (the default)
      auto    remove it: a stack's `plan -destroy` applied to its own state; a fleet's
              objects removed from each host, as the host ledger records them
      orphan  forget it: nothing is touched, and the store records that it was left

The mode is the host's policy.prune, or the unit's own `prune:` as its last definition
said it when that is stricter (auto < hold < orphan).

A held removal whose plan is still valid (same definition, same state, same secrets and
rules: the fingerprint kept with the run that held it) is kept as it is by later passes:
reported, not planned again, and `agent approve` of that run still applies it.

A dry run previews: each removed unit's destroy is planned (nothing saved to approve,
nothing recorded but the preview), and what the policy would do is said beside it.

Its last definition (the export, the manifest, the unit ready to run) is
agent/units/lastdefinition.py's.

A unit that comes back (a `git revert` of the removal) is no longer removed: its held
removal is dropped, unapproved, and it reconciles as before with its state untouched.
Nothing is forgotten silently: the state file and the history stay; only a unit whose
removal finished (`pruned`) leaves `agent status`. The export of its last definition
(`units/<unit>/removed/`) lives only while its removal is pending: it goes once the unit
is pruned, orphaned or back, and each pass sweeps what a killed one left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from agent.config import HostConfig
from agent.core.progress import Event, EventKind, Reporter
from agent.core.redact import Redactor
from agent.errors import AgentError, PruneError
from agent.policy.prune import PruneMode, RemovedStatus
from agent.state.hostrecords import LEDGER, RESULT
from agent.state.layout import StateLayout
from agent.state.runfiles import RunFiles
from agent.state.store import RemovedUnitRow, RunStore, UnitOutcome, UnitStatus
from agent.units.decide import Decision
from agent.units.fingerprint import Fingerprint
from agent.units.fleetledger import HELD_FILE
from agent.units.fleetreport import describe_fleet
from agent.units.fleets import FleetReconciler
from agent.units.lastdefinition import EXPORT_DIR, Definition, LastDefinitions, PruneRequest
from agent.units.secrets import SecretResolver
from agent.units.stacks import PLAN_FILE, StackReconciler, describe_outcome
from providers.git_source import GitSource

log = logging.getLogger(__name__)

ORPHANED = (
    "removed from gitops.yaml: what it created was left as it is (policy.prune: orphan);"
    " its state stays in the state directory"
)
FLEET_HELD = "removed from gitops.yaml: its removals wait for `agent approve` (policy.prune: hold)"
# What a dry run says each policy would do with the removal it planned.
PREVIEW = {
    PruneMode.HOLD: "removed from gitops.yaml: policy.prune hold would hold this removal for"
    " `agent approve`",
    PruneMode.AUTO: "removed from gitops.yaml: policy.prune auto would apply this removal",
    PruneMode.ORPHAN: "removed from gitops.yaml: policy.prune orphan would leave what it created"
    " as it is; nothing would be run",
}
# The fingerprint part that says under which policy a held plan was made.
POLICY_PART = "prune"


class Pruner:
    """Finds removed units and prunes, holds or orphans them; one instance per Reconciler."""

    def __init__(
        self,
        host: HostConfig,
        layout: StateLayout,
        store: RunStore,
        source: GitSource,
        secrets: SecretResolver,
        stacks: StackReconciler,
        fleets: FleetReconciler,
        report: Reporter,
        redactor: Redactor,
    ) -> None:
        self.host = host
        self.layout = layout
        self.store = store
        self.definitions = LastDefinitions(host, layout, source, secrets, fleets.ledger.records)
        self.stacks = stacks
        self.fleets = fleets
        self.report = report
        self.redactor = redactor

    # --- the pass step -----------------------------------------------------------------

    def run(self, request: PruneRequest, stop: Callable[[], bool]) -> dict[str, UnitOutcome]:
        """Take back the units that returned, then act on every removed one (a dry run
        only previews: it records nothing about them)."""
        current = set(request.manifest.names())
        removed = self.store.removed.by_unit()
        if not request.dry_run:
            for name in sorted(current & set(removed)):
                self._returned(name, removed[name])
        suspended = set(self.store.suspensions.by_unit())
        outcomes: dict[str, UnitOutcome] = {}
        try:
            for row in self._removed_now(request, current):
                if stop():
                    break
                if row.unit in suspended:
                    log.info("removed unit %s is suspended: not pruned", row.unit)
                    continue
                outcomes[row.unit] = self._prune(request, row, stop)
        finally:
            self.sweep_exports()
        return outcomes

    def _removed_now(self, request: PruneRequest, current: set[str]) -> list[RemovedUnitRow]:
        """Units with a real result that the manifest lacks, newly found ones recorded (a
        dry run records nothing); dependents before what they depend on (by their last
        definitions)."""
        removed = self.store.removed.by_unit()
        found: list[tuple[int, str, RemovedUnitRow]] = []
        for state in self.store.unit_states():
            name = state.unit
            if name in current or state.last_run_id is None:
                continue  # in force, or only ever previewed: nothing was created
            row = removed.get(name)
            if row is None:
                row = self._record_removed(request, name)
                if row is None:
                    continue
            if row.status in (RemovedStatus.ORPHANED, RemovedStatus.PRUNED):
                continue
            try:
                position = self.definitions.manifest(row).order().index(name)
            except (AgentError, ValueError):
                position = 0
            found.append((position, name, row))
        return [row for _, _, row in sorted(found, key=lambda f: (f[0], f[1]), reverse=True)]

    def _record_removed(self, request: PruneRequest, name: str) -> RemovedUnitRow | None:
        state = self.store.unit_state(name)
        defined_at = state.revision if state else None
        if defined_at is None:
            # Never converged: the revision its last real run used defines it.
            real = [r for r in self.store.unit_history(name, limit=20) if not r.preview]
            defined_at = next((r.revision for r in real if r.revision), None)
        # Recorded even when its definition cannot be read: the prune then fails with the
        # reason, shown by `agent status`, rather than the unit being skipped unseen.
        kind = "fleet" if self.fleets.ledger.records.all(RESULT, name) else "stack"
        if defined_at is None:
            defined_at = request.revision  # (nothing better: its prune says it is unknown)
        row = RemovedUnitRow(
            name, kind, defined_at, request.revision, time.time(), "", "", None, None, 0.0
        )
        try:
            unit = self.definitions.manifest(row).get_unit(name)
            kind = unit.kind if unit is not None else kind
        except AgentError as exc:
            log.warning("unit %s left gitops.yaml; its definition cannot be read: %s", name, exc)
        mode = self.mode(replace(row, kind=kind))
        if request.dry_run:
            # Previewed as it would be found, never recorded.
            return replace(row, kind=kind, policy=mode, status=RemovedStatus.PRUNING)
        self.store.removed.mark(
            name,
            kind=kind,
            defined_at=defined_at,
            removed_at=request.revision,
            policy=mode,
            status=RemovedStatus.PRUNING,
        )
        log.info("unit %s was removed from gitops.yaml (policy.prune: %s)", name, mode)
        return self.store.removed.by_unit().get(name)

    def _returned(self, name: str, row: RemovedUnitRow) -> None:
        """A removed unit is in the manifest again: its held removal can no longer apply."""
        self.store.removed.returned(name)
        self.definitions.drop_export(name)
        self._drop_held(name)
        if row.status != RemovedStatus.PRUNED:
            message = f"{name} is back in gitops.yaml; its removal ({row.status}) was dropped"
            log.info("%s", message)
            self.report(Event(EventKind.UNIT_LINE, unit=name, message=message))

    def _prune(
        self, request: PruneRequest, row: RemovedUnitRow, stop: Callable[[], bool]
    ) -> UnitOutcome:
        name = row.unit
        mode = self.mode(row)
        started = time.monotonic()
        describe = describe_fleet if row.kind == "fleet" else describe_outcome
        kept = self._kept_hold(request, row, mode)
        if kept is not None:
            # Still valid: reported as held, nothing run and nothing recorded again (the
            # run that held it stays the one to approve).
            message = describe(kept)
            if row.run_id and row.run_id not in message:
                message += f"; {_kept_note(row.run_id, name)}"
            self.report(Event(EventKind.UNIT_STARTED, run_id=request.run_id, unit=name))
            self.report(
                Event(
                    EventKind.UNIT_FINISHED,
                    run_id=request.run_id,
                    unit=name,
                    message=message,
                    seconds=time.monotonic() - started,
                    result=kept,
                )
            )
            return kept
        self.store.start_unit(request.run_id, name, request.revision)
        self.report(Event(EventKind.UNIT_STARTED, run_id=request.run_id, unit=name))
        fingerprint: Fingerprint | None = None
        if mode is PruneMode.ORPHAN:
            if request.dry_run:
                outcome = UnitOutcome(
                    status=UnitStatus.OK, decision=Decision.PLAN_ONLY, error=PREVIEW[mode]
                )
            else:
                outcome = UnitOutcome(
                    status=UnitStatus.OK, decision=Decision.ORPHAN, error=ORPHANED
                )
        else:
            try:
                definition = self.definitions.definition(request, row)
                outcome = self._remove(definition, row, mode, started)
                if outcome.status is UnitStatus.HELD:
                    # Kept with the run: a later pass keeps the hold while it matches.
                    fingerprint = self._fingerprint(request, definition, row, mode)
                if request.dry_run and outcome.status is UnitStatus.OK:
                    notes = [PREVIEW[mode], *([outcome.error] if outcome.error else [])]
                    outcome = replace(outcome, error="; ".join(notes))
            except AgentError as exc:
                outcome = UnitOutcome(status=UnitStatus.FAILED, error=exc.message)
        if outcome.error:
            outcome = replace(outcome, error=self.redactor.redact(outcome.error))
        if stop() and outcome.status is UnitStatus.FAILED:
            outcome = replace(outcome, status=UnitStatus.INTERRUPTED)
        outcome = replace(outcome, converged=False)  # it converges to nothing: no revision
        if request.dry_run:
            outcome = replace(outcome, preview=True)
        RunFiles(self.store, self.layout).save_unit(request.run_id, name)
        self.store.finish_unit(
            request.run_id,
            name,
            request.revision,
            outcome,
            fingerprint=fingerprint.encode() if fingerprint else None,
        )
        if not request.dry_run:
            self.settle(name, outcome, request.run_id)
        self.report(
            Event(
                EventKind.UNIT_FINISHED,
                run_id=request.run_id,
                unit=name,
                message=describe(outcome),
                seconds=time.monotonic() - started,
                result=outcome,
            )
        )
        return outcome

    # --- a held removal that is still valid --------------------------------------------

    def _kept_hold(
        self, request: PruneRequest, row: RemovedUnitRow, mode: PruneMode
    ) -> UnitOutcome | None:
        """The outcome of the removal `row` holds, when its plan is still valid: held by
        policy.prune (a hold by a rule or a window alone is decided again), its plan kept,
        and the unit's fingerprint (definition, state, secrets, rules; a fleet's hosts'
        records) as when it was held. None: plan again."""
        if mode is not PruneMode.HOLD or row.status != RemovedStatus.HELD or row.run_id is None:
            return None
        held_file = PLAN_FILE if row.kind == "stack" else HELD_FILE
        on_disk = (self.layout.unit_run_dir(row.run_id, row.unit) / held_file).is_file()
        if not on_disk and not RunFiles(self.store, self.layout).still_held(row.run_id, row.unit):
            return None  # (a shared store keeps what another agent held)
        held = next((r for r in self.store.unit_runs(row.run_id) if r.unit == row.unit), None)
        if held is None or held.status != UnitStatus.HELD:
            return None
        previous = Fingerprint.decode(held.fingerprint)
        if previous is None:
            return None
        try:
            definition = self.definitions.definition(request, row)
            now = self._fingerprint(request, definition, row, mode)
        except AgentError as exc:
            log.info("%s: its held removal is planned again: %s", row.unit, exc.message)
            return None
        changed = now.changed_from(previous)
        if changed:
            log.info("%s: planned again, its %s changed", row.unit, ", ".join(changed))
            return None
        return UnitOutcome(
            status=UnitStatus.HELD,
            decision=Decision.HOLD,
            plan_add=held.plan_add,
            plan_change=held.plan_change,
            plan_destroy=held.plan_destroy,
            error="; ".join([held.error or FLEET_HELD, _kept_note(row.run_id, row.unit)]),
            converged=False,
            preview=request.dry_run,
            # This pass holds nothing to approve: its notification must not name it.
            waiting=True,
        )

    def hold_in_force(self, run_id: str, name: str) -> bool:
        """Whether run `run_id` holds the removal of stack `name` that is still in force:
        `agent approve` of it stays possible after the revision in force moved (the
        removal runs from the unit's last definition, which no later commit changes;
        Terraform refuses the plan if the state moved). A fleet's removals depend on what
        the other units list now: never."""
        row = self.store.removed.by_unit().get(name)
        return (
            row is not None
            and row.kind == "stack"
            and row.status == RemovedStatus.HELD
            and row.run_id == run_id
        )

    def _fingerprint(
        self, request: PruneRequest, definition: Definition, row: RemovedUnitRow, mode: PruneMode
    ) -> Fingerprint:
        """What a removal's plan was made from: a stack's inputs as a unit's (its last
        definition, secrets, Terraform, state); for a fleet, the revision in force (what
        the other units list) and its hosts' records; and the policy (mode and rules)."""
        hasher = self.stacks.workspaces.hasher
        rules = [
            [rule.name, rule.expression, str(rule.effect), rule.source]
            for rule in self.host.policy.rules
        ]
        policy = {POLICY_PART: hasher.value([str(mode), rules])}
        if row.kind == "stack":
            inputs = self.stacks.inputs.fingerprint(definition.ctx, definition.unit)
            return inputs.with_parts(policy)
        records: dict[str, object] = {}
        fleet = definition.unit.fleet
        for host in fleet.hosts if fleet is not None and isinstance(fleet.hosts, tuple) else ():
            document = self.fleets.ledger.records.read(LEDGER, "", host.name)
            records[host.name] = [host.address, host.port, host.user, document]
        return Fingerprint(
            {
                "manifest": hasher.value(request.revision),
                "hosts": hasher.value(records),
                **policy,
            }
        )

    def _remove(
        self, definition: Definition, row: RemovedUnitRow, mode: PruneMode, started: float
    ) -> UnitOutcome:
        if row.kind == "stack":
            return self.stacks.destroy_removed(definition.ctx, definition.unit, mode, started)
        outcome = self.fleets.remove_all(
            definition.ctx, definition.unit, hold=mode is PruneMode.HOLD
        )
        if outcome.status is UnitStatus.HELD:
            # Held by policy.prune (the fleet's own text names policy.destroy), or by a
            # closed change window (its text says when it opens).
            held = mode is PruneMode.HOLD and "policy.destroy" in (outcome.error or "")
            why = FLEET_HELD if held else f"removed from gitops.yaml: {outcome.error}"
            outcome = replace(outcome, error=why)
        return outcome

    def apply_held(
        self, request: PruneRequest, name: str, held_run_id: str, held_file: Path
    ) -> UnitOutcome:
        """`agent approve` of a removed unit's held removal: apply exactly what run
        `held_run_id` showed (a stack's saved destroy plan, a fleet's removals)."""
        row = self.store.removed.by_unit().get(name)
        try:
            if row is None:
                raise PruneError(f"{name} is no longer a removed unit")
            # A saved plan holds its variables: no secret is read again.
            definition = self.definitions.definition(request, row, secrets=False)
        except AgentError as exc:
            outcome = UnitOutcome(
                status=UnitStatus.FAILED,
                decision=Decision.APPLY,
                error=self.redactor.redact(exc.message),
            )
            self.store.finish_unit(request.run_id, name, request.revision, outcome)
            return outcome
        apply_saved = self.stacks.apply_saved if row.kind == "stack" else self.fleets.apply_saved
        outcome = apply_saved(definition.ctx, name, held_run_id, held_file)
        self.settle(name, outcome, request.run_id)
        return outcome

    def settle(self, name: str, outcome: UnitOutcome, run_id: str) -> None:
        """Where the removed unit stands after `outcome` (a pass's, or an approval's)."""
        if outcome.decision == Decision.ORPHAN:
            status = RemovedStatus.ORPHANED
        elif outcome.status is UnitStatus.HELD:
            status = RemovedStatus.HELD
        elif outcome.status is UnitStatus.OK and outcome.decision in (
            Decision.APPLY,
            Decision.NOTHING,
        ):
            status = RemovedStatus.PRUNED
        else:
            status = RemovedStatus.PRUNING  # failed or stopped: tried again next pass
        error = outcome.error if status is not RemovedStatus.PRUNED else None
        self.store.removed.set_status(name, status, run_id=run_id, error=error)
        if status in (RemovedStatus.PRUNED, RemovedStatus.ORPHANED):
            self.definitions.drop_export(name)  # nothing runs from it any more
            self._drop_held(name)  # (a hold made before the host said orphan: never applied)

    def _drop_held(self, name: str) -> None:
        """The removals held for `name` can no longer be approved (a stack's saved plan
        holds its variables' values: it is not kept longer than it can be used)."""
        for held in (PLAN_FILE, HELD_FILE):
            for path in self.layout.runs.glob(f"*/{name}/{held}"):
                path.unlink(missing_ok=True)
        RunFiles(self.store, self.layout).drop_held(name)  # and a shared store's copies

    # --- the export of a removed unit's last definition ---------------------------------

    def sweep_exports(self) -> None:
        """Remove every export no pending removal needs: those of units pruned, orphaned
        or back, and what a dry run or a killed pass left."""
        pending = {
            name
            for name, row in self.store.removed.by_unit().items()
            if row.status in (RemovedStatus.PRUNING, RemovedStatus.HELD)
        }
        for export in sorted((self.layout.root / "units").glob(f"*/{EXPORT_DIR}")):
            if export.parent.name not in pending:
                self.definitions.drop_export(export.parent.name)

    def mode(self, row: RemovedUnitRow) -> PruneMode:
        """What happens to the removed unit: the host's policy.prune, or the unit's own
        `prune:` in its last definition when that is stricter."""
        ceiling = self.host.policy.prune
        if ceiling is PruneMode.ORPHAN:
            return ceiling
        try:
            unit = self.definitions.manifest(row).get_unit(row.unit)
        except AgentError:
            return ceiling  # its prune then fails, saying why
        return ceiling.stricter(unit.prune) if unit is not None else ceiling


def _kept_note(run_id: str, name: str) -> str:
    return (
        f"still held by run {run_id}, not planned again (nothing it was planned from"
        f" changed): `agent approve {run_id} --unit {name}`"
    )
