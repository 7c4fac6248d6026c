"""Notifications, delivered over real HTTP to a receiver on 127.0.0.1 that the test runs."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agent import __version__
from agent.core.redact import Redactor
from agent.errors import ConfigError
from agent.service.metrics import AgentMetrics
from agent.service.notify import Event, NotificationSink, Notifier, unit_events
from agent.state.store import UnitOutcome, UnitStatus

SECRET = "pa55-w0rd-Very-Secret"
TOKEN_PATH = "/services/T000/B000/XyZ-hook-token"  # a Slack-like URL: the path is the secret
LOGGER = "agent.service.notify"


@dataclass(frozen=True)
class Received:
    path: str
    content_type: str
    body: bytes
    at: float  # monotonic

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Records every POST; answers from a script of (status, headers, body), then `default`."""

    def __init__(
        self,
        script: list[tuple[int, dict[str, str], bytes]] | None = None,
        default: tuple[int, dict[str, str], bytes] = (200, {}, b"ok"),
        delay: float = 0.0,
    ) -> None:
        self.script = list(script or [])
        self.default = default
        self.delay = delay
        self.received: list[Received] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._cond:
                    receiver.received.append(
                        Received(
                            self.path,
                            self.headers.get("Content-Type", ""),
                            body,
                            time.monotonic(),
                        )
                    )
                    answer = receiver.script.pop(0) if receiver.script else receiver.default
                    receiver._cond.notify_all()
                if receiver.delay:
                    time.sleep(receiver.delay)
                status, headers, text = answer
                self.send_response(status)
                for key, val in headers.items():
                    self.send_header(key, val)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str = TOKEN_PATH) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.received) >= count, timeout)
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def event(kind: str = "apply", summary: str = "applied (+1 ~0 -0)", **kw: Any) -> Event:
    fields: dict[str, Any] = {
        "unit": "network",
        "run_id": "r-20260101T000000-abcd",
        "revision": "0123456789abcdef0123456789abcdef01234567",
        "detail": "",
    }
    fields.update(kw)
    return Event(kind=kind, summary=summary, **fields)


def webhook(url: str, events: frozenset[str] | None = None, kind: str = "webhook") -> Any:
    return NotificationSink(
        kind=kind, url=url, events=events or frozenset({"apply", "failure", "drift", "hold"})
    )


def wait_until(check: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= 30]


def test_webhook_payload_is_json_with_every_string_redacted(receiver: Receiver) -> None:
    redactor = Redactor()
    redactor.register(SECRET)
    notifier = Notifier([webhook(receiver.url())], redactor, agent_host="bastion-1")
    notifier.start()
    notifier.send(
        event(
            "failure",
            summary=f"apply failed: password {SECRET} rejected",
            detail=f'Error: bad value\n  "password": "{SECRET}"\n',
        )
    )
    notifier.stop(5)

    [got] = receiver.wait_for(1)
    assert got.path == TOKEN_PATH
    assert got.content_type.startswith("application/json")
    assert SECRET.encode() not in got.body
    body = got.json()
    assert set(body) == {"event", "unit", "run", "revision", "summary", "detail", "time", "agent"}
    assert body["event"] == "failure" and body["unit"] == "network"
    assert body["run"] == "r-20260101T000000-abcd"
    assert body["revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert body["summary"] == "apply failed: password *** rejected"
    assert '"password": "***"' in body["detail"]
    assert body["agent"] == {"version": __version__, "host": "bastion-1"}
    assert notifier.stats()[0].delivered == 1


def test_503_twice_then_200_is_delivered_on_the_third_try_with_backoff() -> None:
    r = Receiver(script=[(503, {}, b"busy"), (503, {}, b"busy")])
    try:
        notifier = Notifier([webhook(r.url())], Redactor(), backoff_s=0.2)
        notifier.start()
        notifier.send(event())
        got = r.wait_for(3)
        notifier.stop(5)
        time.sleep(0.3)  # nothing more arrives
        assert len(r.received) == 3
    finally:
        r.close()
    assert got[0].body == got[1].body == got[2].body
    first_gap, second_gap = got[1].at - got[0].at, got[2].at - got[1].at
    # Backoff 0.2 s doubling, jitter keeps half of it: 0.1-0.2 s, then 0.2-0.4 s.
    assert 0.1 <= first_gap < 0.2 + 0.25
    assert 0.2 <= second_gap < 0.4 + 0.25
    [stats] = notifier.stats()
    assert (stats.delivered, stats.failed, stats.dropped) == (1, 0, 0)


def test_429_retry_after_is_honoured() -> None:
    r = Receiver(script=[(429, {"Retry-After": "1"}, b"ratelimited")])
    try:
        notifier = Notifier([webhook(r.url())], Redactor(), backoff_s=0.01)
        notifier.start()
        notifier.send(event())
        got = r.wait_for(2)
        notifier.stop(5)
    finally:
        r.close()
    assert len(got) == 2
    assert got[1].at - got[0].at >= 0.99  # not the 0.01 s backoff


def test_a_sink_that_never_answers_well_is_given_up_within_retry_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    r = Receiver(default=(503, {}, b"down"))
    try:
        sink = webhook(r.url(f"{TOKEN_PATH}?token=q-tok3n"))
        notifier = Notifier([sink], Redactor(), retry_for_s=1.0, backoff_s=0.1)
        notifier.start()
        sent = time.monotonic()
        notifier.send(event())
        wait_until(lambda: notifier.stats()[0].failed == 1)
        took = time.monotonic() - sent
        notifier.stop(5)
    finally:
        r.close()
    assert took < 1.0 + 0.5
    assert len(r.received) >= 3
    [line] = warnings_from(caplog)
    assert f"webhook sink 127.0.0.1:{r.port}" in line
    assert "HTTP 503" in line and "network" in line
    everything = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "/services/" not in everything and "XyZ-hook-token" not in everything
    assert "q-tok3n" not in everything


def test_connection_refused_is_retried_then_given_up(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = webhook(f"http://127.0.0.1:{port}/hook")
    notifier = Notifier([sink], Redactor(), retry_for_s=0.5, backoff_s=0.05)
    notifier.start()
    notifier.send(event())
    wait_until(lambda: notifier.stats()[0].failed == 1)
    notifier.stop(5)
    [line] = warnings_from(caplog)
    assert "connection refused" in line and re.search(r"after \d+ attempts? in", line)


def test_a_client_error_is_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    r = Receiver(default=(400, {}, b"invalid_payload"))
    try:
        notifier = Notifier([webhook(r.url(), kind="slack")], Redactor(), backoff_s=0.01)
        notifier.start()
        notifier.send(event())
        wait_until(lambda: notifier.stats()[0].failed == 1)
        notifier.stop(5)
        time.sleep(0.1)
        assert len(r.received) == 1
    finally:
        r.close()
    [line] = warnings_from(caplog)
    assert "HTTP 400: invalid_payload" in line and "after 1 attempt in" in line


def test_a_redirect_is_not_followed(caplog: pytest.LogCaptureFixture) -> None:
    r = Receiver(default=(302, {"Location": "/elsewhere"}, b""))
    try:
        notifier = Notifier([webhook(r.url())], Redactor())
        notifier.start()
        notifier.send(event())
        wait_until(lambda: notifier.stats()[0].failed == 1)
        notifier.stop(5)
        assert [g.path for g in r.received] == [TOKEN_PATH]
    finally:
        r.close()
    [line] = warnings_from(caplog)
    assert "HTTP 302" in line and "redirect" in line


def test_slack_payload_follows_the_incoming_webhook_format(receiver: Receiver) -> None:
    redactor = Redactor()
    redactor.register(SECRET)
    notifier = Notifier([webhook(receiver.url(), kind="slack")], redactor, agent_host="bastion")
    notifier.start()
    notifier.send(
        event(
            "drift",
            summary=f"<!channel> drift in aws_instance.web & {SECRET}",
            detail="~ tags.Owner: x -> y\n" * 400,  # 8,000 characters
        )
    )
    notifier.stop(5)

    [got] = receiver.wait_for(1)
    assert SECRET.encode() not in got.body
    body = got.json()
    assert set(body) == {"text", "blocks"}
    assert isinstance(body["text"], str) and "network" in body["text"]
    assert "<!channel>" not in got.body.decode()  # escaped: no @channel ping from a summary
    header, summary, facts, detail, context = body["blocks"]
    assert header["type"] == "header" and header["text"]["type"] == "plain_text"
    assert len(header["text"]["text"]) <= 150 and "network" in header["text"]["text"]
    assert summary["type"] == "section" and summary["text"]["type"] == "mrkdwn"
    assert summary["text"]["text"] == "&lt;!channel&gt; drift in aws_instance.web &amp; ***"
    assert facts["type"] == "section" and len(facts["fields"]) <= 10
    assert all(f["type"] == "mrkdwn" and len(f["text"]) <= 2000 for f in facts["fields"])
    assert any("0123456789ab" in f["text"] for f in facts["fields"])
    text = detail["text"]["text"]
    assert text.startswith("```") and text.endswith("…```") and len(text) <= 3000
    assert "-&gt;" in text
    assert context["type"] == "context" and __version__ in context["elements"][0]["text"]


def test_each_sink_gets_only_the_events_it_asked_for(receiver: Receiver) -> None:
    sinks = [
        webhook(receiver.url("/a"), frozenset({"apply"})),
        webhook(receiver.url("/b"), frozenset({"drift", "failure"})),
    ]
    notifier = Notifier(sinks, Redactor())
    notifier.start()
    for kind in ("apply", "drift", "hold", "failure"):
        notifier.send(event(kind))
    notifier.stop(5)
    got = receiver.wait_for(3)
    by_path: dict[str, list[str]] = {}
    for g in got:
        by_path.setdefault(g.path, []).append(g.json()["event"])
    assert by_path == {"/a": ["apply"], "/b": ["drift", "failure"]}


def test_a_repeated_failure_is_sent_once_within_the_repeat_interval(receiver: Receiver) -> None:
    notifier = Notifier([webhook(receiver.url())], Redactor())
    notifier.start()
    for _ in range(3):  # the same failure at three passes
        notifier.send(event("failure", summary="terraform plan failed"))
    notifier.send(event("failure", summary="terraform apply failed"))  # another cause
    notifier.send(event("failure", summary="terraform plan failed", unit="web"))  # another unit
    for _ in range(2):
        notifier.send(event("apply"))  # every apply is news
    notifier.stop(5)
    got = [(g.json()["event"], g.json()["unit"], g.json()["summary"]) for g in receiver.received]
    assert got == [
        ("failure", "network", "terraform plan failed"),
        ("failure", "network", "terraform apply failed"),
        ("failure", "web", "terraform plan failed"),
        ("apply", "network", "applied (+1 ~0 -0)"),
        ("apply", "network", "applied (+1 ~0 -0)"),
    ]
    assert notifier.suppressed == 2

    again = Notifier([webhook(receiver.url("/again"))], Redactor(), repeat_after_s=0)
    for _ in range(2):
        again.send(event("drift", summary="drift found, left as it is"))
    again.start()
    again.stop(5)
    assert [g.path for g in receiver.received].count("/again") == 2


def test_stop_flushes_what_is_queued() -> None:
    r = Receiver(delay=0.02)
    try:
        notifier = Notifier([webhook(r.url())], Redactor())
        for i in range(10):
            notifier.send(event(summary=f"n{i}"))
        notifier.start()
        began = time.monotonic()
        notifier.stop(5)
        took = time.monotonic() - began
        assert [g.json()["summary"] for g in r.received] == [f"n{i}" for i in range(10)]
    finally:
        r.close()
    assert took < 3
    assert notifier.stats()[0].delivered == 10


def test_stop_gives_up_at_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    r = Receiver(default=(503, {}, b"down"))
    try:
        notifier = Notifier([webhook(r.url())], Redactor(), retry_for_s=60, backoff_s=0.2)
        notifier.start()
        for _ in range(3):
            notifier.send(event())
        # The first delivery is under way (retried), the other two queued behind it.
        assert r.wait_for(1, timeout=30.0), "the notifier never tried the first event"
        began = time.monotonic()
        notifier.stop(0.5)
        took = time.monotonic() - began
    finally:
        r.close()
    assert took < 0.5 + 2.0  # bounded by its timeout, not by the 60 s of retries (slack for load)
    [stats] = notifier.stats()
    assert (stats.failed, stats.dropped, stats.queued) == (1, 2, 0)
    lines = warnings_from(caplog)
    assert any("the agent is stopping" in line for line in lines)
    notifier.send(event())  # after stop: counted, not queued
    assert notifier.dropped == 3


def test_a_full_queue_drops_the_oldest(receiver: Receiver) -> None:
    metrics = AgentMetrics()

    def count(sink: NotificationSink, result: str) -> None:
        metrics.notification_finished(sink_kind=sink.kind, sink_host=sink.host, result=result)

    notifier = Notifier([webhook(receiver.url())], Redactor(), max_queue=3, on_result=count)
    for i in range(5):
        notifier.send(event(summary=f"n{i}"))
    assert notifier.dropped == 2
    notifier.start()
    notifier.stop(5)
    assert [g.json()["summary"] for g in receiver.received] == ["n2", "n3", "n4"]
    labels = {"sink_kind": "webhook", "sink_host": f"127.0.0.1:{receiver.port}"}
    sample = metrics.registry.get_sample_value
    assert sample("gitops_agent_notifications_total", {**labels, "result": "dropped"}) == 2
    assert sample("gitops_agent_notifications_total", {**labels, "result": "delivered"}) == 3


def test_a_sink_never_shows_its_url() -> None:
    url = f"https://hooks.example.com{TOKEN_PATH}"
    sink = NotificationSink(kind="slack", url=url, events=frozenset({"failure"}))
    assert TOKEN_PATH not in repr(sink) and sink.label == "slack sink hooks.example.com"
    with pytest.raises(ConfigError) as bad_kind:
        NotificationSink(kind="teams", url=url, events=frozenset({"failure"}))
    assert TOKEN_PATH not in str(bad_kind.value) and "slack or webhook" in str(bad_kind.value)
    with pytest.raises(ConfigError, match="subset of apply, drift, failure, hold"):
        NotificationSink(kind="slack", url=url, events=frozenset({"deploy"}))
    with pytest.raises(ConfigError) as bad_scheme:
        NotificationSink(kind="webhook", url=f"ftp://h{TOKEN_PATH}", events=frozenset({"hold"}))
    assert TOKEN_PATH not in str(bad_scheme.value)


OK, HELD, FAILED = UnitStatus.OK, UnitStatus.HELD, UnitStatus.FAILED


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (UnitOutcome(OK, "apply", plan_add=1, plan_change=0, plan_destroy=0),
         [("apply", "applied (+1 ~0 -0)")]),
        (UnitOutcome(OK, "apply", drift=True, plan_add=0, plan_change=1, plan_destroy=0),
         [("drift", "drift found and reverted (+0 ~1 -0)"), ("apply", "applied (+0 ~1 -0)")]),
        (UnitOutcome(OK, "report", drift=True),
         [("drift", "drift found, left as it is (drift: report)")]),
        (UnitOutcome(HELD, "hold", error="destroys resources", plan_add=0, plan_change=0,
                     plan_destroy=2),
         [("hold", "plan held for approval (+0 ~0 -2)")]),
        (UnitOutcome(HELD, "hold", error="outside change window (opens Mon 2026-12-07 09:00 UTC)",
                     waiting=True),
         [("hold", "changes wait: outside change window (opens Mon 2026-12-07 09:00 UTC)")]),
        (UnitOutcome(FAILED, error="terraform apply failed:\nError: boom"),
         [("failure", "terraform apply failed:")]),
        (UnitOutcome(OK, "apply", drift=True, drift_overwritten=True, plan_add=0,
                     plan_change=1, plan_destroy=0),
         [("drift", "drift overwritten by a change from Git (+0 ~1 -0)"),
          ("apply", "applied (+0 ~1 -0)")]),
        (UnitOutcome(OK, "nothing"), []),
        (UnitOutcome(OK, "skip"), []),
        (UnitOutcome(OK, "plan-only", drift=True), []),
        (UnitOutcome(UnitStatus.BLOCKED, error="depends on db"), []),
        (UnitOutcome(UnitStatus.INTERRUPTED), []),
    ],
)  # fmt: skip
def test_unit_results_make_the_expected_events(
    outcome: UnitOutcome, expected: list[tuple[str, str]]
) -> None:
    events = unit_events("db", outcome, run_id="r-1", revision="abc")
    assert [(e.kind, e.summary) for e in events] == expected
    assert all(e.unit == "db" and e.run_id == "r-1" and e.revision == "abc" for e in events)
    if outcome.status is FAILED:
        assert events[0].detail == "terraform apply failed:\nError: boom"
    if outcome.status is HELD:
        # Only a saved plan can be approved: a fleet waiting for its window has none.
        assert ("agent approve r-1" in events[0].detail) is not outcome.waiting


def test_a_pass_level_event_reads_well_in_slack() -> None:
    sink = NotificationSink(kind="slack", url="https://hooks.example.com/x")
    notice = Event("failure", "", "r-1", None, "fetch failed: could not resolve host")
    payload = Notifier([sink], Redactor()).payload(sink, notice, at=0)
    assert payload["blocks"][0]["text"]["text"] == ":x: Failed: the pass"
    assert "revision none" in payload["text"]
