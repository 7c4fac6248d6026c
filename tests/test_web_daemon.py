"""`agent run` with the web page enabled, followed in headless Chromium: the first pass,
a hand edit put back by the drift timer, and a pushed destroy held, each shown live on the
page the browser keeps open (no reload). The daemon is a real subprocess started by the
test (killed by its PID if the test fails); the page's port is read from its log.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli.quickstart import lay_out
from tests.support.infra import git
from tests.test_web_browser import ARTIFACTS, CHROMIUM, DRIVER, _browser

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (tests/run.sh installs them)",
)
WAIT = 60.0


def wait(condition: Any, what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # an element swapped out under us: look again
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, str, Path]]:
    config = lay_out(tmp_path / "qs")
    text = config.read_text().replace("poll: 30s", "poll: 1h").replace("drift: 5m", "drift: 3s")
    config.write_text(
        text
        + f"control_socket: {tmp_path / 'ctl.sock'}\n"
        + "daemon: {jitter: 0}\n"
        + "web: {listen: '127.0.0.1:0'}\n"
    )
    log_path = tmp_path / "agent.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
            stdout=log,
            stderr=log,
            env=dict(os.environ),
        )
    try:

        def listening() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(f"the agent exited:\n{log_path.read_text()}")
            found = re.search(r"web page on (http://127\.0\.0\.1:\d+)", log_path.read_text())
            return found.group(1) if found else None

        url = wait(listening, "the web page's listener")
        yield config, url, tmp_path / "qs"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()  # by PID: only the process this test started
            proc.wait(10)


def test_an_operator_follows_a_pass_a_drift_and_a_held_destroy_live(
    daemon: tuple[Path, str, Path], tmp_path: Path
) -> None:
    config, url, root = daemon
    browser = _browser(tmp_path / "profile")
    try:
        browser.get(url + "/")
        wait(lambda: browser.find_element("id", "live").text == "live", "the live badge")
        browser.execute_script("window.notReloaded = true;")

        def statuses() -> dict[str, str]:
            cards = browser.find_elements("css selector", "article.unit")
            return {c.get_attribute("id"): c.get_attribute("data-status") for c in cards}

        converged = {"unit-base": "converged", "unit-app": "converged", "unit-host": "converged"}
        wait(lambda: statuses() == converged, "every unit converged after the first pass")

        (root / "managed" / "motd.txt").write_text("edited by hand\n")
        wait(
            lambda: browser.find_elements("css selector", "#unit-base .s-reverted"),
            "the drift put back, on the open page",
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "daemon-drift.png"))

        main_tf = root / "infra" / "stacks/app/main.tf"
        text = main_tf.read_text()
        start = text.index('resource "terraform_data" "release"')
        main_tf.write_text(text[:start] + text[text.index("}\n}\n", start) + 4 :])
        git(root / "infra", "commit", "-qam", "app: drop the release record")
        git(root / "infra", "push", "-q", "origin", "HEAD:main")
        subprocess.run(
            [sys.executable, "-m", "agent.cli", "--config", str(config), "reconcile", "--now"],
            capture_output=True,
            timeout=WAIT,
            check=False,
        )
        wait(lambda: statuses().get("unit-app") == "held", "app held, on the open page")
        assert browser.execute_script("return window.notReloaded === true;")

        def open_app() -> bool:
            # The live page may swap the card out between finding the link and clicking.
            browser.find_element("css selector", "#unit-app h3 a").click()
            return True

        wait(open_app, "the app unit's link clicked")
        command = wait(lambda: browser.find_element("id", "approve-command").text, "command")
        assert re.fullmatch(r"agent approve r-\S+ --unit app", command)
        browser.save_screenshot(str(ARTIFACTS / "daemon-held.png"))
    finally:
        browser.quit()
