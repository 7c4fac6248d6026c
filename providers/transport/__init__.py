"""Transports: how the host engine reaches a machine (SSH, or the agent's own machine)."""

from providers.transport.base import CommandResult, Transport
from providers.transport.local import LocalTransport

__all__ = ["CommandResult", "LocalTransport", "Transport"]
