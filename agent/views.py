"""What the read commands show: status, history and logs, as text or as JSON.

Each view is built from the run store into plain dicts first (that is the `--json`
output), then rendered as a table for a person, so both always agree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agent.errors import NotFoundError
from agent.fleets import host_states
from agent.layout import StateLayout
from agent.store import RunStore, UnitRunRow

LOG_FILES = ("init.txt", "plan.txt", "apply.txt", "hosts.txt")


def status_view(store: RunStore, layout: StateLayout | None = None) -> dict[str, Any]:
    """Where each unit stands (a fleet's hosts too, given the layout), and the revision
    in force."""
    runs = store.runs(limit=1)
    last = runs[0] if runs else None
    units = []
    for state in store.unit_states():
        units.append(
            {
                "unit": state.unit,
                "revision": state.revision,
                "converged_at": state.converged_at,
                "last_result": state.last_status,
                "last_decision": state.last_decision,
                "drift": state.drift,
                "last_run": state.last_run_id,
                "updated_at": state.updated_at,
            }
        )
        if layout is not None and (hosts := host_states(layout, state.unit)):
            units[-1]["hosts"] = hosts
    return {
        "revision": store.current_revision(),
        "last_run": asdict(last) if last else None,
        "units": units,
    }


def history_view(store: RunStore, unit: str | None, limit: int) -> dict[str, Any]:
    """Past passes (newest first), or one unit's results in them."""
    if unit is not None:
        rows = store.unit_history(unit, limit)
        if not rows:
            raise NotFoundError(f"no run has reconciled a unit named {unit!r}")
        return {"unit": unit, "results": [asdict(r) for r in rows]}
    runs = []
    for run in store.runs(limit=limit):
        entry = asdict(run)
        entry["units"] = {r.unit: r.status for r in store.unit_runs(run.id)}
        runs.append(entry)
    return {"runs": runs}


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
            "yes" if u["drift"] else "no",
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
        return f"ok, {host['held']} removals held for approval"
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
    if row["plan_add"] is None:
        return "-"
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
