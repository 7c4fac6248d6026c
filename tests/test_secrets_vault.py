"""The Vault backend against the stand-in: real HTTP(S) over real sockets, hvac unchanged.

The stand-in follows Vault's documented HTTP API for the endpoints the backend uses (see
tests/support/vault_standin.py); it is not a Vault build, which cannot be installed here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from providers.errors import (
    SecretAccessDeniedError,
    SecretBackendError,
    SecretBackendUnavailableError,
    SecretBadResponseError,
    SecretNotFoundError,
    SecretTimeoutError,
)
from providers.secrets.refs import parse_ref
from providers.secrets.resolve import resolve_all
from providers.secrets.vault import AppRoleAuth, TokenFileAuth, VaultBackend, VaultSettings
from tests.support.vault_standin import VaultStandin

PASSWORD = "correct-horse-battery-staple"
OLD_PASSWORD = "tr0ub4dor&3"
READ_PROD = ["kv/data/prod/", "legacy/prod/"]
ROLE_ID = "7d3f-role-id"
SECRET_ID = "b9c1e0f2-secret-id-value"


@pytest.fixture
def vault() -> Iterator[VaultStandin]:
    with VaultStandin() as server:
        server.enable_kv("kv", version=2)
        server.enable_kv("legacy", version=1)
        server.put("kv", "prod/db", {"password": OLD_PASSWORD, "user": "app"})
        server.put("kv", "prod/db", {"password": PASSWORD, "user": "app", "port": 5432})
        server.put("kv", "dev/db", {"password": "dev-only"})
        server.put("legacy", "prod/api", {"key": PASSWORD})
        yield server


def _private(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def _token_backend(
    vault: VaultStandin, tmp_path: Path, token: str, **settings: object
) -> tuple[VaultBackend, Path]:
    token_file = _private(tmp_path / "vault-token", token)
    backend = VaultBackend(
        VaultSettings(
            address=vault.address,
            auth=TokenFileAuth(token_file),
            **{"timeout": 5.0, **settings},  # type: ignore[arg-type]
        )
    )
    return backend, token_file


def _approle_backend(vault: VaultStandin, tmp_path: Path, **settings: object) -> VaultBackend:
    secret_id_file = _private(tmp_path / "secret-id", SECRET_ID)
    return VaultBackend(
        VaultSettings(
            address=vault.address,
            auth=AppRoleAuth(role_id=ROLE_ID, secret_id_file=secret_id_file),
            **{"timeout": 5.0, **settings},  # type: ignore[arg-type]
        )
    )


def _read(backend: VaultBackend, text: str) -> str:
    return backend.read(parse_ref(text))


def _fails(
    backend: VaultBackend, text: str, kind: type[SecretBackendError], *hidden: str
) -> SecretBackendError:
    """The error reading `text`, checked to name the reference and to hide every secret."""
    with pytest.raises(kind) as caught:
        _read(backend, text)
    message = str(caught.value)
    assert message.startswith(f"{text}: ")
    for secret in (PASSWORD, OLD_PASSWORD, SECRET_ID, *hidden):
        assert secret not in message
        assert secret not in repr(caught.value.args)
    # No chained library exception (whose text could quote anything) rides along.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__
    return caught.value


# -- token file auth and KV reads ----------------------------------------------------------


def test_token_file_auth_reads_kv2_latest(vault: VaultStandin, tmp_path: Path) -> None:
    token = vault.create_token(READ_PROD)
    backend, _ = _token_backend(vault, tmp_path, token)
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    assert _read(backend, "vault:kv/prod/db#user") == "app"
    paths = [r.path for r in vault.requests]
    # One lookup to learn the TTL, one mount lookup (cached), then the reads.
    assert paths == [
        "auth/token/lookup-self",
        "sys/internal/ui/mounts/kv",
        "kv/data/prod/db",
        "kv/data/prod/db",
    ]
    assert all(r.token_sent for r in vault.requests)


def test_kv2_version_and_non_string_values(vault: VaultStandin, tmp_path: Path) -> None:
    backend, _ = _token_backend(vault, tmp_path, vault.create_token(READ_PROD))
    assert _read(backend, "vault:kv/prod/db?version=1#password") == OLD_PASSWORD
    assert _read(backend, "vault:kv/prod/db?version=2#password") == PASSWORD
    assert _read(backend, "vault:kv/prod/db#port") == "5432"  # JSON-encoded
    vault.put("kv", "prod/cfg", {"list": [1, "a"], "map": {"b": True}})
    assert _read(backend, "vault:kv/prod/cfg#list") == '[1,"a"]'
    assert _read(backend, "vault:kv/prod/cfg#map") == '{"b":true}'
    assert vault.requests_to("kv/data/prod/db")[0].query == "version=1"


def test_kv2_deleted_and_destroyed_versions(vault: VaultStandin, tmp_path: Path) -> None:
    backend, _ = _token_backend(vault, tmp_path, vault.create_token(READ_PROD))
    vault.delete_version("kv", "prod/db", 1)
    err = _fails(backend, "vault:kv/prod/db?version=1#password", SecretNotFoundError)
    assert "version 1 of kv/prod/db was deleted" in str(err)
    vault.destroy_version("kv", "prod/db", 1)
    err = _fails(backend, "vault:kv/prod/db?version=1#password", SecretNotFoundError)
    assert "version 1 of kv/prod/db was destroyed" in str(err)
    err = _fails(backend, "vault:kv/prod/db?version=9#password", SecretNotFoundError)
    assert "no version 9 of kv/prod/db" in str(err)
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD  # latest is untouched


def test_kv1_mount(vault: VaultStandin, tmp_path: Path) -> None:
    backend, _ = _token_backend(vault, tmp_path, vault.create_token(READ_PROD))
    assert _read(backend, "vault:legacy/prod/api#key") == PASSWORD
    assert vault.requests_to("legacy/prod/api")
    err = _fails(backend, "vault:legacy/prod/api?version=2#key", SecretBadResponseError)
    assert "KV version 1 mount" in str(err)
    _fails(backend, "vault:legacy/prod/none#key", SecretNotFoundError)


def test_kv_version_by_mount_skips_the_lookup(vault: VaultStandin, tmp_path: Path) -> None:
    token = vault.create_token(READ_PROD)
    backend, _ = _token_backend(vault, tmp_path, token, kv_version_by_mount={"kv": 2})
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    assert not vault.requests_to("sys/internal/ui/mounts/kv")


def test_missing_path_and_missing_key(vault: VaultStandin, tmp_path: Path) -> None:
    backend, _ = _token_backend(vault, tmp_path, vault.create_token(READ_PROD))
    err = _fails(backend, "vault:kv/prod/nothing#password", SecretNotFoundError)
    assert "no secret at kv/prod/nothing (404)" in str(err)
    assert not err.retryable and err.kind == "not-found"
    err = _fails(backend, "vault:kv/prod/db#passwd", SecretNotFoundError)
    assert "no key 'passwd' in kv/prod/db" in str(err)
    assert "password" in str(err)  # the key names it has (names are not secret)


def test_denied_by_policy(vault: VaultStandin, tmp_path: Path) -> None:
    token = vault.create_token(READ_PROD)
    backend, _ = _token_backend(vault, tmp_path, token)
    err = _fails(backend, "vault:kv/dev/db#password", SecretAccessDeniedError, token, "dev-only")
    assert str(err) == "vault:kv/dev/db#password: permission denied (403)"
    assert not err.retryable and err.kind == "denied"
    err = _fails(backend, "vault:secret/prod/db#password", SecretAccessDeniedError, token)
    assert "permission denied on mount 'secret', or no such mount" in str(err)


def test_token_file_with_a_dead_token(vault: VaultStandin, tmp_path: Path) -> None:
    token = vault.create_token(READ_PROD)
    vault.revoke_token(token)
    backend, token_file = _token_backend(vault, tmp_path, token)
    err = _fails(backend, "vault:kv/prod/db#password", SecretAccessDeniedError, token)
    assert f"the token in {token_file} is not valid (expired or revoked)" in str(err)


def test_token_file_too_open_or_missing(vault: VaultStandin, tmp_path: Path) -> None:
    token = vault.create_token(READ_PROD)
    backend, token_file = _token_backend(vault, tmp_path, token)
    token_file.chmod(0o644)
    err = _fails(backend, "vault:kv/prod/db#password", SecretAccessDeniedError, token)
    assert "gives others access" in str(err)
    token_file.chmod(0o640)  # Vault Agent's default sink mode is fine
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    token_file.unlink()
    err = _fails(backend, "vault:kv/prod/db#password", SecretNotFoundError, token)
    assert "cannot use the Vault token file" in str(err)


# -- AppRole --------------------------------------------------------------------------------


def test_approle_login_and_read(vault: VaultStandin, tmp_path: Path) -> None:
    vault.add_approle(ROLE_ID, SECRET_ID, READ_PROD)
    backend = _approle_backend(vault, tmp_path)
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    assert _read(backend, "vault:legacy/prod/api#key") == PASSWORD
    logins = vault.requests_to("auth/approle/login")
    assert len(logins) == 1 and not logins[0].token_sent
    assert not vault.requests_to("auth/token/lookup-self")  # the login answer has the TTL


def test_approle_bad_secret_id(vault: VaultStandin, tmp_path: Path) -> None:
    vault.add_approle(ROLE_ID, "another-secret-id", READ_PROD)
    backend = _approle_backend(vault, tmp_path)
    err = _fails(backend, "vault:kv/prod/db#password", SecretAccessDeniedError, ROLE_ID)
    assert "AppRole login at auth/approle failed: invalid role or secret ID" in str(err)
    assert str(tmp_path / "secret-id") in str(err)


def test_approle_token_expires_in_the_middle(vault: VaultStandin, tmp_path: Path) -> None:
    vault.add_approle(ROLE_ID, SECRET_ID, READ_PROD, token_ttl=1, renewable=False)
    backend = _approle_backend(vault, tmp_path)
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    time.sleep(1.2)
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    assert len(vault.requests_to("auth/approle/login")) == 2
    assert all(r.status == 200 for r in vault.requests_to("kv/data/prod/db"))


def test_approle_token_revoked_behind_our_back(vault: VaultStandin, tmp_path: Path) -> None:
    # The backend's clock says the token is good; Vault answers 403. lookup-self tells a dead
    # token from a policy denial; the backend logs in again once and retries.
    vault.add_approle(ROLE_ID, SECRET_ID, READ_PROD)
    backend = _approle_backend(vault, tmp_path)
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    (token,) = vault.issued_tokens()
    vault.revoke_token(token)
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    assert [r.status for r in vault.requests_to("kv/data/prod/db")] == [200, 403, 200]
    assert [r.status for r in vault.requests_to("auth/token/lookup-self")] == [403]
    assert len(vault.requests_to("auth/approle/login")) == 2


def test_secret_id_from_a_systemd_credentials_directory(
    vault: VaultStandin, tmp_path: Path
) -> None:
    # LoadCredential=vault-secret-id:/etc/... puts the file at $CREDENTIALS_DIRECTORY/NAME,
    # owned by the service user with mode 0400.
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o500)
    secret_id_file = credentials / "vault-secret-id"
    secret_id_file.write_text(SECRET_ID)
    secret_id_file.chmod(0o400)
    vault.add_approle(ROLE_ID, SECRET_ID, READ_PROD)
    backend = VaultBackend(
        VaultSettings(address=vault.address, auth=AppRoleAuth(ROLE_ID, secret_id_file))
    )
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD


# -- token file: expiry and renewal ---------------------------------------------------------


def test_token_file_token_expires_and_the_file_is_rewritten(
    vault: VaultStandin, tmp_path: Path
) -> None:
    first = vault.create_token(READ_PROD, ttl=1, renewable=False)
    backend, token_file = _token_backend(vault, tmp_path, first)
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    time.sleep(1.2)
    # Meanwhile Vault Agent (here: the test) wrote a fresh token to the sink file.
    second = vault.create_token(READ_PROD, ttl=60)
    _private(token_file, second)
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    assert all(r.status == 200 for r in vault.requests_to("kv/data/prod/db"))
    # Not rewritten: the error says the token is dead, and shows neither token.
    time.sleep(0.1)
    vault.revoke_token(second)
    err = _fails(backend, "vault:kv/prod/db#password", SecretAccessDeniedError, first, second)
    assert "is not valid (expired or revoked)" in str(err)


def test_renewable_token_is_renewed(vault: VaultStandin, tmp_path: Path) -> None:
    token = vault.create_token(READ_PROD, ttl=2, renewable=True)
    backend, _ = _token_backend(vault, tmp_path, token)
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    assert not vault.requests_to("auth/token/renew-self")
    time.sleep(1.5)  # less than a third of the 2 s lease left
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    renewals = vault.requests_to("auth/token/renew-self")
    assert len(renewals) == 1 and renewals[0].status == 200
    time.sleep(1.0)  # past the original expiry: only the renewal keeps the token alive
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    assert all(r.status == 200 for r in vault.requests)
    assert len(vault.requests_to("auth/token/lookup-self")) == 1  # the file never changed


# -- namespaces and TLS ---------------------------------------------------------------------


def test_namespace(vault: VaultStandin, tmp_path: Path) -> None:
    vault.enable_kv("kv", namespace="team-a")
    vault.put("kv", "prod/db", {"password": "team-a-password"}, namespace="team-a")
    token = vault.create_token(["kv/data/prod/"], namespace="team-a")
    backend, _ = _token_backend(vault, tmp_path, token, namespace="team-a")
    assert _read(backend, "vault:kv/prod/db#password") == "team-a-password"
    assert {r.namespace for r in vault.requests} == {"team-a"}
    # The same token means nothing in the root namespace.
    (tmp_path / "root").mkdir()
    root, _ = _token_backend(vault, tmp_path / "root", token)
    _fails(root, "vault:kv/prod/db#password", SecretAccessDeniedError, token, "team-a-password")


def test_tls_with_a_ca_bundle(tmp_path: Path) -> None:
    with VaultStandin(tls=True) as vault:
        vault.enable_kv("kv")
        vault.put("kv", "prod/db", {"password": PASSWORD})
        token = vault.create_token(READ_PROD)
        assert vault.address.startswith("https://127.0.0.1:")
        backend, _ = _token_backend(vault, tmp_path, token, ca_bundle=vault.ca_bundle)
        assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
        untrusting, _ = _token_backend(vault, tmp_path, token)
        err = _fails(untrusting, "vault:kv/prod/db#password", SecretBackendUnavailableError, token)
        assert "TLS connection to Vault" in str(err) and "ca_bundle" in str(err)
        assert not err.retryable


# -- sealed, throttled, down ----------------------------------------------------------------


def test_sealed_vault(vault: VaultStandin, tmp_path: Path) -> None:
    backend, _ = _token_backend(vault, tmp_path, vault.create_token(READ_PROD))
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD
    vault.seal()
    err = _fails(backend, "vault:kv/prod/db#password", SecretBackendUnavailableError)
    assert f"Vault at {vault.address} is sealed (503)" in str(err)
    assert err.retryable and err.kind == "unavailable"
    vault.unseal()
    assert _read(backend, "vault:kv/prod/db#password") == PASSWORD


def test_rate_limited_then_success(vault: VaultStandin, tmp_path: Path) -> None:
    backend, _ = _token_backend(vault, tmp_path, vault.create_token(READ_PROD))
    vault.fail_next("kv/data/prod/db", 429, count=2)
    ref = parse_ref("vault:kv/prod/db#password")
    started = time.monotonic()
    result = resolve_all([ref], lambda _: backend, retry_for=10.0)
    assert result == {ref.raw: PASSWORD}
    assert [r.status for r in vault.requests_to("kv/data/prod/db")] == [429, 429, 200]
    assert 0.1 <= time.monotonic() - started < 2.0  # backoff 0.2 s then 0.4 s, with jitter


def test_unavailable_forever_fails_within_retry_for(vault: VaultStandin, tmp_path: Path) -> None:
    backend, _ = _token_backend(vault, tmp_path, vault.create_token(READ_PROD))
    vault.fail_next("kv/", 503, count=None)
    ref = parse_ref("vault:kv/prod/db#password")
    started = time.monotonic()
    result = resolve_all([ref], lambda _: backend, retry_for=1.0)
    elapsed = time.monotonic() - started
    err = result[ref.raw]
    assert isinstance(err, SecretBackendUnavailableError)
    assert "is unavailable (503)" in str(err)  # seal-status says unsealed: not "sealed"
    assert err.retryable and PASSWORD not in str(err)
    assert 1.0 <= elapsed < 2.0
    assert len(vault.requests_to("kv/data/prod/db")) >= 3


def test_timeout(vault: VaultStandin, tmp_path: Path) -> None:
    backend, _ = _token_backend(vault, tmp_path, vault.create_token(READ_PROD), timeout=0.3)
    vault.delay_next("kv/data/prod/db", 1.0)
    err = _fails(backend, "vault:kv/prod/db#password", SecretTimeoutError)
    assert "within 0.3 s" in str(err) and err.retryable and err.kind == "timeout"


def test_nothing_listening(tmp_path: Path) -> None:
    with VaultStandin() as vault:
        address = vault.address
    token_file = _private(tmp_path / "token", "hvs.whatever")
    backend = VaultBackend(VaultSettings(address=address, auth=TokenFileAuth(token_file)))
    err = _fails(backend, "vault:kv/prod/db#password", SecretBackendUnavailableError)
    assert f"cannot connect to Vault at {address}" in str(err) and err.retryable


# -- many at once ---------------------------------------------------------------------------


def test_resolve_all_in_parallel_logs_in_once(vault: VaultStandin, tmp_path: Path) -> None:
    vault.add_approle(ROLE_ID, SECRET_ID, READ_PROD)
    for n in range(12):
        vault.put("kv", f"prod/app{n}", {"password": f"pw-{n}"})
    backend = _approle_backend(vault, tmp_path)
    refs = [parse_ref(f"vault:kv/prod/app{n}#password") for n in range(12)]
    refs += refs[:4]  # duplicates are fetched once
    refs.append(parse_ref("vault:kv/dev/db#password"))
    result = resolve_all(refs, lambda _: backend, max_workers=8)
    assert {raw: result[raw] for raw in result if "app" in raw} == {
        f"vault:kv/prod/app{n}#password": f"pw-{n}" for n in range(12)
    }
    assert isinstance(result["vault:kv/dev/db#password"], SecretAccessDeniedError)
    assert len(vault.requests_to("auth/approle/login")) == 1
    assert len([r for r in vault.requests if r.path.startswith("kv/data/prod/app")]) == 12
    assert threading.active_count() < 20  # the pool is gone
