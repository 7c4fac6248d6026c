"""What a fleet removes, and when: real passes on the agent's own machine (`address: local`).

No mocks: a real infra repo, real passes (`Reconciler.run_pass`), the real engine on this
machine's file system under a temp dir, the per-host record on disk. Each test pushes one
revision after another and reads the files the passes left.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, PassResult, Reconciler
from agent.state.hostrecords import FileHostRecords
from agent.state.layout import StateLayout
from agent.state.store import UnitStatus
from agent.units.fleetledger import host_states
from tests.support.infra import InfraRepo, write_host_config


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict]:
    root = Path(tempfile.mkdtemp(prefix="gitops-records-", dir="/tmp"))
    repo = InfraRepo(tmp_path / "git")
    config = {}
    for policy in ("allow", "hold"):
        config[policy] = write_host_config(
            tmp_path / f"agent-{policy}.yaml",
            repo.url,
            tmp_path / "state",
            f"""\
            hosts: {{allow_local: true, python: {sys.executable}}}
            policy: {{destroy: {policy}}}
            """,
        )
    yield {"repo": repo, "config": config, "root": root, "state": tmp_path / "state"}
    shutil.rmtree(root, ignore_errors=True)


def fleet(name: str, resources: str, *, depends_on: str = "") -> str:
    """A fleet unit on this machine with `resources` (YAML list items, 8 spaces in)."""
    after = f"\n    depends_on: [{depends_on}]" if depends_on else ""
    return f"""\
  - name: {name}{after}
    fleet:
      hosts: {{static: [{{name: box, address: local}}]}}
      resources:
{resources}"""


def push(world: dict, *units: str) -> None:
    world["repo"].write("gitops.yaml", "version: 1\nunits:\n" + "".join(units))
    world["repo"].push("change")


def run(world: dict, policy: str = "allow") -> PassResult:
    reconciler = Reconciler(load_host_config(world["config"][policy]))
    try:
        return reconciler.run_pass(PassRequest(trigger="test"))
    finally:
        reconciler.close()


def approve(world: dict, run_id: str) -> PassResult:
    reconciler = Reconciler(load_host_config(world["config"]["hold"]))
    try:
        return reconciler.approve(run_id)
    finally:
        reconciler.close()


def hosts_txt(world: dict, result: PassResult, unit: str) -> str:
    return (world["state"] / "runs" / result.run_id / unit / "hosts.txt").read_text()


def record(world: dict) -> dict:
    return json.loads((world["state"] / "hosts" / "box.json").read_text())


# --- item 1: removal is keyed by path, and checks every current owner on the host --------


def test_a_file_turned_into_a_link_at_the_same_path_is_kept(world: dict) -> None:
    path = world["root"] / "resolv.conf"
    push(world, fleet("web", f'        - file: {path}\n          content: "nameserver 1\\n"\n'))
    assert run(world).outcomes["web"].status is UnitStatus.OK

    push(world, fleet("web", f"        - link: {path}\n          target: /etc/hostname\n"))
    result = run(world)

    assert result.outcomes["web"].status is UnitStatus.OK, result.outcomes["web"]
    assert path.is_symlink() and str(path.readlink()) == "/etc/hostname", hosts_txt(
        world, result, "web"
    )
    assert "remove" not in hosts_txt(world, result, "web")
    entry = record(world)["objects"][f"path:{path}"]
    assert entry["kind"] == "link" and entry["created"] is True


@pytest.mark.parametrize("old_runs_second", [True, False])
def test_a_file_moved_between_two_units_on_one_host_is_never_removed(
    world: dict, old_runs_second: bool
) -> None:
    path = world["root"] / "app.conf"
    item = f'        - file: {path}\n          content: "x=1\\n"\n'
    other = f'        - file: {world["root"]}/other\n          content: "o\\n"\n'
    push(world, fleet("a", item), fleet("b", other))
    assert run(world).ok

    # Now b has it; with depends_on the old owner (a) runs after (or before) the new one.
    a_deps, b_deps = ("b", "") if old_runs_second else ("", "a")
    push(world, fleet("a", other, depends_on=a_deps), fleet("b", item, depends_on=b_deps))
    result = run(world)

    assert all(o.status is UnitStatus.OK for o in result.outcomes.values()), result.outcomes
    assert path.read_text() == "x=1\n"
    assert "remove" not in hosts_txt(world, result, "a") + hosts_txt(world, result, "b")
    entry = record(world)["objects"][f"path:{path}"]
    assert entry["unit"] == "b" and entry["created"] is True

    # Dropped by b too: now nobody owns it, and the agent created it: removed.
    push(world, fleet("a", other), fleet("b", other))
    assert run(world).ok
    assert not path.exists()


# --- item 3: what the agent created, and what it adopted -------------------------------


def test_dropping_an_adopted_file_leaves_it_and_a_created_one_is_removed(world: dict) -> None:
    adopted, created = world["root"] / "hosts", world["root"] / "new"
    adopted.write_text("127.0.0.1 localhost\n")
    items = (
        f'        - file: {adopted}\n          content: "10.0.0.1 db\\n"\n'
        f'        - file: {created}\n          content: "n\\n"\n'
    )
    keep = f'        - file: {world["root"]}/keep\n          content: "k\\n"\n'
    push(world, fleet("web", items + keep))
    assert run(world).ok
    objects = record(world)["objects"]
    assert objects[f"path:{adopted}"]["created"] is False
    assert objects[f"path:{created}"]["created"] is True

    push(world, fleet("web", keep))
    result = run(world)

    assert result.outcomes["web"].status is UnitStatus.OK, result.outcomes["web"]
    assert adopted.read_text() == "10.0.0.1 db\n"  # let go: left as the agent last wrote it
    assert not created.exists()
    assert f"path:{adopted}" not in record(world)["objects"]


def test_on_drop_remove_removes_an_adopted_file(world: dict) -> None:
    adopted = world["root"] / "motd"
    adopted.write_text("old\n")
    keep = f'        - file: {world["root"]}/keep\n          content: "k\\n"\n'
    item = f'        - file: {adopted}\n          content: "new\\n"\n          on_drop: remove\n'
    push(world, fleet("web", item + keep))
    assert run(world).ok

    push(world, fleet("web", keep))
    assert run(world).ok
    assert not adopted.exists()


# --- item 4: progress per resource ------------------------------------------------------


def test_what_a_partly_failed_apply_added_is_removed_by_a_revert(world: dict) -> None:
    base = f'        - file: {world["root"]}/base\n          content: "b\\n"\n'
    push(world, fleet("web", base))
    assert run(world).ok

    added = world["root"] / "added"
    failing = "        - command: broken\n          run: exit 3\n"
    added_item = f'        - file: {added}\n          content: "a\\n"\n'
    push(world, fleet("web", base + added_item + failing))
    assert run(world).outcomes["web"].status is UnitStatus.FAILED
    assert added.exists()

    push(world, fleet("web", base))  # as `git revert` leaves it
    result = run(world)

    assert result.outcomes["web"].status is UnitStatus.OK, result.outcomes["web"]
    assert not added.exists()


def test_a_removal_that_cannot_finish_is_retried_never_blocks_and_can_be_let_go(
    world: dict,
) -> None:
    work = world["root"] / "work"
    keep = f'        - file: {world["root"]}/keep\n          content: "k\\n"\n'
    push(world, fleet("web", f"        - directory: {work}\n" + keep))
    assert run(world).ok
    (work / "someone-elses").write_text("not ours\n")

    later = world["root"] / "later"
    added = f'        - file: {later}\n          content: "l\\n"\n'
    push(world, fleet("web", keep + added))
    for _ in range(2):  # reported, and tried again on the next pass
        result = run(world)
        outcome = result.outcomes["web"]
        assert outcome.status is UnitStatus.FAILED
        assert "is not empty" in (outcome.error or "")
        assert later.exists()  # the rest converged
        assert work.exists()
        assert "is not empty" in record(world)["objects"][f"path:{work}"]["error"]
        (box,) = host_states(FileHostRecords(StateLayout(world["state"])), "web")
        assert box["status"] == "failed" and "is not empty" in box["removals_failing"][0]

    # Let go: list it again with on_drop: keep, then drop it.
    let_go = f"        - directory: {work}\n          on_drop: keep\n"
    push(world, fleet("web", keep + added + let_go))
    assert run(world).outcomes["web"].status is UnitStatus.OK
    push(world, fleet("web", keep + added))
    result = run(world)
    assert result.outcomes["web"].status is UnitStatus.OK, result.outcomes["web"]
    assert (work / "someone-elses").exists()
    assert f"path:{work}" not in record(world)["objects"]


# --- item 13: order ---------------------------------------------------------------------


def test_a_directory_and_its_files_dropped_together_are_removed_files_first(
    world: dict,
) -> None:
    tree = world["root"] / "tree"
    keep = f'        - file: {world["root"]}/keep\n          content: "k\\n"\n'
    items = (
        f"        - directory: {tree}\n"
        f"        - directory: {tree}/sub\n"
        f'        - file: {tree}/sub/f\n          content: "f\\n"\n'
    )
    push(world, fleet("web", items + keep))
    assert run(world).ok

    push(world, fleet("web", keep))
    result = run(world)

    assert result.outcomes["web"].status is UnitStatus.OK, result.outcomes["web"]
    assert not tree.exists()


def test_a_command_whose_cwd_is_created_earlier_in_the_same_apply_runs(world: dict) -> None:
    work = world["root"] / "build"
    items = (
        f"        - directory: {work}\n"
        "        - command: build\n"
        "          run: echo built > out\n"
        f"          cwd: {work}\n"
        "          creates: out\n"
        "          unless: test -f never-there-xyz && true\n"
    )
    push(world, fleet("web", items))
    result = run(world)

    assert result.outcomes["web"].status is UnitStatus.OK, hosts_txt(world, result, "web")
    assert (work / "out").read_text() == "built\n"
    second = run(world)
    assert second.outcomes["web"].decision == "nothing", hosts_txt(world, second, "web")


# --- issue 13 item 3: fleet removals follow policy.destroy: hold -------------------------


def test_a_held_removal_waits_for_approval_and_the_rest_converges(world: dict) -> None:
    old, keep = world["root"] / "old", world["root"] / "keep"
    keep_item = f'        - file: {keep}\n          content: "k\\n"\n'
    push(world, fleet("web", f'        - file: {old}\n          content: "o\\n"\n' + keep_item))
    assert run(world, "hold").ok

    new = world["root"] / "new"
    push(world, fleet("web", keep_item + f'        - file: {new}\n          content: "n\\n"\n'))
    held = run(world, "hold")

    outcome = held.outcomes["web"]
    assert outcome.status is UnitStatus.HELD, outcome
    assert old.exists() and new.exists()
    assert "remove file, 2 bytes" in hosts_txt(world, held, "web")

    approved = approve(world, held.run_id)
    assert approved.outcomes["web"].status is UnitStatus.OK, approved.outcomes["web"]
    assert not old.exists() and new.exists()
    assert f"path:{old}" not in record(world)["objects"]
    # Converged at the inputs the held pass saw: the next pass finds nothing moved.
    again = run(world, "hold")
    assert again.outcomes["web"].status is UnitStatus.OK and again.outcomes["web"].moved == ()


def test_an_approval_is_stale_when_the_host_moved(world: dict) -> None:
    old, keep = world["root"] / "old", world["root"] / "keep"
    keep_item = f'        - file: {keep}\n          content: "k\\n"\n'
    push(world, fleet("web", f'        - file: {old}\n          content: "o\\n"\n' + keep_item))
    assert run(world, "hold").ok
    push(world, fleet("web", keep_item))
    held = run(world, "hold")
    assert held.outcomes["web"].status is UnitStatus.HELD

    old.write_text("someone wrote a lot more here since\n")  # not what was shown
    approved = approve(world, held.run_id)

    outcome = approved.outcomes["web"]
    assert outcome.status is UnitStatus.FAILED and "stale" in (outcome.error or ""), outcome
    assert old.exists()


def test_a_resource_redefined_by_a_later_role_keeps_its_first_place(world: dict) -> None:
    work = world["root"] / "build"
    text = f"""\
version: 1
units:
  - name: web
    fleet:
      hosts: {{static: [{{name: box, address: local}}]}}
      roles: [base, tuned]
roles:
  base:
    - directory: {work}
    - command: build
      run: echo built > out
      cwd: {work}
      unless: test -f out
  tuned:
    - directory: {work}
      mode: "0700"
"""
    world["repo"].write("gitops.yaml", text)
    world["repo"].push("roles")
    result = run(world)

    assert result.outcomes["web"].status is UnitStatus.OK, hosts_txt(world, result, "web")
    assert (work / "out").read_text() == "built\n"
    assert oct(work.stat().st_mode & 0o777) == "0o700"


# --- item 10: a failed handler stays due ------------------------------------------------


def test_a_failed_handler_is_run_again_by_the_next_passes_until_it_succeeds(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_hosts_engine_local import FAKE_SYSTEMCTL

    bin_dir, state = tmp_path / "bin", tmp_path / "systemd-state"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "systemctl").write_text(FAKE_SYSTEMCTL)
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SYSTEMCTL_DIR", str(state))
    conf = world["root"] / "web.conf"
    text = (
        "version: 1\nunits:\n"
        + fleet(
            "web",
            f'        - file: {conf}\n          content: "v2\\n"\n          notify: [reload web]\n',
        )
        + "handlers:\n  reload web: {service: web, action: reload}\n"
    )
    world["repo"].write("gitops.yaml", text)
    world["repo"].push("handler")

    first = run(world)  # web is not active: the reload fails
    assert first.outcomes["web"].status is UnitStatus.FAILED
    assert record(world)["handlers"] == {"web": ["reload web"]}

    second = run(world)  # nothing changed, and yet the reload is still owed
    assert second.outcomes["web"].status is UnitStatus.FAILED, hosts_txt(world, second, "web")
    assert "handler 'reload web'" in (second.outcomes["web"].error or "")

    (state / "web.service.active").write_text("active\n")
    third = run(world)
    assert third.outcomes["web"].status is UnitStatus.OK, hosts_txt(world, third, "web")
    assert "handlers run: reload web" in hosts_txt(world, third, "web")
    assert record(world)["handlers"] == {}

    run(world)
    reloads = [c for c in (state / "calls.log").read_text().splitlines() if c.startswith("reload")]
    assert reloads == ["reload web.service"] * 3


def test_a_host_name_from_a_stack_output_never_names_a_path() -> None:
    from agent.config.fleet import HostsFromStack
    from agent.units.fleetplan import hosts_from_output
    from agent.units.fleettypes import FleetError

    ref = HostsFromStack(unit="net", output="hosts")
    assert hosts_from_output("web", ref, {"web1": "10.0.0.1"})[0].name == "web1"
    with pytest.raises(FleetError) as caught:
        hosts_from_output("web", ref, {"../../etc/cron.d/x": "10.0.0.1"})
    assert "'../../etc/cron.d/x' is not a host name" in caught.value.message
