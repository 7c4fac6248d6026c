"""The leak battery: 36 canary secrets of every awkward shape, fetched from Vault (the
stand-in), AWS (moto server) and files, pushed through every path that can print them,
then everything the agent wrote and printed is searched for every form of every canary.

Paths: a sensitive and a non-sensitive Terraform variable (plan text, plan JSON, apply
output), a Terraform error that echoes a variable (a failing precondition), the same far
enough to the right that Terraform word-wraps the multi-word canaries, a failing
local-exec provisioner that prints them, a host template holding them (its diff), a
failing host command that prints them, a Vault error whose text echoes one, a Python
traceback logged while the pass's redactor is installed, and the CLI (`reconcile`,
`status`, `history`, `logs`, with `--json` and without). Searched: the whole state
directory (SQLite database and its WAL included), every CLI stdout and stderr, and every
log record of the pass. Terraform's own state file is the one exception: Terraform keeps
variable values there by design (docs/secrets.md says so, and how to protect it).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from agent.config import load_host_config
from agent.core.redact import install_logging_redaction, remove_logging_redaction
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.store import UnitStatus
from tests.support.canaries import Canary, find_leaks, load_canaries, named_forms
from tests.support.infra import InfraRepo, write_host_config
from tests.support.moto import REGION, MotoServer, fake_aws_credentials
from tests.support.vault_standin import VaultStandin

CANARIES = load_canaries()
SSM_LIMIT = 4096  # SecureString standard tier


def _var_name(index: int) -> str:
    return f"c{index:02d}"


def _variables(sensitive: bool) -> str:
    flag = "\n  sensitive = true" if sensitive else ""
    return "".join(
        f'variable "{_var_name(i)}" {{\n  type = string{flag}\n}}\n' for i in range(len(CANARIES))
    )


def _all_vars() -> str:
    return (
        "{\n"
        + "".join(f"    {_var_name(i)} = var.{_var_name(i)}\n" for i in range(len(CANARIES)))
        + "  }"
    )


# One stack per path; each reads every canary as a Terraform variable.
STACKS = {
    "sensitive": _variables(True)
    + f'resource "terraform_data" "held" {{\n  input = {_all_vars()}\n}}\n',
    "plain": _variables(False)
    + f'resource "terraform_data" "shown" {{\n  input = {_all_vars()}\n}}\n'
    + f'output "echo" {{\n  value = {_all_vars()}\n}}\n',
    "echo_error": _variables(False)
    + "".join(
        f'resource "terraform_data" "refused_{i:02d}" {{\n'
        "  lifecycle {\n    precondition {\n"
        f"      condition     = length(var.{_var_name(i)}) < 0\n"
        f'      error_message = "refused: ${{var.{_var_name(i)}}}"\n    }}\n  }}\n}}\n'
        for i in range(len(CANARIES))
    ),
    # The value starts at column ~60: Terraform wraps the message at 78 columns, so a
    # canary with spaces is split over lines (docs/secrets.md, "Wrapped values").
    "echo_wrapped": _variables(False)
    + "".join(
        f'resource "terraform_data" "wrapped_{i:02d}" {{\n'
        "  lifecycle {\n    precondition {\n"
        f"      condition     = length(var.{_var_name(i)}) < 0\n"
        '      error_message = "the value configured for this resource is not allowed: '
        f'${{var.{_var_name(i)}}} (refused)"\n    }}\n  }}\n}}\n'
        for i in range(len(CANARIES))
    ),
    "local_exec": _variables(False)
    + 'resource "terraform_data" "loud" {\n'
    + '  provisioner "local-exec" {\n'
    + "    command = \"env | grep '^C' ; exit 3\"\n"
    + "    environment = {\n"
    + "".join(f"      C{i:02d} = var.{_var_name(i)}\n" for i in range(len(CANARIES)))
    + "    }\n  }\n}\n",
}


def _backend_for(index: int, canary: Canary) -> str:
    """Spread the canaries over every kind of reference."""
    kind = ["vault2", "vault1", "ssm", "sm", "file"][index % 5]
    if kind == "ssm" and len(canary.value.encode()) > SSM_LIMIT:
        kind = "vault2"
    if kind == "file" and canary.value.endswith("\n"):
        kind = "vault2"  # the file backend strips one trailing newline, by design
    return kind


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    fake_aws_credentials(monkeypatch)
    with VaultStandin() as vault, MotoServer() as moto:
        vault.enable_kv("kv", version=2)
        vault.enable_kv("kv1", version=1)
        ssm = boto3.client("ssm", endpoint_url=moto.url, region_name=REGION)
        sm = boto3.client("secretsmanager", endpoint_url=moto.url, region_name=REGION)
        files = tmp_path / "secrets"
        files.mkdir(mode=0o700)
        refs = {}
        for index, canary in enumerate(CANARIES):
            name = _var_name(index)
            kind = _backend_for(index, canary)
            if kind == "vault2":
                vault.put("kv", f"prod/{name}", {"v": canary.value})
                refs[name] = f"vault:kv/prod/{name}#v"
            elif kind == "vault1":
                vault.put("kv1", f"prod/{name}", {"v": canary.value})
                refs[name] = f"vault:kv1/prod/{name}#v"
            elif kind == "ssm":
                ssm.put_parameter(Name=f"/prod/{name}", Value=canary.value, Type="SecureString")
                refs[name] = f"aws-ssm:/prod/{name}"
            elif kind == "sm":
                sm.create_secret(Name=f"prod/{name}", SecretString=f'{{"v": {_json(canary)}}}')
                refs[name] = f"aws-sm:prod/{name}#v"
            else:
                path = files / name
                path.write_text(canary.value, encoding="utf-8")
                path.chmod(0o600)
                refs[name] = f"file:{path}"
        # A Vault that answers one read with an error echoing a secret it holds.
        vault.put("kv", "prod/broken", {"v": "never-read"})
        vault.fail_next("kv/data/prod/broken", 500, None, message=f"backend: {CANARIES[4].value}")
        token_file = tmp_path / "vault-token"
        token_file.write_text(vault.create_token(["kv/data/prod/", "kv1/prod/"]))
        token_file.chmod(0o600)

        repo = InfraRepo(tmp_path / "git")
        units = []
        for stack, text in STACKS.items():
            repo.write(f"stacks/{stack}/main.tf", text)
            secrets = ", ".join(f'{name}: "{ref}"' for name, ref in refs.items())
            units.append(f"  - {{name: {stack}, stack: stacks/{stack}, secrets: {{{secrets}}}}}")
        repo.write("stacks/broken/main.tf", 'variable "v" {\n  type = string\n}\n')
        units.append(
            '  - {name: broken, stack: stacks/broken, secrets: {v: "vault:kv/prod/broken#v"}}'
        )
        # A fleet (this machine): a template holding every canary, a command printing them.
        host_dir = tmp_path / "host"
        repo.write(
            "templates/canaries.j2",
            "{% for name, value in secrets.items() %}{{ name }}={{ value }}\n{% endfor %}",
        )
        env = ", ".join(
            f'C{i:02d}: "{{{{ secrets.{_var_name(i)} }}}}"' for i in range(len(CANARIES))
        )
        units.append(
            f"""\
  - name: hostfiles
    secrets: {{{secrets}}}
    fleet:
      hosts: {{static: [{{name: bastion, address: local}}]}}
      resources:
        - directory: {host_dir}
        - template: {host_dir}/canaries.conf
          source: templates/canaries.j2
          mode: "0600"
        - command: loud
          run: "env | grep '^C' ; exit 3"
          env: {{{env}}}"""
        )
        repo.write("gitops.yaml", "version: 1\nunits:\n" + "\n".join(units) + "\n")
        repo.push("canaries")
        config = write_host_config(
            tmp_path / "agent.yaml",
            repo.url,
            tmp_path / "state",
            f"""\
            secrets:
              allowed: ["vault:kv/prod/", "vault:kv1/prod/", "aws-ssm:/prod/", "aws-sm:prod/",
                        "file:{files}/"]
              retry_for: 1s
              allow_weak_values: true  # the 6- and 7-character canaries
              vault:
                address: {vault.address}
                auth: {{token_file: {token_file}}}
              aws: {{region: {REGION}, endpoint_url: "{moto.url}"}}
            hosts: {{allow_local: true, python: {sys.executable}}}
            """,
        )
        yield {"config": config, "state": tmp_path / "state", "refs": refs, "host_dir": host_dir}


def _json(canary: Canary) -> str:
    return json.dumps(canary.value)


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GITOPS_AGENT_CONFIG": str(config)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def _searchable_state(state: Path) -> tuple[list[Path], list[Path]]:
    """Every file in the state directory, and the Terraform state files left out."""
    files = sorted(p for p in state.rglob("*") if p.is_file() and not p.is_symlink())
    terraform_state = [p for p in files if p.name.startswith("terraform.tfstate")]
    return [p for p in files if p not in terraform_state], terraform_state


def test_no_canary_reaches_anything_the_agent_writes_or_prints(
    world: dict, record_property: pytest.RecordProperty
) -> None:
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    capture = Capture(logging.DEBUG)
    capture.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    reconciler = Reconciler(load_host_config(world["config"]))
    install_logging_redaction(reconciler.redactor)
    try:
        result = reconciler.run_pass(PassRequest(trigger="test"))
        # A traceback: an exception whose message and cause hold canaries, logged through
        # the same logging set-up while the pass's redactor is installed.
        try:
            try:
                raise KeyError(CANARIES[5].value)
            except KeyError as cause:
                raise RuntimeError(f"while handling {CANARIES[6].value}") from cause
        except RuntimeError:
            logging.getLogger("agent.test").exception("unit failed: %s", CANARIES[7].value)
            printed_traceback = reconciler.redactor.redact(traceback.format_exc())
    finally:
        remove_logging_redaction(reconciler.redactor)
        reconciler.close()
        root.removeHandler(capture)
        root.setLevel(old_level)

    outcomes = result.outcomes
    state_dir = world["state"]
    # Every path really ran: the values reached Terraform, and each unit did what it must.
    assert outcomes["sensitive"].status is UnitStatus.OK
    assert outcomes["plain"].status is UnitStatus.OK
    assert outcomes["echo_error"].status is UnitStatus.FAILED
    assert "refused: ***" in (outcomes["echo_error"].error or "")
    assert outcomes["echo_wrapped"].status is UnitStatus.FAILED
    wrapped = next(state_dir.glob("runs/*/echo_wrapped/plan.txt")).read_text(encoding="utf-8")
    assert "not allowed: ***" in wrapped and "(refused)" in wrapped
    assert outcomes["local_exec"].status is UnitStatus.FAILED
    assert outcomes["broken"].status is UnitStatus.FAILED
    assert "vault:kv/prod/broken#v" in (outcomes["broken"].error or "")
    state = world["state"]
    held = json.loads((state / "units" / "sensitive" / "terraform.tfstate").read_text())
    arrived = held["resources"][0]["instances"][0]["attributes"]["input"]["value"]
    assert arrived == {
        _var_name(i): unicodedata.normalize("NFC", c.value) for i, c in enumerate(CANARIES)
    }
    assert outcomes["hostfiles"].status is UnitStatus.FAILED
    assert "command:loud" in (outcomes["hostfiles"].error or "")
    rendered = (world["host_dir"] / "canaries.conf").read_bytes().decode()
    missing = [
        c.name for i, c in enumerate(CANARIES) if f"{_var_name(i)}={c.value}\n" not in rendered
    ]
    assert missing == []
    hosts_txt = next(state.glob("runs/*/hostfiles/hosts.txt")).read_text(encoding="utf-8")
    assert "sha256" in hosts_txt and "***" in hosts_txt
    apply_output = next(state.glob("runs/*/local_exec/apply.txt")).read_text(encoding="utf-8")
    assert apply_output.count("C") > len(CANARIES) and "***" in apply_output

    printed = [printed_traceback, "\n".join(records)]
    for args in (
        ("reconcile", "--now"),
        ("reconcile", "--now", "--json", "-v"),
        ("status",),
        ("status", "--json"),
        ("history",),
        ("history", "--json"),
        *(("logs", unit) for unit in outcomes),
        *(("logs", unit, "--json") for unit in outcomes),
    ):
        done = _cli(world["config"], *args)
        printed += [done.stdout, done.stderr]
    files, terraform_state = _searchable_state(state)

    leaks = find_leaks([*files, *printed], CANARIES)
    # The search finds what is there: Terraform's own state holds the canaries in clear
    # (a few only in Go's JSON escapes, \u003c for "<", which the search does not try).
    assert len({leak.canary.name for leak in find_leaks(terraform_state, CANARIES)}) >= 30

    searched = sum(p.stat().st_size for p in files) + sum(len(t.encode()) for t in printed)
    figures = (
        f"{len(CANARIES)} canaries, {sum(len(named_forms(c.value)) for c in CANARIES)} forms, "
        f"{len(STACKS) + 5} paths, {len(files)} files + {len(printed)} outputs, "
        f"{searched} bytes searched, {len(leaks)} hits "
        f"(not searched: {len(terraform_state)} Terraform state files)"
    )
    record_property("leak_battery", figures)
    print(f"\nleak battery: {figures}")
    assert leaks == []
    # A canary with spaces that Terraform wrapped is in no single form the search tries:
    # its marker (found in no other canary, nor in anything the agent prints of its own)
    # must not be anywhere either.
    wrapped_markers = {c.marker for c in CANARIES if len(c.value.strip().split()) > 1}
    assert len(wrapped_markers) >= 5
    texts = [p.read_bytes().decode("utf-8", "replace") for p in files] + printed
    fragments = sorted({m for m in wrapped_markers for text in texts if m in text})
    assert fragments == []
