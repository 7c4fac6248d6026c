"""What the agent keeps per fleet host: the shared record of what it manages there
(providers/hosts/ledger.py), each unit's last result per host (`agent status`), what each
host was last converged to (to tell drift from a change from Git), and the removals a hold
showed (what `agent approve` may apply). The records are kept by a HostRecords
(agent/state/hostrecords.py): files in the state directory, or rows of a shared store."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from agent.config import Unit
from agent.config.fleet import HOST_NAME_RE
from agent.core.redact import Redactor
from agent.state.hostrecords import DESIRED, LEDGER, RESULT, HostRecords
from agent.state.layout import StateLayout
from agent.units.fingerprint import Hasher
from agent.units.fleetreport import host_error
from agent.units.fleettypes import PlannedHost
from providers.hosts import ledger
from providers.hosts.model import HostReport

HELD_FILE = "held-removals.json"  # in the run dir: the removals a hold showed, per host
# Each host's result in a run (beside hosts.txt), read by `agent history`.
HOST_RESULTS_FILE = "hosts.json"


class FleetLedger:
    """The records of every fleet's hosts; one instance (one writer) serves every unit."""

    def __init__(
        self, layout: StateLayout, hasher: Hasher, redactor: Redactor, records: HostRecords
    ) -> None:
        self.layout = layout
        self.hasher = hasher
        self.redactor = redactor
        self.records = records
        # Units run in parallel and several may share a host: one writer of the records
        # in this agent (a shared store's rows are also locked against other agents).
        self._lock = threading.Lock()

    # --- what each host had -----------------------------------------------------------

    def has_result(self, unit: str, host: str) -> bool:
        """Whether `unit` has converged (or tried) `host`."""
        return self.records.read(RESULT, unit, host) is not None

    def record(self, unit: str, host: str) -> dict[str, Any]:
        """The host's record; a unit's list from before the record existed counts as
        created by the agent (that is how it was treated then)."""
        return _with_legacy(self.records.read(LEDGER, "", host), unit, self._legacy(unit, host))

    def _legacy(self, unit: str, host: str) -> list[tuple[str, str]]:
        if self.records.shared:
            return []  # the list predates the records; a shared store never had one
        data = self.records.read(RESULT, unit, host) or {}
        return [(r["kind"], r["name"]) for r in data.get("resources", [])]

    def remember(
        self, unit: Unit, plan: PlannedHost, report: HostReport, revision: str, *, applied: bool
    ) -> None:
        """Keep each host's last result (for status) and, per resource, what it manages."""
        host = plan.spec.name
        if plan.error is None:
            outcomes = {o.resource_id: o for o in report.outcomes}
            legacy = self._legacy(unit.name, host)  # read before the record is locked

            def change(found: dict[str, Any] | None) -> dict[str, Any]:
                return ledger.updated(
                    _with_legacy(found, unit.name, legacy),
                    unit.name,
                    plan.desired,
                    plan.removals,
                    plan.released,
                    outcomes,
                    applied=applied,
                    handlers_run=report.handlers_run,
                    handlers_failed=report.handlers_failed,
                    due=plan.pending_handlers,
                )

            with self._lock:
                self.records.update(LEDGER, "", host, change)
        previous = self.records.read(RESULT, unit.name, host) or {}
        result = {
            "host": host,
            "address": plan.spec.address,
            "revision": revision if applied and report.ok else previous.get("revision"),
            "at": time.time(),
            "status": "ok" if report.ok else "failed",
            "changed": report.changed,
            "pending": report.pending,
            "failed": report.failed,
            "held": report.held,
            "round_trips": report.round_trips,
            "error": self.redactor.redact(host_error(report)) or None,
        }
        self.records.write(RESULT, unit.name, host, result)

    def drop_older_holds(self, unit: str, run_id: str) -> None:
        """Held again: only the newest hold can be approved (the older ones are stale)."""
        for held in self.layout.runs.glob(f"*/{unit}/{HELD_FILE}"):
            if held.parent.parent.name != run_id:
                held.unlink(missing_ok=True)

    # --- what each host was last converged to (to tell drift from a change) ------------

    def drift_overwritten(self, unit: str, plan: PlannedHost, report: HostReport) -> int:
        """How many resources this apply changed although what the repo wants of them is
        what it was at the last converge: hand-made drift, put back by a change from Git."""
        before = self.records.read(DESIRED, unit, plan.spec.name)
        if before is None:
            return 0
        now = self._desired(plan)
        return sum(
            1
            for outcome in report.outcomes
            if outcome.status == "changed"
            and outcome.resource_id in before
            and before[outcome.resource_id] == now.get(outcome.resource_id)
        )

    def _desired(self, plan: PlannedHost) -> dict[str, str]:
        return {r.id: self.hasher.value(r.attrs) for r in plan.resources}

    def remember_desired(
        self, unit: str, plan: PlannedHost, report: HostReport, *, applied: bool
    ) -> None:
        # Keyed hashes only: a template holding a secret must not be kept in clear.
        if applied and report.ok and plan.error is None:
            self.records.write(DESIRED, unit, plan.spec.name, self._desired(plan))


def _with_legacy(
    found: dict[str, Any] | None, unit: str, legacy: list[tuple[str, str]]
) -> dict[str, Any]:
    """The record (a new one if none), with `unit`'s list from before records existed."""
    record = found if found is not None else ledger.new_record()
    objects = record.setdefault("objects", {})
    record.setdefault("handlers", {})
    if not any(e.get("unit") == unit for e in objects.values()):
        for kind, name in legacy:
            key = ledger.object_key(kind, name)
            if key is not None and key not in objects:
                objects[key] = {"kind": kind, "name": name, "unit": unit, "created": True}
    return record


def retire_hosts(records: HostRecords, unit: str, listed: set[str]) -> list[str]:
    """Move the records of hosts the inventory no longer lists out of the fleet's status
    (to `gone`): an instance that left is not shown, and no pass contacts it (passes
    converge only the hosts listed). Each run's host results stay in its run dir
    (`agent history`). Returns the names retired."""
    retired = []
    for name in records.all(RESULT, unit):
        if name in listed or not HOST_NAME_RE.fullmatch(name):
            continue
        records.retire(unit, name)
        retired.append(name)
    return retired


def host_states(records: HostRecords, unit: str) -> list[dict[str, Any]]:
    """The last recorded result of every host of fleet `unit` (for `agent status`), with
    the removals that have not finished and the handlers still owed there."""
    states = []
    for host, data in records.all(RESULT, unit).items():
        data.pop("resources", None)
        record = records.read(LEDGER, "", host) or ledger.new_record()
        data["removals_failing"] = ledger.unfinished(record, unit)
        data["handlers_owed"] = list(record.get("handlers", {}).get(unit, ()))
        states.append(data)
    return states


def held_removals(
    planned: Sequence[PlannedHost], reports: Sequence[HostReport]
) -> dict[str, dict[str, Any]]:
    """Per host, exactly the removals a hold showed (what `agent approve` may apply)."""
    held: dict[str, dict[str, Any]] = {}
    for plan, report in zip(planned, reports, strict=True):
        shown = {o.resource_id: o for o in report.outcomes if o.status == "held"}
        items = [
            {"kind": r.kind, "name": r.name, "attrs": dict(r.attrs), "changes": list(o.changes)}
            for r in plan.resources
            if (o := shown.get(r.id)) is not None
        ]
        if items:
            held[plan.spec.name] = {"address": plan.spec.address, "removals": items}
    return held
