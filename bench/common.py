"""
Helpers shared by the benchmark scripts in this directory (submit.py,
fanout.py, dashboard.py, ssh.py): child processes with logs, ports and
readiness, CPU figures from /proc, the environment of a roller child, a
percentile, the end-of-run report, and seeding roller's database.

The scripts run as C{python bench/X.py}, so this directory is first on
C{sys.path} and they C{from common import ...}.  This module needs only the
stdlib; roller is imported only by the seeding code, which runs in its own
process (C{python bench/common.py seed ...}, see L{seed_db}).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: C{twistd -n} from this interpreter, no pid file; a plugin and its options follow.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
#: roller as the README's C{make run} starts it (its own log observer: info and above).
ROLLER_TWISTD = [*TWISTD, "--logger", "roller.logs.observer", "roller"]


# -- child processes


class Procs:
    """Child processes, each stopped (TERM, then KILL after C{stop_timeout} s) by its own pid."""

    def __init__(self, stop_timeout: float = 15) -> None:
        self.procs: list[subprocess.Popen] = []
        self.stop_timeout = stop_timeout

    def start(self, argv: list[str], log_path: str, **kw: Any) -> subprocess.Popen:
        """Start C{argv} (C{kw}: Popen's, e.g. cwd, env), stdout and stderr to C{log_path}."""
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now on C{host}."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tail(path: str, lines: int = 20) -> str:
    """The last C{lines} lines of a log file ("" if it cannot be read)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def fetch(port: int, path: str, timeout: float = 60) -> tuple[int, bytes]:
    """GET C{path} from 127.0.0.1:C{port} on a new connection: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen, port: int, path: str, log_path: str, timeout: float = 30.0) -> None:
    """Wait until C{proc} answers GET C{path} on C{port}; SystemExit if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log_path}:\n{tail(log_path)}")
        try:
            fetch(port, path, timeout=2)
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server not ready on port {port} after {timeout:g} s; see {log_path}")


def roller_env() -> dict[str, str]:
    """This environment without ROLLER_* variables, with the repository first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLER_")}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# -- /proc


def _stat_seconds(path: str, first: int, last: int) -> float:
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[first:last]) / CLK_TCK


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of process C{pid} (or of its thread C{tid}), in seconds; 0 if it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    return _stat_seconds(path, 11, 13)


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process plus its reaped children (utime, stime, cutime, cstime)."""
    return _stat_seconds(f"/proc/{pid}/stat", 11, 15)


def machine_busy() -> float:
    """CPU seconds all CPUs of the machine have spent not idle since boot (steal included)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def machine_steal() -> float:
    """
    CPU seconds the hypervisor gave this virtual machine's CPUs to others
    since boot (/proc/stat "steal"): when it grows during a run, the run's
    figures measure a slower machine, whatever roller does.
    """
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return fields[7] / CLK_TCK if len(fields) > 7 else 0.0


# -- figures and the report


def percentile(values: list[float], p: float) -> float:
    """The value at rank int(n * p) of the sorted values (p from 0 to 1); NaN if there are none."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def child_mode(spec: str | None, fn: Callable[[dict[str, Any]], Any]) -> bool:
    """
    A script's hidden helper mode (C{--loadgen SPEC} and the like): if C{spec}
    is given, write C{fn(json.loads(spec))} as JSON to stdout and return True.
    """
    if not spec:
        return False
    json.dump(fn(json.loads(spec)), sys.stdout)
    return True


def report(problems: list[str]) -> None:
    """Print a PROBLEM line for each problem; exit with status 1 if there is any."""
    for p in problems:
        print(f"PROBLEM: {p}")
    if problems:
        raise SystemExit(1)


# -- roller's database


def seed_db(db_path: str, prefix: str, count: int, jobs: bool = False, **kw: Any) -> None:
    """
    Write machines C{prefix}0 .. C{prefix}<count-1> (group "bench", IPs
    127.0.x.y) to roller's database at C{db_path} through roller's own store,
    in a process of its own (C{kw}: subprocess.run's, e.g. env, cwd; env
    must put roller on PYTHONPATH).  With C{jobs}, also one finished ping job
    per machine: every 10th failed, the rest succeeded.
    """
    argv = [sys.executable, os.path.abspath(__file__), "seed", db_path, prefix, str(count)]
    subprocess.run(argv + (["--jobs"] if jobs else []), check=True, **kw)


def bench_ip(i: int) -> str:
    """The IP address of bench machine C{i}: 127.0.x.y, loopback only."""
    return f"127.0.{(i // 250) % 250}.{i % 250 + 1}"


async def seed(reactor: Any, path: str, prefix: str, count: int, jobs: bool) -> None:
    """The work of L{seed_db}, on C{reactor}."""
    from roller.inventory import Machine
    from roller.jobs import Job, State, new_job_id
    from roller.store import open_store

    store = await open_store(path, reactor)
    try:
        machines = [Machine.from_json({"worker_id": f"{prefix}{i}", "worker_group": "bench", "ip": bench_ip(i)})
                    for i in range(count)]
        await store.machines.put_many(machines)
        if not jobs:
            return
        now = time.time()
        for i, m in enumerate(machines):
            created = now - 3600 + i * 0.5
            failed = i % 10 == 0
            job = Job(id=new_job_id(), task_name="ping", worker_id=m.worker_id, worker_group=m.worker_group,
                      created_at=created, params={"count": 3}, requester="bench", origin_ip="127.0.0.1",
                      state=State.failed if failed else State.succeeded, started_at=created + 0.05,
                      finished_at=created + 2.1,
                      result=None if failed else "3/3 replies, rtt 0.05 ms",
                      error=f"no reply from {m.ip} (3 pings)" if failed else None)
            await store.jobs.insert(job)
    finally:
        await store.close()


if __name__ == "__main__" and sys.argv[1:2] == ["seed"]:
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    _path, _prefix, _count = sys.argv[2], sys.argv[3], int(sys.argv[4])
    _jobs = "--jobs" in sys.argv[5:]
    task.react(lambda reactor: ensureDeferred(seed(reactor, _path, _prefix, _count, _jobs)))
