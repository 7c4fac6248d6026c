"""gitops-agent: a pull-based GitOps agent for Terraform stacks and SSH hosts."""

__version__ = "0.1.0"
