"""What the agent keeps per fleet host: the shared record of what it manages there
(providers/hosts/ledger.py, under `<state>/hosts/`), each unit's last result per host
(`agent status`), what each host was last converged to (to tell drift from a change from
Git), and the removals a hold showed (what `agent approve` may apply)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.config import Unit
from agent.config.fleet import HOST_NAME_RE
from agent.core.fsutil import atomic_write, ensure_private_dir
from agent.core.redact import Redactor
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

    def __init__(self, layout: StateLayout, hasher: Hasher, redactor: Redactor) -> None:
        self.layout = layout
        self.hasher = hasher
        self.redactor = redactor
        # Units run in parallel and several may share a host: one writer of the records.
        self._lock = threading.Lock()

    # --- what each host had -----------------------------------------------------------

    def host_file(self, unit: str, host: str) -> Path:
        return self.layout.unit_dir(unit) / "hosts" / f"{host}.json"

    def record_file(self, host: str) -> Path:
        return self.layout.host_record(host)

    def record(self, unit: str, host: str) -> dict[str, Any]:
        """The host's record; a unit's list from before the record existed counts as
        created by the agent (that is how it was treated then)."""
        try:
            record = json.loads(self.record_file(host).read_text())
        except (OSError, ValueError):
            record = ledger.new_record()
        objects = record.setdefault("objects", {})
        record.setdefault("handlers", {})
        if not any(e.get("unit") == unit for e in objects.values()):
            for kind, name in self._legacy(unit, host):
                key = ledger.object_key(kind, name)
                if key is not None and key not in objects:
                    objects[key] = {"kind": kind, "name": name, "unit": unit, "created": True}
        return record

    def _legacy(self, unit: str, host: str) -> list[tuple[str, str]]:
        try:
            data = json.loads(self.host_file(unit, host).read_text())
        except (OSError, ValueError):
            return []
        return [(r["kind"], r["name"]) for r in data.get("resources", [])]

    def remember(
        self, unit: Unit, plan: PlannedHost, report: HostReport, revision: str, *, applied: bool
    ) -> None:
        """Keep each host's last result (for status) and, per resource, what it manages."""
        if plan.error is None:
            outcomes = {o.resource_id: o for o in report.outcomes}
            with self._lock:
                record = self.record(unit.name, plan.spec.name)
                record = ledger.updated(
                    record,
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
                path = self.record_file(plan.spec.name)
                ensure_private_dir(path.parent)
                atomic_write(path, json.dumps(record, indent=1))
        path = self.host_file(unit.name, plan.spec.name)
        ensure_private_dir(path.parent)
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = {}
        record = {
            "host": plan.spec.name,
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
        atomic_write(path, json.dumps(record, indent=1))

    def drop_older_holds(self, unit: str, run_id: str) -> None:
        """Held again: only the newest hold can be approved (the older ones are stale)."""
        for held in self.layout.runs.glob(f"*/{unit}/{HELD_FILE}"):
            if held.parent.parent.name != run_id:
                held.unlink(missing_ok=True)

    # --- what each host was last converged to (to tell drift from a change) ------------

    def _desired_file(self, unit: str, host: str) -> Path:
        return self.layout.unit_dir(unit) / "desired" / f"{host}.json"

    def drift_overwritten(self, unit: str, plan: PlannedHost, report: HostReport) -> int:
        """How many resources this apply changed although what the repo wants of them is
        what it was at the last converge: hand-made drift, put back by a change from Git."""
        try:
            before = json.loads(self._desired_file(unit, plan.spec.name).read_text())
        except (OSError, ValueError):
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
            path = self._desired_file(unit, plan.spec.name)
            ensure_private_dir(path.parent)
            atomic_write(path, json.dumps(self._desired(plan), indent=1))


def retire_hosts(layout: StateLayout, unit: str, listed: set[str]) -> list[str]:
    """Move the records of hosts the inventory no longer lists out of the fleet's status
    (into `hosts-gone/`): an instance that left is not shown, and no pass contacts it
    (passes converge only the hosts listed). Each run's host results stay in its run dir
    (`agent history`). Returns the names retired."""
    hosts_dir = layout.unit_dir(unit) / "hosts"
    gone_dir = layout.unit_dir(unit) / "hosts-gone"
    retired = []
    for record in sorted(hosts_dir.glob("*.json")) if hosts_dir.is_dir() else ():
        name = record.name.removesuffix(".json")
        if name in listed or not HOST_NAME_RE.fullmatch(name):
            continue
        ensure_private_dir(gone_dir)
        record.replace(gone_dir / record.name)
        retired.append(name)
    return retired


def host_states(layout: StateLayout, unit: str) -> list[dict[str, Any]]:
    """The last recorded result of every host of fleet `unit` (for `agent status`), with
    the removals that have not finished and the handlers still owed there."""
    states = []
    for path in sorted((layout.unit_dir(unit) / "hosts").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        data.pop("resources", None)
        try:
            record = json.loads(layout.host_record(path.stem).read_text())
        except (OSError, ValueError):
            record = ledger.new_record()
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
