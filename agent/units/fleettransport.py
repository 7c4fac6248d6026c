"""How a fleet host is reached: the agent's own machine or SSH, with the transport
settings of the host config only (identity, known_hosts, trust on first use, jump host);
the manifest names the host, its port and user."""

from __future__ import annotations

from agent.config import Unit
from agent.config.fleet import Fleet, HostsFromEc2, HostSpec
from agent.config.ssh import HostsConfig
from agent.units.ec2fleet import Ec2Hosts
from agent.units.fleettypes import FleetError
from providers.transport import LocalTransport, Transport
from providers.transport.ssh import SSHSettings, SSHTarget, SSHTransport

LOCAL_ADDRESS = "local"


def host_transport(
    settings: HostsConfig, ec2: Ec2Hosts, unit: Unit, fleet: Fleet, spec: HostSpec
) -> Transport:
    """How the agent reaches `spec`: its own machine (`local`, when the host config allows
    it) or SSH with the host config's identity, known_hosts and jump host."""
    if spec.address == LOCAL_ADDRESS:
        if not settings.allow_local:
            raise FleetError(
                f"{spec.name}: address 'local' (the agent's own machine) needs"
                " hosts.allow_local: true in the host config"
            )
        return LocalTransport(spec.name)
    if settings.key_file is None or settings.known_hosts is None:
        raise FleetError(
            f"{spec.name}: no SSH identity: set hosts.key_file and hosts.known_hosts"
            " in the host config"
        )
    jump = settings.jump
    return SSHTransport(
        SSHTarget(
            host=spec.name,
            address=spec.address,
            port=spec.port or fleet.port or 22,
            user=spec.user or fleet.user or "root",
            published_keys=ec2.published_keys(unit.name, spec.name)
            if isinstance(fleet.hosts, HostsFromEc2)
            else (),
        ),
        SSHSettings(
            key_file=settings.key_file,
            known_hosts=settings.known_hosts,
            trust_on_first_use=settings.trust_on_first_use,
            connect_timeout=settings.connect_timeout,
            handshakes=settings.handshakes,
            jump=SSHTarget(f"jump {jump.address}", jump.address, jump.port, jump.user)
            if jump
            else None,
        ),
    )
