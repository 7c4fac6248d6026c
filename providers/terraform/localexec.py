"""Which `local-exec` provisioner commands of a stack use which variables: a static scan.

A secret reaches Terraform as `TF_VAR_NAME`; written into a `local-exec` `command`, it ends
up in the command line of a process on the bastion, readable by every local user in
`/proc/PID/cmdline`. `agent validate` warns about it (the `environment` argument of the
provisioner is the safe way).

python-hcl2 is not a dependency, so this is a careful scan of the text rather than a parser:
one pass classifies every character as code, literal text (inside a quoted string or a
heredoc, but not inside its `${...}` / `%{...}` interpolations) or comment; then each
`provisioner "local-exec" {` block is found in code, its top-level `command =` attribute
delimited by bracket depth, and the `var.NAME` references in the code part of that value
are reported. It sees direct references only: a `local` computed from the variable, or a
module output, is not followed. It is a warning, never a proof.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from providers.errors import RepoFileError
from providers.repofiles import MAX_MANIFEST_BYTES, read_bounded

CODE, LITERAL, COMMENT = "c", "s", "#"
_BLOCK_RE = re.compile(r'\bprovisioner\s+"local-exec"\s*\{')
_COMMAND_RE = re.compile(r"\bcommand\s*=(?!=)")
_VAR_RE = re.compile(r"\bvar\.([A-Za-z_][A-Za-z0-9_-]*)")
_HEREDOC_RE = re.compile(r"<<-?([A-Za-z_][A-Za-z0-9_-]*)[ \t]*\r?\n")
_OPEN, _CLOSE = "([{", ")]}"


@dataclass(frozen=True, slots=True)
class CommandUse:
    """`var.NAME` used in a local-exec `command`, at FILE:LINE (FILE relative to the stack)."""

    filename: str
    line: int
    variable: str


def local_exec_uses(stack_dir: Path, names: Iterable[str]) -> list[CommandUse]:
    """Every reference to one of the variables `names` in a local-exec `command` of the
    stack's *.tf files, sorted by file and line. Unreadable files are skipped (Terraform's
    own validation reports them)."""
    wanted = set(names)
    found: list[CommandUse] = []
    if not wanted:
        return found
    for path in sorted(stack_dir.glob("*.tf")):
        try:
            text = read_bounded(path, limit=MAX_MANIFEST_BYTES).decode("utf-8")
        except (RepoFileError, UnicodeDecodeError):
            continue
        for line, variable in scan(text):
            if variable in wanted:
                found.append(CommandUse(path.name, line, variable))
    return found


def scan(text: str) -> list[tuple[int, str]]:
    """(line, variable) for each `var.X` in the code of a local-exec `command` value."""
    kinds = classify(text)
    uses: list[tuple[int, str]] = []
    for block in _BLOCK_RE.finditer(text):
        if kinds[block.start()] != CODE:
            continue
        start = block.end()  # just after the block's `{`
        end = _matching_close(text, kinds, start)
        for attr in _COMMAND_RE.finditer(text, start, end):
            if kinds[attr.start()] != CODE or _depth(text, kinds, start, attr.start()) != 0:
                continue
            value_end = _value_end(text, kinds, attr.end(), end)
            for ref in _VAR_RE.finditer(text, attr.end(), value_end):
                if kinds[ref.start()] == CODE:
                    uses.append((text.count("\n", 0, ref.start()) + 1, ref.group(1)))
    return uses


def classify(text: str) -> str:
    """One letter per character of `text`: code, literal text, or comment."""
    kinds = [CODE] * len(text)
    # Frames: ("str",) a quoted string, ("heredoc", TERMINATOR), ("interp", brace depth).
    stack: list[list[Any]] = []
    i, n = 0, len(text)
    while i < n:
        frame = stack[-1] if stack else None
        char = text[i]
        if frame is None or frame[0] == "interp":
            if char == "#" or text.startswith("//", i):
                stop = text.find("\n", i)
                stop = n if stop < 0 else stop
                kinds[i:stop] = [COMMENT] * (stop - i)
                i = stop
                continue
            if text.startswith("/*", i):
                stop = text.find("*/", i + 2)
                stop = n if stop < 0 else stop + 2
                kinds[i:stop] = [COMMENT] * (stop - i)
                i = stop
                continue
            if char == '"':
                stack.append(["str"])
                i += 1
                continue
            heredoc = _HEREDOC_RE.match(text, i) if char == "<" else None
            if heredoc:
                stack.append(["heredoc", heredoc.group(1)])
                # Its newline is part of the value, which goes on to the terminator.
                kinds[i : heredoc.end()] = [LITERAL] * (heredoc.end() - i)
                i = heredoc.end()
                continue
            if frame is not None and char == "{":
                frame[1] += 1
            elif frame is not None and char == "}":
                if frame[1] == 0:
                    stack.pop()  # back to the string or heredoc around it
                else:
                    frame[1] -= 1
            i += 1
            continue
        # Inside literal text.
        if text.startswith(("$${", "%%{"), i):
            kinds[i : i + 3] = [LITERAL] * 3
            i += 3
            continue
        if text.startswith(("${", "%{"), i):
            stack.append(["interp", 0])
            i += 2
            continue
        if frame[0] == "str":
            if char == "\\":
                kinds[i : i + 2] = [LITERAL] * len(kinds[i : i + 2])
                i += 2
                continue
            if char in '"\n':  # the end (a newline ends a broken string: stay in step)
                stack.pop()
                i += 1
                continue
        elif frame[0] == "heredoc" and (i == 0 or text[i - 1] == "\n"):
            stop = text.find("\n", i)
            stop = n if stop < 0 else stop
            if text[i:stop].strip() == frame[1]:
                stack.pop()
                i = stop
                continue
        kinds[i] = LITERAL
        i += 1
    return "".join(kinds)


def _matching_close(text: str, kinds: str, start: int) -> int:
    """The index of the `}` closing a block whose body starts at `start` (or the end)."""
    depth = 0
    for i in range(start, len(text)):
        if kinds[i] != CODE:
            continue
        if text[i] in _OPEN:
            depth += 1
        elif text[i] in _CLOSE:
            if depth == 0:
                return i
            depth -= 1
    return len(text)


def _depth(text: str, kinds: str, start: int, stop: int) -> int:
    depth = 0
    for i in range(start, stop):
        if kinds[i] == CODE:
            depth += (text[i] in _OPEN) - (text[i] in _CLOSE)
    return depth


def _value_end(text: str, kinds: str, start: int, limit: int) -> int:
    """Where an attribute's value ends: a newline outside brackets, or the block's end."""
    depth = 0
    for i in range(start, limit):
        if kinds[i] != CODE:
            continue
        if text[i] in _OPEN:
            depth += 1
        elif text[i] in _CLOSE:
            depth -= 1
        elif text[i] == "\n" and depth <= 0:
            return i
    return limit
