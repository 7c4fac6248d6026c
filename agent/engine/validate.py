"""`agent validate [REPO_DIR]`: check a repo's manifest, stacks and templates offline.

Meant for the infra repo's own CI: it needs no host config (the default limits
apply), no state directory and no network. With `--config`, the host config's
limits (allowed paths, timeouts) are checked too, exactly as the agent would.

Every template (and templated command line) of a fleet is rendered for every host of a
static host list, with the variables, sandbox and strictness of a pass: an undefined
variable or a Jinja syntax error fails validation, naming the template file:line, the
unit and the host. What is only known at reconcile time is a placeholder: secrets, `vars`
read from a stack output, and hosts listed by a stack output (their facts and vars); an
error that may come from a placeholder is a warning, and the output says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from agent.config import (
    Manifest,
    ManifestLimits,
    StackOutputRef,
    Unit,
    load_host_config,
    load_manifest,
    resolve_host_config_path,
)
from agent.config.fleet import HostsFromEc2, HostsFromStack, HostSpec
from agent.config.fleetresources import ResourceSpec
from agent.config.manifest import plain_value
from agent.errors import AgentError, ConfigError
from agent.units.fleetplan import COMMAND_TEMPLATES, host_resources, host_variables
from providers.errors import ProviderError, TemplateRenderError
from providers.hosts.templates import render_string, render_template
from providers.terraform import find_terraform
from providers.terraform.localexec import local_exec_uses
from providers.terraform.offline_validate import validate_offline
from providers.text import plural


@dataclass
class ValidationReport:
    repo: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was checked with placeholders
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
            "notes": self.notes,
        }

    def render(self) -> str:
        lines = [*self.errors, *self.warnings, *self.notes]
        if self.ok:
            units = ", ".join(self.units)
            lines.append(f"{self.repo}: valid ({plural(len(self.units), 'unit')}: {units})")
        else:
            lines.append(f"{self.repo}: invalid ({plural(len(self.errors), 'error')})")
        return "\n".join(lines)


def validate_repo(repo_dir: Path, *, config_path: str | None = None) -> ValidationReport:
    """Validate `repo_dir`'s gitops.yaml, render each fleet's templates for its hosts, then
    validate each stack with `terraform validate`."""
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
    for unit in manifest.units:
        if unit.fleet is not None:
            check_fleet_templates(repo_dir.resolve(), manifest, unit, report)
    try:
        binary = find_terraform(binary_name)
    except ProviderError as exc:
        report.warnings.append(f"stacks not checked: {exc}")
        return report
    for unit in manifest.units:
        if unit.fleet is not None:
            continue  # no stack
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


def check_fleet_templates(
    repo: Path, manifest: Manifest, unit: Unit, report: ValidationReport
) -> None:
    """Render every template and templated command of fleet `unit` for each of its hosts,
    as a pass would (see the module's docstring for the placeholders)."""
    assert unit.fleet is not None
    fleet = unit.fleet
    unit_vars: dict[str, Any] = {}
    for name, value in unit.vars.items():
        # An output of another stack: any shape, known after that stack applies.
        unit_vars[name] = (
            jinja2.ChainableUndefined() if isinstance(value, StackOutputRef) else value
        )
    from_outputs = sorted(
        name for name, value in unit.vars.items() if isinstance(value, StackOutputRef)
    )
    secrets = {name: f"<secret {name}>" for name in unit.secrets}
    if isinstance(fleet.hosts, HostsFromStack):
        ref = fleet.hosts
        placeholder = f"<a host of output {ref.output} of {ref.unit}>"
        hosts: tuple[HostSpec, ...] = (HostSpec(name=placeholder, address=placeholder),)
        report.notes.append(
            f"unit {unit.name}: hosts come from output {ref.output!r} of stack unit"
            f" {ref.unit!r}: templates were rendered once, with placeholder host facts"
            " (host.name, host.address) and without the hosts' own vars"
        )
    elif isinstance(fleet.hosts, HostsFromEc2):
        placeholder = "<an EC2 instance>"
        hosts = (HostSpec(name=placeholder, address=placeholder),)
        report.notes.append(
            f"unit {unit.name}: hosts come from EC2: templates were rendered once, with"
            " placeholder host facts (host.name, host.address) and without the hosts' own vars"
        )
    else:
        hosts = fleet.hosts
    if from_outputs:
        report.notes.append(
            f"unit {unit.name}: vars {', '.join(from_outputs)} come from stack outputs:"
            " rendered with placeholders"
        )
    # Certain: nothing but known values went in, so a failure will happen at the pass.
    certain = not from_outputs and isinstance(fleet.hosts, tuple)
    found: dict[tuple[str, bool], list[str]] = {}
    for spec in hosts:
        variables = host_variables(fleet, spec, unit_vars, secrets)
        for item in host_resources(manifest.roles, fleet, spec):
            for problem, syntax in _render(repo, item, variables):
                found.setdefault((problem, certain or syntax), []).append(spec.name)
    for (problem, is_error), names in found.items():
        who = (
            "hosts from a stack output"
            if isinstance(fleet.hosts, HostsFromStack)
            else "hosts from EC2"
            if isinstance(fleet.hosts, HostsFromEc2)
            else f"{'host' if len(names) == 1 else 'hosts'} {', '.join(names)}"
        )
        text = f"unit {unit.name}, {who}: {problem}"
        if is_error:
            report.errors.append(text)
        else:
            report.warnings.append(f"{text} (warning: rendered with placeholders)")


def _render(repo: Path, item: ResourceSpec, variables: dict[str, Any]) -> list[tuple[str, bool]]:
    """(why, syntax) for each template of one resource that fails to render; `syntax` when
    the text itself is wrong, whatever the variables."""
    attrs = item.attrs
    problems: list[tuple[str, bool]] = []

    def attempt(render: Any, *args: Any, **kwargs: Any) -> None:
        try:
            render(*args, **kwargs)
        except TemplateRenderError as exc:
            problems.append((str(exc), exc.syntax))
        except ProviderError as exc:
            problems.append((str(exc), True))  # an unreadable template: no host can have it

    if item.kind == "template" and attrs.get("state") != "absent":
        source = attrs["source"]
        values = {**variables, **plain_value(attrs.get("vars") or {})}
        attempt(render_template, repo / source, values, display_name=source, root=repo)
        problems = [(f"{why} (the template of {item.where})", syntax) for why, syntax in problems]
    if item.kind == "command":
        for key in COMMAND_TEMPLATES:
            if attrs.get(key) is not None:
                name = item.where if key == "command" else f"{item.where}.{key}"
                attempt(render_string, attrs[key], variables, display_name=name)
        for key, value in dict(attrs.get("env") or {}).items():
            attempt(render_string, value, variables, display_name=f"{item.where}.env.{key}")
    return problems
