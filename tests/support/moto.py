"""moto in server mode for tests: real AWS HTTP endpoints on 127.0.0.1, no real AWS involved.

    @pytest.fixture(scope="module")
    def moto_server():
        with MotoServer() as server:     # `python -m moto.server -H 127.0.0.1 -p PORT`
            yield server

    @pytest.fixture
    def aws_env(monkeypatch, moto_server):
        fake_aws_credentials(monkeypatch)    # AWS_ACCESS_KEY_ID=testing etc., this test only
        return moto_server.url

One server per test module: its first call per service costs 1-3 s. `reset()` empties it
between tests. The server is a child process stopped by its own PID.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.service import TestService

START_TIMEOUT = 15.0
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer(TestService):
    """A `moto.server` child process on a free port of 127.0.0.1."""

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        self.extra_env = dict(extra_env or {})  # e.g. INITIAL_NO_AUTH_ACTION_COUNT
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = _free_port()
        fd, log = tempfile.mkstemp(prefix="moto-", suffix=".log")
        self._log = Path(log)
        # The server itself needs no credentials; keep the real ones (if any) away from it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self.extra_env)
        with os.fdopen(fd, "wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if self._answers():
                return
            time.sleep(0.1)
        tail = self._log.read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"moto server did not start within {START_TIMEOUT:g} s:\n{tail}")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def reset(self) -> None:
        """Forget every resource (POST /moto-api/reset)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=5)
            self._proc = None
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.unlink()
            self._log = None


def fake_aws_credentials(monkeypatch: pytest.MonkeyPatch, region: str = REGION) -> None:
    """Fake credentials and a region for this test only; no shared config, no IMDS."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    empty = "/nonexistent/gitops-agent-tests/aws"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", region)
    monkeypatch.setenv("AWS_CONFIG_FILE", f"{empty}/config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", f"{empty}/credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
