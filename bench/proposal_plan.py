"""Benchmark: a proposal's plan vs a main pass planning the same units (issue 17: <= 1.1x).

N stacks of R `terraform_data` resources are applied once (not timed). Then, R times:
  - proposal: a new head on refs/pull/1/head that changes one resource of every stack;
    `ProposalPlanner.poll()` (fetch, allow, both manifests, affected units, init when
    needed, a state copy, plan -lock=false, show -json; under bubblewrap unless --no-sandbox);
  - main: the same change on main, `Reconciler.run_pass(dry_run=True)` (fetch, verify,
    manifest, fingerprint, plan, show, decide; nothing applied).
The first proposal poll (a cold TF_DATA_DIR: init) is reported apart. Prints medians.

    python bench/proposal_plan.py [--stacks 3] [--resources 20] [--repeat 3] [--no-sandbox]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from agent.config import load_host_config  # noqa: E402
from agent.engine.proposals import ProposalPlanner  # noqa: E402
from agent.engine.reconcile import PassRequest, Reconciler  # noqa: E402
from tests.support.infra import InfraRepo, git, write_host_config  # noqa: E402


def stack_tf(resources: int, tag: str) -> str:
    return "\n".join(
        f'resource "terraform_data" "r{i}" {{\n  input = "{tag if i == 0 else i}"\n}}\n'
        for i in range(resources)
    )


def write_all(repo: InfraRepo, stacks: int, resources: int, tag: str) -> None:
    for s in range(stacks):
        repo.write(f"stacks/s{s}/main.tf", stack_tf(resources, tag))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stacks", type=int, default=3)
    parser.add_argument("--resources", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-sandbox", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-proposals-") as tmp:
        root = Path(tmp)
        repo = InfraRepo(root / "git")
        write_all(repo, args.stacks, args.resources, "base")
        units = "\n".join(f"  - {{name: s{s}, stack: stacks/s{s}}}" for s in range(args.stacks))
        repo.write("gitops.yaml", f"version: 1\nunits:\n{units}\n")
        repo.push("seed")
        sandbox = "none" if args.no_sandbox else "bwrap"
        extra = f"proposals: {{refs: [refs/pull/*/head], authors: ['*'], sandbox: {sandbox}}}\n"
        config = write_host_config(root / "agent.yaml", repo.url, root / "state", extra)
        host = load_host_config(config)
        reconciler = Reconciler(host)
        assert reconciler.run_pass(PassRequest(trigger="bench")).ok
        planner = ProposalPlanner(host)

        def propose(tag: str) -> float:
            git(repo.work, "checkout", "-q", "-B", "pr", "main")
            write_all(repo, args.stacks, args.resources, tag)
            git(repo.work, "commit", "-qam", tag)
            git(repo.work, "push", "-q", "--force", "origin", "HEAD:refs/pull/1/head")
            git(repo.work, "checkout", "-q", "main")
            started = time.perf_counter()
            (row,) = planner.poll().planned
            seconds = time.perf_counter() - started
            assert row.status == "planned" and all(u.status == "changes" for u in row.units), row
            return seconds

        def main_dry_run(tag: str) -> float:
            write_all(repo, args.stacks, args.resources, tag)
            repo.push(tag)
            started = time.perf_counter()
            result = reconciler.run_pass(PassRequest(trigger="bench", dry_run=True))
            seconds = time.perf_counter() - started
            assert result.ok and all(o.plan_change == 1 for o in result.outcomes.values())
            git(repo.work, "reset", "-q", "--hard", "HEAD~1")
            git(repo.work, "push", "-q", "--force", "origin", "HEAD:main")
            return seconds

        cold = propose("cold")
        proposal = [propose(f"p{i}") for i in range(args.repeat)]
        dry = [main_dry_run(f"m{i}") for i in range(args.repeat)]
        planner.close()
        reconciler.close()
    p, m = statistics.median(proposal), statistics.median(dry)
    engine = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
    print(f"{args.stacks} stacks x {args.resources} resources, sandbox {sandbox}, {engine}")
    print(f"proposal plan, first (init): {cold:.2f} s")
    print(f"proposal plan, median of {args.repeat}: {p:.2f} s")
    print(f"main dry-run pass, median of {args.repeat}: {m:.2f} s")
    print(f"ratio proposal / main: {p / m:.2f}x (target <= 1.1x)")


if __name__ == "__main__":
    main()
