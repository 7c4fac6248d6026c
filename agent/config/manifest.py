"""The repo manifest, `gitops.yaml` at the repository root: the desired state.

It names the units (Terraform stacks), their dependencies, drift policy and variables.
It is changed through Git only, so it is validated against `ManifestLimits` taken from
the host config: it cannot reach outside the repository or the allowed paths, nor raise
a timeout above the host's maximum, nor set policy, binaries or credentials at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from yaml.nodes import MappingNode, ScalarNode

from agent.config import graph
from agent.config.fleet import Fleet, FleetReader, HandlerSpec, HostsFromStack
from agent.config.fleetresources import ResourceSpec
from agent.config.policy import load_repo_rules
from agent.config.yamlnodes import (
    INVALID,
    Fields,
    Problems,
    Value,
    child_path,
    compose,
    decode,
    quote,
)
from agent.errors import ConfigError
from agent.policy.apply import ApplyMode, within
from agent.policy.prune import PruneMode, prune_within
from agent.policy.rules import Rule
from providers.errors import RepoFileError
from providers.repofiles import MAX_MANIFEST_BYTES, MAX_SOURCE_BYTES, format_size, read_repo_file
from providers.secrets.refs import SecretRef, SecretRefError, parse_ref, ref_allowed
from providers.terraform.variables import declared_variables

if TYPE_CHECKING:
    from agent.config.host import HostConfig

MANIFEST_FILENAME = "gitops.yaml"
UNIT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
FROM_STACK = "from_stack"
UNIT_KEYS = (
    "name",
    "stack",
    "fleet",
    "depends_on",
    "drift",
    "timeout",
    "vars",
    "secrets",
    "labels",
    "apply",
    "prune",
)
_HINT = "see docs/manifest.md for every key of gitops.yaml"
_TERRAFORM_READS = (".tf", ".tf.json", ".tfvars", ".tfvars.json", ".terraform.lock.hcl")
_NO_LABELS: Mapping[str, str] = MappingProxyType({})
_NO_SECRETS: Mapping[str, SecretRef] = MappingProxyType({})


class DriftPolicy(StrEnum):
    """What to do when the revision did not move but the plan is not empty."""

    REVERT = "revert"  # apply the plan
    REPORT = "report"  # record and notify, leave it
    IGNORE = "ignore"


@dataclass(frozen=True, slots=True)
class StackOutputRef:
    """A var whose value is an output of another stack unit (known after it applies)."""

    unit: str
    output: str


VarValue: TypeAlias = (
    str
    | int
    | float
    | bool
    | tuple["VarValue", ...]
    | Mapping[str, "VarValue"]
    | StackOutputRef
    | None
)


@dataclass(frozen=True, slots=True)
class Unit:
    """One thing the agent reconciles: a Terraform stack, or a fleet of hosts."""

    name: str
    stack: str  # posix, normalized, relative to the repository root; "" for a fleet
    depends_on: tuple[str, ...]  # explicit, then implied by `from_stack` vars
    drift: DriftPolicy
    timeout: float
    vars: Mapping[str, VarValue] = field(hash=False)
    labels: Mapping[str, str] = field(hash=False)
    line: int
    # Terraform variable name -> where its value is fetched (never the value itself).
    secrets: Mapping[str, SecretRef] = field(hash=False, default_factory=lambda: _NO_SECRETS)
    fleet: Fleet | None = None
    # Which plans wait for `agent approve` (stacks; never looser than the host's policy.apply).
    apply: ApplyMode = ApplyMode.APPROVE_DESTROY
    # What happens to what it created once the repository removes it (never looser than
    # the host's policy.prune; agent/units/prune.py reads it from the unit's last definition).
    prune: PruneMode = PruneMode.HOLD

    @property
    def kind(self) -> str:
        """`stack` or `fleet`."""
        return "fleet" if self.fleet is not None else "stack"


@dataclass(frozen=True, slots=True)
class ManifestLimits:
    """What the host config allows the manifest (the manifest cannot widen it)."""

    allowed_paths: tuple[str, ...] = (".",)
    max_unit_timeout: float = 7200.0
    default_timeout: float = 1800.0
    secret_prefixes: tuple[str, ...] = ()  # references the repo may read
    secret_backends: frozenset[str] = frozenset()  # schemes with a configured backend
    apply_ceiling: ApplyMode = ApplyMode.APPROVE_DESTROY  # the loosest `apply` allowed
    prune_ceiling: PruneMode = PruneMode.HOLD  # the loosest `prune` allowed
    host_rules: tuple[Rule, ...] = ()  # the repository's rules cannot reuse their names
    repo_rules: str | None = None  # the repository's rules file, read with the manifest

    @classmethod
    def from_host(cls, host: HostConfig) -> ManifestLimits:
        """The limits a host config sets."""
        return cls(
            allowed_paths=host.allowed_paths,
            max_unit_timeout=host.policy.max_unit_timeout,
            default_timeout=host.terraform.timeout,
            secret_prefixes=host.secrets.allowed,
            secret_backends=host.secrets.backends(),
            apply_ceiling=host.policy.ceiling,
            prune_ceiling=host.policy.prune,
            host_rules=host.policy.rules,
            repo_rules=host.policy.repo_rules,
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    """The validated manifest: units in file order, their graph free of cycles."""

    path: Path
    version: int
    units: tuple[Unit, ...]
    roles: Mapping[str, tuple[ResourceSpec, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    handlers: Mapping[str, HandlerSpec] = field(default_factory=lambda: MappingProxyType({}))
    rules: tuple[Rule, ...] = ()  # the repository's policy rules (`policy.repo_rules`)

    def get_unit(self, name: str) -> Unit | None:
        """The unit called `name`, or None."""
        return next((unit for unit in self.units if unit.name == name), None)

    def names(self) -> tuple[str, ...]:
        """Unit names in file order."""
        return tuple(unit.name for unit in self.units)

    def order(self) -> tuple[str, ...]:
        """Unit names, each after its dependencies; ties keep file order."""
        return graph.topological_order(self.names(), self._deps())

    def dependents(self, name: str) -> frozenset[str]:
        """Every unit that depends on `name`, directly or transitively."""
        return graph.transitive_dependents(name, self.names(), self._deps())

    def _deps(self) -> dict[str, tuple[str, ...]]:
        return {unit.name: unit.depends_on for unit in self.units}


def load_manifest(repo_dir: Path, limits: ManifestLimits) -> Manifest:
    """Read and validate `repo_dir/gitops.yaml`. Raises ConfigError."""
    data = _read_manifest(repo_dir)
    manifest = parse_manifest(decode(data, MANIFEST_FILENAME), MANIFEST_FILENAME, repo_dir, limits)
    return _with_repo_rules(manifest, repo_dir, limits)


def _with_repo_rules(manifest: Manifest, repo_dir: Path, limits: ManifestLimits) -> Manifest:
    """The manifest with the repository's policy rules (`policy.repo_rules`), read with it:
    an invalid rules file rejects the revision like an invalid manifest does."""
    if limits.repo_rules is None:
        return manifest
    rules = load_repo_rules(repo_dir, limits.repo_rules, limits.host_rules)
    return dataclasses.replace(manifest, rules=rules)


class ManifestCache:
    """Validated manifests by revision and content hash, the last few kept.

    Validation reads the checkout (stack dirs, file sources), so a manifest is reused only
    at the same revision, with the same bytes, under the same limits: a pass at a revision
    already validated skips parsing (a fifth of a no-change fleet pass). Errors are not kept.
    Two are kept (the revision in force and a candidate): a manifest of 1,000 hosts x 50
    resources holds about 35 MiB.
    """

    def __init__(self, size: int = 2) -> None:
        self._size = size
        self._found: OrderedDict[tuple[object, ...], Manifest] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, repo_dir: Path, limits: ManifestLimits, revision: str) -> Manifest:
        """`load_manifest(repo_dir, limits)`, from the cache when `revision` was validated."""
        data = _read_manifest(repo_dir)
        key = (revision, hashlib.sha256(data).digest(), limits, str(repo_dir))
        with self._lock:
            found = self._found.get(key)
            if found is not None:
                self._found.move_to_end(key)
                return found
        manifest = parse_manifest(
            decode(data, MANIFEST_FILENAME), MANIFEST_FILENAME, repo_dir, limits
        )
        # The rules file is part of the revision (the key): read with the manifest.
        manifest = _with_repo_rules(manifest, repo_dir, limits)
        with self._lock:
            self._found[key] = manifest
            while len(self._found) > self._size:
                self._found.popitem(last=False)
        return manifest


def _read_manifest(repo_dir: Path) -> bytes:
    # Read like every other file the repository names: a gitops.yaml that is a symlink
    # out of the checkout is refused, and a huge one is refused before it is parsed.
    try:
        return read_repo_file(repo_dir, MANIFEST_FILENAME, limit=MAX_MANIFEST_BYTES)
    except RepoFileError as exc:
        if exc.kind == "missing":
            raise ConfigError(
                f"{MANIFEST_FILENAME}: expected a manifest at the repository root;"
                " got no such file",
                hint=f"add {MANIFEST_FILENAME} (see docs/manifest.md) to the branch the agent"
                " follows",
            ) from None
        if exc.kind == "too-large":
            raise ConfigError(
                f"{MANIFEST_FILENAME}:1: (file): {exc.reason}",
                hint=f"a manifest is at most {format_size(MAX_MANIFEST_BYTES)}; split big"
                " values into files (templates, file sources) of the repository",
            ) from None
        raise ConfigError(f"{MANIFEST_FILENAME}:1: (file): {exc.reason}") from None


def parse_manifest(text: str, filename: str, repo_dir: Path, limits: ManifestLimits) -> Manifest:
    """Validate manifest text; stacks are checked on disk under `repo_dir`.

    Raises ConfigValidationError listing every error, sorted by line.
    """
    problems = Problems(filename)
    root = Value.root(compose(text, filename), problems)
    reader = _ManifestReader(problems, repo_dir, limits, filename)
    units = reader.read(root) if root else None
    problems.raise_if_any(_HINT)
    assert units is not None  # no problems means every unit was read
    return Manifest(
        path=repo_dir / Path(filename).name,
        version=1,
        units=units,
        roles=MappingProxyType(reader.roles),
        handlers=MappingProxyType(reader.handlers),
    )


@dataclass(slots=True)
class _Draft:
    """A unit as read, before the checks that need all units."""

    value: Value
    name: str | None
    name_value: Value | None
    stack: str | None
    depends_on: list[tuple[str, Value]]
    refs: list[tuple[str, Value]]  # (unit, where) for each from_stack var
    drift: DriftPolicy | None
    timeout: float | None
    apply: ApplyMode
    prune: PruneMode
    vars: dict[str, object]
    labels: dict[str, str]
    secrets: dict[str, SecretRef] = field(default_factory=dict)
    fleet: Fleet | None = None
    fleet_value: Value | None = None


class _ManifestReader:
    def __init__(
        self, problems: Problems, repo_dir: Path, limits: ManifestLimits, filename: str
    ) -> None:
        self.problems = problems
        self.fleets = FleetReader(self._source, filename)
        self.roles: dict[str, tuple[ResourceSpec, ...]] = {}
        self.handlers: dict[str, HandlerSpec] = {}
        self.limits = limits
        self.allowed = tuple(posixpath.normpath(path) for path in limits.allowed_paths)
        self._sources: dict[str, str | tuple[str, str | None]] = {}
        self.drift = DriftPolicy.REVERT
        self.timeout = limits.default_timeout
        self.apply = limits.apply_ceiling
        self.prune = limits.prune_ceiling
        try:
            self.root: Path | None = repo_dir.resolve()
        except (OSError, RuntimeError):
            self.root = None

    def read(self, root: Value) -> tuple[Unit, ...] | None:
        fields = root.mapping(["version", "defaults", "units", "roles", "handlers"])
        if fields is None:
            return None
        if found := fields.get("roles"):
            self.roles = self.fleets.roles(found)
        if found := fields.get("handlers"):
            self.handlers = self.fleets.handlers(found)
        if version := fields.require("version", "1"):
            found = version.scalar()
            if found is not INVALID and (found != 1 or isinstance(found, bool | float)):
                version.fail("1")
        if defaults := fields.get("defaults"):
            self._defaults(defaults)
        units = fields.require("units", "a non-empty list of units")
        items = units.sequence(non_empty=True) if units else None
        if items is None:
            return None
        drafts = [draft for item in items if (draft := self._unit(item))]
        for draft in drafts:
            if draft.fleet is not None and draft.fleet_value is not None:
                self.fleets.check_names(draft.fleet_value, draft.fleet, self.roles, self.handlers)
        self._check_graph(drafts)
        if self.problems:
            return None
        return tuple(self._freeze(draft) for draft in drafts)

    def _defaults(self, value: Value) -> None:
        fields = value.mapping(["drift", "timeout", "apply", "prune"])
        if fields is None:
            return
        if found := fields.get("apply"):
            self.apply = self._apply(found) or self.apply
        if found := fields.get("prune"):
            self.prune = self._prune(found) or self.prune
        if found := fields.get("drift"):
            self.drift = found.choice(DriftPolicy) or self.drift
        if found := fields.get("timeout"):
            self.timeout = self._timeout(found) or self.timeout

    def _apply(self, value: Value) -> ApplyMode | None:
        ceiling = self.limits.apply_ceiling
        return _no_looser(value, value.choice(ApplyMode), ceiling, within(ceiling), "apply")

    def _prune(self, value: Value) -> PruneMode | None:
        ceiling = self.limits.prune_ceiling
        return _no_looser(value, value.choice(PruneMode), ceiling, prune_within(ceiling), "prune")

    def _timeout(self, value: Value) -> float | None:
        return value.duration(maximum=self.limits.max_unit_timeout, why_maximum="host policy")

    def _unit(self, value: Value) -> _Draft | None:
        fields = value.mapping(UNIT_KEYS)
        if fields is None:
            return None
        name_value = fields.require("name", "a unit name")
        name = name_value.string("a unit name") if name_value else None
        if name_value and name is not None and not UNIT_NAME_RE.fullmatch(name):
            name_value.fail("a unit name of a-z, 0-9, _ and - (up to 63, starting a-z or 0-9)")
        fleet_value = fields.get("fleet")
        if fleet_value is not None and fields.get("stack") is not None:
            value.fail("a unit with either stack or fleet, not both", "both")
            return None
        stack_value = (
            fields.require("stack", "a directory of the repository holding *.tf files (or fleet)")
            if fleet_value is None
            else None
        )
        draft = _Draft(
            value=value,
            name=name,
            name_value=name_value,
            stack=self._stack(stack_value) if stack_value else ("" if fleet_value else None),
            depends_on=[],
            refs=[],
            drift=self.drift,
            timeout=self.timeout,
            apply=self.apply,
            prune=self.prune,
            vars={},
            labels={},
        )
        if found := fields.get("depends_on"):
            for item in found.sequence() or ():
                if (dependency := item.string("a unit name")) is not None:
                    draft.depends_on.append((dependency, item))
        if found := fields.get("drift"):
            draft.drift = found.choice(DriftPolicy)
        if found := fields.get("timeout"):
            draft.timeout = self._timeout(found)
        if found := fields.get("apply"):
            if fleet_value is not None:
                found.fail("no apply key on a fleet unit (apply modes are for stacks)", "apply")
            draft.apply = self._apply(found) or draft.apply
        if found := fields.get("prune"):
            draft.prune = self._prune(found) or draft.prune
        var_fields = secret_fields = None
        if (found := fields.get("vars")) and (var_fields := found.mapping()):
            self._vars(var_fields, draft)
        if (found := fields.get("labels")) and (label_fields := found.mapping()):
            self._labels(label_fields, draft)
        if (found := fields.get("secrets")) and (secret_fields := found.mapping()):
            self._secrets(secret_fields, draft)
        if draft.stack:
            self._check_declared(
                draft.stack, [(var_fields, draft.vars), (secret_fields, draft.secrets)]
            )
        if fleet_value is not None:
            fleet, from_stack, where = self.fleets.fleet(fleet_value)
            if fleet is None:
                draft.stack = None  # the fleet's own problems were reported
            draft.fleet, draft.fleet_value = fleet, fleet_value
            if isinstance(from_stack, HostsFromStack) and where is not None:
                draft.refs.append((from_stack.unit, where))
        return draft

    def _source(self, value: Value) -> str | None:
        """A file of the repository (a template or a file's source), inside allowed paths."""
        text = value.string("a file of the repository")
        if text is None:
            return None
        # A fleet's hosts name the same few files many times: check each path once.
        found = self._sources.get(text)
        if found is None:
            found = self._sources[text] = self._check_source(text)
        if isinstance(found, tuple):
            return value.fail(*found)
        return found

    def _check_source(self, text: str) -> str | tuple[str, str | None]:
        """The path relative to the root, or (expected, got) saying why it is refused."""
        if "\x00" in text or self.root is None or text.startswith("/"):
            return ("a relative path of a file in the repository", None)
        try:
            resolved = (self.root / text).resolve()
        except (OSError, RuntimeError):
            return ("a path that resolves", f"{quote(text)} (a symlink loop)")
        if not resolved.is_relative_to(self.root):
            return (self._under_message(), quote(text))
        relative = resolved.relative_to(self.root).as_posix()
        if not any(_is_under(relative, allowed) for allowed in self.allowed):
            return (self._under_message(), quote(text))
        if not resolved.is_file():
            return ("a file of the repository", f"{quote(text)} (no such file)")
        try:
            size = resolved.stat().st_size
        except OSError as exc:
            return ("a readable file", f"{quote(text)} ({exc.strerror})")
        if size > MAX_SOURCE_BYTES:
            return (
                f"a file of at most {format_size(MAX_SOURCE_BYTES)}",
                f"{quote(text)} ({size} bytes)",
            )
        return relative

    def _under_message(self) -> str:
        if "." in self.allowed:
            return "a relative path inside the repository"
        return "a path under one of: " + ", ".join(f"{path}/" for path in self.allowed)

    def _stack(self, value: Value) -> str | None:
        """A directory inside the repository and the allowed paths, symlinks resolved."""
        text = value.string("a directory of the repository holding *.tf files")
        if text is None:
            return None
        if "\x00" in text or self.root is None:
            return value.fail("a directory of the repository holding *.tf files")
        if text.startswith("/"):
            return value.fail(self._under_message())
        try:
            resolved = (self.root / text).resolve()
        except (OSError, RuntimeError):  # a symlink loop, a name too long
            return value.fail("a path that resolves", f"{quote(text)} (a symlink loop)")
        if not resolved.is_relative_to(self.root):
            lexical = posixpath.normpath(text)
            escapes = lexical == ".." or lexical.startswith("../")
            got = quote(text) if escapes else f"{quote(text)} (a symlink out of the repository)"
            return value.fail(self._under_message(), got)
        relative = resolved.relative_to(self.root).as_posix()
        if not any(_is_under(relative, allowed) for allowed in self.allowed):
            via = "" if relative == posixpath.normpath(text) else f" (resolves to {relative!r})"
            return value.fail(self._under_message(), quote(text) + via)
        problem = _stack_problem(resolved, self.root)
        if problem:
            return value.fail("a directory holding *.tf files", f"{quote(text)} ({problem})")
        return relative

    def _vars(self, fields: Fields, draft: _Draft) -> None:
        for key, item in fields:
            if not VAR_NAME_RE.fullmatch(key):
                fields.fail_key(key, "a Terraform variable name ([A-Za-z_][A-Za-z0-9_-]*)")
            elif key.startswith("TF_"):
                fields.fail_key(key, "a variable name that does not start with TF_")
            mapping = item.mapping() if _is_mapping_with(item, FROM_STACK) else None
            if mapping is not None:
                draft.vars[key] = self._stack_output(mapping, draft)
            else:
                draft.vars[key] = item.literal(reject_key=FROM_STACK)

    def _stack_output(self, fields: Fields, draft: _Draft) -> object:
        """`{from_stack: {unit: NAME, output: NAME}}`, and nothing else beside it."""
        for key in fields.entries:
            if key != FROM_STACK:
                fields.value.problems.note(
                    fields.key_lines[key],
                    f"{fields.value.path}.{key}",
                    f"unknown key; expected only {FROM_STACK}",
                )
        inner = fields.require(FROM_STACK, "a mapping with unit and output")
        ref = inner.mapping(["unit", "output"]) if inner else None
        if ref is None:
            return INVALID
        unit_value = ref.require("unit", "the name of a unit in this file")
        output_value = ref.require("output", "the name of an output of that unit's stack")
        unit = unit_value.string("a unit name") if unit_value else None
        output = output_value.string("an output name") if output_value else None
        if output_value and output is not None and not VAR_NAME_RE.fullmatch(output):
            output_value.fail("a Terraform output name ([A-Za-z_][A-Za-z0-9_-]*)")
            output = None
        if unit_value and unit is not None:
            draft.refs.append((unit, unit_value))
        if unit is None or output is None:
            return INVALID
        return StackOutputRef(unit=unit, output=output)

    def _secrets(self, fields: Fields, draft: _Draft) -> None:
        """`NAME: REFERENCE`: NAME becomes TF_VAR_NAME, fetched per pass, never stored."""
        for key, item in fields:
            if not VAR_NAME_RE.fullmatch(key) or key.startswith("TF_"):
                fields.fail_key(key, "a Terraform variable name not starting with TF_")
                continue
            if key in draft.vars:
                fields.fail_key(key, "a name not also given in vars")
                continue
            text = item.string("a secret reference like vault:kv/prod/db#password")
            if text is None:
                continue
            try:
                ref = parse_ref(text)
            except SecretRefError as exc:
                item.fail(f"a secret reference ({exc})")
                continue
            if ref.scheme not in self.limits.secret_backends:
                item.fail(
                    f"a reference to a backend the host config sets up"
                    f" ({', '.join(sorted(self.limits.secret_backends)) or 'none'})"
                )
            elif not ref_allowed(ref, self.limits.secret_prefixes):
                allowed = ", ".join(self.limits.secret_prefixes) or "nothing: no secrets.allowed"
                item.fail(f"a reference the host config allows ({allowed})")
            else:
                draft.secrets[key] = ref

    def _check_declared(
        self, stack: str, given: list[tuple[Fields | None, Mapping[str, object]]]
    ) -> None:
        """Each `vars`/`secrets` name must be a variable the stack declares: Terraform would
        drop an undeclared TF_VAR_ without a word."""
        if self.root is None or not any(names for _, names in given):
            return
        declared = declared_variables(self.root / stack)
        if declared is None:
            return  # a file Terraform cannot read either: `terraform validate` says so
        listed = ", ".join(sorted(declared)) or "none"
        for fields, names in given:
            for name in names if fields is not None else ():
                # A name already refused (not a variable name) is not reported twice.
                valid = VAR_NAME_RE.fullmatch(name) and not name.startswith("TF_")
                if valid and name not in declared:
                    fields.value.problems.note(
                        fields.key_lines[name],
                        child_path(fields.value.path, name),
                        f"stack {stack} declares no variable {name!r}; declared: {listed}",
                    )

    def _labels(self, fields: Fields, draft: _Draft) -> None:
        for key, item in fields:
            if not LABEL_KEY_RE.fullmatch(key):
                fields.fail_key(key, "a label key of letters, digits, ., _, / and -")
            text = item.string("a string", non_empty=False)
            if text is not None:
                draft.labels[key] = text

    def _check_graph(self, drafts: list[_Draft]) -> None:
        """Unique names, known dependencies, no cycles."""
        first: dict[str, _Draft] = {}
        for draft in drafts:
            if draft.name is None or draft.name_value is None:
                continue
            if draft.name in first:
                line = first[draft.name].value.line
                draft.name_value.fail(
                    "a unique unit name", f"{quote(draft.name)} again (first on line {line})"
                )
            else:
                first[draft.name] = draft
        known = ", ".join(list(first)[:10]) + (", ..." if len(first) > 10 else "")
        for draft in drafts:
            for dependency, where in [*draft.depends_on, *draft.refs]:
                if dependency not in first:
                    where.fail(f"the name of a unit in this file ({known})")
        deps = {name: _dependencies(draft) for name, draft in first.items()}
        for cycle in graph.find_cycles(list(first), deps):
            draft = first[cycle[0]]
            self.problems.expected(
                draft.value.line,
                draft.value.path,
                "units without a dependency cycle",
                graph.format_cycle(cycle),
            )

    def _freeze(self, draft: _Draft) -> Unit:
        assert draft.name and draft.stack is not None and draft.drift and draft.timeout
        return Unit(
            name=draft.name,
            stack=draft.stack,
            depends_on=_dependencies(draft),
            drift=draft.drift,
            timeout=draft.timeout,
            vars=MappingProxyType(dict(draft.vars)),  # type: ignore[arg-type]
            labels=MappingProxyType(dict(draft.labels)) if draft.labels else _NO_LABELS,
            line=draft.value.line,
            secrets=MappingProxyType(dict(draft.secrets)),
            fleet=draft.fleet,
            apply=draft.apply,
            prune=draft.prune,
        )


def plain_value(value: Any) -> Any:
    """A frozen manifest value (tuples, mapping proxies) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [plain_value(v) for v in value]
    return value


def _dependencies(draft: _Draft) -> tuple[str, ...]:
    """Explicit dependencies, then the units its `from_stack` vars read, each once."""
    return tuple(dict.fromkeys(name for name, _ in [*draft.depends_on, *draft.refs]))


def _is_mapping_with(value: Value, key: str) -> bool:
    node = value.node
    return isinstance(node, MappingNode) and any(
        isinstance(k, ScalarNode) and k.value == key for k, _ in node.value
    )


def _is_under(relative: str, allowed: str) -> bool:
    return allowed == "." or relative == allowed or relative.startswith(allowed + "/")


def _stack_problem(directory: Path, root: Path) -> str | None:
    """Why `directory` cannot be a Terraform root module, or None.

    A file Terraform reads there (`*.tf`, `*.tf.json`, `*.tfvars`, the lock file) that is a
    symlink out of the repository is refused: Terraform would read (and quote in its
    diagnostics) a file of the bastion.
    """
    try:
        if not directory.exists():
            return "no such directory"
        if not directory.is_dir():
            return "not a directory"
        with os.scandir(directory) as scan:
            entries = [e for e in scan if e.name.endswith(_TERRAFORM_READS)]
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_symlink():
                try:
                    inside = Path(entry.path).resolve(strict=True).is_relative_to(root)
                except (OSError, RuntimeError):
                    return f"{entry.name} is a broken symlink"
                if not inside:
                    return f"{entry.name} is a symlink out of the repository"
        if not any(e.name.endswith((".tf", ".tf.json")) and e.is_file() for e in entries):
            return "no *.tf files in it"
    except OSError as exc:
        return exc.strerror or "unreadable"
    return None


_Mode = TypeVar("_Mode", ApplyMode, PruneMode)


def _no_looser(
    value: Value, mode: _Mode | None, ceiling: _Mode, allowed: Sequence[_Mode], key: str
) -> _Mode | None:
    """`mode` when the host config's `policy.KEY` (`ceiling`) allows it (a unit may only
    be stricter); else the problem is noted on `value` and None returned."""
    if mode is not None and not ceiling.allows(mode):
        why = f"the host config's policy.{key} is {ceiling}: a unit may only be stricter"
        return value.fail(f"one of {', '.join(allowed)} ({why})", quote(str(mode)))
    return mode
