"""A fleet's hosts from EC2 (`hosts: {ec2: ...}`): the inventory read, as host specs.

The repository says which instances; the host config (`hosts.aws`) says whether EC2 may
be read at all and with which credentials. An inventory that cannot be read fails the
unit before any host is contacted, so hosts already converged stay as they are.
"""

from __future__ import annotations

import logging
import threading

from agent.config.fleet import HostsFromEc2, HostSpec
from agent.config.ssh import HostsConfig
from agent.errors import HostInventoryError
from providers.errors import InventoryError
from providers.hosts.ec2 import Ec2Inventory, Ec2Listing

log = logging.getLogger(__name__)


class Ec2Hosts:
    """Reads fleets' EC2 hosts with the host config's AWS settings (one client set)."""

    def __init__(self, settings: HostsConfig) -> None:
        self._settings = settings.aws
        self._inventory = Ec2Inventory(settings.aws) if settings.aws is not None else None
        self._lock = threading.Lock()
        self.last: dict[str, Ec2Listing] = {}  # per unit, for status and measurement
        self._read_in: dict[str, str] = {}  # unit -> the run its `last` was read for

    def published_keys(self, unit: str, host: str) -> tuple[str, ...]:
        """The host key fingerprints the instance's trusted tag lists (hosts.aws.host_key_tag),
        from the unit's last inventory read; () when none (or no tag is trusted)."""
        with self._lock:
            listing = self.last.get(unit)
        for instance in listing.instances if listing else ():
            if instance.name == host:
                return instance.host_keys
        return ()

    def hosts(self, unit: str, source: HostsFromEc2, run_id: str) -> tuple[HostSpec, ...]:
        """The unit's hosts, read once per run (its fingerprint and its converge see the
        same list); raises HostInventoryError."""
        with self._lock:
            if self._read_in.get(unit) == run_id and unit in self.last:
                return _specs(self.last[unit])
        if self._inventory is None:
            raise HostInventoryError(
                f"unit {unit}: hosts come from EC2, but the host config does not allow it",
                retryable=False,
                hint="add hosts.aws (region, and endpoint_url or role_arn if needed) to the"
                " host config (docs/dynamic-hosts.md)",
            )
        try:
            listing = self._inventory.list(source.filter)
        except InventoryError as exc:
            raise HostInventoryError(
                f"unit {unit}: {exc}; no host was contacted",
                retryable=exc.retryable,
            ) from None
        for reason in listing.skipped:
            log.warning("unit %s: EC2 instance skipped: %s", unit, reason)
        with self._lock:
            self.last[unit] = listing
            self._read_in[unit] = run_id
        return _specs(listing)


def _specs(listing: Ec2Listing) -> tuple[HostSpec, ...]:
    return tuple(HostSpec(name=i.name, address=i.address, vars=i.vars) for i in listing.instances)
