"""What a pass records, and what "moved" means (issues 11 and 13), end to end.

Real Git repos, the embedded Terraform with our `localfile` provider (whose resources
drift when a file is edited by hand), a local fleet, file secrets, the real run store.
No mocks. A unit "moved" when one of its own inputs changed since it last converged
(agent.units.fingerprint); a commit elsewhere in the repository moves nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agent.cli.quickstart import lay_out
from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, PassResult, Reconciler
from agent.service.daemon import Daemon
from agent.service.notify import unit_events
from agent.service.triggers import Batch
from agent.state.store import RunStore, UnitStatus
from tests.support.infra import InfraRepo, embedded_terraform, git, write_host_config
from tests.tfhelpers import LOCALFILE_REQUIRED

PROVIDER = LOCALFILE_REQUIRED

# base: a hand-editable file, a local module (which has a module of its own), and
# variables for every kind of input (used or not: moving one is what counts).
BASE_TF = (
    PROVIDER
    + """
variable "dir" { type = string }
variable "label" { type = string }
variable "note" {
  type    = string
  default = ""
}
variable "token" {
  type      = string
  sensitive = true
}
resource "localfile_file" "motd" {
  path    = "${var.dir}/motd.txt"
  content = "hello\\n"
}
module "common" { source = "../../modules/common" }
"""
)
COMMON_TF = 'module "inner" { source = "./inner" }\n'
INNER_TF = 'output "v" { value = "inner" }\n'
SRC_TF = """
variable "label" { type = string }
output "label" { value = var.label }
"""
OTHER_TF = 'variable "n" { type = number }\nresource "terraform_data" "o" { input = var.n }\n'

TOKEN = "rotating-token-6d2c0b-one"


class StackWorld:
    """src -> base (hand-edited), and an unrelated `other`; a file secret for base."""

    def __init__(self, tmp: Path, drift: str = "report") -> None:
        self.tmp = tmp
        self.drift = drift
        self.repo = InfraRepo(tmp / "git")
        self.managed = tmp / "managed"
        self.state = tmp / "state"
        self.secrets = tmp / "secrets"
        self.secrets.mkdir(mode=0o700)
        self.write_secret(TOKEN)
        self.binary = embedded_terraform()
        self.write_config()

    def write_config(self) -> None:
        write_host_config(
            self.tmp / "agent.yaml",
            self.repo.url,
            self.state,
            f'secrets: {{allowed: ["file:{self.secrets}/"]}}\n',
        )
        text = (self.tmp / "agent.yaml").read_text()
        (self.tmp / "agent.yaml").write_text(
            text.replace(f"binary: {embedded_terraform()}", f"binary: {self.binary}")
        )

    def write_secret(self, value: str) -> None:
        path = self.secrets / "token"
        path.write_text(value)
        path.chmod(0o600)

    def manifest(
        self, *, label: str = "one", note: str = "", other: int = 1, extra: str = ""
    ) -> str:
        return f"""\
            version: 1
            units:
            {extra}
              - name: src
                stack: stacks/src
                vars: {{label: {label}}}
              - name: base
                stack: stacks/base
                drift: {self.drift}
                vars:
                  dir: "{self.managed}"
                  label: {{from_stack: {{unit: src, output: label}}}}
                  note: "{note}"
                secrets: {{token: "file:{self.secrets}/token"}}
              - name: other
                stack: stacks/other
                vars: {{n: {other}}}
            """

    def seed(self) -> None:
        self.repo.write("stacks/base/main.tf", BASE_TF)
        self.repo.write("modules/common/main.tf", COMMON_TF)
        self.repo.write("modules/common/inner/main.tf", INNER_TF)
        self.repo.write("stacks/src/main.tf", SRC_TF)
        self.repo.write("stacks/other/main.tf", OTHER_TF)
        self.repo.write("gitops.yaml", self.manifest())
        self.repo.push("seed")

    def reconcile(self, **kwargs: Any) -> PassResult:
        reconciler = Reconciler(load_host_config(self.tmp / "agent.yaml"))
        try:
            return reconciler.run_pass(PassRequest(trigger="test", **kwargs))
        finally:
            reconciler.close()

    def store(self) -> RunStore:
        return RunStore(self.state)

    @property
    def motd(self) -> Path:
        return self.managed / "motd.txt"

    def converge_and_edit(self) -> None:
        """Converge, then edit base's file by hand (drift)."""
        self.seed()
        first = self.reconcile()
        assert first.ok, first.error
        self.motd.write_text("edited by hand\n")


def unrelated_commit(world: StackWorld) -> None:
    """A commit that touches no input of base: a note, another unit's vars, and a unit
    added above it (base's entry moves down the file, but does not change)."""
    world.repo.write("NOTES.md", "a note\n")
    world.repo.write("stacks/new/main.tf", OTHER_TF)
    world.repo.write(
        "gitops.yaml",
        world.manifest(other=2, extra="  - {name: new, stack: stacks/new, vars: {n: 3}}"),
    )
    world.repo.push("unrelated")


# --- issue 11: a commit elsewhere leaves a unit's drift alone -------------------------------


@pytest.mark.parametrize("drift", ["report", "ignore"])
def test_an_unrelated_commit_leaves_a_stacks_drift_alone(tmp_path: Path, drift: str) -> None:
    world = StackWorld(tmp_path, drift)
    world.converge_and_edit()
    unrelated_commit(world)

    result = world.reconcile()

    assert result.ok, result.error
    assert world.motd.read_text() == "edited by hand\n"
    base = result.outcomes["base"]
    assert base.moved == ()
    if drift == "report":
        assert base.decision == "report" and base.drift is True
        state = world.store().unit_state("base")
        assert state is not None and state.drift is True
    else:
        assert base.decision == "skip"  # not even planned
    assert result.outcomes["other"].decision == "apply"


def _touch_stack(world: StackWorld) -> None:
    world.repo.write("stacks/base/notes.tf", "# a comment is a change to the stack\n")


def _touch_module(world: StackWorld) -> None:
    # The module of base's module: found transitively.
    world.repo.write("modules/common/inner/main.tf", INNER_TF + "# touched\n")


def _touch_manifest(world: StackWorld) -> None:
    world.repo.write("gitops.yaml", world.manifest(note="a new note"))


def _touch_upstream(world: StackWorld) -> None:
    world.repo.write("gitops.yaml", world.manifest(label="two"))  # src's output changes


def _touch_secret(world: StackWorld) -> None:
    world.write_secret("rotating-token-6d2c0b-two")  # rotated at the source: no commit


def _touch_terraform(world: StackWorld) -> None:
    link = world.tmp / "bin" / "terraform-next"
    link.parent.mkdir()
    link.symlink_to(embedded_terraform())
    world.binary = str(link)
    world.write_config()


KINDS = {
    "stack": _touch_stack,
    "module": _touch_module,
    "manifest": _touch_manifest,
    "upstream": _touch_upstream,
    "secrets": _touch_secret,
    "terraform": _touch_terraform,
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_of_stack_input_counts_as_moved(tmp_path: Path, kind: str) -> None:
    world = StackWorld(tmp_path, "report")
    world.converge_and_edit()
    KINDS[kind](world)
    world.repo.push(f"touch {kind}")

    result = world.reconcile()

    assert result.ok, result.error
    base = result.outcomes["base"]
    part = "stack" if kind == "module" else kind
    assert part in base.moved, base.moved
    # The change applies and, since Terraform cannot apply half a plan, the drift
    # revert with it: recorded as such for the operator of a `report` unit.
    assert base.decision == "apply"
    assert base.drift is True and base.drift_overwritten is True
    assert world.motd.read_text() == "hello\n"
    row = next(r for r in world.store().unit_runs(result.run_id) if r.unit == "base")
    assert row.drift_overwritten is True and part in (row.moved or "")
    # The fingerprint keeps no secret: only keyed hashes.
    state = world.store().unit_state("base")
    assert state is not None and state.fingerprint and "rotating-token" not in state.fingerprint


def test_ignore_units_are_planned_only_when_their_inputs_move(tmp_path: Path) -> None:
    world = StackWorld(tmp_path, "ignore")
    world.converge_and_edit()
    _touch_manifest(world)
    world.repo.push("base: a note")

    result = world.reconcile()

    assert result.outcomes["base"].decision == "apply"
    assert result.outcomes["base"].drift_overwritten is True
    assert world.motd.read_text() == "hello\n"


def test_the_quickstart_reproduction_leaves_the_hand_edit_and_reports_it(
    tmp_path: Path,
) -> None:
    config = lay_out(tmp_path / "qs")
    infra = tmp_path / "qs" / "infra"
    manifest = infra / "gitops.yaml"
    text = manifest.read_text()
    assert "  drift: revert " in text
    manifest.write_text(
        "\n".join(
            "  drift: report" if line.startswith("  drift: revert ") else line
            for line in text.splitlines()
        )
        + "\n"
    )
    git(infra, "commit", "-qam", "drift: report")
    git(infra, "push", "-q")

    def reconcile() -> PassResult:
        reconciler = Reconciler(load_host_config(config))
        try:
            return reconciler.run_pass(PassRequest(trigger="test"))
        finally:
            reconciler.close()

    assert reconcile().ok
    motd = tmp_path / "qs" / "managed" / "motd.txt"
    with motd.open("a") as handle:
        handle.write("edited by hand\n")
    edited = motd.read_text()
    assert reconcile().outcomes["base"].decision == "report"
    (infra / "NOTES.md").write_text("note\n")
    git(infra, "add", "-A")
    git(infra, "commit", "-qm", "unrelated: a note")
    git(infra, "push", "-q")

    result = reconcile()

    assert result.outcomes["base"].decision == "report", result.outcomes["base"]
    assert result.outcomes["base"].drift is True
    assert motd.read_text() == edited


# --- fleets -------------------------------------------------------------------------------


class FleetWorld:
    """A fleet of this machine (address `local`) with a role, a template, a source file,
    a handler and a file secret."""

    def __init__(self, tmp: Path, drift: str = "report") -> None:
        self.tmp = tmp
        self.drift = drift
        self.repo = InfraRepo(tmp / "git")
        self.host = tmp / "host"
        self.state = tmp / "state"
        self.secrets = tmp / "secrets"
        self.secrets.mkdir(mode=0o700)
        self.write_secret("fleet-token-one")
        import sys

        write_host_config(
            tmp / "agent.yaml",
            self.repo.url,
            self.state,
            f"""\
            secrets: {{allowed: ["file:{self.secrets}/"]}}
            hosts: {{allow_local: true, python: {sys.executable}}}
            """,
        )

    def write_secret(self, value: str) -> None:
        path = self.secrets / "token"
        path.write_text(value)
        path.chmod(0o600)

    def manifest(
        self, *, banner: str = "banner", workers: int = 4, action: str = "reload", extra: str = ""
    ) -> str:
        return f"""\
            version: 1
            units:
            {extra}
              - name: web
                drift: {self.drift}
                secrets: {{token: "file:{self.secrets}/token"}}
                fleet:
                  hosts:
                    static:
                      - {{name: here, address: local, vars: {{workers: {workers}}}}}
                  roles: [app]
            roles:
              app:
                - directory: "{self.host}"
                  mode: "0755"
                - file: "{self.host}/motd"
                  content: "managed\\n"
                - file: "{self.host}/banner"
                  content: "{banner}\\n"
                - template: "{self.host}/app.conf"
                  source: templates/app.conf.j2
                - file: "{self.host}/logo"
                  source: files/logo.txt
            handlers:
              restart app: {{service: app, action: {action}}}
            """

    def seed(self) -> None:
        self.repo.write("templates/app.conf.j2", "name = {{ host.name }}\n")
        self.repo.write("files/logo.txt", "logo\n")
        self.repo.write("gitops.yaml", self.manifest())
        self.repo.push("seed")

    def reconcile(self, **kwargs: Any) -> PassResult:
        reconciler = Reconciler(load_host_config(self.tmp / "agent.yaml"))
        try:
            return reconciler.run_pass(PassRequest(trigger="test", **kwargs))
        finally:
            reconciler.close()

    def converge_and_edit(self) -> None:
        self.seed()
        first = self.reconcile()
        assert first.ok, first.error
        (self.host / "motd").write_text("edited by hand\n")


@pytest.mark.parametrize("drift", ["report", "ignore"])
def test_an_unrelated_commit_leaves_a_fleets_drift_alone(tmp_path: Path, drift: str) -> None:
    world = FleetWorld(tmp_path, drift)
    world.converge_and_edit()
    world.repo.write("NOTES.md", "a note\n")
    world.repo.write("stacks/new/main.tf", OTHER_TF)
    world.repo.write(
        "gitops.yaml", world.manifest(extra="  - {name: new, stack: stacks/new, vars: {n: 3}}")
    )
    world.repo.push("unrelated")

    result = world.reconcile()

    assert result.ok, result.error
    assert (world.host / "motd").read_text() == "edited by hand\n"
    web = result.outcomes["web"]
    assert web.moved == ()
    assert web.decision == ("report" if drift == "report" else "skip")


def _fleet_role(world: FleetWorld) -> None:
    world.repo.write("gitops.yaml", world.manifest(banner="new banner"))


def _fleet_template(world: FleetWorld) -> None:
    world.repo.write("templates/app.conf.j2", "name = {{ host.name }}\nmore = 1\n")


def _fleet_source(world: FleetWorld) -> None:
    world.repo.write("files/logo.txt", "a new logo\n")


def _fleet_hosts(world: FleetWorld) -> None:
    world.repo.write("gitops.yaml", world.manifest(workers=8))


def _fleet_handlers(world: FleetWorld) -> None:
    world.repo.write("gitops.yaml", world.manifest(action="restart"))


def _fleet_secret(world: FleetWorld) -> None:
    world.write_secret("fleet-token-two")


FLEET_KINDS = {
    "manifest": _fleet_role,
    "files": _fleet_template,
    "source": _fleet_source,
    "hosts": _fleet_hosts,
    "handlers": _fleet_handlers,
    "secrets": _fleet_secret,
}


@pytest.mark.parametrize("kind", list(FLEET_KINDS))
def test_each_kind_of_fleet_input_counts_as_moved(tmp_path: Path, kind: str) -> None:
    world = FleetWorld(tmp_path, "report")
    world.converge_and_edit()
    FLEET_KINDS[kind](world)
    world.repo.push(f"touch {kind}")

    result = world.reconcile()

    assert result.ok, result.error
    web = result.outcomes["web"]
    part = {"source": "files", "handlers": "manifest"}.get(kind, kind)
    assert part in web.moved, web.moved
    assert web.decision == "apply"
    # motd's desired state did not change: putting it back overwrote hand-made drift.
    assert web.drift_overwritten is True
    assert (world.host / "motd").read_text() == "managed\n"


# --- issue 13 -------------------------------------------------------------------------------

GREETING_BASE_TF = """
variable "greeting" { type = string }
output "greeting" { value = var.greeting }
"""
GREETING_APP_TF = (
    PROVIDER
    + """
variable "dir" { type = string }
variable "greeting" { type = string }
resource "localfile_file" "hello" {
  path    = "${var.dir}/hello.txt"
  content = "${var.greeting}\\n"
}
"""
)


class GreetingWorld:
    """base outputs a greeting; app (`drift: report`) writes it to a file."""

    def __init__(self, tmp: Path, extra: str = "") -> None:
        self.tmp = tmp
        self.repo = InfraRepo(tmp / "git")
        self.managed = tmp / "managed"
        self.state = tmp / "state"
        self.config = write_host_config(tmp / "agent.yaml", self.repo.url, self.state, extra)

    def manifest(self, greeting: str, base_tf_dir: str = "stacks/base") -> str:
        return textwrap.dedent(f"""\
            version: 1
            units:
              - name: base
                stack: {base_tf_dir}
                vars: {{greeting: "{greeting}"}}
              - name: app
                stack: stacks/app
                drift: report
                vars:
                  dir: "{self.managed}"
                  greeting: {{from_stack: {{unit: base, output: greeting}}}}
            """)

    def seed(self, base_tf: str = GREETING_BASE_TF) -> str:
        self.repo.write("stacks/base/main.tf", base_tf)
        self.repo.write("stacks/app/main.tf", GREETING_APP_TF)
        self.repo.write("gitops.yaml", self.manifest("hello"))
        return self.repo.push("seed")

    def reconcile(self, **kwargs: Any) -> PassResult:
        reconciler = Reconciler(load_host_config(self.config))
        try:
            return reconciler.run_pass(PassRequest(trigger="test", **kwargs))
        finally:
            reconciler.close()

    def store(self) -> RunStore:
        return RunStore(self.state)

    @property
    def hello(self) -> Path:
        return self.managed / "hello.txt"


@pytest.mark.parametrize("preview", ["dry-run", "unit"])
def test_a_preview_before_the_pass_never_turns_a_pushed_change_into_drift(
    tmp_path: Path, preview: str
) -> None:
    world = GreetingWorld(tmp_path)
    old = world.seed()
    assert world.reconcile().ok
    world.repo.write("gitops.yaml", world.manifest("bonjour"))
    head = world.repo.push("new greeting")

    if preview == "dry-run":
        result = world.reconcile(dry_run=True)
        assert result.outcomes["app"].preview is True
        state = world.store().unit_state("app")
        assert state is not None and state.revision == old  # nothing converged
        assert state.preview_run_id == result.run_id
        assert world.store().current_revision() == old  # the revision in force too
    else:
        result = world.reconcile(unit="app")
        assert result.outcomes["app"].decision == "nothing"
        state = world.store().unit_state("app")
        assert state is not None and state.revision == old  # base did not run

    result = world.reconcile()

    assert result.ok, result.error
    assert result.outcomes["base"].decision == "apply"
    assert result.outcomes["app"].decision == "apply", result.outcomes["app"]
    assert result.outcomes["app"].drift is False
    assert world.hello.read_text() == "bonjour\n"
    state = world.store().unit_state("app")
    assert state is not None and state.revision == head


# Declares what the manifest passes (else the revision is refused before any plan) and
# fails at plan time on an undeclared reference.
BROKEN_APP_TF = (
    'variable "dir" { type = string }\nvariable "greeting" { type = string }\n'
    'resource "terraform_data" "v" {\n  input = var.nowhere\n}\n'
)


def test_a_dry_run_never_overwrites_the_last_real_outcome(tmp_path: Path) -> None:
    world = GreetingWorld(tmp_path)
    world.seed()
    assert world.reconcile().ok
    world.repo.write("stacks/app/main.tf", BROKEN_APP_TF)
    world.repo.push("break app")
    failed = world.reconcile()
    assert failed.outcomes["app"].status is UnitStatus.FAILED
    in_force = world.store().current_revision()
    world.repo.write("NOTES.md", "a later commit\n")
    world.repo.push("later")

    preview = world.reconcile(dry_run=True)

    store = world.store()
    state = store.unit_state("app")
    assert state is not None
    assert state.last_status == "failed" and state.last_run_id == failed.run_id
    assert state.preview_run_id == preview.run_id
    assert store.current_revision() == in_force  # a dry run takes nothing into force
    rows = store.unit_history("app", limit=5)
    assert rows[0].run_id == preview.run_id and rows[0].preview is True
    assert rows[1].run_id == failed.run_id and rows[1].preview is False


def test_a_held_plan_can_still_be_approved_after_a_dry_run_at_a_new_head(
    tmp_path: Path,
) -> None:
    world = GreetingWorld(tmp_path, "policy: {destroy: hold}\n")
    world.seed()
    assert world.reconcile().ok
    # A new path replaces the file: a destroy, held for approval.
    world.repo.write("stacks/app/main.tf", GREETING_APP_TF.replace("hello.txt", "hello-v2.txt"))
    world.repo.push("move the file")
    held = world.reconcile()
    assert held.outcomes["app"].status is UnitStatus.HELD
    world.repo.write("NOTES.md", "a later commit\n")
    world.repo.push("later")
    world.reconcile(dry_run=True)

    reconciler = Reconciler(load_host_config(world.config))
    try:
        approved = reconciler.approve(held.run_id)
    finally:
        reconciler.close()

    assert approved.ok, approved.error
    assert (world.managed / "hello-v2.txt").exists()
    assert world.store().unit_state("app").last_status == "ok"


def test_a_blocked_or_failed_result_keeps_the_recorded_drift(tmp_path: Path) -> None:
    world = GreetingWorld(tmp_path)
    world.seed()
    assert world.reconcile().ok
    world.hello.write_text("edited by hand\n")
    assert world.reconcile().outcomes["app"].decision == "report"
    world.repo.write("stacks/base/main.tf", GREETING_BASE_TF + BROKEN_APP_TF)
    world.repo.push("break base")

    result = world.reconcile()

    assert result.outcomes["base"].status is UnitStatus.FAILED
    assert result.outcomes["app"].status is UnitStatus.BLOCKED
    state = world.store().unit_state("app")
    assert state is not None and state.drift is True  # the hand edit is still there
    assert world.hello.read_text() == "edited by hand\n"


SENSITIVE_BASE_TF = """
variable "greeting" { type = string }
output "greeting" {
  value     = var.greeting
  sensitive = true
}
"""
CANARY = "sensitive-canary-4b1d9e-greeting"


def test_a_sensitive_output_read_with_from_stack_is_never_printed(tmp_path: Path) -> None:
    world = GreetingWorld(tmp_path)
    world.repo.write("stacks/base/main.tf", SENSITIVE_BASE_TF)
    world.repo.write("stacks/app/main.tf", GREETING_APP_TF)
    world.repo.write("gitops.yaml", world.manifest(CANARY))
    world.repo.push("seed")

    result = world.reconcile()

    assert result.ok, result.error
    assert world.hello.read_text() == CANARY + "\n"  # it is passed on
    run_dir = world.state / "runs" / result.run_id / "app"
    texts = [p.read_text() for p in run_dir.iterdir() if p.suffix in (".txt", ".json")]
    assert texts and not any(CANARY in text for text in texts)
    assert any("hello.txt" in text for text in texts)


SENSITIVE_PORT = 48213  # a number no other part of the test prints
SECRET_BASE_TF = """
variable "greeting" {
  type      = string
  sensitive = true
}
output "greeting" {
  value     = var.greeting
  sensitive = true
}
variable "port" {
  type      = number
  sensitive = true
}
output "port" {
  value     = var.port
  sensitive = true
}
output "public" { value = "public-value-7f3e" }
"""
# app declares its variables plainly: the agent tells Terraform they are sensitive. Its
# outputs of them must say `sensitive = true` (Terraform refuses the plan otherwise).
SECRET_APP_TF = """
variable "greeting" { type = string }
variable "port" { type = number }
variable "public" { type = string }
resource "terraform_data" "use" {
  input = { greeting = var.greeting, port = var.port, public = var.public }
}
output "echo" {
  value     = var.greeting
  sensitive = true
}
output "port" {
  value     = var.port
  sensitive = true
}
"""


def test_values_of_sensitive_outputs_stay_sensitive_in_the_stack_that_reads_them(
    tmp_path: Path,
) -> None:
    world = GreetingWorld(tmp_path)
    world.repo.write("stacks/base/main.tf", SECRET_BASE_TF)
    world.repo.write("stacks/app/main.tf", SECRET_APP_TF)
    world.repo.write(
        "gitops.yaml",
        textwrap.dedent(f"""\
            version: 1
            units:
              - name: base
                stack: stacks/base
                vars: {{greeting: "{CANARY}", port: {SENSITIVE_PORT}}}
              - name: app
                stack: stacks/app
                vars:
                  greeting: {{from_stack: {{unit: base, output: greeting}}}}
                  port: {{from_stack: {{unit: base, output: port}}}}
                  public: {{from_stack: {{unit: base, output: public}}}}
            """),
    )
    world.repo.push("seed")

    result = world.reconcile()

    assert result.ok, result.error
    run_dir = world.state / "runs" / result.run_id / "app"
    plan = (run_dir / "plan.txt").read_text()
    # Terraform itself hides them (so not even the redactor's mask shows where they were),
    # the number too; a plain output's value is shown as it is.
    assert "greeting = (sensitive value)" in plan and "port     = (sensitive value)" in plan
    assert "echo = (sensitive value)" in plan
    assert 'public   = "public-value-7f3e"' in plan
    assert "***" not in plan
    # The plan JSON the agent keeps (and rules read) masks what Terraform marks, the number
    # too; numbers are never given to the redactor (masking every 1 would mask everything).
    kept = json.loads((run_dir / "plan.json").read_text())
    assert kept["variables"]["port"]["value"] == "(sensitive value)"
    (change,) = kept["resource_changes"]
    assert change["change"]["after"]["input"] == {
        "greeting": "(sensitive value)",
        "port": "(sensitive value)",
        "public": "public-value-7f3e",
    }
    cli = [sys.executable, "-m", "agent.cli", "--config", str(world.config)]
    shown = [
        subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60, check=True)
        for args in (["logs", "app"], ["status"], ["history"])
    ]
    assert "(sensitive value)" in shown[0].stdout
    notes = [
        note
        for name, outcome in result.outcomes.items()
        for note in unit_events(name, outcome, run_id=result.run_id, revision=result.revision)
    ]
    assert [n.kind for n in notes] == ["apply", "apply"]
    texts = [
        *(p.read_text() for p in run_dir.parent.glob("*/*") if p.suffix in (".txt", ".json")),
        *(out.stdout + out.stderr for out in shown),
        *(f"{n.summary} {n.detail}" for n in notes),
    ]
    assert not any(CANARY in text or str(SENSITIVE_PORT) in text for text in texts)
    # The store (and its journal) never saw them either.
    for path in world.state.glob("agent.db*"):
        assert CANARY.encode() not in path.read_bytes()
    # A value the stack no longer receives from a sensitive output is no longer marked.
    world.repo.write("stacks/base/main.tf", SECRET_BASE_TF.replace("sensitive = true", ""))
    world.repo.write("stacks/app/main.tf", SECRET_APP_TF.replace("sensitive = true", ""))
    world.repo.push("nothing is secret any more")
    assert world.reconcile().ok
    assert not list(world.state.glob("units/app/workdir/**/zz_gitops_agent_sensitive_*"))


def test_a_unit_pass_blocks_a_unit_whose_dependency_is_held(tmp_path: Path) -> None:
    world = GreetingWorld(tmp_path, "policy: {destroy: hold}\n")
    world.seed(
        base_tf=GREETING_BASE_TF + 'resource "terraform_data" "b" { input = var.greeting }\n'
    )
    assert world.reconcile().ok
    # A replacement in base (held), and a new greeting app must not apply before it.
    world.repo.write(
        "stacks/base/main.tf",
        GREETING_BASE_TF
        + 'resource "terraform_data" "b" {\n  input = var.greeting\n  triggers_replace = [1]\n}\n',
    )
    world.repo.write("gitops.yaml", world.manifest("bonjour"))
    world.repo.push("replace in base")
    held = world.reconcile()
    assert held.outcomes["base"].status is UnitStatus.HELD
    assert held.outcomes["app"].status is UnitStatus.BLOCKED

    result = world.reconcile(unit="app")

    assert result.outcomes["app"].status is UnitStatus.BLOCKED
    assert "'base'" in (result.outcomes["app"].error or "")
    assert world.hello.read_text() == "hello\n"


# --- the daemon's timers and resume (issue 13 items 4 and 8) ---------------------------------


def _daemon(tmp_path: Path, intervals: str) -> Daemon:
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/app/main.tf", 'resource "terraform_data" "a" { input = 1 }\n')
    repo.write("stacks/db/main.tf", 'resource "terraform_data" "d" { input = 1 }\n')
    repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n"
        "  - {name: db, stack: stacks/db}\n",
    )
    repo.push("seed")
    config = write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        tmp_path / "state",
        f"intervals: {intervals}\ncontrol_socket: {tmp_path / 'ctl.sock'}\ndaemon: {{jitter: 0}}\n",
    )
    return Daemon(load_host_config(config))


@pytest.mark.parametrize(
    "intervals",
    ["{drift: 2s, units: {app: {drift: 6s}}}", "{drift: 10m, units: {app: {drift: 1h}}}"],
)
def test_a_units_own_drift_timer_is_not_lost_when_it_coalesces_with_the_global_one(
    tmp_path: Path, intervals: str
) -> None:
    daemon = _daemon(tmp_path, intervals)
    try:
        first = daemon.reconciler.run_pass(PassRequest(trigger="start"))
        assert first.ok, first.error
        daemon.planner.seen_head = first.head
        daemon.planner.manifest = daemon.reconciler.revisions.manifest_at(
            first.revision, _limits(daemon)
        )

        both = Batch(triggers={"drift"}, drift=True, unit_drifts={"app"}, count=2)
        request, _ = daemon.planner.request_for(both)
        global_only = Batch(triggers={"drift"}, drift=True, count=1)
        alone, _ = daemon.planner.request_for(global_only)
    finally:
        daemon.reconciler.close()

    assert request is not None and "app" not in request.skip
    assert alone is not None and "app" in alone.skip  # its own timer checks it


def _limits(daemon: Daemon) -> Any:
    from agent.config import ManifestLimits

    return ManifestLimits.from_host(daemon.host)


def test_resume_queues_a_pass_for_the_unit(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, "{drift: 1h}")
    replies: list[Any] = []

    class Reply:
        gone = False

        def result(self, value: Any) -> None:
            replies.append(value)

    class Peer:
        uid = os.getuid()
        name = "tester"

    try:
        daemon.store.suspensions.add("app", by="tester")
        daemon.requests.handle("resume", {"unit": "app"}, Peer(), Reply())  # type: ignore[arg-type]
        queued = daemon.queue.pending()
        batch = daemon.queue.take() if queued else None
    finally:
        daemon.reconciler.close()

    assert replies and replies[0]["changed"] is True
    assert (
        queued
        and isinstance(batch, Batch)
        and batch.units == {"app"}
        and "resume" in batch.triggers
    )
