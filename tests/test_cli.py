"""The `agent` command as a user runs it: real subprocesses, real repos, real Terraform."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from providers.terraform import find_terraform
from tests.support.infra import InfraRepo, embedded_terraform, write_host_config

SLOW_APPLY_TF = """
resource "terraform_data" "slow" {
  input = var.generation
  provisioner "local-exec" {
    command = "sleep 6"
  }
}
variable "generation" {
  type    = string
  default = "1"
}
"""

QUICK_TF = 'resource "terraform_data" "quick" {\n  input = "q"\n}\n'


def agent(
    *args: str, config: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("GITOPS_AGENT_CONFIG", None)
    if config is not None:
        env["GITOPS_AGENT_CONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def spawn_agent(*args: str, config: Path) -> subprocess.Popen:
    env = {**os.environ, "GITOPS_AGENT_CONFIG": str(config)}
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def slow_world(tmp_path: Path, extra: str = "") -> tuple[InfraRepo, Path, Path]:
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/slow/main.tf", SLOW_APPLY_TF)
    repo.write("stacks/quick/main.tf", QUICK_TF)
    repo.write(
        "gitops.yaml",
        "version: 1\nunits:\n  - {name: slow, stack: stacks/slow}\n"
        "  - {name: quick, stack: stacks/quick}\n",
    )
    repo.push("seed")
    state = tmp_path / "state"
    config = write_host_config(tmp_path / "agent.yaml", repo.url, state, extra)
    return repo, config, state


def apply_started(state: Path) -> bool:
    return any(
        "Provisioning with 'local-exec'" in p.read_text(errors="replace")
        for p in state.glob("runs/*/slow/apply.txt.partial")
    )


def test_quickstart_runs_offline_and_the_tour_works(tmp_path: Path) -> None:
    root = tmp_path / "qs"
    result = agent("quickstart", str(root), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "base: applied" in result.stdout and "app: applied" in result.stdout
    assert "host: " in result.stdout
    # Progress on stderr, naming the engine that really ran (the quickstart's host config
    # sets no terraform.binary: a terraform on PATH comes before the embedded one).
    engine = find_terraform(None).describe()
    assert f"Running the first reconcile pass with {engine}, offline..." in result.stderr
    assert "Laying out" not in result.stdout and "Running" not in result.stdout
    assert "GITOPS_AGENT_CONFIG" in result.stdout
    config = root / "agent.yaml"
    app_conf = root / "host" / "etc" / "app.conf"
    assert "greeting = hello from gitops-agent\nworkers = 4\n" in app_conf.read_text()
    app_conf.write_text("edited by hand\n")  # drift on the host, reverted by the same pass
    motd = root / "managed" / "motd.txt"
    original = motd.read_text()

    motd.write_text("edited by hand\n")  # drift, reverted by the next pass
    result = agent("reconcile", "--now", config=config)
    assert result.returncode == 0, result.stderr
    assert motd.read_text() == original
    assert "workers = 4" in app_conf.read_text()

    status = json.loads(agent("status", "--json", config=config).stdout)
    assert {u["unit"] for u in status["units"]} == {"base", "app", "host"}
    host = next(u for u in status["units"] if u["unit"] == "host")
    # Drift was found and put back by that pass: status shows it as it is now.
    assert host["drift"] is False and host["drift_reverted"] is True
    assert host["hosts"][0]["host"] == "bastion"
    base = next(u for u in status["units"] if u["unit"] == "base")
    assert base["drift_reverted"] is True and base["last_decision"] == "apply"

    logs = agent("logs", "base", config=config)
    assert logs.returncode == 0
    assert "localfile_file.motd" in logs.stdout and "Apply complete!" in logs.stdout

    history = json.loads(agent("history", "--json", config=config).stdout)
    assert len(history["runs"]) == 2 and history["runs"][0]["trigger"] == "cli"

    text_status = agent("status", config=config).stdout
    assert "UNIT" in text_status and "base" in text_status


def test_read_commands_before_any_run_say_so(tmp_path: Path) -> None:
    config = write_host_config(tmp_path / "agent.yaml", "file:///nonexistent", tmp_path / "st")
    result = agent("status", config=config)
    assert result.returncode == 3
    assert "has not run yet" in result.stderr and "agent reconcile --now" in result.stderr


def test_a_missing_host_config_is_a_clear_error(tmp_path: Path) -> None:
    result = agent("--config", str(tmp_path / "nope.yaml"), "status")
    assert result.returncode == 3
    assert "nope.yaml" in result.stderr


def test_logs_of_an_unknown_unit_exit_5(tmp_path: Path) -> None:
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/quick/main.tf", QUICK_TF)
    repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: quick, stack: stacks/quick}\n")
    repo.push("seed")
    config = write_host_config(tmp_path / "agent.yaml", repo.url, tmp_path / "state")
    assert agent("reconcile", "--now", config=config).returncode == 0
    result = agent("logs", "nope", config=config)
    assert result.returncode == 5 and "nope" in result.stderr
    result = agent("logs", "quick", "--run", "r-nope", config=config)
    assert result.returncode == 5


def test_validate_checks_manifest_and_stacks_offline(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "stacks" / "ok").mkdir(parents=True)
    (repo / "stacks" / "ok" / "main.tf").write_text(QUICK_TF)
    (repo / "gitops.yaml").write_text("version: 1\nunits:\n  - {name: ok, stack: stacks/ok}\n")
    good = agent("validate", str(repo), "--json")
    assert good.returncode == 0, good.stdout + good.stderr
    assert json.loads(good.stdout)["valid"] is True

    (repo / "stacks" / "ok" / "main.tf").write_text(
        'resource "terraform_data" "x" {\n  input =\n}\n'
    )
    bad = agent("validate", str(repo))
    assert bad.returncode == 1
    assert "stacks/ok/main.tf:3" in bad.stdout or "stacks/ok/main.tf:2" in bad.stdout

    (repo / "gitops.yaml").write_text(
        "version: 1\nunits:\n  - {name: ok, stack: stacks/ok, drift: revrt}\n"
    )
    bad = agent("validate", str(repo))
    assert bad.returncode == 1
    assert (
        "gitops.yaml:3: units[0].drift: expected one of revert, report, ignore; got 'revrt'"
        in bad.stdout
    )


def test_version(tmp_path: Path) -> None:
    result = agent("version", "--json")
    assert result.returncode == 0
    info = json.loads(result.stdout)
    assert info["agent"] and info["terraform"]["version"]


def test_version_shows_the_terraform_the_host_config_would_use(tmp_path: Path) -> None:
    config = write_host_config(tmp_path / "agent.yaml", "file:///nowhere", tmp_path / "state")
    result = agent("version", "--json", config=config)
    assert result.returncode == 0, result.stderr
    tf = json.loads(result.stdout)["terraform"]
    assert (tf["origin"], tf["path"]) == ("configured", str(embedded_terraform()))
    text = agent("version", config=config).stdout
    assert f"({embedded_terraform()}, configured: terraform.binary)" in text


def test_version_without_a_host_config_says_where_terraform_was_found() -> None:
    result = agent("version", "--json")
    tf = json.loads(result.stdout)["terraform"]
    # This machine has a terraform on PATH (toolchain.md); else the embedded engine.
    on_path = shutil.which("terraform") or shutil.which("tofu")
    assert tf["origin"] == ("PATH" if on_path else "embedded")
    assert tf["path"] == on_path


def test_a_second_pass_does_not_run_beside_the_first(tmp_path: Path) -> None:
    _, config, state = slow_world(tmp_path)
    first = spawn_agent("reconcile", "--now", config=config)
    try:
        wait_for(lambda: apply_started(state))
        busy = agent("reconcile", "--now", "--no-wait", config=config)
        assert busy.returncode == 4
        assert "another reconcile pass is running" in busy.stderr
        waiting = agent("reconcile", "--now", config=config)  # waits, then runs
        assert waiting.returncode == 0, waiting.stderr
        assert "waiting:" in waiting.stderr
        assert first.wait(timeout=60) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_sigterm_during_apply_stops_terraform_gracefully(tmp_path: Path) -> None:
    _, config, state = slow_world(tmp_path)
    proc = spawn_agent("reconcile", "--now", config=config)
    try:
        wait_for(lambda: apply_started(state))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        _, err = proc.communicate()
        assert "stopping" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    history = json.loads(agent("history", "--json", config=config).stdout)
    assert history["runs"][0]["status"] == "interrupted"
    # Terraform released its state lock: the next pass plans and applies without help.
    result = agent("reconcile", "--now", config=config)
    assert result.returncode == 0, result.stderr
    assert not list(state.glob("units/*/.terraform.tfstate.lock.info"))


def test_kill_9_during_apply_then_a_clean_recovery(tmp_path: Path) -> None:
    # Terraform dies with the agent (parent-death signal) and stops gracefully: a resource
    # whose provisioner it cut is left tainted, and its replacement is a destroy, which the
    # default policy holds. Allow destroys here so that recovery converges on its own.
    _, config, state = slow_world(tmp_path, "policy: {destroy: allow}\n")
    proc = spawn_agent("reconcile", "--now", config=config)
    try:
        wait_for(lambda: apply_started(state))
        proc.kill()  # SIGKILL: no handler runs
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run_id = next(state.glob("runs/*")).name

    result = agent("reconcile", "--now", config=config, timeout=180)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run {run_id} was interrupted" in result.stderr
    history = json.loads(agent("history", "--json", config=config).stdout)
    statuses = {r["id"]: r["status"] for r in history["runs"]}
    assert statuses[run_id] == "interrupted"
    assert history["runs"][0]["status"] == "succeeded"
    # No half-written file is left: the cut log is closed with a marker.
    assert not list(state.rglob("*.partial"))
    assert "output ends here" in (state / "runs" / run_id / "slow" / "apply.txt").read_text()
    # And the world converged: a further pass has nothing to do.
    again = json.loads(agent("reconcile", "--now", "--json", config=config).stdout)
    assert {u["decision"] for u in again["units"].values()} == {"nothing"}


@pytest.mark.parametrize("command", ["status", "history", "logs quick"])
def test_read_commands_have_json(tmp_path: Path, command: str) -> None:
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/quick/main.tf", QUICK_TF)
    repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: quick, stack: stacks/quick}\n")
    repo.push("seed")
    config = write_host_config(tmp_path / "agent.yaml", repo.url, tmp_path / "state")
    assert agent("reconcile", "--now", config=config).returncode == 0
    result = agent(*command.split(), "--json", config=config)
    assert result.returncode == 0
    assert isinstance(json.loads(result.stdout), dict)
