"""
Aggregates of the job history for the dashboard's charts (C{/stats} and
the fleet page's sparkline).

Every query covers a bounded window and reaches it through the primary
key: the first job that can have finished in the window is found by a
binary search (L{roller.store.history.first_seq_at}) on jobs requested up
to L{SLACK} seconds before it (a job that waited longer than that before it
ended is left out of the charts), then only that tail of the table is
read.  Reboot attempts come from the reboot jobs' own log events (through
C{job_events_job}); remediations from C{remediations_time}.  The
statements are portable SQL; the web layer caches their results.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

from attrs import frozen
from twisted.internet.defer import Deferred

from roller.store import Store
from roller.store.db import Cursor
from roller.store.history import first_seq_at

__all__ = ["SLACK", "METHOD_FAMILIES", "FAILED", "Buckets", "PoolFailures", "MethodStats", "StatsQueries"]

#: how long before a window a job may have been requested and still count (queued + running time)
SLACK = 2 * 86400
#: the states that count as a failure of the machine or its task
FAILED = ("failed", "timed_out")
#: reboot methods (roller.tasks.reboot.METHODS) by the family the charts show
METHOD_FAMILIES = {
    "ssh_reboot": "ssh",
    "ipmi_reset": "ipmi",
    "ipmi_cycle": "ipmi",
    "snmp_reboot": "pdu",
    "redfish_reboot": "redfish",
    "xenapi_reboot": "xen",
}


@frozen
class Buckets:
    """Counts per bucket of C{width} seconds from C{since}: C{counts[key][i]}."""

    since: int
    width: int
    n: int
    counts: dict[str, tuple[int, ...]]

    def total(self, i: int) -> int:
        return sum(v[i] for v in self.counts.values())

    @property
    def totals(self) -> tuple[int, ...]:
        return tuple(self.total(i) for i in range(self.n))


@frozen
class PoolFailures:
    pool: str | None
    finished: int
    failed: int

    @property
    def rate(self) -> float:
        return self.failed / self.finished if self.finished else 0.0


@frozen
class MethodStats:
    """A reboot method family's attempts that ran (skipped ones are not attempts)."""

    family: str
    succeeded: int
    failed: int
    recover_seconds: tuple[float, ...]  # of the succeeded attempts: from starting the method to up

    @property
    def attempts(self) -> int:
        return self.succeeded + self.failed

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.attempts if self.attempts else None

    @property
    def median_recover(self) -> float | None:
        return statistics.median(self.recover_seconds) if self.recover_seconds else None


def _window_seq(c: Cursor, since: float) -> int:
    return first_seq_at(c, since - SLACK)


def jobs_by_state(c: Cursor, since: int, until: int, width: int) -> Buckets:
    """Jobs that ended in [since, until), per bucket of C{width} seconds, by final state."""
    n = max(0, -(-(until - since) // width))
    rows = c.execute(
        "SELECT (CAST(finished_at AS BIGINT) - ?) / ? AS b, state, count(*) FROM jobs"
        " WHERE seq >= ? AND finished_at >= ? AND finished_at < ? GROUP BY b, state",
        (since, width, _window_seq(c, since), since, until)).fetchall()
    counts: dict[str, list[int]] = {}
    for b, state, count in rows:
        if 0 <= b < n:
            counts.setdefault(state, [0] * n)[b] += count
    return Buckets(since, width, n, {k: tuple(v) for k, v in counts.items()})


def failures_by_pool(c: Cursor, since: float, until: float) -> list[PoolFailures]:
    """Per pool (the machines' current pools), the jobs that ended in [since, until) and how many failed."""
    marks = ", ".join("?" * len(FAILED))
    # counted per machine first, then one machines lookup per machine rather than per job; grouped by
    # expressions, so SQLite reads the window's range of the primary key rather than all of jobs_machine
    # (which is in the machines' order)
    rows = c.execute(
        "SELECT m.pool, sum(x.n), sum(x.f) FROM (SELECT CAST(worker_group AS TEXT) AS g,"
        " CAST(worker_id AS TEXT) AS w, count(*) AS n,"
        f" sum(CASE WHEN state IN ({marks}) THEN 1 ELSE 0 END) AS f FROM jobs"
        " WHERE seq >= ? AND finished_at >= ? AND finished_at < ? GROUP BY 1, 2) x"
        " LEFT JOIN machines m ON m.worker_group = x.g AND m.worker_id = x.w GROUP BY m.pool",
        (*FAILED, _window_seq(c, since), since, until)).fetchall()
    out = [PoolFailures(pool, finished, failed or 0) for pool, finished, failed in rows]
    return sorted(out, key=lambda p: (-p.failed, -p.rate, p.pool or ""))


def reboot_methods(c: Cursor, since: float, until: float) -> dict[str, MethodStats]:
    """
    Per reboot method family, the attempts of the reboot jobs that ended in
    [since, until): from each job's log events (C{method}, C{step},
    C{outcome}, as L{roller.tasks.reboot} records them).  Time to recover:
    from the method's C{initiate} event to its C{succeeded} one.
    """
    # the window's reboot jobs first (a range of the primary key), then each one's events (job_events_job)
    rows = c.execute(
        "SELECT e.job_id, e.time, e.data FROM job_events e WHERE e.job_id IN (SELECT j.id FROM jobs j"
        " WHERE j.seq >= ? AND j.task_name = 'reboot' AND j.finished_at >= ? AND j.finished_at < ?)"
        " AND e.kind = 'log' AND e.data IS NOT NULL ORDER BY e.job_id, e.id",
        (_window_seq(c, since), since, until)).fetchall()
    ok: dict[str, int] = defaultdict(int)
    bad: dict[str, int] = defaultdict(int)
    recover: dict[str, list[float]] = defaultdict(list)
    started: dict[tuple[str, str], float] = {}
    for job_id, time, data in rows:
        try:
            d = json.loads(data)
        except ValueError:
            continue
        method = d.get("method") if isinstance(d, dict) else None
        if not isinstance(method, str) or method not in METHOD_FAMILIES:
            continue
        family = METHOD_FAMILIES[method]
        if d.get("step") == "initiate":
            started[(job_id, method)] = time
        outcome = d.get("outcome")
        if outcome == "succeeded":
            ok[family] += 1
            begun = started.get((job_id, method))
            if begun is not None:
                recover[family].append(max(0.0, time - begun))
        elif outcome == "failed":
            bad[family] += 1
    families = dict.fromkeys(["ssh", "ipmi", "pdu", "redfish"])
    families.update(dict.fromkeys(k for k in (*ok, *bad)))
    return {f: MethodStats(f, ok.get(f, 0), bad.get(f, 0), tuple(recover.get(f, ()))) for f in families}


def remediations_per_day(c: Cursor, since: int, until: int) -> Buckets:
    """Remediations started per day in [since, until): C{queued} (real jobs) and C{dry_run}."""
    n = max(0, -(-(until - since) // 86400))
    rows = c.execute(
        "SELECT (CAST(time AS BIGINT) - ?) / 86400 AS b, dry_run, count(*) FROM remediations"
        " WHERE time >= ? AND time < ? GROUP BY b, dry_run", (since, since, until)).fetchall()
    counts = {"remediation": [0] * n, "dry_run": [0] * n}
    for b, dry, count in rows:
        if 0 <= b < n:
            counts["dry_run" if dry else "remediation"][b] += count
    return Buckets(since, 86400, n, {k: tuple(v) for k, v in counts.items()})


@frozen
class WeekStats:
    """Everything C{/stats} shows over its longer window."""

    hourly: Buckets
    pools: list[PoolFailures]
    methods: dict[str, MethodStats]
    remediations: Buckets


class StatsQueries:
    """
    The charts' reads, on the store's reader connection: one read per
    aggregate, so other reads get their turn in between.
    """

    def __init__(self, store: Store):
        self._db = store.db

    def hourly(self, until: int, hours: int = 24) -> Deferred[Buckets]:
        """Jobs ended per hour over the C{hours} hours before C{until} (a whole hour), by final state."""
        return self._db.read(jobs_by_state, until - hours * 3600, until, 3600)

    def week(self, hour_until: int, day_until: int, days: int = 7) -> Deferred[WeekStats]:
        """
        Over C{days} days: jobs per hour by state and failures by pool (to
        C{hour_until}), reboot methods, and remediations per day (whole days
        to C{day_until}).
        """
        return Deferred.fromCoroutine(self._week(hour_until, day_until, days))

    async def _week(self, hour_until: int, day_until: int, days: int) -> WeekStats:
        since, read = hour_until - days * 86400, self._db.read
        return WeekStats(
            hourly=await read(jobs_by_state, since, hour_until, 3600),
            pools=await read(failures_by_pool, since, hour_until),
            methods=await read(reboot_methods, since, hour_until),
            remediations=await read(remediations_per_day, day_until - days * 86400, day_until),
        )
