"""user and group: local accounts via useradd/usermod/userdel and groupadd/groupmod/groupdel.

The host reads users and groups with pwd/grp (no fork). `groups` is the exact list of
supplementary groups (others are removed); `authorized_keys` is the exact content of
~/.ssh/authorized_keys (keys not listed are removed), 0600 and owned by the user.
An attribute left unset (None) is not managed.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from providers.errors import ResourceConflictError
from providers.hosts.common import SAFE_NAME, b64, same_id
from providers.hosts.model import Change, Resource
from providers.hosts.textdiff import content_diff, sha256, short

Facts = Mapping[str, Any]
Op = dict[str, Any]

# user attribute -> useradd/usermod option
USER_OPTIONS = (("uid", "-u"), ("group", "-g"), ("groups", "-G"), ("shell", "-s"), ("home", "-d"))


def _absent(resource: Resource) -> bool:
    return resource.attrs.get("state") == "absent"


def _check_name(resource: Resource) -> None:
    if not SAFE_NAME.fullmatch(resource.name):
        raise ResourceConflictError(f"{resource.name!r} is not a {resource.kind} name")


def keys_content(keys: Sequence[str]) -> bytes:
    """The authorized_keys file for `keys`: one key per line."""
    return "".join(f"{line.rstrip()}\n" for line in keys).encode("utf-8")


# --- user ------------------------------------------------------------------------------


def user_query(resource: Resource) -> dict[str, Any]:
    """What the host reports for a user; its authorized_keys only when they are managed."""
    keys = resource.attrs.get("authorized_keys")
    query: dict[str, Any] = {"kind": "user", "name": resource.name, "keys": keys is not None}
    if keys is not None:
        query["sha256"] = sha256(keys_content(keys))
    return query


def _groups_text(groups: Sequence[str]) -> str:
    return ",".join(groups) or "(none)"


def _keys_path(resource: Resource) -> str:
    return f"~{resource.name}/.ssh/authorized_keys"


def _keys_changes(resource: Resource, facts: Facts, *, created: bool) -> list[Change]:
    keys = resource.attrs.get("authorized_keys")
    if keys is None:
        return []
    content, path = keys_content(keys), _keys_path(resource)
    new_sha = sha256(content)
    current = facts.get("authorized_keys") or {"exists": False}
    if created or not current.get("exists"):
        if not keys:
            return []  # no file is the same as an empty one
        shown = content_diff(
            path, None, content, old_sha=None, existed=False, sensitive=resource.sensitive
        )
        noun = "key" if len(keys) == 1 else "keys"
        text = f"authorized_keys: {len(keys)} {noun}"
        return [Change("authorized_keys", None, new_sha, text, shown)]
    if current.get("type") != "file" or current.get("sha256") != new_sha:
        old_b64 = current.get("content_b64")
        old = base64.b64decode(old_b64) if old_b64 is not None else None
        old_sha = current.get("sha256")
        shown = content_diff(
            path, old, content, old_sha=old_sha, existed=True, sensitive=resource.sensitive
        )
        text = f"authorized_keys changed (sha256 {short(old_sha)} -> {short(new_sha)})"
        return [Change("authorized_keys", old_sha, new_sha, text, shown)]
    if current.get("mode") != "0600" or current.get("uid") != facts.get("uid"):
        before = f"{current.get('mode')} {current.get('owner')}"
        text = f"authorized_keys mode/owner {before} -> 0600 {resource.name}"
        return [Change("authorized_keys", before, f"0600 {resource.name}", text)]
    return []


def _shown(value: Any) -> str:
    """An attribute value as a person reads it: lists comma-separated."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def _supplementary(attrs: Mapping[str, Any], facts: Facts) -> list[str]:
    """`groups` without the primary group: the host reports supplementary groups only,
    so listing the primary one too must not look like a change on every pass."""
    primary = attrs.get("group")
    if primary is None:
        return sorted(g for g in set(attrs["groups"]) if g != facts.get("group"))
    name = facts.get("group") if same_id(primary, facts.get("group"), facts.get("gid")) else None
    return sorted(g for g in set(attrs["groups"]) if g not in (str(primary), name))


def user_diff(resource: Resource, facts: Facts) -> list[Change]:
    """Create, modify or remove the user, and its authorized_keys."""
    _check_name(resource)
    exists, attrs = bool(facts.get("exists")), resource.attrs
    if _absent(resource):
        return (
            [Change("state", "present", "absent", f"remove user (uid {facts.get('uid')})")]
            if exists
            else []
        )
    if not exists:
        details = [
            f"{attr} {_shown(attrs[attr])}"
            for attr, _ in USER_OPTIONS
            if attrs.get(attr) not in (None, [], ())
        ]
        text = "create user" + (f" ({', '.join(details)})" if details else "")
        return [
            Change("state", None, "present", text),
            *_keys_changes(resource, facts, created=True),
        ]
    changes: list[Change] = []
    if attrs.get("uid") is not None and int(attrs["uid"]) != facts.get("uid"):
        changes.append(
            Change(
                "uid",
                facts.get("uid"),
                int(attrs["uid"]),
                f"uid {facts.get('uid')} -> {attrs['uid']}",
            )
        )
    if not same_id(attrs.get("group"), facts.get("group"), facts.get("gid")):
        changes.append(
            Change(
                "group",
                facts.get("group"),
                attrs["group"],
                f"group {facts.get('group')} -> {attrs['group']}",
            )
        )
    if attrs.get("groups") is not None:
        wanted, current = _supplementary(attrs, facts), sorted(facts.get("groups") or [])
        if wanted != current:
            text = f"groups {_groups_text(current)} -> {_groups_text(wanted)}"
            changes.append(Change("groups", current, wanted, text))
    for attr in ("shell", "home"):
        if attrs.get(attr) is not None and attrs[attr] != facts.get(attr):
            changes.append(
                Change(
                    attr, facts.get(attr), attrs[attr], f"{attr} {facts.get(attr)} -> {attrs[attr]}"
                )
            )
    return changes + _keys_changes(resource, facts, created=False)


def _user_argv(command: str, resource: Resource, attrs_to_set: Sequence[str]) -> list[str]:
    argv = [command]
    if command == "useradd":
        argv.append("-m")  # create the home directory
    for attr, option in USER_OPTIONS:
        if attr not in attrs_to_set:
            continue
        value = resource.attrs[attr]
        if attr == "groups":
            value = ",".join(sorted(set(value)))
        argv += [option, str(value)]
    return [*argv, resource.name]


def user_operation(resource: Resource, facts: Facts, changes: list[Change]) -> Op:
    """useradd/usermod/userdel, then the authorized_keys file."""
    if _absent(resource):
        return {"steps": [{"do": "run", "argv": ["userdel", resource.name]}]}
    changed = {change.attr for change in changes}
    steps: list[dict[str, Any]] = []
    if "state" in changed:
        given = [a for a, _ in USER_OPTIONS if resource.attrs.get(a) not in (None, [], ())]
        step: dict[str, Any] = {"do": "run", "argv": _user_argv("useradd", resource, given)}
        if resource.attrs.get("group") is None:
            # Debian's useradd refuses to make a user group that exists already ("group app
            # exists ... use -g"), e.g. one a `group:` resource made earlier in this apply:
            # the host adds `-g NAME` when a group of the user's name exists at that moment.
            step["user_group"] = resource.name
        steps.append(step)
    elif changed - {"authorized_keys"}:
        steps.append({"do": "run", "argv": _user_argv("usermod", resource, sorted(changed))})
    if "authorized_keys" in changed:
        content = keys_content(resource.attrs["authorized_keys"])
        steps.append({"do": "authorized_keys", "user": resource.name, "content_b64": b64(content)})
    return {"steps": steps}


# --- group -----------------------------------------------------------------------------


def group_query(resource: Resource) -> dict[str, Any]:
    """What the host reports for a group: whether it exists, its gid."""
    return {"kind": "group", "name": resource.name}


def group_diff(resource: Resource, facts: Facts) -> list[Change]:
    """Create, renumber or remove the group."""
    _check_name(resource)
    exists, gid = bool(facts.get("exists")), resource.attrs.get("gid")
    if _absent(resource):
        return (
            [Change("state", "present", "absent", f"remove group (gid {facts.get('gid')})")]
            if exists
            else []
        )
    if not exists:
        return [
            Change(
                "state",
                None,
                "present",
                "create group" + (f" (gid {gid})" if gid is not None else ""),
            )
        ]
    if gid is not None and int(gid) != facts.get("gid"):
        return [Change("gid", facts.get("gid"), int(gid), f"gid {facts.get('gid')} -> {gid}")]
    return []


def group_operation(resource: Resource, facts: Facts, changes: list[Change]) -> Op:
    """groupadd/groupmod/groupdel."""
    name, gid = resource.name, resource.attrs.get("gid")
    if _absent(resource):
        return {"steps": [{"do": "run", "argv": ["groupdel", name]}]}
    command = "groupadd" if any(change.attr == "state" for change in changes) else "groupmod"
    argv = [command, *(["-g", str(gid)] if gid is not None else []), name]
    return {"steps": [{"do": "run", "argv": argv}]}
