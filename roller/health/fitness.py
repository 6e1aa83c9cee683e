"""
Taskcluster fitness of one pool: which of roller's machines Taskcluster
sees failing, missing or quarantined.

L{assess} is the rule, a pure function of what Taskcluster answered:

  - C{quarantined}: C{quarantineUntil} is in the future (Taskcluster's own
    quarantine, mirrored);
  - C{missing}: the worker is not listed at all, or its C{lastDateActive}
    is older than C{missing_after} seconds while the pool has pending tasks
    (an idle worker of an idle pool is not missing);
  - C{failing}: of its last C{window} resolved runs fewer than
    C{min_success_rate} completed (judged once at least C{min_runs} are
    known), or its last C{max_consecutive_failures} resolved runs all
    failed.  A run C{failed}, or resolved C{exception} for a reason that is
    the worker's (C{worker-shutdown}, C{claim-expired}, C{internal-error},
    C{malformed-payload}, C{resource-unavailable}), counts as a failure;
    C{canceled}, C{superseded} and C{deadline-exceeded} runs do not count at
    all.

L{FitnessPoller} fetches what L{assess} needs for a pool: the workers
(paged), the pending count, each worker's recent tasks (only when its
C{latestTask} changed since the last poll) and their runs (a resolved run
never changes, so it is fetched once and kept).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

from attrs import frozen
from twisted.internet.defer import DeferredSemaphore

from roller.taskcluster.http import TaskclusterError, TaskclusterHttp
from roller.taskcluster.workers import (
    Run,
    TaskRef,
    WorkerInfo,
    get_recent_tasks,
    list_workers,
    pending_tasks,
    task_runs,
)

__all__ = ["FitnessRules", "PoolFitness", "FitnessPoller", "assess", "NOT_COUNTED", "WORKER_FAULTS"]

#: exception reasons that are the worker's fault
WORKER_FAULTS = frozenset({"worker-shutdown", "claim-expired", "internal-error", "malformed-payload",
                           "resource-unavailable"})
#: exception reasons that say nothing about the worker
NOT_COUNTED = frozenset({"canceled", "superseded", "deadline-exceeded"})

Key = tuple[str, str]  # (worker_group, worker_id)


@frozen
class FitnessRules:
    missing_after: float = 3600.0
    window: int = 10
    min_success_rate: float = 0.85
    min_runs: int = 5
    max_consecutive_failures: int = 3


@frozen
class PoolFitness:
    """One poll's result: per machine, its findings as C{(kind, detail)}, and the pool's pending count."""

    findings: dict[Key, list[tuple[str, str]]]
    pending: int
    workers_listed: int


def _outcome(run: Run) -> bool | None:
    """True for a success, False for the worker's failure, None when it does not count."""
    if run.state == "completed":
        return True
    if run.state == "failed":
        return False
    if run.state == "exception":
        if run.reason_resolved in NOT_COUNTED:
            return None
        return False if run.reason_resolved in WORKER_FAULTS or not run.reason_resolved else None
    return None


def assess(machines: Iterable[Key], workers: Mapping[Key, WorkerInfo], runs: Mapping[Key, Sequence[Run]],
           pending: int, now: float, rules: FitnessRules) -> dict[Key, list[tuple[str, str]]]:
    """
    The findings of each machine of C{machines}; C{runs} holds each
    worker's resolved runs, oldest first.
    """
    out: dict[Key, list[tuple[str, str]]] = {}
    for key in machines:
        found: list[tuple[str, str]] = []
        worker = workers.get(key)
        if worker is None:
            found.append(("missing", "Taskcluster does not list this worker in its pool"))
        else:
            if worker.quarantine_until is not None and worker.quarantine_until > now:
                found.append(("quarantined", "quarantined in Taskcluster for another "
                                             f"{_duration(worker.quarantine_until - now)}"))
            if pending > 0:
                if worker.last_date_active is None:
                    found.append(("missing", f"never active while its pool has {pending} pending task(s)"))
                elif now - worker.last_date_active > rules.missing_after:
                    found.append(("missing", f"last active {_duration(now - worker.last_date_active)} ago "
                                             f"while its pool has {pending} pending task(s)"))
        outcomes = [o for o in map(_outcome, runs.get(key, ())) if o is not None]
        recent = outcomes[-rules.window:]
        streak = 0
        for ok in reversed(outcomes):
            if ok:
                break
            streak += 1
        if rules.max_consecutive_failures and streak >= rules.max_consecutive_failures:
            found.append(("failing", f"its last {streak} task run(s) failed"))
        elif len(recent) >= min(rules.min_runs, rules.window):
            rate = sum(recent) / len(recent)
            if rate < rules.min_success_rate:
                found.append(("failing", f"{sum(recent)} of its last {len(recent)} task runs succeeded "
                                         f"({rate:.0%}, below {rules.min_success_rate:.0%})"))
        out[key] = found
    return out


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


class FitnessPoller:
    """
    Polls Taskcluster for one roller: L{poll} a pool at a time.  Caches
    resolved runs (at most C{max_runs_cached}, least recently used first
    out) and each worker's recent tasks by its C{latestTask}.
    """

    def __init__(self, tc: TaskclusterHttp, rules: FitnessRules, *, concurrency: int = 8,
                 max_runs_cached: int = 200_000):
        self.tc = tc
        self.rules = rules
        self._limit = DeferredSemaphore(concurrency)
        self._runs: OrderedDict[TaskRef, Run] = OrderedDict()
        self._max_runs = max_runs_cached
        self._recent: dict[Key, tuple[TaskRef | None, list[TaskRef]]] = {}
        self.requests = 0  # Taskcluster calls made, for tests and the benchmark

    async def poll(self, provisioner_id: str, worker_type: str, machines: Iterable[Key],
                   now: float) -> PoolFitness:
        """
        Findings for C{machines} of the pool C{provisioner_id/worker_type}.

        @raise TaskclusterError: Taskcluster could not be asked; no finding
            may be drawn from a partial answer.
        """
        wanted = list(machines)
        self.requests += 1
        listed = await list_workers(self.tc, provisioner_id, worker_type)
        self.requests += 1
        pending = await pending_tasks(self.tc, f"{provisioner_id}/{worker_type}")
        workers = {(w.worker_group, w.worker_id): w for w in listed}
        runs: dict[Key, list[Run]] = {}
        for key in wanted:
            worker = workers.get(key)
            if worker is not None:
                runs[key] = await self._limit.run(self._runs_of, provisioner_id, worker_type, worker)
        return PoolFitness(assess(wanted, workers, runs, pending, now, self.rules), pending, len(listed))

    async def _runs_of(self, provisioner_id: str, worker_type: str, worker: WorkerInfo) -> list[Run]:
        key = (worker.worker_group, worker.worker_id)
        cached = self._recent.get(key)
        if cached is not None and cached[0] == worker.latest_task:
            refs = cached[1]
        elif worker.latest_task is None:
            refs = []
        else:
            self.requests += 1
            refs = await get_recent_tasks(self.tc, provisioner_id, worker_type, *key)
            self._recent[key] = (worker.latest_task, refs)
        out = []
        for ref in refs[-self.rules.window * 2:]:
            run = await self._run(ref)
            if run is not None and run.resolved:
                out.append(run)
        return out

    async def _run(self, ref: TaskRef) -> Run | None:
        run = self._runs.get(ref)
        if run is not None:
            self._runs.move_to_end(ref)
            return run
        self.requests += 1
        try:
            runs = await task_runs(self.tc, ref.task_id)
        except TaskclusterError as e:
            if e.status == 404:  # expired task: nothing to learn from it
                return None
            raise
        found = None
        for r in runs:
            if r.resolved:
                self._runs[TaskRef(r.task_id, r.run_id)] = r
            if r.run_id == ref.run_id:
                found = r
        while len(self._runs) > self._max_runs:
            self._runs.popitem(last=False)
        return found
