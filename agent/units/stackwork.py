"""Where and with what Terraform runs for stack units: the binary and its CLI config (set
up once per agent), each unit's shadow work area, and where its state is kept (the
agent's file, the host config's `terraform.state_backend`, or the stack's own backend)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import HostConfig, Unit
from agent.core.fsutil import ensure_private_dir
from agent.core.redact import Redactor
from agent.errors import TerraformError
from agent.state.layout import StateLayout
from agent.units.context import StackContext
from agent.units.fingerprint import Hasher, load_key, state_part
from providers.errors import ProviderError
from providers.proctrack import ChildTracker
from providers.terraform import (
    TerraformRunner,
    UnitWorkspace,
    find_terraform,
    install_builtin_providers,
    keeps_agent_state,
    write_cli_config,
)


class StackWorkspaces:
    """The Terraform runner and the work areas of stack units; one per agent."""

    def __init__(
        self,
        host: HostConfig,
        layout: StateLayout,
        redactor: Redactor,
        *,
        children: ChildTracker | None = None,
        key: Callable[[], bytes] | None = None,
    ) -> None:
        """`key`: loads the fingerprint key (default: the state directory's)."""
        self.host = host
        self.layout = layout
        self.children = children
        self._runner: TerraformRunner | None = None
        self._runner_lock = threading.Lock()
        self.hasher = Hasher(key or (lambda: load_key(layout.root)))
        # Read now: a missing connection-string file stops the start, naming the key.
        backend = host.terraform.state_backend
        self.state_backend = backend.open(redactor.register) if backend else None

    def runner(self) -> TerraformRunner:
        with self._runner_lock:
            if self._runner is None:
                try:
                    binary = find_terraform(
                        self.host.terraform.binary,
                        version_cache=self.layout.root / "terraform" / "versions.json",
                    )
                except ProviderError as exc:
                    raise TerraformError(
                        str(exc), hint="set terraform.binary in the host config"
                    ) from exc
                cache = self.host.terraform.plugin_cache_dir
                ensure_private_dir(cache)
                mirror = self.layout.provider_mirror
                write_cli_config(
                    self.layout.cli_config,
                    plugin_cache_dir=cache,
                    mirror_dir=mirror,
                    mirrored=install_builtin_providers(mirror),
                )
                self._runner = TerraformRunner(
                    binary,
                    cli_config=self.layout.cli_config,
                    plugin_cache_dir=cache,
                    lock_timeout=self.host.terraform.lock_timeout,
                    children=self.children,
                )
            return self._runner

    def workspace(
        self, ctx: StackContext, unit: Unit, sensitive: frozenset[str] | None = None
    ) -> UnitWorkspace:
        """Where Terraform runs for `unit`; `sensitive`: the variables to mark sensitive
        there (None: leave the marks of the last plan)."""
        ensure_private_dir(self.layout.unit_dir(unit.name))
        return UnitWorkspace(
            stack_dir=ctx.tree / unit.stack,
            data_dir=self.layout.unit_data_dir(unit.name),
            state_file=self.layout.unit_state_file(unit.name),
            root=ctx.tree,  # Terraform runs in a shadow of the stack: see terraform/workdir.py
            backend=self.state_backend,
            unit=unit.name,
            sensitive_vars=sensitive,
        )

    def state_file(self, ctx: StackContext, unit: Unit) -> Path | None:
        """The unit's local state file, or None when its state is elsewhere: the stack's
        own backend, or the host config's `terraform.state_backend`."""
        if self.state_backend is None and keeps_agent_state(ctx.tree / unit.stack):
            return self.layout.unit_state_file(unit.name)
        return None

    def backend_part(self, ctx: StackContext, unit: Unit) -> dict[str, Any]:
        """Where the unit's state is kept, for its fingerprint."""
        if not keeps_agent_state(ctx.tree / unit.stack):
            return {"kept_by": "stack"}  # its settings are in the stack's files (hashed)
        if self.state_backend is not None:
            remote = self.state_backend
            return {"kept_by": "agent", "remote": [remote.kind, remote.settings, remote.prefix]}
        return {"kept_by": "agent", "path": str(self.layout.unit_state_file(unit.name))}

    def state_part(self, ctx: StackContext, unit: Unit) -> str:
        return state_part(self.hasher, self.state_file(ctx, unit))

    def interrupt(self) -> None:
        """The running Terraform commands get one SIGINT each."""
        if self._runner is not None:
            self._runner.interrupt()
