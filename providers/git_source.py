"""The Git source: one clone of the infra repo that the agent fetches, pins and checks out.

This module owns GitPython (and through it the `git` CLI); nothing else imports `git`.
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
import math
import os
import re
import shlex
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import git

from providers.errors import GitSourceError

__all__ = ["CommitInfo", "GitSource", "sanitize_text", "sanitize_url"]

# Full or abbreviated object names (SHA-1: 40 hex digits, SHA-256: 64).
_SHA_RE = re.compile(r"[0-9a-fA-F]{4,64}")
# "user@host:path" (git's scp-like syntax): a colon before the first slash, no "://".
_SCP_LIKE_RE = re.compile(r"(?:(?P<user>[^@/:]+)@)?(?P<host>\[[^\]]+\]|[^@/:]+):(?P<path>.*)")
# Any "scheme://..." token in free text (git's stderr, our own messages).
_URL_IN_TEXT_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_SSH_SCHEMES = {"ssh", "git+ssh", "ssh+git"}
_HTTP_SCHEMES = {"https", "http"}
# Lines git adds to every remote failure; they only hide the line that says what went wrong.
_GIT_BOILERPLATE = (
    "Could not read from remote repository",
    "Please make sure you have the correct access rights",
    "and the repository exists.",
)
_SYMLINK_MODE = 0o120000
_SUBMODULE_MODE = 0o160000


@dataclass(frozen=True)
class CommitInfo:
    """What a person needs to recognise a revision."""

    sha: str
    author: str  # "Name <email>"
    committed_at: datetime  # UTC
    summary: str  # first line of the message


def _config_error(message: str) -> GitSourceError:
    """An error that retrying cannot fix: the host config must change."""
    err = GitSourceError(message)
    err.retryable = False
    return err


def sanitize_url(url: str) -> str:
    """The URL without credentials, fit for messages and logs (Flux's `SanitizeError`).

    `https://user:token@host/x` -> `https://host/x`; for HTTP(S) a lone user name is dropped
    too, since it is often a token (`https://TOKEN@host/x`). For `ssh://` only a password is
    dropped: the user name there (`git@`) is not a secret and helps reading the message.
    Scp-like addresses (`git@host:path`) cannot carry a password and are returned as they are.
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        # Unparseable: drop everything between "://" and the last "@" of the authority.
        scheme, _, rest = url.partition("://")
        authority, slash, path = rest.partition("/")
        return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, has_password, _ = userinfo.partition(":")
    keep_user = parts.scheme.lower() in _SSH_SCHEMES and not has_password and user
    netloc = f"{user}@{hostport}" if keep_user else hostport
    return urlunsplit(parts._replace(netloc=netloc))


def sanitize_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with every URL in it sanitized and each of `secrets` masked as `***`."""
    text = _URL_IN_TEXT_RE.sub(lambda m: sanitize_url(m.group(0)), text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _url_kind(url: str) -> str:
    """'file', 'ssh' or 'http' (for http and https); GitSourceError for anything else."""
    if "://" in url:
        scheme = url.split("://", 1)[0].lower()
        if scheme == "file":
            return "file"
        if scheme in _SSH_SCHEMES:
            return "ssh"
        if scheme in _HTTP_SCHEMES:
            return "http"
    elif url.startswith("/"):
        return "file"
    elif "::" not in url and _SCP_LIKE_RE.fullmatch(url):
        return "ssh"
    raise _config_error(
        f"unsupported Git URL {sanitize_url(url)!r}: use file:///path, ssh://user@host/path, "
        "user@host:path or https://host/path"
    )


def _url_secrets(url: str) -> tuple[str, ...]:
    """Credential strings in `url` (raw and percent-decoded) to mask wherever they appear."""
    if "://" not in url:
        return ()
    try:
        parts = urlsplit(url)
    except ValueError:
        return ()
    if "@" not in parts.netloc:
        return ()
    userinfo = parts.netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    candidates = [password, parts.password or ""]
    if parts.scheme.lower() in _HTTP_SCHEMES and not password:
        candidates += [user, parts.username or ""]  # a lone user name is often a token
    # Very short strings would mask ordinary words; URLs are already stripped anyway.
    return tuple(sorted({c for c in candidates if len(c) >= 4}, key=len, reverse=True))


def _ssh_host(url: str) -> str:
    """The host (with port, as known_hosts writes it) of an SSH URL, for messages."""
    if "://" in url:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        return f"[{host}]:{parts.port}" if parts.port and parts.port != 22 else host
    match = _SCP_LIKE_RE.fullmatch(url)
    return match.group("host") if match else "?"


def _trust_local_repository(url: str, config_file: Path) -> dict[str, str]:
    """Git's `safe.directory` for the configured local repository, and only it.

    A repository on this machine owned by another user (root's /srv/infra.git, read by the
    service user) is refused by git as "dubious ownership". The host config names it, so the
    operator trusts it: allow exactly that path (and its `.git`). Git reads `safe.directory`
    only from protected config, and strips `-c`/GIT_CONFIG_COUNT when it starts upload-pack for
    a local fetch (measured, git 2.39), so it goes into a global config file of the agent's own
    that also includes the user's ~/.gitconfig.
    """
    path = url.split("://", 1)[1] if "://" in url else url
    path = unquote(path.rstrip("/")) or "/"
    text = (
        "# written by gitops-agent: trust the local repository the host config names\n"
        "[include]\n\tpath = ~/.gitconfig\n"
        f"[safe]\n\tdirectory = {path}\n\tdirectory = {path}/.git\n"
    )
    if not config_file.is_file() or config_file.read_text() != text:
        config_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = config_file.with_name(config_file.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, config_file)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise GitSourceError(f"cannot write {config_file}: {err.strerror or err}") from None
    return {"GIT_CONFIG_GLOBAL": str(config_file)}


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
        self._safe_url = sanitize_url(url)
        self._secrets = _url_secrets(url)
        self._kind = _url_kind(url)
        self._tracking_ref = f"refs/remotes/origin/{branch}"
        self._refspec = f"+refs/heads/{branch}:{self._tracking_ref}"
        if timeout <= 0:
            raise _config_error(f"timeout for {self._safe_url} must be positive, not {timeout}")
        status, _, _ = git.Git().execute(
            ["git", "check-ref-format", f"refs/heads/{branch}"],
            with_extended_output=True,
            with_exceptions=False,
        )
        if status != 0 or branch.startswith("-"):
            raise _config_error(f"invalid branch name {branch!r} for {self._safe_url}")
        self._repo: git.Repo | None = None

    def __repr__(self) -> str:
        return f"GitSource({self._safe_url!r}, branch={self.branch!r})"

    # -- fetching ------------------------------------------------------------------------

    def fetch(self) -> str:
        """Clone (or re-clone) or fetch the branch; the full sha of the remote branch's head."""
        self._check_credential_files()
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
            raise self._network_error(err) from None

    @functools.cached_property
    def _env(self) -> dict[str, str]:
        """Git's environment, made at first use, inside a pass: for a local repository it
        writes a file into the state directory, which must not fail the agent's start."""
        return self._git_environment()

    def _git_environment(self) -> dict[str, str]:
        env = {
            "GIT_TERMINAL_PROMPT": "0",
            "GCM_INTERACTIVE": "never",
            # Only the URL's own protocol (no ext::, no surprises through submodules).
            "GIT_ALLOW_PROTOCOL": {"file": "file", "ssh": "ssh", "http": "https:http"}[self._kind],
        }
        if self._kind == "ssh":
            connect_timeout = max(1, math.ceil(min(self.timeout, 30.0)))
            argv = ["ssh"]
            if self.deploy_key:
                argv += ["-i", str(self.deploy_key), "-o", "IdentitiesOnly=yes"]
            if self.known_hosts:
                # Only the configured file is trusted, not the machine's global one.
                argv += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
                argv += ["-o", "GlobalKnownHostsFile=/dev/null"]
            argv += [
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                f"ConnectTimeout={connect_timeout}",
            ]
            env["GIT_SSH_COMMAND"] = shlex.join(argv)
            env["GIT_SSH_VARIANT"] = "ssh"
        if self._kind == "http" and self.https_ca_bundle:
            env["GIT_SSL_CAINFO"] = str(self.https_ca_bundle)
        if self._kind == "file":
            gitconfig = self.checkout_dir.with_name(self.checkout_dir.name + ".gitconfig")
            env.update(_trust_local_repository(self.url, gitconfig))
        return env

    def _check_credential_files(self) -> None:
        named = {
            "deploy_key": self.deploy_key if self._kind == "ssh" else None,
            "known_hosts": self.known_hosts if self._kind == "ssh" else None,
            "https_ca_bundle": self.https_ca_bundle if self._kind == "http" else None,
        }
        for name, path in named.items():
            if path is not None and not path.is_file():
                raise _config_error(
                    f"cannot fetch {self._safe_url}: {name} {path} does not exist or is not a file"
                )

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
            raise self._network_error(err) from None
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
                raise self._network_error(err) from None
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
        raise GitSourceError(self._clean(f"cannot compare {ancestor} and {descendant}: {stderr}"))

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
                self._clean(f"git {command} failed in {self.checkout_dir}: {_stderr(err)}")
            ) from None

    def _clean(self, text: str) -> str:
        return sanitize_text(text.replace(self.url, self._safe_url), self._secrets)

    def _network_error(self, err: git.GitCommandError) -> GitSourceError:
        """A message a person can act on, from what git and ssh printed."""
        stderr = _stderr(err)
        low = stderr.lower()
        url = self._safe_url
        retryable = False
        if "did not complete in" in low:
            reason = f"timed out after {self.timeout:g} s"
            retryable = True
        elif "couldn't find remote ref" in low:
            reason = f"branch {self.branch!r} does not exist there"
        elif "remote host identification has changed" in low:
            reason = (
                f"the SSH host key of {_ssh_host(self.url)} was not accepted: it CHANGED and "
                f"no longer matches known_hosts {self._known_hosts_name()}. If the server was "
                "re-keyed, verify the new fingerprint and replace its line in known_hosts"
            )
        elif "host key verification failed" in low or re.search(r"no \S+ host key is known", low):
            reason = (
                f"the SSH host key of {_ssh_host(self.url)} was not accepted: it is not listed in "
                f"known_hosts {self._known_hosts_name()}. Add the server's key there (for "
                "example from `ssh-keyscan`, after checking its fingerprint)"
            )
        elif "unprotected private key file" in low or "bad permissions" in low:
            reason = f"ssh refused to use deploy key {self.deploy_key}: it must be mode 0600"
        elif "permission denied (publickey" in low or "permission denied, please try" in low:
            key = f"deploy key {self.deploy_key}" if self.deploy_key else "the SSH key offered"
            reason = (
                f"authentication refused: the server did not accept {key}. Check that its "
                "public key is installed on the server with read access"
            )
        elif "ssl certificate problem" in low or "server certificate verification failed" in low:
            bundle = (
                f"the CA bundle {self.https_ca_bundle} does not"
                if self.https_ca_bundle
                else "no https_ca_bundle is configured and the system CAs do not"
            )
            reason = (
                f"the server's TLS certificate was not accepted ({bundle} vouch for it). "
                "Set https_ca_bundle in the host config to the CA that signed it"
            )
        elif (
            "authentication failed" in low
            or "could not read username" in low
            or "could not read password" in low
            or "the requested url returned error: 401" in low
            or "the requested url returned error: 403" in low
        ):
            reason = "authentication refused: the credentials were missing or not accepted"
        elif (
            "does not appear to be a git repository" in low
            or "repository not found" in low
            or ("repository '" in low and "not found" in low)
            or "the requested url returned error: 404" in low
        ):
            reason = "no repository there (or it is not readable with these credentials)"
        elif any(
            s in low
            for s in (
                "could not resolve",
                "connection refused",
                "connection timed out",
                "failed to connect",
                "network is unreachable",
                "no route to host",
                "connection reset",
                "connection closed",
                "operation timed out",
            )
        ):
            reason = "the server could not be reached"
            retryable = True
        else:
            reason = "git fetch failed"
            retryable = True
        detail = " ".join(
            line.strip()
            for line in stderr.splitlines()
            if line.strip()
            and not line.lstrip().startswith("@")  # ssh's warning banners
            and not any(b in line for b in _GIT_BOILERPLATE)
        )
        message = f"cannot fetch branch {self.branch!r} from {url}: {reason}"
        if detail:
            message += f" (git: {detail[-400:]})"
        result = GitSourceError(self._clean(message))
        result.retryable = retryable  # a person must act on auth, host key, TLS, missing refs
        return result

    def _known_hosts_name(self) -> str:
        return str(self.known_hosts) if self.known_hosts else "~/.ssh/known_hosts (default)"


def _ref_pattern(pattern: str) -> re.Pattern[str]:
    """A ref pattern (at most one `*`, matching anything) as a regular expression."""
    if not pattern.startswith("refs/") or pattern.count("*") > 1:
        raise _config_error(f"invalid ref pattern {pattern!r}: a full ref with at most one *")
    head, star, tail = pattern.partition("*")
    return re.compile(re.escape(head) + (".+" if star else "") + re.escape(tail))


def _stderr(err: git.GitCommandError) -> str:
    stderr = err.stderr
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    stderr = (stderr or "").strip()
    # GitPython wraps it as "\n  stderr: '...'".
    if stderr.startswith("stderr: '") and stderr.endswith("'"):
        stderr = stderr[len("stderr: '") : -1]
    return stderr


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
