"""SSH host certificates (`@cert-authority` in known_hosts) against a real OpenSSH server.

Each case starts Debian's sshd on 127.0.0.1 with `HostCertificate`, the certificate made
by `ssh-keygen -s CA -h` with the case's principals and validity. A good certificate
logs in and runs; every bad one is refused at the handshake, before any command: the
marker file the command would create never appears. No mocks.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from providers.errors import HostKeyError
from providers.transport import SSHSettings, SSHTarget, SSHTransport
from providers.transport.hostcert import host_pattern_matches
from tests.support.sshd import SshServer, make_client_key, public_key


class CertSshServer(SshServer):
    """sshd whose host key carries a certificate made by `sign(host_key_pub)`."""

    def __init__(self, sign: list[str] | None, ca: Path | None) -> None:
        super().__init__()
        self.sign = sign
        self.ca = ca

    def _write_config(self, host_key: Path) -> None:
        if self.sign is not None and self.ca is not None:
            cert = host_key.with_name(host_key.name + "-cert.pub")
            if not cert.exists():
                pub = f"{host_key}.pub"
                subprocess.run(
                    ["ssh-keygen", "-q", "-s", str(self.ca), "-I", "test-host", *self.sign, pub],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
            self.extra_config = f"HostCertificate {cert}\n"
        super()._write_config(host_key)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    reason = SshServer.available()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("certkeys")
    return {
        "client": make_client_key(base / "id_ed25519"),
        "ca": make_client_key(base / "ca", comment="host-ca"),
        "other_ca": make_client_key(base / "other_ca", comment="other-ca"),
    }


@pytest.fixture
def serve(keys: dict[str, Path]) -> Iterator[object]:
    started: list[SshServer] = []

    def start(sign: list[str] | None, ca: str = "ca") -> SshServer:
        server = CertSshServer(sign, keys[ca])
        server.start()
        started.append(server)
        server.add_authorized_key(server.user, public_key(keys["client"]))
        return server

    yield start
    for server in started:
        server.stop()


def _known_hosts(path: Path, keys: dict[str, Path], extra: str = "") -> Path:
    path.write_text(f"@cert-authority [127.0.0.1]:* {public_key(keys['ca'])}\n{extra}")
    return path


def _connect(server: SshServer, keys: dict[str, Path], known: Path) -> SSHTransport:
    target = SSHTarget("web-1", server.host, server.port, server.user)
    return SSHTransport(target, SSHSettings(keys["client"], known, trust_on_first_use=True))


def test_a_certificate_signed_by_the_ca_for_the_address_is_accepted(
    serve: object, keys: dict[str, Path], tmp_path: Path
) -> None:
    server = serve(["-h", "-n", "127.0.0.1,web-1.internal", "-V", "-5m:+1h"])  # type: ignore[operator]
    known = _known_hosts(tmp_path / "known_hosts", keys)
    with _connect(server, keys, known) as ssh:
        done = ssh.run(["echo", "certified"], timeout=20)
    assert done.stdout == b"certified\n"
    # Trust on first use is on, yet nothing was appended: the CA vouched for the host.
    assert known.read_text().count("\n") == 1


BAD = [
    ("expired", ["-h", "-n", "127.0.0.1", "-V", "20200101:20200102"], "ca", "expired at 2020"),
    ("not yet valid", ["-h", "-n", "127.0.0.1", "-V", "+1d:+2d"], "ca", "not valid before"),
    ("wrong principal", ["-h", "-n", "10.9.9.9,db.internal"], "ca", "do not include 127.0.0.1"),
    ("no principals", ["-h"], "ca", "names no principals"),
    ("wrong CA", ["-h", "-n", "127.0.0.1"], "other_ca", "signed by a CA that known_hosts"),
    ("user certificate", ["-n", "127.0.0.1"], "ca", "user certificate"),
    ("plain key", None, "ca", "offered a plain host key"),
]


@pytest.mark.parametrize(("sign", "ca", "said"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_certificate_is_refused_before_any_command(
    serve: object,
    keys: dict[str, Path],
    tmp_path: Path,
    sign: list[str] | None,
    ca: str,
    said: str,
) -> None:
    server = serve(sign, ca)  # type: ignore[operator]
    known = _known_hosts(tmp_path / "known_hosts", keys)
    before = known.read_text()
    marker = server.make_user_dir() / "ran"
    with (
        pytest.raises(HostKeyError, match="Nothing was run") as caught,
        _connect(server, keys, known) as ssh,
    ):
        ssh.run(["touch", str(marker)], timeout=20)
    assert said in str(caught.value)
    assert not marker.exists()
    assert known.read_text() == before  # never trusted on first use under a CA


def test_a_revoked_ca_certifies_nothing(
    serve: object, keys: dict[str, Path], tmp_path: Path
) -> None:
    server = serve(["-h", "-n", "127.0.0.1"])  # type: ignore[operator]
    known = _known_hosts(
        tmp_path / "known_hosts", keys, extra=f"@revoked * {public_key(keys['ca'])}\n"
    )
    target = SSHTarget("web-1", server.host, server.port, server.user)
    # The CA no longer counts: the host's key is simply unknown (no trust on first use).
    with pytest.raises(HostKeyError, match="not in known_hosts"):
        SSHTransport(target, SSHSettings(keys["client"], known)).connect()


@pytest.mark.parametrize(
    ("patterns", "name", "matches"),
    [
        ("*.internal", "web.internal", True),
        ("*.internal", "web.example", False),
        ("[127.0.0.1]:*", "[127.0.0.1]:2222", True),
        ("[127.0.0.1]:*", "127.0.0.1", False),
        ("10.0.?.*", "10.0.1.20", True),
        ("*,!10.0.0.5", "10.0.0.5", False),
        ("*,!10.0.0.5", "10.0.0.6", True),
        ("WEB.Internal", "web.internal", True),
    ],
)
def test_cert_authority_host_patterns(patterns: str, name: str, matches: bool) -> None:
    assert host_pattern_matches(patterns, name) is matches
