"""The Vault backend: `vault:MOUNT/PATH[?version=N]#KEY` read from a KV v1 or v2 mount.

This module, `vault_tokens.py` and `vault_errors.py` own hvac; nothing else imports it.
One `VaultBackend` keeps one hvac client (one HTTP session) and one token (`VaultTokens`),
shared by the threads that resolve a pass.

The token comes from a file (written by an operator or by Vault Agent; re-read whenever
the file changes) or from an AppRole login (role_id in the config, secret_id read from a
file, e.g. a systemd credential). `lookup-self` (or the login answer) gives the TTL; the
token is renewed with `renew-self` once less than a third of its lease is left, if it is
renewable. Vault answers 403 both for a policy that forbids a path and for a token that
has expired or been revoked; on a 403 the backend asks `lookup-self` which one it is, and
for a dead token logs in again (or re-reads the token file) once and retries the read.

The KV version of a mount comes from `GET sys/internal/ui/mounts/MOUNT`, which any token
with access to something under the mount may call, read the way the `vault` CLI reads it
(`options.version` "2" -> v2, anything else -> v1, a 404 from an old Vault -> v1); it is
cached per mount, and `kv_version_by_mount` skips the lookup.

Messages name the reference and the reason and never carry a secret value, token or
secret-id (Vault's own error strings are scrubbed as well: `VaultErrors`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import hvac
import hvac.exceptions

from providers.errors import (
    SecretAccessDeniedError,
    SecretBackendError,
    SecretBadResponseError,
    SecretNotFoundError,
)
from providers.secrets.refs import SecretRef
from providers.secrets.vault_errors import VaultErrors, json_object
from providers.secrets.vault_tokens import AppRoleAuth, TokenFileAuth, VaultTokens

__all__ = ["AppRoleAuth", "TokenFileAuth", "VaultBackend", "VaultSettings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class VaultSettings:
    address: str
    auth: TokenFileAuth | AppRoleAuth
    namespace: str | None = None
    ca_bundle: Path | None = None
    timeout: float = 10.0
    # Mount -> KV version (1 or 2); mounts not listed are looked up once.
    kv_version_by_mount: Mapping[str, int] = field(default_factory=dict)


def _safe_address(address: str) -> str:
    """The address without any user:password part, for messages."""
    try:
        parts = urlsplit(address)
    except ValueError:
        return "the configured address"
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class VaultBackend:
    """Reads `vault:` references through hvac."""

    def __init__(self, settings: VaultSettings) -> None:
        self.settings = settings
        self.address = _safe_address(settings.address)
        # token="" keeps hvac from picking up VAULT_TOKEN or ~/.vault-token; an explicit
        # `verify` keeps it from VAULT_CACERT: only the host config counts.
        self._client = hvac.Client(
            url=settings.address,
            token="",
            namespace=settings.namespace or None,
            verify=str(settings.ca_bundle) if settings.ca_bundle else True,
            timeout=settings.timeout,
        )
        self._kv_versions: dict[str, int] = dict(settings.kv_version_by_mount)
        self._errors = VaultErrors(self._client, self.address, settings.timeout)
        self._tokens = VaultTokens(self._client, settings.auth, self._errors)

    def close(self) -> None:
        self._client.adapter.close()

    # -- reading -------------------------------------------------------------------------

    def read(self, ref: SecretRef) -> str:
        if ref.scheme != "vault" or not ref.key:
            raise SecretBadResponseError(
                f"{ref.raw}: not a vault:MOUNT/PATH#KEY reference", ref=ref.raw
            )
        mount, _, path = ref.path.partition("/")
        stale: str | None = None
        for attempt in (1, 2):
            token = None
            step = "mount"
            try:
                token = self._tokens.usable(ref, stale=stale)
                version = self._kv_version(ref, mount)
                step = "read"
                data = self._read_kv(ref, mount, path, version)
            except hvac.exceptions.Forbidden as exc:
                # Another thread may have replaced the token since this read took it: then
                # the 403 says nothing about the current one, and lookup-self would ask
                # about the new token, not the one that failed.
                if (
                    attempt == 1
                    and token is not None
                    and (self._tokens.replaced(token) or not self._tokens.alive(ref))
                ):
                    log.info("%s: Vault token expired or revoked; authenticating again", ref.raw)
                    stale = token
                    continue
                if step == "mount":
                    raise SecretAccessDeniedError(
                        f"{ref.raw}: permission denied on mount {mount!r}, or no such mount"
                        f" (403{self._errors.vault_says(exc)})",
                        ref=ref.raw,
                    ) from None
                raise SecretAccessDeniedError(
                    f"{ref.raw}: permission denied (403{self._errors.vault_says(exc)})", ref=ref.raw
                ) from None
            except SecretBackendError:
                raise
            except Exception as exc:
                self._errors.raise_mapped(ref, exc)
            return self._pick_key(ref, data)
        raise AssertionError("unreachable")  # pragma: no cover

    def _kv_version(self, ref: SecretRef, mount: str) -> int:
        known = self._kv_versions.get(mount)
        if known is not None:
            return known
        try:
            answer = self._client.adapter.get(f"/v1/sys/internal/ui/mounts/{quote(mount)}")
        except hvac.exceptions.InvalidPath:
            version = 1  # a Vault too old for this endpoint has only KV v1 (as the CLI assumes)
        else:
            data = json_object(answer, "data")
            mount_type = data.get("type")
            if mount_type not in (None, "kv", "generic"):
                raise SecretBadResponseError(
                    f"{ref.raw}: {mount!r} is a {mount_type} mount, not a KV secrets engine",
                    ref=ref.raw,
                )
            options = data.get("options") or {}
            version = 2 if isinstance(options, dict) and str(options.get("version")) == "2" else 1
        self._kv_versions[mount] = version
        return version

    def _read_kv(self, ref: SecretRef, mount: str, path: str, version: int) -> dict[str, Any]:
        where = f"{mount}/{path}"
        if version == 1:
            if ref.version is not None:
                raise SecretBadResponseError(
                    f"{ref.raw}: {mount!r} is a KV version 1 mount, which has no versions:"
                    " remove ?version=",
                    ref=ref.raw,
                )
            try:
                answer = self._client.secrets.kv.v1.read_secret(path=path, mount_point=mount)
            except hvac.exceptions.InvalidPath:
                raise SecretNotFoundError(
                    f"{ref.raw}: no secret at {where} (404)", ref=ref.raw
                ) from None
            return json_object(answer, "data")
        try:
            answer = self._client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=mount, version=ref.version, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath as exc:
            raise self._kv2_not_found(ref, where, exc) from None
        return json_object(json_object(answer, "data"), "data")

    @staticmethod
    def _kv2_not_found(
        ref: SecretRef, where: str, exc: hvac.exceptions.InvalidPath
    ) -> SecretNotFoundError:
        # A deleted or destroyed version answers 404 too, with its metadata in the body.
        metadata: dict[str, Any] = {}
        if isinstance(exc.json, dict):
            data = exc.json.get("data")
            if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
                metadata = data["metadata"]
        which = f"version {metadata.get('version') or ref.version}" if metadata else ""
        if metadata.get("destroyed"):
            reason = f"{which} of {where} was destroyed"
        elif metadata.get("deletion_time"):
            reason = f"{which} of {where} was deleted ({metadata['deletion_time']})"
        elif ref.version is not None:
            reason = f"no version {ref.version} of {where}"
        else:
            reason = f"no secret at {where}"
        return SecretNotFoundError(f"{ref.raw}: {reason} (404)", ref=ref.raw)

    @staticmethod
    def _pick_key(ref: SecretRef, data: dict[str, Any]) -> str:
        assert ref.key is not None
        if ref.key not in data:
            names = sorted(str(name) for name in data)
            # Key names are not secret (Vault's docs say not to put secrets in them).
            have = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise SecretNotFoundError(
                f"{ref.raw}: no key {ref.key!r} in {ref.path} (it has: {have or 'no keys'})",
                ref=ref.raw,
            )
        value = data[ref.key]
        if isinstance(value, str):
            return value
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
