"""Vault's failures as the backend reports them: hvac and requests exceptions mapped to
SecretBackendError kinds with a message that names the reference and the reason, and the
credentials this backend handled (tokens, secret-ids) scrubbed from anything Vault said."""

from __future__ import annotations

from typing import Any, NoReturn

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
from providers.secrets.refs import SecretRef


class VaultErrors:
    """Maps errors of one Vault client (at `address`, `timeout` seconds per request)."""

    def __init__(self, client: hvac.Client, address: str, timeout: float) -> None:
        self._client = client
        self.address = address
        self.timeout = timeout
        self.credentials: set[str] = set()  # strings never to show (tokens, secret-ids)

    def scrub(self, text: str) -> str:
        for secret in sorted(self.credentials, key=len, reverse=True):
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    def vault_says(self, exc: hvac.exceptions.VaultError, sep: str = ": ") -> str:
        """`": what Vault said"`, or "" when it said nothing useful."""
        errors = [str(e).strip() for e in (exc.errors or []) if str(e).strip()]
        text = "; ".join(" ".join(e.replace("*", " ").split()) for e in errors)
        text = text.removeprefix("1 error occurred: ").strip()
        if text.lower() == "permission denied":
            return ""  # the message says so already
        return f"{sep}{self.scrub(text)[:300]}" if text else ""

    def raise_mapped(self, ref: SecretRef, exc: Exception) -> NoReturn:
        """Raise the SecretBackendError for an hvac, requests or response-shape error."""
        raw = ref.raw
        E = hvac.exceptions
        if isinstance(exc, SecretBackendError):
            raise exc
        if isinstance(exc, E.InvalidPath):
            raise SecretNotFoundError(f"{raw}: not found (404)", ref=raw) from None
        if isinstance(exc, E.Forbidden):
            raise SecretAccessDeniedError(
                f"{raw}: permission denied (403{self.vault_says(exc)})", ref=raw
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
                f"{raw}: Vault at {self.address} failed ({status}{self.vault_says(exc)})", ref=raw
            ) from None
        if isinstance(exc, E.InvalidRequest):
            raise SecretBadResponseError(
                f"{raw}: Vault rejected the request (400{self.vault_says(exc)})", ref=raw
            ) from None
        if isinstance(exc, E.VaultError):
            # Statuses hvac has no class for (504 from a proxy, 405, ...): worth a retry.
            raise SecretBackendUnavailableError(
                f"{raw}: unexpected answer from Vault at {self.address}"
                f" ({type(exc).__name__}{self.vault_says(exc)})",
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
                f"{raw}: no answer from Vault at {self.address} within {self.timeout:g} s",
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


def json_object(answer: object, key: str) -> dict[str, Any]:
    """`answer[key]` when it is a JSON object, else ValueError (a bad response)."""
    if not isinstance(answer, dict):
        raise ValueError(f"expected a JSON object holding {key!r}")
    value = answer.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"expected {key!r} to be a JSON object")
    return value
