"""`agent validate [REPO_DIR]`: check a repo's manifest and stacks offline.

Meant for the infra repo's own CI: it needs no host config (the default limits
apply), no state directory and no network. With `--config`, the host config's
limits (allowed paths, timeouts) are checked too, exactly as the agent would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import (
    ManifestLimits,
    Unit,
    load_host_config,
    load_manifest,
    resolve_host_config_path,
)
from agent.errors import AgentError, ConfigError
from providers.errors import ProviderError
from providers.terraform import find_terraform
from providers.terraform.localexec import local_exec_uses
from providers.terraform.offline_validate import validate_offline


@dataclass
class ValidationReport:
    repo: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {
            "repo": str(self.repo),
            "valid": self.ok,
            "units": self.units,
            "errors": self.errors,
            "warnings": self.warnings,
        }

    def render(self) -> str:
        lines = [*self.errors, *self.warnings]
        if self.ok:
            lines.append(f"{self.repo}: valid ({len(self.units)} units: {', '.join(self.units)})")
        else:
            lines.append(f"{self.repo}: invalid ({len(self.errors)} errors)")
        return "\n".join(lines)


def validate_repo(repo_dir: Path, *, config_path: str | None = None) -> ValidationReport:
    """Validate `repo_dir`'s gitops.yaml, then each stack with `terraform validate`."""
    report = ValidationReport(repo=repo_dir)
    limits = ManifestLimits()
    binary_name = None
    if config_path is not None or "GITOPS_AGENT_CONFIG" in os.environ:
        host = load_host_config(resolve_host_config_path(config_path, os.environ))
        limits = ManifestLimits.from_host(host)
        binary_name = host.terraform.binary
    try:
        manifest = load_manifest(repo_dir.resolve(), limits)
    except ConfigError as exc:
        report.errors.extend(exc.message.splitlines())
        return report
    report.units = [u.name for u in manifest.units]
    report.warnings.extend(_secrets_in_local_exec(repo_dir.resolve(), manifest.units))
    try:
        binary = find_terraform(binary_name)
    except ProviderError as exc:
        report.warnings.append(f"stacks not checked: {exc}")
        return report
    for unit in manifest.units:
        try:
            diagnostics = validate_offline(binary, repo_dir.resolve() / unit.stack)
        except (ProviderError, AgentError) as exc:
            report.errors.append(f"{unit.stack}: {exc}")
            continue
        for diag in diagnostics:
            target = report.errors if diag.severity == "error" else report.warnings
            target.append(f"unit {unit.name}: {diag.render(unit.stack)}")
    return report


def _secrets_in_local_exec(repo: Path, units: tuple[Unit, ...]) -> list[str]:
    """A warning for each secret variable written into a `local-exec` command line, where
    every user of the bastion can read it (/proc/PID/cmdline)."""
    warnings = []
    for unit in units:
        if not unit.stack or not unit.secrets:
            continue
        for use in local_exec_uses(repo / unit.stack, unit.secrets):
            warnings.append(
                f"unit {unit.name}: {unit.stack}/{use.filename}:{use.line}: warning:"
                f" var.{use.variable} holds a secret ({unit.secrets[use.variable]}) and is"
                " written into a local-exec command line, which every user of the bastion"
                " can read in /proc/PID/cmdline; pass it with"
                f' environment = {{ NAME = var.{use.variable} }} and use "$NAME" in the command'
            )
    return warnings
