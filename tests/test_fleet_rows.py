"""
The fleet page's rows kept per machine between commits
(roller.store.fleet_rows.MachineRows behind FleetQueries.page): after every
change of a random sequence (jobs queued, started, ended, inserted finished;
health recorded; loans lent, extended and returned; machines added, edited
and removed; the history pruned), each row shown is the one a fresh read
gives, and only the machines a change touched are read again.  With the
order and counts reused for C{settle} seconds, they too equal a full
recomputation once the settle time has passed.
"""

from __future__ import annotations

import random

import attrs

from roller.inventory import Machine
from roller.jobs import Job, State
from roller.store.fleet import SORTS, FleetFilter, FleetQueries, fetch_rows
from roller.store.health import TransitionRow
from roller.store.loans import Loan
from roller.testing.postgres import postgres_server, store_path  # noqa: F401 -- fixtures
from roller.testing.syncdb import SyncClock, result_of, sync_store

NOW = 1_700_000_000.0
GROUPS = ("g", "h")
POOLS = ("p1", "p2", None)
HEALTH = ("healthy", "degraded", "down", "unknown", "loaned", "quarantined", "maintenance")
FINAL = (State.succeeded, State.failed, State.timed_out, State.cancelled, State.interrupted)


def _machine(group: str, wid: str, rnd: random.Random) -> Machine:
    pool = rnd.choice(POOLS)
    return Machine.from_json({"worker_group": group, "worker_id": wid, "ip": f"192.0.2.{rnd.randint(1, 250)}",
                              **({"pool": pool} if pool else {}), "tags": rnd.choice([[], ["gpu"]])})


class Fleet:
    """A store and the changes a busy fleet makes to it."""

    def __init__(self, seed: int, path: str = ":memory:"):
        self.rnd = random.Random(seed)
        self.clock = SyncClock()
        self.clock.advance(NOW)
        self.store, _ = sync_store(path, self.clock)
        self.keys: list[tuple[str, str]] = []
        self.open_jobs: dict[str, Job] = {}
        self.loans: dict[tuple[str, str], Loan] = {}
        self.health: dict[tuple[str, str], str] = {}
        self.since: dict[tuple[str, str], float] = {}
        self.n = 0
        for i in range(24):
            self.add_machine(f"m{i:02d}", GROUPS[i % 2])

    def tick(self) -> float:
        self.clock.advance(self.rnd.choice((0.001, 0.5, 3.0)))
        return self.clock.seconds()

    def add_machine(self, wid: str, group: str) -> None:
        result_of(self.store.machines.put(_machine(group, wid, self.rnd)))
        if (group, wid) not in self.keys:
            self.keys.append((group, wid))

    def job(self, key: tuple[str, str], state: State) -> Job:
        self.n += 1
        now = self.clock.seconds()
        started = now if state is not State.queued else None
        finished = now if state.final else None
        return Job(id=f"00000000-0000-7000-8000-{self.n:012d}", task_name=self.rnd.choice(("ping", "reboot")),
                   worker_id=key[1], worker_group=key[0], created_at=now - 1, params={}, requester="t",
                   state=state, started_at=started, finished_at=finished,
                   error="it broke" if state in (State.failed, State.timed_out) else None,
                   result="ok" if state is State.succeeded else None)

    def change(self) -> str:
        """One random change, committed; what it was."""
        rnd, now = self.rnd, self.tick()
        key = rnd.choice(self.keys)
        what = rnd.choice(("submit", "submit", "advance", "advance", "finished", "health", "health", "lend",
                           "return", "extend", "edit", "add", "remove", "prune", "unhealth"))
        running = {(j.worker_group, j.worker_id) for j in self.open_jobs.values() if j.state is State.running}
        if what == "submit":  # (at most one running job per machine, as roller keeps it)
            job = self.job(key, rnd.choice((State.queued, State.running)) if key not in running else State.queued)
            result_of(self.store.jobs.insert(job))
            self.open_jobs[job.id] = job
        elif what == "advance" and self.open_jobs:
            job = self.open_jobs.pop(rnd.choice(sorted(self.open_jobs)))
            if job.state is State.queued and rnd.random() < 0.5 and (job.worker_group, job.worker_id) not in running:
                job = attrs.evolve(job, state=State.running, started_at=now)
                self.open_jobs[job.id] = job
            else:
                state = rnd.choice(FINAL)
                job = attrs.evolve(job, state=state, started_at=job.started_at or now, finished_at=now,
                                   error="gave up" if state is not State.succeeded else None,
                                   result="fine" if state is State.succeeded else None)
            result_of(self.store.jobs.update(job))
        elif what == "finished":
            result_of(self.store.jobs.insert(self.job(key, rnd.choice(FINAL))))
        elif what == "health":  # as the health watcher records it: a new state with its transition
            old, new = self.health.get(key, "unknown"), rnd.choice(HEALTH)
            since = now if new != old else self.since.get(key, now)
            transition = TransitionRow(now, old, new, "test") if new != old else None
            result_of(self.store.health.save(key, new, since, [{"kind": rnd.choice("ab")}], transition))
            self.health[key], self.since[key] = new, since
        elif what == "unhealth" and key in self.health:  # a machine's health forgotten
            result_of(self.store.health.forget(key))
            del self.health[key]
        elif what == "lend" and key not in self.loans:
            self.loans[key] = result_of(self.store.loans.insert(Loan(
                worker_group=key[0], worker_id=key[1], borrower=rnd.choice(("ann", "bob")), reason="r",
                started_at=now, expires_at=now + rnd.choice((-10, 3600)))))
        elif what == "return" and self.loans:
            loan = self.loans.pop(rnd.choice(sorted(self.loans)))
            result_of(self.store.loans.close(loan.id, now, None))
        elif what == "extend" and self.loans:
            k = rnd.choice(sorted(self.loans))
            loan = self.loans[k]
            self.store.db.write(lambda c: c.execute("UPDATE loans SET expires_at = expires_at + 60 WHERE id = ?",
                                                    (loan.id,)))
        elif what == "edit":
            self.add_machine(key[1], key[0])
        elif what == "add":
            self.add_machine(f"n{self.n}", rnd.choice(GROUPS))
            self.n += 1
        elif what == "remove" and len(self.keys) > 10:
            self.keys.remove(key)
            result_of(self.store.machines.delete(*key))
        elif what == "prune":
            self.store.db.write(lambda c: c.execute(
                "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE state NOT IN ('queued', 'running')"
                " ORDER BY seq LIMIT 3)"))
        else:
            return "nothing"
        return what


def _fresh(fleet: Fleet, keys: list[tuple[str, str]]) -> dict[tuple[str, str], object]:
    return result_of(fleet.store.db.read(lambda c: fetch_rows(c, keys)))


FILTERS = (FleetFilter(), FleetFilter(group="g"), FleetFilter(pool="p1"), FleetFilter(state="failed"),
           FleetFilter(health="down"), FleetFilter(loan="loaned"), FleetFilter(tag="gpu"), FleetFilter(q="m1"))


def test_rows_follow_every_change_exactly(store_path: str) -> None:  # noqa: F811 -- the fixture
    # SQLite: six sequences, each on a database of its own; PostgreSQL: one
    paths = [store_path] if store_path.startswith("postgresql") else [":memory:"] * 6
    for seed, path in enumerate(paths):
        fleet = Fleet(seed, path)
        queries = FleetQueries(fleet.store, clock=fleet.clock, settle=2.0)
        full = FleetQueries(fleet.store)  # no clock: everything read again at every commit
        seen: set[str] = set()
        for step in range(150):
            seen.add(fleet.change())
            now = fleet.clock.seconds()
            f = fleet.rnd.choice(FILTERS)
            sort = fleet.rnd.choice(list(SORTS))
            kw = {"sort": sort, "limit": 7, "offset": fleet.rnd.choice((0, 7)), "now": now}
            page = result_of(queries.page(f, **kw))  # type: ignore[arg-type]
            fresh = _fresh(fleet, [(r.worker_group, r.worker_id) for r in page.rows])
            for row in page.rows:
                assert row == fresh[(row.worker_group, row.worker_id)], (seed, step, row)
            if step % 10 == 9:  # past the settle time: order, counts and the pool strip are a full recomputation
                fleet.clock.advance(2.0)
                now = fleet.clock.seconds()
                kw["now"] = now
                assert result_of(queries.page(f, **kw)) == result_of(full.page(f, **kw)), (seed, step, f, sort)  # type: ignore[arg-type]
                assert result_of(queries.pools()) == result_of(full.pools())
        assert {"submit", "advance", "finished", "health", "lend", "return", "edit", "add", "remove",
                "prune", "unhealth"} <= seen


def test_a_commit_reads_only_the_machines_it_touched() -> None:
    fleet = Fleet(99)
    queries = FleetQueries(fleet.store, clock=fleet.clock)
    reads: list[int] = []
    fetch = queries.rows._fetch

    def counting(c, keys):  # type: ignore[no-untyped-def]
        reads.append(len(keys))
        return fetch(c, keys)

    queries.rows._fetch = counting  # type: ignore[method-assign]
    first = result_of(queries.page(FleetFilter(), limit=100, now=fleet.clock.seconds()))
    assert reads == [24] and len(first.rows) == 24
    key = fleet.keys[3]
    job = fleet.job(key, State.queued)
    for step in ("queued", "running"):
        if step == "queued":
            result_of(fleet.store.jobs.insert(job))
        else:
            result_of(fleet.store.jobs.update(attrs.evolve(job, state=State.running, started_at=fleet.tick())))
        page = result_of(queries.page(FleetFilter(), limit=100, now=fleet.clock.seconds()))
        assert {r.worker_id: r.last.state for r in page.rows if r.last}[key[1]] == step
    result_of(fleet.store.health.save(fleet.keys[5], "down", fleet.tick(), [], None))  # a first health row
    result_of(queries.page(FleetFilter(), limit=100, now=fleet.clock.seconds()))
    # what the health sweep writes all the time (findings, the same state) reads nothing again
    for _ in range(3):
        result_of(fleet.store.health.save(fleet.keys[5], "down", fleet.clock.seconds(), [{"kind": "x"}], None))
        result_of(queries.page(FleetFilter(), limit=100, now=fleet.clock.seconds()))
    # a change of state, with its transition
    result_of(fleet.store.health.save(fleet.keys[5], "healthy", fleet.tick(), [],
                                      TransitionRow(fleet.clock.seconds(), "down", "healthy", "t")))
    page = result_of(queries.page(FleetFilter(), limit=100, now=fleet.clock.seconds()))
    # an inventory edit through roller
    result_of(fleet.store.machines.put(attrs.evolve(fleet.store.machines.cached(fleet.keys[7]), ip="192.0.2.99")))
    edited = result_of(queries.page(FleetFilter(), limit=100, now=fleet.clock.seconds()))
    assert reads == [24, 1, 1, 1, 1, 1]
    assert {r.worker_id: r.ip for r in edited.rows}[fleet.keys[7][1]] == "192.0.2.99"
    assert {r.worker_id: r.health for r in page.rows}[fleet.keys[5][1]] == "healthy"
    assert queries.rows.cleared == 0
