"""Logs and plan files of a PostgreSQL store, read from any agent (docs/store.md): a destroy
held on bastion A is shown by `agent logs` and the web page on bastion B, approved and
applied on B from the plan A saved; A then refuses to apply it again. Terraform state is in
PostgreSQL (the `pg` backend), so both bastions plan against the same state. A SQLite store
keeps nothing of these files."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import psycopg

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.layout import StateLayout
from agent.state.runfiles import MAX_FILE_BYTES, RunFiles
from agent.state.store import RunStore, UnitStatus
from agent.web.pages import unit_page
from tests.support.infra import InfraRepo, agent_cli, write_host_config
from tests.support.postgres import PostgresCluster

STACK = 'resource "terraform_data" "{name}" {{\n  input = "kept-{name}"\n}}\n'


def stack(names: list[str]) -> str:
    return "".join(STACK.format(name=name) for name in names)


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_a_plan_held_on_one_bastion_is_read_and_approved_on_another(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    store_url = postgres_cluster.create_database("files_store")
    state_url = postgres_cluster.create_database("files_state")
    url_file = secret_file(tmp_path / "store-url", store_url)
    conn_file = secret_file(tmp_path / "state-conn", state_url)
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/app/main.tf", stack(["a", "b"]))
    repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    repo.push("seed")
    extra = f"control_socket: {tmp_path}/none.sock\nstore:\n  url_file: {url_file}\n"
    configs = {}
    for name in ("a", "b"):
        config = write_host_config(tmp_path / f"{name}.yaml", repo.url, tmp_path / name, extra)
        text = config.read_text().replace(
            "  lock_timeout: 10s\n",
            f"  lock_timeout: 10s\n  state_backend:\n    pg: {{conn_str_file: {conn_file}}}\n",
        )
        config.write_text(text)
        configs[name] = config

    bastion_a = Reconciler(load_host_config(configs["a"]))
    try:
        assert bastion_a.run_pass(PassRequest(trigger="cli")).ok
        repo.write("stacks/app/main.tf", stack(["a"]))
        repo.push("drop b")
        held = bastion_a.run_pass(PassRequest(trigger="cli"))
    finally:
        bastion_a.close()
    assert held.outcomes["app"].status is UnitStatus.HELD, held.outcomes
    on_a = tmp_path / "a" / "runs" / held.run_id / "app"
    assert (on_a / "tfplan").is_file()
    assert not (tmp_path / "b" / "runs").exists()  # B never ran anything

    # B reads A's output from the store: the same bytes as on A's disk.
    logs = agent_cli(configs["b"], "logs", "app", "--json")  # its latest run with output
    assert logs.returncode == 0, logs.stderr
    view = json.loads(logs.stdout)
    assert view["run"] == held.run_id
    assert "terraform_data.b will be destroyed" in view["files"]["plan.txt"]
    assert view["files"]["plan.txt"] == (on_a / "plan.txt").read_text()
    store_b = RunStore(tmp_path / "b", url=store_url, read_only=True)
    try:
        page = unit_page(store_b, StateLayout(tmp_path / "b"), None, lambda sha: None, "app")
    finally:
        store_b.close()
    assert page["held"]["command"] == f"agent approve {held.run_id} --unit app"
    assert any("terraform_data.b will be destroyed" in text for _, text in page["held"]["plan"])
    assert page["output"]["run"] == held.run_id

    # B applies the plan A saved; nothing else is planned.
    approved = agent_cli(configs["b"], "approve", held.run_id)
    assert approved.returncode == 0, approved.stderr
    with psycopg.connect(store_url) as db:
        rows = db.execute(
            "SELECT run_id, name FROM run_files WHERE unit = 'app' ORDER BY run_id, name"
        ).fetchall()
        status = db.execute("SELECT last_status, last_decision FROM unit_state").fetchone()
        [(approve_run,)] = db.execute("SELECT run_id FROM approvals").fetchall()
    assert status == ("ok", "apply")
    names = {run: [n for r, n in rows if r == run] for run, _ in rows}
    assert "tfplan" not in names[held.run_id]  # consumed: no second apply from the store
    assert "apply.txt" in names[approve_run]

    # A sees B's apply log, and refuses to apply its own copy of the plan again.
    logs_a = agent_cli(configs["a"], "logs", "app", "--run", approve_run)
    assert logs_a.returncode == 0, logs_a.stderr
    assert "Destruction complete" in logs_a.stdout or "Apply complete" in logs_a.stdout
    again = agent_cli(configs["a"], "approve", held.run_id)
    assert again.returncode != 0
    assert f"the plan of app in run {held.run_id} was already approved" in again.stderr


def test_a_sqlite_store_keeps_the_files_on_disk_only(tmp_path: Path) -> None:
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/app/main.tf", stack(["a"]))
    repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    repo.push("seed")
    config = write_host_config(tmp_path / "agent.yaml", repo.url, tmp_path / "state")
    reconciler = Reconciler(load_host_config(config))
    try:
        result = reconciler.run_pass(PassRequest(trigger="cli"))
    finally:
        reconciler.close()
    assert result.ok, result.error
    assert (tmp_path / "state" / "runs" / result.run_id / "app" / "plan.txt").is_file()
    with sqlite3.connect(tmp_path / "state" / "agent.db") as db:
        assert db.execute("SELECT count(*) FROM run_files").fetchone() == (0,)


def test_the_store_keeps_each_file_up_to_its_cap_and_one_held_plan_per_unit(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    store = RunStore(tmp_path / "a", url=postgres_cluster.create_database("files_cap"))
    try:
        files = RunFiles(store)
        big = b"+ resource\n" * (MAX_FILE_BYTES // 11 + 10)
        for run in ("r-1", "r-2"):
            folder = tmp_path / "a" / "runs" / run / "app"
            folder.mkdir(parents=True)
            (folder / "plan.txt").write_bytes(big)
            (folder / "plan.json").write_bytes(b"[" + b"0," * (MAX_FILE_BYTES // 2) + b"0]")
            (folder / "tfplan").write_bytes(f"plan of {run}".encode())
            files.save_unit(run, "app")
        elsewhere = RunFiles(store, StateLayout(tmp_path / "b"))  # another agent's disk
        text = elsewhere.read_text("r-2", "app", "plan.txt")
        assert text is not None and len(text.encode()) == MAX_FILE_BYTES
        assert text.endswith(
            f"the whole file is {tmp_path}/a/runs/r-2/app/plan.txt on the agent"
            " that ran the unit)\n"
        )
        assert big.startswith(text.split("\n... (cut at 16 MiB")[0].encode())
        assert elsewhere.read("r-2", "app", "plan.json") is None  # useless cut: not stored
        # Held again: only the newest plan can be approved, from any agent.
        assert elsewhere.read("r-1", "app", "tfplan") is None
        assert sorted(elsewhere.restore("r-2", "app")) == ["plan.txt", "tfplan"]
        assert (tmp_path / "b" / "runs" / "r-2" / "app" / "tfplan").read_bytes() == b"plan of r-2"
        assert (
            oct((tmp_path / "b" / "runs" / "r-2" / "app" / "tfplan").stat().st_mode & 0o777)
            == "0o600"
        )
    finally:
        store.close()
