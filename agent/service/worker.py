"""The daemon's one pass worker: takes work from the trigger queue, runs it, and tells
everyone who waits (control clients, metrics, notifications, systemd's status line).

A pass that raises something other than an AgentError (the store locked by another
process, the disk full) never leaves a client waiting: each one waiting on that work gets
the reason as an error (a StoreError naming the store), and the poll retries the pass.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Any

from agent.config import Manifest
from agent.core.progress import Event, EventKind
from agent.core.redact import Redactor
from agent.engine.reconcile import PassRequest, PassResult, Reconciler
from agent.errors import AgentError, PassBusyError, StoreError
from agent.service import sdnotify
from agent.service.forge_report import ForgeReporter
from agent.service.logfmt import EventLog
from agent.service.metrics import AgentMetrics, record_run
from agent.service.notify import Event as Notification
from agent.service.notify import Notifier, unit_events
from agent.service.planner import PassPlanner
from agent.service.triggers import Approval, Batch, TriggerQueue, Waiter
from agent.state.store import RunStatus, UnitStatus
from providers.text import plural

# A part of the daemon: its lines say `daemon:` as the rest of it does.
log = logging.getLogger("agent.service.daemon")

_BUSY_RETRY = 0.5  # seconds between tries while another process holds the pass lock


class PassWorker:
    """Runs passes and approvals one at a time, in a thread of its own."""

    def __init__(
        self,
        *,
        reconciler: Reconciler,
        queue: TriggerQueue,
        planner: PassPlanner,
        events: EventLog,
        metrics: AgentMetrics,
        notifier: Notifier,
        stopping: threading.Event,
        forge: ForgeReporter | None = None,
    ) -> None:
        self.reconciler = reconciler
        self.store = reconciler.store
        self.redactor: Redactor = reconciler.redactor
        self._queue = queue
        self._planner = planner
        self.events = events
        self.metrics = metrics
        self.notifier = notifier
        self.forge = forge  # commit statuses, when the host config names a forge
        self._stopping = stopping
        self._thread = threading.Thread(target=self._work, name="pass-worker", daemon=True)
        self._subscribers: list[Waiter] = []
        self._sub_lock = threading.Lock()
        self.running: str | None = None  # what the worker is doing, for status answers
        self.last: PassResult | None = None

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the worker to end; whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _work(self) -> None:
        while (item := self._queue.take()) is not None:
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
                self.running = None

    def _serve(self, batch: Batch) -> None:
        request, complete = self._planner.request_for(batch)
        if request is None or self._stopping.is_set():
            return  # nothing to do; or a stop came while the poll fetched
        self.events.describe = _describe(request, batch)
        result = self._run(lambda: self.reconciler.run_pass(request, wait=False), batch.waiters)
        if result is None:
            return
        self._planner.passed(request, complete, result)
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
            self._queue.add("approve", full=True)

    def _run(self, call: Any, waiters: list[Waiter]) -> PassResult | None:
        """Run a pass (or an approval) with `waiters` subscribed to its events; retried
        while another process holds the pass lock. Its result, after metrics and
        notifications; None when it could not run (the waiters are told why)."""
        told = False
        with self._sub_lock:
            self._subscribers = list(waiters)
        try:
            while True:
                self.running = "a pass"
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
        except StoreError as exc:  # e.g. a PostgreSQL store away for longer than the wait
            log.error("%s", exc.message)
            for waiter in waiters:
                waiter.error(exc)
            self._planner.crashed()  # retried after the backoff; that pass marks this run
            return None
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
            self._planner.crashed()
            return None
        finally:
            with self._sub_lock:
                self._subscribers = []
        self.finished(result)
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

    def on_event(self, event: Event) -> None:
        """Every event of a pass (from the worker and unit threads)."""
        if event.kind is EventKind.PASS_STARTED:
            self.running = f"run {event.run_id}"
            sdnotify.status(f"{self.running} in progress{self.events.describe}")
        self.events(event)
        if event.kind is EventKind.MANIFEST_LOADED and isinstance(event.result, Manifest):
            self._planner.manifest_loaded(event.result)
            self.metrics.declare_units({u.name: u.kind for u in event.result.units})
        elif event.kind is EventKind.APPLY_FAILED and event.unit:
            self.metrics.apply_failed(event.unit)
        elif event.kind is EventKind.SECRET_FAILED and event.unit:
            self.metrics.secret_resolution_failed(event.unit, event.message)
        with self._sub_lock:
            subscribers = list(self._subscribers)
        for waiter in subscribers:
            waiter.event(event)

    def finished(self, result: PassResult) -> None:
        """Metrics, notifications and the systemd status line of a finished pass (also
        of a run the worker did not start: new EC2 hosts converged between passes)."""
        self.last = result
        # A removed unit's prune counts under the kind it last had (agent/units/prune.py).
        kinds = {row.unit: row.kind for row in self.store.removed.by_unit().values()}
        if self._planner.manifest:
            kinds.update({u.name: u.kind for u in self._planner.manifest.units})
        try:
            record_run(self.metrics, self.store, result.run_id, kinds=kinds)
        except ValueError:
            log.exception("run %s: metrics not recorded", result.run_id)
        sdnotify.status(f"last pass: {self.health()}")
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
        if self.forge is not None and run.unit_filter is None:
            self.forge.submit(result)  # a main pass: its revision's outcome (issue 22)

    def health(self) -> str:
        last = self.last
        if last is None:
            return "none yet"
        revision = last.revision[:12] if last.revision else "no revision"
        converged = sum(
            1 for o in last.outcomes.values() if o.status is UnitStatus.OK and o.converged
        )
        units = plural(converged, "unit")
        return f"{last.status} at {revision} (run {last.run_id}, {units} converged)"


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
