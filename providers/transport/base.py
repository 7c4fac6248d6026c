"""The transport seam: one small interface between the host engine and a machine.

The engine sends whole programs over `run` (a command line plus its stdin) and reads
back bytes; it never needs a shell session, file transfer or port forward. Everything
a transport adds on top is the wire: connecting, authenticating, privilege escalation
and timeouts. Implementations count their round trips so tests and benchmarks can
assert "a host in its desired state costs one round trip".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True)
class CommandResult:
    """What one remote command gave back."""

    exit_code: int
    stdout: bytes
    stderr: bytes


class Transport(ABC):
    """A connection to one host. Not thread-safe: one transport per host per pass."""

    #: The host's name as the manifest gives it; every error message names it.
    host: str
    #: Commands run so far on this transport (each `run` is one round trip).
    round_trips: int = 0

    @abstractmethod
    def connect(self) -> None:
        """Open the connection; raise `TransportError` (naming the host) if it cannot."""

    @abstractmethod
    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        timeout: float,
        become: bool = False,
    ) -> CommandResult:
        """Run `argv` on the host with `stdin`, as root through `sudo -n` if `become`.

        Returns whatever exit code the command had; raises `TransportError` only when
        the command could not be run or did not finish within `timeout` seconds.
        """

    @abstractmethod
    def close(self) -> None:
        """Close the connection; safe to call twice."""

    def __enter__(self) -> Transport:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
