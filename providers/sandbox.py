"""A filesystem sandbox for commands that run code nobody reviewed yet (a proposal's plan).

Bubblewrap (`bwrap`, Debian `bubblewrap`) starts the command in new mount, PID, IPC and UTS
namespaces whose root is an empty tmpfs holding only:

- read-only: /usr (and the /bin, /lib, /lib64, /sbin links or dirs), a few files of /etc
  that name resolution and TLS need, and the paths the caller lists (the proposal's tree,
  the Terraform binary and the Python it runs on, the CLI config and provider mirror);
- writable: the paths the caller lists (the unit's work area, a HOME and plugin cache of
  the proposals' own), a private /tmp;
- a /proc of its own (the agent's processes are not visible) and a minimal /dev.

Anything else (the host config, deploy key, Vault token, the agent's state directory and
run store, other units' state, home directories) does not exist inside. The network is
shared: providers plan against their APIs, and `init` may download providers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from providers.errors import ProviderError

_ETC = (
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/localtime",
    "/etc/alternatives",
)
_TOP = ("/bin", "/lib", "/lib64", "/lib32", "/libx32", "/sbin")
CHECK_TIMEOUT = 15.0  # seconds for `bwrap ... true`; measured ~10 ms


class SandboxError(ProviderError):
    """The sandbox cannot be used (bwrap missing, or refused to start)."""


@dataclass(frozen=True)
class Sandbox:
    """`wrap(argv)`: `argv` run under bwrap with the paths given readable or writable."""

    bwrap: str
    read_only: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()

    @classmethod
    def find(cls, read_only: Iterable[Path] = (), writable: Iterable[Path] = ()) -> Sandbox:
        """A sandbox on the `bwrap` found on PATH; SandboxError when there is none."""
        found = shutil.which("bwrap")
        if found is None:
            raise SandboxError(
                "bwrap (bubblewrap) is not installed, and proposal plans run only inside it:"
                " install it (apt-get install bubblewrap)"
            )
        return cls(found, tuple(read_only), tuple(writable))

    def check(self, timeout: float = CHECK_TIMEOUT) -> None:
        """Start `true` in the sandbox; SandboxError with bwrap's own words when it cannot
        start here (a service whose sandbox refuses namespaces or the mount calls).

        Once, before the first command: a bwrap that fails half-way (after it forked) can
        leave its child waiting until the command's timeout, minutes later."""
        argv = self.wrap(["true"])
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise SandboxError(f"bwrap did not start `true` within {timeout:.0f} s") from None
        except OSError as exc:
            raise SandboxError(f"cannot run {self.bwrap}: {exc}") from None
        if proc.returncode != 0:
            said = (proc.stderr or proc.stdout).strip().splitlines()
            raise SandboxError(
                f"bubblewrap cannot start here: {said[-1] if said else f'exit {proc.returncode}'}"
            )

    def wrap(
        self,
        argv: list[str],
        *,
        read_only: Iterable[Path] = (),
        writable: Iterable[Path] = (),
    ) -> list[str]:
        """The command line that runs `argv` in the sandbox."""
        args = [
            self.bwrap,
            "--die-with-parent",
            "--unshare-user-try",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "--ro-bind",
            "/usr",
            "/usr",
        ]
        for top in _TOP:
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        for etc in _ETC:
            args += ["--ro-bind-try", etc, etc]
        binds: dict[str, tuple[str, str]] = {}  # where -> (how, from)
        for path in (*self.read_only, *read_only):
            real = os.path.realpath(path)
            if os.path.exists(real) and not real.startswith("/usr/"):
                # At its own name and at the name it was given (links point at either).
                for where in {real, os.path.abspath(path)}:
                    binds.setdefault(where, ("--ro-bind", real))
        for path in (*self.writable, *writable):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            real = os.path.realpath(path)
            for where in {real, os.path.abspath(path)}:
                binds[where] = ("--bind", real)
        # Parents before children: a writable work area inside a read-only parent stays so.
        for where in sorted(binds, key=lambda p: (p.count("/"), p)):
            how, source = binds[where]
            args += [how, source, where]
        return [*args, "--", *argv]
