"""
The shared queue's rules in the database (roller.cluster), with two rollers'
nodes on one real PostgreSQL database, each through its own store (its own
connections), driven by hand: claims (once, one running job per machine,
endpoint caps and minimum intervals across rollers), cancellation of a
queued job claimed meanwhile, takeover of a silent roller, reach.
"""

from __future__ import annotations

from typing import Any

import pytest

from roller.cluster import sql
from roller.cluster.node import ClusterNode
from roller.config import load_settings
from roller.inventory import Machine
from roller.jobs import Job, JobEvent, State, new_job_id
from roller.store.db import integrity_errors
from roller.testing.postgres import PostgresServer, pg_rows
from roller.testing.syncdb import result_of, run, sync_store


def node(url: str, host: str, **env: str) -> ClusterNode:
    store, clock = sync_store(url)
    clock.advance(1_700_000_000)
    settings = load_settings(environ={"ROLLER_CLUSTER_TAKEOVER_AFTER": "30", **env})
    n = ClusterNode(store, clock, settings, host=host, pid=1000, pid_alive=lambda pid: True)
    run(n.join())
    return n


@pytest.fixture
def two(postgres_server: PostgresServer) -> Any:
    url = postgres_server.create_database()
    a = node(url, "host-a")
    b = node(url, "host-b")
    yield url, a, b
    for n in (a, b):
        result_of(n._store.close())


def queued(n: ClusterNode, worker: str, group: str = "mdc1") -> Job:
    result_of(n._store.machines.put(Machine.from_json({"worker_id": worker, "worker_group": group})))
    return result_of(n._store.jobs.insert(Job(id=new_job_id(), task_name="reboot", worker_id=worker,
                                               worker_group=group, created_at=1.0)))


def claim(n: ClusterNode, job: Job, endpoints: tuple[str, ...] = ()) -> str:
    return result_of(n.claim(job, endpoints, 2.0))


def end(n: ClusterNode, job: Job) -> None:
    running = job.transition(State.running, 2.0)
    result_of(n._store.jobs.update(running.transition(State.succeeded, 3.0, result="ok")))


def test_a_job_is_claimed_once(two: Any) -> None:
    url, a, b = two
    job = queued(a, "w1")
    assert claim(a, job) == sql.CLAIMED
    assert claim(b, job) == sql.GONE
    assert claim(a, job) == sql.GONE
    assert pg_rows(url, "SELECT state, started_at, roller_id FROM jobs WHERE id = ?", job.id) == [
        ("running", 2.0, a.id)]


def test_one_running_job_per_machine_across_rollers(two: Any) -> None:
    url, a, b = two
    first, second, other = queued(a, "w1"), queued(a, "w1"), queued(a, "w2")
    assert claim(a, first) == sql.CLAIMED
    assert claim(b, second) == sql.BLOCKED  # w1 runs a job on A
    assert claim(b, other) == sql.CLAIMED
    end(a, first)
    assert claim(b, second) == sql.CLAIMED
    # even a write that skips the claim cannot run a second job on the machine
    third = queued(a, "w1")
    failed = a._store.db.write(lambda c: c.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (third.id,)))
    failed.addErrback(lambda f: f.trap(*integrity_errors()) and "refused")
    assert result_of(failed) == "refused"


def test_endpoint_caps_and_minimum_intervals_hold_across_rollers(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    env = {"ROLLER_QUEUE_ENDPOINT_MAX_RUNNING": "2", "ROLLER_QUEUE_ENDPOINT_MIN_INTERVAL": "0"}
    a, b = node(url, "host-a", **env), node(url, "host-b", **env)
    try:
        pdu = ("pdu:10.0.0.9",)
        j1, j2, j3 = queued(a, "w1"), queued(a, "w2"), queued(a, "w3")
        assert claim(a, j1, pdu) == sql.CLAIMED
        assert claim(b, j2, pdu + ("bmc:bmc-2",)) == sql.CLAIMED
        assert claim(b, j3, pdu) == sql.BLOCKED  # two running on that PDU: its cap
        end(a, j1)
        assert claim(b, j3, pdu) == sql.CLAIMED
        assert pg_rows(url, "SELECT endpoints FROM jobs WHERE id = ?", j2.id) == [(" bmc:bmc-2 pdu:10.0.0.9 ",)]
    finally:
        for n in (a, b):
            result_of(n._store.close())
    url = postgres_server.create_database()
    env = {"ROLLER_QUEUE_ENDPOINT_MAX_RUNNING": "5", "ROLLER_QUEUE_ENDPOINT_MIN_INTERVAL": "600"}
    a, b = node(url, "host-a", **env), node(url, "host-b", **env)
    try:
        j1, j2 = queued(a, "w1"), queued(a, "w2")
        assert claim(a, j1, ("bmc:shared",)) == sql.CLAIMED
        assert claim(b, j2, ("bmc:shared",)) == sql.BLOCKED  # 600 s between two commands to it
        pg_rows(url, "UPDATE endpoint_last SET at = at - 601")  # as if ten minutes went by
        assert claim(b, j2, ("bmc:shared",)) == sql.CLAIMED
    finally:
        for n in (a, b):
            result_of(n._store.close())


def test_a_queued_job_claimed_meanwhile_is_not_cancelled(two: Any) -> None:
    url, a, b = two
    job = queued(a, "w1")
    assert claim(b, job) == sql.CLAIMED
    cancelled = job.transition(State.cancelled, 5.0, error="cancelled by alice")
    event = JobEvent(job.id, 5.0, "state", "cancelled by alice", {"state": "cancelled"})
    assert result_of(a.cancel_queued(cancelled, event)) is False
    assert pg_rows(url, "SELECT state FROM jobs WHERE id = ?", job.id) == [("running",)]
    assert result_of(a.request_cancel(job.id, "alice")) == b.id
    assert result_of(b._db.read(sql.cancels_for, b.id)) == [(job.id, "alice")]
    other = queued(a, "w2")
    assert result_of(a.cancel_queued(other.transition(State.cancelled, 5.0, error="x"),
                                     JobEvent(other.id, 5.0, "state", "x", {"state": "cancelled"}))) is True


def test_a_silent_roller_is_taken_over_once(two: Any) -> None:
    url, a, b = two
    mine, other = queued(a, "w1"), queued(a, "w2")
    assert claim(a, mine) == sql.CLAIMED
    assert claim(b, other) == sql.CLAIMED
    run(b._heartbeat())
    assert pg_rows(url, "SELECT count(*) FROM rollers") == [(2,)]  # A is alive
    pg_rows(url, "UPDATE rollers SET heartbeat = heartbeat - 31 WHERE id = ?", a.id)  # 31 s of silence
    run(b._heartbeat())
    assert b.taken_over == 1
    assert pg_rows(url, "SELECT id FROM rollers") == [(b.id,)]
    row = pg_rows(url, "SELECT state, error FROM jobs WHERE id = ?", mine.id)[0]
    assert row[0] == "interrupted" and row[1].startswith(f"roller {a.id} stopped (no heartbeat for 31 s")
    assert pg_rows(url, "SELECT state FROM jobs WHERE id = ?", other.id) == [("running",)]  # B's own
    events = pg_rows(url, "SELECT message FROM job_events WHERE job_id = ? ORDER BY id", mine.id)
    assert events[-1][0].startswith("interrupted: roller")
    # A comes back (it was only cut off): it learns it was taken over and joins again
    run(a._heartbeat())
    assert {r[0] for r in pg_rows(url, "SELECT id FROM rollers")} == {a.id, b.id}


def test_a_dead_process_on_the_same_host_is_taken_over_at_once(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    old = node(url, "host-a")
    job = queued(old, "w1")
    assert claim(old, job) == sql.CLAIMED
    store, clock = sync_store(url)
    fresh = ClusterNode(store, clock, load_settings(environ={}), host="host-a", pid=2000,
                        pid_alive=lambda pid: pid != 1000)
    try:
        run(fresh.join())
        assert fresh.alone()  # the old one's process is gone
        run(fresh._heartbeat())
        assert pg_rows(url, "SELECT state FROM jobs WHERE id = ?", job.id) == [("interrupted",)]
        assert "its process on host-a is gone" in pg_rows(url, "SELECT error FROM jobs WHERE id = ?", job.id)[0][0]
    finally:
        result_of(store.close())
        result_of(old._store.close())


def test_reach_and_why_a_job_waits(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    a = node(url, "host-a", ROLLER_CLUSTER_REACH="mdc1")
    b = node(url, "host-b", ROLLER_CLUSTER_REACH="mdc2,mdc3")
    try:
        run(a._heartbeat())
        assert a.reaches("mdc1") and not a.reaches("mdc2") and b.reaches("mdc3")
        assert a.unreachable("mdc2") is None  # B reaches it
        why = a.unreachable("mdc9")
        assert why is not None and why.startswith("waiting: no running roller reaches worker group mdc9 (")
        assert f"{a.id}: mdc1" in why and f"{b.id}: mdc2, mdc3" in why
        j1, j9 = queued(a, "w1", "mdc1"), queued(a, "w9", "mdc9")
        assert [q[0] for q in result_of(a._db.read(sql.queued, a.reach, 100))] == [j1.id]
        assert {q[0] for q in result_of(a._db.read(sql.queued, (), 100))} == {j1.id, j9.id}
        assert [j.id for j in result_of(a._db.read(sql.queued_jobs, [j9.id, j1.id, "nope"]))] == [j1.id, j9.id]
    finally:
        for n in (a, b):
            result_of(n._store.close())


def test_priority_then_arrival_per_machine_across_rollers(two: Any) -> None:
    url, a, b = two
    low = queued(a, "w1")
    high = result_of(b._store.jobs.insert(Job(id=new_job_id(), task_name="ping", worker_id="w1", worker_group="mdc1",
                                               created_at=2.0, priority=90)))
    assert claim(a, low) == sql.BLOCKED  # B holds a better job for w1: it goes first
    assert claim(b, high) == sql.CLAIMED
    end(b, high)
    later = queued(b, "w1")  # same priority as low, arrived after it
    assert claim(b, later) == sql.BLOCKED
    assert claim(a, low) == sql.CLAIMED


def test_a_claim_given_back_and_leaving_with_a_job_still_running(two: Any) -> None:
    url, a, b = two
    job, other = queued(a, "w1"), queued(a, "w2")
    assert claim(a, job) == sql.CLAIMED
    assert result_of(b._db.write(sql.unclaim, job.id, b.id)) is False  # not B's to give back
    assert result_of(a.unclaim(job.id)) is True
    assert pg_rows(url, "SELECT state, started_at, roller_id, endpoints FROM jobs WHERE id = ?", job.id) == [
        ("queued", None, None, None)]
    assert claim(b, job) == sql.CLAIMED  # any roller may run it now
    assert claim(a, other) == sql.CLAIMED
    run(a.leave())  # its end never recorded: marked interrupted as it leaves, so w2 is not held for good
    assert pg_rows(url, "SELECT state FROM jobs WHERE id = ?", other.id) == [("interrupted",)]
    assert pg_rows(url, "SELECT id FROM rollers") == [(b.id,)]
