"""
Reads under write load: GET /api/v1/jobs/<id> latency while many keep-alive
clients also POST submissions, against a real `twistd roller`.  Manual; not
part of CI.  See bench/README.md.

    python bench/mixed.py [--clients 1000] [--seconds 10] [--warmup 2] [--get-share 0.5] [--quick] [--keep]

One roller (as bench/submit.py starts it: auth none, max_running = 1, its
machines written to the database first) gets, one after the other:

1. baseline: 32 keep-alive connections GETting the jobs of 500 earlier
   submissions (picked at random), nothing else;
2. mixed, 32 connections: each request a GET of such a job or, with the
   other share, a POST submission to a machine of its own (a new job);
3. mixed, --clients connections (1000): the same.

It prints GET and POST p50/p99 and rates for each; every POST must answer 201
and every GET 200.  The load generator is this file run as a separate
process (--loadgen): stdlib asyncio, raw HTTP/1.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Any

from common import Procs, child_mode, cpu_seconds, machine_busy, percentile, report
from submit import SUBMIT_PATH, parse_response, run_loadgen, start_roller

GET_PATH = "/api/v1/jobs/{id}"


# -- the load generator (its own process)


class Mixed:
    def __init__(self, spec: dict[str, Any], loop: asyncio.AbstractEventLoop):
        self.spec = spec
        self.loop = loop
        self.rng = random.Random(spec.get("seed", 1))
        self.ids = spec["get_ids"]
        self.next_post = spec["post_first"]
        self.post_end = spec["post_first"] + spec["post_count"]
        self.stopping = False
        self.exhausted = False
        self.open = 0
        self.done = loop.create_future()
        now = time.monotonic()
        self.window = (now + spec["warmup"], now + spec["warmup"] + spec["seconds"])
        self.latency: dict[str, list[float]] = {"GET": [], "POST": []}
        self.statuses: dict[str, dict[int, int]] = {"GET": {}, "POST": {}}
        self.errors: list[str] = []
        self.lost = 0
        self.cpu: dict[str, tuple[float, float]] = {}
        self.head = f"\r\nHost: {spec['host']}:{spec['port']}\r\nUser-Agent: roller-bench\r\n".encode()
        loop.call_at(loop.time() + spec["warmup"], self.sample, "start")
        loop.call_at(loop.time() + spec["warmup"] + spec["seconds"], self.stop)

    def sample(self, which: str) -> None:
        self.cpu[which] = (cpu_seconds(self.spec["pid"]), machine_busy(), time.process_time())

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.sample("end")

    def request(self) -> tuple[str, bytes] | None:
        if self.stopping:
            return None
        if self.rng.random() < self.spec["get_share"]:
            path = GET_PATH.replace("{id}", self.rng.choice(self.ids))
            return "GET", b"GET " + path.encode() + b" HTTP/1.1" + self.head + b"\r\n"
        if self.next_post >= self.post_end:
            self.exhausted = True
            self.stop()
            return None
        ident = f"{self.spec['prefix']}{self.next_post}"
        self.next_post += 1
        path = SUBMIT_PATH.replace("{id}", ident)
        return "POST", b"POST " + path.encode() + b" HTTP/1.1" + self.head + b"Content-Length: 0\r\n\r\n"

    def record(self, kind: str, status: int, body: bytes, sent: float) -> None:
        now = time.monotonic()
        if not (self.window[0] <= now <= self.window[1]) or self.stopping:
            return
        tally = self.statuses[kind]
        tally[status] = tally.get(status, 0) + 1
        if status not in (200, 201) and len(self.errors) < 5:
            self.errors.append(f"{kind} {status} {body[:200]!r}")
        self.latency[kind].append(now - sent)

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.done.done():
            self.done.set_result(None)


class Client(asyncio.Protocol):
    def __init__(self, load: Mixed):
        self.load = load
        self.buf = bytearray()
        self.kind = ""
        self.sent = 0.0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send()

    def send(self) -> None:
        nxt = self.load.request()
        if nxt is None:
            self.transport.close()
            return
        self.kind, data = nxt
        self.sent = time.monotonic()
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        parsed = parse_response(self.buf)
        if parsed is None:
            return
        status, body, used, close = parsed
        del self.buf[:used]
        self.load.record(self.kind, status, body, self.sent)
        if close:
            self.transport.close()
            return
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.load.stopping:
            self.load.lost += 1
            if len(self.load.errors) < 5:
                self.load.errors.append(f"connection lost: {exc!r}")
        self.load.closed()


async def loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    load = Mixed(spec, loop)
    load.open = spec["concurrency"]
    for _ in range(spec["concurrency"]):
        try:
            await loop.create_connection(lambda: Client(load), spec["host"], spec["port"])
        except OSError as e:
            load.errors.append(f"connect: {e!r}")
            load.closed()
    await load.done
    seconds = spec["seconds"]
    out: dict[str, Any] = {"errors": load.errors, "lost": load.lost, "exhausted": load.exhausted,
                           "posted": load.next_post - spec["post_first"]}
    for kind, values in load.latency.items():
        values.sort()
        out[kind] = {"count": len(values), "rate": len(values) / seconds,
                     "p50_ms": 1000 * percentile(values, 0.5), "p99_ms": 1000 * percentile(values, 0.99),
                     "statuses": load.statuses[kind]}
    if "start" in load.cpu and "end" in load.cpu:
        (s0, b0, c0), (s1, b1, c1) = load.cpu["start"], load.cpu["end"]
        out["server_cpu"] = (s1 - s0) / seconds
        out["client_cpu"] = (c1 - c0) / seconds
        out["other_cpu"] = max(0.0, (b1 - b0) / seconds - out["server_cpu"] - out["client_cpu"])
    return out


def run_mixed(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--loadgen", json.dumps(spec)],
                          stdout=subprocess.PIPE, check=True)
    out = json.loads(proc.stdout)
    for kind in ("GET", "POST"):
        out[kind]["statuses"] = {int(k): v for k, v in out[kind]["statuses"].items()}
    return out


# -- the run


def describe(name: str, r: dict[str, Any]) -> str:
    parts = [f"  {name:<22}"]
    for kind in ("GET", "POST"):
        k = r[kind]
        if k["count"]:
            parts.append(f"{kind} {k['rate']:5.0f}/s p50 {k['p50_ms']:7.1f} ms p99 {k['p99_ms']:7.1f} ms")
    parts.append(f"cores: server {r.get('server_cpu', 0):.2f} client {r.get('client_cpu', 0):.2f} "
                 f"others {r.get('other_cpu', 0):.2f}")
    return "   ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000, help="keep-alive connections of the mixed load (1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per load (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before measuring (2)")
    parser.add_argument("--get-share", type=float, default=0.5, help="share of GETs in the mixed load (0.5)")
    parser.add_argument("--machines", type=int, default=60_000, help="machines written to the database (60000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s windows, 200 clients")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if child_mode(args.loadgen, lambda spec: asyncio.run(loadgen(spec))):
        return
    if args.quick:
        args.seconds, args.warmup, args.clients = 2.0, 0.5, min(args.clients, 200)
        args.machines = min(args.machines, 10_000)

    workdir = tempfile.mkdtemp(prefix="roller-bench-mixed-")
    servers = Procs()
    problems: list[str] = []
    print(f"roller mixed bench: {os.cpu_count()} CPUs, {args.clients} clients, GET share {args.get_share:g}, "
          f"{args.warmup:g} s warm-up + {args.seconds:g} s per load; work dir {workdir}", flush=True)
    try:
        roller, port, db_path = start_roller(servers, workdir, "mixed", seed=args.machines, prefix="mx")
        targets = 500
        made = run_loadgen({"host": "127.0.0.1", "port": port, "concurrency": 32, "method": "POST",
                            "path": SUBMIT_PATH, "prefix": "mx", "first": 0, "count": targets})
        if made["statuses"] != {201: targets}:
            raise SystemExit(f"first submissions: {made['statuses']} {made['errors']}")
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
        ids = [row[0] for row in conn.execute("SELECT id FROM jobs")]
        conn.close()
        next_machine = targets
        results = {}
        for name, clients, share in (("baseline GET only, 32", 32, 1.0), ("mixed, 32", 32, args.get_share),
                                     (f"mixed, {args.clients}", args.clients, args.get_share)):
            spec = {"host": "127.0.0.1", "port": port, "pid": roller.pid, "concurrency": clients,
                    "get_ids": ids, "get_share": share, "prefix": "mx", "post_first": next_machine,
                    "post_count": args.machines - next_machine, "warmup": args.warmup, "seconds": args.seconds}
            r = run_mixed(spec)
            next_machine += r["posted"]
            results[name] = r
            print(describe(name, r), flush=True)
            if r["exhausted"]:
                problems.append(f"{name}: ran out of machines (use --machines)")
            if r["lost"]:
                problems.append(f"{name}: roller closed {r['lost']} connection(s): {r['errors']}")
            if set(r["GET"]["statuses"]) - {200} or set(r["POST"]["statuses"]) - {201}:
                problems.append(f"{name}: GET {r['GET']['statuses']} POST {r['POST']['statuses']}: {r['errors']}")
            time.sleep(1)
    finally:
        servers.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    base = results["baseline GET only, 32"]["GET"]
    loaded = results[f"mixed, {args.clients}"]["GET"]
    print()
    print(f"GET /api/v1/jobs/<id>   {args.clients} clients with writes: p50 {loaded['p50_ms']:.1f} ms "
          f"p99 {loaded['p99_ms']:.1f} ms   baseline (32, no writes): p50 {base['p50_ms']:.1f} ms "
          f"p99 {base['p99_ms']:.1f} ms")
    others = max(r.get("other_cpu", 0) for r in results.values())
    if others > 0.25:
        print(f"NOTE: other processes used up to {others:.2f} of {os.cpu_count()} CPUs during the windows: "
              "the figures are noisy")
    report(problems)


if __name__ == "__main__":
    main()
