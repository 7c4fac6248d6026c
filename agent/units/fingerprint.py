"""A unit's input fingerprint: what its converged state was computed from.

A unit "moved" when one of its own inputs changed since it last converged, never
because of a commit elsewhere in the repository. The inputs, each hashed apart (so a
change can be named):

    stack      the stack directory's files, and every local module it references
               (`source = "./..."` / `"../..."`), transitively, and every other path a
               .tf string names relative to a module or the root (`file("${path.module}/
               ../x")`): a stack can read any file of the checkout
    manifest   the unit's entry: vars, policies, dependencies, secret references, and
               for a fleet its settings, roles, inline resources and handlers
    files      a fleet's template and source files
    hosts      a fleet's hosts (the static list, or as read from a stack output)
    upstream   the outputs of other units that the unit reads (`from_stack`)
    secrets    the resolved values of the unit's secrets
    terraform  the Terraform binary, its version and the executable's identity (stacks)
    backend    where the stack's state is kept: the agent's state file, or the stack's
               own backend (whose settings are in the stack's files)
    state      the state's serial and lineage (stacks whose state the agent keeps;
               "unknown" for a backend only Terraform can read)

`state` is *observed*, not an input from Git: the unit's own apply moves it, so it is
recorded as it stands after the unit's work, and a difference makes a changed-only pass
plan (someone else wrote the state) without making the plan a change from Git.

Every part is an HMAC with a key kept in the state directory (0600), so a recorded
fingerprint cannot be used to confirm a guessed secret or output value.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets as random
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import StackOutputRef, Unit
from agent.config.fleet import Fleet, HostsFromEc2, HostsFromStack
from agent.config.manifest import Manifest, plain_value
from agent.core.fsutil import atomic_write
from agent.core.redact import Secret
from agent.state.sharedvalue import shared_value
from agent.state.store import RunStore

KEY_FILE = "fingerprint.key"
PARTS = (
    "stack",
    "manifest",
    "files",
    "hosts",
    "upstream",
    "secrets",
    "terraform",
    "backend",
    "state",
)
# Parts the unit's own work moves: they say "plan again", never "a change from Git".
OBSERVED = frozenset({"state"})
# A part whose value cannot be known without running Terraform: always "changed".
UNKNOWN = "unknown"

# `source = "./x"` or `"../x"` anywhere in a .tf file: module sources (and provisioner
# sources, which are inputs too). Registry and Git sources do not start with a dot.
_LOCAL_SOURCE = re.compile(r'\bsource\s*=\s*"(\.\.?/[^"]*)"')
# Any other string that names a path relative to the module or the root, e.g.
# `file("${path.module}/../shared/x.json")` or `templatefile("../t/${var.env}.tpl", ...)`:
# Terraform runs in a shadow of the whole checkout, so a stack can read files outside its
# directory. The static part of each such path is hashed (a directory when the path goes
# on with an interpolation): a file it reads must never leave a unit "unchanged".
_PATH_STRING = re.compile(r'"((?:\$\{path\.(?:module|root)\}/|\.\.?/)[^"\n]*)"')


# `terraform init` writes the lock file into the checkout when the repo has none (the
# checkout keeps untracked files), so its presence says nothing about Git: left out. The
# providers it pins follow from the `required_providers` blocks, which are hashed.
_WRITTEN_BY_INIT = frozenset({".terraform.lock.hcl"})


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The HMAC of each kind of input (see PARTS); `digest` covers them all."""

    parts: Mapping[str, str]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.encode().encode()).hexdigest()

    def encode(self) -> str:
        """The form kept in the store."""
        return json.dumps(dict(sorted(self.parts.items())), separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | None) -> Fingerprint | None:
        if not text:
            return None
        try:
            parts = json.loads(text)
        except ValueError:
            return None  # unreadable: treated as never converged (the unit counts as moved)
        if not isinstance(parts, dict):
            return None
        return cls({str(k): str(v) for k, v in parts.items()})

    def moved_from(self, previous: Fingerprint | None) -> tuple[str, ...]:
        """The kinds of input from Git, secrets or other units that differ from `previous`
        (all, if there is none). Observed parts are left out, and so are parts `previous`
        does not have (recorded by an agent that did not take them): those make a pass
        plan (see `changed_from`) but a plan they cause is not a change from Git."""
        if previous is None:
            return tuple(sorted(k for k in self.parts if k not in OBSERVED))
        kinds = (set(self.parts) & set(previous.parts)) - OBSERVED
        return tuple(sorted(k for k in kinds if self.parts.get(k) != previous.parts.get(k)))

    def changed_from(self, previous: Fingerprint | None) -> tuple[str, ...]:
        """Every kind of input that differs from `previous`, or cannot be known (then a
        changed-only pass must plan the unit): all of them if there is no `previous`."""
        if previous is None:
            return tuple(sorted(self.parts))
        kinds = set(self.parts) | set(previous.parts)
        return tuple(
            sorted(
                k
                for k in kinds
                if self.parts.get(k) != previous.parts.get(k) or self.parts.get(k) == UNKNOWN
            )
        )

    def with_parts(self, parts: Mapping[str, str]) -> Fingerprint:
        """This fingerprint with `parts` replaced (the observed ones, after the work)."""
        return Fingerprint({**self.parts, **parts})


def load_key(state_dir: Path) -> bytes:
    """The state directory's fingerprint key, made on first use (32 random bytes, 0600)."""
    path = state_dir / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = b""
    if len(key) < 32:
        atomic_write(path, random.token_hex(32))
        key = path.read_bytes()
    return key


def agent_key(store: RunStore, state_dir: Path) -> bytes:
    """The key this agent hashes with: its state directory's, or with a shared (PostgreSQL)
    store the store's, so that every agent computes the same fingerprints and a unit that
    moves to another agent does not look moved (the first agent's key becomes the store's)."""
    local = load_key(state_dir)
    if not store.postgres:
        return local
    return shared_value(store, "fingerprint_key", local.decode()).encode()


_KEY_LOCK = threading.Lock()  # the stack and fleet hashers share one key file


class Hasher:
    """Keyed hashes of inputs; one per agent (the key never changes while it runs).

    `key` may be a function that loads it: it is called at the first hash, inside a pass,
    so that an agent whose disk is full starts and reports that from its store."""

    def __init__(self, key: bytes | Callable[[], bytes]) -> None:
        self._source = key
        self._loaded: bytes | None = key if isinstance(key, bytes) else None

    @property
    def _key(self) -> bytes:
        if self._loaded is None:
            with _KEY_LOCK:
                if self._loaded is None:
                    source = self._source
                    assert callable(source)
                    self._loaded = source()
        return self._loaded

    def value(self, value: Any) -> str:
        """The HMAC of a JSON-able value (secrets revealed only into the hash)."""
        text = json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"))
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def files(self, tree: Path, paths: Iterable[str]) -> str:
        """The HMAC of files and directories under `tree` (names and contents); a path
        that leaves the tree is hashed by name only, never read."""
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        root = tree.resolve()
        for rel in sorted(set(paths)):
            for name, path in _walk(root, rel):
                mac.update(name.encode() + b"\0")
                try:
                    data = path.read_bytes() if path is not None else b"<outside the repo>"
                except OSError as exc:
                    data = f"<unreadable: {exc.strerror}>".encode()
                mac.update(hashlib.sha256(data).digest())
        return mac.hexdigest()


def stack_fingerprint(
    hasher: Hasher,
    tree: Path,
    unit: Unit,
    *,
    upstream: Mapping[str, Any],
    secrets: Mapping[str, Secret],
    terraform: Any,
    backend: Any,
    state: str,
) -> Fingerprint:
    """A stack unit's fingerprint; `upstream` holds the `from_stack` values it reads, by
    variable name; `terraform` names the binary, its version and identity; `backend` says
    where the state is kept; `state` is `state_part(...)`."""
    return Fingerprint(
        {
            "stack": hasher.files(tree, stack_paths(tree, unit.stack)),
            "manifest": hasher.value(_unit_entry(unit)),
            "upstream": hasher.value(upstream),
            "secrets": hasher.value(secrets),
            "terraform": hasher.value(terraform),
            "backend": hasher.value(backend),
            "state": state,
        }
    )


# Terraform writes `serial` and `lineage` near the top of a state file; the whole file
# (megabytes for a big stack) is parsed only when the head does not hold them.
_SERIAL = re.compile(rb'"serial"\s*:\s*(\d+)')
_LINEAGE = re.compile(rb'"lineage"\s*:\s*"([^"]*)"')
_HEAD = 4096


def state_part(hasher: Hasher, state_file: Path | None) -> str:
    """The `state` part: the HMAC of the local state's serial and lineage ("absent" before
    the first apply), or UNKNOWN when `state_file` is None (a backend only Terraform reads)."""
    if state_file is None:
        return UNKNOWN
    try:
        with state_file.open("rb") as handle:
            head = handle.read(_HEAD)
            serial, lineage = _SERIAL.search(head), _LINEAGE.search(head)
            if serial and lineage:
                return hasher.value([int(serial.group(1)), lineage.group(1).decode()])
            handle.seek(0)
            document = json.loads(handle.read())
    except FileNotFoundError:
        return hasher.value("absent")
    except (OSError, ValueError):
        return UNKNOWN
    if not isinstance(document, dict):
        return UNKNOWN
    return hasher.value([document.get("serial"), document.get("lineage")])


def fleet_fingerprint(
    hasher: Hasher,
    tree: Path,
    unit: Unit,
    manifest: Manifest,
    *,
    hosts: Any,
    upstream: Mapping[str, Any],
    secrets: Mapping[str, Secret],
) -> Fingerprint:
    """A fleet unit's fingerprint; `hosts` is the host list as resolved for this pass."""
    assert unit.fleet is not None
    fleet = unit.fleet
    role_names = list(fleet.roles)
    for host in hosts if isinstance(hosts, tuple | list) else ():
        role_names += list(getattr(host, "roles", ()))
    roles = {name: manifest.roles.get(name, ()) for name in dict.fromkeys(role_names)}
    specs = [spec for specs in roles.values() for spec in specs] + list(fleet.resources)
    sources = [
        str(spec.attrs["source"])
        for spec in specs
        if spec.kind in ("template", "file") and isinstance(spec.attrs.get("source"), str)
    ]
    entry = {
        "unit": _unit_entry(unit),
        "fleet": _fleet_entry(fleet),
        "roles": {name: [_spec(s) for s in items] for name, items in roles.items()},
        "handlers": {name: [h.service, h.action] for name, h in sorted(manifest.handlers.items())},
    }
    return Fingerprint(
        {
            "manifest": hasher.value(entry),
            "files": hasher.files(tree, sources),
            "hosts": hasher.value(hosts),
            "upstream": hasher.value(upstream),
            "secrets": hasher.value(secrets),
        }
    )


def stack_paths(tree: Path, stack: str) -> list[str]:
    """The stack directory and every local module it references, transitively (paths
    relative to `tree`; a reference leaving the tree is kept by name, never followed)."""
    root = tree.resolve()
    seen: list[str] = []
    todo = [stack]
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.append(rel)
        directory = (root / rel).resolve()
        if not directory.is_relative_to(root) or not directory.is_dir():
            continue
        for tf in sorted([*directory.glob("*.tf"), *directory.glob("*.tf.json")]):
            try:
                text = tf.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            modules = set(_LOCAL_SOURCE.findall(text))
            for source in modules:
                todo.append(os.path.normpath(os.path.join(rel, source)))
            for found in _PATH_STRING.findall(text):
                if found in modules:
                    continue
                path = _static_path(found, module=rel, root=stack)
                if path is not None and path not in seen:
                    seen.append(path)  # hashed, not followed: a file, or a tree of them
    return seen


def _static_path(text: str, *, module: str, root: str) -> str | None:
    """The part of a path string that is known before Terraform runs, relative to the
    tree: up to the last `/` before the first interpolation."""
    for prefix, base in (("${path.module}/", module), ("${path.root}/", root)):
        if text.startswith(prefix):
            text, start = text[len(prefix) :], base
            break
    else:
        start = module
    if "${" in text or "%{" in text:
        text = text[: min(i for i in (text.find("${"), text.find("%{")) if i >= 0)]
        text = text.rsplit("/", 1)[0] if "/" in text else ""
    path = os.path.normpath(os.path.join(start, text))
    # A parent of the module is hashed whole (the whole repository for "."): doubt plans.
    inside = path == module or path.startswith(module.rstrip("/") + "/")
    return None if inside else path  # a path inside the module is hashed with it


def _walk(root: Path, rel: str) -> Iterable[tuple[str, Path | None]]:
    """(name, path) of every file at or under `rel`, sorted; path None when `rel` leaves
    the tree (a symlink out of the repo is never read)."""
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        yield rel, None
        return
    if target.is_file():
        yield rel, target
        return
    if not target.is_dir():
        yield rel, None
        return
    for dirpath, dirnames, filenames in os.walk(target):
        dirnames[:] = sorted(d for d in dirnames if d not in (".terraform", ".git"))
        for name in sorted(filenames):
            if name in _WRITTEN_BY_INIT:
                continue
            path = Path(dirpath) / name
            resolved = path.resolve()
            shown = f"{rel}/{path.relative_to(target).as_posix()}"
            yield shown, resolved if resolved.is_relative_to(root) else None


def unit_entry(unit: Unit, manifest: Manifest) -> dict[str, Any]:
    """What the manifest says of `unit`, as plain data (equal when the entry did not change):
    for a fleet, its settings, static hosts, the roles it and its hosts use, and handlers."""
    entry = _unit_entry(unit)
    fleet = unit.fleet
    if fleet is None:
        return entry
    hosts = fleet.hosts if isinstance(fleet.hosts, tuple) else ()
    names = dict.fromkeys([*fleet.roles, *(r for h in hosts for r in h.roles)])
    return {
        **entry,
        "fleet": _fleet_entry(fleet),
        "hosts": [_jsonable(h) for h in hosts],
        "roles": {name: [_spec(s) for s in manifest.roles.get(name, ())] for name in names},
        "handlers": {name: [h.service, h.action] for name, h in sorted(manifest.handlers.items())},
    }


def _unit_entry(unit: Unit) -> dict[str, Any]:
    # The line number is left out: a unit added above this one moves it, not its inputs.
    return {
        "name": unit.name,
        "stack": unit.stack,
        "depends_on": sorted(unit.depends_on),
        "drift": str(unit.drift),
        "timeout": unit.timeout,
        "vars": {
            name: (
                {"from_stack": [value.unit, value.output]}
                if isinstance(value, StackOutputRef)
                else plain_value(value)
            )
            for name, value in sorted(unit.vars.items())
        },
        "secrets": {name: ref.raw for name, ref in sorted(unit.secrets.items())},
    }


def _fleet_entry(fleet: Fleet) -> dict[str, Any]:
    hosts: Any
    if isinstance(fleet.hosts, HostsFromStack):
        hosts = {"from_stack": [fleet.hosts.unit, fleet.hosts.output]}
    elif isinstance(fleet.hosts, HostsFromEc2):
        hosts = {"ec2": repr(fleet.hosts.filter)}  # the instances are the `hosts` part
    else:
        hosts = "static"  # the list itself is the `hosts` part
    return {
        "hosts": hosts,
        "user": fleet.user,
        "port": fleet.port,
        "become": fleet.become,
        "roles": list(fleet.roles),
        "resources": [_spec(s) for s in fleet.resources],
        "vars": plain_value(fleet.vars),
    }


def _spec(spec: Any) -> dict[str, Any]:
    # `where` names a line: left out for the same reason as a unit's line.
    return {
        "kind": spec.kind,
        "name": spec.name,
        "attrs": plain_value(spec.attrs),
        "notify": list(spec.notify),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Secret):
        return value.reveal()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
