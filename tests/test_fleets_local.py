"""Fleet units in real passes on this machine (`address: local`): the variables a host's
templates and commands see, read from a real stack's outputs (the embedded Terraform).

No mocks: a real Git remote, a real Terraform stack whose output feeds the fleet, the
host engine's program run locally, real files checked afterwards.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.store import UnitStatus
from tests.support.infra import InfraRepo, write_host_config


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict]:
    app_dir = tmp_path / "app"  # what the stack says; the fleet's own default is wrong
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/base/main.tf", f'output "app_dir" {{\n  value = "{app_dir}"\n}}\n')
    repo.write("templates/app.j2", "dir={{ app_dir }}\nlog={{ log_name }}\n")
    config = write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        tmp_path / "state",
        f"hosts: {{allow_local: true, python: {sys.executable}}}\n",
    )
    yield {"repo": repo, "config": config, "app_dir": app_dir}


def manifest(app_dir: Path, resources: str) -> str:
    return f"""\
version: 1
units:
  - name: base
    stack: stacks/base
  - name: app
    vars: {{app_dir: {{from_stack: {{unit: base, output: app_dir}}}}}}
    fleet:
      hosts: {{static: [{{name: bastion, address: local}}]}}
      vars: {{app_dir: /nonexistent/fleet-default, log_name: app.log}}
      resources:
        - directory: {app_dir}
{resources}"""


def run(world: dict) -> dict:
    reconciler = Reconciler(load_host_config(world["config"]))
    try:
        return reconciler.run_pass(PassRequest(trigger="test")).outcomes
    finally:
        reconciler.close()


def test_a_unit_var_from_a_stack_output_reaches_the_fleets_templates(world: dict) -> None:
    app_dir = world["app_dir"]
    resources = f"""\
        - template: {app_dir}/app.conf
          source: templates/app.j2
"""
    world["repo"].write("gitops.yaml", manifest(app_dir, resources))
    world["repo"].push("app from base")

    outcomes = run(world)
    assert outcomes["base"].status is UnitStatus.OK, outcomes["base"].error
    assert outcomes["app"].status is UnitStatus.OK, outcomes["app"].error
    # The unit's var (the stack output) wins over the fleet's default, as a literal would.
    assert (app_dir / "app.conf").read_text() == f"dir={app_dir}\nlog=app.log\n"


def test_command_guards_and_cwd_are_templates_like_the_command(world: dict) -> None:
    app_dir = world["app_dir"]
    # Each command appends a line to its own file; its guard says "done" once the file is
    # there. Rendered guards run each exactly once; unrendered ones never match (or fail).
    resources = """\
        - command: creates
          run: "echo ran >> {{ log_name }}"
          cwd: "{{ app_dir }}"
          creates: "{{ app_dir }}/{{ log_name }}"
        - command: unless
          run: "echo ran >> unless.txt"
          cwd: "{{ app_dir }}"
          unless: "test -e {{ app_dir }}/unless.txt"
        - command: onlyif
          run: "echo ran >> onlyif.txt"
          cwd: "{{ app_dir }}"
          onlyif: "test ! -e {{ app_dir }}/onlyif.txt"
"""
    world["repo"].write("gitops.yaml", manifest(app_dir, resources))
    world["repo"].push("guarded commands")
    app_dir.mkdir()  # guards are asked before the apply: the cwd exists from the start

    for _ in range(2):  # the second pass finds every guard satisfied
        outcomes = run(world)
        assert outcomes["app"].status is UnitStatus.OK, outcomes["app"].error
    for name in ("app.log", "unless.txt", "onlyif.txt"):
        assert (app_dir / name).read_text() == "ran\n", name


def test_each_host_is_recorded_as_soon_as_it_is_converged(tmp_path: Path) -> None:
    # One worker: host a, then host b. b's command looks for a's records: a pass keeps no
    # host's result in memory until the whole fleet is done.
    state = tmp_path / "state"
    repo = InfraRepo(tmp_path / "git")
    seen = f"test -f {state}/units/app/hosts/a.json && test -f {state}/hosts/a.json"
    repo.write(
        "gitops.yaml",
        f"""\
version: 1
units:
  - name: app
    fleet:
      parallelism: 1
      hosts:
        static:
          - {{name: a, address: local}}
          - {{name: b, address: local, roles: [late]}}
roles:
  late:
    - command: a-was-recorded
      run: "touch {tmp_path}/b-ran"
      onlyif: "{seen}"
""",
    )
    repo.push("two hosts")
    config = write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        state,
        f"hosts: {{allow_local: true, python: {sys.executable}}}\n",
    )
    outcomes = run({"config": config})
    assert outcomes["app"].status is UnitStatus.OK, outcomes["app"].error
    assert (tmp_path / "b-ran").exists()


def test_hosts_txt_is_written_as_hosts_finish_and_kept_in_fleet_order(tmp_path: Path) -> None:
    # Two workers. Host a waits (bounded) until host b's part of hosts.txt is on disk, so b
    # finishes first: its diff was written as it finished, not held until the fleet was
    # done; the finished hosts.txt still lists the hosts in the manifest's order.
    state = tmp_path / "state"
    repo = InfraRepo(tmp_path / "git")
    b_written = f"grep -qs '^== b: ' {state}/runs/*/app/hosts.txt.partial"
    wait_for_b = f"for i in $(seq 300); do {b_written} && exit 0; sleep 0.1; done; exit 1"
    repo.write(
        "gitops.yaml",
        f"""\
version: 1
units:
  - name: app
    fleet:
      parallelism: 2
      hosts:
        static:
          - {{name: a, address: local, roles: [waits]}}
          - {{name: b, address: local, roles: [quick]}}
roles:
  waits:
    - command: after-b
      run: {json.dumps(wait_for_b)}
      creates: {tmp_path}/a-done
    - file: {tmp_path}/a-done
      content: "a\\n"
  quick:
    - file: {tmp_path}/b-done
      content: "b\\n"
""",
    )
    repo.push("two hosts")
    config = write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        state,
        f"hosts: {{allow_local: true, python: {sys.executable}}}\n",
    )
    reconciler = Reconciler(load_host_config(config))
    try:
        result = reconciler.run_pass(PassRequest(trigger="test"))
    finally:
        reconciler.close()
    assert result.outcomes["app"].status is UnitStatus.OK, result.outcomes["app"].error
    run_dir = state / "runs" / result.run_id / "app"
    text = (run_dir / "hosts.txt").read_text()
    headers = [line.split(":")[0] for line in text.splitlines() if line.startswith("== ")]
    assert headers == ["== a", "== b"], text
    assert "command:after-b: changed" in text and f"file:{tmp_path}/b-done: changed" in text
    assert not (run_dir / "hosts.txt.partial").exists()
    assert oct((run_dir / "hosts.txt").stat().st_mode & 0o777) == "0o600"
