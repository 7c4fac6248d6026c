"""Proposal plans of fleet units over real SSH: two OpenSSH servers on 127.0.0.1, a real
bare remote with proposal refs, a main pass that converges the hosts for real, then one
poll that plans four proposals. No mocks. What is checked is what a reviewer and an
operator would check: the counts and lines shown, and that the hosts did not change (file
contents, marker files a guard would write, sshd's log of who connected)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli.proposals import proposal_logs_view
from agent.config import ManifestLimits, load_host_config
from agent.config.manifest import parse_manifest
from agent.core.redact import Redactor
from agent.engine.proposals import ProposalPlanner
from agent.engine.reconcile import PassRequest, Reconciler
from agent.service.proposal_forge import comment_of
from agent.state.proposals import ProposalRecords
from agent.state.store import RunStore
from agent.units.proposal_fleet import NOT_EVALUATED, aim_refusal
from agent.units.proposal_unit import NeedsSecrets, UnitPlan, applied_outputs
from tests.support.infra import InfraRepo, git, write_host_config
from tests.support.sshd import (
    SshServer,
    _free_port,
    chown_tree,
    ensure_user,
    make_client_key,
    public_key,
)

TOKEN = "fleet-proposal-token-3e9a51c7"
PRIVATE = "host-private-text-81c2"


def manifest(world: dict, *, port: int | None = None, extra: str = "") -> str:
    """Three fleet units on host web1: `web` (no secrets), `vault` (secrets, listed in
    proposals.secrets_for), `db` (secrets, not listed)."""
    root, web1 = world["root"], world["web1"]
    hosts = f"      hosts: {{static: [{{name: web1, address: 127.0.0.1, port: {web1.port}}}]}}\n"
    units = ""
    for name, secret in (("web", ""), ("vault", "token"), ("db", "token")):
        secrets = f'    secrets: {{token: "file:{world["tmp"]}/token"}}\n' if secret else ""
        template = "app.conf.j2" if name == "web" else "secret.conf.j2"
        units += (
            f"  - name: {name}\n{secrets}    fleet:\n      user: gitops-test\n"
            + (hosts.replace(str(web1.port), str(port)) if port and name == "web" else hosts)
            + f"      resources:\n"
            f"        - template: {root}/{name}.conf\n"
            f"          source: templates/{template}\n" + (extra if name == "web" else "")
        )
    return f"version: 1\nunits:\n{units}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    reason = SshServer.available()
    if reason:
        pytest.skip(reason)
    ensure_user()
    tmp = tmp_path_factory.mktemp("fleetprop")
    key = make_client_key(tmp / "id_ed25519")
    root = Path(tempfile.mkdtemp(prefix="gitops-fleetprop-", dir="/tmp"))
    with SshServer() as web1, SshServer() as other:
        for server in (web1, other):
            server.add_authorized_key(server.user, public_key(key))
        chown_tree(root, web1.user)
        known_hosts = tmp / "known_hosts"
        known_hosts.write_text(web1.known_hosts_line() + "\n" + other.known_hosts_line() + "\n")
        (tmp / "token").write_text(TOKEN)
        (tmp / "token").chmod(0o600)
        world = {"root": root, "web1": web1, "other": other, "tmp": tmp}
        repo = InfraRepo(tmp / "git")
        repo.write("templates/app.conf.j2", "workers={{ 2 }}\n")
        repo.write("templates/secret.conf.j2", "token={{ secrets.token }}\n")
        repo.write("gitops.yaml", manifest(world))
        repo.push("seed")
        config = write_host_config(
            tmp / "agent.yaml",
            repo.url,
            tmp / "state",
            f"""\
            hosts:
              key_file: {key}
              known_hosts: {known_hosts}
              connect_timeout: 3s
            secrets:
              allowed: ["file:{tmp}/"]
            proposals:
              refs: ["refs/pull/*/head"]
              authors: ["*@example.invalid"]
              secrets_for: [vault]
              sandbox: none
            """,
        )
        reconciler = Reconciler(load_host_config(config))
        try:
            applied = reconciler.run_pass(PassRequest(trigger="test"))
        finally:
            reconciler.close()
        assert applied.ok, applied.error

        def propose(ref: str, files: dict[str, str]) -> None:
            git(repo.work, "checkout", "-q", "-B", "proposal", "main")
            for path, text in files.items():
                repo.write(path, text)
            git(repo.work, "add", "-A")
            git(repo.work, "commit", "-q", "--author=P <p@example.invalid>", "-m", ref)
            git(repo.work, "push", "-q", "--force", "origin", f"HEAD:{ref}")
            git(repo.work, "checkout", "-q", "main")

        marker = root / "guard-ran"
        ran = root / "command-ran"
        # A file of the host that the repository does not manage, named by a proposal.
        (root / "private.txt").write_text(PRIVATE)
        before = {p.name: p.read_bytes() for p in root.iterdir()}
        other_log = other.log()
        propose("refs/pull/1/head", {"templates/app.conf.j2": "workers={{ 8 }}\n"})
        guarded = (
            f"        - command: mark\n"
            f'          run: "touch {ran}"\n'
            f'          unless: "touch {marker}; false"\n'
            f"        - file: {root}/private.txt\n"
            f"          content: guess\n"
        )
        propose("refs/pull/2/head", {"gitops.yaml": manifest(world, extra=guarded)})
        propose("refs/pull/3/head", {"gitops.yaml": manifest(world, port=other.port)})
        planner = ProposalPlanner(load_host_config(config))
        try:
            planner.poll()
        finally:
            planner.close()
        store = RunStore(tmp / "state")
        try:
            records = ProposalRecords(store)
            rows = {row.ref: row for row in records.all()}
            logs = {
                ref: {
                    u.unit: proposal_logs_view(records, tmp / "state" / "proposals", u.unit, ref)
                    for u in rows[ref].units
                }
                for ref in rows
            }
        finally:
            store.close()
        world.update(
            rows=rows,
            logs=logs,
            before=before,
            marker=marker,
            ran=ran,
            other_log=other_log,
            proposals=tmp / "state" / "proposals",
            config=config,
        )
        yield world
    shutil.rmtree(root, ignore_errors=True)


def units(world: dict, ref: str) -> dict:
    return {u.unit: u for u in world["rows"][ref].units}


def test_a_changed_template_is_counted_per_host_and_the_host_is_left_as_it_was(world) -> None:
    web = units(world, "refs/pull/1/head")["web"]
    assert (web.status, web.counts) == ("changes", "+0 ~1 -0"), web
    text = world["logs"]["refs/pull/1/head"]["web"]["logs"]["plan.txt"]
    assert f"template:{world['root']}/web.conf: would-change" in text
    assert "== web1: +0 ~1 -0 (1 round trip" in text
    assert "workers" not in text  # no content diff: it would show the host's file
    assert {p.name: p.read_bytes() for p in world["root"].iterdir()} == world["before"]
    assert (world["root"] / "web.conf").read_text() == "workers=2\n"
    # The forge comment carries the same plan.
    comment = comment_of(world["rows"]["refs/pull/1/head"], world["proposals"])
    assert "| web | changes +0 ~1 -0 |" in comment and "would-change" in comment


def test_a_proposed_command_and_its_guard_never_run(world) -> None:
    web = units(world, "refs/pull/2/head")["web"]
    assert (web.status, web.counts) == ("changes", "+0 ~2 -0"), web
    text = world["logs"]["refs/pull/2/head"]["web"]["logs"]["plan.txt"]
    assert f"command:mark: would-change\n    {NOT_EVALUATED}" in text
    assert not world["marker"].exists() and not world["ran"].exists()


def test_a_host_file_the_proposal_names_is_compared_by_hash_never_shown(world) -> None:
    text = world["logs"]["refs/pull/2/head"]["web"]["logs"]["plan.txt"]
    assert f"file:{world['root']}/private.txt: would-change\n    content changed (sha256" in text
    for path in world["proposals"].rglob("*"):
        if path.is_file():
            assert PRIVATE.encode() not in path.read_bytes(), path
    assert (world["root"] / "private.txt").read_text() == PRIVATE


def test_a_proposal_aiming_the_unit_at_another_host_is_skipped(world) -> None:
    web = units(world, "refs/pull/3/head")["web"]
    assert web.status == "skipped"
    assert web.detail.startswith("skipped: fleet.hosts differ from the revision in force")
    assert f"host web1: gitops-test@127.0.0.1:{world['web1'].port}" not in web.detail
    assert f"@127.0.0.1:{world['other'].port}" in web.detail
    # The other server never saw a connection from the agent.
    assert world["other"].log() == world["other_log"]
    assert "Accepted" not in world["other"].log()


def test_secrets_only_for_the_units_proposals_secrets_for_lists(world) -> None:
    planned = units(world, "refs/pull/1/head")
    assert planned["db"].status == "skipped"
    assert planned["db"].detail == (
        "skipped: needs secrets (token); proposals.secrets_for does not list it"
    )
    assert (planned["vault"].status, planned["vault"].counts) == ("no-changes", "+0 ~0 -0")
    for path in world["proposals"].rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


LIMITS = ManifestLimits(allowed_paths=("stacks",), max_unit_timeout=7200.0)


def fleet_unit(tmp_path: Path, fleet: str):
    (tmp_path / "stacks" / "net").mkdir(parents=True, exist_ok=True)
    (tmp_path / "stacks" / "net" / "main.tf").write_text('output "hosts" {\n  value = []\n}\n')
    text = (
        "version: 1\nunits:\n  - {name: net, stack: stacks/net}\n"
        f"  - name: web\n    fleet:\n{fleet}      resources: []\n"
    )
    return parse_manifest(text, "gitops.yaml", tmp_path, LIMITS).get_unit("web")


@pytest.mark.parametrize(
    ("proposed", "reason"),
    [
        ("      hosts: {static: [{name: a, address: 10.0.0.1}]}\n", None),
        ("      hosts: {static: [{name: a, address: 10.0.0.1, vars: {x: 1}}]}\n", None),
        ("      hosts: {static: [{name: a, address: 10.0.0.2}]}\n", "host a: @10.0.0.1:"),
        (
            "      hosts: {static: [{name: a, address: 10.0.0.1, port: 2200}]}\n",
            "-> @10.0.0.1:2200",
        ),
        ("      hosts: {static: [{name: b, address: 10.0.0.1}]}\n", "host a removed"),
        ("      user: root\n      hosts: {static: [{name: a, address: 10.0.0.1}]}\n", "fleet.user"),
        ("      port: 2222\n      hosts: {static: [{name: a, address: 10.0.0.1}]}\n", "fleet.port"),
        ("      become: true\n      hosts: {static: [{name: a, address: 10.0.0.1}]}\n", "become"),
        ("      hosts: {from_stack: {unit: net, output: hosts}}\n", "where the hosts come from"),
    ],
)
def test_the_aim_rule(tmp_path: Path, proposed: str, reason: str | None) -> None:
    main = fleet_unit(tmp_path, "      hosts: {static: [{name: a, address: 10.0.0.1}]}\n")
    refusal = aim_refusal(fleet_unit(tmp_path, proposed), main)
    assert (refusal is None) if reason is None else (reason in (refusal or "")), refusal


def test_a_fleet_new_in_the_proposal_is_skipped(tmp_path: Path) -> None:
    unit = fleet_unit(tmp_path, "      hosts: {static: [{name: a, address: 10.0.0.1}]}\n")
    assert "not a fleet unit at the revision in force" in (aim_refusal(unit, None) or "")


def test_stack_outputs_as_applied_withhold_sensitive_ones_from_untrusted_plans() -> None:
    state = {
        "hosts": {"value": {"web1": "10.0.0.1"}, "sensitive": False},
        "password": {"value": TOKEN, "sensitive": True},
    }
    untrusted = applied_outputs(state, "net", Redactor(), trusted=False)
    assert "password" in untrusted and untrusted["hosts"] == {"web1": "10.0.0.1"}
    with pytest.raises(NeedsSecrets, match="the sensitive output password of net"):
        untrusted["password"]
    redactor = Redactor()
    assert applied_outputs(state, "net", redactor, trusted=True)["password"] == TOKEN
    assert redactor.redact(f"x {TOKEN} y") != f"x {TOKEN} y"


def plan_web(world: dict, tmp_path: Path, template: str, unit: str, hosts: str) -> UnitPlan:
    """Plan fleet unit `web` (`unit`: its lines after the name) of a proposal whose tree
    holds `template` as templates/app.conf.j2, with the main manifest the same."""
    tree = tmp_path / "tree"
    (tree / "templates").mkdir(parents=True)
    (tree / "templates" / "app.conf.j2").write_text(template)
    text = (
        f"version: 1\nunits:\n  - name: web\n{unit}    fleet:\n      user: gitops-test\n"
        f"      hosts: {{static: [{hosts}]}}\n"
        f"      resources:\n        - template: {world['root']}/web.conf\n"
        "          source: templates/app.conf.j2\n"
    )
    limits = ManifestLimits(allowed_paths=("stacks", "templates"), max_unit_timeout=7200.0)
    manifest = parse_manifest(text, "gitops.yaml", tree, limits)
    planner = ProposalPlanner(load_host_config(world["config"]))
    try:
        web = manifest.get_unit("web")
        return planner.fleets.plan(tree, manifest, web, manifest, tmp_path / "run", None, "p-1")
    finally:
        planner.close()


def test_a_host_that_cannot_be_read_fails_the_plan_and_the_others_are_kept(
    world, tmp_path: Path
) -> None:
    hosts = (
        f"{{name: web1, address: 127.0.0.1, port: {world['web1'].port}}},"
        f" {{name: down, address: 127.0.0.1, port: {_free_port()}}},"
        " {name: self, address: local}"
    )
    plan = plan_web(world, tmp_path, "workers={{ 3 }}\n", "", hosts)
    assert plan.status == "failed" and plan.counts == (0, 1, 0), plan
    assert plan.detail.startswith("1 of 3 hosts not planned: down: "), plan.detail
    text = (tmp_path / "run" / "plan.txt").read_text()
    assert "== web1: +0 ~1 -0 (1 round trip" in text
    assert "== down: not read: " in text
    assert "== self: skipped: the agent's own machine is not planned" in text
    assert (world["root"] / "web.conf").read_text() == "workers=2\n"


def test_a_template_that_loops_is_stopped_at_the_units_timeout(world, tmp_path: Path) -> None:
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    hosts = f"{{name: web1, address: 127.0.0.1, port: {world['web1'].port}}}"
    plan = plan_web(world, tmp_path, f"workers=3\n{loops}\n", "    timeout: 2s\n", hosts)
    assert plan.status == "failed", plan
    assert "templates/app.conf.j2:2: rendering took too long" in plan.detail, plan.detail
