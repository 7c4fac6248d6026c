"""apprise sinks, delivered over real sockets on 127.0.0.1 (no mocks): apprise's `json://`
to an HTTP receiver, and `mailto://` to an SMTP server (aiosmtpd) the test runs. The
redactor stays in front: a secret in an event never reaches the receiver, the log, or a
sink's label.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from agent.core.redact import Redactor, install_logging_redaction, remove_logging_redaction
from agent.errors import ConfigError
from agent.service.notify import Event, NotificationSink, Notifier
from tests.support.canaries import find_leaks, load_canaries

SECRET = "apprise-canary-S3cret-991"
URL_TOKEN = "hooktoken-Zq81x"


def wait_for(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def http_receiver() -> Iterator[tuple[int, list[tuple[str, dict[str, Any]]]]]:
    received: list[tuple[str, dict[str, Any]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            received.append((self.path, json.loads(body)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def smtp_server() -> Iterator[tuple[int, list[Message]]]:
    messages: list[Message] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            messages.append(message_from_bytes(envelope.content))
            return "250 OK"

    with socket.socket() as probe:  # aiosmtpd needs a fixed port: take a free one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, messages
    finally:
        controller.stop()


def redactor() -> Redactor:
    r = Redactor()
    r.register(SECRET)
    return r


def failure_event() -> Event:
    return Event(
        "failure",
        "network",
        "r-20261207T120000-abcd",
        "c" * 40,
        f"terraform plan failed: password {SECRET} rejected",
        f"Error: authentication with {SECRET} failed\non line 3",
    )


def test_json_via_apprise_is_redacted(http_receiver, caplog: pytest.LogCaptureFixture) -> None:
    port, received = http_receiver
    url = f"json://127.0.0.1:{port}/notify/{URL_TOKEN}"
    sink = NotificationSink("apprise", url, timeout_s=5)
    scrub = redactor()
    notifier = Notifier([sink], scrub, retry_for_s=5, agent_host="bastion-1")
    install_logging_redaction(scrub)  # as the daemon does
    notifier.start()
    try:
        with caplog.at_level(logging.DEBUG):  # urllib3 logs request paths at debug level
            notifier.send(failure_event())
            wait_for(lambda: len(received) == 1)
    finally:
        notifier.stop(5)
        remove_logging_redaction(scrub)
    path, document = received[0]
    assert path == f"/notify/{URL_TOKEN}"
    assert document["title"] == "Failed: network"
    assert "terraform plan failed" in document["message"]
    assert "bastion-1" in document["message"] and "cccccccccccc" in document["message"]
    assert document["type"] == "failure"
    assert SECRET not in json.dumps(document)
    assert sink.label == "apprise sink json://…" and URL_TOKEN not in repr(sink)
    assert SECRET not in caplog.text and URL_TOKEN not in caplog.text
    assert notifier.stats()[0].delivered == 1


def test_email_via_apprise_reaches_an_smtp_server(smtp_server) -> None:
    port, messages = smtp_server
    url = f"mailto://127.0.0.1:{port}?from=agent@example.com&to=ops@example.com&mode=insecure"
    notifier = Notifier([NotificationSink("apprise", url)], redactor(), retry_for_s=5)
    notifier.start()
    try:
        notifier.send(failure_event())
        wait_for(lambda: len(messages) == 1)
    finally:
        notifier.stop(5)
    (message,) = messages
    assert message["Subject"] == "Failed: network"
    assert message["To"] == "ops@example.com"
    text = next(
        part.get_payload(decode=True).decode()
        for part in message.walk()
        if part.get_content_type() == "text/plain"
    )
    assert "terraform plan failed" in text and "on line 3" in text
    assert SECRET not in message.as_string() and SECRET not in text


def test_an_unreachable_apprise_sink_is_retried_then_given_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    url = f"json://127.0.0.1:{port}/notify/{URL_TOKEN}"
    sink = NotificationSink("apprise", url, timeout_s=2)
    notifier = Notifier([sink], redactor(), retry_for_s=0.6, backoff_s=0.1)
    notifier.start()
    try:
        with caplog.at_level(logging.WARNING, logger="agent.service.notify"):
            notifier.send(failure_event())
            wait_for(lambda: notifier.stats()[0].failed == 1)
    finally:
        notifier.stop(5)
    (line,) = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert "apprise sink json://…" in line and "Connection error" in line
    assert URL_TOKEN not in caplog.text and SECRET not in caplog.text


def test_an_apprise_url_apprise_cannot_read_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        NotificationSink("apprise", f"nosuchservice://{URL_TOKEN}@example.com")
    shown = caught.value.render()
    assert "apprise has no service" in shown and URL_TOKEN not in shown


def test_no_canary_reaches_an_email(smtp_server) -> None:
    # Every awkward shape of secret (tests/cases/canaries.json) in an event's text.
    canaries = load_canaries()
    scrub = Redactor()
    for canary in canaries:
        scrub.register(canary.value)
    port, messages = smtp_server
    url = f"mailto://127.0.0.1:{port}?from=agent@example.com&to=ops@example.com&mode=insecure"
    notifier = Notifier([NotificationSink("apprise", url)], scrub, retry_for_s=5)
    notifier.start()
    # One message (apprise spaces messages to one service by 5.5 s): every canary in it.
    detail = "\n".join(f"{c.name}: before {c.value} after" for c in canaries)
    summary = " ".join(c.value for c in canaries[:5])
    try:
        notifier.send(Event("apply", "web", "r-1", "d" * 40, summary, detail))
        wait_for(lambda: len(messages) == 1)
    finally:
        notifier.stop(5)
    texts = []
    assert "long-4k: before" in messages[0].as_string()
    for message in messages:
        texts.append(message.as_string())
        for part in message.walk():
            if not part.is_multipart():
                texts.append(part.get_payload(decode=True).decode("utf-8", "replace"))
    assert find_leaks(texts, canaries) == []
