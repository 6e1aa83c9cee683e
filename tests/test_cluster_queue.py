"""
Two rollers' job queues on one real PostgreSQL database (roller.cluster),
each with its own store, node and clock, driven by hand with tasks the test
finishes: a job starts only on the roller that claimed it, a machine busy
on one roller holds the other's job back until it is free, the shared
queue is read by the other roller, another roller's job events reach the
live-stream listeners only, cancelling through the other roller, and a
roller that was taken over stops its own running jobs.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_queue import Controlled
from twisted.internet.defer import Deferred

from roller.cluster.node import ClusterNode
from roller.config import load_settings
from roller.inventory import Machine
from roller.jobs import Job, JobEvent, State
from roller.queue import JobQueue
from roller.tasks import TaskRegistry
from roller.testing.postgres import PostgresServer, pg_rows
from roller.testing.syncdb import result_of, run, sync_store


class Roller:
    def __init__(self, url: str, host: str, ctl: Controlled, **env: str):
        self.store, self.clock = sync_store(url)
        self.clock.advance(1_700_000_000)
        self.ctl = ctl
        settings = load_settings(environ={"ROLLER_CLUSTER_POLL_INTERVAL": "1", **env})
        self.node = ClusterNode(self.store, self.clock, settings, host=host, pid=1, pid_alive=lambda pid: True)
        run(self.node.join())
        self.queue = JobQueue(self.store, TaskRegistry([ctl.task("a"), ctl.task("b")]), self.clock,
                              cluster=self.node)
        run(self.queue.start())
        self.node.start(self.queue)
        self.seen: list[tuple[str, str]] = []  # (job id, message) of every event its listeners got
        self.relayed: list[tuple[str, str]] = []
        self.queue.subscribe(lambda j, e: self.seen.append((j.id, e.message)))
        self.queue.subscribe(lambda j, e: self.relayed.append((j.id, e.message)), relayed=True)

    def look(self) -> None:
        run(self.node._look())

    def close(self) -> None:
        self.node.stop()
        result_of(self.store.close())


def machine(worker: str, group: str = "g") -> Machine:
    return Machine.from_json({"worker_id": worker, "worker_group": group, "ip": "127.0.0.1"})


@pytest.fixture
def pair(postgres_server: PostgresServer) -> Any:
    url = postgres_server.create_database()
    ctl = Controlled()
    a = Roller(url, "host-a", ctl)
    b = Roller(url, "host-b", ctl)
    for m in (machine("m1"), machine("m2"), machine("far", "far")):
        result_of(a.store.machines.put(m))
    assert result_of(b.store.machines.refresh()) is True
    yield url, ctl, a, b
    a.close()
    b.close()


def state(url: str, job: Job) -> tuple[str, str | None]:
    return pg_rows(url, "SELECT state, roller_id FROM jobs WHERE id = ?", job.id)[0]


def test_a_busy_machine_on_one_roller_holds_the_others_job_back(pair: Any) -> None:
    url, ctl, a, b = pair
    first, _ = run(a.queue.submit("a", machine("m1")))
    assert ctl.running_ids() == [first.id] and state(url, first) == ("running", a.node.id)
    second, _ = run(b.queue.submit("b", machine("m1")))
    assert state(url, second) == ("queued", None)  # m1 runs a job on A: B's claim was refused
    assert ctl.running_ids() == [first.id]
    ctl.finish(first.id)
    b.clock.advance(1)  # B tries its held-back claims again
    assert ctl.running_ids() == [second.id] and state(url, second) == ("running", b.node.id)
    ctl.finish(second.id)
    assert state(url, second) == ("succeeded", b.node.id)


def test_the_shared_queue_and_the_events_of_jobs_run_elsewhere(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    ctl = Controlled()
    a = Roller(url, "host-a", ctl, ROLLER_CLUSTER_REACH="nowhere")  # runs nothing of this fleet
    b = Roller(url, "host-b", ctl)
    try:
        result_of(a.store.machines.put(machine("m1")))
        result_of(b.store.machines.refresh())
        a.look()  # A learns that B runs (and reaches every group)
        job, _ = run(a.queue.submit("a", machine("m1"), requester="alice"))
        assert state(url, job) == ("queued", None) and ctl.running_ids() == []
        b.look()  # B reads the shared queue: adopts and claims it
        assert ctl.running_ids() == [job.id] and state(url, job) == ("running", b.node.id)
        ctl.finish(job.id, "done")
        a.look()  # A relays B's events: to its live streams only
        messages = [m for i, m in a.relayed if i == job.id]
        assert messages[0] == "queued by alice" and "running" in messages and messages[-1] == "succeeded: done"
        assert messages.count("queued by alice") == 1  # announced once, when submitted
        assert [m for i, m in a.seen if i == job.id] == ["queued by alice"]  # metrics, notifications: A's own
        assert result_of(a.queue.wait(job.id)).state is State.succeeded
    finally:
        a.close()
        b.close()


def test_cancel_through_the_other_roller(pair: Any) -> None:
    url, ctl, a, b = pair
    running, _ = run(a.queue.submit("a", machine("m1")))
    cancelling = Deferred.fromCoroutine(b.queue.cancel(running.id, by="bob"))
    assert state(url, running) == ("running", a.node.id)
    a.look()  # A sees the request and ends the job
    assert state(url, running)[0] == "cancelled" and running.id in ctl.cancelled
    b.clock.advance(1)  # B looks again and answers
    final = result_of(cancelling)
    assert final.state is State.cancelled and final.error == "cancelled by bob"
    # a job of a group no roller reaches, queued in the database only: cancelled there
    far, _ = run(a.queue.submit("a", machine("far", "far")))
    ctl.finish(far.id)  # (A reaches every group: it ran it; queue one more for B to cancel)
    waiting = result_of(a.store.jobs.insert(Job(id="queued-elsewhere", task_name="a", worker_id="far",
                                                 worker_group="far", created_at=5.0),
                                            JobEvent("queued-elsewhere", 5.0, "state", "queued by x",
                                                     {"state": "queued"})))
    assert result_of(Deferred.fromCoroutine(b.queue.cancel(waiting.id, by="bob"))).state is State.cancelled
    assert state(url, waiting)[0] == "cancelled"


def test_a_roller_taken_over_stops_its_running_jobs(pair: Any) -> None:
    url, ctl, a, b = pair
    job, _ = run(a.queue.submit("a", machine("m2")))
    assert ctl.running_ids() == [job.id]
    pg_rows(url, "UPDATE rollers SET heartbeat = heartbeat - 31 WHERE id = ?", a.node.id)
    run(b.node._heartbeat())  # B takes A over: A's job is interrupted in the database
    assert state(url, job)[0] == "interrupted"
    run(a.node._heartbeat())  # A learns it: it stops the job here too (no machine driven by two rollers)
    assert ctl.running_ids() == [] and job.id in ctl.cancelled
    assert result_of(a.store.jobs.get(job.id)).state is State.interrupted


def test_a_roller_that_loses_the_database_stops_its_jobs_after_takeover_after() -> None:
    server = PostgresServer.start()  # its own: stopped under the roller
    url = server.create_database()
    ctl = Controlled()
    a = Roller(url, "host-a", ctl)
    try:
        result_of(a.store.machines.put(machine("m2")))
        job, _ = run(a.queue.submit("a", machine("m2")))
        server.halt()
        a.clock.advance(29)
        run(a.node._heartbeat())
        assert ctl.running_ids() == [job.id]  # not yet: the others wait takeover_after too
        a.clock.advance(2)
        run(a.node._heartbeat())  # silent 31 s: the others may have taken its jobs over
        assert ctl.running_ids() == [] and job.id in ctl.cancelled
        assert a.queue.active(job.id).state is State.interrupted  # recorded once the database is back
        server.restart()
        a.clock.advance(60)  # the recorder's retry
        assert result_of(a.store.jobs.get(job.id)).state is State.interrupted
    finally:
        a.close()
        server.stop()
