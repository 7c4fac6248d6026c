"""Benchmark: converging N hosts over SSH with gitops-agent, pyinfra and Ansible.

Set-up, once per run (needs root, Debian's openssh-server, and PyPI for the tools' venv):
  - max(N) OpenSSH `sshd` servers on 127.0.0.1 (tests/support/sshd.py), each a "host"
    with its own directory tree /tmp/gitops-bench-XXXX/hosts/hNN, logging in the plain
    user `gitops-test` with one client key; one known_hosts file for all three tools,
    host keys checked by all three;
  - pyinfra and ansible-core from PyPI in a venv of their own (default
    /var/cache/gitops-agent-bench/venv), never in the project's dependencies.

The same desired state, M resources per host (mostly files and templates, some
directories and links, a few commands guarded by `creates`), written for each tool:
  - gitops-agent: a git repo with gitops.yaml (a fleet unit; one role per host, as the
    agent's resource names are literal paths) and a host config with `hosts:`; each pass
    runs `Reconciler(load_host_config(...)).run_pass(PassRequest(...))` in a new Python
    process, which also reports the pass's own time (what the daemon spends);
  - pyinfra: inventory.py (each host's base directory as literal host data) and deploy.py;
  - Ansible: inventory.yml (the same), playbook.yml, ansible.cfg with forks = N,
    pipelining, host key checking, gathering off and the interpreter given.

Scenarios, per N and tool, on freshly emptied host trees: first converge; no-change pass
(`--repeat` times, median); one file changed by hand on every host, then a pass that puts
it back. After each pass the hosts' trees are compared with the expected one.

Measured per pass: wall time of the tool's process; SSH exec channels and connections per
host, counted from each sshd's log (`LogLevel VERBOSE`: "Starting session:" and "Accepted
publickey" lines), and for the agent also its recorded `round_trips`; CPU of everything
the tool ran and of the sshd servers with their sessions (host side: on this machine both
share the same cores), each from a cgroup of its own (exited processes included); peak
summed RSS and PSS of the tool's processes (its cgroup: Ansible's detached ControlPersist
masters included), sampled from /proc every 100 ms.

    python bench/hosts_vs_pyinfra_ansible.py [--sizes 1,10,50] [--resources 50]
        [--repeat 1] [--tools agent,pyinfra,ansible] [--scenarios converge,no-change,put-back]
        [--json FILE] [--profile-agent DIR]
    python bench/hosts_vs_pyinfra_ansible.py --report FILE.json [FILE.json ...]

See bench/README.md for the choices made for each tool and the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jinja2  # noqa: E402

from tests.support.infra import InfraRepo, write_host_config  # noqa: E402
from tests.support.sshd import (  # noqa: E402
    SshServer,
    chown_tree,
    ensure_user,
    make_client_key,
    public_key,
)

TOOLS = ("agent", "pyinfra", "ansible")
SCENARIOS = ("converge", "no-change", "put-back")
TOOL_REQUIREMENTS = ("pyinfra==3.10.0", "ansible-core==2.19.14")
DEFAULT_TOOLS_VENV = Path("/var/cache/gitops-agent-bench/venv")
USER = "gitops-test"
REMOTE_PYTHON = "/usr/bin/python3"  # the hosts' (this machine's) Debian python3
SAMPLE_INTERVAL = 0.1  # seconds between /proc samples of a tool's process tree
RUN_TIMEOUT = 1800.0  # one pass of one tool, seconds
EDITED = "edited by hand\n"

# --- the desired state ------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One resource of a host, tool-neutral. `path` is absolute on the host."""

    kind: str  # directory | file | template | link | command
    label: str  # dNN, fNN, tNN, lNN, cNN: also the source file's stem
    path: str
    target: str = ""  # link target
    mode: str = ""  # "0644"


def resource_mix(m: int) -> dict[str, int]:
    """How M resources split by kind: mostly files and templates."""
    dirs = max(1, round(m * 0.10))
    links = round(m * 0.12)
    commands = max(1, round(m * 0.06)) if m >= 4 else 0
    templates = round(m * 0.24)
    files = m - dirs - links - commands - templates
    if files < 1:
        raise SystemExit(f"--resources {m} is too small (need at least 4)")
    return {
        "directory": dirs,
        "file": files,
        "template": templates,
        "link": links,
        "command": commands,
    }


def host_items(base: str, m: int) -> list[Item]:
    """The M resources of the host whose tree is `base`, in the order every tool applies."""
    mix = resource_mix(m)
    dirs = [
        Item("directory", f"d{i:02d}", f"{base}/d{i:02d}", mode="0755")
        for i in range(mix["directory"])
    ]
    items = list(dirs)
    files = [
        Item("file", f"f{i:02d}", f"{dirs[i % len(dirs)].path}/f{i:02d}.conf", mode="0644")
        for i in range(mix["file"])
    ]
    items += files
    items += [
        Item("template", f"t{i:02d}", f"{dirs[i % len(dirs)].path}/t{i:02d}.conf", mode="0640")
        for i in range(mix["template"])
    ]
    items += [
        Item("link", f"l{i:02d}", f"{base}/l{i:02d}", target=files[i % len(files)].path)
        for i in range(mix["link"])
    ]
    items += [Item("command", f"c{i:02d}", f"{base}/seeded-{i:02d}") for i in range(mix["command"])]
    return items


def file_body(label: str) -> str:
    """A config-like file of about 2 KiB, different for every label."""
    lines = [f"# {label}: managed by the benchmark"]
    lines += [f"option_{label}_{k:03d} = value-{k * 7919 % 10007:05d}" for k in range(64)]
    return "\n".join(lines) + "\n"


def template_source(label: str) -> str:
    """A Jinja2 template with only `{{ }}` expressions (the three tools' Jinja2 settings
    differ in block whitespace handling, not in expressions), rendered per host."""
    lines = [
        f"# {label} for {{{{ hostname }}}}: managed by the benchmark",
        "name = {{ hostname }}",
        "workers = {{ workers }}",
        "ports = {{ range(8000, 8000 + workers) | join(',') }}",
        "banner = {{ hostname | upper }}-{{ workers * 16 }}",
    ]
    lines += [f"setting_{label}_{k:03d} = {{{{ workers * {k} }}}}" for k in range(40)]
    return "\n".join(lines) + "\n"


def command_text(item: Item) -> str:
    return f"echo seeded > {item.path}"


def host_vars(index: int) -> dict[str, object]:
    return {"hostname": host_name(index), "workers": 2 + index % 4}


def host_name(index: int) -> str:
    return f"h{index:02d}"


def expected_tree(items: Sequence[Item], variables: dict[str, object]) -> dict[str, tuple]:
    """What a converged host's tree holds: path -> (kind, mode, sha256 or link target)."""
    env = jinja2.Environment(keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    tree: dict[str, tuple] = {}
    for item in items:
        if item.kind == "directory":
            tree[item.path] = ("dir", item.mode)
        elif item.kind == "file":
            tree[item.path] = ("file", item.mode, _sha(file_body(item.label)))
        elif item.kind == "template":
            text = env.from_string(template_source(item.label)).render(**variables)
            tree[item.path] = ("file", item.mode, _sha(text))
        elif item.kind == "link":
            tree[item.path] = ("link", item.target)
        elif item.kind == "command":
            tree[item.path] = ("file", "", _sha("seeded\n"))
    return tree


def actual_tree(base: Path) -> dict[str, tuple]:
    tree: dict[str, tuple] = {}
    for root, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if os.path.islink(path):
                tree[path] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                tree[path] = ("dir", f"{st.st_mode & 0o7777:04o}")
            else:
                tree[path] = ("file", f"{st.st_mode & 0o7777:04o}", _sha(Path(path).read_bytes()))
    return tree


def tree_problems(expected: dict[str, tuple], actual: dict[str, tuple]) -> list[str]:
    """Differences between two trees; a command's output file's mode is not managed."""
    problems = []
    for path, want in expected.items():
        have = actual.get(path)
        if have is None:
            problems.append(f"{path}: missing")
        elif want[0] == "file" and not want[1]:
            if have[0] != "file" or have[2] != want[2]:
                problems.append(f"{path}: {have} != {want}")
        elif have != want:
            problems.append(f"{path}: {have} != {want}")
    problems += [f"{path}: not expected" for path in actual if path not in expected]
    return problems


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


# --- the hosts ----------------------------------------------------------------------------


@dataclass
class Host:
    name: str
    server: SshServer
    base: Path
    items: list[Item]
    variables: dict[str, object]

    @property
    def port(self) -> int:
        return self.server.port

    def log_size(self) -> int:
        assert self.server.dir is not None
        return (self.server.dir / "sshd.log").stat().st_size

    def log_since(self, offset: int) -> str:
        assert self.server.dir is not None
        with open(self.server.dir / "sshd.log", "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")

    def sshd_pid(self) -> int:
        return server_pid(self.server)


def server_pid(server: SshServer) -> int:
    """The listening sshd's PID, from the PidFile SshServer configures."""
    assert server.dir is not None
    return int((server.dir / "sshd.pid").read_text().split()[0])


@dataclass
class Lab:
    """The servers, the client key, known_hosts and the hosts' trees (for max(N) hosts)."""

    root: Path
    key: Path
    known_hosts: Path
    hosts: list[Host]
    resources: int
    hosts_group: CpuGroup  # the sshd servers: host-side CPU


@contextmanager
def lab(count: int, resources: int) -> Iterator[Lab]:
    reason = SshServer.available()
    if reason:
        raise SystemExit(reason)
    ensure_user(USER)
    root = Path(tempfile.mkdtemp(prefix="gitops-bench-", dir="/tmp"))
    root.chmod(0o755)  # the hosts' user must reach its trees
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        hosts_group = CpuGroup(f"gitops-bench-hosts-{os.getpid()}")
        stack.callback(hosts_group.remove)  # after the servers stopped
        key = make_client_key(root / "client" / "id_ed25519")
        (root / "client").chmod(0o700)
        hosts = []
        for index in range(1, count + 1):
            server = stack.enter_context(SshServer(USER))
            server.add_authorized_key(USER, public_key(key))
            hosts_group.add(server_pid(server))  # its connections and sessions follow
            base = root / "hosts" / host_name(index)
            items = host_items(str(base), resources)
            hosts.append(Host(host_name(index), server, base, items, host_vars(index)))
        known_hosts = root / "client" / "known_hosts"
        known_hosts.write_text("".join(h.server.known_hosts_line() + "\n" for h in hosts))
        yield Lab(root, key, known_hosts, hosts, resources, hosts_group)


def reset_trees(hosts: Sequence[Host]) -> None:
    """Every host's tree empty, owned by the login user (a first converge starts here)."""
    for host in hosts:
        shutil.rmtree(host.base, ignore_errors=True)
        host.base.mkdir(parents=True)
        chown_tree(host.base, USER)


def edit_by_hand(hosts: Sequence[Host]) -> str:
    """Change the first plain file on every host; returns its label."""
    for host in hosts:
        first = next(i for i in host.items if i.kind == "file")
        Path(first.path).write_text(EDITED)
    return first.label


# --- measuring a process tree -------------------------------------------------------------


class CpuGroup:
    """A cgroup of our own: which processes are in it (children follow their parent, a
    daemon that detaches stays in), and the CPU they used, exited processes included.

    cgroup v1 `cpuacct` where it is mounted (as here), else cgroup v2. Removed by `remove`.
    """

    def __init__(self, name: str) -> None:
        v1 = Path("/sys/fs/cgroup/cpuacct")
        if (v1 / "cpuacct.usage").exists():
            self.path, self.v2 = v1 / name, False
        else:
            root = Path("/sys/fs/cgroup")
            root = root if (root / "cgroup.controllers").exists() else root / "unified"
            self.path, self.v2 = root / name, True
        self.path.mkdir()

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> set[int]:
        try:
            return {int(p) for p in (self.path / "cgroup.procs").read_text().split()}
        except OSError:
            return set()

    def cpu_s(self) -> float:
        if self.v2:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
            return 0.0
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        """Remove the (empty) group; waits a little for exiting processes to leave it."""
        deadline = time.monotonic() + 10
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@dataclass
class Usage:
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system of every process the tool ran (its cgroup)
    host_cpu_s: float = 0.0  # user + system of the sshd servers and their sessions
    peak_rss_kib: int = 0  # sum over the tool's processes, at the sampled peak
    peak_pss_kib: int = 0
    largest_rss_kib: int = 0  # the largest single process (wait4, exact)


def _pss_rss_kib(pid: int) -> tuple[int, int]:
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return pss, rss


class MemorySampler:
    """Peak summed RSS and PSS of the processes of a cgroup, sampled every 100 ms.

    PSS shares a page among the processes that map it: the honest total for a tree of
    forked workers (Ansible's); RSS counts such a page once per process."""

    def __init__(self, group: CpuGroup) -> None:
        self.group = group
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()

    def sample(self) -> None:
        pss = rss = 0
        for pid in self.group.pids():
            p, r = _pss_rss_kib(pid)
            pss, rss = pss + p, rss + r
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_rss = max(self.peak_rss, rss)


def _wait(pid: int, timeout: float) -> tuple[int, resource.struct_rusage]:
    """wait4() for our child `pid`, up to `timeout` seconds (then TimeoutError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status, rusage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, rusage
        time.sleep(0.02)
    raise TimeoutError(f"{pid} still running after {timeout:g} s")


def children_of(pids: set[int]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            text = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        if text and int(text[text.rindex(")") + 2 :].split()[1]) in pids:
            found.append(int(entry))
    return found


@dataclass
class Pass:
    """One measured pass of one tool."""

    tool: str
    n: int
    scenario: str
    usage: Usage
    exec_per_host: list[int]
    connections_per_host: list[int]
    agent_round_trips: list[int] = field(default_factory=list)
    agent_times: dict[str, float] = field(default_factory=dict)  # import, init, pass, close
    changed_hosts: int | None = None  # hosts the tool said it changed
    state_problems: int = 0
    first_problem: str = ""

    @property
    def agent_pass_s(self) -> float | None:
        return self.agent_times.get("pass")


def run_measured(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    cwd: Path,
    log: Path,
    lab: Lab,
    hosts: Sequence[Host],
    after: Callable[[], None] | None = None,
) -> tuple[int, Usage, list[str]]:
    """Run a tool to completion in a cgroup of its own, measuring it; returns (exit code,
    usage, new sshd log text per host). `after` runs once the tool has exited, before its
    processes are waited for (Ansible's masters stay behind until told to exit)."""
    offsets = [h.log_size() for h in hosts]
    host_cpu = lab.hosts_group.cpu_s()
    group = CpuGroup(f"gitops-bench-{os.getpid()}-{time.monotonic_ns()}")
    usage = Usage()
    try:
        with open(log, "wb") as out, MemorySampler(group) as sampler:
            started = time.perf_counter()
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # In the child, before exec: every process the tool starts is counted.
                preexec_fn=lambda: group.add(os.getpid()),
            )
            try:
                status, rusage = _wait(proc.pid, RUN_TIMEOUT)
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)  # the tool's own process group
                proc.wait()
                raise
            usage.wall_s = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
            sampler.sample()
            if after is not None:
                after()
            deadline = time.monotonic() + 10
            while group.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
        usage.cpu_s = group.cpu_s()
    finally:
        group.remove()
    usage.peak_rss_kib, usage.peak_pss_kib = sampler.peak_rss, sampler.peak_pss
    usage.largest_rss_kib = rusage.ru_maxrss
    # A connection's processes are counted when they exit: wait for sshd to close them.
    listeners = {h.sshd_pid() for h in hosts}
    deadline = time.monotonic() + 10
    while children_of(listeners) and time.monotonic() < deadline:
        time.sleep(0.05)
    usage.host_cpu_s = lab.hosts_group.cpu_s() - host_cpu
    logs = [h.log_since(o) for h, o in zip(hosts, offsets, strict=True)]
    return proc.returncode, usage, logs


def channel_counts(logs: Sequence[str]) -> tuple[list[int], list[int]]:
    """(exec/subsystem channels, connections) per host, from sshd's VERBOSE log lines."""
    sessions = [log.count("Starting session:") for log in logs]
    logins = [log.count("Accepted publickey") for log in logs]
    return sessions, logins


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # As installed by pip: byte-compiled modules (some shells set PYTHONDONTWRITEBYTECODE).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8")
    env.update(extra or {})
    return env


# --- the tools' venv ----------------------------------------------------------------------


def ensure_tools_venv(venv: Path) -> None:
    """pyinfra and ansible-core from PyPI in a venv of their own (kept between runs)."""
    marker = venv / "gitops-bench-requirements.txt"
    wanted = "\n".join(TOOL_REQUIREMENTS) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        return
    print(f"installing {', '.join(TOOL_REQUIREMENTS)} into {venv} ...", file=sys.stderr)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", *TOOL_REQUIREMENTS],
        check=True,
        timeout=900,
    )
    marker.write_text(wanted)


def tool_version(venv: Path, script: str) -> str:
    done = subprocess.run(
        [str(venv / "bin" / script), "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        env=tool_env(),
        check=True,
    )
    return done.stdout.splitlines()[0].strip()


# --- gitops-agent ---------------------------------------------------------------------------

AGENT_DRIVER = textwrap.dedent(
    """
    import time
    STARTED = time.perf_counter()
    import cProfile, json, pstats, sys, threading
    from pathlib import Path
    from agent.config import load_host_config
    from agent.engine.reconcile import PassRequest, Reconciler

    times = {"import": time.perf_counter() - STARTED}
    started = time.perf_counter()
    reconciler = Reconciler(load_host_config(Path(sys.argv[1])))
    times["init"] = time.perf_counter() - started
    profiles = []

    def profile_this_thread(*_):
        # The first event of a new thread: replace this hook with a profiler of its own.
        profiles.append(cProfile.Profile())
        profiles[-1].enable()

    if len(sys.argv) > 2:  # profile every thread (hosts converge in worker threads)
        threading.setprofile(profile_this_thread)
        profile_this_thread()
    try:
        started = time.perf_counter()
        result = reconciler.run_pass(PassRequest(trigger="bench"))
        times["pass"] = time.perf_counter() - started
        if profiles:
            threading.setprofile(None)
            stats = pstats.Stats(profiles[0])
            for each in profiles[1:]:
                stats.add(each)
            stats.dump_stats(sys.argv[2])
    finally:
        started = time.perf_counter()
        reconciler.close()
        times["close"] = time.perf_counter() - started
    print(json.dumps({
        "times": times,
        "status": str(result.status),
        "error": result.error,
        "decisions": {name: str(o.decision) for name, o in result.outcomes.items()},
        "errors": {name: o.error for name, o in result.outcomes.items() if o.error},
    }))
    """
)


class AgentTool:
    """gitops-agent: a repo with gitops.yaml, a host config, one pass per process."""

    name = "agent"

    def __init__(self, lab: Lab, hosts: Sequence[Host], work: Path) -> None:
        self.lab = lab
        self.hosts = hosts
        self.work = work
        self.profile_dir: Path | None = None
        self.repo = InfraRepo(work / "git")
        for item in hosts[0].items:
            if item.kind == "file":
                self.repo.write(f"files/{item.label}.conf", file_body(item.label))
            elif item.kind == "template":
                self.repo.write(f"templates/{item.label}.conf.j2", template_source(item.label))
        self.repo.write("gitops.yaml", self.manifest())
        self.repo.push("bench")
        self.state = work / "state"
        self.config = write_host_config(
            work / "agent.yaml",
            self.repo.url,
            self.state,
            f"""\
            hosts:
              key_file: {lab.key}
              known_hosts: {lab.known_hosts}
              parallelism: {len(hosts)}
              connect_timeout: 30s
            """,
        )

    def manifest(self) -> str:
        lines = [
            "version: 1",
            "units:",
            "  - name: bench",
            "    drift: revert",
            "    fleet:",
            f"      user: {USER}",
            f"      parallelism: {len(self.hosts)}",
            "      hosts:",
            "        static:",
        ]
        for host in self.hosts:
            lines.append(
                f"          - {{name: {host.name}, address: 127.0.0.1, port: {host.port},"
                f" roles: [{host.name}], vars: {json.dumps(host.variables)}}}"
            )
        lines.append("roles:")
        for host in self.hosts:
            lines.append(f"  {host.name}:")
            for item in host.items:
                lines += [f"    {line}" for line in self._item(item)]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _item(item: Item) -> list[str]:
        if item.kind == "directory":
            return [f"- directory: {item.path}", f'  mode: "{item.mode}"']
        if item.kind == "file":
            return [
                f"- file: {item.path}",
                f"  source: files/{item.label}.conf",
                f'  mode: "{item.mode}"',
            ]
        if item.kind == "template":
            return [
                f"- template: {item.path}",
                f"  source: templates/{item.label}.conf.j2",
                f'  mode: "{item.mode}"',
            ]
        if item.kind == "link":
            return [f"- link: {item.path}", f"  target: {item.target}"]
        return [
            f"- command: seed {item.label}",
            f"  run: {json.dumps(command_text(item))}",
            f"  creates: {item.path}",
        ]

    def run(self, scenario: str, log: Path) -> Pass:
        argv = [sys.executable, "-c", AGENT_DRIVER, str(self.config)]
        if scenario == "profiled":
            assert self.profile_dir is not None
            argv.append(str(self.profile_dir / f"agent-{len(self.hosts)}-no-change.prof"))
        code, usage, logs = run_measured(
            argv,
            env=tool_env({"PYTHONPATH": str(REPO_ROOT)}),
            cwd=REPO_ROOT,
            log=log,
            lab=self.lab,
            hosts=self.hosts,
        )
        text = log.read_text(errors="replace")
        if code != 0:
            raise SystemExit(f"agent pass failed ({code}); see {log}:\n{text[-3000:]}")
        answer = json.loads(text.strip().splitlines()[-1])
        if answer["status"] != "succeeded":
            raise SystemExit(f"agent pass did not succeed: {answer}")
        states = [self.host_state(h) for h in self.hosts]
        execs, logins = channel_counts(logs)
        return Pass(
            tool=self.name,
            n=len(self.hosts),
            scenario=scenario,
            usage=usage,
            exec_per_host=execs,
            connections_per_host=logins,
            agent_round_trips=[s["round_trips"] for s in states],
            agent_times=answer["times"],
            changed_hosts=sum(1 for s in states if s["changed"]),
        )

    def host_state(self, host: Host) -> dict:
        path = self.state / "units" / "bench" / "hosts" / f"{host.name}.json"
        return json.loads(path.read_text())


# --- pyinfra ------------------------------------------------------------------------------


class PyinfraTool:
    """pyinfra: inventory.py + deploy.py, `pyinfra -y --parallel N`."""

    name = "pyinfra"

    def __init__(self, lab: Lab, hosts: Sequence[Host], work: Path, venv: Path) -> None:
        self.lab = lab
        self.hosts = hosts
        self.work = work
        self.venv = venv
        work.mkdir(parents=True)
        _write_sources(work, hosts[0].items)
        common = {
            "ssh_hostname": "127.0.0.1",
            "ssh_user": USER,
            "ssh_key": str(lab.key),
            "ssh_known_hosts_file": str(lab.known_hosts),
            "ssh_strict_host_key_checking": "yes",
            "ssh_allow_agent": False,
            "ssh_look_for_keys": False,
        }
        entries = [
            f"    ({h.name!r}, {{**COMMON, 'ssh_port': {h.port}, 'base': {str(h.base)!r},"
            f" 'workers': {h.variables['workers']}}}),"
            for h in hosts
        ]
        (work / "inventory.py").write_text(
            f"COMMON = {common!r}\n\nhosts = [\n" + "\n".join(entries) + "\n]\n"
        )
        (work / "deploy.py").write_text(self.deploy(hosts[0].items, str(hosts[0].base)))

    @staticmethod
    def deploy(items: Sequence[Item], base: str) -> str:
        """The deploy file: the paths of host 1's items, with its base as host.data.base."""
        lines = [
            '"""The benchmark\'s desired state (generated)."""',
            "from pyinfra import host",
            "from pyinfra.facts.files import File",
            "from pyinfra.operations import files, server",
            "",
            "BASE = host.data.base",
            "",
        ]

        def at(path: str) -> str:
            return 'f"{BASE}' + path[len(base) :] + '"'

        for item in items:
            if item.kind == "directory":
                lines.append(
                    f"files.directory(name={item.label!r}, path={at(item.path)},"
                    f" mode={item.mode[1:]!r})"
                )
            elif item.kind == "file":
                lines.append(
                    f"files.put(name={item.label!r}, src='files/{item.label}.conf',"
                    f" dest={at(item.path)}, mode={item.mode[1:]!r})"
                )
            elif item.kind == "template":
                lines.append(
                    f"files.template(name={item.label!r}, src='templates/{item.label}.conf.j2',"
                    f" dest={at(item.path)}, mode={item.mode[1:]!r},"
                    " hostname=host.name, workers=host.data.workers)"
                )
            elif item.kind == "link":
                lines.append(
                    f"files.link(name={item.label!r}, path={at(item.path)},"
                    f" target={at(item.target)})"
                )
            else:  # the `creates` guard, as pyinfra writes it: a fact decides
                lines.append(f"if not host.get_fact(File, path={at(item.path)}):")
                command = 'f"echo seeded > {BASE}' + item.path[len(base) :] + '"'
                lines.append(f"    server.shell(name={item.label!r}, commands=[{command}])")
        return "\n".join(lines) + "\n"

    def run(self, scenario: str, log: Path) -> Pass:
        argv = [
            str(self.venv / "bin" / "pyinfra"),
            "-y",
            "--parallel",
            str(len(self.hosts)),
            "inventory.py",
            "deploy.py",
        ]
        env = tool_env({"PYINFRA_PROGRESS": "off"})
        code, usage, logs = run_measured(
            argv, env=env, cwd=self.work, log=log, lab=self.lab, hosts=self.hosts
        )
        text = log.read_text(errors="replace")
        if code != 0:
            raise SystemExit(f"pyinfra failed ({code}); see {log}:\n{text[-3000:]}")
        execs, logins = channel_counts(logs)
        return Pass(
            tool=self.name,
            n=len(self.hosts),
            scenario=scenario,
            usage=usage,
            exec_per_host=execs,
            connections_per_host=logins,
            changed_hosts=_pyinfra_changed_hosts(text, self.hosts),
        )


def _pyinfra_changed_hosts(text: str, hosts: Sequence[Host]) -> int:
    """Hosts on which some operation ran commands (`    [hNN] Success`; an operation with
    nothing to do prints `[hNN] No changes`)."""
    names = {f"[{h.name}]" for h in hosts}
    changed = set()
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in names:
            if words[1] == "Success":
                changed.add(words[0])
            elif words[1] not in ("No", "Connected", "Ready:"):
                raise SystemExit(f"pyinfra: {line.strip()}")
    return len(changed)


def _write_sources(work: Path, items: Sequence[Item]) -> None:
    for item in items:
        if item.kind == "file":
            path = work / "files" / f"{item.label}.conf"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(file_body(item.label))
        elif item.kind == "template":
            path = work / "templates" / f"{item.label}.conf.j2"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(template_source(item.label))


# --- Ansible ------------------------------------------------------------------------------


class AnsibleTool:
    """Ansible: inventory.yml + playbook.yml + ansible.cfg (forks = N, pipelining)."""

    name = "ansible"

    def __init__(self, lab: Lab, hosts: Sequence[Host], work: Path, venv: Path) -> None:
        self.lab = lab
        self.hosts = hosts
        self.work = work
        self.venv = venv
        work.mkdir(parents=True)
        _write_sources(work, hosts[0].items)
        # Short: a unix socket path has a 108-byte limit.
        self.control_dir = Path(tempfile.mkdtemp(prefix="cp-", dir=lab.root))
        inventory = {
            "all": {
                "hosts": {
                    h.name: {
                        "ansible_host": "127.0.0.1",
                        "ansible_port": h.port,
                        "base": str(h.base),
                        **h.variables,
                    }
                    for h in hosts
                }
            }
        }
        (work / "inventory.yml").write_text(json.dumps(inventory, indent=1) + "\n")
        ssh_args = " ".join(
            [
                "-F /dev/null",
                "-o ControlMaster=auto -o ControlPersist=60s",
                f"-o UserKnownHostsFile={lab.known_hosts}",
                "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes",
            ]
        )
        (work / "ansible.cfg").write_text(
            textwrap.dedent(
                f"""\
                [defaults]
                inventory = {work / "inventory.yml"}
                forks = {len(hosts)}
                host_key_checking = True
                gathering = explicit
                interpreter_python = {REMOTE_PYTHON}
                remote_user = {USER}
                private_key_file = {lab.key}
                retry_files_enabled = False
                nocows = True
                local_tmp = {work / "local-tmp"}

                [ssh_connection]
                pipelining = True
                ssh_args = {ssh_args}
                control_path_dir = {self.control_dir}
                """
            )
        )
        (work / "playbook.yml").write_text(self.playbook(hosts[0].items, str(hosts[0].base)))

    @staticmethod
    def playbook(items: Sequence[Item], base: str) -> str:
        """One play for all hosts: host 1's paths, with its base as the host var `base`."""

        def at(path: str) -> str:
            return "{{ base }}" + path[len(base) :]

        tasks = []
        for item in items:
            if item.kind == "directory":
                task = {
                    "ansible.builtin.file": {
                        "path": at(item.path),
                        "state": "directory",
                        "mode": item.mode,
                    }
                }
            elif item.kind == "file":
                task = {
                    "ansible.builtin.copy": {
                        "src": f"files/{item.label}.conf",
                        "dest": at(item.path),
                        "mode": item.mode,
                    }
                }
            elif item.kind == "template":
                task = {
                    "ansible.builtin.template": {
                        "src": f"templates/{item.label}.conf.j2",
                        "dest": at(item.path),
                        "mode": item.mode,
                    }
                }
            elif item.kind == "link":
                task = {
                    "ansible.builtin.file": {
                        "src": at(item.target),
                        "dest": at(item.path),
                        "state": "link",
                    }
                }
            else:
                task = {
                    "ansible.builtin.shell": {
                        "cmd": "echo seeded > " + at(item.path),
                        "creates": at(item.path),
                    }
                }
            tasks.append({"name": item.label, **task})
        play = [{"name": "benchmark", "hosts": "all", "gather_facts": False, "tasks": tasks}]
        return json.dumps(play, indent=1) + "\n"

    def run(self, scenario: str, log: Path) -> Pass:
        argv = [str(self.venv / "bin" / "ansible-playbook"), "playbook.yml"]
        env = tool_env(
            {
                "ANSIBLE_CONFIG": str(self.work / "ansible.cfg"),
                "ANSIBLE_HOME": str(self.work / "ansible-home"),
                "ANSIBLE_NOCOLOR": "1",
                "PATH": f"{self.venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            }
        )
        code, usage, logs = run_measured(
            argv,
            env=env,
            cwd=self.work,
            log=log,
            lab=self.lab,
            hosts=self.hosts,
            after=self.stop_masters,
        )
        text = log.read_text(errors="replace")
        if code != 0:
            raise SystemExit(f"ansible-playbook failed ({code}); see {log}:\n{text[-3000:]}")
        execs, logins = channel_counts(logs)
        return Pass(
            tool=self.name,
            n=len(self.hosts),
            scenario=scenario,
            usage=usage,
            exec_per_host=execs,
            connections_per_host=logins,
            changed_hosts=_ansible_changed_hosts(text, self.hosts),
        )

    def stop_masters(self) -> None:
        """End the run's ControlPersist masters through their sockets, so that every
        measured run opens its own connections, as the other tools' runs do (a run within
        60 s of another would otherwise reuse them), and their CPU is counted."""
        for socket_path in self.control_dir.iterdir():
            subprocess.run(
                ["ssh", "-F", "/dev/null", "-o", f"ControlPath={socket_path}", "-O", "exit", "x"],
                capture_output=True,
                timeout=30,
                check=False,
            )


def _ansible_changed_hosts(text: str, hosts: Sequence[Host]) -> int:
    """Hosts with `changed=K` > 0 in the PLAY RECAP."""
    names = {h.name for h in hosts}
    recap = text.split("PLAY RECAP")[-1]
    changed = 0
    for line in recap.splitlines():
        words = line.split()
        if words and words[0] in names:
            counts = dict(w.split("=", 1) for w in words if "=" in w)
            if int(counts.get("failed", 0)) or int(counts.get("unreachable", 0)):
                raise SystemExit(f"ansible: {line.strip()}")
            changed += int(counts.get("changed", 0)) > 0
    return changed


# --- the run --------------------------------------------------------------------------------


def check_trees(hosts: Sequence[Host], result: Pass) -> None:
    problems = []
    for host in hosts:
        problems += tree_problems(expected_tree(host.items, host.variables), actual_tree(host.base))
    result.state_problems = len(problems)
    result.first_problem = problems[0] if problems else ""


def bench_tool(
    tool: AgentTool | PyinfraTool | AnsibleTool,
    hosts: Sequence[Host],
    logs: Path,
    repeat: int,
    save: Callable[[Sequence[Pass]], None],
    scenarios: Sequence[str] = SCENARIOS,
    prepare: Callable[[], object] | None = None,
) -> list[Pass]:
    """First converge, no-change passes, a hand edit put back: one tool, one N. `save`
    gets the passes measured so far after each one (a long run keeps what it measured).
    Without "converge" in `scenarios`, `prepare` converges the hosts (not measured)."""
    results: list[Pass] = []
    n = len(hosts)

    def one(scenario: str) -> Pass:
        result = tool.run(scenario, logs / f"{tool.name}-{n}-{scenario}.log")
        check_trees(hosts, result)
        print(f"  {describe(result)}", file=sys.stderr, flush=True)
        if not scenario.startswith(("no-change", "profiled")):
            save([*results, result])
        return result

    reset_trees(hosts)
    if "converge" in scenarios:
        results.append(one("converge"))
    elif prepare is not None:
        prepare()
    if "no-change" in scenarios:
        runs = [one(f"no-change-{k + 1}") for k in range(repeat)]
        chosen = sorted(runs, key=lambda r: r.usage.wall_s)[len(runs) // 2]  # the median
        chosen.scenario = "no-change"
        results.append(chosen)
        save(results)
    if "put-back" in scenarios:
        edit_by_hand(hosts)
        results.append(one("put-back"))
    if getattr(tool, "profile_dir", None) is not None:
        one("profiled")  # one more no-change pass under cProfile, not in the table
    return results


def describe(result: Pass) -> str:
    u = result.usage
    extra = f", pass {result.agent_pass_s:.2f} s" if result.agent_pass_s is not None else ""
    return (
        f"{result.tool} N={result.n} {result.scenario}: {u.wall_s:.2f} s{extra},"
        f" exec/host {_spread(result.exec_per_host)}, changed hosts {result.changed_hosts},"
        f" state problems {result.state_problems} {result.first_problem}"
    )


def _spread(values: Sequence[int]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def _time(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def table(results: Sequence[Pass], meta: dict) -> str:
    """The results as Markdown: every pass, then the no-change pass against the targets."""
    mix = ", ".join(f"{count} {kind}" for kind, count in resource_mix(meta["resources"]).items())
    tools = "; ".join(meta["versions"].values())
    out = [
        f"{meta['resources']} resources per host ({mix}); {meta['cores']} cores; {tools}",
        "",
        "| N | scenario | tool | wall | agent pass (in process) | exec channels / host"
        " | connections / host | tool CPU | host-side CPU | peak tree RSS | peak tree PSS"
        " | hosts changed | end state |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = {tool: i for i, tool in enumerate(TOOLS)}
    scenarios = {"converge": 0, "no-change": 1, "put-back": 2}
    for r in sorted(results, key=lambda r: (r.n, scenarios[r.scenario], order[r.tool])):
        u = r.usage
        recorded = f" (recorded: {_spread(r.agent_round_trips)})" if r.agent_round_trips else ""
        state = "as expected" if not r.state_problems else f"{r.state_problems} differences"
        out.append(
            f"| {r.n} | {r.scenario} | {r.tool} | {_time(u.wall_s)} | {_time(r.agent_pass_s)}"
            f" | {_spread(r.exec_per_host)}{recorded} | {_spread(r.connections_per_host)}"
            f" | {u.cpu_s:.1f} s | {u.host_cpu_s:.1f} s | {u.peak_rss_kib / 1024:.0f} MiB"
            f" | {u.peak_pss_kib / 1024:.0f} MiB | {r.changed_hosts} / {r.n} | {state} |"
        )
    out += [
        "",
        "No-change pass against the targets (agent >= 5x faster than Ansible and >= 2x faster"
        " than pyinfra at N = 50; 1 round trip per host). Ratios: the other tool's wall time"
        " over the agent's process wall time, and over its in-process pass.",
        "",
        "| N | agent: process / pass | pyinfra | Ansible | pyinfra / agent | Ansible / agent"
        " | agent round trips per host |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r.n, r.tool, r.scenario): r for r in results}
    for n in sorted({r.n for r in results}):
        agent = by.get((n, "agent", "no-change"))
        if agent is None:
            continue
        cells, ratios = [], []
        for name in ("pyinfra", "ansible"):
            other = by.get((n, name, "no-change"))
            cells.append(_time(other.usage.wall_s) if other else "-")
            ratios.append(
                f"{other.usage.wall_s / agent.usage.wall_s:.1f}x /"
                f" {other.usage.wall_s / (agent.agent_pass_s or agent.usage.wall_s):.1f}x"
                if other
                else "-"
            )
        out.append(
            f"| {n} | {_time(agent.usage.wall_s)} / {_time(agent.agent_pass_s)} | {cells[0]}"
            f" | {cells[1]} | {ratios[0]} | {ratios[1]} | {_spread(agent.agent_round_trips)} |"
        )
    return "\n".join(out)


def load_results(paths: Sequence[Path]) -> tuple[list[Pass], dict]:
    """Passes saved with --json by one or more runs (later files win for the same pass)."""
    chosen: dict[tuple[int, str, str], Pass] = {}
    meta: dict = {"versions": {}}
    for path in paths:
        data = json.loads(path.read_text())
        meta["resources"], meta["cores"] = data["resources"], data["cores"]
        meta["versions"].update(data["versions"])
        for raw in data["passes"]:
            result = Pass(**{**raw, "usage": Usage(**raw["usage"])})
            chosen[(result.n, result.tool, result.scenario)] = result
    return list(chosen.values()), meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,50", help="numbers of hosts, comma-separated")
    parser.add_argument("--resources", type=int, default=50, help="resources per host")
    parser.add_argument("--repeat", type=int, default=1, help="no-change passes (median)")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="without converge, the agent converges the hosts first (not measured)",
    )
    parser.add_argument("--tools-venv", type=Path, default=DEFAULT_TOOLS_VENV)
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument(
        "--report", type=Path, nargs="+", help="print the table of saved --json files; no run"
    )
    parser.add_argument(
        "--profile-agent",
        type=Path,
        help="after the scenarios, one more agent no-change pass under cProfile (all threads),"
        " stats written to this directory",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")
    args = parser.parse_args()
    if args.report:
        print(table(*load_results(args.report)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    tools = [t for t in args.tools.split(",") if t]
    if unknown := set(tools) - set(TOOLS):
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}")
    scenarios = [s for s in args.scenarios.split(",") if s]
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    meta: dict = {"resources": args.resources, "cores": os.cpu_count(), "versions": {}}
    if {"pyinfra", "ansible"} & set(tools):
        ensure_tools_venv(args.tools_venv)
    if "pyinfra" in tools:
        meta["versions"]["pyinfra"] = tool_version(args.tools_venv, "pyinfra")
    if "ansible" in tools:
        meta["versions"]["ansible"] = tool_version(args.tools_venv, "ansible-playbook")
    if args.profile_agent:
        args.profile_agent.mkdir(parents=True, exist_ok=True)

    results: list[Pass] = []

    def save(latest: Sequence[Pass]) -> None:
        if args.json:
            data = {**meta, "passes": [asdict(r) for r in [*results, *latest]]}
            args.json.write_text(json.dumps(data, indent=1) + "\n")

    with lab(max(sizes), args.resources) as where:
        work = Path(tempfile.mkdtemp(prefix="work-", dir=where.root))
        print(f"lab: {where.root} ({max(sizes)} sshd servers)", file=sys.stderr, flush=True)
        for n in sizes:
            hosts = where.hosts[:n]
            for name in tools:
                tool_dir = work / f"{name}-{n}"
                if name == "agent":
                    tool = AgentTool(where, hosts, tool_dir)
                    tool.profile_dir = args.profile_agent
                elif name == "pyinfra":
                    tool = PyinfraTool(where, hosts, tool_dir, args.tools_venv)
                else:
                    tool = AnsibleTool(where, hosts, tool_dir, args.tools_venv)
                prepare_dir = work / f"prepare-{name}-{n}"

                def prepare(hosts: Sequence[Host] = hosts, prepare_dir: Path = prepare_dir) -> Pass:
                    agent = AgentTool(where, hosts, prepare_dir)
                    return agent.run("prepare", prepare_dir.with_suffix(".log"))

                results += bench_tool(tool, hosts, work, args.repeat, save, scenarios, prepare)
        if args.keep:
            kept = Path(tempfile.mkdtemp(prefix="gitops-bench-kept-", dir="/tmp"))
            shutil.copytree(
                work, kept / "work", symlinks=True, ignore=shutil.ignore_patterns("cp-*")
            )
            print(f"kept: {kept}", file=sys.stderr)
    print(table(results, meta))


if __name__ == "__main__":
    main()
