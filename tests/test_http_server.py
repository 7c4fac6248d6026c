"""The agent's HTTP listener over real HTTP on 127.0.0.1: webhooks, /metrics, /healthz.

A real `AgentHTTPServer` on a free port, real clients (`http.client`, raw sockets for the
misbehaving ones), and the daemon's trigger stood in for by a recorder of the pushes it
receives and when.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.service.http_server import AgentHTTPServer, ListenError
from agent.service.webhooks import PushEvent, WebhookSource

SECRETS = {
    "github": "gh-test-secret-6d1f0b2a",
    "gitlab": "gl-test-token-93a7c4e1",
    "gitea": "gitea-test-key-58be20d7",
    "generic": "generic-test-token-0c9a",
}
SHA = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
BODY_MARKER = "body-marker-must-not-be-logged"
LOGGER = "agent.service.http_server"
WAIT = 5.0  # upper bound for anything a test waits on


@dataclass
class Recorder:
    """Stands in for the daemon's trigger: records each push and when it arrived."""

    events: list[tuple[PushEvent, float]] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)
    fail: bool = False

    def __call__(self, event: PushEvent) -> None:
        with self.arrived:
            self.events.append((event, time.monotonic()))
            self.arrived.notify_all()
        if self.fail:
            raise RuntimeError("trigger failed")

    def wait_for(self, count: int) -> list[tuple[PushEvent, float]]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.events) >= count, timeout=WAIT)
            return list(self.events)


def _metrics() -> tuple[bytes, str]:
    return b"# TYPE gitops_up gauge\ngitops_up 1\n", "text/plain; version=0.0.4; charset=utf-8"


def make_server(recorder: Recorder, **options: object) -> AgentHTTPServer:
    return AgentHTTPServer(
        "127.0.0.1",
        0,
        tracked_branch="main",
        hooks={kind: WebhookSource(kind, secret) for kind, secret in SECRETS.items()},
        on_push=recorder,
        metrics=_metrics,
        health=lambda: "ok at 6113728f27ae (2 units converged)",
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server(recorder: Recorder) -> Iterator[AgentHTTPServer]:
    with make_server(recorder, request_timeout=2.0) as srv:
        yield srv


def push_request(
    kind: str, branch: str = "main", *, secret: str | None = None, delivery: str = "d-1"
) -> tuple[bytes, dict[str, str]]:
    """A push as `kind` sends it, signed with `secret` (default: the configured one)."""
    secret = SECRETS[kind] if secret is None else secret
    body = json.dumps({"ref": f"refs/heads/{branch}", "after": SHA, "note": BODY_MARKER}).encode()
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json"}
    if kind == "github":
        headers |= {
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": delivery,
            "X-Hub-Signature-256": f"sha256={mac}",
        }
    elif kind == "gitea":
        headers |= {"X-Gitea-Event": "push", "X-Gitea-Delivery": delivery, "X-Gitea-Signature": mac}
    elif kind == "gitlab":
        headers |= {"X-Gitlab-Event": "Push Hook", "Idempotency-Key": delivery}
        headers["X-Gitlab-Token"] = secret
    else:
        headers |= {"Authorization": f"Bearer {secret}", "X-Request-Id": delivery}
    return body, headers


@dataclass
class Answer:
    status: int
    text: str
    headers: http.client.HTTPMessage


def request(
    srv: AgentHTTPServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=WAIT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Answer(response.status, response.read().decode(), response.headers)
    finally:
        conn.close()


def rejections(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]


# -- webhooks -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SECRETS))
def test_each_sender_triggers_one_pass_quickly(
    server: AgentHTTPServer, recorder: Recorder, kind: str
) -> None:
    body, headers = push_request(kind, delivery=f"{kind}-delivery-1")
    sent = time.monotonic()
    answer = request(server, "POST", f"/hooks/{kind}", body, headers)
    assert answer.status == 202
    assert "reconcile triggered" in answer.text
    events = recorder.wait_for(1)
    assert len(events) == 1
    event, arrived = events[0]
    assert (event.source, event.branch, event.revision) == (kind, "main", SHA)
    assert event.delivery == f"{kind}-delivery-1"
    assert arrived - sent < 0.5  # the brief: within a second, and here well under


def test_github_ping_is_answered_without_a_pass(
    server: AgentHTTPServer, recorder: Recorder
) -> None:
    body = b'{"zen": "Design for failure.", "hook_id": 1}'
    mac = hmac.new(SECRETS["github"].encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-GitHub-Event": "ping", "X-Hub-Signature-256": f"sha256={mac}"}
    answer = request(server, "POST", "/hooks/github", body, headers)
    assert answer.status == 200 and "pong" in answer.text
    # A push after it is the first and only thing the trigger sees (one dispatcher, in order).
    request(server, "POST", "/hooks/github", *push_request("github"))
    assert [e.source for e, _ in recorder.wait_for(1)] == ["github"]


@pytest.mark.parametrize(
    ("kind", "secret_header"),
    [("github", "X-Hub-Signature-256"), ("gitlab", "X-Gitlab-Token"), ("generic", "Authorization")],
)
def test_a_bad_secret_is_401_and_logged_without_secrets_or_body(
    server: AgentHTTPServer,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    secret_header: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    body, headers = push_request(kind, secret="wrong-secret-0000", delivery="bad-1")
    answer = request(server, "POST", f"/hooks/{kind}", body, headers)
    assert answer.status == 401
    lines = rejections(caplog)
    assert len(lines) == 1
    line = lines[0]
    for part in (
        "remote=127.0.0.1",
        f"route=POST /hooks/{kind}",
        "status=401",
        "delivery=bad-1",
    ):
        assert part in line
    # Neither the configured secret, nor what the client sent in its secret-bearing
    # header, nor the body reaches the log (any record, any level) or the answer.
    sent_secret = headers[secret_header].split("=")[-1].split(" ")[-1]
    for text in (caplog.text, answer.text):
        assert SECRETS[kind] not in text
        assert sent_secret not in text
        assert BODY_MARKER not in text
    request(server, "POST", f"/hooks/{kind}", *push_request(kind))
    assert len(recorder.wait_for(1)) == 1  # only the good push got through


def test_a_missing_signature_is_401(server: AgentHTTPServer) -> None:
    body, headers = push_request("github")
    del headers["X-Hub-Signature-256"]
    answer = request(server, "POST", "/hooks/github", body, headers)
    assert answer.status == 401
    assert "no X-Hub-Signature-256" in answer.text


def test_a_push_to_another_branch_is_ignored(
    server: AgentHTTPServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    answer = request(server, "POST", "/hooks/gitea", *push_request("gitea", branch="feature/x"))
    assert answer.status == 202
    assert "ignored" in answer.text and "follows main" in answer.text
    assert any("status=202" in line for line in rejections(caplog))
    request(server, "POST", "/hooks/gitea", *push_request("gitea", delivery="second"))
    events = recorder.wait_for(1)
    assert [e.delivery for e, _ in events] == ["second"]


def test_a_generic_trigger_without_a_body_triggers(
    server: AgentHTTPServer, recorder: Recorder
) -> None:
    headers = {"Authorization": f"Bearer {SECRETS['generic']}"}
    answer = request(server, "POST", "/hooks/generic", b"", headers)
    assert answer.status == 202
    assert recorder.wait_for(1)[0][0].ref == ""


def test_an_unknown_hook_is_404(server: AgentHTTPServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    answer = request(server, "POST", "/hooks/bitbucket?token=abc", *push_request("github"))
    assert answer.status == 404
    assert "no webhook named 'bitbucket'" in answer.text
    line = rejections(caplog)[0]
    assert "route=POST /hooks/bitbucket " in line and "token=abc" not in caplog.text
    assert request(server, "GET", "/").status == 404


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/hooks/github", "POST"),
        ("PUT", "/hooks/github", "POST"),
        ("POST", "/metrics", "GET, HEAD"),
        ("DELETE", "/healthz", "GET, HEAD"),
    ],
)
def test_a_wrong_method_is_405(server: AgentHTTPServer, method: str, path: str, allow: str) -> None:
    answer = request(server, method, path, b"" if method != "GET" else None)
    assert answer.status == 405
    assert answer.headers["Allow"] == allow


def test_a_chunked_body_is_411(server: AgentHTTPServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
    conn.putrequest("POST", "/hooks/github")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    assert response.status == 411
    conn.close()


@pytest.mark.parametrize("length", [b"abc", b"-1", b"\xb2", b"1e3"])
def test_a_malformed_content_length_is_400(server: AgentHTTPServer, length: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        sock.sendall(b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: " + length)
        sock.sendall(b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")


# -- limits ---------------------------------------------------------------------------


def test_an_oversized_body_is_413_without_being_read(recorder: Recorder) -> None:
    with make_server(recorder, max_body=1000, request_timeout=2.0) as srv:
        _, headers = push_request("github")
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=WAIT)
        conn.putrequest("POST", "/hooks/github")
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", "1001")
        conn.endheaders()  # headers only: the answer must come without the body
        started = time.monotonic()
        response = conn.getresponse()
        assert response.status == 413
        assert "1001 bytes is over the 1000-byte limit" in response.read().decode()
        assert time.monotonic() - started < 1.0  # not after the request timeout
        conn.close()


def test_a_client_that_sends_a_large_body_anyway_reads_the_413(recorder: Recorder) -> None:
    with make_server(recorder) as srv:  # the default limit, 1 MiB
        body = b"{" + b" " * (8 * 1024 * 1024) + b"}"
        answer = request(srv, "POST", "/hooks/github", body, {"Content-Type": "application/json"})
        assert answer.status == 413
        assert "over the 1048576-byte limit" in answer.text
    assert recorder.events == []


def test_expect_100_continue_with_an_oversized_body_gets_413_first(recorder: Recorder) -> None:
    with (
        make_server(recorder, max_body=1000) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as sock,
    ):
        sock.sendall(
            b"POST /hooks/generic HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 413 ")


def test_a_slow_client_is_cut_at_the_request_timeout(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with make_server(recorder, request_timeout=0.5) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as sock:
            sock.sendall(b"POST /hooks/github HTTP/1.1\r\n")
            started = time.monotonic()
            closed = False
            # One header byte every 50 ms: each read is quick, the whole request is not.
            for _ in range(100):
                try:
                    sock.sendall(b"X")
                except OSError:
                    closed = True
                    break
                sock.settimeout(0.05)
                try:
                    if sock.recv(100) == b"":
                        closed = True
                        break
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                    break
            elapsed = time.monotonic() - started
        assert closed
        assert 0.4 < elapsed < 1.5
        assert request(srv, "GET", "/healthz").status == 200  # the server is still serving
    assert any(
        r.levelno == logging.WARNING and "status=408" in r.getMessage() for r in caplog.records
    )


def test_a_body_that_stops_arriving_is_408(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with (
        make_server(recorder, request_timeout=0.5) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as sock,
    ):
        sock.sendall(b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert sock.recv(100).startswith(b"HTTP/1.1 408 ")
    assert any("status=408" in line for line in rejections(caplog))
    assert recorder.events == []


def test_requests_beyond_the_connection_limit_get_503(recorder: Recorder) -> None:
    with make_server(recorder, max_connections=2, request_timeout=2.0) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as extra:
                extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert extra.recv(100).startswith(b"HTTP/1.1 503 ")
        finally:
            for sock in held:
                sock.close()
        # Once the held connections are gone, requests are served again.
        for _ in range(50):
            if request(srv, "GET", "/healthz").status == 200:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the server did not recover after the held connections closed")


def _connect_from(source: str, port: int) -> socket.socket:
    """A connection to the listener from `source`, another address of 127.0.0.0/8."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _post_from(source: str, port: int, kind: str) -> bytes:
    body, headers = push_request(kind)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with _connect_from(source, port) as sock:
        sock.sendall(
            f"POST /hooks/{kind} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"{head}\r\n".encode()
            + body
        )
        return sock.recv(200)


def test_one_address_holding_idle_connections_cannot_starve_another(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    # The defaults, as the daemon uses them: 64 slots, 10 s for a request.
    with make_server(recorder) as srv:
        idle = [_connect_from("127.0.0.2", srv.port) for _ in range(64)]
        try:
            # Every idle connection beyond the address's share is refused at once...
            refused = 0
            for sock in idle:
                sock.settimeout(0.2)
                with contextlib.suppress(TimeoutError):
                    refused += sock.recv(100).startswith(b"HTTP/1.1 503 ")
            assert refused == 64 - 16
            # ...and a signed webhook from another address still gets through.
            assert _post_from("127.0.0.3", srv.port, "github").startswith(b"HTTP/1.1 202 ")
            assert recorder.wait_for(1)[0][0].delivery == "d-1"
        finally:
            for sock in idle:
                sock.close()
    assert any("from this address" in line for line in rejections(caplog))


def test_the_per_address_limit_frees_as_requests_end(recorder: Recorder) -> None:
    with make_server(recorder, max_connections_per_client=2) as srv:
        held = [_connect_from("127.0.0.4", srv.port) for _ in range(2)]
        try:
            assert _post_from("127.0.0.4", srv.port, "github").startswith(b"HTTP/1.1 503 ")
        finally:
            for sock in held:
                sock.close()
        for _ in range(50):  # the server notices the closed connections at once
            if _post_from("127.0.0.4", srv.port, "github").startswith(b"HTTP/1.1 202 "):
                break
            time.sleep(0.02)
        else:
            pytest.fail("the address's slots were not given back")


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /hooks/github HTTP/1.1\r\n", b"POST /hooks/github HTTP/1.1\r\nHost: x\r\n"],
    ids=["nothing", "request-line", "some-headers"],
)
def test_headers_that_never_finish_get_408_and_a_warning(
    recorder: Recorder, caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with (
        make_server(recorder, header_timeout=0.3, request_timeout=5.0) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as sock,
    ):
        started = time.monotonic()
        sock.sendall(sent)
        answer = sock.recv(300)
        elapsed = time.monotonic() - started
        assert sock.recv(100) == b""  # then the connection is closed
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"did not arrive within 0.3 s" in answer
    assert 0.2 < elapsed < 3.0  # the headers' deadline, not the request's
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "status=408" in r.getMessage()
    ]
    assert len(warnings) == 1
    route = "POST /hooks/github" if sent else "-"
    assert f"route={route} status=408" in warnings[0]
    assert not any("timed out" in r.getMessage() for r in caplog.records)


def test_the_body_may_take_until_the_request_deadline(recorder: Recorder) -> None:
    body, headers = push_request("github")
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with (
        make_server(recorder, header_timeout=0.3, request_timeout=5.0) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as sock,
    ):
        sock.sendall(
            f"POST /hooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"{head}\r\n".encode()
        )
        # The body comes after the headers' deadline, well within the request's.
        sock.settimeout(0.6)
        with pytest.raises(TimeoutError):
            sock.recv(100)
        sock.settimeout(WAIT)
        sock.sendall(body)
        assert sock.recv(100).startswith(b"HTTP/1.1 202 ")


DOCS = Path(__file__).resolve().parent.parent / "docs" / "webhooks.md"


def _doc_curl_commands() -> list[str]:
    """The generic sender's curl commands of docs/webhooks.md, joined into one line each."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("## Generic") : text.index("## What the answers mean")]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [block.replace("\\\n", " ") for block in blocks]


def test_the_docs_generic_curl_commands_trigger(recorder: Recorder, tmp_path: Path) -> None:
    commands = _doc_curl_commands()
    assert len(commands) == 2 and all(c.startswith("curl -fsS -X POST") for c in commands)
    secret_file = tmp_path / "webhook-ci"
    secret_file.write_text(SECRETS["generic"] + "\n")
    with make_server(recorder, request_timeout=2.0) as srv:
        for number, command in enumerate(commands, start=1):
            # The doc's command as written, pointed at this listener and this secret file.
            command = command.replace(
                "https://bastion.example.org/hooks/ci", f"{srv.url}/hooks/generic"
            ).replace("/etc/gitops-agent/webhook-ci", str(secret_file))
            done = subprocess.run(
                ["sh", "-c", command],
                env={"PATH": os.environ["PATH"], "TOKEN": SECRETS["generic"]},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert done.returncode == 0, (command, done.stderr)
            assert done.stdout.startswith("accepted: ")
            assert len(recorder.wait_for(number)) == number
    first, second = (event for event, _ in recorder.events)
    assert first.ref == ""  # no body: "reconcile the tracked branch now"
    assert second.ref == "refs/heads/main" and second.delivery == "pipeline-4711"


def test_twenty_parallel_pushes_are_all_answered_and_delivered(recorder: Recorder) -> None:
    kinds = list(SECRETS)
    # All from 127.0.0.1: allow them all at once (the per-address limit is tested below).
    with make_server(recorder, request_timeout=2.0, max_connections_per_client=20) as server:

        def send(i: int) -> int:
            kind = kinds[i % len(kinds)]
            return request(
                server, "POST", f"/hooks/{kind}", *push_request(kind, delivery=f"p-{i}")
            ).status

        with ThreadPoolExecutor(max_workers=20) as pool:
            statuses = list(pool.map(send, range(20)))
        assert statuses == [202] * 20
        events = recorder.wait_for(20)
    assert sorted(e.delivery or "" for e, _ in events) == sorted(f"p-{i}" for i in range(20))


def test_a_failing_trigger_does_not_stop_later_pushes(
    server: AgentHTTPServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    recorder.fail = True
    assert request(server, "POST", "/hooks/github", *push_request("github")).status == 202
    assert request(server, "POST", "/hooks/github", *push_request("github")).status == 202
    assert len(recorder.wait_for(2)) == 2
    assert any("push trigger failed" in r.getMessage() for r in caplog.records)


# -- metrics and health ---------------------------------------------------------------


def test_metrics_are_served_from_the_callback(server: AgentHTTPServer) -> None:
    answer = request(server, "GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "gitops_up 1" in answer.text


def test_healthz_says_ok_and_the_last_pass(server: AgentHTTPServer) -> None:
    answer = request(server, "GET", "/healthz")
    assert answer.status == 200
    assert answer.text.splitlines() == ["ok", "last pass: ok at 6113728f27ae (2 units converged)"]
    head = request(server, "HEAD", "/healthz")
    assert head.status == 200 and head.text == ""


def test_a_failing_metrics_callback_is_500_and_logged(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> tuple[bytes, str]:
        raise RuntimeError("registry broken")

    srv = make_server(recorder)
    srv.metrics = broken
    with srv:
        assert request(srv, "GET", "/metrics").status == 500
    assert any("metrics callback failed" in r.getMessage() for r in caplog.records)


# -- lifecycle ------------------------------------------------------------------------


def test_stop_is_prompt_with_a_connection_open_and_frees_the_port(recorder: Recorder) -> None:
    srv = make_server(recorder, request_timeout=30.0)
    srv.start()
    port = srv.port
    idle = socket.create_connection(("127.0.0.1", port))  # sends nothing, ever
    idle.sendall(b"GET /healthz HTTP/1.1\r\n")
    time.sleep(0.1)  # let the server take it
    started = time.monotonic()
    srv.stop(timeout=0.5)
    took = time.monotonic() - started
    idle.close()
    assert took < 1.5
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    # The daemon restarting on the same port works at once.
    again = AgentHTTPServer("127.0.0.1", port, tracked_branch="main", hooks={}, on_push=recorder)
    with again:
        assert request(again, "GET", "/healthz").text == "ok\n"
        assert request(again, "GET", "/metrics").status == 404
    srv.stop()  # a second stop is harmless


def test_a_taken_port_is_a_listen_error(recorder: Recorder) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = AgentHTTPServer("127.0.0.1", port, tracked_branch="main", hooks={}, on_push=recorder)
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}"):
            srv.start()
