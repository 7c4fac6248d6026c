"""What each page shows, as plain dicts built from the run store and the state directory.

The same sources as `agent status`, `agent history` and `agent logs` (agent.views): the
page never knows more than the command line does. Each builder reads only what its page
shows: one page of runs, the last result of each unit, the drift counts (the store
answers those with an index), so a store with 10,000 runs renders as fast as a new one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from agent.config.manifest import Manifest
from agent.errors import NotFoundError
from agent.state.hostrecords import host_records
from agent.state.layout import StateLayout
from agent.state.runfiles import RunFiles
from agent.state.store import (
    RemovedUnitRow,
    RevisionStatus,
    RunStore,
    UnitRunRow,
    UnitStateRow,
    UnitStatus,
)
from agent.units.decide import Decision
from agent.units.fleetledger import HELD_FILE
from agent.units.views import LOG_FILES, host_results, logs_view, unit_view
from providers.git_source import CommitInfo

__all__ = [
    "PAGE_SIZE",
    "activity_page",
    "classify_line",
    "overview_page",
    "unit_page",
    "unit_status",
]

PAGE_SIZE = 20  # runs per page of a unit
ACTIVITY_RUNS = 120  # passes drawn on the activity chart
DRIFT_WINDOW = 7 * 86400.0  # drift events counted on the activity page (seconds)
MAX_LOG_CHARS = 512 * 1024  # per file shown; the rest is in `agent logs`

CommitLookup = Callable[[str], CommitInfo | None]


def unit_status(
    state: UnitStateRow | None,
    *,
    drifted: bool,
    suspended: bool,
    known: bool,
    removed: str | None = None,
) -> str:
    """The one word the page shows for a unit (and colours it by); `removed`: where a unit
    the repository removed stands (pruning, held, orphaned: docs/policy.md, "Prune")."""
    if suspended:
        return "suspended"
    if state is None:
        return "pending"  # in the manifest, not reconciled yet
    if not known:
        # Reconciled once, no longer in the manifest in force: what its prune did so far
        # ("removed" until a pass has found it).
        return removed or "removed"
    last = state.last_status
    if last in (UnitStatus.RUNNING, UnitStatus.FAILED, UnitStatus.HELD, UnitStatus.BLOCKED):
        return str(last)
    if last == UnitStatus.INTERRUPTED:
        return "interrupted"
    return "drifted" if drifted else "converged"


def _commit(lookup: CommitLookup, sha: str | None) -> dict[str, Any] | None:
    if not sha:
        return None
    info = None
    try:
        info = lookup(sha)
    except Exception:  # a revision gone from the clone still shows its sha
        info = None
    return {
        "sha": sha,
        "short": sha[:12],
        "subject": info.summary if info else "",
        "author": info.author if info else "",
    }


def _duration(row: UnitRunRow | None) -> float | None:
    if row is None or row.finished_at is None:
        return None
    return round(row.finished_at - row.started_at, 2)


def _levels(order: list[str], deps: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """Each unit's column in the graph: one more than its deepest dependency."""
    level: dict[str, int] = {}
    for name in order:
        level[name] = 1 + max((level.get(d, 0) for d in deps.get(name, ())), default=-1)
    return level


def overview_page(
    store: RunStore,
    layout: StateLayout,
    manifest: Manifest | None,
    commit: CommitLookup,
    running: str | None = None,
) -> dict[str, Any]:
    """Every unit in dependency order with its status; the revision in force and the head."""
    states = {s.unit: s for s in store.unit_states()}
    records = host_records(store, layout)  # a fleet's hosts, on disk or in a shared store
    by_name = {name: unit_view(state, records) for name, state in states.items()}
    runs = store.runs(limit=1)
    last = asdict(runs[0]) if runs else None
    if last:
        finished = last["finished_at"]
        last["duration_s"] = round(finished - last["started_at"], 3) if finished else None
    revision = store.current_revision()
    last_rows = store.last_unit_runs()
    suspended = store.suspensions.by_unit()
    gone = store.removed.by_unit()
    if manifest is not None:
        order = list(manifest.order())
        deps = {u.name: u.depends_on for u in manifest.units}
        kinds = {u.name: u.kind for u in manifest.units}
    else:  # before the first pass since start: what the store knows, by name
        order, deps, kinds = sorted(states), {}, {}
    order += sorted(set(states) - set(order))  # orphans last
    levels = _levels(order, deps)
    units = []
    for name in order:
        state, view, row = states.get(name), by_name.get(name, {}), last_rows.get(name)
        removed = removed_entry(gone.get(name), name)
        # Before the page has a manifest (no pass since start), the store's word counts.
        known = manifest.get_unit(name) is not None if manifest is not None else not removed
        removed = None if known else removed
        word = unit_status(
            state,
            drifted=bool(view.get("drift")),
            suspended=name in suspended,
            known=known,
            removed=removed["status"] if removed else None,
        )
        hosts = view.get("hosts") or []
        units.append(
            {
                "name": name,
                "kind": kinds.get(name) or ("fleet" if hosts else "stack"),
                "status": word,
                "drift_reverted": bool(view.get("drift_reverted")) and word == "converged",
                "level": levels.get(name, 0),
                "depends_on": list(deps.get(name, ())),
                "revision": _commit(commit, state.revision if state else None),
                "converged_at": state.converged_at if state else None,
                "last_run": state.last_run_id if state else None,
                "last_at": row.started_at if row else None,
                "duration": _duration(row),
                "decision": state.last_decision if state else None,
                "error": row.error if row and word in ("failed", "blocked") else None,
                "hosts": len(hosts),
                "held_run": state.last_run_id if word == "held" and state else None,
                "removed": removed,
            }
        )
    head = last.get("head_revision") if last else None
    rejected = None
    if head and head != revision:
        verdict = store.revision_status(head)
        if verdict is not None and verdict[0] is RevisionStatus.REJECTED:
            rejected = {**(_commit(commit, head) or {}), "reason": verdict[1] or ""}
    columns: list[list[dict[str, Any]]] = [[] for _ in range(max(levels.values(), default=0) + 1)]
    for unit in units:
        columns[unit["level"]].append(unit)
    return {
        "revision": _commit(commit, revision),
        "head": _commit(commit, head),
        "rejected": rejected,
        "last_run": last,
        "running": running,
        "units": units,
        "columns": columns,
        "counts": _count(units),
    }


def removed_entry(row: RemovedUnitRow | None, name: str) -> dict[str, Any] | None:
    """What the page says of a unit the repository removed, as `agent status` does."""
    if row is None or row.status == "pruned":
        return None
    return {
        "status": row.status,
        "policy": row.policy,
        "since": row.since,
        "removed_at": row.removed_at[:12],
        "run": row.run_id,
        "error": row.error,
        "command": f"agent approve {row.run_id} --unit {name}"
        if row.status == "held" and row.run_id
        else None,
    }


def _count(units: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for unit in units:
        counts[unit["status"]] = counts.get(unit["status"], 0) + 1
    return counts


def unit_page(
    store: RunStore,
    layout: StateLayout,
    manifest: Manifest | None,
    commit: CommitLookup,
    name: str,
    *,
    page: int = 1,
    run: str | None = None,
) -> dict[str, Any]:
    """A unit: status, its runs (one page), the output of one run, drift, a held plan."""
    state = store.unit_state(name)
    known = manifest is not None and manifest.get_unit(name) is not None
    if state is None and not known:
        raise NotFoundError(f"no unit named {name!r}")
    total = store.count_unit_runs(name)
    pages = max(1, -(-total // PAGE_SIZE))
    page = min(max(1, page), pages)
    runs = []
    files = RunFiles(store, layout)  # from this agent's disk, else from a shared store
    rows = store.unit_history(name, PAGE_SIZE, (page - 1) * PAGE_SIZE)
    for row in rows:
        summary = asdict(row)
        summary["hosts"] = host_results(layout, row.run_id, name, store)
        runs.append(_run_summary(summary))
    if run is None:  # the newest run on this page that left output (a page's worth of stats)
        run = files.first_with(name, [r.run_id for r in rows], LOG_FILES)
    entry = unit_view(state, host_records(store, layout)) if state else {}
    removed = removed_entry(store.removed.by_unit().get(name), name)
    if manifest is not None and known:
        removed = None  # back in gitops.yaml (the next pass drops the row)
    word = unit_status(
        state,
        drifted=bool(entry.get("drift")),
        suspended=name in store.suspensions.by_unit(),
        known=known if manifest is not None else not removed,
        removed=removed["status"] if removed else None,
    )
    logs = logs_view(store, layout, name, run) if run is not None else None
    output = None
    if logs is not None:
        output = {
            "run": logs["run"],
            "result": _run_summary(logs["result"]),
            "files": [
                {"name": file, "lines": [classify_line(line) for line in _cap(text).splitlines()]}
                for file, text in logs["files"].items()
                if file in LOG_FILES
            ],
        }
    unit = manifest.get_unit(name) if manifest is not None else None
    held = _held(files, name, state) if word == "held" and state else None
    blocked: list[str] = []
    last = store.last_unit_run(name)
    if word == "failed" and last is not None:
        blocked = [
            r.unit
            for r in store.unit_runs(last.run_id)
            if r.status == UnitStatus.BLOCKED and r.unit != name
        ]
    return {
        "name": name,
        "kind": unit.kind if unit else ("fleet" if entry.get("hosts") else "stack"),
        "status": word,
        "depends_on": list(unit.depends_on) if unit else [],
        "dependents": sorted(manifest.dependents(name)) if manifest and unit else [],
        "revision": _commit(commit, state.revision if state else None),
        "converged_at": state.converged_at if state else None,
        "error": last.error if last and word in ("failed", "blocked", "pruning") else None,
        "removed": removed,
        "blocked": blocked,
        "held": held,
        "hosts": [_host(h) for h in entry.get("hosts") or []],
        "host_diff": _host_diff(files, name, last),
        "runs": runs,
        "page": page,
        "pages": pages,
        "total": total,
        "output": output,
        "drift": [_run_summary(asdict(r)) for r in store.drift_events(name, 10)],
    }


def _cap(text: str) -> str:
    if len(text) <= MAX_LOG_CHARS:
        return text
    return text[:MAX_LOG_CHARS] + "\n... (cut here: the whole output is in `agent logs`)"


def _run_summary(row: dict[str, Any]) -> dict[str, Any]:
    started, finished = row.get("started_at"), row.get("finished_at")
    counts = None
    if row.get("plan_add") is not None:
        counts = (row["plan_add"], row["plan_change"], row["plan_destroy"])
    elif row.get("plan_change") is not None:
        counts = (None, row["plan_change"], None)
    return {
        "run": row["run_id"],
        "revision": (row.get("revision") or "")[:12],
        "status": row["status"],
        "decision": row.get("decision"),
        "drift": bool(row.get("drift")),
        "drift_overwritten": bool(row.get("drift_overwritten")),
        "counts": counts,
        "started_at": started,
        "duration": round(finished - started, 2) if started and finished else None,
        "error": row.get("error"),
        "moved": row.get("moved"),
        "hosts": row.get("hosts") or [],
    }


def _host(host: dict[str, Any]) -> dict[str, Any]:
    return {
        "host": host.get("host"),
        "address": host.get("address"),
        "status": host.get("status"),
        "revision": (host.get("revision") or "")[:12],
        "changed": host.get("changed"),
        "pending": host.get("pending"),
        "held": host.get("held"),
        "round_trips": host.get("round_trips"),
        "at": host.get("at"),
        "error": host.get("error"),
    }


def _held(files: RunFiles, name: str, state: UnitStateRow) -> dict[str, Any] | None:
    """The plan a run held: what `agent approve` would apply, and the command (the files
    from this agent's disk, else from a shared store)."""
    run = state.last_run_id
    if run is None or state.last_decision not in (Decision.HOLD, None):
        return None
    plan = files.read_text(run, name, "plan.txt") or ""
    removals = None
    if (held := files.read_text(run, name, HELD_FILE)) is not None:
        try:
            removals = json.loads(held)
        except ValueError:
            removals = None
    return {
        "run": run,
        "command": f"agent approve {run} --unit {name}",
        "plan": [classify_line(line) for line in _cap(plan).splitlines()],
        "removals": removals,
    }


def _host_diff(files: RunFiles, name: str, last: UnitRunRow | None) -> list[tuple[str, str]]:
    if last is None:
        return []
    text = files.read_text(last.run_id, name, "hosts.txt")
    if text is None:
        return []
    return [classify_line(line) for line in _cap(text).splitlines()]


_HEADINGS = (
    ("will be created", "add"),
    ("will be updated in-place", "change"),
    ("will be destroyed", "destroy"),
    ("must be replaced", "replace"),
)


def classify_line(line: str) -> tuple[str, str]:
    """A line of Terraform (or host diff) output and its class: add, change, destroy,
    replace, summary, or "" (the colours the page gives `+`, `~`, `-`, `-/+` lines)."""
    body = line.lstrip()
    if body.startswith("#"):  # "# terraform_data.x will be destroyed": as its block
        for words, kind in _HEADINGS:
            if body.endswith(words):
                return kind, line
        return "", line
    if body.startswith(("-/+", "+/-")):
        return "replace", line
    if body.startswith("+"):
        return "add", line
    if body.startswith("~"):
        return "change", line
    if body.startswith("-") and not body.startswith("--"):
        return "destroy", line
    if body.startswith(("Plan:", "Apply complete!", "No changes.")):
        return "summary", line
    if body.startswith(("Error:", "│ Error:")):
        return "error", line
    return "", line


def activity_page(store: RunStore, now: float | None = None) -> dict[str, Any]:
    """Pass durations and outcomes (oldest to newest) and drift events per unit."""
    now = time.time() if now is None else now
    runs = list(reversed(store.runs(limit=ACTIVITY_RUNS)))
    passes = [
        {
            "run": r.id,
            "status": r.status,
            "trigger": r.trigger,
            "started_at": r.started_at,
            "duration": round(r.finished_at - r.started_at, 2) if r.finished_at else None,
        }
        for r in runs
    ]
    drift = store.drift_counts(since=now - DRIFT_WINDOW)
    return {"passes": passes, "drift": drift, "drift_days": int(DRIFT_WINDOW // 86400)}
