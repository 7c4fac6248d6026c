"""Secrets never reach a command line (issue 10.3): fleet commands get them through `env:`
only (validation refuses `{{ secrets.X }}` in a command line), and `agent validate` warns
when a stack writes a secret variable into a `local-exec` command.

The end-to-end test runs a real pass on this machine and reads every process's
/proc/PID/cmdline while the command runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.engine.validate import validate_repo
from providers.hosts.templates import reads_variable
from providers.terraform.localexec import scan
from tests.support.infra import InfraRepo, write_host_config

SECRET = "s3cr3t-7d1f0a2b-in-env-only"


@pytest.mark.parametrize(
    ("text", "reads"),
    [
        ("curl -u admin:{{ secrets.token }} x", True),
        ("{{ secrets['token'] | upper }}", True),
        ("{% set t = secrets.token %}echo {{ t }}", True),
        ("{% for k, v in secrets.items() %}{{ v }}{% endfor %}", True),
        ("{{ (secrets | list)[0] }}", True),
        ("echo {{ secrets.token", True),  # unparsable: counted when it names secrets
        ('curl -u "admin:$TOKEN" x', False),
        ("echo {{ host.name }} secrets", False),
        ("{% set secrets = 'x' %}{{ secrets }}", False),  # not the unit's secrets
        ("{% raw %}{{ secrets.token }}{% endraw %}", False),  # literal text
    ],
)
def test_reads_variable_sees_every_use_of_secrets(text: str, reads: bool) -> None:
    assert reads_variable(text, "secrets") is reads


LOCAL_EXEC_TF = """\
variable "db_password" {
  type      = string
  sensitive = true
}
resource "terraform_data" "x" {
  # provisioner "local-exec" { command = "echo ${var.db_password}" }
  provisioner "local-exec" {
    command     = "psql -c 'ALTER USER app PASSWORD ''${var.db_password}''' # var.nope"
    environment = { PW = var.db_password }
  }
  provisioner "local-exec" {
    command = <<-EOT
      echo "var.db_password is only text here"
      curl -u admin:${ var.api_token } https://x/{y}
    EOT
  }
  provisioner "local-exec" {
    command = join(" ", ["echo", var.bare,
      var.second])
  }
  provisioner "local-exec" {
    command = "echo \\"$PW\\" ${lookup({ a = "}" }, "a")} var.literal"
  }
  provisioner "local-exec" {
    environment = { command = var.db_password }
    command     = "true"
  }
}
"""


def test_the_local_exec_scan_finds_variables_in_commands_only() -> None:
    assert scan(LOCAL_EXEC_TF) == [
        (8, "db_password"),
        (14, "api_token"),
        (18, "bare"),
        (19, "second"),
    ]


def test_validate_warns_when_a_secret_flows_into_a_local_exec_command(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "stacks" / "db").mkdir(parents=True)
    (repo / "stacks" / "db" / "main.tf").write_text(LOCAL_EXEC_TF)
    (repo / "stacks" / "db" / "vars.tf").write_text(
        'variable "api_token" {\n  type = string\n}\n'
        'variable "bare" {\n  type = string\n}\n'
        'variable "second" {\n  type = string\n}\n'
    )
    secrets = tmp_path / "secrets"
    (repo / "gitops.yaml").write_text(
        textwrap.dedent(
            f"""\
            version: 1
            units:
              - name: db
                stack: stacks/db
                vars: {{bare: "not a secret", second: "nor this"}}
                secrets:
                  db_password: "file:{secrets}/db"
                  api_token: "file:{secrets}/api"
            """
        )
    )
    config = write_host_config(
        tmp_path / "agent.yaml",
        "file:///nowhere",
        tmp_path / "state",
        f"secrets: {{allowed: ['file:{secrets}/']}}\n",
    )
    report = validate_repo(repo, config_path=str(config))
    assert report.ok, report.render()
    mine = [w for w in report.warnings if "local-exec" in w]
    assert [w.split(" holds")[0] for w in mine] == [
        "unit db: stacks/db/main.tf:8: warning: var.db_password",
        "unit db: stacks/db/main.tf:14: warning: var.api_token",
    ]
    assert f"(file:{secrets}/db)" in mine[0]
    assert "environment = { NAME = var.db_password }" in mine[0]


def _agent(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GITOPS_AGENT_CONFIG": str(config)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )


def test_a_secret_reaches_a_fleet_command_by_its_environment_and_no_command_line(
    tmp_path: Path,
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "token").write_text(SECRET)
    (secrets / "token").chmod(0o600)
    out = tmp_path / "out"
    out.mkdir()
    # The command records what it got, then every command line of every process it can
    # see, its own shell and the engine that started it included (`tr` reads files, so no
    # argument of this script holds the secret).
    script = (
        'printf %s "$TOKEN" > got;'
        " for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done > cmdlines 2>/dev/null;"
        " true"
    )

    def manifest(run: str) -> str:
        return f"""\
        version: 1
        units:
          - name: app
            secrets: {{token: "file:{secrets}/token"}}
            fleet:
              hosts: {{static: [{{name: bastion, address: local}}]}}
              resources:
                - command: register
                  run: {json.dumps(run)}
                  cwd: {out}
                  env: {{TOKEN: "{{{{ secrets.token }}}}"}}
        """

    repo = InfraRepo(tmp_path / "git")
    repo.write("gitops.yaml", manifest(script))
    repo.push("a command that gets a secret")
    state = tmp_path / "state"
    config = write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        state,
        f"secrets: {{allowed: ['file:{secrets}/']}}\n"
        f"hosts: {{allow_local: true, python: {sys.executable}}}\n",
    )
    result = _agent(config, "reconcile", "--now")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "got").read_text() == SECRET  # it did reach the command
    cmdlines = (out / "cmdlines").read_text()
    assert '/bin/sh -c printf %s "$TOKEN"' in cmdlines  # the scan saw the command itself
    assert SECRET not in cmdlines

    # The same secret written into `run:` is refused at validation, with file:line and a
    # hint; the last good revision stays in force.
    repo.write("gitops.yaml", manifest(script.replace('"$TOKEN"', "{{ secrets.token }}")))
    repo.push("the secret in the command line")
    result = _agent(config, "reconcile", "--now")
    seen = result.stdout + result.stderr
    assert "gitops.yaml:9: units[0].fleet.resources[0].run: a secret must not be part" in seen
    assert "pass it in env:" in seen
    assert SECRET not in seen


def test_a_command_line_holding_a_secret_value_another_way_is_refused_before_it_runs(
    tmp_path: Path,
) -> None:
    """Defence in depth: a var that happens to equal a secret still never reaches argv."""
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "token").write_text(SECRET)
    (secrets / "token").chmod(0o600)
    marker = tmp_path / "ran"
    repo = InfraRepo(tmp_path / "git")
    repo.write(
        "gitops.yaml",
        f"""\
        version: 1
        units:
          - name: app
            secrets: {{token: "file:{secrets}/token"}}
            vars: {{copy: "{SECRET}"}}
            fleet:
              hosts: {{static: [{{name: bastion, address: local}}]}}
              resources:
                - command: sneaky
                  run: "echo {{{{ copy }}}} > {marker}"
        """,
    )
    repo.push("a var equal to a secret")
    config = write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        tmp_path / "state",
        f"secrets: {{allowed: ['file:{secrets}/']}}\n"
        f"hosts: {{allow_local: true, python: {sys.executable}}}\n",
    )
    result = _agent(config, "reconcile", "--now")
    assert result.returncode != 0
    assert not marker.exists()
    seen = result.stdout + result.stderr
    assert "gitops.yaml:9: units[0].fleet.resources[0].run: the command line would hold" in seen
    assert SECRET not in seen
