"""The AWS backends: SSM Parameter Store (`aws-ssm:/PATH`) and Secrets Manager (`aws-sm:NAME`).

This module owns boto3; nothing else imports it. Credentials come from boto3's default
chain (environment, shared config/credentials files, SSO, container or instance role).
With `role_arn` set, that identity assumes the role through STS and the backend uses the
temporary credentials, assuming the role again a few minutes before they expire.
`endpoint_url` (a VPC endpoint, a local test server) applies to STS, SSM and Secrets
Manager alike.

botocore's own retries are switched off (one attempt per call, bounded connect and read
timeouts): `resolve_all` retries what is worth retrying, within its own time budget.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import boto3
import botocore.exceptions
from botocore.config import Config

from providers.errors import (
    SecretAccessDeniedError,
    SecretBackendError,
    SecretBackendUnavailableError,
    SecretBadResponseError,
    SecretNotFoundError,
    SecretTimeoutError,
)
from providers.secrets.refs import SecretRef

__all__ = ["AwsSettings", "SecretsManagerBackend", "SsmBackend"]

# Assume the role again when its credentials have less than this left.
_REFRESH_BEFORE = timedelta(minutes=5)

# botocore's DEBUG records print whole response bodies, secret values included, before the
# agent holds the value it would redact them with: they never pass, even with --debug.
logging.getLogger("botocore").setLevel(logging.INFO)

_NOT_FOUND = {"ParameterNotFound", "ParameterVersionNotFound", "ResourceNotFoundException"}
_DENIED = {
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "InvalidSignatureException",
    "AuthFailure",
    "DecryptionFailure",  # Secrets Manager could not decrypt with its KMS key (KMS policy)
    "InvalidKeyId",  # SSM: the KMS key of a SecureString is disabled or not usable
    "KMSAccessDeniedException",
}
_EXPIRED = {"ExpiredToken", "ExpiredTokenException", "RequestExpired"}
_THROTTLED = {
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
    "SlowDown",
}
_XML_CODE_RE = re.compile(r"<Code>([^<]{1,100})</Code>")
_XML_MESSAGE_RE = re.compile(r"<Message>([^<]{0,300})</Message>")
_SERVER = {"InternalServerError", "InternalFailure", "InternalServiceError", "ServiceUnavailable"}


@dataclass(frozen=True)
class AwsSettings:
    region: str | None = None
    endpoint_url: str | None = None
    role_arn: str | None = None
    session_name: str = "gitops-agent"
    connect_timeout: float = 5.0
    read_timeout: float = 10.0


class _AwsBackend:
    """One boto3 client per backend (clients are thread-safe), rebuilt when role creds age."""

    service: ClassVar[str]

    def __init__(self, settings: AwsSettings) -> None:
        self.settings = settings
        self._config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
        )
        self._lock = threading.Lock()
        self._client: Any = None
        self._credentials: dict[str, str] = {}  # from assume_role; empty: the default chain
        self._expires: datetime | None = None

    def _client_for(self, ref: SecretRef) -> Any:
        with self._lock:
            expiring = self._expires is not None and datetime.now(UTC) >= (
                self._expires - _REFRESH_BEFORE
            )
            if self._client is None or expiring:
                self._client = self._new_client(ref, self.service)
            return self._client

    def _forget_client(self) -> None:
        with self._lock:
            self._client = None

    def _new_client(self, ref: SecretRef, service: str) -> Any:
        try:
            session = boto3.session.Session(region_name=self.settings.region)
            if self.settings.role_arn and (service != "sts" or not self._credentials):
                self._assume_role(session)
            return session.client(
                service,
                endpoint_url=self.settings.endpoint_url,
                config=self._config,
                **self._credentials,
            )
        except Exception as exc:
            doing = f"assuming role {self.settings.role_arn}" if self.settings.role_arn else ""
            raise _mapped(ref, exc, doing=doing) from None

    def _assume_role(self, session: boto3.session.Session) -> None:
        sts = session.client("sts", endpoint_url=self.settings.endpoint_url, config=self._config)
        answer = sts.assume_role(
            RoleArn=self.settings.role_arn, RoleSessionName=self.settings.session_name
        )
        creds = answer["Credentials"]
        self._credentials = {
            "aws_access_key_id": creds["AccessKeyId"],
            "aws_secret_access_key": creds["SecretAccessKey"],
            "aws_session_token": creds["SessionToken"],
        }
        expiration = creds["Expiration"]
        if isinstance(expiration, datetime) and expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=UTC)
        self._expires = expiration if isinstance(expiration, datetime) else None

    def caller_arn(self) -> str:
        """The ARN of the identity this backend reads as (after any role assumption)."""
        probe = SecretRef("aws-sm", "caller-identity", None, None, f"{self.service} identity")
        self._client_for(probe)  # assumes the role if needed
        with self._lock:
            sts = self._new_client(probe, "sts")
        try:
            return str(sts.get_caller_identity()["Arn"])
        except Exception as exc:
            raise _mapped(probe, exc) from None

    def read(self, ref: SecretRef) -> str:
        client = self._client_for(ref)
        try:
            return self._fetch(client, ref)
        except SecretBackendError:
            raise
        except Exception as exc:
            if _error_code(exc) in _EXPIRED:
                self._forget_client()  # the next attempt assumes the role again
            raise _mapped(ref, exc) from None

    def _fetch(self, client: Any, ref: SecretRef) -> str:
        raise NotImplementedError


class SsmBackend(_AwsBackend):
    """`aws-ssm:/PATH`: an SSM parameter, SecureString decrypted."""

    service = "ssm"

    def _fetch(self, client: Any, ref: SecretRef) -> str:
        if ref.scheme != "aws-ssm":
            raise SecretBadResponseError(f"{ref.raw}: not an aws-ssm: reference", ref=ref.raw)
        answer = client.get_parameter(Name=ref.path, WithDecryption=True)
        value = answer["Parameter"]["Value"]
        if not isinstance(value, str):
            raise SecretBadResponseError(f"{ref.raw}: SSM returned no value", ref=ref.raw)
        return value


class SecretsManagerBackend(_AwsBackend):
    """`aws-sm:NAME` (the whole SecretString) or `aws-sm:NAME#KEY` (one key of its JSON)."""

    service = "secretsmanager"

    def _fetch(self, client: Any, ref: SecretRef) -> str:
        if ref.scheme != "aws-sm":
            raise SecretBadResponseError(f"{ref.raw}: not an aws-sm: reference", ref=ref.raw)
        answer = client.get_secret_value(SecretId=ref.path)
        text = answer.get("SecretString")
        if text is None:
            binary = answer.get("SecretBinary")
            try:
                text = bytes(binary).decode("utf-8")
            except (TypeError, UnicodeDecodeError):
                raise SecretBadResponseError(
                    f"{ref.raw}: the secret is binary and not UTF-8 text", ref=ref.raw
                ) from None
        if ref.key is None:
            return text
        try:
            document = json.loads(text)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise SecretBadResponseError(
                f"{ref.raw}: the secret {ref.path!r} is not a JSON object, so it has no key"
                f" {ref.key!r}; use aws-sm:{ref.path} for the whole string",
                ref=ref.raw,
            )
        if ref.key not in document:
            names = sorted(str(name) for name in document)
            have = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise SecretNotFoundError(
                f"{ref.raw}: no key {ref.key!r} in the JSON of secret {ref.path!r}"
                f" (it has: {have or 'no keys'})",
                ref=ref.raw,
            )
        value = document[ref.key]
        if isinstance(value, str):
            return value
        return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _error_code(exc: Exception) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _mapped(ref: SecretRef, exc: Exception, *, doing: str = "") -> Exception:
    """The SecretBackendError for a botocore error or a malformed answer (else `exc`)."""
    raw = ref.raw
    ctx = f"{doing}: " if doing else ""
    E = botocore.exceptions
    if isinstance(exc, SecretBackendError):
        return exc
    if isinstance(exc, E.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        # AWS messages name identities, actions and resources, never a secret value.
        message = " ".join(str(error.get("Message", "")).split())
        if message.startswith("<"):
            # An XML error body where JSON was expected (a proxy, moto): dig the parts out.
            if found := _XML_CODE_RE.search(message):
                code = found[1]
            found = _XML_MESSAGE_RE.search(message)
            message = found[1] if found else ""
        message = message[:300]
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        said = f"{code}: {message}" if message else code
        if code in _NOT_FOUND:
            what = "parameter" if ref.scheme == "aws-ssm" else "secret"
            return SecretNotFoundError(f"{raw}: {ctx}no such {what} {ref.path!r}", ref=raw)
        if code.startswith("AccessDenied") or code in _DENIED or status == 403:
            return SecretAccessDeniedError(f"{raw}: {ctx}access denied ({said})", ref=raw)
        if code in _EXPIRED:
            return SecretAccessDeniedError(
                f"{raw}: {ctx}AWS credentials expired ({code})", ref=raw, retryable=True
            )
        if code in _THROTTLED or status == 429:
            return SecretBackendUnavailableError(f"{raw}: {ctx}throttled by AWS ({code})", ref=raw)
        if code in _SERVER or status >= 500:
            return SecretBackendUnavailableError(
                f"{raw}: {ctx}AWS service error ({said}, HTTP {status})", ref=raw
            )
        return SecretBadResponseError(f"{raw}: {ctx}AWS refused the request ({said})", ref=raw)
    if isinstance(exc, E.NoCredentialsError | E.PartialCredentialsError):
        return SecretAccessDeniedError(
            f"{raw}: {ctx}no AWS credentials found: provide them through the default chain"
            " (environment, ~/.aws files, instance or container role)",
            ref=raw,
        )
    if isinstance(exc, E.CredentialRetrievalError | E.TokenRetrievalError):
        return SecretAccessDeniedError(
            f"{raw}: {ctx}AWS credentials could not be loaded ({type(exc).__name__})",
            ref=raw,
            retryable=True,
        )
    if isinstance(exc, E.NoRegionError):
        return SecretBadResponseError(
            f"{raw}: {ctx}no AWS region: set secrets.aws.region in the host config or AWS_REGION",
            ref=raw,
        )
    if isinstance(exc, E.ConnectTimeoutError | E.ReadTimeoutError):
        return SecretTimeoutError(f"{raw}: {ctx}AWS did not answer in time", ref=raw)
    if isinstance(exc, E.SSLError):
        return SecretBackendUnavailableError(
            f"{raw}: {ctx}TLS connection to AWS failed", ref=raw, retryable=False
        )
    if isinstance(exc, E.EndpointConnectionError | E.ConnectionClosedError | E.HTTPClientError):
        return SecretBackendUnavailableError(f"{raw}: {ctx}cannot connect to AWS", ref=raw)
    if isinstance(exc, E.ParamValidationError):
        return SecretBadResponseError(f"{raw}: {ctx}AWS rejected the request parameters", ref=raw)
    if isinstance(exc, KeyError | TypeError | ValueError):
        return SecretBadResponseError(
            f"{raw}: {ctx}unexpected answer from AWS ({type(exc).__name__})", ref=raw
        )
    return exc
