"""
Fan-out: 1000 simulated machines rebooted at once through roller's REST API,
side by side with the seed's model (4 workers, each blocking on the OpenSSH
client and then on the down/up wait).  Manual; not part of CI.  See
bench/README.md.

    python bench/fanout.py [--count N] [--down-for S] [--reboot-delay S] [--seed-sample M]
                           [--seed-workers W] [--hung PCT] [--rate R] [--skip roller,seed,hung]
                           [--viewers V] [--viewer-interval S] [--quick] [--keep]

Three scenarios, each on its own fleet simulator process
(C{python -m roller.sim.fleet}) and, for roller, a fresh roller
process (C{twistd -n --logger roller.logs.observer roller --auth none}, a
temporary state dir, TOML config with C{[queue] max_running = N}, the
fleet's secrets.toml and OpenSSH-form known_hosts), machines imported with
C{POST /api/v1/machines}:

1. roller: N C{reboot} jobs POSTed at once (Taskcluster form, 32
   connections); wall time from the first POST until every job is
   verified (C{succeeded}: the ssh reboot was accepted, the machine was
   seen down, then up again), from roller's own C{finished} timestamps.
   From before the first POST to the end, a separate sampler process GETs
   C{/api/v1/jobs/<id>} of a random job created so far, R times a second
   (20): p50/p99/max latency and the slowest moments.  Target: all
   verified within down_for + reboot_delay + 20 s, p99 < 100 ms.
2. seed model, on the same fleet once it is back up: a pool of W (4)
   threads, each running C{ssh ... reboot} (the OpenSSH client) as a
   subprocess and then blocking until a TCP connect fails (down) and works
   again (up), polled every second.  Only M (40) machines: the figure for
   N is projected from the mean time per reboot (ceil(N / W) rounds).
3. roller with 10% hung machines (a second fleet whose last 10% accept TCP
   and never speak): every job must still end -- the hung ones C{failed}
   after the SSH connect timeout -- and the API must stay responsive.
With C{--viewers V} (goal: 20), scenario 1 also has V dashboard viewers
(a signed-in account, one session each) each GETting the fleet page (C{/},
page 1) every C{--viewer-interval} seconds (5), staggered, from before the
first POST to the end, in a process of their own: the API's p99 is then
measured under that load, and the page's p50/p99 is printed beside it.

4. xargs + asyncio, on the first fleet once it is back up: what a capable
   operator writes without roller, the honest baseline for wall time.
   C{xargs -P 64} runs C{ssh ... reboot} (OpenSSH, with the curve25519 key
   exchange roller's Conch negotiates) over every machine, while one
   asyncio loop in this process polls each machine's SSH port every
   second (TCP connect, 1 s timeout) until it was seen down and then up.
   As roller does, a machine is first looked at one interval after its
   own C{ssh ... reboot} returned (each one's command prints its host when
   it has; a failed or timed-out connect counts as down, as for roller):
   a poll loop started at once took a connect that timed out under the
   load of 64 ssh processes for "down", and had machines "verified" up to
   40 s before xargs had rebooted them.
   Wall time from the start until the last machine is seen up again.

Everything listens on loopback addresses only (127.0.5.x, 127.0.9.x).
CPU seconds of roller, the fleet and the bench's own clients are printed,
and the CPU other processes used meanwhile (a NOTE above 0.25 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import http.client
import json
import math
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from typing import Any

from common import (REPO, Procs, child_mode, cpu_seconds, free_port, machine_busy, machine_steal, percentile, report,
                    roller_env, tail)

sys.path.insert(0, REPO)

from roller.testing.process import RollerProcess  # noqa: E402

FINAL = ("succeeded", "failed", "cancelled", "timed_out", "interrupted")

ROLLER_CONFIG = """\
# bench/fanout.py: every job may run at once; reboots over SSH only.
secrets_file = "{secrets}"

[queue]
max_running = {max_running}

[tasks]
allowed = ["reboot"]

[ssh]
known_hosts = "{known_hosts}"
user = "roller"
credential = "fleet-ssh"
connect_timeout = {connect_timeout}
command_timeout = 30

[reboot]
methods = ["ssh_reboot"]
down_timeout = {down_timeout}
up_timeout = {up_timeout}
poll_interval = {poll}
"""


# -- processes and /proc


def peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


class Fleet:
    """A fleet simulator in its own process; its client files in C{dir}."""

    def __init__(self, procs: Procs, workdir: str, name: str, count: int, base: str,
                 down_for: float, reboot_delay: float, hang: int = 0):
        self.procs = procs
        self.dir = os.path.join(workdir, name)
        self.count, self.base, self.hang = count, base, hang
        self.port = free_port(base + "1")
        self.log = os.path.join(workdir, f"{name}.log")
        argv = [sys.executable, "-m", "roller.sim.fleet", "--count", str(count), "--dir", self.dir,
                "--base", base, "--ssh-port", str(self.port), "--down-for", f"{down_for:g}",
                "--reboot-delay", f"{reboot_delay:g}"]
        if hang:
            argv += ["--hang", str(hang)]
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        t = time.monotonic()
        self.proc = procs.start(argv, self.log, cwd=workdir, env=env)
        deadline = t + 120
        while "Ctrl-C to stop." not in tail(self.log, 3):
            if self.proc.poll() is not None:
                raise SystemExit(f"fleet {name} exited with {self.proc.returncode}:\n{tail(self.log)}")
            if time.monotonic() > deadline:
                raise SystemExit(f"fleet {name} not ready after 120 s:\n{tail(self.log)}")
            time.sleep(0.05)
        self.started_in = time.monotonic() - t
        with open(os.path.join(self.dir, "inventory.json")) as f:
            self.inventory: list[dict] = json.load(f)
        self.key = os.path.join(self.dir, "fleet_ed25519")
        self.known_hosts_openssh = os.path.join(self.dir, "known_hosts.openssh")
        self.secrets = os.path.join(self.dir, "secrets.toml")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.procs.stop(self.proc)


# -- HTTP (stdlib; one keep-alive connection per thread)


class Http:
    def __init__(self, port: int, timeout: float = 30.0):
        self.port = port
        self.timeout = timeout
        self.local = threading.local()

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                conn.request(method, path, body=data, headers=headers)
                r = conn.getresponse()
                return r.status, r.read()
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: Any = None, expect: tuple[int, ...] = (200,)) -> Any:
        status, data = self.request(method, path, body)
        if status not in expect:
            raise SystemExit(f"{method} {path}: {status} {data[:300]!r}")
        return json.loads(data)


def parallel(fn: Any, items: list, workers: int = 32) -> list:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


# -- the latency sampler (its own process)


def sampler(spec: dict[str, Any]) -> dict[str, Any]:
    """GET /api/v1/jobs/<random id> C{rate} times a second until stdin closes."""
    ids: list[str] = []
    size = 0
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    rng = random.Random(1)
    http_ = Http(spec["port"], timeout=30)
    interval = 1.0 / spec["rate"]
    lat: list[float] = []
    when: list[float] = []
    statuses: dict[int, int] = {}
    late = 0
    errors: list[str] = []
    next_at = time.monotonic()
    started = None
    while not stop.is_set():
        now = time.monotonic()
        if now < next_at:
            stop.wait(next_at - now)
            continue
        if now - next_at > interval:
            late += 1  # the previous answer took longer than the interval
        next_at = max(next_at + interval, now)
        if os.path.getsize(spec["ids_file"]) != size:  # more jobs were created
            with open(spec["ids_file"]) as f:
                data = f.read()
            size = len(data)
            ids = data.split("\n")[:-1]
        if not ids:
            continue
        t = time.monotonic()
        if started is None:
            started = t
        try:
            status, _ = http_.request("GET", f"/api/v1/jobs/{rng.choice(ids)}")
        except OSError as e:
            errors.append(repr(e))
            continue
        lat.append(time.monotonic() - t)
        when.append(t - started)
        statuses[status] = statuses.get(status, 0) + 1
    slowest = sorted(zip(lat, when), reverse=True)[:5]
    return {"latencies": lat, "statuses": statuses, "late": late, "errors": errors[:5], "cpu": time.process_time(),
            "slowest": [(round(t, 1), round(1000 * v)) for v, t in slowest]}


VIEWER, VIEWER_PASSWORD = "viewer", "bench-fanout-viewer-password"


def viewers(spec: dict[str, Any]) -> dict[str, Any]:
    """
    C{count} viewers (threads, one signed-in session each) GET the fleet
    page every C{interval} seconds, staggered, until stdin closes.
    """
    from dashboard import sign_in  # bench/dashboard.py: POST /login with the form's CSRF token

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    lock = threading.Lock()
    lat: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    cookies = [sign_in(spec["port"], VIEWER, VIEWER_PASSWORD) for _ in range(spec["count"])]

    def viewer(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", spec["port"], timeout=60)
        next_at = time.monotonic() + spec["interval"] * i / spec["count"]
        while not stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += spec["interval"]
            t = time.monotonic()
            try:
                conn.request("GET", "/", headers={"Cookie": cookies[i]})
                r = conn.getresponse()
                r.read()
            except OSError as e:
                with lock:
                    errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", spec["port"], timeout=60)
                continue
            with lock:
                lat.append(time.monotonic() - t)
                statuses[r.status] = statuses.get(r.status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=viewer, args=(i,)) for i in range(spec["count"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": lat, "statuses": statuses, "errors": errors[:5], "cpu": time.process_time()}


# -- scenarios


class Roller(RollerProcess):
    """roller as the README runs it: C{twistd -n --logger roller.logs.observer roller ...} (info and above)."""

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("--pidfile=") + 1
        return cmd[:i] + ["--logger", "roller.logs.observer"] + cmd[i:]


def roller_run(procs: Procs, workdir: str, name: str, fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    """Import the fleet into a fresh roller, reboot every machine at once, watch it."""
    state = os.path.join(workdir, f"{name}-state")
    os.makedirs(state)
    config = os.path.join(state, "roller.toml")
    with open(config, "w") as f:
        f.write(ROLLER_CONFIG.format(
            secrets=fleet.secrets, known_hosts=fleet.known_hosts_openssh, max_running=max(fleet.count, 1),
            connect_timeout=f"{args.connect_timeout:g}", down_timeout=f"{args.down_timeout:g}",
            up_timeout=f"{args.up_timeout:g}", poll=f"{args.poll:g}"))
    roller = Roller(["--auth", "none", "--config", config], state_dir=state,
                           log_path=os.path.join(workdir, f"{name}-roller.log"))
    view = args.viewers if name == "roller" else 0
    if view:  # a dashboard account for the viewers
        subprocess.run([sys.executable, "-m", "roller.cli", "--state-dir", state, "--config", config, "user", "add",
                        VIEWER, "--role", "viewer", "--password-stdin"], input=VIEWER_PASSWORD + "\n", text=True,
                       env=roller_env(), cwd=state, check=True, stdout=subprocess.DEVNULL)
    roller.start(timeout=60)
    out: dict[str, Any] = {"name": name, "count": fleet.count, "hung": fleet.hang}
    sampler_proc = viewers_proc = None
    try:
        api = Http(roller.port)
        t = time.monotonic()
        parallel(lambda m: api.json("POST", "/api/v1/machines", m, expect=(201,)), fleet.inventory)
        out["import_s"] = time.monotonic() - t
        t_import = time.monotonic()
        cpu_roller0, cpu_fleet0 = cpu_seconds(roller.pid), fleet.cpu()
        busy0, own0, steal0 = machine_busy(), time.process_time(), machine_steal()

        # The sampler runs from before the first POST; it GETs the jobs created so
        # far, whose ids are appended to a file as their POSTs are answered.
        ids_file = os.path.join(state, "job_ids")
        open(ids_file, "w").close()
        sampler_proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--sampler",
             json.dumps({"port": roller.port, "ids_file": ids_file, "rate": args.rate})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.procs.append(sampler_proc)
        if view:
            viewers_proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--viewers-proc",
                 json.dumps({"port": roller.port, "count": view, "interval": args.viewer_interval})],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.procs.append(viewers_proc)
        time.sleep(0.5 if not view else 2.0)  # the sampler's interpreter starts (and the viewers sign in)
        workers = [m["worker_id"] for m in fleet.inventory]
        lock = threading.Lock()

        post_latencies: list[float] = []
        with open(ids_file, "a") as ids_out:
            def post(worker: str) -> str:
                t = time.monotonic()
                task_id = api.json("POST", f"/api/v1/workers/{worker}/group/sim/jobs?task_name=reboot",
                                   expect=(201,))["task_id"]
                with lock:
                    post_latencies.append(time.monotonic() - t)
                    ids_out.write(task_id + "\n")
                    ids_out.flush()
                return task_id

            t0_wall, t0 = time.time(), time.monotonic()
            ids = parallel(post, workers)
        out["submit_s"] = time.monotonic() - t0
        out["post_p50_ms"] = 1000 * percentile(post_latencies, 0.50)
        out["post_p99_ms"] = 1000 * percentile(post_latencies, 0.99)

        # Wait until nothing is queued or running (heartbeat: in-memory counts).
        limit = args.down_for + args.reboot_delay + args.up_timeout + args.down_timeout + 120
        progress_at = time.monotonic()
        while True:
            hb = api.json("GET", "/__heartbeat__")["queue"]
            now = time.monotonic()
            if hb["running"] == 0 and hb["queued"] == 0:
                break
            if now - t0 > limit:
                out["stuck"] = hb
                break
            if now >= progress_at:
                print(f"    {now - t0:5.1f} s: running {hb['running']}, queued {hb['queued']}", flush=True)
                progress_at = now + 5
            time.sleep(0.25)
        out["observed_s"] = time.monotonic() - t0
        out["roller_cpu_s"] = cpu_seconds(roller.pid) - cpu_roller0
        out["fleet_cpu_s"] = fleet.cpu() - cpu_fleet0
        out["roller_peak_rss_mb"] = peak_rss_mb(roller.pid)
        busy, own, elapsed = machine_busy() - busy0, time.process_time() - own0, time.monotonic() - t_import

        sampler_out, _ = sampler_proc.communicate("stop\n", timeout=60)
        procs.procs.remove(sampler_proc)
        s = json.loads(sampler_out)
        viewers_cpu = 0.0
        if viewers_proc is not None:
            viewers_out, _ = viewers_proc.communicate("stop\n", timeout=120)
            procs.procs.remove(viewers_proc)
            v = json.loads(viewers_out)
            viewers_cpu = v["cpu"]
            out["viewers"] = {"count": view, "interval": args.viewer_interval, "n": len(v["latencies"]),
                              "p50_ms": 1000 * percentile(v["latencies"], 0.50),
                              "p99_ms": 1000 * percentile(v["latencies"], 0.99),
                              "max_ms": 1000 * max(v["latencies"], default=float("nan")),
                              "statuses": v["statuses"], "errors": v["errors"]}
        # the bench's clients: this process (POSTs, heartbeat polls), the sampler and the viewers
        out["bench_cpu_s"] = own + s["cpu"] + viewers_cpu
        # CPU the rest of the machine used meanwhile (other people's work)
        out["others_cores"] = max(0.0, busy - out["roller_cpu_s"] - out["fleet_cpu_s"] - out["bench_cpu_s"]) / elapsed
        out["steal_cores"] = (machine_steal() - steal0) / elapsed  # part of "others": the hypervisor's
        out["sampler"] = {k: v for k, v in s.items() if k != "latencies"}
        out["get_n"] = len(s["latencies"])
        out["get_p50_ms"] = 1000 * percentile(s["latencies"], 0.50)
        out["get_p99_ms"] = 1000 * percentile(s["latencies"], 0.99)
        out["get_max_ms"] = 1000 * max(s["latencies"], default=float("nan"))

        # Final states and times, from roller's own records.
        jobs = parallel(lambda i: api.json("GET", f"/api/v1/jobs/{i}"), ids, workers=8)
        states: dict[str, int] = {}
        for j in jobs:
            states[j["state"]] = states.get(j["state"], 0) + 1
        out["states"] = states
        finished = [datetime.fromisoformat(j["finished"]).timestamp() for j in jobs if j["finished"]]
        ok = [j for j in jobs if j["state"] == "succeeded"]
        failed = [j for j in jobs if j["state"] != "succeeded"]
        out["all_final"] = all(j["state"] in FINAL for j in jobs)
        out["wall_s"] = (max(finished) - t0_wall) if len(finished) == len(jobs) else float("nan")
        out["ok_wall_s"] = (max(datetime.fromisoformat(j["finished"]).timestamp() for j in ok) - t0_wall
                            if ok else float("nan"))
        out["ok_duration_p50_s"] = percentile([j["duration_s"] for j in ok], 0.5)
        out["ok_duration_max_s"] = max((j["duration_s"] for j in ok), default=float("nan"))
        out["failed_duration_max_s"] = max((j["duration_s"] or 0 for j in failed), default=float("nan"))
        out["failed_examples"] = sorted({(j["error"] or "")[:160] for j in failed})[:3]
        hung_ids = {m["worker_id"] for m in fleet.inventory if "hang" in m["tags"]}
        out["hung_failed"] = sum(1 for j in jobs if j["worker_id"] in hung_ids and j["state"] == "failed")
        out["normal_succeeded"] = sum(1 for j in jobs if j["worker_id"] not in hung_ids and j["state"] == "succeeded")
        out["errors_in_log"] = roller.log_text().count("Traceback")
    finally:
        for proc in (sampler_proc, viewers_proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        roller.stop(timeout=30)
    return out


def tcp_alive(ip: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


def seed_reboot(fleet: Fleet, ip: str, args: argparse.Namespace) -> dict[str, Any]:
    """The seed's worker: ssh ... reboot, then block polling TCP every second until down, then up."""
    t0 = time.monotonic()
    argv = ["ssh", "-F", "/dev/null", "-i", fleet.key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={fleet.known_hosts_openssh}", "-o", "StrictHostKeyChecking=yes",
            "-o", f"ConnectTimeout={args.connect_timeout:g}", "-o", "LogLevel=ERROR",
            "-p", str(fleet.port), f"roller@{ip}", "reboot"]
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    ssh_s = time.monotonic() - t0
    if r.returncode not in (0, 255):
        return {"ok": False, "error": f"ssh exit {r.returncode}: {r.stderr.strip()[:200]}", "total_s": ssh_s}
    for want, limit in ((False, args.down_timeout), (True, args.up_timeout)):
        start = time.monotonic()
        while tcp_alive(ip, fleet.port) is not want:
            if time.monotonic() - start > limit:
                return {"ok": False, "error": f"not {'up' if want else 'down'} within {limit:g} s",
                        "total_s": time.monotonic() - t0}
            time.sleep(1.0)
    return {"ok": True, "ssh_s": ssh_s, "total_s": time.monotonic() - t0}


def seed_run(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    sample = [m["ip"] for m in fleet.inventory if "hang" not in m["tags"]][:args.seed_sample]
    # the roller run left every machine up again; make sure before timing
    deadline = time.monotonic() + args.up_timeout
    while not all(tcp_alive(ip, fleet.port) for ip in sample):
        if time.monotonic() > deadline:
            raise SystemExit("seed run: the fleet did not come back up after the roller run")
        time.sleep(0.5)
    t0 = time.monotonic()
    results = parallel(lambda ip: seed_reboot(fleet, ip, args), sample, workers=args.seed_workers)
    wall = time.monotonic() - t0
    ok = [r for r in results if r["ok"]]
    mean = sum(r["total_s"] for r in results) / len(results)
    rounds = math.ceil(args.count / args.seed_workers)
    return {
        "sample": len(sample), "workers": args.seed_workers, "wall_s": wall, "ok": len(ok),
        "mean_s": mean, "ssh_mean_s": sum(r["ssh_s"] for r in ok) / len(ok) if ok else float("nan"),
        "projected_s": rounds * mean, "errors": [r["error"] for r in results if not r["ok"]][:3],
    }


def xargs_run(fleet: Fleet, workdir: str, args: argparse.Namespace) -> dict[str, Any]:
    """The baseline: C{xargs -P 64 ssh ... reboot} beside one asyncio TCP poll loop."""
    ips = [m["ip"] for m in fleet.inventory if "hang" not in m["tags"]]
    deadline = time.monotonic() + args.up_timeout
    while not all(tcp_alive(ip, fleet.port) for ip in ips):  # the roller run left every machine up again
        if time.monotonic() > deadline:
            raise SystemExit("xargs run: the fleet did not come back up after the roller run")
        time.sleep(0.5)
    hosts = os.path.join(workdir, "xargs-hosts")
    with open(hosts, "w") as f:
        f.write("".join(f"roller@{ip}\n" for ip in ips))
    ssh = ["ssh", "-F", "/dev/null", "-i", fleet.key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
           "-o", f"UserKnownHostsFile={fleet.known_hosts_openssh}", "-o", "StrictHostKeyChecking=yes",
           "-o", "KexAlgorithms=curve25519-sha256", "-o", f"ConnectTimeout={args.connect_timeout:g}",
           "-o", "LogLevel=ERROR", "-p", str(fleet.port)]
    # ssh exits 255 when the simulated machine drops the connection as it reboots: not an error here
    # each command prints its host once its ssh returned: the reboot was sent (or failed) then
    argv = ["xargs", "-P", str(args.xargs_parallel), "-I{}", "sh", "-c",
            " ".join(ssh) + " {} reboot; echo {}"]
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    with open(hosts) as stdin:
        xargs = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ended: list[float] = []
        err: list[str] = []
        errors = threading.Thread(target=lambda: err.append(xargs.stderr.read()), daemon=True)  # type: ignore[union-attr]
        errors.start()
        seen = asyncio.run(_poll_all(ips, fleet.port, poll=1.0, down_timeout=args.down_timeout + 300,
                                     up_timeout=args.up_timeout, sent_from=xargs.stdout, ended=ended))
        xargs.wait(600)
        errors.join(60)
    xargs_s = (ended[0] if ended else time.monotonic()) - t0
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    ups = [t - t0 for t in seen.values() if t is not None]
    return {
        "count": len(ips), "verified": len(ups), "wall_s": max(ups) if ups else float("nan"),
        "xargs_s": xargs_s, "xargs_exit": xargs.returncode, "errors": "".join(err).strip().splitlines()[:3],
        "ssh_cpu_s": (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime),
        "poll_cpu_s": (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime),
    }


async def _poll_all(ips: list[str], port: int, *, poll: float, down_timeout: float, up_timeout: float,
                    sent_from: Any, ended: list[float]) -> dict[str, float | None]:
    """
    Poll every machine at once, each from one C{poll} interval after its
    host (C{user@ip}) was read from C{sent_from} (the reboot was sent): when
    (monotonic) each was seen up after having been seen down.  The time
    C{sent_from} ends is appended to C{ended}.
    """
    loop = asyncio.get_running_loop()
    sent = {ip: asyncio.Event() for ip in ips}

    def read_sent() -> None:
        for line in sent_from:
            event = sent.get(line.strip().rpartition("@")[2])
            if event is not None:
                loop.call_soon_threadsafe(event.set)
        ended.append(time.monotonic())
        for event in sent.values():  # a host never printed: xargs is over, so is its reboot
            loop.call_soon_threadsafe(event.set)

    threading.Thread(target=read_sent, daemon=True).start()

    async def alive(ip: str) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout=1.0)
        except OSError:  # refused, unreachable, or the 1 s timeout (TimeoutError)
            return False
        writer.close()
        return True

    async def one(ip: str) -> tuple[str, float | None]:
        await sent[ip].wait()
        await asyncio.sleep(poll)  # it was up a moment ago: the first look is one interval later
        for want, limit in ((False, down_timeout), (True, up_timeout)):
            start = time.monotonic()
            while await alive(ip) is not want:
                if time.monotonic() - start > limit:
                    return ip, None
                await asyncio.sleep(poll)
        return ip, time.monotonic()

    return dict(await asyncio.gather(*(one(ip) for ip in ips)))


# -- main


def fmt_s(s: float) -> str:
    if s != s:
        return "n/a"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.0f} min"
    return f"{s:.1f} s"


def describe(r: dict[str, Any]) -> str:
    return (f"  {r['name']}: {r['count']} machines ({r['hung']} hung) imported in {r['import_s']:.1f} s; "
            f"{r['count']} jobs POSTed in {r['submit_s']:.1f} s ({r['count'] / r['submit_s']:.0f}/s, 32 connections, "
            f"POST p50 {r['post_p50_ms']:.0f} ms p99 {r['post_p99_ms']:.0f} ms); all ended after {fmt_s(r['wall_s'])} "
            f"(observed {fmt_s(r['observed_s'])}); states {r['states']}; succeeded job duration p50 "
            f"{r['ok_duration_p50_s']:.1f} s max {r['ok_duration_max_s']:.1f} s; GET /api/v1/jobs/<id> "
            f"x{r['get_n']} p50 {r['get_p50_ms']:.1f} ms p99 {r['get_p99_ms']:.1f} ms max {r['get_max_ms']:.0f} ms "
            f"(late {r['sampler']['late']}, statuses {r['sampler']['statuses']}; slowest (s after the "
            f"first job was created, ms) {r['sampler']['slowest']}); CPU roller "
            f"{r['roller_cpu_s']:.1f} s ({1000 * r['roller_cpu_s'] / r['count']:.2f} ms per job) fleet {r['fleet_cpu_s']:.1f} s bench clients {r['bench_cpu_s']:.1f} s, "
            f"others {r['others_cores']:.2f} cores (of which stolen by the hypervisor {r.get('steal_cores', 0.0):.2f}); "
            f"roller peak RSS "
            f"{r['roller_peak_rss_mb']:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="machines per fleet (1000)")
    parser.add_argument("--down-for", type=float, default=10.0, help="seconds a machine stays down (10)")
    parser.add_argument("--reboot-delay", type=float, default=1.0, help="seconds from reboot to down (1)")
    parser.add_argument("--seed-sample", type=int, default=40, help="machines rebooted the seed's way (40)")
    parser.add_argument("--seed-workers", type=int, default=4, help="the seed's worker pool (4)")
    parser.add_argument("--hung", type=float, default=10.0, help="percent of hung machines in scenario 3 (10)")
    parser.add_argument("--rate", type=float, default=20.0, help="GET /api/v1/jobs/<id> per second (20)")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="SSH connect timeout (10)")
    parser.add_argument("--poll", type=float, default=1.0, help="roller's reboot.poll_interval (1)")
    parser.add_argument("--xargs-parallel", type=int, default=64, help="the xargs baseline's -P (64)")
    parser.add_argument("--skip", default="", help="comma-separated scenarios to skip: roller,seed,hung,xargs")
    parser.add_argument("--quick", action="store_true", help="smoke run, about 1 min: 100 machines, down 3 s")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    parser.add_argument("--viewers", type=int, default=0,
                        help="dashboard viewers on the fleet page during scenario 1 (0; the goal: 20)")
    parser.add_argument("--viewer-interval", type=float, default=5.0, help="seconds between a viewer's views (5)")
    parser.add_argument("--sampler", help=argparse.SUPPRESS)
    parser.add_argument("--viewers-proc", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if child_mode(args.sampler, sampler) or child_mode(args.viewers_proc, viewers):
        return
    if args.quick:
        args.count = min(args.count, 100)
        args.down_for = min(args.down_for, 3.0)
        args.seed_sample = min(args.seed_sample, 8)
        args.connect_timeout = min(args.connect_timeout, 5.0)
    args.down_timeout = args.reboot_delay + 30
    args.up_timeout = args.down_for + 30
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    hung = round(args.count * args.hung / 100)
    target = args.down_for + args.reboot_delay + 20

    workdir = tempfile.mkdtemp(prefix="roller-fanout-")
    procs = Procs(stop_timeout=20)
    print(f"roller fan-out bench: {os.cpu_count()} CPUs, {args.count} machines, down {args.down_for:g} s "
          f"after {args.reboot_delay:g} s, poll {args.poll:g} s; work dir {workdir}", flush=True)
    results: dict[str, Any] = {}
    try:
        if not {"roller", "seed", "xargs"} <= skip:
            fleet = Fleet(procs, workdir, "fleet", args.count, "127.0.5.", args.down_for, args.reboot_delay)
            print(f"  fleet of {args.count} up in {fleet.started_in:.1f} s on 127.0.5.x:{fleet.port}", flush=True)
            if "roller" not in skip:
                results["roller"] = r = roller_run(procs, workdir, "roller", fleet, args)
                print(describe(r), flush=True)
            if "seed" not in skip:
                results["seed"] = s = seed_run(fleet, args)
                print(f"  seed model: {s['sample']} machines, {s['workers']} workers: {s['wall_s']:.1f} s, "
                      f"{s['ok']} ok; mean {s['mean_s']:.1f} s per reboot (ssh {s['ssh_mean_s']:.2f} s); "
                      f"projected for {args.count}: {fmt_s(s['projected_s'])}"
                      + (f"; errors {s['errors']}" if s["errors"] else ""), flush=True)
            if "xargs" not in skip:
                results["xargs"] = x = xargs_run(fleet, workdir, args)
                print(f"  xargs -P {args.xargs_parallel} ssh + asyncio poll: {x['verified']}/{x['count']} verified "
                      f"after {fmt_s(x['wall_s'])} (xargs done after {x['xargs_s']:.1f} s, exit {x['xargs_exit']}); "
                      f"CPU ssh {x['ssh_cpu_s']:.1f} s, poll loop {x['poll_cpu_s']:.1f} s"
                      + (f"; stderr {x['errors']}" if x["errors"] else ""), flush=True)
            fleet.stop()
        if "hung" not in skip:
            fleet = Fleet(procs, workdir, "fleet-hung", args.count, "127.0.9.", args.down_for, args.reboot_delay,
                          hang=hung)
            print(f"  fleet of {args.count} ({hung} hung) up in {fleet.started_in:.1f} s on 127.0.9.x:{fleet.port}",
                  flush=True)
            results["hung"] = r = roller_run(procs, workdir, "hung", fleet, args)
            print(describe(r), flush=True)
            fleet.stop()
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    problems = []
    print()
    print(f"{'fan-out: ' + str(args.count) + ' reboots':<36} {'wall':>9} {'GET p50':>8} {'GET p99':>8}  result")
    if "roller" in results:
        r = results["roller"]
        print(f"{'roller, all at once':<36} {fmt_s(r['wall_s']):>9} {r['get_p50_ms']:6.1f}ms {r['get_p99_ms']:6.1f}ms"
              f"  {r['states'].get('succeeded', 0)}/{r['count']} verified (target <= {target:g} s, p99 < 100 ms)")
        print(f"{'  submissions':<36} {r['count'] / r['submit_s']:7.0f}/s {r['post_p50_ms']:6.1f}ms "
              f"{r['post_p99_ms']:6.1f}ms  {r['count']} POSTs in {r['submit_s']:.1f} s over 32 connections "
              f"(p50/p99 of a POST)")
        print(f"{'  roller CPU per reboot':<36} {1000 * r['roller_cpu_s'] / r['count']:7.2f}ms {'':>8} {'':>8}  "
              f"{r['roller_cpu_s']:.1f} s of roller CPU / {r['count']} reboots, from after the import to the end "
              f"(submissions, SSH, liveness polls, the store, the sampler's GETs)")
        if r["states"].get("succeeded", 0) != r["count"]:
            problems.append(f"roller run: states {r['states']}: {r['failed_examples']}")
        if not r["wall_s"] <= target:
            problems.append(f"roller run: {fmt_s(r['wall_s'])} > target {target:g} s")
        if not r["get_p99_ms"] < 100:
            problems.append(f"roller run: GET p99 {r['get_p99_ms']:.0f} ms >= 100 ms")
        if "viewers" in r:
            v = r["viewers"]
            label = f"  with {v['count']} viewers every {v['interval']:g} s"
            print(f"{label:<36} {'':>9} {v['p50_ms']:6.1f}ms {v['p99_ms']:6.1f}ms  fleet page (/), {v['n']} views, "
                  f"max {v['max_ms']:.0f} ms; the API's GET p99 above is under this load")
            if set(v["statuses"]) != {"200"} or v["errors"]:
                problems.append(f"viewers: statuses {v['statuses']} errors {v['errors']}")
    if "seed" in results:
        s = results["seed"]
        label = f"seed: {s['workers']} workers x ssh, projected"
        print(f"{label:<36} {fmt_s(s['projected_s']):>9} {'':>8} {'':>8}  from {s['sample']} machines in "
              f"{fmt_s(s['wall_s'])} ({s['mean_s']:.1f} s each)")
        if "roller" in results and results["roller"]["states"].get("succeeded") == results["roller"]["count"]:
            print(f"{'  roller speed-up':<36} {s['projected_s'] / results['roller']['wall_s']:8.0f}x")
        if s["ok"] != s["sample"]:
            problems.append(f"seed run: {s['sample'] - s['ok']} failed: {s['errors']}")
    if "xargs" in results:
        x = results["xargs"]
        label = f"xargs -P {args.xargs_parallel} ssh + asyncio poll"
        print(f"{label:<36} {fmt_s(x['wall_s']):>9} {'':>8} {'':>8}  {x['verified']}/{x['count']} verified; CPU "
              f"{x['ssh_cpu_s'] + x['poll_cpu_s']:.1f} s")
        if "roller" in results and results["roller"]["states"].get("succeeded") == results["roller"]["count"]:
            r = results["roller"]
            print(f"{'  roller vs xargs + asyncio':<36} {x['wall_s'] / r['wall_s']:8.2f}x wall, "
                  f"{(x['ssh_cpu_s'] + x['poll_cpu_s']) / r['roller_cpu_s']:.2f}x less CPU")
        if x["verified"] != x["count"]:
            problems.append(f"xargs run: {x['count'] - x['verified']} machines not seen down and up again")
    if "hung" in results:
        r = results["hung"]
        label = f"roller, {r['hung']} hung ({args.hung:g}%)"
        print(f"{label:<36} {fmt_s(r['wall_s']):>9} {r['get_p50_ms']:6.1f}ms {r['get_p99_ms']:6.1f}ms"
              f"  {r['normal_succeeded']} verified, {r['hung_failed']}/{r['hung']} hung failed; every job ended: "
              f"{'yes' if r['all_final'] else 'NO'} (target: all end, p99 < 100 ms)")
        if not r["all_final"] or r.get("stuck"):
            problems.append(f"hung run: not every job ended: {r['states']} {r.get('stuck')}")
        if r["hung_failed"] != r["hung"] or r["normal_succeeded"] != r["count"] - r["hung"]:
            problems.append(f"hung run: states {r['states']}: {r['failed_examples']}")
        if not r["get_p99_ms"] < 100:
            problems.append(f"hung run: GET p99 {r['get_p99_ms']:.0f} ms >= 100 ms")
    for name in ("roller", "hung"):
        if name in results and results[name]["errors_in_log"]:
            problems.append(f"{name} run: {results[name]['errors_in_log']} tracebacks in roller's log (--keep)")
    others = max((results[n]["others_cores"] for n in ("roller", "hung") if n in results), default=0.0)
    if others > 0.25:
        steal = max((results[n].get("steal_cores", 0.0) for n in ("roller", "hung") if n in results), default=0.0)
        print(f"NOTE: other processes used up to {others:.2f} of {os.cpu_count()} CPUs during the runs (the "
              f"hypervisor's steal up to {steal:.2f}): the figures are noisy (a quiet machine, or run again)")
    report(problems)


if __name__ == "__main__":
    main()
