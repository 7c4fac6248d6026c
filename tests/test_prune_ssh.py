"""Prune of a removed fleet over real SSH: two OpenSSH servers on 127.0.0.1, each reached
with the user and port the removed unit's last definition gave it. A commit renames the
fleet and keeps only one host: what the new unit lists stays, the rest goes (with
`policy.prune: auto`), host by host. No mocks."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.store import UnitStatus
from tests.support.infra import InfraRepo, write_host_config
from tests.support.sshd import SshServer, chown_tree, ensure_user, make_client_key, public_key


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    reason = SshServer.available()
    if reason:
        pytest.skip(reason)
    ensure_user()
    key = make_client_key(tmp_path_factory.mktemp("keys") / "id_ed25519")
    with SshServer() as web1, SshServer() as web2:
        for server in (web1, web2):
            server.add_authorized_key(server.user, public_key(key))
        yield {"web1": web1, "web2": web2, "key": key}


@pytest.fixture
def world(servers: dict, tmp_path: Path) -> Iterator[dict]:
    # The hosts share this machine's file system: each host's files live in its own dir.
    root = Path(tempfile.mkdtemp(prefix="gitops-prune-", dir="/tmp"))
    for name in ("web1", "web2"):
        (root / name).mkdir()
    chown_tree(root, servers["web1"].user)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        servers["web1"].known_hosts_line() + "\n" + servers["web2"].known_hosts_line() + "\n"
    )
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/base/main.tf", 'resource "terraform_data" "x" {}\n')
    config = write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        tmp_path / "state",
        f"""\
        hosts:
          key_file: {servers["key"]}
          known_hosts: {known_hosts}
          connect_timeout: 3s
        policy: {{prune: auto}}
        """,
    )
    yield {"repo": repo, "config": config, "root": root, "servers": servers}
    shutil.rmtree(root, ignore_errors=True)


def fleet(world: dict, name: str, hosts: tuple[str, ...]) -> str:
    servers = world["servers"]
    static = "".join(
        f"          - {{name: {h}, address: 127.0.0.1, port: {servers[h].port}, roles: [{h}]}}\n"
        for h in hosts
    )
    return f"""\
  - name: {name}
    fleet:
      user: {servers["web1"].user}
      hosts:
        static:
{static}"""


def roles(world: dict) -> str:
    root = world["root"]
    text = "roles:\n"
    for host in ("web1", "web2"):
        text += f"""\
  {host}:
    - directory: {root}/{host}/etc
    - file: {root}/{host}/etc/motd
      content: "hello\\n"
"""
    return text


def push(world: dict, units: str, message: str) -> None:
    world["repo"].write(
        "gitops.yaml",
        "version: 1\nunits:\n  - {name: base, stack: stacks/base}\n" + units + roles(world),
    )
    world["repo"].push(message)


def run(world: dict) -> dict:
    reconciler = Reconciler(load_host_config(world["config"]))
    try:
        return reconciler.run_pass(PassRequest(trigger="test")).outcomes
    finally:
        reconciler.close()


def test_a_renamed_fleet_keeps_what_the_new_unit_lists_and_removes_the_rest(
    world: dict,
) -> None:
    root = world["root"]
    push(world, fleet(world, "web", ("web1", "web2")), "web on two hosts")
    first = run(world)
    assert first["web"].status is UnitStatus.OK, first["web"].error
    for host in ("web1", "web2"):
        assert (root / host / "etc" / "motd").read_text() == "hello\n"

    # Renamed to `site`, on web1 only: `web` is removed, and its port and user are only in
    # its last definition.
    push(world, fleet(world, "site", ("web1",)), "rename web to site, web1 only")
    outcomes = run(world)
    assert outcomes["site"].status is UnitStatus.OK, outcomes["site"].error
    web = outcomes["web"]
    assert web.status is UnitStatus.OK, web.error
    # web1's objects belong to `site` now: untouched. web2's are removed over SSH.
    assert (root / "web1" / "etc" / "motd").read_text() == "hello\n"
    assert not (root / "web2" / "etc").exists()
    # Only hosts whose records still hold objects of `web` are visited.
    assert [h.host for h in web.hosts] == ["web2"]  # type: ignore[attr-defined]

    # Pruned: a further pass leaves web1 alone and has nothing of `web` to do.
    again = run(world)
    assert "web" not in again
    assert (root / "web1" / "etc" / "motd").read_text() == "hello\n"
