"""EC2 inventory cost: time and API calls per refresh of N instances (moto server).

Starts moto in server mode on 127.0.0.1 (fake credentials, nothing reaches AWS), launches
N instances tagged role=web in reservations of 50, plus an autoscaling group, then times
`Ec2Inventory.list` by tags and by group several times.

    .venv/bin/python bench/ec2_inventory.py --instances 1000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import MappingProxyType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3

from providers.hosts.ec2 import Ec2Filter, Ec2Inventory, Ec2Settings
from tests.support.moto import REGION, MotoServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION=REGION,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE="/nonexistent/config",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials",
    )
    with MotoServer() as server:
        ec2 = boto3.client("ec2", endpoint_url=server.url, region_name=REGION)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24")["Subnet"]["SubnetId"]
            for i in range(1, 1 + (args.instances + 199) // 200)
        ]
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        left, index = args.instances, 0
        while left > 0:
            count = min(50, left)
            ec2.run_instances(
                ImageId=image,
                MinCount=count,
                MaxCount=count,
                SubnetId=subnets[index % len(subnets)],
                TagSpecifications=[
                    {"ResourceType": "instance", "Tags": [{"Key": "role", "Value": "web"}]}
                ],
            )
            left -= count
            index += 1
        asg = boto3.client("autoscaling", endpoint_url=server.url, region_name=REGION)
        asg.create_launch_configuration(
            LaunchConfigurationName="web", ImageId=image, InstanceType="t3.micro"
        )
        asg.create_auto_scaling_group(
            AutoScalingGroupName="web-asg",
            LaunchConfigurationName="web",
            MinSize=10,
            MaxSize=10,
            DesiredCapacity=10,
            VPCZoneIdentifier=ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.250.0/24")["Subnet"][
                "SubnetId"
            ],
        )
        inventory = Ec2Inventory(
            Ec2Settings(region=REGION, endpoint_url=server.url, read_timeout=600)
        )  # moto filters in Python: slow on a loaded machine
        results = {}
        for label, wanted in (
            ("tags", Ec2Filter(tags=MappingProxyType({"role": ("web",)}))),
            ("asg", Ec2Filter(asg="web-asg")),
        ):
            inventory.list(wanted)  # the first call per service is slow in moto
            times, calls, found = [], 0, 0
            for _ in range(args.repeat):
                started = time.perf_counter()
                listing = inventory.list(wanted)
                times.append(time.perf_counter() - started)
                calls, found = listing.api_calls, len(listing.instances)
            results[label] = {
                "instances": found,
                "api_calls": calls,
                "median_s": round(statistics.median(times), 3),
                "max_s": round(max(times), 3),
            }
    print(json.dumps({"launched": args.instances, **results}, indent=1))


if __name__ == "__main__":
    main()
