"""What the `agent` command prints and the codes it exits with, as a user meets them:
fleet results beside stack results, suspended units, help and completion, JSON times,
closed pipes, unknown units, `--detailed-exitcode`.

No mocks: the real `agent` in subprocesses, real Git repos, the embedded Terraform, and
fleets converged on this machine (`address: local`); completion run by a real bash.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.infra import InfraRepo, write_host_config
from tests.test_cli import QUICK_TF, agent

MANIFEST = """\
version: 1
roles:
  a: [{{file: {root}/a.txt, content: "a\\n"}}, {{file: {root}/a2.txt, content: "a2\\n"}}]
  b: [{{file: {root}/b.txt, content: "b\\n"}}]
units:
  - name: quick
    stack: stacks/quick
  - name: box
    fleet:
      hosts: {{static: [{{name: one, address: local, roles: [a]}},
                       {{name: two, address: local, roles: [b]}}]}}
"""


@pytest.fixture
def world(tmp_path: Path) -> dict:
    files = tmp_path / "files"
    files.mkdir()
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/quick/main.tf", QUICK_TF)
    repo.write("gitops.yaml", MANIFEST.format(root=files))
    repo.push("seed")
    config = write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        tmp_path / "state",
        f"hosts: {{allow_local: true, python: {sys.executable}}}\n",
    )
    return {"repo": repo, "config": config, "files": files, "state": tmp_path / "state"}


def reconcile(world: dict, *args: str) -> subprocess.CompletedProcess:
    return agent("reconcile", "--now", *args, config=world["config"])


def test_fleet_results_have_hosts_in_text_json_history_and_status(world: dict) -> None:
    result = reconcile(world, "--json")
    assert result.returncode == 0, result.stderr
    box = json.loads(result.stdout)["units"]["box"]
    assert box["plan_change"] == 3
    assert box["changed_hosts"] == ["one", "two"] and box["failed_hosts"] == []
    assert sorted((h["host"], h["changed"], h["status"]) for h in box["hosts"]) == [
        ("one", 2, "ok"),
        ("two", 1, "ok"),
    ]

    (world["files"] / "b.txt").write_text("edited by hand\n")  # drift on host two
    result = reconcile(world)
    assert result.returncode == 0, result.stderr
    assert "  box: 1 resource changed on 1 of 2 hosts (two) drift" in result.stdout

    history = agent("history", "--unit", "box", config=world["config"])
    lines = history.stdout.splitlines()
    assert "PLAN" in lines[0]
    assert "~1 on 1/2 hosts" in lines[1] and "~3 on 2/2 hosts" in lines[2], history.stdout
    as_json = json.loads(agent("history", "--unit", "box", "--json", config=world["config"]).stdout)
    newest = {h["host"]: h["changed"] for h in as_json["results"][0]["hosts"]}
    assert newest == {"one": 0, "two": 1}

    # The drift was put back by that pass: status says so, not "drift: yes".
    status = json.loads(agent("status", "--json", config=world["config"]).stdout)
    unit = next(u for u in status["units"] if u["unit"] == "box")
    assert unit["drift"] is False and unit["drift_reverted"] is True
    text = agent("status", config=world["config"]).stdout
    box_line = next(line for line in text.splitlines() if line.startswith("box "))
    assert "reverted" in box_line and " yes " not in box_line


def test_a_failing_host_is_named_in_the_fleet_result(world: dict, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be\n")
    manifest = MANIFEST.format(root=world["files"]).replace(
        "b: [{file: " + str(world["files"]) + '/b.txt, content: "b\\n"}]',
        "b: [{file: " + str(blocker) + '/b.txt, content: "b\\n"}]',
    )
    world["repo"].write("gitops.yaml", manifest)
    world["repo"].push("host two cannot converge")
    result = reconcile(world, "--json")
    assert result.returncode == 1
    box = json.loads(result.stdout)["units"]["box"]
    assert box["failed_hosts"] == ["two"] and box["changed_hosts"] == ["one"]
    assert {h["host"]: h["status"] for h in box["hosts"]} == {"one": "ok", "two": "failed"}


def test_suspended_units_are_listed_in_reconcile_output(world: dict) -> None:
    assert reconcile(world).returncode == 0
    assert agent("suspend", "box", config=world["config"]).returncode == 0
    result = reconcile(world)
    assert result.returncode == 0, result.stderr
    assert "  box: suspended, left out (`agent resume box`)" in result.stdout.splitlines()
    as_json = json.loads(reconcile(world, "--json").stdout)
    assert as_json["suspended"] == ["box"] and "box" not in as_json["units"]


def test_json_times_are_rfc3339_with_a_time_zone(world: dict) -> None:
    passed = reconcile(world)
    assert passed.returncode == 0, passed.stderr
    assert agent("suspend", "quick", config=world["config"]).returncode == 0
    config = world["config"]
    status = json.loads(agent("status", "--json", config=config).stdout)
    history = json.loads(agent("history", "--json", config=config).stdout)
    unit_history = json.loads(agent("history", "--unit", "quick", "--json", config=config).stdout)
    times = [
        status["last_run"]["started_at"],
        status["last_run"]["finished_at"],
        status["suspended"]["quick"]["since"],
        history["runs"][0]["started_at"],
        unit_history["results"][0]["finished_at"],
        *(u["updated_at"] for u in status["units"]),
        *(h["at"] for u in status["units"] for h in u.get("hosts", ())),
    ]
    for value in times:
        assert isinstance(value, str) and value.endswith("Z"), value
        assert datetime.fromisoformat(value).utcoffset() is not None
    assert isinstance(history["runs"][0]["duration_s"], float)


def test_a_closed_pipe_ends_quietly(world: dict) -> None:
    assert reconcile(world).returncode == 0
    env = {**os.environ, "GITOPS_AGENT_CONFIG": str(world["config"])}
    for command in (["status", "--json"], ["logs", "quick"], ["history"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        proc.stdout.close()  # the reader is gone before anything is written (as `| head`)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 141, (command, stderr.decode())
        assert stderr == b"", (command, stderr.decode())


def test_an_unknown_unit_exits_5_and_records_no_run(world: dict) -> None:
    assert reconcile(world).returncode == 0
    runs = json.loads(agent("history", "--json", config=world["config"]).stdout)["runs"]
    result = reconcile(world, "--unit", "nope")
    assert result.returncode == 5, result.stdout + result.stderr
    assert "no unit named 'nope'" in result.stderr and "quick" in result.stderr
    after = json.loads(agent("history", "--json", config=world["config"]).stdout)["runs"]
    assert [r["id"] for r in after] == [r["id"] for r in runs]


def test_detailed_exitcode(world: dict) -> None:
    def code(*args: str) -> int:
        return reconcile(world, "--detailed-exitcode", *args).returncode

    assert code("--dry-run") == 2  # changes pending
    assert code() == 0  # applied: nothing left to do
    assert code("--dry-run") == 0  # nothing to do
    (world["files"] / "a.txt").write_text("edited by hand\n")
    assert code("--dry-run") == 2  # drift found, not put back
    assert code() == 0  # put back
    assert reconcile(world, "--dry-run").returncode == 0  # without the flag: 0 as before

    # Usage errors: 2 as ever, 64 when 2 would mean "changes".
    assert agent("reconcile", "--nope", config=world["config"]).returncode == 2
    assert code("--nope") == 64
    assert agent("reconcile", "--detailed", "--nope", config=world["config"]).returncode == 64

    world["repo"].write("stacks/quick/main.tf", "this is not HCL {\n")
    world["repo"].push("broken stack")
    assert code() == 1  # a failure wins over changes


def test_detailed_exitcode_for_drift_reported(world: dict) -> None:
    manifest = MANIFEST.format(root=world["files"])
    manifest = manifest.replace("  - name: box\n", "  - name: box\n    drift: report\n")
    world["repo"].write("gitops.yaml", manifest)
    world["repo"].push("drift of box is only reported")
    assert reconcile(world, "--detailed-exitcode").returncode == 0
    (world["files"] / "b.txt").write_text("edited by hand\n")
    result = reconcile(world, "--detailed-exitcode")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "drifted (reported, left as they are) on 1 of 2 hosts (two)" in result.stdout


def test_every_command_has_a_description_an_example_and_option_help() -> None:
    from agent.cli.main import EXIT_CODES, build_parser

    parser = build_parser()
    assert EXIT_CODES in agent("--help").stdout
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) >= {"reconcile", "run", "status", "logs", "completion"}
    for name, sub in commands.choices.items():
        assert sub.description and sub.epilog and "example" in sub.epilog, name
        assert f"agent {name}" in sub.epilog or name == "run", name
        for action in sub._actions:
            assert action.help, f"agent {name}: {action.dest} has no help text"


def test_bash_completion_completes_commands_and_options(tmp_path: Path) -> None:
    result = agent("completion", "bash")
    assert result.returncode == 0, result.stderr
    script = tmp_path / "agent.bash"
    script.write_text(result.stdout)

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        probe = (
            f"source {script}\n"
            f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE='{line}'\n"
            f"COMP_POINT=${{#COMP_LINE}}; _shtab_agent; printf '%s\\n' \"${{COMPREPLY[@]}}\"\n"
        )
        done = subprocess.run(
            ["bash", "--norc", "-c", probe], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert "reconcile" in complete("agent", "rec")
    assert "--detailed-exitcode" in complete("agent", "reconcile", "--det")


def test_json_times_are_converted_by_key_and_nothing_else() -> None:
    from agent.cli.views import as_json

    view = {
        "started_at": 0,
        "runs": [{"at": 1.5, "finished_at": None, "duration_s": 2.5, "drift": True}],
        "hosts": {"web1": {"since": 86400.25, "changed": 3, "preview_at": 60}},
    }
    assert as_json(view) == {
        "started_at": "1970-01-01T00:00:00.000Z",
        "runs": [{"at": "1970-01-01T00:00:01.500Z", "finished_at": None, "duration_s": 2.5,
                  "drift": True}],
        "hosts": {"web1": {"since": "1970-01-02T00:00:00.250Z", "changed": 3,
                           "preview_at": "1970-01-01T00:01:00.000Z"}},
    }  # fmt: skip
