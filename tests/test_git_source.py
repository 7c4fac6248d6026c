"""The Git source against real repositories: file://, SSH (OpenSSH sshd) and HTTPS.

No mocks: an upstream bare repo is made per test and pushed to with the git CLI; SSH and
HTTPS go through the servers in `tests/support` on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from providers.errors import GitSourceError
from providers.git_source import CommitInfo, GitSource, sanitize_text, sanitize_url
from tests.support.git_http import GitHttpServer
from tests.support.sshd import SshServer, chown_tree, ensure_user, make_client_key, public_key

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "Ada Lovelace",
    "GIT_AUTHOR_EMAIL": "ada@example.org",
    "GIT_COMMITTER_NAME": "Ada Lovelace",
    "GIT_COMMITTER_EMAIL": "ada@example.org",
    "GIT_CONFIG_NOSYSTEM": "1",
}


@pytest.fixture(scope="module", autouse=True)
def _git_global_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A global config of our own for the test's git commands (not the machine's).

    The SSH tests' upstream belongs to the test user and root still pushes to it locally:
    `safe.directory` must come from the global config, since git drops `-c`/GIT_CONFIG_COUNT
    settings when it spawns the receiving side of a local push.
    """
    config = tmp_path_factory.mktemp("gitconfig") / "config"
    config.write_text("[safe]\n\tdirectory = *\n[init]\n\tdefaultBranch = main\n")
    GIT_ENV["GIT_CONFIG_GLOBAL"] = str(config)
    yield
    GIT_ENV.pop("GIT_CONFIG_GLOBAL", None)


def run_git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**GIT_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


class Upstream:
    """A bare repo (the remote) and a work tree that commits and pushes to it."""

    def __init__(self, root: Path, branch: str = "main") -> None:
        self.branch = branch
        self.bare = root / "infra.git"
        self.work = root / "work"
        self.after_push: Callable[[], None] = lambda: None
        root.mkdir(parents=True, exist_ok=True)
        run_git(root, "init", "--quiet", "--bare", "-b", branch, str(self.bare))
        run_git(root, "init", "--quiet", "-b", branch, str(self.work))
        run_git(self.work, "remote", "add", "origin", str(self.bare))

    @property
    def url(self) -> str:
        return self.bare.as_uri()

    def commit(self, files: dict[str, str | None], message: str, *, date: str = "") -> str:
        """Write (or, for None, delete) files, commit, push; the new sha."""
        for name, content in files.items():
            path = self.work / name
            if content is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
        run_git(self.work, "add", "--all")
        env = {"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date} if date else {}
        run_git(self.work, "commit", "--quiet", "--allow-empty", "-m", message, env=env)
        self.push()
        return self.head()

    def push(self, *, force: bool = False) -> None:
        run_git(self.work, "push", "--quiet", *(["--force"] if force else []), "origin", "HEAD")
        self.after_push()

    def head(self) -> str:
        return run_git(self.work, "rev-parse", "HEAD")

    def rewrite_last_commit(self, message: str) -> str:
        """Replace the last commit by another one and force-push: a history rewrite."""
        run_git(self.work, "reset", "--quiet", "--hard", "HEAD~1")
        (self.work / "rewritten.txt").write_text(message)
        run_git(self.work, "add", "--all")
        run_git(self.work, "commit", "--quiet", "-m", message)
        self.push(force=True)
        return self.head()


@pytest.fixture
def upstream(tmp_path: Path) -> Upstream:
    up = Upstream(tmp_path / "upstream")
    up.commit({"gitops.yaml": "version: 1\n", "stacks/net/main.tf": "# net\n"}, "initial")
    return up


@pytest.fixture
def source(upstream: Upstream, tmp_path: Path) -> GitSource:
    return GitSource(upstream.url, "main", tmp_path / "checkout", timeout=30)


def assert_error(excinfo: pytest.ExceptionInfo[GitSourceError], *fragments: str) -> str:
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- file:// ---------------------------------------------------------------------------------


def test_fetch_clones_and_pins_the_branch_head(upstream: Upstream, source: GitSource) -> None:
    sha = source.fetch()

    assert sha == upstream.head()
    assert len(sha) == 40
    assert (source.checkout_dir / ".git").is_dir()
    assert source.has_commit(sha)
    assert source.fetch() == sha  # nothing new: same pin, no re-clone


def test_a_new_push_is_fetched_and_is_a_fast_forward(upstream: Upstream, source: GitSource) -> None:
    first = source.fetch()
    second = upstream.commit({"gitops.yaml": "version: 1\n# two\n"}, "second")

    assert not source.has_commit(second)
    assert source.fetch() == second
    assert source.is_ancestor(first, second)
    assert source.is_ancestor(second, second)
    assert not source.is_ancestor(second, first)


def test_a_force_push_is_fetched_and_is_not_a_fast_forward(
    upstream: Upstream, source: GitSource
) -> None:
    upstream.commit({"a.txt": "a\n"}, "to be rewritten")
    old = source.fetch()
    new = upstream.rewrite_last_commit("rewritten")

    assert source.fetch() == new  # forced refspec: the rewritten branch is still fetched
    assert source.has_commit(old)
    assert not source.is_ancestor(old, new)
    # A commit the clone never had is no ancestor of anything in it.
    assert not source.is_ancestor("0" * 40, new)


def test_read_file_at_a_revision(upstream: Upstream, source: GitSource) -> None:
    old = source.fetch()
    new = upstream.commit({"gitops.yaml": "version: 2\n", "new.txt": "x"}, "change")
    source.fetch()

    assert source.read_file(old, "gitops.yaml") == b"version: 1\n"
    assert source.read_file(new, "gitops.yaml") == b"version: 2\n"
    assert source.read_file(new, "./stacks/net/main.tf") == b"# net\n"
    assert source.read_file(old, "new.txt") is None
    assert source.read_file(new, "missing/file") is None
    assert not (source.checkout_dir / "gitops.yaml").exists()  # nothing was checked out
    with pytest.raises(GitSourceError, match="is a directory"):
        source.read_file(new, "stacks")
    with pytest.raises(GitSourceError, match="invalid path"):
        source.read_file(new, "../etc/passwd")


def test_checkout_resets_tracked_files_and_keeps_untracked_ones(
    upstream: Upstream, source: GitSource
) -> None:
    first = source.fetch()
    second = upstream.commit({"later.txt": "later\n"}, "add later.txt")
    source.fetch()
    work = source.checkout(second)
    main_tf = work / "stacks/net/main.tf"
    main_tf.write_text("# edited by hand\n")
    (work / "gitops.yaml").unlink()
    lock = work / "stacks/net/.terraform.lock.hcl"
    lock.write_text("# lock\n")

    assert source.checkout(second) == work
    assert main_tf.read_text() == "# net\n"
    assert (work / "gitops.yaml").read_text() == "version: 1\n"
    assert lock.read_text() == "# lock\n"

    source.checkout(first)
    assert not (work / "later.txt").exists()
    assert lock.exists()
    assert run_git(work, "rev-parse", "HEAD") == first


def test_commit_info_and_changed_paths(upstream: Upstream, source: GitSource) -> None:
    old = source.fetch()
    new = upstream.commit(
        {"gitops.yaml": "version: 1\n# changed\n", "stacks/net/main.tf": None, "b/c.tf": "c"},
        "Move the network stack\n\nLonger body.",
        date="2024-03-01T12:00:00+02:00",
    )
    source.fetch()

    assert source.commit_info(new) == CommitInfo(
        sha=new,
        author="Ada Lovelace <ada@example.org>",
        committed_at=datetime(2024, 3, 1, 10, 0, tzinfo=UTC),
        summary="Move the network stack",
    )
    assert source.commit_info(new[:12]).sha == new
    assert source.changed_paths(old, new) == ("b/c.tf", "gitops.yaml", "stacks/net/main.tf")
    assert source.changed_paths(new, new) == ()


def test_unknown_or_malformed_commits(source: GitSource) -> None:
    source.fetch()
    assert not source.has_commit("f" * 40)
    assert not source.has_commit("HEAD")
    with pytest.raises(GitSourceError, match="not in the clone"):
        source.checkout("f" * 40)
    with pytest.raises(GitSourceError, match="not a commit id"):
        source.read_file("--output=/tmp/x", "gitops.yaml")


def test_a_missing_branch_is_a_clear_error(upstream: Upstream, tmp_path: Path) -> None:
    source = GitSource(upstream.url, "release", tmp_path / "checkout")
    with pytest.raises(GitSourceError) as excinfo:
        source.fetch()
    assert_error(excinfo, "branch 'release' does not exist", upstream.url)
    assert excinfo.value.retryable is False
    assert not (tmp_path / "checkout").exists()  # a failed clone leaves nothing behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checkout.clone-")]


def test_a_nonexistent_repo_is_a_clear_error(tmp_path: Path) -> None:
    url = (tmp_path / "nowhere.git").as_uri()
    with pytest.raises(GitSourceError) as excinfo:
        GitSource(url, "main", tmp_path / "checkout").fetch()
    assert_error(excinfo, "no repository there", url)


def test_methods_before_any_fetch_say_so(tmp_path: Path, upstream: Upstream) -> None:
    source = GitSource(upstream.url, "main", tmp_path / "checkout")
    assert not source.has_commit("a" * 40)  # no clone: no commit (the fallback path asks)
    with pytest.raises(GitSourceError, match=r"fetch\(\) must run first"):
        source.read_file("a" * 40, "gitops.yaml")


def test_a_later_instance_reuses_the_clone(
    upstream: Upstream, source: GitSource, tmp_path: Path
) -> None:
    sha = source.fetch()
    marker = source.checkout(sha) / "untracked.txt"
    marker.write_text("kept")

    again = GitSource(upstream.url, "main", tmp_path / "checkout")
    assert again.has_commit(sha)  # opens the existing clone without fetching
    assert again.fetch() == sha
    assert marker.read_text() == "kept"


def test_locks_left_by_a_killed_git_do_not_block_later_passes(
    upstream: Upstream, source: GitSource, tmp_path: Path
) -> None:
    first = source.fetch()
    git_dir = source.checkout_dir / ".git"
    (git_dir / "index.lock").write_text("")
    (git_dir / "refs/remotes/origin/main.lock").write_text("")
    second = upstream.commit({"x.txt": "x"}, "second")

    again = GitSource(upstream.url, "main", tmp_path / "checkout")  # as after a restart
    assert again.fetch() == second
    again.checkout(second)
    assert again.is_ancestor(first, second)


def test_a_dir_that_is_not_a_clone_of_the_url_is_recloned(
    upstream: Upstream, tmp_path: Path
) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "junk").write_text("not a repo")
    (tmp_path / ".checkout.clone-stale").mkdir()  # left by a crash mid-clone

    sha = GitSource(upstream.url, "main", checkout).fetch()
    assert not (checkout / "junk").exists()
    assert not (tmp_path / ".checkout.clone-stale").exists()

    other = Upstream(tmp_path / "other")
    other_sha = other.commit({"x": "y"}, "other repo")
    assert GitSource(other.url, "main", checkout).fetch() == other_sha
    assert GitSource(upstream.url, "main", checkout).fetch() == sha


def test_unsupported_url_and_bad_branch_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GitSourceError, match="unsupported Git URL"):
        GitSource("ext::sh -c touch% /tmp/pwned", "main", tmp_path / "c")
    with pytest.raises(GitSourceError, match="invalid branch name"):
        GitSource("file:///srv/x.git", "a..b", tmp_path / "c")


def test_a_hanging_server_times_out(tmp_path: Path) -> None:
    # Accepts TCP connections (the kernel does, via the backlog) and never says a word.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"https://127.0.0.1:{silent.getsockname()[1]}/repo.git"
        source = GitSource(url, "main", tmp_path / "checkout", timeout=1)
        with pytest.raises(GitSourceError) as excinfo:
            source.fetch()
    assert_error(excinfo, "timed out after 1 s")
    assert excinfo.value.retryable is True


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:secret@git.example.org/infra.git", "https://git.example.org/infra.git"),
        ("https://ghp_token@git.example.org/infra.git", "https://git.example.org/infra.git"),
        ("https://u:p%40ss@git.example.org:8443/x", "https://git.example.org:8443/x"),
        ("http://a:b@[::1]:8080/x", "http://[::1]:8080/x"),
        ("ssh://git@git.example.org:2222/infra.git", "ssh://git@git.example.org:2222/infra.git"),
        ("ssh://git:pw@git.example.org/infra.git", "ssh://git.example.org/infra.git"),
        ("git@git.example.org:org/infra.git", "git@git.example.org:org/infra.git"),
        ("file:///srv/git/infra.git", "file:///srv/git/infra.git"),
        ("https://git.example.org/infra.git", "https://git.example.org/infra.git"),
    ],
)
def test_sanitize_url(url: str, expected: str) -> None:
    assert sanitize_url(url) == expected


def test_sanitize_text_strips_credentials_from_urls_in_messages() -> None:
    text = "fatal: unable to access 'https://bob:hunter22@h.example/x.git/': 401"
    assert sanitize_text(text) == "fatal: unable to access 'https://h.example/x.git/': 401"
    assert sanitize_text("token hunter22 leaked", ("hunter22",)) == "token *** leaked"


# -- ssh ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssh_server() -> Iterator[SshServer]:
    reason = SshServer.available()
    if reason:
        pytest.skip(reason)
    with SshServer() as server:
        yield server


@pytest.fixture
def ssh_upstream(ssh_server: SshServer) -> Upstream:
    home = ssh_server.make_user_dir()
    up = Upstream(home)
    up.after_push = lambda: chown_tree(home, ssh_server.user)  # readable by the ssh user
    up.commit({"gitops.yaml": "version: 1\n"}, "initial")
    return up


@pytest.fixture
def deploy_key(ssh_server: SshServer, tmp_path: Path) -> Path:
    # A space in the path: GIT_SSH_COMMAND must quote it.
    key = make_client_key(tmp_path / "keys dir" / "deploy_key")
    ssh_server.add_authorized_key(ssh_server.user, public_key(key))
    return key


def test_ssh_clone_and_fetch_with_a_deploy_key(
    ssh_server: SshServer, ssh_upstream: Upstream, deploy_key: Path, tmp_path: Path
) -> None:
    source = GitSource(
        ssh_server.ssh_url(ssh_upstream.bare),
        "main",
        tmp_path / "checkout",
        deploy_key=deploy_key,
        known_hosts=ssh_server.write_known_hosts(tmp_path / "keys" / "known_hosts"),
        timeout=30,
    )
    first = source.fetch()
    assert first == ssh_upstream.head()

    second = ssh_upstream.commit({"gitops.yaml": "version: 1\n# 2\n"}, "second")
    assert source.fetch() == second
    assert source.is_ancestor(first, second)
    assert source.read_file(second, "gitops.yaml") == b"version: 1\n# 2\n"


def test_ssh_unknown_host_key_is_refused(
    ssh_server: SshServer, ssh_upstream: Upstream, deploy_key: Path, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    source = GitSource(
        ssh_server.ssh_url(ssh_upstream.bare),
        "main",
        tmp_path / "checkout",
        deploy_key=deploy_key,
        known_hosts=known_hosts,
    )
    with pytest.raises(GitSourceError) as excinfo:
        source.fetch()
    assert_error(
        excinfo,
        f"host key of [127.0.0.1]:{ssh_server.port} was not accepted",
        f"known_hosts {known_hosts}",
    )
    assert excinfo.value.retryable is False
    assert known_hosts.read_text() == ""  # nothing was learned on first use


def test_ssh_changed_host_key_is_refused(
    ssh_server: SshServer, ssh_upstream: Upstream, deploy_key: Path, tmp_path: Path
) -> None:
    impostor = make_client_key(tmp_path / "keys" / "impostor")  # any other ed25519 key
    known_hosts = tmp_path / "keys" / "known_hosts"
    key_type, key_data = public_key(impostor).split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{ssh_server.port} {key_type} {key_data}\n")
    source = GitSource(
        ssh_server.ssh_url(ssh_upstream.bare),
        "main",
        tmp_path / "checkout",
        deploy_key=deploy_key,
        known_hosts=known_hosts,
    )
    with pytest.raises(GitSourceError) as excinfo:
        source.fetch()
    assert_error(excinfo, "host key of", "was not accepted", "CHANGED", str(known_hosts))


def test_ssh_wrong_deploy_key_is_refused(
    ssh_server: SshServer, ssh_upstream: Upstream, tmp_path: Path
) -> None:
    stranger = make_client_key(tmp_path / "keys" / "not_authorized")
    source = GitSource(
        ssh_server.ssh_url(ssh_upstream.bare),
        "main",
        tmp_path / "checkout",
        deploy_key=stranger,
        known_hosts=ssh_server.write_known_hosts(tmp_path / "keys" / "known_hosts"),
    )
    with pytest.raises(GitSourceError) as excinfo:
        source.fetch()
    assert_error(excinfo, "authentication refused", f"deploy key {stranger}")
    assert excinfo.value.retryable is False


@pytest.mark.parametrize(
    "url", ["ssh://git@git.example.org/infra.git", "git@git.example.org:org/infra.git"]
)
def test_ssh_missing_key_file_is_a_config_error(url: str, tmp_path: Path) -> None:
    # Checked before any connection: scp-like addresses are SSH too.
    source = GitSource(url, "main", tmp_path / "checkout", deploy_key=tmp_path / "no_such_key")
    with pytest.raises(GitSourceError, match=r"deploy_key .*no_such_key does not exist") as exc:
        source.fetch()
    assert exc.value.retryable is False


# -- https -------------------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55word"


@pytest.fixture(scope="module")
def https_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("https-repos")


@pytest.fixture(scope="module")
def https_server(https_root: Path) -> Iterator[GitHttpServer]:
    with GitHttpServer(https_root) as server:
        yield server


@pytest.fixture(scope="module")
def private_https_server(https_root: Path) -> Iterator[GitHttpServer]:
    with GitHttpServer(https_root, credentials=("deploy", SECRET)) as server:
        yield server


@pytest.fixture
def https_upstream(https_root: Path, request: pytest.FixtureRequest) -> Upstream:
    up = Upstream(https_root / request.node.name.replace("[", "_").replace("]", "_"))
    up.commit({"gitops.yaml": "version: 1\n"}, "initial")
    return up


def https_path(root: Path, up: Upstream) -> str:
    return str(up.bare.relative_to(root))


def test_https_clone_and_fetch_with_a_ca_bundle(
    https_server: GitHttpServer, https_root: Path, https_upstream: Upstream, tmp_path: Path
) -> None:
    source = GitSource(
        https_server.url(https_path(https_root, https_upstream)),
        "main",
        tmp_path / "checkout",
        https_ca_bundle=https_server.ca_bundle,
        timeout=30,
    )
    assert source.fetch() == https_upstream.head()
    second = https_upstream.commit({"gitops.yaml": "version: 1\n# 2\n"}, "second")
    assert source.fetch() == second


def test_https_without_the_ca_bundle_is_a_clear_tls_error(
    https_server: GitHttpServer, https_root: Path, https_upstream: Upstream, tmp_path: Path
) -> None:
    source = GitSource(
        https_server.url(https_path(https_root, https_upstream)), "main", tmp_path / "checkout"
    )
    with pytest.raises(GitSourceError) as excinfo:
        source.fetch()
    assert_error(excinfo, "TLS certificate was not accepted", "https_ca_bundle")
    assert excinfo.value.retryable is False


def test_https_with_credentials_in_the_url_works(
    private_https_server: GitHttpServer,
    https_root: Path,
    https_upstream: Upstream,
    tmp_path: Path,
) -> None:
    url = private_https_server.url(
        https_path(https_root, https_upstream), userinfo=f"deploy:{SECRET}"
    )
    source = GitSource(
        url, "main", tmp_path / "checkout", https_ca_bundle=private_https_server.ca_bundle
    )
    assert source.fetch() == https_upstream.head()
    assert SECRET not in repr(source)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong password", "authentication refused"),
        ("no CA bundle", "TLS certificate was not accepted"),
        ("missing branch", "does not exist"),
        ("missing repo", "no repository there"),
        ("closed port", "could not be reached"),
    ],
)
def test_a_secret_in_the_url_never_shows_in_an_error(
    case: str,
    expected: str,
    private_https_server: GitHttpServer,
    https_root: Path,
    https_upstream: Upstream,
    tmp_path: Path,
) -> None:
    path = https_path(https_root, https_upstream)
    password, branch, ca = SECRET, "main", private_https_server.ca_bundle
    if case == "wrong password":
        password = SECRET + "-wrong"
    elif case == "no CA bundle":
        ca = None
    elif case == "missing branch":
        branch = "nope"
    elif case == "missing repo":
        path = "no/such/repo.git"
    url = private_https_server.url(path, userinfo=f"deploy:{password}")
    if case == "closed port":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"https://deploy:{password}@127.0.0.1:{port}/{path}"

    with pytest.raises(GitSourceError) as excinfo:
        GitSource(url, branch, tmp_path / "checkout", https_ca_bundle=ca).fetch()

    message = assert_error(excinfo, expected, "https://127.0.0.1:")
    everything = "".join(traceback.format_exception(excinfo.value)) + repr(excinfo.value.args)
    assert SECRET not in everything, message
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


def test_https_with_a_token_from_the_credential_helper_of_git_source_md(
    private_https_server: GitHttpServer,
    https_root: Path,
    https_upstream: Upstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/git-source.md's way: a user name in the URL, the token from a file through a
    `get`-only helper in git's system config; the token is stored nowhere by git."""
    page = (Path(__file__).parents[1] / "docs" / "git-source.md").read_text()
    setup = re.search(r"git config --system (credential\.\S+\.helper) \\\n\s+'([^']+)'", page)
    assert setup, "docs/git-source.md no longer shows the credential helper"
    token_file = tmp_path / "git-token"
    token_file.write_text(SECRET + "\n")
    server = private_https_server.url("")
    key = setup.group(1).replace("https://git.example.org", server.rstrip("/"))
    helper = setup.group(2).replace("/etc/gitops-agent/git-token", str(token_file))
    system_config = tmp_path / "gitconfig"
    run_git(tmp_path, "config", "--file", str(system_config), key, helper)
    monkeypatch.delenv("GIT_CONFIG_NOSYSTEM", raising=False)
    monkeypatch.setenv("GIT_CONFIG_SYSTEM", str(system_config))  # stands for /etc/gitconfig

    url = private_https_server.url(https_path(https_root, https_upstream), userinfo="deploy")
    without = GitSource(
        url, "main", tmp_path / "no-helper", https_ca_bundle=private_https_server.ca_bundle
    )
    with monkeypatch.context() as no_helper:
        no_helper.setenv("GIT_CONFIG_SYSTEM", os.devnull)
        with pytest.raises(GitSourceError, match="authentication refused"):
            without.fetch()
    checkout = tmp_path / "checkout"
    source = GitSource(url, "main", checkout, https_ca_bundle=private_https_server.ca_bundle)
    assert source.fetch() == https_upstream.head()
    stored = [p for p in checkout.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert stored == []


def test_a_local_repository_owned_by_another_user_is_fetched(
    upstream: Upstream, tmp_path: Path
) -> None:
    """docs/host-config.md's smallest example: `file:///srv/infra.git` owned by root, read by
    the service user. Git refuses a repository of another owner ("dubious ownership") unless
    it is trusted; the agent trusts exactly the one its host config names."""
    other = ensure_user()
    chown_tree(upstream.bare, other.pw_name)
    probe = subprocess.run(
        ["git", "ls-remote", f"file://{upstream.bare}"],
        env={k: v for k, v in GIT_ENV.items() if k != "GIT_CONFIG_GLOBAL"},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert "dubious ownership" in probe.stderr  # what the agent's git would meet without trust
    source = GitSource(f"file://{upstream.bare}", "main", tmp_path / "checkout")
    assert source.fetch() == upstream.head()
    # Only that repository is trusted (not `*`), in a file of the agent's own beside the clone.
    gitconfig = (tmp_path / "checkout.gitconfig").read_text()
    trusted = [ln.split("=", 1)[1].strip() for ln in gitconfig.splitlines() if "directory" in ln]
    assert trusted == [str(upstream.bare), f"{upstream.bare}/.git"]
    assert (tmp_path / "checkout.gitconfig").stat().st_mode & 0o077 == 0
