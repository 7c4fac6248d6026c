"""Benchmark: one full pass over 150 stacks whose plans wait ~1 s on I/O, run by 1, 2 and 3
agents (separate processes) that share one PostgreSQL run store and the `pg` state backend.

Each stack reads a `terraform_remote_state` data source from Terraform's built-in `http`
backend, served here by a threaded HTTP server on 127.0.0.1 that answers after `--delay`
seconds: every plan waits on I/O as it would on a cloud API (no provider to download). The
stacks are applied once and every agent runs one pass to set up its work areas (not
timed). Then, for each agent count, that many
`agent reconcile --now` processes start at once, each with its own state directory and the
same `terraform.parallelism`; the figure is the time until every stack has a result newer
than the start (read from the store), after which the agents still running are stopped
(SIGTERM). Throughput is stacks per second; the ratio is against one agent.

Until agents share the units out (leases, issue 20), passes take turns on a shared store:
the first agent's pass does all the work and the others wait, so expect ~1x. `--cluster`
writes `cluster: {agent: NAME}` into each host config, for an agent that knows that key.

    .venv/bin/python bench/cluster_throughput.py [--stacks 150] [--agents 1,2,3]
        [--parallelism 4] [--delay 1.0] [--terraform PATH] [--cluster]
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support.infra import InfraRepo, embedded_terraform, write_host_config  # noqa: E402
from tests.support.postgres import PostgresCluster  # noqa: E402

EMPTY_STATE = (
    b'{"version": 4, "terraform_version": "1.11.4", "serial": 1, "lineage": "bench",'
    b' "outputs": {"ready": {"value": "yes", "type": "string"}}, "resources": []}'
)


class SlowState(http.server.BaseHTTPRequestHandler):
    """A remote state that takes `delay` seconds to answer: a cloud API's latency."""

    delay = 1.0

    def do_GET(self) -> None:
        time.sleep(self.delay)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(EMPTY_STATE)))
        self.end_headers()
        self.wfile.write(EMPTY_STATE)

    def log_message(self, *args: object) -> None:
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def stack_tf(url: str) -> str:
    return (
        'data "terraform_remote_state" "api" {\n  backend = "http"\n'
        f'  config = {{ address = "{url}" }}\n}}\n'
        'resource "terraform_data" "x" {\n'
        "  input = data.terraform_remote_state.api.outputs.ready\n}\n"
    )


def secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def host_configs(
    root: Path, repo: InfraRepo, agents: int, args: argparse.Namespace, store: Path, state: Path
) -> list[Path]:
    configs = []
    for i in range(agents):
        name = f"agent{i + 1}"
        extra = f"control_socket: {root}/{name}.sock\nstore:\n  url_file: {store}\n"
        if args.cluster:
            extra += f"cluster:\n  agent: {name}\n"
        config = write_host_config(
            root / f"{name}.yaml", repo.url, root / name, extra, parallelism=args.parallelism
        )
        text = config.read_text().replace(
            f"  binary: {embedded_terraform()}\n", f"  binary: {args.terraform}\n"
        )
        text = text.replace(
            "  lock_timeout: 10s\n",
            f"  lock_timeout: 60s\n  state_backend:\n    pg: {{conn_str_file: {state}}}\n",
        )
        config.write_text(text)
        configs.append(config)
    return configs


def agent(config: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "GITOPS_AGENT_CONFIG"}
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(config), "reconcile", "--now"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def fresh_units(url: str, since: float) -> int:
    with psycopg.connect(url) as db:
        if db.execute("SELECT to_regclass('unit_runs')").fetchone() == (None,):
            return 0  # the first agent has not made the tables yet
        row = db.execute(
            "SELECT count(DISTINCT unit) FROM unit_runs WHERE started_at >= %s"
            " AND status NOT IN ('running', 'interrupted')",
            [since],
        ).fetchone()
    return int(row[0]) if row else 0


def full_pass(configs: list[Path], url: str, stacks: int, timeout: float) -> float:
    """Seconds until every stack has a result newer than the start."""
    since = time.time()
    started = time.monotonic()
    procs = [agent(config) for config in configs]
    try:
        while fresh_units(url, since) < stacks:
            if time.monotonic() - started > timeout:
                raise SystemExit(f"not every stack was reconciled within {timeout:.0f}s")
            if all(p.poll() is not None for p in procs):
                errors = b"".join(p.stderr.read() for p in procs if p.stderr)
                raise SystemExit(f"the agents ended first:\n{errors.decode()[-3000:]}")
            time.sleep(0.5)
        return time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--stacks", type=int, default=150)
    parser.add_argument("--agents", default="1,2,3", help="comma-separated agent counts")
    parser.add_argument("--parallelism", type=int, default=4, help="per agent")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds each plan waits")
    parser.add_argument(
        "--terraform",
        default="/usr/local/bin/terraform" if Path("/usr/local/bin/terraform").exists() else "",
        help="the Terraform binary (default: a stock one on this machine, else the embedded)",
    )
    parser.add_argument("--cluster", action="store_true", help="write cluster: {agent: NAME}")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    args.terraform = args.terraform or str(embedded_terraform())
    counts = [int(n) for n in args.agents.split(",")]

    SlowState.delay = args.delay
    server = Server(("127.0.0.1", 0), SlowState)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state_url = f"http://127.0.0.1:{server.server_address[1]}/state"

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp, PostgresCluster() as pg:
        root = Path(tmp)
        os.chmod(root, 0o755)
        store_url = pg.create_database("store")
        store = secret(root / "store-url", store_url)
        state = secret(root / "state-conn", pg.create_database("tfstate"))
        repo = InfraRepo(root / "git")
        units = []
        for i in range(args.stacks):
            repo.write(f"stacks/s{i:03d}/main.tf", stack_tf(state_url))
            units.append(f"  - {{name: s{i:03d}, stack: stacks/s{i:03d}}}")
        repo.write("gitops.yaml", "version: 1\nunits:\n" + "\n".join(units) + "\n")
        repo.push("bench")
        configs = host_configs(root, repo, max(counts), args, store, state)

        print(f"setup: applying {args.stacks} stacks with one agent (not timed)", flush=True)
        setup = full_pass(configs[:1], store_url, args.stacks, args.timeout)
        print(f"setup pass: {setup:.1f}s", flush=True)
        for config in configs[1:]:  # each agent's Terraform work areas made once (init)
            warm = full_pass([config], store_url, args.stacks, args.timeout)
            print(f"warm-up pass of {config.stem}: {warm:.1f}s", flush=True)
        print(f"{'agents':>6} {'pass s':>8} {'stacks/s':>9} {'vs 1':>6}")
        base = None
        for count in counts:
            seconds = full_pass(configs[:count], store_url, args.stacks, args.timeout)
            rate = args.stacks / seconds
            base = base or rate
            print(f"{count:>6} {seconds:>8.1f} {rate:>9.2f} {rate / base:>5.2f}x", flush=True)
    server.shutdown()


if __name__ == "__main__":
    main()
