"""Signed-commit verification against real keys, real signatures and real repositories.

Keys are made once per module: GPG ed25519 keys (`gpg --batch --quick-gen-key`, no
passphrase) in an isolated GNUPGHOME under tmp, SSH ed25519 keys with `ssh-keygen`. Commits
and tags are signed by `git commit -S` / `git tag -s`, as a developer would. The operator's
keyring is a plain `gpg --export`. The cases are a table: tests/cases/signatures.json.

The gpg-agent that signing needs is started by gpg in the test's own GNUPGHOMEs and killed
at the end with `gpgconf --homedir HOME --kill all`; verification starts none (checked).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from providers.errors import GitSourceError, SignatureError
from providers.git_verify import SigningPolicy, Verified, check_policy, verify_revision, verify_tag

CASES = json.loads((Path(__file__).parent / "cases" / "signatures.json").read_text())["cases"]

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("gpg", "gpg-agent", "gpgconf", "ssh-keygen")),
    reason="needs gpg (Debian gpg, gpg-agent) and ssh-keygen (openssh-client >= 8.2)",
)

# The developer side: a git identity and no system/global git config of the machine's.
DEV_ENV_BASE = {
    "GIT_AUTHOR_NAME": "Ada Lovelace",
    "GIT_AUTHOR_EMAIL": "ada@example.org",
    "GIT_COMMITTER_NAME": "Ada Lovelace",
    "GIT_COMMITTER_EMAIL": "ada@example.org",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


def run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: bytes | None = None,
) -> bytes:
    result = subprocess.run(
        argv,
        cwd=cwd,
        env={**os.environ, **DEV_ENV_BASE, **(env or {})},
        input=stdin,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, f"{argv}: {result.stderr.decode(errors='replace')}"
    return result.stdout


def new_gnupghome(path: Path, conf: str = "") -> Path:
    path.mkdir(mode=0o700, parents=True)
    if conf:
        (path / "gpg.conf").write_text(conf)
    return path


def gen_gpg_key(home: Path, uid: str, expire: str = "never") -> str:
    """A passphrase-less ed25519 signing key; its fingerprint."""
    out = run(
        [
            "gpg",
            "--batch",
            "--status-fd",
            "1",
            "--passphrase",
            "",
            "--quick-gen-key",
            uid,
            "ed25519",
            "sign",
            expire,
        ],
        env={"GNUPGHOME": str(home)},
    ).decode()
    return re.search(r"KEY_CREATED P ([0-9A-F]{40})", out).group(1)


def ssh_fingerprint(pub: Path) -> str:
    return run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)]).decode().split()[1]


@dataclass
class Keys:
    """All the keys of the module, and the operator's files that list some of them."""

    dev_home: Path  # GNUPGHOME of the developers (ada, eve, rex)
    old_home: Path  # GNUPGHOME living in 2020, for a key that expired on 2020-01-02
    gpg: dict[str, str] = field(default_factory=dict)  # name -> fingerprint
    ssh: dict[str, Path] = field(default_factory=dict)  # name -> private key
    ssh_fpr: dict[str, str] = field(default_factory=dict)  # name -> SHA256:...
    keyring: Path = Path()
    keyring_armored: Path = Path()
    allowed_signers: Path = Path()

    def policy(self, name: str) -> SigningPolicy:
        return {
            "gpg": SigningPolicy(gpg_keyring=self.keyring),
            "gpg-armored": SigningPolicy(gpg_keyring=self.keyring_armored),
            "ssh": SigningPolicy(ssh_allowed_signers=self.allowed_signers),
            "both": SigningPolicy(
                gpg_keyring=self.keyring, ssh_allowed_signers=self.allowed_signers
            ),
        }[name]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    root = tmp_path_factory.mktemp("keys")
    k = Keys(
        dev_home=new_gnupghome(root / "dev-gnupg"),
        # gpg reads faked-system-time from gpg.conf: the key is made and used on 2020-01-01.
        old_home=new_gnupghome(root / "old-gnupg", "faked-system-time 20200101T000000\n"),
    )
    try:
        for name in ("ada", "eve", "rex"):
            uid = f"{name.title()} {'Lovelace' if name == 'ada' else 'Test'} <{name}@example.org>"
            k.gpg[name] = gen_gpg_key(k.dev_home, uid)
        k.gpg["old"] = gen_gpg_key(k.old_home, "Old Test <old@example.org>", "1d")

        # The operator's keyring: ada, old and rex (with rex's revocation), not eve.
        scratch = new_gnupghome(root / "operator-gnupg")
        exported = run(
            ["gpg", "--export", k.gpg["ada"], k.gpg["rex"]], env={"GNUPGHOME": str(k.dev_home)}
        )
        exported += run(["gpg", "--export", k.gpg["old"]], env={"GNUPGHOME": str(k.old_home)})
        # gpg writes a revocation certificate for every key it makes; its armor line is
        # prefixed with ":" so that it is not imported by accident.
        rev = (k.dev_home / "openpgp-revocs.d" / f"{k.gpg['rex']}.rev").read_text()
        rev = rev.replace(":-----BEGIN PGP PUBLIC KEY BLOCK", "-----BEGIN PGP PUBLIC KEY BLOCK")
        op = {"GNUPGHOME": str(scratch)}
        run(["gpg", "--batch", "--import"], env=op, stdin=exported)
        run(["gpg", "--batch", "--import"], env=op, stdin=rev.encode())
        k.keyring = root / "keyring.gpg"
        k.keyring.write_bytes(run(["gpg", "--export"], env=op))
        k.keyring_armored = root / "keyring.asc"
        k.keyring_armored.write_bytes(run(["gpg", "--export", "--armor", k.gpg["ada"]], env=op))

        for name in ("ada", "eve", "carol", "dan"):
            k.ssh[name] = root / f"{name}_ed25519"
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(k.ssh[name])])
            k.ssh_fpr[name] = ssh_fingerprint(k.ssh[name].with_suffix(".pub"))
        pub = {n: k.ssh[n].with_suffix(".pub").read_text().strip() for n in k.ssh}
        k.allowed_signers = root / "allowed_signers"
        k.allowed_signers.write_text(
            "# operator's list of keys that may sign\n"
            f"ada@example.org {pub['ada']}\n"
            f'carol@example.org valid-before="20200101" {pub["carol"]}\n'
            f'dan@example.org namespaces="file" {pub["dan"]}\n'
        )
        yield k
    finally:
        for home in (k.dev_home, k.old_home, root / "operator-gnupg"):
            if home.exists():
                subprocess.run(
                    ["gpgconf", "--homedir", str(home), "--kill", "all"],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )


class Repo:
    """A developer's repository where each case makes its own commit (and tag)."""

    def __init__(self, path: Path, keys: Keys) -> None:
        self.path = path
        self.keys = keys
        self.count = 0
        run(["git", "init", "--quiet", "-b", "main", str(path)])

    def git(self, *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> str:
        return run(["git", *args], cwd=self.path, env=env, stdin=stdin).decode().strip()

    def _signing(self, spec: str) -> tuple[list[str], dict[str, str]]:
        """git -c options and environment to sign as `spec` ('gpg:ada', 'ssh:eve')."""
        kind, name = spec.split(":")
        if kind == "ssh":
            return ["-c", "gpg.format=ssh", "-c", f"user.signingkey={self.keys.ssh[name]}"], {}
        home = self.keys.old_home if name == "old" else self.keys.dev_home
        env = {"GNUPGHOME": str(home)}
        if name == "old":
            env["GIT_COMMITTER_DATE"] = env["GIT_AUTHOR_DATE"] = "2020-01-01T00:00:00Z"
        return ["-c", "gpg.format=openpgp", "-c", f"user.signingkey={self.keys.gpg[name]}"], env

    def commit(self, sign: str | None, mutate: str | None = None) -> str:
        self.count += 1
        opts, env = self._signing(sign) if sign else ([], {})
        message = f"change {self.count}"
        self.git(
            *opts,
            "commit",
            "--quiet",
            "--allow-empty",
            *(["-S"] if sign else []),
            "-m",
            message,
            env=env,
        )
        sha = self.git("rev-parse", "HEAD")
        if mutate:
            sha = self._rewrite(sha, mutate, message)
        return sha

    def _rewrite(self, sha: str, mutate: str, message: str) -> str:
        """A new commit object made from `sha`'s text: what an attacker with push rights can do."""
        raw = self.git("cat-file", "commit", sha) + "\n"
        if mutate == "tamper":  # keep the signature, change the message
            raw = raw.replace(f"\n\n{message}\n", f"\n\n{message}, and a backdoor\n")
        else:
            header, _, body = raw.partition("\n\n")
            signature = {
                "garbage": "gpgsig this is not a signature\n trust me",
                "x509": "gpgsig -----BEGIN SIGNED MESSAGE-----\n MIIBxx==\n"
                " -----END SIGNED MESSAGE-----",
            }[mutate]
            raw = f"{header}\n{signature}\n\n{body}"
        return self.git("hash-object", "-w", "-t", "commit", "--stdin", stdin=raw.encode())

    def tag(self, commit: str, spec: dict[str, Any]) -> str:
        name = f"v{self.count}"
        sign = spec.get("sign")
        if sign == "lightweight":
            self.git("tag", name, commit)
        elif sign is None:
            self.git("tag", "-a", "-m", f"release {name}", name, commit)
        else:
            opts, env = self._signing(sign)
            self.git(*opts, "tag", "-s", "-m", f"release {name}", name, commit, env=env)
        if spec.get("ref"):  # the same tag object under another name
            obj = self.git("rev-parse", f"refs/tags/{name}")
            self.git("update-ref", f"refs/tags/{spec['ref']}", obj)
            name = spec["ref"]
        return name


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Repo:
    return Repo(tmp_path_factory.mktemp("repo") / "infra", keys)


def placeholders(keys: Keys, short: str, tag: str) -> dict[str, str]:
    values = {
        "short": short,
        "tag": tag,
        "keyring": str(keys.keyring),
        "allowed": str(keys.allowed_signers.absolute()),
    }
    values.update({f"gpg_{n}": fpr for n, fpr in keys.gpg.items()})
    values.update({f"ssh_{n}": fpr for n, fpr in keys.ssh_fpr.items()})
    return values


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_signature_case(case: dict[str, Any], keys: Keys, repo: Repo) -> None:
    commit = repo.commit(case["commit"]["sign"], case["commit"].get("mutate"))
    tag = repo.tag(commit, case["tag"]) if "tag" in case else ""
    policy = keys.policy(case["policy"])
    checked = commit
    if case.get("check") == "tag":
        checked = repo.git("rev-parse", f"refs/tags/{tag}")

    def check() -> Verified:
        if case.get("check") == "tag":
            return verify_tag(repo.path, tag, policy)
        return verify_revision(repo.path, tag or commit, policy)

    values = placeholders(keys, checked[:12], tag)
    if case["expect"] == "ok":
        verified = check()
        assert verified.kind == case["kind"]
        assert verified.revision == commit
        for part in case["signer"]:
            assert part.format_map(values) in verified.signer
        return
    with pytest.raises(SignatureError) as info:
        check()
    err = info.value
    assert (err.kind, err.retryable) == (case["expect"], False), str(err)
    assert err.revision == checked
    for part in case["says"]:
        assert part.format_map(values) in str(err)


# -- the policy itself -------------------------------------------------------------------------


def test_policy_needs_a_key_source() -> None:
    with pytest.raises(SignatureError) as info:
        SigningPolicy()
    assert info.value.kind == "config"
    assert "set gpg_keyring, ssh_allowed_signers or both" in str(info.value)


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        ("missing-keyring", "GPG keyring {path} does not exist"),
        ("keyring-is-dir", "GPG keyring {path} is a directory"),
        ("keyring-without-keys", "GPG keyring {path} holds no OpenPGP public key"),
        ("missing-allowed-signers", "SSH allowed signers file {path} does not exist"),
        ("empty-allowed-signers", "SSH allowed signers file {path} lists no keys"),
    ],
)
def test_misconfigured_policy(
    setup: str, says: str, tmp_path: Path, keys: Keys, repo: Repo
) -> None:
    commit = repo.commit("gpg:ada")
    path = tmp_path / "policy-file"
    if setup == "keyring-is-dir":
        path.mkdir()
    elif setup == "keyring-without-keys":
        path.write_text("not a keyring\n")
    elif setup == "empty-allowed-signers":
        path.write_text("# nobody yet\n\n")
    ssh = "allowed" in setup
    policy = SigningPolicy(
        gpg_keyring=None if ssh else path,
        ssh_allowed_signers=path if ssh else None,
    )
    with pytest.raises(SignatureError) as info:
        verify_revision(repo.path, commit, policy)
    assert info.value.kind == "config"
    assert says.format(path=path) in str(info.value)
    if setup != "keyring-without-keys":  # that one is only found by importing it
        with pytest.raises(SignatureError):
            check_policy(policy)


def test_both_policies_with_a_missing_keyring_fail_even_for_ssh(
    tmp_path: Path, keys: Keys, repo: Repo
) -> None:
    """A broken half of the policy is reported at once, not when a GPG commit first arrives."""
    commit = repo.commit("ssh:ada")
    policy = SigningPolicy(
        gpg_keyring=tmp_path / "gone.gpg", ssh_allowed_signers=keys.allowed_signers
    )
    with pytest.raises(SignatureError) as info:
        verify_revision(repo.path, commit, policy)
    assert info.value.kind == "config"


def test_unknown_revision_and_tag_are_source_errors(keys: Keys, repo: Repo) -> None:
    with pytest.raises(GitSourceError, match="no commit 'deadbeef' in the repository"):
        verify_revision(repo.path, "deadbeef", keys.policy("gpg"))
    with pytest.raises(GitSourceError, match="no tag 'v-none'"):
        verify_tag(repo.path, "v-none", keys.policy("gpg"))
    with pytest.raises(GitSourceError, match="invalid tag name"):
        verify_tag(repo.path, "--upload-pack=x", keys.policy("gpg"))


# -- isolation ----------------------------------------------------------------------------------


def test_callers_git_and_gnupg_setup_change_nothing(
    tmp_path: Path, keys: Keys, repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile global or repo git config and a GNUPGHOME holding eve's key do not sway the
    check, and the user's ~/.gnupg is neither read nor made."""
    good, eves = repo.commit("gpg:ada"), repo.commit("gpg:eve")
    global_config = tmp_path / "gitconfig"
    global_config.write_text("[gpg]\n\tprogram = /bin/false\n\tminTrustLevel = ultimate\n")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(global_config))
    monkeypatch.setenv("GNUPGHOME", str(keys.dev_home))  # has eve's key, and ultimate trust

    repo.git("config", "gpg.minTrustLevel", "ultimate")  # the clone's own config, too
    try:
        assert verify_revision(repo.path, good, keys.policy("gpg")).kind == "gpg"
        with pytest.raises(SignatureError) as info:
            verify_revision(repo.path, eves, keys.policy("gpg"))
    finally:
        repo.git("config", "--unset", "gpg.minTrustLevel")
    assert info.value.kind == "untrusted"
    assert not (home / ".gnupg").exists()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_verification_starts_no_gpg_agent_and_leaves_no_temp_home(keys: Keys, repo: Repo) -> None:
    commit = repo.commit("gpg:ada")
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    before = set(tmp.glob("gitops-verify-gnupg-*"))
    for sha in (commit, repo.commit("gpg:eve")):
        with contextlib.suppress(SignatureError):
            verify_revision(repo.path, sha, keys.policy("gpg"))
    assert _processes_mentioning("gitops-verify-gnupg-") == []
    assert set(tmp.glob("gitops-verify-gnupg-*")) == before


def test_verification_is_fast(keys: Keys, repo: Repo) -> None:
    """One check per pass must cost next to nothing next to a Terraform plan."""
    gpg_commit, ssh_commit = repo.commit("gpg:ada"), repo.commit("ssh:ada")
    policy = keys.policy("both")
    timings = {}
    for sha, kind in ((gpg_commit, "gpg"), (ssh_commit, "ssh")):
        start = time.perf_counter()
        for _ in range(5):
            assert verify_revision(repo.path, sha, policy).kind == kind
        timings[kind] = (time.perf_counter() - start) / 5
    assert max(timings.values()) < 1.0, timings
