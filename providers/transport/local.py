"""The agent's own machine as a host: commands run as subprocesses, no network."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

from providers.errors import TransportError
from providers.transport.base import CommandResult, Transport


class LocalTransport(Transport):
    """Runs commands on this machine; `become` uses `sudo -n` unless already root."""

    def __init__(self, host: str = "localhost") -> None:
        self.host = host
        self.round_trips = 0

    def connect(self) -> None:
        pass

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        timeout: float,
        become: bool = False,
    ) -> CommandResult:
        command = list(argv)
        if become and os.geteuid() != 0:
            command = ["sudo", "-n", "--", *command]
        self.round_trips += 1
        try:
            done = subprocess.run(command, input=stdin, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise TransportError(
                f"{self.host}: {command[0]} did not finish within {timeout:g}s",
                host=self.host,
                retryable=True,
            ) from exc
        except OSError as exc:
            raise TransportError(
                f"{self.host}: cannot run {command[0]}: {exc.strerror}", host=self.host
            ) from exc
        return CommandResult(done.returncode, done.stdout, done.stderr)

    def close(self) -> None:
        pass
