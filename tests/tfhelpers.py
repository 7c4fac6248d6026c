"""Helpers for tests that run real Terraform (the embedded engine) and the real providers.

    runner = make_runner(tmp_path)
    ws = make_workspace(tmp_path, {"main.tf": 'resource "terraform_data" "x" {}'})
    runner.init_if_needed(ws, Lines(), deadline_in(60))

`make_runner` always uses the embedded engine (a `terraform` may or may not be on PATH) and a
CLI config whose dev_overrides point at the installed `terraform-provider-localfile`.
"""

from __future__ import annotations

import functools
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from providers.terraform import (
    TerraformBinary,
    TerraformRunner,
    UnitWorkspace,
    embedded_terraform,
    install_builtin_providers,
    write_cli_config,
)

# Only the provider's source address: a stack that uses it declares
#   terraform { required_providers { localfile = { source = LOCALFILE_SOURCE } } }
LOCALFILE_SOURCE = "gitops-agent.local/builtin/localfile"
LOCALFILE_REQUIRED = f"""
terraform {{
  required_providers {{
    localfile = {{ source = "{LOCALFILE_SOURCE}" }}
  }}
}}
"""


@functools.cache
def embedded_binary() -> TerraformBinary:
    """The embedded engine (looked up once per test session)."""
    return embedded_terraform()


def make_runner(tmp_path: Path, **kwargs: Any) -> TerraformRunner:
    """A runner on the embedded engine; CLI config and plugin cache under tmp_path/terraform."""
    root = tmp_path / "terraform"
    mirrored = install_builtin_providers(root / "providers")
    assert mirrored, "terraform-provider-localfile is not installed (pip install -e .)"
    cache = root / "plugin-cache"
    cache.mkdir(parents=True, exist_ok=True)
    cli_config = write_cli_config(
        root / "cli.tfrc",
        plugin_cache_dir=cache,
        mirror_dir=root / "providers",
        mirrored=mirrored,
    )
    return TerraformRunner(
        embedded_binary(), cli_config=cli_config, plugin_cache_dir=cache, **kwargs
    )


def make_workspace(
    tmp_path: Path, files: Mapping[str, str] | None = None, name: str = "stack"
) -> UnitWorkspace:
    """A stack in tmp_path/checkout/NAME (files dedented); data and state in tmp_path/state."""
    stack = tmp_path / "checkout" / name
    stack.mkdir(parents=True, exist_ok=True)
    write_files(stack, files or {})
    unit = tmp_path / "state" / "units" / name
    return UnitWorkspace(
        stack_dir=stack, data_dir=unit / "tfdata", state_file=unit / "terraform.tfstate"
    )


def write_files(directory: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def deadline_in(seconds: float) -> float:
    return time.monotonic() + seconds


class Lines(list[str]):
    """An `on_line` sink that keeps every line."""

    def __call__(self, line: str) -> None:
        self.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self)


def plan_and_show(
    runner: TerraformRunner,
    ws: UnitWorkspace,
    variables: Mapping[str, str] | None = None,
    *,
    timeout: float = 60.0,
) -> tuple[int, dict[str, Any], Path]:
    """init if needed, plan, show: (exit code 0/2, the plan JSON, the plan file)."""
    deadline = deadline_in(timeout)
    runner.init_if_needed(ws, Lines(), deadline)
    plan_file = ws.data_dir.parent / "tfplan"
    outcome = runner.plan(ws, plan_file, variables or {}, Lines(), deadline)
    return outcome.value, runner.show_json(ws, plan_file, deadline), plan_file
