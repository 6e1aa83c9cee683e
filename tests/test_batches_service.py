"""
BatchService over a real JobQueue and a real (synchronous) SQLite store,
on a task.Clock, with tasks whose outcome the test decides.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred

from roller.batches.model import BatchRequest, BatchState, Limit, MemberState, Rollout, Selector
from roller.batches.service import BatchService
from roller.errors import BadRequest, Conflict, NotFound
from roller.inventory import Machine
from roller.jobs import JobEvent, State
from roller.queue import JobQueue, QueueLimits
from roller.store import AuditEntry, StorageUnavailable
from roller.store.loans import Loan
from roller.tasks import TaskFailed, TaskRegistry, TaskSpec
from roller.testing.syncdb import SyncClock, result_of, run, sync_store

DEFAULT_LIMITS = QueueLimits()
NO_LIMITS = Rollout()


class Fleet:
    """Tasks the test finishes by hand, and a log of every job's start and end."""

    def __init__(self) -> None:
        self.runs: dict[str, Deferred] = {}
        self.starts: dict[str, float] = {}
        self.ends: dict[str, float] = {}
        self.machine_of: dict[str, tuple[str, str]] = {}
        self.clock: SyncClock | None = None

    def task(self, name: str, destructive: bool = True) -> TaskSpec:
        async def go(ctx: Any, params: Any) -> str:
            assert self.clock is not None
            job_id = ctx.job.id
            self.starts[job_id] = self.clock.seconds()
            self.machine_of[job_id] = ctx.machine.key
            d: Deferred = Deferred()
            self.runs[job_id] = d
            try:
                return await d
            finally:
                self.ends[job_id] = self.clock.seconds()

        return TaskSpec(name=name, description=name, run=go, timeout=600.0, destructive=destructive)

    def running(self) -> list[str]:
        return [i for i, d in self.runs.items() if not d.called]

    def finish(self, job_id: str, error: str | None = None) -> None:
        d = self.runs[job_id]
        if error is None:
            d.callback("ok")
        else:
            d.errback(TaskFailed(error))

    def max_overlap(self, keys: set[tuple[str, str]] | None = None) -> int:
        """The most jobs (on C{keys}) running at once, from their recorded starts and ends."""
        points = []
        for job_id, start in self.starts.items():
            if keys is not None and self.machine_of[job_id] not in keys:
                continue
            points.append((start, 1))
            points.append((self.ends.get(job_id, float("inf")), -1))
        most = now = 0
        for _, delta in sorted(points, key=lambda p: (p[0], p[1])):  # an end before a start at the same time
            now += delta
            most = max(most, now)
        return most


def machines(pools: dict[str, int], group: str = "g") -> list[Machine]:
    out = []
    n = 0
    for pool, count in pools.items():
        for i in range(count):
            n += 1
            out.append(Machine.from_json({"worker_id": f"{pool}-m{i:03d}", "worker_group": group,
                                          "ip": f"127.0.{n // 250}.{n % 250 + 1}", "pool": pool,
                                          "tags": ["even"] if i % 2 == 0 else []}))
    return out


class Env:
    def __init__(self, path: str, pools: dict[str, int] | None = None, limits: QueueLimits = DEFAULT_LIMITS):
        self.path = path
        self.fleet = Fleet()
        self.store, self.clock = sync_store(path)
        self.fleet.clock = self.clock
        self.limits = limits
        if pools:
            result_of(self.store.machines.put_many(machines(pools)))
        self.start()

    def start(self) -> None:
        self.tasks = TaskRegistry([self.fleet.task("reboot"), self.fleet.task("reimage"),
                                   self.fleet.task("ping", destructive=False)])
        self.queue = JobQueue(self.store, self.tasks, self.clock, limits=self.limits)
        run(self.queue.start())
        self.service = BatchService(self.store, self.queue, self.tasks, self.clock)
        run(self.service.start())
        self.turn()

    def restart(self) -> None:
        """A new process on the same database (the old one gone without a word: kill -9)."""
        for job_id in self.fleet.running():  # they died with the process
            self.fleet.ends[job_id] = self.clock.seconds()
        self.fleet.runs.clear()
        self.store, self.clock = sync_store(self.path, self.clock)
        self.start()

    def turn(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.clock.advance(0)
        self.clock.advance(0)

    def create(self, selector: Selector, rollout: Rollout = NO_LIMITS, task: str = "reboot", **kw: Any) -> dict:
        request = BatchRequest(task_name=task, selector=selector, rollout=rollout, reason="test", **kw)
        view = run(self.service.create(request, requester="alice", origin_ip="127.0.0.1"))
        self.turn()
        return view

    def view(self, batch_id: str) -> dict:
        return run(self.service.view(batch_id))

    def finish_all(self, error: str | None = None) -> int:
        n = 0
        for job_id in self.fleet.running():
            self.fleet.finish(job_id, error)
            n += 1
        self.turn()
        return n


@pytest.fixture
def env(tmp_path):
    return lambda pools=None, **kw: Env(str(tmp_path / "b.db"), pools, **kw)


def drain(e: Env, batch_id: str, *, error_for: set[str] = frozenset(), limit: int = 10_000) -> dict:
    for _ in range(limit):
        running = e.fleet.running()
        if not running:
            break
        e.clock.advance(1)  # distinct times: the recorded starts and ends tell what overlapped
        for job_id in running:
            e.fleet.finish(job_id, "boom" if e.fleet.machine_of[job_id][1] in error_for else None)
        e.turn()
    return e.view(batch_id)


def test_rollout_within_max_concurrent_and_completes(env):
    e = env({"p1": 20, "p2": 20})
    view = e.create(Selector(pool=None, group="g"), Rollout(max_concurrent=Limit(5)))
    bid = view["batch_id"]
    assert view["total"] == 40 and view["state"] == "running"
    assert len(e.fleet.running()) == 5
    final = drain(e, bid)
    assert final["state"] == "succeeded" and final["counts"]["succeeded"] == 40 and final["progress"] == 1.0
    assert final["finished"] is not None
    assert e.fleet.max_overlap() == 5
    jobs = result_of(e.store.jobs.list(batch_id=bid, limit=100))
    assert len(jobs) == 40 and {j.requester for j in jobs} == {"alice"} and {j.reason for j in jobs} == {"test"}
    audits = [a for a in result_of(e.store.audit.list(limit=1000)) if a.action == "job.create:reboot"]
    assert len(audits) == 40 and all(a.params["batch_id"] == bid for a in audits)
    stored = result_of(e.store.batches.get(bid))
    assert stored.batch.state is BatchState.succeeded
    assert all(m.state is MemberState.succeeded and m.job_id and m.attempts == 1 for m in stored.members)


def test_members_interleave_pools(env):
    e = env({"a": 3, "b": 3, "c": 1})
    view = e.create(Selector(group="g"), Rollout(max_concurrent=Limit(1)))
    pools = [m["pool"] for m in view["members"]]
    assert pools == ["a", "b", "c", "a", "b", "a", "b"]


def test_max_per_pool_is_a_share_of_the_inventory_pool(env):
    e = env({"p1": 12, "p2": 8})
    # 25% of 12 = 3 and 25% of 8 = 2, although the batch only names the even machines
    view = e.create(Selector(group="g", tags=("even",)), Rollout(max_per_pool=Limit(25, percent=True)))
    assert view["limits"]["max_per_pool"] == {"p1": 3, "p2": 2}
    assert len(e.fleet.running()) == 5
    final = drain(e, view["batch_id"])
    assert final["state"] == "succeeded"
    p1 = {m.key for m in machines({"p1": 12, "p2": 8}) if m.pool == "p1"}
    p2 = {m.key for m in machines({"p1": 12, "p2": 8}) if m.pool == "p2"}
    assert e.fleet.max_overlap(p1) == 3 and e.fleet.max_overlap(p2) == 2


def test_destructive_jobs_elsewhere_in_the_pool_count(env):
    e = env({"p1": 8})
    first = e.create(Selector(machines=(("g", "p1-m000"), ("g", "p1-m001"))), Rollout(max_per_pool=Limit(2)))
    assert len(e.fleet.running()) == 2
    second = e.create(Selector(pool="p1"), Rollout(max_per_pool=Limit(25, percent=True)), task="reimage")  # 2 of 8
    # the first batch's two jobs fill the pool's share: the second starts nothing, then one per end
    assert second["counts"]["pending"] == 8 and len(e.fleet.running()) == 2
    e.fleet.finish(e.fleet.running()[0])
    e.turn()
    assert len(e.fleet.running()) == 2
    drain(e, second["batch_id"])
    assert e.fleet.max_overlap() == 2
    assert e.view(first["batch_id"])["state"] == "succeeded"


def test_circuit_breaker_halts_and_starts_nothing_more(env):
    e = env({"p1": 20})
    view = e.create(Selector(pool="p1"), Rollout(max_concurrent=Limit(4), stop_after_failures=3))
    bid = view["batch_id"]
    running = e.fleet.running()
    for job_id in running[:3]:
        e.fleet.finish(job_id, "timed out after 600 s")
    e.turn()
    v = e.view(bid)
    assert v["state"] == "halted"
    assert v["halt_reason"].startswith("stopped after 3 failed members; last: g/p1-m00")
    assert v["halt_reason"].endswith("timed out after 600 s")
    assert v["counts"]["skipped"] == 16 and v["counts"]["failed"] == 3 and v["counts"]["running"] == 1
    assert v["finished"] is None
    started = len(e.fleet.starts)
    e.fleet.finish(running[3])
    e.turn(100)
    v = e.view(bid)
    assert len(e.fleet.starts) == started == 4
    assert v["state"] == "halted" and v["finished"] is not None and v["counts"]["succeeded"] == 1


def test_failed_batch_without_breaker(env):
    e = env({"p1": 4})
    view = e.create(Selector(pool="p1"))
    final = drain(e, view["batch_id"], error_for={"p1-m001"})
    assert final["state"] == "failed" and final["counts"]["failed"] == 1 and final["counts"]["succeeded"] == 3
    member = next(m for m in final["members"] if m["worker_id"] == "p1-m001")
    assert member["error"] == "boom" and member["task_id"]


def test_pause_between_starts(env):
    e = env({"p1": 3})
    view = e.create(Selector(pool="p1"), Rollout(pause_between=30))
    assert len(e.fleet.starts) == 1
    e.turn(29)
    assert len(e.fleet.starts) == 1
    e.turn(1)
    assert len(e.fleet.starts) == 2
    e.turn(30)
    assert sorted(e.fleet.starts.values()) == [0.0, 30.0, 60.0]
    assert drain(e, view["batch_id"])["state"] == "succeeded"


def test_cancel(env):
    e = env({"p1": 6}, limits=QueueLimits(max_running=1))
    view = e.create(Selector(pool="p1"), Rollout(max_concurrent=Limit(3)))
    bid = view["batch_id"]
    assert len(e.fleet.running()) == 1  # the queue runs one; two more are queued
    v = e.view(bid)
    assert v["counts"]["running"] == 1 and v["counts"]["queued"] == 2 and v["counts"]["pending"] == 3
    v = run(e.service.cancel(bid, by="bob"))
    e.turn()
    v = e.view(bid)
    assert v["state"] == "cancelled" and v["halt_reason"] == "cancelled by bob"
    assert v["counts"]["skipped"] == 3 and v["counts"]["cancelled"] == 2 and v["counts"]["running"] == 1
    assert v["finished"] is None
    running = e.fleet.running()
    assert len(running) == 1  # not cancelled without running=True
    run(e.service.cancel(bid, by="bob", running=True))
    e.turn()
    v = e.view(bid)
    assert v["counts"]["cancelled"] == 3 and v["finished"] is not None and v["state"] == "cancelled"
    with pytest.raises(Conflict) as info:
        run(e.service.cancel(bid, by="bob"))
    assert info.value.code == "batch_finished"
    with pytest.raises(NotFound) as info2:
        run(e.service.cancel("nope", by="bob"))
    assert info2.value.code == "unknown_batch"


def test_join_existing_job_never_cancelled(env):
    e = env({"p1": 3})
    m0 = result_of(e.store.machines.get("g", "p1-m000"))
    existing, _ = run(e.queue.submit("reboot", m0, requester="carol"))
    view = e.create(Selector(pool="p1"))
    member = view["members"][0]
    assert member["worker_id"] == "p1-m000" and member["joined"] is True and member["task_id"] == existing.id
    assert result_of(e.store.jobs.get(existing.id)).batch_id is None
    run(e.service.cancel(view["batch_id"], by="bob", running=True))
    e.turn()
    assert e.queue.active(existing.id).state is State.running  # joined: never cancelled by the batch
    e.fleet.finish(existing.id)
    e.turn()
    v = e.view(view["batch_id"])
    assert v["members"][0]["state"] == "succeeded" and v["finished"] is not None


def test_empty_selection_and_exclusions(env):
    e = env({"p1": 2})
    result_of(e.store.loans.insert(Loan("g", "p1-m000", "dev", "debug", 0.0, 1e9)))
    result_of(e.store.health.set_maintenance(("g", "p1-m001"), True, "rack work", 0.0))
    with pytest.raises(BadRequest) as info:
        e.create(Selector(pool="p1"))
    assert info.value.code == "empty_selection"
    assert "matched 2" in info.value.message and "1 loaned" in info.value.message
    assert "1 maintenance" in info.value.message
    with pytest.raises(BadRequest) as info:
        e.create(Selector(pool="nope"))
    assert info.value.code == "empty_selection"
    res = run(e.service.resolve(BatchRequest("reboot", Selector(machines=(("g", "p1-m000"), ("g", "zz"),
                                                                         ("g", "p1-m000"))), Rollout())))
    assert [(x.worker_id, x.reason) for x in res.excluded] == [("zz", "unknown machine"), ("p1-m000", "duplicate"),
                                                                ("p1-m000", "loaned")]
    view = e.create(Selector(pool="p1", include_loaned=True, include_maintenance=True))
    assert view["total"] == 2
    assert result_of(e.store.batches.list()) and len(result_of(e.store.batches.list())) == 1


def test_dry_run_writes_nothing(env):
    e = env({"p1": 8, "p2": 4})
    request = BatchRequest("reboot", Selector(group="g"), Rollout(max_per_pool=Limit(25, percent=True)))
    res = run(e.service.resolve(request))
    out = e.service.dry_run(request, res)
    assert out["batch_id"] is None and out["dry_run"] is True and out["total"] == 12
    assert {m["state"] for m in out["members"]} == {"pending"}
    assert sorted((w["pool"]) for w in out["first_wave"]) == ["p1", "p1", "p2"]
    assert result_of(e.store.batches.list()) == [] and e.fleet.starts == {}


def test_list_and_view(env):
    e = env({"p1": 2})
    ids = [e.create(Selector(machines=(("g", "p1-m000"),)), task="ping")["batch_id"] for _ in range(1)]
    drain(e, ids[0])
    ids.append(e.create(Selector(pool="p1"), task="ping")["batch_id"])
    page, cursor = run(e.service.list(limit=1))
    assert [b["batch_id"] for b in page] == [ids[1]] and "members" not in page[0] and cursor is not None
    older, cursor2 = run(e.service.list(limit=1, before=cursor))
    assert [b["batch_id"] for b in older] == [ids[0]] and cursor2 is None
    assert older[0]["counts"]["succeeded"] == 1 and older[0]["state"] == "succeeded"
    assert older[0] == {k: v for k, v in e.view(ids[0]).items() if k != "members"}
    assert run(e.service.view("nope")) is None
    assert "members" not in run(e.service.view(ids[1], members=False))


def test_subscribe_coalesces(env):
    e = env({"p1": 10})
    seen: list[str] = []
    e.service.subscribe(seen.append)
    view = e.create(Selector(pool="p1"))
    assert seen.count(view["batch_id"]) >= 1
    seen.clear()
    e.finish_all()
    assert seen == [view["batch_id"]]


def test_restart_continues_within_limits(env):
    e = env({"p1": 10})
    view = e.create(Selector(pool="p1"), Rollout(max_concurrent=Limit(3)))
    bid = view["batch_id"]
    first = e.fleet.running()
    e.fleet.finish(first[0])
    e.turn()
    assert len(e.fleet.running()) == 3
    e.restart()  # the 3 running jobs are interrupted: started once more, and no more than 3 at once
    v = e.view(bid)
    assert v["counts"]["succeeded"] == 1
    assert len(e.fleet.running()) == 3
    resubmitted = [m for m in v["members"] if m["attempts"] == 2]
    assert len(resubmitted) == 3
    final = drain(e, bid)
    assert final["state"] == "succeeded" and final["counts"]["succeeded"] == 10


def test_restart_adopts_a_job_whose_member_write_was_lost(env):
    e = env({"p1": 4})
    view = e.create(Selector(pool="p1"), Rollout(max_concurrent=Limit(2)))
    bid = view["batch_id"]
    # as if roller died after the job's insert and before the member's write
    result_of(e.store.db.write(lambda c: c.execute(
        "UPDATE batch_members SET state = 'pending', job_id = NULL, attempts = 0 WHERE batch_id = ?"
        " AND position = 0", (bid,))))
    e.service.close()
    e.restart()
    v = e.view(bid)
    m0 = v["members"][0]
    assert m0["task_id"] is not None and m0["attempts"] == 2  # adopted, interrupted, started once more
    assert len(e.fleet.running()) == 2
    jobs = result_of(e.store.jobs.list(batch_id=bid, limit=100))
    assert len([j for j in jobs if j.worker_id == m0["worker_id"]]) == 2
    assert drain(e, bid)["state"] == "succeeded"


def test_interrupted_twice_is_a_failure(env):
    e = env({"p1": 1})
    bid = e.create(Selector(pool="p1"))["batch_id"]
    e.restart()
    e.restart()
    v = e.view(bid)
    assert v["members"][0]["state"] == "interrupted" and v["state"] == "failed"


def test_refused_writes_are_retried(env, monkeypatch):
    e = env({"p1": 4})
    real = e.store.batches.save
    refused = {"n": 0}

    def save(batches=(), members=()):
        if refused["n"] < 3:
            refused["n"] += 1
            from twisted.internet.defer import fail
            return fail(StorageUnavailable("locked", "the database is locked", 5))
        return real(batches, members)

    monkeypatch.setattr(e.store.batches, "save", save)
    view = e.create(Selector(pool="p1"))
    bid = view["batch_id"]
    e.finish_all()
    assert e.view(bid)["state"] == "succeeded"  # served from memory meanwhile
    assert result_of(e.store.batches.get(bid)).batch.state is BatchState.running
    e.turn(1)
    e.turn(2)
    e.turn(4)
    stored = result_of(e.store.batches.get(bid))
    assert stored.batch.state is BatchState.succeeded
    assert all(m.state is MemberState.succeeded for m in stored.members)


def test_create_audit_in_the_same_transaction(env):
    e = env({"p1": 1})
    request = BatchRequest("reboot", Selector(pool="p1"), Rollout())
    view = run(e.service.create(request, requester="alice", audit=lambda b: AuditEntry(
        time=b.created_at, actor="alice", action="batch.create:reboot", result="created", target=f"batch/{b.id}")))
    assert [a.action for a in result_of(e.store.audit.list(target=f"batch/{view['batch_id']}"))] == [
        "batch.create:reboot"]


def test_refused_submit_is_retried_and_nothing_lost(env, monkeypatch):
    e = env({"p1": 3})
    real = e.queue.submit
    refused = {"n": 0}

    async def submit(*a, **kw):
        if refused["n"] < 2:
            refused["n"] += 1
            raise StorageUnavailable("disk_full", "the disk holding the database is full", 30)
        return await real(*a, **kw)

    monkeypatch.setattr(e.queue, "submit", submit)
    view = e.create(Selector(pool="p1"), Rollout(max_concurrent=Limit(1)))
    bid = view["batch_id"]
    assert e.fleet.running() == [] and e.view(bid)["counts"]["pending"] == 3
    e.turn(1)  # first retry: refused again
    assert e.fleet.running() == []
    e.turn(1)
    assert len(e.fleet.running()) == 1
    final = drain(e, bid)
    assert final["state"] == "succeeded" and [m["attempts"] for m in final["members"]] == [1, 1, 1]
    assert e.fleet.max_overlap() == 1


def test_create_is_one_write_whatever_the_size(env, monkeypatch):
    e = env({"p1": 600, "p2": 400})
    writes = []
    real = e.store.db.write

    def write(fn, *args):
        writes.append(fn)
        return real(fn, *args)

    monkeypatch.setattr(e.store.db, "write", write)
    request = BatchRequest("reboot", Selector(group="g"), Rollout(max_concurrent=Limit(200)))
    view = run(e.service.create(request, requester="alice"))
    assert view["total"] == 1000 and view["limits"]["max_concurrent"] == 200
    batch_writes = [fn for fn in writes if fn.__qualname__.startswith("BatchTable.")]
    assert [fn.__qualname__ for fn in batch_writes] == ["BatchTable.insert.<locals>.run"]  # 1000 members at once
    e.turn()
    batch_writes = [fn for fn in writes if fn.__qualname__.startswith("BatchTable.")]
    assert len(batch_writes) == 2  # then the 200 members started: one coalesced save
    assert len(e.fleet.running()) == 200
    assert len(result_of(e.store.batches.get(view["batch_id"])).members) == 1000
    stored = result_of(e.store.batches.get(view["batch_id"]))
    assert sum(1 for m in stored.members if m.state is MemberState.running) == 200  # written coalesced


def test_unknown_machine_after_creation_fails_the_member(env):
    e = env({"p1": 2})
    view = e.create(Selector(pool="p1"), Rollout(max_concurrent=Limit(1)))
    result_of(e.store.machines.delete("g", "p1-m001"))
    final = drain(e, view["batch_id"])
    assert final["members"][1]["state"] == "failed"
    assert "no longer in the inventory" in final["members"][1]["error"]


def test_stopped_service_starts_nothing_and_refuses_batches(env):
    e = env({"p1": 4})
    view = e.create(Selector(pool="p1"), Rollout(max_concurrent=Limit(2)))
    run(e.service.stop())
    e.finish_all()
    v = e.view(view["batch_id"])
    assert v["counts"]["succeeded"] == 2 and v["counts"]["pending"] == 2 and len(e.fleet.starts) == 2
    with pytest.raises(Exception) as info:
        e.create(Selector(pool="p1"))
    assert getattr(info.value, "code", None) == "shutting_down"


class Health:
    def __init__(self, states: dict[tuple[str, str], str]):
        self.states = states

    def state_of(self, key: tuple[str, str]) -> str:
        return self.states.get(key, "unknown")


def test_filters_health_last_state_and_text(env):
    e = env({"p1": 6})
    e.service.health = Health({("g", "p1-m000"): "down", ("g", "p1-m001"): "down", ("g", "p1-m002"): "loaned",
                               ("g", "p1-m005"): "healthy"})
    down = run(e.service.resolve(BatchRequest("reboot", Selector(health=("down", "loaned")), Rollout())))
    assert [m.worker_id for m in down.members] == ["p1-m000", "p1-m001"]
    assert [(x.worker_id, x.reason) for x in down.excluded] == [("p1-m002", "loaned")]
    assert down.pool_sizes == {"p1": 6}
    # last-job state: a failed ping on m003, a running one on m004, nothing on the others
    m3, m4 = (result_of(e.store.machines.get("g", f"p1-m00{i}")) for i in (3, 4))
    failed, _ = run(e.queue.submit("ping", m3))
    e.fleet.finish(failed.id, "unreachable")
    run(e.queue.submit("ping", m4))
    by_state = run(e.service.resolve(BatchRequest("reboot", Selector(pool="p1", state=("failed", "running")),
                                                  Rollout())))
    assert [m.worker_id for m in by_state.members] == ["p1-m003", "p1-m004"]
    never = run(e.service.resolve(BatchRequest("reboot", Selector(pool="p1", state=("none",)), Rollout())))
    assert [m.worker_id for m in never.members] == ["p1-m000", "p1-m001", "p1-m005"]  # m002 is loaned
    text = run(e.service.resolve(BatchRequest("reboot", Selector(q="M00"), Rollout())))
    assert len(text.members) == 5
    tagged = run(e.service.resolve(BatchRequest("reboot", Selector(tags=("even",), group="g"), Rollout())))
    assert [m.worker_id for m in tagged.members] == ["p1-m000", "p1-m004"]  # m002 loaned


def test_restart_with_queued_members_keeps_the_limit(env):
    e = env({"p1": 8}, limits=QueueLimits(max_running=2))
    view = e.create(Selector(pool="p1"), Rollout(max_concurrent=Limit(4)))
    bid = view["batch_id"]
    v = e.view(bid)
    assert v["counts"]["running"] == 2 and v["counts"]["queued"] == 2
    e.restart()  # 2 interrupted (started once more), 2 still queued: 4 in flight, not more
    v = e.view(bid)
    assert v["counts"]["running"] + v["counts"]["queued"] == 4 and v["counts"]["pending"] == 4
    final = drain(e, bid)
    assert final["state"] == "succeeded" and e.fleet.max_overlap() <= 2
    jobs = result_of(e.store.jobs.list(batch_id=bid, limit=100))
    assert len(jobs) == 10 and sum(1 for j in jobs if j.state is State.interrupted) == 2


def test_join_is_not_held_back_by_the_pools_limit(env):
    e = env({"p1": 4})
    m0, m1 = (result_of(e.store.machines.get("g", f"p1-m00{i}")) for i in (0, 1))
    existing, _ = run(e.queue.submit("reboot", m0, requester="carol"))
    other, _ = run(e.queue.submit("reboot", m1, requester="carol"))
    view = e.create(Selector(machines=(("g", "p1-m002"), ("g", "p1-m000"))), Rollout(max_per_pool=Limit(1)))
    members = {m["worker_id"]: m for m in view["members"]}
    assert members["p1-m000"]["joined"] is True and members["p1-m000"]["task_id"] == existing.id
    assert members["p1-m002"]["state"] == "pending"  # the pool's one slot is taken
    e.fleet.finish(existing.id)
    e.fleet.finish(other.id)
    e.turn()
    assert e.view(view["batch_id"])["members"][0]["state"] == "running"
    assert drain(e, view["batch_id"])["state"] == "succeeded"


def _refuse_job_ends(e: Env, monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """The database refuses to record a job's end while C{refusing['on']}."""
    from twisted.internet.defer import fail
    real = e.store.jobs.update
    refusing = {"on": True}

    def update(job: Any, event: Any) -> Deferred:
        if refusing["on"] and job.state.final:
            return fail(StorageUnavailable("locked", "the database is locked", 5))
        return real(job, event)

    monkeypatch.setattr(e.store.jobs, "update", update)
    return refusing


def test_a_member_end_and_its_slot_wait_for_its_jobs_end_to_be_recorded(env, monkeypatch):
    e = env({"p1": 2})
    bid = e.create(Selector(pool="p1"), Rollout(max_concurrent=Limit(1)))["batch_id"]
    refusing = _refuse_job_ends(e, monkeypatch)
    first = e.fleet.running()
    assert len(first) == 1
    e.fleet.finish(first[0])
    e.turn()
    members = e.view(bid)["members"]
    assert [m["state"] for m in members] == ["succeeded", "pending"]  # served from memory
    assert e.fleet.running() == []  # the slot is still the first's: its job reads running in the database
    stored = result_of(e.store.batches.get(bid))
    assert [m.state for m in stored.members] == [MemberState.running, MemberState.pending]
    refusing["on"] = False
    e.turn(10)  # the queue's retry records the job's end: then the member's, and the next one starts
    stored = result_of(e.store.batches.get(bid))
    assert [m.state for m in stored.members] == [MemberState.succeeded, MemberState.running]
    assert result_of(e.store.jobs.get(first[0])).state is State.succeeded
    (second,) = e.fleet.running()
    e.fleet.finish(second)
    e.turn()
    stored = result_of(e.store.batches.get(bid))
    assert stored.batch.state is BatchState.succeeded
    assert [(m.state, m.attempts) for m in stored.members] == [(MemberState.succeeded, 1)] * 2
    # what the database recorded never had two jobs in flight at once
    jobs = sorted(result_of(e.store.jobs.list(batch_id=bid, limit=100)), key=lambda j: j.created_at)
    assert jobs[0].finished_at <= jobs[1].created_at


def test_killed_before_a_jobs_end_is_written_its_member_runs_again_within_the_limit(env, monkeypatch):
    e = env({"p1": 3})
    bid = e.create(Selector(pool="p1"), Rollout(max_concurrent=Limit(1)))["batch_id"]
    _refuse_job_ends(e, monkeypatch)
    (first,) = e.fleet.running()
    e.clock.advance(1)
    e.fleet.finish(first)  # ends in memory; its end never reaches the database
    e.turn(30)
    assert e.view(bid)["counts"]["succeeded"] == 1
    assert e.fleet.running() == []  # nothing starts beside a job recorded as running
    stored = result_of(e.store.batches.get(bid))
    assert stored.batch.state is BatchState.running
    assert [m.state for m in stored.members] == [MemberState.running, MemberState.pending, MemberState.pending]
    e.service.close()
    e.restart()  # kill -9: the job is interrupted, its member started once more, one at a time
    assert len(e.fleet.running()) == 1
    final = drain(e, bid)
    assert final["state"] == "succeeded"
    assert [m["attempts"] for m in final["members"]] == [2, 1, 1]
    assert e.fleet.max_overlap() == 1
    jobs = sorted(result_of(e.store.jobs.list(batch_id=bid, limit=100)), key=lambda j: j.created_at)
    assert [j.state.value for j in jobs] == ["interrupted"] + ["succeeded"] * 3
    for before, after in zip(jobs, jobs[1:], strict=False):  # as recorded: one at a time
        assert before.finished_at <= after.created_at, (before, after)


def test_a_late_event_of_a_members_interrupted_job_does_not_end_its_retry(env):
    # several rollers: the survivor marks a dead roller's jobs interrupted, and their events reach it by the
    # relay, possibly after it adopted the batch, while the member waits to be started once more
    e = env({"p1": 2})
    bid = e.create(Selector(pool="p1"), Rollout(pause_between=60.0))["batch_id"]
    (first,) = e.fleet.running()
    e.turn(1)
    e.service.close()
    e.restart()  # interrupted, pending again: waits out the pause after the last start
    old = result_of(e.store.jobs.get(first))
    assert old.state is State.interrupted and e.fleet.running() == []
    assert [m["state"] for m in e.view(bid)["members"]] == ["pending", "pending"]
    e.queue.relay(old, JobEvent(old.id, old.finished_at, "state", "interrupted: roller left",
                                {"state": "interrupted"}))
    e.turn()
    m0 = e.view(bid)["members"][0]
    assert (m0["state"], m0["task_id"], m0["attempts"]) == ("pending", None, 1)
    e.turn(60)
    (retry,) = e.fleet.running()
    assert e.fleet.machine_of[retry] == e.fleet.machine_of[first]
    m0 = e.view(bid)["members"][0]
    assert (m0["state"], m0["task_id"], m0["attempts"]) == ("running", retry, 2)
    e.fleet.finish(retry)
    e.turn(60)
    final = drain(e, bid)
    assert final["state"] == "succeeded", final["members"]
    assert [m["attempts"] for m in final["members"]] == [2, 1]


def test_a_member_pending_again_after_an_interruption_is_started_once_more_after_a_restart(env):
    # killed after the member's "pending again" was written and before its second job was: not a second
    # interruption (its interrupted job is not taken for a job whose member write was lost)
    e = env({"p1": 1})
    bid = e.create(Selector(pool="p1"))["batch_id"]
    (first,) = e.fleet.running()
    e.service.close()
    result_of(e.store.db.write(lambda c: c.execute(
        "UPDATE batch_members SET state = 'pending', job_id = NULL, attempts = 1 WHERE batch_id = ?", (bid,))))
    e.restart()
    (second,) = e.fleet.running()
    assert second != first
    assert result_of(e.store.jobs.get(first)).state is State.interrupted
    m0 = e.view(bid)["members"][0]
    assert (m0["state"], m0["task_id"], m0["attempts"]) == ("running", second, 2)
    final = drain(e, bid)
    assert final["state"] == "succeeded" and final["members"][0]["attempts"] == 2
