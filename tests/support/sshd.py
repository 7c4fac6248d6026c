"""A throwaway OpenSSH server for tests: Debian's `sshd` on 127.0.0.1 and a free port.

    with SshServer() as server:
        key = make_client_key(tmp_path / "id_ed25519")
        server.add_authorized_key(server.user, key.with_suffix(".pub").read_text())
        server.write_known_hosts(tmp_path / "known_hosts")
        # ssh -p server.port -i key -o UserKnownHostsFile=... gitops-test@127.0.0.1

The server has its own host key, config, authorized keys and pid file in a temp dir that
is removed when it stops. It logs in plain (non-root) users only: root's shell rc is slow
on these machines. `ensure_user` makes the default test user if it is missing (root only).
It stops by signalling its own PID and nothing else.

Needs Debian's `openssh-server` (`/usr/sbin/sshd`) and `ssh-keygen`; `SshServer.available()`
says why not when it cannot run, so fixtures can skip with a reason.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.service import TestService

SSHD = Path("/usr/sbin/sshd")
DEFAULT_USER = "gitops-test"
START_TIMEOUT = 5.0  # seconds until the port must answer with an SSH banner
STOP_TIMEOUT = 5.0


def ensure_user(name: str = DEFAULT_USER) -> pwd.struct_passwd:
    """A plain login user `name` with /bin/sh as shell, created if missing (idempotent).

    `useradd` leaves the account locked ("!" as password), and with `UsePAM no` sshd refuses
    locked accounts even for key logins: `usermod -p '*'` unlocks it without a password.
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", name],
            check=True,
            capture_output=True,
            timeout=30,
        )
        entry = pwd.getpwnam(name)
    if _shadow_password(name) != "*":
        subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True, timeout=30)
    return entry


def _shadow_password(name: str) -> str | None:
    try:
        for line in Path("/etc/shadow").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return fields[1]
    except OSError:
        return None
    return None


def make_client_key(path: Path, comment: str = "gitops-test") -> Path:
    """A new passphrase-less ed25519 key at `path` (public key at `path.pub`); returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for existing in (path, path.with_name(path.name + ".pub")):
        existing.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


def public_key(path: Path) -> str:
    """The one-line public key of the private key at `path`."""
    return path.with_name(path.name + ".pub").read_text().strip()


def chown_tree(path: Path, user: str) -> None:
    """Give `path` and everything under it to `user` (so sshd sessions as `user` can use it)."""
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def hash_known_hosts(path: Path) -> Path:
    """Hash every host name in known_hosts `path` in place (`|1|salt|hash`), as OpenSSH's
    `ssh-keygen -H` does with `HashKnownHosts yes`; returns `path`.
    """
    subprocess.run(
        ["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True, timeout=30
    )
    path.with_name(path.name + ".old").unlink(missing_ok=True)  # ssh-keygen's backup
    return path


def key_fingerprint(public_key_line: str) -> str:
    """`SHA256:...` of a one-line public key, as OpenSSH's `ssh-keygen -l` computes it."""
    done = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", "-"],
        input=public_key_line.encode(),
        check=True,
        capture_output=True,
        timeout=30,
    )
    return done.stdout.decode().split()[1]


def sudo_unavailable() -> str | None:
    """None if `sudo` and /etc/sudoers.d can be used for tests, else why not (for pytest.skip)."""
    if shutil.which("sudo") is None or shutil.which("visudo") is None:
        return "sudo is missing: apt-get install -y sudo"
    if os.geteuid() != 0:
        return "granting sudo to a test user needs root"
    return None


@contextlib.contextmanager
def passwordless_sudo(user: str) -> Iterator[Path]:
    """`USER ALL=(ALL) NOPASSWD: ALL` in a file of /etc/sudoers.d/ while the block runs.

    The file is checked with `visudo -c` before it is put in place (a broken sudoers file
    would lock sudo for everyone) and removed afterwards.
    """
    ensure_user(user)
    drop_in = Path("/etc/sudoers.d") / f"gitops-test-{user.replace('.', '_')}"
    drop_in.parent.mkdir(mode=0o750, exist_ok=True)
    staged = drop_in.parent / f".{drop_in.name}.tmp"  # sudo skips names with a dot
    staged.write_text(f"{user} ALL=(ALL) NOPASSWD: ALL\n")
    staged.chmod(0o440)
    try:
        subprocess.run(["visudo", "-c", "-q", "-f", str(staged)], check=True, timeout=30)
        staged.rename(drop_in)
        yield drop_in
    finally:
        staged.unlink(missing_ok=True)
        drop_in.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SshServer(TestService):
    """OpenSSH `sshd -D -e` on 127.0.0.1 with a generated host key, as a context manager."""

    host = "127.0.0.1"

    def __init__(self, user: str = DEFAULT_USER, *, extra_config: str = "") -> None:
        self.user = user
        self.extra_config = extra_config
        self.port = 0
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str | None:
        """None if a server can run here, else the reason it cannot (for pytest.skip)."""
        if not SSHD.exists():
            return f"{SSHD} is missing: apt-get install -y openssh-server"
        if shutil.which("ssh-keygen") is None or shutil.which("ssh") is None:
            return "ssh / ssh-keygen are missing: apt-get install -y openssh-client"
        if os.geteuid() != 0:
            return "sshd for tests needs root (it switches to the test user)"
        return None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        reason = self.available()
        if reason:
            raise RuntimeError(reason)
        ensure_user(self.user)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation dir
        # Readable by the test user: sshd opens authorized keys with the user's uid.
        self.dir = Path(tempfile.mkdtemp(prefix="sshd-"))
        self.dir.chmod(0o755)
        (self.dir / "authorized_keys").mkdir(mode=0o755)
        host_key = self.dir / "ssh_host_ed25519_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test-sshd", "-f", str(host_key)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        # Another process may take the free port between probe and bind: try a few.
        last_error = ""
        for _ in range(3):
            self.port = _free_port()
            self._write_config(host_key)
            self._spawn()
            last_error = self._wait_ready()
            if not last_error:
                return
            self._terminate()
        self.stop()
        raise RuntimeError(f"sshd did not start: {last_error}")

    def stop(self) -> None:
        self._terminate()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _write_config(self, host_key: Path) -> None:
        assert self.dir is not None
        config = f"""\
ListenAddress {self.host}
Port {self.port}
HostKey {host_key}
PidFile {self.dir / "sshd.pid"}
AuthorizedKeysFile {self.dir / "authorized_keys"}/%u
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
PrintMotd no
PrintLastLog no
X11Forwarding no
UseDNS no
MaxStartups 100
MaxSessions 100
LogLevel VERBOSE
Subsystem sftp internal-sftp
{self.extra_config}
"""
        (self.dir / "sshd_config").write_text(config)

    def _spawn(self) -> None:
        assert self.dir is not None
        with open(self.dir / "sshd.log", "ab") as log:
            self._proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self.dir / "sshd_config")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def _wait_ready(self) -> str:
        """'' once the port answers with an SSH banner; else what went wrong."""
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return f"sshd exited with {self._proc.returncode}: {self.log()[-2000:]}"
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                    if sock.recv(64).startswith(b"SSH-"):
                        return ""
            except OSError:
                pass
            time.sleep(0.02)
        return f"port {self.port} did not answer within {START_TIMEOUT} s: {self.log()[-2000:]}"

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # our own PID only
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    # -- keys ----------------------------------------------------------------------------

    def add_authorized_key(self, user: str, public_key_line: str) -> None:
        """Let `user` log in with `public_key_line` (made with `ensure_user` if missing)."""
        assert self.dir is not None, "server not started"
        entry = ensure_user(user)
        path = self.dir / "authorized_keys" / user
        with open(path, "a") as fh:
            fh.write(public_key_line.strip() + "\n")
        os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o600)

    def host_public_key(self) -> str:
        """'ssh-ed25519 AAAA...' (type and key, no comment)."""
        assert self.dir is not None, "server not started"
        fields = (self.dir / "ssh_host_ed25519_key.pub").read_text().split()
        return f"{fields[0]} {fields[1]}"

    def host_key_fingerprint(self) -> str:
        """`SHA256:...` of the server's host key, as `ssh-keygen -l` prints it."""
        return key_fingerprint(self.host_public_key())

    def known_hosts_line(self) -> str:
        """The line a client's known_hosts needs: `[127.0.0.1]:PORT ssh-ed25519 AAAA...`."""
        return f"[{self.host}]:{self.port} {self.host_public_key()}"

    def write_known_hosts(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.known_hosts_line() + "\n")
        return path

    def make_user_dir(self, user: str | None = None) -> Path:
        """An empty dir inside the server's temp dir, owned by `user` (default: `self.user`).

        pytest's tmp dirs sit under 0700 root-owned parents that a plain user cannot reach;
        put what the user's sessions must read or write (a bare repo) here instead. Removed
        with the server.
        """
        assert self.dir is not None, "server not started"
        user = user or self.user
        entry = ensure_user(user)
        path = Path(tempfile.mkdtemp(prefix=f"{user}-", dir=self.dir))
        os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o755)
        return path

    def ssh_url(self, path: str | Path, user: str | None = None) -> str:
        """`ssh://USER@127.0.0.1:PORT/PATH` for `path` on this server."""
        return f"ssh://{user or self.user}@{self.host}:{self.port}/{str(path).lstrip('/')}"

    def log(self) -> str:
        """What sshd wrote so far (useful in assertion messages)."""
        if self.dir is None:
            return ""
        try:
            return (self.dir / "sshd.log").read_text(errors="replace")
        except OSError:
            return ""
