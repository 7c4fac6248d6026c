"""The Vault backend: `vault:MOUNT/PATH[?version=N]#KEY` read from a KV v1 or v2 mount.

This module owns hvac; nothing else imports it. One `VaultBackend` keeps one hvac client
(one HTTP session) and one token, shared by the threads that resolve a pass.

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
secret-id (Vault's own error strings are passed through `_scrub` as well).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit, urlunsplit

import hvac
import hvac.exceptions
import requests

from providers.errors import (
    SecretAccessDeniedError,
    SecretBackendError,
    SecretBackendUnavailableError,
    SecretBadResponseError,
    SecretNotFoundError,
    SecretTimeoutError,
)
from providers.secrets.files import FileProblem, read_private_file
from providers.secrets.refs import SecretRef

__all__ = ["AppRoleAuth", "TokenFileAuth", "VaultBackend", "VaultSettings"]

log = logging.getLogger(__name__)

# Seconds before the TTL runs out at which a token is treated as already expired: a
# request sent just before expiry may arrive after it.
_EXPIRY_MARGIN = 0.5


@dataclass(frozen=True)
class TokenFileAuth:
    """A token kept in a file (mode 0600/0640, no access for others); re-read when it changes."""

    token_file: Path


@dataclass(frozen=True)
class AppRoleAuth:
    """AppRole login: `role_id` from the config, the secret-id from a file."""

    role_id: str
    secret_id_file: Path
    mount_point: str = "approle"


@dataclass(frozen=True, kw_only=True)
class VaultSettings:
    address: str
    auth: TokenFileAuth | AppRoleAuth
    namespace: str | None = None
    ca_bundle: Path | None = None
    timeout: float = 10.0
    # Mount -> KV version (1 or 2); mounts not listed are looked up once.
    kv_version_by_mount: Mapping[str, int] = field(default_factory=dict)


@dataclass
class _Token:
    value: str
    expires_at: float | None  # time.monotonic(); None: the token never expires
    lease: float  # seconds granted at login (what "a third of the lease" is measured on)
    renewable: bool
    stamp: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) of the token file


def _safe_address(address: str) -> str:
    """The address without any user:password part, for messages."""
    try:
        parts = urlsplit(address)
    except ValueError:
        return "the configured address"
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


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
        self._lock = threading.Lock()
        self._token: _Token | None = None
        self._kv_versions: dict[str, int] = dict(settings.kv_version_by_mount)
        self._credentials: set[str] = set()  # strings never to show (tokens, secret-ids)

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
                token = self._usable_token(ref, stale=stale)
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
                    and (self._replaced(token) or not self._token_alive(ref))
                ):
                    log.info("%s: Vault token expired or revoked; authenticating again", ref.raw)
                    stale = token
                    continue
                if step == "mount":
                    raise SecretAccessDeniedError(
                        f"{ref.raw}: permission denied on mount {mount!r}, or no such mount"
                        f" (403{self._vault_says(exc)})",
                        ref=ref.raw,
                    ) from None
                raise SecretAccessDeniedError(
                    f"{ref.raw}: permission denied (403{self._vault_says(exc)})", ref=ref.raw
                ) from None
            except SecretBackendError:
                raise
            except Exception as exc:
                self._raise_mapped(ref, exc)
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
            data = _dict(answer, "data")
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
            return _dict(answer, "data")
        try:
            answer = self._client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=mount, version=ref.version, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath as exc:
            raise self._kv2_not_found(ref, where, exc) from None
        return _dict(_dict(answer, "data"), "data")

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

    # -- the token -----------------------------------------------------------------------

    def _usable_token(self, ref: SecretRef, *, stale: str | None) -> str:
        """A token that should work now: logs in, re-reads, or renews as needed."""
        with self._lock:
            token = self._token
            auth = self.settings.auth
            if token is None or (stale is not None and token.value == stale):
                return self._authenticate(ref).value
            if isinstance(auth, TokenFileAuth) and _file_stamp(auth.token_file) != token.stamp:
                return self._authenticate(ref).value
            if token.expires_at is None:
                return token.value
            left = token.expires_at - time.monotonic()
            if left > max(token.lease / 3, _EXPIRY_MARGIN):
                return token.value
            if token.renewable:
                return self._renew(ref, token).value  # logs in again if it is too late
            if left <= _EXPIRY_MARGIN or isinstance(auth, AppRoleAuth):
                return self._authenticate(ref).value
            return token.value

    def _replaced(self, value: str) -> bool:
        """Whether the backend holds a token other than `value` now."""
        with self._lock:
            return self._token is None or self._token.value != value

    def _token_alive(self, ref: SecretRef) -> bool:
        """Whether Vault still knows the current token (False: expired or revoked)."""
        try:
            data = _dict(self._client.auth.token.lookup_self(), "data")
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
            return False
        except Exception as exc:
            self._raise_mapped(ref, exc)
        with self._lock:
            if self._token is not None:
                self._apply_lookup(self._token, data)
        return True

    def _authenticate(self, ref: SecretRef) -> _Token:
        """Log in (AppRole) or read the token file, and learn the token's TTL. Lock held."""
        auth = self.settings.auth
        if isinstance(auth, AppRoleAuth):
            token = self._approle_login(ref, auth)
        else:
            token = self._token_from_file(ref, auth)
        self._token = token
        self._client.token = token.value
        return token

    def _approle_login(self, ref: SecretRef, auth: AppRoleAuth) -> _Token:
        secret_id = self._credential_file(ref, auth.secret_id_file, "AppRole secret-id")
        try:
            answer = self._client.auth.approle.login(
                role_id=auth.role_id,
                secret_id=secret_id,
                use_token=False,
                mount_point=auth.mount_point,
            )
        except (
            hvac.exceptions.InvalidRequest,
            hvac.exceptions.Forbidden,
            hvac.exceptions.Unauthorized,
        ) as exc:
            raise SecretAccessDeniedError(
                f"{ref.raw}: AppRole login at auth/{auth.mount_point} failed"
                f"{self._vault_says(exc, ': ')}; check role_id and the secret-id in"
                f" {auth.secret_id_file}",
                ref=ref.raw,
            ) from None
        except hvac.exceptions.InvalidPath:
            raise SecretBadResponseError(
                f"{ref.raw}: no AppRole auth method at auth/{auth.mount_point} (404)",
                ref=ref.raw,
            ) from None
        except Exception as exc:
            self._raise_mapped(ref, exc)
        login = _dict(answer, "auth")
        value = login.get("client_token")
        if not isinstance(value, str) or not value:
            raise SecretBadResponseError(f"{ref.raw}: AppRole login gave no token", ref=ref.raw)
        self._credentials.add(value)
        lease = float(login.get("lease_duration") or 0)
        return _Token(
            value=value,
            expires_at=time.monotonic() + lease if lease > 0 else None,
            lease=lease,
            renewable=bool(login.get("renewable")),
        )

    def _token_from_file(self, ref: SecretRef, auth: TokenFileAuth) -> _Token:
        stamp = _file_stamp(auth.token_file)
        value = self._credential_file(ref, auth.token_file, "Vault token").strip()
        if not value:
            raise SecretAccessDeniedError(
                f"{ref.raw}: the Vault token file {auth.token_file} is empty", ref=ref.raw
            )
        self._credentials.add(value)
        token = _Token(value=value, expires_at=None, lease=0.0, renewable=False, stamp=stamp)
        self._client.token = value
        try:
            answer = self._client.auth.token.lookup_self()
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
            raise SecretAccessDeniedError(
                f"{ref.raw}: the token in {auth.token_file} is not valid (expired or revoked);"
                " write a fresh token to that file",
                ref=ref.raw,
            ) from None
        except Exception as exc:
            self._raise_mapped(ref, exc)
        data = _dict(answer, "data")
        self._apply_lookup(token, data)
        token.lease = float(data.get("creation_ttl") or data.get("ttl") or 0)
        return token

    @staticmethod
    def _apply_lookup(token: _Token, data: dict[str, Any]) -> None:
        ttl = float(data.get("ttl") or 0)
        if ttl > 0:
            token.expires_at = time.monotonic() + ttl
        elif data.get("expire_time"):
            token.expires_at = time.monotonic()  # less than a second left
        else:
            token.expires_at = None  # a token without expiry (ttl 0, no expire_time)
        token.renewable = bool(data.get("renewable"))

    def _renew(self, ref: SecretRef, token: _Token) -> _Token:
        """renew-self; a token Vault no longer knows is replaced. Lock held."""
        try:
            answer = self._client.auth.token.renew_self()
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
            return self._authenticate(ref)
        except hvac.exceptions.InvalidRequest:
            token.renewable = False  # e.g. "lease is not renewable": use it while it lasts
            return token
        except Exception as exc:
            # Vault busy or unreachable: the token still has time left, and the read that
            # follows reports the problem if there is one.
            log.info("renewing the Vault token failed (%s)", type(exc).__name__)
            return token
        granted = float(_dict(answer, "auth").get("lease_duration") or 0)
        token.expires_at = time.monotonic() + granted if granted > 0 else None
        if granted < token.lease / 3:
            # At its max TTL: renewing again cannot help; AppRole logs in again instead.
            token.renewable = False
        log.debug("renewed the Vault token for %.0f s", granted)
        return token

    def _credential_file(self, ref: SecretRef, path: Path, what: str) -> str:
        try:
            value = read_private_file(path, allow_group=True, check_owner=False)
        except FileProblem as problem:
            kind = SecretNotFoundError if problem.kind == "not-found" else SecretAccessDeniedError
            message = f"{ref.raw}: cannot use the {what} file: {problem.reason}"
            raise kind(message, ref=ref.raw) from None
        self._credentials.add(value.strip())
        return value.strip()

    # -- errors --------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for secret in sorted(self._credentials, key=len, reverse=True):
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    def _vault_says(self, exc: hvac.exceptions.VaultError, sep: str = ": ") -> str:
        """`": what Vault said"`, or "" when it said nothing useful."""
        errors = [str(e).strip() for e in (exc.errors or []) if str(e).strip()]
        text = "; ".join(" ".join(e.replace("*", " ").split()) for e in errors)
        text = text.removeprefix("1 error occurred: ").strip()
        if text.lower() == "permission denied":
            return ""  # the message says so already
        return f"{sep}{self._scrub(text)[:300]}" if text else ""

    def _raise_mapped(self, ref: SecretRef, exc: Exception) -> NoReturn:
        """Raise the SecretBackendError for an hvac, requests or response-shape error."""
        raw = ref.raw
        E = hvac.exceptions
        if isinstance(exc, SecretBackendError):
            raise exc
        if isinstance(exc, E.InvalidPath):
            raise SecretNotFoundError(f"{raw}: not found (404)", ref=raw) from None
        if isinstance(exc, E.Forbidden):
            raise SecretAccessDeniedError(
                f"{raw}: permission denied (403{self._vault_says(exc)})", ref=raw
            ) from None
        if isinstance(exc, E.Unauthorized):
            raise SecretAccessDeniedError(f"{raw}: not authorized (401)", ref=raw) from None
        if isinstance(exc, E.RateLimitExceeded):
            raise SecretBackendUnavailableError(
                f"{raw}: Vault at {self.address} is rate limiting requests (429)", ref=raw
            ) from None
        if isinstance(exc, E.VaultDown):
            raise SecretBackendUnavailableError(
                f"{raw}: Vault at {self.address} is {self._sealed_or_down()} (503)", ref=raw
            ) from None
        if isinstance(exc, E.VaultNotInitialized):
            raise SecretBackendUnavailableError(
                f"{raw}: Vault at {self.address} is not initialized (501)", ref=raw, retryable=False
            ) from None
        if isinstance(exc, E.InternalServerError | E.BadGateway):
            status = 500 if isinstance(exc, E.InternalServerError) else 502
            raise SecretBackendUnavailableError(
                f"{raw}: Vault at {self.address} failed ({status}{self._vault_says(exc)})", ref=raw
            ) from None
        if isinstance(exc, E.InvalidRequest):
            raise SecretBadResponseError(
                f"{raw}: Vault rejected the request (400{self._vault_says(exc)})", ref=raw
            ) from None
        if isinstance(exc, E.VaultError):
            # Statuses hvac has no class for (504 from a proxy, 405, ...): worth a retry.
            raise SecretBackendUnavailableError(
                f"{raw}: unexpected answer from Vault at {self.address}"
                f" ({type(exc).__name__}{self._vault_says(exc)})",
                ref=raw,
            ) from None
        if isinstance(exc, requests.exceptions.SSLError):
            raise SecretBackendUnavailableError(
                f"{raw}: TLS connection to Vault at {self.address} failed (certificate not"
                " trusted?): set ca_bundle to the CA that signed Vault's certificate",
                ref=raw,
                retryable=False,
            ) from None
        if isinstance(exc, requests.exceptions.Timeout):
            raise SecretTimeoutError(
                f"{raw}: no answer from Vault at {self.address} within {self.settings.timeout:g} s",
                ref=raw,
            ) from None
        if isinstance(exc, requests.exceptions.ConnectionError):
            raise SecretBackendUnavailableError(
                f"{raw}: cannot connect to Vault at {self.address}", ref=raw
            ) from None
        if isinstance(exc, ValueError | KeyError | TypeError | AttributeError):
            raise SecretBadResponseError(
                f"{raw}: unexpected answer from Vault at {self.address} ({type(exc).__name__})",
                ref=raw,
            ) from None
        raise exc

    def _sealed_or_down(self) -> str:
        """Asks `sys/seal-status` (no token needed) to tell sealed from otherwise down."""
        try:
            status = self._client.sys.read_seal_status()
        except Exception:
            return "sealed or unavailable"
        if isinstance(status, dict) and status.get("sealed"):
            return "sealed"
        return "unavailable"


def _dict(answer: object, key: str) -> dict[str, Any]:
    """`answer[key]` when it is a JSON object, else ValueError (a bad response)."""
    if not isinstance(answer, dict):
        raise ValueError(f"expected a JSON object holding {key!r}")
    value = answer.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"expected {key!r} to be a JSON object")
    return value
