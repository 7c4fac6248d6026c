"""`agent run` as a real subprocess: real repos, the embedded Terraform, webhooks over HTTP on
127.0.0.1, the control socket, a real NOTIFY_SOCKET, SIGTERM in the middle of an apply.

Every daemon is started by the test, listens on 127.0.0.1 port 0 (the port is read from its
log) and a control socket in the test's tmp dir, and is stopped (SIGTERM) or killed by its
PID. Waits are bounded.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.state.store import RunRow, RunStore
from tests.support.infra import InfraRepo, write_host_config
from tests.tfhelpers import LOCALFILE_REQUIRED

SECRET = "test-webhook-secret-3f9a"
WAIT = 30.0  # upper bound for anything a test waits on

PROVIDER = LOCALFILE_REQUIRED


def file_stack(path: Path, content: str) -> str:
    """A stack whose one resource is a file (a user checks it with `cat`)."""
    return PROVIDER + (
        'resource "localfile_file" "motd" {\n'
        f'  path    = "{path}"\n'
        f'  content = "{content}\\n"\n'
        "}\n"
    )


def data_stack(value: str) -> str:
    return f'resource "terraform_data" "v" {{\n  input = "{value}"\n}}\n'


SLOW_TF = """
resource "terraform_data" "slow" {
  input = var.generation
  provisioner "local-exec" {
    command = "sleep 3"
  }
}
variable "generation" {
  type    = string
  default = "1"
}
"""


class Receiver:
    """A notification sink on 127.0.0.1: keeps every JSON document POSTed to it."""

    def __init__(self) -> None:
        self.documents: list[dict[str, Any]] = []
        received = self.documents

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/notify?token=sink-token-7c1e"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what or predicate}")


class AgentProcess:
    """An infra repo, a host config, and `agent run` started as a subprocess."""

    def __init__(self, tmp: Path, *, poll: str = "1h", units: str = "", extra: str = "") -> None:
        self.tmp = tmp
        self.repo = InfraRepo(tmp / "git")
        self.state = tmp / "state"
        self.socket = tmp / "ctl.sock"
        self.log_path = tmp / "agent.log"
        secret_file = tmp / "webhook-secret"
        secret_file.write_text(SECRET + "\n")
        secret_file.chmod(0o600)
        self.config = write_host_config(
            tmp / "agent.yaml",
            self.repo.url,
            self.state,
            textwrap.dedent(f"""\
            intervals: {{poll: {poll}, drift: 1h, units: {{{units}}}}}
            http:
              listen: 127.0.0.1:0
              max_body: 64KiB
              webhooks:
                github: {{kind: github, secret_file: {secret_file}}}
            control_socket: {self.socket}
            daemon: {{jitter: 0, stop_timeout: 60s, backoff_max: 10m}}
            """)
            + extra,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    # --- the process ------------------------------------------------------------------

    def start(self, env: dict[str, str] | None = None, *, first_pass: bool = True) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--config", str(self.config), "run"],
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
        )
        log.close()

        def listening() -> re.Match[str] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the agent exited at start:\n{self.new_log()}")
            return re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.new_log())

        match = wait_for(listening, what="the HTTP listener")
        self.port = int(match.group(1))
        if first_pass:
            wait_for(lambda: "pass succeeded" in self.new_log(), what="the first pass")

    def new_log(self) -> str:
        """The log of the current process only (one file for every start)."""
        text = self.log_path.read_text(errors="replace")
        marker = "control socket"
        return text[text.rfind(marker) :] if marker in text else text

    def stop(self, timeout: float = WAIT) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # by PID: only the process this test started
            self.proc.wait(10)

    # --- what a user does ---------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def webhook(self, *, secret: str = SECRET, body: bytes | None = None) -> tuple[int, str]:
        payload = body or json.dumps({"ref": "refs/heads/main", "after": self.repo.head()}).encode()
        signature = hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
        return self.request(
            "POST",
            "/hooks/github",
            payload,
            {
                "Content-Type": "application/json",
                "X-GitHub-Event": "push",
                "X-GitHub-Delivery": "delivery-1",
                "X-Hub-Signature-256": f"sha256={signature}",
            },
        )

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    # --- what the store says --------------------------------------------------------------

    def runs(self) -> list[RunRow]:
        store = RunStore(self.state)
        try:
            return store.runs(limit=200)
        finally:
            store.close()

    def finished_runs(self, trigger: str) -> list[RunRow]:
        return [r for r in self.runs() if r.trigger == trigger and r.finished_at is not None]


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    made: list[AgentProcess] = []

    def make(**kwargs: Any) -> AgentProcess:
        made.append(AgentProcess(tmp_path, **kwargs))
        return made[-1]

    yield make
    for agent in made:
        agent.kill()


def test_a_push_plus_a_webhook_is_applied_notified_and_counted(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    receiver = Receiver()
    url_file = tmp_path / "sink-url"
    url_file.write_text(receiver.url + "\n")
    url_file.chmod(0o600)
    sink = f"notifications:\n  - {{kind: webhook, url_file: {url_file}, events: [apply]}}\n"
    agent = agent_factory(poll="1h", extra=sink)
    motd = tmp_path / "managed" / "motd.txt"
    agent.repo.write("stacks/app/main.tf", file_stack(motd, "hello"))
    agent.repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    agent.repo.push("seed")
    agent.start()
    assert motd.read_text() == "hello\n"

    agent.repo.write("stacks/app/main.tf", file_stack(motd, "hello again"))
    head = agent.repo.push("change the greeting")
    status, text = agent.webhook()
    assert status == 202 and "reconcile triggered" in text

    wait_for(lambda: motd.read_text() == "hello again\n", what="the pushed change applied")
    run = wait_for(lambda: agent.finished_runs("webhook"), what="the webhook's run")[0]
    assert run.status == "succeeded" and run.revision == head

    # Bad input is answered clearly and triggers nothing.
    status, text = agent.webhook(secret="not-the-secret")
    assert status == 401 and "does not match" in text
    status, text = agent.webhook(body=b"{" + b" " * (70 * 1024) + b"}")
    assert status == 413 and "limit" in text
    assert SECRET not in agent.log_path.read_text()

    # Scraped over real HTTP, as Prometheus would. The pass is counted once it has returned,
    # a moment after its run is recorded as finished (the store's backup comes in between).
    counted = 'gitops_agent_passes_total{outcome="succeeded",trigger="webhook"} 1.0'

    def scrape() -> str | None:
        status, metrics = agent.request("GET", "/metrics")
        return metrics if status == 200 and counted in metrics else None

    metrics = wait_for(scrape, what="the webhook's pass counted")
    assert 'gitops_agent_passes_total{outcome="succeeded",trigger="start"} 1.0' in metrics
    assert 'gitops_agent_unit_results_total{kind="stack",outcome="apply",unit="app"} 2.0' in metrics
    assert 'gitops_agent_apply_failures_total{unit="app"} 0.0' in metrics
    assert re.search(
        r'gitops_agent_last_applied_revision_timestamp_seconds\{unit="app"\} \d', metrics
    )
    status, health = agent.request("GET", "/healthz")
    assert status == 200 and f"succeeded at {head[:12]}" in health

    # One `apply` notification per pass that applied, with the run id; the sink's URL (a
    # credential) is in no log line.
    wait_for(lambda: len(receiver.documents) == 2, what="two apply notifications")
    receiver.close()
    last = receiver.documents[-1]
    assert (last["event"], last["unit"], last["run"]) == ("apply", "app", run.id)
    assert last["revision"] == head and last["summary"] == "applied (+0 ~1 -0)"
    assert "sink-token-7c1e" not in agent.log_path.read_text()

    assert agent.stop() == 0
    assert len(agent.runs()) == 2  # the start pass and the webhook's: 401/413 ran nothing


def test_a_webhook_pass_plans_only_the_stack_the_push_touched(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(poll="1h")
    agent.repo.write("stacks/app/main.tf", data_stack("one"))
    agent.repo.write("stacks/other/main.tf", data_stack("other"))
    agent.repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n"
        "  - {name: other, stack: stacks/other}\n",
    )
    agent.repo.push("seed")
    agent.start()

    agent.repo.write("stacks/app/main.tf", data_stack("two"))
    head = agent.repo.push("two")
    assert agent.webhook()[0] == 202
    run = wait_for(lambda: agent.finished_runs("webhook"), what="the webhook's pass")[0]
    assert run.revision == head and run.status == "succeeded"
    rows = {r.unit: r.decision for r in RunStore(agent.state).unit_runs(run.id)}
    assert rows == {"app": "apply", "other": "unchanged"}  # no Terraform ran for `other`

    # Through the daemon: `--changed-only` asks the same of a CLI pass; without it, all plan.
    result = agent.cli("reconcile", "--now", "--changed-only", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert {u: v["decision"] for u, v in answer["units"].items()} == {
        "app": "unchanged",
        "other": "unchanged",
    }
    assert agent.finished_runs("cli-changed-only")
    result = agent.cli("reconcile", "--now", "--json")
    answer = json.loads(result.stdout)
    assert {u: v["decision"] for u, v in answer["units"].items()} == {
        "app": "nothing",
        "other": "nothing",
    }
    assert agent.stop() == 0


def test_a_push_without_a_webhook_is_applied_within_the_poll_interval(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(poll="1s")
    agent.repo.write("stacks/app/main.tf", data_stack("one"))
    agent.repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    agent.repo.push("seed")
    agent.start()

    agent.repo.write("stacks/app/main.tf", data_stack("two"))
    head = agent.repo.push("two")
    run = wait_for(lambda: agent.finished_runs("poll"), timeout=WAIT, what="a poll pass")[0]
    assert run.revision == head and run.status == "succeeded"

    # Polls that find nothing new run no pass (and fill no history).
    count = len(agent.runs())
    time.sleep(3.5)
    assert len(agent.runs()) == count
    assert agent.stop() == 0


def test_twenty_webhooks_in_one_second_give_at_most_two_passes(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(poll="1h")
    agent.repo.write("stacks/app/main.tf", data_stack("one"))
    agent.repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    agent.repo.push("seed")
    agent.start()
    agent.repo.write("stacks/app/main.tf", data_stack("two"))
    head = agent.repo.push("two")

    answers: list[int] = []
    started = time.monotonic()
    threads = [
        threading.Thread(target=lambda: answers.append(agent.webhook()[0])) for _ in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert time.monotonic() - started < 3.0  # about a second; more on a loaded machine
    assert answers == [202] * 20

    wait_for(
        lambda: any(r.revision == head for r in agent.finished_runs("webhook")),
        what="the push applied",
    )
    time.sleep(2.0)  # a third pass, if there were one, would have started by now
    webhook_runs = [r for r in agent.runs() if r.trigger == "webhook"]
    assert 1 <= len(webhook_runs) <= 2, webhook_runs
    assert "triggers coalesced" in agent.log_path.read_text() or len(webhook_runs) == 1
    assert agent.stop() == 0


def test_sigterm_during_an_apply_releases_the_lock_and_the_next_start_recovers(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(poll="1h", extra="policy: {destroy: allow}\n")
    agent.repo.write("stacks/slow/main.tf", SLOW_TF)
    agent.repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: slow, stack: stacks/slow}\n")
    agent.repo.push("seed")
    agent.start(first_pass=False)
    wait_for(
        lambda: any(
            "Provisioning with 'local-exec'" in p.read_text(errors="replace")
            for p in agent.state.glob("runs/*/slow/apply.txt.partial")
        ),
        what="the apply under way",
    )

    stopped = time.monotonic()
    assert agent.stop() == 0
    assert time.monotonic() - stopped < 20
    log = agent.new_log()
    assert "SIGTERM: stopping" in log and "stopped" in log
    # Terraform was interrupted once and released its state lock.
    assert not list(agent.state.glob("units/slow/.terraform.tfstate.lock.info"))
    (cut,) = agent.runs()
    assert cut.status == "interrupted"

    agent.start()  # the next start converges
    runs = agent.runs()
    assert runs[0].trigger == "start" and runs[0].status == "succeeded", runs[0]
    assert runs[1].id == cut.id and runs[1].status == "interrupted"
    status = json.loads(agent.cli("status", "--json").stdout)
    assert status["units"][0]["last_result"] == "ok"
    assert agent.stop() == 0


def test_systemd_hears_ready_then_stopping_on_its_notify_socket(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent = agent_factory(poll="1h")
    agent.repo.write("stacks/app/main.tf", data_stack("one"))
    agent.repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    agent.repo.push("seed")
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(WAIT)
        # A watchdog of 0.4 s: the agent pings every 0.2 s.
        agent.start(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}, first_pass=False)
        messages = [notify.recv(4096).decode()]
        assert messages[0].startswith("READY=1")
        # READY comes once the listeners answer.
        assert agent.request("GET", "/healthz")[0] == 200
        agent.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        while "STOPPING=1" not in messages[-1]:
            messages.append(notify.recv(4096).decode())
        assert agent.proc.wait(WAIT) == 0  # type: ignore[union-attr]
    assert "WATCHDOG=1" in messages
    assert any(m.startswith("STATUS=run r-") for m in messages)  # what systemctl status shows


def test_reconcile_suspend_and_resume_go_through_the_daemon(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(poll="1h")
    agent.repo.write("stacks/app/main.tf", data_stack("one"))
    agent.repo.write("stacks/db/main.tf", data_stack("db"))
    agent.repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n"
        "  - {name: db, stack: stacks/db}\n",
    )
    agent.repo.push("seed")
    agent.start()

    result = agent.cli("suspend", "app", "--reason", "maintenance")
    assert result.returncode == 0, result.stderr
    assert "unit app suspended" in result.stdout
    status = agent.cli("status")
    assert "suspended: app" in status.stdout and "maintenance" in status.stdout

    agent.repo.write("stacks/app/main.tf", data_stack("two"))
    agent.repo.write("stacks/db/main.tf", data_stack("db2"))
    head = agent.repo.push("both")
    result = agent.cli("reconcile", "--now")
    assert result.returncode == 0, result.stderr
    assert re.search(rf"run r-\S+: succeeded at {head[:12]}", result.stdout)
    assert "db: applied (+0 ~1 -0)" in result.stdout
    assert "  app: suspended, left out (`agent resume app`)" in result.stdout  # listed, not gone
    run = agent.runs()[0]
    assert run.trigger == "cli"
    assert f"run={run.id}: pass started (trigger cli" in agent.new_log()  # the daemon ran it

    refused = agent.cli("reconcile", "--now", "--unit", "app")
    assert refused.returncode == 1
    assert "unit app is suspended" in refused.stderr and "agent resume app" in refused.stderr

    unknown = agent.cli("suspend", "nope")
    assert unknown.returncode == 5 and "no unit named 'nope'" in unknown.stderr
    runs = len(agent.runs())
    unknown = agent.cli("reconcile", "--now", "--unit", "nope")
    assert unknown.returncode == 5 and "no unit named 'nope'" in unknown.stderr
    assert len(agent.runs()) == runs  # no run recorded for it

    assert agent.cli("resume", "app").returncode == 0
    # Resuming queues a pass of the unit: the push it missed is applied now.
    resumed = wait_for(lambda: agent.finished_runs("resume"), what="the pass resume queued")
    assert resumed[0].unit_filter == "app" and resumed[0].revision == head
    rows = {r.unit: r.decision for r in RunStore(agent.state).unit_runs(resumed[0].id)}
    assert rows == {"app": "apply"}
    result = agent.cli("reconcile", "--now", "--unit", "app", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["units"]["app"]["decision"] == "nothing" and answer["revision"] == head
    assert agent.stop() == 0


def test_approve_through_the_daemon_applies_the_held_plan_then_converges_the_rest(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent = agent_factory(poll="1h")
    agent.repo.write("stacks/db/main.tf", data_stack("a") + data_stack("b").replace('"v"', '"w"'))
    agent.repo.write("stacks/app/main.tf", data_stack("app"))
    agent.repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - {name: db, stack: stacks/db}\n"
        "  - {name: app, stack: stacks/app, depends_on: [db]}\n",
    )
    agent.repo.push("seed")
    agent.start()
    agent.repo.write("stacks/db/main.tf", data_stack("a"))  # destroys db's `w`: held
    agent.repo.write("stacks/app/main.tf", data_stack("app2"))
    agent.repo.push("drop w")
    assert agent.webhook()[0] == 202
    held = wait_for(lambda: agent.finished_runs("webhook"), what="the held pass")[0]
    rows = {r.unit: r.status for r in RunStore(agent.state).unit_runs(held.id)}
    assert rows == {"db": "held", "app": "blocked"}

    approved = agent.cli("approve", held.id)

    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert "db: applied (+0 ~0 -1)" in approved.stdout
    assert f"approve {held.id} by" in agent.new_log()  # the daemon ran it

    # The units the hold blocked are converged by the pass that follows the approval.
    def both_approve_runs() -> list[RunRow] | None:
        runs = agent.finished_runs("approve")  # newest first: the follow-up, the approval
        return runs if len(runs) == 2 else None

    follow_up = wait_for(both_approve_runs, what="the follow-up pass")[0]
    units = {r.unit: (r.status, r.decision) for r in RunStore(agent.state).unit_runs(follow_up.id)}
    assert units == {"db": ("ok", "nothing"), "app": ("ok", "apply")}

    # A host config for another state dir pointed at this socket is refused, not served.
    other = write_host_config(
        tmp_path / "other.yaml",
        agent.repo.url,
        tmp_path / "other-state",
        f"control_socket: {agent.socket}\n",
    )
    refused = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(other), "reconcile", "--now"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1 and "serves the state directory" in refused.stderr
    assert agent.stop() == 0


def test_a_failing_unit_backs_off_and_does_not_starve_the_others(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(poll="1s")
    agent.repo.write("stacks/bad/main.tf", data_stack("ok"))
    agent.repo.write("stacks/good/main.tf", data_stack("one"))
    agent.repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - {name: bad, stack: stacks/bad}\n"
        "  - {name: good, stack: stacks/good}\n",
    )
    agent.repo.push("seed")
    agent.start()
    broken = 'resource "terraform_data" "v" {\n  input = var.nowhere\n}\n'
    agent.repo.write("stacks/bad/main.tf", broken)
    agent.repo.write("stacks/good/main.tf", data_stack("two"))
    agent.repo.push("break bad")

    def bad_failures() -> list[float]:
        store = RunStore(agent.state)
        try:
            rows = store.unit_history("bad", limit=50)
        finally:
            store.close()
        return sorted(r.started_at for r in rows if r.status == "failed")

    wait_for(lambda: len(bad_failures()) >= 3, timeout=WAIT, what="three tries of the bad unit")
    tries = bad_failures()
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    # poll * 2**N after the N-th failure: ~2 s, then ~4 s (not every 1 s poll).
    assert gaps[0] >= 1.9 and gaps[1] >= 3.9, gaps

    # The good unit is not held up by the bad one: its next push is applied at once.
    agent.repo.write("stacks/good/main.tf", data_stack("three"))
    head = agent.repo.push("good moves on")
    run = wait_for(
        lambda: next((r for r in agent.finished_runs("poll") if r.revision == head), None),
        timeout=WAIT,
        what="the good unit's push applied",
    )
    units = {r.unit: r.status for r in RunStore(agent.state).unit_runs(run.id)}
    assert units.get("good") == "ok"
    assert units.get("bad") in (None, "failed")  # left out while it backs off, or its retry
    assert "leaving out bad" in agent.new_log()
    assert agent.stop() == 0


def test_a_unit_with_its_own_drift_interval_is_planned_on_its_own_timer(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(poll="1h", units="app: {drift: 1s}")
    agent.repo.write("stacks/app/main.tf", data_stack("app"))
    agent.repo.write("stacks/db/main.tf", data_stack("db"))
    agent.repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n"
        "  - {name: db, stack: stacks/db}\n",
    )
    agent.repo.push("seed")
    agent.start()

    drift_runs = wait_for(
        lambda: (runs := agent.finished_runs("drift")) and len(runs) >= 2 and runs,
        timeout=WAIT,
        what="two drift passes of app",
    )
    assert {r.unit_filter for r in drift_runs} == {"app"}
    for run in drift_runs[:2]:
        units = {r.unit: r.decision for r in RunStore(agent.state).unit_runs(run.id)}
        assert units == {"app": "nothing"}
    assert agent.stop() == 0
