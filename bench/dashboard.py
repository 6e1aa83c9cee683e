"""
Fleet page (GET /) of roller with 5000 machines, and the job history (GET
/jobs) and charts (GET /stats) over 100 000 jobs, each side by side with a
static file of the same bytes served by plain twisted.web.static.File.
Manual; not part of CI.  See bench/README.md.

    python bench/dashboard.py [--machines N] [--history N] [--requests N] [--walks N] [--concurrency C]
                              [--quick] [--keep]

roller (this source tree, twistd, --auth none, a temporary state dir) gets
N machines and one finished ping job per machine (every 10th failed, the
rest succeeded) written to its database first, through roller's own store,
and a dashboard account (role viewer, made with `roller user add`); the
client signs in once (POST /login) and sends its session cookie with every
request, as a browser does.  The static server gets the same cookie.
The fleet page has no "all" option: it shows 200 machines a page (the
Dashboard's page_size, which neither the query string nor the config
changes), so what is timed is

- page 1 (`/`: 200 rows, plus the state counts over all N machines),
- the last page (`/?page=LAST`: the same work, with OFFSET N-200),
- a walk of every page (`/?page=1` .. `/?page=LAST`, one after the other on
  one connection): what seeing all N machines costs,

and, over a history of --history jobs (default 100 000) written to the
database before roller starts (spread over the last 7 days across the
machines, every 8th failed, every 10th a reboot with its attempts' log
events), the history and the charts:

- `/jobs` (the newest 100), `/jobs?state=failed` (a filter an index
  answers), `/jobs?task=reboot` (one that walks the history backwards),
  `/jobs?before=SEQ` (a page from the middle of the history);
- `/stats` (six charts and their tables; the aggregates are recomputed
  at most once a minute, so what is timed is mostly the cached page; the
  first computation, over the whole 7 days, is timed once on its own),

each against the same bytes (roller's answer, saved to files) served by
roller's own site as a static resource behind the same session check
(bench/roller_static.py: twisted.web.static.File under /bench-static/, after
Dashboard.authorize; same process, reactor, HTTP stack and sign-in lookup).
Sequential keep-alive requests (one connection) and, for page 1, C
concurrent connections.  Rounds alternate roller and static.

Cache misses as well as hits: the fleet cases run twice, as they are and
"+ commit", where before every GET (untimed) the client submits a `reboot`
job for a random machine through the API (`POST /api/v1/workers/<id>/group
/bench/jobs`, answered 201 once the job is committed); the bench machines
have no reboot method, so each job runs at once and fails, committing its
start and its end too: jobs finishing all the time, written by roller
itself, and every GET finds the database changed since the last one.  The
static side gets the same submissions.

The client is this file run as a separate process (--client): stdlib
http.client, one thread per connection.  127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import resource
import os
import re
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any
from urllib.parse import urlencode

from common import (HERE, TWISTD, Procs, child_mode, cpu_seconds, free_port, machine_busy, report, roller_env, seed_db,
                    wait_ready)

PAGE_SIZE = 200  # roller.web.dashboard.Dashboard.page_size (not configurable)

ROLLER_CONFIG = """\
# bench/dashboard.py: nothing runs; the jobs in the database are all finished.
[tasks]
allowed = ["ping", "reboot"]
"""


# -- the client (its own process)


def client(spec: dict[str, Any]) -> dict[str, Any]:
    """
    C{iterations} times: GET every path of C{paths} in turn on one keep-alive
    connection; C{concurrency} connections (threads) share the iterations.
    The latency of an iteration is the time for all its paths.
    """
    port, paths, total = spec["port"], spec["paths"], spec["iterations"]
    headers = spec.get("headers", {})
    lock = threading.Lock()
    state = {"next": 0}
    lat: list[float] = []
    statuses: dict[int, int] = {}
    sizes: set[int] = set()
    errors: list[str] = []
    commit = spec.get("commit")  # {"machines": N}: a job submitted (and committed) before every GET

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        api = http.client.HTTPConnection("127.0.0.1", port, timeout=60) if commit else None
        rnd = random.Random(threading.get_ident())
        mine, st, sz = [], {}, set()
        try:
            while True:
                with lock:
                    if state["next"] >= total:
                        break
                    state["next"] += 1
                spent = 0.0
                for p in paths:
                    if api is not None:
                        submit_a_job(api, rnd, commit["machines"])
                    t0 = time.perf_counter()
                    conn.request("GET", p, headers=headers)
                    r = conn.getresponse()
                    body = r.read()
                    spent += time.perf_counter() - t0
                    st[r.status] = st.get(r.status, 0) + 1
                    sz.add(len(body))
                mine.append(spent)
        except Exception as e:  # noqa: BLE001 - reported, the run then fails
            errors.append(repr(e))
        finally:
            conn.close()
            if api is not None:
                api.close()
        with lock:
            lat.extend(mine)
            for k, v in st.items():
                statuses[k] = statuses.get(k, 0) + v
            sizes.update(sz)

    threads = [threading.Thread(target=worker) for _ in range(spec["concurrency"])]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"latencies": lat, "wall": wall, "requests": len(lat) * len(paths),
            "statuses": statuses, "sizes": sorted(sizes), "errors": errors}


def submit_a_job(api: http.client.HTTPConnection, rnd: random.Random, machines: int) -> None:
    """A reboot job for a random bench machine, through the API: answered once committed (it then fails at once)."""
    api.request("POST", f"/api/v1/workers/bd{rnd.randrange(machines)}/group/bench/jobs?task_name=reboot",
                body=b"", headers={"Content-Length": "0"})
    r = api.getresponse()
    body = r.read()
    if r.status not in (200, 201):  # 200: a job was already queued for the machine
        raise RuntimeError(f"job submission: {r.status} {body[:200]!r}")


def run_client(spec: dict[str, Any], pid: int) -> dict[str, Any]:
    """The client in its own process; its result, with the server's CPU and everybody else's."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0, busy0, t0 = cpu_seconds(pid), machine_busy(), time.monotonic()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--client", json.dumps(spec)],
                          stdout=subprocess.PIPE, check=True)
    cpu1, busy1, t1 = cpu_seconds(pid), machine_busy(), time.monotonic()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    r = json.loads(proc.stdout)
    r["statuses"] = {int(k): v for k, v in r["statuses"].items()}
    r["server_cpu"] = cpu1 - cpu0
    r["client_cores"] = client_cpu / (t1 - t0)
    r["others"] = max(0.0, (busy1 - busy0 - (cpu1 - cpu0) - client_cpu) / (t1 - t0))
    return r


# -- servers

BENCH_USER, BENCH_PASSWORD = "bench", "bench-dashboard-password"


def sign_in(port: int, user: str = BENCH_USER, password: str = BENCH_PASSWORD) -> str:
    """Sign in to roller's dashboard (as the bench account); the Cookie header to send."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/login")
        r = conn.getresponse()
        page = r.read().decode("utf-8")
        cookies = {c.split("=", 1)[0]: c.split(";", 1)[0] for c in r.headers.get_all("Set-Cookie") or []}
        m = re.search(r'name="csrf_token" value="([^"]+)"', page)
        if r.status != 200 or m is None:
            raise SystemExit(f"GET /login: {r.status}, no sign-in form")
        body = urlencode({"csrf_token": m.group(1), "user": user, "password": password})
        conn.request("POST", "/login", body=body, headers={
            "Content-Type": "application/x-www-form-urlencoded", "Cookie": "; ".join(cookies.values())})
        r = conn.getresponse()
        r.read()
        for c in r.headers.get_all("Set-Cookie") or []:
            cookies[c.split("=", 1)[0]] = c.split(";", 1)[0]
        if r.status != 303 or "roller_session" not in cookies:
            raise SystemExit(f"POST /login: {r.status}, not signed in")
        return "; ".join(cookies.values())
    finally:
        conn.close()


def fetch_page(port: int, path: str, cookie: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers={"Cookie": cookie})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


async def seed_history(reactor: Any, path: str, count: int, machines: int) -> None:
    """
    C{count} finished jobs over the last 7 days through roller's own store
    (many inserts in flight, so the store commits them in groups): machine
    bd<i % machines>, every 8th failed, every 10th a reboot whose log has
    its attempts (ssh_reboot, then ipmi_cycle when ssh failed).
    """
    from twisted.internet.defer import gatherResults

    from roller.jobs import Job, JobEvent, State
    from roller.store import open_store

    store = await open_store(path, reactor)
    try:
        now = time.time()
        step = 7 * 86400 / max(count, 1)
        for start in range(0, count, 2000):
            jobs, events = [], []
            for i in range(start, min(count, start + 2000)):
                created = now - 7 * 86400 + i * step
                failed = i % 8 == 5
                reboot = i % 10 == 0
                job = Job(id=f"00000000-0000-7000-8000-{i:012d}", task_name="reboot" if reboot else "ping",
                          worker_id=f"bd{i % machines}", worker_group="bench", created_at=created,
                          params={} if reboot else {"count": 3}, requester=("bench", "roller/health")[i % 2],
                          state=State.failed if failed else State.succeeded, started_at=created + 1,
                          finished_at=created + (95 if reboot else 2.1),
                          result=None if failed else ("ssh_reboot: rebooted. Completed in 94 seconds" if reboot
                                                      else "3/3 replies, rtt 0.05 ms"),
                          error="failed: ssh_reboot failed: no route; ipmi_cycle failed: timeout" if failed else None)
                jobs.append(job)
                if reboot:
                    events += [JobEvent(job.id, created + 2, "log", "ssh_reboot: starting",
                                        {"method": "ssh_reboot", "step": "initiate"}),
                               JobEvent(job.id, created + 40, "log", "ssh_reboot",
                                        {"method": "ssh_reboot", "outcome": "failed" if failed else "succeeded"})]
                    if failed:
                        events += [JobEvent(job.id, created + 41, "log", "ipmi_cycle: starting",
                                            {"method": "ipmi_cycle", "step": "initiate"}),
                                   JobEvent(job.id, created + 94, "log", "ipmi_cycle",
                                            {"method": "ipmi_cycle", "outcome": "failed"})]
            await gatherResults([store.jobs.insert(j) for j in jobs])
            await store.jobs.add_events(events)
    finally:
        await store.close()


#: roller as ROLLER_TWISTD starts it, with bench/roller_static.py's /bench-static/ on its site
ROLLER_WITH_STATIC = [sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import roller_static; "
                      "roller_static.install(); from twisted.scripts.twistd import run; run()",
                      *TWISTD[3:], "--logger", "roller.logs.observer", "roller"]


def start_roller(servers: Procs, workdir: str, machines: int, history: int,
                 docroot: str) -> tuple[subprocess.Popen, int]:
    state = os.path.join(workdir, "roller")
    os.makedirs(state)
    config = os.path.join(state, "bench.toml")
    with open(config, "w") as f:
        f.write(ROLLER_CONFIG)
    env = roller_env()
    db = os.path.join(state, "roller.db")
    seed_db(db, "bd", machines, jobs=True, env=env, cwd=state)
    if history:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--seed-history",
                        json.dumps({"db": db, "count": history, "machines": machines})], env=env, cwd=state, check=True)
    subprocess.run([sys.executable, "-m", "roller.cli", "--state-dir", state, "--config", config, "user", "add",
                    BENCH_USER, "--role", "viewer", "--password-stdin"], input=BENCH_PASSWORD + "\n", text=True,
                   env=env, cwd=state, check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    log_path = os.path.join(state, "roller.log")
    proc = servers.start([*ROLLER_WITH_STATIC, "--auth", "none", "--listen", f"tcp:{port}:interface=127.0.0.1",
                          "--state-dir", state, "--config", config], log_path, cwd=state,
                         env={**env, "ROLLER_BENCH_STATIC_DIR": docroot})
    wait_ready(proc, port, "/__lbheartbeat__", log_path)
    return proc, port


# -- the measurements


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """All rounds of one server and case, pooled; req/s from the best round."""
    lat = [x for r in runs for x in r["latencies"]]
    requests = sum(r["requests"] for r in runs)
    return {
        "p50": statistics.median(lat) * 1000, "p95": pct(lat, 95) * 1000,
        "rate": max(r["requests"] / r["wall"] for r in runs),
        # /proc counts CPU in ticks (10 ms): meaningful only over many requests
        "cpu_ms": 1000 * sum(r["server_cpu"] for r in runs) / requests,
        "others": max(r["others"] for r in runs),
        "statuses": {k: sum(r["statuses"].get(k, 0) for r in runs) for k in {k for r in runs for k in r["statuses"]}},
        "sizes": sorted({s for r in runs for s in r["sizes"]}),
        "errors": [e for r in runs for e in r["errors"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=5000, help="machines (and finished jobs) in the database (5000)")
    parser.add_argument("--requests", type=int, default=200, help="sequential GETs of one page per round (200)")
    parser.add_argument("--walks", type=int, default=10, help="walks of every page per round (10)")
    parser.add_argument("--concurrency", "-c", type=int, default=8, help="connections for the concurrent case (8)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds, alternating roller and static (3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 requests, 2 walks, 1 round")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database, pages)")
    parser.add_argument("--history", type=int, default=100_000,
                        help="finished jobs in the history behind /jobs and /stats (100000, quick 10000)")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--seed-history", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if child_mode(args.client, client):
        return
    if args.seed_history:
        from twisted.internet import task
        from twisted.internet.defer import ensureDeferred

        spec = json.loads(args.seed_history)
        task.react(lambda reactor: ensureDeferred(seed_history(reactor, spec["db"], spec["count"], spec["machines"])))
        return
    if args.quick:
        args.requests, args.walks = min(args.requests, 20), min(args.walks, 2)
        args.history = min(args.history, 10_000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    pages = max(1, -(-args.machines // PAGE_SIZE))

    workdir = tempfile.mkdtemp(prefix="roller-bench-dash-")
    docroot = os.path.join(workdir, "static")
    os.makedirs(docroot)
    servers = Procs()
    print(f"roller dashboard bench: {os.cpu_count()} CPUs, {args.machines} machines ({pages} pages of "
          f"{PAGE_SIZE}), {args.rounds} round(s); work dir {workdir}", flush=True)
    problems: list[str] = []
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    sizes: dict[Any, int] = {}
    try:
        t = time.monotonic()
        roller, rport = start_roller(servers, workdir, args.machines, args.history, docroot)
        print(f"  {args.machines} machines + {args.machines + args.history} finished jobs written and roller "
              f"started in {time.monotonic() - t:.1f} s", flush=True)
        cookie = sign_in(rport)
        t = time.monotonic()
        status, body = fetch_page(rport, "/stats", cookie)
        stats_first = time.monotonic() - t
        if status != 200 or body.count(b'role="img"') < 6:
            raise SystemExit(f"GET /stats: {status} {body[:300]!r}")
        print(f"  /stats computed over {args.machines + args.history} jobs (7 days) in {stats_first * 1000:.0f} ms "
              "(once; then cached for a minute)", flush=True)
        # the history and charts pages, saved as the static server's files
        middle = args.machines + args.history // 2
        history_pages = {"jobs": "/jobs", "jobs-failed": "/jobs?state=failed", "jobs-reboot": "/jobs?task=reboot",
                         "jobs-middle": f"/jobs?before={middle}", "stats": "/stats"}
        for name, path in history_pages.items():
            status, body = fetch_page(rport, path, cookie)
            if status != 200:
                raise SystemExit(f"GET {path}: {status} {body[:300]!r}")
            if name.startswith("jobs") and body.count(b"<tr>") < 100:
                problems.append(f"{path} does not show 100 jobs")
            with open(os.path.join(docroot, f"{name}.html"), "wb") as f:
                f.write(body)
            sizes[name] = len(body)
        # roller's answers, saved as the static server's files
        for n in range(1, pages + 1):
            status, body = fetch_page(rport, f"/?page={n}", cookie)
            if status != 200:
                raise SystemExit(f"GET /?page={n}: {status} {body[:300]!r}")
            with open(os.path.join(docroot, f"page{n}.html"), "wb") as f:
                f.write(body)
            sizes[n] = len(body)
        first = open(os.path.join(docroot, "page1.html"), encoding="utf-8").read()
        if not re.search(rf"of {args.machines}[.,]", first) or first.count('<tr') < PAGE_SIZE:
            problems.append(f"page 1 does not show {PAGE_SIZE} rows 'of {args.machines}'")
        status, body = fetch_page(rport, "/bench-static/page1.html", cookie)
        if status != 200 or body != open(os.path.join(docroot, "page1.html"), "rb").read():
            raise SystemExit(f"GET /bench-static/page1.html: {status}, not the saved page")
        if fetch_page(rport, "/bench-static/page1.html", "")[0] != 401:
            raise SystemExit("GET /bench-static/page1.html without a session: not refused")
        commit = {"machines": args.machines}
        print(f"  page 1: {sizes[1]} bytes, last page ({pages}): {sizes[pages]} bytes, all {pages} pages: "
              f"{sum(v for k, v in sizes.items() if isinstance(k, int))} bytes; "
              + ", ".join(f"{history_pages[k]}: {sizes[k]} bytes" for k in history_pages), flush=True)

        fleet_cases = [
            ("page 1, sequential", ["/"], ["page1.html"], args.requests, 1),
            (f"page {pages} (last), sequential", [f"/?page={pages}"], [f"page{pages}.html"], args.requests, 1),
            (f"page 1, {args.concurrency} concurrent", ["/"], ["page1.html"], args.requests, args.concurrency),
            (f"all {pages} pages, walk", [f"/?page={n}" for n in range(1, pages + 1)],
             [f"page{n}.html" for n in range(1, pages + 1)], args.walks, 1),
        ]
        cases = [
            *((name, rpaths, spaths, n, conc, None) for name, rpaths, spaths, n, conc in fleet_cases),
            *((f"{name} + commit", rpaths, spaths, n, conc, commit) for name, rpaths, spaths, n, conc in fleet_cases),
            *((f"{path}, sequential", [path], [f"{name}.html"], args.requests, 1, None)
              for name, path in history_pages.items()),
            (f"/jobs, {args.concurrency} concurrent", ["/jobs"], ["jobs.html"], args.requests, args.concurrency, None),
        ]
        for rnd in range(args.rounds):
            for name, rpaths, spaths, iterations, conc, commits in cases:
                order = ("roller", "static") if rnd % 2 == 0 else ("static", "roller")
                for which in order:
                    paths = rpaths if which == "roller" else [f"/bench-static/{p}" for p in spaths]
                    r = run_client({"port": rport, "paths": paths, "iterations": iterations, "concurrency": conc,
                                    "headers": {"Cookie": cookie}, "commit": commits}, roller.pid)
                    results.setdefault((name, which), []).append(r)
                    print(f"  round {rnd + 1} {name:<36} {which:<6} p50 {statistics.median(r['latencies']) * 1000:8.1f} ms"
                          f"  {r['requests'] / r['wall']:7.1f} req/s  server CPU "
                          f"{1000 * r['server_cpu'] / r['requests']:6.2f} ms/req", flush=True)
    finally:
        servers.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"{args.machines} machines, {args.history} jobs{'':<11} server   p50 ms   p95 ms    req/s  CPU ms/req"
          "   ratio p50  ratio CPU")
    worst = 0.0
    others = 0.0
    for name, *_ in cases:
        ro, st = summary(results[(name, "roller")]), summary(results[(name, "static")])
        for which, s in (("roller", ro), ("static", st)):
            if set(s["statuses"]) != {200} or s["errors"]:
                problems.append(f"{name} {which}: statuses {s['statuses']} errors {s['errors'][:3]}")
        others = max(others, ro["others"], st["others"])
        ratio = ro["p50"] / st["p50"]
        worst = max(worst, ratio)
        unit = "walk" if "walk" in name else "req"
        print(f"{name[:38]:<38} roller {ro['p50']:8.1f} {ro['p95']:8.1f} {ro['rate']:8.1f} {ro['cpu_ms']:11.2f}"
              f"   {ratio:8.1f}x  " + (f"{ro['cpu_ms'] / st['cpu_ms']:8.1f}x" if st["cpu_ms"] else "     n/a"))
        print(f"{'':<38} static {st['p50']:8.1f} {st['p95']:8.1f} {st['rate']:8.1f} {st['cpu_ms']:11.2f}"
              + (f"   (p50/p95 per {unit} of {pages} GETs)" if unit == "walk" else ""))
    walk = summary(results[(cases[3][0], "roller")])
    walk_commit = summary(results[(cases[7][0], "roller")])
    print(f"per-page cost (roller, walk p50 / {pages})  {walk['p50'] / pages:.1f} ms, with a commit before each page "
          f"{walk_commit['p50'] / pages:.1f} ms;  worst p50 ratio roller/static {worst:.1f}x (target <= 5x)")
    print("static: the same bytes from roller's own site (/bench-static/, twisted.web.static.File after the same "
          "session check)")
    if others > 0.25:
        print(f"NOTE: other processes (not roller or the client) used up to {others:.2f} of {os.cpu_count()} CPUs: noisy figures")
    if worst > 5:
        problems.append(f"a roller page is {worst:.1f}x the static file's time (target <= 5x)")
    report(problems)


if __name__ == "__main__":
    main()
