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
