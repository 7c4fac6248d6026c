"""Crash-safe writes and private directories for the state directory.

Everything the agent must find intact after a crash is written to a temp file in the
same directory, flushed, and renamed over the target: a reader sees the old file or
the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from providers.atomic import atomic_write

__all__ = [
    "StreamedFile",
    "atomic_write",
    "ensure_private_dir",
    "finish_partial",
    "fsync_dir",
    "private_umask",
]

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PRIVATE_UMASK = 0o077


def private_umask() -> None:
    """Make every file this process (and its children: git, Terraform) creates private.

    Set at start (CLI and daemon), so no mode depends on the caller's umask; the
    agent's own files also get explicit modes.
    """
    os.umask(PRIVATE_UMASK)


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and any missing parents, each 0700) if needed and make it 0700."""
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, PRIVATE_DIR_MODE)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StreamedFile:
    """A log written line by line under `NAME.partial`, renamed to `NAME` when complete.

    A pass killed mid-way leaves only the `.partial` file, which recovery finishes
    with a marker line (see `finish_partial`), so a reader never takes a cut log for
    a whole one.
    """

    def __init__(self, path: Path, mode: int = PRIVATE_FILE_MODE) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        ensure_private_dir(path.parent)
        fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        self._handle = os.fdopen(fd, "w", encoding="utf-8", buffering=1)

    def write_line(self, line: str) -> None:
        self._handle.write(line + "\n")

    def close(self) -> None:
        """Flush, fsync and rename into place."""
        if self._handle.closed:
            return
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self.partial, self.path)

    def __enter__(self) -> StreamedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


INTERRUPTED_MARKER = "[gitops-agent: output ends here: the pass was interrupted]"


def finish_partial(partial: Path) -> Path:
    """Turn a `.partial` log left by a killed pass into a whole file with a marker line."""
    target = partial.with_name(partial.name.removesuffix(".partial"))
    with open(partial, "a", encoding="utf-8") as handle:
        handle.write(INTERRUPTED_MARKER + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, target)
    return target
