"""Running Terraform (or OpenTofu) for stack units. See docs/terraform.md."""

from providers.terraform.cliconfig import (
    builtin_dev_overrides,
    install_builtin_providers,
    write_cli_config,
)
from providers.terraform.locate import TerraformBinary, embedded_terraform, find_terraform
from providers.terraform.plan import PlanSummary, ResourceChange, summarize_plan
from providers.terraform.runner import PlanOutcome, TerraformRunner, UnitWorkspace
from providers.terraform.workdir import keeps_agent_state, state_outputs

__all__ = [
    "PlanOutcome",
    "PlanSummary",
    "ResourceChange",
    "TerraformBinary",
    "TerraformRunner",
    "UnitWorkspace",
    "builtin_dev_overrides",
    "embedded_terraform",
    "find_terraform",
    "install_builtin_providers",
    "keeps_agent_state",
    "state_outputs",
    "summarize_plan",
    "write_cli_config",
]
