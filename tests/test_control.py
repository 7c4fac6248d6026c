"""The control socket over a real Unix socket, and suspend/resume without a daemon.

The server side is tested with a small handler of the test's (the daemon's own handler is
exercised end to end in tests/test_daemon.py); the CLI side runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core.progress import Event, EventKind
from agent.errors import AgentError, NotFoundError
from agent.service.control import (
    ControlClient,
    ControlError,
    ControlServer,
    Peer,
    Reply,
    run_remote,
)
from agent.state.store import UnitOutcome, UnitStatus
from tests.support.infra import InfraRepo, write_host_config


class Handler:
    """Answers `echo` with its args and the peer, streams two events for `stream`, fails
    `missing` with NotFoundError."""

    def __init__(self) -> None:
        self.peers: list[Peer] = []

    def handle(self, op: str, args: dict[str, Any], peer: Peer, reply: Reply) -> None:
        self.peers.append(peer)
        if op == "echo":
            reply.result({"args": args, "uid": peer.uid, "pid": peer.pid})
        elif op == "stream":
            reply.info("waiting: a pass is running")
            reply.event(Event(EventKind.UNIT_PHASE, run_id="r-1", unit="app", message="plan"))
            outcome = UnitOutcome(status=UnitStatus.OK, decision="apply", plan_add=1)
            reply.event(Event(EventKind.UNIT_FINISHED, run_id="r-1", unit="app", result=outcome))
            reply.result({"done": True})
        elif op == "missing":
            raise NotFoundError("no unit named 'x'", hint="units: app")
        else:
            raise AgentError(f"unknown control request {op!r}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ControlServer, Handler]]:
    handler = Handler()
    control = ControlServer(tmp_path / "run" / "control.sock", handler)
    control.start()
    yield control, handler
    control.stop()


def raw(path: Path, data: bytes) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return [json.loads(line) for line in answer.splitlines()]


def test_the_socket_is_0660_and_answers_with_the_peer_and_events(
    server: tuple[ControlServer, Handler],
) -> None:
    control, handler = server
    assert stat.S_IMODE(control.path.stat().st_mode) == 0o660
    assert stat.S_ISSOCK(control.path.stat().st_mode)

    client = ControlClient.connect(control.path)
    assert client is not None
    answer = run_remote(client, "echo", unit="app", reason="maintenance")
    assert answer == {
        "args": {"unit": "app", "reason": "maintenance"},
        "uid": os.getuid(),
        "pid": os.getpid(),
    }

    events: list[Event] = []
    notes: list[str] = []
    client = ControlClient.connect(control.path)
    assert client is not None
    assert run_remote(client, "stream", events.append, notes.append) == {"done": True}
    assert notes == ["waiting: a pass is running"]
    assert [e.kind for e in events] == [EventKind.UNIT_PHASE, EventKind.UNIT_FINISHED]
    assert events[1].result == UnitOutcome(status=UnitStatus.OK, decision="apply", plan_add=1)
    assert {peer.uid for peer in handler.peers} == {os.getuid()}


def test_errors_come_back_as_their_own_type(server: tuple[ControlServer, Handler]) -> None:
    control, _ = server
    client = ControlClient.connect(control.path)
    assert client is not None
    with pytest.raises(NotFoundError) as caught:
        run_remote(client, "missing")
    assert caught.value.message == "no unit named 'x'" and caught.value.hint == "units: app"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"not json\n", "not one line of JSON"),
        (b'{"version": 1}\n', 'no "op"'),
        (b'{"version": 99, "op": "echo"}\n', "protocol version 99 is not 1"),
        (b'{"version": 1, "op": "echo", "args": [1]}\n', '"args" is not an object'),
        (b'{"version": 1, "op": "reboot"}\n', "unknown control request 'reboot'"),
        (b'{"version": 1, "op": "' + b"x" * 70_000 + b'"}\n', "longer than 65536 bytes"),
    ],
)
def test_bad_requests_are_answered_clearly(
    server: tuple[ControlServer, Handler], line: bytes, expected: str
) -> None:
    control, _ = server
    (answer,) = raw(control.path, line)
    assert answer["type"] == "error"
    assert expected in answer["error"]["message"]


def test_a_stale_socket_is_replaced_and_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening, closed: what a killed agent leaves
    stale.close()
    first = ControlServer(path, Handler())
    first.start()
    try:
        second = ControlServer(path, Handler())
        with pytest.raises(ControlError, match="another agent is running"):
            second.start()
    finally:
        first.stop()
    assert not path.exists()
    # Not a socket: never removed.
    path.write_text("precious\n")
    with pytest.raises(ControlError, match="is not a socket"):
        ControlServer(path, Handler()).start()
    assert path.read_text() == "precious\n"


def test_without_a_daemon_the_client_finds_none(tmp_path: Path) -> None:
    assert ControlClient.connect(tmp_path / "nothing.sock") is None


def test_many_clients_at_once(server: tuple[ControlServer, Handler]) -> None:
    control, _ = server
    answers: list[dict[str, Any]] = []

    def ask(n: int) -> None:
        client = ControlClient.connect(control.path)
        assert client is not None
        answers.append(run_remote(client, "echo", n=n))

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(a["args"]["n"] for a in answers) == list(range(20))


# --- suspend and resume without a daemon ---------------------------------------------------


def agent(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_suspend_and_resume_work_on_the_store_without_a_daemon(tmp_path: Path) -> None:
    repo = InfraRepo(tmp_path / "git")
    for name in ("app", "db"):
        repo.write(
            f"stacks/{name}/main.tf", f'resource "terraform_data" "v" {{ input = "{name}" }}\n'
        )
    repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n"
        "  - {name: db, stack: stacks/db}\n",
    )
    repo.push("seed")
    config = write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        tmp_path / "state",
        f"control_socket: {tmp_path}/no-daemon.sock\n",
    )
    assert agent(config, "reconcile", "--now").returncode == 0

    suspended = agent(config, "suspend", "app", "--reason", "db migration")
    assert suspended.returncode == 0, suspended.stderr
    assert "unit app suspended" in suspended.stdout
    again = agent(config, "suspend", "app")
    assert again.returncode == 0 and "already suspended" in again.stdout

    status = json.loads(agent(config, "status", "--json").stdout)
    assert status["suspended"]["app"]["reason"] == "db migration"
    assert status["suspended"]["app"]["by"]  # who did it
    result = agent(config, "reconcile", "--now")
    assert result.returncode == 0
    assert "db: no changes" in result.stdout
    assert "  app: suspended, left out (`agent resume app`)" in result.stdout
    refused = agent(config, "reconcile", "--now", "--unit", "app")
    assert (
        refused.returncode == 1 and "error[unit-suspended]: unit app is suspended" in refused.stderr
    )

    unknown = agent(config, "resume", "nope")
    assert unknown.returncode == 5
    assert "no unit named 'nope'" in unknown.stderr and "units: app, db" in unknown.stderr

    resumed = agent(config, "resume", "app")
    assert resumed.returncode == 0 and "unit app resumed" in resumed.stdout
    assert "app: no changes" in agent(config, "reconcile", "--now").stdout
    assert "not suspended" in agent(config, "resume", "app").stdout
