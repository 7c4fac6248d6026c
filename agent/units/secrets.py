"""Resolving the secrets a pass needs: once per pass, in parallel, before any plan.

Each unit's `secrets:` references are fetched through the backends the host config
sets up. Every value fetched is registered with the pass's redactor before anything
else sees it, and travels as a `Secret` (masked in str/repr) until the Terraform
process's environment is built. A reference that cannot be read fails its unit (and
so its dependents) with a message naming the reference, never the value; it never
becomes an empty string.

A value too short or too common to be masked safely (`agent.core.redact.weak_value`) fails its
units the same way, and is not registered with the redactor (so that printing candidates
and seeing which one is masked tells nothing), unless the host config has
`secrets.allow_weak_values: true`: then it is used, registered, and a warning names the
reference.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.config import Unit
from agent.config.secrets import SecretsConfig
from agent.core.redact import MIN_SECRET_LENGTH, Redactor, Secret, weak_value
from agent.errors import SecretsError
from providers.errors import SecretBackendError
from providers.secrets.refs import SecretRef
from providers.secrets.resolve import resolve_all

log = logging.getLogger(__name__)

WEAK_HINT = (
    f"a secret needs at least {MIN_SECRET_LENGTH} characters and must not be a common value"
    " (docs/secrets.md); store a stronger one, or set secrets.allow_weak_values: true in"
    " the host config to use it anyway"
)


class Backend(Protocol):
    def read(self, ref: SecretRef) -> str: ...


@dataclass
class ResolvedSecrets:
    """Per unit: its secrets by Terraform variable name, or why they could not be read."""

    values: dict[str, dict[str, Secret]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class SecretResolver:
    """Builds the backends once (they keep tokens and sessions) and resolves per pass."""

    def __init__(self, config: SecretsConfig, redactor: Redactor) -> None:
        self.config = config
        self.redactor = redactor
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def resolve(self, units: Iterable[Unit]) -> ResolvedSecrets:
        """Fetch every reference of `units` (each distinct reference once)."""
        wanted = [(unit, name, ref) for unit in units for name, ref in unit.secrets.items()]
        result = ResolvedSecrets()
        if not wanted:
            return result
        fetched = resolve_all(
            {ref.raw: ref for _, _, ref in wanted}.values(),
            self.backend_for,
            retry_for=self.config.retry_for,
        )
        weak = {
            raw for raw, found in fetched.items() if isinstance(found, str) and weak_value(found)
        }
        # Register every value before any message about any of them is built; a weak one
        # only if allowed (else masking it would tell which guess is right).
        for raw, found in fetched.items():
            if isinstance(found, str) and (raw not in weak or self.config.allow_weak_values):
                self.redactor.register(found)
        if self.config.allow_weak_values:
            for raw in sorted(weak):
                log.warning(
                    "secret %s is too short or too common to be masked safely in output;"
                    " used because secrets.allow_weak_values is true",
                    raw,
                )
        refused = set() if self.config.allow_weak_values else weak
        for unit, name, ref in wanted:
            found = fetched[ref.raw]
            if isinstance(found, str) and ref.raw not in refused:
                result.values.setdefault(unit.name, {})[name] = Secret(found, source=ref.raw)
            elif unit.name in result.errors:
                continue
            elif isinstance(found, str):
                # Not registered, and the message says nothing of the value (not its length).
                result.errors[unit.name] = (
                    f"unit {unit.name}: secret {name!r} ({ref.raw}) is too short or too common"
                    f" to be masked safely in output ({WEAK_HINT})"
                )
            else:
                result.errors[unit.name] = self.redactor.redact(
                    f"unit {unit.name}: secret {name!r} could not be read: {found}"
                )
        return result

    def backend_for(self, ref: SecretRef) -> Backend:
        with self._lock:
            if ref.scheme not in self._backends:
                self._backends[ref.scheme] = self._build(ref.scheme)
            return self._backends[ref.scheme]

    def _build(self, scheme: str) -> Backend:
        if scheme == "file":
            from providers.secrets.files import FileBackend

            return FileBackend()
        if scheme == "vault" and self.config.vault is not None:
            return self._vault()
        if scheme in ("aws-ssm", "aws-sm") and self.config.aws is not None:
            from providers.secrets.aws import AwsSettings, SecretsManagerBackend, SsmBackend

            aws = self.config.aws
            settings = AwsSettings(
                region=aws.region, endpoint_url=aws.endpoint_url, role_arn=aws.role_arn
            )
            return SsmBackend(settings) if scheme == "aws-ssm" else SecretsManagerBackend(settings)
        # The manifest was validated against the configured backends: a config reload
        # between validation and resolution is the only way here.
        raise SecretBackendError(f"no {scheme} backend is configured in the host config")

    def _vault(self) -> Backend:
        from providers.secrets.vault import AppRoleAuth, TokenFileAuth, VaultBackend, VaultSettings

        vault = self.config.vault
        assert vault is not None
        auth: TokenFileAuth | AppRoleAuth
        if vault.approle is not None:
            auth = AppRoleAuth(
                role_id=vault.approle.role_id,
                secret_id_file=_secret_id_file(
                    vault.approle.secret_id_file, vault.approle.secret_id_credential, os.environ
                ),
            )
        else:
            assert vault.token_file is not None
            auth = TokenFileAuth(token_file=vault.token_file)
        return VaultBackend(
            VaultSettings(
                address=vault.address,
                namespace=vault.namespace,
                ca_bundle=vault.ca_bundle,
                auth=auth,
                timeout=vault.timeout,
            )
        )


def _secret_id_file(path: Path | None, credential: str | None, environ: Mapping[str, str]) -> Path:
    """The AppRole secret-id file: configured, or a systemd credential (LoadCredential=)."""
    if path is not None:
        return path
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise SecretsError(
            f"secrets.vault.auth.approle.secret_id_credential is {credential!r}, but"
            " $CREDENTIALS_DIRECTORY is not set",
            hint=f"run the agent under systemd with LoadCredential={credential}:PATH,"
            " or use secret_id_file",
        )
    return Path(directory) / str(credential)


def terraform_variables(secrets: Mapping[str, Secret]) -> dict[str, str]:
    """TF_VAR_* environment entries: the only place a secret value leaves its wrapper."""
    return {f"TF_VAR_{name}": secret.reveal() for name, secret in secrets.items()}
