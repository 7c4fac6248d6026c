"""The errors a user sees.

Every error the agent reports to a person is an `AgentError`: a stable kebab-case
reference (searchable in the docs), a message that names the file/line/key or the
unit/host/resource, an optional hint, and whether retrying later can help. The CLI
turns them into exit codes in one place (`agent.cli`); tracebacks only with --debug.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every user-facing error."""

    reference = "agent-error"
    retryable = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def render(self) -> str:
        """The message with its reference and hint, as the CLI prints it."""
        text = f"error[{self.reference}]: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ConfigError(AgentError):
    """A host config or repo manifest that does not validate."""

    reference = "config-invalid"


class SourceError(AgentError):
    """The Git source could not be fetched or read (network, auth, missing branch)."""

    reference = "source-failed"
    retryable = True


class VerificationError(AgentError):
    """A revision the agent refuses to apply (history rewritten, bad signature)."""

    reference = "revision-refused"


class TerraformError(AgentError):
    """Terraform failed for a unit (init, plan, show or apply)."""

    reference = "terraform-failed"
    retryable = True


class PassBusyError(AgentError):
    """Another reconcile pass holds the state directory's lock."""

    reference = "pass-running"
    retryable = True


class StoreError(AgentError):
    """The run store or the state directory cannot be used."""

    reference = "state-unusable"


class NotFoundError(AgentError):
    """A unit or run named on the command line does not exist."""

    reference = "not-found"


class SecretsError(AgentError):
    """A secret reference could not be resolved (missing, denied, backend down)."""

    reference = "secret-unavailable"
    retryable = True


class HostInventoryError(AgentError):
    """A fleet's hosts could not be listed (the EC2 inventory); no host was contacted."""

    reference = "host-inventory-failed"

    def __init__(self, message: str, *, hint: str | None = None, retryable: bool = True) -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable


class PruneError(AgentError):
    """A removed unit's removal cannot run: its last definition or its secrets cannot be
    read (agent/units/prune.py)."""

    reference = "prune-failed"
    retryable = True


class LeaseLostError(AgentError):
    """Another agent took over a unit's lease (scale-out mode, docs/scale-out.md): this agent
    stops the unit's work before it changes anything."""

    reference = "lease-lost"
    retryable = True
