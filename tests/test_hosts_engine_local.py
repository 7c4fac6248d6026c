"""The host engine end to end on this machine, through the real LocalTransport.

Everything happens under pytest's tmp dir (the tests run as root here). Users, groups,
packages and services are only *read* on this machine (no account is created, no
package installed); services and handlers are driven through a stand-in `systemctl`
put first on PATH, because this machine does not run systemd.
"""

from __future__ import annotations

import glob
import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from providers.errors import TransportError
from providers.hosts import Handler, HostReport, Resource, converge, gather_facts
from providers.hosts.templates import render_template
from providers.transport import CommandResult, LocalTransport

# The interpreter the "host" runs: the engine passes -I -S, so no site-packages (and no
# third-party module) is visible to the remote program, as on a bare target.
PYTHON = sys.executable
PY37 = sorted(glob.glob("/root/.pyenv/versions/3.7.*/bin/python3"))
PY36 = sorted(glob.glob("/root/.pyenv/versions/3.6.*/bin/python3"))
SECRET = "tok-9f2c71e0-secret-value"
SYSTEMD_RUNNING = Path("/run/systemd/system").is_dir()

FAKE_SYSTEMCTL = """#!/bin/sh
# Stand-in for systemctl (this machine has no systemd): logs each call and keeps every
# unit's enabled/active state in files under $FAKE_SYSTEMCTL_DIR.
state="$FAKE_SYSTEMCTL_DIR"
echo "$*" >> "$state/calls.log"
verb="$1"; shift
case "$verb" in
  show)
    while [ "$1" != "--" ]; do shift; done; shift
    first=1
    for unit in "$@"; do
      [ "$first" = 1 ] || echo
      first=0
      echo "LoadState=loaded"
      echo "ActiveState=$(cat "$state/$unit.active" 2>/dev/null || echo inactive)"
      echo "SubState=dead"
      echo "UnitFileState=$(cat "$state/$unit.enabled" 2>/dev/null || echo disabled)"
    done ;;
  enable) echo enabled > "$state/$1.enabled" ;;
  disable) echo disabled > "$state/$1.enabled" ;;
  start|restart) echo active > "$state/$1.active" ;;
  stop) echo inactive > "$state/$1.active" ;;
  reload)
    [ "$(cat "$state/$1.active" 2>/dev/null)" = active ] && exit 0
    echo "Failed to reload $1: Unit $1 is not active." >&2
    exit 1 ;;
esac
"""


class RecordingTransport(LocalTransport):
    """The real LocalTransport, keeping each command line it was asked to run."""

    def __init__(self) -> None:
        super().__init__("testhost")
        self.commands: list[list[str]] = []

    def run(
        self, argv: Sequence[str], *, stdin: bytes = b"", timeout: float, become: bool = False
    ) -> CommandResult:
        self.commands.append(list(argv))
        return super().run(argv, stdin=stdin, timeout=timeout, become=become)


class DropsOnApply(LocalTransport):
    """The real LocalTransport whose connection drops before the apply round trip."""

    def run(
        self, argv: Sequence[str], *, stdin: bytes = b"", timeout: float, become: bool = False
    ) -> CommandResult:
        if self.round_trips == 1:
            self.round_trips += 1
            raise TransportError(f"{self.host}: connection lost", host=self.host, retryable=True)
        return super().run(argv, stdin=stdin, timeout=timeout, become=become)


def run(
    resources: Sequence[Resource],
    handlers: Mapping[str, Handler] | None = None,
    *,
    apply: bool = True,
    transport: LocalTransport | None = None,
    python: str = PYTHON,
) -> HostReport:
    return converge(
        transport or LocalTransport("testhost"),
        resources,
        handlers or {},
        apply=apply,
        become=False,
        timeout=30,
        python=python,
    )


def statuses(report: HostReport) -> dict[str, str]:
    assert report.error is None, report.error
    return {outcome.resource_id: outcome.status for outcome in report.outcomes}


def outcome(report: HostReport, resource_id: str):  # type: ignore[no-untyped-def]
    return next(o for o in report.outcomes if o.resource_id == resource_id)


def mode_of(path: Path) -> str:
    return f"{stat.S_IMODE(path.lstat().st_mode):04o}"


def site(root: Path) -> list[Resource]:
    """A small role: a directory, a file, a rendered template, a link, a guarded command."""
    template = root / "repo" / "app.conf.j2"
    template.parent.mkdir(parents=True)
    template.write_text("port = {{ port }}\nworkers = {{ workers }}\n")
    rendered = render_template(template, {"port": 8080, "workers": 4}, display_name="app.conf.j2")
    return [
        Resource("directory", f"{root}/srv/app/conf", {"mode": "0750", "owner": "root"}),
        Resource(
            "file",
            f"{root}/srv/app/conf/motd",
            {"content": b"hello\n", "mode": "0640", "owner": "nobody", "group": "root"},
        ),
        Resource(
            "template",
            f"{root}/srv/app/conf/app.conf",
            {"content": rendered.encode(), "mode": "0644"},
        ),
        Resource("link", f"{root}/srv/app/current", {"target": f"{root}/srv/app/conf"}),
        Resource(
            "command",
            "stamp",
            {"command": "echo built > stamp", "creates": "stamp", "cwd": f"{root}/srv/app"},
        ),
    ]


def test_first_pass_converges_and_the_second_costs_one_round_trip(tmp_path: Path) -> None:
    resources = site(tmp_path)
    first = run(resources)
    assert set(statuses(first).values()) == {"changed"}
    assert first.round_trips == 2
    app = tmp_path / "srv" / "app"
    assert mode_of(app / "conf") == "0750"
    assert (app / "conf" / "motd").read_bytes() == b"hello\n"
    assert mode_of(app / "conf" / "motd") == "0640"
    assert (app / "conf" / "motd").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert (app / "conf" / "app.conf").read_text() == "port = 8080\nworkers = 4\n"
    assert mode_of(app / "conf" / "app.conf") == "0644"
    assert os.readlink(app / "current") == str(app / "conf")
    assert (app / "stamp").read_text() == "built\n"

    second = run(resources)
    assert set(statuses(second).values()) == {"ok"}
    assert second.round_trips == 1 and second.changed == 0
    assert all(o.changes == () for o in second.outcomes)


def test_a_dry_run_changes_nothing(tmp_path: Path) -> None:
    report = run(site(tmp_path), apply=False)
    assert set(statuses(report).values()) == {"would-change"}
    assert report.pending == 5 and report.round_trips == 1
    assert not (tmp_path / "srv").exists()
    created = outcome(report, f"template:{tmp_path}/srv/app/conf/app.conf")
    assert "+port = 8080\n" in created.diff


def test_a_hand_edit_is_found_by_a_dry_run_and_put_back(tmp_path: Path) -> None:
    resources = site(tmp_path)
    run(resources)
    conf = tmp_path / "srv" / "app" / "conf" / "app.conf"
    conf.write_text("port = 9999\nworkers = 4\n")
    conf.chmod(0o666)
    (tmp_path / "srv" / "app" / "current").unlink()
    (tmp_path / "srv" / "app" / "current").symlink_to("/tmp")

    dry = run(resources, apply=False)
    edited = outcome(dry, f"template:{conf}")
    assert edited.status == "would-change"
    assert edited.changes[0].startswith("content changed (sha256 ")
    assert edited.changes[1] == "mode 0666 -> 0644"
    assert "-port = 9999\n+port = 8080\n" in edited.diff
    assert outcome(dry, f"link:{tmp_path}/srv/app/current").changes == (
        f"target /tmp -> {tmp_path}/srv/app/conf",
    )
    assert dry.round_trips == 1
    assert conf.read_text() == "port = 9999\nworkers = 4\n"  # a dry run touches nothing

    fixed = run(resources)
    assert statuses(fixed)[f"template:{conf}"] == "changed"
    assert conf.read_text() == "port = 8080\nworkers = 4\n" and mode_of(conf) == "0644"
    assert os.readlink(tmp_path / "srv" / "app" / "current") == str(conf.parent)
    assert set(statuses(run(resources)).values()) == {"ok"}


def test_writes_are_atomic_renames_and_leave_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "app.conf"
    umask = os.umask(0o077)  # sudo may hand the engine a strict umask: modes must not depend on it
    try:
        run([Resource("file", str(path), {"content": b"old\n"})])
    finally:
        os.umask(umask)
    assert mode_of(path) == "0644" and mode_of(path.parent) == "0755"
    reader = path.open("rb")  # a reader of the old file keeps reading the old file
    old_inode = path.stat().st_ino
    run([Resource("file", str(path), {"content": b"new\n", "mode": "0600"})])
    assert reader.read() == b"old\n"
    reader.close()
    assert path.read_bytes() == b"new\n" and path.stat().st_ino != old_inode
    assert mode_of(path) == "0600"
    assert sorted(p.name for p in path.parent.iterdir()) == ["app.conf"]
    assert not list(tmp_path.rglob("*gitops-tmp*"))


def test_absent_removes_files_links_and_directories(tmp_path: Path) -> None:
    (tmp_path / "old.conf").write_text("x\n")
    (tmp_path / "old-link").symlink_to("old.conf")
    (tmp_path / "empty").mkdir()
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f").write_text("x\n")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "f").write_text("x\n")
    resources = [
        Resource("file", f"{tmp_path}/old.conf", {"state": "absent"}),
        Resource("link", f"{tmp_path}/old-link", {"state": "absent"}),
        Resource("directory", f"{tmp_path}/empty", {"state": "absent"}),
        Resource("directory", f"{tmp_path}/tree", {"state": "absent", "recursive": True}),
        Resource("directory", f"{tmp_path}/kept", {"state": "absent"}),
    ]
    report = run(resources)
    assert list(statuses(report).values()) == ["changed"] * 4 + ["failed"]
    assert outcome(report, f"directory:{tmp_path}/kept").error == (
        f"directory:{tmp_path}/kept: {tmp_path}/kept is not empty;"
        " set recursive: true to remove it with its contents"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    again = run(resources[:4])
    assert set(statuses(again).values()) == {"ok"} and again.round_trips == 1


def test_a_failing_command_is_recorded_and_the_rest_still_converges(tmp_path: Path) -> None:
    (tmp_path / "blocker").mkdir()
    resources = [
        Resource("command", "migrate", {"command": "echo starting; echo 'db is down' >&2; exit 3"}),
        Resource("file", f"{tmp_path}/after.conf", {"content": b"x\n"}),
        Resource("file", f"{tmp_path}/owned", {"content": b"x\n", "owner": "no-such-user-x"}),
        Resource("file", f"{tmp_path}/blocker", {"content": b"x\n"}),
        Resource("directory", f"{tmp_path}/made", {}),
    ]
    report = run(resources)
    assert list(statuses(report).values()) == ["failed", "changed", "failed", "failed", "changed"]
    assert outcome(report, "command:migrate").error == (
        "command:migrate: exited 3: starting\ndb is down"
    )
    assert outcome(report, f"file:{tmp_path}/owned").error == (
        f"file:{tmp_path}/owned: no such user 'no-such-user-x' on the host"
    )
    assert outcome(report, f"file:{tmp_path}/blocker").error == (
        f"file:{tmp_path}/blocker: {tmp_path}/blocker is a directory, not a file; not touching it"
    )
    assert (tmp_path / "after.conf").read_bytes() == b"x\n" and (tmp_path / "made").is_dir()
    assert report.failed == 3 and report.changed == 2 and report.error is None
    assert not (tmp_path / "owned").exists()
    assert [p.name for p in tmp_path.iterdir() if "gitops-tmp" in p.name] == []


def test_guards_decide_and_are_checked_again_before_running(tmp_path: Path) -> None:
    (tmp_path / "present").write_text("")
    resources = [
        Resource("command", "unless-true", {"command": "touch ran-1", "unless": "test -f present"}),
        Resource("command", "onlyif-false", {"command": "touch ran-2", "onlyif": "false"}),
        Resource("command", "onlyif-true", {"command": "touch ran-3", "onlyif": "true"}),
        # The facts say "run" (ran-3 is missing), but the command before creates it.
        Resource("command", "creates-late", {"command": "touch ran-4", "creates": "ran-3"}),
    ]
    resources = [Resource(r.kind, r.name, {**r.attrs, "cwd": str(tmp_path)}) for r in resources]
    dry = run(resources, apply=False)
    assert statuses(dry) == {
        "command:unless-true": "ok",
        "command:onlyif-false": "ok",
        "command:onlyif-true": "would-change",
        "command:creates-late": "would-change",
    }
    assert outcome(dry, "command:onlyif-true").changes == ("run (onlyif exited 0)",)
    report = run(resources)
    assert statuses(report)["command:onlyif-true"] == "changed"
    late = outcome(report, "command:creates-late")
    assert late.status == "ok" and late.changes == ("not run: skipped: creates ran-3 exists",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["present", "ran-3"]


def test_a_command_without_cwd_runs_in_the_root_directory(tmp_path: Path) -> None:
    where = tmp_path / "where"
    resources = [Resource("command", "pwd", {"command": f"pwd > {where}", "creates": str(where)})]
    assert statuses(run(resources)) == {"command:pwd": "changed"}
    assert where.read_text() == "/\n"
    assert statuses(run(resources)) == {"command:pwd": "ok"}


def test_a_secret_in_a_command_env_never_reaches_a_command_line(tmp_path: Path) -> None:
    script = (
        'printf %s "$TOKEN" > token;'
        " tr '\\0' ' ' < /proc/$PPID/cmdline > parent-cmdline;"
        " tr '\\0' ' ' < /proc/$$/cmdline > shell-cmdline"
    )
    resources = [
        Resource(
            "command",
            "register",
            {
                "command": script,
                "unless": 'test "$TOKEN" = nope',  # guards see the env too
                "env": {"TOKEN": SECRET},
                "cwd": str(tmp_path),
            },
        )
    ]
    transport = RecordingTransport()
    report = run(resources, transport=transport)
    assert statuses(report) == {"command:register": "changed"}
    assert (tmp_path / "token").read_text() == SECRET  # it did reach the command
    assert len(transport.commands) == 2
    for argv in transport.commands:
        assert all(SECRET not in part for part in argv)
    parent = (tmp_path / "parent-cmdline").read_text()
    assert parent.startswith(PYTHON) and "-c" in parent and SECRET not in parent
    assert (tmp_path / "shell-cmdline").read_text().startswith("/bin/sh -c ")
    assert SECRET not in (tmp_path / "shell-cmdline").read_text()
    assert SECRET not in repr(report)


def test_a_lost_connection_during_apply_fails_only_what_was_pending(tmp_path: Path) -> None:
    (tmp_path / "in-place").write_text("x\n")
    resources = [
        Resource("file", f"{tmp_path}/in-place", {"content": b"x\n"}),
        Resource("file", f"{tmp_path}/new", {"content": b"y\n"}),
    ]
    report = run(resources, transport=DropsOnApply("testhost"))
    assert report.error == "testhost: connection lost"
    assert [o.status for o in report.outcomes] == ["ok", "failed"]
    assert report.outcomes[1].error == (
        f"file:{tmp_path}/new: not confirmed, the apply round trip failed:"
        " testhost: connection lost"
    )


FAKE_APT = """#!/bin/sh
# Stand-in for apt-get (nothing may be installed on this machine): logs each call; a
# package whose name starts with gitops-missing cannot be found.
echo "$DEBIAN_FRONTEND $*" >> "$FAKE_APT_DIR/calls.log"
[ "$1" = update ] && exit 0
for arg in "$@"; do
  case "$arg" in gitops-missing*) echo "E: Unable to locate package $arg" >&2; exit 100 ;; esac
done
echo "Setting up $*"
"""


def test_package_installs_are_batched_and_a_failure_is_pinned_on_its_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(FAKE_APT)
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_APT_DIR", str(tmp_path))
    resources = [  # not installed here (the real dpkg-query says so); the fake "installs"
        Resource("package", "gitops-fake-a", {}),
        Resource("package", "gitops-missing", {}),
        Resource("package", "gitops-fake-b", {"version": "1.0-1"}),
        Resource("file", f"{tmp_path}/between", {"content": b"x\n"}),
        Resource("package", "gitops-fake-c", {}),
    ]
    report = run(resources)
    assert [o.status for o in report.outcomes] == [
        "changed",
        "failed",
        "changed",
        "changed",
        "changed",
    ]
    assert report.outcomes[1].error == (
        "package:gitops-missing: E: Unable to locate package gitops-missing"
    )
    lines = (tmp_path / "calls.log").read_text().splitlines()
    install = "noninteractive install -y --no-install-recommends --allow-downgrades"
    tail = "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
    tail += " -o DPkg::Lock::Timeout=120"
    batch = f"{install} {tail} gitops-fake-a gitops-missing gitops-fake-b=1.0-1"
    assert lines == [
        batch,  # one call for the three neighbours
        "noninteractive update -o DPkg::Lock::Timeout=120",  # "Unable to locate": refresh once
        batch,
        f"{install} {tail} gitops-fake-a",  # then one by one, to name the culprit
        f"{install} {tail} gitops-missing",
        f"{install} {tail} gitops-fake-b=1.0-1",
        f"{install} {tail} gitops-fake-c",  # after the file, in manifest order
    ]


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in systemctl first on PATH; returns its state directory."""
    bin_dir, state = tmp_path / "bin", tmp_path / "systemd-state"
    bin_dir.mkdir()
    state.mkdir()
    fake = bin_dir / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SYSTEMCTL_DIR", str(state))
    return state


def calls(state: Path) -> list[str]:
    log = state / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_handlers_run_once_and_only_after_a_change(tmp_path: Path, systemctl: Path) -> None:
    handlers = {
        "restart app": Handler("restart app", "app", "restart"),
        "reload web": Handler("reload web", "web", "reload"),
        "restart db": Handler("restart db", "db", "restart"),
    }
    (tmp_path / "web.conf").write_text("same\n")
    resources = [
        Resource("file", f"{tmp_path}/a.conf", {"content": b"a\n"}, notify=("restart app",)),
        Resource("file", f"{tmp_path}/b.conf", {"content": b"b\n"}, notify=("restart app",)),
        Resource("file", f"{tmp_path}/web.conf", {"content": b"same\n"}, notify=("reload web",)),
        Resource(
            "file",
            f"{tmp_path}/db.conf",
            {"content": b"x\n", "owner": "no-such-user-x"},  # fails: its handler stays idle
            notify=("restart db",),
        ),
    ]
    first = run(resources, handlers)
    assert first.handlers_run == ("restart app",) and first.handler_errors == ()
    assert calls(systemctl) == ["restart app.service"]
    assert first.round_trips == 2

    second = run(resources[:3], handlers)
    assert second.handlers_run == () and second.round_trips == 1
    assert calls(systemctl) == ["restart app.service"]

    (tmp_path / "web.conf").write_text("edited by hand\n")
    third = run(resources[:3], handlers)
    assert third.handlers_run == ()
    assert third.handler_errors == (
        "handler 'reload web': systemctl exited 1:"
        " Failed to reload web.service: Unit web.service is not active.",
    )
    assert calls(systemctl)[-1] == "reload web.service"


def test_services_are_enabled_started_and_stopped(tmp_path: Path, systemctl: Path) -> None:
    (systemctl / "old.service.enabled").write_text("enabled\n")
    (systemctl / "old.service.active").write_text("active\n")
    resources = [
        Resource("service", "app", {"enabled": True, "state": "running"}),
        Resource("service", "old", {"enabled": False, "state": "stopped"}),
        Resource("service", "backup.timer", {"enabled": True}),
    ]
    first = run(resources)
    assert set(statuses(first).values()) == {"changed"}
    assert outcome(first, "service:app").changes == (
        "enable (was disabled)",
        "start (was inactive)",
    )
    facts_call = "show -p LoadState,ActiveState,SubState,UnitFileState,NeedDaemonReload -- "
    assert calls(systemctl) == [
        facts_call + "app.service old.service backup.timer",  # one call for every service
        "enable app.service",
        "start app.service",
        "stop old.service",
        "disable old.service",
        "enable backup.timer",
    ]
    second = run(resources)
    assert set(statuses(second).values()) == {"ok"} and second.round_trips == 1


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian-like machine")
def test_user_group_and_package_facts_are_read_from_this_machine() -> None:
    root = pwd.getpwnam("root")
    dpkg_version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "dpkg"], capture_output=True, text=True, check=True
    ).stdout
    resources = [
        Resource("user", "root", {"uid": 0, "home": root.pw_dir, "shell": root.pw_shell}),
        Resource("group", "root", {"gid": 0}),
        Resource("user", "gitops-no-such-user", {"uid": 4242}),
        Resource("package", "dpkg", {"version": dpkg_version}),
        Resource("package", "gitops-no-such-package", {}),
        Resource("service", "cron", {"state": "running"}),
    ]
    transport = LocalTransport("testhost")
    facts = gather_facts(transport, resources, become=False, timeout=30, python=PYTHON)
    assert transport.round_trips == 1
    supplementary = sorted(g.gr_name for g in grp.getgrall() if "root" in g.gr_mem and g.gr_gid)
    assert facts[0] == {
        "exists": True,
        "uid": 0,
        "gid": root.pw_gid,
        "group": grp.getgrgid(root.pw_gid).gr_name,
        "groups": supplementary,
        "shell": root.pw_shell,
        "home": root.pw_dir,
    }
    assert facts[1] == {"exists": True, "gid": 0}
    assert facts[2] == {"exists": False}
    assert facts[3] == {"manager": "apt", "installed": True, "version": dpkg_version}
    assert facts[4] == {"manager": "apt", "installed": False, "version": None}
    if SYSTEMD_RUNNING:
        assert facts[5]["load"] in ("loaded", "not-found")
    else:
        assert "systemctl show failed" in facts[5]["error"]

    report = run(resources, apply=False)  # a dry run: nothing is created or installed
    assert statuses(report) == {
        "user:root": "ok",
        "group:root": "ok",
        "user:gitops-no-such-user": "would-change",
        "package:dpkg": "ok",
        "package:gitops-no-such-package": "would-change",
        "service:cron": outcome(report, "service:cron").status if SYSTEMD_RUNNING else "failed",
    }
    assert outcome(report, "user:gitops-no-such-user").changes == ("create user (uid 4242)",)
    if not SYSTEMD_RUNNING:
        assert outcome(report, "service:cron").error.startswith(  # type: ignore[union-attr]
            "service:cron: systemctl show failed (is systemd running?): "
        )


def test_host_problems_come_back_in_the_report(tmp_path: Path) -> None:
    resources = [Resource("file", f"{tmp_path}/x", {"content": b"x\n"})]
    missing = run(resources, python="/nonexistent/python3")
    assert missing.error == "testhost: cannot run /nonexistent/python3: No such file or directory"
    assert missing.outcomes == () and missing.round_trips == 1
    if PY36:
        old = run(resources, python=PY36[-1])
        assert old.error is not None
        assert "gitops-agent needs Python >= 3.7 on the target, found 3.6" in old.error
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not PY37, reason="no Python 3.7 interpreter on this machine")
def test_the_remote_program_runs_on_python_3_7(tmp_path: Path, systemctl: Path) -> None:
    resources = [
        *site(tmp_path),
        Resource("service", "app", {"enabled": True, "state": "running"}),
        Resource("user", "root", {"uid": 0}),
        Resource("package", "dpkg", {}),
    ]
    first = run(resources, python=PY37[-1])
    assert set(statuses(first).values()) == {"changed", "ok"} and first.changed == 6
    second = run(resources, python=PY37[-1])
    assert set(statuses(second).values()) == {"ok"} and second.round_trips == 1


# --- issue 12: handlers kept due, links a user controls, cwd made in the same apply ---------


def test_a_failed_handler_runs_on_the_next_pass_until_it_succeeds(
    tmp_path: Path, systemctl: Path
) -> None:
    handlers = {"reload web": Handler("reload web", "web", "reload")}
    conf = Resource("file", f"{tmp_path}/web.conf", {"content": b"v2\n"}, notify=("reload web",))
    first = run([conf], handlers)  # web is not active: the reload fails
    assert first.handlers_failed == ("reload web",) and first.changed == 1

    (systemctl / "web.service.active").write_text("active\n")
    second = converge(
        LocalTransport("testhost"),
        [conf],
        handlers,
        apply=True,
        become=False,
        timeout=30,
        python=PYTHON,
        pending_handlers=first.handlers_failed,
    )

    assert second.changed == 0 and second.handlers_run == ("reload web",), second
    assert second.handlers_failed == () and second.ok
    assert calls(systemctl) == ["reload web.service", "reload web.service"]


NOBODY = 65534


def test_a_write_never_follows_a_link_another_user_owns(tmp_path: Path) -> None:
    home, secret_dir = tmp_path / "home", tmp_path / "root-only"
    home.mkdir()
    secret_dir.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOBODY)  # a directory someone else owns
    (home / "conf").symlink_to(secret_dir)
    os.lchown(home / "conf", NOBODY, NOBODY)  # ... and a link they made in it
    root_link = tmp_path / "via-root"
    root_link.symlink_to(secret_dir)  # root's own link: followed
    (secret_dir / "app.ini").write_text(f"password={SECRET}\n")

    report = run(
        [
            Resource("file", f"{home}/conf/app.ini", {"content": b"x\n"}),
            Resource("directory", f"{home}/conf/sub", {}),
            Resource("link", f"{home}/conf/l", {"target": "/etc"}),
            Resource("file", f"{root_link}/ok.ini", {"content": b"y\n"}),
        ]
    )

    states = statuses(report)
    for rid in (f"file:{home}/conf/app.ini", f"directory:{home}/conf/sub", f"link:{home}/conf/l"):
        assert states[rid] == "failed", report
        assert "symbolic link owned by nobody" in (outcome(report, rid).error or "")
    assert sorted(p.name for p in secret_dir.iterdir()) == ["app.ini", "ok.ini"]
    assert (secret_dir / "app.ini").read_text() == f"password={SECRET}\n"
    assert SECRET not in repr(report)  # never read into a diff either
    assert states[f"file:{root_link}/ok.ini"] == "changed"


def test_a_guarded_command_whose_cwd_the_same_apply_creates_runs(tmp_path: Path) -> None:
    work = tmp_path / "build"
    resources = [
        Resource("directory", str(work), {}),
        Resource(
            "command",
            "build",
            {"command": "echo built > out", "cwd": str(work), "creates": "out", "unless": "false"},
        ),
    ]
    first = run(resources)
    assert statuses(first) == {f"directory:{work}": "changed", "command:build": "changed"}
    assert (work / "out").read_text() == "built\n"
    second = run(resources)
    assert set(statuses(second).values()) == {"ok"} and second.round_trips == 1
