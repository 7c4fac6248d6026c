"""The file backend (`file:/ABSOLUTE/PATH`) and the checks shared with credential files.

A secret file must be a regular file owned by the agent's user and closed to group and
others (mode 0600 or 0400), as systemd's `LoadCredential=` and `install -m 600` make them.
The checks are made on the opened file (fstat), so a file swapped between check and read
is not read. One trailing newline is stripped: editors and `echo` add it, and no password
wants it.

Credential files the Vault backend reads (a token written by Vault Agent, an AppRole
secret-id) use a looser rule, `allow_group=True` and no owner check, because Vault Agent
writes its sink as its own user with mode 0640 by default; others must still have no access.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from providers.errors import (
    SecretAccessDeniedError,
    SecretBackendError,
    SecretBadResponseError,
    SecretNotFoundError,
)
from providers.secrets.refs import SecretRef

__all__ = ["FileBackend", "FileProblem", "read_private_file"]

MAX_BYTES = 1024 * 1024


class FileProblem(Exception):
    """Why a secret file cannot be used; `kind` is not-found, denied or bad."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _check_opened(
    path: Path, info: os.stat_result, *, allow_group: bool, check_owner: bool
) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise FileProblem("bad", f"{path} is not a regular file")
    if check_owner and info.st_uid != os.geteuid():
        raise FileProblem(
            "denied",
            f"{path} is owned by {_user_name(info.st_uid)}, not by the agent's user"
            f" {_user_name(os.geteuid())}: chown it to that user",
        )
    closed_to = 0o007 if allow_group else 0o077
    if info.st_mode & closed_to:
        mode = stat.S_IMODE(info.st_mode)
        who = "others" if allow_group else "group or others"
        fix = "640" if allow_group else "600"
        raise FileProblem(
            "denied",
            f"{path} has mode {mode:04o}, which gives {who} access: chmod {fix} {path}",
        )


def read_private_file(path: Path, *, allow_group: bool = False, check_owner: bool = True) -> str:
    """The text of `path` minus one trailing newline, after checking who may read it.

    Raises FileProblem (never with any of the file's content in it).
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK  # a FIFO must not block us
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileProblem("not-found", f"{path} does not exist") from None
    except PermissionError:
        user = _user_name(os.geteuid())
        raise FileProblem("denied", f"{path} is not readable by the agent's user {user}") from None
    except OSError as exc:
        raise FileProblem("denied", f"cannot open {path}: {exc.strerror}") from None
    try:
        _check_opened(path, os.fstat(fd), allow_group=allow_group, check_owner=check_owner)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise FileProblem("bad", f"{path} is larger than {MAX_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FileProblem("bad", f"{path} is not UTF-8 text") from None
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


_ERRORS: dict[str, type[SecretBackendError]] = {
    "not-found": SecretNotFoundError,
    "denied": SecretAccessDeniedError,
    "bad": SecretBadResponseError,
}


class FileBackend:
    """Reads `file:` references from the agent's own host."""

    def read(self, ref: SecretRef) -> str:
        if ref.scheme != "file":
            raise SecretBackendError(f"{ref.raw}: not a file: reference", ref=ref.raw)
        try:
            return read_private_file(Path(ref.path))
        except FileProblem as problem:
            raise _ERRORS[problem.kind](f"{ref.raw}: {problem.reason}", ref=ref.raw) from None
