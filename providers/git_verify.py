"""Signed-commit verification: is a revision (or a tag) signed by a key the operator allows?

The agent calls this on the revision it pinned, before it reads the manifest. The check is
`git verify-commit --raw` / `git verify-tag --raw`, run with an environment and config of its
own, and its status output is parsed (the exit code alone does not say *why*):

- GPG: the operator's keyring (public keys, `gpg --export > keyring.gpg`) is imported into a
  fresh `GNUPGHOME` made for the one call and removed after it. Its `gpg.conf` says
  `trust-model always` (being in the keyring *is* the trust decision: no web of trust, no
  trustdb to maintain) and `no-autostart` (verifying needs no gpg-agent, so none is started
  and none is left behind). Chosen over a `gpg.program` wrapper with `--no-default-keyring
  --keyring FILE` because that still uses `~/.gnupg` as the home (trustdb, lock files, a
  `FILE.lock` next to the operator's keyring, which may sit in a read-only directory) and
  needs an executable script written somewhere; an import reads the keyring exactly once,
  accepts armored and binary exports alike, and shows at once whether it holds any key.
  It costs one short `gpg --import` per call (about 10 ms) and picks up a changed keyring
  without a restart.
- SSH: `-c gpg.ssh.allowedSignersFile=FILE`; git runs `ssh-keygen -Y find-principals` and
  `-Y verify` (OpenSSH >= 8.2) with the commit's committer date as the verify time.

Git reads no system or global config (`GIT_CONFIG_NOSYSTEM`, `GIT_CONFIG_GLOBAL=/dev/null`),
so a `gpg.program` or `gpg.minTrustLevel` set there changes nothing, and the user's
`~/.gnupg` is never read or written. Which tool checks a signature follows the signature's
own armor (as git itself does), read from the object before git runs, so that a commit signed
with the kind of key the policy does not accept gets a clear message.

A signed tag vouches for the tag object, not for the commit it points to: `verify_tag` on a
signed tag succeeds even when that commit is unsigned, and `verify_revision` on the same
commit fails (unsigned). Each says what it checked.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from providers.errors import GitSourceError, SignatureError

__all__ = ["SigningPolicy", "Verified", "check_policy", "verify_revision", "verify_tag"]

_TIMEOUT = 60.0
_SHORT = 12
# The first line of each signature armor git knows, and what checks it.
_ARMORS = {
    "-----BEGIN PGP SIGNATURE-----": "gpg",
    "-----BEGIN PGP MESSAGE-----": "gpg",
    "-----BEGIN SSH SIGNATURE-----": "ssh",
    "-----BEGIN SIGNED MESSAGE-----": "x509",
}
_KIND_NAMES = {"gpg": "a GPG", "ssh": "an SSH", "x509": "an X.509 (gpgsm)"}
_GPG_CONF = "no-autostart\ntrust-model always\nbatch\nno-tty\n"
_SSH_GOOD_RE = re.compile(
    r'^Good "git" signature for (?P<principal>.+) with (?P<algo>\S+) key (?P<fpr>\S+)$'
)
_SSH_UNKNOWN_RE = re.compile(r'^Good "git" signature with (?P<algo>\S+) key (?P<fpr>\S+)$')
# ssh-keygen's complaint about an allowed-signers line ("FILE:2: key has expired: ...").
_SSH_FILE_LINE_RE = re.compile(r"^(?P<file>.+):(?P<line>\d+): (?P<what>.+)$")


@dataclass(frozen=True)
class SigningPolicy:
    """Which keys may sign the revisions the agent applies.

    At least one of the two must be set; with both, either kind of signature is accepted.
    The files are read on every verification, so replacing them takes effect at once.
    """

    gpg_keyring: Path | None = None  # public keys: `gpg --export KEYID... > keyring.gpg`
    ssh_allowed_signers: Path | None = None  # OpenSSH allowed-signers file (ssh-keygen(1))

    def __post_init__(self) -> None:
        if self.gpg_keyring is None and self.ssh_allowed_signers is None:
            raise SignatureError(
                "signing policy accepts no key: set gpg_keyring, ssh_allowed_signers or both",
                kind="config",
            )


@dataclass(frozen=True)
class Verified:
    """A signature that was checked and accepted."""

    revision: str  # full sha of the commit (for a tag: the commit the tag points to)
    kind: str  # "gpg" or "ssh"
    signer: str  # "FINGERPRINT IDENTITY": "5AD0...62B7 Ada <ada@example.org>", "SHA256:... ada@x"


def check_policy(policy: SigningPolicy) -> None:
    """Raise SignatureError(kind="config") if a file of the policy is missing or unreadable.

    Every verification does this too; call it at start-up to report a bad host config early.
    """
    if policy.gpg_keyring is not None:
        _read_policy_file("GPG keyring", policy.gpg_keyring)
    if policy.ssh_allowed_signers is not None:
        text = _read_policy_file("SSH allowed signers file", policy.ssh_allowed_signers)
        lines = [ln for ln in text.decode("utf-8", "replace").splitlines() if ln.strip()]
        if all(ln.lstrip().startswith("#") for ln in lines):
            raise SignatureError(
                f"SSH allowed signers file {policy.ssh_allowed_signers} lists no keys: add a "
                "line `PRINCIPAL KEYTYPE KEY` per allowed key",
                kind="config",
            )


def verify_revision(repo_dir: Path, revision: str, policy: SigningPolicy) -> Verified:
    """Check that commit `revision` (a sha or any name git resolves) is signed by an allowed key.

    Raises SignatureError (never retryable) saying what is wrong, or GitSourceError when
    `repo_dir` is no repository or has no such commit.
    """
    check_policy(policy)
    repo_dir = Path(repo_dir)
    sha = _resolve(repo_dir, revision, "commit")
    if sha is None:
        raise _source_error(f"no commit {revision!r} in the repository {repo_dir}")
    what = f"commit {sha[:_SHORT]}"
    raw = _git(repo_dir, "cat-file", "commit", sha).stdout
    signature = _commit_signature(raw)
    hint = "sign it with `git commit -S`"
    kind = _signature_kind(signature, what, sha, policy, unsigned_hint=hint)
    return _verify(repo_dir, "verify-commit", sha, sha, kind, signature or "", what, policy)


def verify_tag(repo_dir: Path, tag: str, policy: SigningPolicy) -> Verified:
    """Check that tag `tag` (a name, or `refs/tags/NAME`) is a tag object signed by an allowed key.

    Only the tag object is checked: the commit it points to may be unsigned (see the module
    docstring). `Verified.revision` is that commit. A tag object whose own name differs from
    `tag` (a signed tag re-used under another name) is refused as a bad signature.
    """
    check_policy(policy)
    repo_dir = Path(repo_dir)
    name = tag.removeprefix("refs/tags/")
    ref = f"refs/tags/{name}"
    if name.startswith("-") or _git(repo_dir, "check-ref-format", ref, check=False).returncode:
        raise _source_error(f"invalid tag name {tag!r}")
    obj = _resolve(repo_dir, ref, "object")
    if obj is None:
        raise _source_error(f"no tag {name!r} in the repository {repo_dir}")
    commit = _resolve(repo_dir, obj, "commit")
    if commit is None:
        raise _source_error(f"tag {name!r} in {repo_dir} does not point to a commit")
    what = f"tag {name} ({obj[:_SHORT]})"
    if _git(repo_dir, "cat-file", "-t", obj).stdout.strip() != b"tag":
        raise SignatureError(
            f"{what} is not signed: it is a lightweight tag, which cannot carry a signature "
            "(make it with `git tag -s`)",
            kind="unsigned",
            revision=obj,
        )
    raw = _git(repo_dir, "cat-file", "tag", obj).stdout
    header, _, body = raw.partition(b"\n\n")
    tag_names = [ln[4:] for ln in header.split(b"\n") if ln.startswith(b"tag ")]
    if tag_names and os.fsdecode(tag_names[0]) != name:
        raise SignatureError(
            f"{what} holds the tag object of {os.fsdecode(tag_names[0])!r}: a tag is signed "
            "with its name, so this one was re-used under another name",
            kind="bad",
            revision=obj,
        )
    signature = _tag_signature(body)
    hint = "make it with `git tag -s`"
    kind = _signature_kind(signature, what, obj, policy, unsigned_hint=hint)
    return _verify(repo_dir, "verify-tag", obj, commit, kind, signature or "", what, policy)


# -- finding the signature ------------------------------------------------------------------


def _commit_signature(raw: bytes) -> str | None:
    """The text of the commit's `gpgsig` (or `gpgsig-sha256`) header, if it has one."""
    lines: list[str] | None = None
    for line in raw.partition(b"\n\n")[0].decode("utf-8", "replace").split("\n"):
        if lines is not None and line.startswith(" "):  # a continuation line of the header
            lines.append(line[1:])
        elif lines is not None:
            break
        elif line.startswith(("gpgsig ", "gpgsig-sha256 ")):
            lines = [line.partition(" ")[2]]
    return "\n".join(lines).strip() if lines is not None else None


def _tag_signature(body: bytes) -> str | None:
    """A tag's signature: from the last known armor line on, as git finds it."""
    lines = body.decode("utf-8", "replace").split("\n")
    starts = [i for i, ln in enumerate(lines) if ln.startswith(tuple(_ARMORS))]
    return "\n".join(lines[starts[-1] :]).strip() if starts else None


def _signature_kind(
    signature: str | None, what: str, revision: str, policy: SigningPolicy, *, unsigned_hint: str
) -> str:
    """'gpg' or 'ssh' if the policy can check this signature; SignatureError otherwise."""
    if signature is None:
        raise SignatureError(
            f"{what} is not signed, and the signing policy requires a signature by an allowed "
            f"key ({unsigned_hint})",
            kind="unsigned",
            revision=revision,
        )
    armor = signature.partition("\n")[0].strip()
    kind = _ARMORS.get(armor)
    if kind is None:
        raise SignatureError(
            f"{what} carries a signature in an unknown format (it starts with {armor[:40]!r}); "
            "only GPG and SSH signatures can be checked",
            kind="bad",
            revision=revision,
        )
    accepted = {
        k for k, path in (("gpg", policy.gpg_keyring), ("ssh", policy.ssh_allowed_signers)) if path
    }
    if kind not in accepted:
        setting = {"gpg": "gpg_keyring", "ssh": "ssh_allowed_signers"}.get(kind)
        because = (
            f"no {setting} is set in the signing policy"
            if setting
            else "only GPG and SSH signatures can be checked"
        )
        raise SignatureError(
            f"{what} has {_KIND_NAMES[kind]} signature, which the signing policy does not "
            f"accept: {because}",
            kind="untrusted",
            revision=revision,
        )
    return kind


# -- running git ------------------------------------------------------------------------------


def _verify(
    repo_dir: Path,
    command: str,
    obj: str,
    commit: str,
    kind: str,
    signature: str,
    what: str,
    policy: SigningPolicy,
) -> Verified:
    if kind == "ssh":
        assert policy.ssh_allowed_signers is not None
        allowed = policy.ssh_allowed_signers.absolute()
        if shutil.which("ssh-keygen") is None:
            raise SignatureError(
                "cannot check SSH signatures: ssh-keygen is not installed (Debian package "
                "openssh-client, OpenSSH 8.2 or later)",
                kind="config",
                revision=obj,
            )
        result = _git(
            repo_dir,
            "-c",
            "gpg.ssh.program=ssh-keygen",
            "-c",
            f"gpg.ssh.allowedSignersFile={allowed}",
            command,
            "--raw",
            obj,
            check=False,
        )
        signer = _ssh_outcome(result, what, obj, allowed, _ssh_key_fingerprint(signature))
        return Verified(revision=commit, kind="ssh", signer=signer)
    assert policy.gpg_keyring is not None
    with _gnupg_home(policy.gpg_keyring, obj) as home:
        result = _git(
            repo_dir,
            "-c",
            "gpg.program=gpg",
            # Pinned so that the keyring alone decides, whatever the clone's own config says
            # (gpg reports no trust level at all with `trust-model always`).
            "-c",
            "gpg.minTrustLevel=undefined",
            command,
            "--raw",
            obj,
            check=False,
            gnupghome=home,
        )
        signer = _gpg_outcome(result, what, obj, policy.gpg_keyring, home)
    return Verified(revision=commit, kind="gpg", signer=signer)


def _git_env(gnupghome: Path | None) -> dict[str, str]:
    # Nothing from the caller's git or gpg set-up may steer the check: drop every GIT_*
    # variable (GIT_DIR, GIT_CONFIG_PARAMETERS, ...) and GNUPGHOME, read no system or global
    # config, and ask for untranslated messages (they are parsed).
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") and k != "GNUPGHOME"}
    env.update(
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_TERMINAL_PROMPT="0",
        LC_ALL="C",
        LANGUAGE="C",
    )
    if gnupghome is not None:
        env["GNUPGHOME"] = str(gnupghome)
    return env


def _git(
    repo_dir: Path, *args: str, check: bool = True, gnupghome: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    argv = ["git", "-C", str(repo_dir), *args]
    command = next(a for i, a in enumerate(args) if a != "-c" and (i == 0 or args[i - 1] != "-c"))
    try:
        result = subprocess.run(
            argv,
            env=_git_env(gnupghome),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise SignatureError(
            "cannot check signatures: git is not installed", kind="config"
        ) from None
    except subprocess.TimeoutExpired:
        raise GitSourceError(
            f"git {command} in {repo_dir} did not finish in {_TIMEOUT:g} s"
        ) from None
    if check and result.returncode != 0:
        stderr = result.stderr.decode("utf-8", "replace").strip()
        raise GitSourceError(f"git {command} failed in {repo_dir}: {stderr}")
    return result


def _resolve(repo_dir: Path, name: str, peel: str) -> str | None:
    """The full sha `name` names (peeled to a commit, or the object itself), or None."""
    if not Path(repo_dir, ".").is_dir():
        raise _source_error(f"cannot check signatures in {repo_dir}: not a directory")
    spec = f"{name}^{{commit}}" if peel == "commit" else name
    result = _git(
        repo_dir, "rev-parse", "--verify", "--quiet", "--end-of-options", spec, check=False
    )
    if result.returncode == 0:
        return result.stdout.decode().strip()
    stderr = result.stderr.decode("utf-8", "replace").strip()
    if stderr:  # --quiet silences "no such object"; anything else is a broken repository
        raise _source_error(f"cannot read the repository {repo_dir}: {stderr}")
    return None


def _source_error(message: str) -> GitSourceError:
    """Not a signature problem (no such commit, not a repository), and no retry will fix it."""
    err = GitSourceError(message)
    err.retryable = False
    return err


# -- GPG ------------------------------------------------------------------------------------


def _read_policy_file(label: str, path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        reason = "does not exist"
    except IsADirectoryError:
        reason = "is a directory, not a file"
    except OSError as err:
        reason = f"cannot be read ({err.strerror})"
    raise SignatureError(f"signing policy: {label} {path} {reason}", kind="config")


@contextlib.contextmanager
def _gnupg_home(keyring: Path, revision: str) -> Iterator[Path]:
    """A throwaway GNUPGHOME holding exactly the keys of `keyring`; removed on exit."""
    gpg = shutil.which("gpg")
    if gpg is None:
        raise SignatureError(
            "cannot check GPG signatures: gpg is not installed (Debian package gpg)",
            kind="config",
            revision=revision,
        )
    data = _read_policy_file("GPG keyring", keyring)
    home = Path(tempfile.mkdtemp(prefix="gitops-verify-gnupg-"))  # mode 0700, as gpg wants
    try:
        (home / "gpg.conf").write_text(_GPG_CONF)
        result = subprocess.run(
            [gpg, "--homedir", str(home), "--status-fd", "1", "--import"],
            input=data,
            capture_output=True,
            timeout=_TIMEOUT,
            check=False,
            env={**_git_env(None), "GNUPGHOME": str(home)},
        )
        imported = [
            ln for ln in result.stdout.decode("utf-8", "replace").splitlines() if "IMPORT_OK" in ln
        ]
        if not imported:
            detail = _first_lines(result.stderr, skip=("no gpg-agent", "keybox", "Total number"))
            hint = f"make it with `gpg --export KEYID... > {keyring.name}`"
            raise SignatureError(
                f"signing policy: GPG keyring {keyring} holds no OpenPGP public key ({hint})"
                + (f": {detail}" if detail else ""),
                kind="config",
                revision=revision,
            )
        yield home
    except subprocess.TimeoutExpired:
        raise SignatureError(
            f"signing policy: importing GPG keyring {keyring} did not finish in {_TIMEOUT:g} s",
            kind="config",
            revision=revision,
        ) from None
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _gpg_status(output: str) -> list[list[tuple[str, list[str]]]]:
    """`[GNUPG:]` lines as (keyword, args), one list per signature (NEWSIG starts one)."""
    blocks: list[list[tuple[str, list[str]]]] = []
    for line in output.splitlines():
        if not line.startswith("[GNUPG:] "):
            continue
        keyword, *args = line[len("[GNUPG:] ") :].split(" ")
        if keyword == "NEWSIG" or not blocks:
            blocks.append([])
        if keyword != "NEWSIG":
            blocks[-1].append((keyword, args))
    return blocks


def _gpg_outcome(
    result: subprocess.CompletedProcess[bytes], what: str, obj: str, keyring: Path, home: Path
) -> str:
    """The signer of a good signature; SignatureError for anything else.

    Every signature in the armor must be good and by a key of the keyring.
    """
    blocks = _gpg_status(result.stderr.decode("utf-8", "replace")) or [[]]
    signers = []
    for block in blocks:
        status = dict(block)
        problem = _gpg_problem(status, keyring, home)
        if problem is None and result.returncode == 0:
            uid = _unescape(" ".join(status["GOODSIG"][1:]))
            signers.append(f"{status['VALIDSIG'][-1]} {uid}")
            continue
        kind, reason = problem or ("bad", "has a GPG signature that gpg could not check")
        if kind == "bad" and "BADSIG" not in status:
            detail = _first_lines(result.stderr, skip=("[GNUPG:]",))
            reason += f": {detail}" if detail else ""
        raise SignatureError(f"{what} {reason}", kind=kind, revision=obj)
    return "; ".join(signers)


def _gpg_problem(status: dict[str, list[str]], keyring: Path, home: Path) -> tuple[str, str] | None:
    """(kind, reason) for what is wrong with one signature's status lines; None if it is good."""

    def key_of(keyword: str) -> str:
        args = status[keyword]
        fpr = status["VALIDSIG"][-1] if "VALIDSIG" in status else _fingerprint(home, args[0])
        return f"GPG key {fpr} ({_unescape(' '.join(args[1:]))})"

    if "BADSIG" in status:
        return "bad", (
            f"has a BAD signature by {key_of('BADSIG')}: its content is not what was signed "
            "(it was altered after signing)"
        )
    if "REVKEYSIG" in status:
        return "revoked", (
            f"is signed by {key_of('REVKEYSIG')}, which has been revoked (keyring {keyring}); "
            "re-sign with a valid key"
        )
    if "EXPKEYSIG" in status:
        when = _date(status.get("KEYEXPIRED", [""])[0])
        return "expired", (
            f"is signed by {key_of('EXPKEYSIG')}, which expired{when}; extend the key's expiry "
            "and export it into the keyring again, or re-sign with a valid key"
        )
    if "EXPSIG" in status:
        return "expired", f"has a signature by {key_of('EXPSIG')} that has expired"
    if "ERRSIG" in status:
        args = status["ERRSIG"] + ["-"] * 7
        key = args[6] if args[6] != "-" else args[0]
        if "NO_PUBKEY" in status or args[5] == "9":
            return "untrusted", f"is signed by GPG key {key}, which is not in keyring {keyring}"
        return "bad", (
            f"has a GPG signature by key {key} that cannot be checked (unsupported algorithm "
            f"or damaged signature; gpg error code {args[5]})"
        )
    if "GOODSIG" in status and "VALIDSIG" in status:
        return None
    return "bad", "has a GPG signature that gpg could not check (not a valid OpenPGP signature)"


def _fingerprint(home: Path, keyid: str) -> str:
    """The primary key fingerprint for a long key id, from the throwaway home; else the id."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        result = subprocess.run(
            ["gpg", "--homedir", str(home), "--with-colons", "--list-keys", "--", keyid],
            capture_output=True,
            timeout=_TIMEOUT,
            check=False,
            env={**_git_env(None), "GNUPGHOME": str(home)},
        )
        for line in result.stdout.decode("utf-8", "replace").splitlines():
            if line.startswith("fpr:"):
                return line.split(":")[9]
    return keyid


def _unescape(text: str) -> str:
    """gpg %XX-escapes control characters in user ids on its status lines."""
    return re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _date(timestamp: str) -> str:
    if not timestamp.isdigit():
        return ""
    return f" on {datetime.fromtimestamp(int(timestamp), UTC):%Y-%m-%d %H:%M} UTC"


# -- SSH ------------------------------------------------------------------------------------


def _ssh_key_fingerprint(signature: str) -> str | None:
    """`SHA256:...` of the public key inside an SSH signature (PROTOCOL.sshsig), if readable.

    The blob is "SSHSIG", a uint32 version, then the signer's public key as an SSH string.
    """
    body = "".join(ln.strip() for ln in signature.splitlines()[1:] if "-----" not in ln)
    try:
        blob = base64.b64decode(body, validate=True)
    except ValueError:
        return None
    if blob[:6] != b"SSHSIG" or len(blob) < 14:
        return None
    size = int.from_bytes(blob[10:14], "big")
    key = blob[14 : 14 + size]
    if len(key) != size:
        return None
    return "SHA256:" + base64.b64encode(hashlib.sha256(key).digest()).decode().rstrip("=")


def _ssh_outcome(
    result: subprocess.CompletedProcess[bytes],
    what: str,
    obj: str,
    allowed: Path,
    key_fpr: str | None,
) -> str:
    """The signer of a good SSH signature; SignatureError for anything else."""
    lines = [ln.strip() for ln in result.stderr.decode("utf-8", "replace").splitlines()]
    lines = [ln for ln in lines if ln]
    good = next((m for ln in lines if (m := _SSH_GOOD_RE.match(ln))), None)
    unknown = next((m for ln in lines if (m := _SSH_UNKNOWN_RE.match(ln))), None)
    # ssh-keygen's remarks on lines of the allowed-signers file (expired, invalid key, ...).
    remarks = [
        m for ln in lines if (m := _SSH_FILE_LINE_RE.match(ln)) and Path(m["file"]) == allowed
    ]

    def fail(kind: str, reason: str) -> SignatureError:
        return SignatureError(f"{what} {reason}", kind=kind, revision=obj)

    key_fpr = unknown["fpr"] if unknown else key_fpr
    if any("incorrect signature" in ln or "Signature verification failed" in ln for ln in lines):
        key = f" by SSH key {key_fpr}" if key_fpr else ""
        raise fail(
            "bad",
            f"has a BAD SSH signature{key}: its content is not what was signed (it was altered "
            "after signing)",
        )
    if good and result.returncode == 0:
        return f"{good['fpr']} {good['principal']}"
    window = [m for m in remarks if "has expired" in m["what"] or "not yet valid" in m["what"]]
    if window:
        m = window[0]
        key = f"SSH key {key_fpr}" if key_fpr else "its SSH key"
        raise fail(
            "expired",
            f"is signed by {key}, which line {m['line']} of allowed signers {allowed} does not "
            f"allow at the commit's date ({m['what']})",
        )
    if any("is needed for ssh signature verification" in ln for ln in lines):
        raise fail(
            "config",
            "cannot be checked: ssh-keygen is too old for SSH signatures (OpenSSH 8.2 or "
            "later is needed)",
        )
    if any("Unable to open allowed keys file" in ln for ln in lines):
        raise fail("config", f"cannot be checked: allowed signers {allowed} cannot be opened")
    if unknown or remarks:
        # Not listed, or listed on a line that does not allow it (namespaces, a bad line).
        notes = "; ".join(f"line {m['line']}: {m['what']}" for m in remarks)
        listed = "not listed in" if unknown else "not allowed by"
        raise fail(
            "untrusted",
            f"is signed by SSH key {key_fpr or '(unreadable)'}, which is {listed} allowed "
            f"signers {allowed}" + (f" (ssh-keygen reported: {notes})" if notes else ""),
        )
    detail = "; ".join(lines[:3])
    raise fail(
        "bad",
        "has an SSH signature that ssh-keygen could not check" + (f": {detail}" if detail else ""),
    )


def _first_lines(stderr: bytes, *, skip: tuple[str, ...] = ()) -> str:
    lines = [
        ln.strip().removeprefix("gpg: ")
        for ln in stderr.decode("utf-8", "replace").splitlines()
        if ln.strip() and not any(s in ln for s in skip)
    ]
    return "; ".join(lines[:3])
