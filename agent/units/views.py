"""What the run store and the state directory say about units, as plain dicts: shared by
the command line (agent.cli.views renders them as tables and `--json`) and the web page
(agent.web), so that both always say the same.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from agent.errors import NotFoundError
from agent.state.hostrecords import HostRecords
from agent.state.layout import StateLayout
from agent.state.runfiles import RunFiles
from agent.state.store import RunStore, UnitRunRow, UnitStateRow, UnitStatus
from agent.units.decide import Decision
from agent.units.fleetledger import HOST_RESULTS_FILE, host_states

__all__ = ["LOG_FILES", "host_results", "logs_view", "rfc3339", "unit_view"]

LOG_FILES = ("init.txt", "plan.txt", "policy.txt", "apply.txt", "hosts.txt")


def unit_view(state: UnitStateRow, records: HostRecords | None = None) -> dict[str, Any]:
    """Where one unit stands (`agent status` shows one of these per unit); a fleet's
    hosts too, given where their records are (agent.state.hostrecords.host_records)."""
    # The store keeps the drift the last plan found; a clean apply put it back since.
    reverted = bool(state.drift) and (state.last_status, state.last_decision) == (
        UnitStatus.OK,
        Decision.APPLY,
    )
    entry: dict[str, Any] = {
        "unit": state.unit,
        "revision": state.revision,
        "converged_at": state.converged_at,
        "last_result": state.last_status,
        "last_decision": state.last_decision,
        "drift": bool(state.drift) and not reverted,
        "drift_reverted": reverted,
        "last_run": state.last_run_id,
        "updated_at": state.updated_at,
    }
    if state.unchanged_run_id and (state.unchanged_at or 0) >= state.updated_at:
        # A changed-only pass ran nothing for it since its last real result (which stays
        # the unit's result): said apart, never as a new result.
        entry["unchanged_since"] = {"run": state.unchanged_run_id, "at": state.unchanged_at}
    if state.preview_run_id:
        # A dry run's result, apart: it never stands for what the unit last did.
        entry["last_preview"] = {
            "run": state.preview_run_id,
            "result": state.preview_status,
            "decision": state.preview_decision,
            "at": state.preview_at,
        }
    if records is not None and (hosts := host_states(records, state.unit)):
        entry["hosts"] = hosts
    return entry


def host_results(
    layout: StateLayout, run_id: str, unit: str, store: RunStore | None = None
) -> list[dict[str, Any]]:
    """Each host's counts in a fleet unit's run (none for a stack, or an older run); with
    `store`, from a shared store when another agent ran it."""
    try:
        if store is None:
            text = (layout.unit_run_dir(run_id, unit) / HOST_RESULTS_FILE).read_text()
        else:
            text = RunFiles(store, layout).read_text(run_id, unit, HOST_RESULTS_FILE) or ""
        data = json.loads(text)
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def rfc3339(timestamp: float) -> str:
    """2026-12-07T04:46:23.512Z: RFC 3339, UTC, to the millisecond."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def logs_view(
    store: RunStore, layout: StateLayout, unit: str, run_id: str | None
) -> dict[str, Any]:
    """The Terraform output of a unit in a run (default: its latest run that planned)."""
    files_of = RunFiles(store, layout)
    row = _unit_run_with_logs(store, files_of, unit, run_id)
    files = {}
    for name in LOG_FILES:  # from this agent's disk, else from a shared store
        text = files_of.read_text(row.run_id, unit, name)
        if text is not None:
            files[name] = text
    return {"unit": unit, "run": row.run_id, "result": asdict(row), "files": files}


def _unit_run_with_logs(
    store: RunStore, files: RunFiles, unit: str, run_id: str | None
) -> UnitRunRow:
    if run_id is not None:
        if store.get_run(run_id) is None:
            raise NotFoundError(f"no run with id {run_id!r}", hint="see `agent history`")
        for row in store.unit_runs(run_id):
            if row.unit == unit:
                return row
        raise NotFoundError(f"unit {unit!r} did not take part in run {run_id}")
    history = store.unit_history(unit, limit=200)
    if not history:
        raise NotFoundError(
            f"no run has reconciled a unit named {unit!r}", hint="see `agent status`"
        )
    found = files.first_with(unit, [row.run_id for row in history], LOG_FILES)
    return next((row for row in history if row.run_id == found), history[0])
