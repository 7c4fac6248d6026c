"""Benchmark: a proposal's plan of a fleet vs a main dry-run pass of the same fleet.

One OpenSSH server on 127.0.0.1 (tests/support/sshd.py) serves H static hosts (the same
server under H names, each with its own directory) with R templates each, converged once
(not timed). Then, `--repeat` times:
  - proposal: a new head on refs/pull/1/head that changes the template; `poll()` (fetch,
    allow, both manifests, affected units, per host: render, one facts round trip);
  - main: the same change on main, `Reconciler.run_pass(dry_run=True)` (render, one facts
    round trip per host, diff; nothing applied).
Prints medians.

    python bench/proposal_fleet.py [--hosts 10] [--resources 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
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
from tests.support.sshd import (  # noqa: E402
    SshServer,
    chown_tree,
    ensure_user,
    make_client_key,
    public_key,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--resources", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ensure_user()
    with tempfile.TemporaryDirectory(prefix="bench-fleetprop-") as tmp, SshServer() as server:
        root = Path(tmp)
        key = make_client_key(root / "id_ed25519")
        server.add_authorized_key(server.user, public_key(key))
        files = Path(tempfile.mkdtemp(prefix="bench-fleetprop-hosts-", dir="/tmp"))
        for h in range(args.hosts):
            (files / f"h{h}").mkdir()
        chown_tree(files, server.user)
        (root / "known_hosts").write_text(server.known_hosts_line() + "\n")
        repo = InfraRepo(root / "git")
        repo.write("templates/t.j2", "tag=base\nhost={{ host.name }}\n")
        hosts = "".join(
            f"        - {{name: h{h}, address: 127.0.0.1, port: {server.port}, roles: [h{h}]}}\n"
            for h in range(args.hosts)
        )
        roles = "".join(
            f"  h{h}:\n"
            + "".join(
                f"    - template: {files}/h{h}/f{r}.conf\n      source: templates/t.j2\n"
                for r in range(args.resources)
            )
            for h in range(args.hosts)
        )
        repo.write(
            "gitops.yaml",
            "version: 1\nunits:\n  - name: web\n    fleet:\n      user: gitops-test\n"
            f"      hosts:\n        static:\n{hosts}roles:\n{roles}",
        )
        repo.push("seed")
        config = write_host_config(
            root / "agent.yaml",
            repo.url,
            root / "state",
            f"""\
            hosts: {{key_file: {key}, known_hosts: {root / "known_hosts"}}}
            proposals: {{refs: [refs/pull/*/head], authors: ['*'], sandbox: none}}
            """,
        )
        host = load_host_config(config)
        reconciler = Reconciler(host)
        assert reconciler.run_pass(PassRequest(trigger="bench")).ok
        planner = ProposalPlanner(host)
        changes = args.hosts * args.resources

        def propose(tag: str) -> float:
            git(repo.work, "checkout", "-q", "-B", "pr", "main")
            repo.write("templates/t.j2", f"tag={tag}\nhost={{{{ host.name }}}}\n")
            git(repo.work, "commit", "-qam", tag)
            git(repo.work, "push", "-q", "--force", "origin", "HEAD:refs/pull/1/head")
            git(repo.work, "checkout", "-q", "main")
            started = time.perf_counter()
            (row,) = planner.poll().planned
            seconds = time.perf_counter() - started
            (unit,) = row.units
            assert unit.counts == f"+0 ~{changes} -0", (unit.status, unit.counts, unit.detail)
            return seconds

        def main_dry_run(tag: str) -> float:
            repo.write("templates/t.j2", f"tag={tag}\nhost={{{{ host.name }}}}\n")
            repo.push(tag)
            started = time.perf_counter()
            result = reconciler.run_pass(PassRequest(trigger="bench", dry_run=True))
            seconds = time.perf_counter() - started
            assert result.ok and result.outcomes["web"].plan_change == changes, result
            git(repo.work, "reset", "-q", "--hard", "HEAD~1")
            git(repo.work, "push", "-q", "--force", "origin", "HEAD:main")
            return seconds

        try:
            proposal = [propose(f"p{i}") for i in range(args.repeat)]
            dry = [main_dry_run(f"m{i}") for i in range(args.repeat)]
        finally:
            planner.close()
            reconciler.close()
            shutil.rmtree(files, ignore_errors=True)
    p, m = statistics.median(proposal), statistics.median(dry)
    print(f"{args.hosts} hosts x {args.resources} templates, one sshd on 127.0.0.1")
    print(f"proposal plan of the fleet, median of {args.repeat}: {p:.2f} s")
    print(f"main dry-run pass, median of {args.repeat}: {m:.2f} s")
    print(f"ratio proposal / main: {p / m:.2f}x")


if __name__ == "__main__":
    main()
