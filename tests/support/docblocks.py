"""The fenced blocks of the docs, with the marker comment that says what each one is.

A marker is an HTML comment on the line right before the opening fence (invisible when
the page is rendered):

    <!-- validate: manifest -->              a whole gitops.yaml
    <!-- validate: host-config -->           a whole agent.yaml
    <!-- validate: host-config fragment -->  sections of agent.yaml (merged into a minimal one)
    <!-- validate: host-config fragment in secrets.vault -->   the same, nested at that key
    <!-- validate: resources -->             resource items, or `roles:`/`handlers:` of a fleet
    <!-- not validated: REASON -->           a YAML block that is not the agent's (Prometheus)
    <!-- output: ID -->                      output or a message a test asserts (by ID)
    <!-- run: ID -->                         a shell session a test runs (by ID)

Every ```yaml block of the pages must carry a `validate:` or `not validated:` marker, so a
new example cannot escape the suite (tests/test_docs_examples.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER_RE = re.compile(r"^\s*<!--\s*(validate|not validated|output|run):\s*(.*?)\s*-->\s*$")
FENCE_RE = re.compile(r"^(\s*)(`{3,})(\S*)")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its info string, its marker and its text."""

    path: Path
    line: int  # of the opening fence, 1-based
    info: str
    marker: str | None  # "validate", "not validated", "output", "run"
    argument: str
    text: str  # dedented to the fence's indentation

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_pages() -> list[Path]:
    """README.md, docs/*.md and the Markdown files under examples/."""
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "examples").rglob("*.md")),
    ]


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown page, in order."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE_RE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, info = opening.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]
        ]
        marker = MARKER_RE.match(lines[i - 1]) if i > 0 else None
        found.append(
            Block(
                path=path,
                line=i + 1,
                info=info,
                marker=marker.group(1) if marker else None,
                argument=marker.group(2) if marker else "",
                text="\n".join(body) + "\n",
            )
        )
        i = end + 1
    return found


def all_blocks() -> list[Block]:
    return [block for page in doc_pages() for block in blocks(page)]


def block(marker: str, argument: str) -> Block:
    """The one block marked `<!-- marker: argument -->` in the pages."""
    matches = [b for b in all_blocks() if b.marker == marker and b.argument == argument]
    where = [b.where for b in matches]
    assert len(matches) == 1, f"expected one block marked {marker}: {argument}; found {where}"
    return matches[0]
