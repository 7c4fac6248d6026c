"""Prometheus metrics of the agent: passes, unit results, drift, holds, failures.

`AgentMetrics` owns its own `CollectorRegistry` (never the process-global one), so several
can live in one process (tests, or an agent embedded in something else). Every label value
passes through the redactor the caller gives: a secret that ends up in a unit name, a
trigger or an error never becomes a label. `render()` is what a `/metrics` route serves.

`record_run` feeds one finished pass into the metrics from what the run store recorded.
Two metrics need facts the store does not keep, and are left to the code that knows them:
`apply_failed` (the store does not say which Terraform step failed) and
`secret_resolution_failed` (the store keeps the message, not the backend).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

try:
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as _CONTENT_TYPE
except ImportError:  # prometheus-client < 0.22: CONTENT_TYPE_LATEST was this same 0.0.4 text
    from prometheus_client import CONTENT_TYPE_LATEST as _CONTENT_TYPE

from agent import __version__
from agent.core.redact import Redactor
from agent.state.store import RunStatus, RunStore, UnitOutcome, UnitStatus

PREFIX: Final = "gitops_agent"

# Passes last from 0.2 s (nothing changed, one small stack) to 30 min (the default Terraform
# timeout); the buckets are roughly x2-x2.5 apart so quantiles stay within a bucket's error.
PASS_BUCKETS: Final[tuple[float, ...]] = (
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
    float("inf"),
)

PASS_OUTCOMES: Final = tuple(str(s) for s in RunStatus if s is not RunStatus.RUNNING)
# What starts a pass in the daemon (the `trigger` label); others (quickstart) are counted too.
PASS_TRIGGERS: Final = ("start", "poll", "drift", "webhook", "cli", "cli-changed-only", "approve")
# The `outcome` label of a unit result: its decision when it ran to one, else its status.
UNIT_OUTCOMES: Final = (
    "apply",
    "hold",
    "report",
    "nothing",
    "skip",
    "plan-only",
    "unchanged",
    "failed",
    "blocked",
    "interrupted",
)
DEFAULT_UNIT_KIND: Final = "stack"


class AgentMetrics:
    """The agent's metrics in a registry of their own. Thread-safe (prometheus-client is)."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        """Create every metric in a new registry; label values go through `redactor`."""
        self._redact = redactor.redact if redactor is not None else _same
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._pass_duration = Histogram(
            f"{PREFIX}_pass_duration_seconds",
            "How long a reconcile pass took, from taking the pass lock to recording its result.",
            ["outcome"],
            buckets=PASS_BUCKETS,
            registry=r,
        )
        self._passes = Counter(
            f"{PREFIX}_passes",
            "Reconcile passes finished, by outcome and by what triggered them.",
            ["outcome", "trigger"],
            registry=r,
        )
        self._unit_results = Counter(
            f"{PREFIX}_unit_results",
            "Unit results: the decision a unit ran to (apply, hold, report, nothing, skip,"
            " plan-only, unchanged) or why it did not (failed, blocked, interrupted).",
            ["unit", "kind", "outcome"],
            registry=r,
        )
        self._drift = Counter(
            f"{PREFIX}_drift_found",
            "Unit results that found drift (the world changed while the revision did not).",
            ["unit"],
            registry=r,
        )
        self._holds = Gauge(
            f"{PREFIX}_holds_waiting",
            "Units whose last plan is held for approval.",
            registry=r,
        )
        self._last_applied = Gauge(
            f"{PREFIX}_last_applied_revision_timestamp_seconds",
            "When a unit last applied a plan successfully (unix time).",
            ["unit"],
            registry=r,
        )
        self._apply_failures = Counter(
            f"{PREFIX}_apply_failures",
            "Applies that failed (Terraform apply, or a host's changes), per unit.",
            ["unit"],
            registry=r,
        )
        self._secret_failures = Counter(
            f"{PREFIX}_secret_resolution_failures",
            "Secret references that could not be resolved, per unit and backend.",
            ["unit", "backend"],
            registry=r,
        )
        self._notifications = Counter(
            f"{PREFIX}_notifications",
            "Notifications per sink (kind, host) by result: delivered, failed (given up"
            " after retries or refused), dropped (queue full, or left at shutdown).",
            ["sink_kind", "sink_host", "result"],
            registry=r,
        )
        Info(f"{PREFIX}_build", "The agent's version.", registry=r).info(
            {
                "version": __version__,
                "python": platform.python_version(),
                "implementation": sys.implementation.name,
            }
        )
        # Known label values start at 0, so that the first event is an increase, not a new
        # series that `rate()`/`increase()` cannot see.
        for outcome in PASS_OUTCOMES:
            self._pass_duration.labels(outcome)
            for trigger in PASS_TRIGGERS:
                self._passes.labels(outcome, trigger)

    def _label(self, value: str) -> str:
        return self._redact(str(value))

    def declare_units(self, units: Mapping[str, str]) -> None:
        """Start the per-unit counters of `units` (name -> kind) at 0.

        Call it when a manifest is loaded: without it a unit's first failure creates its
        series at 1, and `increase()` over a window sees no increase.
        """
        for unit, kind in units.items():
            name, kind_label = self._label(unit), self._label(kind)
            for outcome in UNIT_OUTCOMES:
                self._unit_results.labels(name, kind_label, outcome)
            self._drift.labels(name)
            self._apply_failures.labels(name)

    def pass_finished(self, *, duration_s: float, outcome: str, trigger: str) -> None:
        """A pass ended with `outcome` (succeeded, failed, interrupted) after `duration_s`."""
        outcome = self._label(outcome)
        self._pass_duration.labels(outcome).observe(max(0.0, duration_s))
        self._passes.labels(outcome, self._label(trigger)).inc()

    def unit_finished(
        self,
        *,
        unit: str,
        kind: str,
        outcome: str,
        drift: bool,
        applied_revision_time: float | None,
    ) -> None:
        """A unit's result in a pass. `applied_revision_time` (unix seconds) is given when
        this result applied a plan; None leaves the unit's last-applied time as it was."""
        name = self._label(unit)
        self._unit_results.labels(name, self._label(kind), self._label(outcome)).inc()
        self._apply_failures.labels(name)  # a unit seen has a failure count, if only 0
        drifts = self._drift.labels(name)
        if drift:
            drifts.inc()
        if applied_revision_time is not None:
            self._last_applied.labels(name).set(applied_revision_time)

    def holds_waiting(self, count: int) -> None:
        """How many units wait for approval now."""
        self._holds.set(count)

    def apply_failed(self, unit: str) -> None:
        """An apply of `unit` failed."""
        self._apply_failures.labels(self._label(unit)).inc()

    def secret_resolution_failed(self, unit: str, backend: str) -> None:
        """A secret of `unit` could not be read from `backend` (vault, aws-ssm, aws-sm, file)."""
        self._secret_failures.labels(self._label(unit), self._label(backend)).inc()

    def notification_finished(self, *, sink_kind: str, sink_host: str, result: str) -> None:
        """A notification to a sink ended as `result` (delivered, failed, dropped).

        Fits `Notifier(on_result=...)`: `lambda sink, result: metrics.notification_finished(
        sink_kind=sink.kind, sink_host=sink.host, result=result)`.
        """
        self._notifications.labels(
            self._label(sink_kind), self._label(sink_host), self._label(result)
        ).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition (Prometheus text format 0.0.4) and its content type."""
        return generate_latest(self.registry), _CONTENT_TYPE


def unit_outcome_label(outcome: UnitOutcome) -> str:
    """The `outcome` label of a unit result: its decision, or why it has none."""
    if outcome.status in (UnitStatus.FAILED, UnitStatus.BLOCKED, UnitStatus.INTERRUPTED):
        return str(outcome.status)
    if outcome.status is UnitStatus.HELD:
        return "hold"
    return str(outcome.decision or outcome.status)


def record_run(
    metrics: AgentMetrics,
    store: RunStore,
    run_id: str,
    *,
    kinds: Mapping[str, str] | None = None,
) -> None:
    """Feed one finished pass, as `store` recorded it, into `metrics`: the pass (duration,
    outcome, trigger), each unit's result and drift, the time of each successful apply,
    and the number of units held.

    Call it once per pass, after the pass recorded its result (a second call counts the
    pass twice). `kinds` maps unit names to their kind (default: "stack").
    """
    run = store.get_run(run_id)
    if run is None:
        raise ValueError(f"no run {run_id!r} in the run store {store.path}")
    if run.finished_at is None:
        raise ValueError(f"run {run_id} has not finished: record it after the pass")
    metrics.pass_finished(
        duration_s=run.finished_at - run.started_at, outcome=run.status, trigger=run.trigger
    )
    for row in store.unit_runs(run_id):
        outcome = UnitOutcome(status=UnitStatus(row.status), decision=row.decision, drift=row.drift)
        label = unit_outcome_label(outcome)
        applied = label == "apply" and row.status == UnitStatus.OK
        metrics.unit_finished(
            unit=row.unit,
            kind=(kinds or {}).get(row.unit, DEFAULT_UNIT_KIND),
            outcome=label,
            drift=row.drift,
            applied_revision_time=(row.finished_at or run.finished_at) if applied else None,
        )
    metrics.holds_waiting(sum(1 for s in store.unit_states() if s.last_status == UnitStatus.HELD))


def _same(text: str) -> str:
    return text
