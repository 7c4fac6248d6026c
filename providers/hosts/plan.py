"""Turning per-resource operations into the apply round trip's program.

Operations keep manifest order. Neighbouring package operations with the same command
become one package-manager call (the host splits it again on failure). Handlers are
added in the order they are defined, each with the resources that notify it; the host
runs one only if at least one of those changed successfully.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from providers.hosts.common import SAFE_NAME
from providers.hosts.model import Handler, Resource
from providers.hosts.services import handler_step, unit_name

Op = dict[str, Any]
HANDLER_ACTIONS = ("restart", "reload")


def _same_command(a: Op, b: Op) -> bool:
    return all(a.get(key) == b.get(key) for key in ("argv", "env", "refresh"))


def build_ops(operations: Sequence[tuple[int, Op]]) -> list[Op]:
    """`(resource index, operation)` in manifest order -> the ops sent to the host."""
    ops: list[Op] = []
    for index, operation in operations:
        if operation.get("packages"):
            last = ops[-1] if ops else None
            if last is not None and last.get("packages") and _same_command(last, operation):
                last["ids"].append(index)
                last["items"].append([index, operation["spec"]])
                continue
            merged = {key: value for key, value in operation.items() if key != "spec"}
            ops.append({**merged, "ids": [index], "items": [[index, operation["spec"]]]})
        else:
            ops.append({"ids": [index], "steps": operation["steps"]})
    return ops


def build_handlers(
    resources: Sequence[Resource],
    changing: Sequence[int],
    handlers: Mapping[str, Handler],
    *,
    pending: Sequence[str] = (),
) -> tuple[list[Op], list[str]]:
    """The handlers the changing resources notify, and a message per unusable notify.

    A `pending` handler (it failed in an earlier pass) runs whether or not anything
    notifies it now: the change it was for has not been picked up yet.
    """
    errors: list[str] = []
    notified: dict[str, list[int]] = {name: [] for name in pending if name in handlers}
    for index in changing:
        resource = resources[index]
        for name in resource.notify:
            if name not in handlers:
                errors.append(f"{resource.id}: notifies {name!r}, which is not a defined handler")
                continue
            notified.setdefault(name, []).append(index)
    ops: list[Op] = []
    for name, handler in handlers.items():
        if name not in notified:
            continue
        if handler.action not in HANDLER_ACTIONS:
            errors.append(f"handler {name!r}: action {handler.action!r} is not restart or reload")
            continue
        if not SAFE_NAME.fullmatch(unit_name(handler.service)):
            errors.append(f"handler {name!r}: {handler.service!r} is not a systemd unit name")
            continue
        step = handler_step(handler.service, handler.action)
        op = {"name": name, **step, "notified_by": notified[name]}
        if name in pending:
            op["always"] = True
        ops.append(op)
    return ops, errors
