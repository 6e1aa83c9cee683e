"""
The fleet page's queries: every machine with its newest job in one
statement (an index lookup per machine, not a scan of the job history),
counts by state, filter values, and each machine's active loan and newest
finished ping; the per-pool health strip.  Read-only; the dashboard renders
what they return.

The default order is "problems first" (L{PROBLEMS}): machines whose health
is down or whose newest ping failed, then degraded or quarantined ones,
then those whose last job failed, then the rest; by name within each.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from roller.jobs import State
from roller.store import Store
from roller.store.db import Cursor, data_version, key_values
from roller.store.dialect import SQLITE
from roller.store.fleet_rows import MachineRows
from roller.store.where import Where

#: the state filter value for machines that never had a job
NEVER = "none"

#: the newest job of machine m, through the jobs_machine index (worker_id, worker_group, seq)
_LAST_SEQ = (
    "(SELECT j.seq FROM jobs j WHERE j.worker_id = m.worker_id AND j.worker_group = m.worker_group"
    " ORDER BY j.seq DESC LIMIT 1)"
)
_WHEN = "COALESCE(j.finished_at, j.started_at, j.created_at)"
_STATE_RANK = (
    "CASE j.state WHEN 'failed' THEN 0 WHEN 'timed_out' THEN 1 WHEN 'interrupted' THEN 2"
    " WHEN 'running' THEN 3 WHEN 'queued' THEN 4 WHEN 'cancelled' THEN 5 WHEN 'succeeded' THEN 6 ELSE 7 END"
)
#: the health state, newest finished ping state and active loan's expiry of machine m
_HEALTH_OF = ("COALESCE((SELECT h.state FROM health h WHERE h.worker_group = m.worker_group"
              " AND h.worker_id = m.worker_id), 'unknown')")
_PING_OF = ("(SELECT p.state FROM jobs p WHERE p.worker_id = m.worker_id AND p.worker_group = m.worker_group"
            " AND p.task_name = 'ping' AND p.state IN ('succeeded', 'failed', 'timed_out')"
            " ORDER BY p.seq DESC LIMIT 1)")
_LOAN_OF = ("(SELECT l.expires_at FROM loans l WHERE l.worker_group = m.worker_group"
            " AND l.worker_id = m.worker_id AND l.returned_at IS NULL)")
#: 0 down (health, or its newest ping failed outside maintenance and loans), 1 degraded or quarantined,
#: 2 its last job failed, 3 the rest
_PROBLEM_RANK = (
    "CASE WHEN f.hs = 'down' OR (f.ps IN ('failed', 'timed_out') AND f.hs NOT IN ('maintenance', 'loaned'))"
    " THEN 0 WHEN f.hs IN ('degraded', 'quarantined') THEN 1"
    " WHEN j.state IN ('failed', 'timed_out', 'interrupted') THEN 2 ELSE 3 END"
)
_HEALTH_RANK = (
    "CASE f.hs WHEN 'down' THEN 0 WHEN 'degraded' THEN 1 WHEN 'quarantined' THEN 2 WHEN 'maintenance' THEN 3"
    " WHEN 'loaned' THEN 4 WHEN 'unknown' THEN 5 ELSE 6 END"
)
_ADDRESS = "COALESCE(f.ip, f.fqdn)"
#: the default order
PROBLEMS = "problems"
#: sort name -> (label, primary ordering with {d} for the direction, default direction)
SORTS: dict[str, tuple[str, str, str]] = {
    PROBLEMS: ("problems first", _PROBLEM_RANK + " {d}", "asc"),
    "name": ("name", "f.worker_group {d}, f.worker_id {d}", "asc"),
    "health": ("health (worst first)", _HEALTH_RANK + " {d}", "asc"),
    "group": ("group", "f.worker_group {d}", "asc"),
    "pool": ("pool", "f.pool IS NULL, f.pool {d}", "asc"),
    "address": ("address", f"{_ADDRESS} IS NULL, {_ADDRESS} {{d}}", "asc"),
    "task": ("last job's task", "j.task_name IS NULL, j.task_name {d}", "asc"),
    "state": ("last job state (problems first)", _STATE_RANK + " {d}", "asc"),
    "last": ("last job time", f"{_WHEN} IS NULL, {_WHEN} {{d}}", "desc"),
    "liveness": ("liveness (down first)",
                 "CASE WHEN f.ps IS NULL THEN 2 WHEN f.ps = 'succeeded' THEN 1 ELSE 0 END {d}", "asc"),
    "loan": ("loan (ending first)", "f.lu IS NULL, f.lu {d}", "asc"),
}
#: the sorts that need each machine's health, ping and loan (columns hs, ps, lu of the inner query)
_NEEDS_EXTRAS = (PROBLEMS, "health", "liveness", "loan")
FILTER_STATES = (*(s.value for s in State), NEVER)
#: fleet health states (L{roller.health.model.Health}); a machine without a health row is unknown
HEALTH_STATES = ("healthy", "degraded", "down", "unknown", "loaned", "quarantined", "maintenance")
#: liveness filter values: the newest finished ping succeeded, failed, or there is none
LIVENESS_STATES = ("up", "down", "never")
#: loan filter values: on loan (overdue or not), on loan past its end, not on loan
LOAN_STATES = ("loaned", "overdue", "free")
#: the pool strip's columns: health states, then machines running a job and machines on loan
STRIP = ("healthy", "degraded", "down", "running", "loaned", "maintenance")


@frozen
class FleetFilter:
    q: str | None = None
    group: str | None = None
    pool: str | None = None
    state: str | None = None  # a State value or NEVER
    health: str | None = None  # one of HEALTH_STATES
    liveness: str | None = None  # one of LIVENESS_STATES
    loan: str | None = None  # one of LOAN_STATES
    tag: str | None = None  # machines carrying this tag

    @property
    def key(self) -> tuple[str | None, ...]:
        return (self.q, self.group, self.pool, self.health, self.liveness, self.loan, self.tag)


@frozen
class LastJob:
    id: str
    task_name: str
    state: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    result: str | None
    requester: str

    @property
    def when(self) -> float:
        return self.finished_at or self.started_at or self.created_at


@frozen
class FleetRow:
    worker_group: str
    worker_id: str
    fqdn: str | None
    ip: str | None
    pool: str | None
    last: LastJob | None
    loan: LoanState | None = None
    liveness: Liveness | None = None
    health: str | None = None  # the health state recorded (None: not checked yet)


@frozen
class LoanState:
    """A machine's active loan, as the fleet and machine pages show it."""

    borrower: str
    expires_at: float

    def overdue(self, now: float) -> bool:
        return self.expires_at <= now


@frozen
class Liveness:
    """The newest finished C{ping} job of a machine: its state (succeeded = up) and when it ended."""

    job_id: str
    state: str
    at: float
    detail: str | None

    @property
    def up(self) -> bool:
        return self.state == "succeeded"


#: a machine's active loan, newest finished ping and recorded health state
Extras = tuple[LoanState | None, Liveness | None, str | None]
T = TypeVar("T")

#: the newest finished ping of the page's machine, through the jobs_machine_task index
_LAST_PING = (
    "(SELECT p.seq FROM jobs p WHERE p.worker_id = page.w AND p.worker_group = page.g AND p.task_name = 'ping'"
    " AND p.state IN ('succeeded', 'failed', 'timed_out') ORDER BY p.seq DESC LIMIT 1)"
)


def extras_of(c: Cursor, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Extras]:
    """
    The active loan and the newest finished ping of each machine
    C{(worker_group, worker_id)} of a page: one statement for the whole page
    (an index lookup per machine in C{loans} and C{jobs}).
    """
    out: dict[tuple[str, str], Extras] = {}
    for values, args in key_values(keys):
        sql = (f"WITH page(g, w) AS (VALUES {values})"
               " SELECT page.g, page.w, l.borrower, l.expires_at, p.id, p.state,"
               " COALESCE(p.finished_at, p.started_at, p.created_at), COALESCE(p.result, p.error), hh.state"
               " FROM page LEFT JOIN loans l ON l.worker_group = page.g AND l.worker_id = page.w"
               " AND l.returned_at IS NULL"
               " LEFT JOIN health hh ON hh.worker_group = page.g AND hh.worker_id = page.w"
               f" LEFT JOIN jobs p ON p.seq = {_LAST_PING}")
        for r in c.execute(sql, args):
            out[(r[0], r[1])] = (
                None if r[2] is None else LoanState(borrower=r[2], expires_at=r[3]),
                None if r[4] is None else Liveness(job_id=r[4], state=r[5], at=r[6], detail=r[7]),
                r[8],
            )
    return out


_ROW_COLS = ("j.id AS job_id, j.task_name, j.state, j.created_at, j.started_at, j.finished_at, j.error,"
             " j.result, j.requester")


def fetch_rows(c: Cursor, keys: list[tuple[str, str]]) -> dict[tuple[str, str], FleetRow]:
    """
    The rows of machines C{keys}: one statement for the machines and their
    newest jobs and one (L{extras_of}) for their loans, pings and health, in
    chunks (L{key_values}); machines that do not exist are left out.
    """
    found: list[Any] = []
    for values, args in key_values(keys):
        found += c.execute(
            f"WITH page(g, w) AS (VALUES {values})"
            f" SELECT f.worker_group, f.worker_id, f.fqdn, f.ip, f.pool, {_ROW_COLS} FROM page"
            " JOIN machines f ON f.worker_group = page.g AND f.worker_id = page.w"
            f" LEFT JOIN jobs j ON j.seq = {_LAST_SEQ.replace('m.', 'f.')}", args).fetchall()
    extras = extras_of(c, [(r[0], r[1]) for r in found]) if found else {}
    out: dict[tuple[str, str], FleetRow] = {}
    for r in found:
        loan, liveness, health = extras[(r[0], r[1])]
        out[(r[0], r[1])] = FleetRow(
            worker_group=r[0], worker_id=r[1], fqdn=r[2], ip=r[3], pool=r[4],
            last=None if r[5] is None else LastJob(
                id=r[5], task_name=r[6], state=r[7], created_at=r[8], started_at=r[9],
                finished_at=r[10], error=r[11], result=r[12], requester=r[13],
            ),
            loan=loan, liveness=liveness, health=health,
        )
    return out


_STRIP_SQL = (
    "SELECT m.pool, COALESCE(h.state, 'unknown'), count(*), count(l.id) FROM machines m"
    " LEFT JOIN health h ON h.worker_group = m.worker_group AND h.worker_id = m.worker_id"
    " LEFT JOIN loans l ON l.worker_group = m.worker_group AND l.worker_id = m.worker_id"
    " AND l.returned_at IS NULL WHERE m.pool IS NOT NULL GROUP BY 1, 2 ORDER BY 1"
)


def machine_where(f: FleetFilter, now: float | None = None, postgresql: bool = False) -> Where:
    """The conditions on machine C{m} of a filter (all but its last-job state)."""
    w = Where().equal("m.worker_group", f.group).equal("m.pool", f.pool)
    w.contains(("m.worker_id", "m.fqdn", "m.ip"), f.q)
    if f.health is not None:
        w.add(f"{_HEALTH_OF} = ?", f.health)
    if f.liveness == "up":
        w.add(f"{_PING_OF} = 'succeeded'")
    elif f.liveness == "down":
        w.add(f"{_PING_OF} IN ('failed', 'timed_out')")
    elif f.liveness == "never":
        w.add(f"{_PING_OF} IS NULL")
    if f.loan == "loaned":
        w.add(f"{_LOAN_OF} IS NOT NULL")
    elif f.loan == "free":
        w.add(f"{_LOAN_OF} IS NULL")
    elif f.loan == "overdue":
        w.add(f"{_LOAN_OF} <= ?", now if now is not None else 0.0)
    if f.tag is not None:  # the machine's JSON document lists it in "tags"
        if postgresql:
            w.add("jsonb_exists(CAST(m.data AS jsonb) -> 'tags', ?)", f.tag)
        else:
            w.add("EXISTS (SELECT 1 FROM json_each(m.data, '$.tags') t WHERE t.value = ?)", f.tag)
    return w


@frozen
class FleetPage:
    rows: list[FleetRow]
    total: int  # machines matching the filter (all states when no state filter)
    counts: dict[str, int]  # last-job state -> machines, for the filter without its state
    groups: list[str]
    pools: list[str]
    #: the pool strip (L{FleetQueries.pools}), read with the page
    strip: dict[str, dict[str, int]] | None = None


class FleetQueries:
    """
    Read-only queries the dashboard needs and the store does not offer:
    every machine with its newest job in one statement (an index lookup per
    machine, not a scan of the job history), counts by state, filter values.
    """

    def __init__(self, store: Store, cache_size: int = 64, *, clock: IReactorTime | None = None,
                 settle: float = 2.0):
        self.db = store.db
        self.cache_size = cache_size
        #: with a clock, the fleet's order and the pool strip (the costly parts: a few index lookups
        #: per machine) are worked out at most once every C{settle} seconds while commits keep coming
        self.clock = clock
        self.settle = settle
        # Only ever touched inside db.read, under this lock (PostgreSQL reads on several threads).
        self._lock = threading.Lock()
        self._orders = itertools.count()
        self._version: tuple[Any, ...] | None = None
        self._cache: dict[tuple, Any] = {}
        self._settled: dict[tuple, tuple[float, Any]] = {}
        self._fresh_until = float("-inf")  # until then nothing is reused
        #: each machine's row as read, forgotten when a commit touched the machine (L{MachineRows})
        self.rows = MachineRows(fetch_rows, inventory=store.machines.cached)

    def forget(self) -> None:
        """
        Reuse nothing for the next C{settle} seconds: after a change the
        viewer made and expects to see (its write may still be on its way).
        """
        if self.clock is not None:
            self._fresh_until = self.clock.seconds() + self.settle

    def _settling(self, c: Cursor, key: tuple, compute: Callable[[], T]) -> tuple[T, bool]:
        """
        As L{_cached}, but a value computed less than C{settle} seconds ago
        is used again even though the database changed since: what a busy
        fleet (commits every moment) would otherwise recompute on every view.
        Also says whether the value is of the current version (what is built
        from an older one must not be cached as current).
        """
        if key in self._cache or self.clock is None:
            return self._cached(c, key, compute), True  # (only values of the current version are in _cache)
        now = self.clock.seconds()
        hit = self._settled.get(key)
        if hit is not None and 0 <= now - hit[0] < self.settle and now >= self._fresh_until:
            reused: T = hit[1]
            return reused, False
        value = compute()
        if len(self._settled) >= self.cache_size:
            self._settled.pop(next(iter(self._settled)))
        self._settled[key] = (now, value)
        return self._cached(c, key, lambda: value), True

    def version(self, c: Cursor) -> tuple[Any, ...]:
        """
        Changes whenever anything was committed to the database
        (L{roller.store.db.data_version}: on SQLite C{PRAGMA data_version}
        for other connections' commits and C{total_changes()} for this
        connection's own; on PostgreSQL the WAL position).
        """
        return data_version(c, getattr(self.db, "dialect", SQLITE))

    def _cached(self, c: Cursor, key: tuple, compute: Callable[[], T]) -> T:
        if key in self._cache:
            return self._cache[key]  # what compute returned for this key
        value = compute()
        if len(self._cache) >= self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = value
        return value

    def page(self, f: FleetFilter, *, sort: str = PROBLEMS, direction: str | None = None,
             limit: int = 200, offset: int = 0, now: float | None = None) -> Deferred[FleetPage]:
        """
        One page of the fleet.  Each machine's row is kept until a commit
        touches that machine (L{MachineRows}: its jobs, loan, recorded
        health or inventory entry); the order, the state counts and the
        filter values are cached until the next commit (L{version}) and,
        with a clock, reused for C{settle} seconds while commits keep
        coming (unless L{forget} was called).  C{now} decides which loans
        are overdue (the C{loan="overdue"} filter).
        """
        if sort not in SORTS:
            raise ValueError(f"unknown sort {sort!r}")
        _, primary, default_dir = SORTS[sort]
        d = (direction or default_dir).upper()
        if d not in ("ASC", "DESC"):
            raise ValueError(f"unknown direction {direction!r}")
        w = machine_where(f, now, getattr(self.db, "dialect", SQLITE).postgresql)
        cond, args = w.clause, w.args
        extras = (f", {_HEALTH_OF} AS hs, {_PING_OF} AS ps, {_LOAN_OF} AS lu" if sort in _NEEDS_EXTRAS else "")
        base = (f"SELECT m.worker_group, m.worker_id, m.fqdn, m.ip, m.pool, {_LAST_SEQ} AS last_seq{extras}"
                f" FROM machines m{cond}")
        if sort in ("name", "group") and f.state is None:
            # Page through the primary key first; look up the newest job of
            # those machines only.
            second = d if sort == "name" else "ASC"
            rows_sql = (f"SELECT m.worker_group, m.worker_id FROM machines m{cond}"
                        f" ORDER BY m.worker_group {d}, m.worker_id {second} LIMIT ? OFFSET ?")
            rows_args = [*args, limit, offset]
        else:
            state_where, state_args = "", []
            if f.state == NEVER:
                state_where = " WHERE j.seq IS NULL"
            elif f.state is not None:
                state_where = " WHERE j.state = ?"
                state_args = [f.state]
            # Every machine matching, in order, is worked out once (an index lookup or four per
            # machine; see _settling), then each page looks up its own rows only, fresh: paging
            # through the fleet costs one ordering, not one per page.
            order = primary.format(d=d) + ", f.worker_group, f.worker_id"
            order_sql = (f"SELECT f.worker_group, f.worker_id FROM ({base}) f"
                         f" LEFT JOIN jobs j ON j.seq = f.last_seq{state_where} ORDER BY {order}")
            order_args = [*args, *state_args]
            rows_sql, rows_args = "", [order_sql, *order_args, limit, offset]
        base = (f"SELECT m.worker_group, m.worker_id, {_LAST_SEQ} AS last_seq FROM machines m{cond}")
        filter_key = ("filter", *f.key, *args)

        def summary(c: Cursor) -> tuple[dict[str, int], list[str], list[str]]:
            counts = {
                r[0]: r[1] for r in c.execute(
                    f"SELECT COALESCE(j.state, '{NEVER}'), count(*) FROM ({base}) f"
                    " LEFT JOIN jobs j ON j.seq = f.last_seq GROUP BY 1", args)
            }
            groups, pools = self._cached(c, ("values",), lambda: (
                [r[0] for r in c.execute("SELECT DISTINCT worker_group FROM machines ORDER BY 1")],
                [r[0] for r in c.execute("SELECT DISTINCT pool FROM machines WHERE pool IS NOT NULL ORDER BY 1")],
            ))
            return counts, groups, pools

        def ordered(c: Cursor) -> tuple[int, list[tuple[str, str]]]:
            """The machines in order, numbered (a new number for each ordering)."""
            return next(self._orders), [(r[0], r[1]) for r in c.execute(order_sql, order_args)]

        def run(c: Cursor) -> FleetPage:
            with self._lock:
                return locked(c)

        def locked(c: Cursor) -> FleetPage:
            version = self.version(c)
            if version != self._version:
                self._cache.clear()
                self._version = version
            self.rows.sync(c, version)
            (counts, groups, pools), _ = self._settling(c, filter_key, lambda: summary(c))
            if rows_sql:
                keys = self._cached(c, ("keys", rows_sql, *rows_args),
                                    lambda: [(r[0], r[1]) for r in c.execute(rows_sql, rows_args)])
            else:
                # a page of this order, its rows as the database is now (current even when the order is a
                # moment old): each machine's row is read again only after a commit touched it
                (_, order), _ = self._settling(c, ("order", order_sql, *order_args), lambda: ordered(c))
                keys = order[offset:offset + limit]
            rows = self.rows.get(c, keys)
            total = counts.get(f.state, 0) if f.state is not None else sum(counts.values())
            return FleetPage(rows=rows, total=total, counts=counts, groups=groups, pools=pools,
                             strip=self._strip(c))

        return self.db.read(run)

    def pools(self) -> Deferred[dict[str, dict[str, int]]]:
        """
        The pool strip: for each pool (machines without one are left out),
        how many machines are in each health state and how many are on loan
        (C{"loaned"}: an active loan, whatever the health watcher says).
        Cached like L{page}'s order and counts (L{FleetPage.strip} has it too).
        """

        def run(c: Cursor) -> dict[str, dict[str, int]]:
            with self._lock:
                version = self.version(c)
                if version != self._version:
                    self._cache.clear()
                    self._version = version
                return self._strip(c)

        return self.db.read(run)

    def _strip(self, c: Cursor) -> dict[str, dict[str, int]]:
        def compute() -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for pool, state, n, loaned in c.execute(_STRIP_SQL):
                counts = out.setdefault(pool, {"total": 0, "loaned_now": 0})
                counts[state] = counts.get(state, 0) + n
                counts["total"] += n
                counts["loaned_now"] += loaned
            return out

        return self._settling(c, ("pools",), compute)[0]

    def machine_extras(self, worker_group: str, worker_id: str) -> Deferred[Extras]:
        """C{(LoanState | None, Liveness | None)} of one machine (the machine page)."""
        return self.db.read(lambda c: extras_of(c, [(worker_group, worker_id)])[(worker_group, worker_id)])

    def explain(self, f: FleetFilter = FleetFilter()) -> Deferred[list[str]]:
        """The query plan of the fleet page's row query (for tests and curiosity)."""
        base = f"SELECT m.worker_group, m.worker_id, {_LAST_SEQ} AS last_seq FROM machines m"
        sql = (f"EXPLAIN QUERY PLAN SELECT f.*, j.state FROM ({base}) f LEFT JOIN jobs j ON j.seq = f.last_seq"
               " ORDER BY f.worker_group, f.worker_id LIMIT 200")
        return self.db.read(lambda c: [r["detail"] for r in c.execute(sql)])
