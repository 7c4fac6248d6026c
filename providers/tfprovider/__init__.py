"""Terraform providers written in Python (with the `tf` package), shipped with the agent.

`localfile` manages files on the agent's own machine; it exists so that stacks (and the
test suite) can have resources that really drift. Terraform installs it from a local
filesystem mirror that the agent builds (see providers.terraform.cliconfig), never from a
registry.
"""

PROVIDER_ADDRESS = "gitops-agent.local/builtin/localfile"
PROVIDER_EXECUTABLE = "terraform-provider-localfile"
PROVIDER_VERSION = "1.0.0"  # the mirror's version: fixed, so lock files stay valid
