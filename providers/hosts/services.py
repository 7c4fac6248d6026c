"""service: systemd units, enabled at boot or not, running or stopped.

The host reports LoadState, ActiveState, SubState, UnitFileState and NeedDaemonReload for
every service from one `systemctl show` call. A name without a suffix is a `.service` unit.
A unit whose file changed on disk since systemd read it (`NeedDaemonReload=yes`) is drift:
the apply runs `systemctl daemon-reload` first. A service placed after a package that
changes in the same apply is checked again at its turn (`recheck_operation`): a package's
postinst may enable or start what the service resource says must stay disabled or stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from providers.errors import ResourceConflictError
from providers.hosts.common import SAFE_NAME
from providers.hosts.model import Change, Resource

Facts = Mapping[str, Any]
Op = dict[str, Any]

# UnitFileState values for which `systemctl is-enabled` succeeds: nothing to enable.
ENABLED = frozenset(
    {"enabled", "enabled-runtime", "alias", "static", "indirect", "generated", "transient"}
)
DISABLEABLE = frozenset({"enabled", "enabled-runtime"})
RUNNING = frozenset({"active", "reloading", "activating"})


def unit_name(name: str) -> str:
    """'nginx' -> 'nginx.service'; a name with a suffix ('x.timer') stays as it is."""
    return name if "." in name else f"{name}.service"


def query(resource: Resource) -> dict[str, Any]:
    """Services are gathered together on the host; each asks for its unit."""
    return {"kind": "service", "unit": unit_name(resource.name)}


def diff(resource: Resource, facts: Facts) -> list[Change]:
    """Enable/disable and start/stop changes; None for either attribute leaves it."""
    unit = unit_name(resource.name)
    if not SAFE_NAME.fullmatch(unit):
        raise ResourceConflictError(f"{unit!r} is not a systemd unit name")
    enabled, state = resource.attrs.get("enabled"), resource.attrs.get("state")
    unit_file, active = str(facts.get("unit_file") or ""), str(facts.get("active") or "")
    if facts.get("load") == "masked" and (enabled or state == "running"):
        raise ResourceConflictError(
            f"{unit} is masked; unmask it (systemctl unmask {unit}) or stop managing it"
        )
    changes: list[Change] = []
    if facts.get("need_reload"):
        text = "daemon-reload (its unit file changed on disk since systemd read it)"
        changes.append(Change("daemon-reload", True, False, text))
    if enabled is True and unit_file not in ENABLED:
        changes.append(Change("enabled", unit_file, True, f"enable (was {unit_file or 'unknown'})"))
    if enabled is False and unit_file in DISABLEABLE:
        changes.append(Change("enabled", unit_file, False, f"disable (was {unit_file})"))
    if state == "running" and active not in RUNNING:
        if facts.get("load") == "not-found":
            text = "start (the unit does not exist yet)"
        else:
            text = f"start (was {active or 'unknown'})"
        changes.append(Change("state", active, "running", text))
    if state == "stopped" and active in RUNNING:
        changes.append(Change("state", active, "stopped", f"stop (was {active})"))
    return changes


def _systemctl(verb: str, unit: str) -> dict[str, Any]:
    # "systemd": unit files written earlier in the same run need a daemon-reload first.
    return {"do": "run", "argv": ["systemctl", verb, unit], "systemd": True}


def operation(resource: Resource, facts: Facts, changes: list[Change]) -> Op:
    """Enable before start; stop before disable."""
    unit = unit_name(resource.name)
    wanted = {change.attr: change.after for change in changes}
    steps: list[dict[str, Any]] = []
    if "daemon-reload" in wanted:
        steps.append({"do": "daemon_reload"})
    if wanted.get("enabled") is True:
        steps.append(_systemctl("enable", unit))
    if wanted.get("state") == "running":
        steps.append(_systemctl("start", unit))
    if wanted.get("state") == "stopped":
        steps.append(_systemctl("stop", unit))
    if wanted.get("enabled") is False:
        steps.append(_systemctl("disable", unit))
    return {"steps": steps}


def recheck_operation(resource: Resource) -> Op:
    """Ask the host again at this service's turn, after a package changed earlier in the
    apply: enable/start/stop/disable as desired, or nothing (the facts still hold)."""
    step = {
        "do": "service",
        "unit": unit_name(resource.name),
        "enabled": resource.attrs.get("enabled"),
        "state": resource.attrs.get("state"),
        "systemd": True,
    }
    return {"steps": [step]}


def handler_step(service: str, action: str) -> dict[str, Any]:
    """The command a handler runs: `systemctl restart|reload UNIT`."""
    return _systemctl(action, unit_name(service))
