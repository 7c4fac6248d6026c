"""A fleet whose hosts are an autoscaling group's instances, in real passes.

moto in server mode is EC2 and Auto Scaling; each instance's private address is in
127.0.0.0/24 (a VPC the test makes), and an OpenSSH server listens on that very address
with a host certificate the test's CA signed for it. known_hosts holds only the CA
(`@cert-authority`), and trust on first use is off: a host converges only because its
certificate verifies. The group scales up between passes; the new instance converges.
No mocks.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from agent.config import load_host_config
from agent.engine.reconcile import PassRequest, Reconciler
from agent.service.hostwatch import HostWatch, Tracked
from agent.state.store import RunStore, UnitStatus
from agent.units.fleetledger import host_states
from tests.support import sshd as sshd_support
from tests.support.infra import InfraRepo, write_host_config
from tests.support.moto import REGION, MotoServer, fake_aws_credentials
from tests.support.sshd import SshServer, chown_tree, ensure_user, make_client_key, public_key


class InstanceSshd(SshServer):
    """sshd on an instance's address, its host key certified by `ca` for `principal`."""

    def __init__(self, address: str, port: int, ca: Path, principal: str) -> None:
        super().__init__()
        self.host = address
        self._port = port
        self.ca = ca
        self.principal = principal

    def start(self) -> None:
        real = sshd_support._free_port
        sshd_support._free_port = lambda: self._port  # the fleet's one port, on each address
        try:
            super().start()
        finally:
            sshd_support._free_port = real

    def _write_config(self, host_key: Path) -> None:
        cert = host_key.with_name(host_key.name + "-cert.pub")
        if not cert.exists():
            sign = ["-I", self.host, "-h", "-n", self.principal, "-V", "-5m:+1h"]
            subprocess.run(
                ["ssh-keygen", "-q", "-s", str(self.ca), *sign, f"{host_key}.pub"],
                check=True,
                capture_output=True,
                timeout=30,
            )
        self.extra_config = f"HostCertificate {cert}\n"
        super()._write_config(host_key)


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    reason = SshServer.available()
    if reason:
        pytest.skip(reason)
    with MotoServer() as server:
        yield server


@pytest.fixture
def world(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    fake_aws_credentials(monkeypatch)
    moto_server.reset()
    ensure_user()
    ec2 = boto3.client("ec2", endpoint_url=moto_server.url, region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="127.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="127.0.0.0/24")["Subnet"]["SubnetId"]
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    asg = boto3.client("autoscaling", endpoint_url=moto_server.url, region_name=REGION)
    asg.create_launch_configuration(
        LaunchConfigurationName="web", ImageId=image, InstanceType="t3.micro"
    )
    asg.create_auto_scaling_group(
        AutoScalingGroupName="web-asg",
        LaunchConfigurationName="web",
        MinSize=1,
        MaxSize=3,
        DesiredCapacity=1,
        VPCZoneIdentifier=subnet,
    )
    keys = tmp_path / "keys"
    client = make_client_key(keys / "id_ed25519")
    ca = make_client_key(keys / "host_ca", comment="host-ca")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"@cert-authority [127.0.0.*]:* {public_key(ca)}\n")
    # Where each host's command leaves its mark (the hosts share this file system).
    root = Path(tempfile.mkdtemp(prefix="gitops-ec2-", dir="/tmp"))
    chown_tree(root, sshd_support.DEFAULT_USER)
    repo = InfraRepo(tmp_path / "git")
    port = sshd_support._free_port()
    repo.write("gitops.yaml", MANIFEST.format(port=port, root=root))
    repo.push("ec2 fleet")
    config = write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        tmp_path / "state",
        f"""\
        hosts:
          key_file: {client}
          known_hosts: {known_hosts}
          connect_timeout: 5s
          aws:
            region: {REGION}
            endpoint_url: {moto_server.url}
        """,
    )
    servers: list[SshServer] = []
    state = {
        "ec2": ec2,
        "asg": asg,
        "port": port,
        "ca": ca,
        "client": client,
        "root": root,
        "config": config,
        "servers": servers,
        "tmp": tmp_path,
        "moto": moto_server,
    }
    yield state
    for server in servers:
        server.stop()
    shutil.rmtree(root, ignore_errors=True)


MANIFEST = """\
version: 1
units:
  - name: web
    fleet:
      user: gitops-test
      port: {port}
      hosts:
        ec2:
          asg: web-asg
      resources:
        - command: mark
          run: 'touch {root}/seen-$(echo "$SSH_CONNECTION" | cut -d" " -f3)'
          unless: 'test -e {root}/seen-$(echo "$SSH_CONNECTION" | cut -d" " -f3)'
"""


def members(world: dict[str, Any]) -> dict[str, str]:
    """instance id -> private address of the group's instances."""
    group = world["asg"].describe_auto_scaling_groups(AutoScalingGroupNames=["web-asg"])
    ids = [i["InstanceId"] for i in group["AutoScalingGroups"][0]["Instances"]]
    found = world["ec2"].describe_instances(InstanceIds=ids)["Reservations"]
    return {i["InstanceId"]: i["PrivateIpAddress"] for r in found for i in r["Instances"]}


def boot(world: dict[str, Any], address: str, *, principal: str | None = None) -> SshServer:
    """The instance's sshd, up on its address with a certified host key."""
    server = InstanceSshd(address, world["port"], world["ca"], principal or address)
    world["servers"].append(server)
    server.start()
    server.add_authorized_key(server.user, public_key(world["client"]))
    return server


def run(world: dict[str, Any]):  # type: ignore[no-untyped-def]
    reconciler = Reconciler(load_host_config(world["config"]))
    try:
        return reconciler.run_pass(PassRequest(trigger="test"))
    finally:
        reconciler.close()


def marks(world: dict[str, Any]) -> set[str]:
    return {p.name.removeprefix("seen-") for p in world["root"].glob("seen-*")}


def test_an_autoscaling_group_scaling_up_gets_its_new_host_converged(
    world: dict[str, Any],
) -> None:
    (first_id, first), *_ = members(world).items()
    boot(world, first)

    result = run(world)

    assert result.ok, (result.error, result.outcomes["web"].error)
    assert marks(world) == {first}
    assert [h.host for h in result.outcomes["web"].hosts] == [first_id]  # type: ignore[attr-defined]

    world["asg"].set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=2)
    (new_id, new), *_ = ((i, a) for i, a in members(world).items() if i != first_id)
    boot(world, new)

    result = run(world)

    assert result.ok, (result.error, result.outcomes["web"].error)
    assert marks(world) == {first, new}
    outcome = result.outcomes["web"]
    assert outcome.changed_hosts == [new_id]  # type: ignore[attr-defined]
    # known_hosts still holds the CA alone: no key was trusted on first use.
    assert (world["tmp"] / "known_hosts").read_text().count("\n") == 1

    world["asg"].set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=1)
    (left, _), *_ = members(world).items()
    result = run(world)

    assert result.ok, (result.error, result.outcomes["web"].error)
    assert [h.host for h in result.outcomes["web"].hosts] == [left]  # type: ignore[attr-defined]
    layout = Reconciler(load_host_config(world["config"]))
    try:
        assert [s["host"] for s in host_states(layout.fleets.ledger.records, "web")] == [left]
    finally:
        layout.close()
    gone = world["tmp"] / "state" / "units" / "web" / "hosts-gone"
    assert [p.stem for p in gone.glob("*.json")] == [({first_id, new_id} - {left}).pop()]


def test_a_new_host_whose_certificate_names_another_host_is_refused_alone(
    world: dict[str, Any],
) -> None:
    (first_id, first), *_ = members(world).items()
    boot(world, first)
    world["asg"].set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=2)
    (new_id, new), *_ = ((i, a) for i, a in members(world).items() if i != first_id)
    boot(world, new, principal=first)  # a certificate for the first host's address

    result = run(world)

    web = result.outcomes["web"]
    assert web.status is UnitStatus.FAILED
    assert f"{new_id}: the host certificate of {new}:" in (web.error or "")
    assert f"do not include {new}" in (web.error or "")
    assert marks(world) == {first}


def test_an_inventory_that_cannot_be_read_fails_the_unit_and_touches_no_host(
    world: dict[str, Any],
) -> None:
    (_, first), *_ = members(world).items()
    boot(world, first)
    assert run(world).ok
    (world["root"] / f"seen-{first}").unlink()
    text = world["config"].read_text()
    world["config"].write_text(text.replace(world["moto"].url, "http://127.0.0.1:9"))

    result = run(world)  # AWS cannot be reached

    web = result.outcomes["web"]
    assert web.status is UnitStatus.FAILED
    assert web.error == (
        f"unit web: EC2 inventory in {REGION}: cannot connect to AWS; no host was contacted"
    )
    assert marks(world) == set()  # the host was not converged (its mark stays removed)


def test_the_host_watch_converges_new_instances_only_retries_booting_ones_and_drops_gone_ones(
    world: dict[str, Any],
) -> None:
    (first_id, first), *_ = members(world).items()
    boot(world, first)
    assert run(world).ok
    record = world["tmp"] / "state" / "units" / "web" / "hosts" / f"{first_id}.json"
    first_record = record.read_text()
    now = [1000.0]
    reconciler = Reconciler(load_host_config(world["config"]))
    try:
        watch = HostWatch(reconciler, clock=lambda: now[0])
        assert watch.tick()["web"].converge == ()  # the pass converged the only instance

        world["asg"].set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=2)
        (new_id, new), *_ = ((i, a) for i, a in members(world).items() if i != first_id)
        # Still booting: nothing listens on its address yet.
        assert watch.tick()["web"].converge == (new_id,)
        assert watch.tracked["web"][new_id] == Tracked(False, attempts=1, next_try=1010.0)
        assert watch.tick()["web"].waiting == (new_id,)  # not due: not contacted

        boot(world, new)
        now[0] = 1010.0
        started = time.monotonic()
        assert watch.tick()["web"].converge == (new_id,)
        converged_in = time.monotonic() - started
        print(f"host watch: new instance converged in {converged_in:.2f} s (one tick)")

        assert marks(world) == {first, new}
        assert watch.tracked["web"][new_id] == Tracked(converged=True)
        assert record.read_text() == first_record  # the first host was not contacted
        runs = reconciler.store.runs(limit=5)
        assert runs[0].trigger == "hosts"
        assert converged_in < 20

        world["asg"].set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=1)
        left = set(members(world))
        assert len(left) == 1
        gone = ({first_id, new_id} - left).pop()
        assert watch.tick()["web"].dropped == (gone,)
        shown = [state["host"] for state in host_states(reconciler.fleets.ledger.records, "web")]
        assert shown == sorted(left)
    finally:
        reconciler.close()


def test_a_host_key_fingerprint_in_the_trusted_tag_lets_that_instance_in(
    world: dict[str, Any],
) -> None:
    config = world["config"]
    config.write_text(config.read_text() + "    host_key_tag: ssh-host-key\n")
    (world["tmp"] / "known_hosts").write_text("")  # no CA, no keys: only the tag vouches
    world["asg"].set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=3)
    (good_id, good), (bad_id, bad), (bare_id, bare) = sorted(members(world).items())
    servers = {address: boot(world, address) for address in (good, bad, bare)}
    for instance, fingerprint in (
        (good_id, servers[good].host_key_fingerprint()),
        (bad_id, servers[good].host_key_fingerprint()),  # another host's key
    ):
        world["ec2"].create_tags(
            Resources=[instance], Tags=[{"Key": "ssh-host-key", "Value": fingerprint}]
        )

    result = run(world)

    web = result.outcomes["web"]
    assert marks(world) == {good}
    error = web.error or ""
    assert f"{bad_id}: {bad}:{world['port']} offered host key ssh-ed25519" in error
    assert "which is not among the fingerprints published for it" in error
    assert f"{bare_id}: the host key of {bare}:{world['port']} is not in known_hosts" in error
    assert (world["tmp"] / "known_hosts").read_text() == ""


def test_the_daemon_converges_a_scaled_up_instance_within_the_hosts_interval(
    world: dict[str, Any],
) -> None:
    """The issue's finish line: `agent run`, an autoscaling group scaling up in moto, the
    new host converged by the daemon alone with a certificate-verified key."""
    (first_id, first), *_ = members(world).items()
    boot(world, first)
    config, tmp = world["config"], world["tmp"]
    config.write_text(
        config.read_text()
        + "intervals: {poll: 1h, drift: 1h, hosts: 2s}\n"
        + f"control_socket: {tmp / 'ctl.sock'}\ndaemon: {{jitter: 0}}\n"
        + f"http: {{listen: '127.0.0.1:{free_port()}'}}\n"
    )
    log_path = tmp / "agent.log"
    with log_path.open("ab") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
            stdout=log,
            stderr=log,
            env=dict(os.environ),  # the test's fake AWS credentials only
        )
    try:
        wait_until(lambda: first in marks(world), agent, log_path, "the first pass")
        world["asg"].set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=2)
        (new_id, new), *_ = ((i, a) for i, a in members(world).items() if i != first_id)
        boot(world, new)
        launched = time.monotonic()

        wait_until(lambda: new in marks(world), agent, log_path, "the new instance converged")
        took = time.monotonic() - launched
        print(f"daemon: launched -> converged in {took:.2f} s (intervals.hosts 2 s)")

        def hosts_runs() -> list[Any]:
            store = RunStore(tmp / "state")
            try:
                found = [r for r in store.runs(limit=10) if r.trigger == "hosts"]
            finally:
                store.close()
            return [r for r in found if r.finished_at is not None]

        wait_until(hosts_runs, agent, log_path, "the hosts run recorded as finished")
        run = hosts_runs()[0]
        assert (run.status, run.unit_filter) == ("succeeded", "web")
        assert (tmp / "known_hosts").read_text().count("\n") == 1  # the CA alone
        assert (tmp / "state" / "units" / "web" / "hosts" / f"{new_id}.json").exists()
        # Reported as a pass is: the hosts run is counted in the metrics.
        listen = re.search(r"http: \{listen: '([^']+)'\}", config.read_text())
        assert listen is not None
        counted = r'gitops_agent_passes_total\{outcome="succeeded",trigger="hosts"\} 1'

        def metrics_count_it() -> bool:
            # (the store records the run before the daemon reports it: look until it has)
            with urllib.request.urlopen(f"http://{listen.group(1)}/metrics", timeout=10) as page:
                return bool(re.search(counted, page.read().decode()))

        wait_until(metrics_count_it, agent, log_path, "the hosts run counted in /metrics")
    finally:
        agent.send_signal(signal.SIGTERM)  # by PID: the process this test started
        try:
            agent.wait(60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    done: Any, agent: subprocess.Popen[bytes], log_path: Path, what: str, timeout: float = 90
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        if agent.poll() is not None:
            raise AssertionError(f"the agent exited:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}\n{log_path.read_text()[-3000:]}")
