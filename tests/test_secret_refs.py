"""Secret references: the syntax of each kind, its errors, and the allowed-prefix check."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from providers.secrets.refs import SecretRef, SecretRefError, parse_ref, ref_allowed

GOOD = [
    ("vault:kv/prod/db#password", "vault", "kv/prod/db", "password", None),
    ("vault:kv/prod/db?version=3#password", "vault", "kv/prod/db", "password", 3),
    ("vault:secret/a/b/c-d_e.f#api.key", "vault", "secret/a/b/c-d_e.f", "api.key", None),
    ("aws-ssm:/prod/db/password", "aws-ssm", "/prod/db/password", None, None),
    ("aws-ssm:/single", "aws-ssm", "/single", None, None),
    ("aws-sm:prod/db#password", "aws-sm", "prod/db", "password", None),
    ("aws-sm:prod/db", "aws-sm", "prod/db", None, None),
    (
        "aws-sm:arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod-db-AbCdEf#user",
        "aws-sm",
        "arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod-db-AbCdEf",
        "user",
        None,
    ),
    ("file:/etc/gitops-agent/secrets/db", "file", "/etc/gitops-agent/secrets/db", None, None),
    (
        "file:/run/credentials/x.service/db pw",
        "file",
        "/run/credentials/x.service/db pw",
        None,
        None,
    ),
]


@pytest.mark.parametrize(("text", "scheme", "path", "key", "version"), GOOD)
def test_parses(text: str, scheme: str, path: str, key: str | None, version: int | None) -> None:
    ref = parse_ref(text)
    assert ref == SecretRef(scheme, path, key, version, text)
    assert str(ref) == text


def test_ref_is_frozen() -> None:
    ref = parse_ref("vault:kv/prod/db#password")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.path = "kv/dev/db"  # type: ignore[misc]


BAD = [
    ("", "starting with one of vault:, aws-ssm:, aws-sm:, file:"),
    ("kv/prod/db#password", "starting with one of"),
    ("vaults:kv/prod/db#password", "starting with one of"),
    ("vault:", "nothing after the scheme"),
    ("vault:kv/prod/db", "a KEY after # is required"),
    ("vault:kv/prod/db#", "a KEY after # is required"),
    ("vault:kv#password", "a path inside the mount is required"),
    ("vault:/kv/prod/db#password", "starts with the mount"),
    ("vault:kv/prod/db?version=0#password", "?version=N"),
    ("vault:kv/prod/db?version=x#password", "?version=N"),
    ("vault:kv/prod/db?ver=3#password", "?version=N"),
    ("vault:kv/prod/db?version=3", "a KEY after # is required"),
    ("vault:kv/prod/../dev/db#password", "'..' is not allowed"),
    ("vault:kv/./prod/db#password", "'.' is not allowed"),
    ("vault:kv//prod/db#password", "empty path segment"),
    ("vault:kv/prod/db/#password", "empty path segment"),
    ("vault:kv/pr od/db#password", "characters that are not allowed"),
    ("vault:kv/prod/db#pass word", "characters that are not allowed"),
    ("aws-ssm:prod/db", "must start with /"),
    ("aws-ssm:/prod/db#x", "# and ? are not allowed"),
    ("aws-ssm:/prod/../db", "'..' is not allowed"),
    ("aws-ssm:/prod//db", "empty path segment"),
    ("aws-ssm:/prod/d b", "characters that are not allowed"),
    ("aws-sm:", "nothing after the scheme"),
    ("aws-sm:#key", "NAME is empty"),
    ("aws-sm:prod/db#", "empty JSON_KEY"),
    ("aws-sm:prod/../db", "'..' is not allowed"),
    ("aws-sm:/prod/db", "must not start with /"),
    ("aws-sm:prod db", "characters that are not allowed"),
    ("file:relative/path", "must be absolute"),
    ("file:/etc/../root/secret", "'..' is not allowed"),
    ("file:/etc//secret", "empty path segment"),
    ("file:/etc/secret/", "empty path segment"),
    ("file:/etc/sec\nret", "control characters"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_rejects(text: str, message: str) -> None:
    with pytest.raises(SecretRefError) as caught:
        parse_ref(text)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_error_says_what_is_expected() -> None:
    with pytest.raises(SecretRefError, match=r"expected vault:MOUNT/PATH#KEY"):
        parse_ref("vault:kv/prod/db")
    with pytest.raises(SecretRefError, match=r"expected aws-sm:NAME or aws-sm:NAME#JSON_KEY"):
        parse_ref("aws-sm:a b")


ALLOWED = ["vault:kv/prod/", "aws-ssm:/prod/app", "file:/etc/gitops-agent/secrets/", "aws-sm:"]

PREFIX_CASES = [
    ("vault:kv/prod/db#x", True),
    ("vault:kv/prod/a/b/c?version=2#x", True),
    ("vault:kv/production/db#x", False),
    ("vault:kv/dev/db#x", False),
    ("vault:kv2/prod/db#x", False),
    ("aws-ssm:/prod/app", True),
    ("aws-ssm:/prod/app/db", True),
    ("aws-ssm:/prod/application", False),
    ("aws-ssm:/prod/other", False),
    ("file:/etc/gitops-agent/secrets/db", True),
    ("file:/etc/gitops-agent/secretsx", False),
    ("file:/etc/gitops-agent/other", False),
    ("aws-sm:anything/at/all#k", True),
]


@pytest.mark.parametrize(("text", "allowed"), PREFIX_CASES)
def test_prefix_check(text: str, allowed: bool) -> None:
    assert ref_allowed(parse_ref(text), ALLOWED) is allowed


def test_prefix_check_with_nothing_allowed() -> None:
    assert not ref_allowed(parse_ref("vault:kv/prod/db#x"), [])
    assert not ref_allowed(parse_ref("vault:kv/prod/db#x"), [""])


@pytest.mark.parametrize(
    "text",
    [
        "vault:kv/prod/../dev/db#x",
        "vault:kv/prod/./../dev#x",
        "vault:kv/prod//../dev#x",
        "file:/etc/gitops-agent/secrets/../../shadow",
        "aws-ssm:/prod/app/../../admin/pw",
    ],
)
def test_dot_dot_cannot_step_out_of_a_prefix(text: str) -> None:
    # Rejected at parse time, so it never reaches the prefix check.
    with pytest.raises(SecretRefError):
        parse_ref(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_parses_or_raises_secret_ref_error(text: str) -> None:
    try:
        ref = parse_ref(text)
    except SecretRefError:
        return
    segments = ref.path.strip("/").split("/")
    assert ".." not in segments and "." not in segments and "" not in segments
    assert ref.raw == text


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["vault:kv/prod/", "vault:kv/prod", "aws-ssm:/prod/", "file:/etc/s/"]),
    st.text(alphabet="abc./#?=1", max_size=20),
)
def test_allowed_refs_stay_under_their_prefix(prefix: str, tail: str) -> None:
    try:
        ref = parse_ref(prefix + tail)
    except SecretRefError:
        return
    if ref_allowed(ref, [prefix]):
        base = prefix.rstrip("/")
        assert f"{ref.scheme}:{ref.path}" == base or f"{ref.scheme}:{ref.path}".startswith(
            base + "/"
        )
