"""The web page over real HTTP on 127.0.0.1: authentication, security headers, escaping,
redaction, pages and the event stream. No browser here (tests/test_web_browser.py has one).

The store is a real SQLite run store written through its own API, the page is served by the
real listener, and every request is a real HTTP request. No mocks.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config.host import load_host_config
from agent.config.web import WebConfig
from agent.core.progress import Event, EventKind
from agent.core.redact import Redactor
from agent.errors import ConfigError
from agent.state.layout import StateLayout
from agent.state.store import RunStatus, RunStore, UnitOutcome, UnitStatus
from agent.web.events import EventHub
from agent.web.server import CSP, WebApp, WebServer

CANARY = "canary-Zq8xW3pL7vK2-secret"
TOKEN = "web-token-4f1c9e2a7b"


def seed(state: Path, runs: int = 3) -> StateLayout:
    """A store with `runs` passes of unit `app`; the last one failed with a nasty error."""
    layout = StateLayout(state)
    layout.prepare()
    store = RunStore(state)  # no scrub: what the page shows must be redacted by the page
    for index in range(runs):
        run = store.start_run(trigger="poll")
        store.set_run_revision(run, "a" * 40, "a" * 40)
        store.start_unit(run, "app", "a" * 40)
        last = index == runs - 1
        outcome = (
            UnitOutcome(
                status=UnitStatus.FAILED,
                error=f"apply failed: <script>alert(1)</script> token {CANARY}",
            )
            if last
            else UnitOutcome(
                status=UnitStatus.OK,
                decision="apply",
                plan_add=1,
                plan_change=0,
                plan_destroy=0,
                converged=True,
            )
        )
        store.finish_unit(run, "app", "a" * 40, outcome)
        unit_dir = layout.unit_run_dir(run, "app")
        unit_dir.mkdir(parents=True)
        (unit_dir / "plan.txt").write_text(
            f'  + resource "terraform_data" "x" {{\n      + input = "{CANARY}"\n    }}\n'
            "Plan: 1 to add, 0 to change, 0 to destroy.\n"
        )
        store.finish_run(run, RunStatus.FAILED if last else RunStatus.SUCCEEDED)
    store.close()
    return layout


class Page:
    def __init__(self, tmp_path: Path, config: WebConfig, token: str | None = None) -> None:
        self.layout = seed(tmp_path / "state", runs=getattr(self, "runs", 3))
        self.redactor = Redactor()
        self.redactor.register(CANARY)
        self.store = RunStore(self.layout.root, read_only=True)
        self.hub = EventHub(self.redactor.redact)
        app = WebApp(self.store, self.layout, redact=self.redactor.redact, hub=self.hub)
        self.server = WebServer(app, config, token=token)
        self.server.start()

    def get(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET", body=None
    ) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read().decode()
        finally:
            conn.close()

    def close(self) -> None:
        self.server.stop()
        self.store.close()


@pytest.fixture
def open_page(tmp_path: Path) -> Iterator[Page]:
    page = Page(tmp_path, WebConfig("127.0.0.1", 0))
    yield page
    page.close()


@pytest.fixture
def token_page(tmp_path: Path) -> Iterator[Page]:
    page = Page(tmp_path, WebConfig("127.0.0.1", 0, token_file=tmp_path / "t"), token=TOKEN)
    yield page
    page.close()


def test_every_answer_has_the_strict_headers_and_no_inline_script(open_page: Page) -> None:
    for path in ("/", "/units/app", "/activity", "/units/missing", "/static/style.css"):
        status, headers, body = open_page.get(path)
        assert status in (200, 404), path
        assert headers["Content-Security-Policy"] == CSP
        assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        if headers["Content-Type"].startswith("text/html"):
            # Scripts only by src from this origin; no inline handlers or styles.
            assert re.findall(r"<script(?![^>]*\bsrc=\"/static/)", body) == []
            assert not re.search(r"\son[a-z]+=", body)
            assert " style=" not in body
            assert "http://" not in body and "https://" not in body  # no external resources


def test_the_overview_and_unit_page_show_the_failure_escaped_and_redacted(
    open_page: Page,
) -> None:
    status, _, overview = open_page.get("/")
    assert status == 200
    assert 'data-status="failed"' in overview
    status, _, unit = open_page.get("/units/app")
    assert status == 200
    # The error is shown, escaped by the template engine, and its secret is masked.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in unit
    assert "<script>alert(1)" not in unit
    for body in (overview, unit, open_page.get("/activity")[2]):
        assert CANARY not in body
    assert "***" in unit
    # Plan lines are coloured by what they do.
    assert '<span class="l add">  + resource' in unit
    assert '<span class="l summary">Plan: 1 to add' in unit


def test_a_unit_page_is_paginated(tmp_path: Path) -> None:
    Page.runs = 45
    try:
        page = Page(tmp_path, WebConfig("127.0.0.1", 0))
    finally:
        del Page.runs
    try:
        _, _, first = page.get("/units/app")
        assert "45 in all" in first and "page 1 of 3" in first
        assert first.count('<tr class="s-') == 20
        _, _, last = page.get("/units/app?page=3")
        assert last.count('<tr class="s-') == 5 and 'rel="prev"' in last
        _, _, beyond = page.get("/units/app?page=99")  # clamped, not an error
        assert "page 3 of 3" in beyond
    finally:
        page.close()


def test_a_token_listener_refuses_a_request_without_the_token(token_page: Page) -> None:
    for path in ("/", "/units/app", "/activity", "/events"):
        status, headers, body = token_page.get(path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert CANARY not in body and "apply failed" not in body
    status, _, _ = token_page.get("/", {"Authorization": "Bearer not-the-token"})
    assert status == 401
    status, _, body = token_page.get("/", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and 'data-status="failed"' in body
    # The style sheet and script hold no data: a browser may load them for the login form.
    assert token_page.get("/static/live.js")[0] == 200


def test_the_login_form_sets_a_session_cookie_that_is_not_the_token(token_page: Page) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = token_page.get("/login", form, "POST", "token=wrong")
    assert status == 401 and "not the page" in body
    status, headers, _ = token_page.get("/login", form, "POST", f"token={TOKEN}")
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    session = cookie.split(";")[0]
    assert token_page.get("/", {"Cookie": session})[0] == 200
    assert token_page.get("/", {"Cookie": session[:-2] + "00"})[0] == 401


def test_a_trusted_proxy_authenticates_by_its_header_and_no_one_else_does(
    tmp_path: Path,
) -> None:
    loopback = ipaddress.ip_network("127.0.0.1/32")
    page = Page(tmp_path, WebConfig("127.0.0.1", 0, trusted_proxies=(loopback,)))
    try:
        assert page.get("/")[0] == 401
        assert page.get("/", {"X-Forwarded-User": "alice"})[0] == 200
    finally:
        page.close()
    other = ipaddress.ip_network("10.9.0.0/16")
    page = Page(tmp_path / "b", WebConfig("127.0.0.1", 0, trusted_proxies=(other,)))
    try:  # the header from an address that is not the proxy's counts for nothing
        assert page.get("/", {"X-Forwarded-User": "alice"})[0] == 401
    finally:
        page.close()


def test_writes_are_refused_read_only(open_page: Page) -> None:
    status, headers, _ = open_page.get("/", method="POST", body="x=1")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_the_event_stream_carries_pass_events_redacted(open_page: Page) -> None:
    sock = socket.create_connection(("127.0.0.1", open_page.server.port), timeout=10)
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    deadline = time.monotonic() + 10
    while b": connected" not in received and time.monotonic() < deadline:
        received += sock.recv(4096)
    assert b"text/event-stream" in received
    assert open_page.hub.subscribers == 1
    open_page.hub(
        Event(EventKind.UNIT_FINISHED, "r-1", "app", f"failed: {CANARY} wrong", seconds=1.5)
    )
    open_page.hub(Event(EventKind.UNIT_LINE, "r-1", "app", "a line of terraform output"))
    while b"event: unit-finished" not in received and time.monotonic() < deadline:
        received += sock.recv(4096)
    sock.close()
    assert b'"unit":"app"' in received and b"***" in received
    assert CANARY.encode() not in received
    assert b"terraform output" not in received  # Terraform's lines never go out


def test_stopping_ends_open_event_streams(open_page: Page) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", open_page.server.port, timeout=10)
    conn.request("GET", "/events")
    response = conn.getresponse()
    assert response.status == 200
    done = threading.Event()
    threading.Thread(target=lambda: (response.read(), done.set()), daemon=True).start()
    started = time.monotonic()
    open_page.server.stop()
    assert done.wait(5), "the stream did not end when the listener stopped"
    assert time.monotonic() - started < 5


def test_an_address_off_loopback_needs_a_token_or_a_proxy(tmp_path: Path) -> None:
    base = "repo: {url: file:///nowhere.git}\nstate_dir: " + str(tmp_path / "s") + "\n"
    config = tmp_path / "agent.yaml"
    config.write_text(base + "web:\n  listen: 0.0.0.0:9200\n")
    with pytest.raises(ConfigError) as err:
        load_host_config(config)
    assert "agent.yaml:4: web.listen" in str(err.value) and "loopback" in str(err.value)
    config.write_text(base + "web: {listen: 0.0.0.0:9200, token_file: web-token}\n")
    web = load_host_config(config).service.web
    assert web is not None and web.token_file == tmp_path / "web-token" and not web.open
    config.write_text(base + "web: {listen: 127.0.0.1:9200}\n")
    web = load_host_config(config).service.web
    assert web is not None and web.open
    config.write_text(base + "web: {listen: 10.0.0.1:9200, trusted_proxies: [not-an-ip]}\n")
    with pytest.raises(ConfigError) as err:
        load_host_config(config)
    assert "web.trusted_proxies" in str(err.value)


def test_removed_units_show_where_their_removal_stands(open_page: Page) -> None:
    """As `agent status` does (docs/policy.md, "Prune"); before any pass gave the page a
    manifest, the store's word counts."""
    store = RunStore(open_page.layout.root)
    run = store.start_run(trigger="poll")
    store.start_unit(run, "old", "b" * 40)
    done = UnitOutcome(status=UnitStatus.OK, decision="apply", converged=True)
    store.finish_unit(run, "old", "b" * 40, done)
    store.finish_run(run, RunStatus.SUCCEEDED)
    for unit, status in (("old", "orphaned"), ("app", "pruning")):
        revisions = {"defined_at": "b" * 40, "removed_at": "c" * 40}
        store.removed.mark(unit, kind="stack", policy="hold", status=status, **revisions)
    store.removed.set_status("app", "pruning", run_id=run, error=f"cannot <b>read</b> {CANARY}")
    store.close()

    _, _, overview = open_page.get("/")
    assert 'id="unit-old" data-status="orphaned"' in overview
    assert 'id="unit-app" data-status="pruning"' in overview
    assert "removed from gitops.yaml at <code>cccccccccccc</code> (prune: hold)" in overview
    assert "what it created was left as it is" in overview
    assert "cannot &lt;b&gt;read&lt;/b&gt;" in overview
    _, _, unit = open_page.get("/units/app")
    assert 'id="removed"' in unit and "It is tried again by the next pass." in unit
    for body in (overview, unit):
        assert CANARY not in body
