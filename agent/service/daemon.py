"""`agent run`: the daemon. Timers, webhooks and the CLI ask for passes; one worker runs them.

    triggers ──> TriggerQueue (coalesces) ──> worker thread ──> Reconciler.run_pass
    poll, drift, per-unit drift (APScheduler)     one pass at a time
    webhooks (AgentHTTPServer)                    events -> log lines, control clients,
    reconcile/approve (ControlServer)             metrics; results -> notifications

Triggers that arrive while a pass runs are coalesced into exactly one follow-up pass (a
full pass if any of them asked for one; a dry run is never merged with a real pass).
Timer passes skip units that keep failing until their backoff has passed
(`min(poll * 2**N, daemon.backoff_max)` after the N-th failure in a row); webhooks and the
CLI ignore backoff. A poll runs a pass only if the branch head moved since the daemon
last reconciled every unit, or failed units are due for a retry.

Stopping (SIGTERM/SIGINT): STOPPING=1; the timers, the HTTP listener and the control
socket stop taking work; the running pass is interrupted (Terraform gets one SIGINT and is
waited for, so its state lock is released) for up to `daemon.stop_timeout`; exit 0. Past
that, whatever the pass still runs is killed, and the exit code is 1. The next start runs a
full pass, which marks the cut run interrupted and converges again.

A pass that raises something other than an AgentError (the store locked by another
process, the disk full) never leaves a client waiting: each one waiting on that work gets
the reason as an error (a StoreError naming the store), and the poll retries the pass.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from agent import __version__
from agent.config import HostConfig, Manifest
from agent.config.service import read_secret_file
from agent.core.fsutil import private_umask
from agent.core.progress import Event, EventKind
from agent.core.redact import install_logging_redaction, remove_logging_redaction
from agent.engine.reconcile import ApprovalRefused, PassRequest, PassResult, Reconciler
from agent.errors import AgentError, PassBusyError, StoreError
from agent.policy.windows import override_record
from agent.service import sdnotify
from agent.service.control import (
    ControlError,
    ControlServer,
    Peer,
    Reply,
    check_not_suspended,
    encode_result,
    is_internal,
    known_units,
    register_error_type,
    resume_unit,
    suspend_unit,
)
from agent.service.http_server import AgentHTTPServer
from agent.service.logfmt import EventLog, RunContext
from agent.service.metrics import AgentMetrics, record_run
from agent.service.notify import Event as Notification
from agent.service.notify import NotificationSink, Notifier, unit_events
from agent.service.webhooks import PushEvent, WebhookSource
from agent.state.store import RunStatus, UnitStatus
from agent.state.storefile import StoreDamaged, StoreFull
from providers.text import plural

log = logging.getLogger(__name__)

NOTIFY_STOP_TIMEOUT = 5.0
_BUSY_RETRY = 0.5  # seconds between tries while another process holds the pass lock
_MAIN_TICK = 5.0  # the main thread's longest sleep between looks at the stop flag
# Which trigger names a pass when several were coalesced: the most deliberate one.
_TRIGGER_RANK = ("cli", "approve", "resume", "webhook", "start", "drift", "poll")

register_error_type(ApprovalRefused)
# (so that a damaged or full store exits 3 through the daemon as it does directly)
register_error_type(StoreDamaged)
register_error_type(StoreFull)


# --- what waits for a pass --------------------------------------------------------------------


class Waiter:
    """A control client waiting for the pass that serves its request: it gets that pass's
    events as they happen, then its result (or an error)."""

    def __init__(self, *, lines: bool = False) -> None:
        self.lines = lines  # wants every line of Terraform output too
        self._items: queue.Queue[tuple[str, Any]] = queue.Queue()

    def event(self, event: Event) -> None:
        if is_internal(event) or (event.kind is EventKind.UNIT_LINE and not self.lines):
            return
        self._items.put(("event", event))

    def info(self, message: str) -> None:
        self._items.put(("info", message))

    def result(self, result: PassResult) -> None:
        self._items.put(("result", result))

    def error(self, exc: AgentError) -> None:
        self._items.put(("error", exc))

    def relay(self, reply: Reply) -> None:
        """Forward everything to `reply` until the result or error (or the client leaves)."""
        while True:
            kind, item = self._items.get()
            if kind == "event":
                reply.event(item)
            elif kind == "info":
                reply.info(item)
            elif kind == "result":
                reply.result(encode_result(item))
                return
            else:
                reply.error(item)
                return
            if reply.gone:
                return  # the pass goes on; nobody reads its events any more


@dataclass
class Batch:
    """Triggers waiting for the next pass, coalesced."""

    dry_run: bool = False
    triggers: set[str] = field(default_factory=set)
    full: bool = False  # someone explicitly asked for every unit
    units: set[str] = field(default_factory=set)  # explicitly asked units
    unit_drifts: set[str] = field(default_factory=set)  # units whose own drift timer fired
    drift: bool = False  # the global drift timer fired
    poll: bool = False  # the poll timer fired
    waiters: list[Waiter] = field(default_factory=list)
    count: int = 0
    override_window: str | None = None  # "by USER: REASON" (`--override-window`)

    @property
    def explicit(self) -> bool:
        """Asked for by a person or a push: backoff does not apply."""
        return self.full or bool(self.units)

    @property
    def trigger(self) -> str:
        return next((t for t in _TRIGGER_RANK if t in self.triggers), "poll")


@dataclass
class Approval:
    """`agent approve RUN [--unit U]`, waiting for the worker (approvals are never merged)."""

    run_id: str
    unit: str | None
    by: str
    waiter: Waiter


class TriggerQueue:
    """At most one pending pass (and one pending dry run); approvals in arrival order."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: Batch | None = None
        self._pending_dry: Batch | None = None
        self._approvals: deque[Approval] = deque()
        self._closed = False

    def add(
        self,
        trigger: str,
        *,
        full: bool = False,
        unit: str | None = None,
        dry_run: bool = False,
        drift: bool = False,
        unit_drift: str | None = None,
        poll: bool = False,
        waiter: Waiter | None = None,
        override_window: str | None = None,
    ) -> bool:
        """Queue a trigger; False when the daemon is stopping."""
        with self._cond:
            if self._closed:
                return False
            if dry_run:
                self._pending_dry = batch = self._pending_dry or Batch(dry_run=True)
            else:
                self._pending = batch = self._pending or Batch()
            batch.triggers.add(trigger)
            batch.count += 1
            batch.full |= full
            batch.drift |= drift
            batch.poll |= poll
            if unit is not None:
                batch.units.add(unit)
            if unit_drift is not None:
                batch.unit_drifts.add(unit_drift)
            if waiter is not None:
                batch.waiters.append(waiter)
            batch.override_window = override_window or batch.override_window
            self._cond.notify_all()
            return True

    def add_approval(self, approval: Approval) -> bool:
        with self._cond:
            if self._closed:
                return False
            self._approvals.append(approval)
            self._cond.notify_all()
            return True

    def pending(self) -> bool:
        with self._cond:
            return bool(self._pending or self._pending_dry or self._approvals)

    def take(self) -> Batch | Approval | None:
        """The next work (approvals first, then passes, then dry runs); None once closed."""
        with self._cond:
            while not self._closed:
                if self._approvals:
                    return self._approvals.popleft()
                if self._pending is not None:
                    batch, self._pending = self._pending, None
                    return batch
                if self._pending_dry is not None:
                    batch, self._pending_dry = self._pending_dry, None
                    return batch
                self._cond.wait()
            return None

    def close(self) -> list[Waiter]:
        """Take no more work; the waiters of work not started (to tell them)."""
        with self._cond:
            self._closed = True
            waiters = [a.waiter for a in self._approvals]
            for batch in (self._pending, self._pending_dry):
                waiters += batch.waiters if batch else []
            self._approvals.clear()
            self._pending = self._pending_dry = None
            self._cond.notify_all()
            return waiters


# --- the daemon -----------------------------------------------------------------------------


class Daemon:
    """The agent as a service. `run()` blocks until SIGTERM/SIGINT and returns the exit code."""

    def __init__(self, host: HostConfig, *, run_context: RunContext | None = None) -> None:
        self.host = host
        self.service = host.service
        self.events = EventLog(run_context or RunContext())
        self.reconciler = Reconciler(host, reporter=self._on_event)
        self.redactor = self.reconciler.redactor
        self.store = self.reconciler.store
        install_logging_redaction(self.redactor)
        self.metrics = AgentMetrics(self.redactor)
        # Secrets from files (webhook secrets, sink URLs) are read now: a missing or
        # world-readable file stops the start with an error naming the config key.
        self.notifier = Notifier(
            self._sinks(),
            self.redactor,
            on_result=lambda sink, result: self.metrics.notification_finished(
                sink_kind=sink.kind, sink_host=sink.host, result=result
            ),
        )
        self.http = self._http_server()
        self.control = ControlServer(self.service.control_socket, self)
        self.queue = TriggerQueue()
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self.watchdog = sdnotify.Watchdog()
        self._worker = threading.Thread(target=self._work, name="pass-worker", daemon=True)
        self._signal = threading.Event()
        self._signals_seen = 0
        self._stopping = threading.Event()
        self._subscribers: list[Waiter] = []
        self._sub_lock = threading.Lock()
        self._running: str | None = None  # what the worker is doing, for status answers
        self._manifest: Manifest | None = None
        self._last: PassResult | None = None
        self._seen_head: str | None = None  # the head the last complete pass reconciled
        self._pass_failures = 0  # passes in a row that failed before any unit ran
        self._pass_failed_at = 0.0
        self._fetch_error: str | None = None
        self._warned_units: set[str] = set()

    # --- set-up -------------------------------------------------------------------------

    def _sinks(self) -> list[NotificationSink]:
        sinks = []
        for sink in self.service.notifications:
            url = sink.url
            if url is None:
                assert sink.url_file is not None
                url = read_secret_file(sink.url_file, sink.where, "a notification URL")
            self.redactor.register(url)  # a Slack URL is a credential: never in a log
            sinks.append(NotificationSink(sink.kind, url, sink.events, sink.timeout))
        return sinks

    def _http_server(self) -> AgentHTTPServer | None:
        http = self.service.http
        if http is None:
            return None
        hooks = {}
        for name, hook in http.webhooks.items():
            secret = read_secret_file(hook.secret_file, hook.where, f"the {hook.kind} secret")
            self.redactor.register(secret)
            hooks[name] = WebhookSource(hook.kind, secret)
        return AgentHTTPServer(
            http.host,
            http.port,
            tracked_branch=self.host.repo.branch,
            hooks=hooks,
            on_push=self._on_push,
            metrics=self.metrics.render,
            health=self._health,
            max_body=http.max_body,
        )

    def _schedule(self) -> None:
        intervals, knobs = self.host.intervals, self.service.daemon

        def every(seconds: float) -> IntervalTrigger:
            return IntervalTrigger(seconds=seconds, jitter=knobs.jitter_for(seconds) or None)

        self.scheduler.add_job(
            self.queue.add, every(intervals.poll), args=["poll"], kwargs={"poll": True}, id="poll"
        )
        self.scheduler.add_job(
            self.queue.add, every(intervals.drift), args=["drift"], kwargs={"drift": True}
        )
        for unit, own in intervals.units.items():
            self.scheduler.add_job(
                self.queue.add, every(own.drift), args=["drift"], kwargs={"unit_drift": unit}
            )

    # --- running --------------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop; the exit code."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        # Python runs signal handlers in the main thread only, and only when it runs
        # bytecode: a signal the kernel delivers to another thread would not wake a main
        # thread blocked on a lock. A wakeup fd is written by whichever thread gets it.
        wake, wakeup = socket.socketpair()
        wakeup.setblocking(False)
        wake.settimeout(_MAIN_TICK)
        old_fd = signal.set_wakeup_fd(wakeup.fileno(), warn_on_full_buffer=False)
        try:
            self.start()
            while not self._signal.is_set():
                with contextlib.suppress(TimeoutError):
                    wake.recv(64)
            return self.stop()
        finally:
            signal.set_wakeup_fd(old_fd)
            wake.close()
            wakeup.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def start(self) -> None:
        """Listeners up, timers on, the first pass queued, then READY=1."""
        self.control.start()
        try:
            if self.http is not None:
                self.http.start()
        except AgentError:
            self.control.stop()
            raise
        self.notifier.start()
        self._worker.start()
        self._schedule()
        self.scheduler.start()
        listening = f", listening on {self.http.url}" if self.http is not None else ""
        log.info(
            "gitops-agent %s running: %s (%s), poll every %gs, drift every %gs%s",
            __version__,
            self.host.repo.url,
            self.host.repo.branch,
            self.host.intervals.poll,
            self.host.intervals.drift,
            listening,
        )
        sdnotify.ready(f"running; following {self.host.repo.branch}")
        self.watchdog.start()
        # The first pass converges whatever a stop cut short, and learns the manifest.
        self.queue.add("start", full=True)

    def stop(self) -> int:
        """Stop taking work, interrupt the running pass and wait for it (up to
        `daemon.stop_timeout`). 0 when it ended in time, else 1."""
        self._stopping.set()
        sdnotify.stopping()
        with contextlib.suppress(Exception):
            self.scheduler.shutdown(wait=False)
        if self.http is not None:
            self.http.stop()
        for waiter in self.queue.close():
            waiter.error(AgentError("the agent is stopping: the pass you asked for did not run"))
        busy = self._running
        self.reconciler.interrupt()
        if busy:
            log.info("waiting up to %gs for %s to stop", self.service.daemon.stop_timeout, busy)
        self._worker.join(self.service.daemon.stop_timeout)
        drained = not self._worker.is_alive()
        self.control.stop()
        self.notifier.stop(NOTIFY_STOP_TIMEOUT)
        self.watchdog.stop()
        if not drained:
            # Terraform had its chance to stop; nothing it started may outlive the agent.
            killed = self.reconciler.children.end_running()
            if killed:
                log.warning(
                    "killed what the cut pass still ran: pid %s", ", ".join(map(str, killed))
                )
            log.error(
                "%s did not stop within daemon.stop_timeout (%gs): exiting anyway; the next"
                " start marks it interrupted",
                self._running,
                self.service.daemon.stop_timeout,
            )
            return 1
        self.reconciler.close()
        log.info("stopped")
        # Nothing of this daemon stays in the process's logging (an embedding, or the
        # tests, may start another one).
        remove_logging_redaction(self.redactor)
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals_seen += 1
        name = signal.Signals(signum).name
        if self._signals_seen == 1:
            log.info("%s: stopping (a running pass is interrupted and waited for)", name)
            self._signal.set()
        else:
            log.warning("%s: still stopping; Terraform is releasing its state lock", name)

    def _on_hangup(self, signum: int, frame: FrameType | None) -> None:
        log.warning("SIGHUP: the config is read at start only; restart the agent to reload it")

    # --- triggers ---------------------------------------------------------------------------

    def _on_push(self, push: PushEvent) -> None:
        if not self.queue.add("webhook", full=True):
            log.info("webhook ignored: the agent is stopping")

    def handle(self, op: str, args: dict[str, Any], peer: Peer, reply: Reply) -> None:
        """A control-socket request (see agent.service.control)."""
        if self._stopping.is_set() and op != "ping":
            raise AgentError("the agent is stopping", hint="retry once it is back")
        asked_for = args.get("state_dir")
        if isinstance(asked_for, str) and asked_for != str(self.host.state_dir):
            # Another host config pointing at the same socket: never act on its behalf.
            raise ControlError(
                f"the agent on {self.service.control_socket} serves the state directory"
                f" {self.host.state_dir}, not {asked_for}",
                hint="give each host config its own control_socket",
            )
        if op == "ping":
            reply.result({"version": __version__, "pid": os.getpid(), "running": self._running})
        elif op == "reconcile":
            self._remote_reconcile(args, peer, reply)
        elif op == "approve":
            self._remote_approve(args, peer, reply)
        elif op == "suspend":
            unit = _text(args, "unit")
            reason = args.get("reason") if isinstance(args.get("reason"), str) else None
            by = _who(peer, args)
            result = suspend_unit(self.store, unit, self._known(), by=by, reason=reason)
            reply.result(result)
        elif op == "resume":
            unit = _text(args, "unit")
            result = resume_unit(self.store, unit, self._known(), by=_who(peer, args))
            if result["changed"]:
                # A push it missed while suspended is applied now, not at the next timer.
                self.queue.add("resume", unit=unit)
            reply.result(result)
        else:
            raise AgentError(f"unknown control request {op!r}")

    def _known(self) -> list[str]:
        """The units a command may name: the manifest's (as the last pass loaded it)."""
        if self._manifest is None:
            return known_units(self.reconciler)
        return sorted(set(self._manifest.names()) | {s.unit for s in self.store.unit_states()})

    def _remote_reconcile(self, args: dict[str, Any], peer: Peer, reply: Reply) -> None:
        unit = args.get("unit") if isinstance(args.get("unit"), str) else None
        dry_run = bool(args.get("dry_run"))
        check_not_suspended(self.store, unit)
        if not args.get("wait", True) and (self._running or self.queue.pending()):
            raise PassBusyError(
                f"the agent is busy ({self._running or 'a pass is queued'})",
                hint="wait for it (`agent reconcile --now`), or follow it with `agent status`",
            )
        try:
            override = override_record(_who(peer, args), args.get("override_window"))
        except ValueError as exc:
            raise AgentError(str(exc), hint="say why, for the record") from None
        waiter = Waiter(lines=bool(args.get("lines")))
        if self._running:
            waiter.info(f"waiting: {self._running} is running; your pass follows it")
        log.info(
            "reconcile%s%s asked by %s%s",
            f" --unit {unit}" if unit else "",
            " --dry-run" if dry_run else "",
            peer.name,
            f" (change window override {override})" if override else "",
        )
        options = {"unit": unit, "dry_run": dry_run, "waiter": waiter, "override_window": override}
        if not self.queue.add("cli", full=unit is None, **options):
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
        if self._running:
            approval.waiter.info(f"waiting: {self._running} is running; the approval follows it")
        if not self.queue.add_approval(approval):
            raise AgentError("the agent is stopping: nothing approved")
        approval.waiter.relay(reply)

    # --- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        while (item := self.queue.take()) is not None:
            try:
                if isinstance(item, Approval):
                    self._approve(item)
                else:
                    self._serve(item)
            except Exception as exc:  # a bug must not stop the daemon taking the next pass
                log.exception("the pass worker failed")
                # Nobody may wait for ever: whoever asked for this work hears why it failed.
                error = self._unexpected(exc)
                for waiter in [item.waiter] if isinstance(item, Approval) else item.waiters:
                    waiter.error(error)
            finally:
                self._running = None

    def _serve(self, batch: Batch) -> None:
        request, complete = self._request_for(batch)
        if request is None or self._stopping.is_set():
            return  # nothing to do; or a stop came while the poll fetched
        self.events.describe = _describe(request, batch)
        result = self._run(lambda: self.reconciler.run_pass(request, wait=False), batch.waiters)
        if result is None:
            return
        if request.unit is None and not request.dry_run and complete and result.head:
            self._seen_head = result.head
        if not request.dry_run and request.unit is None:
            if result.status is RunStatus.FAILED and not result.outcomes:
                self._pass_failures += 1
                self._pass_failed_at = time.time()
            elif result.outcomes:
                self._pass_failures = 0
        for waiter in batch.waiters:
            waiter.result(result)

    def _approve(self, approval: Approval) -> None:
        self.events.describe = f" (approve {approval.run_id} by {approval.by})"
        result = self._run(
            lambda: self.reconciler.approve(
                approval.run_id, approval.unit, by=approval.by, wait=False
            ),
            [approval.waiter],
        )
        if result is None:
            return
        approval.waiter.result(result)
        if any(o.converged for o in result.outcomes.values()):
            # Units that depend on the approved ones were blocked by the hold: converge them.
            self.queue.add("approve", full=True)

    def _run(self, call: Any, waiters: list[Waiter]) -> PassResult | None:
        """Run a pass (or an approval) with `waiters` subscribed to its events; retried
        while another process holds the pass lock. Its result, after metrics and
        notifications; None when it could not run (the waiters are told why)."""
        told = False
        with self._sub_lock:
            self._subscribers = list(waiters)
        try:
            while True:
                self._running = "a pass"
                try:
                    result: PassResult = call()
                    break
                except PassBusyError as exc:
                    if self._stopping.is_set():
                        raise AgentError("the agent is stopping: the pass did not run") from exc
                    if not told:
                        log.info("waiting: %s", exc.message)
                        for waiter in waiters:
                            waiter.info(f"waiting: {exc.message}")
                        told = True
                    self._stopping.wait(_BUSY_RETRY)
        except AgentError as exc:
            log.warning("%s", exc.message)
            for waiter in waiters:
                waiter.error(exc)
            return None
        except Exception as exc:  # the store locked, the disk full, or a bug
            error = self._unexpected(exc)
            log.error("%s", error.message)
            log.debug("the pass raised", exc_info=True)
            for waiter in waiters:
                waiter.error(error)
            # A timer retries after the backoff; that pass also marks this run's row if
            # it could not be closed now.
            self._pass_failures += 1
            self._pass_failed_at = time.time()
            return None
        finally:
            with self._sub_lock:
                self._subscribers = []
        self._after(result)
        return result

    def _unexpected(self, exc: Exception) -> AgentError:
        """What a client is told when a pass raised something other than an AgentError."""
        if isinstance(exc, AgentError):
            return exc
        path = self.store.path
        text = self.redactor.redact(str(exc))
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
            return StoreError(
                f"the run store {path} is locked: another process holds a write transaction"
                f" on it ({text}); the pass did not run to its end",
                hint=f"find the holder (`fuser -v {path}`) and end its transaction; the agent"
                " retries at the next poll, or run `agent reconcile --now` again",
            )
        if isinstance(exc, sqlite3.DatabaseError | OSError):
            return StoreError(
                f"the pass could not write to the state directory {path.parent}: {text}",
                hint="check its free space and permissions; the agent retries at the next poll",
            )
        return AgentError(
            f"the pass failed: {type(exc).__name__}: {text}",
            hint="see the agent's log (journalctl -u gitops-agent) and report it",
        )

    def _on_event(self, event: Event) -> None:
        """Every event of a pass (from the worker and unit threads)."""
        if event.kind is EventKind.PASS_STARTED:
            self._running = f"run {event.run_id}"
            sdnotify.status(f"{self._running} in progress{self.events.describe}")
        self.events(event)
        if event.kind is EventKind.MANIFEST_LOADED and isinstance(event.result, Manifest):
            self._manifest = event.result
            self.metrics.declare_units({u.name: u.kind for u in event.result.units})
            # At start (the first pass loads it), not when the unit's timer first fires.
            self._warn_unknown(set(self.host.intervals.units) - set(event.result.names()))
        elif event.kind is EventKind.APPLY_FAILED and event.unit:
            self.metrics.apply_failed(event.unit)
        elif event.kind is EventKind.SECRET_FAILED and event.unit:
            self.metrics.secret_resolution_failed(event.unit, event.message)
        with self._sub_lock:
            subscribers = list(self._subscribers)
        for waiter in subscribers:
            waiter.event(event)

    def _after(self, result: PassResult) -> None:
        """Metrics, notifications and the systemd status line of a finished pass."""
        self._last = result
        kinds = {u.name: u.kind for u in self._manifest.units} if self._manifest else None
        try:
            record_run(self.metrics, self.store, result.run_id, kinds=kinds)
        except ValueError:
            log.exception("run %s: metrics not recorded", result.run_id)
        sdnotify.status(f"last pass: {self._health()}")
        run = self.store.get_run(result.run_id)
        if run is None or run.dry_run:
            return  # a dry run is a person looking: they see the result
        for name, outcome in result.outcomes.items():
            for note in unit_events(name, outcome, run_id=result.run_id, revision=result.revision):
                self.notifier.send(note)
        failure = _pass_failure(result)
        if failure:
            first = failure.splitlines()[0]
            self.notifier.send(
                Notification("failure", "", result.run_id, result.revision, first, failure)
            )

    def _health(self) -> str:
        last = self._last
        if last is None:
            return "none yet"
        revision = last.revision[:12] if last.revision else "no revision"
        converged = sum(
            1 for o in last.outcomes.values() if o.status is UnitStatus.OK and o.converged
        )
        units = plural(converged, "unit")
        return f"{last.status} at {revision} (run {last.run_id}, {units} converged)"

    # --- what a batch of triggers asks for -------------------------------------------------

    def _request_for(self, batch: Batch) -> tuple[PassRequest | None, bool]:
        """The pass to run for `batch` (None: nothing to do), and whether it reconciles every
        unit at the head it fetches (then that head is "seen" for the next poll)."""
        trigger = batch.trigger
        wanted = batch.units | batch.unit_drifts
        if batch.dry_run:
            unit = next(iter(batch.units)) if len(batch.units) == 1 and not batch.full else None
            return PassRequest(trigger=trigger, dry_run=True, unit=unit), False
        if batch.explicit:
            override = batch.override_window
            if batch.full or batch.drift or len(wanted) > 1:
                return PassRequest(trigger=trigger, override_window=override), True
            unit = next(iter(wanted))
            return PassRequest(trigger=trigger, unit=unit, override_window=override), False

        # Timers only: units backing off are left out. Look at the branch first. (Units
        # left out for backoff come back through `due`, so a pass that leaves out only
        # them still counts as having reconciled the head.)
        backoff, due = self._backoff()
        head = self._fetch_head()
        if (head is not None and head != self._seen_head) or (batch.drift and head is None):
            return PassRequest(trigger=trigger, skip=frozenset(backoff)), True
        if batch.drift:
            # Units on drift timers of their own are left to those, unless their own timer
            # fired too: a due unit timer is never cancelled by coalescing with this one.
            own = set(self.host.intervals.units) - batch.unit_drifts
            return PassRequest(trigger=trigger, skip=frozenset(backoff | own)), False
        if self._pass_failures and time.time() >= self._pass_failed_at + self._delay(
            self._pass_failures
        ):
            return PassRequest(trigger=trigger, skip=frozenset(backoff)), True
        names = set(self._manifest.names()) if self._manifest else None
        drifts = batch.unit_drifts - backoff
        retry = self._with_dependents(due) - backoff
        if names is not None:
            self._warn_unknown(batch.unit_drifts - names)
            drifts, retry = drifts & names, retry & names
        if not drifts and not retry:
            return None, False
        if not retry and len(drifts) == 1:
            return PassRequest(trigger=trigger, unit=next(iter(drifts))), False
        if names is None:  # no manifest seen yet: every unit but those backing off
            return PassRequest(trigger=trigger, skip=frozenset(backoff)), False
        left_out = (names - drifts - retry) | backoff
        return PassRequest(trigger=trigger, skip=frozenset(left_out)), False

    def _warn_unknown(self, units: set[str]) -> None:
        if new := units - self._warned_units:
            self._warned_units |= new
            log.warning(
                "intervals.units names %s, not in the manifest in force: no drift timer",
                ", ".join(sorted(new)),
            )

    def _fetch_head(self) -> str | None:
        """The branch head, fetched now; None if the fetch failed or a pass runs elsewhere."""
        try:
            head = self.reconciler.fetch_head()
        except PassBusyError:
            return self._seen_head  # a CLI pass is running: it is looking already
        except AgentError as exc:
            if exc.message != self._fetch_error:
                log.warning("poll: %s", exc.message)
            self._fetch_error = exc.message
            return None
        if self._fetch_error:
            log.info("poll: fetching works again")
            self._fetch_error = None
        return head

    def _backoff(self) -> tuple[set[str], set[str]]:
        """(units a timer pass leaves out: those backing off and their dependents, failed
        units whose backoff has passed)."""
        now = time.time()
        names = set(self._manifest.names()) if self._manifest else None
        waiting, due = set(), set()
        for state in self.store.unit_states():
            if state.last_status != UnitStatus.FAILED:
                continue
            if names is not None and state.unit not in names:
                continue
            history = [
                (row.status, row.finished_at or row.started_at)
                for row in self.store.unit_history(state.unit, limit=32)
                if not row.preview  # a dry run says nothing about whether a retry can help
            ]
            standing = backoff_state(
                history,
                now,
                poll=self.host.intervals.poll,
                backoff_max=self.service.daemon.backoff_max,
            )
            if standing == "waiting":
                waiting.add(state.unit)
            elif standing == "due":
                due.add(state.unit)
        return self._with_dependents(waiting), due

    def _delay(self, failures: int) -> float:
        """How long a timer waits after the `failures`-th failure in a row."""
        return backoff_delay(
            failures, poll=self.host.intervals.poll, backoff_max=self.service.daemon.backoff_max
        )

    def _with_dependents(self, units: Iterable[str]) -> set[str]:
        result = set(units)
        if self._manifest is not None:
            for unit in list(result):
                if self._manifest.get_unit(unit) is not None:
                    result |= self._manifest.dependents(unit)
        return result


# --- the backoff policy (pure: tests/cases/backoff.json) ------------------------------------

# Results that neither count as a failure nor reset the count.
_NEUTRAL = (UnitStatus.BLOCKED, UnitStatus.INTERRUPTED, UnitStatus.RUNNING)


def backoff_delay(failures: int, *, poll: float, backoff_max: float) -> float:
    """How long a timer waits after the `failures`-th failure in a row."""
    return min(poll * 2 ** min(failures, 32), backoff_max)


def backoff_state(
    history: Iterable[tuple[str, float | None]], now: float, *, poll: float, backoff_max: float
) -> str | None:
    """Where a unit stands from its results, newest first, as (status, when): "waiting" (it
    failed and its backoff has not passed), "due" (it has), or None (not failing)."""
    failures, last_failed = 0, None
    for status, when in history:
        if status in _NEUTRAL:
            continue
        if status != UnitStatus.FAILED:
            break
        failures += 1
        last_failed = last_failed or when
    if not failures or last_failed is None:
        return None
    delay = backoff_delay(failures, poll=poll, backoff_max=backoff_max)
    return "waiting" if now < last_failed + delay else "due"


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_OVERFLOW_UID = 65534  # /proc/sys/kernel/overflowuid: how an unmapped uid is seen


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


def _describe(request: PassRequest, batch: Batch) -> str:
    parts = [f"trigger {request.trigger}"]
    if batch.count > 1:
        parts.append(f"{batch.count} triggers coalesced")
    if request.unit:
        parts.append(f"unit {request.unit}")
    if request.dry_run:
        parts.append("dry run")
    if request.skip:
        parts.append(f"leaving out {', '.join(sorted(request.skip))}")
    return f" ({'; '.join(parts)})"


def _pass_failure(result: PassResult) -> str:
    """What made the pass itself fail (fetch, a refused revision...), without warnings."""
    if result.status is not RunStatus.FAILED or not result.error:
        return ""
    text = result.error
    for warning in result.warnings:
        text = text.replace(warning, "")
    return "\n".join(line for line in text.splitlines() if line.strip())


def run_daemon(host: HostConfig, run_context: RunContext | None = None) -> int:
    """`agent run`: serve until stopped; the exit code."""
    private_umask()  # also when started without the CLI: no mode depends on the umask
    return Daemon(host, run_context=run_context).run()
