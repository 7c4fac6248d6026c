"""Creating Git repositories (the quickstart's infra repo and its clone).

Kept apart from `git_source`, which only reads a remote. Commits made here carry an
explicit author, so they work on a machine where no Git identity is configured.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import git

QUICKSTART_ACTOR = git.Actor("gitops-agent quickstart", "quickstart@gitops-agent.invalid")


def create_repo_from_tree(
    tree: Path, bare: Path, clone: Path, *, branch: str = "main", message: str
) -> str:
    """Commit the files of `tree` into a new bare repo `bare`, and clone it to `clone`.

    Returns the sha of the commit. `tree` is left as it was.
    """
    bare_repo = git.Repo.init(bare, bare=True, initial_branch=branch)
    staging = clone.with_name(clone.name + ".staging")
    shutil.copytree(tree, staging)
    try:
        repo = git.Repo.init(staging, initial_branch=branch)
        repo.git.add(A=True)
        commit = repo.index.commit(message, author=QUICKSTART_ACTOR, committer=QUICKSTART_ACTOR)
        repo.git.push(str(bare), f"HEAD:refs/heads/{branch}")
    finally:
        shutil.rmtree(staging)
    cloned = git.Repo.clone_from(bare_repo.git_dir, clone, branch=branch)
    with cloned.config_writer() as config:
        # A user without a global Git identity can still commit in the quickstart clone.
        if not _has_global_identity(cloned):
            config.set_value("user", "name", "Quickstart User")
            config.set_value("user", "email", "you@example.invalid")
    return commit.hexsha


def _has_global_identity(repo: git.Repo) -> bool:
    try:
        return bool(repo.git.config("--global", "user.email"))
    except git.GitCommandError:
        return False
