"""The AWS backends against moto in server mode (real HTTP endpoints on 127.0.0.1).

Credentials are fake (`testing`) and set for each test only; every client is pointed at the
moto server with endpoint_url, so nothing here can reach real AWS.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from providers.errors import (
    SecretAccessDeniedError,
    SecretBackendError,
    SecretBackendUnavailableError,
    SecretBadResponseError,
    SecretNotFoundError,
)
from providers.secrets.aws import AwsSettings, SecretsManagerBackend, SsmBackend
from providers.secrets.refs import parse_ref
from providers.secrets.resolve import resolve_all
from tests.support.moto import REGION, MotoServer, fake_aws_credentials

DB_PASSWORD = "ssm-secure-value-81f2"
SM_PASSWORD = "sm-json-value-c3a9"
SM_WHOLE = "sm-whole-string-77d0"
ROLE_ARN = "arn:aws:iam::123456789012:role/gitops-agent-reader"


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def endpoint(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    fake_aws_credentials(monkeypatch)
    moto_server.reset()
    ssm = boto3.client("ssm", endpoint_url=moto_server.url, region_name=REGION)
    ssm.put_parameter(Name="/prod/db/password", Value=DB_PASSWORD, Type="SecureString")
    ssm.put_parameter(Name="/prod/db/host", Value="db.internal", Type="String")
    sm = boto3.client("secretsmanager", endpoint_url=moto_server.url, region_name=REGION)
    sm.create_secret(
        Name="prod/db",
        SecretString=f'{{"password": "{SM_PASSWORD}", "port": 5432, "opts": {{"ssl": true}}}}',
    )
    sm.create_secret(Name="prod/token", SecretString=SM_WHOLE)
    sm.create_secret(Name="prod/blob", SecretBinary=SM_WHOLE.encode())
    return moto_server.url


def _settings(endpoint: str, **extra: Any) -> AwsSettings:
    return AwsSettings(region=REGION, endpoint_url=endpoint, **extra)


def _fails(backend: Any, text: str, kind: type[SecretBackendError]) -> SecretBackendError:
    with pytest.raises(kind) as caught:
        backend.read(parse_ref(text))
    message = str(caught.value)
    assert message.startswith(f"{text}: ")
    for secret in (DB_PASSWORD, SM_PASSWORD, SM_WHOLE):
        assert secret not in message
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__
    return caught.value


def test_ssm_secure_string_is_decrypted(endpoint: str) -> None:
    backend = SsmBackend(_settings(endpoint))
    assert backend.read(parse_ref("aws-ssm:/prod/db/password")) == DB_PASSWORD
    assert backend.read(parse_ref("aws-ssm:/prod/db/host")) == "db.internal"


def test_ssm_missing_parameter(endpoint: str) -> None:
    err = _fails(SsmBackend(_settings(endpoint)), "aws-ssm:/prod/db/nope", SecretNotFoundError)
    assert "no such parameter '/prod/db/nope'" in str(err)
    assert not err.retryable and err.kind == "not-found"


def test_secrets_manager_whole_string_and_json_key(endpoint: str) -> None:
    backend = SecretsManagerBackend(_settings(endpoint))
    assert backend.read(parse_ref("aws-sm:prod/token")) == SM_WHOLE
    assert backend.read(parse_ref("aws-sm:prod/db#password")) == SM_PASSWORD
    assert backend.read(parse_ref("aws-sm:prod/db#port")) == "5432"
    assert backend.read(parse_ref("aws-sm:prod/db#opts")) == '{"ssl":true}'
    assert backend.read(parse_ref("aws-sm:prod/blob")) == SM_WHOLE  # SecretBinary, UTF-8


def test_secrets_manager_errors(endpoint: str) -> None:
    backend = SecretsManagerBackend(_settings(endpoint))
    err = _fails(backend, "aws-sm:prod/nope", SecretNotFoundError)
    assert "no such secret 'prod/nope'" in str(err)
    err = _fails(backend, "aws-sm:prod/db#user", SecretNotFoundError)
    assert "no key 'user' in the JSON of secret 'prod/db' (it has: opts, password, port)" in str(
        err
    )
    err = _fails(backend, "aws-sm:prod/token#password", SecretBadResponseError)
    assert "is not a JSON object" in str(err) and "aws-sm:prod/token" in str(err)


def test_role_assumption_with_endpoint_url(endpoint: str) -> None:
    backend = SecretsManagerBackend(_settings(endpoint, role_arn=ROLE_ARN))
    assert backend.read(parse_ref("aws-sm:prod/db#password")) == SM_PASSWORD
    assert backend.caller_arn() == (
        "arn:aws:sts::123456789012:assumed-role/gitops-agent-reader/gitops-agent"
    )
    plain = SsmBackend(_settings(endpoint))
    assert ":assumed-role/" not in plain.caller_arn()
    named = SsmBackend(_settings(endpoint, role_arn=ROLE_ARN, session_name="host-7"))
    assert named.read(parse_ref("aws-ssm:/prod/db/password")) == DB_PASSWORD
    assert named.caller_arn().endswith("/gitops-agent-reader/host-7")


def test_resolve_all_mixes_backends(endpoint: str) -> None:
    ssm, sm = SsmBackend(_settings(endpoint)), SecretsManagerBackend(_settings(endpoint))
    refs = [
        parse_ref(text)
        for text in (
            "aws-ssm:/prod/db/password",
            "aws-sm:prod/db#password",
            "aws-sm:prod/db#password",
            "aws-sm:prod/missing",
        )
    ]
    result = resolve_all(refs, lambda ref: ssm if ref.scheme == "aws-ssm" else sm)
    assert result["aws-ssm:/prod/db/password"] == DB_PASSWORD
    assert result["aws-sm:prod/db#password"] == SM_PASSWORD
    assert isinstance(result["aws-sm:prod/missing"], SecretNotFoundError)
    assert len(result) == 3


def test_nothing_listening_is_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_aws_credentials(monkeypatch)
    backend = SsmBackend(AwsSettings(region=REGION, endpoint_url="http://127.0.0.1:9"))
    err = _fails(backend, "aws-ssm:/prod/db/password", SecretBackendUnavailableError)
    assert "cannot connect to AWS" in str(err) and err.retryable
    result = resolve_all([parse_ref("aws-ssm:/prod/db/password")], lambda _: backend, retry_for=0.5)
    assert isinstance(result["aws-ssm:/prod/db/password"], SecretBackendUnavailableError)


def test_no_region(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_aws_credentials(monkeypatch)
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    backend = SsmBackend(AwsSettings(endpoint_url="http://127.0.0.1:9"))
    err = _fails(backend, "aws-ssm:/prod/db/password", SecretBadResponseError)
    assert "no AWS region" in str(err) and not err.retryable


def test_access_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    # A server of its own with IAM checks on after the first 3 (setup) calls.
    fake_aws_credentials(monkeypatch)
    with MotoServer({"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as server:
        iam = boto3.client("iam", endpoint_url=server.url, region_name=REGION)
        iam.create_user(UserName="no-policies")
        key = iam.create_access_key(UserName="no-policies")["AccessKey"]
        ssm = boto3.client("ssm", endpoint_url=server.url, region_name=REGION)
        ssm.put_parameter(Name="/prod/db/password", Value=DB_PASSWORD, Type="SecureString")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        monkeypatch.delenv("AWS_SESSION_TOKEN")
        backend = SsmBackend(AwsSettings(region=REGION, endpoint_url=server.url))
        err = _fails(backend, "aws-ssm:/prod/db/password", SecretAccessDeniedError)
    assert "access denied" in str(err) and "ssm:GetParameter" in str(err)
    assert not err.retryable and err.kind == "denied"
