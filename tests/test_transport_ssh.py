"""SSHTransport against real OpenSSH servers (Debian's sshd on 127.0.0.1, see tests/support).

Each server logs in the plain user `gitops-test` (passwordless sudo through a drop-in in
/etc/sudoers.d/ for the module) and `gitops-nosudo` (no sudo rights). Nothing is mocked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from providers.errors import (
    AuthenticationError,
    HostKeyError,
    PrivilegeEscalationError,
    TransportError,
)
from providers.transport import SSHSettings, SSHTarget, SSHTransport
from providers.transport.hostkeys import KnownHosts
from tests.support.sshd import (
    SshServer,
    hash_known_hosts,
    key_fingerprint,
    make_client_key,
    passwordless_sudo,
    public_key,
    sudo_unavailable,
)

NOSUDO_USER = "gitops-nosudo"


@pytest.fixture(scope="module")
def server() -> Iterator[SshServer]:
    reason = SshServer.available()
    if reason:
        pytest.skip(reason)
    with SshServer() as running:
        yield running


@pytest.fixture(scope="module")
def client_key(server: SshServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = make_client_key(tmp_path_factory.mktemp("keys") / "id_ed25519")
    server.add_authorized_key(server.user, public_key(key))
    server.add_authorized_key(NOSUDO_USER, public_key(key))
    return key


@pytest.fixture(scope="module")
def sudoer(server: SshServer) -> Iterator[str]:
    reason = sudo_unavailable()
    if reason:
        pytest.skip(reason)
    with passwordless_sudo(server.user):
        yield server.user


@pytest.fixture
def known_hosts(server: SshServer, tmp_path: Path) -> Path:
    return server.write_known_hosts(tmp_path / "known_hosts")


def make(
    server: SshServer,
    key: Path,
    known_hosts: Path,
    *,
    user: str | None = None,
    trust_on_first_use: bool = False,
) -> SSHTransport:
    """A transport to `server` under the manifest name `web-1`."""
    target = SSHTarget("web-1", server.host, server.port, user or server.user)
    return SSHTransport(target, SSHSettings(key, known_hosts, trust_on_first_use))


# -- commands ------------------------------------------------------------------------------


def test_run_passes_stdin_and_gives_back_exit_code_and_both_streams(
    server: SshServer, client_key: Path, known_hosts: Path
) -> None:
    with make(server, client_key, known_hosts) as ssh:
        done = ssh.run(
            ["sh", "-c", "cat; echo oops >&2; exit 3"], stdin=b"hello\0world\n", timeout=10
        )
        assert (done.exit_code, done.stdout, done.stderr) == (3, b"hello\0world\n", b"oops\n")

        # argv is quoted: no word splitting or expansion by the remote shell.
        done = ssh.run(["printf", "%s|", "a b", "it's", "$HOME", "*"], timeout=10)
        assert done.stdout == b"a b|it's|$HOME|*|"
        assert ssh.run(["false"], timeout=10).exit_code == 1

        # No pty: stdin is not a terminal.
        done = ssh.run(["sh", "-c", "test -t 0 || echo no-tty"], timeout=10)
        assert done.stdout == b"no-tty\n"


def test_megabytes_of_stdin_and_output_on_both_streams_at_once(
    server: SshServer, client_key: Path, known_hosts: Path
) -> None:
    # `tee` echoes stdin to stdout and stderr while still reading it: several SSH windows
    # (2 MiB) in every direction at once, which deadlocks a transport that reads one
    # stream at a time or writes all of stdin before reading.
    data = os.urandom(6 * 1024 * 1024)
    with make(server, client_key, known_hosts) as ssh:
        started = time.monotonic()
        done = ssh.run(["sh", "-c", "tee /dev/stderr"], stdin=data, timeout=60)
        elapsed = time.monotonic() - started
    assert done.exit_code == 0, done.stderr[-500:]
    digest = hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(done.stdout).hexdigest() == digest
    assert hashlib.sha256(done.stderr).hexdigest() == digest
    assert elapsed < 30


def test_a_command_that_ignores_its_stdin_still_finishes(
    server: SshServer, client_key: Path, known_hosts: Path
) -> None:
    with make(server, client_key, known_hosts) as ssh:
        done = ssh.run(["echo", "done"], stdin=b"x" * (5 * 1024 * 1024), timeout=20)
    assert (done.exit_code, done.stdout) == (0, b"done\n")


def test_become_runs_the_command_as_root(
    server: SshServer, client_key: Path, known_hosts: Path, sudoer: str
) -> None:
    with make(server, client_key, known_hosts, user=sudoer) as ssh:
        assert ssh.run(["id", "-u"], timeout=10, become=True).stdout == b"0\n"
        assert ssh.run(["id", "-un"], timeout=10).stdout == f"{sudoer}\n".encode()
        # stdin reaches the command through sudo.
        done = ssh.run(["cat"], stdin=b"through sudo", timeout=10, become=True)
        assert done.stdout == b"through sudo"


def test_become_when_sudo_wants_a_password_is_a_clear_error(
    server: SshServer, client_key: Path, known_hosts: Path, sudoer: str
) -> None:
    ssh = make(server, client_key, known_hosts, user=NOSUDO_USER)
    with ssh, pytest.raises(PrivilegeEscalationError) as caught:
        ssh.run(["id", "-u"], timeout=10, become=True)
    message = str(caught.value)
    assert message.startswith("web-1: ")
    assert f"{NOSUDO_USER}@127.0.0.1:{server.port}" in message
    assert "password" in message and "NOPASSWD" in message
    assert caught.value.retryable is False


def test_command_timeout_closes_the_session_and_the_connection_stays_usable(
    server: SshServer, client_key: Path, known_hosts: Path
) -> None:
    with make(server, client_key, known_hosts) as ssh:
        started = time.monotonic()
        with pytest.raises(TransportError) as caught:
            ssh.run(["sleep", "30"], stdin=b"s3cret-token", timeout=0.5)
        elapsed = time.monotonic() - started
        assert 0.5 <= elapsed < 2.5
        assert caught.value.retryable is True
        assert "web-1: sleep did not finish within 0.5s" in str(caught.value)
        assert "s3cret-token" not in str(caught.value)

        assert ssh.run(["echo", "still here"], timeout=10).stdout == b"still here\n"


def test_round_trips_count_each_run(server: SshServer, client_key: Path, known_hosts: Path) -> None:
    ssh = make(server, client_key, known_hosts)
    ssh.connect()
    assert ssh.round_trips == 0
    for _ in range(3):
        ssh.run(["true"], timeout=10)
    with pytest.raises(TransportError):
        ssh.run(["sleep", "5"], timeout=0.2)
    assert ssh.round_trips == 4
    ssh.close()
    ssh.close()  # idempotent
    # A closed transport connects again on the next run.
    assert ssh.run(["echo", "again"], timeout=10).stdout == b"again\n"
    assert ssh.round_trips == 5
    ssh.close()


# -- host keys -----------------------------------------------------------------------------


def test_unknown_host_key_is_refused_before_anything_runs(
    server: SshServer, client_key: Path, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("# nothing known yet\n")
    marker = server.make_user_dir() / "ran"
    logins_before = server.log().count("Accepted publickey")

    ssh = make(server, client_key, known_hosts)
    with pytest.raises(HostKeyError) as caught:
        ssh.run(["touch", str(marker)], timeout=10)

    message = str(caught.value)
    assert message.startswith("web-1: ")
    assert f"127.0.0.1:{server.port}" in message
    assert f"ssh-ed25519 {server.host_key_fingerprint()}" in message
    assert str(known_hosts) in message
    assert caught.value.retryable is False
    # Nothing ran, and the client did not even log in.
    assert not marker.exists()
    assert server.log().count("Accepted publickey") == logins_before
    assert known_hosts.read_text() == "# nothing known yet\n"


def test_missing_known_hosts_refuses_and_says_so(
    server: SshServer, client_key: Path, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "nowhere" / "known_hosts"
    with pytest.raises(HostKeyError) as caught:
        make(server, client_key, known_hosts).connect()
    assert f"{known_hosts} (the file does not exist)" in str(caught.value)
    assert server.host_key_fingerprint() in str(caught.value)
    assert not known_hosts.exists()


def test_changed_host_key_is_refused_naming_both_fingerprints(
    server: SshServer, client_key: Path, tmp_path: Path
) -> None:
    with SshServer() as impostor:
        # known_hosts holds another server's key under this server's name.
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{server.port} {impostor.host_public_key()}\n")
        for tofu in (False, True):  # trust-on-first-use never accepts a changed key
            ssh = make(server, client_key, known_hosts, trust_on_first_use=tofu)
            with pytest.raises(HostKeyError) as caught:
                ssh.connect()
            message = str(caught.value)
            assert "CHANGED" in message
            assert impostor.host_key_fingerprint() in message  # the one known
            assert server.host_key_fingerprint() in message  # the one offered
            assert caught.value.retryable is False
        assert known_hosts.read_text().count("\n") == 1


def test_hashed_known_hosts_entries_are_matched(
    server: SshServer, client_key: Path, tmp_path: Path
) -> None:
    known_hosts = hash_known_hosts(server.write_known_hosts(tmp_path / "known_hosts"))
    assert known_hosts.read_text().startswith("|1|")
    assert "127.0.0.1" not in known_hosts.read_text()
    with make(server, client_key, known_hosts) as ssh:
        assert ssh.run(["echo", "ok"], timeout=10).stdout == b"ok\n"


def test_any_key_listed_for_the_host_is_accepted_and_bad_lines_are_skipped(
    server: SshServer, client_key: Path, tmp_path: Path
) -> None:
    with SshServer() as other:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(
            "# during a key rotation both keys are listed\n"
            f"[127.0.0.1]:{server.port} {other.host_public_key()}\n"
            "this line is not a host key\n"
            f"[127.0.0.1]:{server.port},web-1.example {server.host_public_key()} comment\n"
        )
    with make(server, client_key, known_hosts) as ssh:
        assert ssh.run(["echo", "ok"], timeout=10).stdout == b"ok\n"


def test_known_hosts_is_read_once_until_it_changes(
    server: SshServer, client_key: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"this line is not a host key\n{server.known_hosts_line()}\n")
    caplog.set_level(logging.WARNING, logger="providers.transport.ssh")
    for _ in range(3):  # a pass: many connections, one read (one warning for the bad line)
        with make(server, client_key, known_hosts) as ssh:
            assert ssh.run(["true"], timeout=10).exit_code == 0
    assert caplog.text.count("line 1 is not a host key entry") == 1
    with SshServer() as impostor:  # the file changes: the next connection sees the change
        known_hosts.write_text(f"[127.0.0.1]:{server.port} {impostor.host_public_key()}\n")
        with pytest.raises(HostKeyError, match="CHANGED"):
            make(server, client_key, known_hosts).connect()


def test_a_big_known_hosts_finds_plain_and_hashed_entries_by_host_and_port(
    server: SshServer, client_key: Path, tmp_path: Path
) -> None:
    # 1,000 other hosts, half of them hashed; the server is listed last, hashed.
    others = tmp_path / "others"
    others.write_text(
        "".join(
            f"[10.0.{i // 250}.{i % 250}]:{2200 + i} {server.host_public_key()}\n"
            for i in range(1000)
        )
    )
    hashed = hash_known_hosts(others).read_text().splitlines()
    plain = [line.split(" ", 1)[1] for line in hashed[:500]]
    lines = [f"[10.0.{i // 250}.{i % 250}]:{2200 + i} {key}" for i, key in enumerate(plain)]
    known_hosts = hash_known_hosts(server.write_known_hosts(tmp_path / "known_hosts"))
    known_hosts.write_text("\n".join([*lines, *hashed[500:], known_hosts.read_text()]))
    with make(server, client_key, known_hosts) as ssh:
        assert ssh.run(["echo", "ok"], timeout=10).stdout == b"ok\n"
    index = KnownHosts.cached(known_hosts, "web-1")
    assert len(index.keys_for("[10.0.0.7]:2207")) == 1  # plain
    assert len(index.keys_for("[10.0.3.249]:3199")) == 1  # hashed
    assert index.keys_for("[10.0.0.7]:2208") == []  # the same address on another port
    assert index.keys_for("10.0.0.7") == []


def test_a_known_rsa_host_key_is_asked_for_when_the_host_has_several(
    client_key: Path, tmp_path: Path
) -> None:
    # The host has ed25519 and rsa keys; known_hosts lists only the rsa one. The client must
    # ask for rsa (as OpenSSH does) instead of reporting a changed key.
    rsa_host_key = tmp_path / "ssh_host_rsa_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa_host_key)],
        check=True,
        timeout=60,
    )
    with SshServer(extra_config=f"HostKey {rsa_host_key}\n") as both:
        both.add_authorized_key(both.user, public_key(client_key))
        rsa_line = " ".join(public_key(rsa_host_key).split()[:2])
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{both.port} {rsa_line}\n")
        target = SSHTarget("web-1", both.host, both.port, both.user)
        with SSHTransport(target, SSHSettings(client_key, known_hosts)) as ssh:
            assert ssh.run(["echo", "ok"], timeout=10).stdout == b"ok\n"


@pytest.mark.parametrize(("kind", "bits"), [("rsa", "2048"), ("ecdsa", "256")])
def test_rsa_and_ecdsa_client_keys_log_in(
    kind: str, bits: str, server: SshServer, known_hosts: Path, tmp_path: Path
) -> None:
    key = tmp_path / f"id_{kind}"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-b", bits, "-N", "", "-f", str(key)],
        check=True,
        timeout=60,
    )
    server.add_authorized_key(server.user, public_key(key))
    with make(server, key, known_hosts) as ssh:
        assert ssh.run(["echo", kind], timeout=10).stdout == f"{kind}\n".encode()


def test_revoked_host_key_is_refused(server: SshServer, client_key: Path, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"{server.known_hosts_line()}\n@revoked * {server.host_public_key()}\n")
    with pytest.raises(HostKeyError, match="@revoked"):
        make(server, client_key, known_hosts).connect()


def test_trust_on_first_use_records_the_key_then_it_is_known(
    server: SshServer, client_key: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    known_hosts = tmp_path / "known_hosts"
    other = (
        "[192.0.2.7]:2200 ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIPjMzMp46mP7+W6CAHKcTKk05K6WAFKCbeFYrCwltRp5"
    )
    known_hosts.write_text(other + "\n")
    known_hosts.chmod(0o644)

    ssh = make(server, client_key, known_hosts, trust_on_first_use=True)
    with caplog.at_level(logging.WARNING, logger="providers.transport.ssh"), ssh:
        assert ssh.run(["echo", "ok"], timeout=10).stdout == b"ok\n"
    assert any(
        "first use" in r.getMessage() and server.host_key_fingerprint() in r.getMessage()
        for r in caplog.records
    )

    lines = known_hosts.read_text().splitlines()
    assert lines == [other, server.known_hosts_line()]
    assert known_hosts.stat().st_mode & 0o777 == 0o644
    # OpenSSH itself reads the entry back.
    found = subprocess.run(
        ["ssh-keygen", "-F", f"[127.0.0.1]:{server.port}", "-f", str(known_hosts)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert found.returncode == 0, found.stderr
    assert key_fingerprint(server.host_public_key()) == server.host_key_fingerprint()

    # From now on the key is known: accepted without trust-on-first-use.
    with make(server, client_key, known_hosts) as ssh:
        assert ssh.run(["echo", "again"], timeout=10).stdout == b"again\n"
    assert len(known_hosts.read_text().splitlines()) == 2


def test_trust_on_first_use_creates_a_missing_known_hosts(
    server: SshServer, client_key: Path, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "new" / "known_hosts"
    with make(server, client_key, known_hosts, trust_on_first_use=True) as ssh:
        ssh.run(["true"], timeout=10)
    assert known_hosts.read_text() == server.known_hosts_line() + "\n"


def test_trust_on_first_use_from_parallel_connections_records_the_key_once(
    server: SshServer, client_key: Path, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    results: list[bytes] = []

    def one() -> None:
        with make(server, client_key, known_hosts, trust_on_first_use=True) as ssh:
            results.append(ssh.run(["echo", "ok"], timeout=10).stdout)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [b"ok\n"] * 4
    assert known_hosts.read_text() == server.known_hosts_line() + "\n"


# -- login -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["key not authorized", "no such user"])
def test_refused_login_names_user_and_host(
    case: str, server: SshServer, client_key: Path, known_hosts: Path, tmp_path: Path
) -> None:
    if case == "key not authorized":
        key, user = make_client_key(tmp_path / "stranger"), server.user
    else:
        key, user = client_key, "nobody-here"
    ssh = make(server, key, known_hosts, user=user)
    with pytest.raises(AuthenticationError) as caught:
        ssh.connect()
    message = str(caught.value)
    assert message.startswith("web-1: ")
    assert f"{user}@127.0.0.1:{server.port}" in message
    assert str(key) in message
    assert caught.value.retryable is False


def test_key_file_problems_name_the_file(
    server: SshServer, known_hosts: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing_key"
    with pytest.raises(AuthenticationError, match=f"{missing} does not exist"):
        make(server, missing, known_hosts).connect()

    locked = tmp_path / "locked_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "hunter22-secret", "-f", str(locked)],
        check=True,
        timeout=30,
    )
    with pytest.raises(AuthenticationError, match="passphrase") as caught:
        make(server, locked, known_hosts).connect()
    assert "hunter22" not in str(caught.value)


# -- reaching the host -----------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_closed_port_fails_at_once_and_is_retryable(client_key: Path, tmp_path: Path) -> None:
    port = _closed_port()
    target = SSHTarget("web-1", "127.0.0.1", port, "gitops-test")
    settings = SSHSettings(client_key, tmp_path / "known_hosts", connect_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        SSHTransport(target, settings).connect()
    assert time.monotonic() - started < 2.0
    assert f"web-1: cannot connect to 127.0.0.1:{port}" in str(caught.value)
    assert caught.value.retryable is True


def test_a_host_that_never_speaks_ssh_times_out_within_connect_timeout(
    client_key: Path, tmp_path: Path
) -> None:
    # Accepts TCP (the kernel's backlog) but never sends a banner: a hung sshd.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        target = SSHTarget("web-1", "127.0.0.1", port, "gitops-test")
        settings = SSHSettings(client_key, tmp_path / "known_hosts", connect_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(TransportError) as caught:
            SSHTransport(target, settings).connect()
        elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 1.5
    assert "did not answer within 0.5s" in str(caught.value)
    assert caught.value.retryable is True


@pytest.mark.parametrize("handshakes", [1, 2])
def test_a_hung_host_waiting_in_its_handshake_does_not_hold_the_others(
    server: SshServer, client_key: Path, known_hosts: Path, handshakes: int
) -> None:
    # Handshakes take turns (`handshakes` at once); a hung host's turn ends with its own
    # connect_timeout, and a host waiting for a turn is not timed out by the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        hung_target = SSHTarget("hung", "127.0.0.1", silent.getsockname()[1], server.user)
        hung_settings = SSHSettings(
            client_key, known_hosts, connect_timeout=3, handshakes=handshakes
        )
        failed: list[Exception] = []

        def hang() -> None:
            try:
                SSHTransport(hung_target, hung_settings).connect()
            except TransportError as exc:
                failed.append(exc)

        hung = threading.Thread(target=hang)
        hung.start()
        time.sleep(0.3)  # let the hung host take its turn first
        settings = SSHSettings(client_key, known_hosts, connect_timeout=2, handshakes=handshakes)
        target = SSHTarget("web-1", server.host, server.port, server.user)
        with SSHTransport(target, settings) as ssh:
            assert ssh.run(["echo", "ok"], timeout=10).stdout == b"ok\n"
            # With a second turn free the host did not wait for the hung one at all.
            assert hung.is_alive() is (handshakes == 2)
        hung.join(timeout=10)
    assert len(failed) == 1 and "did not answer within 3s" in str(failed[0])


def _tcp_ports_of_this_process() -> set[int]:
    """Local ports of the TCP sockets this process holds (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    ports = set()
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_jump_host_carries_the_connection(
    server: SshServer, client_key: Path, tmp_path: Path
) -> None:
    with SshServer() as bastion:
        bastion.add_authorized_key(bastion.user, public_key(client_key))
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(f"{server.known_hosts_line()}\n{bastion.known_hosts_line()}\n")
        jump = SSHTarget("bastion", bastion.host, bastion.port, bastion.user)
        target = SSHTarget("web-1", server.host, server.port, server.user)

        with SSHTransport(target, SSHSettings(client_key, known_hosts, jump=jump)) as ssh:
            done = ssh.run(["sh", "-c", 'echo "$SSH_CONNECTION"'], timeout=10)
            ours = _tcp_ports_of_this_process()
        _, client_port, _, server_port = done.stdout.decode().split()
        assert int(server_port) == server.port
        # The target saw a connection this process does not own: the bastion's sshd made it.
        assert int(client_port) not in ours
        assert f"Accepted publickey for {bastion.user}" in bastion.log()

        # The jump host's key is checked against the same known_hosts.
        known_hosts.write_text(server.known_hosts_line() + "\n")
        with pytest.raises(HostKeyError) as caught:
            SSHTransport(target, SSHSettings(client_key, known_hosts, jump=jump)).connect()
        assert f"jump host bastion (127.0.0.1:{bastion.port})" in str(caught.value)
        assert bastion.host_key_fingerprint() in str(caught.value)


def test_jump_host_that_cannot_reach_the_target_is_retryable(
    server: SshServer, client_key: Path, tmp_path: Path
) -> None:
    port = _closed_port()
    known_hosts = server.write_known_hosts(tmp_path / "known_hosts")
    jump = SSHTarget("bastion", server.host, server.port, server.user)
    target = SSHTarget("web-1", "127.0.0.1", port, "gitops-test")
    settings = replace(SSHSettings(client_key, known_hosts), jump=jump, connect_timeout=5.0)
    with pytest.raises(TransportError) as caught:
        SSHTransport(target, settings).connect()
    assert f"jump host bastion (127.0.0.1:{server.port}) cannot connect to 127.0.0.1:{port}" in (
        str(caught.value)
    )
    assert caught.value.retryable is True
