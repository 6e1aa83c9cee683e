"""
The job queue on a task.Clock with a real (synchronous) SQLite store.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred

from roller.errors import Conflict, NotFound, UnavailableError
from roller.inventory import Machine
from roller.jobs import State
from roller.queue import JobQueue, QueueLimits
from roller.tasks import Param, TaskFailed, TaskRegistry, TaskSpec
from roller.testing.syncdb import result_of, run, sync_store




class Controlled:
    """Tasks whose runs the test finishes by hand."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, Deferred]] = []
        self.cancelled: list[str] = []

    def task(self, name: str, timeout: float = 60.0, endpoints=lambda m: ()) -> TaskSpec:
        async def go(ctx, params):
            ctx.log(f"{name} starting on {ctx.machine.worker_id}", step=1)
            d = Deferred(lambda _: self.cancelled.append(ctx.job.id))
            self.runs.append((ctx.job.id, d))
            return await d

        return TaskSpec(name=name, description=name, run=go, timeout=timeout, endpoints=endpoints,
                        params=(Param("n", int, 1, "a number", minimum=0, maximum=5),))

    def finish(self, job_id: str, value: Any = "ok") -> None:
        for i, d in self.runs:
            if i == job_id:
                if isinstance(value, Exception):
                    d.errback(value)
                else:
                    d.callback(value)
                return
        raise AssertionError(f"{job_id} not running")

    def running_ids(self) -> list[str]:
        return [i for i, d in self.runs if not d.called]


def machine(n: int, group: str = "g", pdu: str | None = None) -> Machine:
    data: dict = {"worker_id": f"m{n}", "worker_group": group, "ip": f"127.0.0.{n}"}
    if pdu:
        data["pdu"] = {"host": pdu, "outlet": "AA1"}
    return Machine.from_json(data)


@pytest.fixture
def env(tmp_path):
    store, clock = sync_store(str(tmp_path / "q.db"))
    ctl = Controlled()

    def make(limits: QueueLimits = QueueLimits(), store=store) -> JobQueue:
        pdu = lambda m: (f"pdu:{m.pdu.host}",) if m.pdu else ()
        reg = TaskRegistry([ctl.task("a"), ctl.task("b"), ctl.task("slow", timeout=10.0),
                            ctl.task("power", endpoints=pdu)])
        q = JobQueue(store, reg, clock, limits=limits)
        run(q.start())
        return q

    return store, clock, ctl, make


def test_submit_persists_and_runs(env):
    store, clock, ctl, make = env
    q = make()
    job, created = run(q.submit("a", machine(1), requester="alice", reason="stuck"))
    assert created
    assert ctl.running_ids() == [job.id]
    stored = result_of(store.jobs.get(job.id))
    assert stored.state is State.running and stored.requester == "alice"
    ctl.finish(job.id, "all good")
    final = result_of(store.jobs.get(job.id))
    assert final.state is State.succeeded and final.result == "all good"
    events = [e.message for e in result_of(store.jobs.events(job.id))]
    assert events[0] == "queued by alice"
    assert "a starting on m1" in events
    assert events[-1] == "succeeded: all good"


def test_duplicate_task_returns_existing_job(env):
    _, _, ctl, make = env
    q = make()
    first, _ = run(q.submit("a", machine(1)))
    again, created = run(q.submit("a", machine(1)))
    assert not created and again.id == first.id
    other, created = run(q.submit("b", machine(1)))
    assert created and other.id != first.id


def test_one_job_per_machine_other_task_waits(env):
    _, _, ctl, make = env
    q = make()
    a, _ = run(q.submit("a", machine(1)))
    b, _ = run(q.submit("b", machine(1)))
    c, _ = run(q.submit("a", machine(2)))
    assert ctl.running_ids() == [a.id, c.id]
    assert q.active(b.id).state is State.queued
    ctl.finish(a.id)
    assert ctl.running_ids() == [c.id, b.id]


def test_priority_then_fifo(env):
    _, _, ctl, make = env
    q = make(QueueLimits(max_running=1))
    blocker, _ = run(q.submit("a", machine(9)))
    low, _ = run(q.submit("a", machine(1), priority=10))
    first, _ = run(q.submit("a", machine(2), priority=50))
    second, _ = run(q.submit("a", machine(3), priority=50))
    high, _ = run(q.submit("a", machine(4), priority=90))
    assert [j.id for j in q.queued()] == [high.id, first.id, second.id, low.id]
    order = []
    for _ in range(5):
        (current,) = ctl.running_ids()
        order.append(current)
        ctl.finish(current)
    assert order == [blocker.id, high.id, first.id, second.id, low.id]


def test_global_cap(env):
    _, _, ctl, make = env
    q = make(QueueLimits(max_running=2))
    jobs = [run(q.submit("a", machine(n)))[0] for n in range(1, 6)]
    assert len(ctl.running_ids()) == 2 and q.depth == 3
    ctl.finish(jobs[0].id)
    assert len(ctl.running_ids()) == 2 and q.depth == 2


def test_endpoint_cap_and_min_interval(env):
    _, clock, ctl, make = env
    q = make(QueueLimits(endpoint_max_running=1, endpoint_min_interval=5.0))
    a, _ = run(q.submit("power", machine(1, pdu="pdu1.example")))
    b, _ = run(q.submit("power", machine(2, pdu="pdu1.example")))
    other, _ = run(q.submit("power", machine(3, pdu="pdu2.example")))
    # a and the other PDU's job run; b waits for pdu1
    assert ctl.running_ids() == [a.id, other.id]
    clock.advance(1)
    ctl.finish(a.id)
    # pdu1 is free but its last command was 1 s ago: b waits 4 s more
    assert ctl.running_ids() == [other.id]
    clock.advance(3.9)
    assert ctl.running_ids() == [other.id]
    clock.advance(0.1)
    assert ctl.running_ids() == [other.id, b.id]


def test_timeout_cancels_task(env):
    store, clock, ctl, make = env
    q = make()
    job, _ = run(q.submit("slow", machine(1)))
    clock.advance(9.9)
    assert ctl.cancelled == []
    clock.advance(0.1)
    assert ctl.cancelled == [job.id]
    final = result_of(store.jobs.get(job.id))
    assert final.state is State.timed_out and final.error == "timed out after 10 s"


def test_cancel_queued_and_running(env):
    store, _, ctl, make = env
    q = make()
    running, _ = run(q.submit("a", machine(1)))
    queued, _ = run(q.submit("b", machine(1)))
    cancelled = run(q.cancel(queued.id, by="bob"))
    assert cancelled.state is State.cancelled and cancelled.error == "cancelled by bob"
    final = run(q.cancel(running.id, by="bob"))
    assert ctl.cancelled == [running.id]
    assert final.state is State.cancelled
    assert result_of(store.jobs.get(running.id)).state is State.cancelled
    with pytest.raises(Conflict):
        run(q.cancel(running.id))
    with pytest.raises(NotFound):
        run(q.cancel("no-such-job"))


def test_task_failure_and_crash(env):
    store, _, ctl, make = env
    q = make()
    failed, _ = run(q.submit("a", machine(1)))
    crashed, _ = run(q.submit("a", machine(2)))
    ctl.finish(failed.id, TaskFailed("host is down"))
    ctl.finish(crashed.id, ZeroDivisionError("boom"))
    assert result_of(store.jobs.get(failed.id)).error == "host is down"
    c = result_of(store.jobs.get(crashed.id))
    assert c.state is State.failed and "ZeroDivisionError" in c.error


def test_bad_params_rejected(env):
    _, _, _, make = env
    q = make()
    from roller.errors import ValidationError

    with pytest.raises(ValidationError):
        run(q.submit("a", machine(1), params={"n": 9}))
    with pytest.raises(ValidationError):
        run(q.submit("a", machine(1), params={"nope": 1}))
    # also when the machine already has the task: no 200 for a bad request
    run(q.submit("a", machine(1)))
    with pytest.raises(ValidationError):
        run(q.submit("a", machine(1), params={"n": 9}))


def test_restart_interrupts_running_and_requeues_queued(env, tmp_path):
    store, clock, ctl, make = env
    q = make(QueueLimits(max_running=1))
    for n in (1, 2, 3):
        result_of(store.machines.put(machine(n)))
    running, _ = run(q.submit("a", machine(1)))
    queued1, _ = run(q.submit("a", machine(2), priority=10))
    queued2, _ = run(q.submit("a", machine(3), priority=90))
    # a new queue over the same store, as after kill -9
    ctl2 = Controlled()
    reg = TaskRegistry([ctl2.task("a")])
    q2 = JobQueue(store, reg, clock, limits=QueueLimits(max_running=1))
    interrupted, requeued = run(q2.start())
    assert (interrupted, requeued) == (1, 2)
    assert result_of(store.jobs.get(running.id)).state is State.interrupted
    assert ctl2.running_ids() == [queued2.id]


def test_stop_interrupts_running_and_refuses_new(env):
    store, _, ctl, make = env
    q = make()
    job, _ = run(q.submit("a", machine(1)))
    run(q.stop())
    assert result_of(store.jobs.get(job.id)).state is State.interrupted
    with pytest.raises(UnavailableError):
        run(q.submit("a", machine(2)))


def test_listeners_see_events(env):
    _, _, ctl, make = env
    q = make()
    seen = []
    unsubscribe = q.subscribe(lambda job, event: seen.append((job.state.value, event.kind, event.message)))
    job, _ = run(q.submit("a", machine(1)))
    ctl.finish(job.id)
    unsubscribe()
    assert seen == [
        ("queued", "state", "queued by anonymous"),
        ("running", "state", "running"),
        ("running", "log", "a starting on m1"),
        ("succeeded", "state", "succeeded: ok"),
    ]


def test_a_burst_starts_over_several_reactor_turns(env):
    """120 jobs recovered at start-up start 50 per reactor turn, not all in one."""
    store, clock, ctl, _ = env
    for n in range(1, 121):
        result_of(store.machines.put(machine(n)))
    # queue 120 jobs without starting them: a queue that runs one, then stops
    filler = JobQueue(store, TaskRegistry([ctl.task("a")]), clock, limits=QueueLimits(max_running=1))
    for n in range(1, 121):
        run(filler.submit("a", machine(n)))
    run(filler.stop())  # the one running is interrupted; 119 stay queued
    recovered = Controlled()
    q = JobQueue(store, TaskRegistry([recovered.task("a")]), clock,
                 limits=QueueLimits(max_running=500, starts_per_turn=50))
    assert run(q.start()) == (0, 119)  # (interrupted at start-up, queued again)
    assert len(recovered.running_ids()) == 50  # the rest wait for the next turns
    clock.advance(0)  # task.Clock runs every turn that is due at once
    assert len(recovered.running_ids()) == 119
