"""What the read commands show: status, history and logs, as text or as JSON.

Each view is built from the run store into plain dicts first (that is the `--json`
output, once `as_json` has written its times as RFC 3339), then rendered as a table for
a person, so both always agree. A pass's own result (`reconcile`, `approve`) is shown
here too, fleets with their hosts beside stacks with their plan counts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agent.errors import NotFoundError
from agent.state.hostrecords import host_records
from agent.state.layout import StateLayout
from agent.state.store import RunStore, UnitOutcome, UnitStatus
from agent.units.decide import Decision
from agent.units.fleetreport import describe_fleet
from agent.units.fleettypes import FleetOutcome
from agent.units.stacks import describe_outcome
from agent.units.views import LOG_FILES as LOG_FILES
from agent.units.views import host_results, rfc3339, unit_view
from agent.units.views import logs_view as logs_view
from providers.text import plural

# Keys that hold a Unix time in a view (`at`, `since`, any `*_at`: `started_at`,
# `converged_at`...): `--json` prints them as RFC 3339 strings.
TIME_KEYS = frozenset({"at", "since"})
TIME_SUFFIX = "_at"


def status_view(store: RunStore, layout: StateLayout | None = None) -> dict[str, Any]:
    """Where each unit stands (a fleet's hosts too, given the layout), and the revision
    in force."""
    runs = store.runs(limit=1)
    last = runs[0] if runs else None
    records = host_records(store, layout) if layout is not None else None
    units = [unit_view(state, records) for state in store.unit_states()]
    removed = store.removed.by_unit()
    agents = store.last_run_agents()
    for unit in units:
        unit["agent"] = agents.get(unit["unit"])
        if (gone := removed.get(unit["unit"])) is not None:
            # No longer in gitops.yaml: pruning, held or orphaned (docs/policy.md, "Prune").
            unit["removed"] = {
                "status": gone.status,
                "policy": gone.policy,
                "removed_at": gone.removed_at,
                "defined_at": gone.defined_at,
                "since": gone.since,
                "run": gone.run_id,
                "error": gone.error,
            }
    return {
        "revision": store.current_revision(),
        "last_run": _run_entry(asdict(last)) if last else None,
        "units": units,
    }


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
            if layout is not None and (hosts := host_results(layout, row.run_id, unit, store)):
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
    for name, outcome in result.outcomes.items():
        text = describe_result(outcome)
        if (outcome.preview or outcome.waiting) and outcome.error and outcome.error not in text:
            # What a dry run says a removal would do; which run holds a kept removal.
            text += f"; {outcome.error}"
        lines.append(f"  {name}: {text}")
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
            f"removed: {u['removed']['status']}"
            if u.get("removed")
            else _result(u["last_result"], u["last_decision"]),
            "yes" if u["drift"] else "reverted" if u.get("drift_reverted") else "no",
            _ago(u["updated_at"]),
        ]
        for u in view["units"]
    ]
    headers = ["UNIT", "REVISION", "LAST RESULT", "DRIFT", "WHEN"]
    # Several agents on one store (docs/scale-out.md): say which one ran each unit last.
    if len({u.get("agent") for u in view["units"]}) > 1:
        rows = [[*row, u.get("agent") or "-"] for row, u in zip(rows, view["units"], strict=True)]
        headers.append("AGENT")
    lines.append("")
    lines.append(_table(headers, rows))
    unchanged = [u for u in view["units"] if u.get("unchanged_since")]
    if unchanged:
        newest = max(unchanged, key=lambda u: u["unchanged_since"]["at"])["unchanged_since"]
        lines.append("")
        lines.append(
            f"unchanged, nothing run (inputs as at their last clean plan; last checked by"
            f" run {newest['run']}, {_ago(newest['at'])}): "
            + ", ".join(u["unit"] for u in unchanged)
        )
    gone = [u for u in view["units"] if u.get("removed")]
    if gone:
        lines.append("")
        lines.append("removed from gitops.yaml:")
        for unit in gone:
            lines.append(f"  {unit['unit']}: {_removed_line(unit['unit'], unit['removed'])}")
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


def _removed_line(name: str, removed: dict[str, Any]) -> str:
    status = removed["status"]
    since = f"since {_short(removed['removed_at'])} ({_ago(removed['since'])})"
    if status == "held":
        return f"held: its removal waits, `agent approve {removed['run']} --unit {name}`; {since}"
    if status == "orphaned":
        return f"orphaned: what it created was left as it is; {since}"
    error = f": {_first_line(removed['error'])}" if removed.get("error") else ""
    return f"pruning{error}; {since}"


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
    headers = ["RUN", "TRIGGER", "REVISION", "STATUS", "UNITS", "WHEN"]
    # Several agents on one store (docs/scale-out.md): say which one ran each pass.
    if len({r.get("agent") for r in view["runs"]}) > 1:
        rows = [[*row, r.get("agent") or "-"] for row, r in zip(rows, view["runs"], strict=True)]
        headers.append("AGENT")
    return _table(headers, rows)


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
