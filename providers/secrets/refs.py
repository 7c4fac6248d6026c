"""Secret references: the text a manifest puts where a secret value is wanted.

    vault:MOUNT/PATH[?version=N]#KEY     a key of a KV (v1 or v2) secret; MOUNT is the first segment
    aws-ssm:/PATH                        an SSM parameter (SecureString decrypted)
    aws-sm:NAME[#JSON_KEY]               a Secrets Manager secret, whole or one key of its JSON
    file:/ABSOLUTE/PATH                  a file on the agent's host

A reference names where a secret lives, never the secret itself: it may be shown in messages
and logs. Paths are checked at parse time so that a prefix check on them means what it says:
no `.` or `..` segment, no empty segment (`//`), no trailing slash.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SCHEMES", "SecretRef", "SecretRefError", "normalized", "parse_ref", "ref_allowed"]

SCHEMES = ("vault", "aws-ssm", "aws-sm", "file")

# Vault path segments and KV keys: printable, no whitespace, none of the characters the
# reference syntax itself uses (? # %) and no backslash.
_VAULT_SEGMENT_RE = re.compile(r"[^\s?#%\\/]+")
_VAULT_KEY_RE = re.compile(r"[^\s?#%\\]+")
# SSM parameter names: letters, digits and . - _ (AWS's own rule), in /-separated segments.
_SSM_SEGMENT_RE = re.compile(r"[A-Za-z0-9_.-]+")
# Secrets Manager names (letters, digits, / _ + = . @ -) or ARNs (which add ':').
_SM_NAME_RE = re.compile(r"[A-Za-z0-9/_+=.@:-]+")
_SM_KEY_RE = re.compile(r"[^\s#?]+")
_FILE_SEGMENT_RE = re.compile(r"[^/]+")
_VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")

_EXPECTED = {
    "vault": "vault:MOUNT/PATH#KEY or vault:MOUNT/PATH?version=N#KEY"
    " (e.g. vault:kv/prod/db#password)",
    "aws-ssm": "aws-ssm:/PATH (e.g. aws-ssm:/prod/db/password)",
    "aws-sm": "aws-sm:NAME or aws-sm:NAME#JSON_KEY (e.g. aws-sm:prod/db#password)",
    "file": "file:/ABSOLUTE/PATH (e.g. file:/etc/gitops-agent/secrets/db-password)",
}


class SecretRefError(ValueError):
    """A reference that does not follow the syntax; the message says what was expected.

    The caller adds where the reference came from (file, line, key).
    """


@dataclass(frozen=True)
class SecretRef:
    """A parsed reference. `raw` is the text as written (not secret: fit for messages)."""

    scheme: str
    path: str
    key: str | None
    version: int | None
    raw: str

    def __str__(self) -> str:
        return self.raw


def _fail(scheme: str, problem: str) -> SecretRefError:
    return SecretRefError(f"{problem}; expected {_EXPECTED[scheme]}")


def _check_segments(scheme: str, path: str, segment_re: re.Pattern[str]) -> None:
    """Each /-separated segment non-empty, not `.` or `..`, and made of allowed characters."""
    for segment in path.split("/"):
        if segment == "":
            raise _fail(scheme, "empty path segment (// or a trailing /)")
        if segment in (".", ".."):
            raise _fail(scheme, f"{segment!r} is not allowed as a path segment")
        if not segment_re.fullmatch(segment):
            raise _fail(scheme, f"path segment {segment!r} has characters that are not allowed")


def _parse_vault(raw: str, rest: str) -> SecretRef:
    body, hash_, key = rest.partition("#")
    if not hash_ or not key:
        raise _fail("vault", "a KEY after # is required")
    if not _VAULT_KEY_RE.fullmatch(key):
        raise _fail("vault", f"KEY {key!r} has characters that are not allowed")
    path, question, query = body.partition("?")
    version: int | None = None
    if question:
        name, equals, value = query.partition("=")
        if name != "version" or not equals or not _VERSION_RE.fullmatch(value):
            raise _fail("vault", f"the only query allowed is ?version=N (N >= 1), not ?{query}")
        version = int(value)
    if path.startswith("/"):
        raise _fail("vault", "the path starts with the mount, not with /")
    _check_segments("vault", path, _VAULT_SEGMENT_RE)
    if "/" not in path:
        raise _fail("vault", "a path inside the mount is required after MOUNT/")
    return SecretRef("vault", path, key, version, raw)


def _parse_ssm(raw: str, rest: str) -> SecretRef:
    if not rest.startswith("/"):
        raise _fail("aws-ssm", "the parameter name must start with /")
    if "#" in rest or "?" in rest:
        raise _fail("aws-ssm", "# and ? are not allowed (an SSM parameter has a single value)")
    _check_segments("aws-ssm", rest[1:], _SSM_SEGMENT_RE)
    return SecretRef("aws-ssm", rest, None, None, raw)


def _parse_sm(raw: str, rest: str) -> SecretRef:
    name, hash_, key = rest.partition("#")
    if hash_ and not key:
        raise _fail("aws-sm", "an empty JSON_KEY after #")
    if hash_ and not _SM_KEY_RE.fullmatch(key):
        raise _fail("aws-sm", f"JSON_KEY {key!r} has characters that are not allowed")
    if not name:
        raise _fail("aws-sm", "the secret NAME is empty")
    if not _SM_NAME_RE.fullmatch(name):
        raise _fail("aws-sm", f"secret name {name!r} has characters that are not allowed")
    # Names may hold slashes (prod/db); check them like paths so prefixes stay meaningful.
    if name.startswith("/"):
        raise _fail("aws-sm", "the secret NAME must not start with /")
    _check_segments("aws-sm", name, _SM_NAME_RE)
    return SecretRef("aws-sm", name, key or None, None, raw)


def _parse_file(raw: str, rest: str) -> SecretRef:
    if not rest.startswith("/"):
        raise _fail("file", "the path must be absolute")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in rest):
        raise _fail("file", "the path has control characters")
    _check_segments("file", rest[1:], _FILE_SEGMENT_RE)
    return SecretRef("file", rest, None, None, raw)


_PARSERS = {
    "vault": _parse_vault,
    "aws-ssm": _parse_ssm,
    "aws-sm": _parse_sm,
    "file": _parse_file,
}


def parse_ref(text: str) -> SecretRef:
    """The reference in `text`, or SecretRefError saying what is expected."""
    if not isinstance(text, str):
        raise SecretRefError(f"a secret reference must be a string, not {type(text).__name__}")
    scheme, colon, rest = text.partition(":")
    if not colon or scheme not in _PARSERS:
        raise SecretRefError(
            "a reference starting with one of "
            + ", ".join(f"{s}:" for s in SCHEMES)
            + " (e.g. vault:kv/prod/db#password)"
        )
    if not rest:
        raise _fail(scheme, "nothing after the scheme")
    return _PARSERS[scheme](text, rest)


def normalized(ref: SecretRef) -> str:
    """`scheme:path`, the form that allowed prefixes are matched against."""
    return f"{ref.scheme}:{ref.path}"


def ref_allowed(ref: SecretRef, allowed_prefixes: Sequence[str]) -> bool:
    """True when `scheme:path` of `ref` starts with one of `allowed_prefixes`.

    A prefix ending in `/` (or `:`) matches anything below it. Any other prefix matches
    only on a segment boundary: `vault:kv/prod` allows `vault:kv/prod/db` but not
    `vault:kv/production/db`. Since parsed paths hold no `.`, `..` or empty segments, a
    reference cannot step outside a prefix it matches.
    """
    target = normalized(ref)
    for prefix in allowed_prefixes:
        if not prefix or not target.startswith(prefix):
            continue
        if prefix.endswith(("/", ":")) or len(target) == len(prefix) or target[len(prefix)] == "/":
            return True
    return False
