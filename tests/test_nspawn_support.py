"""The nspawn test hosts and the local apt repository, checked the way the agent will use them.

Real hosts: systemd-nspawn boots a debootstrapped Debian (tests/support/nspawn.py); paramiko
logs in over real SSH with the host key checked; apt installs from the local repository with
no network; systemd runs the packaged service.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import paramiko
import pytest

from tests.support import rootfs
from tests.support.nspawn import NspawnHost, nspawn_hosts, nspawn_hosts_fixture, sweep_leftovers

REPO = Path(__file__).resolve().parent.parent
one_host = nspawn_hosts_fixture(1, scope="module")


def connect(host: NspawnHost, user: str, known_hosts: Path | None = None) -> paramiko.SSHClient:
    """A paramiko client logged in to `host` as `user`, its host key checked (no TOFU)."""
    sock = socket.create_connection((host.address, host.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # ~10x less latency per exec
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts or host.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            host.address,
            port=host.port,
            username=user,
            key_filename=str(host.key_file),
            sock=sock,
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
    except BaseException:
        client.close()
        sock.close()
        raise
    return client


def execute(client: paramiko.SSHClient, command: str, timeout: float = 120) -> tuple[int, str]:
    """Exit status and output (stdout then stderr) of `command`."""
    _stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode() + stderr.read().decode()
    return stdout.channel.recv_exit_status(), out


def test_plain_user_sudo_offline_apt_and_a_packaged_service(one_host: list[NspawnHost]) -> None:
    host = one_host[0]
    print(f"figures: {host.name} " + ", ".join(f"{k} {v:.2f} s" for k, v in host.timings.items()))
    client = connect(host, host.user)
    try:
        assert execute(client, "id -un; hostname") == (0, f"{host.user}\n{host.name}\n")
        assert execute(client, "sudo -n id -u") == (0, "0\n")

        # The only apt source is the local repository: an update touches no mirror.
        status, out = execute(client, "sudo -n apt-get update")
        assert status == 0, out
        assert "file:/srv/localrepo" in out
        assert "http" not in out, out

        status, out = execute(client, "sudo -n apt-get install -y testpkg testsvc")
        assert status == 0, out
        assert execute(client, "testpkg") == (0, "testpkg 1.1\n")  # the newest version
        status, out = execute(client, "dpkg-query -W -f='${Status}' testpkg-lib")
        assert out == "install ok installed", "the dependency was not installed"
        assert (host.root / "usr/bin/testpkg").is_file()  # seen from outside too

        # The package enabled and started nothing; enabling it is the agent's job.
        assert execute(client, "systemctl is-enabled testsvc")[1].strip() == "disabled"
        assert execute(client, "systemctl is-active testsvc")[1].strip() == "inactive"
        status, out = execute(client, "sudo -n systemctl enable --now testsvc")
        assert status == 0, out
        assert execute(client, "systemctl is-active testsvc") == (0, "active\n")
        wants = host.root / "etc/systemd/system/multi-user.target.wants/testsvc.service"
        assert wants.is_symlink()  # its target is absolute: a path inside the host

        # And it really serves: it shares the machine's loopback, on a port of its own.
        port = _listening_port(host, "testsvc")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.read() == b"testsvc\n"
    finally:
        client.close()


def _listening_port(host: NspawnHost, unit: str) -> int:
    """The TCP port the main process of `unit` listens on (bounded wait: it binds at start)."""
    pid = host.run(f"systemctl show -p MainPID --value {unit}").stdout.strip()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in host.run("ss -Hltnp").stdout.splitlines():
            if f"pid={pid}," in line:
                return int(line.split()[3].rsplit(":", 1)[1])
        time.sleep(0.1)
    raise AssertionError(f"{unit} (pid {pid}) listens on no TCP port")


def test_root_logs_in_by_key_and_an_unknown_host_key_is_refused(
    one_host: list[NspawnHost], tmp_path: Path
) -> None:
    host = one_host[0]
    client = connect(host, "root")
    try:
        assert execute(client, "id -u") == (0, "0\n")
    finally:
        client.close()
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        connect(host, host.user, known_hosts=empty)


def test_a_reboot_brings_the_host_back_with_a_new_boot(one_host: list[NspawnHost]) -> None:
    host = one_host[0]
    boot_id = host.run("cat /proc/sys/kernel/random/boot_id").stdout
    started = time.monotonic()
    host.reboot()  # nspawn exits 133; the host starts it again and waits for sshd
    print(f"figures: reboot to sshd in {time.monotonic() - started:.2f} s")
    assert host.reboots == 1
    assert host.run("cat /proc/sys/kernel/random/boot_id").stdout != boot_id
    client = connect(host, host.user)
    try:
        assert execute(client, "systemctl is-system-running --wait") == (0, "running\n")
    finally:
        client.close()


def test_three_hosts_boot_in_parallel_and_leave_nothing_behind() -> None:
    reason = NspawnHost.available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    started = time.monotonic()
    with nspawn_hosts(3) as hosts:
        booted = time.monotonic() - started
        print(f"figures: three hosts made and booted in parallel in {booted:.2f} s")
        names = {host.name for host in hosts}
        assert len(names) == 3 and len({host.port for host in hosts}) == 3
        machine_ids = set()
        for host in hosts:
            client = connect(host, host.user)
            try:
                assert execute(client, "hostname") == (0, f"{host.name}\n")
                machine_ids.add(execute(client, "cat /etc/machine-id")[1])
            finally:
                client.close()
        assert len(machine_ids) == 3, "hosts share a machine id"
        left = [(host.nspawn_pid, host.root.parent) for host in hosts]
        stopping = time.monotonic()
    print(f"figures: three hosts stopped in {time.monotonic() - stopping:.2f} s")

    for pid, temp_dir in left:
        assert pid is not None and not Path(f"/proc/{pid}").exists(), f"nspawn {pid} still runs"
        assert not temp_dir.exists(), f"{temp_dir} was not removed"
    mounts = Path("/proc/self/mountinfo").read_text()
    for name in names:
        assert name not in mounts
        assert not Path("/sys/fs/cgroup/unified", name).exists()
        assert not Path("/sys/fs/cgroup/systemd", name).exists()
        assert not Path("/run/systemd/nspawn/propagate", name).exists()


def test_what_a_killed_test_run_left_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    reason = NspawnHost.available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    # A test run that boots a host and is then killed (SIGKILL: no clean-up runs).
    script = (
        "import time\n"
        "from tests.support.nspawn import NspawnHost\n"
        "host = NspawnHost()\n"
        "host.start()\n"
        "print(host.name, host.nspawn_pid, host.root, flush=True)\n"
        "time.sleep(120)\n"
    )
    run = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert run.stdout is not None
        name, pid, root = run.stdout.readline().split()
    finally:
        run.kill()  # our own child
        run.wait(timeout=10)
    nspawn_pid = int(pid)
    try:
        # Its container outlives it, and the sweep leaves a running container alone.
        with pytest.warns(UserWarning, match=f"{name} outlived its test run"):
            assert name not in sweep_leftovers()
        assert Path(root).is_dir() and os.path.ismount(root)
    finally:
        os.kill(nspawn_pid, signal.SIGTERM)  # the nspawn that our child started
        deadline = time.monotonic() + 30
        while Path(f"/proc/{nspawn_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert name in sweep_leftovers()
    assert not Path(root).exists()
    assert name not in Path("/proc/self/mountinfo").read_text()
    assert not Path("/sys/fs/cgroup/unified", name).exists()
    assert not Path("/sys/fs/cgroup/systemd", name).exists()


# -- the cached root's recipe: no root or network needed ------------------------------------

DEB822 = """\
Types: deb deb-src
# a comment
URIs: http://mirror.example.invalid/debian
Suites: bookworm bookworm-updates
Components: main contrib

Types: deb
URIs: http://security.example.invalid/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example.invalid/debian
Suites: bookworm
Components: main
"""


def test_the_mirror_comes_from_apts_own_sources_in_either_format(tmp_path: Path) -> None:
    sources_dir = tmp_path / "sources.list.d"
    sources_dir.mkdir()
    (sources_dir / "debian.sources").write_text(DEB822)
    (sources_dir / "other.list.disabled").write_text("deb http://off.example.invalid/ x main\n")
    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "# deb http://commented.example.invalid/debian bookworm main\n"
        "deb-src http://src.example.invalid/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://old.example.invalid/debian bullseye main\n"
    )
    found = rootfs.apt_sources(one_line, sources_dir)
    assert [s.uri for s in found] == [
        "http://old.example.invalid/debian",
        "http://mirror.example.invalid/debian",
        "http://security.example.invalid/debian-security",
    ]
    assert rootfs.debian_mirror(found) == "http://mirror.example.invalid/debian"
    one_line.write_text("deb http://plain.example.invalid/debian bookworm main\n")
    found = rootfs.apt_sources(one_line, tmp_path / "missing.d")
    assert rootfs.debian_mirror(found) == "http://plain.example.invalid/debian"
    assert rootfs.debian_mirror([]) == rootfs.FALLBACK_MIRROR


def test_a_change_of_recipe_makes_the_cached_root_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tar = tmp_path / "rootfs.tar"
    tar.write_bytes(b"")
    assert not rootfs.is_current(tar)  # no stamp: never trusted
    (tmp_path / "rootfs.tar.stamp").write_text(f'{{"recipe": "{rootfs.recipe_hash()}"}}')
    assert rootfs.is_current(tar)
    assert rootfs.ensure_rootfs(tar) == tar  # current: nothing is built
    monkeypatch.setitem(rootfs.RECIPE, "include", [*rootfs.RECIPE["include"], "nginx"])  # type: ignore[misc]
    assert not rootfs.is_current(tar)
