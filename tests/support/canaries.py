"""Canary secrets and a leak battery: register the canaries, run something, search its output.

`tests/cases/canaries.json` holds made-up secrets of every awkward shape (short, 4 KiB, a PEM
key, regex metacharacters, quotes, `${`, unicode, a JSON document, control characters...),
each with a marker found in no other canary. A test registers them (all, or those it feeds
to the agent), runs the agent, then asks `find_leaks` whether any form of any canary
reached a file, a directory of files, or a string:

    canaries = load_canaries()
    ...
    assert find_leaks([state_dir, captured_stdout], canaries) == []

The forms searched (`every_form`) are computed here, independently of `agent.core.redact`,
from the list the design asks for: the value; its standard and URL-safe base64 with and
without padding; `quote(value, safe="")` and `quote_plus`; the JSON-escaped forms
(`ensure_ascii` true and false); each line stripped of whitespace, if it has at least
`agent.core.redact.MIN_PART_LENGTH` characters.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

from agent.core.redact import MIN_PART_LENGTH

CANARIES_FILE = Path(__file__).resolve().parent.parent / "cases" / "canaries.json"


@dataclass(frozen=True, repr=False)
class Canary:
    name: str
    value: str
    marker: str = ""
    shape: str = ""

    def __repr__(self) -> str:  # the value can be 4 KiB: name it only
        return f"Canary({self.name!r})"


@dataclass(frozen=True, repr=False)
class Leak:
    canary: Canary
    form: str
    where: str
    kind: str = ""

    def __repr__(self) -> str:
        form = self.form if len(self.form) <= 40 else self.form[:37] + "..."
        return f"Leak({self.canary.name}: {self.kind} form {form!r} in {self.where})"

    __str__ = __repr__


def load_canaries(path: Path = CANARIES_FILE) -> list[Canary]:
    """The canaries, in file order. An entry gives `value`, or `lines` joined with newlines."""
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    return [
        Canary(
            name=e["name"],
            value=e["value"] if "value" in e else "\n".join(e["lines"]),
            marker=e.get("marker", ""),
            shape=e.get("shape", ""),
        )
        for e in entries
    ]


def named_forms(value: str) -> dict[str, str]:
    """Each form to search for, by kind (`plain`, `base64`, `line 2`...), without duplicates.

    Also those of the value's Unicode NFC and NFD normalizations (kinds `... (NFC)`):
    Terraform prints every string in NFC.
    """
    forms: dict[str, str] = {}
    for label, variant in (
        ("", value),
        (" (NFC)", unicodedata.normalize("NFC", value)),
        (" (NFD)", unicodedata.normalize("NFD", value)),
    ):
        for kind, form in _forms_of(variant).items():
            if form not in forms.values():
                forms[kind + label] = form
    return forms


def _forms_of(value: str) -> dict[str, str]:
    raw = value.encode("utf-8")
    candidates = [
        ("plain", value),
        ("base64", base64.b64encode(raw).decode()),
        ("base64 unpadded", base64.b64encode(raw).decode().rstrip("=")),
        ("base64url", base64.urlsafe_b64encode(raw).decode()),
        ("base64url unpadded", base64.urlsafe_b64encode(raw).decode().rstrip("=")),
        ("url", quote(value, safe="")),
        ("url plus", quote_plus(value)),
        ("json", json.dumps(value)[1:-1]),
        ("json unicode", json.dumps(value, ensure_ascii=False)[1:-1]),
    ]
    for number, line in enumerate(value.split("\n"), start=1):
        line = line.strip()
        if len(line) >= MIN_PART_LENGTH:
            candidates.append((f"line {number}", line))
    forms: dict[str, str] = {}
    seen: set[str] = set()
    for kind, form in candidates:
        if form and form not in seen:
            seen.add(form)
            forms[kind] = form
    return forms


def every_form(value: str) -> list[str]:
    """The forms of `value` a leak battery searches for (see `named_forms`)."""
    return list(named_forms(value).values())


def _sources(paths_or_texts: Iterable[object] | object) -> Iterable[tuple[str, str | bytes]]:
    """(where, content) for each file (directories recursively), string and bytes."""
    if isinstance(paths_or_texts, str | bytes | os.PathLike):
        paths_or_texts = [paths_or_texts]
    for index, item in enumerate(paths_or_texts):  # type: ignore[arg-type]
        if isinstance(item, str):
            yield f"text #{index}", item
        elif isinstance(item, bytes | bytearray):
            yield f"bytes #{index}", bytes(item)
        elif isinstance(item, os.PathLike):
            path = Path(item)
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                if not file.is_symlink():
                    yield str(file), file.read_bytes()
        else:
            raise TypeError(f"find_leaks: a Path, str or bytes, not {type(item).__name__}")


def find_leaks(paths_or_texts: Iterable[object] | object, canaries: Iterable[Canary]) -> list[Leak]:
    """Every form of every canary found in the given files, directories, strings or bytes.

    Paths (`os.PathLike`; a directory is searched recursively, symlinks skipped) are read
    as raw bytes and searched for each form's UTF-8 bytes (and its Latin-1 bytes, for a
    form with non-ASCII characters Latin-1 can hold); a `str` is searched as text. One
    `Leak` per canary, form and place, with the offset of the first hit in `where`.
    """
    searches = []
    for canary in canaries:
        for kind, form in named_forms(canary.value).items():
            encoded = [form.encode("utf-8")]
            if not form.isascii():
                with contextlib.suppress(UnicodeEncodeError):
                    encoded.append(form.encode("latin-1"))
            searches.append((canary, kind, form, encoded))
    leaks = []
    for where, content in _sources(paths_or_texts):
        for canary, kind, form, encoded in searches:
            needles: list[str] | list[bytes] = [form] if isinstance(content, str) else encoded
            for needle in needles:
                offset = content.find(needle)  # type: ignore[arg-type]
                if offset >= 0:
                    unit = "char" if isinstance(content, str) else "byte"
                    leaks.append(Leak(canary, form, f"{where} at {unit} {offset}", kind))
                    break
    return leaks
