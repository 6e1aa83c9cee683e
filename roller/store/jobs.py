"""The jobs and job_events tables: job history."""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred

from roller.jobs import Job, JobEvent, State
from roller.store.audit import AuditEntry, add_audits
from roller.store.db import Cursor, Database, insert_rows
from roller.store.job_lookup import JobFilter, newest
from roller.store.where import Where

_COLUMNS = (
    "id, task_name, worker_group, worker_id, params, requester, origin_ip, reason,"
    " priority, state, created_at, started_at, finished_at, result, error, batch_id"
)


def _job(row: Any) -> Job:
    return Job(
        id=row["id"],
        task_name=row["task_name"],
        worker_id=row["worker_id"],
        worker_group=row["worker_group"],
        created_at=row["created_at"],
        params=json.loads(row["params"]),
        requester=row["requester"],
        origin_ip=row["origin_ip"],
        reason=row["reason"],
        priority=row["priority"],
        state=State(row["state"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        result=row["result"],
        error=row["error"],
        seq=row["seq"],
        batch_id=row["batch_id"],
    )


def _event(row: Any) -> JobEvent:
    return JobEvent(
        id=row["id"],
        job_id=row["job_id"],
        time=row["time"],
        kind=row["kind"],
        message=row["message"],
        data=json.loads(row["data"]) if row["data"] else {},
    )


def add_events(c: Cursor, events: list[JobEvent]) -> None:
    """Insert C{events} (multi-row C{INSERT}s)."""
    if events:
        insert_rows(c, "job_events (job_id, time, kind, message, data)", [
            (e.job_id, e.time, e.kind, e.message, json.dumps(e.data) if e.data else None) for e in events
        ])


def _insert_jobs(c: Cursor, items: list[tuple[Job, JobEvent | None, AuditEntry | None]]) -> list[Job]:
    """New jobs, their first events and audit entries; the jobs with their C{seq}."""
    seqs = dict(insert_rows(c, f"jobs ({_COLUMNS})", [
        (job.id, job.task_name, job.worker_group, job.worker_id, json.dumps(job.params),
         job.requester, job.origin_ip, job.reason, job.priority, job.state.value,
         job.created_at, job.started_at, job.finished_at, job.result, job.error, job.batch_id)
        for job, _, _ in items
    ], returning="id, seq"))
    add_events(c, [event for _, event, _ in items if event is not None])
    add_audits(c, [audit for _, _, audit in items if audit is not None])
    return [evolve(job, seq=seqs[job.id]) for job, _, _ in items]


#: Why a job found C{running} at start-up is C{interrupted}.
INTERRUPTED_ERROR = ("roller stopped before the end of the job was recorded: it was still running, or it had "
                     "ended while the database could not take the write (roller's log says how)")


class JobTable:
    def __init__(self, db: Database):
        self._db = db

    def insert(self, job: Job, event: JobEvent | None = None, audit: AuditEntry | None = None) -> Deferred[Job]:
        """
        Persist a new job (and its first event, and the audit entry of its
        request, in the same transaction); the job with its C{seq}.  A burst
        of submissions is written with one multi-row C{INSERT} per table.
        """
        return self._db.write_rows(_insert_jobs, (job, event, audit))

    def update(self, job: Job, event: JobEvent | None = None) -> Deferred[Job]:
        """Persist a job's state, times and outcome (and an event)."""

        def run(c: Cursor) -> Job:
            c.execute(
                "UPDATE jobs SET state = ?, started_at = ?, finished_at = ?, result = ?, error = ?"
                " WHERE id = ?",
                (job.state.value, job.started_at, job.finished_at, job.result, job.error, job.id),
            )
            if event is not None:
                self._add_event(c, event)
            return job

        return self._db.write(run)

    def add_events(self, events: Iterable[JobEvent]) -> Deferred[None]:
        events = list(events)

        def run(c: Cursor) -> None:
            add_events(c, events)

        return self._db.write(run)

    @staticmethod
    def _add_event(c: Cursor, e: JobEvent) -> None:
        add_events(c, [e])

    def get(self, job_id: str) -> Deferred[Job | None]:
        def q(c: Cursor) -> Job | None:
            row = c.execute(f"SELECT seq, {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else _job(row)

        return self._db.read(q)

    def list(
        self,
        *,
        worker_id: str | None = None,
        worker_group: str | None = None,
        task_name: str | None = None,
        states: Iterable[State] = (),
        before: int | None = None,
        limit: int = 50,
        batch_id: str | None = None,
    ) -> Deferred[builtins.list[Job]]:
        """
        Newest first; C{before} is a C{seq} cursor for the next page.  Each
        filter is read through an index (L{roller.store.job_lookup}).
        """
        f = JobFilter(worker_id=worker_id, worker_group=worker_group, task_name=task_name,
                      states=tuple(s.value for s in states), batch_id=batch_id)
        select = f"SELECT seq, {_COLUMNS} FROM jobs"
        return self._db.read(lambda c: [_job(r) for r in newest(c, select, f, before=before, limit=limit)])

    def jobs_of_batch(self, batch_id: str) -> Deferred[builtins.list[Job]]:
        """Every job of batch C{batch_id} (through the partial C{jobs_batch} index), oldest first."""
        sql = f"SELECT seq, {_COLUMNS} FROM jobs WHERE batch_id = ? ORDER BY seq"
        return self._db.read(lambda c: [_job(r) for r in c.execute(sql, (batch_id,)).fetchall()])

    def jobs_of_batches(self, batch_ids: Iterable[str]) -> Deferred[builtins.list[Job]]:
        """Every job of the batches C{batch_ids}, oldest first."""
        ids = builtins.list(batch_ids)
        if not ids:
            return self._db.read(lambda c: [])
        w = Where().one_of("batch_id", ids)
        sql = f"SELECT seq, {_COLUMNS} FROM jobs{w.clause} ORDER BY seq"
        return self._db.read(lambda c: [_job(r) for r in c.execute(sql, w.args).fetchall()])

    def last_states(self, keys: Iterable[tuple[str, str]]) -> Deferred[dict[tuple[str, str], str]]:
        """The state of each machine's newest job (C{(worker_group, worker_id)} -> state; none: left out)."""
        keys = builtins.list(keys)

        def run(c: Cursor) -> dict[tuple[str, str], str]:
            out = {}
            for group, worker in keys:  # one jobs_machine index lookup each
                r = c.execute("SELECT state FROM jobs WHERE worker_id = ? AND worker_group = ? ORDER BY seq DESC"
                              " LIMIT 1", (worker, group)).fetchone()
                if r is not None:
                    out[(group, worker)] = r[0]
            return out

        return self._db.read(run)

    def events(self, job_id: str, after: int | None = None, limit: int = 1000) -> Deferred[builtins.list[JobEvent]]:
        def q(c: Cursor) -> list[JobEvent]:
            rows = c.execute(
                "SELECT id, job_id, time, kind, message, data FROM job_events"
                " WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
                (job_id, after or 0, limit),
            ).fetchall()
            return [_event(r) for r in rows]

        return self._db.read(q)

    def recover(self, now: float) -> Deferred[tuple[builtins.list[Job], builtins.list[Job]]]:
        """
        At start-up: mark jobs left C{running} as C{interrupted} and return
        (interrupted, queued) — the queued ones in the order to run them.

        The message claims no more than is known: such a job was still
        running when roller stopped, or it had ended and roller could not
        record its end before it stopped (the database was unavailable; the
        log of that run names the outcome).
        """

        def run(c: Cursor) -> tuple[list[Job], list[Job]]:
            running = [_job(r) for r in c.execute(
                f"SELECT seq, {_COLUMNS} FROM jobs WHERE state = 'running' ORDER BY seq").fetchall()]
            interrupted = []
            for job in running:
                job = job.transition(
                    State.interrupted, now, error=INTERRUPTED_ERROR
                )
                c.execute(
                    "UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE id = ?",
                    (job.state.value, job.finished_at, job.error, job.id),
                )
                self._add_event(c, JobEvent(job.id, now, "state", "interrupted: roller restarted",
                                            {"state": "interrupted"}))
                interrupted.append(job)
            queued = [_job(r) for r in c.execute(
                f"SELECT seq, {_COLUMNS} FROM jobs WHERE state = 'queued'"
                " ORDER BY priority DESC, seq").fetchall()]
            return interrupted, queued

        return self._db.write(run)

    def counts(self) -> Deferred[dict[str, int]]:
        return self._db.read(
            lambda c: {r[0]: r[1] for r in c.execute("SELECT state, count(*) FROM jobs GROUP BY state")}
        )

