"""Resource items of fleets and roles (`- file: /etc/motd` ...), read into `ResourceSpec`:
the kind (the item's first key), its name, and the attributes that kind accepts, each
checked against the file, line and key. The agent turns a ResourceSpec into the engine's
`Resource` per host at reconcile time (templates rendered, sources read)."""

from __future__ import annotations

import difflib
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent.config.yamlnodes import INVALID, Fields, Value
from providers.hosts.templates import reads_variable

KINDS = ("file", "template", "directory", "link", "package", "service", "user", "group", "command")
_STATE = ("present", "absent")
_OWNERSHIP = ("mode", "owner", "group")
# What to do with the object when the repo stops listing it (providers/hosts/ledger.py).
_DROP = {"on_drop": "on_drop"}
_ON_DROP = ("remove", "keep")

# Attributes each kind accepts beside its own key, `notify` and `state`.
# The reader for each: str, bool, int, "mode", "strings" (a list), "env" (str -> str).
KIND_ATTRS: Mapping[str, Mapping[str, str]] = {
    "file": {
        "content": "str",
        "source": "source",
        "sensitive": "bool",
        **dict.fromkeys(_OWNERSHIP, "str"),
        **_DROP,
    },
    "template": {
        "source": "source",
        "vars": "vars",
        "sensitive": "bool",
        **dict.fromkeys(_OWNERSHIP, "str"),
        **_DROP,
    },
    "directory": {"recursive": "bool", **dict.fromkeys(_OWNERSHIP, "str"), **_DROP},
    "link": {"target": "str", **_DROP},
    "package": {"version": "str", "purge": "bool", **_DROP},
    "service": {"enabled": "bool"},
    "user": {
        "uid": "int",
        "group": "str",
        "groups": "strings",
        "shell": "str",
        "home": "str",
        "authorized_keys": "strings",
        **_DROP,
    },
    "group": {"gid": "int", **_DROP},
    "command": {
        "run": "str",  # the shell command (/bin/sh -c); the item's value is its label
        "creates": "str",
        "unless": "str",
        "onlyif": "str",
        "env": "env",
        "cwd": "str",
    },
}
_NO_STATE = ("command",)  # no state at all
_STATES: Mapping[str, tuple[str, ...]] = {"service": ("running", "stopped")}
PATH_KINDS = ("file", "template", "directory", "link")
# Command fields that end up in an argv (the shell text, its guards) or a path.
_COMMAND_LINE_KEYS = ("run", "unless", "onlyif", "creates", "cwd")


SourceCheck = Callable[[Value], str | None]


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    """One resource as the manifest writes it (templates not yet rendered)."""

    kind: str
    name: str
    attrs: Mapping[str, Any] = field(hash=False)
    notify: tuple[str, ...]
    where: str  # `gitops.yaml:12: roles.nginx[1]`, for messages

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"


class ResourceReader:
    """Reads resource items; `check_source` checks a `source:` path in the repository."""

    def __init__(self, check_source: SourceCheck, filename: str) -> None:
        self.check_source = check_source
        self.filename = filename

    def read(self, value: Value) -> ResourceSpec | None:
        """One item of `resources:` or of a role; None when it has problems (noted)."""
        fields = value.mapping()
        if fields is None:
            return None
        kind = self._kind(fields)
        if kind is None:
            return None
        allowed = KIND_ATTRS[kind]
        name = fields.entries[kind].string(_name_expected(kind))
        if name is None:
            return None
        if kind in PATH_KINDS and not posixpath.isabs(name):
            fields.entries[kind].fail("an absolute path on the host", repr(name))
            return None
        attrs: dict[str, Any] = {}
        notify: tuple[str, ...] = ()
        ok = True
        for key, item in fields:
            if key == kind:
                continue
            if key == "notify":
                notify = names(item, "a handler name")
            elif key == "state" and kind not in _NO_STATE:
                choices = _STATES.get(kind, _STATE)
                state = item.string(" or ".join(choices))
                if state not in (None, *choices):
                    item.fail(" or ".join(choices))
                    ok = False
                attrs["state"] = state or choices[0]
            elif key in allowed:
                read = self._attr(allowed[key], item)
                ok = ok and read is not INVALID
                attrs[key] = read
            else:
                known = ", ".join(
                    [kind, *allowed, "notify", *(() if kind in _NO_STATE else ("state",))]
                )
                # `- file: ...` then `package: ...` is two resources run together.
                another = f" ({key} is a kind: start a new list item)" if key in KINDS else ""
                fields.value.problems.note(
                    fields.key_lines[key],
                    f"{value.path}.{key}",
                    f"unknown key for a {kind}{another}; expected one of {known}",
                )
                ok = False
        if kind == "command":
            ok = self._no_secret_in_command_line(fields, attrs) and ok
        ok = ok and self._complete(kind, attrs, value)
        if not ok:
            return None
        if kind == "command":  # `- command: LABEL` with `run: SHELL TEXT`
            attrs["command"] = attrs.pop("run")
        return ResourceSpec(
            kind=kind,
            name=name,
            attrs=MappingProxyType(attrs),
            notify=notify,
            where=f"{self.filename}:{value.line}: {value.path}",
        )

    @staticmethod
    def _kind(fields: Fields) -> str | None:
        """The resource's kind: its first key (other keys may share a kind's name: `group`)."""
        expected = f"a resource kind as the first key ({', '.join(KINDS)})"
        first = next(iter(fields.entries), None)
        if first is None:
            fields.value.fail(expected, "an empty mapping")
            return None
        if first in KINDS:
            return first
        later = [key for key in fields.entries if key in KINDS]
        if later:
            got = f"{first!r}; move {later[0]!r} to the top of the item"
        elif close := difflib.get_close_matches(first, KINDS, n=1):
            got = f"{first!r} (did you mean {close[0]!r}?)"
        else:
            got = repr(first)
        fields.value.problems.expected(fields.key_lines[first], fields.value.path, expected, got)
        return None

    def _attr(self, reader: str, item: Value) -> Any:
        if reader == "str":
            text = item.string("a string", non_empty=False)
            return INVALID if text is None else text
        if reader == "bool":
            flag = item.boolean()
            return INVALID if flag is None else flag
        if reader == "int":
            number = item.integer(minimum=0)
            return INVALID if number is None else number
        if reader == "strings":
            items = item.sequence()
            texts = [i.string("a string") for i in items or ()]
            return INVALID if items is None or None in texts else tuple(texts)
        if reader == "env":
            fields = item.mapping()
            if fields is None:
                return INVALID
            env = {}
            for key, entry in fields:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                    fields.fail_key(key, "an environment variable name")
                    return INVALID
                text = entry.string("a string", non_empty=False)
                if text is None:
                    return INVALID
                env[key] = text
            return MappingProxyType(env)
        if reader == "vars":
            return read_vars(item)
        if reader == "on_drop":
            choice = item.string(" or ".join(_ON_DROP))
            if choice is None:
                return INVALID
            if choice not in _ON_DROP:
                item.fail(" or ".join(_ON_DROP), repr(choice))
                return INVALID
            return choice
        if reader == "source":
            relative = self.check_source(item)
            return INVALID if relative is None else relative
        raise AssertionError(reader)

    @staticmethod
    def _no_secret_in_command_line(fields: Fields, attrs: Mapping[str, Any]) -> bool:
        """A command line is readable by every user of the host (/proc/PID/cmdline): a
        secret may reach a command through `env:` only, which travels on stdin."""
        ok = True
        for key in _COMMAND_LINE_KEYS:
            text = attrs.get(key)
            if isinstance(text, str) and reads_variable(text, "secrets"):
                fields.value.problems.note(
                    fields.key_lines[key],
                    f"{fields.value.path}.{key}",
                    "a secret must not be part of a command line (every user of the host can"
                    ' read it in /proc/PID/cmdline); pass it in env: (TOKEN: "{{ secrets.x }}")'
                    ' and use "$TOKEN" in the command',
                )
                ok = False
        return ok

    def _complete(self, kind: str, attrs: dict[str, Any], value: Value) -> bool:
        """Per-kind rules that involve several keys."""
        absent = attrs.get("state") == "absent"
        mode = attrs.get("mode")
        if mode not in (None, INVALID) and not re.fullmatch(r"0?[0-7]{3,4}", str(mode)):
            value.fail('mode as an octal string like "0644"', repr(mode))
            return False
        if kind == "file" and not absent and ("content" in attrs) == ("source" in attrs):
            got = "both content and source" if "content" in attrs else "neither"
            value.fail("a file with exactly one of content or source", got)
            return False
        if kind == "template" and not absent and "source" not in attrs:
            value.fail(
                "a template with a source (a Jinja2 file in the repository)", "no source key"
            )
            return False
        if kind == "command" and "run" not in attrs:
            value.fail("a command with run: (the shell command, run with /bin/sh -c)", "no run key")
            return False
        if kind == "link" and not absent and "target" not in attrs:
            value.fail("a link with a target", "no target key")
            return False
        return True


def names(value: Value | None, what: str) -> tuple[str, ...]:
    """A list of names (handlers, roles); the items that are not strings are noted."""
    if value is None:
        return ()
    items = value.sequence()
    return tuple(t for t in (i.string(what) for i in items or ()) if t)


def read_vars(value: Value | None) -> Mapping[str, Any] | object:
    if value is None:
        return MappingProxyType({})
    if value.mapping() is None:
        return INVALID
    found = value.literal()
    return found if found is not INVALID else INVALID


def _name_expected(kind: str) -> str:
    if kind in PATH_KINDS:
        return "an absolute path on the host"
    if kind == "command":
        return "a label for the command (its name in reports)"
    return f"a {kind} name"
