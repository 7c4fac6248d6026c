"""The EC2 inventory (providers/hosts/ec2.py) against moto in server mode: real EC2 and
Auto Scaling HTTP APIs on 127.0.0.1, instances launched, stopped and terminated here.
Credentials are fake and set for each test only; nothing can reach real AWS."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import boto3
import pytest

from providers.errors import InventoryError
from providers.hosts.ec2 import Ec2Filter, Ec2Inventory, Ec2Settings
from tests.support.moto import REGION, MotoServer, _free_port, fake_aws_credentials


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def aws(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    fake_aws_credentials(monkeypatch)
    moto_server.reset()
    ec2 = boto3.client("ec2", endpoint_url=moto_server.url, region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.1.0/24")["Subnet"]["SubnetId"]
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return {"url": moto_server.url, "ec2": ec2, "vpc": vpc, "subnet": subnet, "image": image}


def launch(aws: dict[str, Any], count: int = 1, subnet: str | None = None, **tags: str) -> list:
    answer = aws["ec2"].run_instances(
        ImageId=aws["image"],
        MinCount=count,
        MaxCount=count,
        SubnetId=subnet or aws["subnet"],
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ]
        if tags
        else [],
    )
    return [i["InstanceId"] for i in answer["Instances"]]


def inventory(aws: dict[str, Any], **settings: Any) -> Ec2Inventory:
    return Ec2Inventory(Ec2Settings(region=REGION, endpoint_url=aws["url"], **settings))


def tags(**wanted: Any) -> Any:
    return MappingProxyType(
        {k: tuple(v) if isinstance(v, list) else (v,) for k, v in wanted.items()}
    )


def test_running_instances_matching_the_tags_with_names_addresses_and_vars(
    aws: dict[str, Any],
) -> None:
    (web1,) = launch(aws, Name="web1", role="web", tier="front")
    (web2,) = launch(aws, Name="web2", role="web")
    launch(aws, Name="db1", role="db")
    (stopped,) = launch(aws, Name="web3", role="web")
    (gone,) = launch(aws, Name="web4", role="web")
    aws["ec2"].stop_instances(InstanceIds=[stopped])
    aws["ec2"].terminate_instances(InstanceIds=[gone])

    listing = inventory(aws).list(
        Ec2Filter(tags=tags(role="web"), name_from="tag:Name", vars_from_tags=("tier",))
    )

    assert [(i.name, i.instance_id) for i in listing.instances] == [("web1", web1), ("web2", web2)]
    described = aws["ec2"].describe_instances(InstanceIds=[web1])["Reservations"][0]
    assert listing.instances[0].address == described["Instances"][0]["PrivateIpAddress"]
    assert dict(listing.instances[0].vars) == {
        "ec2_instance_id": web1,
        "ec2_region": REGION,
        "tier": "front",
    }
    assert "tier" not in listing.instances[1].vars
    assert listing.api_calls == 1


def test_vpc_filter_address_kinds_and_tag_value_lists(aws: dict[str, Any]) -> None:
    ec2 = aws["ec2"]
    other_vpc = ec2.create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]
    other_subnet = ec2.create_subnet(VpcId=other_vpc, CidrBlock="10.30.1.0/24")["Subnet"]
    launch(aws, Name="a", env="prod")
    launch(aws, Name="b", env="staging")
    launch(aws, Name="c", env="dev")
    launch(aws, subnet=other_subnet["SubnetId"], Name="d", env="prod")

    found = inventory(aws).list(
        Ec2Filter(
            tags=tags(env=["prod", "staging"]),
            vpc=aws["vpc"],
            name_from="tag:Name",
            address="private-dns",
        )
    )

    assert [i.name for i in found.instances] == ["a", "b"]
    assert all(i.address.endswith(".internal") for i in found.instances)


def test_a_shared_name_tag_gets_the_instance_id_and_a_bad_one_falls_back_to_it(
    aws: dict[str, Any],
) -> None:
    first, second = launch(aws, count=2, Name="web", role="web")
    (odd,) = launch(aws, Name="../../etc/passwd", role="web")

    names = {
        i.instance_id: i.name
        for i in inventory(aws)
        .list(Ec2Filter(tags=tags(role="web"), name_from="tag:Name"))
        .instances
    }

    assert names == {first: f"web-{first}", second: f"web-{second}", odd: odd}


def test_instances_without_the_address_asked_for_are_skipped_and_said_so(
    aws: dict[str, Any],
) -> None:
    (instance,) = launch(aws, role="web")  # moto gives no public address in a plain subnet

    listing = inventory(aws).list(Ec2Filter(tags=tags(role="web"), address="public-ip"))

    assert listing.instances == ()
    assert listing.skipped == (f"{instance}: no public-ip address",)


def test_pages_are_followed(aws: dict[str, Any]) -> None:
    # DescribeInstances pages by reservation: one run_instances call each.
    ids = {instance for _ in range(7) for instance in launch(aws, role="web")}

    listing = inventory(aws, page_size=5).list(Ec2Filter(tags=tags(role="web")))

    assert {i.instance_id for i in listing.instances} == ids
    assert listing.api_calls == 2


def test_autoscaling_group_members_only_and_scale_up_seen(aws: dict[str, Any]) -> None:
    client = boto3.client("autoscaling", endpoint_url=aws["url"], region_name=REGION)
    client.create_launch_configuration(
        LaunchConfigurationName="web", ImageId=aws["image"], InstanceType="t3.micro"
    )
    client.create_auto_scaling_group(
        AutoScalingGroupName="web-asg",
        LaunchConfigurationName="web",
        MinSize=1,
        MaxSize=4,
        DesiredCapacity=1,
        VPCZoneIdentifier=aws["subnet"],
    )
    launch(aws, role="web")  # not a member
    wanted = Ec2Filter(asg="web-asg")

    assert len(inventory(aws).list(wanted).instances) == 1
    client.set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=3)
    listing = inventory(aws).list(wanted)

    group = client.describe_auto_scaling_groups(AutoScalingGroupNames=["web-asg"])
    members = {i["InstanceId"] for i in group["AutoScalingGroups"][0]["Instances"]}
    assert {i.instance_id for i in listing.instances} == members
    assert len(members) == 3
    assert listing.api_calls == 2  # one DescribeAutoScalingGroups, one DescribeInstances page
    assert inventory(aws).list(Ec2Filter(asg="no-such-group")).instances == ()


def test_an_unreachable_endpoint_is_a_clear_retryable_error(
    aws: dict[str, Any],
) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    broken = Ec2Inventory(Ec2Settings(region=REGION, endpoint_url=closed, connect_timeout=2))

    with pytest.raises(InventoryError) as caught:
        broken.list(Ec2Filter(tags=tags(role="web")))

    assert str(caught.value) == f"EC2 inventory in {REGION}: cannot connect to AWS"
    assert caught.value.retryable


def test_an_error_answer_names_the_region_and_what_aws_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server of its own with IAM checks on from the first call: the fake keys are unknown.
    fake_aws_credentials(monkeypatch)
    with MotoServer({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as server:
        broken = Ec2Inventory(Ec2Settings(region=REGION, endpoint_url=server.url))
        with pytest.raises(InventoryError) as caught:
            broken.list(Ec2Filter(tags=tags(role="web")))
    said = str(caught.value)
    assert said.startswith(f"EC2 inventory in {REGION}: AWS refused the request (")
    assert "testing" not in said  # the access key is not repeated
    assert not caught.value.retryable


def test_a_role_to_assume_is_assumed_through_sts_first(aws: dict[str, Any]) -> None:
    (instance,) = launch(aws, role="web")
    role = "arn:aws:iam::123456789012:role/gitops-inventory"

    listing = inventory(aws, role_arn=role).list(Ec2Filter(tags=tags(role="web")))

    assert [i.instance_id for i in listing.instances] == [instance]
    # moto's own record of the STS sessions it handed out (its documented /moto-api/).
    with urllib.request.urlopen(f"{aws['url']}/moto-api/data.json", timeout=10) as answer:
        sessions = json.loads(answer.read())["sts"]["AssumedRole"]
    assert [(s["role_arn"], s["session_name"]) for s in sessions] == [(role, "gitops-agent")]
