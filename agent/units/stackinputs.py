"""A stack unit's inputs in a pass: its variables (literals, outputs of other stacks,
secrets) as Terraform gets them, and the fingerprint of all it reads."""

from __future__ import annotations

import json
import time
from typing import Any

from agent.config import StackOutputRef, Unit
from agent.config.manifest import plain_value
from agent.core.redact import Redactor
from agent.errors import TerraformError
from agent.units.context import StackContext, StackOutput
from agent.units.fingerprint import Fingerprint, stack_fingerprint, state_part
from agent.units.secrets import terraform_variables
from agent.units.stackwork import StackWorkspaces
from providers.errors import ProviderError
from providers.terraform import state_outputs
from providers.terraform.variables import declared_variables


class StackInputs:
    """Reads what a stack unit takes in; upstream outputs once per pass."""

    def __init__(self, workspaces: StackWorkspaces, redactor: Redactor) -> None:
        self.workspaces = workspaces
        self.redactor = redactor

    def fingerprint(self, ctx: StackContext, unit: Unit) -> Fingerprint:
        """The stack unit's inputs in this pass (reads the outputs it takes from others)."""
        deadline = time.monotonic() + unit.timeout
        upstream = {
            name: self.stack_output(ctx, unit, name, value, deadline).value
            for name, value in unit.vars.items()
            if isinstance(value, StackOutputRef)
        }
        binary = self.workspaces.runner().binary
        return stack_fingerprint(
            self.workspaces.hasher,
            ctx.tree,
            unit,
            upstream=upstream,
            secrets=ctx.secrets.values.get(unit.name, {}),
            terraform=[str(binary), binary.identity()],
            backend=self.workspaces.backend_part(ctx, unit),
            state=state_part(self.workspaces.hasher, self.workspaces.state_file(ctx, unit)),
        )

    def variables(
        self, ctx: StackContext, unit: Unit, deadline: float
    ) -> tuple[dict[str, str], frozenset[str]]:
        """The unit's vars as TF_VAR_* values (literals, and outputs of other stacks), and
        the names of those fed from a sensitive output: Terraform is told they are
        sensitive (terraform/workdir.py), so it never prints them, numbers included."""
        variables: dict[str, str] = {}
        sensitive: set[str] = set()
        for name, value in unit.vars.items():
            if isinstance(value, StackOutputRef):
                output = self.stack_output(ctx, unit, name, value, deadline)
                value = output.value
                if output.sensitive:
                    sensitive.add(name)
            if value is None:
                continue  # null: the variable keeps its default
            variables[f"TF_VAR_{name}"] = value if isinstance(value, str) else _hcl(value)
        variables.update(terraform_variables(ctx.secrets.values.get(unit.name, {})))
        # An override of a variable the stack does not declare fails the plan; the manifest
        # check refuses such vars, and a stack it could not read keeps every mark.
        declared = declared_variables(ctx.tree / unit.stack)
        if declared is not None:
            sensitive &= declared
        return variables, frozenset(sensitive)

    def stack_output(
        self, ctx: StackContext, unit: Unit, var: str, ref: StackOutputRef, deadline: float
    ) -> StackOutput:
        outputs = self.read_outputs(ctx, unit, ref.unit, deadline)
        if ref.output not in outputs:
            known = ", ".join(sorted(outputs)) or "none"
            raise TerraformError(
                f"unit {unit.name}: vars.{var} reads output {ref.output!r} of stack unit"
                f" {ref.unit!r}, which has no such output (outputs: {known})",
                hint=f"has {ref.unit!r} been applied? is the output declared?",
            )
        return outputs[ref.output]

    def outputs_of(self, ctx: StackContext, requester: Unit, upstream: str) -> dict[str, Any]:
        """The outputs of stack unit `upstream` (a fleet reads its hosts from them)."""
        deadline = time.monotonic() + requester.timeout
        outputs = self.read_outputs(ctx, requester, upstream, deadline)
        return {name: output.value for name, output in outputs.items()}

    def read_outputs(
        self, ctx: StackContext, requester: Unit, upstream: str, deadline: float
    ) -> dict[str, StackOutput]:
        """Stack unit `upstream`'s outputs, read once per pass. A sensitive output's strings
        are registered with the redactor (they may reach logs by other ways than Terraform's
        output: errors, templates on hosts); the stack that receives one marks its variable
        sensitive (see `variables`)."""
        if upstream in ctx.outputs:
            return ctx.outputs[upstream]
        unit = ctx.manifest.get_unit(upstream)
        assert unit is not None
        # A state the agent keeps is read directly: no Terraform start for a dependent's
        # inputs (the upstream has finished, so the file is not being written).
        state_file = self.workspaces.state_file(ctx, unit)
        entries = state_outputs(state_file) if state_file is not None else None
        if entries is None:
            try:
                entries = self.workspaces.runner().output_entries(
                    self.workspaces.workspace(ctx, unit), deadline
                )
            except ProviderError as exc:
                raise TerraformError(
                    f"unit {requester.name}: terraform output failed: {exc}"
                ) from exc
        outputs = {}
        for name, (value, sensitive) in entries.items():
            if sensitive:
                for text in _strings(value):
                    self.redactor.register(text)
            outputs[name] = StackOutput(value, sensitive)
        ctx.outputs[upstream] = outputs
        return outputs


def _strings(value: Any) -> list[str]:
    """The value as Terraform passes it on (string or JSON), and every string in it."""
    if isinstance(value, str):
        return [value] if value else []
    # Numbers and booleans are not registered: masking every "1" would hide everything.
    found = [json.dumps(value)] if isinstance(value, dict | list) else []
    if isinstance(value, dict):
        for item in value.values():
            found += _strings(item)
    elif isinstance(value, list):
        for item in value:
            found += _strings(item)
    return [text for text in found if text.strip()]


def _hcl(value: Any) -> str:
    # Terraform parses a TF_VAR_ value of a non-string variable as HCL; JSON is HCL.
    return json.dumps(plain_value(value))
