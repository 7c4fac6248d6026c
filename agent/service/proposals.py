"""The daemon's proposal worker: one thread that runs proposal polls, apart from the pass
worker, so a proposal never delays a main pass (and a main pass never waits for one).

Triggers coalesce: the poll timer asks for every proposal, a pull/merge request webhook for
its ref; while a poll runs, what arrives is merged into the next one. The daemon adds:

    worker = ProposalWorker.from_host(host, redactor)     # None when proposals: is unset
    worker.start(); poll timer -> worker.trigger(); PR webhook -> worker.trigger(event.ref)
    on stop -> worker.stop()
"""

from __future__ import annotations

import logging
import threading

from agent.config import HostConfig
from agent.core.redact import Redactor
from agent.engine.proposals import PlannedHook, ProposalPlanner, StartedHook
from agent.errors import AgentError
from agent.service.webhooks import ProposalEvent
from agent.state.store import RunStore

log = logging.getLogger(__name__)

_ALL = "*"


class ProposalWorker:
    """Runs `ProposalPlanner.poll` on a thread of its own, when triggered."""

    def __init__(self, planner: ProposalPlanner) -> None:
        self.planner = planner
        self._wanted: set[str] = set()
        self._closed: set[str] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="proposals", daemon=True)
        self.polls = 0  # finished polls (for tests and the log)

    @classmethod
    def from_host(
        cls,
        host: HostConfig,
        redactor: Redactor,
        *,
        store: RunStore | None = None,
        on_started: StartedHook | None = None,
        on_planned: PlannedHook | None = None,
    ) -> ProposalWorker | None:
        """A worker for `host`, or None when its host config plans no proposals."""
        if host.proposals is None:
            return None
        planner = ProposalPlanner(
            host, store=store, redactor=redactor, on_started=on_started, on_planned=on_planned
        )
        return cls(planner)

    def start(self) -> None:
        self._thread.start()

    def trigger(self, ref: str | None = None) -> None:
        """Plan every new head (`ref` None), or `ref` (a webhook's: planned even if known)."""
        with self._cond:
            self._wanted.add(ref or _ALL)
            self._cond.notify()

    def on_event(self, event: ProposalEvent) -> None:
        """A pull/merge request webhook: plan its ref, or forget it once closed or merged.
        Nothing of the event decides what is planned: the poll fetches and checks the ref."""
        if event.action in ("closed", "merged"):
            with self._cond:
                self._closed.add(event.ref)
                self._cond.notify()
        else:
            self.trigger(event.ref)

    def stop(self, timeout: float = 30.0) -> None:
        """No new poll; the running Terraform gets SIGINT; wait up to `timeout`."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.planner.interrupt()
        self._thread.join(timeout)
        self.planner.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._closed and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                wanted, self._wanted = self._wanted, set()
                closed, self._closed = self._closed, set()
            for ref in sorted(closed):
                try:
                    self.planner.records.close(ref)
                except AgentError as exc:
                    log.warning("proposals: %s", exc.message)
            refs = [None] if _ALL in wanted else sorted(wanted)
            for ref in refs:
                try:
                    result = self.planner.poll(only=ref)
                except AgentError as exc:
                    log.warning("proposals: %s", exc.message)
                except Exception:
                    log.exception("proposals: the poll failed")
                else:
                    for row in result.planned:
                        log.info("proposal %s at %s: %s", row.ref, row.head[:12], row.status)
            with self._cond:
                self.polls += 1
                self._cond.notify_all()

    def wait_for_polls(self, count: int, timeout: float) -> bool:
        """Wait until `count` polls have finished (tests); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.polls >= count, timeout)
