"""
The kill -9 test: nothing roller answered 201 for is lost when the process
dies without warning.

roller runs as a real process with C{[queue] max_running = 2}; six machines
on loopback addresses get a ping job each: the first two (C{count} 10, ~9 s)
are running and the other four queued when roller is SIGKILLed, right after
answering 201 for a seventh job.  After a restart on the same database the
running two are C{interrupted}, and the five queued ones run and succeed.
"""

from __future__ import annotations

import signal

import pytest

from roller.testing.process import RollerProcess, db_states, ping_skip_reason, wait_for

pytestmark = pytest.mark.skipif(ping_skip_reason() is not None, reason=str(ping_skip_reason()))

GROUP = "crash"
MACHINES = [f"crash-{i}" for i in range(1, 8)]  # the 7th gets the job submitted just before kill -9


def test_kill_9_loses_no_accepted_job(tmp_path):
    config = tmp_path / "roller.toml"
    config.write_text("[queue]\nmax_running = 2\n")
    roller = RollerProcess(["--auth", "none", "--config", str(config)], state_dir=tmp_path / "state")
    try:
        roller.start()
        for n, worker_id in enumerate(MACHINES, start=1):
            roller.json("POST", "/api/v1/machines",
                        {"worker_id": worker_id, "worker_group": GROUP, "ip": f"127.0.0.{10 + n}",
                         "liveness": {"method": "icmp"}}, expect=201)

        def submit(worker_id: str, count: int) -> str:
            body = roller.json("POST", f"/api/v1/workers/{worker_id}/group/{GROUP}/jobs?task_name=ping",
                               {"params": {"count": count}}, expect=201)
            assert body["worker_id"] == worker_id
            return body["task_id"]

        # Two long ones that will be running at the kill, four short ones behind them.
        ids = [submit(w, 10 if i < 2 else 3) for i, w in enumerate(MACHINES[:6])]
        long_ids, queued_ids = ids[:2], ids[2:]

        def states() -> dict[str, str]:
            return {i: roller.json("GET", f"/api/v1/jobs/{i}")["state"] for i in ids}

        expected = {**{i: "running" for i in long_ids}, **{i: "queued" for i in queued_ids}}
        seen: dict = {}
        wait_for(lambda: seen.update(states()) or seen == expected, 5,
                 "2 jobs running and 4 queued", describe=lambda: f"states: {seen}\n{roller.log_tail()}")
        assert roller.json("GET", "/api/v1/jobs/" + long_ids[0])["params"] == {"count": 10}

        # The durability guarantee: 201 means committed, even if roller dies right after.
        last_id = submit(MACHINES[6], 1)
        assert roller.kill() == -signal.SIGKILL

        on_disk = db_states(roller.db_path)
        assert set(ids + [last_id]) <= set(on_disk), on_disk
        assert on_disk[last_id] == "queued"
        assert {i: on_disk[i] for i in ids} == expected

        roller.start()
        jobs = {j["task_id"]: j for j in roller.json("GET", "/api/v1/jobs?worker_group=crash&limit=100")["jobs"]}
        assert set(jobs) == set(ids + [last_id]), jobs

        for job_id in long_ids:
            job = roller.json("GET", f"/api/v1/jobs/{job_id}")
            assert job["state"] == "interrupted", job
            assert "roller stopped" in job["error"], job
            assert job["finished"] is not None, job
            assert any("interrupted" in e["message"] for e in job["events"]), job["events"]

        for job_id in queued_ids + [last_id]:
            job = roller.wait_job(job_id, timeout=60)
            assert job["state"] == "succeeded", job
            assert "is up" in job["result"], job
            assert any("packets transmitted" in e["message"] for e in job["events"]), job["events"]

        counts = {}
        for job in roller.json("GET", "/api/v1/jobs?worker_group=crash&limit=100")["jobs"]:
            counts[job["state"]] = counts.get(job["state"], 0) + 1
        assert counts == {"interrupted": 2, "succeeded": 5}, counts
    except BaseException:
        print(roller.log_tail(150))
        raise
    finally:
        roller.close()


def test_sigterm_interrupts_running_and_keeps_queued(tmp_path):
    """The graceful counterpart: SIGTERM records the job still running after the grace (1 s) as interrupted."""
    roller = RollerProcess(["--auth", "none"], state_dir=tmp_path / "state",
                           env={"ROLLER_QUEUE_MAX_RUNNING": "1", "ROLLER_SERVER_SHUTDOWN_GRACE": "1"})
    try:
        roller.start()
        for n, worker_id in enumerate(("term-1", "term-2"), start=1):
            roller.json("POST", "/api/v1/machines",
                        {"worker_id": worker_id, "worker_group": "term", "ip": f"127.0.0.{20 + n}"}, expect=201)
        running_id, queued_id = (
            roller.json("POST", f"/api/v1/workers/{w}/group/term/jobs?task_name=ping",
                        {"params": {"count": c}}, expect=201)["task_id"]
            for w, c in (("term-1", 10), ("term-2", 1))
        )
        wait_for(lambda: roller.json("GET", f"/api/v1/jobs/{running_id}")["state"] == "running", 5,
                 "the first job to run", describe=roller.log_tail)
        assert roller.json("GET", f"/api/v1/jobs/{queued_id}")["state"] == "queued"

        assert roller.stop(timeout=10) in (0, -signal.SIGTERM)  # twistd re-raises SIGTERM on itself
        assert "Server Shut Down." in roller.log_text()
        assert db_states(roller.db_path) == {running_id: "interrupted", queued_id: "queued"}

        roller.start()
        job = roller.json("GET", f"/api/v1/jobs/{running_id}")
        assert job["state"] == "interrupted", job
        assert "shutting down" in job["error"], job
        assert roller.wait_job(queued_id, timeout=20)["state"] == "succeeded"
    except BaseException:
        print(roller.log_tail(150))
        raise
    finally:
        roller.close()
