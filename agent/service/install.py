"""`agent service install` / `uninstall`: the agent as a systemd service on a bastion.

Install puts the three files the package ships (`agent.systemd`: unit, sysusers, tmpfiles)
where this machine's systemd reads them, creating the directories it needs (stock Debian 12
has no /etc/sysusers.d), runs systemd-sysusers and systemd-tmpfiles for them (the user and
group, /etc/gitops-agent, its credentials directory, /var/lib/gitops-agent), writes a starter
host config only where none exists, and reloads systemd. Every step says what it did or
would do (`--dry-run`), and a second run changes nothing. It never enables or starts the
service: that stays the operator's `systemctl enable --now gitops-agent`, after they have
given the agent what only they can (the repository, the deploy key).

Credentials: the unit loads the whole directory /etc/gitops-agent/credentials, so it starts
with whichever credentials exist there (no Vault, no Vault secret-id needed). systemd names
each file `gitops_<file>` under /run/credentials/gitops-agent.service/; `missing_credentials`
lets `agent run` name a credential the host config points at but systemd did not load,
with the file to create, instead of failing later in a pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from agent.errors import AgentError
from agent.service.sandbox_dropin import DROPIN, DROPIN_TEXT, LOOSENED, sandbox_need

UNIT_FILE = "gitops-agent.service"
SHIPPED_EXEC = "/opt/gitops-agent/bin/agent"
CREDENTIALS_SOURCE = Path("/etc/gitops-agent/credentials")
CREDENTIALS_RUNTIME = Path("/run/credentials/gitops-agent.service")
CREDENTIAL_PREFIX = "gitops_"  # the ID of the unit's directory `LoadCredential=`
HOST_CONFIG = Path("/etc/gitops-agent/agent.yaml")
COMMAND_TIMEOUT = 60.0  # seconds for each systemd tool run

# shipped file -> where systemd reads it (relative to the root)
_TARGETS = {
    "gitops-agent.service": Path("etc/systemd/system/gitops-agent.service"),
    "gitops-agent.sysusers": Path("etc/sysusers.d/gitops-agent.conf"),
    "gitops-agent.tmpfiles": Path("etc/tmpfiles.d/gitops-agent.conf"),
}

STARTER_CONFIG = """\
# gitops-agent host config, written by `agent service install` (reference: docs/host-config.md).
# Fill in repo.url, then `systemctl enable --now gitops-agent`.
repo:
  url:            # required: git@git.example.com:platform/infra.git, https://..., file:///srv/infra.git
  branch: main
  # For an ssh:// or git@ URL: the deploy key (put it in /etc/gitops-agent/credentials/deploy-key,
  # root:root 0600; systemd hands it over as below) and the Git server's host key.
  # deploy_key: /run/credentials/gitops-agent.service/gitops_deploy-key
  # known_hosts: /etc/gitops-agent/known_hosts
state_dir: /var/lib/gitops-agent
control_socket: /run/gitops-agent/control.sock
# http:                 # webhooks, /metrics and /healthz (docs/webhooks.md)
#   listen: 127.0.0.1:9100
"""


class InstallError(AgentError):
    """A step of `agent service install/uninstall` failed; what was done before stays."""

    reference = "service-install"


@dataclass(frozen=True, slots=True)
class Step:
    """One thing install or uninstall does; `run` is None when there is nothing to do."""

    description: str
    run: Callable[[], None] | None = None

    @property
    def changes(self) -> bool:
        return self.run is not None


def shipped_file(name: str) -> str:
    """The text of a file of the package's `agent.systemd` data (the repo's `systemd/`)."""
    source = Path(__file__).resolve().parents[2] / "systemd" / name  # agent/service/ -> root
    if source.is_file():  # an editable install reads the source tree
        return source.read_text()
    return (resources.files("agent.systemd") / name).read_text()


def agent_executable() -> Path:
    """The `agent` script of the environment this process runs from."""
    beside = Path(sys.executable).parent / "agent"
    if beside.is_file():
        return beside
    found = shutil.which("agent")
    if found is None:
        raise InstallError(
            "cannot find the `agent` command of this installation",
            hint="run the install with the agent you want the service to use, "
            "e.g. /opt/gitops-agent/bin/agent service install",
        )
    return Path(found)


def unit_text(exec_path: Path) -> str:
    """The shipped unit with ExecStart pointing at `exec_path`."""
    text = shipped_file(UNIT_FILE)
    return text.replace(f"ExecStart={SHIPPED_EXEC} run", f"ExecStart={exec_path} run")


def plan_install(
    root: Path = Path("/"), *, exec_path: Path | None = None, run_tools: bool | None = None
) -> list[Step]:
    """The steps of an install into `root` (the running system when "/").

    `run_tools` (default: root is "/") runs systemd-sysusers, systemd-tmpfiles and
    `systemctl daemon-reload` after the files are in place.
    """
    exec_path = exec_path or agent_executable()
    run_tools = (root == Path("/")) if run_tools is None else run_tools
    steps: list[Step] = []
    for name, target in _TARGETS.items():
        text = unit_text(exec_path) if name == UNIT_FILE else shipped_file(name)
        steps.append(_write_step(root / target, text, mode=0o644, replace=True))
    if run_tools:
        sysusers = Path("/") / _TARGETS["gitops-agent.sysusers"]
        tmpfiles = Path("/") / _TARGETS["gitops-agent.tmpfiles"]
        steps.append(
            _tool_step("create the user and group gitops-agent", "systemd-sysusers", str(sysusers))
        )
        steps.append(
            _tool_step(
                "create /etc/gitops-agent, its credentials/ and /var/lib/gitops-agent",
                "systemd-tmpfiles", "--create", str(tmpfiles),
            )
        )  # fmt: skip
    config = root / HOST_CONFIG.relative_to("/")
    steps.append(
        _write_step(config, STARTER_CONFIG, mode=0o640, replace=False, group="gitops-agent")
    )
    steps.append(_sandbox_dropin_step(root, config))
    if run_tools:
        steps.append(_tool_step("reload systemd's units", "systemctl", "daemon-reload"))
    return steps


def plan_uninstall(root: Path = Path("/"), *, run_tools: bool | None = None) -> list[Step]:
    """Stop and disable the service, remove the installed files and the sandbox drop-in.

    The host config, credentials and state directory stay: they are the operator's data.
    """
    run_tools = (root == Path("/")) if run_tools is None else run_tools
    steps: list[Step] = []
    if run_tools and (root / _TARGETS[UNIT_FILE]).exists():
        steps.append(
            _tool_step("stop and disable gitops-agent", "systemctl", "disable", "--now", UNIT_FILE)
        )
    for target in (*_TARGETS.values(), DROPIN):
        path = root / target
        if path.exists():
            steps.append(Step(f"remove {path}", path.unlink))
        elif target != DROPIN:
            steps.append(Step(f"{path}: not there"))
    if run_tools:
        steps.append(_tool_step("reload systemd's units", "systemctl", "daemon-reload"))
    return steps


def _sandbox_dropin_step(root: Path, config: Path) -> Step:
    """Write the proposals' sandbox drop-in when the host config plans proposals under
    bubblewrap, remove it when not (agent.service.sandbox_dropin says what and why)."""
    path = root / DROPIN
    need = sandbox_need(config)
    loosened = "".join(f"\n             {directive}: {why}" for directive, why in LOOSENED)
    restart = "\n             (a running service needs `systemctl restart gitops-agent`)"
    if not need.needed:
        if not path.exists():
            return Step(f"{path}: not needed ({need.reason})")
        return Step(
            f"remove {path} ({need.reason}): the shipped sandbox applies again{restart}",
            path.unlink,
        )
    step = _write_step(path, DROPIN_TEXT, mode=0o644, replace=True)
    why = f" ({need.reason}); it loosens, for bubblewrap only:{loosened}"
    return Step(step.description + why + (restart if step.changes else ""), step.run)


def carry_out(steps: list[Step], *, dry_run: bool, say: Callable[[str], None]) -> None:
    """Run (or with `dry_run` only describe) each step in order; stop at the first failure."""
    for step in steps:
        if step.run is None:
            say(f"  ok       {step.description}")
            continue
        say(f"  {'would' if dry_run else 'do':8} {step.description}")
        if not dry_run:
            step.run()


def _write_step(
    path: Path, text: str, *, mode: int, replace: bool, group: str | None = None
) -> Step:
    if path.exists():
        if not replace:
            return Step(f"{path}: exists, left as it is")
        if path.read_text() == text:
            return Step(f"{path}: up to date")

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        if group is not None:
            _chgrp_if_exists(tmp, group)
        tmp.replace(path)

    return Step(f"write {path}" if path.exists() or not replace else f"install {path}", write)


def _chgrp_if_exists(path: Path, group: str) -> None:
    # A --root install for packaging: the group may exist only on the target.
    with contextlib.suppress(LookupError, PermissionError):
        shutil.chown(path, group=group)


def _tool_step(description: str, *argv: str) -> Step:
    def run() -> None:
        if shutil.which(argv[0]) is None:
            raise InstallError(
                f"{argv[0]} is not installed on this machine",
                hint="the service needs systemd (247 or later); install it or use --root",
            )
        try:
            proc = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            raise InstallError(f"`{' '.join(argv)}` took over {COMMAND_TIMEOUT:.0f} s") from None
        if proc.returncode != 0:
            raise InstallError(
                f"`{' '.join(argv)}` exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-500:]}"
            )

    return Step(f"{description} ({' '.join(argv)})", run)


def what_is_left(root: Path = Path("/")) -> list[str]:
    """What the operator must still provide after an install, in order."""
    config = root / HOST_CONFIG.relative_to("/")
    left = [
        f"the repository: repo.url in {config} (docs/host-config.md)",
        f"for an ssh repository: the deploy key in {CREDENTIALS_SOURCE}/deploy-key (root, 0600) "
        f"and the Git server's key in /etc/gitops-agent/known_hosts",
        f"optional: webhook secrets and a Vault secret-id as files in {CREDENTIALS_SOURCE}/ "
        f"(each reaches the agent as {CREDENTIALS_RUNTIME}/{CREDENTIAL_PREFIX}<file>)",
        "then: systemctl enable --now gitops-agent",
    ]
    return left


def missing_credentials(
    config: object, environ: Mapping[str, str] = os.environ
) -> list[tuple[str, Path, Path]]:
    """Each (key, path, source) of the host config that names a credential of this unit that
    is not there: the key (e.g. `deploy_key`), the path it names, and the file
    under /etc/gitops-agent/credentials that would provide it. A path under
    /run/credentials/gitops-agent.service/ and a `*_credential` name (looked up in
    $CREDENTIALS_DIRECTORY) both count."""
    directory = Path(environ.get("CREDENTIALS_DIRECTORY") or CREDENTIALS_RUNTIME)
    missing = []
    for key, path in _paths(config, "", directory):
        if path.parent not in (directory, CREDENTIALS_RUNTIME) or path.exists():
            continue
        source = CREDENTIALS_SOURCE / path.name.removeprefix(CREDENTIAL_PREFIX)
        # The field's own name: dataclass nesting does not always mirror the YAML keys.
        missing.append((key.rsplit(".", 1)[-1], path, source))
    return missing


def _paths(value: object, key: str, credentials: Path) -> Iterator[tuple[str, Path]]:
    """Every path in a (frozen dataclass) config, with its key path; `*_credential` names
    become paths in the `credentials` directory."""
    if isinstance(value, Path):
        yield key, value
    elif isinstance(value, str) and key.endswith("_credential"):
        yield key, credentials / value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            name = f"{key}.{field.name}".lstrip(".")
            yield from _paths(getattr(value, field.name), name, credentials)
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from _paths(item, f"{key}.{name}".lstrip("."), credentials)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _paths(item, f"{key}[{index}]", credentials)
