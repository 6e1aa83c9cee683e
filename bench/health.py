"""
Fleet health at fleet size, side by side in one run:

  1. liveness sweeps: a real `twistd roller` with N machines (loopback
     addresses 127.0.x.y, ICMP) and health.sweep_interval = INTERVAL, against
     the same roller with health.enabled = false (the baseline): roller's CPU
     (% of one core) over MEASURE seconds, the duration of every sweep round
     (each must end within its interval), and GET /api/v1/jobs/<id> p50/p99
     (20 requests a second on one keep-alive connection) in both;
  2. Taskcluster fitness: one poll of N workers in 20 pools (10 resolved runs
     each) against the loopback fake of worker-manager and the queue, cold
     (every recent-task list and run fetched) and warm (nothing changed: the
     caches answer), beside the bare listing of the same pools.

    python bench/health.py [--machines 5000] [--interval 60] [--measure 90]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any

from common import (
    REPO,
    ROLLER_TWISTD,
    Procs,
    cpu_seconds,
    free_port,
    percentile,
    report,
    roller_env,
    seed_db,
    wait_ready,
)


def measure_gets(port: int, job_id: str, seconds: float, rate: float = 20.0) -> list[float]:
    """GET the job C{rate} times a second for C{seconds} on one keep-alive connection; latencies in ms."""
    out: list[float] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        conn.request("GET", f"/api/v1/jobs/{job_id}")
        r = conn.getresponse()
        r.read()
        out.append((time.perf_counter() - t0) * 1000)
        time.sleep(max(0.0, 1 / rate - (time.perf_counter() - t0)))
    conn.close()
    return out


def run_roller(tmp: str, name: str, machines: int, health: bool, interval: float, measure: float,
               procs: Procs) -> dict[str, Any]:
    state = os.path.join(tmp, name)
    os.makedirs(state)
    db = os.path.join(state, "roller.db")
    seed_db(db, "m", machines, env=roller_env(), cwd=REPO)
    port = free_port()
    config = os.path.join(state, "roller.toml")
    with open(config, "w") as f:
        f.write(f'state_dir = "{state}"\n[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
                f'[auth]\nmode = "none"\n[health]\nenabled = {"true" if health else "false"}\n'
                f"sweep_interval = {interval}\nsweep_concurrency = 100\nprobe_timeout = 2.0\n")
    env = {**roller_env(), "ROLLER_CONFIG": config}
    log = os.path.join(state, "roller.log")
    proc = procs.start(ROLLER_TWISTD, log, env=env, cwd=REPO)
    try:
        wait_ready(proc, port, "/__lbheartbeat__", log, timeout=60)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/api/v1/workers/m0/group/bench/jobs?task_name=ping")
        job_id = json.loads(conn.getresponse().read())["task_id"]
        conn.close()
        time.sleep(min(interval, 10))  # start-up and the first ticks out of the way
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        latencies = measure_gets(port, job_id, measure)
        cpu = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0) * 100
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/v1/health")
        status = json.loads(conn.getresponse().read())
        conn.close()
        return {"cpu": cpu, "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                "gets": len(latencies), "sweep": status.get("sweep")}
    finally:
        procs.stop(proc)


def tc_poll(spec: dict[str, Any]) -> dict[str, Any]:
    """In a child process: the fake, the poller, one cold and one warm poll, and the bare listing."""
    sys.path.insert(0, REPO)
    from twisted.internet import defer, task

    from roller.health.fitness import FitnessPoller, FitnessRules
    from roller.http_client import pooled_client
    from roller.taskcluster.http import TaskclusterHttp
    from roller.taskcluster.workers import list_workers, pending_tasks
    from roller.testing.tc_workers import FakeTaskclusterWorkers

    out: dict[str, Any] = {}

    async def main(reactor: Any) -> None:
        fake = FakeTaskclusterWorkers({"bench": "bench-token-0123456789"}, page_size=1000)
        port = fake.listen(reactor)
        pools = [f"bench/pool-{p:02d}" for p in range(20)]
        keys: dict[str, list[tuple[str, str]]] = {p: [] for p in pools}
        now = time.time()
        for i in range(spec["workers"]):
            pool = pools[i % 20]
            fake.add_worker(pool, "mdc1", f"w{i:05d}", last_active=now)
            fake.add_runs(pool, "mdc1", f"w{i:05d}", ["completed"] * 9 + ["failed"])
            keys[pool].append(("mdc1", f"w{i:05d}"))
        http_client, _ = pooled_client(reactor, max_per_host=16)
        tc = TaskclusterHttp(reactor, http_client, fake.url, "bench", "bench-token-0123456789", timeout=120)
        poller = FitnessPoller(tc, FitnessRules(), concurrency=16)
        for label in ("cold", "warm"):
            t0, before = time.perf_counter(), sum(fake.requests.values())
            for pool in pools:
                prov, wt = pool.split("/")
                await poller.poll(prov, wt, keys[pool], now)
            out[label] = {"seconds": time.perf_counter() - t0, "requests": sum(fake.requests.values()) - before}
        t0 = time.perf_counter()
        for pool in pools:
            prov, wt = pool.split("/")
            await list_workers(tc, prov, wt)
            await pending_tasks(tc, pool)
        out["bare"] = {"seconds": time.perf_counter() - t0, "requests": 40}
        await port.stopListening()
        json.dump(out, sys.stdout)  # task.react exits the process when main ends
        sys.stdout.flush()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--machines", type=int, default=5000)
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--measure", type=float, default=90.0)
    parser.add_argument("--tc-only", action="store_true")
    parser.add_argument("--tc-poll", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tc_poll:
        tc_poll(json.loads(args.tc_poll))
        return
    problems: list[str] = []
    procs = Procs()
    try:
        if not args.tc_only:
            with tempfile.TemporaryDirectory(prefix="roller-bench-health-") as tmp:
                idle = run_roller(tmp, "idle", args.machines, False, args.interval, args.measure, procs)
                swept = run_roller(tmp, "sweeps", args.machines, True, args.interval, args.measure, procs)
            print(f"{args.machines} machines, sweep_interval {args.interval:g} s, measured {args.measure:g} s each")
            print(f"  roller CPU: {swept['cpu']:.1f}% of a core with sweeps, {idle['cpu']:.1f}% idle "
                  f"(sweeps add {swept['cpu'] - idle['cpu']:.1f}%)")
            print(f"  GET /api/v1/jobs/<id>: p50 {swept['p50']:.1f} ms, p99 {swept['p99']:.1f} ms with sweeps; "
                  f"p50 {idle['p50']:.1f} ms, p99 {idle['p99']:.1f} ms idle ({swept['gets']} and {idle['gets']} GETs)")
            sweep = swept["sweep"] or {}
            rounds = [r for r in sweep.get("recent", []) if r["duration"] is not None]
            print(f"  probe: {sweep.get('probe')}; rounds: " + ", ".join(
                f"#{r['round']} {r['probed']}/{r['machines']} in {r['duration']:.1f} s (late {r['late']})"
                for r in rounds))
            if not rounds:
                problems.append("no sweep round completed")
            for r in rounds:
                if r["duration"] > args.interval or r["late"]:
                    problems.append(f"round {r['round']} took {r['duration']:.1f} s (late {r['late']})")
            if swept["cpu"] - idle["cpu"] > 10:
                problems.append(f"sweeps cost {swept['cpu'] - idle['cpu']:.1f}% of a core (goal < 10%)")
            if swept["p99"] > 100:
                problems.append(f"GET p99 {swept['p99']:.1f} ms during sweeps (goal < 100 ms)")
        import subprocess

        spec = json.dumps({"workers": args.machines})
        raw = subprocess.run([sys.executable, os.path.abspath(__file__), "--tc-poll", spec], check=True,
                             capture_output=True, text=True, env=roller_env(), cwd=REPO).stdout
        tc = json.loads(raw)
        print(f"Taskcluster fitness, {args.machines} workers in 20 pools (10 runs each): "
              f"cold poll {tc['cold']['seconds']:.1f} s ({tc['cold']['requests']} requests), "
              f"warm poll {tc['warm']['seconds']:.2f} s ({tc['warm']['requests']} requests); "
              f"bare listing of the same pools {tc['bare']['seconds']:.2f} s ({tc['bare']['requests']} requests)")
    finally:
        procs.stop_all()
    report(problems)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
