"""Fleet units in real passes over real SSH: two OpenSSH servers on 127.0.0.1 (the hosts),
one closed port (an unreachable host), files, templates with a secret, links and guarded
commands; drift put back, reported, removed resources deleted, bad input named."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.store import UnitStatus
from tests.support.infra import InfraRepo, write_host_config
from tests.support.sshd import (
    SshServer,
    _free_port,
    chown_tree,
    ensure_user,
    make_client_key,
    public_key,
)

SECRET = "fleet-secret-6d1c0a77e2"


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
    root = Path(tempfile.mkdtemp(prefix="gitops-fleet-", dir="/tmp"))
    for name in ("web1", "web2"):
        (root / name).mkdir()
    chown_tree(root, servers["web1"].user)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        servers["web1"].known_hosts_line() + "\n" + servers["web2"].known_hosts_line() + "\n"
    )
    secret_file = tmp_path / "motd-secret"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o600)
    repo = InfraRepo(tmp_path / "git")
    repo.write("templates/app.conf.j2", "name={{ host.name }}\nworkers={{ workers }}\n")
    repo.write("templates/secret.conf.j2", "password={{ secrets.motd }}\n")
    config = write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        tmp_path / "state",
        f"""\
        hosts:
          key_file: {servers["key"]}
          known_hosts: {known_hosts}
          connect_timeout: 3s
        secrets:
          allowed: ["file:{tmp_path}/"]
        """,
    )
    yield {"repo": repo, "config": config, "root": root, "servers": servers, "tmp": tmp_path}
    shutil.rmtree(root, ignore_errors=True)


def manifest(
    world: dict, *, drift: str = "revert", extra_host: str = "", web1_role: str = ""
) -> str:
    root, servers = world["root"], world["servers"]
    hosts = "".join(
        f"          - {{name: {n}, address: 127.0.0.1, port: {servers[n].port},"
        f" roles: [{n}], vars: {{workers: {i + 2}}}}}\n"
        for i, n in enumerate(("web1", "web2"))
    )
    roles = ""
    for name in ("web1", "web2"):
        base = root / name
        roles += f"""\
  {name}:
    - directory: {base}/etc
      mode: "0755"
    - file: {base}/etc/motd
      content: "hello from git\\n"
      mode: "0644"
    - template: {base}/etc/app.conf
      source: templates/app.conf.j2
    - template: {base}/etc/secret.conf
      source: templates/secret.conf.j2
      mode: "0600"
    - link: {base}/current
      target: {base}/etc
    - command: seed {name}
      run: "echo seeded > {base}/seeded"
      creates: {base}/seeded
"""
    roles += web1_role
    return f"""\
version: 1
units:
  - name: web
    drift: {drift}
    secrets: {{motd: "file:{world["tmp"]}/motd-secret"}}
    fleet:
      user: gitops-test
      hosts:
        static:
{hosts}{extra_host}
roles:
{roles}"""


def push(world: dict, text: str) -> None:
    world["repo"].write("gitops.yaml", text)
    world["repo"].push("fleet")


def run(world: dict, **request: object):
    reconciler = Reconciler(load_host_config(world["config"]))
    try:
        return reconciler.run_pass(PassRequest(trigger="test", **request))  # type: ignore[arg-type]
    finally:
        reconciler.close()


def host_state(world: dict, host: str) -> dict:
    return json.loads(
        (world["tmp"] / "state" / "units" / "web" / "hosts" / f"{host}.json").read_text()
    )


def test_a_fleet_converges_and_a_second_pass_costs_one_round_trip_per_host(world: dict) -> None:
    push(world, manifest(world))

    first = run(world)

    assert first.ok, first.error
    assert first.outcomes["web"].decision == "apply"
    for index, name in enumerate(("web1", "web2")):
        base = world["root"] / name
        assert (base / "etc" / "motd").read_text() == "hello from git\n"
        assert oct((base / "etc" / "motd").stat().st_mode & 0o777) == "0o644"
        assert (base / "etc" / "app.conf").read_text() == f"name={name}\nworkers={index + 2}\n"
        assert (base / "etc" / "secret.conf").read_text() == f"password={SECRET}\n"
        assert (base / "current").resolve() == base / "etc"
        assert (base / "seeded").read_text() == "seeded\n"

    second = run(world)

    assert second.ok and second.outcomes["web"].decision == "nothing"
    assert [host_state(world, n)["round_trips"] for n in ("web1", "web2")] == [1, 1]
    # The secret went to the host but never into what the agent keeps.
    state = world["tmp"] / "state"
    assert not [p for p in state.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_drift_on_a_host_is_put_back_and_shown(world: dict) -> None:
    push(world, manifest(world))
    assert run(world).ok
    motd = world["root"] / "web2" / "etc" / "motd"
    motd.write_text("edited by hand\n")

    dry = run(world, dry_run=True)
    assert dry.outcomes["web"].decision == "plan-only" and dry.outcomes["web"].drift
    assert motd.read_text() == "edited by hand\n"
    hosts_txt = next((world["tmp"] / "state" / "runs").glob(f"{dry.run_id}/web/hosts.txt"))
    assert "-edited by hand" in hosts_txt.read_text() and "+hello from git" in hosts_txt.read_text()

    result = run(world)

    assert result.ok and result.outcomes["web"].drift
    assert result.outcomes["web"].decision == "apply"
    assert motd.read_text() == "hello from git\n"


def test_drift_reported_is_left_alone(world: dict) -> None:
    push(world, manifest(world, drift="report"))
    assert run(world).ok
    motd = world["root"] / "web1" / "etc" / "motd"
    motd.write_text("edited by hand\n")

    result = run(world)

    assert result.outcomes["web"].decision == "report" and result.outcomes["web"].drift
    assert motd.read_text() == "edited by hand\n"


def test_a_resource_removed_from_the_repo_is_removed_from_the_host(world: dict) -> None:
    extra = f"""\
  extra:
    - file: {world["root"]}/web1/etc/extra
      content: "x\\n"
"""
    text = manifest(world, web1_role=extra).replace("roles: [web1]", "roles: [web1, extra]")
    push(world, text)
    assert run(world).ok
    assert (world["root"] / "web1" / "etc" / "extra").exists()

    push(world, manifest(world))  # as a `git revert` would leave it
    result = run(world)

    # The host config's policy.destroy is hold (the default): the removal is shown and held.
    assert result.ok, result.error
    assert result.outcomes["web"].status is UnitStatus.HELD, result.outcomes["web"]
    assert (world["root"] / "web1" / "etc" / "extra").exists()

    reconciler = Reconciler(load_host_config(world["config"]))
    try:
        approved = reconciler.approve(result.run_id)
    finally:
        reconciler.close()

    assert approved.ok, approved.error
    assert approved.outcomes["web"].status is UnitStatus.OK, approved.outcomes["web"]
    assert not (world["root"] / "web1" / "etc" / "extra").exists()
    assert (world["root"] / "web1" / "etc" / "motd").exists()


def test_an_unreachable_host_fails_alone_and_is_named(world: dict) -> None:
    closed = _free_port()
    extra = f"          - {{name: web3, address: 127.0.0.1, port: {closed}, roles: [web1]}}\n"
    push(world, manifest(world, extra_host=extra))

    result = run(world)

    web = result.outcomes["web"]
    assert web.status is UnitStatus.FAILED
    assert "web3" in (web.error or "") and "1 of 3 hosts failed" in (web.error or "")
    assert (world["root"] / "web2" / "etc" / "motd").exists()
    assert host_state(world, "web2")["status"] == "ok"


def test_a_host_that_accepts_tcp_but_never_speaks_ssh_does_not_hold_the_others(
    world: dict,
) -> None:
    # A hung sshd: the kernel accepts the connection (listen backlog), nothing answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        extra = (
            f"          - {{name: hung, address: 127.0.0.1, port: {port}, roles: [web1],"
            " vars: {workers: 9}}\n"
        )
        push(world, manifest(world, extra_host=extra))

        result = run(world)

    web = result.outcomes["web"]
    assert web.status is UnitStatus.FAILED
    # Failed alone, on its own connect_timeout (3s in the host config), not left hanging.
    assert "1 of 3 hosts failed: hung: " in (web.error or ""), web.error
    assert "did not answer within 3s" in (web.error or ""), web.error
    for name in ("web1", "web2"):
        assert (world["root"] / name / "etc" / "motd").read_text() == "hello from git\n"
        assert host_state(world, name)["status"] == "ok"
        # Recorded as soon as each was done, while the hung host was still being waited for.
        assert host_state(world, name)["at"] < host_state(world, "hung")["at"]
    assert host_state(world, "hung")["status"] == "failed"


def test_an_unknown_host_key_is_refused_and_names_the_host(world: dict) -> None:
    (world["tmp"] / "known_hosts").write_text(world["servers"]["web1"].known_hosts_line() + "\n")
    push(world, manifest(world))

    result = run(world)

    error = result.outcomes["web"].error or ""
    assert "web2" in error and "SHA256:" in error
    # The host named once, up front (it was `(web2): web2: web2: the host key ...`).
    assert error.startswith("1 of 2 hosts failed: web2: the host key of 127.0.0.1:"), error
    assert error.count("web2") == 1, error
    assert host_state(world, "web2")["error"].startswith("the host key of "), host_state(
        world, "web2"
    )
    assert not (world["root"] / "web2" / "etc").exists()
    assert (world["root"] / "web1" / "etc" / "motd").exists()


def test_an_undefined_template_variable_names_host_template_and_line(world: dict) -> None:
    world["repo"].write("templates/app.conf.j2", "name={{ host.name }}\nport={{ port }}\n")
    push(world, manifest(world))

    result = run(world)

    error = result.outcomes["web"].error or ""
    assert "web1: templates/app.conf.j2:2: 'port' is undefined" in error
    assert not (world["root"] / "web1" / "etc").exists()


def test_status_and_logs_show_each_host(world: dict) -> None:
    push(world, manifest(world))
    assert run(world).ok
    (world["root"] / "web1" / "etc" / "motd").write_text("edited by hand\n")
    assert run(world, dry_run=True).outcomes["web"].drift
    env = {**os.environ, "GITOPS_AGENT_CONFIG": str(world["config"])}

    def agent(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        return done.stdout

    status = agent("status")
    assert "hosts of web:" in status
    assert re.search(r"web1\s+127\.0\.0\.1\s+\w+\s+ok, 1 would change", status), status
    assert re.search(r"web2\s+127\.0\.0\.1\s+\w+\s+ok\s", status), status
    hosts = {h["host"]: h for h in json.loads(agent("status", "--json"))["units"][0]["hosts"]}
    assert hosts["web1"]["pending"] == 1 and hosts["web2"]["pending"] == 0
    logs = agent("logs", "web")
    assert "web1: 1 would change" in logs
    assert f"file:{world['root']}/web1/etc/motd: would-change" in logs
    assert "+hello from git" in logs
