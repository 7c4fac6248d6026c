"""Real Debian test hosts booted with systemd-nspawn: systemd as PID 1, apt/dpkg, sshd, sudo.

    with NspawnHost(apt_repo=build_test_repo(tmp / "repo")) as host:
        # ssh -p host.port -i host.key_file -o UserKnownHostsFile=host.known_hosts deploy@127.0.0.1
        host.run("systemctl is-system-running")     # as root inside, through nsenter

    with nspawn_hosts(3) as hosts:                  # booted in parallel, one shared client key
        ...

    nspawn_hosts = nspawn_hosts_fixture(2)          # in a conftest: a session-scoped fixture

Each host is the cached root of `tests.support.rootfs` under an overlay mount (or, where
overlayfs is not available, an unpacked copy of the tar) in a temp dir, with its own hostname,
machine id, SSH host key, and an sshd drop-in that listens on 127.0.0.1 and a free port. Hosts
share the machine's network, so a service inside that listens on a fixed port collides with
the same service in another host: test services listen on port 0. A plain user (`deploy`)
with passwordless sudo and root both log in with the client key.

It boots the way shared/toolchain.md measured on this kind of machine: PID 1 is not systemd,
so `systemd-nspawn --register=no --keep-unit -b`, started in cgroups of its own that are removed
after it stops. Exit status 133 (the container rebooted) starts it again. Stopping sends SIGTERM
to the nspawn process this object started (a second one if the halt hangs; SIGKILL to it and
the container's init, both its own, as a last resort) and removes the cgroups, nspawn's
propagate directory, the overlay mount and the temp dir. Every wait is bounded; a failed boot
raises `NspawnError` with the host's failed units and journal (when it got that far) and the
end of its console output.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support import aptrepo, rootfs
from tests.support.service import TestService

NSPAWN = "systemd-nspawn"
CGROUP_BASE = Path("/sys/fs/cgroup")
PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")
DEFAULT_USER = "deploy"
BOOT_TIMEOUT = 60.0  # seconds from launch until sshd answers; measured 0.4-0.9 s
STOP_TIMEOUT = 15.0  # for a clean halt after SIGTERM; measured 0.3-0.8 s
RUN_TIMEOUT = 120.0
CONSOLE_TAIL = 40  # lines of console output in a boot error
EXIT_REBOOT = 133  # nspawn's exit status when the container asked to reboot
MAX_REBOOTS = 20  # a container that keeps rebooting is broken; stop restarting it
# The environment of commands run inside through nsenter (nothing of the test process leaks).
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The first console line of a shutdown: what follows it is our halt, not the boot's trouble.
_SHUTDOWN = re.compile(r"^\s*(Stopping |\[\s*OK\s*\] (Stopped|Removed slice|Unmounted) )")


class NspawnError(RuntimeError):
    """A test host could not be prepared, booted, reached or stopped; names the host."""


# -- ports and names handed out by this process ---------------------------------------------

_taken_ports: set[int] = set()
_taken_lock = threading.Lock()


def _free_port() -> int:
    """A port free on 127.0.0.1 now and not handed to another host of this process."""
    with _taken_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in _taken_ports:
                _taken_ports.add(port)
                return port
    raise NspawnError("no free port on 127.0.0.1 after 50 tries")


def _cgroup_roots() -> list[Path]:
    """The cgroup hierarchies a host gets a directory in: the v2 root, or hybrid's two."""
    if (CGROUP_BASE / "cgroup.controllers").exists():  # pure cgroup v2
        return [CGROUP_BASE]
    return [p for p in (CGROUP_BASE / "systemd", CGROUP_BASE / "unified") if p.is_dir()]


def _new_name() -> str:
    while True:
        name = f"gt-{secrets.token_hex(4)}"
        if not any((root / name).exists() for root in _cgroup_roots()):
            return name


def make_client_key(path: Path) -> Path:
    """A new passphrase-less ed25519 key at `path` (public key beside it); returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _run_host(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gitops-test", "-f", str(path)],
        f"making the client key {path}",
    )
    return path


def _run_host(argv: list[str], what: str, timeout: float = 60.0) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NspawnError(f"{what}: took over {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise NspawnError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()}")


class NspawnHost(TestService):
    """One booted Debian host, reachable over SSH at `address`:`port`; a context manager."""

    address = "127.0.0.1"

    def __init__(
        self,
        name: str | None = None,
        *,
        user: str = DEFAULT_USER,
        key_file: Path | None = None,
        apt_repo: Path | None = None,
        tar: Path | None = None,
        overlay: bool = True,
        boot_timeout: float = BOOT_TIMEOUT,
    ) -> None:
        """`key_file`: the client key to authorize (made in the temp dir if None);
        `apt_repo`: a directory from `aptrepo.write_repo`, bound read-only at /srv/localrepo
        and the only apt source inside; `tar`: the cached root (default: `rootfs.rootfs_tar()`);
        `overlay`: mount the unpacked cache read-only under a writable layer instead of
        unpacking the tar (falls back to unpacking when overlayfs is refused)."""
        self.name = name or _new_name()
        self.user = user
        self.port = 0
        self.apt_repo = apt_repo
        self.boot_timeout = boot_timeout
        self.timings: dict[str, float] = {}  # prepare, boot (launch to sshd banner), apt_update
        self.reboots = 0
        self._tar = tar
        self._overlay = overlay
        self._given_key = key_file
        self._dir: Path | None = None
        self._mounted = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._supervisor: threading.Thread | None = None
        self._exit_status: int | None = None

    # -- what tests use ------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The host's root directory as seen from outside (for assertions on its files)."""
        return self._require_dir() / "root"

    @property
    def key_file(self) -> Path:
        """The private key authorized for `user` and root."""
        return self._given_key or self._require_dir() / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        """A known_hosts file with this host's key as `[127.0.0.1]:PORT ssh-ed25519 ...`."""
        return self._require_dir() / "known_hosts"

    @property
    def console_log(self) -> Path:
        return self._require_dir() / "console.log"

    def console_tail(self, lines: int = CONSOLE_TAIL, *, boot_only: bool = False) -> str:
        """The last `lines` of the console output (no colours, no blank lines); with
        `boot_only`, of what came before the container started to shut down."""
        try:
            text = self.console_log.read_text(errors="replace")
        except (OSError, NspawnError):
            return ""
        kept = [line.rstrip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
        if boot_only:
            stop = next((i for i, line in enumerate(kept) if _SHUTDOWN.search(line)), len(kept))
            kept = kept[:stop]
        return "\n".join(kept[-lines:])

    @property
    def nspawn_pid(self) -> int | None:
        """The PID of the systemd-nspawn process this object started (None when stopped)."""
        proc = self._proc
        return proc.pid if proc is not None else None

    def leader_pid(self) -> int:
        """The PID (in this machine's namespace) of the container's systemd."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise NspawnError(f"test host {self.name} is not running")
        children = _children(proc.pid)
        if not children:
            raise NspawnError(f"test host {self.name}: nspawn ({proc.pid}) has no container yet")
        return children[0]

    def run(
        self,
        command: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = RUN_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` (a shell string, or an argv) as root inside the host, via nsenter.

        For test set-up and assertions from outside; the agent itself goes through SSH. With
        `check`, a non-zero exit raises `NspawnError` with the command's output.
        """
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        full = ["nsenter", f"--target={self.leader_pid()}", "--all", "--root", "--wd", *argv]
        shown = command if isinstance(command, str) else shlex.join(command)
        try:
            proc = subprocess.run(
                full, input=input, capture_output=True, text=True, timeout=timeout,
                env=INSIDE_ENV,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise NspawnError(f"{self.name}: `{shown}` took over {timeout:.0f} s") from None
        if check and proc.returncode != 0:
            raise NspawnError(
                f"{self.name}: `{shown}` exited {proc.returncode}\n"
                f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
            )
        return proc

    def ssh_argv(self, user: str | None = None) -> list[str]:
        """OpenSSH client arguments that log in here as `user` (default `self.user`)."""
        return [
            "ssh", "-F", "/dev/null", "-p", str(self.port), "-i", str(self.key_file),
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            f"{user or self.user}@{self.address}",
        ]  # fmt: skip

    # -- availability --------------------------------------------------------------------

    @staticmethod
    def available(tar: Path | None = None) -> str | None:
        """None if hosts can boot here, else why not (for a skip with a reason)."""
        if os.geteuid() != 0:
            return "nspawn test hosts need root (mounts, cgroups, systemd-nspawn)"
        if shutil.which(NSPAWN) is None:
            return f"{NSPAWN} is missing: apt-get install -y systemd-container"
        needed = ("nsenter", "ssh-keygen", "useradd", "tar", "dpkg-scanpackages")
        missing = [tool for tool in needed if shutil.which(tool) is None]
        if missing:
            return f"missing {', '.join(missing)}: apt-get install -y openssh-client dpkg-dev"
        cached = rootfs.is_current(tar or rootfs.rootfs_tar())
        if not cached and shutil.which("debootstrap") is None:
            return "debootstrap is missing (it builds the test root): apt-get install debootstrap"
        roots = _cgroup_roots()
        if not roots:
            return f"no cgroup hierarchy for containers under {CGROUP_BASE}"
        unwritable = [str(r) for r in roots if not os.access(r, os.W_OK)]
        if unwritable:
            return f"cannot make cgroups in {', '.join(unwritable)} (read-only cgroup mount?)"
        return None  # fmt: skip

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Prepare the root, boot it and wait until sshd answers (and apt knows the repo)."""
        reason = self.available(self._tar)
        if reason:
            raise NspawnError(f"cannot boot test host {self.name}: {reason}")
        sweep_leftovers_once()
        try:
            started = time.monotonic()
            self._dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{self.name}-"))
            (self._dir / "owner").write_text(_process_id(os.getpid()))
            self._make_root()
            self._prepare_root()
            self.timings["prepare"] = time.monotonic() - started
            launched = time.monotonic()
            self._proc = self._launch()
            self._wait_for_sshd()
            self.timings["boot"] = time.monotonic() - launched
            self._supervisor = threading.Thread(
                target=self._supervise, name=f"nspawn-{self.name}", daemon=True
            )
            self._supervisor.start()
            if self.apt_repo is not None:
                began = time.monotonic()
                self.run("apt-get update -qq")
                self.timings["apt_update"] = time.monotonic() - began
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Shut the host down (bounded) and remove everything it left on this machine."""
        with self._lock:
            self._stopping = True
            proc = self._proc
        if proc is not None:
            self._halt(proc)
        if self._supervisor is not None:
            self._supervisor.join(timeout=STOP_TIMEOUT)
            self._supervisor = None
        self._clean_up()

    def _clean_up(self) -> None:
        """Remove the cgroups, propagate dir, mount and temp dir of a host that is down."""
        self._remove_cgroups()
        propagate = PROPAGATE_DIR / self.name
        if propagate.is_dir() and not os.path.ismount(propagate):
            shutil.rmtree(propagate, ignore_errors=True)
        if self._dir is not None:
            if self._unmount_root():
                try:
                    rootfs.remove_tree(self._dir)
                except rootfs.RootfsError as exc:
                    warnings.warn(f"{self.name}: {exc}", stacklevel=2)
            self._dir = None

    # -- the root ------------------------------------------------------------------------

    def _require_dir(self) -> Path:
        if self._dir is None:
            raise NspawnError(f"test host {self.name} is not started")
        return self._dir

    def _make_root(self) -> None:
        root = self.root
        root.mkdir()
        if self._overlay:
            lower = rootfs.ensure_lower_dir(self._tar)
            upper, work = self._require_dir() / "upper", self._require_dir() / "work"
            upper.mkdir()
            work.mkdir()
            options = f"lowerdir={lower},upperdir={upper},workdir={work}"
            proc = subprocess.run(
                ["mount", "-t", "overlay", "overlay", "-o", options, str(root)],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            if proc.returncode == 0:
                self._mounted = True
                return
            # e.g. the temp dir is itself on overlayfs: unpacking works everywhere.
            warnings.warn(
                f"{self.name}: overlay mount refused ({proc.stderr.strip()}); unpacking the tar",
                stacklevel=2,
            )
        tar = rootfs.ensure_rootfs(self._tar)
        _run_host(
            ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(tar),
             "-C", str(root)],
            f"unpacking {tar} for test host {self.name}",
        )  # fmt: skip

    def _prepare_root(self) -> None:
        """Identity, sshd, users and apt sources: everything that differs between hosts."""
        root, name = self.root, self.name
        (root / "etc/hostname").write_text(name + "\n")
        with open(root / "etc/hosts", "a") as hosts:
            hosts.write(f"127.0.1.1 {name}\n")  # sudo wants to resolve its own name
        (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        host_key = root / "etc/ssh/ssh_host_ed25519_key"
        _run_host(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}",
             "-f", str(host_key)],
            f"making the SSH host key of {name}",
        )  # fmt: skip
        self.port = _free_port()
        (root / "etc/ssh/sshd_config.d/gitops-test.conf").write_text(
            f"# test host {name}: on the machine's network, so loopback and a port of its own\n"
            f"Port {self.port}\n"
            f"ListenAddress {self.address}\n"
            "HostKey /etc/ssh/ssh_host_ed25519_key\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UseDNS no\n"
            "MaxStartups 100\n"
            "MaxSessions 100\n"
        )
        fields = (host_key.with_name(host_key.name + ".pub")).read_text().split()
        self.known_hosts.write_text(f"[{self.address}]:{self.port} {fields[0]} {fields[1]}\n")
        if self._given_key is None:
            make_client_key(self.key_file)
        public = self.key_file.with_name(self.key_file.name + ".pub").read_text().strip()
        # useradd leaves the account locked; '*' unlocks it for key logins, no password.
        _run_host(
            ["useradd", "--root", str(root), "--create-home", "--shell", "/bin/bash",
             "--password", "*", self.user],
            f"adding user {self.user} to test host {name}",
        )  # fmt: skip
        sudoers = root / "etc/sudoers.d" / self.user
        sudoers.write_text(f"{self.user} ALL=(ALL) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)
        uid, gid = _ids_in(root, self.user)
        _authorize(root / "home" / self.user / ".ssh", public, uid, gid)
        _authorize(root / "root/.ssh", public, 0, 0)
        aptrepo.configure_root(root, self.apt_repo)

    def _unmount_root(self) -> bool:
        """True once nothing is mounted on the root (so removing the temp dir is safe)."""
        if not self._mounted:
            return True
        root = self.root
        for argv in (["umount", str(root)], ["umount", "--lazy", str(root)]):
            subprocess.run(argv, capture_output=True, timeout=30)
            if not os.path.ismount(root):
                self._mounted = False
                return True
        warnings.warn(f"{self.name}: {root} is still mounted; left in place", stacklevel=2)
        return False

    # -- the container -------------------------------------------------------------------

    def _launch(self) -> subprocess.Popen[bytes]:
        """Start nspawn inside cgroups of its own; the shell execs it, so the PID is nspawn's."""
        argv = [
            NSPAWN, "-D", str(self.root), "-M", self.name, "--register=no", "--keep-unit",
            "-b", "--console=passive", "--link-journal=no",
        ]  # fmt: skip
        if self.apt_repo is not None:
            argv += aptrepo.nspawn_bind_args(self.apt_repo)
        moves = []
        for cgroup_root in _cgroup_roots():
            cgroup = cgroup_root / self.name
            cgroup.mkdir(exist_ok=True)
            moves.append(f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))}")
        script = " && ".join([*moves, f"exec {shlex.join(argv)}"])
        with open(self.console_log, "ab") as log:
            # A session of its own: a Ctrl-C meant for pytest does not reach the container.
            proc = subprocess.Popen(
                ["/bin/sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        (self._require_dir() / "nspawn.pid").write_text(_process_id(proc.pid))
        return proc

    def reboot(self, timeout: float | None = None) -> None:
        """Reboot the host from inside and wait (bounded) until sshd answers again."""
        timeout = self.boot_timeout if timeout is None else timeout
        before = self.reboots
        self.run("systemctl reboot", check=False)
        deadline = time.monotonic() + timeout
        while self.reboots == before:
            if time.monotonic() > deadline or self._exit_status is not None:
                raise NspawnError(
                    f"test host {self.name} did not restart within {timeout} s "
                    f"(nspawn exit status {self._exit_status}):\n{self.console_tail()}"
                )
            time.sleep(0.05)
        self._wait_for_sshd(max(deadline - time.monotonic(), 1.0))

    def _wait_for_sshd(self, timeout: float | None = None) -> None:
        proc = self._proc
        assert proc is not None
        timeout = self.boot_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._boot_failed(f"systemd-nspawn exited with status {proc.returncode}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1.0) as sock:
                    sock.settimeout(2.0)
                    if sock.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self._boot_failed(f"sshd did not answer on port {self.port} within {timeout:.0f} s")

    def _boot_failed(self, what: str) -> None:
        journal = ""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # Still up: its journal says why sshd is not answering (the console may not).
            with contextlib.suppress(NspawnError):
                journal = self.run(
                    "systemctl --failed --no-legend --plain; journalctl -b --no-pager -n 15",
                    check=False,
                    timeout=10,
                ).stdout
        # Stop first: nspawn writes the console out in full only when it exits.
        self._proc = None
        if proc is not None:
            self._halt(proc)
        detail = f"Its journal:\n{journal.strip()}\n" if journal.strip() else ""
        raise NspawnError(
            f"test host {self.name} did not boot: {what}.\n{detail}"
            f"Its console up to the halt ({self.console_log}):\n{self.console_tail(boot_only=True)}"
        )

    def _supervise(self) -> None:
        """Restart the container when it reboots (exit 133); record any other exit."""
        while True:
            proc = self._proc
            if proc is None:
                return
            status = proc.wait()
            with self._lock:
                if self._stopping:
                    return
                if status != EXIT_REBOOT or self.reboots >= MAX_REBOOTS:
                    self._exit_status = status
                    return
                self._remove_cgroups()
                self._proc = self._launch()
                self.reboots += 1  # after the new process is in place: `reboot` waits on it

    def _halt(self, proc: subprocess.Popen[bytes]) -> None:
        """Halt our nspawn: SIGTERM (clean), again (immediate), then SIGKILL it and its init.

        A container still early in boot can miss the first SIGTERM (nspawn forwards it to an
        init that has no handler yet); nspawn takes a second one as "terminate now".
        """
        if proc.poll() is not None:
            return
        leaders = _children(proc.pid)
        for timeout in (STOP_TIMEOUT, 5.0):
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
                return
            except subprocess.TimeoutExpired:
                pass
        warnings.warn(f"{self.name}: nspawn ignored SIGTERM twice; killing it", stacklevel=2)
        for pid in leaders:  # the container's init: killing it ends every process inside
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def _remove_cgroups(self) -> None:
        """Remove this host's cgroup trees, deepest first (they empty as processes exit)."""
        for cgroup_root in _cgroup_roots():
            top = cgroup_root / self.name
            deadline = time.monotonic() + 5.0
            while top.exists() and time.monotonic() < deadline:
                for dirpath, _dirs, _files in os.walk(top, topdown=False):
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)
                if top.exists():
                    time.sleep(0.05)
            if top.exists():
                warnings.warn(f"{self.name}: could not remove cgroup {top}", stacklevel=2)

    def exit_status(self) -> int | None:
        """nspawn's exit status if the container stopped by itself (None while it runs)."""
        return self._exit_status


# -- what killed test runs left behind ------------------------------------------------------

DIR_PREFIX = "nspawn-"
_swept = False
_sweep_lock = threading.Lock()


def _process_id(pid: int) -> str:
    """`PID STARTTIME`: names a process even after its PID is reused."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{pid} {start}"


def _alive(process_id_file: Path) -> bool:
    try:
        recorded = process_id_file.read_text().strip()
    except OSError:
        return False
    return _process_id(int(recorded.split()[0])) == recorded


def sweep_leftovers() -> list[str]:
    """Remove what hosts of killed test runs left: overlay mounts, cgroups, temp dirs.

    Touches only a host whose owning test process is gone and whose nspawn has exited; it
    signals nothing. A container still running without its owner is left alone (and named
    in a warning: stop it with `kill` on the PID in its `nspawn.pid`). Returns the names of
    the hosts it cleaned up.
    """
    cleaned = []
    for temp_dir in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}gt-*"):
        owner, pid_file = temp_dir / "owner", temp_dir / "nspawn.pid"
        if not owner.exists() or _alive(owner):
            continue  # still being set up, or its test run is alive
        name = temp_dir.name[len(DIR_PREFIX) :].rsplit("-", 1)[0]
        if _alive(pid_file):
            warnings.warn(
                f"test host {name} outlived its test run: kill {pid_file.read_text().split()[0]}",
                stacklevel=2,
            )
            continue
        leftover = NspawnHost(name)
        leftover._dir = temp_dir
        leftover._mounted = os.path.ismount(temp_dir / "root")
        leftover._clean_up()
        cleaned.append(name)
    return cleaned


def sweep_leftovers_once() -> None:
    """`sweep_leftovers`, the first time a host of this process starts."""
    global _swept
    with _sweep_lock:
        if not _swept:
            _swept = True
            sweep_leftovers()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _ids_in(root: Path, user: str) -> tuple[int, int]:
    """`user`'s uid and gid in the host's own /etc/passwd (not this machine's)."""
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise NspawnError(f"user {user} is not in {root}/etc/passwd")


def _authorize(ssh_dir: Path, public_key: str, uid: int, gid: int) -> None:
    """`public_key` as the only authorized key in `ssh_dir`, with the modes sshd insists on."""
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(public_key + "\n")
    keys.chmod(0o600)
    for path in (ssh_dir, keys):
        os.chown(path, uid, gid)


# -- several at once ------------------------------------------------------------------------


def start_hosts(count: int, **host_kwargs: Any) -> list[NspawnHost]:
    """`count` hosts booted in parallel (all or none: on a failure the others are stopped)."""
    tar = host_kwargs.get("tar")
    if host_kwargs.get("overlay", True):
        rootfs.ensure_lower_dir(tar)  # once, before the threads (each would wait on the lock)
    else:
        rootfs.ensure_rootfs(tar)
    hosts = [NspawnHost(**host_kwargs) for _ in range(count)]
    with ThreadPoolExecutor(max_workers=max(count, 1)) as pool:
        outcomes = list(pool.map(_start_one, hosts))
    errors = [error for error in outcomes if error is not None]
    if errors:
        stop_hosts(hosts)
        raise NspawnError(
            f"{len(errors)} of {count} test hosts did not start:\n"
            + "\n".join(str(e) for e in errors)
        ) from errors[0]
    return hosts


def _start_one(host: NspawnHost) -> BaseException | None:
    try:
        host.start()
    except Exception as exc:  # collected and reported together by start_hosts
        return exc
    return None


def stop_hosts(hosts: Sequence[NspawnHost]) -> None:
    """Stop `hosts` in parallel (a clean halt takes 0.3-0.8 s each, more when loaded)."""
    with ThreadPoolExecutor(max_workers=max(len(hosts), 1)) as pool:
        list(pool.map(NspawnHost.stop, hosts))


@contextlib.contextmanager
def nspawn_hosts(count: int, **host_kwargs: Any) -> Iterator[list[NspawnHost]]:
    """`count` hosts booted in parallel with one client key, stopped on exit.

    Takes `NspawnHost`'s keyword arguments; without `key_file`, a key is made for the group.
    """
    with tempfile.TemporaryDirectory(prefix="nspawn-key-") as tmp:
        if host_kwargs.get("key_file") is None:
            host_kwargs["key_file"] = make_client_key(Path(tmp) / "id_ed25519")
        hosts = start_hosts(count, **host_kwargs)
        try:
            yield hosts
        finally:
            stop_hosts(hosts)


def nspawn_hosts_fixture(
    count: int = 1,
    *,
    scope: str = "session",
    with_test_repo: bool = True,
    **host_kwargs: Any,
) -> Callable[..., Any]:
    """A pytest fixture yielding `count` booted hosts (a list), for a conftest:

        nspawn_hosts = nspawn_hosts_fixture(2)

    With `with_test_repo`, the hosts see `aptrepo.TEST_PACKAGES` as their only apt source.
    Where hosts cannot boot it skips with the reason, except under CI (env CI set), where a
    missing prerequisite is a failure: CI installs them (tests/run.sh).
    """

    @pytest.fixture(scope=scope)  # type: ignore[misc]
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NspawnHost]]:
        reason = NspawnHost.available(host_kwargs.get("tar"))
        if reason:
            if os.environ.get("CI"):
                pytest.fail(f"nspawn test hosts cannot run under CI: {reason}")
            pytest.skip(f"nspawn test hosts unavailable: {reason}")
        kwargs = dict(host_kwargs)
        if with_test_repo:
            kwargs["apt_repo"] = aptrepo.build_test_repo(tmp_path_factory.mktemp("aptrepo"))
        with nspawn_hosts(count, **kwargs) as hosts:
            yield hosts

    return fixture
