"""Stage 1: YAML text to nodes with line marks, and a small typed reader over them.

The reader never raises on bad input: each check records an error (file, line, key
path, what was expected, what was found) and returns None, so that one pass over a
file reports every problem in it. `Problems.raise_if_any` then raises them together.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypeVar

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import MappingEndEvent, SequenceEndEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from agent.config.durations import EXAMPLES, format_duration, parse_duration
from agent.errors import ConfigError

_TAG = "tag:yaml.org,2002:"
STR_TAG, NULL_TAG, BOOL_TAG = _TAG + "str", _TAG + "null", _TAG + "bool"
INT_TAG, FLOAT_TAG = _TAG + "int", _TAG + "float"
# A date or binary blob is just text to us (and to Terraform): keep what was written.
_TEXT_TAGS = frozenset({STR_TAG, _TAG + "timestamp", _TAG + "binary"})
_SCALAR_CONSTRUCTORS: dict[str, Callable[[SafeConstructor, ScalarNode], Any]] = {
    NULL_TAG: SafeConstructor.construct_yaml_null,
    BOOL_TAG: SafeConstructor.construct_yaml_bool,
    INT_TAG: SafeConstructor.construct_yaml_int,
    FLOAT_TAG: SafeConstructor.construct_yaml_float,
}
_COLLECTION_TAGS = frozenset({_TAG + "map", _TAG + "seq"})
_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

MAX_DEPTH = 32  # nesting of literal values; deeper is a mistake, not a config
MAX_LITERAL_SIZE = 10_000  # elements in one literal once aliases are expanded

E = TypeVar("E", bound=StrEnum)


class ConfigValidationError(ConfigError):
    """Every error found in one config file, one line each, sorted by line.

    The message is the lines joined by newlines; `errors` holds them as a list.
    """

    def __init__(self, errors: Sequence[str], *, hint: str | None = None) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors), hint=hint)


class Problems:
    """The errors collected while reading one file."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self._found: list[tuple[int, int, str]] = []

    def __bool__(self) -> bool:
        return bool(self._found)

    def note(self, line: int, path: str, text: str) -> None:
        """Record `<file>:<line>: <path>: <text>`."""
        message = f"{self.filename}:{line}: {path or '(top level)'}: {text}"
        if all(found != message for _, _, found in self._found):
            self._found.append((line, len(self._found), message))

    def expected(self, line: int, path: str, expected: str, got: str) -> None:
        """Record `<file>:<line>: <path>: expected <expected>; got <got>`."""
        self.note(line, path, f"expected {expected}; got {got}")

    def raise_if_any(self, hint: str | None = None) -> None:
        """Raise one ConfigValidationError holding every recorded error."""
        if self._found:
            raise ConfigValidationError([m for _, _, m in sorted(self._found)], hint=hint)


class _Line:
    """A node's place: its line only (0-based, as PyYAML's marks count).

    PyYAML gives every node a start and an end `Mark` (six attributes each, about 300
    bytes together): most of a large manifest's node tree. The checks need the start line
    alone; one `_Line` per line number is shared by the nodes on it.
    """

    __slots__ = ("line",)

    def __init__(self, line: int) -> None:
        self.line = line

    def __str__(self) -> str:
        return f"  on line {self.line + 1}"


class _SmallNodes:
    """PyYAML's composer, building nodes that keep only their start line (`_Line`)."""

    anchors: dict[str, Node]
    get_event: Callable[[], Any]
    check_event: Callable[..., bool]
    resolve: Callable[..., str]
    compose_node: Callable[[Node | None, Any], Node]

    def _line(self, mark: Any) -> _Line:
        lines: dict[int, _Line] = self.__dict__.setdefault("_lines", {})
        found = lines.get(mark.line)
        if found is None:
            found = lines[mark.line] = _Line(mark.line)
        return found

    def compose_scalar_node(self, anchor: str | None) -> Node:
        event = self.get_event()
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.resolve(ScalarNode, event.value, event.implicit)
        node = ScalarNode(tag, event.value, self._line(event.start_mark), None, style=event.style)
        if anchor is not None:
            self.anchors[anchor] = node
        return node

    def compose_sequence_node(self, anchor: str | None) -> Node:
        start = self.get_event()
        tag = start.tag
        if tag is None or tag == "!":
            tag = self.resolve(SequenceNode, None, start.implicit)
        node = SequenceNode(
            tag, [], self._line(start.start_mark), None, flow_style=start.flow_style
        )
        if anchor is not None:
            self.anchors[anchor] = node
        index = 0
        while not self.check_event(SequenceEndEvent):
            node.value.append(self.compose_node(node, index))
            index += 1
        self.get_event()
        return node

    def compose_mapping_node(self, anchor: str | None) -> Node:
        start = self.get_event()
        tag = start.tag
        if tag is None or tag == "!":
            tag = self.resolve(MappingNode, None, start.implicit)
        node = MappingNode(tag, [], self._line(start.start_mark), None, flow_style=start.flow_style)
        if anchor is not None:
            self.anchors[anchor] = node
        while not self.check_event(MappingEndEvent):
            key = self.compose_node(node, None)
            node.value.append((key, self.compose_node(node, key)))
        self.get_event()
        return node


class _PureLoader(_SmallNodes, yaml.SafeLoader):  # type: ignore[misc]
    """PyYAML's pure-Python loader with small nodes (errors are its own, unchanged)."""


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _FastLoader(_SmallNodes, CParser, SafeConstructor, Resolver):  # type: ignore[misc]
        """libyaml's parser (events with line marks) under PyYAML's own composer.

        libyaml's composer recurses in C and crashes the process on deeply nested input;
        the Python composer raises RecursionError instead, and is a small part of the cost.
        """

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self.anchors: dict[str, Node] = {}

        check_node = Composer.check_node
        get_node = Composer.get_node
        get_single_node = Composer.get_single_node
        compose_document = Composer.compose_document
        compose_node = Composer.compose_node

    _FAST_LOADER: type | None = _FastLoader
else:  # pragma: no cover - PyYAML built without libyaml
    _FAST_LOADER = None


def compose(text: str, filename: str) -> Node | None:
    """Parse YAML text into a node tree (None for an empty document).

    libyaml parses when PyYAML has it (7x faster); text it refuses is parsed again by the
    pure-Python loader, so that every error reads (and is placed) the same either way.
    Raises ConfigValidationError with `<file>:<line>: YAML syntax error: ...`.
    """
    if _FAST_LOADER is not None:
        try:
            return yaml.compose(text, Loader=_FAST_LOADER)
        except (yaml.YAMLError, RecursionError):
            pass
    try:
        return yaml.compose(text, Loader=_PureLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 1
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark:
            problem += f" ({exc.context} on line {exc.context_mark.line + 1})"
        raise _syntax_error(filename, line, problem) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        problem = f"character U+{exc.character:04X} is not allowed in YAML"
        raise _syntax_error(filename, line, problem) from None
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML error above is marked
        raise _syntax_error(filename, 1, str(exc)) from None
    except RecursionError:
        # The composer recurses once per nesting level: thousands of `[` exhaust the stack.
        raise _syntax_error(filename, 1, "nesting too deep") from None


def _syntax_error(filename: str, line: int, problem: str) -> ConfigValidationError:
    return ConfigValidationError([f"{filename}:{line}: YAML syntax error: {problem}"])


def decode(data: bytes, filename: str) -> str:
    """Decode a config file's bytes as UTF-8 (a BOM is allowed), or raise ConfigValidationError."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        got = f"the byte 0x{data[exc.start]:02x} at offset {exc.start}"
        message = f"{filename}:{line}: (file): expected UTF-8 text; got {got}"
        raise ConfigValidationError([message]) from None


def quote(text: str, limit: int = 60) -> str:
    """Show a found string the way the error messages do: quoted, escaped, shortened."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text)


def describe(node: Node) -> str:
    """Say what a node is, for the `got ...` half of an error."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    value = str(node.value)
    if node.tag == NULL_TAG:
        return "nothing" if value == "" else "null"
    if node.tag == BOOL_TAG:
        return f"a boolean ({value})"
    if node.tag in (INT_TAG, FLOAT_TAG):
        return f"a number ({value[:40]})"
    if node.tag in _TEXT_TAGS:
        return quote(value)
    return f"a value tagged {node.tag} ({quote(value)})"


def child_path(path: str, key: str) -> str:
    """The key path of a mapping entry: `units[0].vars.region`, `labels["a.b"]`."""
    if not _IDENTIFIER_RE.fullmatch(key):
        return f"{path}[{json.dumps(key)}]"
    return f"{path}.{key}" if path else key


def _node_line(node: Node) -> int:
    return node.start_mark.line + 1


class _Invalid:
    """The result of reading a literal that did not validate (None is a valid literal)."""


INVALID = _Invalid()


@dataclass(frozen=True, slots=True)
class Value:
    """One node, where it sits (key path and line), and where to report problems."""

    node: Node
    path: str
    line: int
    problems: Problems

    @classmethod
    def root(cls, node: Node | None, problems: Problems) -> Value | None:
        """The document's top node; an empty document is reported as such."""
        if node is None:
            problems.expected(1, "", "a mapping", "an empty file")
            return None
        return cls(node, "", 1, problems)

    def fail(self, expected: str, got: str | None = None) -> None:
        """Record that this value is not what was expected; returns None for chaining."""
        self.problems.expected(self.line, self.path, expected, got or describe(self.node))

    @property
    def is_null(self) -> bool:
        return isinstance(self.node, ScalarNode) and self.node.tag == NULL_TAG

    def _tag_ok(self) -> bool:
        node = self.node
        if isinstance(node, ScalarNode):
            ok = node.tag in _TEXT_TAGS or node.tag in _SCALAR_CONSTRUCTORS
        else:
            ok = node.tag in _COLLECTION_TAGS
        if not ok:
            self.fail("plain YAML without tags", f"the tag {quote(str(node.tag))}")
        return ok

    def mapping(self, keys: Sequence[str] | None = None) -> Fields | None:
        """Read a mapping; with `keys`, any other key is reported as unknown."""
        if not isinstance(self.node, MappingNode):
            return self.fail("a mapping")
        if not self._tag_ok():
            return None
        entries: dict[str, Value] = {}
        key_lines: dict[str, int] = {}
        for key_node, value_node in self.node.value:
            key_line = _node_line(key_node)
            if not isinstance(key_node, ScalarNode):
                self.problems.expected(key_line, self.path, "a string key", describe(key_node))
                continue
            # The text as written: `on:` or `1:` are keys, not a boolean or a number.
            key = str(key_node.value)
            path = child_path(self.path, key)
            if key in entries:
                first = key_lines[key]
                self.problems.expected(
                    key_line, path, "each key once", f"it again (first on line {first})"
                )
                continue
            if keys is not None and key not in keys:
                known = ", ".join(keys)
                self.problems.note(key_line, path, f"unknown key; expected one of {known}")
                continue
            # Report a value at its key's line: a block value starts a line later, and an
            # empty one (`drift:`) has no position of its own.
            entries[key] = Value(value_node, path, key_line, self.problems)
            key_lines[key] = key_line
        return Fields(self, entries, key_lines)

    def sequence(self, *, non_empty: bool = False) -> list[Value] | None:
        """Read a list; each item knows its path (`units[2]`) and line."""
        if not isinstance(self.node, SequenceNode):
            return self.fail("a non-empty list" if non_empty else "a list")
        if not self._tag_ok():
            return None
        if non_empty and not self.node.value:
            return self.fail("a non-empty list", "an empty list")
        return [
            Value(item, f"{self.path}[{index}]", _node_line(item), self.problems)
            for index, item in enumerate(self.node.value)
        ]

    def scalar(self) -> object:
        """A scalar as Python sees it (str, int, float, bool or None), or INVALID."""
        node = self.node
        if not isinstance(node, ScalarNode):
            self.fail("a single value")
            return INVALID
        if not self._tag_ok():
            return INVALID
        if node.tag in _TEXT_TAGS:
            return str(node.value)
        try:
            return _SCALAR_CONSTRUCTORS[node.tag](SafeConstructor(), node)
        except (ValueError, KeyError, TypeError, OverflowError, yaml.YAMLError):
            # An explicit tag on text that is not one: `!!int abc`, `!!bool maybe`.
            self.fail(f"a valid {node.tag.removeprefix(_TAG)}", quote(str(node.value)))
            return INVALID

    def string(self, what: str = "a string", *, non_empty: bool = True) -> str | None:
        """Read a string (not a number, boolean or null: quote those in YAML)."""
        node = self.node
        if not isinstance(node, ScalarNode) or node.tag not in _TEXT_TAGS:
            return self.fail(what)
        text = str(node.value)
        if non_empty and not text.strip():
            return self.fail(what, "an empty string")
        return text

    def optional_string(self, what: str = "a string") -> str | None:
        """Read a string where null means "not set"."""
        return None if self.is_null else self.string(what)

    def boolean(self) -> bool | None:
        """Read true or false."""
        if not isinstance(self.node, ScalarNode) or self.node.tag != BOOL_TAG:
            return self.fail("true or false")
        value = self.scalar()
        return value if isinstance(value, bool) else None

    def integer(self, *, minimum: int | None = None) -> int | None:
        """Read a whole number, optionally at least `minimum`."""
        what = "a whole number" if minimum is None else f"a whole number of at least {minimum}"
        if not isinstance(self.node, ScalarNode) or self.node.tag != INT_TAG:
            return self.fail(what)
        value = self.scalar()
        if not isinstance(value, int):
            return None
        if minimum is not None and value < minimum:
            return self.fail(what)
        return value

    def duration(
        self, *, positive: bool = True, maximum: float | None = None, why_maximum: str = ""
    ) -> float | None:
        """Read a duration (`30s`, `5m`, `2h`, `1h30m` or seconds) as float seconds.

        `why_maximum` is shown after the limit: `at most 2h (host policy)`.
        """
        if not isinstance(self.node, ScalarNode):
            return self.fail(f"a duration like {EXAMPLES}")
        value = self.scalar()
        if value is INVALID:
            return None
        seconds = parse_duration(value)
        if seconds is None:
            return self.fail(f"a duration like {EXAMPLES}")
        if positive and seconds <= 0:
            return self.fail("a duration greater than 0")
        if maximum is not None and seconds > maximum:
            reason = f" ({why_maximum})" if why_maximum else ""
            return self.fail(f"a duration of at most {format_duration(maximum)}{reason}")
        return seconds

    def choice(self, enum: type[E]) -> E | None:
        """Read one of the values of a StrEnum."""
        names = ", ".join(member.value for member in enum)
        node = self.node
        if isinstance(node, ScalarNode) and node.tag in _TEXT_TAGS:
            try:
                return enum(str(node.value))
            except ValueError:
                pass
        return self.fail(f"one of {names}")

    def literal(self, *, reject_key: str | None = None) -> object:
        """Read any plain value, freezing lists to tuples and mappings to MappingProxyType.

        Returns INVALID when something inside did not validate. A mapping key equal to
        `reject_key` is an error (it has a meaning only at the top of a value).
        YAML aliases are converted once and shared, and recursive ones are refused.
        """
        reader = _LiteralReader(reject_key)
        result = reader.read(self, 0)
        if result is not INVALID and reader.size(self.node) > MAX_LITERAL_SIZE:
            self.fail(f"a value of at most {MAX_LITERAL_SIZE} elements", "more (aliases expanded)")
            return INVALID
        return result


@dataclass(frozen=True, slots=True)
class Fields:
    """The entries of a mapping that passed the key checks, by key, in file order."""

    value: Value
    entries: dict[str, Value]
    key_lines: dict[str, int]

    def get(self, key: str) -> Value | None:
        """The value at `key`, or None if absent (explicit null counts as absent)."""
        found = self.entries.get(key)
        return None if found is None or found.is_null else found

    def require(self, key: str, expected: str) -> Value | None:
        """The value at `key`; its absence (or null) is an error naming what was expected."""
        found = self.get(key)
        if found is None:
            line = self.entries[key].line if key in self.entries else self.value.line
            path = child_path(self.value.path, key)
            self.value.problems.expected(line, path, f"{expected} (required)", "nothing")
        return found

    def fail_key(self, key: str, expected: str) -> None:
        """Record that a key itself (not its value) is not what was expected."""
        path = child_path(self.value.path, key)
        self.value.problems.expected(self.key_lines[key], path, expected, quote(key))

    def __iter__(self) -> Iterator[tuple[str, Value]]:
        return iter(self.entries.items())


class _LiteralReader:
    """Converts a node tree to frozen values once per node (aliases share results)."""

    def __init__(self, reject_key: str | None) -> None:
        self.reject_key = reject_key
        self.done: dict[int, object] = {}
        self.active: set[int] = set()
        self.sizes: dict[int, int] = {}

    def read(self, value: Value, depth: int) -> object:
        node = value.node
        key = id(node)
        if key in self.done:
            return self.done[key]
        if key in self.active:
            value.fail("a value without recursive YAML aliases", "an alias to itself")
            return INVALID
        if depth > MAX_DEPTH:
            value.fail(f"at most {MAX_DEPTH} levels of nesting", "deeper nesting")
            return INVALID
        self.active.add(key)
        try:
            result = self._convert(value, depth)
        finally:
            self.active.discard(key)
        self.done[key] = result
        return result

    def _convert(self, value: Value, depth: int) -> object:
        if isinstance(value.node, ScalarNode):
            scalar = value.scalar()
            if isinstance(scalar, float) and not math.isfinite(scalar):
                # JSON, and so Terraform's -var-file and TF_VAR_*, has no infinity or NaN.
                value.fail("a finite number")
                return INVALID
            return scalar
        if isinstance(value.node, SequenceNode):
            items = value.sequence()
            if items is None:
                return INVALID
            converted = [self.read(item, depth + 1) for item in items]
            return INVALID if INVALID in converted else tuple(converted)
        fields = value.mapping()
        if fields is None:
            return INVALID
        result: dict[str, object] = {}
        for key, item in fields:
            if key == self.reject_key:
                item.fail("a plain value here", f"{key} nested inside another value")
                result[key] = INVALID
                continue
            result[key] = self.read(item, depth + 1)
        if any(item is INVALID for item in result.values()):
            return INVALID
        return MappingProxyType(result)

    def size(self, node: Node) -> int:
        """How many elements the value has with every alias expanded (memoized)."""
        key = id(node)
        if key not in self.sizes:
            children: list[Node] = []
            if isinstance(node, SequenceNode):
                children = list(node.value)
            elif isinstance(node, MappingNode):
                children = [value for _, value in node.value]
            self.sizes[key] = 1 + sum(self.size(child) for child in children)
        return self.sizes[key]
