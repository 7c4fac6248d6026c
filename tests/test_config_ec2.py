"""`hosts: {ec2: ...}` in the manifest and `hosts.aws` in the host config: what is read,
and each mistake named by file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigValidationError, ManifestLimits, parse_host_config, parse_manifest
from agent.config.fleet import HostsFromEc2
from providers.hosts.ec2 import Ec2Filter, Ec2Settings


def manifest(ec2: str) -> str:
    return "version: 1\nunits:\n  - name: web\n    fleet:\n      hosts:\n        ec2:\n" + "".join(
        f"          {line}\n" for line in ec2.strip().splitlines()
    )  # the ec2 keys start on line 7


def parse(text: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    return parse_manifest(text, "gitops.yaml", tmp_path, ManifestLimits())


def test_every_key_is_read(tmp_path: Path) -> None:
    found = parse(
        manifest(
            """
regions: [eu-west-1, us-east-1]
filters:
  tags: {role: web, env: [prod, staging]}
  vpc: vpc-0abc12
  instance-state: running
asg: web-asg
address: private-dns
name_from: tag:Name
vars_from_tags: [tier]
"""
        ),
        tmp_path,
    )
    hosts = found.units[0].fleet.hosts  # type: ignore[union-attr]
    assert isinstance(hosts, HostsFromEc2)
    wanted = hosts.filter
    assert (wanted.regions, dict(wanted.tags), wanted.vpc, wanted.asg) == (
        ("eu-west-1", "us-east-1"),
        {"role": ("web",), "env": ("prod", "staging")},
        "vpc-0abc12",
        "web-asg",
    )
    assert (wanted.address, wanted.name_from, wanted.vars_from_tags) == (
        "private-dns",
        "tag:Name",
        ("tier",),
    )


def test_defaults(tmp_path: Path) -> None:
    hosts = parse(manifest("filters: {tags: {role: web}}"), tmp_path).units[0].fleet.hosts  # type: ignore[union-attr]
    assert isinstance(hosts, HostsFromEc2)
    assert hosts.filter == Ec2Filter(tags=hosts.filter.tags)
    assert (hosts.filter.address, hosts.filter.name_from) == ("private-ip", "instance-id")


REFUSED = [
    (
        "regions: [Europe]",
        "gitops.yaml:7: hosts.ec2.regions[0]: expected an AWS region name like eu-west-1;"
        " got 'Europe'",
    ),
    (
        "address: public-dns",
        "gitops.yaml:7: hosts.ec2.address: expected private-ip or public-ip or private-dns;"
        " got 'public-dns'",
    ),
    (
        "name_from: Name",
        "gitops.yaml:7: hosts.ec2.name_from: expected instance-id or tag:KEY (tag:Name);"
        " got 'Name'",
    ),
    (
        "vars_from_tags: [app:tier]",
        "gitops.yaml:7: hosts.ec2.vars_from_tags[0]: expected a tag key usable as a variable"
        " name (letters, digits, _); got 'app:tier'",
    ),
    (
        "filters: {instance-state: stopped}",
        "gitops.yaml:7: hosts.ec2.filters.instance-state: expected running (only running"
        " instances are hosts); got 'stopped'",
    ),
    (
        "filters: {vpc: default}",
        "gitops.yaml:7: hosts.ec2.filters.vpc: expected a VPC id like vpc-0abc; got 'default'",
    ),
    (
        "filters: {tags: {role: [web, {a: b}]}}",
        "gitops.yaml:7: hosts.ec2.filters.tags.role[1]: expected a tag value; got a mapping",
    ),
    (
        "filter: {tags: {role: web}}",
        "gitops.yaml:7: hosts.ec2.filter: unknown key; expected one of regions, filters, asg,"
        " address, name_from, vars_from_tags",
    ),
]


@pytest.mark.parametrize(("ec2", "expected"), REFUSED, ids=[r[0] for r in REFUSED])
def test_a_mistake_is_named_by_file_line_and_key(ec2: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigValidationError) as caught:
        parse(manifest(ec2), tmp_path)
    assert [e.replace("units[0].fleet.", "") for e in caught.value.errors] == [expected]


def test_the_host_config_gives_the_aws_settings(tmp_path: Path) -> None:
    text = (
        "repo: {url: file:///srv/infra.git}\n"
        "hosts:\n"
        "  key_file: id\n"
        "  known_hosts: known\n"
        "  aws:\n"
        "    region: eu-west-1\n"
        "    endpoint_url: http://127.0.0.1:5000\n"
        "    role_arn: arn:aws:iam::123456789012:role/inventory\n"
        "    host_key_tag: ssh-host-key\n"
    )
    config = parse_host_config(text, "agent.yaml", tmp_path)
    assert config.hosts.aws == Ec2Settings(
        region="eu-west-1",
        endpoint_url="http://127.0.0.1:5000",
        role_arn="arn:aws:iam::123456789012:role/inventory",
        host_key_tag="ssh-host-key",
    )
    assert parse_host_config("repo: {url: x}\n", "agent.yaml", tmp_path).hosts.aws is None


def test_a_bad_aws_setting_is_named(tmp_path: Path) -> None:
    text = "repo: {url: file:///srv/infra.git}\nhosts:\n  aws:\n    role_arn: inventory\n"
    with pytest.raises(ConfigValidationError) as caught:
        parse_host_config(text, "agent.yaml", tmp_path)
    assert caught.value.errors == [
        "agent.yaml:4: hosts.aws.role_arn: expected an IAM role ARN"
        " (arn:aws:iam::ACCOUNT:role/NAME); got 'inventory'"
    ]
