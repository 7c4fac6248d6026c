"""The daemon's answers on its control socket: ping, reconcile, approve, suspend, resume.

A reconcile or an approval is queued for the pass worker and the client is kept informed:
it gets that pass's events as they happen, then its result.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from agent import __version__
from agent.config import HostConfig
from agent.engine.reconcile import Reconciler
from agent.errors import AgentError, PassBusyError
from agent.policy.windows import override_record
from agent.service.control import (
    ControlError,
    Peer,
    Reply,
    check_not_suspended,
    known_units,
    resume_unit,
    suspend_unit,
)
from agent.service.planner import PassPlanner
from agent.service.triggers import Approval, TriggerQueue, Waiter
from agent.service.worker import PassWorker
from agent.units.changed import CLI_CHANGED_ONLY

# A part of the daemon: its lines say `daemon:` as the rest of it does.
log = logging.getLogger("agent.service.daemon")

_OVERFLOW_UID = 65534  # /proc/sys/kernel/overflowuid: how an unmapped uid is seen


class ControlRequests:
    """Serves control-socket requests for one daemon (the handler of its ControlServer)."""

    def __init__(
        self,
        host: HostConfig,
        reconciler: Reconciler,
        queue: TriggerQueue,
        planner: PassPlanner,
        worker: PassWorker,
        stopping: threading.Event,
    ) -> None:
        self.host = host
        self._reconciler = reconciler
        self._store = reconciler.store
        self._queue = queue
        self._planner = planner
        self._worker = worker
        self._stopping = stopping

    def handle(self, op: str, args: dict[str, Any], peer: Peer, reply: Reply) -> None:
        """A control-socket request (see agent.service.control)."""
        if self._stopping.is_set() and op != "ping":
            raise AgentError("the agent is stopping", hint="retry once it is back")
        asked_for = args.get("state_dir")
        if isinstance(asked_for, str) and asked_for != str(self.host.state_dir):
            # Another host config pointing at the same socket: never act on its behalf.
            raise ControlError(
                f"the agent on {self.host.service.control_socket} serves the state directory"
                f" {self.host.state_dir}, not {asked_for}",
                hint="give each host config its own control_socket",
            )
        if op == "ping":
            reply.result(
                {"version": __version__, "pid": os.getpid(), "running": self._worker.running}
            )
        elif op == "reconcile":
            self._remote_reconcile(args, peer, reply)
        elif op == "approve":
            self._remote_approve(args, peer, reply)
        elif op == "suspend":
            unit = _text(args, "unit")
            reason = args.get("reason") if isinstance(args.get("reason"), str) else None
            by = _who(peer, args)
            result = suspend_unit(self._store, unit, self._known(), by=by, reason=reason)
            reply.result(result)
        elif op == "resume":
            unit = _text(args, "unit")
            result = resume_unit(self._store, unit, self._known(), by=_who(peer, args))
            if result["changed"]:
                # A push it missed while suspended is applied now, not at the next timer.
                self._queue.add("resume", unit=unit)
            reply.result(result)
        elif op == "drain":
            reply.result(self._drain())
        else:
            raise AgentError(f"unknown control request {op!r}")

    def _drain(self) -> dict[str, Any]:
        """`agent drain`: take no new unit, count this agent out (idempotent: the CLI asks
        again until no lease is held)."""
        cluster = self._reconciler.cluster
        if cluster is None:
            raise AgentError(
                "this agent is not in a cluster (no `cluster:` in its host config)",
                hint="see docs/scale-out.md",
            )
        if not cluster.membership.draining:
            cluster.membership.drain()
        held = sorted(cluster.membership.held())
        return {"agent": cluster.name, "draining": True, "held": held}

    def _known(self) -> list[str]:
        """The units a command may name: the manifest's (as the last pass loaded it)."""
        if self._planner.manifest is None:
            return known_units(self._reconciler)
        return sorted(
            set(self._planner.manifest.names()) | {s.unit for s in self._store.unit_states()}
        )

    def _remote_reconcile(self, args: dict[str, Any], peer: Peer, reply: Reply) -> None:
        unit = args.get("unit") if isinstance(args.get("unit"), str) else None
        dry_run = bool(args.get("dry_run"))
        check_not_suspended(self._store, unit)
        if not args.get("wait", True) and (self._worker.running or self._queue.pending()):
            raise PassBusyError(
                f"the agent is busy ({self._worker.running or 'a pass is queued'})",
                hint="wait for it (`agent reconcile --now`), or follow it with `agent status`",
            )
        try:
            override = override_record(_who(peer, args), args.get("override_window"))
        except ValueError as exc:
            raise AgentError(str(exc), hint="say why, for the record") from None
        waiter = Waiter(lines=bool(args.get("lines")))
        if self._worker.running:
            waiter.info(f"waiting: {self._worker.running} is running; your pass follows it")
        log.info(
            "reconcile%s%s%s asked by %s%s",
            f" --unit {unit}" if unit else "",
            " --dry-run" if dry_run else "",
            " --changed-only" if args.get("changed_only") else "",
            peer.name,
            f" (change window override {override})" if override else "",
        )
        options = {"unit": unit, "dry_run": dry_run, "waiter": waiter, "override_window": override}
        # `--changed-only` is queued under a trigger of its own, so that merged with a full
        # request it never turns that one into a changed-only pass.
        trigger = CLI_CHANGED_ONLY if args.get("changed_only") else "cli"
        if not self._queue.add(trigger, full=unit is None, **options):
            raise AgentError("the agent is stopping: no new pass")
        waiter.relay(reply)

    def _remote_approve(self, args: dict[str, Any], peer: Peer, reply: Reply) -> None:
        unit = args.get("unit") if isinstance(args.get("unit"), str) else None
        approval = Approval(_text(args, "run"), unit, _who(peer, args), Waiter())
        log.info(
            "approve %s%s asked by %s",
            approval.run_id,
            f" --unit {unit}" if unit else "",
            peer.name,
        )
        if self._worker.running:
            approval.waiter.info(
                f"waiting: {self._worker.running} is running; the approval follows it"
            )
        if not self._queue.add_approval(approval):
            raise AgentError("the agent is stopping: nothing approved")
        approval.waiter.relay(reply)


def _who(peer: Peer, args: dict[str, Any]) -> str:
    """Who asked: the kernel's word (SO_PEERCRED). Under PrivateUsers=yes a caller other
    than root and the agent's user is unmapped (the overflow uid, "nobody"); then the name
    the client gave is recorded, marked as unverified."""
    claimed = args.get("user")
    if peer.uid == _OVERFLOW_UID and isinstance(claimed, str) and claimed.isprintable():
        return f"{claimed[:64]} (unverified)"
    return peer.name


def _text(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise AgentError(f"the request needs {key!r}")
    return value
