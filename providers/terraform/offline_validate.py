"""`terraform validate` of a stack without network, for a repo's own CI.

A stack is validated without `init`: its syntax and references are checked; the
errors that only say a provider or module is not installed are dropped, since
installing them would need the network (and the agent's bastion does that).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from providers.errors import TerraformCommandError
from providers.terraform.locate import TerraformBinary

# Diagnostics that mean "not installed", not "wrong".
_NOT_INSTALLED = (
    "Module not installed",
    "Missing required provider",
    "Missing required providers",
    "Inconsistent dependency lock file",
    "Failed to load plugin schemas",
    "Required plugins are not installed",
)


@dataclass(frozen=True, slots=True)
class Diagnostic:
    severity: str
    summary: str
    detail: str
    filename: str | None
    line: int | None

    def render(self, stack: str) -> str:
        where = f"{stack}/{self.filename}:{self.line}" if self.filename else stack
        detail = f": {self.detail}" if self.detail else ""
        return f"{where}: {self.severity}: {self.summary}{detail}"


def validate_offline(
    binary: TerraformBinary, stack_dir: Path, timeout: float = 120
) -> list[Diagnostic]:
    """Errors and warnings of `terraform validate` that do not come from a missing install."""
    with tempfile.TemporaryDirectory(prefix="tf-validate-") as tmp:
        cli_config = Path(tmp) / "cli.tfrc"
        cli_config.write_text("")
        env = dict(os.environ)
        env.update(
            TF_DATA_DIR=str(Path(tmp) / "data"),
            TF_CLI_CONFIG_FILE=str(cli_config),
            CHECKPOINT_DISABLE="1",
            TF_IN_AUTOMATION="1",
            TF_INPUT="0",
        )
        try:
            proc = subprocess.run(
                [*binary.argv, f"-chdir={stack_dir}", "validate", "-json", "-no-color"],
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TerraformCommandError(
                f"terraform validate timed out after {timeout:.0f} s", command="validate"
            ) from exc
    try:
        report = json.loads(proc.stdout)
    except ValueError as exc:
        raise TerraformCommandError(
            f"terraform validate failed: {proc.stderr.strip() or proc.stdout.strip()}",
            command="validate",
            exit_code=proc.returncode,
        ) from exc
    found = []
    for diag in report.get("diagnostics", []):
        if diag.get("summary", "").startswith(_NOT_INSTALLED):
            continue
        where = diag.get("range") or {}
        found.append(
            Diagnostic(
                severity=diag.get("severity", "error"),
                summary=diag.get("summary", ""),
                detail=diag.get("detail", ""),
                filename=where.get("filename"),
                line=(where.get("start") or {}).get("line"),
            )
        )
    return found
