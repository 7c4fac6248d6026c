"""What a fleet unit's run says: each host's line and diff (`hosts.txt`, `agent logs`),
its result, and the unit's outcome with the one line `agent status` shows."""

from __future__ import annotations

from collections.abc import Sequence

from agent.state.store import UnitOutcome, UnitStatus
from agent.units.decide import Decision
from agent.units.fleettypes import FleetOutcome, HostResult
from providers.hosts.model import HostReport, ResourceOutcome
from providers.text import plural


def host_result(report: HostReport) -> HostResult:
    """What the unit's outcome keeps of a host: its counts and errors, without diffs."""
    return HostResult(
        host=report.host,
        status="ok" if report.ok else "failed",
        changed=report.changed,
        pending=report.pending,
        failed=report.failed + len(report.handler_errors),
        held=report.held,
        error=host_error(report) or None,
    )


def host_error(report: HostReport) -> str:
    """What went wrong on a host, without its name: every message that shows it names the
    host once, up front (transport errors start with `host: ` as raised)."""
    errors = [_unnamed(report)] if report.error else []
    # An outcome's error starts with its resource id already (`package:x: E: ...`).
    errors += [o.error for o in report.outcomes if o.error]
    errors += list(report.handler_errors)
    return "; ".join(e for e in errors if e)


def _unnamed(report: HostReport) -> str:
    """The host-level error without the `host: ` it was raised with."""
    return (report.error or "").removeprefix(f"{report.host}: ")


def host_line(report: HostReport) -> str:
    if report.error:
        return f"{report.host}: failed: {_unnamed(report)}"
    parts = []
    if report.changed:
        parts.append(f"{report.changed} changed")
    if report.pending:
        parts.append(f"{report.pending} would change")
    if report.held:
        parts.append(f"{plural(report.held, 'removal')} held for approval")
    if report.failed or report.handler_errors:
        parts.append(f"{report.failed + len(report.handler_errors)} failed")
    summary = ", ".join(parts) or "in its desired state"
    trips = plural(report.round_trips, "round trip")
    return f"{report.host}: {summary} ({trips}, {report.duration_s:.2f} s)"


def outcome_lines(outcomes: Sequence[ResourceOutcome], *, diffs: bool) -> list[str]:
    """A host's resources that did not stay `ok`: what changed, errors, and with `diffs`
    the content diffs."""
    lines: list[str] = []
    for outcome in outcomes:
        if outcome.status == "ok":
            continue
        lines.append(f"  {outcome.resource_id}: {outcome.status}")
        lines.extend(f"    {change}" for change in outcome.changes)
        if outcome.error:
            lines.append(f"    error: {outcome.error}")
        if diffs and outcome.diff:
            lines.extend(f"    {line}" for line in outcome.diff.rstrip("\n").split("\n"))
    return lines


def render_reports(reports: Sequence[HostReport]) -> str:
    """The per-host diff of a run, as `agent logs FLEET` shows it."""
    lines: list[str] = []
    for report in reports:
        lines.append(f"== {host_line(report)}")
        lines += outcome_lines(report.outcomes, diffs=True)
        if report.handlers_run:
            lines.append(f"  handlers run: {', '.join(report.handlers_run)}")
        lines.extend(f"  handler failed: {error}" for error in report.handler_errors)
    return "\n".join(lines) + "\n"


def fleet_outcome(
    hosts: Sequence[HostResult], *, apply: bool, dry_run: bool, revision_moved: bool
) -> UnitOutcome:
    changed = sum(h.changed for h in hosts)
    pending = sum(h.pending for h in hosts)
    held = sum(h.held for h in hosts)
    failed = [h for h in hosts if h.status != "ok"]
    found = changed + pending + held
    if dry_run:
        decision = Decision.PLAN_ONLY
    elif not found:
        decision = Decision.NOTHING
    elif apply:
        decision = Decision.APPLY
    else:
        decision = Decision.REPORT
    drift = bool(found) and not revision_moved
    if failed:
        # Each failed host named once, with its error.
        detail = "; ".join(f"{h.host}: {h.error or ''}" for h in failed)
        return FleetOutcome(
            status=UnitStatus.FAILED,
            decision=decision,
            drift=drift,
            plan_change=found,
            error=f"{len(failed)} of {plural(len(hosts), 'host')} failed: {detail}",
            hosts=tuple(hosts),
        )
    if held:
        names = ", ".join(h.host for h in hosts if h.held)
        return FleetOutcome(
            status=UnitStatus.HELD,
            decision=Decision.HOLD,
            drift=drift,
            plan_change=changed,
            plan_destroy=held,
            error=(
                f"{plural(held, 'removal')} on {names} {'is' if held == 1 else 'are'} held for"
                " approval (policy.destroy: hold);"
                " the rest was applied"
            ),
            hosts=tuple(hosts),
        )
    return FleetOutcome(
        status=UnitStatus.OK,
        decision=decision,
        drift=drift,
        plan_change=found,
        converged=apply or not found,
        hosts=tuple(hosts),
    )


def describe_fleet(outcome: UnitOutcome) -> str:
    """One line for a person: what a fleet unit's pass did, with its host counts."""
    if outcome.status in (UnitStatus.FAILED, UnitStatus.BLOCKED, UnitStatus.INTERRUPTED):
        return f"{outcome.status}: {outcome.error}"
    if outcome.status is UnitStatus.HELD:
        return f"held: {outcome.error}"
    decision = Decision(outcome.decision) if outcome.decision else Decision.SKIP
    if decision is Decision.ORPHAN:
        return f"orphaned: {outcome.error}"
    if decision is Decision.SKIP:
        return "drift check skipped"
    hosts = outcome.hosts if isinstance(outcome, FleetOutcome) else ()
    if decision is Decision.NOTHING:
        return f"{plural(len(hosts), 'host')} in the desired state" if hosts else "no changes"
    verb = {
        Decision.APPLY: "changed",
        Decision.REPORT: "drifted (reported, left as they are)",
        Decision.PLAN_ONLY: "would change",
    }.get(decision, str(decision))
    resources = f"{plural(outcome.plan_change or 0, 'resource')} {verb}"
    if not hosts:
        return resources + _drift_note(outcome)
    touched = outcome.changed_hosts if isinstance(outcome, FleetOutcome) else []
    names = ", ".join(touched[:5]) + (f", +{len(touched) - 5} more" if len(touched) > 5 else "")
    where = f" on {len(touched)} of {plural(len(hosts), 'host')} ({names})"
    return resources + where + _drift_note(outcome)


def _drift_note(outcome: UnitOutcome) -> str:
    if outcome.drift_overwritten:
        return "; drift overwritten by a change from Git"
    return " drift" if outcome.drift else ""
