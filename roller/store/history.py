"""
The job history's queries (the dashboard's C{/jobs} page): every job,
newest first, filtered and paged by keyset.

A page is C{seq < before} (the last row's C{seq} of the previous page), so
going older never counts or skips rows, whatever arrives meanwhile.  The
time range is on C{created_at}; jobs are numbered in the order they were
requested, so a time bound becomes a C{seq} bound by a binary search over
the primary key (L{first_seq_at}: a few dozen index probes, whatever the
size of the history).

Filters an index answers (a machine, a batch, a task, states, a group
alone) are read through it (L{roller.store.job_lookup}: a walk per state or
group, merged).  Others (pool, requester, a group with a task or states but
no machine) walk C{seq} backwards in spans of L{SPAN} jobs and look at no more than C{max_scan} jobs per
page: when a rare filter has not filled the page by then, the page says how
far back it looked and its "older" cursor continues from there.  So no page
ever reads the whole history.
"""

from __future__ import annotations

from typing import NamedTuple

from attrs import frozen
from twisted.internet.defer import Deferred

from roller.jobs import Job
from roller.store import Store
from roller.store.db import Cursor
from roller.store.job_lookup import JobFilter, newest
from roller.store.where import Where

__all__ = ["JobQuery", "JobRow", "HistoryPage", "HistoryQueries", "first_seq_at", "SPAN"]

#: jobs looked at per statement when a filter has no index
SPAN = 20_000
#: the oldest and newest job's seq: two primary-key lookups (min and max together would scan the table)
_BOUNDS = "SELECT (SELECT min(seq) FROM jobs), (SELECT max(seq) FROM jobs)"


@frozen
class JobQuery:
    """What the C{/jobs} page asks for; C{None} (or empty) is no filter."""

    states: tuple[str, ...] = ()
    task: str | None = None
    pool: str | None = None
    group: str | None = None
    worker: str | None = None
    requester: str | None = None
    batch: str | None = None
    since: float | None = None  # created_at >= since
    until: float | None = None  # created_at < until
    before: int | None = None  # the keyset cursor: seq < before

    @property
    def indexed(self) -> bool:
        """Whether indexes answer the filters (L{roller.store.job_lookup}; no bounded walk needed)."""
        if self.batch is not None or self.worker is not None:  # jobs_batch; jobs_machine (worker_id, ...)
            return True
        if self.pool is not None or self.requester is not None:
            return False
        return self.group is None or (self.task is None and not self.states)  # a group alone: jobs_group

    @property
    def filter(self) -> JobFilter:
        """The filters L{roller.store.job_lookup} leads with an index."""
        return JobFilter(worker_id=self.worker, worker_group=self.group, task_name=self.task, states=self.states,
                         batch_id=self.batch)


class JobRow(NamedTuple):
    """What the history shows of a job (no parameters: a page of them is read and built cheaply)."""

    seq: int
    id: str
    task_name: str
    worker_group: str
    worker_id: str
    requester: str
    state: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: str | None
    error: str | None
    batch_id: str | None

    @property
    def final(self) -> bool:
        return self.state not in ("queued", "running")

    @classmethod
    def of(cls, job: Job) -> JobRow:
        return cls(job.seq or 0, job.id, job.task_name, job.worker_group, job.worker_id, job.requester,
                   job.state.value, job.created_at, job.started_at, job.finished_at, job.result, job.error,
                   job.batch_id)


_ROW_COLUMNS = ", ".join(JobRow._fields)


@frozen
class HistoryPage:
    """
    @ivar jobs: newest first, at most the limit asked for.
    @ivar older: the cursor of the next (older) page, or None at the end.
    @ivar searched_to: when the page stopped short (a filter without an
        index, L{HistoryQueries.page}'s C{max_scan}), the time the walk
        reached; None when the page is complete.
    """

    jobs: list[JobRow]
    older: int | None
    searched_to: float | None = None


def first_seq_at(c: Cursor, when: float, lo: int | None = None, hi: int | None = None) -> int:
    """
    The C{seq} of the first job requested at or after C{when} (one past the
    newest if there is none): a binary search over the primary key, which
    assumes C{created_at} grows with C{seq} (jobs are numbered as they are
    requested).
    """
    if lo is None or hi is None:
        row = c.execute(_BOUNDS).fetchone()
        if row is None or row[0] is None:
            return 1
        lo, hi = row[0], row[1] + 1
    probe = "SELECT seq, created_at FROM jobs WHERE seq >= ? ORDER BY seq LIMIT 1"
    while lo < hi:
        mid = (lo + hi) // 2
        r = c.execute(probe, (mid,)).fetchone()
        if r is None:
            hi = mid
        elif r[1] >= when:
            hi = mid
        else:
            lo = r[0] + 1
    return lo


def _rest(q: JobQuery) -> Where:
    """The filters no index answers: checked on the rows read."""
    w = Where()
    w.equal("CAST(requester AS TEXT)", q.requester)
    if q.pool is not None:
        w.add("EXISTS (SELECT 1 FROM machines m WHERE m.worker_group = jobs.worker_group"
              " AND m.worker_id = jobs.worker_id AND m.pool = ?)", q.pool)
    if q.since is not None:
        w.add("created_at >= ?", q.since)
    if q.until is not None:
        w.add("created_at < ?", q.until)
    return w


def _walk(q: JobQuery) -> tuple[str, list]:
    """
    The statement of one span of a bounded walk, and its arguments before
    the span's (seq < ?, seq >= ?, limit): every filter is checked on the
    rows of the span (expressions, so SQLite walks the primary key).
    """
    w = Where()
    w.one_of("CAST(state AS TEXT)", q.states)
    w.equal("CAST(task_name AS TEXT)", q.task)
    w.equal("CAST(worker_group AS TEXT)", q.group)
    w.equal("CAST(worker_id AS TEXT)", q.worker)
    w.equal("CAST(batch_id AS TEXT)", q.batch)
    rest = _rest(q)
    w.conditions += rest.conditions
    w.args += rest.args
    return (f"SELECT {_ROW_COLUMNS} FROM jobs{w.clause}{' AND' if w.conditions else ' WHERE'}"
            " seq < ? AND seq >= ? ORDER BY seq DESC LIMIT ?", w.args)


def history_page(c: Cursor, q: JobQuery, limit: int, max_scan: int) -> HistoryPage:
    """L{HistoryQueries.page} on a cursor."""
    bounds = c.execute(_BOUNDS).fetchone()
    if bounds is None or bounds[0] is None:
        return HistoryPage([], None)
    lo_all, hi_all = bounds[0], bounds[1] + 1
    hi = hi_all if q.before is None else min(q.before, hi_all)
    if q.until is not None:
        hi = min(hi, first_seq_at(c, q.until, lo_all, hi_all))
    lo = lo_all if q.since is None else first_seq_at(c, q.since, lo_all, hi_all)
    rows: list[JobRow] = []
    if q.indexed:
        rows = [JobRow._make(r) for r in newest(c, f"SELECT {_ROW_COLUMNS} FROM jobs", q.filter, before=hi, since=lo,
                                                limit=limit + 1, extra=_rest(q))]
        cursor = lo
    else:
        sql, args = _walk(q)
        cursor, scanned = hi, 0
        while len(rows) <= limit and cursor > lo and scanned < max_scan:
            start = max(lo, cursor - min(SPAN, max_scan - scanned))
            rows += [JobRow._make(r) for r in c.execute(sql, [*args, cursor, start, limit + 1 - len(rows)])]
            scanned += cursor - start
            cursor = start
    if len(rows) > limit:
        return HistoryPage(rows[:limit], rows[limit - 1].seq)
    if cursor > lo:  # stopped short: say how far back it looked, and continue from there
        r = c.execute("SELECT created_at FROM jobs WHERE seq >= ? ORDER BY seq LIMIT 1", (cursor,)).fetchone()
        return HistoryPage(rows, cursor, None if r is None else r[0])
    return HistoryPage(rows, None)


class HistoryQueries:
    """The C{/jobs} page's reads, on the store's reader connections."""

    def __init__(self, store: Store):
        self._db = store.db

    def page(self, q: JobQuery, *, limit: int = 100, max_scan: int = 200_000) -> Deferred[HistoryPage]:
        """
        The jobs matching C{q}, newest first: at most C{limit}, looking at
        no more than C{max_scan} jobs when a filter has no index.
        """
        return self._db.read(history_page, q, limit, max_scan)

