"""The batches table on real SQLite (the synchronous store)."""

from __future__ import annotations

from attrs import evolve

from roller.batches.model import Batch, BatchState, Excluded, Limit, Member, MemberState, Rollout, Selector
from roller.jobs import Job
from roller.store import AuditEntry
from roller.store.db import integrity_errors
from roller.testing.syncdb import result_of, sync_store


def _batch(n: int = 3, bid: str = "b1") -> tuple[Batch, list[Member]]:
    batch = Batch(id=bid, task_name="reboot", selector=Selector(pool="p1"),
                  rollout=Rollout(max_concurrent=Limit(2), max_per_pool=Limit(25, percent=True),
                                  stop_after_failures=3, pause_between=1.5),
                  created_at=100.0, requester="alice", origin_ip="127.0.0.1", params={"n": 1},
                  reason="bad update", priority=60, total=n)
    members = [Member(bid, i, "g", f"m{i}", pool="p1" if i % 2 else None) for i in range(n)]
    return batch, members


def test_insert_get_roundtrip_with_audit(store_path):
    store, clock = sync_store(store_path)
    batch, members = _batch()
    audit = AuditEntry(time=100.0, actor="alice", action="batch.create:reboot", result="created b1", target="batch/b1")
    saved = result_of(store.batches.insert(batch, members, excluded=[Excluded("g", "x", "loaned")],
                                           pool_sizes={"p1": 8, "": 2}, audit=audit))
    assert saved.seq is not None
    record = result_of(store.batches.get("b1"))
    assert record.batch == saved
    assert record.batch.rollout == batch.rollout and record.batch.selector == batch.selector
    assert record.members == members
    assert record.excluded == [Excluded("g", "x", "loaned")]
    assert record.pool_sizes == {"p1": 8, "": 2}
    assert [a.action for a in result_of(store.audit.list(target="batch/b1"))] == ["batch.create:reboot"]
    assert result_of(store.batches.get("nope")) is None


def test_insert_is_one_transaction(store_path):
    store, _ = sync_store(store_path)
    batch, members = _batch()
    members.append(members[0])  # the same position twice: the whole batch is refused
    failure = store.batches.insert(batch, members)
    err = []
    failure.addErrback(err.append)
    assert err and err[0].check(*integrity_errors())
    assert result_of(store.batches.get("b1")) is None
    assert result_of(store.batches.list()) == []


def test_save_unfinished_and_list(store_path):
    store, _ = sync_store(store_path)
    for i in range(3):
        batch, members = _batch(bid=f"b{i}")
        result_of(store.batches.insert(batch, members))
    b0 = result_of(store.batches.get("b0"))
    m = evolve(b0.members[1], state=MemberState.running, job_id="j1", attempts=1, started_at=101.0)
    done = evolve(b0.members[2], state=MemberState.failed, job_id="j2", attempts=1, started_at=101.0,
                  finished_at=102.0, error="boom")
    result_of(store.batches.save([evolve(b0.batch, state=BatchState.halted, halt_reason="stop")], [m, done]))
    again = result_of(store.batches.get("b0"))
    assert again.members[1] == m and again.members[2] == done
    assert again.batch.state is BatchState.halted and again.batch.halt_reason == "stop"
    # finished: no longer unfinished
    result_of(store.batches.save([evolve(b0.batch, state=BatchState.failed, finished_at=103.0)], []))
    assert [r.batch.id for r in result_of(store.batches.unfinished())] == ["b1", "b2"]
    page = result_of(store.batches.list(limit=2))
    assert [s.batch.id for s in page] == ["b2", "b1"]
    older = result_of(store.batches.list(limit=2, before=page[-1].batch.seq))
    assert [s.batch.id for s in older] == ["b0"]
    assert older[0].counts["pending"] == 1 and older[0].counts["running"] == 1 and older[0].counts["failed"] == 1
    assert older[0].pools == {"": 2, "p1": 1}


def test_jobs_carry_batch_id(store_path):
    store, _ = sync_store(store_path)
    for i, bid in enumerate(["b1", None, "b1", "b2"]):
        result_of(store.jobs.insert(Job(id=f"j{i}", task_name="ping", worker_id=f"m{i}", worker_group="g",
                                        created_at=float(i), batch_id=bid)))
    assert [j.id for j in result_of(store.jobs.jobs_of_batch("b1"))] == ["j0", "j2"]
    assert [j.id for j in result_of(store.jobs.list(batch_id="b1"))] == ["j2", "j0"]
    assert result_of(store.jobs.get("j3")).batch_id == "b2"
    assert result_of(store.jobs.get("j1")).to_json()["batch_id"] is None
    assert {j.id for j in result_of(store.jobs.jobs_of_batches(["b1", "b2"]))} == {"j0", "j2", "j3"}
