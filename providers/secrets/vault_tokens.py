"""The Vault token of one backend: read from a file (re-read when the file changes) or
from an AppRole login (secret-id from a file), its TTL learnt from `lookup-self` or the
login answer, renewed with `renew-self` once less than a third of its lease is left, and
replaced when Vault no longer knows it. Shared by the threads that resolve a pass."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions

from providers.errors import SecretAccessDeniedError, SecretBadResponseError, SecretNotFoundError
from providers.secrets.files import FileProblem, read_private_file
from providers.secrets.refs import SecretRef
from providers.secrets.vault_errors import VaultErrors, json_object

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


@dataclass
class _Token:
    value: str
    expires_at: float | None  # time.monotonic(); None: the token never expires
    lease: float  # seconds granted at login (what "a third of the lease" is measured on)
    renewable: bool
    stamp: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) of the token file


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


class VaultTokens:
    """The token `client` sends, kept usable; credentials it reads go to `errors`."""

    def __init__(
        self, client: hvac.Client, auth: TokenFileAuth | AppRoleAuth, errors: VaultErrors
    ) -> None:
        self._client = client
        self.auth = auth
        self.errors = errors
        self._lock = threading.Lock()
        self._token: _Token | None = None

    def usable(self, ref: SecretRef, *, stale: str | None) -> str:
        """A token that should work now: logs in, re-reads, or renews as needed."""
        with self._lock:
            token = self._token
            auth = self.auth
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

    def replaced(self, value: str) -> bool:
        """Whether the backend holds a token other than `value` now."""
        with self._lock:
            return self._token is None or self._token.value != value

    def alive(self, ref: SecretRef) -> bool:
        """Whether Vault still knows the current token (False: expired or revoked)."""
        try:
            data = json_object(self._client.auth.token.lookup_self(), "data")
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
            return False
        except Exception as exc:
            self.errors.raise_mapped(ref, exc)
        with self._lock:
            if self._token is not None:
                self._apply_lookup(self._token, data)
        return True

    def _authenticate(self, ref: SecretRef) -> _Token:
        """Log in (AppRole) or read the token file, and learn the token's TTL. Lock held."""
        auth = self.auth
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
                f"{self.errors.vault_says(exc, ': ')}; check role_id and the secret-id in"
                f" {auth.secret_id_file}",
                ref=ref.raw,
            ) from None
        except hvac.exceptions.InvalidPath:
            raise SecretBadResponseError(
                f"{ref.raw}: no AppRole auth method at auth/{auth.mount_point} (404)",
                ref=ref.raw,
            ) from None
        except Exception as exc:
            self.errors.raise_mapped(ref, exc)
        login = json_object(answer, "auth")
        value = login.get("client_token")
        if not isinstance(value, str) or not value:
            raise SecretBadResponseError(f"{ref.raw}: AppRole login gave no token", ref=ref.raw)
        self.errors.credentials.add(value)
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
        self.errors.credentials.add(value)
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
            self.errors.raise_mapped(ref, exc)
        data = json_object(answer, "data")
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
        granted = float(json_object(answer, "auth").get("lease_duration") or 0)
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
        self.errors.credentials.add(value.strip())
        return value.strip()
