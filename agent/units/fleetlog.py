"""A fleet run's per-host report (`hosts.txt`), written as hosts finish.

Each host's text goes to disk when its worker is done with it, so a pass holds no
host's diff longer than that host's own converge (a first converge of 1,000 hosts
wrote ~75 KiB of diff per host: 150 MiB held until the end of the pass when the texts
were kept and joined). The spool is `hosts.txt.partial` (what a killed pass leaves is
finished by recovery like any other partial log); `close` writes `hosts.txt` in fleet
order, copying each host's part from the spool, and removes the spool.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO

from agent.core.fsutil import INTERRUPTED_MARKER, PRIVATE_FILE_MODE, ensure_private_dir, fsync_dir

COPY_CHUNK = 1 << 16


class HostLog:
    """`hosts.txt` of one fleet unit's run, filled by many workers in any order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        ensure_private_dir(path.parent)
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
        self._spool = os.fdopen(fd, "w+b")
        self._parts: dict[int, tuple[int, int]] = {}  # host's place -> (offset, length)
        self._lock = threading.Lock()

    def add(self, place: int, text: str) -> None:
        """Append the text of the host at `place` in the fleet (already redacted)."""
        data = text.encode("utf-8")
        with self._lock:
            offset = self._spool.tell()
            self._spool.write(data)
            self._spool.flush()  # on disk for a reader now, and for recovery if killed
            self._parts[place] = (offset, len(data))

    def close(self, *, cut: bool = False) -> None:
        """Write `hosts.txt` in fleet order (atomically) and remove the spool; `cut`: the
        pass failed before every host was done (the file ends with a marker line)."""
        if self._spool.closed:
            return
        with self._lock:
            self._spool.flush()
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
            with os.fdopen(fd, "wb") as out:
                for place in sorted(self._parts):
                    offset, length = self._parts[place]
                    self._spool.seek(offset)
                    _copy(self._spool, out, length)
                if cut:
                    out.write(INTERRUPTED_MARKER.encode() + b"\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
            self._spool.close()
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> HostLog:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self.close(cut=kind is not None)


def _copy(source: BinaryIO, target: BinaryIO, length: int) -> None:
    while length > 0:
        chunk = source.read(min(COPY_CHUNK, length))
        if not chunk:
            break
        target.write(chunk)
        length -= len(chunk)
