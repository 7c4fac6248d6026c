"""What the read commands show: status, history and logs, as text or as JSON.

Each view is built from the run store into plain dicts first (that is the `--json`
output, once `as_json` has written its times as RFC 3339), then rendered as a table for
a person, so both always agree. A pass's own result (`reconcile`, `approve`) is shown
here too, fleets with their hosts beside stacks with their plan counts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.errors import NotFoundError
from agent.state.layout import StateLayout
from agent.state.store import RunStore, UnitOutcome, UnitRunRow, UnitStateRow, UnitStatus
from agent.units.decide import Decision
from agent.units.fleets import HOST_RESULTS_FILE, FleetOutcome, describe_fleet, host_states
from agent.units.stacks import describe_outcome
from providers.text import plural

# Keys that hold a Unix time in a view (`at`, `since`, any `*_at`: `started_at`,
# `converged_at`...): `--json` prints them as RFC 3339 strings.
TIME_KEYS = frozenset({"at", "since"})
TIME_SUFFIX = "_at"

LOG_FILES = ("init.txt", "plan.txt", "policy.txt", "apply.txt", "hosts.txt")


def status_view(store: RunStore, layout: StateLayout | None = None) -> dict[str, Any]:
    """Where each unit stands (a fleet's hosts too, given the layout), and the revision
    in force."""
    runs = store.runs(limit=1)
    last = runs[0] if runs else None
    units = [unit_view(state, layout) for state in store.unit_states()]
    return {
        "revision": store.current_revision(),
        "last_run": _run_entry(asdict(last)) if last else None,
        "units": units,
    }


def unit_view(state: UnitStateRow, layout: StateLayout | None = None) -> dict[str, Any]:
    """Where one unit stands (`agent status` shows one of these per unit)."""
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
    if state.preview_run_id:
        # A dry run's result, apart: it never stands for what the unit last did.
        entry["last_preview"] = {
            "run": state.preview_run_id,
            "result": state.preview_status,
            "decision": state.preview_decision,
            "at": state.preview_at,
        }
    if layout is not None and (hosts := host_states(layout, state.unit)):
        entry["hosts"] = hosts
    return entry


def history_view(
    store: RunStore, unit: str | None, limit: int, layout: StateLayout | None = None
) -> dict[str, Any]:
    """Past passes (newest first), or one unit's results in them (a fleet's with each
    host's counts, given the layout)."""
    if unit is not None:
        rows = store.unit_history(unit, limit)
        if not rows:
            raise NotFoundError(f"no run has reconciled a unit named {unit!r}")
        results = []
        for row in rows:
            entry = asdict(row)
            if layout is not None and (hosts := host_results(layout, row.run_id, unit)):
                entry["hosts"] = hosts
            results.append(entry)
        return {"unit": unit, "results": results}
    runs = []
    for run in store.runs(limit=limit):
        entry = _run_entry(asdict(run))
        entry["units"] = {r.unit: r.status for r in store.unit_runs(run.id)}
        runs.append(entry)
    return {"runs": runs}


def _run_entry(run: dict[str, Any]) -> dict[str, Any]:
    finished = run.get("finished_at")
    run["duration_s"] = round(finished - run["started_at"], 3) if finished else None
    return run


def host_results(layout: StateLayout, run_id: str, unit: str) -> list[dict[str, Any]]:
    """Each host's counts in a fleet unit's run (none for a stack, or an older run)."""
    try:
        data = json.loads((layout.unit_run_dir(run_id, unit) / HOST_RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def pass_view(result: Any) -> dict[str, Any]:
    """A pass's result (`reconcile`, `approve`) as `--json` shows it."""
    return {
        "run": result.run_id,
        "status": result.status,
        "revision": result.revision,
        "head": result.head,
        "error": result.error,
        "units": {name: outcome_view(o) for name, o in result.outcomes.items()},
        "suspended": list(result.suspended),
    }


def outcome_view(outcome: UnitOutcome) -> dict[str, Any]:
    """One unit's outcome; a fleet's has its hosts and which of them changed or failed."""
    data = asdict(outcome)
    if isinstance(outcome, FleetOutcome):
        data["changed_hosts"] = outcome.changed_hosts
        data["failed_hosts"] = outcome.failed_hosts
    return data


def describe_result(outcome: UnitOutcome) -> str:
    """One line for a person about a unit's outcome, stack or fleet."""
    if isinstance(outcome, FleetOutcome):
        return describe_fleet(outcome)
    return describe_outcome(outcome)


def render_pass(result: Any) -> str:
    rev = result.revision[:12] if result.revision else "none"
    lines = [f"run {result.run_id}: {result.status} at {rev}"]
    lines += [f"  {name}: {describe_result(o)}" for name, o in result.outcomes.items()]
    lines += [f"  {name}: suspended, left out (`agent resume {name}`)" for name in result.suspended]
    return "\n".join(lines)


def pending_changes(result: Any) -> bool:
    """Whether a pass leaves changes or drift waiting: held, reported, or planned only
    (`reconcile --detailed-exitcode` exits 2 for it, as `terraform plan` does)."""
    for outcome in result.outcomes.values():
        if outcome.status is UnitStatus.HELD or outcome.decision in (
            Decision.HOLD,
            Decision.REPORT,
        ):
            return True
        if outcome.decision == Decision.PLAN_ONLY:
            counts = (outcome.plan_add, outcome.plan_change, outcome.plan_destroy)
            if outcome.drift or any(counts):
                return True
    return False


def as_json(data: Any) -> Any:
    """`data` for `--json`: every Unix time under a time key as RFC 3339 (UTC)."""
    if isinstance(data, dict):
        return {
            key: rfc3339(value) if _is_time(key, value) else as_json(value)
            for key, value in data.items()
        }
    if isinstance(data, list | tuple):
        return [as_json(item) for item in data]
    return data


def _is_time(key: Any, value: Any) -> bool:
    named = isinstance(key, str) and (key in TIME_KEYS or key.endswith(TIME_SUFFIX))
    return named and isinstance(value, int | float) and not isinstance(value, bool)


def rfc3339(timestamp: float) -> str:
    """2026-12-07T04:46:23.512Z: RFC 3339, UTC, to the millisecond."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def logs_view(
    store: RunStore, layout: StateLayout, unit: str, run_id: str | None
) -> dict[str, Any]:
    """The Terraform output of a unit in a run (default: its latest run that planned)."""
    row = _unit_run_with_logs(store, layout, unit, run_id)
    unit_dir = layout.unit_run_dir(row.run_id, unit)
    files = {}
    for name in LOG_FILES:
        path = unit_dir / name
        if path.exists():
            files[name] = path.read_text(encoding="utf-8", errors="replace")
    return {"unit": unit, "run": row.run_id, "result": asdict(row), "files": files}


def _unit_run_with_logs(
    store: RunStore, layout: StateLayout, unit: str, run_id: str | None
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
    for row in history:
        if any((layout.unit_run_dir(row.run_id, unit) / n).exists() for n in LOG_FILES):
            return row
    return history[0]


# --- rendering --------------------------------------------------------------------


def render_status(view: dict[str, Any]) -> str:
    lines = [f"revision in force: {_short(view['revision']) or 'none yet'}"]
    last = view["last_run"]
    if last:
        lines.append(
            f"last run: {last['id']} {last['status']} ({_ago(last['started_at'])})"
            + (f"\n  {_first_line(last['error'])}" if last["error"] else "")
        )
    if not view["units"]:
        lines.append("no unit reconciled yet: run `agent reconcile --now`")
        return "\n".join(lines)
    rows = [
        [
            u["unit"],
            _short(u["revision"]) or "-",
            _result(u["last_result"], u["last_decision"]),
            "yes" if u["drift"] else "reverted" if u.get("drift_reverted") else "no",
            _ago(u["updated_at"]),
        ]
        for u in view["units"]
    ]
    lines.append("")
    lines.append(_table(["UNIT", "REVISION", "LAST RESULT", "DRIFT", "WHEN"], rows))
    for unit in view["units"]:
        if unit.get("hosts"):
            lines.append("")
            lines.append(f"hosts of {unit['unit']}:")
            host_rows = [
                [
                    h["host"],
                    h.get("address") or "-",
                    _short(h.get("revision")) or "-",
                    _host_result(h),
                    _ago(h.get("at")),
                ]
                for h in unit["hosts"]
            ]
            lines.append(_table(["HOST", "ADDRESS", "REVISION", "LAST RESULT", "WHEN"], host_rows))
    return "\n".join(lines)


def _host_result(host: dict[str, Any]) -> str:
    if host.get("status") != "ok":
        return f"failed: {_first_line(host.get('error') or '')}"[:80]
    if host.get("held"):
        return f"ok, {plural(host['held'], 'removal')} held for approval"
    if host.get("changed"):
        return f"ok, {host['changed']} changed"
    if host.get("pending"):
        return f"ok, {host['pending']} would change"
    return "ok"


def render_history(view: dict[str, Any]) -> str:
    if "unit" in view:
        rows = [
            [
                r["run_id"],
                _short(r["revision"]) or "-",
                _result(r["status"], r["decision"]),
                _counts(r),
                "yes" if r["drift"] else "no",
                _ago(r["started_at"]),
            ]
            for r in view["results"]
        ]
        return _table(["RUN", "REVISION", "RESULT", "PLAN", "DRIFT", "WHEN"], rows)
    if not view["runs"]:
        return "no runs yet"
    rows = [
        [
            r["id"],
            r["trigger"] + (" (dry run)" if r["dry_run"] else ""),
            _short(r["revision"]) or "-",
            r["status"],
            ", ".join(f"{u}:{s}" for u, s in r["units"].items()) or "-",
            _ago(r["started_at"]),
        ]
        for r in view["runs"]
    ]
    return _table(["RUN", "TRIGGER", "REVISION", "STATUS", "UNITS", "WHEN"], rows)


def render_logs(view: dict[str, Any]) -> str:
    result = view["result"]
    header = (
        f"# unit {view['unit']}, run {view['run']}: {_result(result['status'], result['decision'])}"
    )
    parts = [header]
    if result["error"]:
        parts.append(f"# {result['error']}")
    if not view["files"]:
        parts.append("(no Terraform output was recorded for this unit in this run)")
    for name, text in view["files"].items():
        parts.append(f"\n==> {name} <==\n{text.rstrip()}")
    return "\n".join(parts)


def _result(status: str | None, decision: str | None) -> str:
    if not status:
        return "-"
    return f"{status}/{decision}" if decision else status


def _counts(row: dict[str, Any]) -> str:
    if row.get("hosts"):  # a fleet: resources changed (or to change), on how many hosts
        hosts = row["hosts"]
        touched = sum(1 for h in hosts if h.get("changed") or h.get("pending") or h.get("held"))
        failed = sum(1 for h in hosts if h.get("status") != "ok")
        text = f"~{row['plan_change'] or 0} on {touched}/{len(hosts)} hosts"
        return text + (f", {failed} failed" if failed else "")
    if row["plan_add"] is None:
        return f"~{row['plan_change']}" if row["plan_change"] is not None else "-"
    return f"+{row['plan_add']} ~{row['plan_change']} -{row['plan_destroy']}"


def _short(revision: str | None) -> str:
    return revision[:12] if revision else ""


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def _ago(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    seconds = max(0.0, time.time() - timestamp)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = []
    for row in [headers, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
    return "\n".join(lines)


def run_dir_files(layout: StateLayout, run_id: str) -> list[Path]:
    """Every file a run wrote (for tests and support bundles)."""
    return sorted(p for p in layout.run_dir(run_id).rglob("*") if p.is_file())
