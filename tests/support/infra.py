"""Test infra repos: a bare remote the agent pulls, and a working clone to push from.

Uses the git CLI the way a person would (commit, push, force-push).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "author@example.invalid",
    "GIT_COMMITTER_NAME": "Test Author",
    "GIT_COMMITTER_EMAIL": "author@example.invalid",
}


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


def embedded_terraform() -> str:
    """The embedded engine's executable, so tests never depend on a `terraform` on PATH."""
    return str(Path(sysconfig.get_path("scripts")) / "gitops-agent-terraform")


class InfraRepo:
    """A bare repo (`remote`) and a clone (`work`) to edit, commit and push."""

    def __init__(self, root: Path, branch: str = "main") -> None:
        self.root = root
        self.branch = branch
        self.remote = root / "infra.git"
        self.work = root / "infra"
        root.mkdir(parents=True, exist_ok=True)
        git(root, "init", "-q", "--bare", "-b", branch, str(self.remote))
        git(root, "init", "-q", "-b", branch, str(self.work))
        git(self.work, "remote", "add", "origin", str(self.remote))

    @property
    def url(self) -> str:
        return f"file://{self.remote}"

    def write(self, path: str, text: str) -> None:
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text))

    def remove(self, path: str) -> None:
        git(self.work, "rm", "-r", "-q", path)

    def push(self, message: str = "change") -> str:
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        git(self.work, "push", "-q", "origin", f"HEAD:{self.branch}")
        return self.head()

    def head(self) -> str:
        return git(self.work, "rev-parse", "HEAD")

    def rewrite_history(self, message: str = "rewritten") -> str:
        """Amend the last commit with the work tree and force-push: the old head is gone."""
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--amend", "--allow-empty", "-m", message)
        git(self.work, "push", "-q", "--force", "origin", f"HEAD:{self.branch}")
        return self.head()


def agent_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`agent --config CONFIG ARGS...` in a process of its own (no GITOPS_AGENT_CONFIG)."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "GITOPS_AGENT_CONFIG"},
    )


def write_host_config(
    path: Path, repo_url: str, state_dir: Path, extra: str = "", *, parallelism: int = 4
) -> Path:
    """A host config for tests: the embedded Terraform, the given repo and state dir."""
    path.write_text(
        textwrap.dedent(
            f"""\
            repo:
              url: {repo_url}
              branch: main
            state_dir: {state_dir}
            terraform:
              binary: {embedded_terraform()}
              parallelism: {parallelism}
              timeout: 5m
              lock_timeout: 10s
            """
        )
        + textwrap.dedent(extra)
    )
    return path
