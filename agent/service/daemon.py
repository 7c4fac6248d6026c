"""`agent run`: the daemon. Timers, webhooks and the CLI ask for passes; one worker runs them.

    triggers ──> TriggerQueue (coalesces) ──> PassWorker ──> Reconciler.run_pass
    poll, drift, per-unit drift (APScheduler)  PassPlanner: which pass, what backs off
    webhooks (AgentHTTPServer)                 events -> log lines, control clients,
    reconcile/approve (ControlRequests)        metrics; results -> notifications

This module wires those parts (triggers.py, planner.py, worker.py, requests.py) and owns
the daemon's life: start, signals, stop.

Stopping (SIGTERM/SIGINT): STOPPING=1; the timers, the HTTP listener and the control
socket stop taking work; the running pass is interrupted (Terraform gets one SIGINT and is
waited for, so its state lock is released) for up to `daemon.stop_timeout`; exit 0. Past
that, whatever the pass still runs is killed, and the exit code is 1. The next start runs a
full pass, which marks the cut run interrupted and converges again.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from datetime import UTC
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from agent import __version__
from agent.config import HostConfig
from agent.config.service import read_secret_file
from agent.core.fsutil import private_umask
from agent.core.progress import Event
from agent.core.redact import install_logging_redaction, remove_logging_redaction
from agent.engine.reconcile import ApprovalRefused, Reconciler
from agent.errors import AgentError
from agent.service import clustermetrics, sdnotify
from agent.service.clusterwatch import ClusterWatch
from agent.service.control import ControlServer, register_error_type
from agent.service.forge_report import make_reporter
from agent.service.hostwatch import HostWatch
from agent.service.http_server import AgentHTTPServer
from agent.service.logfmt import EventLog, RunContext
from agent.service.metrics import AgentMetrics
from agent.service.notify import NotificationSink, Notifier
from agent.service.planner import PassPlanner
from agent.service.proposal_forge import ProposalForgeReport
from agent.service.proposals import ProposalWorker
from agent.service.requests import ControlRequests
from agent.service.triggers import TriggerQueue
from agent.service.webhooks import PushEvent, WebhookSource
from agent.service.worker import PassWorker
from agent.state.storefile import StoreDamaged, StoreFull
from agent.web.service import WebPage

log = logging.getLogger(__name__)

NOTIFY_STOP_TIMEOUT = 5.0
_MAIN_TICK = 5.0  # the main thread's longest sleep between looks at the stop flag

register_error_type(ApprovalRefused)
# (so that a damaged or full store exits 3 through the daemon as it does directly)
register_error_type(StoreDamaged)
register_error_type(StoreFull)


# --- what waits for a pass --------------------------------------------------------------------


# --- the daemon -----------------------------------------------------------------------------


class Daemon:
    """The agent as a service. `run()` blocks until SIGTERM/SIGINT and returns the exit code."""

    def __init__(self, host: HostConfig, *, run_context: RunContext | None = None) -> None:
        self.host = host
        self.service = host.service
        self.events = EventLog(run_context or RunContext())
        self.web: WebPage | None = None  # the reconciler may report before it exists
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
        self.forge = make_reporter(host.forge, self.redactor)
        self.queue = TriggerQueue()
        self._stopping = threading.Event()
        self.planner = PassPlanner(host, self.store, self.reconciler.fetch_head)
        self.worker = PassWorker(
            reconciler=self.reconciler,
            queue=self.queue,
            planner=self.planner,
            events=self.events,
            metrics=self.metrics,
            notifier=self.notifier,
            stopping=self._stopping,
            forge=self.forge,
        )
        # Proposed changes are planned on a thread of their own (never the pass worker's);
        # with a forge, each plan becomes a commit status and a comment on its change.
        report = (
            ProposalForgeReport(
                self.forge.client, host.forge.context, host.state_dir / "proposals", self.redactor
            )
            if self.forge is not None and host.forge is not None
            else None
        )
        self.proposals = ProposalWorker.from_host(
            host,
            self.redactor,
            store=self.store,
            on_started=report.started if report else None,
            on_planned=report.finished if report else None,
        )
        # New EC2 instances between passes (docs/dynamic-hosts.md), reported as passes are.
        self.hostwatch = HostWatch(self.reconciler, on_result=self.worker.finished)
        self.http = self._http_server()
        self.web = WebPage.from_host(host, self.redactor)  # None unless `web:` is set
        self.requests = ControlRequests(
            host, self.reconciler, self.queue, self.planner, self.worker, self._stopping
        )
        self.control = ControlServer(self.service.control_socket, self.requests)
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self.watchdog = sdnotify.Watchdog()
        # Scale-out mode: a pass when this agent gains units; metrics of its membership.
        cluster = self.reconciler.cluster
        if cluster is not None:
            self.clusterwatch = ClusterWatch(
                cluster,
                lambda: self.planner.manifest,
                lambda: self.queue.add("cluster", full=True),
            )
            clustermetrics.register(self.metrics.registry, cluster.membership)
        self._signal = threading.Event()
        self._signals_seen = 0

    def _on_event(self, event: Event) -> None:
        """Every event of a pass (the reconciler reports before the worker exists)."""
        self.worker.on_event(event)
        if self.web is not None:
            self.web(event)

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
            on_proposal=self.proposals.on_event if self.proposals is not None else None,
            metrics=self.metrics.render,
            health=self.worker.health,
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
        if self.host.hosts.aws is not None:  # without it no fleet can read EC2
            # Beside the worker: what the tick does holds the pass lock, without waiting.
            self.scheduler.add_job(
                self.hostwatch.tick, every(intervals.hosts), id="hosts", max_instances=1
            )
        if self.proposals is not None:
            self.scheduler.add_job(self.proposals.trigger, every(intervals.poll), id="proposals")

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
            if self.web is not None:
                self.web.start()
        except AgentError:
            if self.http is not None:
                self.http.stop()
            self.control.stop()
            raise
        if self.reconciler.cluster is not None:
            self.reconciler.cluster.join()  # live (and its name checked) before any pass
        self.notifier.start()
        if self.forge is not None:
            self.forge.start()
        self.worker.start()
        if self.proposals is not None:
            self.proposals.start()
            self.proposals.trigger()  # proposals opened while the agent was down
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
        if self.web is not None:
            self.web.stop()
        for waiter in self.queue.close():
            waiter.error(AgentError("the agent is stopping: the pass you asked for did not run"))
        if self.reconciler.cluster is not None:
            self._drain()
        busy = self.worker.running
        self.reconciler.interrupt()
        if busy:
            log.info("waiting up to %gs for %s to stop", self.service.daemon.stop_timeout, busy)
        if self.proposals is not None:
            self.proposals.stop(self.service.daemon.stop_timeout)
        drained = self.worker.join(self.service.daemon.stop_timeout)
        self.control.stop()
        self.notifier.stop(NOTIFY_STOP_TIMEOUT)
        if self.forge is not None:
            self.forge.stop(NOTIFY_STOP_TIMEOUT)
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
                self.worker.running,
                self.service.daemon.stop_timeout,
            )
            return 1
        self.reconciler.close()
        log.info("stopped")
        # Nothing of this daemon stays in the process's logging (an embedding, or the
        # tests, may start another one).
        remove_logging_redaction(self.redactor)
        return 0

    def _drain(self) -> None:
        """Scale-out mode: hand the units over before stopping. Counted out at once, the
        agent takes no new unit and lets the running one finish (up to
        `daemon.stop_timeout`; then the stop goes on as without a cluster)."""
        assert self.reconciler.cluster is not None
        try:
            self.reconciler.cluster.membership.drain()
        except AgentError as exc:
            log.warning("cluster: could not mark this agent draining: %s", exc.message)
        if self.worker.running:
            log.info("draining: waiting for %s to finish its running unit", self.worker.running)
            if self.worker.join(self.service.daemon.stop_timeout):
                log.info("drained: the other agents take this agent's units")

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

    # --- webhooks ---------------------------------------------------------------------------

    def _on_push(self, push: PushEvent) -> None:
        if not self.queue.add("webhook", full=True):
            log.info("webhook ignored: the agent is stopping")


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_daemon(host: HostConfig, run_context: RunContext | None = None) -> int:
    """`agent run`: serve until stopped; the exit code."""
    private_umask()  # also when started without the CLI: no mode depends on the umask
    return Daemon(host, run_context=run_context).run()
