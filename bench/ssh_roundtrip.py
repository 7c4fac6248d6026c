"""Benchmark: the cost of one command over SSHTransport, against a real OpenSSH sshd.

Starts a throwaway sshd on 127.0.0.1 (tests/support/sshd.py; needs root and Debian's
openssh-server), connects once and times N calls on that one connection:
  - `run(["true"])`, direct;
  - `run(["cat"], stdin=20 KiB)`, direct (the host engine sends its program on stdin);
  - `run(["true"])` through a jump host (a second sshd);
  - for reference, paramiko's own `SSHClient.exec_command("true")` on the default socket
    (no TCP_NODELAY: Nagle plus delayed ACK), which is what SSHTransport avoids.
Prints mean, median and p95 per row, and the connection setup time.

    python bench/ssh_roundtrip.py [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import paramiko  # noqa: E402

from providers.transport import SSHSettings, SSHTarget, SSHTransport  # noqa: E402
from tests.support.sshd import SshServer, make_client_key, public_key  # noqa: E402


def timed(calls: int, one: Callable[[], object]) -> list[float]:
    one()  # warm-up
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        one()
        seconds.append(time.perf_counter() - started)
    return seconds


def row(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    return (
        f"{name:<44} mean {statistics.mean(ms):6.2f} ms   median {statistics.median(ms):6.2f} ms"
        f"   p95 {p95:6.2f} ms"
    )


def paramiko_default(server: SshServer, key: Path, known_hosts: Path) -> Callable[[], None]:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.connect(
        server.host,
        server.port,
        server.user,
        key_filename=str(key),
        allow_agent=False,
        look_for_keys=False,
    )

    def one() -> None:
        _, out, err = client.exec_command("true")
        out.channel.recv_exit_status()
        out.read()
        err.read()

    return one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    reason = SshServer.available()
    if reason:
        sys.exit(reason)

    with (
        tempfile.TemporaryDirectory(prefix="ssh-bench-") as tmp,
        SshServer() as server,
        SshServer() as bastion,
    ):
        work = Path(tmp)
        key = make_client_key(work / "id_ed25519")
        for each in (server, bastion):
            each.add_authorized_key(each.user, public_key(key))
        known_hosts = work / "known_hosts"
        known_hosts.write_text(f"{server.known_hosts_line()}\n{bastion.known_hosts_line()}\n")
        target = SSHTarget("bench", server.host, server.port, server.user)
        jump = SSHTarget("bastion", bastion.host, bastion.port, bastion.user)

        direct = SSHTransport(target, SSHSettings(key, known_hosts))
        started = time.perf_counter()
        direct.connect()
        setup = time.perf_counter() - started
        via_jump = SSHTransport(target, SSHSettings(key, known_hosts, jump=jump))
        started = time.perf_counter()
        via_jump.connect()
        setup_jump = time.perf_counter() - started

        stdin = b"x" * 20 * 1024
        print(f"{args.calls} calls per row, one connection each")
        print(f"connect: direct {setup * 1000:.1f} ms, via jump host {setup_jump * 1000:.1f} ms")
        print(
            row(
                'SSHTransport run(["true"])',
                timed(args.calls, lambda: direct.run(["true"], timeout=10)),
            )
        )
        print(
            row(
                'SSHTransport run(["cat"], stdin=20 KiB)',
                timed(args.calls, lambda: direct.run(["cat"], stdin=stdin, timeout=10)),
            )
        )
        print(
            row(
                'SSHTransport run(["true"]) via jump host',
                timed(args.calls, lambda: via_jump.run(["true"], timeout=10)),
            )
        )
        print(
            row(
                "paramiko exec_command, default socket",
                timed(args.calls, paramiko_default(server, key, known_hosts)),
            )
        )
        direct.close()
        via_jump.close()


if __name__ == "__main__":
    main()
