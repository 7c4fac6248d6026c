"""The drop-in that lets bubblewrap start inside the agent's systemd sandbox, when it must.

Proposal plans run Terraform under bubblewrap (providers/sandbox.py), which needs a user
namespace, a mount namespace and the mount system calls. The shipped unit refuses all of
them (`RestrictNamespaces=yes`, a filter of `@system-service` minus `@privileged`): under
systemd every proposal plan would fail with `bwrap: No permissions to create new
namespace`. So `agent service install` writes
`/etc/systemd/system/gitops-agent.service.d/proposals-sandbox.conf` when the host config
has `proposals:` with the bubblewrap sandbox, and removes it when it has not: the service
is only as loose as the host config makes it.

What the drop-in allows is the minimum found by trying on a systemd 252 host (Debian 12,
bubblewrap 0.8, the agent's own bwrap arguments), each removal of one item made bwrap fail:

    RestrictNamespaces=user mnt pid ipc uts cgroup   the namespaces bwrap unshares
                                                     (without `cgroup`: "No permissions to
                                                     create new namespace")
    SystemCallFilter=mount umount2 pivot_root capset  without mount: "Failed to make /
                                                     slave"; umount2: "unmount old root";
                                                     pivot_root: "pivot_root"; capset:
                                                     "capset failed"

`PrivateUsers=yes`, `NoNewPrivileges=yes`, the empty capability bounding set,
`ProtectKernelTunables=yes` and `ProtectProc=invisible` all stay: bwrap runs without them
(its new /proc mounts fine). No network namespace is allowed: bwrap shares the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from agent.errors import AgentError

DROPIN = Path("etc/systemd/system/gitops-agent.service.d/proposals-sandbox.conf")

# (directive, why): what the drop-in loosens, printed by `agent service install`.
LOOSENED: tuple[tuple[str, str], ...] = (
    (
        "RestrictNamespaces=user mnt pid ipc uts cgroup",
        "bubblewrap puts each proposal's Terraform in new user, mount, PID, IPC, UTS and"
        " cgroup namespaces (no network namespace)",
    ),
    (
        "SystemCallFilter=mount umount2 pivot_root capset",
        "bubblewrap builds the sandbox's root with mount, umount2 and pivot_root, and drops"
        " its capabilities with capset",
    ),
)

DROPIN_TEXT = (
    "# Written by `agent service install` because the host config has `proposals:` with the\n"
    "# bubblewrap sandbox; removed by it when that goes. Do not edit: put changes in\n"
    "# override.conf (`systemctl edit gitops-agent`). docs/systemd.md says why each line.\n"
    "[Service]\n" + "".join(f"# {why}\n{directive}\n" for directive, why in LOOSENED)
)


class DropinError(AgentError):
    """The host config could not be read to decide on the proposals' sandbox drop-in."""

    reference = "service-install"


@dataclass(frozen=True, slots=True)
class SandboxNeed:
    """Whether the host config plans proposals under bubblewrap, and why (for the output)."""

    needed: bool
    reason: str


def sandbox_need(config: Path) -> SandboxNeed:
    """Read `config` (raw YAML: a half-written config still installs) for `proposals:`.

    Needed when `proposals:` is a mapping whose `sandbox` is not `none` (bwrap is the
    default). The agent validates the whole file when it starts; here only this key counts.
    """
    try:
        text = config.read_text()
    except FileNotFoundError:
        return SandboxNeed(False, f"{config} does not exist yet")
    except OSError as exc:
        raise DropinError(
            f"{config}: cannot read the host config: {exc.strerror}",
            hint="run `agent service install` as root",
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise DropinError(
            f"{config}{where}: not valid YAML, so it cannot say whether proposals are on",
            hint="fix the file (`agent validate --config ...` names the error), then install again",
        ) from None
    proposals = data.get("proposals") if isinstance(data, dict) else None
    if not isinstance(proposals, dict):
        return SandboxNeed(False, f"{config} has no proposals:")
    if proposals.get("sandbox") == "none":
        return SandboxNeed(False, f"{config} has proposals: with sandbox: none")
    return SandboxNeed(True, f"{config} has proposals: with the bubblewrap sandbox")
