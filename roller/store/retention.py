"""
History retention: what a long-running roller deletes, and how.

    policy = RetentionPolicy.from_settings(settings)
    report = await Pruner(store.db, clock=reactor).prune(policy, now)

What goes (C{history.*} settings; 0 days means forever):

  - finished jobs (and all their events) that ended more than
    C{keep_days} ago, and batches that finished before then (with their
    members);
  - the output lines (events of kind C{log}) of succeeded jobs that ended
    more than C{keep_events_days} ago: their state changes and result stay;
  - audit entries older than C{keep_audit_days} (by default kept forever);
  - loans returned more than C{keep_loans_days} ago (an active loan stays);
  - health transitions and remediations older than C{keep_days}.

What never goes, however old: a queued or running job; a job of a batch
that is kept (running, or finished after the cutoff); a machine's newest
job of each task, and its newest finished (succeeded, failed, timed out)
job of each task, so the fleet page's "last job" and "last ping" never go
blank.  Every delete re-checks these conditions inside its own transaction.

How: candidates are found on the readers' connection (no lock held), then
deleted on the writer in small transactions (at most C{max_rows} rows,
fewer when one takes longer than C{target_hold}), yielding to the reactor
between them so submissions interleave; the longest write-lock hold is
measured (L{roller.store.db.Database.write_timed}) and reported.  Then the
freed pages are given back to the file system in small steps
(L{roller.store.sqlite.incremental_vacuum}).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from roller.store import sqlite
from roller.store.db import Cursor, Database, StorageUnavailable

log = Logger()

DAY = 86400.0
#: the fewest pages one incremental-vacuum step gives back (the step adapts to the write-lock target)
MIN_VACUUM_PAGES = 16

TERMINAL = ("succeeded", "failed", "cancelled", "timed_out", "interrupted")
#: the states the fleet page's "last ping" reads (roller.store.fleet)
FINISHED = ("succeeded", "failed", "timed_out")


def _states(states: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{s}'" for s in states) + ")"


_SAME_TASK_NEWER = ("SELECT 1 FROM jobs n WHERE n.worker_id = j.worker_id AND n.worker_group = j.worker_group"
                    " AND n.task_name = j.task_name AND n.seq > j.seq")

#: a job that may go once it ended before the cutoff (the one ? parameter, twice)
_JOB_MAY_GO = (
    f"j.state IN {_states(TERMINAL)} AND COALESCE(j.finished_at, j.created_at) < ?"
    # not the newest of its machine and task, nor the newest finished one
    f" AND ((j.state NOT IN {_states(FINISHED)} AND EXISTS ({_SAME_TASK_NEWER}))"
    f" OR (j.state IN {_states(FINISHED)} AND EXISTS ({_SAME_TASK_NEWER} AND n.state IN {_states(FINISHED)})))"
    # not a job of a batch that is kept
    " AND (j.batch_id IS NULL OR NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = j.batch_id"
    " AND (b.finished_at IS NULL OR b.finished_at >= ?)))"
)

#: the tables pruned by time alone: (report field, table, the condition on its one ? parameter, order)
_SIMPLE = {
    "audit": ("audit", "time < ?", "time"),
    "loans": ("loans", "returned_at IS NOT NULL AND returned_at < ?", "returned_at"),
    "health_transitions": ("health_transitions", "time < ?", "id"),
    "remediations": ("remediations", "time < ?", "time"),
}


@frozen
class RetentionPolicy:
    """How many days each kind of history is kept; 0: forever."""

    keep_days: int = 90
    keep_events_days: int = 14
    keep_audit_days: int = 0
    keep_loans_days: int = 365

    @classmethod
    def from_settings(cls, s: Any) -> RetentionPolicy:
        return cls(keep_days=s.history_keep_days, keep_events_days=s.history_keep_events_days,
                   keep_audit_days=s.history_keep_audit_days, keep_loans_days=s.history_keep_loans_days)

    def cutoffs(self, now: float) -> Cutoffs:
        def cut(days: int) -> float | None:
            return None if days <= 0 else now - days * DAY

        jobs = cut(self.keep_days)
        events = cut(self.keep_events_days)
        if events is not None and jobs is not None and events < jobs:
            events = None  # the jobs go first anyway
        return Cutoffs(jobs=jobs, events=events, audit=cut(self.keep_audit_days), loans=cut(self.keep_loans_days))


@frozen
class Cutoffs:
    """Epoch seconds before which each kind of history goes; None: kept."""

    jobs: float | None
    events: float | None
    audit: float | None
    loans: float | None

    def of(self, kind: str) -> float | None:
        return {"audit": self.audit, "loans": self.loans}.get(kind, self.jobs)


COUNTED = ("jobs", "job_events", "log_lines", "batches", "batch_members", "audit", "loans", "health_transitions",
           "remediations")


@define
class PruneReport:
    """What a pruning removed (or, dry run, would remove), and what it cost."""

    dry_run: bool = False
    counts: dict[str, int] = field(factory=lambda: dict.fromkeys(COUNTED, 0))
    transactions: int = 0
    max_hold: float = 0.0  # seconds: the longest a transaction held the write lock
    max_hold_in: str = ""  # which step that was: "delete" or "vacuum"
    holds_over_50ms: int = 0  # transactions that held it 50 ms or more
    seconds: float = 0.0
    pages_freed: int = 0
    bytes_freed: int = 0
    stopped: bool = False  # cut short by stop()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def note_hold(self, held: float, step: str = "delete") -> None:
        self.transactions += 1
        if held > self.max_hold:
            self.max_hold, self.max_hold_in = held, step
        if held >= 0.050:
            self.holds_over_50ms += 1

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "counts": dict(self.counts), "transactions": self.transactions,
                "max_hold_ms": round(self.max_hold * 1000, 2), "max_hold_in": self.max_hold_in,
                "holds_over_50ms": self.holds_over_50ms, "seconds": round(self.seconds, 3),
                "pages_freed": self.pages_freed, "bytes_freed": self.bytes_freed, "stopped": self.stopped}

    def summary(self) -> str:
        parts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in self.counts.items() if n) or "nothing"
        if self.dry_run:
            return f"would remove {parts}"
        out = (f"removed {parts} in {self.transactions} transaction(s), {self.seconds:.1f} s; longest write-lock "
               f"hold {self.max_hold * 1000:.1f} ms")
        if self.pages_freed:
            out += f"; file shrank by {self.bytes_freed / 1e6:.1f} MB"
        return out + (" (stopped early)" if self.stopped else "")


def _in(n: int) -> str:
    return "(" + ", ".join("?" * n) + ")"


# -- the statements, run on a cursor (reader or writer)


def _job_candidates(c: Cursor, after: int, cutoff: float, limit: int) -> list[tuple[int, int]]:
    """(seq, event count) of up to C{limit} jobs that may go, after C{seq} C{after}, oldest first."""
    rows = c.execute(f"SELECT j.seq, (SELECT count(*) FROM job_events e WHERE e.job_id = j.id) FROM jobs j"
                     f" WHERE j.seq > ? AND {_JOB_MAY_GO} ORDER BY j.seq LIMIT ?",
                     (after, cutoff, cutoff, limit)).fetchall()
    return [(r[0], r[1]) for r in rows]


def _delete_jobs(c: Cursor, seqs: list[int], cutoff: float) -> tuple[int, int]:
    """Delete the jobs C{seqs} that still may go, and their events; (jobs, events) deleted."""
    ids = [r[0] for r in c.execute(f"SELECT j.id FROM jobs j WHERE j.seq IN {_in(len(seqs))} AND {_JOB_MAY_GO}",
                                   (*seqs, cutoff, cutoff)).fetchall()]
    if not ids:
        return 0, 0
    events = c.execute(f"DELETE FROM job_events WHERE job_id IN {_in(len(ids))}", ids).rowcount
    jobs = c.execute(f"DELETE FROM jobs WHERE id IN {_in(len(ids))}", ids).rowcount
    return jobs, events


def _delete_events_of(c: Cursor, seq: int, cutoff: float, limit: int) -> int:
    """Up to C{limit} events of job C{seq} if it may go (a job with more events than a transaction takes)."""
    row = c.execute(f"SELECT j.id FROM jobs j WHERE j.seq = ? AND {_JOB_MAY_GO}", (seq, cutoff, cutoff)).fetchone()
    if row is None:
        return 0
    return c.execute("DELETE FROM job_events WHERE id IN (SELECT id FROM job_events WHERE job_id = ? ORDER BY id"
                     " LIMIT ?)", (row[0], limit)).rowcount


_LOG_JOB = ("j.state = 'succeeded' AND j.finished_at < ? AND EXISTS (SELECT 1 FROM job_events e WHERE e.job_id = j.id"
            " AND e.kind = 'log')")


def _log_candidates(c: Cursor, after: int, cutoff: float, limit: int) -> tuple[int, list[int]]:
    """
    The ids of the log lines of succeeded jobs that ended before C{cutoff},
    jobs after C{seq} C{after}, up to about C{limit} lines; and the last
    job's C{seq} looked at (0: none left).
    """
    ids: list[int] = []
    last = 0
    for seq, job_id in c.execute(f"SELECT j.seq, j.id FROM jobs j WHERE j.state = 'succeeded' AND j.seq > ?"
                                 f" AND {_LOG_JOB} ORDER BY j.seq LIMIT ?", (after, cutoff, limit)).fetchall():
        ids += [r[0] for r in c.execute("SELECT id FROM job_events WHERE job_id = ? AND kind = 'log'", (job_id,))]
        last = seq
        if len(ids) >= limit:
            break
    return last, ids


def _delete_log_lines(c: Cursor, ids: list[int]) -> int:
    # log lines never change, nor does a succeeded job: no condition to check again
    return c.execute(f"DELETE FROM job_events WHERE kind = 'log' AND id IN {_in(len(ids))}", ids).rowcount


def _finished_batches(c: Cursor, cutoff: float) -> list[str]:
    return [r[0] for r in c.execute("SELECT id FROM batches WHERE finished_at IS NOT NULL AND finished_at < ?"
                                    " ORDER BY seq", (cutoff,)).fetchall()]


def _delete_batch_part(c: Cursor, batch_id: str, cutoff: float, limit: int) -> tuple[int, int]:
    """Up to C{limit} members of a batch that may go; the batch itself once it has none: (batches, members)."""
    members = c.execute("DELETE FROM batch_members WHERE batch_id = ? AND position IN (SELECT position FROM"
                        " batch_members WHERE batch_id = ? ORDER BY position LIMIT ?) AND EXISTS (SELECT 1 FROM"
                        " batches b WHERE b.id = ? AND b.finished_at IS NOT NULL AND b.finished_at < ?)",
                        (batch_id, batch_id, limit, batch_id, cutoff)).rowcount
    if members >= limit:
        return 0, members
    batches = c.execute("DELETE FROM batches WHERE id = ? AND finished_at IS NOT NULL AND finished_at < ?"
                        " AND NOT EXISTS (SELECT 1 FROM batch_members WHERE batch_id = ?)",
                        (batch_id, cutoff, batch_id)).rowcount
    return batches, members


def _delete_simple(c: Cursor, kind: str, cutoff: float, limit: int) -> int:
    table, cond, order = _SIMPLE[kind]
    return c.execute(f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {cond} ORDER BY {order}"
                     " LIMIT ?)", (cutoff, limit)).rowcount


def count(c: Cursor, cutoffs: Cutoffs) -> dict[str, int]:
    """What a pruning with C{cutoffs} would remove now (C{roller db prune --dry-run})."""
    out = dict.fromkeys(COUNTED, 0)
    if cutoffs.jobs is not None:
        jobs = f"SELECT j.id FROM jobs j WHERE {_JOB_MAY_GO}"
        args = (cutoffs.jobs, cutoffs.jobs)
        out["jobs"] = c.execute(f"SELECT count(*) FROM ({jobs}) AS going", args).fetchone()[0]
        out["job_events"] = c.execute(f"SELECT count(*) FROM job_events WHERE job_id IN ({jobs})", args).fetchone()[0]
        out["batches"], out["batch_members"] = c.execute(
            "SELECT count(*), COALESCE(sum((SELECT count(*) FROM batch_members m WHERE m.batch_id = b.id)), 0)"
            " FROM batches b WHERE finished_at IS NOT NULL AND finished_at < ?", (cutoffs.jobs,)).fetchone()
        if cutoffs.events is not None:
            out["log_lines"] = c.execute(
                f"SELECT count(*) FROM job_events WHERE kind = 'log' AND job_id IN (SELECT j.id FROM jobs j WHERE"
                f" {_LOG_JOB} AND j.id NOT IN ({jobs}))", (cutoffs.events, *args)).fetchone()[0]
    elif cutoffs.events is not None:
        out["log_lines"] = c.execute(f"SELECT count(*) FROM job_events WHERE kind = 'log' AND job_id IN"
                                     f" (SELECT j.id FROM jobs j WHERE {_LOG_JOB})", (cutoffs.events,)).fetchone()[0]
    for kind, (table, cond, _) in _SIMPLE.items():
        cutoff = cutoffs.of(kind)
        if cutoff is not None:
            out[kind] = c.execute(f"SELECT count(*) FROM {table} WHERE {cond}", (cutoff,)).fetchone()[0]
    return out


class Pruner:
    """
    Prunes the history of one database in small transactions.

    @param clock: yield to it between transactions (C{pause} seconds; 0:
        one reactor turn), so writes asked for meanwhile go first; None:
        never (a synchronous test store).
    @param max_rows: rows deleted per transaction at most.
    @param target_hold: a transaction that held the write lock longer than
        this makes the next ones smaller (down to C{min_rows}).
    @param vacuum_pages: pages one incremental-vacuum step gives back at
        most; steps start at a quarter and adapt to C{target_hold} like the
        deletes (moving a page costs up to ten times more in some steps:
        the cap keeps those well under the 50 ms a submission may wait, on
        a busy machine too: 256 pages once held the lock 53 ms there).
    """

    def __init__(self, db: Database, *, clock: IReactorTime | None = None, pause: float = 0.0,
                 max_rows: int = 500, min_rows: int = 20, target_hold: float = 0.015,
                 vacuum_pages: int = 128):
        self._db = db
        self._clock = clock
        self.pause = pause
        self.max_rows = max_rows
        self.min_rows = min_rows
        self.target_hold = target_hold
        self.vacuum_pages = vacuum_pages
        self._rows = max_rows
        self._pages = max(MIN_VACUUM_PAGES, vacuum_pages // 4)
        self._stopping = False

    def stop(self) -> None:
        """Make a pruning in progress end after its current transaction."""
        self._stopping = True

    def count(self, policy: RetentionPolicy, now: float) -> Deferred[dict[str, int]]:
        return self._db.read(count, policy.cutoffs(now))

    async def prune(self, policy: RetentionPolicy, now: float, *, vacuum: bool = True) -> PruneReport:
        """Remove what C{policy} lets go as of C{now}; what went and the longest write-lock hold."""
        self._stopping = False
        report = PruneReport()
        started = time.perf_counter()
        cutoffs = policy.cutoffs(now)
        try:
            if cutoffs.jobs is not None:
                await self._jobs(cutoffs.jobs, report)
                await self._batches(cutoffs.jobs, report)
            if cutoffs.events is not None:
                await self._log_lines(cutoffs.events, report)
            for kind in _SIMPLE:
                cutoff = cutoffs.of(kind)
                if cutoff is not None:
                    await self._simple(kind, cutoff, report)
            if vacuum and report.total and not self._stopping:
                await self._vacuum(report)
        except _Stopped:
            report.stopped = True
        report.seconds = time.perf_counter() - started
        return report

    # -- one kind at a time

    async def _write(self, report: PruneReport, fn: Callable[..., Any], *args: Any) -> Any:
        """One transaction; its hold noted, the next size adapted, then a pause for other writes."""
        if self._stopping:
            raise _Stopped()
        result, held = await self._db.write_timed(fn, *args)
        report.note_hold(held)
        if held > self.target_hold:
            self._rows = max(self.min_rows, int(self._rows * self.target_hold / held * 0.8))
        elif held < self.target_hold / 3:
            self._rows = min(self.max_rows, self._rows * 2)
        await self._yield()
        return result

    async def _yield(self) -> None:
        if self._clock is not None:
            await deferLater(self._clock, self.pause, lambda: None)

    async def _jobs(self, cutoff: float, report: PruneReport) -> None:
        after = 0
        while True:
            candidates = await self._db.read(_job_candidates, after, cutoff, self.max_rows)
            if not candidates:
                return
            after = candidates[-1][0]
            pack: list[int] = []
            rows = 0
            for seq, events in candidates:
                while events + 1 > self._rows:  # more events than a transaction takes: those first, in parts
                    deleted = await self._write(report, _delete_events_of, seq, cutoff, self._rows)
                    report.counts["job_events"] += deleted
                    events -= self._rows
                    if not deleted:
                        break
                if pack and rows + events + 1 > self._rows:
                    await self._delete_jobs(pack, cutoff, report)
                    pack, rows = [], 0
                pack.append(seq)
                rows += events + 1
            if pack:
                await self._delete_jobs(pack, cutoff, report)
            if len(candidates) < self.max_rows:
                return

    async def _delete_jobs(self, seqs: list[int], cutoff: float, report: PruneReport) -> None:
        jobs, events = await self._write(report, _delete_jobs, seqs, cutoff)
        report.counts["jobs"] += jobs
        report.counts["job_events"] += events

    async def _batches(self, cutoff: float, report: PruneReport) -> None:
        for batch_id in await self._db.read(_finished_batches, cutoff):
            while True:
                batches, members = await self._write(report, _delete_batch_part, batch_id, cutoff, self._rows)
                report.counts["batches"] += batches
                report.counts["batch_members"] += members
                if batches or not members:
                    break

    async def _log_lines(self, cutoff: float, report: PruneReport) -> None:
        after = 0
        while True:
            after, ids = await self._db.read(_log_candidates, after, cutoff, self.max_rows)
            if not ids:
                return
            for i in range(0, len(ids), self._rows):
                report.counts["log_lines"] += await self._write(report, _delete_log_lines, ids[i:i + self._rows])

    async def _simple(self, kind: str, cutoff: float, report: PruneReport) -> None:
        while True:
            limit = self._rows
            deleted = await self._write(report, _delete_simple, kind, cutoff, limit)
            report.counts[kind] += deleted
            if deleted < limit:
                return

    async def _vacuum(self, report: PruneReport) -> None:
        """
        Give the freed pages back to the file system, a few at a time
        (SQLite with incremental auto-vacuum only: PostgreSQL's autovacuum
        makes the space reusable by itself).
        """
        if self._db.dialect.postgresql:
            return
        while not self._stopping:
            pages = self._pages
            step = await self._db.on_writer(sqlite.incremental_vacuum, pages)
            if step is None:  # not an incremental-vacuum database
                return
            freed, held, page_size = step
            report.note_hold(held, "vacuum")
            report.pages_freed += freed
            report.bytes_freed += freed * page_size
            if held > self.target_hold:  # moving pages costs more towards the end of a big file: fewer
                self._pages = max(MIN_VACUUM_PAGES, int(pages * self.target_hold / held * 0.8))
            elif held < self.target_hold / 3:
                self._pages = min(self.vacuum_pages, pages * 2)
            if freed < pages:
                break
            await self._yield()
        await self._db.checkpoint()  # the file shrinks when the WAL is folded back


class _Stopped(Exception):
    pass


async def ensure_incremental_vacuum(db: Database, max_bytes: int = sqlite.START_VACUUM_MAX_BYTES) -> None:
    """
    At start-up: a database made before roller used incremental
    auto-vacuum is converted by one C{VACUUM} if it is at most
    C{max_bytes} (a few seconds at most); a larger one is left as it is,
    with a warning (pruning then frees pages for reuse, but the file only
    shrinks after C{roller db vacuum}).
    """
    if db.dialect.postgresql:
        return  # SQLite's file format only
    mode, size = await db.on_writer(sqlite.start_vacuum_needed)
    if mode == "incremental":
        return
    if size > max_bytes:
        log.warn("The database {path} ({mb:.0f} MB) does not give pruned pages back to the file system "
                 "(auto_vacuum {mode}): stop roller once and run `roller db vacuum`", path=db.path, mb=size / 1e6,
                 mode=mode)
        return
    before, after = await db.on_writer(sqlite.vacuum)
    log.info("Database {path} switched to incremental auto-vacuum ({before:.1f} MB -> {after:.1f} MB)",
             path=db.path, before=before / 1e6, after=after / 1e6)


class PruneLoop:
    """
    Prunes the history every C{interval} seconds while roller runs (the
    first time one interval after start), logging what went in one line.
    """

    def __init__(self, pruner: Pruner, policy: RetentionPolicy, clock: IReactorTime, interval: float):
        self.pruner = pruner
        self.policy = policy
        self.clock = clock
        self.interval = interval
        self._loop: LoopingCall | None = None
        self._running: Deferred | None = None
        self.last: PruneReport | None = None

    def start(self) -> None:
        if self.interval <= 0:
            return
        self._loop = LoopingCall(self.run_once)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def run_once(self) -> Deferred[None] | None:
        if self._running is not None:
            return None  # the previous one still runs
        self._running = Deferred.fromCoroutine(self._run())

        def done(_: object) -> None:
            self._running = None

        self._running.addBoth(done)
        return None

    async def _run(self) -> None:
        try:
            report = await self.pruner.prune(self.policy, self.clock.seconds())
        except StorageUnavailable as e:
            log.warn("History not pruned: {why}; trying again in {interval:.0f} s", why=e.what,
                     interval=self.interval)
            return
        except Exception:  # noqa: BLE001 -- logged; the next interval tries again
            log.failure("History pruning failed")
            return
        self.last = report
        if report.total:
            log.info("History pruned: {summary}", summary=report.summary())

    async def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        running = self._running
        if running is not None:
            self.pruner.stop()
            await running
