#!/usr/bin/env python3
"""Check that bench/emulator/sitecustomize.py changes how moto computes, never what it answers.
Run with the venv's python:

    "$POST_PROVISION_PYTHON" scripts/check_moto_patches.py [--seed N] [--items N] [--queries N]

Starts two moto_servers from this venv, one with the patches (PYTHONPATH=bench/emulator) and one
without, sends both the same random DynamoDB workload (a table shaped like the pool table: PK,
SK and the run index; writes, batch writes, updates that move items between index partitions,
deletes, transactions; Query of the base table with every sort-key condition, of the index, with
limits, both directions, pagination, filters and projections; a few items big enough to hit
the 1 MB page limit) and compares every answer (status, items and their order, Count,
ScannedCount, LastEvaluatedKey, every other field but the request id). Exits non-zero on the
first difference.
"""

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3
import botocore.exceptions
from botocore.config import Config

REPO = Path(__file__).resolve().parent.parent
TABLE = "check-patches"
INDEX = "post-provision-runs"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(patched):
    port = free_port()
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if patched:
        env["PYTHONPATH"] = str(REPO / "bench" / "emulator")
    log = tempfile.NamedTemporaryFile(prefix="moto-check-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/moto-api/data.json", timeout=2)
            break
        except Exception:
            time.sleep(0.2)
    else:
        proc.kill()
        sys.exit(f"moto_server (patched={patched}) did not come up; log {log.name}")
    text = open(log.name).read()
    if patched and "moto patched for history" not in text:
        proc.kill()
        sys.exit(f"the patched moto_server did not load the history patches; log {log.name}")
    if not patched and "moto patched" in text:
        proc.kill()
        sys.exit(f"the unpatched moto_server loaded patches; log {log.name}")
    return proc, url


def client(url):
    return boto3.client(
        "dynamodb", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
        config=Config(retries={"max_attempts": 1}, read_timeout=120),
    )


def call(c, op, **kwargs):
    try:
        out = getattr(c, op)(**kwargs)
        out.pop("ResponseMetadata", None)
        return {"ok": out}
    except botocore.exceptions.ClientError as e:
        return {"error": e.response.get("Error", {}).get("Code"), "message": e.response.get("Error", {}).get("Message")}


class Workload:
    def __init__(self, rng, items):
        self.rng = rng
        self.ids = [self.run_id(i) for i in range(items)]
        self.written = []  # run ids written at least once: conditions that hit something

    def run_id(self, i):
        # Shared prefixes on purpose (begins_with must find exactly its run and its attempts).
        return self.rng.choice(["a", "ab", "z", "u"]) + f"{i % 97:03d}" + self.rng.choice(["", "#2", "0", "1"])

    def item(self, rid, big=False):
        r = self.rng
        at = f"2026-11-30T{r.randrange(24):02d}:{r.randrange(60):02d}:{r.randrange(60):02d}Z"
        state = r.choice(["Done", "Failed", "Committing", "Selected"])
        item = {
            "PK": {"S": r.choice(["TYPE#RUN"] * 6 + ["TYPE#SPEC", "RUN"])},
            "SK": {"S": f"ID#{rid}"},
            "state": {"S": state},
            "createdAt": {"S": at},
            "version": {"N": str(r.randrange(1, 9))},
            "history": {"L": [{"M": {"state": {"S": state}, "at": {"S": at}}}]},
        }
        if r.random() < 0.9:
            item["runIndexPK"] = {"S": "RUN#FINISHED" if state in ("Done", "Failed") else "RUN#UNFINISHED"}
            if r.random() < 0.95:
                # Sort keys that tie across items, so the table's keys decide the order.
                item["runIndexSK"] = {"S": r.choice([at, "2026-11-30T00:00:00Z"]) + f"#{rid[:2]}"}
        self.written.append(rid)
        if big:
            item["blob"] = {"S": "x" * r.randrange(150_000, 380_000)}
        return item

    def step(self):
        """One request: (operation, kwargs)."""
        r = self.rng
        kind = r.random()
        rid = r.choice(self.ids)
        if kind < 0.35:
            return "put_item", {"TableName": TABLE, "Item": self.item(rid, big=r.random() < 0.01)}
        if kind < 0.42:
            reqs, seen = [], set()
            for _ in range(r.randrange(1, 26)):
                it = self.item(r.choice(self.ids))
                key = (it["PK"]["S"], it["SK"]["S"])
                if key not in seen:
                    seen.add(key)
                    reqs.append({"PutRequest": {"Item": it}})
            return "batch_write_item", {"RequestItems": {TABLE: reqs}}
        if kind < 0.48:
            return "update_item", {
                "TableName": TABLE, "Key": {"PK": {"S": "TYPE#RUN"}, "SK": {"S": f"ID#{rid}"}},
                "UpdateExpression": "SET #p = :p, #s = :s",
                "ExpressionAttributeNames": {"#p": "runIndexPK", "#s": "state"},
                "ExpressionAttributeValues": {":p": {"S": r.choice(["RUN#FINISHED", "RUN#UNFINISHED"])},
                                              ":s": {"S": r.choice(["Done", "Committing"])}},
            }
        if kind < 0.50:
            return "update_item", {
                "TableName": TABLE, "Key": {"PK": {"S": "TYPE#RUN"}, "SK": {"S": f"ID#{rid}"}},
                "UpdateExpression": "REMOVE runIndexPK",
            }
        if kind < 0.55:
            return "delete_item", {"TableName": TABLE, "Key": {"PK": {"S": "TYPE#RUN"}, "SK": {"S": f"ID#{rid}"}}}
        if kind < 0.57:
            ids = r.sample(self.ids, 3)
            return "transact_write_items", {"TransactItems": [
                {"Put": {"TableName": TABLE, "Item": self.item(ids[0]),
                         "ConditionExpression": r.choice(["attribute_not_exists(PK)", "attribute_exists(PK)"])}},
                {"Delete": {"TableName": TABLE, "Key": {"PK": {"S": "TYPE#RUN"}, "SK": {"S": f"ID#{ids[1]}"}}}},
            ]}
        if kind < 0.59:
            return "get_item", {"TableName": TABLE, "Key": {"PK": {"S": "TYPE#RUN"}, "SK": {"S": f"ID#{rid}"}},
                                "ConsistentRead": True}
        return "query", self.query()

    def query(self):
        r = self.rng
        q = {"TableName": TABLE}
        if r.random() < 0.4:
            q["IndexName"] = INDEX
            q["KeyConditionExpression"] = "#pk = :pk"
            q["ExpressionAttributeNames"] = {"#pk": "runIndexPK"}
            q["ExpressionAttributeValues"] = {":pk": {"S": r.choice(["RUN#FINISHED", "RUN#UNFINISHED", "RUN#NONE"])}}
            if r.random() < 0.3:
                q["KeyConditionExpression"] += " AND begins_with(#sk, :sk)"
                q["ExpressionAttributeNames"]["#sk"] = "runIndexSK"
                q["ExpressionAttributeValues"][":sk"] = {"S": "2026-11-30T" + f"{r.randrange(24):02d}"[: r.randrange(3)]}
        else:
            pk = r.choice(["TYPE#RUN"] * 5 + ["TYPE#SPEC", "RUN", "NOPE"])
            q["ExpressionAttributeValues"] = {":pk": {"S": pk}}
            cond = r.choice(["", "=", "<", "<=", ">", ">=", "between", "begins_with", "begins_with"])
            pool = self.written if self.written and r.random() < 0.7 else self.ids
            a, b = f"ID#{r.choice(pool)}", f"ID#{r.choice(pool)}"
            if r.random() < 0.2:
                a = a[: r.randrange(2, len(a))]
            if cond == "":
                q["KeyConditionExpression"] = "PK = :pk"
            elif cond == "between":
                q["KeyConditionExpression"] = "PK = :pk AND SK BETWEEN :a AND :b"
                q["ExpressionAttributeValues"].update({":a": {"S": a}, ":b": {"S": b}})
            elif cond == "begins_with":
                q["KeyConditionExpression"] = "PK = :pk AND begins_with(SK, :a)"
                q["ExpressionAttributeValues"][":a"] = {"S": a[: r.randrange(0, len(a) + 1)] or "I"}
            else:
                q["KeyConditionExpression"] = f"PK = :pk AND SK {cond} :a"
                q["ExpressionAttributeValues"][":a"] = {"S": a}
            q["ConsistentRead"] = r.random() < 0.5
        if r.random() < 0.5:
            q["Limit"] = r.choice([1, 1, 2, 2, 3, 5, 10, 101, 500])
        if r.random() < 0.4:
            q["ScanIndexForward"] = False
        if r.random() < 0.15:
            q["FilterExpression"] = "#st IN (:d, :f)"
            q.setdefault("ExpressionAttributeNames", {})["#st"] = "state"
            q["ExpressionAttributeValues"].update({":d": {"S": "Done"}, ":f": {"S": "Failed"}})
        elif r.random() < 0.1:
            q["ProjectionExpression"] = "SK, createdAt"
        return q


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--items", type=int, default=400, help="distinct run ids")
    parser.add_argument("--steps", type=int, default=1500, help="requests (about 40% queries)")
    opts = parser.parse_args()

    servers = []
    try:
        servers.append(start_moto(False))
        servers.append(start_moto(True))
        clients = [client(url) for _, url in servers]
        for c in clients:
            c.create_table(
                TableName=TABLE, BillingMode="PAY_PER_REQUEST",
                KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}, {"AttributeName": "SK", "KeyType": "RANGE"}],
                AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"}
                                      for n in ("PK", "SK", "runIndexPK", "runIndexSK")],
                GlobalSecondaryIndexes=[{
                    "IndexName": INDEX, "Projection": {"ProjectionType": "ALL"},
                    "KeySchema": [{"AttributeName": "runIndexPK", "KeyType": "HASH"},
                                  {"AttributeName": "runIndexSK", "KeyType": "RANGE"}],
                }],
            )
        work = Workload(random.Random(opts.seed), opts.items)
        counts = {}
        pages = items_returned = cut_by_size = 0
        for n in range(opts.steps):
            op, kwargs = work.step()
            # A query is followed through its pages, each compared.
            page = 0
            while True:
                answers = [call(c, op, **json.loads(json.dumps(kwargs))) for c in clients]
                if answers[0] != answers[1]:
                    print(f"DIFFERENCE at step {n} ({op}, page {page}):\n request {json.dumps(kwargs)}\n"
                          f" moto:    {json.dumps(answers[0])[:3000]}\n patched: {json.dumps(answers[1])[:3000]}")
                    return 1
                counts[op] = counts.get(op, 0) + 1
                out = answers[0].get("ok", {})
                if op != "query" or "LastEvaluatedKey" not in out or page >= 50:
                    break
                if out.get("Count", 0) < kwargs.get("Limit", 1 << 30):
                    cut_by_size += 1
                kwargs["ExclusiveStartKey"] = out["LastEvaluatedKey"]
                page += 1
                pages += 1
            if n % 250 == 249:
                print(f"... {n + 1} requests identical", file=sys.stderr, flush=True)
            if op == "query":
                items_returned += answers[0].get("ok", {}).get("Count", 0)
        print(f"identical answers: {counts} ({pages} follow-up pages, {cut_by_size} pages cut by size, "
              f"{items_returned} items returned by the last pages)")
        return 0
    finally:
        for proc, _ in servers:
            proc.terminate()
        for proc, _ in servers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    sys.exit(main())
