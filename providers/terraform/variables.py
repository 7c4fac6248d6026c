"""The input variables a stack declares: `variable "NAME" {` blocks of its *.tf files and
the `variable` objects of its *.tf.json files, read without Terraform.

A unit's `vars:` and `secrets:` reach Terraform as `TF_VAR_NAME`, which Terraform ignores
without a word when the root module declares no such variable: the manifest check names
them instead. The *.tf scan reuses localexec's classifier (code / literal / comment), so a
`variable "x" {` inside a string, a heredoc or a comment is not a declaration.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from providers.errors import RepoFileError
from providers.repofiles import MAX_MANIFEST_BYTES, read_bounded
from providers.terraform.localexec import CODE, classify

# A block label is a quoted string or an identifier (HCL accepts both).
_VARIABLE_RE = re.compile(r'\bvariable\s+(?:"([^"\\\n]*)"|([A-Za-z_][A-Za-z0-9_-]*))\s*\{')


def declared_variables(stack_dir: Path) -> frozenset[str] | None:
    """The variable names the stack in `stack_dir` declares, or None when a file of it
    cannot be read or parsed (Terraform's own validation reports that; better no check
    than a wrong one)."""
    names: set[str] = set()
    try:
        for path in sorted(stack_dir.glob("*.tf")):
            names.update(_from_hcl(_read(path)))
        for path in sorted(stack_dir.glob("*.tf.json")):
            found = _from_json(_read(path))
            if found is None:
                return None
            names.update(found)
    except (OSError, RepoFileError, UnicodeDecodeError):
        return None
    return frozenset(names)


def _read(path: Path) -> str:
    return read_bounded(path, limit=MAX_MANIFEST_BYTES).decode("utf-8")


def _from_hcl(text: str) -> list[str]:
    """Names of the top-level `variable` blocks of one *.tf file."""
    kinds = classify(text)
    names = []
    depth = 0
    position = 0
    for match in _VARIABLE_RE.finditer(text):
        if kinds[match.start()] != CODE:
            continue
        depth += _depth_change(text, kinds, position, match.start())
        position = match.start()
        if depth == 0:  # a root module's variables are top-level blocks
            names.append(match.group(1) if match.group(1) is not None else match.group(2))
    return names


def _depth_change(text: str, kinds: str, start: int, stop: int) -> int:
    change = 0
    for i in range(start, stop):
        if kinds[i] == CODE:
            change += (text[i] in "([{") - (text[i] in ")]}")
    return change


def _from_json(text: str) -> list[str] | None:
    """Names under the top-level `variable` key of one *.tf.json file: an object of name ->
    block, or a list of such objects (both are Terraform's JSON syntax)."""
    try:
        document = json.loads(text)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    blocks = document.get("variable", {})
    items = blocks if isinstance(blocks, list) else [blocks]
    names = []
    for item in items:
        if not isinstance(item, dict):
            return None
        names.extend(str(name) for name in item)
    return names
