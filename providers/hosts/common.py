"""Small pure helpers shared by the resource kinds."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

from providers.hosts.model import Change

TYPE_WORDS = {"file": "file", "dir": "directory", "link": "link", "other": "special file"}
# Names that go into a command line as arguments: never an option, never whitespace.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+:~@-]*")


def type_word(facts: Mapping[str, Any]) -> str:
    """'file', 'directory', 'link' or 'special file', for messages."""
    return TYPE_WORDS.get(str(facts.get("type")), "special file")


def norm_mode(mode: str | int | None) -> str | None:
    """'644', '0644' or 0o644 as '0644'; None stays None (leave the mode as it is)."""
    if mode is None:
        return None
    value = mode if isinstance(mode, int) else int(str(mode), 8)
    return f"{value:04o}"


def same_id(desired: str | int | None, name: Any, number: Any) -> bool:
    """Whether an owner/group given by name or number matches the host's name and id."""
    if desired is None:
        return True
    text = str(desired)
    return text == str(number) if text.isdigit() else text == name


def b64(data: bytes) -> str:
    """Bytes as base64 text, for the JSON sent to the host."""
    return base64.b64encode(data).decode("ascii")


def attr_changes(
    attrs: Mapping[str, Any], facts: Mapping[str, Any], *, exists: bool
) -> list[Change]:
    """mode/owner/group changes for a file or directory (on a new one: what it will get)."""
    changes: list[Change] = []
    mode = norm_mode(attrs.get("mode"))
    owner, group = attrs.get("owner"), attrs.get("group")
    if not exists:
        for name, value in (("mode", mode), ("owner", owner), ("group", group)):
            if value is not None:
                changes.append(Change(name, None, str(value), f"{name} {value}"))
        return changes
    if mode is not None and mode != facts.get("mode"):
        changes.append(
            Change("mode", facts.get("mode"), mode, f"mode {facts.get('mode')} -> {mode}")
        )
    for name, value in (("owner", owner), ("group", group)):
        number = facts.get("uid" if name == "owner" else "gid")
        if not same_id(value, facts.get(name), number):
            before = facts.get(name)
            changes.append(Change(name, before, str(value), f"{name} {before} -> {value}"))
    return changes


def attr_steps(path: str, attrs: Mapping[str, Any], changes: list[Change]) -> list[dict[str, Any]]:
    """chown/chmod steps for the mode/owner/group changes of an existing path."""
    changed = {change.attr for change in changes}
    steps: list[dict[str, Any]] = []
    if changed & {"owner", "group"}:
        steps.append(
            {
                "do": "chown",
                "path": path,
                "owner": attrs.get("owner") if "owner" in changed else None,
                "group": attrs.get("group") if "group" in changed else None,
            }
        )
    if "mode" in changed:  # after chown, which clears setuid bits
        steps.append({"do": "chmod", "path": path, "mode": norm_mode(attrs.get("mode"))})
    return steps
