#!/usr/bin/env python3
"""Seed a demo runner-pool world at $AWS_ENDPOINT_URL (moto) and write three run specs.

    "$POST_PROVISION_PYTHON" scripts/seed_demo.py --table post-provision-demo --out-dir DIR

Creates (if missing) the pool table, the SQS pool queues `pool-small` and `pool-large`, the
`TYPE#METADATA` / `ID#resource_class_config` item, launches EC2 instances and writes their
instance records per docs of the pool data model, then writes DIR/commit.json,
DIR/rollback.json and DIR/cleanup.json (see scripts/demo for what each run should do).
"""

import argparse
import json
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3

PREFERRED_AMI = "ami-12c6146b"
CLASSES = {
    # class: (cpu, mmem, EC2 instance type)
    "small": (1, 2048, "t3.small"),
    "large": (2, 4096, "c6i.large"),
}
MAX_RUNTIME_MIN = 30
IDLE_TIME_SEC = 300


def ts(dt: datetime) -> str:
    """The pool's timestamp format: ISO-8601 UTC, whole seconds, trailing Z."""
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def ensure_table(ddb, table: str) -> None:
    try:
        ddb.describe_table(TableName=table)
        return
    except ddb.exceptions.ResourceNotFoundException:
        pass
    ddb.create_table(
        TableName=table,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[
            {"AttributeName": "PK", "KeyType": "HASH"},
            {"AttributeName": "SK", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[
            {"AttributeName": "PK", "AttributeType": "S"},
            {"AttributeName": "SK", "AttributeType": "S"},
        ],
    )
    ddb.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 1, "MaxAttempts": 30})


def pick_ami(ec2) -> str:
    try:
        if ec2.describe_images(ImageIds=[PREFERRED_AMI])["Images"]:
            return PREFERRED_AMI
    except Exception:  # noqa: BLE001 - fall back to whatever the emulator lists
        pass
    images = ec2.describe_images(Owners=["amazon"]).get("Images") or ec2.describe_images().get("Images")
    return images[0]["ImageId"] if images else PREFERRED_AMI


class World:
    def __init__(self, table: str):
        self.table = table
        self.ddb = boto3.client("dynamodb")
        self.sqs = boto3.client("sqs")
        self.ec2 = boto3.client("ec2")
        self.now = datetime.now(timezone.utc).replace(microsecond=0)
        self.ami = None

    def setup(self) -> dict:
        ensure_table(self.ddb, self.table)
        config = {}
        for name, (cpu, mmem, _) in CLASSES.items():
            url = self.sqs.create_queue(QueueName=f"pool-{name}")["QueueUrl"]
            config[name] = {"cpu": cpu, "mmem": mmem, "queueUrl": url}
        self.ddb.put_item(
            TableName=self.table,
            Item={
                "PK": {"S": "TYPE#METADATA"},
                "SK": {"S": "ID#resource_class_config"},
                "entityType": {"S": "METADATA"},
                "identifier": {"S": "resource_class_config"},
                "updatedAt": {"S": ts(self.now)},
                "value": {
                    "M": {
                        name: {
                            "M": {
                                "cpu": {"N": str(c["cpu"])},
                                "mmem": {"N": str(c["mmem"])},
                                "queueUrl": {"S": c["queueUrl"]},
                            }
                        }
                        for name, c in config.items()
                    }
                },
            },
        )
        self.ami = pick_ami(self.ec2)
        return config

    def instance(self, run_id: str, resource_class: str, state: str, threshold: datetime,
                 usage_class: str = "on-demand") -> dict:
        """Launch one EC2 instance, write its record, return its pool-message-shaped entry."""
        cpu, mmem, instance_type = CLASSES[resource_class]
        resp = self.ec2.run_instances(
            ImageId=self.ami,
            InstanceType=instance_type,
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[{
                "ResourceType": "instance",
                "Tags": [{"Key": "post-provision-demo", "Value": run_id},
                         {"Key": "InitialRunId", "Value": run_id},
                         {"Key": "resourceClass", "Value": resource_class}],
            }],
        )
        iid = resp["Instances"][0]["InstanceId"]
        self.ddb.put_item(
            TableName=self.table,
            Item={
                "PK": {"S": "TYPE#INSTANCE"},
                "SK": {"S": f"ID#{iid}"},
                "entityType": {"S": "INSTANCE"},
                "identifier": {"S": iid},
                "state": {"S": state},
                "runId": {"S": run_id},
                "threshold": {"S": ts(threshold)},
                "resourceClass": {"S": resource_class},
                "instanceType": {"S": instance_type},
                "usageClass": {"S": usage_class},
                "updatedAt": {"S": ts(self.now)},
            },
        )
        return {
            "id": iid,
            "resourceClass": resource_class,
            "instanceType": instance_type,
            "cpu": cpu,
            "mmem": mmem,
            "usageClass": usage_class,
            "threshold": ts(threshold),
        }


def spec(run_id, selected, required, creation_state, created):
    return {
        "runId": run_id,
        "maxRuntimeMin": MAX_RUNTIME_MIN,
        "idleTimeSec": IDLE_TIME_SEC,
        "selection": {
            "numInstancesSelected": len(selected),
            "numInstancesRequired": required,
            "instances": selected,
        },
        "creation": {
            "state": creation_state,
            "numInstancesCreated": len(created),
            "instances": created,
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", required=True)
    p.add_argument("--out-dir", required=True, type=Path)
    args = p.parse_args()
    if not os.environ.get("AWS_ENDPOINT_URL"):
        print("seed_demo.py: AWS_ENDPOINT_URL is not set; refusing to seed a real AWS account",
              file=sys.stderr)
        return 2

    w = World(args.table)
    w.setup()
    now = w.now
    claim = now + timedelta(minutes=5)
    specs = {}

    run = "demo-commit"
    selected = [w.instance(run, "small", "claimed", claim),
                w.instance(run, "large", "claimed", claim, usage_class="spot")]
    created = [w.instance(run, "large", "running", now + timedelta(minutes=10))]
    specs["commit"] = spec(run, selected, 1, "success", created)

    run = "demo-rollback"
    selected = [w.instance(run, "small", "claimed", claim),
                w.instance(run, "large", "claimed", claim)]
    specs["rollback"] = spec(run, selected, 2, "failed", [])

    run = "demo-cleanup"
    selected = [w.instance(run, "large", "claimed", claim),
                w.instance(run, "large", "claimed", now - timedelta(minutes=1))]  # expired claim
    specs["cleanup"] = spec(run, selected, 0, "success", [])

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, body in specs.items():
        path = args.out_dir / f"{name}.json"
        path.write_text(json.dumps(body, indent=2) + "\n")
        print(f"wrote {path} (runId {body['runId']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
