"""Secret backends: Vault (hvac), AWS SSM and Secrets Manager (boto3), and local files.

- `refs`: `parse_ref` / `ref_allowed` for `vault:`, `aws-ssm:`, `aws-sm:` and `file:` references.
- `vault.VaultBackend`, `aws.SsmBackend`, `aws.SecretsManagerBackend`, `files.FileBackend`:
  each has `read(ref) -> str` and raises `providers.errors.SecretBackendError` (with
  `.retryable` and `.kind`) naming the reference, never the value.
- `resolve.resolve_all`: many references in parallel, each once, retried while it helps.

The backends are imported from their own modules so that only the libraries a host config
uses get loaded (boto3 alone takes a noticeable time to import).
"""

from providers.secrets.refs import SecretRef, SecretRefError, parse_ref, ref_allowed
from providers.secrets.resolve import resolve_all

__all__ = ["SecretRef", "SecretRefError", "parse_ref", "ref_allowed", "resolve_all"]
