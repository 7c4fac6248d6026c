"""Benchmark: a no-change reconcile pass over N stacks vs bare `terraform plan`s.

For N = 1, 10, 50 stacks of 20 `terraform_data` resources each, in one run:
  1. build an infra repo and apply it once (not timed);
  2. time the agent's no-change pass, in process (`Reconciler.run_pass`, as the daemon
     runs it) and as a command (`agent reconcile --now`, a new Python process);
  3. time bare `terraform plan -detailed-exitcode` over the same stacks (same state,
     same engine), one after another, as a person or a simple CI script would.
Prints a table: both times, the ratio, and the agent's peak RSS (the agent process
itself, read from VmHWM; Terraform's own processes are not counted).

    python bench/noop_pass.py [--sizes 1,10,50] [--resources 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from agent.config import load_host_config  # noqa: E402
from agent.engine.reconcile import PassRequest, Reconciler  # noqa: E402
from agent.state.layout import StateLayout  # noqa: E402
from tests.support.infra import InfraRepo, embedded_terraform, write_host_config  # noqa: E402


def stack_tf(resources: int) -> str:
    blocks = [
        f'resource "terraform_data" "r{i}" {{\n  input = "value-{i}"\n}}\n'
        for i in range(resources)
    ]
    return "\n".join(blocks)


def build(root: Path, n: int, resources: int, parallelism: int) -> Path:
    repo = InfraRepo(root / "git")
    units = []
    for i in range(n):
        repo.write(f"stacks/s{i:02d}/main.tf", stack_tf(resources))
        units.append(f"  - {{name: s{i:02d}, stack: stacks/s{i:02d}}}")
    repo.write("gitops.yaml", "version: 1\nunits:\n" + "\n".join(units) + "\n")
    repo.push("bench")
    config = write_host_config(
        root / "agent.yaml", repo.url, root / "state", parallelism=parallelism
    )
    return config


def timed_pass(config: Path) -> float:
    reconciler = Reconciler(load_host_config(config))
    try:
        start = time.perf_counter()
        result = reconciler.run_pass(PassRequest(trigger="bench"))
        elapsed = time.perf_counter() - start
    finally:
        reconciler.close()
    decisions = {o.decision for o in result.outcomes.values()}
    if result.status != "succeeded" or decisions - {"nothing"}:
        raise SystemExit(f"the no-change pass was not a no-change pass: {result}")
    return elapsed


RSS_PROBE = textwrap.dedent(
    """
    import sys
    from agent.cli.main import main
    code = main(["--config", sys.argv[1], "reconcile", "--now"])
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print(line.split()[1], file=sys.stderr)
    sys.exit(code)
    """
)


def timed_cli_pass(config: Path) -> tuple[float, int]:
    start = time.perf_counter()
    # As installed by pip: byte-compiled modules (some shells set PYTHONDONTWRITEBYTECODE).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(config)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
        env=env,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"agent reconcile failed:\n{proc.stdout}\n{proc.stderr}")
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    return elapsed, peak_kib


def timed_bare_plans(config: Path) -> float:
    host = load_host_config(config)
    layout = StateLayout(host.state_dir)
    manifest_units = sorted(p.name for p in (layout.root / "units").iterdir())
    env = dict(os.environ)
    env.update(
        CHECKPOINT_DISABLE="1", TF_IN_AUTOMATION="1", TF_CLI_CONFIG_FILE=str(layout.cli_config)
    )
    start = time.perf_counter()
    for unit in manifest_units:
        env["TF_DATA_DIR"] = str(layout.unit_data_dir(unit))
        proc = subprocess.run(
            [
                embedded_terraform(),
                f"-chdir={layout.checkout / 'stacks' / unit}",
                "plan",
                "-detailed-exitcode",
                "-input=false",
                "-no-color",
                f"-state={layout.unit_state_file(unit)}",
            ],
            env=env,
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"bare plan of {unit} exited {proc.returncode}: {proc.stderr!r}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,50")
    parser.add_argument("--resources", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--parallelism", type=int, default=4)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench-noop-{n}-") as tmp:
            config = build(Path(tmp), n, args.resources, args.parallelism)
            reconciler = Reconciler(load_host_config(config))
            first = reconciler.run_pass(PassRequest(trigger="bench-setup"))
            reconciler.close()
            if first.status != "succeeded":
                raise SystemExit(f"setup pass failed: {first.error}")
            agent_times = [timed_pass(config) for _ in range(args.repeat)]
            cli = [timed_cli_pass(config) for _ in range(args.repeat)]
            bare_times = [timed_bare_plans(config) for _ in range(args.repeat)]
            agent_s = statistics.median(agent_times)
            cli_s = statistics.median(t for t, _ in cli)
            bare_s = statistics.median(bare_times)
            rows.append((n, agent_s, cli_s, bare_s, max(kib for _, kib in cli)))

    print(
        f"no-change pass, {args.resources} terraform_data per stack, median of {args.repeat},"
        f" parallelism {args.parallelism}, {os.cpu_count()} cores"
    )
    header = (
        "| stacks | agent pass (in process) | agent reconcile --now (CLI) |"
        " bare plans, one after another | ratio pass/bare | ratio CLI/bare | agent peak RSS |"
    )
    print(header)
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, agent_s, cli_s, bare_s, kib in rows:
        print(
            f"| {n} | {agent_s:.2f} s | {cli_s:.2f} s | {bare_s:.2f} s | {agent_s / bare_s:.2f}x"
            f" | {cli_s / bare_s:.2f}x | {kib / 1024:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
