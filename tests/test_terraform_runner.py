"""The Terraform runner against the real embedded engine (no mocks)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from providers.errors import TerraformCommandError, TerraformNotFoundError
from providers.terraform import (
    PlanOutcome,
    UnitWorkspace,
    find_terraform,
    summarize_plan,
    write_cli_config,
)
from providers.terraform.locate import EMBEDDED_SCRIPT
from providers.terraform.runner import FINGERPRINT_FILE, hcl_top_level_blocks, init_inputs
from providers.terraform.workdir import OVERRIDE_FILE, SENSITIVE_FILE, keeps_agent_state
from tests.tfhelpers import (
    Lines,
    deadline_in,
    embedded_binary,
    make_runner,
    make_workspace,
    write_files,
)

SLOW_STACK = {
    "main.tf": """
        resource "terraform_data" "slow" {
          provisioner "local-exec" {
            command = "exec sleep 30"
          }
        }
    """
}


def assert_checkout_clean(stack_dir: Path) -> None:
    """Nothing Terraform writes ever lands in the stack dir (the agent's git checkout)."""
    leftovers = {p.name for p in stack_dir.iterdir()} - {"main.tf", "mod", "versions.tf"}
    assert leftovers == set()


# --- locating Terraform --------------------------------------------------------------------


def test_find_terraform_order(tmp_path: Path) -> None:
    engine = embedded_binary()
    assert engine.kind == "embedded"
    assert engine.version.startswith("1.")
    assert find_terraform(None, path_env="") == engine

    # A directory on PATH holding `tofu` (here: the embedded engine under that name).
    script = Path(engine.argv[0])
    assert script.name == EMBEDDED_SCRIPT
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tofu").symlink_to(script)
    tofu = find_terraform(None, path_env=str(bin_dir))
    assert (tofu.kind, tofu.argv, tofu.version) == (
        "tofu",
        (str(bin_dir / "tofu"),),
        engine.version,
    )

    (bin_dir / "terraform").symlink_to(script)
    assert find_terraform(None, path_env=str(bin_dir)).kind == "terraform"

    configured = find_terraform(str(script), path_env="")
    assert (configured.kind, configured.argv) == ("configured", (str(script),))
    assert find_terraform("tofu", path_env=str(bin_dir)).kind == "configured"


def test_find_terraform_configured_but_missing(tmp_path: Path) -> None:
    with pytest.raises(TerraformNotFoundError, match="/nowhere/terraform"):
        find_terraform("/nowhere/terraform")
    with pytest.raises(TerraformNotFoundError, match=r"'tofu-1\.9'.*on PATH"):
        find_terraform("tofu-1.9", path_env=str(tmp_path))
    not_terraform = tmp_path / "terraform"
    not_terraform.write_text("#!/bin/sh\necho hello\n")
    not_terraform.chmod(0o755)
    with pytest.raises(TerraformNotFoundError, match="does not behave like Terraform"):
        find_terraform(None, path_env=str(tmp_path))


# --- environment and command lines ----------------------------------------------------------


def test_environment_and_argv(tmp_path: Path) -> None:
    base = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/agent",
        "TF_CLI_CONFIG_FILE": "/root/.terraformrc",  # preset by the machine, does not exist
        "TF_CLI_ARGS_plan": "-destroy",
        "TF_VAR_stray": "from the agent's own environment",
        "TF_WORKSPACE": "other",
        "TF_LOG": "",
        "TF_TOKEN_app_terraform_io": "registry-token",
    }
    runner = make_runner(tmp_path, base_env=base)
    ws = make_workspace(tmp_path)
    env = runner.command_env(ws, {"TF_VAR_db_password": "s3cret", "region": "eu-west-1"})
    assert env == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/agent",
        "TF_LOG": "",
        "TF_TOKEN_app_terraform_io": "registry-token",
        "TF_DATA_DIR": str(ws.data_dir),
        "TF_PLUGIN_CACHE_DIR": str(runner.plugin_cache_dir),
        "TF_CLI_CONFIG_FILE": str(runner.cli_config),
        "CHECKPOINT_DISABLE": "1",
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
        "TF_VAR_db_password": "s3cret",
        "TF_VAR_region": "eu-west-1",
    }
    with pytest.raises(ValueError, match="variable name"):
        runner.command_env(ws, {"TF_VAR_a b": "x"})
    argv = runner.command_argv(ws, ["plan", "-no-color"])
    # Terraform runs in the shadow of the stack, outside the checkout (terraform/workdir.py).
    assert ws.run_dir == tmp_path / "state" / "units" / "stack" / "workdir" / "stack"
    assert argv == [*embedded_binary().argv, f"-chdir={ws.run_dir}", "plan", "-no-color"]


def test_cli_config_is_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "cli.tfrc"
    path.write_text("old")
    write_cli_config(
        path,
        dev_overrides={"example.com/ns/thing": tmp_path / "bin"},
        plugin_cache_dir=tmp_path / "cache",
    )
    text = path.read_text()
    assert f'plugin_cache_dir = "{tmp_path / "cache"}"' in text
    assert f'"example.com/ns/thing" = "{tmp_path / "bin"}"' in text
    assert "direct {}" in text
    assert [p.name for p in tmp_path.iterdir()] == ["cli.tfrc"]


# --- init only when needed -----------------------------------------------------------------


def test_init_runs_only_when_its_inputs_change(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    ws = make_workspace(
        tmp_path,
        {
            "main.tf": """
                resource "terraform_data" "a" {
                  input = "one"
                }
            """,
            "mod/main.tf": 'output "x" { value = 1 }\n',
            "mod2/main.tf": 'output "x" { value = 2 }\n',
        },
    )

    def init() -> bool:
        return runner.init_if_needed(ws, Lines(), deadline_in(60))

    assert init() is True  # no data dir yet
    assert (ws.data_dir / FINGERPRINT_FILE).is_file()
    assert init() is False
    write_files(ws.stack_dir, {"main.tf": 'resource "terraform_data" "a" {\n  input = "two"\n}\n'})
    assert init() is False  # a resource's arguments: no init

    main = (ws.stack_dir / "main.tf").read_text()
    write_files(ws.stack_dir, {"main.tf": main + 'module "m" {\n  source = "./mod"\n}\n'})
    assert init() is True  # a new module call
    assert init() is False
    write_files(ws.stack_dir, {"main.tf": main + 'module "m" {\n  source = "./mod2"\n}\n'})
    assert init() is True  # module source changed
    write_files(ws.stack_dir, {"mod2/main.tf": 'module "inner" {\n  source = "../mod"\n}\n'})
    assert init() is True  # a module call inside a local module
    write_files(ws.stack_dir, {".terraform.lock.hcl": "# This file is maintained...\n"})
    assert init() is True  # the lock file
    assert init() is False
    write_files(ws.stack_dir, {"versions.tf": 'terraform {\n  required_version = ">= 1.5"\n}\n'})
    assert init() is True  # a terraform block
    shutil.rmtree(ws.data_dir)
    assert init() is True  # no data dir
    assert not (ws.stack_dir / ".terraform").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('terraform {\n  backend "s3" {}\n}\n', [("terraform", [])]),
        (
            '# c {\nresource "aws_instance" "web" {\n  ami = "}"\n}\n/* } */\n',
            [("resource", ["aws_instance", "web"])],
        ),
        (
            'locals {\n  s = "${jsonencode({a = "}"})}"\n  t = "$${x"\n}\nmodule m {\n}\n',
            [("locals", []), ("module", ["m"])],
        ),
        (
            'data "x_y" "z" {\n  doc = <<-EOT\n    { unbalanced\n  EOT\n}\n'
            'output "o" { value = 1 }\n',
            [("data", ["x_y", "z"]), ("output", ["o"])],
        ),
        ('resource "a" "b" {\n', None),  # unbalanced: the whole file counts
        ('x = "unterminated\n', None),
        ("x = 1\n", []),  # an attribute at top level has no block in it
    ],
)
def test_hcl_top_level_blocks(text: str, expected: list | None) -> None:
    blocks = hcl_top_level_blocks(text)
    assert (None if blocks is None else [(t, labels) for t, labels, _ in blocks]) == expected


def test_init_inputs_ignore_resource_arguments(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "a.tf": 'resource "aws_instance" "x" {\n  ami = "1"\n}\n',
            "b.tf.json": '{"resource": {"google_x": {"y": {}}},'
            ' "module": {"m": {"source": "./m"}}}',
            "m/main.tf": 'provider "vault" {}\n',
        },
    )
    before = init_inputs(tmp_path)
    assert "provider aws" in before
    assert "provider google" in before
    assert "provider vault" in before  # from the local module
    write_files(tmp_path, {"a.tf": 'resource "aws_instance" "x" {\n  ami = "2"\n}\n'})
    assert init_inputs(tmp_path) == before
    write_files(tmp_path, {"a.tf": 'resource "azurerm_vm" "x" {\n  ami = "2"\n}\n'})
    assert "provider azurerm" in init_inputs(tmp_path)


# --- plan, show, apply, outputs --------------------------------------------------------------


def test_plan_apply_outputs_with_state_outside_the_checkout(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    ws = make_workspace(
        tmp_path,
        {
            "main.tf": """
                variable "password" {
                  type      = string
                  sensitive = true
                }
                variable "region" {
                  type = string
                }
                resource "terraform_data" "db" {
                  input = { password = var.password, region = var.region }
                }
                output "region" {
                  value = terraform_data.db.output.region
                }
            """
        },
    )
    secret = "pa55-not-in-logs"
    variables = {"TF_VAR_password": secret, "TF_VAR_region": "eu-west-1"}
    plan_file = tmp_path / "run" / "tfplan"
    deadline = deadline_in(60)

    lines = Lines()
    assert runner.init_if_needed(ws, lines, deadline)
    assert "Terraform has been successfully initialized!" in lines
    lines = Lines()
    assert runner.plan(ws, plan_file, variables, lines, deadline) is PlanOutcome.CHANGES
    assert "Plan: 1 to add, 0 to change, 0 to destroy." in lines
    # The log starts with the plan: no `Warning: Deprecated flag: -state` (issue 15.6).
    first = next(line for line in lines if line.strip())
    assert first.startswith("Terraform used the selected"), lines.text
    assert "Warning" not in lines.text
    assert secret not in lines.text
    summary = summarize_plan(runner.show_json(ws, plan_file, deadline))
    assert (summary.add, summary.change, summary.destroy, summary.has_changes) == (1, 0, 0, True)
    assert [c.address for c in summary.changes] == ["terraform_data.db"]

    lines = Lines()
    runner.apply(ws, plan_file, variables, lines, deadline)
    assert "Apply complete! Resources: 1 added, 0 changed, 0 destroyed." in lines
    assert "Warning" not in lines.text
    assert secret not in lines.text
    assert runner.outputs(ws, deadline) == {"region": "eu-west-1"}
    assert ws.state_file.is_file()
    assert secret in ws.state_file.read_text()  # Terraform keeps it there: the state is 0600
    assert_checkout_clean(ws.stack_dir)

    assert runner.plan(ws, plan_file, variables, Lines(), deadline) is PlanOutcome.NO_CHANGES
    assert not summarize_plan(runner.show_json(ws, plan_file, deadline)).has_changes
    variables["TF_VAR_region"] = "us-east-1"
    assert runner.plan(ws, plan_file, variables, Lines(), deadline) is PlanOutcome.CHANGES
    summary = summarize_plan(runner.show_json(ws, plan_file, deadline))
    assert (summary.change, summary.output_changes) == (1, True)
    outcome = runner.plan(ws, plan_file, variables, Lines(), deadline, refresh_only=True)
    assert outcome is PlanOutcome.NO_CHANGES
    assert_checkout_clean(ws.stack_dir)
    assert not (ws.state_file.parent / ".terraform.tfstate.lock.info").exists()


def test_a_declared_backend_keeps_its_own_state(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "net.tfstate"
    runner = make_runner(tmp_path)
    ws = make_workspace(
        tmp_path,
        {
            "main.tf": f"""
                terraform {{
                  backend "local" {{
                    path = "{elsewhere}"
                  }}
                }}
                resource "terraform_data" "a" {{}}
            """
        },
    )
    plan_file = tmp_path / "tfplan"
    assert not keeps_agent_state(ws.stack_dir)
    runner.init_if_needed(ws, Lines(), None)
    assert not (ws.run_dir / OVERRIDE_FILE).exists()
    runner.plan(ws, plan_file, {}, Lines(), None)
    runner.apply(ws, plan_file, {}, Lines(), None)
    assert elsewhere.is_file()
    assert not ws.state_file.exists()
    assert runner.outputs(ws, None) == {}


def test_state_kept_with_the_deprecated_flag_is_taken_over_with_no_change(
    tmp_path: Path,
) -> None:
    """A unit set up by an agent that still passed `-state` (data dir initialized without a
    backend, state in units/<unit>/terraform.tfstate) plans no change afterwards: the state
    stays where it was and nothing is lost."""
    runner = make_runner(tmp_path)
    ws = make_workspace(
        tmp_path,
        {
            "main.tf": 'resource "terraform_data" "a" {\n  input = "x"\n}\n',
            "mod/main.tf": 'output "v" {\n  value = 1\n}\n',
            "more.tf": 'module "m" {\n  source = "./mod"\n}\n',
        },
    )
    ws.state_file.parent.mkdir(parents=True)
    env = runner.command_env(ws, {})
    old = [*embedded_binary().argv, f"-chdir={ws.stack_dir}"]  # as the agent ran it before
    for args in (["init", "-input=false"], ["apply", "-auto-approve", f"-state={ws.state_file}"]):
        done = subprocess.run([*old, *args], env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    (ws.data_dir / FINGERPRINT_FILE).write_text(runner.init_fingerprint(ws.stack_dir))
    before = json.loads(ws.state_file.read_text())["resources"]
    assert "Deprecated flag: -state" in done.stdout + done.stderr  # what the old way printed

    plan_file = tmp_path / "tfplan"
    lines = Lines()
    assert runner.init_if_needed(ws, lines, deadline_in(60))  # the backend moved: init
    assert runner.plan(ws, plan_file, {}, lines, deadline_in(60)) is PlanOutcome.NO_CHANGES
    assert "Warning" not in lines.text
    assert json.loads(ws.state_file.read_text())["resources"] == before
    assert sorted(p.name for p in ws.stack_dir.iterdir()) == ["main.tf", "mod", "more.tf"]


def test_the_shadow_follows_the_checkout_and_reaches_modules_above_the_stack(
    tmp_path: Path,
) -> None:
    runner = make_runner(tmp_path)
    checkout = tmp_path / "checkout"
    write_files(checkout, {"modules/m/main.tf": 'output "v" {\n  value = "up"\n}\n'})
    ws = make_workspace(
        tmp_path,
        {
            "main.tf": 'module "m" {\n  source = "../../modules/m"\n}\n',
            "out.tf": 'output "v" {\n  value = module.m.v\n}\n',
        },
        name="stacks/app",
    )
    ws = UnitWorkspace(ws.stack_dir, ws.data_dir, ws.state_file, root=checkout)
    plan_file = tmp_path / "tfplan"
    runner.init_if_needed(ws, Lines(), deadline_in(60))
    runner.plan(ws, plan_file, {}, Lines(), deadline_in(60))
    runner.apply(ws, plan_file, {}, Lines(), deadline_in(60))
    assert runner.outputs(ws, deadline_in(60)) == {"v": "up"}
    assert ws.state_file.is_file()

    # A file removed from the checkout leaves the shadow; a new one appears.
    (ws.stack_dir / "out.tf").unlink()
    write_files(ws.stack_dir, {"out2.tf": 'output "w" {\n  value = module.m.v\n}\n'})
    runner.init_if_needed(ws, Lines(), deadline_in(60))
    assert sorted(p.name for p in ws.run_dir.iterdir()) == ["main.tf", "out2.tf", OVERRIDE_FILE]
    assert sorted(p.name for p in ws.stack_dir.iterdir()) == ["main.tf", "out2.tf"]
    assert not (checkout / ".terraform.lock.hcl").exists()

    # The agent's file names are reserved: a stack cannot set the state path through them.
    for name in (OVERRIDE_FILE, SENSITIVE_FILE):
        write_files(ws.stack_dir, {name: "# mine\n"})
        with pytest.raises(TerraformCommandError, match=f"{name}: the agent reserves"):
            runner.init_if_needed(ws, Lines(), deadline_in(60))
        (ws.stack_dir / name).unlink()


def test_variables_marked_sensitive_are_never_printed_by_terraform(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    files = {
        "main.tf": """
            variable "word" { type = string }
            variable "n" { type = number }
            resource "terraform_data" "a" { input = "${var.word}-${var.n}" }
            """
    }
    ws = make_workspace(tmp_path, files)
    marked = dataclasses.replace(ws, sensitive_vars=frozenset({"word", "n"}))
    variables = {"TF_VAR_word": "plain-word-5e1f", "TF_VAR_n": "73019"}
    plan_file = tmp_path / "tfplan"
    runner.init_if_needed(marked, Lines(), deadline_in(60))
    lines = Lines()
    runner.plan(marked, plan_file, variables, lines, deadline_in(60))
    text = "\n".join(lines)
    assert "input  = (sensitive value)" in text
    assert "plain-word-5e1f" not in text and "73019" not in text
    assert (marked.run_dir / SENSITIVE_FILE).is_file()
    # The marks stay for a workspace that names none (reading outputs, applying a saved
    # plan); an empty set removes them.
    runner.apply(ws, plan_file, variables, Lines(), deadline_in(60))
    assert (ws.run_dir / SENSITIVE_FILE).is_file()
    # (Terraform keeps showing an attribute its state recorded as sensitive.)
    unmarked = dataclasses.replace(ws, sensitive_vars=frozenset())
    runner.init_if_needed(unmarked, Lines(), deadline_in(60))  # syncs the shadow
    runner.plan(unmarked, plan_file, {**variables, "TF_VAR_n": "2"}, Lines(), deadline_in(60))
    assert not (ws.run_dir / SENSITIVE_FILE).exists()


def test_a_syntax_error_carries_terraforms_message(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    ws = make_workspace(tmp_path, {"main.tf": 'resource "terraform_data" "a" {}\n\nfoo {\n}\n'})
    with pytest.raises(TerraformCommandError) as caught:
        runner.init_if_needed(ws, Lines(), deadline_in(60))
    message = str(caught.value)
    assert message.startswith("terraform init failed (exit code 1):")
    assert "Error: Unsupported block type" in message
    assert "on main.tf line 3:" in message
    assert caught.value.command == "init"
    assert caught.value.exit_code == 1
    assert not (ws.data_dir / FINGERPRINT_FILE).exists()


def test_a_plan_error_is_raised_with_its_text(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    ws = make_workspace(
        tmp_path,
        {"main.tf": 'variable "x" {\n  type = number\n}\nresource "terraform_data" "a" {}\n'},
    )
    runner.init_if_needed(ws, Lines(), None)
    with pytest.raises(TerraformCommandError, match=r"(?s)terraform plan failed.*Invalid value"):
        runner.plan(ws, tmp_path / "tfplan", {"x": "not a number"}, Lines(), None)


# --- stopping: timeouts and interrupts --------------------------------------------------------


def _start_slow_apply(tmp_path: Path, **runner_args: float):
    runner = make_runner(tmp_path, **runner_args)
    ws = make_workspace(tmp_path, SLOW_STACK)
    plan_file = tmp_path / "tfplan"
    runner.init_if_needed(ws, Lines(), deadline_in(60))
    assert runner.plan(ws, plan_file, {}, Lines(), deadline_in(60)) is PlanOutcome.CHANGES
    return runner, ws, plan_file


def _lock_info(ws) -> Path:
    return ws.state_file.parent / f".{ws.state_file.name}.lock.info"


def test_timeout_interrupts_gracefully(tmp_path: Path) -> None:
    runner, ws, plan_file = _start_slow_apply(tmp_path, grace_period=20)
    lines = Lines()
    started = time.monotonic()
    with pytest.raises(TerraformCommandError, match="timed out after 2 s") as caught:
        runner.apply(ws, plan_file, {}, lines, deadline_in(2))
    assert time.monotonic() - started < 15
    assert "was interrupted and stopped" in str(caught.value)
    assert "Interrupt received." in lines
    assert "Two interrupts received. Exiting immediately." not in lines.text
    assert not _lock_info(ws).exists()
    # The state is unlocked: the next plan needs no force-unlock (the tainted resource is
    # planned again).
    outcome = runner.plan(ws, plan_file, {}, Lines(), deadline_in(60), refresh_only=False)
    assert outcome is PlanOutcome.CHANGES
    assert_checkout_clean(ws.stack_dir)


def test_interrupt_sends_one_sigint_and_releases_the_lock(tmp_path: Path) -> None:
    runner, ws, plan_file = _start_slow_apply(tmp_path)
    provisioning = threading.Event()
    lines = Lines()

    def on_line(line: str) -> None:
        lines(line)
        if "Executing:" in line:
            provisioning.set()

    errors: list[BaseException] = []

    def apply() -> None:
        try:
            runner.apply(ws, plan_file, {}, on_line, deadline_in(60))
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=apply)
    started = time.monotonic()
    worker.start()
    assert provisioning.wait(20), lines.text
    assert _lock_info(ws).exists()  # Terraform holds the state lock while it applies
    runner.interrupt()
    runner.interrupt()  # the process was signalled already: no second SIGINT
    worker.join(30)
    assert not worker.is_alive()
    assert time.monotonic() - started < 20
    assert len(errors) == 1 and isinstance(errors[0], TerraformCommandError)
    assert str(errors[0]).startswith("terraform apply was interrupted")
    assert lines.count("Interrupt received.") == 1
    assert "Two interrupts received. Exiting immediately." not in lines.text
    assert not _lock_info(ws).exists()
    runner.interrupt()  # nothing running: nothing to do
    assert runner.plan(ws, plan_file, {}, Lines(), deadline_in(60)) is PlanOutcome.CHANGES
    assert not any(os.path.exists(ws.stack_dir / n) for n in ("terraform.tfstate", ".terraform"))
