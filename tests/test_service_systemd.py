"""The bastion install as an operator types it, on a Debian 12 with systemd as PID 1.

One real host (tests/support/nspawn.py: the cached Debian root booted with systemd-nspawn)
plays the bastion. The agent is installed into it with pip from wheels (the host has no pip
of its own and no route to PyPI set up), then exactly the README's "Run as a service" steps:
`agent service install`, an agent.yaml, `systemctl enable --now gitops-agent`. Nothing is
mocked: systemd starts the shipped unit with its sandbox, the agent runs the embedded
Terraform on a stack of a `file://` repository owned by root, and the tests read what an
operator reads: `systemctl show`, /proc, the journal, `agent status`, `/healthz`.

The tests run in order on the one host (module scope), each leaving the service running.
The last ones turn proposals on: `agent service install` then writes the drop-in that lets
bubblewrap start inside the unit's sandbox, and the service plans a proposal in it.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.support import wheelhouse
from tests.support.nspawn import NspawnHost

VENV = "/opt/gitops-agent"
AGENT = f"{VENV}/bin/agent"
AS_AGENT = f"runuser -u gitops-agent -g gitops-agent -- {AGENT}"
WAIT = 180.0  # seconds for a pass or a state change; a pass here takes a few seconds
APPLY_SLEEP = 30  # seconds the local-exec of the slow resource sleeps

MANIFEST = """\
version: 1
units:
  - name: app
    stack: stacks/app
"""

STACK = """\
variable "greeting" {
  type    = string
  default = "hello"
}

resource "terraform_data" "greeting" {
  input = var.greeting
}

resource "terraform_data" "slow" {
  triggers_replace = var.greeting  # a provisioner runs only when its resource is created
  provisioner "local-exec" {
    command = "sleep ${startswith(var.greeting, "slow") ? APPLY_SLEEP : 0}"
  }
}

output "greeting" {
  value = terraform_data.greeting.output
}
""".replace("APPLY_SLEEP", str(APPLY_SLEEP))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Bastion:
    """The booted host, with helpers that read it the way an operator does."""

    def __init__(self, host: NspawnHost, port: int) -> None:
        self.host = host
        self.port = port

    def sh(self, command: str, *, check: bool = True, timeout: float = 120.0) -> str:
        return self.host.run(command, check=check, timeout=timeout).stdout

    def pgrep(self, pattern: str) -> str:
        """`pgrep -a -f` run directly (argv, no shell whose own command line would match)."""
        return self.host.run(["pgrep", "-a", "-f", pattern], check=False).stdout.strip()

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show gitops-agent -p {','.join(props)}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def proc_status(self, pid: int) -> dict[str, str]:
        out = self.sh(f"cat /proc/{pid}/status")
        return {k: v.strip() for k, v in (line.split(":", 1) for line in out.splitlines())}

    def agent_json(self, *args: str) -> object:
        return json.loads(self.sh(f"{AS_AGENT} {shlex.join(args)} --json"))

    def wait_for(self, what: str, check: object, timeout: float = WAIT) -> object:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            last = check()  # type: ignore[operator]
            if last:
                return last
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")

    def runs(self) -> list[dict[str, object]]:
        """Past passes, newest first (`agent history --json`)."""
        return self.agent_json("history", "--limit", "50")["runs"]  # type: ignore[index]

    def journal(self) -> list[dict[str, str]]:
        out = self.sh("journalctl -u gitops-agent -o json --no-pager")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def healthz(self) -> str:
        url = f"http://127.0.0.1:{self.port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as response:  # the host shares our network
            return response.read().decode()

    def push(self, greeting: str) -> None:
        self.sh(
            "cd /root/infra && "
            f'sed -i \'s/default = ".*"/default = "{greeting}"/\' stacks/app/main.tf && '
            f"git commit -qam 'greeting: {greeting}' && git push -q origin HEAD:main"
        )


@pytest.fixture(scope="module")
def bastion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bastion]:
    reason = NspawnHost.available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"nspawn test hosts cannot run under CI: {reason}")
        pytest.skip(f"nspawn test hosts unavailable: {reason}")
    wheels = wheelhouse.dependency_wheels()
    project = wheelhouse.project_wheel(tmp_path_factory.mktemp("wheel"))
    port = _free_port()
    with NspawnHost() as host:
        if not (host.root / "usr/bin/bwrap").exists():  # the agent runs git and bwrap
            why = "the cached test root has no bwrap (built before it joined rootfs.RECIPE)"
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)
        # The operator's part: pip install (from our wheels, as the host has no PyPI route).
        inbox = host.root / "root/wheels"
        inbox.mkdir(parents=True)
        for wheel in [*wheels.glob("*.whl"), project]:
            (inbox / wheel.name).write_bytes(wheel.read_bytes())
        pip = wheelhouse.pip_wheel(wheels).name
        bastion = Bastion(host, port)
        bastion.sh(
            f"python3 -m venv --without-pip {VENV} && "
            f"{VENV}/bin/python /root/wheels/{pip}/pip install --quiet --no-index "
            f"--find-links /root/wheels gitops-agent && rm -r /root/wheels",
            timeout=600.0,
        )
        _make_repository(bastion)
        yield bastion


def _make_repository(bastion: Bastion) -> None:
    """/srv/infra.git owned by root (docs/host-config.md's smallest example) and a clone."""
    bastion.sh(
        "git config --global user.name Operator && git config --global user.email op@example.org"
        " && git init -q --bare -b main /srv/infra.git && git init -q -b main /root/infra"
        " && mkdir -p /root/infra/stacks/app"
    )
    (bastion.host.root / "root/infra/gitops.yaml").write_text(MANIFEST)
    (bastion.host.root / "root/infra/stacks/app/main.tf").write_text(STACK)
    bastion.sh(
        "cd /root/infra && git add -A && git commit -qm initial"
        " && git remote add origin /srv/infra.git && git push -q origin HEAD:main"
    )


def test_install_then_enable_starts_a_sandboxed_service_that_applies(bastion: Bastion) -> None:
    out = bastion.sh(f"{AGENT} service install")
    assert "Still yours to provide:" in out
    assert bastion.sh("test -d /etc/sysusers.d && id -u gitops-agent").strip().isdigit()
    config = (
        "repo: {url: file:///srv/infra.git}\n"
        "state_dir: /var/lib/gitops-agent\n"
        "intervals: {poll: 1h, drift: 1h}\n"
        f"http: {{listen: 127.0.0.1:{bastion.port}}}\n"
        "daemon: {jitter: 0s}\n"
        "policy: {destroy: allow}\n"  # the slow resource is replaced on each change
    )
    bastion.sh(f"cat > /etc/gitops-agent/agent.yaml <<'EOF'\n{config}EOF")
    # A short watchdog, so that the test can see it outlive several periods.
    bastion.sh(
        "mkdir -p /etc/systemd/system/gitops-agent.service.d"
        " && printf '[Service]\\nWatchdogSec=4s\\n'"
        " > /etc/systemd/system/gitops-agent.service.d/test.conf && systemctl daemon-reload"
    )
    started = time.monotonic()
    bastion.sh("systemctl enable --now gitops-agent", timeout=180.0)
    ready_after = time.monotonic() - started
    state = bastion.show("ActiveState", "SubState", "MainPID", "Result")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    status = bastion.proc_status(int(state["MainPID"]))
    assert status["Uid"].split()[0] != "0"  # the gitops-agent user, not root
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # a filter is applied
    assert int(status["CapEff"], 16) == 0
    print(f"enable --now returned on READY=1 after {ready_after:.1f} s")

    bastion.wait_for(
        "the first pass", lambda: [r for r in bastion.runs() if r["status"] == "succeeded"]
    )
    units = bastion.agent_json("status")["units"]  # type: ignore[index]
    assert [(u["unit"], u["last_result"]) for u in units] == [("app", "ok")]
    assert "last pass" in bastion.healthz()


def test_reconcile_now_goes_through_the_control_socket(bastion: Bastion) -> None:
    before = len(bastion.runs())
    out = bastion.sh(f"{AS_AGENT} reconcile --now", timeout=WAIT)
    assert "app:" in out
    runs = bastion.runs()
    assert len(runs) == before + 1
    # Run by the daemon (its pass is in the journal), not by the CLI on the state directory.
    assert any(str(runs[0]["id"]) in e["MESSAGE"] for e in bastion.journal())


def test_the_watchdog_keeps_the_service_alive_past_its_interval(bastion: Bastion) -> None:
    pid = bastion.show("MainPID")["MainPID"]
    time.sleep(10)  # 2.5 periods of the test's WatchdogSec=4s
    state = bastion.show("MainPID", "NRestarts", "ActiveState")
    assert state == {"MainPID": pid, "NRestarts": "0", "ActiveState": "active"}


def test_stop_during_an_apply_interrupts_it_cleanly(bastion: Bastion) -> None:
    bastion.push("slow: stopped mid-apply")
    bastion.sh(f"({AS_AGENT} reconcile --now >/root/reconcile.log 2>&1 &)")
    try:
        bastion.wait_for(
            "the slow local-exec to run",
            lambda: "sleep" in bastion.pgrep("sleep"),
            timeout=WAIT,
        )
    except AssertionError as exc:
        seen = bastion.sh("cat /root/reconcile.log; journalctl -u gitops-agent | tail -30")
        raise AssertionError(f"{exc}\n{seen}") from None
    started = time.monotonic()
    bastion.sh("systemctl stop gitops-agent", timeout=120.0)
    took = time.monotonic() - started
    state = bastion.show("ActiveState", "Result")
    assert state["ActiveState"] == "inactive"
    assert state["Result"] == "success", state
    # Nothing of the pass is left: no Terraform, provider or provisioner process.
    assert bastion.pgrep("terraform|sleep") == ""
    # The client that asked for the pass got its answer and ended.
    bastion.wait_for(
        "the client to end",
        lambda: not bastion.pgrep("agent reconcile"),
        timeout=30,
    )
    print(repr(bastion.sh("cat /root/reconcile.log")))
    locks = bastion.sh("find /var/lib/gitops-agent -name '*.lock.info' -o -name pass.lock -size +0")
    assert locks.strip() == ""
    interrupted = [r for r in bastion.runs() if r["status"] == "interrupted"]
    assert interrupted, bastion.runs()
    print(f"systemctl stop mid-apply took {took:.1f} s")


def test_restart_recovers_and_applies_what_was_interrupted(bastion: Bastion) -> None:
    bastion.sh("systemctl restart gitops-agent", timeout=180.0)
    bastion.push("hello again")
    assert bastion.show("ActiveState")["ActiveState"] == "active"
    out = bastion.sh(f"{AS_AGENT} reconcile --now", timeout=WAIT)
    assert "app: applied" in out
    assert bastion.runs()[0]["status"] == "succeeded"


def test_the_journal_has_the_agents_lines_with_their_priorities(bastion: Bastion) -> None:
    agent = [e for e in bastion.journal() if e.get("SYSLOG_IDENTIFIER") == "gitops-agent"]
    by_priority = {e["PRIORITY"] for e in agent}
    assert "6" in by_priority  # INFO: passes, units
    assert any(e["PRIORITY"] == "6" and "unit=app" in e["MESSAGE"] for e in agent)
    # The interrupted pass was logged above INFO.
    assert any(int(e["PRIORITY"]) <= 4 and "interrupt" in e["MESSAGE"] for e in agent), [
        (e["PRIORITY"], e["MESSAGE"]) for e in agent
    ]
    assert not any(e["MESSAGE"].startswith("<") for e in agent)  # prefixes were parsed


CANARY = "canary-7d41c0de-not-for-proposals"
# Files the service's user can read, which a proposal's code must not see.
PRIVATE = {
    "credential": "/run/credentials/gitops-agent.service/gitops_canary",
    "config": "/etc/gitops-agent/agent.yaml",
    "store": "/var/lib/gitops-agent/agent.db",
}
PROBES = "".join(
    f'output "{name}" {{\n  value = fileexists("{path}") ? "READ {name}" : "none"\n}}\n'
    for name, path in PRIVATE.items()
)
DROPIN = "/etc/systemd/system/gitops-agent.service.d/proposals-sandbox.conf"
EXPOSURE: dict[str, float] = {}  # `systemd-analyze security` figures, across the tests below


def _exposure(bastion: Bastion) -> float:
    out = bastion.sh("systemd-analyze security gitops-agent --no-pager")
    last = [line for line in out.splitlines() if "Overall exposure level" in line][-1]
    return float(last.split(":", 1)[1].split()[0])


def _propose(bastion: Bastion, branch: str) -> None:
    """A branch that adds the probes to the app stack (and changes nothing else)."""
    (bastion.host.root / "root/infra/stacks/app/probes.tf").write_text(PROBES)
    bastion.sh(
        f"cd /root/infra && git checkout -q -b {branch} && git add -A"
        f" && git commit -qm 'probes ({branch})' && git push -q origin HEAD:{branch}"
        " && git checkout -q main"
    )


def _proposal(bastion: Bastion, ref: str) -> dict[str, object] | None:
    rows = bastion.agent_json("proposals")
    found = [r for r in rows if r["ref"] == ref]  # type: ignore[index, union-attr]
    return found[0] if found and found[0]["status"] not in ("pending", "planning") else None


def _config_with(bastion: Bastion, extra: str) -> None:
    path = bastion.host.root / "etc/gitops-agent/agent.yaml"
    base = path.read_text().split("proposals:")[0]
    path.write_text(base + extra)


def test_without_the_dropin_bubblewrap_cannot_start_in_the_unit(bastion: Bastion) -> None:
    bastion.sh(
        f"printf %s {CANARY} > /etc/gitops-agent/credentials/canary"
        " && chmod 0600 /etc/gitops-agent/credentials/canary"
    )
    _config_with(bastion, 'proposals: {refs: ["feature/*"], authors: ["*"]}\n')
    _propose(bastion, "feature/before")
    bastion.sh("systemctl restart gitops-agent", timeout=180.0)  # it polls proposals at start
    row = bastion.wait_for(
        "the proposal's plan", lambda: _proposal(bastion, "refs/heads/feature/before")
    )
    (unit,) = row["units"]  # type: ignore[index]
    assert unit["status"] == "failed", row
    assert (
        "bubblewrap cannot start here: bwrap: No permissions to create new namespace"
        in (unit["detail"])
    ), unit
    assert "`agent service install` writes the drop-in" in unit["detail"], unit
    said = [e for e in bastion.journal() if "proposals: no plan can run" in e["MESSAGE"]]
    assert len(said) == 1 and said[0]["PRIORITY"] == "3", said  # once, as an error


def test_install_writes_the_dropin_and_the_service_plans_proposals_in_bubblewrap(
    bastion: Bastion,
) -> None:
    before = EXPOSURE["shipped"] = _exposure(bastion)
    out = bastion.sh(f"{AGENT} service install")
    assert f"install {DROPIN}" in out, out
    assert "RestrictNamespaces=user mnt pid ipc uts cgroup: bubblewrap" in out
    assert "SystemCallFilter=mount umount2 pivot_root capset: bubblewrap" in out
    after = _exposure(bastion)
    props = bastion.show("RestrictNamespaces", "PrivateUsers", "NoNewPrivileges")
    assert props["RestrictNamespaces"] == "cgroup ipc mnt pid user uts", props
    assert props["PrivateUsers"] == "yes" and props["NoNewPrivileges"] == "yes", props
    print(f"systemd-analyze security gitops-agent: {before} without the drop-in, {after} with it")
    assert before < after <= 3.0

    _propose(bastion, "feature/probes")
    bastion.sh("systemctl restart gitops-agent", timeout=180.0)
    ref = "refs/heads/feature/probes"
    row = bastion.wait_for("the proposal's plan", lambda: _proposal(bastion, ref))
    (unit,) = row["units"]  # type: ignore[index]
    assert (row["status"], unit["status"]) == ("planned", "changes"), row  # type: ignore[index]
    plan = bastion.sh(f"{AS_AGENT} logs app --proposal {ref}")
    assert "READ" not in plan and CANARY not in plan, plan
    assert plan.count('= "none"') == len(PRIVATE), plan
    # The service's user reads all three: only the sandbox kept them from the proposal.
    for path in PRIVATE.values():
        if "credentials" not in path:  # systemd hands that one to the service only
            bastion.sh(f"runuser -u gitops-agent -- test -r {path}")
    pid = int(bastion.show("MainPID")["MainPID"])
    assert CANARY in bastion.sh(f"cat /proc/{pid}/root{PRIVATE['credential']}")


def test_install_removes_the_dropin_when_proposals_go(bastion: Bastion) -> None:
    _config_with(bastion, "")
    out = bastion.sh(f"{AGENT} service install")
    assert f"remove {DROPIN}" in out and "has no proposals:" in out, out
    assert bastion.sh(f"test -e {DROPIN} && echo left || echo gone").strip() == "gone"
    # Install reloaded systemd: the unit's settings are the shipped ones again (the running
    # process keeps its own until `systemctl restart`, as install says).
    assert "user" not in bastion.show("RestrictNamespaces")["RestrictNamespaces"]
    assert _exposure(bastion) == EXPOSURE["shipped"]
