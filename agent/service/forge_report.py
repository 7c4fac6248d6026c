"""The outcome of each main pass, reported to the forge as a commit status (issue 22).

After a pass, the revision it reconciled gets one status under the configured context:

    success  "applied +2 ~1 -0 (network, web)"     units applied (or "no changes")
    pending  "held: web (+0 ~0 -1); applied +1 ~0 -0"   a plan waits for `agent approve`
    failure  "failed: db; applied +1 ~0 -0 (network)"   a unit failed (or the pass did)
    error    "interrupted"                          the pass was stopped

A head the pass refused (an invalid manifest, a bad signature) gets `failure` with the
reason; the revision still in force gets the outcome of the pass over it, as usual.
Descriptions are redacted and cut to the forge's 140 characters.

`ForgeReporter` sends from a thread of its own, so a slow or unreachable forge never delays
the next pass; a failed report is logged (with the forge's message, never the token) and
retried a few times when the forge says it may help. A later pass that changed nothing on
a revision already reported `success` does not overwrite its status ("applied" stays
"applied"); one after a held or failed status does (the hold was approved, the failure
fixed by a retry).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.config.forge import ForgeConfig, open_forge
from agent.core.redact import Redactor
from agent.engine.reconcile import PassResult
from agent.state.store import RunStatus, UnitOutcome, UnitStatus
from providers.errors import ForgeError
from providers.forge import CommitState, ForgeClient

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = "gitops-agent"
_MAX_QUEUE = 100
_RETRY_DELAYS = (1.0, 4.0, 15.0)
_MAX_NAMES = 4  # units named in a description before "+N more"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one commit status says."""

    sha: str
    state: CommitState
    description: str
    changed: bool  # something was applied, held, failed or refused (not a quiet re-pass)


def outcomes_of(revision: str | None, result: PassResult) -> list[Outcome]:
    """The statuses `result` is worth: a refused head's failure (if the pass refused one),
    then the outcome of the revision it reconciled (`revision`, default the pass's)."""
    found = []
    if result.head and result.head != result.revision:
        # The pass refused the head and kept the revision in force: say why on the head.
        prefix = f"revision {result.head[:12]} rejected: "
        lines = (result.error or "").splitlines()
        reason = next((line[len(prefix) :] for line in lines if line.startswith(prefix)), None)
        if reason is not None:
            found.append(Outcome(result.head, "failure", f"not applied: {reason}", True))
    if (outcome := outcome_of(revision, result)) is not None:
        found.append(outcome)
    return found


def outcome_of(revision: str | None, result: PassResult) -> Outcome | None:
    """The status `result` is worth for the revision it reconciled (`revision`, default
    the pass's own; None: nothing to report)."""
    sha = revision or result.revision
    if not sha:
        return None
    outcomes = result.outcomes
    failed = _named(outcomes, UnitStatus.FAILED)
    held = _named(outcomes, UnitStatus.HELD)
    applied = {n: o for n, o in outcomes.items() if _applied(o)}
    parts: list[str] = []
    if result.status is RunStatus.INTERRUPTED:
        state: CommitState = "error"
        parts.append("interrupted")
    elif failed or (result.status is RunStatus.FAILED and not outcomes):
        state = "failure"
        parts.append(f"failed: {_names(failed)}" if failed else _first_line(result.error))
    elif held:
        state = "pending"
    else:
        state = "success"
    if held:
        counts = _counts(outcomes[n] for n in held)
        parts.append(f"held: {_names(held)} ({counts})")
    if applied:
        parts.append(f"applied {_counts(applied.values())} ({_names(list(applied))})")
    if not parts:
        parts.append("no changes")
    changed = bool(failed or held or applied) or state != "success"
    return Outcome(sha, state, "; ".join(parts), changed)


def report_outcome(
    client: ForgeClient,
    revision: str | None,
    pass_result: PassResult,
    *,
    context: str = DEFAULT_CONTEXT,
    redact: Callable[[str], str] = str,
) -> list[Outcome]:
    """Set the commit status for `pass_result` (a main pass: not a dry run, not one unit)
    on `revision` (and on a head it refused) and return what was sent. Raises ForgeError."""
    sent = outcomes_of(revision, pass_result)
    for outcome in sent:
        client.set_status(outcome.sha, outcome.state, redact(outcome.description), context)
    return sent


def make_reporter(config: ForgeConfig | None, redactor: Redactor) -> ForgeReporter | None:
    """The reporter for the host config's `forge:` section (None without one). Reads the
    token file now (a ConfigError names its key) and registers the token as a secret."""
    if config is None:
        return None
    client = open_forge(config, register=redactor.register)
    return ForgeReporter(client, context=config.context, redact=redactor.redact)


class ForgeReporter:
    """Reports pass outcomes from a background thread, in order, one pass at a time."""

    def __init__(
        self,
        client: ForgeClient,
        *,
        context: str = DEFAULT_CONTEXT,
        redact: Callable[[str], str] = str,
        retry_delays: tuple[float, ...] = _RETRY_DELAYS,
    ) -> None:
        self.client = client
        self.context = context
        self._redact = redact
        self._retry_delays = retry_delays
        self._queue: queue.Queue[PassResult | None] = queue.Queue(_MAX_QUEUE)
        self._stopping = threading.Event()
        self._reported: dict[str, tuple[str, str]] = {}  # sha -> (state, description)
        self._thread = threading.Thread(target=self._run, name="forge-report", daemon=True)
        self.sent = 0
        self.failed = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, result: PassResult) -> None:
        """Queue a main pass's result; never blocks (a full queue drops it, logged)."""
        try:
            self._queue.put_nowait(result)
        except queue.Full:
            log.warning("forge status for run %s dropped: the queue is full", result.run_id)

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued within `timeout` seconds, then stop."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._stopping.set()
        self._thread.join(1.0)

    def _run(self) -> None:
        while (result := self._queue.get()) is not None:
            try:
                self._report(result)
            except Exception:  # a bug must not end the reporter
                self.failed += 1
                log.exception("forge status for run %s failed", result.run_id)

    def _report(self, result: PassResult) -> None:
        for outcome in outcomes_of(result.revision, result):
            self._send(result.run_id, outcome)

    def _send(self, run_id: str, outcome: Outcome) -> None:
        description = self._redact(outcome.description)
        previous = self._reported.get(outcome.sha)
        if previous == (outcome.state, description):
            return  # the same again
        if previous and previous[0] == "success" and not outcome.changed:
            return  # a quiet re-pass: "applied +2 ~1 -0" stays (a held plan's status does not)
        for attempt, delay in enumerate((0.0, *self._retry_delays)):
            if delay and self._stopping.wait(delay):
                break
            try:
                self.client.set_status(outcome.sha, outcome.state, description, self.context)
            except ForgeError as exc:
                last = attempt == len(self._retry_delays)
                if exc.retryable and not last:
                    log.debug("forge status for %s: %s; retrying", outcome.sha[:12], exc)
                    continue
                self.failed += 1
                log.warning(
                    "forge status for %s (run %s) not set: %s",
                    outcome.sha[:12],
                    run_id,
                    self._redact(str(exc)),
                )
                return
            self.sent += 1
            self._reported[outcome.sha] = (outcome.state, description)
            return


def _applied(outcome: UnitOutcome) -> bool:
    return outcome.status is UnitStatus.OK and outcome.decision == "apply"


def _named(outcomes: dict[str, UnitOutcome], status: UnitStatus) -> list[str]:
    return [name for name, outcome in outcomes.items() if outcome.status is status]


def _names(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:_MAX_NAMES])
    more = len(names) - _MAX_NAMES
    return f"{shown} +{more} more" if more > 0 else shown


def _counts(outcomes: Iterable[UnitOutcome]) -> str:
    add = change = destroy = 0
    for outcome in outcomes:
        add += outcome.plan_add or 0
        change += outcome.plan_change or 0
        destroy += outcome.plan_destroy or 0
    return f"+{add} ~{change} -{destroy}"


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else "the pass failed"
