"""How the agent reaches a Git remote: the URL's kind and credentials, git's environment
(no prompts, only the URL's own protocol, for SSH the deploy key and known_hosts only),
every message sanitized of credentials, and git's and ssh's failures turned into messages a
person can act on. Used by providers/git_source.py; this module imports GitPython only for
its error type."""

from __future__ import annotations

import math
import os
import re
import shlex
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import git

from providers.errors import GitSourceError

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


def config_error(message: str) -> GitSourceError:
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


def url_kind(url: str) -> str:
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
    raise config_error(
        f"unsupported Git URL {sanitize_url(url)!r}: use file:///path, ssh://user@host/path, "
        "user@host:path or https://host/path"
    )


def url_secrets(url: str) -> tuple[str, ...]:
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


def git_stderr(err: git.GitCommandError) -> str:
    stderr = err.stderr
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    stderr = (stderr or "").strip()
    # GitPython wraps it as "\n  stderr: '...'".
    if stderr.startswith("stderr: '") and stderr.endswith("'"):
        stderr = stderr[len("stderr: '") : -1]
    return stderr


class GitAccess:
    """The remote of one Git source: its environment, checks and messages."""

    def __init__(
        self,
        url: str,
        branch: str,
        checkout_dir: Path,
        *,
        deploy_key: Path | None,
        known_hosts: Path | None,
        https_ca_bundle: Path | None,
        timeout: float,
    ) -> None:
        self.url = url
        self.branch = branch
        self.checkout_dir = checkout_dir
        self.deploy_key = deploy_key
        self.known_hosts = known_hosts
        self.https_ca_bundle = https_ca_bundle
        self.timeout = timeout
        self.safe_url = sanitize_url(url)
        self.secrets = url_secrets(url)
        self.kind = url_kind(url)

    def environment(self) -> dict[str, str]:
        """Git's environment, made at first use, inside a pass: for a local repository it
        writes a file into the state directory, which must not fail the agent's start."""
        env = {
            "GIT_TERMINAL_PROMPT": "0",
            "GCM_INTERACTIVE": "never",
            # Only the URL's own protocol (no ext::, no surprises through submodules).
            "GIT_ALLOW_PROTOCOL": {"file": "file", "ssh": "ssh", "http": "https:http"}[self.kind],
        }
        if self.kind == "ssh":
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
        if self.kind == "http" and self.https_ca_bundle:
            env["GIT_SSL_CAINFO"] = str(self.https_ca_bundle)
        if self.kind == "file":
            gitconfig = self.checkout_dir.with_name(self.checkout_dir.name + ".gitconfig")
            env.update(_trust_local_repository(self.url, gitconfig))
        return env

    def check_credential_files(self) -> None:
        named = {
            "deploy_key": self.deploy_key if self.kind == "ssh" else None,
            "known_hosts": self.known_hosts if self.kind == "ssh" else None,
            "https_ca_bundle": self.https_ca_bundle if self.kind == "http" else None,
        }
        for name, path in named.items():
            if path is not None and not path.is_file():
                raise config_error(
                    f"cannot fetch {self.safe_url}: {name} {path} does not exist or is not a file"
                )

    def clean(self, text: str) -> str:
        return sanitize_text(text.replace(self.url, self.safe_url), self.secrets)

    def network_error(self, err: git.GitCommandError) -> GitSourceError:
        """A message a person can act on, from what git and ssh printed."""
        stderr = git_stderr(err)
        low = stderr.lower()
        url = self.safe_url
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
        result = GitSourceError(self.clean(message))
        result.retryable = retryable  # a person must act on auth, host key, TLS, missing refs
        return result

    def _known_hosts_name(self) -> str:
        return str(self.known_hosts) if self.known_hosts else "~/.ssh/known_hosts (default)"
