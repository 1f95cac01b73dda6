#!/usr/bin/env python3
"""Show the pool world for one run spec: records, EC2 states, and what waits in the pool queues.

    "$POST_PROVISION_PYTHON" scripts/show_world.py --table NAME --spec FILE
"""

import argparse
import json
import sys
import time
from datetime import datetime, timezone

import boto3

DELAY_WAIT_S = 4.5  # pool messages are sent with DelaySeconds 3
MAX_RECEIVE_ROUNDS = 20


def table_rows(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def resource_class_config(ddb, table):
    item = ddb.get_item(TableName=table, ConsistentRead=True,
                        Key={"PK": {"S": "TYPE#METADATA"}, "SK": {"S": "ID#resource_class_config"}}).get("Item")
    if not item:
        return {}
    return {name: v["M"]["queueUrl"]["S"] for name, v in item["value"]["M"].items()}


def ec2_states(ec2, ids):
    states = {}
    for iid in ids:  # one by one: an unknown id would fail a batched describe
        try:
            res = ec2.describe_instances(InstanceIds=[iid])["Reservations"]
            states[iid] = res[0]["Instances"][0]["State"]["Name"] if res else "not found"
        except ec2.exceptions.ClientError as e:
            states[iid] = e.response["Error"]["Code"]
    return states


def waiting_messages(sqs, url):
    """Instance ids of the messages in the queue, waiting (bounded) for delayed ones."""
    deadline = time.monotonic() + DELAY_WAIT_S
    while True:
        attrs = sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesDelayed"]
        )["Attributes"]
        delayed = int(attrs.get("ApproximateNumberOfMessagesDelayed", 0))
        visible = int(attrs.get("ApproximateNumberOfMessages", 0))
        if delayed == 0 or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    seen = {}
    for _ in range(MAX_RECEIVE_ROUNDS):
        if len(seen) >= visible:
            break
        msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0).get("Messages", [])
        new = [m for m in msgs if m["MessageId"] not in seen]
        if not new:
            break
        for m in new:
            try:
                seen[m["MessageId"]] = json.loads(m["Body"]).get("id", "?")
            except (ValueError, AttributeError):
                seen[m["MessageId"]] = f"<unparsable: {m['Body'][:40]}>"
    ids = sorted(seen.values())
    note = f" (+{delayed} still delayed)" if delayed else ""
    return ids, note


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", required=True)
    p.add_argument("--spec", required=True)
    args = p.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    ddb, sqs, ec2 = boto3.client("dynamodb"), boto3.client("sqs"), boto3.client("ec2")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    entries = [("selected", i) for i in spec.get("selection", {}).get("instances", [])]
    entries += [("created", i) for i in spec.get("creation", {}).get("instances", [])]
    states = ec2_states(ec2, [i["id"] for _, i in entries])
    rows = [("instance", "role", "class", "record", "runId", "threshold", "ec2")]
    for role, inst in entries:
        item = ddb.get_item(TableName=args.table, ConsistentRead=True,
                            Key={"PK": {"S": "TYPE#INSTANCE"}, "SK": {"S": f"ID#{inst['id']}"}}).get("Item")
        if item:
            thr = item.get("threshold", {}).get("S", "-")
            expired = " (expired)" if thr != "-" and thr < now else ""
            rows.append((inst["id"], role, inst.get("resourceClass", "?"), item.get("state", {}).get("S", "-"),
                         repr(item.get("runId", {}).get("S", "-")), thr + expired, states[inst["id"]]))
        else:
            rows.append((inst["id"], role, inst.get("resourceClass", "?"), "no record", "-", "-", states[inst["id"]]))
    print(f"world for run {spec.get('runId')} (now {now})")
    table_rows(rows)

    queues = resource_class_config(ddb, args.table)
    qrows = [("pool queue", "waiting instance ids")]
    for name, url in sorted(queues.items()):
        ids, note = waiting_messages(sqs, url)
        qrows.append((f"{name} ({url.rsplit('/', 1)[-1]})", (", ".join(ids) if ids else "(empty)") + note))
    if len(qrows) > 1:
        table_rows(qrows)
    else:
        print("  no resource_class_config item: pool queues unknown")
    return 0


if __name__ == "__main__":
    sys.exit(main())
