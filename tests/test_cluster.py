"""
Several rollers on one PostgreSQL database (roller.cluster): two real
twistd rollers on the test server share the inventory and the queue.

The burst: 250 machines (loopback addresses, ICMP), a ping for every
machine submitted through each roller (500 submissions, two per machine
racing for it; one for a machine whose ping is already queued or running
on the roller asked is answered 200 with that job), roller A (at most 20
jobs at once, so its backlog waits in the shared queue) killed with
C{kill -9} in the middle.  Checked from the
database afterwards: every job answered 201 ended (none lost, none left
queued or running), none ran twice (one "running" event each), no machine
ran two jobs at once (from the recorded start and end times), A's queued
jobs ran on B, and A's running jobs were marked interrupted by B within
C{cluster.takeover_after} plus one heartbeat.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from roller.testing.postgres import PostgresServer, pg_rows
from roller.testing.process import RollerProcess, ping_skip_reason, wait_for

pytestmark = pytest.mark.skipif(ping_skip_reason() is not None, reason=ping_skip_reason() or "")

TAKEOVER_AFTER = 3.0
MACHINES = 250


def cluster_env(url: str, **extra: str) -> dict[str, str]:
    return {"ROLLER_DATABASE_URL": url, "ROLLER_CLUSTER_TAKEOVER_AFTER": str(TAKEOVER_AFTER),
            "ROLLER_CLUSTER_POLL_INTERVAL": "0.2", **extra}


def machine_json(i: int) -> dict[str, Any]:
    return {"worker_id": f"cl-{i:03d}", "worker_group": "cl", "ip": f"127.0.{10 + i // 200}.{1 + i % 200}"}


def submit(roller: RollerProcess, i: int) -> Any:
    try:
        return roller.post(f"/api/v1/workers/cl-{i:03d}/group/cl/jobs?task_name=ping", {"params": {"count": 2}},
                           timeout=30)
    except OSError as e:
        return e


def test_500_jobs_through_two_rollers_while_one_is_killed(postgres_server: PostgresServer, tmp_path: Path) -> None:
    url = postgres_server.create_database()
    # as if on two hosts: A's death is seen from its silence alone
    # A runs at most 20 jobs at once: the rest of its submissions wait in the shared queue, where B takes them
    a = RollerProcess(["--auth", "none"], state_dir=tmp_path / "a",
                      env=cluster_env(url, ROLLER_CLUSTER_HOST="host-a", ROLLER_QUEUE_MAX_RUNNING="20"))
    b = RollerProcess(["--auth", "none"], state_dir=tmp_path / "b", env=cluster_env(url, ROLLER_CLUSTER_HOST="host-b"))
    try:
        a.start(timeout=30)
        b.start(timeout=30)
        for i in range(MACHINES):
            a.json("POST", "/api/v1/machines", machine_json(i), expect=201)
        last = f"/api/v1/machines/cl/cl-{MACHINES - 1:03d}"
        wait_for(lambda: b.get(last).status == 200, 30, "roller B to see the machines roller A added")

        accepted: dict[str, tuple[str, int]] = {}  # job id -> (roller, machine)
        answers: Counter[str] = Counter()
        lock = threading.Lock()
        killed_at: list[float] = []

        def burst(roller: RollerProcess, name: str, machines: range) -> None:
            for i in machines:
                r, label = submit(roller, i), name
                if isinstance(r, OSError):  # A is gone: the rest of its burst goes through B
                    with lock:
                        answers[f"{name}:refused"] += 1
                    r, label = submit(b, i), "a->b"
                    assert not isinstance(r, OSError), r
                with lock:
                    answers[f"{label}:{r.status}"] += 1
                    if r.status == 201:
                        accepted[r.json()["task_id"]] = (label, i)

        def kill_a_midway() -> None:
            wait_for(lambda: answers["a:201"] >= MACHINES // 2, 60, "half of A's submissions")
            killed_at.append(time.time())
            a.kill()

        threads = [threading.Thread(target=burst, args=(a, "a", range(MACHINES))),
                   threading.Thread(target=burst, args=(b, "b", range(MACHINES - 1, -1, -1))),
                   threading.Thread(target=kill_a_midway)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert killed_at, answers
        # every submission was answered 201, or 200 with the same task already queued there for the machine
        assert answers["b:201"] + answers["b:200"] == MACHINES, answers
        assert answers["a:201"] + answers["a:200"] + answers["a->b:201"] + answers["a->b:200"] == MACHINES, answers
        assert answers["a:201"] >= MACHINES // 2 and answers["a:refused"] > 0, answers
        # (200: that machine had a ping queued or running already, held by the roller asked: that job is the answer;
        # so every machine got at least one new job, whichever roller and however the two bursts crossed)
        assert len(accepted) == answers["a:201"] + answers["b:201"] + answers["a->b:201"], answers
        assert {i for _, i in accepted.values()} == set(range(MACHINES)), answers

        def all_ended() -> bool:
            rows = pg_rows(url, "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
            return rows == [(0,)]

        wait_for(all_ended, 60, "every job to end", interval=0.2,
                 describe=lambda: str(pg_rows(url, "SELECT state, roller_id, count(*) FROM jobs GROUP BY 1, 2")))

        rows = pg_rows(url, "SELECT id, worker_id, state, started_at, finished_at, roller_id, error FROM jobs")
        jobs = {r[0]: r for r in rows}
        # none lost: every job answered 201 is there, ended
        assert set(accepted) <= set(jobs), set(accepted) - set(jobs)
        states = Counter(r[2] for r in rows)
        assert set(states) <= {"succeeded", "interrupted"}, states
        # none ran twice
        running = Counter(job_id for (job_id,) in pg_rows(
            url, "SELECT job_id FROM job_events WHERE kind = 'state' AND message = 'running'"))
        assert max(running.values()) == 1, running.most_common(3)
        # no machine ran two jobs at once
        by_machine: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for _, worker, _, started, finished, _, _ in rows:
            if started is not None:
                by_machine[worker].append((started, finished))
        for worker, spans in by_machine.items():
            spans.sort()
            for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False):
                assert s2 >= e1, (worker, spans)
        # A's running jobs: interrupted by B, within takeover_after and a heartbeat of the kill
        rollers = {r[5] for r in rows if r[5]}
        assert len(rollers) == 2, rollers
        interrupted = [r for r in rows if r[2] == "interrupted"]
        for r in interrupted:
            assert "no heartbeat" in r[6], r
            assert r[4] - killed_at[0] <= TAKEOVER_AFTER * 4 / 3 + 2.0, (r, killed_at)
        # A's queued jobs ran on B
        from_a = [j for j, (name, _) in accepted.items() if name == "a"]
        assert len(from_a) == answers["a:201"]
        ran_on_b = [j for j in from_a if jobs[j][2] == "succeeded" and jobs[j][5] not in (None,)
                    and jobs[j][5].startswith("host-b/")]
        assert ran_on_b, "no job submitted to A ran on B"
        assert pg_rows(url, "SELECT count(*) FROM rollers") == [(1,)]  # A left the table (taken over)
        log = b.log_text()
        assert "Traceback" not in log, b.log_tail(120)
        assert "Took over roller" in log, b.log_tail(80)
        print(dict(answers), dict(states), len(interrupted), "interrupted;", len(ran_on_b), "of A's ran on B")
    except BaseException:
        print(a.log_tail(80))
        print(b.log_tail(120))
        raise
    finally:
        a.close()
        b.close()


def test_a_job_submitted_on_one_roller_runs_on_another_and_is_seen_live_reach_and_cancel(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    url = postgres_server.create_database()
    # A reaches no group of this fleet: every job runs on B, which reaches "cl" only
    a = RollerProcess(["--auth", "none"], state_dir=tmp_path / "a",
                      env=cluster_env(url, ROLLER_CLUSTER_HOST="host-a", ROLLER_CLUSTER_REACH="nowhere"))
    b = RollerProcess(["--auth", "none"], state_dir=tmp_path / "b",
                      env=cluster_env(url, ROLLER_CLUSTER_HOST="host-b", ROLLER_CLUSTER_REACH="cl"))
    try:
        a.start(timeout=30)
        b.start(timeout=30)
        a.json("POST", "/api/v1/machines", machine_json(1), expect=201)
        a.json("POST", "/api/v1/machines", machine_json(2), expect=201)
        a.json("POST", "/api/v1/machines", {**machine_json(3), "worker_id": "far-1", "worker_group": "far"},
               expect=201)
        wait_for(lambda: b.get("/api/v1/machines/far/far-1").status == 200, 30, "B to see the machines")

        # submitted on A, run by B, followed live on A's event stream
        watcher = dashboard_session(a, url)
        r = a.post("/api/v1/workers/cl-001/group/cl/jobs?task_name=ping", {"params": {"count": 2}})
        assert r.status == 201, r
        job_id = r.json()["task_id"]
        seen = read_stream_until(watcher, a, f"/events?job={job_id}", "succeeded", timeout=30)
        assert '"running"' in seen and "succeeded" in seen and "ping -c 2" in seen, seen
        view = a.json("GET", f"/api/v1/jobs/{job_id}")
        assert view["state"] == "succeeded", view
        assert [e["message"] for e in view["events"] if e["kind"] == "state"][:2] == ["queued by anonymous", "running"]
        assert pg_rows(url, "SELECT roller_id FROM jobs WHERE id = ?", job_id)[0][0].startswith("host-b/")

        # a group no running roller reaches: the job stays queued, and its view says why
        r = a.post("/api/v1/workers/far-1/group/far/jobs?task_name=ping", {"params": {"count": 1}})
        assert r.status == 201, r
        far = r.json()["task_id"]
        view = a.json("GET", f"/api/v1/jobs/{far}")
        assert view["state"] == "queued", view
        waiting = [e["message"] for e in view["events"] if e["kind"] == "log"]
        assert waiting and waiting[0].startswith("waiting: no running roller reaches worker group far ("), view
        time.sleep(1.0)  # several polls of B: it still does not take it
        assert b.json("GET", f"/api/v1/jobs/{far}")["state"] == "queued"
        # B cancels it (queued in the shared queue, held by no roller)
        assert b.json("DELETE", f"/api/v1/jobs/{far}")["state"] == "cancelled"

        # a long job running on B, cancelled through A
        r = a.post("/api/v1/workers/cl-002/group/cl/jobs?task_name=ping", {"params": {"count": 10}})
        long_id = r.json()["task_id"]
        wait_for(lambda: a.json("GET", f"/api/v1/jobs/{long_id}")["state"] == "running", 30, "the long job to run")
        cancelled = a.json("DELETE", f"/api/v1/jobs/{long_id}")
        assert cancelled["state"] == "cancelled" and cancelled["error"] == "cancelled by anonymous", cancelled
        assert b.json("GET", f"/api/v1/jobs/{long_id}")["state"] == "cancelled"
        for roller in (a, b):
            assert "Traceback" not in roller.log_text(), roller.log_tail(100)
    except BaseException:
        print(a.log_tail(60))
        print(b.log_tail(60))
        raise
    finally:
        a.close()
        b.close()


PASSWORD = "cluster-test-password-1"


def dashboard_session(roller: RollerProcess, url: str) -> Any:
    """An account in the shared database (added through the roller command), signed in on C{roller}: an opener."""
    import http.cookiejar
    import os
    import re
    import subprocess
    import sys
    import urllib.parse
    import urllib.request

    from roller.testing.process import roller_env

    env = roller_env({"ROLLER_DATABASE_URL": url})
    env.pop("ROLLER_STATE_DIR", None)
    done = subprocess.run([sys.executable, "-m", "roller.cli", "--state-dir", str(roller.state_dir), "user", "add",
                           "watcher", "--role", "viewer", "--password-stdin"], input=PASSWORD + "\n", env=env,
                          capture_output=True, text=True, timeout=60, cwd=os.fspath(roller.workdir))
    assert done.returncode == 0 or "exists" in done.stderr, done.stderr
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(roller.url("/login"), timeout=10).read().decode()
    field, token = re.search(r'name="([^"]+)" value="([^"]+)"', page.split("<form", 1)[1]).groups()
    form = urllib.parse.urlencode({field: token, "user": "watcher", "password": PASSWORD, "next": "/"}).encode()
    opener.open(roller.url("/login"), data=form, timeout=10).read()
    assert any(True for _ in jar), "no session cookie"
    return opener


def read_stream_until(opener: Any, roller: RollerProcess, path: str, needle: str, timeout: float) -> str:
    """Read the SSE stream at C{path} until C{needle} shows up (or the timeout); what was read."""
    response = opener.open(roller.url(path), timeout=timeout)
    assert response.status == 200, response.status
    seen = ""
    deadline = time.monotonic() + timeout
    try:
        while needle not in seen and time.monotonic() < deadline:
            line = response.readline()
            if not line:
                break
            seen += line.decode("utf-8", "replace")
    finally:
        response.close()
    return seen
