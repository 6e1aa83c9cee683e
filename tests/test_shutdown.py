"""
Graceful shutdown: the queue drains on a task.Clock (new jobs refused,
running ones given C{server.shutdown_grace}, then interrupted, queued ones
kept), and a real C{twistd -n roller} answering SIGTERM the same way.
"""

from __future__ import annotations

import signal

import pytest
from twisted.internet.defer import Deferred

from roller.errors import UnavailableError
from roller.inventory import Machine
from roller.jobs import State
from roller.queue import JobQueue, QueueLimits
from roller.tasks import TaskRegistry, TaskSpec
from roller.testing.process import RollerProcess, db_states, ping_skip_reason, wait_for
from roller.testing.syncdb import result_of, run, sync_store


class Controlled:
    def __init__(self) -> None:
        self.runs: dict[str, Deferred] = {}
        self.cancelled: list[str] = []

    def spec(self) -> TaskSpec:
        async def go(ctx, params):
            d = Deferred(lambda _: self.cancelled.append(ctx.job.id))
            self.runs[ctx.job.id] = d
            return await d

        return TaskSpec(name="a", description="a", run=go, timeout=600.0)


def machine(n: int) -> Machine:
    return Machine.from_json({"worker_id": f"m{n}", "worker_group": "g", "ip": f"127.0.0.{n}"})


@pytest.fixture
def env(tmp_path):
    store, clock = sync_store(str(tmp_path / "q.db"))
    ctl = Controlled()

    def make() -> JobQueue:
        q = JobQueue(store, TaskRegistry([ctl.spec()]), clock, limits=QueueLimits(max_running=1))
        run(q.start())
        return q

    return store, clock, ctl, make


def test_drain_lets_running_jobs_finish_and_keeps_queued_ones(env):
    store, clock, ctl, make = env
    for n in (1, 2):
        result_of(store.machines.put(machine(n)))
    q = make()
    running, _ = run(q.submit("a", machine(1)))
    queued, _ = run(q.submit("a", machine(2)))
    assert list(ctl.runs) == [running.id]
    drained = Deferred.fromCoroutine(q.drain(30.0))
    assert not drained.called and not q.accepting
    with pytest.raises(UnavailableError) as info:
        run(q.submit("a", machine(3)))
    assert info.value.code == "shutting_down" and info.value.status == 503
    clock.advance(10)
    ctl.runs[running.id].callback("done")
    assert result_of(drained) == 0
    assert result_of(store.jobs.get(running.id)).state is State.succeeded
    # the slot freed during the drain started nothing: the queued job waits in the store
    assert list(ctl.runs) == [running.id]
    assert result_of(store.jobs.get(queued.id)).state is State.queued
    assert not clock.getDelayedCalls()  # the grace timer is gone

    again = make()  # a restart on the same database runs it
    assert list(ctl.runs) == [running.id, queued.id]
    assert again.active(queued.id).state is State.running


def test_jobs_still_running_after_the_grace_period_are_interrupted(env):
    store, clock, ctl, make = env
    q = make()
    job, _ = run(q.submit("a", machine(1)))
    drained = Deferred.fromCoroutine(q.drain(30.0))
    clock.advance(29.9)
    assert not drained.called and ctl.cancelled == []
    clock.advance(0.1)
    assert result_of(drained) == 1
    assert ctl.cancelled == [job.id]
    final = result_of(store.jobs.get(job.id))
    assert final.state is State.interrupted
    assert final.error == ("roller was shutting down and the job was still running after the 30 s grace period "
                           "(server.shutdown_grace)")
    assert final.finished_at == 30.0


def test_drain_with_nothing_running_returns_at_once(env):
    store, clock, ctl, make = env
    q = make()
    assert result_of(Deferred.fromCoroutine(q.drain(30.0))) == 0
    with pytest.raises(UnavailableError):
        run(q.submit("a", machine(1)))


# -- a real twistd roller -------------------------------------------------------------------------

needs_ping = pytest.mark.skipif(ping_skip_reason() is not None, reason=str(ping_skip_reason()))


@needs_ping
def test_sigterm_refuses_new_jobs_lets_the_running_one_finish_and_keeps_the_queued(tmp_path):
    roller = RollerProcess(["--auth", "none"], state_dir=tmp_path / "state",
                           env={"ROLLER_QUEUE_MAX_RUNNING": "1", "ROLLER_SERVER_SHUTDOWN_GRACE": "20"})
    try:
        roller.start()
        for n, worker_id in enumerate(("drain-1", "drain-2", "drain-3"), start=1):
            roller.json("POST", "/api/v1/machines",
                        {"worker_id": worker_id, "worker_group": "drain", "ip": f"127.0.0.{30 + n}"}, expect=201)

        def submit(worker_id: str, count: int):
            return roller.post(f"/api/v1/workers/{worker_id}/group/drain/jobs?task_name=ping",
                               {"params": {"count": count}})

        running_id = submit("drain-1", 3).json()["task_id"]  # ~2 s
        queued_id = submit("drain-2", 1).json()["task_id"]
        wait_for(lambda: roller.json("GET", f"/api/v1/jobs/{running_id}")["state"] == "running", 5,
                 "the first job to run", describe=roller.log_tail)

        roller.process.send_signal(signal.SIGTERM)
        refused: list = []
        wait_for(lambda: refused.append(submit("drain-3", 1)) or refused[-1].status == 503, 5,
                 "submissions refused", describe=lambda: f"{refused[-1:]}\n{roller.log_tail()}")
        assert refused[-1].json()["error"] == "shutting_down"
        assert "Traceback" not in refused[-1].text

        returncode = roller.process.wait(20)
        assert returncode in (0, -signal.SIGTERM)
        assert "Server Shut Down." in roller.log_text()
        states = db_states(roller.db_path)
        assert states == {running_id: "succeeded", queued_id: "queued"}, states

        roller.start()
        assert roller.json("GET", f"/api/v1/jobs/{running_id}")["state"] == "succeeded"
        assert roller.wait_job(queued_id, timeout=20)["state"] == "succeeded"
    except BaseException:
        print(roller.log_tail(150))
        raise
    finally:
        roller.close()


@needs_ping
def test_sigterm_interrupts_a_job_still_running_after_the_grace(tmp_path):
    roller = RollerProcess(["--auth", "none"], state_dir=tmp_path / "state",
                           env={"ROLLER_SERVER_SHUTDOWN_GRACE": "1"})
    try:
        roller.start()
        roller.json("POST", "/api/v1/machines",
                    {"worker_id": "grace-1", "worker_group": "grace", "ip": "127.0.0.41"}, expect=201)
        job_id = roller.json("POST", "/api/v1/workers/grace-1/group/grace/jobs?task_name=ping",
                             {"params": {"count": 10}}, expect=201)["task_id"]
        wait_for(lambda: roller.json("GET", f"/api/v1/jobs/{job_id}")["state"] == "running", 5,
                 "the job to run", describe=roller.log_tail)
        assert roller.stop(timeout=10) in (0, -signal.SIGTERM)
        # interrupted after the 1 s grace, not waited for (10 pings would have succeeded)
        assert db_states(roller.db_path) == {job_id: "interrupted"}
        roller.start()
        job = roller.json("GET", f"/api/v1/jobs/{job_id}")
        assert "still running after the 1 s grace period" in job["error"], job
    except BaseException:
        print(roller.log_tail(150))
        raise
    finally:
        roller.close()
