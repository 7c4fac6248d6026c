"""Hosts reached over SSH (paramiko): one connection per host, one channel per command.

Only the wire lives here: a TCP socket with TCP_NODELAY (without it Nagle plus delayed
ACK cost ~40 ms per command), host keys checked against the operator's known_hosts
before anything is sent, public-key login with the configured key and nothing else
(no agent, no ~/.ssh), an optional jump host, `sudo -n` for `become`, and a deadline
per command. Environment variables are never sent (sshd refuses most of them): callers
pass everything a command needs through its stdin.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from providers.errors import (
    AuthenticationError,
    PrivilegeEscalationError,
    TransportError,
)
from providers.transport.base import CommandResult, Transport
from providers.transport.hostkeys import (
    HostKeyVerifier,
    KnownHosts,
    describe_key,
    prefer_certificates,
    prefer_key_types,
)

log = logging.getLogger(__name__)

_SEND_CHUNK = 32 * 1024  # one SSH packet's worth of stdin per send()
_RECV_CHUNK = 1024 * 1024  # drain paramiko's buffer in big reads
_SUDO = ("sudo", "-n", "--")
_SUDO_NEEDS_PASSWORD = b"sudo: a password is required"
# A known_hosts "ssh-rsa" key is the same key for both SHA-2 signature algorithms.
_RSA_ALGORITHMS = ("rsa-sha2-512", "rsa-sha2-256")
# Serializes trust-on-first-use writes between the threads of this process; a flock on
# the known_hosts directory serializes them with other processes.
_TOFU_LOCK = threading.Lock()


@dataclass(frozen=True)
class SSHTarget:
    """Where a host is: `host` is the manifest's name for it, used in every message."""

    host: str
    address: str
    port: int = 22
    user: str = "root"
    #: Host key fingerprints (`SHA256:...`) the operator's trusted source published for this
    #: host (an EC2 tag); used only when known_hosts has no key and no CA for it.
    published_keys: tuple[str, ...] = ()

    @property
    def endpoint(self) -> str:
        """`address:port`, as messages show it."""
        return f"{self.address}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """The name known_hosts files it under: `address`, or `[address]:port` off port 22."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"


@dataclass(frozen=True)
class SSHSettings:
    """How to reach hosts, from the operator's host config (the trust boundary)."""

    #: Private key (ed25519, rsa or ecdsa; OpenSSH or PEM format) without a passphrase.
    key_file: Path
    #: Host keys accepted; an unknown or changed key is refused.
    known_hosts: Path
    #: Accept an UNKNOWN host key and append it to `known_hosts`; a CHANGED key is refused.
    trust_on_first_use: bool = False
    #: Bounds TCP connect, SSH handshake and login together (for the jump host too).
    connect_timeout: float = 10.0
    #: Reach the target through this host (same key and known_hosts).
    jump: SSHTarget | None = None
    #: Key exchanges and logins at once in this process (0: no limit): hundreds of hosts
    #: connecting together take turns for the CPU-bound part; waiting for a turn does not
    #: count against `connect_timeout`.
    handshakes: int = 8


class SSHTransport(Transport):
    """Runs commands on `target` over one SSH connection (opened by `connect`, or by the
    first `run`). `become` prefixes `sudo -n --` unless the login user is root.
    """

    def __init__(self, target: SSHTarget, settings: SSHSettings) -> None:
        self.target = target
        self.settings = settings
        self.host = target.host
        self.round_trips = 0
        self._wire: paramiko.Transport | None = None
        self._jump_wire: paramiko.Transport | None = None
        self._host_keys = HostKeyVerifier(
            self.host, settings.known_hosts, trust_on_first_use=settings.trust_on_first_use
        )

    # -- connection ------------------------------------------------------------------------

    def connect(self) -> None:
        """Open (or re-open, if it dropped) the connection; raise `TransportError` if not."""
        if self._wire is not None and self._wire.is_active():
            return
        self.close()
        started = time.monotonic()
        deadline = started + self.settings.connect_timeout
        key = self._load_key()
        jump = self.settings.jump
        jump_wire = None
        try:
            if jump is None:
                sock: socket.socket | paramiko.Channel = self._open_socket(self.target, deadline)
            else:
                jump_wire = self._handshake(self._open_socket(jump, deadline), jump, key, deadline)
                sock = self._open_forward(jump_wire, jump, deadline)
            self._wire = self._handshake(sock, self.target, key, deadline)
        except BaseException:
            if jump_wire is not None:
                jump_wire.close()
            raise
        self._jump_wire = jump_wire
        log.debug(
            "%s: connected to %s@%s%s in %.0f ms",
            self.host,
            self.target.user,
            self.target.endpoint,
            f" via {jump.host}" if jump else "",
            (time.monotonic() - started) * 1000,
        )

    def close(self) -> None:
        """Close the target's connection, then the jump host's; safe to call twice."""
        wire, self._wire = self._wire, None
        jump_wire, self._jump_wire = self._jump_wire, None
        for each in (wire, jump_wire):
            if each is not None:
                each.close()

    def _where(self, target: SSHTarget) -> str:
        if target is self.target:
            return target.endpoint
        return f"jump host {target.host} ({target.endpoint})"

    def _left(self, deadline: float, target: SSHTarget, step: str) -> float:
        """Seconds left before `deadline`; a retryable error naming `step` if none."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._timed_out(target, step)
        return left

    def _timed_out(self, target: SSHTarget, step: str) -> TransportError:
        return TransportError(
            f"{self.host}: {self._where(target)} did not answer within "
            f"{self.settings.connect_timeout:g}s ({step})",
            host=self.host,
            retryable=True,
        )

    def _load_key(self) -> paramiko.PKey:
        path = self.settings.key_file
        try:
            return paramiko.PKey.from_path(path)
        except FileNotFoundError:
            problem = "does not exist"
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror})"
        except TypeError:  # cryptography: "Password was not given but private key is encrypted"
            problem = "has a passphrase; the agent needs a key without one"
        except (ValueError, paramiko.SSHException, paramiko.pkey.UnknownKeyType):
            problem = "is not an ed25519, rsa or ecdsa private key (OpenSSH or PEM format)"
        raise AuthenticationError(f"{self.host}: SSH key {path} {problem}", host=self.host)

    def _open_socket(self, target: SSHTarget, deadline: float) -> socket.socket:
        timeout = self._left(deadline, target, "TCP connect")
        try:
            sock = socket.create_connection((target.address, target.port), timeout=timeout)
        except TimeoutError:
            raise self._timed_out(target, "TCP connect") from None
        except OSError as exc:  # refused, unreachable, name not resolved
            reason = exc.strerror or str(exc)
            raise TransportError(
                f"{self.host}: cannot connect to {self._where(target)}: {reason}",
                host=self.host,
                retryable=True,
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _open_forward(
        self, jump_wire: paramiko.Transport, jump: SSHTarget, deadline: float
    ) -> paramiko.Channel:
        """A `direct-tcpip` channel from the jump host to the target, used as its socket."""
        timeout = self._left(deadline, jump, "opening a tunnel")
        dest = (self.target.address, self.target.port)
        try:
            return jump_wire.open_channel("direct-tcpip", dest, ("127.0.0.1", 0), timeout=timeout)
        except paramiko.ChannelException as exc:  # the jump host could not connect
            raise TransportError(
                f"{self.host}: {self._where(jump)} cannot connect to {self.target.endpoint}: "
                f"{exc.text}",
                host=self.host,
                retryable=True,
            ) from exc
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if time.monotonic() >= deadline:
                raise self._timed_out(jump, "opening a tunnel") from exc
            raise TransportError(
                f"{self.host}: {self._where(jump)} refused a tunnel to {self.target.endpoint}: "
                f"{exc}",
                host=self.host,
                retryable=True,
            ) from exc

    def _handshake(
        self,
        sock: socket.socket | paramiko.Channel,
        target: SSHTarget,
        key: paramiko.PKey,
        deadline: float,
    ) -> paramiko.Transport:
        """Key exchange, host key check, then login; the connection is closed on failure."""
        wire = paramiko.Transport(sock)
        try:
            known = KnownHosts.cached(self.settings.known_hosts, self.host)
            known_keys = known.keys_for(target.known_hosts_name)
            if known_keys:
                prefer_key_types(wire, known_keys)
            elif known.authorities_for(target.known_hosts_name):
                prefer_certificates(wire)
            with _handshake_turn(self.settings.handshakes) as waited:
                deadline += waited  # waiting for a turn is not the host being slow
                self._exchange_keys(wire, target, deadline)
                offered = wire.get_remote_server_key()
                self._host_keys.check(target, self._where(target), offered, known, known_keys)
                self._login(wire, target, key, deadline)
        except BaseException:
            wire.close()
            sock.close()  # Transport.close() leaves the socket open if the handshake never ran
            raise
        return wire

    def _exchange_keys(self, wire: paramiko.Transport, target: SSHTarget, deadline: float) -> None:
        wire.banner_timeout = self._left(deadline, target, "SSH banner")
        try:
            wire.start_client(timeout=self._left(deadline, target, "SSH handshake"))
        except paramiko.IncompatiblePeer as exc:
            raise TransportError(
                f"{self.host}: {self._where(target)} offers no SSH algorithm paramiko accepts: "
                f"{exc}",
                host=self.host,
            ) from exc
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if time.monotonic() >= deadline:
                raise self._timed_out(target, "SSH handshake") from exc
            raise TransportError(
                f"{self.host}: SSH handshake with {self._where(target)} failed: {exc}",
                host=self.host,
                retryable=True,
            ) from exc
        if not wire.initial_kex_done:  # start_client returns quietly on timeout
            raise self._timed_out(target, "SSH handshake")

    def _login(
        self, wire: paramiko.Transport, target: SSHTarget, key: paramiko.PKey, deadline: float
    ) -> None:
        who = f"{target.user}@{target.endpoint}"
        if target is not self.target:
            who += f" (jump host {target.host})"
        refused = (
            f"{self.host}: login as {who} refused for key {self.settings.key_file} "
            f"({describe_key(key)})"
        )
        hint = (
            f"; check the user name, and that the key's public half is in "
            f"~{target.user}/.ssh/authorized_keys on that host"
        )
        wire.auth_timeout = self._left(deadline, target, "login")
        try:
            remaining = wire.auth_publickey(target.user, key)
        except paramiko.BadAuthenticationType as exc:
            allowed = ", ".join(exc.allowed_types) or "none"
            raise AuthenticationError(
                f"{refused}: the server does not accept keys (it allows: {allowed})",
                host=self.host,
            ) from exc
        except paramiko.AuthenticationException as exc:
            if time.monotonic() >= deadline:
                raise self._timed_out(target, "login") from exc
            raise AuthenticationError(refused + hint, host=self.host) from exc
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise TransportError(
                f"{self.host}: connection to {self._where(target)} lost during login: {exc}",
                host=self.host,
                retryable=True,
            ) from exc
        if remaining or not wire.is_authenticated():  # a second factor was asked for
            raise AuthenticationError(
                f"{refused}: the server also wants {', '.join(remaining)}", host=self.host
            )

    # -- commands --------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        timeout: float,
        become: bool = False,
    ) -> CommandResult:
        """Run `argv` (quoted with `shlex.join`, no pty) and return its exit code and output.

        Connects first if needed. The exit code is -1 if the command died from a signal.
        Raises `TransportError` (retryable) when the connection fails or `timeout` seconds
        pass; `PrivilegeEscalationError` when `become` needs a sudo password.
        """
        command = list(argv)
        if not command:
            raise ValueError("run() needs a command")
        name = command[0]
        sudo = become and self.target.user != "root"
        if sudo:
            command = [*_SUDO, *command]
        self.round_trips += 1
        deadline = time.monotonic() + timeout
        self.connect()
        assert self._wire is not None
        try:
            channel = self._wire.open_session(timeout=max(deadline - time.monotonic(), 0.001))
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.close()  # the next run reconnects
            raise TransportError(
                f"{self.host}: lost the connection to {self.target.endpoint}: {exc}",
                host=self.host,
                retryable=True,
            ) from exc
        try:
            finished = _exchange(channel, shlex.join(command), stdin, deadline)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if not self._wire.is_active():
                self.close()  # the next run reconnects
            raise TransportError(
                f"{self.host}: {name} could not be run on {self.target.endpoint}: {exc}",
                host=self.host,
                retryable=True,
            ) from exc
        if finished is None:
            raise TransportError(
                f"{self.host}: {name} did not finish within {timeout:g}s (the session was closed)",
                host=self.host,
                retryable=True,
            )
        if sudo:
            self._check_sudo(finished)
        return finished

    def _check_sudo(self, result: CommandResult) -> None:
        user = self.target.user
        if result.exit_code == 1 and _SUDO_NEEDS_PASSWORD in result.stderr:
            raise PrivilegeEscalationError(
                f"{self.host}: sudo asks {user}@{self.target.endpoint} for a password; the "
                f"agent runs `sudo -n` and cannot type one. Give {user} passwordless sudo "
                f"(`{user} ALL=(ALL) NOPASSWD: ALL` in /etc/sudoers.d/) or log in as root",
                host=self.host,
            )
        if result.exit_code == 127 and b"sudo" in result.stderr and b"not found" in result.stderr:
            raise PrivilegeEscalationError(
                f"{self.host}: `become` needs sudo, which is not installed on "
                f"{self.target.endpoint}; install it or log in as root",
                host=self.host,
            )


def _exchange(
    channel: paramiko.Channel, command: str, stdin: bytes, deadline: float
) -> CommandResult | None:
    """Exec `command` on `channel`, feed `stdin`, collect output; None past `deadline`.

    stdout is read here while threads read stderr and write stdin: a command that writes
    while it reads (more than the SSH window, 2 MiB, on any stream) would deadlock a single
    loop. (Not `channel.fileno()` with select: paramiko's "stdout or stderr ready" pipe is
    updated from two threads without a lock and can miss a wakeup.) A timer closes the
    channel at the deadline, which ends every blocking call below.
    """
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
            channel.close()  # the connection itself may be going down too

    timer = threading.Timer(max(deadline - time.monotonic(), 0.0), expire)
    timer.daemon = True
    timer.start()
    helpers: list[threading.Thread] = []
    stdout: list[bytes] = []
    stderr: list[bytes] = []
    try:
        channel.exec_command(command)
        helpers.append(_start(_collect, channel.recv_stderr, stderr))
        if stdin:
            helpers.append(_start(_feed, channel, stdin))
        else:
            channel.shutdown_write()
        _collect(channel.recv, stdout)
        if not channel.status_event.is_set():
            # sshd sends the exit status in a write of its own after the EOF. Through a
            # jump host, the bastion's socket to the target has Nagle on, so the target
            # holds that write until the bastion ACKs the EOF: up to 40 ms of delayed ACK.
            # An SSH "ignore" packet from us carries the ACK at once.
            channel.get_transport().send_ignore(1)
        for helper in helpers:
            helper.join(max(deadline - time.monotonic(), 0.0))
        channel.status_event.wait(max(deadline - time.monotonic(), 0.0))
    except (paramiko.SSHException, EOFError, OSError):
        if not expired.is_set():
            raise
    finally:
        timer.cancel()
        with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
            channel.close()
        for helper in helpers:
            helper.join(1.0)  # at once: their channel is closed
    if expired.is_set() or not channel.status_event.is_set():
        return None
    return CommandResult(channel.exit_status, b"".join(stdout), b"".join(stderr))


def _start(target: Callable[..., None], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _collect(read: Callable[[int], bytes], sink: list[bytes]) -> None:
    """Read one stream until EOF (or until the channel is closed)."""
    while chunk := read(_RECV_CHUNK):
        sink.append(chunk)


def _feed(channel: paramiko.Channel, data: bytes) -> None:
    """Write all of `data`, then EOF. A command may exit without reading it all: fine."""
    try:
        for start in range(0, len(data), _SEND_CHUNK):
            # Chunk by chunk: sendall() would copy the whole remainder for every packet.
            chunk = data[start : start + _SEND_CHUNK]
            while chunk:
                sent = channel.send(chunk)
                if sent == 0:  # channel closed
                    return
                chunk = chunk[sent:]
        channel.shutdown_write()
    except (paramiko.SSHException, EOFError, OSError):
        pass


@contextlib.contextmanager
def _handshake_turn(limit: int) -> Iterator[float]:
    """Hold one of `limit` handshake turns (shared by the process); yields the wait."""
    if limit <= 0:
        yield 0.0
        return
    with _TURNS_LOCK:
        turns = _TURNS.setdefault(limit, threading.BoundedSemaphore(limit))
    started = time.monotonic()
    with turns:
        yield time.monotonic() - started


_TURNS: dict[int, threading.BoundedSemaphore] = {}
_TURNS_LOCK = threading.Lock()
