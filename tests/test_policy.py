"""Apply modes, policy rules and change windows end to end, as a user runs them: the CLI in
direct mode (no daemon), a real repo pushed to a bare remote, the embedded Terraform."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.policy.windows import WEEKDAYS
from tests.support.infra import InfraRepo, write_host_config

DENY_PROTECTED = """\
policy:
  rules:
    - name: keep-protected
      expression: changes.exists(c, "delete" in c.actions && c.address.matches("\\\\.protected_"))
      message: protected resources are never destroyed
      effect: deny
    - name: count-changes
      expression: size(changes) > 0
      message: this plan changes something
      effect: warn
"""


def data_stack(names: list[str], value: str = "v") -> str:
    return "".join(
        f'resource "terraform_data" "{name}" {{\n  input = "{value}"\n}}\n' for name in names
    )


class World:
    def __init__(self, tmp: Path, extra: str = "") -> None:
        self.tmp = tmp
        self.repo = InfraRepo(tmp / "git")
        self.state = tmp / "state"
        self.config = self.host_config(extra)

    def host_config(self, extra: str, name: str = "agent.yaml") -> Path:
        return write_host_config(
            self.tmp / name,
            self.repo.url,
            self.state,
            f"control_socket: {self.tmp}/no.sock\n" + extra,
        )

    def push(self, names: list[str], unit: str = "", files: dict[str, str] | None = None) -> str:
        self.repo.write("stacks/data/main.tf", data_stack(names))
        self.repo.write(
            "gitops.yaml", f"version: 1\nunits:\n  - {{name: data, stack: stacks/data{unit}}}\n"
        )
        for path, text in (files or {}).items():
            self.repo.write(path, text)
        return self.repo.push(f"data: {', '.join(names)}")

    def agent(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "--config", str(config or self.config), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={k: v for k, v in os.environ.items() if k != "GITOPS_AGENT_CONFIG"},
        )

    def run_id(self, result: subprocess.CompletedProcess[str]) -> str:
        match = re.search(r"^run (r-\S+): ", result.stdout, re.M)
        assert match, result.stdout + result.stderr
        return match.group(1)


def test_a_deny_rule_fails_the_unit_and_applies_nothing(tmp_path: Path) -> None:
    world = World(tmp_path, DENY_PROTECTED + "  destroy: allow\n")
    world.push(["protected_db", "web"])
    first = world.agent("reconcile", "--now")
    assert first.returncode == 0, first.stdout + first.stderr
    # A warning rule is recorded in the unit's outcome line, and does not stop the apply.
    assert "data: applied (+2 ~0 -0); policy rule count-changes (agent.yaml:" in first.stdout, (
        first.stdout
    )

    world.push(["web"])
    denied = world.agent("reconcile", "--now")

    assert denied.returncode != 0
    assert "data: failed: denied by policy rule keep-protected (agent.yaml:" in denied.stdout
    assert "protected resources are never destroyed" in denied.stdout
    logs = world.agent("logs", "data").stdout
    # The rules' results follow the plan in `agent logs`.
    assert logs.index("==> plan.txt <==") < logs.index("==> policy.txt <==")
    assert "  deny  keep-protected (agent.yaml:" in logs
    assert "  warn  count-changes (agent.yaml:" in logs
    assert "apply.txt" not in logs
    status = world.agent("status").stdout
    assert "failed/deny" in status
    # Nothing was destroyed: the next pass (the rule gone from the host config) finds it.
    allow = world.host_config("policy: {destroy: allow}\n", "allow.yaml")
    applied = world.agent("reconcile", "--now", config=allow)
    assert "data: applied (+0 ~0 -1)" in applied.stdout, applied.stdout


def test_apply_approve_holds_every_plan_and_approve_applies_it(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.push(["a"], unit=", apply: approve")
    held = world.agent("reconcile", "--now")
    assert held.returncode == 0, held.stderr
    assert "data: held for approval (+1 ~0 -0)" in held.stdout
    run = world.run_id(held)
    status = world.agent("logs", "data").stdout
    assert "# the unit's apply policy is approve: every plan waits for `agent approve`" in status

    approved = world.agent("approve", run, "--unit", "data")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert "data: applied (+1 ~0 -0)" in approved.stdout
    assert "data: no changes" in world.agent("reconcile", "--now").stdout


def test_a_manifest_cannot_loosen_the_host_ceiling(tmp_path: Path) -> None:
    world = World(tmp_path, "policy: {apply: approve-destroy}\n")
    world.push(["a"], unit=", apply: auto")
    refused = world.agent("reconcile", "--now")
    assert refused.returncode != 0
    assert (
        "gitops.yaml:3: units[0].apply: expected one of approve-destroy, approve (the host"
        " config's policy.apply is approve-destroy: a unit may only be stricter); got 'auto'"
    ) in refused.stdout + refused.stderr


def test_outside_the_window_plans_wait_and_an_override_is_recorded(tmp_path: Path) -> None:
    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    day = WEEKDAYS[tomorrow.weekday()]
    world = World(tmp_path, f"windows:\n  allow:\n    - days: [{day}]\n")
    world.push(["a"])
    held = world.agent("reconcile", "--now")
    assert held.returncode == 0, held.stderr
    opens = f"{tomorrow:%a %Y-%m-%d} 00:00 UTC"
    assert "data: held for approval (+1 ~0 -0)" in held.stdout
    assert f"outside change window (opens {opens})" in world.agent("logs", "data").stdout

    no_reason = world.agent("reconcile", "--now", "--override-window")
    assert no_reason.returncode != 0
    assert "--override-window needs --reason TEXT" in no_reason.stderr

    forced = world.agent("reconcile", "--now", "--override-window", "--reason", "INC-42 hotfix")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "data: applied (+1 ~0 -0); outside change window" in forced.stdout
    assert "overridden by " in forced.stdout and ": INC-42 hotfix" in forced.stdout
    history = world.agent("history", "--json").stdout
    assert "change window override asked by " in history and "INC-42 hotfix" in history


def test_repository_rules_add_to_the_host_rules(tmp_path: Path) -> None:
    world = World(tmp_path, "policy:\n  repo_rules: policy/rules.yaml\n")
    rules = (
        "rules:\n"
        "  - name: small-passes\n"
        "    expression: size(changes) > 2\n"
        "    message: more than 2 changes\n"
        "    effect: hold\n"
    )
    world.push(["a", "b", "c"], files={"policy/rules.yaml": rules})
    held = world.agent("reconcile", "--now")
    assert "data: held for approval (+3 ~0 -0)" in held.stdout, held.stdout + held.stderr

    # An invalid rules file rejects the revision, as an invalid manifest does.
    world.push(["a"], files={"policy/rules.yaml": rules.replace("size(changes) > 2", "size(")})
    rejected = world.agent("reconcile", "--now")
    assert "policy/rules.yaml:3: rules[0].expression: expected a CEL expression" in (
        rejected.stdout + rejected.stderr
    )


def test_a_window_override_through_the_daemon_names_the_peer(tmp_path: Path) -> None:
    import pwd

    from tests.test_daemon import AgentProcess

    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    windows = f"windows:\n  allow:\n    - days: [{WEEKDAYS[tomorrow.weekday()]}]\n"
    agent = AgentProcess(tmp_path, extra=windows)
    agent.repo.write("stacks/data/main.tf", data_stack(["a"]))
    agent.repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: data, stack: stacks/data}\n")
    agent.repo.push("seed")
    try:
        agent.start()  # its first pass holds the plan: the window is closed
        assert "held/hold" in agent.cli("status").stdout

        forced = agent.cli("reconcile", "--now", "--override-window", "--reason", "INC-7")

        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert "data: applied (+1 ~0 -0); outside change window" in forced.stdout
        me = pwd.getpwuid(os.getuid()).pw_name
        (run,) = agent.finished_runs("cli")
        # Who asked is the kernel's word for the socket's peer, not a name the client sent.
        assert run.error == f"change window override asked by {me}: INC-7"
        assert f"(change window override by {me}: INC-7)" in agent.new_log()
    finally:
        agent.kill()


def test_a_fleet_outside_the_window_changes_nothing_until_overridden(tmp_path: Path) -> None:
    from agent.config import load_host_config
    from agent.engine.reconcile import PassRequest, Reconciler
    from agent.state.store import UnitStatus

    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    target = tmp_path / "made-by-the-fleet"
    repo = InfraRepo(tmp_path / "git")
    repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - name: app\n    fleet:\n"
        "      hosts: {static: [{name: bastion, address: local}]}\n"
        f"      resources:\n        - directory: {target}\n",
    )
    repo.push("a fleet")
    config = write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        tmp_path / "state",
        f"hosts: {{allow_local: true, python: {sys.executable}}}\n"
        f"windows:\n  allow:\n    - days: [{WEEKDAYS[tomorrow.weekday()]}]\n",
    )

    runs: list[str] = []

    def run(request: PassRequest) -> object:
        reconciler = Reconciler(load_host_config(config))
        try:
            result = reconciler.run_pass(request)
            runs.append(result.run_id)
            return result.outcomes["app"]
        finally:
            reconciler.close()

    held = run(PassRequest(trigger="test"))
    assert held.status is UnitStatus.HELD  # type: ignore[attr-defined]
    assert f"outside change window (opens {tomorrow:%a %Y-%m-%d} 00:00 UTC)" == held.error  # type: ignore[attr-defined]
    assert not target.exists()
    # What the daemon notifies: the changes wait for the window; there is nothing to approve.
    from agent.service.notify import unit_events

    (note,) = unit_events("app", held, run_id="r-1", revision="abc")  # type: ignore[arg-type]
    opens = f"opens {tomorrow:%a %Y-%m-%d} 00:00 UTC"
    assert note.kind == "hold"
    assert note.summary == f"changes wait: outside change window ({opens})"
    assert "they apply in the first pass after the window opens" in note.detail
    assert "approve" not in note.summary + note.detail
    # And `agent approve` says why it has nothing to apply.
    from agent.engine.reconcile import ApprovalRefused

    reconciler = Reconciler(load_host_config(config))
    try:
        with pytest.raises(ApprovalRefused, match="waits for its change window") as refused:
            reconciler.approve(runs[0])
    finally:
        reconciler.close()
    assert "--override-window" in (refused.value.hint or "")

    forced = run(PassRequest(trigger="test", override_window="by tester: INC-9"))
    assert forced.status is UnitStatus.OK, forced.error  # type: ignore[attr-defined]
    assert target.is_dir()
    assert "overridden by tester: INC-9" in forced.error  # type: ignore[attr-defined]


def test_rules_never_see_a_secret_value(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "token").write_text("s3cr3t-4eb30b69-zebra\n")
    (secrets_dir / "token").chmod(0o600)
    # A rule written to catch the value: it would deny if rules saw the plan unredacted.
    probe = (
        "policy:\n  destroy: allow\n  rules:\n"
        "    - name: probe\n"
        '      expression: changes.exists(c, string(c.after.input).contains("4eb30b69"))\n'
        "      message: the rule saw the secret\n"
        "      effect: deny\n"
        f"secrets:\n  allowed: [file:{secrets_dir}/]\n"
    )
    world = World(tmp_path, probe)
    world.repo.write(
        "stacks/data/main.tf",
        'variable "token" {\n  type = string\n}\n'
        'resource "terraform_data" "t" {\n  input = var.token\n}\n',
    )
    world.repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - name: data\n    stack: stacks/data\n"
        f"    secrets: {{token: 'file:{secrets_dir}/token'}}\n",
    )
    world.repo.push("a secret input")

    result = world.agent("reconcile", "--now")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "data: applied (+1 ~0 -0)" in result.stdout
    logs = world.agent("logs", "data").stdout
    assert "pass  probe" in logs
    assert "4eb30b69" not in logs
