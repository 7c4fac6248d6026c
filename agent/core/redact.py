"""One redactor in front of every output: logs, plan output, status, notifications, errors.

Every secret value the agent fetches is registered with a `Redactor` before anything
else sees it; `redact` then scrubs any text before it is written or shown. A value is
registered together with the forms it takes on its way out:

- the value itself, and the value stripped of surrounding whitespace (a trailing
  newline is often lost on the way);
- its escaped forms: JSON (`ensure_ascii` true and false), Python `repr`, Go's
  `strconv.Quote` (what Terraform's human plan output prints: `\\"`, `\\\\`, `\\t`,
  `\\x01`, `\\u200b`, printable unicode as is), Go's `encoding/json` (what
  `terraform show -json` prints: like JSON, plus `<`, `>`, `&`, U+2028/9 as `\\u003c`...)
  and the HCL literal form (`${` as `$${`, `%{` as `%%{`, as in generated `.tf` files;
  Terraform's plan output itself does *not* escape them, checked with 1.11 and 1.15);
- its encodings: standard and URL-safe base64 with and without padding, the base64 of
  the value at each of the three byte alignments inside a longer blob (an HTTP Basic
  `user:password` header), `quote(value, safe="")`, `quote(value)` and `quote_plus`;
- for a multi-line value, each line stripped of whitespace (Terraform prints such a value
  as a heredoc, one line at a time), with its escaped forms;
- for a value that is a JSON document (a service-account key file), each string value in
  it of at least `MIN_JSON_STRING_LENGTH` characters, with its forms (tools print such
  documents re-indented or field by field; this masks the document's harmless fields
  too, such as its `token_uri`, wherever they appear).

A secret value can be masked safely only if it is long and uncommon: `true` would turn
`enabled = true` into `enabled = ***` everywhere, `a` would mask every word "a", and a
repository author could confirm a guessed value by printing candidates and seeing which is
masked. `weak_value` says whether a value is too short (fewer than `MIN_SECRET_LENGTH`
characters, surrounding whitespace aside), one character repeated, or one of a small list
of common values (`COMMON_VALUES`, compared case-insensitively); the secrets resolver
refuses such a value (agent.units.secrets) unless the host config allows it.

Derived parts (lines, strings of a JSON document, base64 inside a blob) shorter than
`MIN_PART_LENGTH` are not registered: masking `}` or `-----` everywhere would destroy
the output, and such parts carry little of the secret. A value shorter than
`MIN_LENGTH` is registered alone, with no derived forms, and masked only where it stands
as a whole word (not next to a letter, digit or `_`); a warning is logged (naming the
length, never the value). An empty or whitespace-only value is not registered (it cannot
be masked without masking every space) and a warning is logged.

A value of several words (anything split by whitespace, a multi-line value too) is also
matched as Terraform prints it word-wrapped: Terraform wraps diagnostics (a precondition's
`error_message`) at whitespace, so `correct horse battery staple` can come out as
`... is correct horse` / `battery staple ...`, and multi-line values come out indented. Each
whitespace run between the value's words may then be any run of blanks, or a line break
with the next line's indentation and a `│` box prefix (`_SEP`). Where a text is cut (the
start and the end of every redacted text: the last lines of a command's output, a
truncated message), the piece of a multi-word value left at the cut is masked too: a text
that starts with the value's last words or ends with its first words (a piece of at least
`MIN_PART_LENGTH` characters). `LineRedactor` does the same for a stream of lines: it
holds a line back while it ends with the first words of a value (so a wrapped value is
redacted whole, with the lines it spans), and passes every other line on at once.

Matching is one compiled alternation of every form, longest first, behind a lookahead on
the forms' first characters (Python's `re` tries the branches of an alternation one by
one at each position; the lookahead, a small trie, rejects most positions at once: about
10 us for an 80-character line with 1,000 forms, against 200 us without it). Where
registered forms overlap in a text, the union of every match is masked, so no fragment
of either survives. Patterns are compiled lazily, under a lock, on the first use after a
registration, in a few chunks merged as they grow (see `Redactor._patterns`).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import traceback
import unicodedata
import weakref
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, quote_plus

__all__ = [
    "COMMON_VALUES",
    "MASK",
    "MIN_LENGTH",
    "MIN_PART_LENGTH",
    "MIN_SECRET_LENGTH",
    "LineRedactor",
    "RedactingFilter",
    "Redactor",
    "Secret",
    "install_logging_redaction",
    "redact_exception",
    "remove_logging_redaction",
    "secret_forms",
    "weak_value",
]

log = logging.getLogger(__name__)

# The same text as `str(Secret)`. It does not name the secret's source: a form can belong to
# several values, and a fixed mask keeps redacted output comparable from pass to pass.
MASK = "***"
# A whole value shorter than this is masked only as a whole word, without derived forms.
MIN_LENGTH = 4
# A secret the resolver accepts without `secrets.allow_weak_values` has at least this many
# characters (NIST SP 800-63B's minimum for a password chosen by a person).
MIN_SECRET_LENGTH = 8
# Values of at least MIN_SECRET_LENGTH characters that are still too common to mask: default
# and placeholder passwords, keyboard and number runs, words that appear in output.
COMMON_VALUES = frozenset(
    {
        "12345678",
        "123456789",
        "1234567890",
        "87654321",
        "abcd1234",
        "abcdefgh",
        "admin123",
        "administrator",
        "changeit",
        "changeme",
        "changeme123",
        "default",
        "disabled",
        "football",
        "iloveyou",
        "letmein1",
        "localhost",
        "nopassword",
        "p@ssw0rd",
        "p@ssword",
        "passw0rd",
        "password",
        "password1",
        "password123",
        "placeholder",
        "postgres",
        "qwerty123",
        "qwertyui",
        "qwertyuiop",
        "replaceme",
        "secret123",
        "sunshine",
        "superman",
        "trustno1",
        "undefined",
        "welcome1",
    }
)
# Lines, strings of a JSON document and base64 inside a blob shorter than this are skipped.
MIN_PART_LENGTH = 6
# Strings of a JSON document shorter than this are skipped ("us-east-1", "my-project").
MIN_JSON_STRING_LENGTH = 12
# How many leading characters of each form the prefilter lookahead checks.
_PREFIX = 4
# Between two words of a value as Terraform may print it: blanks, or a line break with the
# next line's indentation and box prefix (`│ ` in diagnostics). Within a line, any blanks:
# a value "a  b" wrapped keeps no trace of its double space.
_SEP = r"(?:[^\S\n]*\n[^\S\n]*(?:[│|][^\S\n]*)?|[^\S\n]+)"
# At most this many words of a value are matched as a piece at the edge of a text.
_EDGE_WORDS = 64
# What may come before a piece of a value at the start of a text: indentation, a box.
_LEAD = r"[^\S\n]*(?:[│|][^\S\n]*)?"


class Secret:
    """A secret value in Python code: str() and repr() are masked; only `reveal()` gives it.

    Equal (and hashed) by value. Not JSON-serializable (it is not a `str`, so `json.dumps`
    raises TypeError) and not picklable, so that it cannot be written out by accident.
    `source` is the reference the value came from (`vault:kv/prod/db#password`): safe to show.
    """

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds a str, not {type(value).__name__}")
        self._value = value
        self.source = source

    def reveal(self) -> str:
        """The value, for the one place that hands it to a process."""
        return self._value

    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return format(MASK, spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return self._value == other._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError(f"a Secret ({self.source}) cannot be pickled")

    # Immutable: copies are the same object (copy would otherwise go through pickling).
    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: object) -> Secret:
        return self


# --- the forms of a value -----------------------------------------------------------


def _json(value: str, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)[1:-1]


_GO_NAMED = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    '"': '\\"',
    "\\": "\\\\",
}


def _go_quote(value: str) -> str:
    """Go's `strconv.Quote(value)` without the quotes: how Terraform's plan prints a string.

    Go's `unicode.IsPrint` (letters, marks, numbers, punctuation, symbols, ASCII space)
    is Python's `str.isprintable` for our purpose.
    """
    out = []
    for ch in value:
        if ch in _GO_NAMED:
            out.append(_GO_NAMED[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


_GO_JSON_EXTRA = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}
_GO_JSON_EXTRA.update({"\u2028": "\\u2028", "\u2029": "\\u2029"})


def _go_json(value: str) -> str:
    """Go's `encoding/json` (HTML-safe by default): how `terraform show -json` prints it."""
    text = _json(value, ascii_only=False)
    for ch, escaped in _GO_JSON_EXTRA.items():
        text = text.replace(ch, escaped)
    return text


def _hcl(escaped: str) -> str:
    return escaped.replace("${", "$${").replace("%{", "%%{")


def _escapes(value: str) -> set[str]:
    go = _go_quote(value)
    plain_json = _json(value, ascii_only=False)
    return {
        _json(value, ascii_only=True),
        plain_json,
        repr(value)[1:-1],
        go,
        _go_json(value),
        _hcl(go),
        _hcl(plain_json),
    }


def _base64_forms(data: bytes) -> set[str]:
    forms = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(data).decode("ascii")
        forms.update((whole, whole.rstrip("=")))
        # The value inside a longer base64 blob, at each byte alignment: drop the
        # characters that also encode bits of the neighbouring bytes.
        for shift, skip in ((0, 0), (1, 2), (2, 3)):
            core = encode(b"\0" * shift + data).decode("ascii").rstrip("=")[skip:]
            if (shift + len(data)) % 3:
                core = core[:-1]
            if len(core) >= MIN_PART_LENGTH:
                forms.add(core)
    return forms


def _encodings(value: str) -> set[str]:
    return {
        *_base64_forms(value.encode("utf-8", "surrogatepass")),
        quote(value, safe="", errors="surrogatepass"),
        quote(value, errors="surrogatepass"),
        quote_plus(value, errors="surrogatepass"),
    }


def _json_strings(value: str) -> list[str]:
    """The string values (not the keys) of a value that is a JSON document, else none."""
    if value.strip()[:1] not in ("{", "["):
        return []
    try:
        doc = json.loads(value)
    except ValueError:
        return []
    found: list[str] = []
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            found.append(item)
    return found


def _part_forms(part: str) -> set[str]:
    """A line or a string of a JSON document: itself, its escapes, its lines."""
    forms = {part, *_escapes(part)}
    for line in part.split("\n"):
        line = line.strip()
        if len(line) >= MIN_PART_LENGTH:
            forms.add(line)
            forms.update(_escapes(line))
    return {f for f in forms if len(f) >= MIN_PART_LENGTH}


def secret_forms(value: str) -> frozenset[str]:
    """Every form `Redactor.register` registers for `value` (see the module docstring).

    The forms of its Unicode NFC and NFD normalizations too: Terraform normalizes every
    string to NFC, so a value fetched in decomposed form is printed composed.
    """
    variants = dict.fromkeys(
        [value, unicodedata.normalize("NFC", value), unicodedata.normalize("NFD", value)]
    )
    return frozenset().union(*(_forms_of(variant) for variant in variants))


def _forms_of(value: str) -> frozenset[str]:
    if not value.strip():
        return frozenset()
    if len(value) < MIN_LENGTH:
        return frozenset({value})
    forms = {value}
    wholes = [value]
    stripped = value.strip()
    if stripped != value and len(stripped) >= MIN_LENGTH:
        wholes.append(stripped)
    for whole in wholes:
        forms.add(whole)
        forms.update(_escapes(whole))
        forms.update(_encodings(whole))
    for line in value.split("\n"):
        line = line.strip()
        if len(line) >= MIN_PART_LENGTH:
            forms.update(_part_forms(line))
    for string in _json_strings(value):
        if len(string.strip()) >= MIN_JSON_STRING_LENGTH:
            forms.update(_part_forms(string.strip()))
    return frozenset(f for f in forms if len(f) >= MIN_LENGTH and f.strip())


def wrapped_words(value: str) -> frozenset[tuple[str, ...]]:
    """The word sequences of `value` to match across Terraform's wrapping (see the module
    docstring): of the value and of its escaped forms, in NFC and NFD, with 2 words or more.
    """
    if len(value.strip()) < MIN_LENGTH:
        return frozenset()
    found = set()
    for variant in dict.fromkeys(
        [value, unicodedata.normalize("NFC", value), unicodedata.normalize("NFD", value)]
    ):
        for form in (variant, *_escapes(variant)):
            words = tuple(form.split())
            if len(words) >= 2:
                found.add(words)
    return frozenset(found)


def _joined(words: Iterable[str]) -> str:
    return _SEP.join(map(re.escape, words))


def _prefixes(words: tuple[str, ...]) -> str:
    """A regex for the proper prefixes of `words` (the first 1 to n-1 words, at most
    `_EDGE_WORDS`: the regex nests a group per word, and Python's parser recurses)."""
    head = words[:-1][:_EDGE_WORDS]
    inner = ""
    for word in reversed(head[1:]):
        inner = f"(?:{_SEP}{re.escape(word)}{inner})?"
    return re.escape(head[0]) + inner


def _suffixes(words: tuple[str, ...]) -> str:
    """A regex for the proper suffixes of `words` (the last 1 to n-1 words, at most
    `_EDGE_WORDS`)."""
    tail = words[1:][-_EDGE_WORDS:]
    inner = ""
    for word in tail[:-1]:
        inner = f"(?:{inner}{re.escape(word)}{_SEP})?"
    return inner + re.escape(tail[-1])


def _by_length(sequences: Iterable[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return sorted(sequences, key=lambda words: (-sum(map(len, words)), words))


def weak_value(value: str) -> bool:
    """Whether `value` is too short or too common to be masked safely (module docstring).

    Says no more than yes or no: the caller's message must not hint at the value.
    """
    core = value.strip()
    return len(core) < MIN_SECRET_LENGTH or len(set(core)) == 1 or core.casefold() in COMMON_VALUES


# --- the redactor ---------------------------------------------------------------------


def _trie_regex(words: Iterable[str]) -> str:
    """A regex matching any of `words` (short, non-empty strings), as a trie."""
    trie: dict[str, dict] = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def render(node: dict[str, dict]) -> str:
        branches = []
        for ch in sorted(k for k in node if k):
            child, literal = node[ch], ch
            while len(child) == 1 and "" not in child:
                ((nxt, child),) = child.items()
                literal += nxt
            branches.append(re.escape(literal) + render(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:  # a word ends here: the rest is optional (any match will do)
            return f"(?:{body})?" if len(branches) == 1 else body + "?"
        return body

    return render(trie)


_Sequences = frozenset[tuple[str, ...]]


class _Compiled:
    """The compiled patterns for one set of forms (a chunk: see `Redactor._patterns`).

    `forms` are masked anywhere, `words` (short values) only as whole words, `wrapped`
    (multi-word values, as word sequences) across Terraform's wrapping and, in pieces, at
    the edges of a text.
    """

    def __init__(
        self, forms: frozenset[str], words: frozenset[str], wrapped: _Sequences = frozenset()
    ) -> None:
        self.forms, self.words, self.wrapped = forms, words, wrapped
        self.searches: list[Callable[[str], re.Match[str] | None]] = []
        self.finditers: list[Callable[[str], Iterable[re.Match[str]]]] = []
        branches = [re.escape(f) for f in sorted(forms, key=lambda f: (-len(f), f))]
        if words:
            # Short whole values: only where they stand as a whole word.
            ordered = sorted(words, key=lambda f: (-len(f), f))
            branches.append(r"(?<!\w)(?:" + "|".join(map(re.escape, ordered)) + r")(?!\w)")
        if branches:
            self._add(_trie_regex({f[:_PREFIX] for f in forms | words}), "|".join(branches))
        self.head: re.Pattern[str] | None = None
        self.tail: re.Pattern[str] | None = None
        self.reach = 0
        if wrapped:
            # Apart from the literal forms, so that a literal form matching at the same
            # position (a shorter value, a word of this one) cannot hide a wrapped match.
            ordered_seqs = _by_length(wrapped)
            firsts = _trie_regex({seq[0][:_PREFIX] for seq in ordered_seqs})
            self._add(firsts, "|".join(_joined(seq) for seq in ordered_seqs))
            lasts = "|".join(_suffixes(seq) for seq in ordered_seqs)
            inner = _trie_regex({w[:_PREFIX] for seq in ordered_seqs for w in seq[1:]})
            self.head = re.compile(f"{_LEAD}(?={inner})({lasts})")
            heads = "|".join(_prefixes(seq) for seq in ordered_seqs)
            self.tail = re.compile(f"(?={firsts})(?:{heads})[^\\S\\n]*\\Z")
            # How far from its end a text is searched for a value's first words.
            self.reach = 4 * max(sum(map(len, seq)) for seq in ordered_seqs) + 64

    def _add(self, prefilter: str, alternation: str) -> None:
        self.searches.append(re.compile(f"(?={prefilter})(?:{alternation})").search)
        # Zero-width, so that every start position is tried: overlapping matches.
        self.finditers.append(re.compile(f"(?={prefilter})(?=({alternation}))").finditer)

    def search(self, text: str) -> bool:
        return any(search(text) for search in self.searches)

    def spans(self, text: str) -> Iterable[tuple[int, int]]:
        for finditer in self.finditers:
            for m in finditer(text):
                yield m.span(1)

    def edge_spans(self, text: str, head: bool, tail: bool) -> Iterable[tuple[int, int]]:
        """The pieces of multi-word values at the start (`head`) and the end (`tail`)."""
        if self.head is None or self.tail is None:
            return
        if head and (m := self.head.match(text)) and _long_piece(m.group(1)):
            yield m.span(1)
        m = self.tail.search(text, max(0, len(text) - self.reach)) if tail else None
        if m and _long_piece(m.group()):
            yield m.span()

    def held_from(self, text: str) -> int | None:
        """Where the first words of a multi-word value end `text`, if they do."""
        if self.tail is None:
            return None
        m = self.tail.search(text, max(0, len(text) - self.reach))
        return m.start() if m else None

    def __len__(self) -> int:
        return len(self.forms) + len(self.words) + len(self.wrapped)


def _long_piece(piece: str) -> bool:
    # A piece shorter than this carries little of the secret, and masking it would mask
    # common short words at the edges of texts.
    return len("".join(piece.split())) >= MIN_PART_LENGTH


class Redactor:
    """Every secret value fetched is registered here; `redact` scrubs text before it is shown.

    Thread-safe: values are registered from worker threads while other threads redact.
    """

    MASK = MASK

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, frozenset[str]] = {}
        self._forms: set[str] = set()  # masked anywhere
        self._words: set[str] = set()  # short values: masked as whole words only
        self._wrapped: set[tuple[str, ...]] = set()  # multi-word values, as words
        # Not compiled yet: forms, words, wrapped.
        self._pending: tuple[set[str], set[str], set[tuple[str, ...]]] = (set(), set(), set())
        self._chunks: tuple[_Compiled, ...] = ()

    def register(self, value: str | Secret) -> None:
        """Mask `value` (and its forms) in everything redacted from now on."""
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, str):
            raise TypeError(f"a secret value is a str, not {type(value).__name__}")
        if value in self._values:
            return
        if not value.strip():
            log.warning("a secret value is empty or only whitespace: nothing to mask")
            return
        forms = secret_forms(value)
        short = len(value) < MIN_LENGTH
        wrapped = wrapped_words(value)
        if short:
            log.warning(
                "a secret value has only %d characters (fewer than %d): it is masked only "
                "where it stands as a whole word",
                len(value),
                MIN_LENGTH,
            )
        with self._lock:
            if value in self._values:
                return
            self._values[value] = forms
            known, pending = (
                (self._words, self._pending[1]) if short else (self._forms, self._pending[0])
            )
            new = forms - known
            known.update(new)
            pending.update(new)
            new_wrapped = wrapped - self._wrapped
            self._wrapped.update(new_wrapped)
            self._pending[2].update(new_wrapped)

    def forms(self, value: str | Secret) -> frozenset[str]:
        """Every form registered (or that would be registered) for `value`."""
        if isinstance(value, Secret):
            value = value.reveal()
        return self._values.get(value) or secret_forms(value)

    def __len__(self) -> int:
        return len(self._values)

    def _patterns(self) -> tuple[_Compiled, ...]:
        """The compiled chunks, after compiling what was registered since the last call.

        Forms registered since the last build are compiled as a new, small chunk; chunks are
        merged as they grow (a chunk is merged into the one before it when that one is not
        more than twice as large), so there are a few chunks at most and a registration
        costs a compile of its own forms, not of everything (compiling 1,000 forms takes
        ~75 ms). Masking the union of every chunk's matches gives the same result as one
        pattern.
        """
        if not any(self._pending):
            return self._chunks
        with self._lock:
            forms, words, wrapped = self._pending
            if forms or words or wrapped:
                new = _Compiled(frozenset(forms), frozenset(words), frozenset(wrapped))
                chunks = [*self._chunks, new]
                while len(chunks) >= 2 and len(chunks[-2]) <= 2 * len(chunks[-1]):
                    last, before = chunks.pop(), chunks.pop()
                    chunks.append(
                        _Compiled(
                            before.forms | last.forms,
                            before.words | last.words,
                            before.wrapped | last.wrapped,
                        )
                    )
                self._chunks = tuple(chunks)
                self._pending = (set(), set(), set())
            return self._chunks

    def redact(self, text: str) -> str:
        """`text` with every registered form replaced by `MASK`, and the pieces of
        multi-word values at its start and end (where a text may have been cut)."""
        return self._redact(text, head=True, tail=True)

    def _redact(self, text: str, *, head: bool, tail: bool) -> str:
        if not isinstance(text, str):
            text = str(text)
        spans = self._spans(text, head=head, tail=tail)
        if not spans:
            return text
        out, pos = [], 0
        for start, end in spans:
            out.append(text[pos:start])
            out.append(self.MASK)
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def _spans(self, text: str, *, head: bool, tail: bool) -> list[tuple[int, int]]:
        """The spans of `text` to mask, merged: the union of every match, so that
        overlapping secrets leave no fragment; with `head`/`tail`, the pieces of multi-word
        values at the start/end of `text` too."""
        chunks = self._patterns()
        found: list[tuple[int, int]] = []
        if any(chunk.search(text) for chunk in chunks):
            found = [span for chunk in chunks for span in chunk.spans(text)]
        if head or tail:
            for chunk in chunks:
                found.extend(chunk.edge_spans(text, head, tail))
        found.sort()
        merged: list[tuple[int, int]] = []
        for start, end in found:
            if merged and start < merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def redact_bytes(self, data: bytes) -> bytes:
        """`data` (UTF-8, or anything: undecodable bytes pass through) redacted."""
        text = data.decode("utf-8", "surrogateescape")
        redacted = self.redact(text)
        if redacted is text:
            return data
        return redacted.encode("utf-8", "surrogateescape")

    def redact_obj(self, obj: Any) -> Any:
        """A copy of a JSON-like document with every string (keys too) redacted.

        Dicts, lists, tuples (named ones too), sets and strings are walked; a `Secret` becomes
        `MASK`; a number whose text holds a registered form becomes its redacted text (as it
        would in the serialized document); anything else is returned as is. Two keys that
        redact to the same text collapse into one (the last wins).
        """
        if isinstance(obj, str):
            return self.redact(obj)
        if isinstance(obj, Secret):
            return self.MASK
        if obj is None or isinstance(obj, bool):
            return obj
        if isinstance(obj, int | float):
            text = str(obj)
            redacted = self.redact(text)
            return obj if redacted == text else redacted
        if isinstance(obj, dict):
            return {self.redact_obj(k): self.redact_obj(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.redact_obj(item) for item in obj]
        if isinstance(obj, tuple):
            items = [self.redact_obj(item) for item in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
        if isinstance(obj, set | frozenset):
            return type(obj)(self.redact_obj(item) for item in obj)
        return obj

    def contains_secret(self, text: str) -> bool:
        """Whether `text` holds any registered form."""
        return any(chunk.search(text) for chunk in self._patterns())

    def held_from(self, text: str) -> int | None:
        """Where `text` ends with the first words of a multi-word value (the rest may be on
        the next line): the earliest such position, or None."""
        starts = [
            start for chunk in self._patterns() if (start := chunk.held_from(text)) is not None
        ]
        return min(starts, default=None)


class LineRedactor:
    """Redacts a stream of lines (a command's output) as they come, for `emit`.

    A line that ends with the first words of a multi-word secret is held back until the
    next line shows whether the secret goes on there (Terraform wraps long diagnostics at
    whitespace); then the lines are redacted together, so a wrapped secret is masked whole.
    At most `max_held` lines are held (a longer run is redacted as it is, its cut edges
    included); `flush` passes on what is held, at the end of the stream. Every other line
    is passed on at once. Lines that a masked secret spanned are passed on as one line.
    Not thread-safe: one stream, one caller at a time.
    """

    def __init__(self, redactor: Redactor, emit: Callable[[str], None], max_held: int = 32) -> None:
        self._redactor = redactor
        self._emit = emit
        self._max_held = max_held
        self._held: list[str] = []
        self._cut = False  # the held text starts where an earlier run was cut

    def __call__(self, line: str) -> None:
        self._held.append(line)
        text = "\n".join(self._held)
        start = self._redactor.held_from(text)
        if start is None:
            self._pass_on(text, cut_after=False)
            return
        if len(self._held) >= self._max_held:
            self._pass_on(text, cut_after=True)
            return
        # Pass on the lines before the one where the value's first words begin, unless
        # a secret found whole crosses into it (a held line it completed): keep its lines.
        begins = text.rfind("\n", 0, start) + 1
        spans = self._redactor._spans(text, head=False, tail=False)
        moved = True
        while begins and moved:
            moved = False
            for span_start, span_end in spans:
                if span_start <= begins - 1 < span_end:
                    begins = text.rfind("\n", 0, span_start) + 1
                    moved = True
        if begins:
            self._pass_on(text[: begins - 1], cut_after=False)
            self._held = text[begins:].split("\n")

    def flush(self) -> None:
        """Pass on the lines held (the stream ended)."""
        if self._held:
            self._pass_on("\n".join(self._held), cut_after=False)

    def _pass_on(self, text: str, *, cut_after: bool) -> None:
        redacted = self._redactor._redact(text, head=self._cut, tail=cut_after)
        self._held = []
        self._cut = cut_after
        for line in redacted.split("\n"):
            self._emit(line)


def redact_exception(exc: BaseException, redactor: Redactor) -> str:
    """The traceback of `exc` (with its chained exceptions), redacted."""
    return redactor.redact("".join(traceback.format_exception(exc)))


# --- logging ----------------------------------------------------------------------------

_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_formatter = logging.Formatter()


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception:
        return f"<unprintable {type(obj).__name__}>"


def _scrub_record(record: logging.LogRecord, redact: Callable[[str], str]) -> None:
    """Format the record's message and traceback now, redacted, and drop what they came from."""
    try:
        message = record.getMessage()
    except Exception:
        # logging would print msg and args raw in its error report: format them here.
        message = f"{_safe_str(record.msg)} (log arguments: {_safe_str(record.args)})"
    record.msg = redact(message)
    record.args = None
    if record.exc_info:
        if record.exc_info[0] is not None:
            record.exc_text = _formatter.formatException(record.exc_info)
        record.exc_info = None
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    for key, value in list(vars(record).items()):
        if key not in _STANDARD_ATTRS and isinstance(value, str | Secret):
            setattr(record, key, redact(str(value)))


class RedactingFilter(logging.Filter):
    """Scrubs a record before its handler formats it: message (formatted with its args
    first), traceback (formatted into `exc_text`, `exc_info` cleared so that no handler
    formats it again), stack info, and string attributes given through `extra=`."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        _scrub_record(record, self.redactor.redact)
        return True


_hook_lock = threading.Lock()
_hook_redactors: weakref.WeakSet[Redactor] = weakref.WeakSet()
_hook_base_factory: Callable[..., logging.LogRecord] | None = None


def _redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = (_hook_base_factory or logging.LogRecord)(*args, **kwargs)
    with _hook_lock:
        redactors = list(_hook_redactors)
    if redactors:

        def redact(text: str) -> str:
            for redactor in redactors:
                text = redactor.redact(text)
            return text

        _scrub_record(record, redact)
    return record


def install_logging_redaction(redactor: Redactor, logger: logging.Logger | None = None) -> None:
    """Scrub every log record with `redactor`.

    A `RedactingFilter` is added to each handler `logger` (default: the root logger) has
    now (once per redactor). With no `logger` given, records are also scrubbed as they are
    created (a `logging` record factory, installed once for all redactors): that covers
    handlers added later, handlers of other loggers and `logging.lastResort`. A redactor
    stays installed until `remove_logging_redaction` or until it is garbage-collected.
    """
    global _hook_base_factory
    target = logger if logger is not None else logging.getLogger()
    for handler in target.handlers:
        if not any(
            isinstance(f, RedactingFilter) and f.redactor is redactor for f in handler.filters
        ):
            handler.addFilter(RedactingFilter(redactor))
    if logger is None:
        with _hook_lock:
            _hook_redactors.add(redactor)
            if logging.getLogRecordFactory() is not _redacting_factory:
                _hook_base_factory = logging.getLogRecordFactory()
                logging.setLogRecordFactory(_redacting_factory)


def remove_logging_redaction(redactor: Redactor, logger: logging.Logger | None = None) -> None:
    """Undo `install_logging_redaction` (its filters on `logger`'s handlers, and the hook)."""
    global _hook_base_factory
    target = logger if logger is not None else logging.getLogger()
    for handler in target.handlers:
        for f in list(handler.filters):
            if isinstance(f, RedactingFilter) and f.redactor is redactor:
                handler.removeFilter(f)
    if logger is None:
        with _hook_lock:
            _hook_redactors.discard(redactor)
            if not _hook_redactors and logging.getLogRecordFactory() is _redacting_factory:
                logging.setLogRecordFactory(_hook_base_factory or logging.LogRecord)
                _hook_base_factory = None
