"""examples/aws-vms: its manifest and host config are valid, and `agent validate` finds
nothing wrong in it (templates rendered for each fleet, each stack validated offline)."""

from __future__ import annotations

from pathlib import Path

from agent.config import ManifestLimits, load_manifest, parse_host_config
from agent.config.fleet import HostsFromEc2, HostsFromStack
from agent.engine.validate import validate_repo

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "aws-vms"


def test_the_host_config_is_valid_and_allows_ec2() -> None:
    host = parse_host_config((EXAMPLE / "agent.yaml").read_text(), "agent.yaml", EXAMPLE)
    assert host.hosts.aws is not None and host.hosts.aws.region == "eu-west-1"
    assert host.intervals.hosts == 30.0


def test_the_manifest_has_environments_a_stack_fed_fleet_and_an_ec2_fleet() -> None:
    host = parse_host_config((EXAMPLE / "agent.yaml").read_text(), "agent.yaml", EXAMPLE)
    manifest = load_manifest(EXAMPLE, ManifestLimits.from_host(host))
    stacks = [u for u in manifest.units if u.fleet is None]
    assert {u.stack for u in stacks} == {"stacks/network"} and len(stacks) == 3
    fleets = {u.name: u.fleet for u in manifest.units if u.fleet is not None}
    assert isinstance(fleets["web-prod"].hosts, HostsFromStack)  # type: ignore[union-attr]
    assert isinstance(fleets["workers-prod"].hosts, HostsFromEc2)  # type: ignore[union-attr]


def test_agent_validate_finds_nothing_wrong() -> None:
    report = validate_repo(EXAMPLE)
    assert report.errors == []
    assert report.warnings == []
    assert set(report.units) == {
        "network-dev",
        "network-staging",
        "network-prod",
        "web-prod",
        "workers-prod",
    }
