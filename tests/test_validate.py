"""`agent validate` catches offline what a pass would fail on: templates rendered for every
host (undefined variables, Jinja syntax), and stack `vars`/`secrets` a stack does not
declare. Real files, the real renderer and the real manifest loader; no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.config import ConfigValidationError, ManifestLimits, load_manifest
from agent.engine.validate import validate_repo
from providers.terraform.variables import declared_variables
from tests.support.infra import write_host_config

FLEET = """\
version: 1
units:
  - name: web
    fleet:
      hosts: {hosts}
      vars: {{workers: 4}}
      roles: [app]
roles:
  app:
    - template: /etc/app.conf
      source: templates/app.conf.j2
    - command: migrate
      run: "echo {{{{ host.name }}}} {{{{ workers }}}}"
      creates: /var/lib/app/migrated
"""
STATIC = (
    "{static: [{name: web1, address: 10.0.0.5},"
    " {name: web2, address: 10.0.0.6, vars: {port: 8080}}]}"
)


def fleet_repo(tmp_path: Path, template: str, hosts: str = STATIC, extra: str = "") -> Path:
    repo = tmp_path / "repo"
    (repo / "templates").mkdir(parents=True)
    (repo / "templates" / "app.conf.j2").write_text(template)
    (repo / "gitops.yaml").write_text(FLEET.format(hosts=hosts) + extra)
    return repo


def test_a_valid_fleet_renders_for_every_host(tmp_path: Path) -> None:
    repo = fleet_repo(tmp_path, "name={{ host.name }}\nworkers={{ workers }}\n")
    report = validate_repo(repo)
    assert report.ok, report.render()
    assert report.render().endswith("valid (1 unit: web)")  # not "1 units"


def test_an_undefined_variable_fails_naming_template_line_unit_and_host(tmp_path: Path) -> None:
    # web2 has `port` in its own vars; web1 has not: only web1 fails.
    repo = fleet_repo(tmp_path, "name={{ host.name }}\nport={{ port }}\n")
    report = validate_repo(repo)
    assert not report.ok
    assert report.errors == [
        "unit web, host web1: templates/app.conf.j2:2: 'port' is undefined"
        " (the template of gitops.yaml:10: roles.app[0])"
    ]
    assert report.render().endswith("invalid (1 error)")  # not "(1 errors)"


def test_a_jinja_syntax_error_fails_once_for_all_hosts(tmp_path: Path) -> None:
    repo = fleet_repo(tmp_path, "a\n{% if %}\nb\n{% endif %}\n")
    report = validate_repo(repo)
    assert len(report.errors) == 1, report.errors
    error = report.errors[0]
    assert error.startswith("unit web, hosts web1, web2: templates/app.conf.j2:2: ")
    assert "(the template of gitops.yaml:10: roles.app[0])" in error


def test_a_templated_command_line_is_rendered_too(tmp_path: Path) -> None:
    repo = fleet_repo(tmp_path, "ok\n")
    manifest = repo / "gitops.yaml"
    manifest.write_text(manifest.read_text().replace("{{ workers }}", "{{ nosuchvar }}"))
    report = validate_repo(repo)
    assert report.errors == [
        "unit web, hosts web1, web2: gitops.yaml:12: roles.app[1]: 'nosuchvar' is undefined"
    ]


def test_hosts_from_a_stack_are_placeholders_and_the_output_says_so(tmp_path: Path) -> None:
    hosts = "{from_stack: {unit: net, output: web_hosts}}"
    stack = "  - name: net\n    stack: stacks/net\n"
    repo = fleet_repo(tmp_path, "name={{ host.name }}\nport={{ port }}\n", hosts, "")
    manifest = repo / "gitops.yaml"
    manifest.write_text(manifest.read_text().replace("units:\n", "units:\n" + stack, 1))
    (repo / "stacks" / "net").mkdir(parents=True)
    (repo / "stacks" / "net" / "main.tf").write_text('output "web_hosts" { value = [] }\n')
    report = validate_repo(repo)
    # `port` may come from the hosts' vars in the stack output: a warning, not an error.
    assert report.ok, report.render()
    assert any("'port' is undefined" in w and "placeholders" in w for w in report.warnings)
    assert any("hosts come from output 'web_hosts' of stack unit 'net'" in n for n in report.notes)
    assert "placeholder host facts" in report.render()

    # A syntax error is an error whatever the hosts are.
    (repo / "templates" / "app.conf.j2").write_text("{% if %}\n")
    assert not validate_repo(repo).ok


def test_secrets_are_placeholders_and_never_read(tmp_path: Path) -> None:
    repo = fleet_repo(tmp_path, "password={{ secrets.db }}\n{{ secrets.other }}\n")
    manifest = repo / "gitops.yaml"
    roles = "      roles: [app]\n"
    secret = '    secrets: {db: "file:/nonexistent/db"}\n'
    manifest.write_text(manifest.read_text().replace(roles, roles + secret, 1))
    config = write_host_config(
        tmp_path / "agent.yaml",
        "file:///nowhere",
        tmp_path / "state",
        'secrets:\n  allowed: ["file:/nonexistent/"]\n',
    )
    report = validate_repo(repo, config_path=str(config))
    # `db` is declared (its value is not needed offline: the file does not exist); `other`
    # is not.
    assert report.errors == [
        "unit web, hosts web1, web2: templates/app.conf.j2:2: 'dict object' has no attribute"
        " 'other' (the template of gitops.yaml:11: roles.app[0])"
    ]


def test_the_cli_fails_on_an_undefined_variable(tmp_path: Path) -> None:
    repo = fleet_repo(tmp_path, "{{ nosuchvar }}\n")
    env = {k: v for k, v in os.environ.items() if k != "GITOPS_AGENT_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "validate", str(repo), "--json"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["valid"] is False
    assert "'nosuchvar' is undefined" in result["errors"][0]


# --- stack variables ------------------------------------------------------------------------


def stack_repo(tmp_path: Path, tf: str, unit: str, tf_json: str | None = None) -> Path:
    repo = tmp_path / "repo"
    (repo / "stacks" / "app").mkdir(parents=True)
    (repo / "stacks" / "app" / "main.tf").write_text(textwrap.dedent(tf))
    if tf_json is not None:
        (repo / "stacks" / "app" / "more.tf.json").write_text(tf_json)
    (repo / "gitops.yaml").write_text(
        "version: 1\nunits:\n  - name: app\n    stack: stacks/app\n" + unit
    )
    return repo


TF = """\
variable "region" {}
variable size {
  default = 1
}
# variable "commented" {}
locals {
  text = <<EOT
variable "in_heredoc" {}
EOT
  quoted = "variable \\"in_string\\" {}"
}
"""


def test_declared_variables_are_read_from_tf_and_tf_json(tmp_path: Path) -> None:
    json_text = '{"variable": {"from_json": {"default": 1}}}'
    repo = stack_repo(tmp_path, TF, "", json_text)
    assert declared_variables(repo / "stacks" / "app") == {"region", "size", "from_json"}
    (repo / "stacks" / "app" / "more.tf.json").write_text('{"variable": [{"a": {}}, {"b": {}}]}')
    assert declared_variables(repo / "stacks" / "app") == {"region", "size", "a", "b"}


def test_a_var_the_stack_does_not_declare_is_named_with_file_and_line(tmp_path: Path) -> None:
    unit = "    vars:\n      region: eu-west-1\n      extra: 1\n"
    repo = stack_repo(tmp_path, TF, unit)
    with pytest.raises(ConfigValidationError) as caught:
        load_manifest(repo, ManifestLimits())
    assert caught.value.errors == [
        "gitops.yaml:7: units[0].vars.extra: stack stacks/app declares no variable 'extra';"
        " declared: region, size"
    ]
    # What `agent validate` prints, the same line.
    report = validate_repo(repo)
    assert report.errors[0] == caught.value.errors[0]


def test_a_secret_the_stack_does_not_declare_is_named_too(tmp_path: Path) -> None:
    unit = '    secrets: {token: "file:/run/secrets/token"}\n'
    repo = stack_repo(tmp_path, TF, unit)
    limits = ManifestLimits(
        secret_prefixes=("file:/run/secrets/",), secret_backends=frozenset({"file"})
    )
    with pytest.raises(ConfigValidationError) as caught:
        load_manifest(repo, limits)
    assert caught.value.errors == [
        "gitops.yaml:5: units[0].secrets.token: stack stacks/app declares no variable"
        " 'token'; declared: region, size"
    ]


def test_declared_vars_pass(tmp_path: Path) -> None:
    repo = stack_repo(tmp_path, TF, "    vars: {region: eu-west-1, size: 3}\n")
    assert [u.name for u in load_manifest(repo, ManifestLimits()).units] == ["app"]
