"""`hosts: {ec2: {...}}` of a fleet: which EC2 instances are its hosts.

    hosts:
      ec2:
        regions: [eu-west-1]            # default: hosts.aws.region of the host config
        filters:
          tags: {role: web, env: [prod, staging]}
          vpc: vpc-0abc
        asg: web-asg                    # only members of this autoscaling group
        address: private-ip             # or public-ip, private-dns
        name_from: tag:Name             # default: the instance id
        vars_from_tags: [tier]          # host vars from these tags

Only running instances are hosts. The repository chooses which instances; the host config
says whether the agent may read EC2 at all (`hosts.aws`), with which credentials, and
which host keys it trusts: a filter can name any instance of the account, never widen
what the agent may log in to.
"""

from __future__ import annotations

import re
from types import MappingProxyType

from yaml.nodes import SequenceNode

from agent.config.yamlnodes import Value
from providers.hosts.ec2 import ADDRESS_KINDS, Ec2Filter

EC2_KEYS = ("regions", "filters", "asg", "address", "name_from", "vars_from_tags")
_FILTER_KEYS = ("tags", "vpc", "instance-state")
_REGION_RE = re.compile(r"[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d")
_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TAG_KEY_RE = re.compile(r"[^\x00-\x1f]{1,128}")


def read_ec2_hosts(value: Value) -> Ec2Filter | None:
    """The validated `ec2:` section, or None (problems noted on the values)."""
    fields = value.mapping(EC2_KEYS)
    if fields is None:
        return None
    ok = True
    regions: list[str] = []
    if found := fields.get("regions"):
        for item in found.sequence(non_empty=True) or ():
            region = item.string("an AWS region name")
            if region is not None and not _REGION_RE.fullmatch(region):
                item.fail("an AWS region name like eu-west-1", repr(region))
                ok = False
            elif region is not None:
                regions.append(region)
    tags: dict[str, tuple[str, ...]] = {}
    vpc = None
    if found := fields.get("filters"):
        filters = found.mapping(_FILTER_KEYS)
        if filters is not None:
            if tag_value := filters.get("tags"):
                read = _tags(tag_value)
                ok = ok and read is not None
                tags = read or {}
            if vpc_value := filters.get("vpc"):
                vpc = vpc_value.string("a VPC id like vpc-0abc")
                if vpc is not None and not re.fullmatch(r"vpc-[0-9a-f]{1,17}", vpc):
                    vpc_value.fail("a VPC id like vpc-0abc", repr(vpc))
                    ok = False
            # Only running instances can be converged: say so instead of ignoring it.
            state = filters.get("instance-state")
            if state and state.string("running") not in (None, "running"):
                state.fail("running (only running instances are hosts)")
                ok = False
    asg = None
    if found := fields.get("asg"):
        asg = found.string("an autoscaling group name")
        ok = ok and asg is not None
    address = "private-ip"
    if found := fields.get("address"):
        address = found.string(" or ".join(ADDRESS_KINDS)) or ""
        if address not in ADDRESS_KINDS:
            found.fail(" or ".join(ADDRESS_KINDS), repr(address))
            ok = False
    name_from = "instance-id"
    if found := fields.get("name_from"):
        name_from = found.string("instance-id or tag:KEY") or ""
        if name_from != "instance-id" and not (
            name_from.startswith("tag:") and _TAG_KEY_RE.fullmatch(name_from[4:])
        ):
            found.fail("instance-id or tag:KEY (tag:Name)", repr(name_from))
            ok = False
    vars_from_tags: list[str] = []
    if found := fields.get("vars_from_tags"):
        for item in found.sequence() or ():
            key = item.string("a tag key")
            if key is not None and not _VAR_RE.fullmatch(key):
                item.fail("a tag key usable as a variable name (letters, digits, _)", repr(key))
                ok = False
            elif key is not None:
                vars_from_tags.append(key)
    if not ok:
        return None
    return Ec2Filter(
        regions=tuple(regions),
        tags=MappingProxyType(tags),
        vpc=vpc,
        asg=asg,
        address=address,
        name_from=name_from,
        vars_from_tags=tuple(vars_from_tags),
    )


def _tags(value: Value) -> dict[str, tuple[str, ...]] | None:
    fields = value.mapping()
    if fields is None:
        return None
    tags: dict[str, tuple[str, ...]] = {}
    ok = True
    for key, item in fields:
        if not _TAG_KEY_RE.fullmatch(key):
            fields.fail_key(key, "a tag key (1-128 characters)")
            ok = False
            continue
        items = item.sequence(non_empty=True) if isinstance(item.node, SequenceNode) else [item]
        texts = [i.string("a tag value", non_empty=False) for i in items or ()]
        if items is None or None in texts:
            ok = False
            continue
        tags[key] = tuple(t for t in texts if t is not None)
    return tags if ok else None
