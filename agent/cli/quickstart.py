"""`agent quickstart`: a whole GitOps loop on one machine, offline.

Lays out, in one directory: `infra.git` (a bare repo made from the bundled
`examples/quickstart`, which the agent pulls), `infra/` (a clone to edit and push),
`agent.yaml` (a host config for them), `state/`; then runs a first pass and says
what to try next.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from agent.cli.views import describe_result
from agent.config import load_host_config
from agent.core.progress import ConsoleReporter
from agent.engine.reconcile import PassRequest, Reconciler
from agent.errors import AgentError
from providers.git_setup import create_repo_from_tree

PLACEHOLDER = "@QUICKSTART_DIR@"

HOST_CONFIG = """\
# Host config for the quickstart (on a bastion this is /etc/gitops-agent/agent.yaml).
repo:
  url: file://{root}/infra.git
  branch: main
state_dir: {root}/state
intervals:
  poll: 30s
  drift: 5m
terraform:
  parallelism: 4
  timeout: 10m
policy:
  destroy: hold          # a plan that destroys anything waits for approval
hosts:
  allow_local: true      # the `host` fleet converges this machine itself
  python: {python}
"""


class QuickstartError(AgentError):
    reference = "quickstart-failed"


def example_dir(name: str = "quickstart") -> Path:
    """The bundled example repo `name`: inside the installed package, or in a checkout."""
    candidates = [Path(__file__).resolve().parents[2] / "examples" / name]  # agent/cli/ -> root
    # An editable install finds `examples/` only through the source tree.
    with contextlib.suppress(ModuleNotFoundError):
        candidates.insert(0, Path(str(resources.files("agent.examples") / name)))
    for path in candidates:
        if (path / "gitops.yaml").is_file():
            return path
    raise QuickstartError(f"the bundled example {name!r} is missing from this install")


def lay_out(root: Path) -> Path:
    """Create infra.git, infra/, agent.yaml and state/ under `root`; return agent.yaml."""
    root = root.resolve()
    if (root / "infra.git").exists() or (root / "agent.yaml").exists():
        raise QuickstartError(
            f"{root} already holds a quickstart",
            hint=f"pick an empty directory, or use it: GITOPS_AGENT_CONFIG={root}/agent.yaml",
        )
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quickstart-tree-") as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(example_dir(), tree)
        manifest = tree / "gitops.yaml"
        manifest.write_text(manifest.read_text().replace(PLACEHOLDER, str(root)))
        create_repo_from_tree(
            tree, root / "infra.git", root / "infra", message="Quickstart infra repo"
        )
    config = root / "agent.yaml"
    config.write_text(HOST_CONFIG.format(root=root, python=sys.executable))
    return config


def run_quickstart(directory: Path | None) -> int:
    """Lay out the quickstart, run a first pass, print what to try next."""
    root = (
        directory.resolve()
        if directory
        else Path(tempfile.mkdtemp(prefix="gitops-quickstart-")).resolve()
    )
    # Progress to stderr, results (the run, what to try next) to stdout, as every command.
    say = functools.partial(print, file=sys.stderr, flush=True)
    say(f"Laying out the quickstart in {root}")
    config = lay_out(root)
    host = load_host_config(config)
    reconciler = Reconciler(host, reporter=ConsoleReporter(sys.stderr))
    try:
        # The engine the pass runs: a terraform or tofu on PATH comes before the embedded one.
        binary = reconciler.stacks.workspaces.runner().binary
        say(f"Running the first reconcile pass with {binary.describe()}, offline...")
        if binary.kind == "embedded":
            say(
                "  (the embedded engine loads Python and a 100 MB library for every command;"
                " a stock terraform or tofu on PATH is the fast path: docs/terraform.md)"
            )
        result = reconciler.run_pass(PassRequest(trigger="quickstart"))
    finally:
        reconciler.close()
    print(f"\nrun {result.run_id}: {result.status}")
    for name, outcome in result.outcomes.items():
        print(f"  {name}: {describe_result(outcome)}")
    if result.error:
        print(result.error)
    print(NEXT_STEPS.format(root=root))
    return 0 if result.ok else 1


NEXT_STEPS = """
What is there:
  {root}/infra.git   the Git repository the agent pulls (stands in for GitHub)
  {root}/infra       a clone of it: edit, commit and push here
  {root}/agent.yaml  the host config the agent runs with
  {root}/state       the agent's state: run store, Terraform output and state
  {root}/managed     the files the two stacks manage
  {root}/host        the files the `host` fleet manages on this machine

Try next:
  export GITOPS_AGENT_CONFIG={root}/agent.yaml
  agent status

  # Drift: change a managed file by hand, and watch the agent put it back.
  echo "edited by hand" >> {root}/managed/motd.txt
  agent reconcile --now
  cat {root}/managed/motd.txt

  # Drift on a host: the fleet puts its files back too.
  echo "edited by hand" > {root}/host/etc/app.conf
  agent reconcile --now --dry-run   # shows the diff, changes nothing
  agent reconcile --now
  agent logs host                   # the per-host diff

  # A change through Git: edit, commit, push, reconcile.
  cd {root}/infra
  sed -i 's/replicas: 2/replicas: 3/' gitops.yaml
  git commit -am "app: 3 replicas" && git push
  agent reconcile --now
  agent logs app        # the plan and apply output, as Terraform printed it
  agent history
"""
