"""The file backend: real files with real modes and owners."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from providers.errors import (
    SecretAccessDeniedError,
    SecretBackendError,
    SecretBadResponseError,
    SecretNotFoundError,
)
from providers.secrets.files import FileBackend
from providers.secrets.refs import parse_ref
from providers.secrets.resolve import resolve_all

VALUE = "hunter2-file-secret"


def _write(path: Path, data: bytes | str, mode: int = 0o600) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def _read(path: Path) -> str:
    return FileBackend().read(parse_ref(f"file:{path}"))


def _fails(path: Path, kind: type[SecretBackendError]) -> SecretBackendError:
    with pytest.raises(kind) as caught:
        _read(path)
    message = str(caught.value)
    assert VALUE not in message
    assert message.startswith(f"file:{path}: ")
    assert not caught.value.retryable
    return caught.value


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (VALUE, VALUE),
        (VALUE + "\n", VALUE),
        (VALUE + "\r\n", VALUE),
        (VALUE + "\n\n", VALUE + "\n"),
        ("line one\nline two\n", "line one\nline two"),
        ("", ""),
    ],
)
def test_reads_and_strips_one_newline(tmp_path: Path, content: str, expected: str) -> None:
    assert _read(_write(tmp_path / "s", content)) == expected


def test_read_only_owner_mode_is_fine(tmp_path: Path) -> None:
    assert _read(_write(tmp_path / "s", VALUE, 0o400)) == VALUE


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o620, 0o601])
def test_refuses_group_or_world_access(tmp_path: Path, mode: int) -> None:
    path = _write(tmp_path / "s", VALUE, mode)
    err = _fails(path, SecretAccessDeniedError)
    assert f"mode {mode:04o}" in str(err)
    assert "chmod 600" in str(err)
    assert err.kind == "denied"


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_refuses_a_file_owned_by_another_user(tmp_path: Path) -> None:
    path = _write(tmp_path / "s", VALUE)
    os.chown(path, 65534, 65534)
    err = _fails(path, SecretAccessDeniedError)
    assert "uid 65534" in str(err) and "chown" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    err = _fails(tmp_path / "nope", SecretNotFoundError)
    assert "does not exist" in str(err)
    assert err.kind == "not-found"


def test_directory_is_not_a_secret(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir(mode=0o700)
    assert "not a regular file" in str(_fails(tmp_path / "dir", SecretBadResponseError))


def test_fifo_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo", 0o600)
    assert "not a regular file" in str(_fails(tmp_path / "fifo", SecretBadResponseError))


def test_binary_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "s", b"\xff\xfe" + VALUE.encode())
    assert "not UTF-8" in str(_fails(path, SecretBadResponseError))


def test_symlink_to_a_good_file_is_followed(tmp_path: Path) -> None:
    target = _write(tmp_path / "target", VALUE + "\n")
    (tmp_path / "link").symlink_to(target)
    assert _read(tmp_path / "link") == VALUE


def test_resolve_all_with_files(tmp_path: Path) -> None:
    good = _write(tmp_path / "good", VALUE + "\n")
    loose = _write(tmp_path / "loose", VALUE, 0o644)
    refs = [parse_ref(f"file:{p}") for p in (good, loose, tmp_path / "missing", good)]
    backend = FileBackend()
    result = resolve_all(refs, lambda ref: backend, retry_for=5.0)
    assert set(result) == {f"file:{good}", f"file:{loose}", f"file:{tmp_path / 'missing'}"}
    assert result[f"file:{good}"] == VALUE
    assert isinstance(result[f"file:{loose}"], SecretAccessDeniedError)
    assert isinstance(result[f"file:{tmp_path / 'missing'}"], SecretNotFoundError)
    assert VALUE not in str(result[f"file:{loose}"])
