"""file/template, directory and link: the fact query, the pure diff, the apply steps.

A file resource owns the whole file: its bytes, and the mode/owner/group it names (an
unset one is left as it is). A link or a regular file where a file must be is replaced
(atomically); a directory in the way is a conflict a person must resolve.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from providers.errors import ResourceConflictError
from providers.hosts.common import attr_changes, attr_steps, b64, norm_mode, type_word
from providers.hosts.model import Change, Resource
from providers.hosts.textdiff import content_diff, sha256, short
from providers.text import plural

Facts = Mapping[str, Any]
Op = dict[str, Any]


def _content(resource: Resource) -> bytes | None:
    content = resource.attrs.get("content")
    if isinstance(content, str):  # tolerated: the agent hands bytes, tests may hand text
        return content.encode("utf-8")
    return content


def _state(resource: Resource) -> str:
    return str(resource.attrs.get("state") or "present")


# --- file and template -----------------------------------------------------------------


def file_query(resource: Resource) -> dict[str, Any]:
    """What the host reports for a file: stat, sha256, and the old bytes if they differ."""
    content = _content(resource)
    return {
        "kind": "file",
        "path": resource.name,
        "sha256": sha256(content) if content is not None else None,
        "want_content": not resource.sensitive and _state(resource) == "present",
    }


def file_diff(resource: Resource, facts: Facts) -> list[Change]:
    """Changes that bring the file at `resource.name` to its desired state."""
    path = resource.name
    exists, kind = bool(facts.get("exists")), facts.get("type")
    if exists and kind == "dir":
        raise ResourceConflictError(f"{path} is a directory, not a file; not touching it")
    if _state(resource) == "absent":
        if not exists:
            return []
        size = f", {plural(facts['size'], 'byte')}" if kind == "file" else ""
        return [Change("state", kind, "absent", f"remove {type_word(facts)}{size}")]
    content = _content(resource)
    if not exists or kind != "file":
        if content is None:
            raise ResourceConflictError(f"{path} does not exist and no content is given")
        new_sha = sha256(content)
        verb = "create" if not exists else f"replace {type_word(facts)} with a file"
        shown = content_diff(
            path, None, content, old_sha=None, existed=False, sensitive=resource.sensitive
        )
        text = f"{verb} ({plural(len(content), 'byte')}, sha256 {short(new_sha)})"
        first = Change("state", kind if exists else None, "file", text, shown)
        return [first, *attr_changes(resource.attrs, facts, exists=False)]
    changes: list[Change] = []
    if content is not None and facts.get("sha256") != sha256(content):
        old_b64 = facts.get("content_b64")
        old = base64.b64decode(old_b64) if old_b64 is not None else None
        shown = content_diff(
            path,
            old,
            content,
            old_sha=facts.get("sha256"),
            existed=True,
            sensitive=resource.sensitive,
        )
        old_sha, new_sha = facts.get("sha256"), sha256(content)
        text = f"content changed (sha256 {short(old_sha)} -> {short(new_sha)})"
        changes.append(Change("content", old_sha, new_sha, text, shown))
    return changes + attr_changes(resource.attrs, facts, exists=True)


def file_operation(resource: Resource, facts: Facts, changes: list[Change]) -> Op:
    """The steps that apply `changes` to the file."""
    path, attrs = resource.name, resource.attrs
    if _state(resource) == "absent":
        return {"steps": [{"do": "remove", "path": path}]}
    if {change.attr for change in changes} & {"state", "content"}:
        write = {
            "do": "write",
            "path": path,
            "content_b64": b64(_content(resource) or b""),
            "mode": norm_mode(attrs.get("mode")),
            "owner": attrs.get("owner"),
            "group": attrs.get("group"),
        }
        return {"steps": [write]}
    return {"steps": attr_steps(path, attrs, changes)}


# --- directory -------------------------------------------------------------------------


def directory_query(resource: Resource) -> dict[str, Any]:
    """What the host reports for a directory (following a link to one)."""
    return {"kind": "directory", "path": resource.name}


def directory_diff(resource: Resource, facts: Facts) -> list[Change]:
    """Changes that bring the directory to its desired state."""
    path = resource.name
    exists, is_dir = bool(facts.get("exists")), facts.get("type") == "dir"
    if _state(resource) == "absent":
        if not exists:
            return []
        if not is_dir:
            what = type_word(facts)
            raise ResourceConflictError(f"{path} is a {what}, not a directory; not removing it")
        if facts.get("link"):
            return [Change("state", "link", "absent", "remove link to a directory")]
        if facts.get("empty"):
            return [Change("state", "directory", "absent", "remove empty directory")]
        if not resource.attrs.get("recursive"):
            raise ResourceConflictError(
                f"{path} is not empty; set recursive: true to remove it with its contents"
            )
        return [Change("state", "directory", "absent", "remove directory and its contents")]
    if not exists:
        created = Change("state", None, "directory", "create directory")
        return [created, *attr_changes(resource.attrs, facts, exists=False)]
    if not is_dir:
        what = type_word(facts)
        raise ResourceConflictError(f"{path} is a {what}, not a directory; not replacing it")
    return attr_changes(resource.attrs, facts, exists=True)


def directory_operation(resource: Resource, facts: Facts, changes: list[Change]) -> Op:
    """The steps that apply `changes` to the directory."""
    path, attrs = resource.name, resource.attrs
    if _state(resource) == "absent":
        return {"steps": [{"do": "rmdir", "path": path, "recursive": bool(attrs.get("recursive"))}]}
    if any(change.attr == "state" for change in changes):
        mkdir = {
            "do": "mkdir",
            "path": path,
            "mode": norm_mode(attrs.get("mode")),
            "owner": attrs.get("owner"),
            "group": attrs.get("group"),
        }
        return {"steps": [mkdir]}
    return {"steps": attr_steps(path, attrs, changes)}


# --- link ------------------------------------------------------------------------------


def link_query(resource: Resource) -> dict[str, Any]:
    """What the host reports for a link: its type and target."""
    return {"kind": "link", "path": resource.name}


def link_diff(resource: Resource, facts: Facts) -> list[Change]:
    """Changes that bring the symbolic link to its desired state."""
    path = resource.name
    exists, kind = bool(facts.get("exists")), facts.get("type")
    if _state(resource) == "absent":
        if not exists:
            return []
        if kind != "link":
            what = type_word(facts)
            raise ResourceConflictError(f"{path} is a {what}, not a link; not removing it")
        return [Change("state", facts.get("target"), None, f"remove link -> {facts.get('target')}")]
    target = str(resource.attrs["target"])
    if not exists:
        return [Change("state", None, target, f"create link -> {target}")]
    if kind == "dir":
        raise ResourceConflictError(f"{path} is a directory; not replacing it with a link")
    if kind != "link":
        text = f"replace {type_word(facts)} with link -> {target}"
        return [Change("state", kind, target, text)]
    if facts.get("target") != target:
        old = facts.get("target")
        return [Change("target", old, target, f"target {old} -> {target}")]
    return []


def link_operation(resource: Resource, facts: Facts, changes: list[Change]) -> Op:
    """The steps that apply `changes` to the link."""
    if _state(resource) == "absent":
        return {"steps": [{"do": "remove", "path": resource.name}]}
    target = str(resource.attrs["target"])
    return {"steps": [{"do": "symlink", "path": resource.name, "target": target}]}
