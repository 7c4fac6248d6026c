"""The host engine on real systemd hosts: every resource kind, drift, handlers, bad input.

Two Debian hosts booted with systemd-nspawn for this module (tests/support/nspawn.py), each
with systemd as PID 1, apt/dpkg and the local test repository (testpkg 1.0/1.1, testpkg-lib,
testsvc). The engine reaches them the way the agent does: `converge` over `SSHTransport` as
the plain user `deploy` with `sudo -n`, host keys checked. Assertions read the real host
state from inside (`host.run`: dpkg, systemctl, getent, stat) or its files from outside
(`host.root`). Each test converges the state it starts from, so any one runs alone.

Resources are built as the agent's manifest layer hands them over: template and file
content as bytes, a command's shell text under `command` (the manifest's `run`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from providers.hosts import Handler, HostReport, Resource, ResourceOutcome, converge
from providers.transport import SSHSettings, SSHTarget, SSHTransport
from tests.support.nspawn import NspawnHost, nspawn_hosts_fixture

hosts = nspawn_hosts_fixture(2, scope="module")  # changed freely: the session's hosts stay clean

PYTHON = "/usr/bin/python3"
HANDLERS = {"restart testsvc": Handler("restart testsvc", "testsvc", "restart")}
ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"
KEY_LAPTOP = f"{ED25519}Dv0Jx1b6cQmUu8m3H2TQm2m1Yl3y4W0dQm0lQx2xZbA alice@laptop"
KEY_CI = f"{ED25519}H8e7s0y3kq1Vd5pXy2u1mR0tQ9bWq3vYz6cN4aLk2Jf ci@runner"
APP_ENV = b"LISTEN=127.0.0.1:8080\nWORKERS=2\n"
TESTSVC_DEFAULTS = b"# managed by gitops-agent\nTESTSVC_OPTS=--quiet\n"


# -- helpers -------------------------------------------------------------------------------


def transport(host: NspawnHost) -> SSHTransport:
    """An SSH transport to `host` as its plain user, the host key checked against known_hosts."""
    target = SSHTarget(host=host.name, address=host.address, port=host.port, user=host.user)
    return SSHTransport(target, SSHSettings(key_file=host.key_file, known_hosts=host.known_hosts))


def run_pass(
    host: NspawnHost,
    resources: Sequence[Resource],
    *,
    apply: bool = True,
    handlers: Mapping[str, Handler] = HANDLERS,
) -> HostReport:
    """One converge of `host`, as the agent runs it: over SSH, `become` through sudo."""
    return converge(
        transport(host), resources, handlers, apply=apply, become=True, python=PYTHON, timeout=120
    )


def shown(report: HostReport) -> str:
    """The report as a person reads it, for assertion messages."""
    lines = [f"{report.host}: error={report.error} round_trips={report.round_trips}"]
    for outcome in report.outcomes:
        lines.append(f"  {outcome.resource_id}: {outcome.status} {outcome.changes} {outcome.error}")
    lines += [f"  handler error: {error}" for error in report.handler_errors]
    return "\n".join(lines)


def outcomes(report: HostReport) -> dict[str, ResourceOutcome]:
    return {outcome.resource_id: outcome for outcome in report.outcomes}


def statuses(report: HostReport) -> dict[str, str]:
    return {outcome.resource_id: outcome.status for outcome in report.outcomes}


def ensure(host: NspawnHost, resources: Sequence[Resource]) -> HostReport:
    """Converge `host` to `resources` (whatever it had before) and insist it worked."""
    report = run_pass(host, resources)
    assert report.ok, shown(report)
    return report


def assert_settled(
    host: NspawnHost, resources: Sequence[Resource], handlers: Mapping[str, Handler] = HANDLERS
) -> None:
    """A host in its desired state: nothing to do, exactly one round trip, no handler."""
    report = run_pass(host, resources, handlers=handlers)
    assert report.ok, shown(report)
    assert set(statuses(report).values()) == {"ok"}, shown(report)
    assert all(not outcome.changes for outcome in report.outcomes), shown(report)
    assert report.round_trips == 1 and report.handlers_run == (), shown(report)


def out(host: NspawnHost, command: str) -> str:
    """What `command` prints as root inside `host` (it must succeed)."""
    return host.run(command).stdout.strip()


def status(host: NspawnHost, command: str) -> int:
    return host.run(command, check=False).returncode


def package_version(host: NspawnHost, name: str) -> str | None:
    """The installed version of `name` per dpkg, or None when it is not installed."""
    proc = host.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", name], check=False)
    state, _, version = proc.stdout.partition("\t")
    return version if proc.returncode == 0 and state == "install ok installed" else None


def stat(host: NspawnHost, path: str) -> str:
    """`MODE OWNER GROUP` of `path`, names as the host resolves them."""
    return out(host, f"stat -c '%a %U %G' {path}")


def service_start(host: NspawnHost, unit: str) -> tuple[str, str]:
    """(MainPID, ActiveEnterTimestampMonotonic): both change when the unit restarts."""
    props = out(host, f"systemctl show -p MainPID -p ActiveEnterTimestampMonotonic {unit}")
    values = dict(line.split("=", 1) for line in props.splitlines())
    return values["MainPID"], values["ActiveEnterTimestampMonotonic"]


# -- the desired state of host 0 -----------------------------------------------------------


def web_role(defaults: bytes = TESTSVC_DEFAULTS) -> list[Resource]:
    """Every kind at once, as a role on one host would list them (in manifest order)."""
    return [
        Resource("group", "app", {"gid": 2000}),
        Resource("group", "ops", {"gid": 2001}),
        Resource(
            "user",
            "alice",
            {
                "uid": 2100,
                "group": "app",
                "groups": ["ops", "users"],
                "shell": "/bin/bash",
                "home": "/srv/alice",
                "authorized_keys": [KEY_LAPTOP, KEY_CI],
            },
        ),
        Resource("directory", "/srv/app", {"mode": "0750", "owner": "alice", "group": "app"}),
        Resource("directory", "/srv/app/releases/1", {}),
        Resource("link", "/srv/app/current", {"target": "releases/1"}),
        Resource(
            "file",
            "/srv/app/app.env",
            {"content": APP_ENV, "mode": "0640", "owner": "root", "group": "app"},
        ),
        Resource("package", "testpkg", {"version": "1.0"}),
        Resource("package", "testsvc", {}),
        Resource(
            "template",
            "/etc/default/testsvc",
            {"content": defaults, "mode": "0644"},
            notify=("restart testsvc",),
        ),
        Resource("service", "testsvc", {"enabled": True, "state": "running"}),
        Resource(
            "command",
            "write version",
            {"command": "echo v1 > /srv/app/version", "unless": "grep -qx v1 /srv/app/version"},
        ),
        Resource(
            "command",
            "seed db",
            {
                "command": 'printf "%s\\n" "$SEED" > db.txt',
                "cwd": "/srv/app",
                "creates": "db.txt",
                "env": {"SEED": "seeded"},
            },
        ),
        # Its onlyif holds only once file:/srv/app/app.env above exists.
        Resource(
            "command",
            "back up app.env",
            {
                "command": "cp /srv/app/app.env /srv/app/app.env.bak",
                "unless": "cmp -s /srv/app/app.env /srv/app/app.env.bak",
                "onlyif": "test -f /srv/app/app.env",
            },
        ),
    ]


def assert_web_role_in_place(host: NspawnHost) -> None:
    """Every resource of `web_role()` as the host itself reports it."""
    assert out(host, "getent group app ops") == "app:x:2000:\nops:x:2001:alice"
    assert out(host, "getent passwd alice") == "alice:x:2100:2000::/srv/alice:/bin/bash"
    assert sorted(out(host, "id -nG alice").split()) == ["app", "ops", "users"]
    keys = "/srv/alice/.ssh/authorized_keys"
    assert (host.root / keys.lstrip("/")).read_text() == f"{KEY_LAPTOP}\n{KEY_CI}\n"
    assert stat(host, keys) == "600 alice app"
    assert stat(host, "/srv/alice/.ssh") == "700 alice app"
    assert stat(host, "/srv/app") == "750 alice app"
    assert stat(host, "/srv/app/releases/1") == "755 root root"
    assert out(host, "readlink /srv/app/current") == "releases/1"
    assert (host.root / "srv/app/app.env").read_bytes() == APP_ENV
    assert stat(host, "/srv/app/app.env") == "640 root app"
    assert package_version(host, "testpkg") == "1.0"
    assert package_version(host, "testpkg-lib") == "1.0"  # its dependency came along
    assert out(host, "testpkg") == "testpkg 1.0"
    assert package_version(host, "testsvc") == "1.0"
    assert (host.root / "etc/default/testsvc").read_bytes() == TESTSVC_DEFAULTS
    assert out(host, "systemctl is-enabled testsvc") == "enabled"
    assert out(host, "systemctl is-active testsvc") == "active"
    assert (host.root / "srv/app/version").read_text() == "v1\n"
    assert (host.root / "srv/app/db.txt").read_text() == "seeded\n"
    assert (host.root / "srv/app/app.env.bak").read_bytes() == APP_ENV


# -- every kind: created, then settled -----------------------------------------------------


def test_every_kind_is_made_by_the_first_pass_and_a_second_costs_one_round_trip(
    hosts: list[NspawnHost],
) -> None:
    host = hosts[0]
    started = time.monotonic()
    report = run_pass(host, web_role())
    first = time.monotonic() - started
    assert report.ok, shown(report)
    assert set(statuses(report).values()) == {"changed"}, shown(report)
    assert report.round_trips == 2, shown(report)
    changes = {rid: outcome.changes for rid, outcome in outcomes(report).items()}
    assert changes["group:app"] == ("create group (gid 2000)",)
    assert changes["user:alice"] == (
        "create user (uid 2100, group app, groups ops,users, shell /bin/bash, home /srv/alice)",
        "authorized_keys: 2 keys",
    )
    assert changes["package:testpkg"] == ("install 1.0",)
    assert changes["link:/srv/app/current"] == ("create link -> releases/1",)
    assert changes["command:seed db"] == ("run (creates db.txt is missing)",)
    # Its onlyif failed in the facts (no app.env yet); asked again after the file was written.
    assert changes["command:back up app.env"] == (
        "run (unless exited 2; onlyif exited 0, checked after earlier changes)",
    )
    assert report.handlers_run == ("restart testsvc",)  # the template was written
    assert_web_role_in_place(host)

    pid = service_start(host, "testsvc")
    started = time.monotonic()
    assert_settled(host, web_role())
    print(f"figures: first pass {first:.2f} s, settled pass {time.monotonic() - started:.2f} s")
    assert service_start(host, "testsvc") == pid  # nothing restarted it


# -- drift ---------------------------------------------------------------------------------

DRIFT = """
set -e
echo 'DEBUG=1' >> /srv/app/app.env
chmod 0777 /srv/app
ln -sfn /tmp /srv/app/current
systemctl disable --now testsvc
apt-get remove -y testpkg
userdel alice
groupmod -g 2999 ops
rm /srv/app/version /srv/app/app.env.bak
"""


def test_drift_made_by_hand_is_found_by_a_dry_run_and_put_back(hosts: list[NspawnHost]) -> None:
    host = hosts[0]
    ensure(host, web_role())
    host.run(DRIFT)

    dry = run_pass(host, web_role(), apply=False)
    assert dry.round_trips == 1 and dry.error is None, shown(dry)
    found = outcomes(dry)
    expected = {
        "group:ops": ("gid 2999 -> 2001",),
        "user:alice": (
            "create user (uid 2100, group app, groups ops,users, shell /bin/bash, home /srv/alice)",
            "authorized_keys: 2 keys",
        ),
        # Its owner's account is gone: the host shows the bare uid.
        "directory:/srv/app": ("mode 0777 -> 0750", "owner 2100 -> alice"),
        "link:/srv/app/current": ("target /tmp -> releases/1",),
        "package:testpkg": ("install 1.0",),
        "service:testsvc": ("enable (was disabled)", "start (was inactive)"),
        "command:write version": ("run (unless exited 2)",),  # grep: no such file
        "command:back up app.env": ("run (unless exited 2; onlyif exited 0)",),
    }
    for rid, changes in expected.items():
        assert found[rid].status == "would-change" and found[rid].changes == changes, shown(dry)
    env = found["file:/srv/app/app.env"]
    assert env.status == "would-change", shown(dry)
    assert env.changes[0].startswith("content changed (sha256 "), shown(dry)
    assert "--- /srv/app/app.env (on host)" in env.diff and "\n-DEBUG=1\n" in env.diff
    untouched = set(found) - set(expected) - {env.resource_id}
    assert {found[rid].status for rid in untouched} == {"ok"}, shown(dry)
    # A dry run changes nothing.
    assert (host.root / "srv/app/app.env").read_bytes().endswith(b"DEBUG=1\n")
    assert out(host, "systemctl is-active testsvc || true") == "inactive"
    assert status(host, "getent passwd alice") == 2

    report = run_pass(host, web_role())
    assert report.ok, shown(report)
    assert {rid for rid, s in statuses(report).items() if s == "changed"} == set(expected) | {
        env.resource_id
    }, shown(report)
    assert report.handlers_run == (), shown(report)  # the template did not drift
    assert_web_role_in_place(host)
    assert_settled(host, web_role())


# -- packages ------------------------------------------------------------------------------


def test_a_pinned_package_follows_its_pin_and_absent_removes_then_purges_it(
    hosts: list[NspawnHost],
) -> None:
    host = hosts[1]
    ensure(host, [Resource("package", "testpkg", {"version": "1.0"})])
    assert package_version(host, "testpkg") == "1.0"

    report = ensure(host, [Resource("package", "testpkg", {"version": "1.1"})])
    assert outcomes(report)["package:testpkg"].changes == ("version 1.0 -> 1.1",)
    assert package_version(host, "testpkg") == "1.1"
    assert out(host, "testpkg") == "testpkg 1.1"
    assert_settled(host, [Resource("package", "testpkg", {"version": "1.1"})])
    # Without a pin any installed version is right: no upgrade, no downgrade.
    assert_settled(host, [Resource("package", "testpkg", {})])
    # A pin below the installed version is installed too.
    report = ensure(host, [Resource("package", "testpkg", {"version": "1.0"})])
    assert outcomes(report)["package:testpkg"].changes == ("version 1.1 -> 1.0",)
    assert package_version(host, "testpkg") == "1.0"

    gone = [Resource("package", "testpkg", {"state": "absent"})]
    report = ensure(host, gone)
    assert outcomes(report)["package:testpkg"].changes == ("remove 1.0",)
    assert package_version(host, "testpkg") is None
    assert not (host.root / "usr/bin/testpkg").exists()
    assert (host.root / "etc/testpkg.conf").exists()  # a removed package keeps its conffiles
    assert_settled(host, gone)

    # purge: true also takes the configuration files a plain removal left behind.
    purged = [Resource("package", "testpkg", {"state": "absent", "purge": True})]
    report = ensure(host, purged)
    assert outcomes(report)["package:testpkg"].changes == ("purge configuration files",)
    assert not (host.root / "etc/testpkg.conf").exists()
    assert status(host, "dpkg -s testpkg") == 1
    assert_settled(host, purged)


# -- services ------------------------------------------------------------------------------


def test_a_service_is_stopped_and_disabled(hosts: list[NspawnHost]) -> None:
    host = hosts[1]
    ensure(
        host,
        [
            Resource("package", "testsvc", {}),
            Resource("service", "testsvc", {"enabled": True, "state": "running"}),
        ],
    )
    assert out(host, "systemctl is-active testsvc") == "active"

    stopped = [Resource("service", "testsvc", {"enabled": False, "state": "stopped"})]
    report = ensure(host, stopped)
    assert outcomes(report)["service:testsvc"].changes == (
        "disable (was enabled)",
        "stop (was active)",
    )
    assert out(host, "systemctl is-active testsvc || true") == "inactive"
    assert out(host, "systemctl is-enabled testsvc || true") == "disabled"
    assert_settled(host, stopped)

    # Started by hand: drift, found and stopped again.
    host.run("systemctl start testsvc")
    dry = run_pass(host, stopped, apply=False)
    assert outcomes(dry)["service:testsvc"].changes == ("stop (was active)",), shown(dry)
    ensure(host, stopped)
    assert out(host, "systemctl is-active testsvc || true") == "inactive"


# -- accounts ------------------------------------------------------------------------------


def dave_role() -> list[Resource]:
    return [
        Resource("group", "deployers", {"gid": 3100}),
        Resource(
            "user",
            "dave",
            {
                "uid": 3101,
                "group": "deployers",
                "groups": [],
                "shell": "/bin/sh",
                "home": "/home/dave",
                "authorized_keys": [KEY_CI],
            },
        ),
    ]


def test_a_users_attributes_changed_by_hand_are_found_and_put_back(
    hosts: list[NspawnHost],
) -> None:
    host = hosts[1]
    ensure(host, dave_role())
    host.run(
        "usermod -u 3200 -s /bin/bash -aG users dave"
        " && echo 'ssh-rsa AAAAB3NzaC1yc2E intruder@elsewhere' >> /home/dave/.ssh/authorized_keys"
    )

    dry = run_pass(host, dave_role(), apply=False)
    user = outcomes(dry)["user:dave"]
    assert user.status == "would-change", shown(dry)
    assert user.changes[:3] == (
        "uid 3200 -> 3101",
        "groups users -> (none)",
        "shell /bin/bash -> /bin/sh",
    ), shown(dry)
    assert user.changes[3].startswith("authorized_keys changed (sha256 "), shown(dry)
    assert "\n-ssh-rsa AAAAB3NzaC1yc2E intruder@elsewhere\n" in user.diff, user.diff

    ensure(host, dave_role())
    assert out(host, "getent passwd dave") == "dave:x:3101:3100::/home/dave:/bin/sh"
    assert out(host, "id -nG dave") == "deployers"
    assert (host.root / "home/dave/.ssh/authorized_keys").read_text() == f"{KEY_CI}\n"
    assert stat(host, "/home/dave/.ssh/authorized_keys") == "600 dave deployers"
    assert_settled(host, dave_role())


# -- state: absent -------------------------------------------------------------------------


def old_things(state: str) -> list[Resource]:
    """One of every kind that can be absent, in an order that can both create and remove."""
    present = state == "present"
    things = [
        Resource("group", "team", {"gid": 3000, "state": state}),
        Resource(
            "user",
            "bob",
            {"uid": 3001, "group": "team", "authorized_keys": [KEY_CI], "state": state},
        ),
        Resource("directory", "/srv/old", {"state": state, "recursive": True}),
        Resource("file", "/srv/old/data.txt", {"content": b"old data\n", "state": state}),
        Resource("template", "/etc/old.conf", {"content": b"old = yes\n", "state": state}),
        Resource("link", "/srv/old-current", {"target": "/srv/old", "state": state}),
    ]
    if present:
        return things
    # Removal: the user before its group, the directory after the file in it.
    by_kind = {resource.id: resource for resource in things}
    order = ["user:bob", "group:team", "file:/srv/old/data.txt", "directory:/srv/old"]
    return [by_kind[rid] for rid in order] + [
        by_kind["template:/etc/old.conf"],
        by_kind["link:/srv/old-current"],
    ]


def test_state_absent_removes_what_present_made(hosts: list[NspawnHost]) -> None:
    host = hosts[1]
    ensure(host, old_things("present"))
    assert out(host, "getent passwd bob") == "bob:x:3001:3000::/home/bob:/bin/sh"
    assert (host.root / "srv/old/data.txt").read_bytes() == b"old data\n"
    assert out(host, "readlink /srv/old-current") == "/srv/old"
    host.run("echo extra > /srv/old/not-managed")  # recursive: true takes it too

    report = ensure(host, old_things("absent"))
    assert set(statuses(report).values()) == {"changed"}, shown(report)
    assert outcomes(report)["user:bob"].changes == ("remove user (uid 3001)",)
    assert outcomes(report)["directory:/srv/old"].changes == ("remove directory and its contents",)
    assert status(host, "getent passwd bob") == 2
    assert status(host, "getent group team") == 2
    for path in ("srv/old", "etc/old.conf", "srv/old-current"):
        assert not (host.root / path).exists() and not (host.root / path).is_symlink(), path
    assert (host.root / "home/bob/.ssh/authorized_keys").is_file()  # userdel keeps the home
    assert_settled(host, old_things("absent"))


# -- handlers ------------------------------------------------------------------------------


def svc_role(defaults: bytes, note: bytes = b"note\n") -> list[Resource]:
    return [
        Resource("package", "testsvc", {}),
        Resource(
            "template",
            "/etc/default/testsvc",
            {"content": defaults},
            notify=("restart testsvc",),
        ),
        Resource("file", "/etc/testsvc-note", {"content": note}),  # notifies nothing
        Resource("service", "testsvc", {"enabled": True, "state": "running"}),
    ]


def test_a_handler_restarts_the_service_exactly_when_its_template_changed(
    hosts: list[NspawnHost],
) -> None:
    host = hosts[1]
    ensure(host, svc_role(b"OPTS=1\n"))
    before = service_start(host, "testsvc")

    # Another file changed, the template did not: no restart.
    report = ensure(host, svc_role(b"OPTS=1\n", note=b"other note\n"))
    assert statuses(report)["file:/etc/testsvc-note"] == "changed"
    assert report.handlers_run == () and service_start(host, "testsvc") == before

    # A dry run of a new template notifies nothing and writes nothing.
    dry = run_pass(host, svc_role(b"OPTS=2\n", note=b"other note\n"), apply=False)
    assert statuses(dry)["template:/etc/default/testsvc"] == "would-change", shown(dry)
    assert dry.handlers_run == () and service_start(host, "testsvc") == before
    assert (host.root / "etc/default/testsvc").read_bytes() == b"OPTS=1\n"

    report = ensure(host, svc_role(b"OPTS=2\n", note=b"other note\n"))
    assert statuses(report)["template:/etc/default/testsvc"] == "changed"
    assert report.handlers_run == ("restart testsvc",)
    after = service_start(host, "testsvc")
    assert after[0] != before[0] and after[1] != before[1], (before, after)
    assert out(host, "systemctl is-active testsvc") == "active"

    assert_settled(host, svc_role(b"OPTS=2\n", note=b"other note\n"))
    assert service_start(host, "testsvc") == after

    # Edited by hand: put back, and the service restarted with the config it must have.
    host.run("echo OPTS=debug > /etc/default/testsvc")
    report = ensure(host, svc_role(b"OPTS=2\n", note=b"other note\n"))
    assert statuses(report)["template:/etc/default/testsvc"] == "changed"
    assert report.handlers_run == ("restart testsvc",)
    assert (host.root / "etc/default/testsvc").read_bytes() == b"OPTS=2\n"
    assert service_start(host, "testsvc")[0] != after[0]


UNIT = """\
[Unit]
Description=gitops-agent test unit written by a file resource
[Service]
Environment=GREETING={greeting}
ExecStart=/bin/sleep infinity
[Install]
WantedBy=multi-user.target
"""
HELLO_HANDLERS = {"restart hello": Handler("restart hello", "gitops-hello", "restart")}


def hello_role(greeting: str) -> list[Resource]:
    return [
        Resource(
            "file",
            "/etc/systemd/system/gitops-hello.service",
            {"content": UNIT.format(greeting=greeting).encode()},
            notify=("restart hello",),
        ),
        Resource("service", "gitops-hello", {"enabled": True, "state": "running"}),
    ]


def test_a_unit_file_written_in_the_pass_is_loaded_before_its_service_acts(
    hosts: list[NspawnHost],
) -> None:
    host = hosts[1]
    host.run(
        "systemctl disable --now gitops-hello 2>/dev/null;"
        " rm -f /etc/systemd/system/gitops-hello.service; systemctl daemon-reload"
    )

    report = run_pass(host, hello_role("one"), handlers=HELLO_HANDLERS)
    assert report.ok and report.changed == 2, shown(report)
    assert out(host, "systemctl is-enabled gitops-hello") == "enabled"
    pid = out(host, "systemctl show -p MainPID --value gitops-hello")
    assert "GREETING=one" in out(host, f"tr '\\0' '\\n' < /proc/{pid}/environ")

    # A new unit file, then the handler's restart: systemd has read the new file first.
    report = run_pass(host, hello_role("two"), handlers=HELLO_HANDLERS)
    assert report.ok and report.handlers_run == ("restart hello",), shown(report)
    assert out(host, "systemctl show -p NeedDaemonReload --value gitops-hello") == "no"
    pid = out(host, "systemctl show -p MainPID --value gitops-hello")
    assert "GREETING=two" in out(host, f"tr '\\0' '\\n' < /proc/{pid}/environ")
    assert_settled(host, hello_role("two"), HELLO_HANDLERS)


# -- bad input -----------------------------------------------------------------------------


@pytest.fixture
def both_hosts(hosts: list[NspawnHost]) -> Iterator[tuple[NspawnHost, NspawnHost]]:
    yield hosts[0], hosts[1]
    hosts[0].run("rm -rf /srv/bad /srv/fine; userdel carol 2>/dev/null || true")
    hosts[1].run("rm -rf /srv/fine")


def test_bad_input_fails_its_own_resource_only_and_the_other_host_converges(
    both_hosts: tuple[NspawnHost, NspawnHost],
) -> None:
    host, other = both_hosts
    bad = [
        Resource("file", "/srv/bad/before.txt", {"content": b"before\n"}, notify=("ghost",)),
        Resource("package", "no-such-package", {}),
        Resource("package", "testpkg", {"version": "1.1"}),  # same apt-get call as the bad one
        Resource("user", "carol", {"group": "no-such-group", "shell": "/bin/bash"}),
        Resource(
            "command",
            "guard cannot run",
            {"command": "touch /srv/bad/guarded", "cwd": "/srv/nowhere", "onlyif": "true"},
        ),
        Resource(
            "command",
            "migrate",
            {"command": "echo 'migration 7 failed' >&2; exit 3", "unless": "test -e /srv/bad/m7"},
        ),
        Resource(
            "command",
            "onlyif fails",
            {"command": "touch /srv/bad/never", "onlyif": "exit 1"},
        ),
        Resource("file", "/srv/bad/after.txt", {"content": b"after\n"}),
    ]
    fine = [
        Resource("directory", "/srv/fine", {"mode": "0700"}),
        Resource("file", "/srv/fine/ok.txt", {"content": b"ok\n"}),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        ghost = {"ghost": Handler("ghost", "no-such-unit", "restart")}
        bad_future = pool.submit(run_pass, host, bad, handlers=ghost)
        fine_future = pool.submit(run_pass, other, fine)
        report, fine_report = bad_future.result(), fine_future.result()

    assert report.host == host.name and report.error is None, shown(report)
    found = outcomes(report)
    assert statuses(report) == {
        "file:/srv/bad/before.txt": "changed",
        "package:no-such-package": "failed",
        "package:testpkg": "changed",
        "user:carol": "failed",
        "command:guard cannot run": "failed",
        "command:migrate": "failed",
        "command:onlyif fails": "ok",
        "file:/srv/bad/after.txt": "changed",
    }, shown(report)
    assert found["package:no-such-package"].error == (
        "package:no-such-package: E: Unable to locate package no-such-package"
    )
    assert found["user:carol"].error == (
        "user:carol: useradd exited 6: useradd: group 'no-such-group' does not exist"
    )
    # A missing cwd is checked at the command's turn (an earlier resource may create it).
    assert found["command:guard cannot run"].error == (
        "command:guard cannot run: working directory /srv/nowhere does not exist"
    )
    assert found["command:migrate"].error == "command:migrate: exited 3: migration 7 failed"
    assert not report.ok and report.failed == 4
    assert report.handlers_run == () and report.handler_errors == (
        "handler 'ghost': systemctl exited 5: Failed to restart no-such-unit.service:"
        " Unit no-such-unit.service not found.",
    )

    assert package_version(host, "testpkg") == "1.1"
    assert package_version(host, "no-such-package") is None
    assert status(host, "getent passwd carol") == 2
    assert (host.root / "srv/bad/before.txt").read_bytes() == b"before\n"
    assert (host.root / "srv/bad/after.txt").read_bytes() == b"after\n"
    assert not (host.root / "srv/bad/never").exists()
    assert not (host.root / "srv/bad/guarded").exists()

    assert fine_report.ok and fine_report.changed == 2, shown(fine_report)
    assert fine_report.host == other.name
    assert stat(other, "/srv/fine") == "700 root root"
    assert (other.root / "srv/fine/ok.txt").read_bytes() == b"ok\n"


# -- issue 12: users beside their group, services their package starts, unit file reloads ----


def test_a_user_joins_the_group_of_its_name_made_before_it_and_lists_it_in_groups(
    hosts: list[NspawnHost],
) -> None:
    host = hosts[0]
    host.run("userdel -r batch 2>/dev/null; groupdel batch 2>/dev/null; true")
    # The docs' advice: the group first, then the user. Debian's useradd would try to make a
    # group `batch` again (USERGROUPS_ENAB) and fail with exit 9; the engine passes -g batch.
    role = [
        Resource("group", "batch", {}),
        Resource("user", "batch", {"shell": "/bin/sh", "groups": ["batch", "adm"]}),
    ]
    report = run_pass(host, role)
    assert report.ok and report.changed == 2, shown(report)
    assert out(host, "id -gn batch") == "batch"
    assert out(host, "id -Gn batch").split() == ["batch", "adm"]
    # `groups` naming the primary group is no change on the next pass (the host reports
    # supplementary groups only).
    assert_settled(host, role)
    explicit = [role[0], Resource("user", "batch", {"group": "batch", "groups": ["adm", "batch"]})]
    assert_settled(host, explicit)


def test_a_service_its_package_starts_on_install_stays_stopped_and_disabled(
    hosts: list[NspawnHost],
) -> None:
    host = hosts[1]
    ensure(host, [Resource("package", "testsvc-auto", {"state": "absent"})])
    role = [
        Resource("package", "testsvc-auto", {}),
        Resource("service", "testsvc-auto", {"enabled": False, "state": "stopped"}),
    ]
    # The facts were gathered before the package existed; its postinst enables and starts
    # the service: the engine asks again at the service's turn and stops and disables it.
    report = run_pass(host, role)
    assert report.ok, shown(report)
    assert outcomes(report)["service:testsvc-auto"].status == "changed", shown(report)
    assert out(host, "systemctl is-active testsvc-auto || true") == "inactive"
    assert out(host, "systemctl is-enabled testsvc-auto || true") == "disabled"
    assert_settled(host, role)
    ensure(host, [Resource("package", "testsvc-auto", {"state": "absent"})])


def quiet_role(greeting: str) -> list[Resource]:
    """A unit file with no notify, and its service."""
    return [
        Resource(
            "file",
            "/etc/systemd/system/gitops-quiet.service",
            {"content": UNIT.format(greeting=greeting).encode()},
        ),
        Resource("service", "gitops-quiet", {"enabled": True, "state": "running"}),
    ]


def test_a_unit_file_changed_without_a_notify_is_reloaded_and_a_stale_one_is_drift(
    hosts: list[NspawnHost],
) -> None:
    host = hosts[1]
    unit_path = "/etc/systemd/system/gitops-quiet.service"
    need_reload = "systemctl show -p NeedDaemonReload --value gitops-quiet"
    ensure(host, quiet_role("one"))

    # The file changes, the service needs no action: systemd still reads the new file.
    report = ensure(host, quiet_role("two"))
    assert statuses(report) == {f"file:{unit_path}": "changed", "service:gitops-quiet": "ok"}
    assert out(host, need_reload) == "no"
    assert "GREETING=two" in out(host, "systemctl show -p Environment --value gitops-quiet")
    assert_settled(host, quiet_role("two"))

    host.run(f"systemctl disable --now gitops-quiet; rm -f {unit_path}; systemctl daemon-reload")

    # A unit file edited by hand (not managed here) leaves systemd behind: drift, put right.
    stale_path = "/etc/systemd/system/gitops-stale.service"
    stale = [Resource("service", "gitops-stale", {"state": "running"})]
    (host.root / stale_path.lstrip("/")).write_text(UNIT.format(greeting="old"))
    host.run("systemctl daemon-reload && systemctl start gitops-stale")
    assert_settled(host, stale)
    host.run(f"sed -i s/GREETING=old/GREETING=new/ {stale_path}")
    stale_flag = "systemctl show -p NeedDaemonReload --value gitops-stale"
    assert out(host, stale_flag) == "yes"
    dry = run_pass(host, stale, apply=False)
    assert outcomes(dry)["service:gitops-stale"].changes == (
        "daemon-reload (its unit file changed on disk since systemd read it)",
    ), shown(dry)
    ensure(host, stale)
    assert out(host, stale_flag) == "no"
    assert "GREETING=new" in out(host, "systemctl show -p Environment --value gitops-stale")
    assert_settled(host, stale)
    host.run(f"systemctl stop gitops-stale; rm -f {stale_path}; systemctl daemon-reload")


# -- links a user controls -----------------------------------------------------------------


def test_authorized_keys_are_never_written_through_a_link_the_user_made(
    hosts: list[NspawnHost],
) -> None:
    """The issue's attack: mallory points ~/.ssh at /root/.ssh; managing her keys as root
    must not replace root's authorized_keys (nor show root's keys in the diff)."""
    host = hosts[0]
    root_keys = f"{KEY_LAPTOP}\n"
    ensure(host, [Resource("user", "mallory", {"uid": 3300})])
    host.run(
        "mkdir -p /root/.ssh && chmod 700 /root/.ssh"
        f" && printf '%s' '{root_keys}' > /root/.ssh/authorized_keys"
        " && rm -rf /home/mallory/.ssh"
        " && su mallory -s /bin/sh -c 'ln -s /root/.ssh /home/mallory/.ssh'"
    )
    try:
        wanted = [Resource("user", "mallory", {"uid": 3300, "authorized_keys": [KEY_CI]})]
        report = run_pass(host, wanted)

        user = outcomes(report)["user:mallory"]
        assert user.status == "failed", shown(report)
        assert "not writing authorized_keys through it" in (user.error or ""), shown(report)
        assert "alice@laptop" not in user.diff  # root's key never read into the diff
        assert (host.root / "root/.ssh/authorized_keys").read_text() == root_keys
        assert stat(host, "/root/.ssh/authorized_keys").endswith("root root")
    finally:
        host.run("rm -f /home/mallory/.ssh && userdel mallory", check=False)
