"""Reading the files a repository names: inside the checkout after symlinks, and bounded.

Everything in the repository is written by whoever can open a pull request, so a path it
names (a template, an `{% include %}`, a file `source:`, the manifest itself) is resolved
with every symlink followed and refused unless the result is inside the checkout: a
symlink to `/etc/shadow` or to the agent's deploy key must never be read. A symlink to
another place inside the repository is fine.

Every file is also size-checked before it is read (`fstat`, then a bounded read), so a
41 MB manifest costs a stat, not a minute of YAML parsing.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from providers.errors import RepoFileError
from providers.text import plural

MIB = 1024 * 1024
MAX_MANIFEST_BYTES = 8 * MIB  # gitops.yaml: 1,000 hosts x 50 resources, a role each, is ~5 MB
MAX_HOST_CONFIG_BYTES = 1 * MIB  # /etc/gitops-agent/agent.yaml
MAX_TEMPLATE_BYTES = 1 * MIB  # each Jinja template, include, import or extends
MAX_SOURCE_BYTES = 32 * MIB  # a fleet file's `source:` (copied, not parsed)


def format_size(size: int) -> str:
    """A byte count as people write limits: `4 MiB`, `512 KiB`, `100 bytes`."""
    for unit, factor in (("MiB", MIB), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return plural(size, "byte")


def confine(root: Path, path: Path | str) -> Path:
    """`path` (absolute, or relative to `root`) with every symlink resolved, if that is
    inside `root` (itself resolved). Raises RepoFileError (kind outside or missing).

    `shown` in messages is the path as given, relative to the root where it can be.
    """
    shown = _shown(root, path)
    try:
        real_root = root.resolve(strict=True)
        resolved = (real_root / path).resolve(strict=True)
    except FileNotFoundError:
        raise RepoFileError(shown, "no such file in the repository", kind="missing") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        reason = "a symlink loop" if isinstance(exc, RuntimeError) else exc.strerror
        if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
            reason = "a symlink loop"
        raise RepoFileError(shown, f"cannot be resolved ({reason})", kind="missing") from None
    if not resolved.is_relative_to(real_root):
        raise RepoFileError(
            shown,
            "resolves outside the repository (through a symlink or '..');"
            " only files of the repository can be read",
            kind="outside",
        )
    return resolved


def read_repo_file(root: Path, relative: str, *, limit: int) -> bytes:
    """The bytes of the repository file `relative` (a path as the repository wrote it),
    if it resolves inside `root` and has at most `limit` bytes. Raises RepoFileError."""
    if "\x00" in relative or relative.startswith("/"):
        raise RepoFileError(
            repr(relative), "expected a relative path inside the repository", kind="outside"
        )
    resolved = confine(root, relative)
    # The resolved path holds no symlink: O_NOFOLLOW keeps it that way while opening.
    return read_bounded(resolved, limit=limit, shown=relative, follow=False)


def read_bounded(path: Path, *, limit: int, shown: str | None = None, follow: bool = True) -> bytes:
    """The bytes of the regular file `path`, refused before reading when it has more than
    `limit` bytes. `shown` names the file in messages (default: the path). Raises
    RepoFileError (kind missing, not-a-file, too-large or unreadable)."""
    shown = shown if shown is not None else str(path)
    # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise RepoFileError(shown, "no such file", kind="missing") from None
    except OSError as exc:
        raise RepoFileError(shown, exc.strerror or str(exc), kind="unreadable") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RepoFileError(shown, "not a regular file", kind="not-a-file")
        if info.st_size > limit:
            raise _too_large(shown, info.st_size, limit)
        chunks = []
        remaining = limit + 1  # one byte more tells a file that grew since fstat
        while remaining > 0:
            chunk = os.read(fd, min(remaining, MIB))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise RepoFileError(shown, exc.strerror or str(exc), kind="unreadable") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise _too_large(shown, len(data), limit)
    return data


def _too_large(shown: str, size: int, limit: int) -> RepoFileError:
    return RepoFileError(
        shown,
        f"the file has {size} bytes, more than the limit of {format_size(limit)}"
        " for this kind of file",
        kind="too-large",
    )


def _shown(root: Path, path: Path | str) -> str:
    candidate = Path(path)
    if candidate.is_absolute():
        try:
            return candidate.relative_to(root).as_posix()
        except ValueError:
            return str(candidate)
    return candidate.as_posix()
