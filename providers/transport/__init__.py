"""Transports: how the host engine reaches a machine (SSH, or the agent's own machine)."""

from providers.transport.base import CommandResult, Transport
from providers.transport.local import LocalTransport
from providers.transport.ssh import SSHSettings, SSHTarget, SSHTransport

__all__ = [
    "CommandResult",
    "LocalTransport",
    "SSHSettings",
    "SSHTarget",
    "SSHTransport",
    "Transport",
]
