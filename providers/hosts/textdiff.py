"""How content changes are shown: unified diffs for text, hashes for secrets and binaries."""

from __future__ import annotations

import difflib
import hashlib

from providers.text import plural

MAX_DIFF_CHARS = 20_000  # one resource's diff in a report; the rest is cut with a note
HASH_CHARS = 12


def sha256(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def short(digest: str | None) -> str:
    """The first 12 hex digits of a sha256: enough to tell contents apart in a report."""
    return (digest or "")[:HASH_CHARS] or "none"


def _text(data: bytes) -> str | None:
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _lines(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n\\ No newline at end of file\n"
    return lines


def cap(diff: str, limit: int = MAX_DIFF_CHARS) -> str:
    """`diff` cut at a line boundary under `limit` characters, with a note saying so."""
    if len(diff) <= limit:
        return diff
    cut = diff.rfind("\n", 0, limit) + 1
    hidden = diff[cut:].count("\n")
    return f"{diff[:cut]}... diff cut: {hidden} more lines\n"


def content_diff(
    path: str,
    old: bytes | None,
    new: bytes,
    *,
    old_sha: str | None,
    existed: bool,
    sensitive: bool,
) -> str:
    """A readable diff of a content change at `path`.

    `old` is None when the host did not send the old bytes (too large, or sensitive).
    Sensitive or binary contents show only sha256 prefixes, never a byte of either side.
    """
    new_sha = sha256(new)
    hashes = f"sha256 {short(old_sha) if existed else 'none'} -> {short(new_sha)}"
    if sensitive:
        return f"{path}: sensitive content not shown ({hashes})\n"
    old_text = "" if not existed else (_text(old) if old is not None else None)
    new_text = _text(new)
    if new_text is None or (existed and old is not None and old_text is None):
        return f"{path}: binary content not shown ({hashes}, {plural(len(new), 'byte')})\n"
    if old_text is None:
        return f"{path}: old content not shown, larger than the diff limit ({hashes})\n"
    lines = difflib.unified_diff(
        _lines(old_text),
        _lines(new_text),
        fromfile=f"{path} (on host)" if existed else "/dev/null",
        tofile=f"{path} (desired)",
    )
    return cap("".join(lines))
