"""
A long history: roller on a database holding 1 000 000 finished jobs with
their events, side by side with the same roller on a database without
history (the same machines), measured in the same run.  Manual; not part
of CI.  See bench/README.md.

    python bench/history.py [--jobs N] [--events N] [--machines N] [--requests N] [--lookups N] [--quick] [--keep]

Both databases are made by roller (`roller jobs` creates and migrates
one), get the same machines through roller's own store (common.seed_db)
and two dashboard accounts (a viewer, and an admin, who sees a machine
page's audit log); the full one then gets N finished `ping` jobs with E
events each (queued, running, log lines, the end) and the audit entry of
each one's request, and a returned loan every 1000 jobs, written straight
into the file with executemany in this process: 90% of them ended 100 to
465 days ago, the rest in the last 10 days.  Then, for each database:

- start-up: `twistd roller` started 3 times, until `/__lbheartbeat__`
  answers (the median is reported);
- `GET /api/v1/jobs?limit=50` and the fleet page (`GET /`, signed in, 200
  machines): sequential keep-alive requests, p50 and p99.  The fleet page
  caches its queries until the next commit, so this process commits to the
  database (the heartbeat row) before each fleet request: every one is
  computed afresh, the worst case;
- the history's lookups (goal: p50 under 5 ms and p99 under 20 ms on the
  full database), sequential keep-alive requests, p50 and p99, each over
  the machines in turn: the machine page (as the admin), the audit log of a
  machine and of a target with no entries, jobs by task (one with no jobs,
  and `ping`), by state (`failed`, and `running`: none), by worker, the
  `/jobs` page of a task with no jobs, loans (newest, active);
- job submissions: one new `ping` job per machine through the API (16
  connections; one runs at a time): rate, p50/p99 and roller's CPU per
  submission (goal: within 1.2x of the empty database's);
- pruning: `roller db prune --json` with the default history.* settings
  (roller stopped): the 90% older than history.keep_days go, with their
  events; its time, transactions and longest write-lock hold;
- the file size before and after.

127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from common import ROLLER_TWISTD, Procs, cpu_seconds, free_port, percentile, report, roller_env, seed_db, wait_ready
from submit import SUBMIT_PATH, run_loadgen
from dashboard import BENCH_PASSWORD, BENCH_USER, sign_in

#: the account that sees a machine page's audit log
ADMIN_USER = "bench-admin"

DAY = 86400.0
ROLLER_CONFIG = """\
# bench/history.py: every job in the database is finished; of the jobs the
# submission run adds, one runs at a time (pings to 127.0.0.x).
[queue]
max_running = 1
[tasks]
allowed = ["ping"]
[health]
enabled = false
[history]
prune_interval = 0
"""


def make_db(state: str, config: str, machines: int) -> str:
    os.makedirs(state)
    env = roller_env()
    db = os.path.join(state, "roller.db")
    seed_db(db, "bh", machines, env=env, cwd=state)
    for user, role in ((BENCH_USER, "viewer"), (ADMIN_USER, "admin")):
        subprocess.run([sys.executable, "-m", "roller.cli", "--state-dir", state, "--config", config, "user", "add",
                        user, "--role", role, "--password-stdin"], input=BENCH_PASSWORD + "\n", text=True,
                       env=env, cwd=state, check=True, stdout=subprocess.DEVNULL)
    return db


def seed_history(db: str, jobs: int, events: int, machines: int) -> None:
    """
    C{jobs} finished pings with C{events} events each, the audit entry of
    each one's request, and a returned loan every 1000 jobs, by executemany
    in one transaction per 50 000 jobs.
    """
    now = time.time()
    old = int(jobs * 0.9)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    chunk = 50_000
    for start in range(0, jobs, chunk):
        job_rows, event_rows, audit_rows, loan_rows = [], [], [], []
        for n in range(start, min(jobs, start + chunk)):
            if n < old:  # spread over 100 .. 465 days ago, oldest first
                end = now - (465 - 365 * n / old) * DAY
            else:
                end = now - (10 - 10 * (n - old) / (jobs - old)) * DAY
            jid = f"{n:08x}-0000-7000-8000-{n:012x}"
            failed = n % 10 == 0
            worker = f"bh{n % machines}"
            job_rows.append((jid, "ping", "bench", worker, '{"count": 3}', "bench", "127.0.0.1", "",
                             50, "failed" if failed else "succeeded", end - 3, end - 2.9, end,
                             None if failed else "3/3 replies, rtt 0.05 ms",
                             f"no reply from {worker} (3 pings)" if failed else None))
            event_rows.append((jid, end - 3, "state", "queued", '{"state": "queued"}'))
            audit_rows.append((end - 3, "bench", "127.0.0.1", "job.create:ping", f"bench/{worker}",
                               f"queued {jid}"))
            if n % 1000 == 999:
                loan_rows.append(("bench", worker, "bench", "a bench loan", end - 3, end + DAY, end + 3600))
            if events > 1:
                event_rows.append((jid, end - 2.9, "state", "running", '{"state": "running"}'))
            for i in range(max(0, events - 3)):
                event_rows.append((jid, end - 2 + i * 0.01, "log",
                                   f"64 bytes from 127.0.0.1: icmp_seq={i + 1} ttl=64 time=0.05 ms", None))
            if events > 2:
                event_rows.append((jid, end, "state", "failed: no reply" if failed else "succeeded: 3/3 replies",
                                   '{"state": "failed"}' if failed else '{"state": "succeeded"}'))
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO jobs (id, task_name, worker_group, worker_id, params, requester, origin_ip,"
                         " reason, priority, state, created_at, started_at, finished_at, result, error)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", job_rows)
        conn.executemany("INSERT INTO job_events (job_id, time, kind, message, data) VALUES (?, ?, ?, ?, ?)",
                         event_rows)
        conn.executemany("INSERT INTO audit (time, actor, source_ip, action, target, result) VALUES (?, ?, ?, ?, ?, ?)",
                         audit_rows)
        conn.executemany("INSERT INTO loans (worker_group, worker_id, borrower, reason, started_at, expires_at,"
                         " returned_at) VALUES (?, ?, ?, ?, ?, ?, ?)", loan_rows)
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def file_size(db: str) -> int:
    return sum(os.path.getsize(db + s) for s in ("", "-wal") if os.path.exists(db + s))


def start(servers: Procs, state: str, config: str) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    log_path = os.path.join(state, "roller.log")
    t0 = time.perf_counter()
    proc = servers.start([*ROLLER_TWISTD, "--auth", "none", "--listen", f"tcp:{port}:interface=127.0.0.1",
                          "--state-dir", state, "--config", config], log_path, cwd=state, env=roller_env())
    wait_ready(proc, port, "/__lbheartbeat__", log_path, timeout=300)
    return proc, port, time.perf_counter() - t0


def timed_gets(port: int, path: str | Callable[[int], str], n: int, cookie: str = "",
               before: Any = None) -> dict[str, Any]:
    """C{n} sequential GETs of C{path} (or of C{path(i)} for the i-th): p50 and p99 in ms, statuses, size."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    lat: list[float] = []
    statuses: dict[int, int] = {}
    size = 0
    try:
        for i in range(n):
            if before is not None:
                before()
            t0 = time.perf_counter()
            conn.request("GET", path(i) if callable(path) else path, headers={"Cookie": cookie} if cookie else {})
            r = conn.getresponse()
            body = r.read()
            lat.append(time.perf_counter() - t0)
            statuses[r.status] = statuses.get(r.status, 0) + 1
            size = len(body)
    finally:
        conn.close()
    return {"p50": statistics.median(lat) * 1000, "p99": percentile(lat, 0.99) * 1000, "statuses": statuses,
            "size": size}


def lookups(machines: int) -> dict[str, tuple[Callable[[int], str], bool]]:
    """The history's lookups: label -> (the path of the i-th request, whether it needs the admin's session)."""
    return {
        "machine page": (lambda i: f"/machines/bench/bh{i * 7 % machines}", True),
        "audit by target": (lambda i: f"/api/v1/audit?target=bench/bh{i * 7 % machines}&limit=50", False),
        "audit, target with none": (lambda i: "/api/v1/audit?target=nobody&limit=50", False),
        "jobs by task, none": (lambda i: "/api/v1/jobs?task_name=nope&limit=50", False),
        "jobs by task": (lambda i: "/api/v1/jobs?task_name=ping&limit=50", False),
        "jobs by state": (lambda i: "/api/v1/jobs?state=failed&limit=50", False),
        "jobs by state, none": (lambda i: "/api/v1/jobs?state=running&limit=50", False),
        "jobs by worker": (lambda i: f"/api/v1/jobs?worker_id=bh{i * 7 % machines}&limit=50", False),
        "/jobs page, task with none": (lambda i: "/jobs?task=nope", True),
        "loans": (lambda i: "/api/v1/loans?limit=100", False),
        "loans, active": (lambda i: "/api/v1/loans?active=true", False),
    }


def submissions(pid: int, port: int, machines: int) -> dict[str, Any]:
    """One new job per machine through the API, 16 connections: rate, p50/p99, roller CPU per submission."""
    cpu0 = cpu_seconds(pid)
    r = run_loadgen({"host": "127.0.0.1", "port": port, "concurrency": 16, "method": "POST", "path": SUBMIT_PATH,
                     "prefix": "bh", "first": 0, "count": machines})
    cpu = cpu_seconds(pid) - cpu0
    return {"rate": r["rate"], "p50": r["p50_ms"] or 0.0, "p99": r["p99_ms"] or 0.0,
            "cpu_us": 1e6 * cpu / machines, "statuses": r["statuses"]}


def measure(name: str, state: str, config: str, db: str, requests: int, servers: Procs, n_lookups: int,
            machines: int) -> dict[str, Any]:
    out: dict[str, Any] = {"size_before": file_size(db)}
    starts = []
    for _ in range(3):
        proc, port, took = start(servers, state, config)
        starts.append(took)
        servers.stop(proc)
    out["start"] = statistics.median(starts)
    print(f"  {name}: start-up {', '.join(f'{s:.2f}' for s in starts)} s", flush=True)
    proc, port, _ = start(servers, state, config)
    try:
        cookie = sign_in(port)
        timed_gets(port, "/api/v1/jobs?limit=50", 10)  # warm up
        out["jobs"] = timed_gets(port, "/api/v1/jobs?limit=50", requests)
        commits = sqlite3.connect(db, isolation_level=None, timeout=30)

        def commit() -> None:  # the fleet page's cache lasts until the next commit: make every request compute
            commits.execute("UPDATE heartbeat SET at = ?", (time.time(),))

        timed_gets(port, "/", 5, cookie, commit)
        out["fleet"] = timed_gets(port, "/", max(20, requests // 5), cookie, commit)
        commits.close()
        print(f"  {name}: GET /api/v1/jobs?limit=50 p50 {out['jobs']['p50']:.1f} ms p99 {out['jobs']['p99']:.1f} ms;"
              f" fleet page p50 {out['fleet']['p50']:.1f} ms p99 {out['fleet']['p99']:.1f} ms", flush=True)
        admin = sign_in(port, ADMIN_USER)
        out["lookups"] = {}
        for label, (path, as_admin) in lookups(machines).items():
            timed_gets(port, path, 3, admin)  # warm up
            out["lookups"][label] = r = timed_gets(port, path, n_lookups, admin if as_admin else "")
            print(f"  {name}: {label} p50 {r['p50']:.1f} ms p99 {r['p99']:.1f} ms", flush=True)
        out["submit"] = submissions(proc.pid, port, machines)
        r = out["submit"]
        print(f"  {name}: {machines} job submissions {r['rate']:.0f}/s p50 {r['p50']:.1f} ms p99 {r['p99']:.1f} ms,"
              f" roller CPU {r['cpu_us']:.0f} us each", flush=True)
    finally:
        servers.stop(proc)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "roller.cli", "--state-dir", state, "--config", config, "db", "prune",
                        "--json"], env=roller_env(), cwd=state, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"roller db prune on {name}: {r.returncode} {r.stderr}")
    out["prune"] = json.loads(r.stdout)
    out["prune"]["wall"] = wall
    out["size_after"] = file_size(db)
    p = out["prune"]
    print(f"  {name}: pruned {p['counts']['jobs']:,} jobs and {p['counts']['job_events']:,} events in "
          f"{p['seconds']:.1f} s ({wall:.1f} s with the command's start), {p['transactions']:,} transactions, "
          f"longest hold {p['max_hold_ms']:.1f} ms ({p.get('max_hold_in') or '-'}; "
          f"{p.get('holds_over_50ms', 0)} of 50 ms or more); file {out['size_before'] / 1e6:.1f} -> "
          f"{out['size_after'] / 1e6:.1f} MB", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000, help="finished jobs in the full database (1 000 000)")
    parser.add_argument("--events", type=int, default=5, help="events per job: queued, running, log lines, end (5)")
    parser.add_argument("--machines", type=int, default=1000, help="machines in both databases (1000)")
    parser.add_argument("--requests", type=int, default=300, help="sequential GETs of /api/v1/jobs?limit=50 (300)")
    parser.add_argument("--lookups", type=int, default=200, help="sequential GETs of each history lookup (200)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 20 000 jobs, 200 machines, 50 requests, 30 of each lookup")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.machines, args.requests = min(args.jobs, 20_000), min(args.machines, 200), 50
        args.lookups = min(args.lookups, 30)

    workdir = tempfile.mkdtemp(prefix="roller-bench-history-")
    config = os.path.join(workdir, "bench.toml")
    with open(config, "w") as f:
        f.write(ROLLER_CONFIG)
    servers = Procs()
    problems: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    print(f"roller history bench: {os.cpu_count()} CPUs, {args.jobs:,} jobs x {args.events} events, "
          f"{args.machines} machines; work dir {workdir}", flush=True)
    try:
        dbs = {}
        for name in ("empty", "full"):
            dbs[name] = make_db(os.path.join(workdir, name), config, args.machines)
        t0 = time.perf_counter()
        seed_history(dbs["full"], args.jobs, args.events, args.machines)
        print(f"  full: {args.jobs:,} jobs and {args.jobs * args.events:,} events written in "
              f"{time.perf_counter() - t0:.0f} s ({file_size(dbs['full']) / 1e6:.0f} MB)", flush=True)
        for name in ("empty", "full"):
            results[name] = measure(name, os.path.join(workdir, name), config, dbs[name], args.requests, servers,
                                    args.lookups, args.machines)
    finally:
        servers.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    e, f = results["empty"], results["full"]
    print()
    print(f"{'':<36} {'full (' + format(args.jobs, ',') + ' jobs)':>22} {'empty':>14}   ratio")
    rows = [
        ("start-up, median of 3 (s)", f["start"], e["start"], "{:.2f}"),
        ("GET /api/v1/jobs?limit=50 p50 (ms)", f["jobs"]["p50"], e["jobs"]["p50"], "{:.1f}"),
        ("GET /api/v1/jobs?limit=50 p99 (ms)", f["jobs"]["p99"], e["jobs"]["p99"], "{:.1f}"),
        ("fleet page p50 (ms)", f["fleet"]["p50"], e["fleet"]["p50"], "{:.1f}"),
        ("fleet page p99 (ms)", f["fleet"]["p99"], e["fleet"]["p99"], "{:.1f}"),
        ("job submissions/s", f["submit"]["rate"], e["submit"]["rate"], "{:.0f}"),
        ("job submission p99 (ms)", f["submit"]["p99"], e["submit"]["p99"], "{:.1f}"),
        ("job submission, roller CPU (us)", f["submit"]["cpu_us"], e["submit"]["cpu_us"], "{:.0f}"),
        ("prune (s)", f["prune"]["seconds"], e["prune"]["seconds"], "{:.1f}"),
        ("prune, longest write-lock hold (ms)", f["prune"]["max_hold_ms"], e["prune"]["max_hold_ms"], "{:.1f}"),
        ("file before (MB)", f["size_before"] / 1e6, e["size_before"] / 1e6, "{:.1f}"),
        ("file after prune (MB)", f["size_after"] / 1e6, e["size_after"] / 1e6, "{:.1f}"),
    ]
    for label in f["lookups"]:
        for p in ("p50", "p99"):
            rows.append((f"{label} {p} (ms)", f["lookups"][label][p], e["lookups"][label][p], "{:.1f}"))
    for label, full, empty, fmt in rows:
        ratio = f"{full / empty:6.2f}x" if empty else "     -"
        print(f"{label:<36} {fmt.format(full):>22} {fmt.format(empty):>14}   {ratio}")
    print(f"pruned: {f['prune']['counts']['jobs']:,} jobs, {f['prune']['counts']['job_events']:,} events, "
          f"{f['prune']['counts']['log_lines']:,} log lines in {f['prune']['transactions']:,} transactions")

    for name, r in results.items():
        for what in ("jobs", "fleet"):
            if set(r[what]["statuses"]) != {200}:
                problems.append(f"{name}: {what} statuses {r[what]['statuses']}")
        if r["submit"]["statuses"] != {201: args.machines}:
            problems.append(f"{name}: submissions answered {r['submit']['statuses']}, not {args.machines} x 201")
        for label, got in r["lookups"].items():
            if set(got["statuses"]) != {200}:
                problems.append(f"{name}: {label} statuses {got['statuses']}")
    for label, got in f["lookups"].items():  # goal 3 of issue 18
        if got["p50"] >= 5 or got["p99"] >= 20:
            problems.append(f"{label}: p50 {got['p50']:.1f} ms, p99 {got['p99']:.1f} ms on the full database "
                            "(goal: under 5 and 20 ms)")
    if f["submit"]["cpu_us"] > 1.2 * e["submit"]["cpu_us"]:  # goal 3 of issue 18
        problems.append(f"a job submission costs {f['submit']['cpu_us']:.0f} us of roller CPU on the full database, "
                        f"{f['submit']['cpu_us'] / e['submit']['cpu_us']:.2f}x the empty one's (goal: within 1.2x)")
    expected = int(args.jobs * 0.9)
    if f["prune"]["counts"]["jobs"] != expected:
        problems.append(f"pruned {f['prune']['counts']['jobs']} jobs, expected {expected}")
    if f["prune"]["max_hold_ms"] >= 50:
        problems.append(f"a prune transaction ({f['prune'].get('max_hold_in')}) held the write lock "
                        f"{f['prune']['max_hold_ms']:.1f} ms (target < 50); "
                        f"{f['prune'].get('holds_over_50ms')} of {f['prune']['transactions']} held it 50 ms or more")
    if f["size_after"] >= f["size_before"] / 2:
        problems.append("the file did not shrink to less than half")
    report(problems)


if __name__ == "__main__":
    main()
