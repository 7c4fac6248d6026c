"""The host engine's types: what the agent asks for, and what it gets back.

The agent's manifest layer builds `Resource` and `Handler` values (already validated);
`converge` returns one frozen `HostReport` per host. Nothing here talks to a host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "changed", "would-change", "failed", "held"]


@dataclass(frozen=True)
class Resource:
    """One thing a host must have, in manifest order.

    `attrs` are the kind's attributes (see docs/resources.md); file and template
    `content` is bytes (the agent renders templates and reads `source` files first).
    """

    kind: str  # file|template|directory|link|package|service|user|group|command
    name: str  # path, package, service, user, group, or a command's label
    attrs: Mapping[str, Any] = field(hash=False)
    notify: tuple[str, ...] = ()  # handler names
    sensitive: bool = False  # content holds a secret: diffs show sha256 hashes, never text

    @property
    def id(self) -> str:
        """`kind:name`, the resource's name in every message."""
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class Handler:
    """A service action run once after the resources that notify it changed."""

    name: str
    service: str
    action: str  # "restart" | "reload"


@dataclass(frozen=True)
class Change:
    """One difference between a host and the desired state of one resource.

    `text` is the line a person reads (`mode 0600 -> 0644`); `diff` is a unified diff
    of a text content change (hashes only when sensitive or binary), else empty.
    """

    attr: str
    before: Any
    after: Any
    text: str
    diff: str = ""


@dataclass(frozen=True)
class ResourceOutcome:
    """What happened to one resource on one host.

    `existed` says whether the object (path, package, user, group) was there before this
    converge touched it (None: not known, or a kind without one); the agent records from
    it whether it created the object or adopted one. `held`: a removal left for approval.
    """

    resource_id: str
    status: Status
    changes: tuple[str, ...] = ()
    diff: str = ""
    error: str | None = None
    existed: bool | None = None


@dataclass(frozen=True)
class HostReport:
    """The result of converging one host.

    `error` is set for a host-level failure (unreachable, no python3, a transport error,
    an unreadable answer); `outcomes` may then be empty or incomplete. `handlers_run`
    names the handlers that ran and succeeded; `handler_errors` holds one message per
    handler that failed, and `handlers_failed` their names (with those that were due but
    never ran because the apply round trip failed): the caller keeps them pending.
    `round_trips` counts the commands sent to the host.
    """

    host: str
    outcomes: tuple[ResourceOutcome, ...] = ()
    handlers_run: tuple[str, ...] = ()
    handler_errors: tuple[str, ...] = ()
    handlers_failed: tuple[str, ...] = ()
    round_trips: int = 0
    error: str | None = None
    duration_s: float = 0.0

    @property
    def changed(self) -> int:
        """How many resources were changed."""
        return sum(1 for outcome in self.outcomes if outcome.status == "changed")

    @property
    def failed(self) -> int:
        """How many resources failed (host-level and handler errors are separate)."""
        return sum(1 for outcome in self.outcomes if outcome.status == "failed")

    @property
    def pending(self) -> int:
        """How many resources would change (dry run)."""
        return sum(1 for outcome in self.outcomes if outcome.status == "would-change")

    @property
    def held(self) -> int:
        """How many removals wait for approval (they were shown, not applied)."""
        return sum(1 for outcome in self.outcomes if outcome.status == "held")

    @property
    def ok(self) -> bool:
        """True when nothing failed: no host error, no failed resource, no handler error."""
        return self.error is None and not self.failed and not self.handler_errors
