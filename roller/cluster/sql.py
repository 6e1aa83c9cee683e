"""
The shared queue's statements on PostgreSQL (migration 10: C{rollers},
C{jobs.roller_id}, C{jobs.endpoints}, C{endpoint_last}, and the unique
index that allows one running job per machine).

Like Buildbot's masters, rollers poll the shared queue for jobs and then try
to claim them; a claim is one short transaction that may find the job gone
(another roller claimed or cancelled it) or blocked (its machine runs a job
on another roller, an endpoint it needs is at its cap or inside its minimum
interval).  The database decides, so the limits hold across rollers:

- the job row is locked with C{FOR UPDATE SKIP LOCKED} (a roller never
  waits for another's claim) and must still be C{queued};
- C{jobs_one_running_per_machine} refuses a second running job per machine
  even if two claims race;
- the C{endpoint_last} rows of the job's endpoints are locked (in name
  order) while their running jobs are counted and their last command time
  checked: two claims on one PDU take turns.

Times that several rollers compare (heartbeats, endpoint intervals) are the
database server's clock, never a roller's.
"""

from __future__ import annotations

import json
from typing import Any

from roller.jobs import Job, JobEvent, State
from roller.store.db import Cursor
from roller.store.jobs import _COLUMNS, _job, add_events

CLAIMED = "claimed"
GONE = "gone"  # no longer queued: another roller runs it, or it was cancelled
BLOCKED = "blocked"  # not now: its machine or an endpoint is busy elsewhere, or another roller is claiming it

_NOW = "extract(epoch from clock_timestamp())"


def server_now(c: Cursor) -> float:
    return float(c.execute(f"SELECT {_NOW}").fetchone()[0])


def endpoints_text(endpoints: tuple[str, ...]) -> str | None:
    """C{jobs.endpoints}: each endpoint between spaces, so C{LIKE '% pdu:host %'} finds it."""
    return " " + " ".join(endpoints) + " " if endpoints else None


def claim(c: Cursor, job_id: str, worker_group: str, worker_id: str, endpoints: tuple[str, ...], started: float,
          roller_id: str, endpoint_max_running: int, endpoint_min_interval: float) -> str:
    """Try to make queued job C{job_id} this roller's running job; L{CLAIMED}, L{GONE} or L{BLOCKED}."""
    row = c.execute("SELECT state, priority, seq FROM jobs WHERE id = ? FOR UPDATE SKIP LOCKED",
                    (job_id,)).fetchone()
    if row is None:
        gone = c.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None
        return GONE if gone else BLOCKED  # locked: another roller is claiming it this moment
    state, priority, seq = row
    if state != State.queued.value:
        return GONE
    if c.execute("SELECT 1 FROM jobs WHERE worker_group = ? AND worker_id = ? AND state = 'running'",
                 (worker_group, worker_id)).fetchone() is not None:
        return BLOCKED
    # priority, then arrival, per machine across rollers: a job queued before it (wherever) goes first
    if c.execute("SELECT 1 FROM jobs WHERE worker_group = ? AND worker_id = ? AND state = 'queued' AND id <> ?"
                 " AND (priority > ? OR (priority = ? AND seq < ?)) LIMIT 1",
                 (worker_group, worker_id, job_id, priority, priority, seq)).fetchone() is not None:
        return BLOCKED
    names = sorted(set(endpoints))
    if names:
        for name in names:
            c.execute("INSERT INTO endpoint_last (endpoint, at) VALUES (?, 0) ON CONFLICT (endpoint) DO NOTHING",
                      (name,))
        marks = ", ".join("?" * len(names))
        rows = c.execute(f"SELECT endpoint, at, {_NOW} FROM endpoint_last WHERE endpoint IN ({marks})"
                         " ORDER BY endpoint FOR UPDATE", names).fetchall()
        for _, at, now in rows:
            if at + endpoint_min_interval > now:
                return BLOCKED
        for name in names:
            running = c.execute("SELECT count(*) FROM jobs WHERE state = 'running' AND endpoints LIKE ?",
                                (f"% {name} %",)).fetchone()[0]
            if running >= endpoint_max_running:
                return BLOCKED
        c.execute(f"UPDATE endpoint_last SET at = {_NOW} WHERE endpoint IN ({marks})", names)
    c.execute("UPDATE jobs SET state = 'running', started_at = ?, roller_id = ?, endpoints = ? WHERE id = ?",
              (started, roller_id, endpoints_text(tuple(names)), job_id))
    return CLAIMED


def unclaim(c: Cursor, job_id: str, roller_id: str) -> bool:
    """Give back a job this roller claimed and will not run (it is stopping): queued again, for any roller."""
    return bool(c.execute("UPDATE jobs SET state = 'queued', started_at = NULL, roller_id = NULL, endpoints = NULL"
                          " WHERE id = ? AND roller_id = ? AND state = 'running'", (job_id, roller_id)).rowcount)


def cancel_queued(c: Cursor, job: Job, event: JobEvent) -> bool:
    """Record a queued job's cancellation unless another roller has claimed it meanwhile."""
    done = c.execute("UPDATE jobs SET state = ?, started_at = ?, finished_at = ?, result = ?, error = ?"
                     " WHERE id = ? AND state = 'queued'",
                     (job.state.value, job.started_at, job.finished_at, job.result, job.error, job.id)).rowcount
    if done:
        add_events(c, [event])
    return bool(done)


def request_cancel(c: Cursor, job_id: str, by: str) -> str | None:
    """Ask the roller running job C{job_id} to cancel it; that roller's id (None: not running any more)."""
    row = c.execute("UPDATE jobs SET cancel_requested = ? WHERE id = ? AND state = 'running' RETURNING roller_id",
                    (by, job_id)).fetchone()
    return None if row is None else str(row[0])


def cancels_for(c: Cursor, roller_id: str) -> list[tuple[str, str]]:
    """(job id, who asked) of this roller's running jobs another roller was asked to cancel."""
    return [(r[0], r[1]) for r in c.execute("SELECT id, cancel_requested FROM jobs WHERE state = 'running'"
                                             " AND roller_id = ? AND cancel_requested IS NOT NULL",
                                             (roller_id,)).fetchall()]


# -- membership


def register(c: Cursor, roller_id: str, host: str, pid: int, reach: tuple[str, ...], sweeps: bool = True) -> float:
    now = server_now(c)
    c.execute("INSERT INTO rollers (id, host, pid, started, heartbeat, reach, sweeps) VALUES (?, ?, ?, ?, ?, ?, ?)",
              (roller_id, host, pid, now, now, json.dumps(list(reach)), int(sweeps)))
    return now


def heartbeat(c: Cursor, roller_id: str) -> bool:
    """Renew this roller's heartbeat (and so its running jobs'); False if its row is gone (taken over)."""
    return bool(c.execute(f"UPDATE rollers SET heartbeat = {_NOW} WHERE id = ?", (roller_id,)).rowcount)


def leave(c: Cursor, roller_id: str) -> None:
    c.execute("DELETE FROM rollers WHERE id = ?", (roller_id,))


def rollers(c: Cursor) -> list[dict[str, Any]]:
    """Every registered roller, with the seconds since its heartbeat (the server's clock)."""
    return [{"id": r["id"], "host": r["host"], "pid": r["pid"], "started": r["started"],
             "silent": float(r["silent"]), "reach": json.loads(r["reach"]), "sweeps": bool(r["sweeps"])}
            for r in c.execute(f"SELECT id, host, pid, started, reach, sweeps, {_NOW} - heartbeat AS silent"
                               " FROM rollers ORDER BY started").fetchall()]


def take_over(c: Cursor, roller_id: str, why: str, now: float, silent_for: float = 0.0) -> list[Job] | None:
    """
    A dead roller's running jobs become C{interrupted} and it leaves the
    table; None if another roller is taking it over this moment (or did),
    or if it has heartbeated within C{silent_for} seconds after all.
    """
    if c.execute(f"SELECT 1 FROM rollers WHERE id = ? AND heartbeat <= {_NOW} - ? FOR UPDATE SKIP LOCKED",
                 (roller_id, silent_for)).fetchone() is None:
        return None
    jobs = [_job(r) for r in c.execute(f"SELECT seq, {_COLUMNS} FROM jobs WHERE state = 'running' AND roller_id = ?"
                                       " ORDER BY seq", (roller_id,)).fetchall()]
    out = []
    for job in jobs:
        job = job.transition(State.interrupted, now, error=why)
        c.execute("UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE id = ?",
                  (job.state.value, job.finished_at, job.error, job.id))
        out.append(job)
    add_events(c, [JobEvent(j.id, now, "state", f"interrupted: {why}", {"state": "interrupted"}) for j in out])
    leave(c, roller_id)
    return out


# -- what other rollers do


def queued(c: Cursor, reach: tuple[str, ...], limit: int) -> list[tuple[str, str, str]]:
    """
    The queued jobs (of the groups in C{reach}, if any), in the order to run
    them: only each one's C{(id, worker_group, worker_id)}, so a poll that
    finds nothing new decodes nothing (L{queued_jobs} reads the new ones).
    """
    if reach:
        marks = ", ".join("?" * len(reach))
        rows = c.execute(f"SELECT id, worker_group, worker_id FROM jobs WHERE state = 'queued'"
                         f" AND worker_group IN ({marks}) ORDER BY priority DESC, seq LIMIT ?",
                         (*reach, limit)).fetchall()
    else:
        rows = c.execute("SELECT id, worker_group, worker_id FROM jobs WHERE state = 'queued'"
                         " ORDER BY priority DESC, seq LIMIT ?", (limit,)).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def queued_jobs(c: Cursor, ids: list[str]) -> list[Job]:
    """The jobs C{ids} that are still queued, in the order to run them."""
    out: list[tuple[int, int, Job]] = []
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        marks = ", ".join("?" * len(chunk))
        for r in c.execute(f"SELECT seq, {_COLUMNS} FROM jobs WHERE state = 'queued' AND id IN ({marks})",
                           chunk).fetchall():
            out.append((-r["priority"], r["seq"], _job(r)))
    out.sort(key=lambda t: (t[0], t[1]))
    return [job for _, _, job in out]


_JOB_COLUMNS = ", ".join(f"j.{name.strip()}" for name in _COLUMNS.split(","))


def last_event_id(c: Cursor) -> int:
    return int(c.execute("SELECT coalesce(max(id), 0) FROM job_events").fetchone()[0])


def events_after(c: Cursor, after: int, limit: int) -> list[tuple[Job, JobEvent, str | None]]:
    """Events with an id above C{after}, oldest first, each with its job and the roller running it."""
    rows = c.execute(
        f"SELECT e.id AS event_id, e.time AS event_time, e.kind, e.message, e.data, j.roller_id, j.seq,"
        f" {_JOB_COLUMNS} FROM job_events e JOIN jobs j ON j.id = e.job_id WHERE e.id > ? ORDER BY e.id LIMIT ?",
        (after, limit)).fetchall()
    out = []
    for r in rows:
        event = JobEvent(r["id"], r["event_time"], r["kind"], r["message"],
                         json.loads(r["data"]) if r["data"] else {}, id=r["event_id"])
        out.append((_job(r), event, r["roller_id"]))
    return out


# -- fleet health divided between rollers (roller.health.watcher)

#: the advisory lock that makes remediation decisions take turns across rollers
REMEDIATION_LOCK = 0x726F6C6C


def reserve_remediation(c: Cursor, key: tuple[str, str], policy: str, task: str, time: float, dry_run: bool,
                        reason: str, pool: str, seen: int, own: tuple[int, ...]) -> int | None:
    """
    Record a remediation about to start, unless another roller recorded one
    after remediation C{seen} (the last this roller had read when it
    decided) for the same machine, or under the same policy in the same
    pool: then this roller decided on stale history (None; it decides
    again at its next tick).  C{own}: the ids this roller recorded since.
    """
    c.execute("SELECT pg_advisory_xact_lock(?)", (REMEDIATION_LOCK,))
    mine = f" AND r.id NOT IN ({', '.join('?' * len(own))})" if own else ""
    row = c.execute(
        "SELECT r.id FROM remediations r LEFT JOIN machines m ON m.worker_group = r.worker_group"
        f" AND m.worker_id = r.worker_id WHERE r.id > ?{mine} AND ((r.worker_group = ? AND r.worker_id = ?)"
        " OR (r.policy = ? AND r.dry_run = 0 AND coalesce(m.pool, '') = ?)) LIMIT 1",
        (seen, *own, *key, policy, pool)).fetchone()
    if row is not None:
        return None
    return int(c.execute("INSERT INTO remediations (worker_group, worker_id, policy, task, time, dry_run, job_id,"
                         " reason) VALUES (?, ?, ?, ?, ?, ?, NULL, ?) RETURNING id",
                         (*key, policy, task, time, int(dry_run), reason)).fetchone()[0])


def remediation_job(c: Cursor, remediation_id: int, job_id: str | None) -> None:
    """The job a reserved remediation started; None: it did not start (the reservation goes)."""
    if job_id is None:
        c.execute("DELETE FROM remediations WHERE id = ?", (remediation_id,))
    else:
        c.execute("UPDATE remediations SET job_id = ? WHERE id = ?", (job_id, remediation_id))


def active_remediations(c: Cursor, reserved_since: float) -> set[int]:
    """Remediations whose job is queued or running, and those reserved since C{reserved_since} without a job yet."""
    rows = c.execute("SELECT r.id FROM remediations r JOIN jobs j ON j.id = r.job_id"
                     " WHERE j.state IN ('queued', 'running')").fetchall()
    rows += c.execute("SELECT id FROM remediations WHERE job_id IS NULL AND dry_run = 0 AND time >= ?",
                      (reserved_since,)).fetchall()
    return {int(r[0]) for r in rows}


def machines_with_jobs(c: Cursor) -> set[tuple[str, str]]:
    """Every machine with a job queued or running, on any roller."""
    return {(r[0], r[1]) for r in c.execute("SELECT DISTINCT worker_group, worker_id FROM jobs"
                                            " WHERE state IN ('queued', 'running')").fetchall()}


# -- batches: one roller drives each (roller.batches.service)


def adopt_batches(c: Cursor, roller_id: str) -> list[str]:
    """
    The unfinished batches this roller drives from now on: its own, and
    those whose owner left the rollers (stopped, or taken over as dead) or
    was never recorded.
    """
    c.execute("UPDATE batches SET owner = ? WHERE finished_at IS NULL AND (owner IS NULL"
              " OR owner NOT IN (SELECT id FROM rollers))", (roller_id,))
    return [str(r[0]) for r in c.execute("SELECT id FROM batches WHERE finished_at IS NULL AND owner = ?"
                                         " ORDER BY seq", (roller_id,)).fetchall()]


def take_batch(c: Cursor, batch_id: str, roller_id: str) -> bool:
    """Drive an unfinished batch from now on, whoever drove it (to cancel it here); False: it ended."""
    return bool(c.execute("UPDATE batches SET owner = ? WHERE id = ? AND finished_at IS NULL",
                          (roller_id, batch_id)).rowcount)


def batch_owner(c: Cursor, batch_id: str) -> str | None:
    row = c.execute("SELECT owner FROM batches WHERE id = ?", (batch_id,)).fetchone()
    return None if row is None or row[0] is None else str(row[0])
