"""
Submission throughput and queue memory of roller, side by side with a bare
Klein app, on this machine.  Manual; not part of CI.  See bench/README.md.

    python bench/submit.py [--seconds N] [--warmup S] [--concurrency C] [--rounds R]
                           [--engines sqlite,postgresql,postgresql-2] [--quick] [--keep]

1. Throughput: roller (this source tree, via twistd, auth none, SQLite in a
   temporary state dir; its machines written to the database first through
   roller's own store) gets C keep-alive connections POSTing the Taskcluster
   form /api/v1/workers/<id>/group/bench/jobs?task_name=ping, each to a
   distinct machine so every request persists a new job (201).  The bare
   Klein app (bench/bare_klein.py) gets the same load.  Requests/s counted
   over N seconds after S seconds of warm-up, R interleaved rounds, the best
   kept; every roller answer must be 201 and the jobs table must hold one
   row per 201.  Server CPU per request (from /proc) is printed too: it
   does not depend on how busy the machine is.
   With the PostgreSQL engines (Debian's postgresql package, a private
   server started here on 127.0.0.1 by roller.testing.postgres, fsync on
   and synchronous_commit off: as durable as SQLite's WAL with
   synchronous=NORMAL), the same load also goes to one roller on
   PostgreSQL (postgresql) and to two rollers sharing one PostgreSQL
   database (postgresql-2: half the connections and half the machines
   each, the two rates added), in the same rounds; the database server's
   own CPU per request is printed beside roller's.
   These rollers run no liveness sweeps (their machines are new: a first
   round over all of them would load the machine while the others are
   measured).  After the rounds, each target's CPU with no load, holding
   its queued jobs, is printed ("idle"): rollers sharing a queue poll it.
2. Memory (liveness sweeps on, as configured by default): a fresh roller's VmRSS idle (10 000 machines POSTed) and holding
   10 000 queued jobs (max_running = 1, ping count 10: one runs, the rest wait).

The load generator is this file run as a separate process (--loadgen): stdlib
asyncio, raw HTTP/1.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from common import (HERE, ROLLER_TWISTD, TWISTD, Procs, bench_ip, child_mode, cpu_seconds, fetch, free_port, machine_busy, percentile,
                    report, roller_env, seed_db, tree_cpu, wait_ready)

ROLLER_CONFIG = """\
# bench/submit.py: one job runs at a time, the others stay queued; jobs are
# pings to 127.0.0.x (loopback only).
[queue]
max_running = 1

[tasks]
allowed = ["ping"]
"""

#: for the throughput runs (the memory run keeps them)
NO_SWEEPS = """
# No liveness sweeps: the machines are new, and a first round over 120 000 of
# them (each probed once and its first health written) would keep each roller
# about 0.1 core busy while the others are measured.
[health]
enabled = false
"""

MACHINE_BODY = '{"worker_id": "{id}", "worker_group": "bench", "ip": "{ip}"}'
SUBMIT_PATH = "/api/v1/workers/{id}/group/bench/jobs?task_name=ping"


# -- /proc


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_sample(pid: int) -> tuple[float, float]:
    """(whole process, main thread) CPU seconds; the main thread is the reactor's."""
    return cpu_seconds(pid), cpu_seconds(pid, pid)


# -- the load generator (runs in its own process)


def parse_response(buf: bytes | bytearray) -> tuple[int, bytes, int, bool] | None:
    """(status, body, bytes consumed, close) of the first complete response in buf, or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked, close = 0, False, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif name == "connection" and value == "close":
            close = True
    pos = end + 4
    if not chunked:
        if len(buf) < pos + length:
            return None
        return status, bytes(buf[pos:pos + length]), pos + length, close
    parts = []
    while True:
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return None
        size = int(bytes(buf[pos:nl]).split(b";")[0], 16)
        pos = nl + 2
        if size == 0:
            while True:  # trailers, up to an empty line
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    return None
                if nl == pos:
                    return status, b"".join(parts), nl + 2, close
                pos = nl + 2
        if len(buf) < pos + size + 2:
            return None
        parts.append(bytes(buf[pos:pos + size]))
        pos += size + 2


class Load:
    """Shared state of one load run: indexes to hand out, the window, the tallies."""

    def __init__(self, spec: dict[str, Any], loop: asyncio.AbstractEventLoop):
        self.spec = spec
        self.loop = loop
        self.next = spec["first"]
        self.end = spec["first"] + spec["count"]
        self.stopping = False
        self.connections = 0
        self.done = loop.create_future()
        self.started = time.monotonic()
        seconds = spec.get("seconds")
        self.window = None if seconds is None else (self.started + spec["warmup"],
                                                    self.started + spec["warmup"] + seconds)
        self.window_end = None
        self.measured = 0
        self.statuses: dict[int, int] = {}
        self.window_statuses: dict[int, int] = {}
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.exhausted = False
        self.reconnects = 0
        self.cpu: dict[str, tuple[float, float]] = {}
        host = f"{spec['host']}:{spec['port']}".encode()
        self.head = b"\r\nHost: " + host + b"\r\nUser-Agent: roller-bench\r\n"
        if self.window is not None:
            loop.call_at(loop.time() + spec["warmup"], self.sample_cpu, "start")
            loop.call_at(loop.time() + spec["warmup"] + seconds, self.stop, "time")

    def sample_cpu(self, which: str) -> None:
        pid = self.spec.get("pid")
        server = cpu_sample(pid) if pid else (0.0, 0.0)
        self.cpu[which] = (*server, time.process_time(), machine_busy())

    def stop(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.window_end = time.monotonic()
        if why == "exhausted":
            self.exhausted = True
        if self.window is not None:
            self.sample_cpu("end")

    def request(self) -> bytes | None:
        if self.stopping:
            return None
        if self.next >= self.end:
            self.stop("exhausted")
            return None
        i = self.next
        self.next += 1
        ident = f"{self.spec['prefix']}{i}"
        path = self.spec["path"].replace("{id}", ident)
        body = self.spec.get("body")
        out = self.spec["method"].encode() + b" " + path.encode() + b" HTTP/1.1" + self.head
        if body is None:
            return out + b"Content-Length: 0\r\n\r\n"
        data = body.replace("{id}", ident).replace("{ip}", bench_ip(i)).encode()
        return (out + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data)) + data

    def record(self, status: int, body: bytes, sent: float) -> None:
        now = time.monotonic()
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status >= 300 and len(self.errors) < 5:
            self.errors.append(f"{status} {body[:200]!r}")
        if self.window is None or (self.window[0] <= now and not (self.stopping and now > self.window_end)):
            self.measured += 1
            self.window_statuses[status] = self.window_statuses.get(status, 0) + 1
            self.latencies.append(now - sent)

    def closed(self) -> None:
        self.connections -= 1
        if self.connections == 0 and not self.done.done():
            self.done.set_result(None)


class Client(asyncio.Protocol):
    def __init__(self, load: Load):
        self.load = load
        self.buf = bytearray()
        self.sent = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send()

    def send(self) -> None:
        req = self.load.request()
        if req is None:
            self.transport.close()
            return
        self.sent = time.monotonic()
        self.transport.write(req)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        parsed = parse_response(self.buf)
        if parsed is None:
            return
        status, body, used, close = parsed
        del self.buf[:used]
        self.load.record(status, body, self.sent)
        if close:
            self.transport.close()
            return
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        load = self.load
        if not load.stopping:
            # The server closed on us: note it and open another connection.
            load.reconnects += 1
            if len(load.errors) < 5:
                load.errors.append(f"connection lost: {exc!r}")
            load.connections += 1
            load.loop.create_task(connect(load))
        load.closed()


async def connect(load: Load) -> None:
    """Open one connection; the caller has counted it in C{load.connections}."""
    try:
        await load.loop.create_connection(lambda: Client(load), load.spec["host"], load.spec["port"])
    except OSError as e:
        load.errors.append(f"connect: {e!r}")
        load.closed()


async def loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    cpu0 = time.process_time()
    load = Load(spec, loop)
    load.connections = spec["concurrency"]
    for _ in range(spec["concurrency"]):
        await connect(load)
    await load.done
    wall = time.monotonic() - load.started
    if load.window is not None:
        seconds = (load.window_end or load.window[1]) - load.window[0]
    else:
        seconds = wall
    lat = sorted(load.latencies)
    out: dict[str, Any] = {
        "measured": load.measured,
        "seconds": seconds,
        "rate": load.measured / seconds if seconds > 0 else 0.0,
        "statuses": load.statuses,
        "window_statuses": load.window_statuses,
        "sent": load.next - spec["first"],
        "exhausted": load.exhausted,
        "reconnects": load.reconnects,
        "errors": load.errors,
        "p50_ms": 1000 * percentile(lat, 0.5) if lat else None,
        "p99_ms": 1000 * percentile(lat, 0.99) if lat else None,
        "client_cpu": (time.process_time() - cpu0) / wall if wall else 0.0,
    }
    if "start" in load.cpu and "end" in load.cpu and seconds > 0:
        (t0, m0, c0, b0), (t1, m1, c1, b1) = load.cpu["start"], load.cpu["end"]
        out["server_cpu"] = (t1 - t0) / seconds
        out["server_main_cpu"] = (m1 - m0) / seconds
        out["client_cpu"] = (c1 - c0) / seconds
        # CPU the rest of the machine used meanwhile (other people's work).
        out["other_cpu"] = max(0.0, (b1 - b0) / seconds - out["server_cpu"] - out["client_cpu"])
    return out


def run_loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the load generator in its own process; its result."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--loadgen", json.dumps(spec)],
        stdout=subprocess.PIPE, check=True,
    )
    result = json.loads(proc.stdout)
    result["statuses"] = {int(k): v for k, v in result["statuses"].items()}
    result["window_statuses"] = {int(k): v for k, v in result["window_statuses"].items()}
    return result


# -- servers


def get_json(port: int, path: str) -> Any:
    return json.loads(fetch(port, path, timeout=10)[1])


def start_roller(servers: Procs, workdir: str, name: str, seed: int = 0, prefix: str = "bt",
                 db_url: str | None = None, sweeps: bool = False) -> tuple[subprocess.Popen, int, str]:
    """
    A roller from the source tree on a fresh state dir; C{seed} machines
    C{prefix}0.. written to its database first, through roller's own store.
    C{db_url}: its database is that PostgreSQL one instead of the state
    dir's SQLite file.
    """
    state = os.path.join(workdir, name)
    os.makedirs(state)
    config = os.path.join(state, "bench.toml")
    with open(config, "w") as f:
        f.write(ROLLER_CONFIG if sweeps else ROLLER_CONFIG + NO_SWEEPS)
    db_path = db_url or os.path.join(state, "roller.db")
    env = roller_env()
    if db_url:
        env["ROLLER_DATABASE_URL"] = db_url
    if seed:
        seed_db(db_path, prefix, seed, env=env, cwd=state)
    port = free_port()
    log_path = os.path.join(state, "roller.log")
    proc = servers.start(
        [*ROLLER_TWISTD, "--auth", "none", "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--state-dir", state, "--config", config],
        log_path, cwd=state, env=env,
    )
    wait_ready(proc, port, "/__lbheartbeat__", log_path)
    return proc, port, db_path


def db_counts(db_path: str) -> dict[str, int]:
    if db_path.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db_path, autocommit=True) as pg:
            return {state: n for state, n in pg.execute("SELECT state, count(*) FROM jobs GROUP BY state")}
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return {state: n for state, n in conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")}
    finally:
        conn.close()


def create_machines(port: int, prefix: str, first: int, count: int, concurrency: int) -> dict[str, Any]:
    result = run_loadgen({
        "host": "127.0.0.1", "port": port, "concurrency": concurrency, "method": "POST",
        "path": "/api/v1/machines", "body": MACHINE_BODY, "prefix": prefix,
        "first": first, "count": count,
    })
    if result["statuses"] != {201: count}:
        raise SystemExit(f"creating machines: expected {count} x 201, got {result['statuses']}; {result['errors']}")
    return result


# -- the measurements


def us_per_request(r: dict[str, Any], key: str = "server_cpu") -> float:
    """Server CPU time per request, in microseconds: what a request costs, however busy the machine."""
    return 1e6 * r[key] / r["rate"] if r["rate"] else float("nan")


def describe(name: str, r: dict[str, Any]) -> str:
    db = f"  database server CPU {r['db_cpu_us']:4.0f} us/req" if r.get("db_cpu_us") is not None else ""
    def ms(v: float | None, width: int) -> str:
        return f"{v:{width}.1f}" if v is not None else f"{'-':>{width}}"

    return (f"  {name:<10} {r['rate']:6.0f} req/s  p50 {ms(r['p50_ms'], 5)} ms  p99 {ms(r['p99_ms'], 6)} ms  "
            f"server CPU {us_per_request(r):4.0f} us/req (reactor thread {us_per_request(r, 'server_main_cpu'):4.0f})"
            f"  cores used: server {r['server_cpu']:.2f}  client {r['client_cpu']:.2f}  others {r['other_cpu']:.2f}"
            + db)


ENGINES = ("sqlite", "postgresql", "postgresql-2")


class Target:
    """One engine's roller (two for postgresql-2), the machines it still has, what it was sent."""

    def __init__(self, name: str, rollers: list[tuple[subprocess.Popen, int]], db_path: str, machines: int):
        self.name, self.rollers, self.db_path, self.machines = name, rollers, db_path, machines
        self.next = 0
        self.sent = self.created = 0
        self.before = db_counts(db_path)
        self.db_pid: int | None = None  # the PostgreSQL server's postmaster
        self.idle = (0.0, 0.0)  # cores used by the rollers and the database server under no load


def db_server_cpu(pid: int) -> float:
    """
    CPU seconds of a server process C{pid} (a PostgreSQL postmaster): its own, its reaped
    children's, and its live children's (the backends serving roller's connections).
    """
    total = tree_cpu(pid)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _parent(int(entry)) == pid:
            total += cpu_seconds(int(entry))
    return total


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def postmaster_pid(data_dir: str) -> int:
    with open(os.path.join(data_dir, "postmaster.pid")) as f:
        return int(f.readline())


def run_target(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """The round's load on C{target}: split over its rollers, run at once, the figures added up."""
    n = len(target.rollers)
    share = target.machines // args.rounds // n  # machines of this round, each roller its own range
    specs = []
    for i, (proc, port) in enumerate(target.rollers):
        specs.append({"host": "127.0.0.1", "concurrency": args.concurrency // n, "method": "POST",
                      "path": SUBMIT_PATH, "prefix": "bt", "warmup": args.warmup, "seconds": args.seconds,
                      "port": port, "pid": proc.pid, "first": target.next + i * share, "count": share})
    db_cpu0 = db_server_cpu(target.db_pid) if target.db_pid else 0.0
    results: list[dict[str, Any]] = [{} for _ in specs]
    threads = [threading.Thread(target=lambda i=i: results[i].update(run_loadgen(specs[i]))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    db_cpu = (db_server_cpu(target.db_pid) - db_cpu0) if target.db_pid else 0.0
    target.next += n * share  # the next round's ranges start after this round's
    if n == 1:
        r = results[0]
    else:  # one figure for the pair: rates and CPU added; latencies the worse of the two
        r = dict(results[0])
        for key in ("rate", "sent", "server_cpu", "server_main_cpu", "client_cpu", "reconnects"):
            r[key] = sum(x[key] for x in results)
        for key in ("p50_ms", "p99_ms"):
            values = [x[key] for x in results if x[key] is not None]
            r[key] = max(values) if values else None
        r["exhausted"] = any(x["exhausted"] for x in results)
        r["errors"] = [e for x in results for e in x["errors"]][:5]
        r["statuses"] = {}
        for x in results:
            for k, v in x["statuses"].items():
                r["statuses"][k] = r["statuses"].get(k, 0) + v
        # each one's "others" included the other roller and its client
        r["other_cpu"] = max(0.0, min(results[0]["other_cpu"] - results[1]["server_cpu"] - results[1]["client_cpu"],
                                      results[1]["other_cpu"] - results[0]["server_cpu"] - results[0]["client_cpu"]))
    total = sum(r["statuses"].values())
    r["db_cpu_us"] = 1e6 * db_cpu / total if total and target.db_pid else None
    target.sent += r["sent"]
    target.created += r["statuses"].get(201, 0)
    return r


def start_targets(servers: Procs, workdir: str, engines: list[str], machines: int, pg: Any) -> list[Target]:
    targets = []
    for engine in engines:
        t = time.monotonic()
        if engine == "sqlite":
            proc, port, db_path = start_roller(servers, workdir, "throughput", seed=machines, prefix="bt")
            target = Target("roller", [(proc, port)], db_path, machines)
        else:
            url = pg.create_database()
            first, port, _ = start_roller(servers, workdir, engine, seed=machines, prefix="bt", db_url=url)
            rollers = [(first, port)]
            if engine == "postgresql-2":
                proc, port, _ = start_roller(servers, workdir, engine + "-b", db_url=url)
                rollers.append((proc, port))
            target = Target("roller-pg" if engine == "postgresql" else "roller-pg2", rollers, url, machines)
            target.db_pid = postmaster_pid(pg.data)
        print(f"  {engine}: {machines} machines written to roller's database and {len(target.rollers)} "
              f"roller(s) started in {time.monotonic() - t:.1f} s", flush=True)
        targets.append(target)
    return targets


IDLE_SECONDS = 10.0


def idle_cost(target: Target, seconds: float) -> tuple[float, float]:
    """Cores used by C{target}'s rollers and by its database server over C{seconds} of no load."""
    def sample() -> tuple[float, float]:
        return (sum(cpu_seconds(proc.pid) for proc, _ in target.rollers),
                db_server_cpu(target.db_pid) if target.db_pid else 0.0)

    before = sample()
    time.sleep(seconds)
    after = sample()
    return (after[0] - before[0]) / seconds, (after[1] - before[1]) / seconds


def bench_throughput(servers: Procs, workdir: str, args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of bare klein and each engine's roller(s), in turn, same load; every figure kept."""
    port = free_port()
    log_path = os.path.join(workdir, "bare_klein.log")
    bare = servers.start([sys.executable, os.path.join(HERE, "bare_klein.py"), "--port", str(port)],
                         log_path, cwd=workdir)
    wait_ready(bare, port, "/", log_path)
    machines = args.machines or args.rounds * (8_000 if args.quick else 40_000)
    pg = None
    if any(e.startswith("postgresql") for e in args.engines):
        sys.path.insert(0, os.path.dirname(HERE))
        from roller.testing.postgres import PostgresServer

        pg = PostgresServer.start(durable=True)
    targets = start_targets(servers, workdir, args.engines, machines, pg)
    out: dict[str, Any] = {"bare": [], "machines": machines, "targets": targets}
    for target in targets:
        out[target.name] = []
    try:
        names = ["bare", *[t.name for t in targets]]
        for n in range(args.rounds):
            order = names[n % len(names):] + names[:n % len(names)]
            for which in order:
                if which == "bare":
                    spec = {"host": "127.0.0.1", "concurrency": args.concurrency, "method": "POST",
                            "path": SUBMIT_PATH, "prefix": "bt", "warmup": args.warmup, "seconds": args.seconds,
                            "port": port, "pid": bare.pid, "first": 0, "count": 10**9}
                    r = run_loadgen(spec)
                else:
                    r = run_target(next(t for t in targets if t.name == which), args)
                print(describe(which, r), flush=True)
                out[which].append(r)
        out["bare_rss_mb"] = rss_mb(bare.pid)
        for target in targets:
            after = db_counts(target.db_path)
            target.db_jobs = sum(after.values()) - sum(target.before.values())
            target.db_states = after
            target.queue = get_json(target.rollers[0][1], "/__heartbeat__").get("queue")
        first = targets[0]
        out["sent"], out["created"], out["db_jobs"] = first.sent, first.created, first.db_jobs
        out["db_states"], out["queue"] = first.db_states, first.queue
        for target in targets:  # what each costs doing nothing but holding its queued jobs
            target.idle = idle_cost(target, IDLE_SECONDS / 5 if args.quick else IDLE_SECONDS)
    finally:
        for target in targets:
            for proc, _ in target.rollers:
                servers.stop(proc)
        servers.stop(bare)
        if pg is not None:
            pg.stop()
    return out


def bench_memory(servers: Procs, workdir: str, args: argparse.Namespace) -> dict[str, Any]:
    jobs = args.jobs
    settle = 0.3 if args.quick else 1.0
    proc, port, db_path = start_roller(servers, workdir, "memory", sweeps=True)
    try:
        out: dict[str, Any] = {"jobs": jobs, "start_mb": rss_mb(proc.pid)}
        made = create_machines(port, "bm", 0, jobs, args.concurrency)
        out["machine_rate"] = made["rate"]
        time.sleep(settle)
        out["idle_mb"] = rss_mb(proc.pid)
        result = run_loadgen({
            "host": "127.0.0.1", "port": port, "concurrency": args.concurrency, "method": "POST",
            "path": SUBMIT_PATH, "body": '{"params": {"count": 10}}', "prefix": "bm", "first": 0, "count": jobs,
        })
        if result["statuses"] != {201: jobs}:
            raise SystemExit(f"memory: expected {jobs} x 201, got {result['statuses']}: {result['errors']}")
        time.sleep(settle)
        out["loaded_mb"] = rss_mb(proc.pid)
        out["queue"] = get_json(port, "/__heartbeat__").get("queue")
        out["db_states"] = db_counts(db_path)
        out["submit_rate"] = result["rate"]
    finally:
        servers.stop(proc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per server and round (10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before measuring (1)")
    parser.add_argument("--concurrency", "-c", type=int, default=32, help="keep-alive connections (32)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds of bare+roller; best kept (3, quick 1)")
    parser.add_argument("--jobs", type=int, default=10_000, help="queued jobs for the memory figure (10000)")
    parser.add_argument("--machines", type=int, default=0, help="machines for the throughput runs (40000/round)")
    parser.add_argument("--quick", action="store_true", help="smoke run, about 10 s: 1.5 s windows, 1000 jobs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="roller's databases to measure, in the same rounds (sqlite,postgresql,postgresql-2)")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if child_mode(args.loadgen, lambda spec: asyncio.run(loadgen(spec))):
        return
    if args.quick:
        args.seconds, args.warmup = min(args.seconds, 1.5), min(args.warmup, 0.5)
        args.jobs = min(args.jobs, 1000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - set(ENGINES)
    if unknown or "sqlite" not in args.engines:
        raise SystemExit(f"--engines: sqlite and any of {', '.join(ENGINES[1:])} (not {', '.join(sorted(unknown))})")
    args.engines.sort(key=ENGINES.index)

    workdir = tempfile.mkdtemp(prefix="roller-bench-")
    servers = Procs()
    print(f"roller bench: {os.cpu_count()} CPUs, C={args.concurrency}, {args.rounds} round(s) of "
          f"{args.warmup:g} s warm-up + {args.seconds:g} s per server; work dir {workdir}", flush=True)
    try:
        thr = bench_throughput(servers, workdir, args)
        print(f"  roller: {thr['sent']} job POSTs, {thr['created']} answered 201; {thr['db_jobs']} new rows in "
              f"jobs {thr['db_states']}; queue {thr['queue']}", flush=True)
        memory = bench_memory(servers, workdir, args)
        print(f"  memory: start {memory['start_mb']:.1f} MB; {memory['jobs']} machines POSTed "
              f"({memory['machine_rate']:.0f}/s) {memory['idle_mb']:.1f} MB; {memory['jobs']} jobs POSTed "
              f"({memory['submit_rate']:.0f}/s) {memory['loaded_mb']:.1f} MB; queue {memory['queue']}",
              flush=True)
    finally:
        servers.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    problems = []
    for target in thr["targets"][1:]:
        states: dict[int, int] = {}
        for r in thr[target.name]:
            for k, v in r["statuses"].items():
                states[k] = states.get(k, 0) + v
            if r["exhausted"]:
                problems.append(f"{target.name}: ran out of machines (use --machines)")
        if set(states) != {201}:
            problems.append(f"{target.name} answered {states}, not only 201: {thr[target.name][-1]['errors']}")
        if target.db_jobs != target.created:
            problems.append(f"{target.name}: {target.created} x 201 but {target.db_jobs} new rows in jobs")
    statuses: dict[int, int] = {}
    for r in thr["roller"]:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        if r["exhausted"]:
            problems.append(f"ran out of machines after {thr['sent']} jobs: a window was cut short "
                            "(use --machines)")
        if r["reconnects"]:
            problems.append(f"roller dropped {r['reconnects']} connection(s): {r['errors']}")
    if set(statuses) != {201}:
        problems.append(f"roller answered {statuses}, not only 201: {thr['roller'][-1]['errors']}")
    if thr["db_jobs"] != thr["created"]:
        problems.append(f"{thr['created']} x 201 but {thr['db_jobs']} new rows in jobs")
    states = memory["db_states"]
    if sum(states.values()) != memory["jobs"] or set(states) - {"queued", "running", "succeeded"}:
        problems.append(f"memory run: jobs table {states}, expected {memory['jobs']} jobs queued (a few done)")

    best_roller = max(thr["roller"], key=lambda r: r["rate"])
    best_bare = max(thr["bare"], key=lambda r: r["rate"])
    ratio = best_roller["rate"] / best_bare["rate"]
    cpu_roller = min(us_per_request(r) for r in thr["roller"])
    cpu_bare = min(us_per_request(r) for r in thr["bare"])
    grow = memory["loaded_mb"] - memory["idle_mb"]
    scale = 10_000 / memory["jobs"]
    print()
    rounds = "" if args.rounds == 1 else f" (best of {args.rounds})"
    print(f"submit throughput   roller {best_roller['rate']:.0f} req/s   bare klein {best_bare['rate']:.0f} req/s   "
          f"ratio {ratio:.2f}x (target >= 0.5x){rounds}")
    print(f"CPU per request     roller {cpu_roller:.0f} us   bare klein {cpu_bare:.0f} us   "
          f"ratio {cpu_bare / cpu_roller:.2f}x")
    for target in thr["targets"][1:]:
        best = max(thr[target.name], key=lambda r: r["rate"])
        label = {"roller-pg": "one roller on PostgreSQL", "roller-pg2": "two rollers on one PostgreSQL"}[target.name]
        print(f"{label:<31} {best['rate']:.0f} req/s ({best['rate'] / best_roller['rate']:.2f}x roller on SQLite, "
              f"{best['rate'] / best_bare['rate']:.2f}x bare klein), p99 {best['p99_ms'] or 0:.1f} ms; CPU per request: "
              f"roller(s) {min(us_per_request(r) for r in thr[target.name]):.0f} us, database server "
              f"{min(r['db_cpu_us'] for r in thr[target.name]):.0f} us")
    for target in thr["targets"]:
        queued = sum(v for k, v in target.db_states.items() if k == "queued")
        label = {"roller": "roller on SQLite", "roller-pg": "one roller on PostgreSQL",
                 "roller-pg2": "two rollers on one PostgreSQL"}[target.name]
        db = f", database server {target.idle[1]:.3f}" if target.db_pid else ""
        print(f"idle, {queued} jobs queued: {label:<31} {target.idle[0]:.3f} cores (roller(s)){db}")
    line = (f"memory              idle {memory['idle_mb']:.1f} MB   {memory['jobs']} queued "
            f"{memory['loaded_mb']:.1f} MB   +{grow:.1f} MB")
    if scale != 1:
        line += f" (~{grow * scale:.0f} MB per 10000)"
    print(line + " (target < 60 MB for 10000)")
    others = max(r["other_cpu"] for r in thr["roller"] + thr["bare"])
    if others > 0.25:
        print(f"NOTE: other processes used up to {others:.2f} of {os.cpu_count()} CPUs during the windows: "
              "the figures are noisy (more --rounds, or a quiet machine)")
    report(problems)


if __name__ == "__main__":
    main()
