"""
The fleet page's queries (roller.store.fleet) on both engines, SQLite and
PostgreSQL: problems first, every sort, the liveness, loan and tag filters,
the pool strip, and an order reused for at most C{settle} seconds of commits.
"""

from __future__ import annotations

from roller.inventory import Machine
from roller.jobs import Job, State
from roller.store.fleet import SORTS, FleetFilter, FleetQueries
from roller.store.loans import Loan
from roller.testing.postgres import postgres_server, store_path  # noqa: F401 -- fixtures
from roller.testing.syncdb import SyncClock, result_of, sync_store

NOW = 1_700_000_000.0
_n = [0]


def _job(worker: str, task: str, state: State, at: float, group: str = "g") -> Job:
    _n[0] += 1
    return Job(id=f"00000000-0000-7000-8000-{_n[0]:012d}", task_name=task, worker_id=worker, worker_group=group,
               created_at=at - 5, params={}, requester="t", state=state, started_at=at - 4, finished_at=at,
               error="no" if state is State.failed else None)


def test_fleet_queries_on_both_engines(store_path: str) -> None:  # noqa: F811 -- the fixture
    clock = SyncClock()
    clock.advance(NOW)
    store, _ = sync_store(store_path, clock)
    try:
        for wid, pool, tags in (("a1", "p1", ["gpu"]), ("b2", "p1", []), ("c3", "p2", ["gpu", "x"]),
                                ("d4", "p2", []), ("e5", None, [])):
            result_of(store.machines.put(Machine.from_json({"worker_group": "g", "worker_id": wid, "ip": "192.0.2.1",
                                                            **({"pool": pool} if pool else {}), "tags": tags})))
        for j in (_job("d4", "reboot", State.failed, NOW - 50), _job("b2", "ping", State.failed, NOW - 40),
                  _job("a1", "ping", State.succeeded, NOW - 30)):
            result_of(store.jobs.insert(j))
        result_of(store.health.save(("g", "c3"), "degraded", NOW, [], None))
        result_of(store.health.save(("g", "a1"), "healthy", NOW, [], None))
        result_of(store.health.save(("g", "e5"), "down", NOW, [], None))
        result_of(store.loans.insert(Loan(worker_group="g", worker_id="a1", borrower="dev", reason="r",
                                          started_at=NOW - 100, expires_at=NOW - 1)))
        fleet = FleetQueries(store, clock=clock)

        def ids(f: FleetFilter | None = None, **kw: object) -> list[str]:
            page = result_of(fleet.page(f or FleetFilter(), now=clock.seconds(), **kw))  # type: ignore[arg-type]
            return [r.worker_id for r in page.rows]

        # down (health; b2's ping failed), degraded, failed last job, the rest; by name within
        assert ids() == ["b2", "e5", "c3", "d4", "a1"]
        assert ids(sort="name", direction="desc") == ["e5", "d4", "c3", "b2", "a1"]
        for sort in SORTS:  # every sort answers, both ways
            for d in ("asc", "desc"):
                assert sorted(ids(sort=sort, direction=d)) == ["a1", "b2", "c3", "d4", "e5"], (sort, d)
        assert ids(sort="health") == ["e5", "c3", "b2", "d4", "a1"]  # down, degraded, unknown (by name), healthy
        assert ids(FleetFilter(tag="gpu")) == ["c3", "a1"]
        assert ids(FleetFilter(tag="gp")) == []
        assert ids(FleetFilter(liveness="down")) == ["b2"]
        assert ids(FleetFilter(liveness="up")) == ["a1"]
        assert ids(FleetFilter(liveness="never", pool="p2")) == ["c3", "d4"]
        assert ids(FleetFilter(loan="overdue")) == ["a1"]
        assert ids(FleetFilter(loan="free", pool="p1")) == ["b2"]
        assert ids(limit=2, offset=2) == ["c3", "d4"]
        pools = result_of(fleet.pools())
        assert set(pools) == {"p1", "p2"}  # machines without a pool are left out
        assert pools["p1"]["healthy"] == 1 and pools["p1"]["loaned_now"] == 1 and pools["p1"]["total"] == 2
        assert pools["p2"]["degraded"] == 1
        # a commit: the order is reused for up to 2 s, the rows are current
        result_of(store.health.save(("g", "d4"), "down", NOW, [], None))
        page = result_of(fleet.page(FleetFilter(), now=clock.seconds()))
        assert [r.worker_id for r in page.rows] == ["b2", "e5", "c3", "d4", "a1"]
        assert [r.health for r in page.rows if r.worker_id == "d4"] == ["down"]
        clock.advance(2)
        assert ids() == ["b2", "d4", "e5", "c3", "a1"]
    finally:
        result_of(store.close())
