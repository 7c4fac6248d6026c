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


class SignatureError(ProviderError):
    """A revision or tag is not signed by a key the signing policy allows, or cannot be checked.

    The message names the commit (short hash) or tag and says what is wrong. `kind` is one of
    `SIGNATURE_ERROR_KINDS`: unsigned, untrusted (signed, but not by an allowed key, or with a
    kind of signature the policy does not accept), bad (the content does not match the
    signature, or the signature is unreadable), expired, revoked, config (the policy's files
    are missing, unreadable or empty, or a tool is missing). Never retryable: the same revision
    gives the same answer until a person acts. `revision` is the full sha checked ("" if none).
    """

    retryable = False

    def __init__(self, message: str, *, kind: str, revision: str = "") -> None:
        if kind not in SIGNATURE_ERROR_KINDS:
            raise ValueError(f"unknown SignatureError kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.revision = revision


SIGNATURE_ERROR_KINDS = ("unsigned", "untrusted", "bad", "expired", "revoked", "config")


class TemplateRenderError(ProviderError):
    """A template could not be rendered: a syntax error, an undefined variable, a failing
    filter. The message names the template file (repo-relative) and line:
    `templates/nginx.conf.j2:7: 'workers' is undefined`. `syntax` is True when the
    template itself (or one it includes) cannot be parsed, whatever the variables.
    """

    def __init__(
        self, message: str, *, template: str = "", line: int | None = None, syntax: bool = False
    ) -> None:
        super().__init__(message)
        self.template = template
        self.line = line
        self.syntax = syntax


class HostEngineError(ProviderError):
    """The host engine's program could not run on a host or gave an unreadable answer
    (no python3, sudo refused, a crash). The message names the host.
    """

    retryable = True


class ResourceConflictError(ProviderError):
    """A resource cannot be brought to its desired state without a person deciding:
    a directory where a file must be, a non-empty directory to remove without
    `recursive: true`, no package manager. The engine prefixes the resource id.
    """


class AuthenticationError(TransportError):
    """The host refused the SSH login (`user@host`), or the configured key cannot be used.
    Never retryable: a person has to authorize the key or fix the user.
    """


class PrivilegeEscalationError(TransportError):
    """`become` failed: `sudo -n` needs a password for the login user, or sudo is missing.
    Never retryable: a person has to grant passwordless sudo or change the login user.
    """


class RepoFileError(ProviderError):
    """A file the repository names cannot be read: it resolves (after symlinks) outside the
    repository checkout, does not exist, is not a regular file, or is larger than its limit.
    The message names the path as the repository wrote it, never the content.
    `kind` is one of outside, missing, not-a-file, too-large, unreadable.
    """

    def __init__(self, path: str, reason: str, *, kind: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.kind = kind


class ForgeError(ProviderError):
    """A forge (GitHub, GitLab, Gitea) API call failed: refused, not found, timed out, or
    answered with something unusable.

    The message names the forge, the method and endpoint (a path, never a URL with a
    credential) and the HTTP status, e.g. `github: POST /repos/o/r/statuses/abc1234: HTTP 401
    (Bad credentials)`. It never holds the token. `status` is the HTTP status (None when no
    answer came); `retryable` is True for timeouts, connection errors, 429 and 5xx.
    """

    def __init__(
        self,
        message: str,
        *,
        forge: str,
        endpoint: str,
        status: int | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.forge = forge
        self.endpoint = endpoint
        self.status = status
        self.retryable = retryable


class InventoryError(ProviderError):
    """A cloud inventory (the EC2 instances of a fleet) could not be read."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
