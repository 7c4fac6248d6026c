"""Benchmark: `git push` + webhook to the applied state, idle cost, and a burst of triggers.

Starts `agent run` as a subprocess (the embedded Terraform, a one-resource stack of
`terraform_data`, a GitHub webhook on 127.0.0.1, the default poll and drift intervals)
and measures:
  1. push-to-applied: the time from `git push` (included) and the webhook POST to the
     moment the run store says the unit converged at the pushed revision, over N pushes
     (median and p95);
  2. idle: the daemon's CPU over `--idle` seconds with nothing to do (utime + stime of the
     daemon and of the children it waited for, e.g. the poll's `git fetch`, from
     /proc/PID/stat), and its RSS (VmRSS) and peak RSS (VmHWM);
  3. burst: how many passes 20 webhooks sent at once start.
Prints a table.

    python bench/webhook_to_applied.py [--pushes 20] [--idle 60] [--burst 20]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from agent.state.store import RunStore  # noqa: E402
from tests.support.infra import InfraRepo, write_host_config  # noqa: E402

SECRET = "bench-webhook-secret"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def stack(generation: int) -> str:
    return f'resource "terraform_data" "app" {{\n  input = "generation-{generation}"\n}}\n'


class Daemon:
    def __init__(self, root: Path) -> None:
        self.repo = InfraRepo(root / "git")
        self.repo.write("stacks/app/main.tf", stack(0))
        self.repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
        self.repo.push("seed")
        secret = root / "webhook-secret"
        secret.write_text(SECRET + "\n")
        secret.chmod(0o600)
        self.state = root / "state"
        config = write_host_config(
            root / "agent.yaml",
            self.repo.url,
            self.state,
            f"""\
            http:
              listen: 127.0.0.1:0
              webhooks: {{github: {{kind: github, secret_file: {secret}}}}}
            control_socket: {root}/control.sock
            """,
        )
        self.log = root / "agent.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
                stdout=log,
                stderr=log,
                cwd=REPO_ROOT,
            )
        self.port = int(self._wait_log(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        self._wait_log(r"pass succeeded")
        self.store = RunStore(self.state)

    def _wait_log(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := re.search(pattern, self.log.read_text(errors="replace")):
                return match
            time.sleep(0.02)
        raise SystemExit(f"the daemon did not log {pattern!r}; see {self.log}")

    def webhook(self) -> int:
        body = json.dumps({"ref": "refs/heads/main", "after": self.repo.head()}).encode()
        signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(
                "POST",
                "/hooks/github",
                body,
                {
                    "Content-Type": "application/json",
                    "X-GitHub-Event": "push",
                    "X-Hub-Signature-256": f"sha256={signature}",
                },
            )
            return conn.getresponse().status
        finally:
            conn.close()

    def applied(self, revision: str) -> bool:
        state = self.store.unit_state("app")
        return state is not None and state.revision == revision

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
        return (utime + stime + cutime + cstime) / CLK_TCK

    def memory(self) -> tuple[int, int]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        return rss // 1024, hwm // 1024

    def stop(self) -> None:
        self.store.close()
        self.proc.send_signal(signal.SIGTERM)  # by PID: only the daemon this script started
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def push_to_applied(daemon: Daemon, pushes: int) -> list[float]:
    times = []
    for generation in range(1, pushes + 1):
        daemon.repo.write("stacks/app/main.tf", stack(generation))
        started = time.monotonic()
        head = daemon.repo.push(f"generation {generation}")
        if daemon.webhook() != 202:
            raise SystemExit("the webhook was not accepted")
        deadline = started + 60
        while not daemon.applied(head):
            if time.monotonic() > deadline:
                raise SystemExit(f"push {generation} not applied within 60 s")
            time.sleep(0.005)
        times.append(time.monotonic() - started)
        time.sleep(0.2)  # let the daemon settle between pushes
    return times


def burst(daemon: Daemon, count: int) -> int:
    daemon.repo.write("stacks/app/main.tf", stack(10_000))
    head = daemon.repo.push("burst")
    before = {r.id for r in daemon.store.runs(limit=500)}
    threads = [threading.Thread(target=daemon.webhook) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    deadline = time.monotonic() + 60
    while not daemon.applied(head) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(3.0)  # any further pass would have started by now
    return len([r for r in daemon.store.runs(limit=500) if r.id not in before])


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle measured")
    parser.add_argument("--burst", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-webhook-") as tmp:
        daemon = Daemon(Path(tmp))
        try:
            times = push_to_applied(daemon, args.pushes)
            time.sleep(2.0)
            cpu_before, wall_before = daemon.cpu_seconds(), time.monotonic()
            time.sleep(args.idle)
            cpu = daemon.cpu_seconds() - cpu_before
            wall = time.monotonic() - wall_before
            rss, hwm = daemon.memory()
            passes = burst(daemon, args.burst)
        finally:
            daemon.stop()

    rows = [
        ("push + webhook -> applied, median", f"{statistics.median(times):.2f} s"),
        ("push + webhook -> applied, p95", f"{percentile(times, 0.95):.2f} s"),
        ("push + webhook -> applied, min / max", f"{min(times):.2f} / {max(times):.2f} s"),
        (f"idle CPU over {wall:.0f} s", f"{100 * cpu / wall:.2f} % ({cpu:.2f} s of CPU)"),
        ("RSS idle / peak", f"{rss} MiB / {hwm} MiB"),
        (f"passes for a burst of {args.burst} webhooks", str(passes)),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'measure'.ljust(width)}  value")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    print(f"({args.pushes} pushes, one terraform_data resource, embedded Terraform, 2 cores)")


if __name__ == "__main__":
    main()
