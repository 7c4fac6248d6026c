"""The `secrets:` section of the host config: which backends exist, how the agent
authenticates to each, and which references the repo may read.

The manifest can only name references under `allowed`; it cannot add a backend, an
address or a credential. No secret value is ever in either config file: only paths to
files (or systemd credentials) that hold them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.config.yamlnodes import Fields, Value

DEFAULT_RETRY_FOR = 30.0
DEFAULT_VAULT_TIMEOUT = 10.0
_CREDENTIAL_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
SCHEMES = ("vault", "aws-ssm", "aws-sm", "file")
_PREFIX_EXPECTED = "a reference prefix like vault:kv/prod/ (schemes: " + ", ".join(SCHEMES) + ")"

PathReader = Callable[[Value, Path], Path | None]


@dataclass(frozen=True, slots=True)
class AppRoleConfig:
    role_id: str
    secret_id_file: Path | None  # a file, or
    secret_id_credential: str | None  # a systemd credential: $CREDENTIALS_DIRECTORY/NAME


@dataclass(frozen=True, slots=True)
class VaultConfig:
    address: str
    namespace: str | None
    ca_bundle: Path | None
    timeout: float
    token_file: Path | None
    approle: AppRoleConfig | None


@dataclass(frozen=True, slots=True)
class AwsConfig:
    region: str | None
    endpoint_url: str | None
    role_arn: str | None


@dataclass(frozen=True, slots=True)
class SecretsConfig:
    """What the repo may read, and from where. Empty `allowed` means no secrets at all."""

    allowed: tuple[str, ...] = ()
    retry_for: float = DEFAULT_RETRY_FOR
    vault: VaultConfig | None = None
    aws: AwsConfig | None = None
    # Values too short or common to mask safely (agent.core.redact.weak_value): a warning
    # instead of failing the unit.
    allow_weak_values: bool = False

    def backends(self) -> frozenset[str]:
        """The reference schemes that have a configured backend."""
        schemes = {"file"}
        if self.vault is not None:
            schemes.add("vault")
        if self.aws is not None:
            schemes |= {"aws-ssm", "aws-sm"}
        return frozenset(schemes)


def read_secrets(value: Value | None, base_dir: Path, path_of: PathReader) -> SecretsConfig:
    """Validate the `secrets:` mapping; `path_of(value, base_dir)` reads a path value."""
    keys = ["allowed", "retry_for", "vault", "aws", "allow_weak_values"]
    fields = value.mapping(keys) if value else None
    if fields is None:
        return SecretsConfig()
    allowed: list[str] = []
    if found := fields.get("allowed"):
        for item in found.sequence() or ():
            text = item.string(_PREFIX_EXPECTED)
            if text is not None and _valid_prefix(text):
                allowed.append(text)
            elif text is not None:
                item.fail(_PREFIX_EXPECTED)
    retry_for = DEFAULT_RETRY_FOR
    if found := fields.get("retry_for"):
        retry_for = found.duration(positive=False) or 0.0
    vault = _vault(fields.get("vault"), base_dir, path_of)
    aws = _aws(fields.get("aws"))
    weak = fields.get("allow_weak_values")
    allow_weak = bool(weak.boolean()) if weak else False
    return SecretsConfig(tuple(allowed), retry_for, vault, aws, allow_weak)


def _vault(value: Value | None, base_dir: Path, path_of: PathReader) -> VaultConfig | None:
    if value is None:
        return None
    fields = value.mapping(["address", "namespace", "ca_bundle", "timeout", "auth"])
    if fields is None:
        return None
    address = None
    if found := fields.require("address", "the Vault address, like https://vault:8200"):
        address = found.string("an http:// or https:// URL")
        if address is not None and not re.match(r"https?://[^/\s]+", address):
            found.fail("an http:// or https:// URL")
            address = None
    namespace = _optional_string(fields, "namespace")
    ca_bundle = _optional_path(fields, "ca_bundle", base_dir, path_of)
    timeout = DEFAULT_VAULT_TIMEOUT
    if found := fields.get("timeout"):
        timeout = found.duration() or timeout
    token_file, approle = None, None
    if found := fields.require("auth", "a mapping with token_file or approle"):
        token_file, approle = _vault_auth(found, base_dir, path_of)
    if address is None:
        return None
    return VaultConfig(address, namespace, ca_bundle, timeout, token_file, approle)


def _vault_auth(
    value: Value, base_dir: Path, path_of: PathReader
) -> tuple[Path | None, AppRoleConfig | None]:
    fields = value.mapping(["token_file", "approle"])
    if fields is None:
        return None, None
    token_file = _optional_path(fields, "token_file", base_dir, path_of)
    approle = None
    if found := fields.get("approle"):
        approle = _approle(found, base_dir, path_of)
    if (token_file is None) == (found is None):
        value.fail("exactly one of token_file or approle", "both" if found else "neither")
    return token_file, approle


def _approle(value: Value, base_dir: Path, path_of: PathReader) -> AppRoleConfig | None:
    fields = value.mapping(["role_id", "secret_id_file", "secret_id_credential"])
    if fields is None:
        return None
    role = fields.require("role_id", "the AppRole role_id")
    role_id = role.string("the AppRole role_id") if role else None
    secret_file = _optional_path(fields, "secret_id_file", base_dir, path_of)
    credential = None
    if found := fields.get("secret_id_credential"):
        credential = found.string("a systemd credential name")
        if credential is not None and not _CREDENTIAL_NAME_RE.fullmatch(credential):
            found.fail("a systemd credential name (letters, digits, _ . -)")
    if (secret_file is None) == (credential is None):
        got = "both" if secret_file is not None else "neither"
        value.fail("exactly one of secret_id_file or secret_id_credential", got)
    if role_id is None:
        return None
    return AppRoleConfig(role_id, secret_file, credential)


def _aws(value: Value | None) -> AwsConfig | None:
    fields = value.mapping(["region", "endpoint_url", "role_arn"]) if value else None
    if fields is None:
        return None
    endpoint = None
    if found := fields.get("endpoint_url"):
        endpoint = found.string("an http:// or https:// URL")
        if endpoint is not None and not re.match(r"https?://[^/\s]+", endpoint):
            endpoint = found.fail("an http:// or https:// URL")
    role_arn = None
    if found := fields.get("role_arn"):
        role_arn = found.string("an IAM role ARN")
        if role_arn is not None and not role_arn.startswith("arn:"):
            role_arn = found.fail("an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)")
    return AwsConfig(_optional_string(fields, "region"), endpoint, role_arn)


def _optional_string(fields: Fields, key: str) -> str | None:
    found = fields.get(key)
    return found.string() if found else None


def _optional_path(fields: Fields, key: str, base_dir: Path, path_of: PathReader) -> Path | None:
    found = fields.get(key)
    return path_of(found, base_dir) if found else None


def _valid_prefix(text: str) -> bool:
    """`SCHEME:PATH`, with no `..` or empty segment that could step around the prefix."""
    scheme, colon, path = text.partition(":")
    if not colon or scheme not in SCHEMES or not path or any(c in text for c in "#?\x00"):
        return False
    segments = path.strip("/").split("/")
    return ".." not in segments and "." not in segments and "//" not in path
