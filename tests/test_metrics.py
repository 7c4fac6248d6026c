"""Agent metrics, scraped over real HTTP (127.0.0.1) and parsed as Prometheus parses them."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.core.redact import Redactor
from agent.service.metrics import AgentMetrics, record_run
from agent.state.store import RunStatus, RunStore, UnitOutcome, UnitStatus

SECRET = "hunter2-Sup3r-secret"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@contextmanager
def metrics_endpoint(metrics: AgentMetrics) -> Iterator[str]:
    """A tiny listener serving `metrics.render()` at /metrics; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, content_type = metrics.render()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def scrape(url: str) -> tuple[str, str, Samples]:
    """(body, content type, samples by (name, labels)) of one scrape."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode("utf-8")
        content_type = response.headers["Content-Type"]
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, content_type, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_passes_are_counted_and_timed_by_outcome_and_trigger() -> None:
    metrics = AgentMetrics()
    metrics.pass_finished(duration_s=0.2, outcome="succeeded", trigger="schedule")
    metrics.pass_finished(duration_s=0.3, outcome="succeeded", trigger="schedule")
    metrics.pass_finished(duration_s=1500.0, outcome="failed", trigger="webhook")
    with metrics_endpoint(metrics) as url:
        _, content_type, samples = scrape(url)

    assert content_type.startswith("text/plain; version=0.0.4")
    passes = "gitops_agent_passes_total"
    assert value(samples, passes, outcome="succeeded", trigger="schedule") == 2
    assert value(samples, passes, outcome="failed", trigger="webhook") == 1
    hist = "gitops_agent_pass_duration_seconds"
    assert value(samples, f"{hist}_count", outcome="succeeded") == 2
    assert value(samples, f"{hist}_sum", outcome="succeeded") == pytest.approx(0.5)
    assert value(samples, f"{hist}_bucket", outcome="succeeded", le="0.25") == 1
    assert value(samples, f"{hist}_bucket", outcome="succeeded", le="0.5") == 2
    assert value(samples, f"{hist}_bucket", outcome="failed", le="1200.0") == 0
    assert value(samples, f"{hist}_bucket", outcome="failed", le="1800.0") == 1
    # Known outcomes (and triggers) exist before their first pass, so increase() sees the
    # first one and docs/metrics.md's GitopsNoPasses and failed-share queries have data.
    assert value(samples, f"{hist}_count", outcome="interrupted") == 0
    for outcome in ("succeeded", "failed", "interrupted"):
        for trigger in ("start", "poll", "drift", "webhook", "cli", "approve"):
            assert value(samples, passes, outcome=outcome, trigger=trigger) is not None
    assert value(samples, passes, outcome="interrupted", trigger="poll") == 0


def test_unit_results_drift_holds_failures_and_version() -> None:
    metrics = AgentMetrics()
    metrics.declare_units({"network": "stack", "web": "stack"})
    metrics.unit_finished(
        unit="network",
        kind="stack",
        outcome="apply",
        drift=True,
        applied_revision_time=1_700_000_000.0,
    )
    metrics.unit_finished(
        unit="web", kind="stack", outcome="failed", drift=False, applied_revision_time=None
    )
    metrics.apply_failed("web")
    metrics.secret_resolution_failed("web", "vault")
    metrics.secret_resolution_failed("web", "vault")
    metrics.holds_waiting(2)
    with metrics_endpoint(metrics) as url:
        _, _, samples = scrape(url)

    results = "gitops_agent_unit_results_total"
    assert value(samples, results, unit="network", kind="stack", outcome="apply") == 1
    assert value(samples, results, unit="web", kind="stack", outcome="failed") == 1
    assert value(samples, results, unit="web", kind="stack", outcome="apply") == 0  # declared
    assert value(samples, "gitops_agent_drift_found_total", unit="network") == 1
    assert value(samples, "gitops_agent_drift_found_total", unit="web") == 0
    applied = "gitops_agent_last_applied_revision_timestamp_seconds"
    assert value(samples, applied, unit="network") == 1_700_000_000.0
    assert value(samples, applied, unit="web") is None  # never applied: no series
    assert value(samples, "gitops_agent_apply_failures_total", unit="web") == 1
    assert value(samples, "gitops_agent_apply_failures_total", unit="network") == 0
    failures = "gitops_agent_secret_resolution_failures_total"
    assert value(samples, failures, unit="web", backend="vault") == 2
    assert value(samples, "gitops_agent_holds_waiting") == 2
    info = [
        dict(labels)
        for (name, labels), v in samples.items()
        if name == "gitops_agent_build_info" and v == 1
    ]
    assert len(info) == 1 and info[0]["version"] == __version__


def test_a_secret_never_becomes_a_label() -> None:
    redactor = Redactor()
    redactor.register(SECRET)
    metrics = AgentMetrics(redactor)
    metrics.declare_units({f"db-{SECRET}": "stack"})
    metrics.unit_finished(
        unit=f"db-{SECRET}",
        kind="stack",
        outcome="apply",
        drift=True,
        applied_revision_time=1.0,
    )
    metrics.apply_failed(SECRET)
    metrics.secret_resolution_failed(SECRET, SECRET)
    metrics.pass_finished(duration_s=1.0, outcome="succeeded", trigger=f"hook {SECRET}")
    with metrics_endpoint(metrics) as url:
        text, _, samples = scrape(url)

    assert SECRET not in text
    assert value(samples, "gitops_agent_drift_found_total", unit="db-***") == 1
    assert value(samples, "gitops_agent_apply_failures_total", unit="***") == 1
    failures = "gitops_agent_secret_resolution_failures_total"
    assert value(samples, failures, unit="***", backend="***") == 1


def test_each_instance_has_its_own_registry() -> None:
    first, second = AgentMetrics(), AgentMetrics()
    first.pass_finished(duration_s=1.0, outcome="succeeded", trigger="cli")
    with metrics_endpoint(second) as url:
        _, _, samples = scrape(url)
    # The other registry's pass is not counted here: its series is still at 0.
    assert value(samples, "gitops_agent_passes_total", outcome="succeeded", trigger="cli") == 0
    assert REGISTRY.get_sample_value("gitops_agent_holds_waiting") is None  # not global


def test_record_run_reads_a_finished_pass_from_the_store(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "state")
    try:
        run = store.start_run(trigger="webhook")
        store.finish_unit(
            run,
            "network",
            "a" * 40,
            UnitOutcome(UnitStatus.OK, decision="apply", drift=True, converged=True),
        )
        store.finish_unit(run, "web", "a" * 40, UnitOutcome(UnitStatus.HELD, decision="hold"))
        store.finish_unit(run, "db", "a" * 40, UnitOutcome(UnitStatus.FAILED, error="boom"))
        store.finish_unit(run, "cache", "a" * 40, UnitOutcome(UnitStatus.BLOCKED, error="db"))
        store.finish_unit(run, "dns", "a" * 40, UnitOutcome(UnitStatus.OK, decision="nothing"))
        store.finish_run(run, RunStatus.FAILED, "db failed")
        metrics = AgentMetrics()
        record_run(metrics, store, run)
        finished = {u.unit: u.finished_at for u in store.unit_runs(run)}
        recorded = store.get_run(run)
    finally:
        store.close()
    with metrics_endpoint(metrics) as url:
        _, _, samples = scrape(url)

    assert value(samples, "gitops_agent_passes_total", outcome="failed", trigger="webhook") == 1
    assert recorded is not None and recorded.finished_at is not None
    assert value(
        samples, "gitops_agent_pass_duration_seconds_sum", outcome="failed"
    ) == pytest.approx(recorded.finished_at - recorded.started_at)
    results = "gitops_agent_unit_results_total"
    for unit, outcome in [
        ("network", "apply"),
        ("web", "hold"),
        ("db", "failed"),
        ("cache", "blocked"),
        ("dns", "nothing"),
    ]:
        assert value(samples, results, unit=unit, kind="stack", outcome=outcome) == 1, unit
    assert value(samples, "gitops_agent_drift_found_total", unit="network") == 1
    applied = "gitops_agent_last_applied_revision_timestamp_seconds"
    assert value(samples, applied, unit="network") == finished["network"]
    assert value(samples, applied, unit="dns") is None  # nothing applied
    assert value(samples, "gitops_agent_holds_waiting") == 1


def test_record_run_refuses_a_pass_still_running(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "state")
    try:
        run = store.start_run(trigger="cli")
        with pytest.raises(ValueError, match="has not finished"):
            record_run(AgentMetrics(), store, run)
    finally:
        store.close()
