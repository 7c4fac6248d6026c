"""The daemon's log lines (agent.service.logfmt) with a real SSH connection: no mocks.

paramiko logs two INFO lines per connection; the daemon's journal must not get them for
every host of every pass, unless debug logs are asked for.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.service.logfmt import LIBRARY_LOGGERS, setup_logging
from providers.transport import SSHSettings, SSHTarget, SSHTransport
from tests.support.sshd import SshServer, make_client_key, public_key


@pytest.fixture(scope="module")
def server() -> Iterator[SshServer]:
    reason = SshServer.available()
    if reason:
        pytest.skip(reason)
    with SshServer() as running:
        yield running


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging replaces the root's handlers and sets levels: put them back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


def connect_and_run(server: SshServer, tmp_path: Path) -> None:
    key = make_client_key(tmp_path / "id_ed25519")
    server.add_authorized_key(server.user, public_key(key))
    known_hosts = server.write_known_hosts(tmp_path / "known_hosts")
    target = SSHTarget("box1", server.host, server.port, server.user)
    with SSHTransport(target, SSHSettings(key, known_hosts)) as ssh:
        assert ssh.run(["true"], timeout=10).exit_code == 0


def test_paramiko_stays_out_of_the_daemon_log_at_info(
    server: SshServer, tmp_path: Path, restore_logging: None
) -> None:
    stream = io.StringIO()
    setup_logging(logging.INFO, stream)
    logging.getLogger("agent.pass").info("the agent's own line")
    connect_and_run(server, tmp_path)
    lines = stream.getvalue().splitlines()
    assert lines and all("paramiko" not in line for line in lines), lines
    assert any("the agent's own line" in line for line in lines)


def test_debug_shows_paramiko_too(server: SshServer, tmp_path: Path, restore_logging: None) -> None:
    stream = io.StringIO()
    setup_logging(logging.DEBUG, stream)
    connect_and_run(server, tmp_path)
    assert "Authentication (publickey) successful" in stream.getvalue()
