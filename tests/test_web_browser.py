"""The web page in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by Selenium), following real passes of the quickstart: the embedded Terraform, the
local fleet host, a real Git remote, the real listener on 127.0.0.1.

The scenarios run in file order on one quickstart (each pass takes seconds): converged
after the first pass; a hand edit shows as drift without a reload; a pushed destroy is held
and the page shows the plan and the approve command; a failed unit shows its error and the
units it blocks; and no form of the canary secret is in any page, asset or event. Each
scenario saves a screenshot under $TEST_ARTIFACTS/web (default: test-artifacts/web).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli.quickstart import lay_out
from agent.cli.views import render_status, status_view
from agent.config.host import load_host_config
from agent.config.web import WebConfig
from agent.core.progress import Event, EventKind
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.layout import StateLayout
from agent.state.store import RunStore
from agent.web.events import EventHub
from agent.web.server import WebApp, WebServer
from providers.git_source import GitSource
from tests.support.canaries import every_form
from tests.support.infra import git

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (tests/run.sh installs them)",
)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts")) / "web"
CANARY = "canary-web-7Hq2Lx9Pz4Rt"
WAIT = 30.0


class World:
    """The quickstart, a reconciler whose events feed the page, the page, a browser."""

    def __init__(self, root: Path) -> None:
        config = lay_out(root)
        secrets = root / "secrets"
        secrets.mkdir(mode=0o700)
        (secrets / "api-token").write_text(CANARY + "\n")
        (secrets / "api-token").chmod(0o600)
        config.write_text(config.read_text() + f"secrets:\n  allowed: ['file:{secrets}/']\n")
        self.work = root / "infra"
        manifest = self.work / "gitops.yaml"
        manifest.write_text(
            manifest.read_text().replace(
                '      greeting: "hello from gitops-agent"\n\n  # A fleet',
                '      greeting: "hello from gitops-agent"\n'
                f"    secrets:\n      api_token: 'file:{secrets}/api-token'\n\n  # A fleet",
                1,
            )
        )
        with (self.work / "stacks/app/main.tf").open("a") as tf:
            tf.write(
                '\nvariable "api_token" {\n  type = string\n}\n\n'
                'resource "terraform_data" "token" {\n  input = var.api_token\n}\n'
            )
        self.push("app: an API token")
        self.managed = root / "managed"
        host = load_host_config(config)
        self.layout = StateLayout(host.state_dir)
        self.hub = EventHub(lambda text: self.reconciler.redactor.redact(text))
        self.finished: dict[str, float] = {}  # unit -> when its unit-finished event came

        def report(event: Event) -> None:
            if event.kind is EventKind.UNIT_FINISHED and event.unit:
                self.finished[event.unit] = time.monotonic()
            self.hub(event)

        self.reconciler = Reconciler(host, reporter=report)
        self.store = RunStore(host.state_dir, read_only=True)
        source = GitSource(host.repo.url, host.repo.branch, self.layout.checkout)
        app = WebApp(
            self.store,
            self.layout,
            redact=self.reconciler.redactor.redact,
            hub=self.hub,
            commit=source.commit_info,
        )
        self.server = WebServer(app, WebConfig("127.0.0.1", 0))
        self.server.start()
        self.url = self.server.url
        self.stream = EventRecorder(self.server.port)
        self.browser = _browser(root / "chromium-profile")

    def push(self, message: str) -> str:
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", message)
        git(self.work, "push", "-q", "origin", "HEAD:main")
        return git(self.work, "rev-parse", "HEAD")

    def reconcile(self) -> Any:
        return self.reconciler.run_pass(PassRequest(trigger="poll"))

    def open(self, path: str = "/") -> None:
        self.browser.get(self.url + path)
        self.wait(lambda: self.browser.find_element("id", "live").text == "live", "live badge")

    def wait(self, condition: Any, what: str, timeout: float = WAIT) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = condition()
            except Exception:  # an element swapped out under us: look again
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def statuses(self) -> dict[str, str]:
        cards = self.browser.find_elements("css selector", "article.unit")
        return {
            c.get_attribute("id")[len("unit-") :]: c.get_attribute("data-status") for c in cards
        }

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))

    def close(self) -> None:
        self.browser.quit()
        self.stream.close()
        self.server.stop()
        self.store.close()
        self.reconciler.close()


class EventRecorder:
    """Keeps every byte of one event stream, as a browser receives it."""

    def __init__(self, port: int) -> None:
        self.data = bytearray()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self._sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while chunk := self._sock.recv(65536):
                self.data += chunk
        except OSError:
            pass

    def close(self) -> None:
        self._sock.close()


def _browser(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=str(DRIVER)))


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="web-browser-"))
    made = World(root)
    try:
        yield made
    finally:
        made.close()
        shutil.rmtree(root, ignore_errors=True)


def test_after_a_pass_the_overview_shows_every_unit_converged(world: World) -> None:
    result = world.reconcile()
    assert result.ok, result.error
    world.open("/")
    assert world.statuses() == {"base": "converged", "app": "converged", "host": "converged"}
    revision = world.browser.find_element("id", "revision").text
    assert result.revision[:12] in revision and "app: an API token" in revision
    # `app` is drawn after `base`, which it depends on.
    app = world.browser.find_element("id", "unit-app")
    base = world.browser.find_element("id", "unit-base")
    assert app.location["x"] > base.location["x"]
    world.screenshot("overview-converged")


def test_a_hand_edit_shows_as_drift_without_a_reload(world: World) -> None:
    world.open("/")
    world.browser.execute_script("window.notReloaded = true;")
    motd = world.managed / "motd.txt"
    motd.write_text("edited by hand\n")
    passing = threading.Thread(target=world.reconcile)
    started = time.monotonic()
    passing.start()
    try:
        world.wait(
            lambda: world.browser.find_elements("css selector", "#unit-base .s-reverted"),
            "the drift of base on the page",
        )
        shown = time.monotonic()
    finally:
        passing.join(WAIT * 4)
    assert world.browser.execute_script("return window.notReloaded === true;")
    assert shown - started < 20  # the pass itself takes a few seconds
    assert shown - world.finished["base"] < 2.0  # from the unit's end to the page: live
    assert "edited by hand" not in motd.read_text()  # drift: revert put it back
    world.open("/units/base")
    drift = world.browser.find_element("id", "drift").text
    assert "reverted" in drift
    world.screenshot("drift-reverted")


def test_a_pushed_destroy_is_held_and_the_page_shows_the_plan(world: World) -> None:
    main_tf = world.work / "stacks/app/main.tf"
    text = main_tf.read_text()
    start = text.index('resource "terraform_data" "release"')
    end = text.index("}\n}\n", start) + 4
    main_tf.write_text(text[:start] + text[end:])
    world.push("app: drop the release record")
    world.open("/units/app")
    result = world.reconcile()
    assert result.outcomes["app"].status == "held"
    world.wait(lambda: world.browser.find_elements("id", "held"), "the held plan, live")
    command = world.browser.find_element("id", "approve-command").text
    assert command == f"agent approve {result.run_id} --unit app"
    destroyed = world.browser.find_elements("css selector", "#held .l.destroy")
    assert any("terraform_data.release will be destroyed" in line.text for line in destroyed)
    world.screenshot("held-destroy")
    world.open("/")
    world.wait(lambda: world.statuses().get("app") == "held", "app held on the overview")


def test_a_failed_unit_shows_its_error_and_blocked_dependents(world: World) -> None:
    base_tf = world.work / "stacks/base/main.tf"
    base_tf.write_text(
        base_tf.read_text()
        + '\nresource "terraform_data" "broken" {\n  input = tonumber("not a number")\n}\n'
    )
    world.push("base: a broken resource")
    world.open("/")
    result = world.reconcile()
    assert result.outcomes["base"].status == "failed"
    world.wait(lambda: world.statuses().get("base") == "failed", "base failed, live")
    world.wait(lambda: world.statuses().get("app") == "blocked", "app blocked by it")
    world.screenshot("failed-overview")

    def open_base() -> bool:
        # The live page may swap the card out between finding the link and clicking.
        world.browser.find_element("css selector", "#unit-base h3 a").click()
        return True

    world.wait(open_base, "the base unit's link clicked")
    error = world.wait(lambda: world.browser.find_element("id", "failure").text, "the error")
    assert "tonumber" in error or "number" in error
    blocked = world.browser.find_element("id", "blocked").text
    assert "app" in blocked
    world.screenshot("failed-unit")


def test_no_canary_in_any_page_asset_or_event(world: World) -> None:
    sources = []
    for path in ("/", "/units/app", "/units/base", "/units/host", "/activity"):
        world.browser.get(world.url + path)
        sources.append(world.browser.page_source)
    # A fleet's page: each host with its result and round trips.
    assert "bastion" in sources[3] and "round trips" in sources[3]
    # The plan that carried the secret (the first pass created terraform_data.token).
    first = world.store.unit_history("app", limit=100)[-1]
    world.browser.get(f"{world.url}/units/app?run={first.run_id}")
    page = world.browser.page_source
    assert "terraform_data.token" in page
    sources.append(page)
    for asset in ("style.css", "live.js"):
        world.browser.get(f"{world.url}/static/{asset}")
        sources.append(world.browser.page_source)
    sources.append(bytes(world.stream.data).decode("utf-8", "replace"))
    assert b"event: unit-finished" in world.stream.data
    forms = every_form(CANARY)
    for text in sources:
        assert not [form for form in forms if form in text]
    world.browser.get(world.url + "/activity")
    assert world.browser.find_elements("css selector", "#pass-chart rect.bar")
    world.screenshot("activity")


def test_a_removed_unit_shows_where_its_removal_stands(world: World) -> None:
    manifest = world.work / "gitops.yaml"
    text = manifest.read_text()
    start, end = text.index("  # A fleet of one host"), text.index("roles:\n")
    manifest.write_text(text[:start] + text[end:])
    world.push("remove the host fleet")
    world.open("/")
    result = world.reconcile()
    assert result.outcomes["host"].status == "held", result.outcomes["host"]
    world.wait(lambda: world.statuses().get("host") == "held", "host held, live")
    card = world.browser.find_element("id", "unit-host")
    assert "removed from gitops.yaml" in card.text and "(prune: hold)" in card.text
    command = card.find_element("css selector", "code.approve").text
    assert command == f"agent approve {result.run_id} --unit host"
    # The same command `agent status` gives.
    assert f"`{command}`" in render_status(status_view(world.store, world.layout))
    world.open("/units/host")
    removed = world.browser.find_element("id", "removed").text
    assert "held" in removed and command in removed
    assert world.browser.find_element("id", "approve-command").text == command
    world.screenshot("removed-held")
