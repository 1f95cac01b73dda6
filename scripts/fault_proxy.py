#!/usr/bin/env python3
"""Fault-injecting HTTP/1.1 reverse proxy for DynamoDB, SQS and EC2 in front of moto.

Usage:
    fault_proxy.py --upstream http://127.0.0.1:PORT [--port 0] [--rate 0.1]
                   [--faults throttle,error500,slow,drop_before,drop_after[,sqs_partial]]
                   [--slow-ms 2000] [--latency-ms 0] [--seed 1]
                   [--only DynamoDB.UpdateItem,EC2.TerminateInstances] [--budget N] [--skip N]
                   [--window-ms N]

Prints exactly one line "LISTENING <port>" on stdout once it accepts connections.

Each proxied request is identified as "<Service>.<Operation>" (DynamoDB / SQS by X-Amz-Target,
EC2 by Action= in the form body). With probability --rate (and only for operations in --only,
when given, and while --budget is not used up; the first --skip such requests are let through;
with --window-ms, only until N ms after the first injected fault: load that lasts a given time)
one fault kind from --faults is picked uniformly:
  throttle     service-correct throttling error, not forwarded
  error500     HTTP 500 with the service's internal-error shape, not forwarded
  slow         sleep --slow-ms, then forward
  drop_before  close the connection without forwarding or answering
  drop_after   forward (the effect happens), then close without answering
  sqs_partial  opt-in (not in the default --faults), SQS.SendMessageBatch only: withhold one entry
               from moto and answer HTTP 200 with that entry in `Failed` (Code InternalError,
               SenderFault false), the others as moto answered them. The withheld message is
               really not sent, so only a retry of the entry delivers it.
  txn_throttle opt-in, DynamoDB.TransactWriteItems only: not forwarded; answer
               TransactionCanceledException whose first item is cancelled with
               ProvisionedThroughputExceeded, the second with ThrottlingError, the rest None (load on
               the items' partition, as DynamoDB reports it per item)
  ec2_unauthorized opt-in, EC2.TerminateInstances only: not forwarded; answer 403
               UnauthorizedOperation (as an IAM condition evaluated per instance refuses the batch)
A kind that does not apply to an operation (sqs_partial to anything but SendMessageBatch) is never
picked for it; when no listed kind applies, the request is not faulted.
--latency-ms adds a fixed delay to every proxied request.

Control endpoints (never forwarded):
  GET  /__proxy/stats   {"requests": {"DynamoDB.UpdateItem": n, ...}, "faults": {"throttle": n, ...},
                         "faults_by_op": {...}, "forwarded": n, "in_flight": n, "config": {...}}
  GET  /__proxy/wait_idle?timeout_ms=N
                        answers once no proxied request is in flight (a `slow` one still sleeping
                        or forwarding counts): {"idle": true, "in_flight": 0}; after N ms (default
                        10000) {"idle": false, "in_flight": n}. Lets a test wait on a condition.
  POST /__proxy/config  JSON body with any of: rate, faults, slow_ms, latency_ms, seed, only, budget,
                        skip, window_ms
  POST /__proxy/reset   zero the counters
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
import uuid

FAULT_KINDS = (
    "throttle",
    "error500",
    "slow",
    "drop_before",
    "drop_after",
    "sqs_partial",
    "txn_throttle",
    "ec2_unauthorized",
)
# The kinds --faults means when not given; sqs_partial rewrites answers, so it is opt-in.
DEFAULT_FAULT_KINDS = ("throttle", "error500", "slow", "drop_before", "drop_after")
# Kinds that only make sense for some operations; the others apply to every operation.
FAULT_OPERATIONS = {
    "sqs_partial": {"SQS.SendMessageBatch"},
    "txn_throttle": {"DynamoDB.TransactWriteItems"},
    "ec2_unauthorized": {"EC2.TerminateInstances"},
}
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
MAX_BODY = 64 * 1024 * 1024  # refuse absurd request bodies instead of buffering them
MAX_CONCURRENT_CONNECTIONS = 256
IDLE_CONNECTION_TIMEOUT_S = 120
CREDENTIAL_SCOPE_RE = re.compile(r"Credential=[^/,\s]+/\d{8}/[^/]+/([^/]+)/aws4_request")
SERVICE_BY_SCOPE = {"dynamodb": "DynamoDB", "sqs": "SQS", "ec2": "EC2"}


def log(msg: str) -> None:
    sys.stderr.write(f"[fault_proxy {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


class State:
    """Settings and counters, shared by all handler threads."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.lock = threading.Lock()
        self.upstream = urllib.parse.urlsplit(args.upstream)
        if self.upstream.scheme != "http" or not self.upstream.hostname:
            raise SystemExit(f"--upstream must be http://host:port, got {args.upstream!r}")
        self.upstream_timeout = args.upstream_timeout
        # moto applies a transaction by copying the table and restoring the copy when a condition
        # fails, without isolation between threads: two overlapping transactions (a timed-out
        # attempt landing late beside its retry) can undo each other. AWS isolates transactions;
        # with --serialize-upstream the proxy forwards one request at a time, so tests exercising
        # timeouts see AWS's semantics rather than that emulator artifact.
        self.upstream_lock = threading.Lock() if args.serialize_upstream else None
        self.rate = 0.0
        self.faults: list[str] = list(DEFAULT_FAULT_KINDS)
        self.idle = threading.Condition(self.lock)
        self.slow_ms = 2000
        self.latency_ms = 0
        self.only: list[str] = []
        self.budget: int | None = None  # None = unlimited
        self.skip = 0  # eligible requests still to let through before faults may start
        self.window_ms: int | None = None  # None = faults for as long as the other limits allow
        self.window_started: float | None = None  # monotonic time of the first injected fault
        self.rng = random.Random(args.seed)
        self.apply_config(
            {
                "rate": args.rate,
                "faults": args.faults,
                "slow_ms": args.slow_ms,
                "latency_ms": args.latency_ms,
                "only": args.only,
                "budget": args.budget,
                "skip": args.skip,
                "window_ms": args.window_ms,
            }
        )
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.requests: dict[str, int] = {}
            self.fault_counts: dict[str, int] = {}
            self.faults_by_op: dict[str, int] = {}
            self.forwarded = 0
            # Not reset: requests in flight are still in flight after a reset.
            self.in_flight = getattr(self, "in_flight", 0)

    def apply_config(self, cfg: dict) -> None:
        unknown = set(cfg) - {"rate", "faults", "slow_ms", "latency_ms", "seed", "only", "budget", "skip", "window_ms"}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        new = {}
        if "rate" in cfg:
            rate = float(cfg["rate"])
            if not 0.0 <= rate <= 1.0:
                raise ValueError("rate must be within 0..1")
            new["rate"] = rate
        if "faults" in cfg:
            faults = cfg["faults"]
            if isinstance(faults, str):
                faults = [f.strip() for f in faults.split(",") if f.strip()]
            bad = [f for f in faults if f not in FAULT_KINDS]
            if bad or not faults:
                raise ValueError(f"faults must be a non-empty subset of {FAULT_KINDS}, got {faults}")
            new["faults"] = list(faults)
        for key in ("slow_ms", "latency_ms", "skip"):
            if key in cfg:
                value = int(cfg[key])
                if value < 0:
                    raise ValueError(f"{key} must be >= 0")
                new[key] = value
        if "only" in cfg:
            only = cfg["only"] or []
            if isinstance(only, str):
                only = [o.strip() for o in only.split(",") if o.strip()]
            new["only"] = list(only)
        if "budget" in cfg:
            budget = cfg["budget"]
            new["budget"] = None if budget is None or int(budget) < 0 else int(budget)
        if "window_ms" in cfg:
            window = cfg["window_ms"]
            new["window_ms"] = None if window is None or int(window) < 0 else int(window)
            new["window_started"] = None
        with self.lock:
            for key, value in new.items():
                setattr(self, key, value)
            if "seed" in cfg:
                self.rng = random.Random(cfg["seed"])

    def config(self) -> dict:
        with self.lock:
            return {
                "rate": self.rate,
                "faults": list(self.faults),
                "slow_ms": self.slow_ms,
                "latency_ms": self.latency_ms,
                "only": list(self.only),
                "budget": self.budget,
                "skip": self.skip,
                "window_ms": self.window_ms,
            }

    def on_request(self, op: str) -> tuple[str | None, int, int]:
        """Count the request; return (fault kind or None, latency_ms, slow_ms)."""
        with self.lock:
            self.requests[op] = self.requests.get(op, 0) + 1
            fault = None
            eligible = not op.startswith("Unknown") and (not self.only or op in self.only)
            kinds = [k for k in self.faults if op in FAULT_OPERATIONS.get(k, (op,))]
            if eligible and self.skip > 0:
                self.skip -= 1
                eligible = False
            if eligible and self.window_ms is not None and self.window_started is not None:
                eligible = (time.monotonic() - self.window_started) * 1000 < self.window_ms
            if eligible and kinds and self.budget != 0 and self.rate > 0 and self.rng.random() < self.rate:
                fault = self.rng.choice(kinds)
                if self.window_started is None:
                    self.window_started = time.monotonic()
                self.fault_counts[fault] = self.fault_counts.get(fault, 0) + 1
                key = f"{op}:{fault}"
                self.faults_by_op[key] = self.faults_by_op.get(key, 0) + 1
                if self.budget is not None:
                    self.budget -= 1
            return fault, self.latency_ms, self.slow_ms

    def on_forwarded(self) -> None:
        with self.lock:
            self.forwarded += 1

    def begin(self) -> None:
        with self.lock:
            self.in_flight += 1

    def end(self) -> None:
        with self.lock:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.notify_all()

    def wait_idle(self, timeout_s: float) -> tuple[bool, int]:
        with self.lock:
            idle = self.idle.wait_for(lambda: self.in_flight == 0, timeout=timeout_s)
            return idle, self.in_flight

    def pick(self, count: int) -> int:
        """A seeded choice of one of `count` items (for sqs_partial)."""
        with self.lock:
            return self.rng.randrange(count)

    def stats(self) -> dict:
        with self.lock:
            return {
                "requests": dict(self.requests),
                "faults": dict(self.fault_counts),
                "faults_by_op": dict(self.faults_by_op),
                "forwarded": self.forwarded,
                "in_flight": self.in_flight,
            }


def identify(headers, body: bytes) -> tuple[str, str]:
    """Return (service, operation) for an AWS request."""
    target = headers.get("X-Amz-Target", "")
    service = None
    m = CREDENTIAL_SCOPE_RE.search(headers.get("Authorization", ""))
    if m:
        service = SERVICE_BY_SCOPE.get(m.group(1).lower())
    if target:
        prefix, _, op = target.partition(".")
        if service is None:
            if prefix.startswith("DynamoDB"):
                service = "DynamoDB"
            elif prefix.startswith("AmazonSQS"):
                service = "SQS"
        if service:
            return service, op or "Unknown"
    ctype = headers.get("Content-Type", "")
    if body and "x-www-form-urlencoded" in ctype:
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), max_num_fields=100_000)
        action = (form.get("Action") or [""])[0]
        if service is None:
            version = (form.get("Version") or [""])[0]
            service = "SQS" if version == "2012-11-05" else "EC2"
        if action:
            return service, action
    return service or "Unknown", "Unknown"


def error_response(service: str, kind: str) -> tuple[int, dict, bytes]:
    """(status, headers, body) of an injected throttle / error500 for the service."""
    request_id = str(uuid.uuid4())
    if service == "EC2":
        if kind == "throttle":
            status, code, msg = 503, "RequestLimitExceeded", "Request limit exceeded (injected)."
        else:
            status, code, msg = 500, "InternalError", "An internal error has occurred (injected)."
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f"<Response><Errors><Error><Code>{code}</Code><Message>{msg}</Message></Error></Errors>"
            f"<RequestID>{request_id}</RequestID></Response>"
        )
        return status, {"Content-Type": "text/xml;charset=UTF-8"}, body.encode()
    if service == "SQS":
        if kind == "throttle":
            status, code, fault, msg = 400, "RequestThrottled", "Sender", "Rate exceeded (injected)"
        else:
            status, code, fault, msg = 500, "InternalError", "Receiver", "Internal error (injected)"
        body = json.dumps({"__type": f"com.amazonaws.sqs#{code}", "message": msg})
        headers = {
            "Content-Type": "application/x-amz-json-1.0",
            "x-amzn-query-error": f"{code};{fault}",
            "x-amzn-RequestId": request_id,
        }
        return status, headers, body.encode()
    # DynamoDB (and anything else speaking JSON)
    if kind == "throttle":
        status, code, msg = 400, "ThrottlingException", "Rate exceeded (injected)"
    else:
        status, code, msg = 500, "InternalServerError", "Internal server error (injected)"
    body = json.dumps({"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": msg})
    headers = {"Content-Type": "application/x-amz-json-1.0", "x-amzn-RequestId": request_id}
    return status, headers, body.encode()


def transaction_throttled(body: bytes) -> tuple[int, dict, bytes]:
    """txn_throttle: a TransactWriteItems cancelled for load on its items' partition."""
    try:
        count = len(json.loads(body).get("TransactItems") or [])
    except (ValueError, AttributeError):
        count = 1
    codes = ["ProvisionedThroughputExceeded", "ThrottlingError"]
    reasons = []
    for index in range(max(count, 1)):
        if index < len(codes):
            reasons.append({"Code": codes[index], "Message": "Throughput exceeds the current capacity (injected)."})
        else:
            reasons.append({"Code": "None"})
    listed = ", ".join(r["Code"] for r in reasons)
    answer = {
        "__type": "com.amazonaws.dynamodb.v20120810#TransactionCanceledException",
        "Message": f"Transaction cancelled, please refer cancellation reasons for specific reasons [{listed}]",
        "CancellationReasons": reasons,
    }
    headers = {"Content-Type": "application/x-amz-json-1.0", "x-amzn-RequestId": str(uuid.uuid4())}
    return 400, headers, json.dumps(answer).encode()


def ec2_unauthorized() -> tuple[int, dict, bytes]:
    """ec2_unauthorized: TerminateInstances refused by an IAM condition."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        "<Response><Errors><Error><Code>UnauthorizedOperation</Code>"
        "<Message>You are not authorized to perform this operation (injected).</Message></Error></Errors>"
        f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
    )
    return 403, {"Content-Type": "text/xml;charset=UTF-8"}, body.encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_CONNECTION_TIMEOUT_S  # idle keep-alive connections do not hold a thread forever
    server_version = "fault-proxy/1"
    state: State  # set on the class by main()

    # Buffered writes + TCP_NODELAY: status line, headers and body leave in one segment, so
    # Nagle's algorithm and delayed ACKs do not add ~40 ms to every response.
    wbufsize = 1 << 16

    def setup(self):
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def log_message(self, fmt, *args):  # silence per-request access logs
        pass

    # -- plumbing ---------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > MAX_BODY:
                    raise ValueError("request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("request body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, headers: dict | list, body: bytes) -> None:
        self.send_response_only(status)
        items = headers.items() if isinstance(headers, dict) else headers
        for name, value in items:
            if name.lower() in HOP_BY_HOP or name.lower() == "content-length":
                continue
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _send_json(self, status: int, obj) -> None:
        self._send(status, {"Content-Type": "application/json"}, json.dumps(obj).encode())

    def _drop(self) -> None:
        """Close the client connection without an answer."""
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass

    def _forward(self, body: bytes) -> tuple[int, list, bytes]:
        up = self.state.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port or 80, timeout=self.state.upstream_timeout)
        try:
            headers = {}
            for name, value in self.headers.items():
                lname = name.lower()
                if lname in HOP_BY_HOP or lname in ("host", "content-length", "expect"):
                    continue
                headers[name] = value
            headers["Host"] = up.netloc
            headers["Content-Length"] = str(len(body))
            lock = self.state.upstream_lock
            if lock is not None:
                lock.acquire()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                if lock is not None:
                    lock.release()
            self.state.on_forwarded()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    # -- control endpoints ------------------------------------------------------------------
    def _control(self, body: bytes) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/__proxy/stats" and self.command == "GET":
            stats = self.state.stats()
            stats["config"] = self.state.config()
            self._send_json(200, stats)
        elif path == "/__proxy/config" and self.command == "POST":
            try:
                cfg = json.loads(body or b"{}")
                if not isinstance(cfg, dict):
                    raise ValueError("config must be a JSON object")
                self.state.apply_config(cfg)
            except (ValueError, TypeError) as e:
                self._send_json(400, {"error": str(e)})
                return
            self._send_json(200, self.state.config())
        elif path == "/__proxy/wait_idle" and self.command == "GET":
            query = urllib.parse.parse_qs(self.path.partition("?")[2])
            try:
                timeout_ms = int((query.get("timeout_ms") or ["10000"])[0])
            except ValueError:
                self._send_json(400, {"error": "timeout_ms must be an integer"})
                return
            idle, in_flight = self.state.wait_idle(max(0, timeout_ms) / 1000)
            self._send_json(200, {"idle": idle, "in_flight": in_flight})
        elif path == "/__proxy/reset" and self.command == "POST":
            self.state.reset()
            self._send_json(200, {"ok": True})
        else:
            self._send_json(404, {"error": f"no control endpoint {self.command} {path}"})

    # -- main entry -------------------------------------------------------------------------
    def _handle(self) -> None:
        try:
            body = self._read_body()
        except (ValueError, OSError) as e:
            self.close_connection = True
            self._send_json(400, {"error": f"bad request body: {e}"})
            return
        if self.path.startswith("/__proxy/"):
            self._control(body)
            return

        service, operation = identify(self.headers, body)
        op = f"{service}.{operation}"
        self.state.begin()
        try:
            self._proxy(service, op, body)
        finally:
            self.state.end()

    def _proxy(self, service: str, op: str, body: bytes) -> None:
        fault, latency_ms, slow_ms = self.state.on_request(op)
        if latency_ms:
            time.sleep(latency_ms / 1000)
        if fault:
            log(f"inject {fault} on {op}")
        if fault in ("throttle", "error500"):
            self._send(*error_response(service, fault))
            return
        if fault == "drop_before":
            self._drop()
            return
        if fault == "slow":
            time.sleep(slow_ms / 1000)
        if fault == "sqs_partial":
            self._partial_batch(op, body)
            return
        if fault == "txn_throttle":
            self._send(*transaction_throttled(body))
            return
        if fault == "ec2_unauthorized":
            self._send(*ec2_unauthorized())
            return
        try:
            status, headers, data = self._forward(body)
        except (OSError, http.client.HTTPException) as e:
            log(f"upstream error on {op}: {e!r}")
            self.close_connection = True
            self._send_json(502, {"__type": "ProxyUpstreamError", "message": str(e)})
            return
        if fault == "drop_after":
            self._drop()
            return
        self._send(status, headers, data)

    def _partial_batch(self, op: str, body: bytes) -> None:
        """sqs_partial: forward the batch without one entry; report that entry as `Failed`."""
        try:
            request = json.loads(body)
            entries = request["Entries"]
            if not isinstance(entries, list) or not entries:
                raise ValueError("no entries")
        except (ValueError, KeyError, TypeError):
            # Not a JSON-protocol batch (e.g. the query protocol): pass it through unchanged.
            log(f"sqs_partial: {op} body is not a JSON batch; forwarded unchanged")
            request = None
        if request is None:
            status, headers, data = self._forward(body)
            self._send(status, headers, data)
            return
        withheld = entries.pop(self.state.pick(len(entries)))
        failed = {
            "Id": withheld.get("Id", ""),
            "SenderFault": False,
            "Code": "InternalError",
            "Message": "Entry withheld by the fault proxy (injected).",
        }
        if entries:
            try:
                status, headers, data = self._forward(json.dumps(request).encode())
            except (OSError, http.client.HTTPException) as e:
                log(f"upstream error on {op}: {e!r}")
                self.close_connection = True
                self._send_json(502, {"__type": "ProxyUpstreamError", "message": str(e)})
                return
            if status != 200:
                # The rest of the batch failed as a whole: that answer says enough.
                self._send(status, headers, data)
                return
            answer = json.loads(data or b"{}")
        else:
            headers = [("Content-Type", "application/x-amz-json-1.0"), ("x-amzn-RequestId", str(uuid.uuid4()))]
            answer = {"Successful": []}
        answer.setdefault("Successful", [])
        answer["Failed"] = list(answer.get("Failed") or []) + [failed]
        log(f"sqs_partial: withheld entry {failed['Id']!r} of {op}")
        self._send(200, headers, json.dumps(answer).encode())

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = do_GET


class BoundedThreadingHTTPServer(http.server.ThreadingHTTPServer):
    """At most MAX_CONCURRENT_CONNECTIONS handler threads; beyond that, accept() waits."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # client went away / idle timeout: not worth a traceback
        super().handle_error(request, client_address)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of moto")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--rate", type=float, default=0.0, help="probability 0..1 of a fault per request")
    p.add_argument("--faults", default=",".join(DEFAULT_FAULT_KINDS), help="comma list of fault kinds")
    p.add_argument("--slow-ms", type=int, default=2000)
    p.add_argument("--latency-ms", type=int, default=0, help="fixed delay added to every request")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--only", default="", help="comma list of Service.Operation eligible for faults")
    p.add_argument("--budget", type=int, default=-1, help="max faults to inject (-1 = unlimited)")
    p.add_argument("--skip", type=int, default=0, help="let the first N eligible requests through")
    p.add_argument("--window-ms", type=int, default=-1, help="inject faults only until N ms after the first (-1 = no window)")
    p.add_argument("--upstream-timeout", type=float, default=30.0, help="seconds")
    p.add_argument("--serialize-upstream", action="store_true",
                   help="forward one request at a time (moto's transactions are not isolated between threads)")
    args = p.parse_args(argv)

    try:
        state = State(args)
    except ValueError as e:
        p.error(str(e))
    Handler.state = state
    server = BoundedThreadingHTTPServer((args.host, args.port), Handler)
    port = server.server_address[1]
    sys.stdout.write(f"LISTENING {port}\n")
    sys.stdout.flush()
    log(f"listening on {args.host}:{port} -> {args.upstream} config={json.dumps(state.config())}")
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
