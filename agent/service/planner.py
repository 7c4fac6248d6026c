"""What a batch of triggers asks the daemon for: which pass, and which units it leaves out.

Push (webhook) and poll passes are changed-only: they plan only the units whose inputs
changed, whose last result was not clean or whose drift check is due (agent/units/changed.py).
Timer passes skip units that keep failing until their backoff has passed (see backoff.py);
webhooks and the CLI ignore backoff. A poll runs a pass only if the branch head moved since
the daemon last reconciled every unit, or failed units are due for a retry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from agent.config import HostConfig, Manifest
from agent.engine.reconcile import PassRequest, PassResult
from agent.errors import AgentError, PassBusyError
from agent.service.backoff import backoff_delay, backoff_state
from agent.service.triggers import Batch
from agent.state.store import RunStatus, RunStore, UnitStatus
from agent.units.changed import changed_only_pass

# A part of the daemon: its lines say `daemon:` as the rest of it does.
log = logging.getLogger("agent.service.daemon")


class PassPlanner:
    """Turns batches of triggers into pass requests, from what the daemon has seen so far:
    the head the last complete pass reconciled, the manifest in force, and how many passes
    in a row failed before any unit ran."""

    def __init__(
        self, host: HostConfig, store: RunStore, fetch_head: Callable[[], str | None]
    ) -> None:
        self.host = host
        self.store = store
        self._fetch = fetch_head
        self.manifest: Manifest | None = None
        self.seen_head: str | None = None  # the head the last complete pass reconciled
        self.pass_failures = 0  # passes in a row that failed before any unit ran
        self.pass_failed_at = 0.0
        self._fetch_error: str | None = None
        self._warned_units: set[str] = set()

    def manifest_loaded(self, manifest: Manifest) -> None:
        self.manifest = manifest
        # At start (the first pass loads it), not when the unit's timer first fires.
        self.warn_unknown(set(self.host.intervals.units) - set(manifest.names()))

    def passed(self, request: PassRequest, complete: bool, result: PassResult) -> None:
        """Learn from a finished pass: the head it reconciled, whether it failed early."""
        if request.unit is None and not request.dry_run and complete and result.head:
            self.seen_head = result.head
        if not request.dry_run and request.unit is None:
            if result.status is RunStatus.FAILED and not result.outcomes:
                self.crashed()
            elif result.outcomes:
                self.pass_failures = 0

    def crashed(self) -> None:
        """A pass failed before any unit ran: timers retry it after the backoff."""
        self.pass_failures += 1
        self.pass_failed_at = time.time()

    def request_for(self, batch: Batch) -> tuple[PassRequest | None, bool]:
        """The pass to run for `batch` (None: nothing to do), and whether it reconciles every
        unit at the head it fetches (then that head is "seen" for the next poll). Pushes
        and polls plan only what changed (agent/units/changed.py); drift timers plan all."""
        request, complete = self._request_for(batch)
        if request is not None and not request.dry_run:
            changed_only = changed_only_pass(
                batch.triggers, drift_timer=batch.drift, unit_drift_timers=bool(batch.unit_drifts)
            )
            request = replace(request, changed_only=changed_only)
        return request, complete

    def _request_for(self, batch: Batch) -> tuple[PassRequest | None, bool]:
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
        if (head is not None and head != self.seen_head) or (batch.drift and head is None):
            return PassRequest(trigger=trigger, skip=frozenset(backoff)), True
        if batch.drift:
            # Units on drift timers of their own are left to those, unless their own timer
            # fired too: a due unit timer is never cancelled by coalescing with this one.
            own = set(self.host.intervals.units) - batch.unit_drifts
            return PassRequest(trigger=trigger, skip=frozenset(backoff | own)), False
        if self.pass_failures and time.time() >= self.pass_failed_at + self._delay(
            self.pass_failures
        ):
            return PassRequest(trigger=trigger, skip=frozenset(backoff)), True
        names = set(self.manifest.names()) if self.manifest else None
        drifts = batch.unit_drifts - backoff
        retry = self.with_dependents(due) - backoff
        if names is not None:
            self.warn_unknown(batch.unit_drifts - names)
            drifts, retry = drifts & names, retry & names
        if not drifts and not retry:
            return None, False
        if not retry and len(drifts) == 1:
            return PassRequest(trigger=trigger, unit=next(iter(drifts))), False
        if names is None:  # no manifest seen yet: every unit but those backing off
            return PassRequest(trigger=trigger, skip=frozenset(backoff)), False
        left_out = (names - drifts - retry) | backoff
        return PassRequest(trigger=trigger, skip=frozenset(left_out)), False

    def warn_unknown(self, units: set[str]) -> None:
        if new := units - self._warned_units:
            self._warned_units |= new
            log.warning(
                "intervals.units names %s, not in the manifest in force: no drift timer",
                ", ".join(sorted(new)),
            )

    def _fetch_head(self) -> str | None:
        """The branch head, fetched now; None if the fetch failed or a pass runs elsewhere."""
        try:
            head = self._fetch()
        except PassBusyError:
            return self.seen_head  # a CLI pass is running: it is looking already
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
        names = set(self.manifest.names()) if self.manifest else None
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
                backoff_max=self.host.service.daemon.backoff_max,
            )
            if standing == "waiting":
                waiting.add(state.unit)
            elif standing == "due":
                due.add(state.unit)
        return self.with_dependents(waiting), due

    def _delay(self, failures: int) -> float:
        """How long a timer waits after the `failures`-th failure in a row."""
        return backoff_delay(
            failures,
            poll=self.host.intervals.poll,
            backoff_max=self.host.service.daemon.backoff_max,
        )

    def with_dependents(self, units: Iterable[str]) -> set[str]:
        result = set(units)
        if self.manifest is not None:
            for unit in list(result):
                if self.manifest.get_unit(unit) is not None:
                    result |= self.manifest.dependents(unit)
        return result
