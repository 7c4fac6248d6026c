"""`converge`: one host, one facts round trip, a local diff, at most one apply round trip.

A host already in its desired state costs exactly one round trip. Host-level problems
(unreachable, no python3, sudo refused, a timeout) never raise: they come back as
`HostReport.error`, so the caller can converge many hosts in parallel.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from providers.errors import HostEngineError, ProviderError, ResourceConflictError
from providers.hosts import diff as kinds
from providers.hosts import plan, wire
from providers.hosts.model import (
    Change,
    Handler,
    HostReport,
    Resource,
    ResourceOutcome,
    Status,
)
from providers.hosts.textdiff import cap
from providers.text import plural
from providers.transport.base import Transport

log = logging.getLogger(__name__)

Facts = Mapping[str, Any]


def _outcome(
    resource: Resource,
    status: Status,
    changes: Sequence[Change] = (),
    error: str | None = None,
    existed: bool | None = None,
) -> ResourceOutcome:
    return ResourceOutcome(
        resource_id=resource.id,
        status=status,
        changes=tuple(change.text for change in changes),
        diff=cap("".join(change.diff for change in changes)),
        error=None if error is None else f"{resource.id}: {error}",
        existed=existed,
    )


# Kinds whose removal deletes something (files, accounts, packages): these can be held.
REMOVABLE = frozenset({"file", "template", "directory", "link", "package", "user", "group"})


def _existed(resource: Resource, facts: Facts | None) -> bool | None:
    """Whether the object was on the host before this converge (None: unknown)."""
    if facts is None or "error" in facts:
        return None
    if resource.kind == "package":
        return bool(facts.get("installed"))
    if resource.kind in REMOVABLE:
        return bool(facts.get("exists"))
    return None


def is_removal(resource: Resource) -> bool:
    """A resource whose desired state deletes something from the host."""
    return resource.kind in REMOVABLE and resource.attrs.get("state") == "absent"


def gather_facts(
    transport: Transport,
    resources: Sequence[Resource],
    *,
    become: bool,
    timeout: float = 300.0,
    python: str = "python3",
) -> list[Facts | None]:
    """The facts of every resource from one round trip (index-aligned with `resources`).

    A resource whose query cannot be built gets None. Raises TransportError or
    HostEngineError; `converge` turns those into a report.
    """
    queries: list[dict[str, Any]] = []
    for resource in resources:
        try:
            queries.append(kinds.query(resource))
        except (ResourceConflictError, KeyError, TypeError, ValueError):
            queries.append({"kind": "none"})  # its diff reports the problem
    answer = wire.call(
        transport,
        {"mode": "facts", "resources": queries},
        become=become,
        timeout=timeout,
        python=python,
    )
    facts = answer.get("facts")
    if not isinstance(facts, list) or len(facts) != len(resources):
        raise HostEngineError(f"{transport.host}: the facts answer does not match the resources")
    return facts


def _evaluate(resource: Resource, facts: Facts | None) -> tuple[list[Change] | None, str | None]:
    """(changes, None) or (None, error) for one resource."""
    if facts is None:
        facts = {}
    if "error" in facts:
        return None, str(facts["error"])
    try:
        return kinds.diff(resource, facts), None
    except ResourceConflictError as exc:
        return None, str(exc)
    except (KeyError, TypeError, ValueError) as exc:  # attributes the manifest layer let by
        return None, f"invalid attributes ({type(exc).__name__}: {exc})"


@dataclass
class _Pass:
    """What one converge call has learnt so far; outcomes stay index-aligned with resources."""

    resources: tuple[Resource, ...]
    outcomes: list[ResourceOutcome] = field(default_factory=list)
    planned: dict[int, list[Change]] = field(default_factory=dict)
    rechecked: set[int] = field(default_factory=set)  # the apply asks these again (recheck)
    operations: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    handlers_run: list[str] = field(default_factory=list)
    handler_errors: list[str] = field(default_factory=list)
    handlers_failed: list[str] = field(default_factory=list)
    hold_removals: bool = False
    expected: Mapping[str, Sequence[str]] | None = None
    removing: list[str] = field(default_factory=list)  # paths this pass removes, in order


def _emptied(resource: Resource, facts: Facts | None, removing: Sequence[str]) -> bool:
    """A directory to remove that holds only what earlier removals of this pass delete:
    its `not empty` is checked when it is removed (the host refuses if it still is)."""
    if resource.kind != "directory" or not is_removal(resource) or resource.attrs.get("recursive"):
        return False
    if not facts or facts.get("type") != "dir" or facts.get("link") or facts.get("empty"):
        return False
    prefix = resource.name.rstrip("/") + "/"
    return any(path.startswith(prefix) for path in removing)


def _stale(resource: Resource, changes: list[Change], expected: Sequence[str] | None) -> str | None:
    """Why an approved change no longer matches what was shown (None: it does)."""
    now = [change.text for change in changes]
    if not now or (expected is not None and list(expected) == now):
        return None  # as shown, or already done
    shown = "; ".join(expected or ()) or "nothing"
    return (
        f"stale: approved as {shown!r}, the host now needs {'; '.join(now) or 'nothing'!r};"
        " nothing done (run `agent reconcile --now` to plan again)"
    )


def _plan(state: _Pass, facts: Sequence[Facts | None], *, apply: bool) -> None:
    """Diff every resource; with `apply`, queue the operations of those that change."""
    for index, resource in enumerate(state.resources):
        if _emptied(resource, facts[index], state.removing):
            text = "remove directory (emptied by the removals before it)"
            changes, problem = [Change("state", "directory", "absent", text)], None
        else:
            changes, problem = _evaluate(resource, facts[index])
        existed = _existed(resource, facts[index])
        if changes and is_removal(resource) and resource.kind not in ("package", "user", "group"):
            state.removing.append(resource.name)
        if changes is not None and state.expected is not None:
            # An approval applies exactly what was shown, or nothing for that resource.
            problem = _stale(resource, changes, state.expected.get(resource.id))
            if problem is not None:
                changes = None
        if changes is None:
            state.outcomes.append(_outcome(resource, "failed", error=problem, existed=existed))
        elif not changes:
            state.outcomes.append(_outcome(resource, "ok", existed=existed))
            # An earlier change of this apply may move it (a command's guard, a service a
            # package's postinst started): the host asks again at its turn, so one pass converges.
            earlier = [state.resources[i] for i, _ in state.operations] if apply else []
            again = kinds.recheck(resource, facts[index] or {}, earlier) if earlier else None
            if again is not None:
                state.rechecked.add(index)
                state.planned[index] = []
                state.operations.append((index, again))
        elif not apply:
            state.outcomes.append(_outcome(resource, "would-change", changes, existed=existed))
        elif state.hold_removals and is_removal(resource):
            # policy.destroy: hold — shown, left for `agent approve`; the rest converges.
            state.outcomes.append(_outcome(resource, "held", changes, existed=existed))
        else:
            # "changed" until the host confirms it
            state.outcomes.append(_outcome(resource, "changed", changes, existed=existed))
            state.planned[index] = changes
            state.operations.append((index, kinds.operation(resource, facts[index] or {}, changes)))


def _apply(
    transport: Transport,
    state: _Pass,
    handlers: Mapping[str, Handler],
    *,
    become: bool,
    timeout: float,
    python: str,
    pending: Sequence[str],
) -> None:
    """The apply round trip: every queued operation, then the notified handlers (and the
    `pending` ones, which failed in an earlier pass and run whatever changes now)."""
    handler_ops, state.handler_errors = plan.build_handlers(
        state.resources, list(state.planned), handlers, pending=pending
    )
    spec = {"mode": "apply", "ops": plan.build_ops(state.operations), "handlers": handler_ops}
    try:
        answer = wire.call(transport, spec, become=become, timeout=timeout, python=python)
        results = {int(index): result for index, result in answer.get("results", [])}
        ran = [(str(entry["name"]), entry) for entry in answer.get("handlers", [])]
    except (ProviderError, KeyError, TypeError, ValueError) as exc:
        if not isinstance(exc, ProviderError):
            exc = HostEngineError(f"{transport.host}: unreadable apply answer ({exc!r})")
        for index, changes in state.planned.items():
            if index in state.rechecked:
                continue  # it may not have had to run at all: the next pass finds out
            reason = f"not confirmed, the apply round trip failed: {exc}"
            before = state.outcomes[index].existed
            state.outcomes[index] = _outcome(
                state.resources[index], "failed", changes, reason, existed=before
            )
        # Whatever changed may still need its handlers: keep them due.
        state.handlers_failed = [str(op["name"]) for op in handler_ops]
        raise exc from None
    for index, changes in state.planned.items():
        result = results.get(index)
        before = state.outcomes[index].existed
        if index in state.rechecked:
            outcome = _rechecked(state.resources[index], result)
        else:
            outcome = _confirmed(state.resources[index], changes, result)
        state.outcomes[index] = replace(outcome, existed=before)
    for name, entry in ran:
        if entry.get("ok"):
            state.handlers_run.append(name)
        else:
            state.handler_errors.append(f"handler {name!r}: {entry.get('error')}")
            state.handlers_failed.append(name)


def converge(
    transport: Transport,
    resources: Sequence[Resource],
    handlers: Mapping[str, Handler],
    *,
    apply: bool,
    become: bool,
    timeout: float = 300.0,
    python: str = "python3",
    pending_handlers: Sequence[str] = (),
    hold_removals: bool = False,
    expected: Mapping[str, Sequence[str]] | None = None,
) -> HostReport:
    """Bring one host to the desired state of `resources` (manifest order), or, with
    `apply=False`, report what would change. Never raises for a host problem.

    The transport is connected here and closed before returning. `timeout` bounds each
    round trip. `python` is the interpreter on the target (Python >= 3.7).
    `pending_handlers` run in the apply even if nothing notifies them (they failed before).
    `hold_removals`: removals are shown with status "held" and not applied.
    `expected` (resource id -> change lines, from an approval): a resource whose changes
    differ is not applied (stale), nor is one that is not listed.
    """
    started = time.monotonic()
    first_trip = transport.round_trips
    state = _Pass(resources=tuple(resources), hold_removals=hold_removals, expected=expected)
    pending = [name for name in pending_handlers if name in handlers] if apply else []
    error: str | None = None
    try:
        transport.connect()
        facts = gather_facts(
            transport, state.resources, become=become, timeout=timeout, python=python
        )
        _plan(state, facts, apply=apply)
        if state.operations or pending:
            _apply(
                transport,
                state,
                handlers,
                become=become,
                timeout=timeout,
                python=python,
                pending=pending,
            )
    except ProviderError as exc:
        error = str(exc)
    finally:
        with contextlib.suppress(ProviderError):
            transport.close()
    report = HostReport(
        host=transport.host,
        outcomes=tuple(state.outcomes),
        handlers_run=tuple(state.handlers_run),
        handler_errors=tuple(state.handler_errors),
        handlers_failed=tuple(state.handlers_failed),
        round_trips=transport.round_trips - first_trip,
        error=error,
        duration_s=time.monotonic() - started,
    )
    log.info(
        "%s: %d changed, %d would change, %d failed, %s, %.2fs%s",
        report.host,
        report.changed,
        report.pending,
        report.failed,
        plural(report.round_trips, "round trip"),
        report.duration_s,
        f", error: {error}" if error else "",
    )
    return report


def _confirmed(
    resource: Resource, changes: list[Change], result: Mapping[str, Any] | None
) -> ResourceOutcome:
    """The outcome of an applied resource, from the host's per-operation result."""
    if result is None:
        return _outcome(resource, "failed", changes, "the host reported no result")
    if not result.get("ok"):
        return _outcome(resource, "failed", changes, str(result.get("error")))
    if not result.get("changed"):  # a command whose guard was satisfied by an earlier change
        note = Change("run", None, None, f"not run: {result.get('note') or 'nothing to do'}")
        return _outcome(resource, "ok", [note])
    return _outcome(resource, "changed", changes)


def _rechecked(resource: Resource, result: Mapping[str, Any] | None) -> ResourceOutcome:
    """The outcome of a command the facts said to skip, whose guards the apply asked again."""
    if result is not None and not result.get("ok"):
        return _outcome(resource, "failed", error=str(result.get("error")))
    if result is None or not result.get("changed"):
        return _outcome(resource, "ok")  # still nothing to do (or unknown: the next pass asks)
    if resource.kind == "service":
        why = f"{result.get('note')} (checked again after a package change)"
        return _outcome(resource, "changed", [Change("state", None, why, why)])
    why = f"{result.get('note') or 'guards passed'}, checked after earlier changes"
    return _outcome(resource, "changed", [Change("run", None, why, f"run ({why})")])
