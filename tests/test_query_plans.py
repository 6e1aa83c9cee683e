"""
The history's lookups read by index: every statement each page and API
lookup runs (the machine page, the audit log by target, jobs by task, by
state, by worker, by batch, the C{/jobs} page, loans, the fleet page, the
charts) is captured as SQLite runs it (a trace callback on the store's
connections), and its C{EXPLAIN QUERY PLAN} must not read a history table
(jobs, job_events, audit, loans, health_transitions, remediations) whole.

What fails:

- C{SCAN <table>}, with or without C{USING [COVERING] INDEX}: the whole
  table or a whole index is walked.  A walk in index order with a C{LIMIT}
  stops early only while its filter keeps matching; a filter that matches
  nothing (a task with no jobs, a target with no entries) reads every row,
  which is the lookup that took 100 ms at 1 000 000 jobs.  So a filtered
  lookup must be led by an index on the filter's columns: C{SEARCH ...
  USING INDEX x (col=? ...)}.  The only scans allowed are named by their
  case, with the reason: no filter at all (the newest audit entries, the
  newest jobs: the C{LIMIT} is the bound), or a filter that skips at most
  one row per machine (returned loans skip only the active ones).
- C{USE TEMP B-TREE FOR ORDER BY} in a statement whose outer loop is a
  history table: every matching row is read and sorted before the first is
  returned.  (A sort over the machines, whose number is the fleet's, is
  not the history; a C{GROUP BY} aggregate reads its input anyway, and that
  input's own loop is checked.)

What passes: C{SEARCH} by an index's leading columns or a range of the
primary key.  Filters an index does not lead are checked on the rows the
index walk reads: within one machine's, one batch's, one task and state's
jobs (L{roller.store.job_lookup}); the C{/jobs} page's pool and requester
filters, and a group with a task or states, walk a bounded span of the
primary key (L{roller.store.history}).

The store runs no C{ANALYZE}, so these are the plans a roller gets; the
same checks run once more after an C{ANALYZE} (an operator may run one),
where the planner weighs the indexes by their statistics.

On PostgreSQL (C{EXPLAIN} with C{enable_seqscan} off) the planner always
has statistics, and rightly walks the primary key for a filter most rows
match; so there the lookups whose filter matches nothing are judged
(L{PG_CASES}): each must be answered by an index on the filter's columns,
not a sequential scan nor an index walked whole (with a filter, or for a
later column than its first).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from attrs import frozen
from twisted.internet.defer import Deferred

from roller.jobs import State
from roller.store import Store
from roller.store.fleet import FleetFilter, FleetQueries
from roller.store.history import HistoryQueries, JobQuery
from roller.store.stats import StatsQueries
from roller.testing.syncdb import result_of, sync_store

HISTORY = ("jobs", "job_events", "audit", "loans", "health_transitions", "remediations")
_NOT_ALIASES = {"WHERE", "ON", "JOIN", "LEFT", "INNER", "CROSS", "ORDER", "GROUP", "LIMIT", "USING", "INDEXED",
                "NATURAL", "UNION", "AS", "SET", "VALUES"}
T0 = 1_700_000_000.0
TASKS = ("ping", "reboot", "ssh_check", "loan", "ipmi_reset")
STATES = [s.value for s in State]


def aliases(sql: str) -> dict[str, str]:
    """The names the plan may call each history table by in C{sql}: itself and its aliases."""
    out = {t: t for t in HISTORY}
    for m in re.finditer(r"\b(?:FROM|JOIN)\s+(\w+)\s+(?:AS\s+)?(\w+)", sql, re.IGNORECASE):
        table, alias = m.groups()
        if table in HISTORY and alias.upper() not in _NOT_ALIASES:
            out[alias] = table
    return out


def problems(sql: str, plan: list[tuple[int, int, str]]) -> list[str]:
    """What reads a history table whole in C{plan} (C{(id, parent, detail)} rows) of C{sql}; see the docstring."""
    names = aliases(sql)
    loops: dict[int, list[str]] = defaultdict(list)
    for _, parent, detail in plan:
        if re.match(r"(SCAN|SEARCH) ", detail):
            loops[parent].append(detail)
    out = []
    for _, parent, detail in plan:
        m = re.match(r"SCAN (\w+)", detail)
        if m and m.group(1) in names:
            out.append(detail)
        if re.match(r"USE TEMP B-TREE FOR (RIGHT PART OF |LAST TERM OF )?ORDER BY", detail) and loops[parent]:
            outer = re.match(r"(?:SCAN|SEARCH) (\w+)", loops[parent][0])
            if outer and outer.group(1) in names:
                out.append(f"{detail} (over {loops[parent][0]})")
    return out


@frozen
class Statement:
    sql: str
    plan: list[tuple[int, int, str]]

    @property
    def text(self) -> str:
        return " | ".join(d for _, _, d in self.plan)


class Recorder:
    """Every statement the store's connections run while C{recording}, with its plan."""

    def __init__(self, store: Store, path: str):
        self.sql: list[str] = []
        self.on = False
        for read in (store.db.read, store.db.read_on_writer):
            conn = result_of(read(lambda c: c.connection))
            conn.set_trace_callback(self._trace)
        self.explain = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def _trace(self, sql: str) -> None:
        if self.on:
            self.sql.append(sql)

    def run(self, call: Callable[[], Deferred[Any]]) -> list[Statement]:
        self.sql, self.on = [], True
        try:
            result_of(call())
        finally:
            self.on = False
        out = []
        for sql in self.sql:
            if not re.match(r"\s*(SELECT|WITH)\b", sql, re.IGNORECASE):
                continue  # PRAGMA data_version and the like
            plan = [(r[0], r[1], r[3]) for r in self.explain.execute("EXPLAIN QUERY PLAN " + sql)]
            out.append(Statement(sql, plan))
        return out


@frozen
class Case:
    name: str
    call: Callable[[Store], Deferred[Any]]
    #: an index the plans must use (the lookup is led by it)
    uses: str | None = None
    #: plan lines allowed although they would fail, as regexes, with the reason
    allow: tuple[tuple[str, str], ...] = ()


def _jobs(**kw: Any) -> Callable[[Store], Deferred[Any]]:
    return lambda s: s.jobs.list(**kw)


def _page(**kw: Any) -> Callable[[Store], Deferred[Any]]:
    return lambda s: HistoryQueries(s).page(JobQuery(**kw), limit=100, max_scan=200_000)


_NO_FILTER = "no filter: the newest rows in primary-key order, and the LIMIT stops the walk"
_PK_WALK = r"^SEARCH jobs USING INTEGER PRIMARY KEY"

CASES = [
    # the machine page (GET /machines/<group>/<worker>)
    Case("machine page: its jobs", _jobs(worker_id="m7", worker_group="g1", limit=25), uses="jobs_machine"),
    Case("machine page: its audit log", lambda s: s.audit.list(target="g1/m7", limit=50), uses="audit_target"),
    Case("machine page: loan, ping, health", lambda s: FleetQueries(s).machine_extras("g1", "m7"),
         uses="jobs_machine_task"),
    Case("machine page: active loan", lambda s: s.loans.active("g1", "m7"), uses="loans_one_active"),
    Case("machine page: health transitions", lambda s: s.health.transitions(("g1", "m7")),
         uses="health_transitions_machine"),
    # GET /api/v1/jobs?...
    Case("api: newest jobs", _jobs(limit=50), allow=((r"^SCAN jobs$", _NO_FILTER),)),
    Case("api: newest jobs, next page", _jobs(limit=50, before=2000)),
    Case("api: a task with no jobs", _jobs(task_name="nope", limit=50), uses="jobs_task_state"),
    Case("api: a task", _jobs(task_name="reboot", limit=50), uses="jobs_task_state"),
    Case("api: a task in a state", _jobs(task_name="reboot", states=[State.running], limit=50),
         uses="jobs_task_state"),
    Case("api: a task in states, next page",
         _jobs(task_name="loan", states=[State.failed, State.timed_out], before=3000, limit=50),
         uses="jobs_task_state"),
    Case("api: a task in a group", _jobs(task_name="reboot", worker_group="g2", limit=50), uses="jobs_task_state"),
    Case("api: a state", _jobs(states=[State.running], limit=50), uses="jobs_state"),
    Case("api: states", _jobs(states=[State.succeeded, State.failed], limit=50), uses="jobs_state"),
    Case("api: states in a group", _jobs(states=[State.failed], worker_group="g1", limit=50), uses="jobs_state"),
    Case("api: a group", _jobs(worker_group="g2", limit=50), uses="jobs_group"),
    Case("api: a group with no jobs", _jobs(worker_group="nope", limit=50), uses="jobs_group"),
    Case("api: a worker", _jobs(worker_id="m1", limit=50), uses="jobs_machine"),
    Case("api: a worker in a state", _jobs(worker_id="m1", states=[State.failed], limit=50), uses="jobs_machine"),
    Case("api: a machine in states", _jobs(worker_id="m7", worker_group="g1", states=[State.failed, State.queued],
                                          limit=50), uses="jobs_machine"),
    Case("api: a machine's task", _jobs(worker_id="m7", worker_group="g1", task_name="ping", limit=50),
         uses="jobs_machine_task"),
    Case("api: a batch", _jobs(batch_id="batch-1", limit=50), uses="jobs_batch"),
    Case("api: a batch's failures", _jobs(batch_id="batch-1", states=[State.failed], limit=50), uses="jobs_batch"),
    Case("api: a job", lambda s: s.jobs.get("job-000123")),
    Case("api: a job's events", lambda s: s.jobs.events("job-000123"), uses="job_events_job"),
    # GET /api/v1/audit and /audit
    Case("audit: newest", lambda s: s.audit.list(limit=100), allow=((r"^SCAN audit$", _NO_FILTER),)),
    Case("audit: a target", lambda s: s.audit.list(target="g2/m3", limit=100), uses="audit_target"),
    Case("audit: a target with no entries", lambda s: s.audit.list(target="nobody", limit=100), uses="audit_target"),
    Case("audit: a target, next page", lambda s: s.audit.list(target="g2/m3", before=2500, limit=100),
         uses="audit_target"),
    # GET /api/v1/loans
    Case("loans: newest", lambda s: s.loans.list(), allow=((r"^SCAN loans$", _NO_FILTER),)),
    Case("loans: active", lambda s: s.loans.list(active=True),
         allow=((r"^USE TEMP B-TREE FOR ORDER BY", "the active loans, at most one per machine, sorted"),)),
    Case("loans: overdue", lambda s: s.loans.list(overdue_at=T0 + 10),
         allow=((r"^USE TEMP B-TREE FOR ORDER BY", "the active loans, at most one per machine, sorted"),)),
    Case("loans: returned", lambda s: s.loans.list(active=False),
         allow=((r"^SCAN loans$", "newest first, skipping only the active loans (at most one per machine)"),)),
    Case("loans: a machine's", lambda s: s.loans.list(worker_group="g1", worker_id="m7"), uses="loans_machine"),
    # the /jobs page
    Case("/jobs", _page(), allow=((_PK_WALK, "a range of the primary key"),)),
    Case("/jobs: a task with no jobs", _page(task="nope"), uses="jobs_task_state"),
    Case("/jobs: a task in states", _page(task="ping", states=("failed", "timed_out")), uses="jobs_task_state"),
    Case("/jobs: states", _page(states=("running", "failed")), uses="jobs_state"),
    Case("/jobs: a worker", _page(worker="m1"), uses="jobs_machine"),
    Case("/jobs: a machine's failures", _page(worker="m7", group="g1", states=("failed",)), uses="jobs_machine"),
    Case("/jobs: a machine's task", _page(worker="m7", group="g1", task="reboot"), uses="jobs_machine_task"),
    Case("/jobs: a batch", _page(batch="batch-1"), uses="jobs_batch"),
    Case("/jobs: a time range", _page(since=T0 + 100, until=T0 + 900)),
    Case("/jobs: a task since", _page(task="reboot", since=T0 + 1000), uses="jobs_task_state"),
    Case("/jobs: a pool (bounded walk)", _page(pool="p1", task="reboot"), uses="INTEGER PRIMARY KEY"),
    Case("/jobs: a requester (bounded walk)", _page(requester="nobody"), uses="INTEGER PRIMARY KEY"),
    Case("/jobs: a group", _page(group="nope"), uses="jobs_group"),
    Case("/jobs: a group's failures (bounded walk)", _page(group="g2", states=("failed",)),
         uses="INTEGER PRIMARY KEY"),
    # the fleet page (GET /) and the charts (GET /stats)
    Case("fleet page", lambda s: FleetQueries(s).page(FleetFilter(), limit=200), uses="jobs_machine"),
    Case("fleet page: liveness down", lambda s: FleetQueries(s).page(FleetFilter(liveness="down"), limit=200),
         uses="jobs_machine_task"),
    Case("stats: a day", lambda s: StatsQueries(s).hourly(int(T0) + 4000)),
    Case("stats: a week", lambda s: StatsQueries(s).week(int(T0) + 3600 * 2, int(T0) + 86400)),
    # health (the watcher's start-up, another roller's remediations)
    Case("health: recent remediations", lambda s: s.health.remediations(T0 + 300), uses="remediations_time"),
    Case("health: remediations after", lambda s: s.health.remediations_after(250)),
]

def history(n: int = 4000) -> list[dict[str, Any]]:
    """C{n} jobs over 60 machines in two groups (m1 in both), every task and state, some in a batch."""
    out = []
    for i in range(n):
        group = "g1" if i % 2 else "g2"
        worker = "m1" if i % 11 == 0 else f"m{i % 60}"
        state = ("succeeded", "failed", "succeeded", "timed_out", "succeeded", "cancelled")[i % 6]
        if i >= n - 30:  # (PostgreSQL: at most one running job per machine)
            state, worker = ("queued", "running")[i % 2], f"m{10 + i - (n - 30)}"
        elif i % 97 == 0:
            state = "interrupted"
        out.append({"seq": i + 1, "id": f"job-{i + 1:06d}", "task_name": TASKS[i % 5 if i % 7 else 0],
                    "worker_group": group, "worker_id": worker, "requester": ("alice", "bob")[i % 2],
                    "state": state, "created_at": T0 + i, "batch_id": "batch-1" if 1000 <= i < 1100 else None})
    return out


def fill(store: Store, jobs: list[dict[str, Any]]) -> None:
    machines = sorted({(j["worker_group"], j["worker_id"]) for j in jobs})

    def run(c: Any) -> None:
        c.executemany("INSERT INTO machines (worker_group, worker_id, fqdn, ip, pool, data, created_at, updated_at)"
                      " VALUES (?, ?, ?, ?, ?, ?, 0, 0)",
                      [(g, w, f"{w}.example", None, f"p{n % 3}",
                        json.dumps({"worker_group": g, "worker_id": w, "fqdn": f"{w}.example", "pool": f"p{n % 3}"}))
                       for n, (g, w) in enumerate(machines)])
        c.executemany("INSERT INTO jobs (seq, id, task_name, worker_group, worker_id, requester, priority, state,"
                      " created_at, started_at, finished_at, batch_id) VALUES (?, ?, ?, ?, ?, ?, 50, ?, ?, ?, ?, ?)",
                      [(j["seq"], j["id"], j["task_name"], j["worker_group"], j["worker_id"], j["requester"],
                        j["state"], j["created_at"], j["created_at"] + 1,
                        None if j["state"] in ("queued", "running") else j["created_at"] + 2, j["batch_id"])
                       for j in jobs])
        c.executemany("INSERT INTO job_events (job_id, time, kind, message) VALUES (?, ?, ?, ?)",
                      [(j["id"], j["created_at"] + k, "state", "x") for j in jobs for k in range(3)])
        c.executemany("INSERT INTO audit (time, actor, action, target, result) VALUES (?, ?, ?, ?, ?)",
                      [(j["created_at"], "alice", "job.create:" + j["task_name"],
                        f"{j['worker_group']}/{j['worker_id']}", "queued") for j in jobs])
        c.executemany("INSERT INTO loans (worker_group, worker_id, borrower, started_at, expires_at, returned_at)"
                      " VALUES (?, ?, ?, ?, ?, ?)",
                      [(*machines[k % len(machines)], "dev", T0 + k, T0 + k + 50, None if k >= 290 else T0 + k + 20)
                       for k in range(300)])  # the last 10 are active
        c.executemany("INSERT INTO health_transitions (worker_group, worker_id, time, old, new) VALUES (?, ?, ?, ?, ?)",
                      [(*machines[k % len(machines)], T0 + k, "healthy", "down") for k in range(600)])
        c.executemany("INSERT INTO remediations (worker_group, worker_id, policy, task, time) VALUES (?, ?, ?, ?, ?)",
                      [(*machines[k % len(machines)], "p", "reboot", T0 + k) for k in range(600)])
        c.executemany("INSERT INTO health (worker_group, worker_id, state, since) VALUES (?, ?, ?, ?)",
                      [(g, w, "down" if n % 9 == 0 else "healthy", T0) for n, (g, w) in enumerate(machines)])

    result_of(store.db.write(run))
    result_of(store.machines.load())


@pytest.fixture(scope="module", params=["plain", "analyzed"])
def planned(request: Any, tmp_path_factory: Any) -> Iterator[tuple[Store, Recorder]]:
    path = str(tmp_path_factory.mktemp("plans") / "roller.db")
    store, _ = sync_store(path)
    fill(store, history())
    if request.param == "analyzed":
        result_of(store.db.write(lambda c: c.execute("ANALYZE")))
    recorder = Recorder(store, path)
    yield store, recorder
    recorder.explain.close()
    result_of(store.close())


def check(store: Store, recorder: Recorder, case: Case) -> list[str]:
    statements = recorder.run(lambda: case.call(store))
    history_reads = [s for s in statements if any(t in aliases(s.sql) for t in
                                                    re.findall(r"(?:SCAN|SEARCH) (\w+)", s.text))]
    assert history_reads, f"{case.name}: no statement read a history table (nothing recorded?)"
    out = []
    for s in statements:
        for p in problems(s.sql, s.plan):
            why = [reason for pattern, reason in case.allow if re.search(pattern, p)]
            if not why:
                out.append(f"{p}\n    in {s.sql[:300]}")
    if case.uses is not None:
        assert any(case.uses in s.text for s in statements), (
            f"{case.name}: no plan uses {case.uses}:\n" + "\n".join(f"{s.text}\n    {s.sql[:200]}" for s in statements))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_lookup_reads_by_index(planned: tuple[Store, Recorder], case: Case) -> None:
    store, recorder = planned
    found = check(store, recorder, case)
    assert not found, f"{case.name} reads a history table whole:\n" + "\n".join(found)


def test_the_check_catches_scans_and_sorts(planned: tuple[Store, Recorder]) -> None:
    """A filter without an index, and an order no index gives, fail; an index lookup does not."""
    _, recorder = planned

    def plan(sql: str) -> list[str]:
        return problems(sql, [(r[0], r[1], r[3]) for r in recorder.explain.execute("EXPLAIN QUERY PLAN " + sql)])

    assert plan("SELECT * FROM audit WHERE actor = 'x' ORDER BY id DESC LIMIT 5") == ["SCAN audit"]
    assert plan("SELECT j.id FROM jobs j WHERE j.requester = 'x' LIMIT 5") == ["SCAN j"]
    sorted_ = plan("SELECT * FROM jobs WHERE worker_id = 'm1' ORDER BY created_at LIMIT 5")
    assert len(sorted_) == 1 and sorted_[0].startswith("USE TEMP B-TREE FOR ORDER BY"), sorted_
    assert plan("SELECT * FROM audit WHERE target = 'g1/m7' ORDER BY id DESC LIMIT 5") == []
    assert plan("SELECT m.worker_id FROM machines m ORDER BY m.fqdn") == []  # the fleet, not the history


# -- the index walks answer what the single statement did, on both engines


def _expected(jobs: list[dict[str, Any]], limit: int, before: int | None = None, **f: Any) -> list[str]:
    out = []
    for j in sorted(jobs, key=lambda j: -j["seq"]):
        if before is not None and j["seq"] >= before:
            continue
        if f.get("states") and j["state"] not in f["states"]:
            continue
        if any(f.get(k) is not None and j[k] != f[k] for k in ("worker_id", "worker_group", "task_name", "batch_id")):
            continue
        out.append(j["id"])
    return out[:limit]


FILTERS = [
    {}, {"task_name": "reboot"}, {"task_name": "nope"}, {"task_name": "loan", "states": ["failed", "timed_out"]},
    {"task_name": "ping", "worker_group": "g1"}, {"states": ["running"]}, {"states": ["succeeded", "failed"]},
    {"states": ["failed", "interrupted"], "worker_group": "g2"}, {"worker_id": "m1"},
    {"worker_id": "m1", "states": ["failed", "queued"]}, {"worker_id": "m7", "worker_group": "g1"},
    {"worker_id": "m1", "worker_group": "g2", "task_name": "ping"}, {"batch_id": "batch-1"},
    {"batch_id": "batch-1", "states": ["failed"], "worker_group": "g1"}, {"worker_group": "g2"},
    {"states": ["failed", "failed"]}, {"task_name": "ping", "states": ["queued", "queued", "running"]},
]


@pytest.mark.parametrize("f", FILTERS, ids=[",".join(f"{k}={v}" for k, v in f.items()) or "all" for f in FILTERS])
def test_job_list_matches_the_filter(store_path: str, f: dict[str, Any]) -> None:
    store, _ = sync_store(store_path)
    try:
        jobs = history(1500)
        fill(store, jobs)
        kw = dict(f, states=[State(s) for s in f.get("states", ())])
        for limit, before in ((50, None), (7, 1300), (1000, None), (3, 40)):
            got = [j.id for j in result_of(store.jobs.list(**kw, limit=limit, before=before))]
            assert got == _expected(jobs, limit, before, **f), (limit, before)
        page = result_of(HistoryQueries(store).page(
            JobQuery(states=tuple(f.get("states", ())), task=f.get("task_name"), group=f.get("worker_group"),
                     worker=f.get("worker_id"), batch=f.get("batch_id")), limit=25, max_scan=10**6))
        assert [j.id for j in page.jobs] == _expected(jobs, 25, **f)
    finally:
        result_of(store.close())


# -- PostgreSQL: the same lookups, EXPLAIN with sequential scans turned off


def pg_problems(node: dict[str, Any], leading: dict[str, str]) -> list[tuple[str, str]]:
    """
    The history tables a PostgreSQL plan reads whole, as C{("SCAN
    <table>", what the plan does)}: a C{Seq Scan} (with C{enable_seqscan}
    off, the planner takes one only when no index serves the filter); an
    index walked whole with a filter on its rows (an C{Index Scan} without
    an C{Index Cond}: a filter that matches nothing reads every row; without
    a filter, the C{LIMIT} stops it); an index whose condition leaves its
    leading column (C{leading}: index -> column) free, which is read whole
    too.  A sort is not judged here: PostgreSQL weighs sorting the rows an
    index finds against walking an index in order by its statistics (on
    these small tables it sorts the few matching rows), which is bounded by
    the index's matches either way.
    """
    out = []
    relation, kind = node.get("Relation Name"), node["Node Type"]
    if kind == "Seq Scan" and relation in HISTORY:
        out.append((f"SCAN {relation}", kind))
    elif kind in ("Index Scan", "Index Only Scan", "Bitmap Index Scan") and node["Index Name"] in leading:
        table, column = leading[node["Index Name"]]
        cond = node.get("Index Cond")
        if cond is None and "Filter" in node:
            out.append((f"SCAN {table}", f"{kind} using {node['Index Name']}, Filter: {node['Filter']}"))
        elif cond is not None and not re.search(rf"\({column} (=|<|>|<=|>=|IS) ", cond):
            out.append((f"SCAN {table}", f"{kind} using {node['Index Name']}, its leading {column} free: {cond}"))
    for child in node.get("Plans", []):
        out += pg_problems(child, leading)
    return out


class _RecordingCursor:
    """A store cursor that notes each statement and its parameters."""

    def __init__(self, cursor: Any, seen: list[tuple[str, Any]]):
        self._cursor = cursor
        self._seen = seen

    def execute(self, sql: str, params: Any = None) -> Any:
        self._seen.append((sql, params))
        return self._cursor.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class PgRecorder:
    """Every statement the store's reads run while recording, with its plan (C{enable_seqscan} off)."""

    def __init__(self, store: Store, url: str):
        import psycopg

        self.seen: list[tuple[str, Any]] = []
        self.on = False
        for name in ("read", "read_on_writer"):
            setattr(store.db, name, self._recording(getattr(store.db, name)))
        self.conn = psycopg.connect(url, autocommit=True, cursor_factory=psycopg.ClientCursor)
        self.conn.execute("SET enable_seqscan = off")
        #: each index of a history table -> (its table, its leading column)
        self.leading = {r[0]: (r[1], r[2]) for r in self.conn.execute(
            "SELECT c.relname, t.relname, a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_class t ON t.oid = i.indrelid"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
            " WHERE t.relname = ANY(%s)", [list(HISTORY)])}

    def _recording(self, read: Callable[..., Deferred[Any]]) -> Callable[..., Deferred[Any]]:
        def recorded(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
            return read(lambda c, *a: fn(_RecordingCursor(c, self.seen) if self.on else c, *a), *args)

        return recorded

    def run(self, call: Callable[[], Deferred[Any]]) -> list[tuple[str, dict[str, Any]]]:
        from roller.store.dialect import translate

        self.seen, self.on = [], True
        try:
            result_of(call())
        finally:
            self.on = False
        out = []
        for sql, params in self.seen:
            if re.match(r"\s*(SELECT|WITH)\b", sql, re.IGNORECASE):
                explained = self.conn.execute("EXPLAIN (FORMAT JSON) " + translate(sql), params or ()).fetchone()[0]
                out.append((sql, explained[0]["Plan"]))
        return out


@pytest.fixture(scope="module")
def pg_planned(postgres_server: Any) -> Iterator[tuple[Store, PgRecorder]]:
    url = postgres_server.create_database()
    store, _ = sync_store(url)
    fill(store, history())
    result_of(store.db.on_writer(lambda c: c.execute("ANALYZE")))
    recorder = PgRecorder(store, url)
    yield store, recorder
    recorder.conn.close()
    result_of(store.close())


def pg_check(store: Store, recorder: PgRecorder, case: Case) -> list[str]:
    statements = recorder.run(lambda: case.call(store))
    assert statements, f"{case.name}: nothing recorded"
    out = []
    for sql, plan in statements:
        for short, detail in pg_problems(plan, recorder.leading):
            if not any(re.search(pattern, short) for pattern, _ in case.allow):
                out.append(f"{short} ({detail})\n    in {sql[:300]}")
    return out


#: PostgreSQL plans by its statistics: a filter most rows match is rightly answered by walking the
#: primary key until the page is full, so only lookups whose filter matches nothing are judged there:
#: those must be answered by an index on the filter's columns
PG_CASES = [
    Case("machine page: jobs of a machine with none", _jobs(worker_id="nobody", worker_group="g1", limit=25)),
    Case("machine page: audit log of a machine with none", lambda s: s.audit.list(target="g1/nobody", limit=50)),
    Case("machine page: transitions of a machine with none", lambda s: s.health.transitions(("g1", "nobody"))),
    Case("api: a task with no jobs", _jobs(task_name="nope", limit=50)),
    Case("api: a task with no jobs, in states", _jobs(task_name="nope", states=[State.failed, State.running])),
    Case("api: a worker with no jobs", _jobs(worker_id="nobody", limit=50)),
    Case("api: a worker with no jobs, in a state", _jobs(worker_id="nobody", states=[State.failed], limit=50)),
    Case("api: a batch with no jobs", _jobs(batch_id="batch-none", limit=50)),
    Case("api: a group with no jobs", _jobs(worker_group="nope", limit=50)),
    Case("audit: a target with no entries", lambda s: s.audit.list(target="nobody", limit=100)),
    Case("loans: a machine with none", lambda s: s.loans.list(worker_group="g1", worker_id="nobody")),
    Case("/jobs: a task with no jobs", _page(task="nope")),
    Case("/jobs: a machine with no jobs", _page(worker="nobody", group="g1", states=("failed",))),
    Case("/jobs: a group with no jobs", _page(group="nope")),
]


@pytest.mark.parametrize("case", PG_CASES, ids=[c.name for c in PG_CASES])
def test_lookup_reads_by_index_on_postgresql(pg_planned: tuple[Store, PgRecorder], case: Case) -> None:
    store, recorder = pg_planned
    found = pg_check(store, recorder, case)
    assert not found, f"{case.name} reads a history table whole:\n" + "\n".join(found)


def test_the_postgresql_check_catches_scans(pg_planned: tuple[Store, PgRecorder]) -> None:
    """A filter no index serves is caught on PostgreSQL too."""
    _, recorder = pg_planned

    def found(sql: str) -> list[str]:
        plan = recorder.conn.execute("EXPLAIN (FORMAT JSON) " + sql).fetchone()[0][0]["Plan"]
        return [short for short, _ in pg_problems(plan, recorder.leading)]

    assert found("SELECT * FROM audit WHERE actor = 'nobody' ORDER BY id DESC LIMIT 5") == ["SCAN audit"]
    assert found("SELECT * FROM jobs WHERE requester = 'nobody'") == ["SCAN jobs"]
    # health_transitions_machine (worker_group, worker_id, id) walked whole for its second column
    assert found("SELECT * FROM health_transitions WHERE worker_id = 'nobody'") == ["SCAN health_transitions"]
    assert found("SELECT * FROM audit WHERE target = 'nobody' ORDER BY id DESC LIMIT 5") == []
