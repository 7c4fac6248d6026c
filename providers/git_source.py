"""The Git source: one clone of the infra repo that the agent fetches, pins and checks out.

This module and providers/git_access.py (how the remote is reached) own GitPython.
Every git process runs with a controlled environment: no prompts (`GIT_TERMINAL_PROMPT=0`),
only the URL's own protocol allowed, and for SSH a strict `GIT_SSH_COMMAND` (the deploy key
only, host keys checked against the configured known_hosts, batch mode). Every message that
leaves this module is passed through `sanitize_text`, so no credential from a URL reaches a
log, a notification or a traceback (errors are raised `from None` for the same reason).

The clone is made by `git init` + an explicit fetch rather than `git clone`, so that clone
and fetch are the same code path with the same refspec, timeout and error mapping. It is
never shallow: the fast-forward check needs the history.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import git

from providers.errors import GitSourceError
from providers.git_access import GitAccess, config_error, git_stderr, sanitize_text, sanitize_url

__all__ = ["CommitInfo", "GitSource", "sanitize_text", "sanitize_url"]

# Full or abbreviated object names (SHA-1: 40 hex digits, SHA-256: 64).
_SHA_RE = re.compile(r"[0-9a-fA-F]{4,64}")
_SYMLINK_MODE = 0o120000
_SUBMODULE_MODE = 0o160000


@dataclass(frozen=True)
class CommitInfo:
    """What a person needs to recognise a revision."""

    sha: str
    author: str  # "Name <email>"
    committed_at: datetime  # UTC
    summary: str  # first line of the message


class GitSource:
    """One branch of one repository, cloned into `checkout_dir`.

    A pass calls `fetch()` once and uses the sha it returns for everything else, so a push
    that lands during the pass does not change what the pass applies.
    """

    def __init__(
        self,
        url: str,
        branch: str,
        checkout_dir: Path,
        *,
        deploy_key: Path | None = None,
        known_hosts: Path | None = None,
        https_ca_bundle: Path | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.url = url
        self.branch = branch
        self.checkout_dir = Path(checkout_dir).absolute()
        self.deploy_key = Path(deploy_key).absolute() if deploy_key else None
        self.known_hosts = Path(known_hosts).absolute() if known_hosts else None
        self.https_ca_bundle = Path(https_ca_bundle).absolute() if https_ca_bundle else None
        self.timeout = timeout
        self.access = GitAccess(
            url,
            branch,
            self.checkout_dir,
            deploy_key=self.deploy_key,
            known_hosts=self.known_hosts,
            https_ca_bundle=self.https_ca_bundle,
            timeout=timeout,
        )
        self._safe_url = self.access.safe_url
        self._tracking_ref = f"refs/remotes/origin/{branch}"
        self._refspec = f"+refs/heads/{branch}:{self._tracking_ref}"
        if timeout <= 0:
            raise config_error(f"timeout for {self._safe_url} must be positive, not {timeout}")
        status, _, _ = git.Git().execute(
            ["git", "check-ref-format", f"refs/heads/{branch}"],
            with_extended_output=True,
            with_exceptions=False,
        )
        if status != 0 or branch.startswith("-"):
            raise config_error(f"invalid branch name {branch!r} for {self._safe_url}")
        self._repo: git.Repo | None = None

    def __repr__(self) -> str:
        return f"GitSource({self._safe_url!r}, branch={self.branch!r})"

    # -- fetching ------------------------------------------------------------------------

    def fetch(self) -> str:
        """Clone (or re-clone) or fetch the branch; the full sha of the remote branch's head."""
        self.access.check_credential_files()
        repo = self._open_clone()
        if repo is None:
            repo = self._clone()
        else:
            self._fetch_into(repo)
        self._repo = repo
        return self._rev_parse(repo, f"{self._tracking_ref}^{{commit}}")

    def _open_clone(self) -> git.Repo | None:
        """The existing clone if `checkout_dir` is a work tree of a clone of this URL."""
        try:
            repo = git.Repo(self.checkout_dir)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            return None
        try:
            top = Path(repo.git.rev_parse("--show-toplevel")).resolve()
            origin = repo.git.config("--get", "remote.origin.url")
        except git.GitCommandError:
            return None
        if repo.bare or top != self.checkout_dir.resolve() or origin != self.url:
            return None
        repo.git.update_environment(**self._env)
        _remove_stale_locks(Path(repo.git_dir))
        return repo

    def _clone(self) -> git.Repo:
        """A fresh clone, made next to `checkout_dir` and renamed into place when complete.

        A failed clone (wrong key, missing branch) leaves whatever was there untouched, and a
        crash mid-clone leaves only a temp dir that the next clone removes.
        """
        parent = self.checkout_dir.parent
        prefix = f".{self.checkout_dir.name}.clone-"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            for stale in parent.glob(f"{glob.escape(prefix)}*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        except OSError as err:
            raise GitSourceError(f"cannot create a clone under {parent}: {err}") from None
        try:
            repo = git.Repo.init(tmp)
            repo.git.update_environment(**self._env)
            repo.git.config("remote.origin.url", self.url)
            repo.git.config("remote.origin.fetch", self._refspec)
            repo.git.config("advice.detachedHead", "false")
            self._fetch_into(repo)
            try:
                if self.checkout_dir.is_symlink() or self.checkout_dir.is_file():
                    self.checkout_dir.unlink()
                elif self.checkout_dir.exists():
                    shutil.rmtree(self.checkout_dir)
                tmp.rename(self.checkout_dir)
            except OSError as err:
                raise GitSourceError(
                    f"cannot replace {self.checkout_dir} with a clone: {err}"
                ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        repo = git.Repo(self.checkout_dir)
        repo.git.update_environment(**self._env)
        return repo

    def _fetch_into(self, repo: git.Repo) -> None:
        # Forced refspec: a rewritten history is fetched too, and the caller sees that it is
        # not a fast-forward. --prune only touches refs under the refspec's destination.
        try:
            repo.git.fetch(
                "--prune",
                "--no-tags",
                "--no-recurse-submodules",
                "--quiet",
                "origin",
                self._refspec,
                kill_after_timeout=self.timeout,
            )
        except git.GitCommandError as err:
            raise self.access.network_error(err) from None

    @functools.cached_property
    def _env(self) -> dict[str, str]:
        """Git's environment, made once, at first use (see GitAccess.environment)."""
        return self.access.environment()

    # -- other refs (proposed changes) ---------------------------------------------------

    def remote_refs(self, patterns: Iterable[str]) -> dict[str, str]:
        """The remote's refs matching any of `patterns` ({ref: sha}). A pattern is a full ref
        name with at most one `*`, which matches any text, `/` included (git's refspec rule).
        Asks the server (`ls-remote`); fetches nothing."""
        regexes = [_ref_pattern(p) for p in patterns]
        repo = self._open()
        try:
            out = repo.git.execute(
                ["git", "ls-remote", "--refs", "origin"],
                kill_after_timeout=self.timeout,
            )
        except git.GitCommandError as err:
            raise self.access.network_error(err) from None
        found: dict[str, str] = {}
        for line in str(out).splitlines():
            sha, _, ref = line.partition("\t")
            if any(r.fullmatch(ref) for r in regexes) and _SHA_RE.fullmatch(sha):
                found[ref] = sha
        return found

    def fetch_refs(self, refs: Iterable[str], namespace: str = "refs/proposals/") -> None:
        """Fetch `refs` (full names) into `namespace` of this clone, forced, and drop the refs
        of `namespace` not named: the branch this source follows is not touched."""
        wanted = {ref: namespace + ref.removeprefix("refs/") for ref in refs}
        repo = self._open()
        if wanted:
            specs = [f"+{ref}:{local}" for ref, local in sorted(wanted.items())]
            try:
                repo.git.fetch(
                    "--no-tags",
                    "--no-recurse-submodules",
                    "--quiet",
                    "origin",
                    *specs,
                    kill_after_timeout=self.timeout,
                )
            except git.GitCommandError as err:
                raise self.access.network_error(err) from None
        local = self._git(repo, "for-each-ref", "--format=%(refname)", namespace)
        for name in str(local).splitlines():
            if name and name not in wanted.values():
                self._git(repo, "update-ref", "-d", name)

    # -- reading -------------------------------------------------------------------------

    def checkout(self, sha: str) -> Path:
        """Detach the work tree at `sha`, forced; untracked files (lock files) are kept."""
        repo = self._open()
        commit = self._resolve_commit(repo, sha)
        self._git(repo, "checkout", "--force", "--detach", "--quiet", commit, "--")
        return self.checkout_dir

    def export(self, sha: str, dest: Path) -> Path:
        """Write the tree of `sha` into `dest` (replaced whole), apart from the checkout: a
        removed unit's definition stays readable while the checkout moves on."""
        repo = self._open()
        commit = self._resolve_commit(repo, sha)
        data = self._git(repo, "archive", "--format=tar", commit, raw=True)
        assert isinstance(data, bytes)
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True, mode=0o700)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            # The `data` filter refuses members that would land outside `partial`.
            archive.extractall(partial, filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
        return dest

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        """Whether `descendant` is `ancestor` or contains it (a fast-forward from it).

        A commit this clone does not have is no ancestor of anything in it: False. A
        `descendant` that is missing is an error.
        """
        repo = self._open()
        new = self._resolve_commit(repo, descendant)
        if not self._has_commit(repo, ancestor):
            return False
        status, _, stderr = repo.git.execute(
            ["git", "merge-base", "--is-ancestor", self._resolve_commit(repo, ancestor), new],
            with_extended_output=True,
            with_exceptions=False,
        )
        if status in (0, 1):
            return status == 0
        raise GitSourceError(
            self.access.clean(f"cannot compare {ancestor} and {descendant}: {stderr}")
        )

    def has_commit(self, sha: str) -> bool:
        """Whether the clone holds commit `sha`; False too when there is no clone yet."""
        if self._repo is None:
            self._repo = self._open_clone()
        return self._repo is not None and self._has_commit(self._repo, sha)

    def commit_info(self, sha: str) -> CommitInfo:
        repo = self._open()
        commit = self._resolve_commit(repo, sha)
        out = self._git(
            repo, "show", "--no-patch", "--format=%H%x00%an%x00%ae%x00%ct%x00%s", commit
        )
        full, name, email, timestamp, summary = out.split("\x00", 4)
        return CommitInfo(
            sha=full,
            author=f"{name} <{email}>",
            committed_at=datetime.fromtimestamp(int(timestamp), tz=UTC),
            summary=summary,
        )

    def read_file(self, sha: str, path: str) -> bytes | None:
        """The content of the regular file `path` at `sha`, or None if there is none.

        A directory, a symbolic link or a submodule at `path` is an error rather than None:
        the caller asked for a file that exists in another form.
        """
        repo = self._open()
        commit = self._resolve_commit(repo, sha)
        clean = path.strip("/")
        if clean.startswith("./"):
            clean = clean[2:]
        if not clean or any(part in ("", ".", "..") for part in clean.split("/")):
            raise GitSourceError(f"invalid path {path!r}: give a path relative to the repo root")
        entry = self._git(
            repo, "--literal-pathspecs", "ls-tree", "-z", "--full-tree", commit, "--", clean
        )
        if not entry:
            return None
        meta, _, _ = entry.partition("\t")
        mode, kind, obj = meta.split(" ")
        mode_bits = int(mode, 8)
        if kind != "blob" or mode_bits in (_SYMLINK_MODE, _SUBMODULE_MODE):
            what = {_SYMLINK_MODE: "a symbolic link", _SUBMODULE_MODE: "a submodule"}.get(
                mode_bits, "a directory"
            )
            raise GitSourceError(f"{path} at {commit[:12]} is {what}, not a regular file")
        return repo.git.cat_file("blob", obj, stdout_as_string=False, strip_newline_in_stdout=False)

    def changed_paths(self, old: str, new: str) -> tuple[str, ...]:
        """Paths added, modified, deleted or renamed (both names) between two revisions."""
        repo = self._open()
        a, b = self._resolve_commit(repo, old), self._resolve_commit(repo, new)
        out = self._git(repo, "diff", "--name-only", "-z", "--no-renames", a, b, raw=True)
        names = out.split(b"\x00")
        return tuple(sorted(os.fsdecode(n) for n in names if n))

    # -- helpers -------------------------------------------------------------------------

    def _open(self) -> git.Repo:
        if self._repo is None:
            self._repo = self._open_clone()
        if self._repo is None:
            raise GitSourceError(
                f"no clone of {self._safe_url} in {self.checkout_dir}: fetch() must run first"
            )
        return self._repo

    def _has_commit(self, repo: git.Repo, sha: str) -> bool:
        if not _SHA_RE.fullmatch(sha):
            return False
        status, _, _ = repo.git.execute(
            ["git", "cat-file", "-e", f"{sha}^{{commit}}"],
            with_extended_output=True,
            with_exceptions=False,
        )
        return status == 0

    def _resolve_commit(self, repo: git.Repo, sha: str) -> str:
        if not _SHA_RE.fullmatch(sha):
            raise GitSourceError(f"{sha!r} is not a commit id (expected hexadecimal digits)")
        status, out, _ = repo.git.execute(
            ["git", "rev-parse", "--verify", "--quiet", f"{sha}^{{commit}}"],
            with_extended_output=True,
            with_exceptions=False,
        )
        if status != 0:
            raise GitSourceError(f"commit {sha} is not in the clone of {self._safe_url}")
        return out.strip()

    def _rev_parse(self, repo: git.Repo, rev: str) -> str:
        return self._git(repo, "rev-parse", "--verify", rev).strip()

    def _git(self, repo: git.Repo, *args: str, raw: bool = False) -> str | bytes:
        try:
            return repo.git.execute(
                ["git", *args],
                stdout_as_string=not raw,
                strip_newline_in_stdout=not raw,
            )
        except git.GitCommandError as err:
            command = next(a for a in args if not a.startswith("-"))
            raise GitSourceError(
                self.access.clean(f"git {command} failed in {self.checkout_dir}: {git_stderr(err)}")
            ) from None


def _ref_pattern(pattern: str) -> re.Pattern[str]:
    """A ref pattern (at most one `*`, matching anything) as a regular expression."""
    if not pattern.startswith("refs/") or pattern.count("*") > 1:
        raise config_error(f"invalid ref pattern {pattern!r}: a full ref with at most one *")
    head, star, tail = pattern.partition("*")
    return re.compile(re.escape(head) + (".+" if star else "") + re.escape(tail))


def _remove_stale_locks(git_dir: Path) -> None:
    """Remove lock files left by a git process that was killed (agent crash, timeout).

    Only one pass runs at a time and this class is the only writer of its clone, so a lock
    present when the clone is opened is stale; left alone, it would fail every later fetch
    ("cannot lock ref") or checkout ("index.lock: File exists") until a person removed it.
    """
    candidates = [
        git_dir / n for n in ("index.lock", "HEAD.lock", "config.lock", "packed-refs.lock")
    ]
    candidates += list((git_dir / "refs").rglob("*.lock"))
    for lock in candidates:
        with contextlib.suppress(OSError):
            lock.unlink()
