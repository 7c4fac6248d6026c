"""Agents sharing one PostgreSQL store agree on the revision in force: a rewritten history
that one agent refused is refused by an agent that joins later with a fresh clone, which
cannot compare (the remote no longer has the revision in force) and must not accept it."""

from __future__ import annotations

from pathlib import Path

from agent.config import load_host_config
from agent.engine.passes import PassResult
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.store import RevisionStatus, RunStore
from tests.support.infra import InfraRepo, git, write_host_config
from tests.support.postgres import PostgresCluster

STACK = 'resource "terraform_data" "x" {\n  input = "%s"\n}\n'


def one_pass(config: Path) -> PassResult:
    reconciler = Reconciler(load_host_config(config))
    try:
        return reconciler.run_pass(PassRequest(trigger="cli"))
    finally:
        reconciler.close()


def test_a_rewrite_one_agent_refused_is_refused_by_a_fresh_one(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    store_url = postgres_cluster.create_database("revisions_store")
    state_url = postgres_cluster.create_database("revisions_state")
    for name, text in (("store-url", store_url), ("state-conn", state_url)):
        (tmp_path / name).write_text(text + "\n")
        (tmp_path / name).chmod(0o600)
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/app/main.tf", STACK % "v1")
    repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    first = repo.push("v1")
    extra = f"control_socket: {tmp_path}/none.sock\nstore:\n  url_file: {tmp_path}/store-url\n"
    configs = {}
    for name in ("a", "b"):
        config = write_host_config(tmp_path / f"{name}.yaml", repo.url, tmp_path / name, extra)
        backend = f"  state_backend:\n    pg: {{conn_str_file: {tmp_path}/state-conn}}\n"
        text = config.read_text().replace(
            "  lock_timeout: 10s\n", f"  lock_timeout: 10s\n{backend}"
        )
        config.write_text(text)
        configs[name] = config
    assert one_pass(configs["a"]).ok

    # The history is rewritten: the commit in force is replaced and force-pushed.
    repo.write("stacks/app/main.tf", STACK % "rewritten")
    rewritten = repo.rewrite_history("v1, rewritten")
    git(repo.remote, "reflog", "expire", "--expire=now", "--all")
    git(repo.remote, "gc", "-q", "--prune=now")

    refused = one_pass(configs["a"])
    assert refused.revision == first and refused.head == rewritten
    store = RunStore(tmp_path / "a", url=store_url, read_only=True)
    try:
        status, reason = store.revision_status(rewritten) or (None, None)
    finally:
        store.close()
    assert status is RevisionStatus.REJECTED and "not a fast-forward" in (reason or "")

    # B joins with an empty state directory: its clone has no `first` to compare with.
    joined = one_pass(configs["b"])
    assert not joined.ok and joined.outcomes == {}
    error = joined.error or ""
    assert f"revision {rewritten[:12]} was rejected" in error, error
    assert f"the revision in force {first[:12]} is not in this agent's clone" in error, error
    store = RunStore(tmp_path / "b", url=store_url, read_only=True)
    try:
        assert store.current_revision() == first
        assert store.revision_status(rewritten)[0] is RevisionStatus.REJECTED  # type: ignore[index]
    finally:
        store.close()
