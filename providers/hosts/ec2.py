"""EC2 instances as a fleet's hosts: `hosts: {ec2: {...}}` in the manifest.

One `DescribeInstances` paginator per region (filters sent to EC2, so a large account
costs one page per 1,000 matching instances), plus one `DescribeAutoScalingGroups` call
when an autoscaling group is named. Only `running` instances are listed: a pending one
has no usable address yet, a stopping one is going away.

Credentials come from boto3's default chain (environment, ~/.aws, instance profile),
optionally exchanged for a role through STS, as the secret backends do. `endpoint_url`
points every client at one endpoint (a VPC endpoint, or moto in tests). botocore's own
retries are off and timeouts bounded: an inventory that cannot be read fails the unit
before any host is touched, and the next pass tries again.

Tags are set by whoever may call ec2:CreateTags: names and vars taken from them are data,
checked here (a name must be a plain host name; it names record files).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from providers.errors import InventoryError

__all__ = ["ADDRESS_KINDS", "Ec2Filter", "Ec2Instance", "Ec2Inventory", "Ec2Listing", "Ec2Settings"]

ADDRESS_KINDS = ("private-ip", "public-ip", "private-dns")
_ADDRESS_FIELD = {
    "private-ip": "PrivateIpAddress",
    "public-ip": "PublicIpAddress",
    "private-dns": "PrivateDnsName",
}
ASG_TAG = "aws:autoscaling:groupName"
_FINGERPRINT_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # agent.config.fleet.HOST_NAME_RE

log = logging.getLogger(__name__)
logging.getLogger("botocore").setLevel(logging.INFO)  # DEBUG prints whole bodies


@dataclass(frozen=True, slots=True)
class Ec2Settings:
    """How to reach EC2: from the operator's host config, never from the repository."""

    region: str | None = None
    endpoint_url: str | None = None
    role_arn: str | None = None
    session_name: str = "gitops-agent"
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    page_size: int = 1000  # DescribeInstances' largest page
    #: A tag whose value lists the instance's SSH host key fingerprints (`SHA256:...`),
    #: trusted for that instance's address: only as safe as who may tag (dynamic-hosts.md).
    host_key_tag: str | None = None


@dataclass(frozen=True, slots=True)
class Ec2Filter:
    """Which instances: the manifest's `ec2:` section, validated."""

    regions: tuple[str, ...] = ()  # empty: the settings' region
    tags: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    vpc: str | None = None
    asg: str | None = None
    address: str = "private-ip"
    name_from: str = "instance-id"  # or `tag:KEY`
    vars_from_tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Ec2Instance:
    """A running instance, with the name and address the fleet uses for it."""

    instance_id: str
    region: str
    name: str
    address: str
    vars: Mapping[str, Any]
    launched: str  # ISO 8601, as EC2 reports it
    host_keys: tuple[str, ...] = ()  # fingerprints from the host key tag, if trusted


@dataclass(frozen=True, slots=True)
class Ec2Listing:
    """The instances found, those skipped (and why), and the API calls it took."""

    instances: tuple[Ec2Instance, ...]
    skipped: tuple[str, ...]
    api_calls: int


class Ec2Inventory:
    """Lists instances; one instance serves many passes (clients are made per call)."""

    def __init__(self, settings: Ec2Settings) -> None:
        self.settings = settings
        self._config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
        )

    def list(self, wanted: Ec2Filter) -> Ec2Listing:
        """Running instances matching `wanted`, in a stable order (name). Raises
        InventoryError with a message naming the region and what AWS said."""
        regions = wanted.regions or (self.settings.region or "",)
        raw: list[tuple[str, Mapping[str, Any]]] = []
        calls = 0
        for region in regions:
            try:
                session = self._session(region or None)
                ec2 = session.client(
                    "ec2", endpoint_url=self.settings.endpoint_url, config=self._config
                )
                filters = _filters(wanted)
                if wanted.asg:
                    members, n = self._asg_members(session, wanted.asg)
                    calls += n
                    if not members:
                        continue  # an empty group (or none by that name here)
                    filters.append({"Name": "instance-id", "Values": sorted(members)})
                for page in ec2.get_paginator("describe_instances").paginate(
                    Filters=filters, PaginationConfig={"PageSize": self.settings.page_size}
                ):
                    calls += 1
                    for reservation in page.get("Reservations", ()):
                        raw.extend((region, item) for item in reservation.get("Instances", ()))
            except InventoryError:
                raise
            except Exception as exc:
                raise _mapped(exc, region or "(default region)") from None
        instances, skipped = _instances(raw, wanted, self.settings.host_key_tag)
        return Ec2Listing(instances, skipped, calls)

    def _session(self, region: str | None) -> boto3.session.Session:
        session = boto3.session.Session(region_name=region)
        if not self.settings.role_arn:
            return session
        sts = session.client("sts", endpoint_url=self.settings.endpoint_url, config=self._config)
        creds = sts.assume_role(
            RoleArn=self.settings.role_arn, RoleSessionName=self.settings.session_name
        )["Credentials"]
        return boto3.session.Session(
            region_name=region,
            aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds["SessionToken"],
        )

    def _asg_members(self, session: boto3.session.Session, name: str) -> tuple[set[str], int]:
        client = session.client(
            "autoscaling", endpoint_url=self.settings.endpoint_url, config=self._config
        )
        members: set[str] = set()
        calls = 0
        for page in client.get_paginator("describe_auto_scaling_groups").paginate(
            AutoScalingGroupNames=[name]
        ):
            calls += 1
            for group in page.get("AutoScalingGroups", ()):
                members.update(i["InstanceId"] for i in group.get("Instances", ()))
        return members, calls


def _filters(wanted: Ec2Filter) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = [{"Name": "instance-state-name", "Values": ["running"]}]
    for key, values in sorted(wanted.tags.items()):
        filters.append({"Name": f"tag:{key}", "Values": list(values)})
    if wanted.vpc:
        filters.append({"Name": "vpc-id", "Values": [wanted.vpc]})
    return filters


def _instances(
    raw: Sequence[tuple[str, Mapping[str, Any]]], wanted: Ec2Filter, key_tag: str | None = None
) -> tuple[tuple[Ec2Instance, ...], tuple[str, ...]]:
    """Name, address and vars of each instance; a name several instances share gets the
    instance id appended (an autoscaling group's instances share their Name tag)."""
    skipped: list[str] = []
    found: list[tuple[str, str, str, Mapping[str, Any], str]] = []  # id, region, addr, tags
    for region, item in raw:
        if item.get("State", {}).get("Name") != "running":
            continue  # the filter says so too; EC2 answers are checked, not trusted
        instance_id = str(item.get("InstanceId", ""))
        address = item.get(_ADDRESS_FIELD[wanted.address])
        if not instance_id or not isinstance(address, str) or not address:
            skipped.append(f"{instance_id or 'an instance'}: no {wanted.address} address")
            continue
        tags = {str(t.get("Key")): str(t.get("Value", "")) for t in item.get("Tags", ()) or ()}
        found.append((instance_id, region, address, tags, str(item.get("LaunchTime", ""))))
    wanted_names = [_name(instance_id, tags, wanted) for instance_id, _, _, tags, _ in found]
    counts: dict[str, int] = {}
    for name in wanted_names:
        counts[name] = counts.get(name, 0) + 1
    instances = []
    for (instance_id, region, address, tags, launched), name in zip(
        found, wanted_names, strict=True
    ):
        if counts[name] > 1 and name != instance_id:
            name = f"{name}-{instance_id}"[:63]
        host_vars: dict[str, Any] = {"ec2_instance_id": instance_id, "ec2_region": region}
        host_vars.update({key: tags[key] for key in wanted.vars_from_tags if key in tags})
        keys = _fingerprints(tags.get(key_tag, "")) if key_tag else ()
        instances.append(
            Ec2Instance(
                instance_id, region, name, address, MappingProxyType(host_vars), launched, keys
            )
        )
    instances.sort(key=lambda i: i.name)
    return tuple(instances), tuple(skipped)


def _fingerprints(text: str) -> tuple[str, ...]:
    """`SHA256:...` fingerprints in a tag value (space or comma separated); anything else
    in it is ignored, so a malformed tag trusts nothing."""
    return tuple(f for f in re.split(r"[\s,]+", text) if _FINGERPRINT_RE.fullmatch(f))


def _name(instance_id: str, tags: Mapping[str, str], wanted: Ec2Filter) -> str:
    if wanted.name_from.startswith("tag:"):
        value = tags.get(wanted.name_from[4:], "")
        if _NAME_RE.fullmatch(value):
            return value
    return instance_id  # no tag, or one that is not a plain host name


def _mapped(exc: Exception, region: str) -> InventoryError:
    """An InventoryError naming the region and what AWS said (never credentials)."""
    where = f"EC2 inventory in {region}"
    E = botocore.exceptions
    if isinstance(exc, E.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = " ".join(str(error.get("Message", "")).split())[:300]
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        retry = code.startswith("Throttl") or code == "RequestLimitExceeded" or status >= 500
        said = f"{code}: {message}" if message else code
        return InventoryError(f"{where}: AWS refused the request ({said})", retryable=retry)
    if isinstance(exc, E.NoCredentialsError | E.PartialCredentialsError):
        return InventoryError(
            f"{where}: no AWS credentials found (environment, ~/.aws, instance profile)"
        )
    if isinstance(exc, E.NoRegionError):
        return InventoryError(
            f"{where}: no AWS region: set regions in the manifest or hosts.aws.region in the"
            " host config"
        )
    if isinstance(exc, E.ConnectTimeoutError | E.ReadTimeoutError):
        return InventoryError(f"{where}: AWS did not answer in time", retryable=True)
    if isinstance(exc, E.EndpointConnectionError | E.ConnectionClosedError | E.HTTPClientError):
        return InventoryError(f"{where}: cannot connect to AWS", retryable=True)
    if isinstance(exc, E.BotoCoreError | KeyError | TypeError | ValueError):
        return InventoryError(f"{where}: {type(exc).__name__}: {exc}"[:400])
    raise exc
