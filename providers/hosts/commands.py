"""command: a shell command (`/bin/sh -c`) run when its guards say so.

Guards (`creates`, then `unless`, then `onlyif`) are evaluated on the host in the facts
round trip, and again just before the command runs in the apply round trip (an earlier
resource may have satisfied them). A command without a guard runs on every pass.
`env` (which may hold secrets) travels in the JSON on stdin, never in a command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from providers.hosts.model import Change, Resource

Facts = Mapping[str, Any]
Op = dict[str, Any]


def _spec(resource: Resource) -> dict[str, Any]:
    attrs = resource.attrs
    env = attrs.get("env") or {}
    return {
        "creates": attrs.get("creates"),
        "unless": attrs.get("unless"),
        "onlyif": attrs.get("onlyif"),
        "env": {str(key): str(value) for key, value in env.items()},
        "cwd": attrs.get("cwd"),
    }


def query(resource: Resource) -> dict[str, Any]:
    """The guards, with the command's env and cwd (guards run as the command would)."""
    return {"kind": "command", **_spec(resource)}


def diff(resource: Resource, facts: Facts) -> list[Change]:
    """One 'run' change when the guards say the command must run."""
    if not facts.get("run"):
        return []
    reason = facts.get("reason") or "no guard"
    return [Change("run", None, reason, f"run ({reason})")]


def operation(resource: Resource, facts: Facts, changes: list[Change]) -> Op:
    """Check the guards again, then run the command."""
    return {
        "steps": [{"do": "command", "command": str(resource.attrs["command"]), **_spec(resource)}]
    }
