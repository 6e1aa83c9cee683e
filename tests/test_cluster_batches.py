"""
Batches driven by one roller at a time, in process: two rollers' batch
services on one real PostgreSQL database (each its own store, node, queue
and clock, tasks the test finishes).  The creator is the batch's recorded
owner and the only one starting members; the other shows it from the
database; cancelling it there takes it over (the first lets it go and its
writes no longer land); a roller taken over while it was only slow lets
its batch go, the other adopts it, counts the members in flight from
their jobs and goes on within the limit.
"""

from __future__ import annotations

from typing import Any

import pytest
from attrs import evolve
from test_cluster_queue import Roller
from test_queue import Controlled

from roller.batches.model import BatchRequest, BatchState, Limit, MemberState, Rollout, Selector
from roller.batches.service import BatchService
from roller.inventory import Machine
from roller.tasks import TaskRegistry
from roller.testing.postgres import PostgresServer, pg_rows
from roller.testing.syncdb import result_of, run

MEMBERS = 6


class Driving(Roller):
    def __init__(self, url: str, host: str, ctl: Controlled):
        super().__init__(url, host, ctl)
        self.batches = BatchService(self.store, self.queue, TaskRegistry([ctl.task("a"), ctl.task("b")]),
                                    self.clock, cluster=self.node)

    def turn(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.clock.advance(0)
        self.clock.advance(0)

    def close(self) -> None:
        run(self.batches.stop())
        self.batches.close()
        super().close()


@pytest.fixture
def pair(postgres_server: PostgresServer) -> Any:
    url = postgres_server.create_database()
    ctl = Controlled()
    a = Driving(url, "host-a", ctl)
    b = Driving(url, "host-b", ctl)
    for i in range(MEMBERS):
        result_of(a.store.machines.put(Machine.from_json({"worker_id": f"m{i}", "worker_group": "g",
                                                          "ip": "127.0.0.1"})))
    assert result_of(b.store.machines.refresh()) is True
    a.look()
    b.look()
    run(a.batches.start())
    run(b.batches.start())
    yield url, ctl, a, b
    a.close()
    b.close()


def running_at_once(url: str, batch_id: str) -> int:
    return int(pg_rows(url, "SELECT count(*) FROM jobs WHERE batch_id = ? AND state = 'running'", batch_id)[0][0])


def test_one_roller_drives_a_batch_and_the_other_adopts_it_when_the_first_is_taken_over(pair: Any) -> None:
    url, ctl, a, b = pair
    request = BatchRequest(task_name="a", selector=Selector(group="g"), rollout=Rollout(max_concurrent=Limit(2)),
                           reason="test")
    view = run(a.batches.create(request, requester="alice"))
    batch_id = view["batch_id"]
    a.turn()
    assert pg_rows(url, "SELECT owner FROM batches WHERE id = ?", batch_id) == [(a.node.id,)]
    assert len(ctl.running_ids()) == 2 and running_at_once(url, batch_id) == 2
    # B shows it from the database and does not drive it
    run(b.batches._adopt())
    assert b.batches.live(batch_id) is None
    shown = run(b.batches.view(batch_id))
    assert shown is not None and shown["total"] == MEMBERS and shown["state"] == "running"

    # one member ends; A was slow and B took it over meanwhile (its row left the table)
    ctl.finish(ctl.running_ids()[0])
    a.turn()
    assert running_at_once(url, batch_id) == 2  # A started the next one
    pg_rows(url, "UPDATE rollers SET heartbeat = heartbeat - 100 WHERE id = ?", a.node.id)
    run(b.node._take_over_dead())
    assert pg_rows(url, "SELECT count(*) FROM rollers WHERE id = ?", a.node.id) == [(0,)]
    run(b.batches._adopt())
    b.turn()
    assert pg_rows(url, "SELECT owner FROM batches WHERE id = ?", batch_id) == [(b.node.id,)]
    live = b.batches.live(batch_id)
    assert live is not None
    # A's two running jobs were interrupted by the takeover: started again by B, within the limit
    assert running_at_once(url, batch_id) <= 2
    # A learns it was taken over at its next heartbeat: it lets the batch go and starts nothing more
    run(a.node._heartbeat())
    a.turn()
    assert a.batches.live(batch_id) is None
    # B drives it to the end, never more than 2 at once
    for _ in range(20):
        b.look()
        a.look()
        b.turn(1)
        assert running_at_once(url, batch_id) <= 2
        running = ctl.running_ids()
        if not running:
            break
        ctl.finish(running[0])
    b.turn(1)
    final = run(b.batches.view(batch_id))
    assert final is not None and final["state"] == "succeeded", final
    assert pg_rows(url, "SELECT owner FROM batches WHERE id = ?", batch_id) == [(b.node.id,)]


def test_a_batch_cancelled_through_the_other_roller_is_taken_over_there(pair: Any) -> None:
    url, ctl, a, b = pair
    request = BatchRequest(task_name="a", selector=Selector(group="g"), rollout=Rollout(max_concurrent=Limit(2)),
                           reason="test")
    batch_id = run(a.batches.create(request, requester="alice"))["batch_id"]
    a.turn()
    first = ctl.running_ids()
    assert len(first) == 2
    view = run(b.batches.cancel(batch_id, by="bob"))
    b.turn()
    assert view["state"] == "cancelled" and view["halt_reason"] == "cancelled by bob", view
    assert pg_rows(url, "SELECT owner, state FROM batches WHERE id = ?", batch_id) == [(b.node.id, "cancelled")]
    # A lets it go at its next look; a member ending there writes nothing any more
    run(a.batches._adopt())
    assert a.batches.live(batch_id) is None
    for job_id in first:
        ctl.finish(job_id)
    a.turn()
    b.look()
    b.turn()
    final = run(b.batches.view(batch_id))
    assert final is not None and final["state"] == "cancelled" and final["finished"] is not None, final
    states = sorted(m["state"] for m in final["members"])
    assert states == ["skipped"] * (MEMBERS - 2) + ["succeeded"] * 2, states
    assert pg_rows(url, "SELECT state FROM batches WHERE id = ?", batch_id) == [("cancelled",)]
    assert run(a.batches.view(batch_id))["state"] == "cancelled"


def test_only_the_owner_of_a_batch_writes_it(pair: Any) -> None:
    url, _, a, b = pair
    request = BatchRequest(task_name="a", selector=Selector(group="g"), rollout=Rollout(max_concurrent=Limit(1)),
                           reason="test")
    batch_id = run(a.batches.create(request, requester="alice"))["batch_id"]
    a.turn()
    record = result_of(b.store.batches.get(batch_id))
    changed = ([evolve(record.batch, state=BatchState.failed)], [evolve(record.members[-1], state=MemberState.failed)])
    result_of(b.store.batches.save(*changed, owner=b.node.id))  # B does not drive it: nothing lands
    assert pg_rows(url, "SELECT state FROM batches WHERE id = ?", batch_id) == [("running",)]
    assert pg_rows(url, "SELECT state FROM batch_members WHERE batch_id = ? AND position = ?", batch_id,
                   MEMBERS - 1) == [("pending",)]
    result_of(b.store.batches.save(*changed, owner=a.node.id))
    assert pg_rows(url, "SELECT state FROM batches WHERE id = ?", batch_id) == [("failed",)]
    assert pg_rows(url, "SELECT state FROM batch_members WHERE batch_id = ? AND position = ?", batch_id,
                   MEMBERS - 1) == [("failed",)]
