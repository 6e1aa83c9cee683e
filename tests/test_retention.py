"""
History retention (L{roller.store.retention}): what goes, what never goes,
and that pruning holds the write lock only briefly.

The rules are checked on a real SQLite store answering synchronously
(L{roller.testing.syncdb.sync_store}); the lock hold during a large prune
with submissions going on, on the real threaded store and reactor.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList

from roller.inventory import Machine
from roller.jobs import Job, JobEvent, State, new_job_id
from roller.store import AuditEntry, Store, open_store
from roller.store.fleet import FleetFilter, FleetQueries
from roller.store.loans import Loan
from roller.store.retention import DAY, PruneLoop, Pruner, RetentionPolicy, ensure_incremental_vacuum
from roller.testing.syncdb import SyncClock, result_of, run, sync_store

NOW = 1_700_000_000.0


def ago(days: float) -> float:
    return NOW - days * DAY


def add_job(store: Store, worker: str, task: str, state: str, days: float, *, logs: int = 2,
            batch_id: str | None = None, group: str = "mdc1") -> Job:
    """A job that ended (or, queued/running, was created) C{days} ago, with a state event and C{logs} log lines."""
    at = ago(days)
    final = state not in ("queued", "running")
    job = Job(id=new_job_id(), task_name=task, worker_id=worker, worker_group=group, created_at=at - 10,
              state=State(state), started_at=None if state == "queued" else at - 5,
              finished_at=at if final else None, result="ok" if state == "succeeded" else None,
              error="boom" if state == "failed" else None, batch_id=batch_id)
    job = result_of(store.jobs.insert(job, JobEvent(job.id, at - 10, "state", "queued", {"state": "queued"})))
    events = [JobEvent(job.id, at - 4 + i * 0.1, "log", f"line {i}") for i in range(logs)]
    if final:
        events.append(JobEvent(job.id, at, "state", state, {"state": state}))
    result_of(store.jobs.add_events(events))
    return job


def add_batch(store: Store, batch_id: str, finished_days: float | None, jobs: list[Job]) -> None:
    def run_(c: Any) -> None:
        c.execute("INSERT INTO batches (id, task_name, selector, rollout, requester, priority, state, created_at,"
                  " finished_at, total) VALUES (?, 'reboot', '{}', '{}', 'test', 50, ?, ?, ?, ?)",
                  (batch_id, "running" if finished_days is None else "succeeded", ago(400),
                   None if finished_days is None else ago(finished_days), len(jobs)))
        for i, j in enumerate(jobs):
            c.execute("INSERT INTO batch_members (batch_id, position, worker_group, worker_id, state, job_id)"
                      " VALUES (?, ?, ?, ?, 'succeeded', ?)", (batch_id, i, j.worker_group, j.worker_id, j.id))

    result_of(store.db.write(run_))


def rows(store: Store, sql: str, *args: Any) -> list[tuple]:
    return [tuple(r) for r in result_of(store.db.read(lambda c: c.execute(sql, args).fetchall()))]


def job_ids(store: Store) -> set[str]:
    return {r[0] for r in rows(store, "SELECT id FROM jobs")}


def fleet_view(store: Store) -> list[tuple] | None:
    if store.db.dialect.postgresql:
        return None  # the fleet page's queries (roller.store.fleet) are SQLite's so far
    page = result_of(FleetQueries(store).page(FleetFilter(), limit=1000))
    return [(r.worker_id, r.last and r.last.id, r.last and r.last.state, r.liveness and r.liveness.job_id)
            for r in page.rows]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> Any:
    """The store-level tests run on SQLite and on PostgreSQL (L{roller.testing.postgres})."""
    path = ":memory:"
    if request.param == "postgresql":
        path = request.getfixturevalue("postgres_server").create_database()
    s, _ = sync_store(path)
    yield s
    result_of(s.close())


@pytest.fixture
def sqlite_store() -> Store:
    s, _ = sync_store()
    return s


DEFAULTS = RetentionPolicy()


def prune(store: Store, policy: RetentionPolicy = DEFAULTS, **kw: Any) -> Any:
    return run(Pruner(store.db, **kw).prune(policy, NOW))


def test_what_goes_and_what_never_goes(store: Store) -> None:
    for w in ("m1", "m2", "m3", "m4", "m5", "m6", "m7"):
        result_of(store.machines.put(Machine.from_json({"worker_id": w, "worker_group": "mdc1"})))
    # m1: pings over time; the newest ping was cancelled, so the newest *finished* one is the fleet's "last ping"
    p_old = add_job(store, "m1", "ping", "succeeded", 200)
    p_failed = add_job(store, "m1", "ping", "failed", 150)
    p_last_finished = add_job(store, "m1", "ping", "succeeded", 100)
    p_newest = add_job(store, "m1", "ping", "cancelled", 95)
    r_only = add_job(store, "m1", "reboot", "succeeded", 300)  # its only reboot: the newest of its task
    # m2: a job still queued and one still running, however old, and older finished ones
    m2_old = add_job(store, "m2", "reboot", "failed", 260)
    m2_last_finished = add_job(store, "m2", "reboot", "timed_out", 250)  # its newest finished reboot stays
    running = add_job(store, "m2", "reboot", "running", 200)
    queued = add_job(store, "m2", "reboot", "queued", 199)
    # m3: an old ping and a recent one
    m3_old = add_job(store, "m3", "ping", "succeeded", 300)
    m3_new = add_job(store, "m3", "ping", "succeeded", 1)
    # m4: an old job of a batch still running
    in_running_batch = add_job(store, "m4", "reboot", "succeeded", 200, batch_id="b-running")
    add_job(store, "m4", "reboot", "succeeded", 2)
    add_batch(store, "b-running", None, [in_running_batch])
    # m5: a batch that finished before the cutoff goes with its jobs; one finished after it stays with its jobs
    in_old_batch = add_job(store, "m5", "reboot", "succeeded", 120, batch_id="b-old")
    in_new_batch = add_job(store, "m5", "reboot", "succeeded", 110, batch_id="b-new")
    add_job(store, "m5", "reboot", "succeeded", 3)
    add_batch(store, "b-old", 100, [in_old_batch])
    add_batch(store, "b-new", 10, [in_new_batch])
    # m6: log lines of succeeded jobs older than keep_events_days go, their state events stay
    logs_go = add_job(store, "m6", "ping", "succeeded", 20, logs=5)
    logs_failed = add_job(store, "m6", "ping", "failed", 19, logs=5)
    logs_recent = add_job(store, "m6", "ping", "succeeded", 5, logs=5)
    # audit, loans, health history
    result_of(store.audit.add(AuditEntry(time=ago(500), actor="a", action="old", result="ok")))
    result_of(store.audit.add(AuditEntry(time=ago(1), actor="a", action="new", result="ok")))
    result_of(store.loans.insert(Loan("mdc1", "m7", "bob", "", ago(500), ago(450), returned_at=ago(400))))
    result_of(store.loans.insert(Loan("mdc1", "m6", "bob", "", ago(200), ago(150), returned_at=ago(100))))
    result_of(store.loans.insert(Loan("mdc1", "m5", "eve", "", ago(600), ago(10))))  # active, overdue
    for days in (200, 1):
        result_of(store.db.write(lambda c, d=days: c.execute(
            "INSERT INTO health_transitions (worker_group, worker_id, time, old, new) VALUES ('mdc1', 'm1', ?,"
            " 'healthy', 'down')", (ago(d),))))
        result_of(store.db.write(lambda c, d=days: c.execute(
            "INSERT INTO remediations (worker_group, worker_id, policy, task, time) VALUES ('mdc1', 'm1', 'p',"
            " 'reboot', ?)", (ago(d),))))

    fleet_before = fleet_view(store)
    before = job_ids(store)
    dry = result_of(Pruner(store.db).count(RetentionPolicy(), NOW))
    report = prune(store)

    gone = before - job_ids(store)
    assert gone == {p_old.id, p_failed.id, m2_old.id, m3_old.id, in_old_batch.id}
    for kept in (p_last_finished, p_newest, r_only, m2_last_finished, running, queued, m3_new, in_running_batch,
                 in_new_batch, logs_go, logs_failed, logs_recent):
        assert kept.id in job_ids(store)
    assert rows(store, "SELECT count(*) FROM job_events WHERE job_id IN (?, ?, ?, ?, ?)",
                p_old.id, p_failed.id, m2_old.id, m3_old.id, in_old_batch.id) == [(0,)]
    # the fleet page reads the same last job and last ping for every machine
    assert fleet_view(store) == fleet_before
    if fleet_before is not None:
        m1 = next(p for p in fleet_before if p[0] == "m1")
        assert m1[1] == r_only.id and m1[3] == p_last_finished.id  # last job (the newest written), last ping
    # batches: the finished one went with its members, the others stay
    assert {r[0] for r in rows(store, "SELECT id FROM batches")} == {"b-running", "b-new"}
    assert rows(store, "SELECT count(*) FROM batch_members WHERE batch_id = 'b-old'") == [(0,)]
    # log lines: only those of the succeeded job that ended 20 days ago; its state events stay
    kinds = {j.id: [e.kind for e in result_of(store.jobs.events(j.id))] for j in (logs_go, logs_failed, logs_recent)}
    assert kinds[logs_go.id] == ["state", "state"]
    assert kinds[logs_failed.id].count("log") == 5 and kinds[logs_recent.id].count("log") == 5
    # audit kept forever by default; the loan returned 400 days ago went; the active one stays
    assert [r[0] for r in rows(store, "SELECT action FROM audit ORDER BY id")] == ["old", "new"]
    assert sorted(r[0] for r in rows(store, "SELECT borrower || ' ' || worker_id FROM loans")) == ["bob m6", "eve m5"]
    assert rows(store, "SELECT count(*) FROM health_transitions") == [(1,)]
    assert rows(store, "SELECT count(*) FROM remediations") == [(1,)]

    assert report.counts == dry  # the dry run said exactly what went
    # log lines: logs_go's 5 and the 2 of each kept succeeded job that ended more than 14 days ago (4 of them)
    assert report.counts["jobs"] == 5 and report.counts["log_lines"] == 5 + 4 * 2 and report.counts["loans"] == 1
    assert report.counts["batches"] == 1 and report.counts["batch_members"] == 1
    assert report.counts["job_events"] == 5 * 4  # queued, two log lines, end state
    # a second pruning finds nothing
    assert prune(store).total == 0
    # the audit goes by its own setting
    assert prune(store, RetentionPolicy(keep_audit_days=30)).counts["audit"] == 1
    assert [r[0] for r in rows(store, "SELECT action FROM audit")] == ["new"]


def test_zero_days_keeps_everything(store: Store) -> None:
    add_job(store, "m1", "ping", "succeeded", 5000)
    add_job(store, "m1", "ping", "succeeded", 4000)
    result_of(store.loans.insert(Loan("mdc1", "m1", "bob", "", ago(5000), ago(4990), returned_at=ago(4980))))
    policy = RetentionPolicy(keep_days=0, keep_events_days=0, keep_audit_days=0, keep_loans_days=0)
    assert result_of(Pruner(store.db).count(policy, NOW)) == dict.fromkeys(prune(store, policy).counts, 0)
    assert len(job_ids(store)) == 2


def test_transactions_stay_small(sqlite_store: Store) -> None:
    store = sqlite_store  # SQLite's total_changes counts each transaction's rows
    for i in range(120):
        add_job(store, "m1", "ping", "succeeded", 400 - i, logs=3)  # 5 rows each with the job
    big = add_job(store, "m2", "ping", "succeeded", 300, logs=130)  # more events than a transaction takes
    add_job(store, "m2", "ping", "succeeded", 1)
    sizes: list[int] = []
    write_timed = store.db.write_timed

    def counting(fn: Any, *args: Any) -> Any:
        def counted(c: Any, *a: Any) -> Any:
            start = c.connection.total_changes
            out = fn(c, *a)
            sizes.append(c.connection.total_changes - start)
            return out
        return write_timed(counted, *args)

    store.db.write_timed = counting  # type: ignore[method-assign]
    report = prune(store, max_rows=50)
    assert report.counts["jobs"] == 119 + 1 and big.id not in job_ids(store)
    assert sizes and max(sizes) <= 50
    assert report.transactions >= len(sizes) >= (119 * 6 + 133) // 50


def test_a_prune_loop_runs_every_interval_and_stops() -> None:
    clock = SyncClock()
    clock.advance(NOW)
    store, _ = sync_store(clock=clock)
    add_job(store, "m1", "ping", "succeeded", 200)
    add_job(store, "m1", "ping", "succeeded", 1)
    loop = PruneLoop(Pruner(store.db), RetentionPolicy(), clock, 3600)
    loop.start()
    assert len(job_ids(store)) == 2  # not at start
    clock.advance(3600)
    assert len(job_ids(store)) == 1 and loop.last is not None and loop.last.counts["jobs"] == 1
    run(loop.stop())
    add_job(store, "m1", "ping", "succeeded", 150)  # older than the newest: would go
    clock.advance(7200)
    assert len(job_ids(store)) == 2


def test_stop_ends_a_pruning_after_its_transaction(store: Store) -> None:
    for i in range(30):
        add_job(store, "m1", "ping", "succeeded", 400 - i, logs=0)
    pruner = Pruner(store.db, max_rows=4)
    write_timed = store.db.write_timed
    seen = []

    def stopping(fn: Any, *args: Any) -> Any:
        seen.append(fn)
        pruner.stop()
        return write_timed(fn, *args)

    store.db.write_timed = stopping  # type: ignore[method-assign]
    report = run(pruner.prune(RetentionPolicy(), NOW))
    assert report.stopped and len(seen) == 1 and report.counts["jobs"] == 1  # 3 rows a job with its events


# -- on the real threaded store


def _seed(path: str, machines: int, jobs_each: int, events_each: int) -> None:
    """Old finished pings with their events, straight into the file (fast)."""
    conn = sqlite3.connect(path)
    with conn:
        job_rows, event_rows = [], []
        seq = 0
        for m in range(machines):
            for _ in range(jobs_each):
                seq += 1
                jid = f"00000000-0000-7000-8000-{seq:012d}"
                at = ago(400) + seq
                job_rows.append((jid, "ping", "mdc1", f"m{m}", "{}", "bench", "", 50, "succeeded", at - 2, at - 1, at,
                                 "ok"))
                event_rows += [(jid, at - 1 + i / 100, "log" if i else "state", f"line {i}", None)
                               for i in range(events_each)]
        conn.executemany("INSERT INTO jobs (id, task_name, worker_group, worker_id, params, requester, reason,"
                         " priority, state, created_at, started_at, finished_at, result)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", job_rows)
        conn.executemany("INSERT INTO job_events (job_id, time, kind, message, data) VALUES (?, ?, ?, ?, ?)",
                         event_rows)
    conn.close()


def _real_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest_twisted.ensureDeferred
async def test_a_large_prune_holds_the_lock_briefly_while_submissions_go_on(tmp_path: Path) -> None:
    path = str(tmp_path / "big.db")
    reactor = _real_reactor()
    await (await open_store(path, reactor)).close()
    _seed(path, machines=40, jobs_each=500, events_each=10)  # 20 000 jobs, 200 000 events
    size_before = os.path.getsize(path)
    store = await open_store(path, reactor)
    try:
        submitted: list[Job] = []
        stop = False

        async def submit_meanwhile() -> None:
            n = 0
            while not stop:
                job = Job(id=new_job_id(), task_name="ping", worker_id=f"new{n}", worker_group="mdc1",
                          created_at=NOW)
                submitted.append(await store.jobs.insert(job))
                n += 1

        submitters = [Deferred_from(submit_meanwhile()) for _ in range(4)]
        report = await Pruner(store.db, clock=reactor).prune(RetentionPolicy(), NOW)
        stop = True
        await DeferredList(submitters, fireOnOneErrback=True)

        assert report.counts["jobs"] == 40 * 499 and report.counts["job_events"] == 40 * 499 * 10
        # small transactions, not one big one: what keeps each write-lock hold (BEGIN IMMEDIATE to
        # COMMIT) short; how short is the machine's speed (bench/history.py measures it), not asserted
        assert report.transactions > 400, report.to_json()
        # submissions went on during the prune, and every one is on disk
        assert len(submitted) > report.transactions / 10
        ids = {r[0] for r in sqlite3.connect(path).execute("SELECT id FROM jobs WHERE worker_id LIKE 'new%'")}
        assert ids == {j.id for j in submitted}
        # the file gave the pages back (incremental auto-vacuum)
        assert report.pages_freed > 0
    finally:
        await store.close()
    assert os.path.getsize(path) < size_before / 4


def Deferred_from(coro: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coro)


def test_report_json_and_summary(store: Store) -> None:
    add_job(store, "m1", "ping", "succeeded", 200)
    add_job(store, "m1", "ping", "succeeded", 100)
    report = prune(store)
    data = report.to_json()
    assert json.loads(json.dumps(data))["counts"]["jobs"] == 1
    assert "removed 1 jobs, 4 job events" in report.summary()


def test_an_old_small_database_switches_to_incremental_vacuum_at_start(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)  # made the way roller did before incremental auto-vacuum
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    store, _ = sync_store(path)
    mode = "PRAGMA auto_vacuum"
    assert rows(store, mode) == [(0,)]
    run(ensure_incremental_vacuum(store.db, max_bytes=0))  # too large: left as it is (a warning says what to do)
    assert rows(store, mode) == [(0,)]
    add_job(store, "m1", "ping", "succeeded", 200)
    run(ensure_incremental_vacuum(store.db))
    assert result_of(store.db.read_on_writer(lambda c: c.execute(mode).fetchone()[0])) == 2
    assert len(job_ids(store)) == 1
    result_of(store.close())
    conn = sqlite3.connect(path)
    assert conn.execute(mode).fetchone()[0] == 2
    conn.close()
