"""`agent proposals` and `agent logs UNIT --proposal REF`: proposal plans as dicts (`--json`)
and as text."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agent.errors import NotFoundError
from agent.state.proposals import ProposalRecords, ProposalRow
from agent.state.runfiles import RunFiles

MAX_LOG_CHARS = 200_000  # the rest of a huge plan is cut with a note


def _when(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def proposal_dict(row: ProposalRow) -> dict[str, Any]:
    return {
        "ref": row.ref,
        "head": row.head,
        "base": row.base,
        "author": row.author,
        "status": row.status,
        "detail": row.detail,
        "planned_at": _when(row.planned_at),
        "units": [
            {
                "unit": u.unit,
                "status": u.status,
                "add": u.plan_add,
                "change": u.plan_change,
                "destroy": u.plan_destroy,
                "detail": u.detail,
            }
            for u in row.units
        ],
    }


def render_proposals(rows: list[ProposalRow]) -> str:
    if not rows:
        return "no open proposals"
    lines: list[str] = []
    for row in rows:
        head = f"{row.ref}  {row.head[:12]}  {row.status}"
        if row.status == "planned":
            head += f"  {row.summary}"
        lines.append(head + (f": {row.detail}" if row.detail else ""))
        if row.author:
            lines.append(f"  author: {row.author}")
        for unit in row.units:
            counts = f" {unit.counts}" if unit.counts else ""
            detail = f": {unit.detail}" if unit.detail else ""
            lines.append(f"  {unit.unit}: {unit.status}{counts}{detail}")
        if not row.units and row.status == "planned":
            lines.append("  (no unit is affected)")
    return "\n".join(lines)


def find_proposal(records: ProposalRecords, ref: str) -> ProposalRow:
    """A proposal by its ref, or a short form: `pull/7/head`, a branch name, `7` (a pull or
    merge request number). NotFoundError lists the open ones."""
    for candidate in (
        ref,
        f"refs/{ref}",
        f"refs/heads/{ref}",
        f"refs/pull/{ref}/head",
        f"refs/merge-requests/{ref}/head",
    ):
        row = records.get(candidate)
        if row is not None:
            return row
    known = ", ".join(r.ref for r in records.all()) or "none"
    raise NotFoundError(f"no proposal {ref!r}", hint=f"open proposals: {known}")


def proposal_logs_view(
    records: ProposalRecords, proposals_dir: Path, unit: str, ref: str
) -> dict[str, Any]:
    """The plan output of `unit` in the last plan of proposal `ref`."""
    row = find_proposal(records, ref)
    found = records.unit(row.ref, unit)
    if found is None:
        units = ", ".join(u.unit for u in row.units) or "none"
        raise NotFoundError(
            f"proposal {row.ref} at {row.head[:12]} did not plan unit {unit!r}",
            hint=f"its units: {units}",
        )
    # From this agent's disk, else from a shared store (another agent planned it).
    files = RunFiles(records.store, runs_dir=proposals_dir / "runs")
    logs = {}
    for name in ("init.txt", "plan.txt"):
        text = files.read_text(found.plan_id, unit, name)
        if text is not None:
            if len(text) > MAX_LOG_CHARS:
                text = text[:MAX_LOG_CHARS] + f"\n[... cut at {MAX_LOG_CHARS} characters]"
            logs[name] = text
    return {
        "ref": row.ref,
        "head": row.head,
        "unit": unit,
        "status": found.status,
        "counts": found.counts or None,
        "detail": found.detail,
        "logs": logs,
    }


def render_proposal_logs(view: dict[str, Any]) -> str:
    counts = f" {view['counts']}" if view["counts"] else ""
    detail = f": {view['detail']}" if view["detail"] else ""
    lines = [f"# {view['unit']} in proposal {view['ref']} at {view['head'][:12]}:"]
    lines[0] += f" {view['status']}{counts}{detail}"
    for name, text in view["logs"].items():
        lines += [f"## {name}", text.rstrip("\n")]
    return "\n".join(lines)
