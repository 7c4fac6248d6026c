"""Secrets in a real pass: the Vault stand-in (Vault's HTTP API over a real socket),
the embedded Terraform, and the redactor in front of what the agent writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.store import RunStore, UnitStatus
from tests.support.infra import InfraRepo, write_host_config
from tests.support.vault_standin import VaultStandin

PASSWORD = "s3cr3t-canary-7f1e9a-password"

LEAKY_TF = """
variable "db_password" {
  type = string
}
resource "terraform_data" "shown" {
  input = var.db_password
}
"""
QUIET_TF = 'resource "terraform_data" "q" {\n  input = "q"\n}\n'


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[tuple[VaultStandin, Path]]:
    with VaultStandin() as server:
        server.enable_kv("kv", version=2)
        server.put("kv", "prod/db", {"password": PASSWORD})
        token = server.create_token(["kv/data/prod/"])
        token_file = tmp_path / "vault-token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        yield server, token_file


def world(tmp_path: Path, vault_address: str, token_file: Path, secret: str) -> Path:
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/db/main.tf", LEAKY_TF)
    repo.write("stacks/app/main.tf", QUIET_TF)
    repo.write("stacks/other/main.tf", QUIET_TF)
    repo.write(
        "gitops.yaml",
        f"""\
        version: 1
        units:
          - name: db
            stack: stacks/db
            secrets: {{db_password: "{secret}"}}
          - {{name: app, stack: stacks/app, depends_on: [db]}}
          - {{name: other, stack: stacks/other}}
        """,
    )
    repo.push("seed")
    extra = f"""\
        secrets:
          allowed: ["vault:kv/prod/"]
          retry_for: 2s
          vault:
            address: {vault_address}
            auth: {{token_file: {token_file}}}
        """
    return write_host_config(tmp_path / "agent.yaml", repo.url, tmp_path / "state", extra)


def run(config: Path):
    reconciler = Reconciler(load_host_config(config))
    try:
        return reconciler.run_pass(PassRequest(trigger="test"))
    finally:
        reconciler.close()


def test_a_vault_secret_reaches_terraform_and_nothing_the_agent_writes(
    tmp_path: Path, vault: tuple[VaultStandin, Path]
) -> None:
    server, token_file = vault
    config = world(tmp_path, server.address, token_file, "vault:kv/prod/db#password")

    result = run(config)

    assert result.ok, result.error
    assert result.outcomes["db"].decision == "apply"
    state = tmp_path / "state"
    # Terraform got the value (it is in Terraform's own state, by design)...
    assert PASSWORD in (state / "units" / "db" / "terraform.tfstate").read_text()
    # ...and the plan output the agent kept shows it masked.
    plan = next(state.glob("runs/*/db/plan.txt")).read_text()
    assert "***" in plan and PASSWORD not in plan
    leaks = [
        p
        for p in state.rglob("*")
        if p.is_file() and "terraform.tfstate" not in p.name and PASSWORD.encode() in p.read_bytes()
    ]
    assert leaks == []
    assert not list(state.glob("runs/*/*/tfplan"))  # plan files hold values: removed


def test_a_missing_secret_fails_its_unit_and_dependents_only(
    tmp_path: Path, vault: tuple[VaultStandin, Path]
) -> None:
    server, token_file = vault
    config = world(tmp_path, server.address, token_file, "vault:kv/prod/db#nope")

    result = run(config)

    db, app, other = (result.outcomes[n] for n in ("db", "app", "other"))
    assert db.status is UnitStatus.FAILED
    assert "vault:kv/prod/db#nope" in (db.error or "")
    assert app.status is UnitStatus.BLOCKED
    assert other.status is UnitStatus.OK
    assert not (tmp_path / "state" / "units" / "db" / "terraform.tfstate").exists()
    stored = RunStore(tmp_path / "state").unit_history("db")[0]
    assert stored.error and "nope" in stored.error and PASSWORD not in stored.error


def test_a_reference_outside_the_allowed_prefixes_rejects_the_revision(
    tmp_path: Path, vault: tuple[VaultStandin, Path]
) -> None:
    server, token_file = vault
    config = world(tmp_path, server.address, token_file, "vault:kv/dev/db#password")

    result = run(config)

    assert not result.ok and result.outcomes == {}
    assert result.error and "gitops.yaml:5: units[0].secrets.db_password" in result.error
    assert "vault:kv/prod/" in result.error


@pytest.mark.parametrize(
    ("renewable", "auth_path"),
    [(True, "auth/token/renew-self"), (False, "auth/approle/login")],
    ids=["renewed", "logged-in-again"],
)
def test_an_approle_token_that_expires_in_the_middle_of_a_pass_is_replaced(
    tmp_path: Path, renewable: bool, auth_path: str
) -> None:
    # 24 secrets read 8 at a time, each read slowed to 0.4 s, by a token that lives 1 s:
    # the later reads would find it expired; the agent renews it (or, when it cannot be
    # renewed, logs in again) and the pass goes on.
    with VaultStandin() as server:
        server.enable_kv("kv", version=2)
        names = [f"s{n:02d}" for n in range(24)]
        for name in names:
            server.put("kv", f"prod/{name}", {"v": f"value-{name}-{PASSWORD}"})
        server.add_approle(
            "role-1", "secret-id-1", ["kv/data/prod/"], token_ttl=1, renewable=renewable
        )
        server.delay_next("kv/data/prod/", 0.4, count=None)
        secret_id = tmp_path / "secret-id"
        secret_id.write_text("secret-id-1\n")
        secret_id.chmod(0o600)
        repo = InfraRepo(tmp_path / "git")
        variables = "".join(f'variable "{n}" {{\n  type = string\n}}\n' for n in names)
        repo.write("stacks/many/main.tf", variables + QUIET_TF)
        refs = ", ".join(f'{n}: "vault:kv/prod/{n}#v"' for n in names)
        repo.write(
            "gitops.yaml",
            f"version: 1\nunits:\n  - {{name: many, stack: stacks/many, secrets: {{{refs}}}}}\n",
        )
        repo.push("seed")
        config = write_host_config(
            tmp_path / "agent.yaml",
            repo.url,
            tmp_path / "state",
            f"""\
            secrets:
              allowed: ["vault:kv/prod/"]
              vault:
                address: {server.address}
                auth: {{approle: {{role_id: role-1, secret_id_file: {secret_id}}}}}
            """,
        )

        result = run(config)

        assert result.ok, result.error
        assert result.outcomes["many"].status is UnitStatus.OK
        logins = len(server.requests_to("auth/approle/login"))
        renewals = len(server.requests_to("auth/token/renew-self"))
        assert (renewals >= 1 and logins == 1) if renewable else (logins >= 2)
        assert all(r.status == 200 for r in server.requests_to(auth_path))
        reads = [r for r in server.requests if r.path.startswith("kv/data/prod/")]
        assert {r.path for r in reads if r.status == 200} == {f"kv/data/prod/{n}" for n in names}
