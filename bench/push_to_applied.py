"""Benchmark: one push touching one stack in a repository of N stacks, push to applied,
with and without changed-only passes (issue 18).

For each N: a repository of N stacks of `--resources` `terraform_data` each, applied once
(setup, not timed). Then, `--repeat` times, alternately with `changed_only` on and off:
change one stack's resources, `git push` (timed), run the pass the agent runs for it (the
real `Reconciler`, in this process, so the figure is the pass and not a daemon's start),
and stop the clock when the run store says the touched unit was applied at the pushed
revision. Also counts the Terraform commands each pass ran (through a wrapper executable
that logs its invocations) and the agent's own CPU (this process's, Terraform excluded).

    python bench/push_to_applied.py [--sizes 1,20,100] [--binary embedded|PATH]

The daemon runs push (webhook) and poll passes changed-only; a webhook adds its HTTP
request and the trigger queue (see bench/webhook_to_applied.py for those: ~10 ms).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from agent.config import load_host_config  # noqa: E402
from agent.engine.reconcile import PassRequest, Reconciler  # noqa: E402
from agent.state.store import RunStore  # noqa: E402
from tests.support.infra import InfraRepo, embedded_terraform  # noqa: E402


def stack(resources: int, generation: int) -> str:
    return "".join(
        f'resource "terraform_data" "r{i}" {{\n  input = "g{generation}-{i}"\n}}\n'
        for i in range(resources)
    )


class Lab:
    def __init__(self, root: Path, n: int, resources: int, binary: str, parallelism: int):
        self.root, self.n, self.resources = root, n, resources
        self.repo = InfraRepo(root / "git")
        units = []
        for i in range(n):
            self.repo.write(f"stacks/s{i:03d}/main.tf", stack(resources, 0))
            units.append(f"  - {{name: s{i:03d}, stack: stacks/s{i:03d}}}\n")
        self.repo.write("gitops.yaml", "version: 1\nunits:\n" + "".join(units))
        self.repo.push("seed")
        self.log = root / "terraform.log"
        wrapper = root / "terraform"
        target = embedded_terraform() if binary == "embedded" else binary
        wrapper.write_text(f'#!/bin/sh\necho "$1 $2" >> {self.log}\nexec {target} "$@"\n')
        wrapper.chmod(0o755)
        self.state = root / "state"
        self.config = root / "agent.yaml"
        self.config.write_text(
            textwrap.dedent(
                f"""\
                repo: {{url: {self.repo.url}, branch: main}}
                state_dir: {self.state}
                terraform: {{binary: {wrapper}, parallelism: {parallelism}, timeout: 10m}}
                """
            )
        )
        self.generation = 0

    def run(self, *, changed_only: bool, trigger: str) -> str:
        reconciler = Reconciler(load_host_config(self.config))
        try:
            result = reconciler.run_pass(PassRequest(trigger=trigger, changed_only=changed_only))
        finally:
            reconciler.close()
        if not result.ok:
            raise SystemExit(f"pass failed: {result.error}")
        return result.run_id

    def push_and_apply(self, *, changed_only: bool) -> tuple[float, int, float]:
        """(push-to-applied seconds, Terraform commands run, agent CPU seconds)."""
        self.generation += 1
        touched = f"s{self.generation % self.n:03d}"
        self.repo.write(f"stacks/{touched}/main.tf", stack(self.resources, self.generation))
        before = self.log.read_text().count("\n") if self.log.exists() else 0
        cpu0 = _self_cpu()
        start = time.perf_counter()
        revision = self.repo.push(f"generation {self.generation}")
        run_id = self.run(changed_only=changed_only, trigger="bench")
        elapsed = time.perf_counter() - start
        cpu = _self_cpu() - cpu0
        row = next(r for r in RunStore(self.state).unit_runs(run_id) if r.unit == touched)
        if (row.decision, row.revision) != ("apply", revision):
            raise SystemExit(f"{touched} was not applied at {revision}: {row}")
        commands = self.log.read_text().count("\n") - before
        return elapsed, commands, cpu


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,20,100")
    parser.add_argument("--resources", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--parallelism", type=int, default=4)
    parser.add_argument("--binary", default="embedded", help="'embedded' or a terraform path")
    args = parser.parse_args()
    print(f"binary: {args.binary}; load average {os.getloadavg()[0]:.1f} at start")
    print(
        "| stacks | mode | push to applied (median, s) | min | Terraform commands | agent CPU (s) |"
    )
    print("|---|---|---|---|---|---|")
    for n in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix=f"bench-push-{n}-") as tmp:
            lab = Lab(Path(tmp), n, args.resources, args.binary, args.parallelism)
            setup = time.perf_counter()
            lab.run(changed_only=False, trigger="bench-setup")
            print(f"<!-- setup of {n} stacks: {time.perf_counter() - setup:.1f} s -->", flush=True)
            results: dict[bool, list[tuple[float, int, float]]] = {True: [], False: []}
            for i in range(args.repeat):
                # Interleaved, the order swapped each round: the load moves under both alike.
                for mode in (True, False) if i % 2 == 0 else (False, True):
                    results[mode].append(lab.push_and_apply(changed_only=mode))
            for mode in (True, False):
                times = [t for t, _, _ in results[mode]]
                commands = statistics.median(c for _, c, _ in results[mode])
                cpu = statistics.median(c for _, _, c in results[mode])
                name = "changed-only" if mode else "every unit"
                print(
                    f"| {n} | {name} | {statistics.median(times):.2f} | {min(times):.2f} |"
                    f" {commands:.0f} | {cpu:.2f} |",
                    flush=True,
                )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
