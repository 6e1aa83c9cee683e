"""
Batches: one request reboots 1000 simulated machines, rolled out 200 at a
time, side by side with the same 1000 reboots submitted one request each
(the way a script does it without batches).  Manual; not part of CI.  See
bench/README.md.

    python bench/batch.py [--count N] [--max-concurrent C] [--down-for S] [--reboot-delay S]
                          [--rate R] [--skip batch,single] [--quick] [--keep]

Both scenarios run on one fleet simulator process (C{python -m
roller.sim.fleet}), each against a fresh roller process (C{twistd -n
--logger roller.logs.observer roller --auth none}, a temporary state dir,
the fleet's secrets and known_hosts), machines imported with C{POST
/api/v1/machines}:

1. batch: one C{POST /api/v1/batches} (C{selector: {"group": "sim"}},
   C{rollout: {"max_concurrent": C}}): how long the request takes (target
   under 1 s), how long until the batch ends with every member verified
   (from roller's own C{finished} timestamp; target: (reboot delay + down
   time) x ceil(N / C) + 20 s), and meanwhile a separate sampler process
   GETs C{/api/v1/batches/<id>} (every member included) R times a second:
   p50/p99 (target p99 under 100 ms).
2. single: the same N reboots POSTed one request each over 32 connections
   (nothing limits how many run at once), then the same measures with the
   sampler GETting C{/api/v1/jobs/<id>} of jobs created so far.

Everything listens on loopback addresses only (127.0.6.x).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from typing import Any

from common import Procs, child_mode, cpu_seconds, machine_busy, percentile, report
from fanout import FINAL, ROLLER_CONFIG, Fleet, Http, Roller, fmt_s, parallel, tcp_alive


def sampler(spec: dict[str, Any]) -> dict[str, Any]:
    """GET a random path of those listed in C{paths_file}, C{rate} times a second, until stdin closes."""
    paths: list[str] = []
    size = 0
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    rng = random.Random(1)
    http_ = Http(spec["port"], timeout=30)
    interval = 1.0 / spec["rate"]
    lat: list[float] = []
    statuses: dict[int, int] = {}
    sizes: list[int] = []
    next_at = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if now < next_at:
            stop.wait(next_at - now)
            continue
        next_at = max(next_at + interval, now)
        if os.path.getsize(spec["paths_file"]) != size:
            with open(spec["paths_file"]) as f:
                data = f.read()
            size = len(data)
            paths = data.split("\n")[:-1]
        if not paths:
            continue
        t = time.monotonic()
        try:
            status, body = http_.request("GET", rng.choice(paths))
        except OSError:
            statuses[-1] = statuses.get(-1, 0) + 1
            continue
        lat.append(time.monotonic() - t)
        sizes.append(len(body))
        statuses[status] = statuses.get(status, 0) + 1
    return {"latencies": lat, "statuses": statuses, "cpu": time.process_time(),
            "bytes_p50": percentile(sizes, 0.5) if sizes else 0}


class Run:
    """One scenario: a fresh roller over the fleet, a sampler, figures."""

    def __init__(self, procs: Procs, workdir: str, name: str, fleet: Fleet, args: argparse.Namespace):
        self.procs, self.fleet, self.args, self.name = procs, fleet, args, name
        self.state = os.path.join(workdir, f"{name}-state")
        os.makedirs(self.state)
        config = os.path.join(self.state, "roller.toml")
        with open(config, "w") as f:
            f.write(ROLLER_CONFIG.format(
                secrets=fleet.secrets, known_hosts=fleet.known_hosts_openssh, max_running=max(fleet.count, 1),
                connect_timeout="10", down_timeout=f"{args.reboot_delay + 30:g}",
                up_timeout=f"{args.down_for + 30:g}", poll=f"{args.poll:g}"))
        self.roller = Roller(["--auth", "none", "--config", config], state_dir=self.state,
                             log_path=os.path.join(workdir, f"{name}-roller.log"))
        self.roller.start(timeout=60)
        self.api = Http(self.roller.port)
        parallel(lambda m: self.api.json("POST", "/api/v1/machines", m, expect=(201,)), fleet.inventory)
        self.paths_file = os.path.join(self.state, "paths")
        open(self.paths_file, "w").close()
        self.sampler: subprocess.Popen | None = None
        self.out: dict[str, Any] = {"name": name, "count": fleet.count}

    def start_sampler(self) -> None:
        self.cpu0, self.fleet_cpu0 = cpu_seconds(self.roller.pid), self.fleet.cpu()
        self.busy0, self.own0, self.t_begin = machine_busy(), time.process_time(), time.monotonic()
        self.sampler = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--sampler",
             json.dumps({"port": self.roller.port, "paths_file": self.paths_file, "rate": self.args.rate})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.procs.append(self.sampler)
        time.sleep(0.5)  # the sampler's interpreter starts

    def finish_sampler(self) -> None:
        out = self.out
        out["roller_cpu_s"] = cpu_seconds(self.roller.pid) - self.cpu0
        out["fleet_cpu_s"] = self.fleet.cpu() - self.fleet_cpu0
        busy, own = machine_busy() - self.busy0, time.process_time() - self.own0
        elapsed = time.monotonic() - self.t_begin
        assert self.sampler is not None
        text, _ = self.sampler.communicate("stop\n", timeout=60)
        self.procs.procs.remove(self.sampler)
        s = json.loads(text)
        out["others_cores"] = max(0.0, busy - out["roller_cpu_s"] - out["fleet_cpu_s"] - own - s["cpu"]) / elapsed
        out["get_n"] = len(s["latencies"])
        out["get_p50_ms"] = 1000 * percentile(s["latencies"], 0.50)
        out["get_p99_ms"] = 1000 * percentile(s["latencies"], 0.99)
        out["get_max_ms"] = 1000 * max(s["latencies"], default=float("nan"))
        out["get_statuses"] = s["statuses"]
        out["get_bytes_p50"] = s["bytes_p50"]
        out["errors_in_log"] = self.roller.log_text().count("Traceback")

    def stop(self) -> None:
        if self.sampler is not None and self.sampler.poll() is None:
            self.sampler.kill()
            self.sampler.wait()
        self.roller.stop(timeout=30)


def batch_run(procs: Procs, workdir: str, fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    run = Run(procs, workdir, "batch", fleet, args)
    out = run.out
    try:
        run.start_sampler()
        body = {"task_name": "reboot", "reason": "bench/batch.py", "selector": {"group": "sim"},
                "rollout": {"max_concurrent": args.max_concurrent}}
        t0_wall, t0 = time.time(), time.monotonic()
        created = run.api.json("POST", "/api/v1/batches", body, expect=(201,))
        out["create_s"] = time.monotonic() - t0
        batch_id = created["batch_id"]
        out["members"] = created["total"]
        with open(run.paths_file, "a") as f:
            f.write(f"/api/v1/batches/{batch_id}\n")
        limit = math.ceil(fleet.count / args.max_concurrent) * (args.down_for + args.reboot_delay + 60) + 120
        progress_at = time.monotonic()
        while True:
            b = run.api.json("GET", f"/api/v1/batches/{batch_id}?members=false")
            now = time.monotonic()
            if b["state"] != "running" and b["finished"]:
                break
            if now - t0 > limit:
                out["stuck"] = b["counts"]
                break
            if now >= progress_at:
                c = b["counts"]
                print(f"    {now - t0:5.1f} s: {b['progress']:.0%} done, running {c['running']}, queued "
                      f"{c['queued']}, pending {c['pending']}", flush=True)
                progress_at = now + 5
            time.sleep(0.5)
        run.finish_sampler()
        final = run.api.json("GET", f"/api/v1/batches/{batch_id}")
        out["state"] = final["state"]
        out["counts"] = {k: v for k, v in final["counts"].items() if v}
        out["wall_s"] = datetime.fromisoformat(final["finished"]).timestamp() - t0_wall \
            if final["finished"] else float("nan")
        # the rollout limit, from the member jobs' own records
        jobs: list[dict] = []
        before = None
        while True:
            page = run.api.json("GET", f"/api/v1/jobs?batch_id={batch_id}&limit=1000"
                                + (f"&before={before}" if before else ""))
            jobs += page["jobs"]
            before = page["next_before"]
            if not before:
                break
        edges = sorted([(datetime.fromisoformat(j["started"]).timestamp(), 1) for j in jobs if j["started"]]
                       + [(datetime.fromisoformat(j["finished"]).timestamp(), -1) for j in jobs if j["finished"]],
                       key=lambda e: (e[0], e[1]))
        running = peak = 0
        for _, step in edges:
            running += step
            peak = max(peak, running)
        out["peak_running"] = peak
        out["jobs"] = len(jobs)
    finally:
        run.stop()
    return out


def single_run(procs: Procs, workdir: str, fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.monotonic() + args.down_for + 60
    while not all(tcp_alive(m["ip"], fleet.port) for m in fleet.inventory):
        if time.monotonic() > deadline:
            raise SystemExit("single run: the fleet did not come back up after the batch run")
        time.sleep(0.5)
    run = Run(procs, workdir, "single", fleet, args)
    out = run.out
    try:
        run.start_sampler()
        lock = threading.Lock()
        with open(run.paths_file, "a") as paths:
            def post(worker: str) -> str:
                task_id = run.api.json("POST", f"/api/v1/workers/{worker}/group/sim/jobs?task_name=reboot",
                                       expect=(201,))["task_id"]
                with lock:
                    paths.write(f"/api/v1/jobs/{task_id}\n")
                    paths.flush()
                return task_id

            t0_wall, t0 = time.time(), time.monotonic()
            ids = parallel(post, [m["worker_id"] for m in fleet.inventory])
        out["create_s"] = time.monotonic() - t0
        limit = args.down_for + args.reboot_delay + 180
        while True:
            hb = run.api.json("GET", "/__heartbeat__")["queue"]
            if hb["running"] == 0 and hb["queued"] == 0:
                break
            if time.monotonic() - t0 > limit:
                out["stuck"] = hb
                break
            time.sleep(0.5)
        run.finish_sampler()
        jobs = parallel(lambda i: run.api.json("GET", f"/api/v1/jobs/{i}"), ids, workers=8)
        states: dict[str, int] = {}
        for j in jobs:
            states[j["state"]] = states.get(j["state"], 0) + 1
        out["counts"] = states
        out["state"] = "succeeded" if states.get("succeeded") == len(jobs) else "failed"
        finished = [datetime.fromisoformat(j["finished"]).timestamp() for j in jobs if j["state"] in FINAL]
        out["wall_s"] = max(finished) - t0_wall if len(finished) == len(jobs) else float("nan")
        out["members"] = len(jobs)
    finally:
        run.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="machines (1000)")
    parser.add_argument("--max-concurrent", type=int, default=200, help="the batch's max_concurrent (200)")
    parser.add_argument("--down-for", type=float, default=10.0, help="seconds a machine stays down (10)")
    parser.add_argument("--reboot-delay", type=float, default=1.0, help="seconds from reboot to down (1)")
    parser.add_argument("--poll", type=float, default=1.0, help="roller's reboot.poll_interval (1)")
    parser.add_argument("--rate", type=float, default=20.0, help="sampler GETs per second (20)")
    parser.add_argument("--skip", default="", help="comma-separated scenarios to skip: batch,single")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 machines, 20 at a time, down 3 s")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    parser.add_argument("--sampler", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if child_mode(args.sampler, sampler):
        return
    if args.quick:
        args.count, args.max_concurrent, args.down_for = min(args.count, 100), min(args.max_concurrent, 20), 3.0
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    reboot_s = args.down_for + args.reboot_delay
    waves = math.ceil(args.count / args.max_concurrent)
    target = reboot_s * waves + 20

    workdir = tempfile.mkdtemp(prefix="roller-batch-")
    procs = Procs(stop_timeout=20)
    print(f"roller batch bench: {os.cpu_count()} CPUs, {args.count} machines, {args.max_concurrent} at a time, "
          f"down {args.down_for:g} s after {args.reboot_delay:g} s; work dir {workdir}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        fleet = Fleet(procs, workdir, "fleet", args.count, "127.0.6.", args.down_for, args.reboot_delay)
        print(f"  fleet of {args.count} up in {fleet.started_in:.1f} s on 127.0.6.x:{fleet.port}", flush=True)
        for name, fn in (("batch", batch_run), ("single", single_run)):
            if name not in skip:
                results[name] = r = fn(procs, workdir, fleet, args)
                print(f"  {name}: {json.dumps({k: v for k, v in r.items()}, default=str)}", flush=True)
        fleet.stop()
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    problems = []
    print()
    print(f"{str(args.count) + ' reboots':<40} {'requests':>8} {'submit':>8} {'all ended':>10} {'GET p50':>8} "
          f"{'GET p99':>8} {'CPU':>7}  result")
    rows = (("batch", f"one batch, {args.max_concurrent} at a time", 1, "GET batch"),
            ("single", "one request per machine, all at once", args.count, "GET job"))
    for name, label, requests, what in rows:
        if name not in results:
            continue
        r = results[name]
        print(f"{label:<40} {requests:>8} {r['create_s']:7.2f}s {fmt_s(r['wall_s']):>10} {r['get_p50_ms']:6.1f}ms "
              f"{r['get_p99_ms']:6.1f}ms {r['roller_cpu_s']:6.1f}s  {r['counts']} ({what}, "
              f"{r['get_bytes_p50'] / 1000:.0f} kB)")
        if r.get("stuck"):
            problems.append(f"{name}: did not end: {r['stuck']}")
        if r["counts"].get("succeeded") != args.count:
            problems.append(f"{name}: not every reboot was verified: {r['counts']}")
        if not r["get_p99_ms"] < 100:
            problems.append(f"{name}: GET p99 {r['get_p99_ms']:.0f} ms >= 100 ms")
        if r["errors_in_log"]:
            problems.append(f"{name}: {r['errors_in_log']} tracebacks in roller's log (--keep)")
    if "batch" in results:
        r = results["batch"]
        print(f"  batch targets: created in {r['create_s']:.2f} s (< 1 s); ended after {fmt_s(r['wall_s'])} "
              f"(<= {target:g} s = {reboot_s:g} s x {waves} waves + 20 s); at most {r['peak_running']} member jobs "
              f"running at once (limit {args.max_concurrent}, from the jobs' recorded start and end times)")
        if not r["create_s"] < 1:
            problems.append(f"batch: creating took {r['create_s']:.2f} s >= 1 s")
        if not r["wall_s"] <= target:
            problems.append(f"batch: {fmt_s(r['wall_s'])} > target {target:g} s")
        if r["peak_running"] > args.max_concurrent:
            problems.append(f"batch: {r['peak_running']} member jobs ran at once > {args.max_concurrent}")
    others = max((r["others_cores"] for r in results.values()), default=0.0)
    if others > 0.25:
        print(f"NOTE: other processes used up to {others:.2f} of {os.cpu_count()} CPUs during the runs: "
              "the figures are noisy (a quiet machine, or run again)")
    report(problems)


if __name__ == "__main__":
    main()
