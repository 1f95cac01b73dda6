#!/usr/bin/env python3
"""Check scripts/fault_proxy.py against moto with boto3. Run with the venv's python:

    "$POST_PROVISION_PYTHON" scripts/check_fault_proxy.py

Uses the moto at $AWS_ENDPOINT_URL, or starts its own moto_server from this venv if unset.
Exits non-zero on the first failed check.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import botocore.exceptions
from botocore.config import Config

HERE = Path(__file__).resolve().parent
SLOW_MS = 400


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def main():
    procs = []
    try:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        moto = os.environ.get("AWS_ENDPOINT_URL")
        if not moto:
            port = free_port()
            server = Path(sys.executable).parent / "moto_server"
            procs.append(subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            moto = f"http://127.0.0.1:{port}"
            wait_http(moto + "/moto-api/data.json")
        proxy_proc = subprocess.Popen(
            [sys.executable, str(HERE / "fault_proxy.py"), "--upstream", moto, "--port", "0",
             "--rate", "0", "--slow-ms", str(SLOW_MS), "--seed", "7"],
            stdout=subprocess.PIPE, text=True)
        procs.append(proxy_proc)
        line = proxy_proc.stdout.readline().split()
        assert line[0] == "LISTENING", line
        proxy = f"http://127.0.0.1:{line[1]}"
        run_checks(moto, proxy)
        print("fault proxy: all checks passed")
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def control(proxy, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(proxy + "/__proxy/" + path, data=data,
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def run_checks(moto, proxy):
    cfg = Config(retries={"total_max_attempts": 1, "mode": "standard"},
                 connect_timeout=5, read_timeout=10)
    via = {s: boto3.client(s, endpoint_url=proxy, config=cfg) for s in ("dynamodb", "sqs", "ec2")}
    direct = {s: boto3.client(s, endpoint_url=moto) for s in ("dynamodb", "sqs", "ec2")}
    ddb, sqs, ec2 = via["dynamodb"], via["sqs"], via["ec2"]

    # --- rate 0: everything passes through and is counted ---
    table = f"chk-{uuid.uuid4().hex[:8]}"
    ddb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                     KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "PK", "AttributeType": "S"}])
    ddb.put_item(TableName=table, Item={"PK": {"S": "a"}})
    q = sqs.create_queue(QueueName=f"chk-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    sqs.send_message_batch(QueueUrl=q, Entries=[{"Id": "1", "MessageBody": "x"}])
    ids = [i["InstanceId"] for i in ec2.run_instances(
        ImageId="ami-12c6146b", MinCount=3, MaxCount=3, InstanceType="t3.micro")["Instances"]]
    ec2.terminate_instances(InstanceIds=ids[:1])
    stats = control(proxy, "stats")
    for op in ("DynamoDB.CreateTable", "DynamoDB.PutItem", "SQS.CreateQueue",
               "SQS.SendMessageBatch", "EC2.RunInstances", "EC2.TerminateInstances"):
        assert stats["requests"].get(op) == 1, (op, stats)
    assert not stats["faults"], stats
    print("ok   rate 0: all calls pass, stats", json.dumps(stats["requests"], sort_keys=True))

    # One mutating call per service; `effect()` tells whether it reached moto.
    def ddb_call(key):
        return (lambda: ddb.put_item(TableName=table, Item={"PK": {"S": key}}),
                lambda: "Item" in direct["dynamodb"].get_item(TableName=table, Key={"PK": {"S": key}}))

    def sqs_call(key):
        return (lambda: sqs.send_message_batch(QueueUrl=q, Entries=[{"Id": "1", "MessageBody": key}]),
                lambda: any(m["Body"] == key for m in direct["sqs"].receive_message(
                    QueueUrl=q, MaxNumberOfMessages=10, VisibilityTimeout=0).get("Messages", [])))

    def ec2_call(iid):
        return (lambda: ec2.terminate_instances(InstanceIds=[iid]),
                lambda: direct["ec2"].describe_instances(InstanceIds=[iid])["Reservations"][0]
                ["Instances"][0]["State"]["Name"] in ("shutting-down", "terminated"))

    expected_codes = {
        "throttle": {"ddb": "ThrottlingException", "sqs": "RequestThrottled", "ec2": "RequestLimitExceeded"},
        "error500": {"ddb": "InternalServerError", "sqs": "InternalError", "ec2": "InternalError"},
    }
    for kind in ("throttle", "error500", "slow", "drop_before", "drop_after"):
        control(proxy, "reset", {})
        control(proxy, "config", {"rate": 1.0, "faults": [kind]})
        ec2_ids = [i["InstanceId"] for i in direct["ec2"].run_instances(
            ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.micro")["Instances"]]
        key = uuid.uuid4().hex[:8]
        for svc, (call, effect) in (("ddb", ddb_call(key)), ("sqs", sqs_call(key)), ("ec2", ec2_call(ec2_ids[0]))):
            t0 = time.monotonic()
            outcome = "ok"
            try:
                call()
            except botocore.exceptions.ClientError as e:
                outcome = e.response["Error"]["Code"]
                status = e.response["ResponseMetadata"]["HTTPStatusCode"]
                outcome += f"/{status}"
            except (botocore.exceptions.ConnectionClosedError,
                    botocore.exceptions.EndpointConnectionError) as e:
                outcome = "connection:" + type(e).__name__
            elapsed = time.monotonic() - t0
            reached = effect()
            if kind in expected_codes:
                assert outcome.split("/")[0] == expected_codes[kind][svc], (kind, svc, outcome)
                assert not reached, (kind, svc, "effect happened")
            elif kind == "slow":
                assert outcome == "ok" and elapsed >= SLOW_MS / 1000 and reached, (kind, svc, outcome, elapsed)
            else:
                assert outcome.startswith("connection:"), (kind, svc, outcome)
                assert reached == (kind == "drop_after"), (kind, svc, reached)
            print(f"ok   {kind:<11} {svc:<3} -> {outcome:<40} effect={reached} {elapsed:.2f}s")
        stats = control(proxy, "stats")
        assert stats["faults"] == {kind: 3}, stats
    control(proxy, "config", {"rate": 0.0})
    control(proxy, "reset", {})
    ddb.put_item(TableName=table, Item={"PK": {"S": "after"}})
    assert control(proxy, "stats")["faults"] == {}


if __name__ == "__main__":
    main()
