"""Errors raised by providers.

Providers never import `agent`; the agent wraps these into its own user-facing
`AgentError` hierarchy. Messages here must already be fit for a person to read and
must never hold a credential (URLs are sanitized before they are put in a message).
"""

from __future__ import annotations


class ProviderError(Exception):
    """Base of every provider error."""

    retryable = False


class GitSourceError(ProviderError):
    """Clone, fetch or read of the Git source failed."""

    retryable = True


class TerraformCommandError(ProviderError):
    """A Terraform command failed, timed out or was interrupted."""

    retryable = True

    def __init__(self, message: str, *, command: str = "", exit_code: int | None = None) -> None:
        super().__init__(message)
        self.command = command
        self.exit_code = exit_code


class TerraformNotFoundError(ProviderError):
    """No usable Terraform or OpenTofu binary."""


class SecretBackendError(ProviderError):
    """A secret could not be read from its backend.

    The message names the reference (`vault:kv/prod/db#password: permission denied (403)`)
    and the reason, never a secret value, token or secret-id. `retryable` says whether
    asking again later can help (sealed, throttled, timed out) or a person must act
    (denied, missing, malformed). `kind` is a stable word for the reason.
    """

    kind = "error"
    retryable = False

    def __init__(self, message: str, *, ref: str = "", retryable: bool | None = None) -> None:
        super().__init__(message)
        self.ref = ref
        if retryable is not None:
            self.retryable = retryable


class SecretNotFoundError(SecretBackendError):
    """No such secret, version, parameter, key or file."""

    kind = "not-found"


class SecretAccessDeniedError(SecretBackendError):
    """The backend refused: policy, IAM, file permissions or a credential that is no good."""

    kind = "denied"


class SecretBackendUnavailableError(SecretBackendError):
    """The backend cannot answer now: sealed, down, throttled, unreachable."""

    kind = "unavailable"
    retryable = True


class SecretTimeoutError(SecretBackendUnavailableError):
    """The backend did not answer in time."""

    kind = "timeout"


class SecretBadResponseError(SecretBackendError):
    """The backend answered, but not with something usable (bad JSON, wrong shape, bad mount)."""

    kind = "bad-response"


class TransportError(ProviderError):
    """A host could not be reached, refused us, or a command on it did not finish.

    The message names the host (and for a host key problem, both fingerprints).
    `retryable` is True for timeouts and unreachable hosts, False for a refused or
    changed host key or a rejected login: a person has to act on those.
    """

    def __init__(self, message: str, *, host: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.host = host
        self.retryable = retryable


class HostKeyError(TransportError):
    """The host's key is unknown or differs from the one in known_hosts."""
