"""Benchmark: one bastion, a growing fleet (issue 19), and the fleet pass against its floor
(issue 18).

Reuses bench/hosts_vs_pyinfra_ansible.py's lab (one OpenSSH sshd per host on 127.0.0.1,
M resources per host, one known_hosts, cgroup CPU and /proc memory sampling). For each N:

  - converge: the first pass on empty host trees, in a new process;
  - no-change: a new process runs `--passes` passes back to back, as the daemon does; the
    first pays for the imports and the manifest, the later ones reuse the validated
    manifest and the known_hosts index (their median is "warm");
  - floor: N connections by paramiko with the same parallelism, each one exec of
    `python3 -I -S` reading the same stdin bytes the agent sends (its program and a facts
    spec for M resources), in a new process: what SSH and Python cost, nothing else.

Per N it reports the pass wall time (cold and warm), the agent's CPU and the hosts' (sshd
and sessions) for the whole process, peak RSS, the cost per host, and the time spent loading
the manifest and handling known_hosts in each pass (measured inside the agent's process).
The load of the machine (`uptime`) is printed with the table: on a shared machine compare
the ratios of interleaved runs, not absolute times.

    python bench/fleet_scale.py [--sizes 50,100,200,400] [--resources 50]
        [--parallelism 50] [--passes 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.hosts_vs_pyinfra_ansible import (  # noqa: E402
    AgentTool,
    Host,
    Lab,
    Usage,
    actual_tree,
    channel_counts,
    expected_tree,
    lab,
    reset_trees,
    run_measured,
    tool_env,
    tree_problems,
)

# Several passes in one process, each timed, with the CPU spent in manifest loading and
# known_hosts handling summed per pass (wrappers around the two functions, bench only).
SCALE_DRIVER = textwrap.dedent(
    """
    import time
    STARTED = time.perf_counter()
    import json, sys, threading
    from pathlib import Path
    from agent.config import load_host_config, manifest as manifest_module
    from agent.engine.reconcile import PassRequest, Reconciler
    from providers.transport import ssh

    spent = {"manifest": 0.0, "known_hosts": 0.0}
    lock = threading.Lock()

    def timed(name, function):
        # CPU of the calling thread: with 50 workers, wall time would count GIL waits.
        def wrapper(*args, **kwargs):
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                with lock:
                    spent[name] += time.thread_time() - started
        return wrapper

    if hasattr(manifest_module, "ManifestCache"):
        cache = manifest_module.ManifestCache
        cache.load = timed("manifest", cache.load)
    else:  # older code (--agent-code): the pass calls load_manifest
        import agent.engine.reconcile as reconcile_module
        reconcile_module.load_manifest = timed("manifest", reconcile_module.load_manifest)
    # Host keys moved to hostkeys.py (KnownHosts); older code (--agent-code) has them in ssh.
    try:
        from providers.transport.hostkeys import KnownHosts as known
    except ImportError:
        known = ssh._KnownHosts
    name = "cached" if hasattr(known, "cached") else "load"
    setattr(known, name, classmethod(timed("known_hosts", getattr(known, name).__func__)))
    known.keys_for = timed("known_hosts", known.keys_for)

    import os
    if os.environ.get("BENCH_TRACE_MEMORY"):
        # Where the pass's memory is when every host of a fleet is done (as hosts.txt is
        # closed) and the traced peak: --trace-memory FRAMES, slow, bench only.
        import tracemalloc
        from agent.units import fleetlog
        tracemalloc.start(int(os.environ["BENCH_TRACE_MEMORY"]))
        close = fleetlog.HostLog.close

        def traced_close(self, **kwargs):
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            current, peak = tracemalloc.get_traced_memory()
            print(f"traced: now {current / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB",
                  file=sys.stderr)
            for stat in snapshot.statistics("traceback")[:25]:
                print(f"{stat.size / 2**20:8.2f} MiB {stat.count:8d}", file=sys.stderr)
                for line in stat.traceback.format()[-8:]:
                    print("    " + line, file=sys.stderr)
            sys.stderr.flush()
            return close(self, **kwargs)

        fleetlog.HostLog.close = traced_close

    def rss_mib():
        # The process's resident memory now and at its peak so far (exact, from the kernel).
        fields = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))

    imported = time.perf_counter() - STARTED
    imported_rss = rss_mib()[0]
    reconciler = Reconciler(load_host_config(Path(sys.argv[1])))
    passes = []
    try:
        for _ in range(int(sys.argv[2])):
            spent.update(manifest=0.0, known_hosts=0.0)
            started = time.perf_counter()
            result = reconciler.run_pass(PassRequest(trigger="bench"))
            passes.append({
                "wall_s": time.perf_counter() - started,
                "status": str(result.status),
                "errors": {n: o.error for n, o in result.outcomes.items() if o.error},
                **{f"{k}_s": v for k, v in spent.items()},
                **dict(zip(("rss_end_mib", "rss_peak_mib"), rss_mib())),
            })
    finally:
        reconciler.close()
    if passes:
        passes[0]["import_rss_mib"] = imported_rss
    print(json.dumps({"import_s": imported, "passes": passes}))
    """
)

# N connections with the given parallelism; each: connect (host key checked against the
# same known_hosts, read once; the same client key), one exec of `python3 -I -S` fed `stdin`.
FLOOR_DRIVER = textwrap.dedent(
    """
    import json, socket, sys, time
    from concurrent.futures import ThreadPoolExecutor
    import paramiko

    key_file, known_hosts, user, stdin_file, parallelism, *ports = sys.argv[1:]
    stdin = open(stdin_file, "rb").read()
    key = paramiko.PKey.from_path(key_file)
    known = paramiko.HostKeys(known_hosts)  # read once: the floor has no per-host parsing
    command = 'python3 -I -S -c "import sys; sys.stdin.buffer.read()"'

    def one(port):
        # TCP_NODELAY, as the agent sets it: without it Nagle costs ~40 ms an exchange.
        sock = socket.create_connection(("127.0.0.1", int(port)), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wire = paramiko.Transport(sock)
        try:
            wire.start_client(timeout=30)
            offered = wire.get_remote_server_key()
            listed = known.lookup(f"[127.0.0.1]:{port}") or {}
            if listed.get(offered.get_name()) != offered:
                raise SystemExit(f"host key of port {port} not known")
            wire.auth_publickey(user, key)
            chan = wire.open_session()
            chan.exec_command(command)
            chan.sendall(stdin)
            chan.shutdown_write()
            while chan.recv(65536):
                pass
            return chan.recv_exit_status()
        finally:
            wire.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(int(parallelism)) as pool:
        codes = list(pool.map(one, ports))
    print(json.dumps({"wall_s": time.perf_counter() - started, "codes": sorted(set(codes))}))
    """
)


@dataclass
class Row:
    n: int
    scenario: str  # converge | no-change | floor
    usage: Usage
    passes: list[dict] = field(default_factory=list)  # the driver's per-pass figures
    exec_per_host: list[int] = field(default_factory=list)
    connections_per_host: list[int] = field(default_factory=list)

    @property
    def cold_s(self) -> float:
        return self.passes[0]["wall_s"] if self.passes else self.usage.wall_s

    @property
    def warm_s(self) -> float | None:
        later = [p["wall_s"] for p in self.passes[1:]]
        return statistics.median(later) if later else None


class ScaleAgent(AgentTool):
    """The bench's agent, with the fleet's parallelism set (not one worker per host)."""

    parallelism = 50

    def manifest(self) -> str:
        n = len(self.hosts)
        return (
            super()
            .manifest()
            .replace(f"      parallelism: {n}\n", f"      parallelism: {self.parallelism}\n")
        )

    code_dir = REPO_ROOT  # the agent's code the passes run (--agent-code)

    def passes(self, scenario: str, count: int, log: Path) -> Row:
        argv = [sys.executable, "-c", SCALE_DRIVER, str(self.config), str(count)]
        code, usage, logs = run_measured(
            argv,
            # MALLOC_ARENA_MAX as systemd/gitops-agent.service sets it for the daemon.
            env=tool_env({"PYTHONPATH": str(self.code_dir), "MALLOC_ARENA_MAX": "2"}),
            cwd=self.code_dir,  # `-c` puts the working directory first on sys.path
            log=log,
            lab=self.lab,
            hosts=self.hosts,
        )
        text = log.read_text(errors="replace")
        if code != 0:
            raise SystemExit(f"agent passes failed ({code}); see {log}:\n{text[-3000:]}")
        answer = json.loads(text.strip().splitlines()[-1])
        for each in answer["passes"]:
            if each["status"] != "succeeded":
                raise SystemExit(f"agent pass did not succeed: {each}")
        execs, logins = channel_counts(logs)
        return Row(len(self.hosts), scenario, usage, answer["passes"], execs, logins)


def floor(where: Lab, hosts: Sequence[Host], parallelism: int, stdin: Path, log: Path) -> Row:
    argv = [
        sys.executable,
        "-c",
        FLOOR_DRIVER,
        str(where.key),
        str(where.known_hosts),
        "gitops-test",
        str(stdin),
        str(parallelism),
        *(str(h.port) for h in hosts),
    ]
    code, usage, logs = run_measured(
        argv, env=tool_env(), cwd=REPO_ROOT, log=log, lab=where, hosts=hosts
    )
    text = log.read_text(errors="replace")
    answer = json.loads(text.strip().splitlines()[-1]) if code == 0 else {}
    if code != 0 or answer.get("codes") != [0]:
        raise SystemExit(f"floor failed ({code}); see {log}:\n{text[-3000:]}")
    execs, logins = channel_counts(logs)
    return Row(len(hosts), "floor", usage, [{"wall_s": answer["wall_s"]}], execs, logins)


def same_stdin(hosts: Sequence[Host], path: Path) -> Path:
    """The stdin of the agent's no-change round trip to the first host (program + spec)."""
    from providers.hosts import wire

    queries = [{"kind": "file", "path": item.path, "state": "present"} for item in hosts[0].items]
    body = json.dumps({"mode": "facts", "resources": queries, "timeout": 540.0}).encode()
    path.write_bytes(wire.payload() + body)
    return path


def _spread(values: Sequence[float]) -> str:
    """`1` or `1-2`: the range of per-host counts, per pass."""
    if not values:
        return "-"
    low, high = f"{values[0]:g}", f"{values[-1]:g}"
    return low if low == high else f"{low}-{high}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def table(rows: Sequence[Row], meta: dict) -> str:
    lines = [
        f"{meta['resources']} resources per host, parallelism {meta['parallelism']},"
        f" {meta['cores']} cores; load at start: {meta['load_start']}; at end: {meta['load_end']}",
        "",
        "| N | scenario | pass wall (cold) | warm pass | per host (warm) | agent CPU"
        " | host CPU | peak RSS | manifest (cold/warm) | known_hosts (cold/warm)"
        " | exec/host/pass | conn/host/pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        u = row.usage
        warm = row.warm_s
        per_host = (warm if warm is not None else row.cold_s) / row.n
        first = row.passes[0] if row.passes else {}
        later = row.passes[1:]

        def share(key: str, first: dict = first, later: list = later) -> str:
            if key not in first:
                return "-"
            warm_value = statistics.median(p[key] for p in later) if later else None
            return f"{_ms(first[key])} / {_ms(warm_value)} ms"

        runs = max(1, len(row.passes))  # the sshd counts cover every pass of the process
        execs = sorted({count / runs for count in row.exec_per_host})
        conns = sorted({count / runs for count in row.connections_per_host})
        lines.append(
            f"| {row.n} | {row.scenario} | {row.cold_s:.2f} s | "
            f"{'-' if warm is None else f'{warm:.2f} s'} | {per_host * 1000:.1f} ms |"
            f" {u.cpu_s:.2f} s | {u.host_cpu_s:.2f} s | {u.peak_rss_kib / 1024:.0f} MiB |"
            f" {share('manifest_s')} | {share('known_hosts_s')} |"
            f" {_spread(execs)} | {_spread(conns)} |"
        )
    by_n: dict[int, dict[str, Row]] = {}
    for row in rows:
        by_n.setdefault(row.n, {})[row.scenario] = row
    lines.append("")
    for n, found in sorted(by_n.items()):
        base = found.get("floor")
        for scenario, agent in found.items():
            if base is None or not scenario.startswith("no-change"):
                continue
            warm = agent.warm_s if agent.warm_s is not None else agent.cold_s
            lines.append(
                f"N={n}: {scenario} pass / floor = {warm / base.cold_s:.2f}x warm"
                f" ({agent.cold_s / base.cold_s:.2f}x cold; floor {base.cold_s:.2f} s,"
                f" agent CPU/host {agent.usage.cpu_s / n / len(agent.passes) * 1000:.1f} ms"
                f" per pass)"
            )
    return "\n".join(lines)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,100,200,400")
    parser.add_argument("--resources", type=int, default=50)
    parser.add_argument("--parallelism", type=int, default=50)
    parser.add_argument("--passes", type=int, default=3, help="no-change passes per process")
    parser.add_argument("--rounds", type=int, default=1, help="floor/agent interleaved rounds")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--agent-code",
        type=Path,
        action="append",
        default=[],
        help="also run the no-change passes with the agent from this checkout (e.g. an"
        " export of main), interleaved with this one; repeatable",
    )
    parser.add_argument(
        "--trace-memory",
        type=int,
        default=0,
        metavar="FRAMES",
        help="tracemalloc in the agent's passes (slow): where its memory is when a fleet's"
        " hosts are done, with FRAMES frames per allocation; printed to each pass's log",
    )
    args = parser.parse_args()
    if args.trace_memory:
        os.environ["BENCH_TRACE_MEMORY"] = str(args.trace_memory)  # read by the driver
    sizes = [int(s) for s in args.sizes.split(",")]
    ScaleAgent.parallelism = args.parallelism
    meta = {
        "resources": args.resources,
        "parallelism": args.parallelism,
        "cores": os.cpu_count(),
        "load_start": uptime(),
    }
    rows: list[Row] = []

    def save() -> None:
        if args.json:
            data = {**meta, "rows": [asdict(r) for r in rows]}
            args.json.write_text(json.dumps(data, indent=1) + "\n")

    with lab(max(sizes), args.resources) as where:
        work = Path(tempfile.mkdtemp(prefix="scale-", dir=where.root))
        print(f"lab: {where.root} ({max(sizes)} sshd servers)", file=sys.stderr, flush=True)
        for n in sizes:
            hosts = where.hosts[:n]
            reset_trees(hosts)
            agent = ScaleAgent(where, hosts, work / f"agent-{n}")
            converge = agent.passes("converge", 1, work / f"converge-{n}.log")
            for host in hosts:
                if problems := tree_problems(
                    expected_tree(host.items, host.variables), actual_tree(host.base)
                ):
                    raise SystemExit(f"{host.name} not converged: {problems[0]}")
            rows.append(converge)
            stdin = same_stdin(hosts, work / f"stdin-{n}")
            others = []
            for index, code_dir in enumerate(args.agent_code):
                other = ScaleAgent(where, hosts, work / f"agent-{n}-other-{index}")
                other.code_dir = code_dir.resolve()
                other.passes("converge", 1, work / f"other-converge-{n}-{index}.log")
                others.append((f"no-change ({code_dir.name})", other))
            for k in range(args.rounds):  # interleaved: the load moves between them
                rows.append(floor(where, hosts, args.parallelism, stdin, work / f"fl-{n}-{k}"))
                rows.append(agent.passes("no-change", args.passes, work / f"nc-{n}-{k}.log"))
                for label, other in others:
                    log = work / f"nc-{n}-{k}-{len(rows)}.log"
                    rows.append(other.passes(label, args.passes, log))
                print(
                    table(rows[-2 - len(others) :], {**meta, "load_end": uptime()}), file=sys.stderr
                )
            save()
    meta["load_end"] = uptime()
    save()
    print(table(rows, meta))


if __name__ == "__main__":
    main()
