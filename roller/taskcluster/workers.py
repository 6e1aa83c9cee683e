"""
What Taskcluster knows about a pool's workers, through its current APIs:

  - worker-manager C{listWorkers}: C{GET /api/worker-manager/v1/provisioners/
    {provisionerId}/worker-types/{workerType}/workers}, paged by
    C{continuationToken} (each worker: C{workerGroup}, C{workerId},
    C{firstClaim}, C{latestTask}, C{lastDateActive}, C{quarantineUntil},
    C{state});
  - worker-manager C{getWorker}: C{.../workers/{workerGroup}/{workerId}}, which
    adds C{recentTasks} (C{[{taskId, runId}]}, oldest first);
  - queue C{taskQueueCounts}: C{GET /api/queue/v1/task-queues/{taskQueueId}/counts}
    (C{pendingTasks}, C{claimedTasks});
  - queue C{status}: C{GET /api/queue/v1/task/{taskId}/status} (C{status.runs[]}:
    C{runId}, C{state}, C{reasonResolved}, C{workerGroup}, C{workerId}).

All are Hawk-signed GETs (L{roller.taskcluster.http.TaskclusterHttp}).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from attrs import frozen

from roller.taskcluster.http import TaskclusterError, TaskclusterHttp, segment

__all__ = ["Run", "TaskRef", "WorkerInfo", "get_recent_tasks", "list_workers", "pending_tasks", "task_runs",
           "parse_time"]

#: Run states that never change again.
RESOLVED = frozenset({"completed", "failed", "exception"})


def parse_time(value: Any) -> float | None:
    """An ISO 8601 time as Taskcluster writes it (C{2026-12-06T04:00:00.000Z}), as epoch seconds."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@frozen
class TaskRef:
    task_id: str
    run_id: int


@frozen
class WorkerInfo:
    worker_group: str
    worker_id: str
    state: str = ""
    first_claim: float | None = None
    last_date_active: float | None = None
    quarantine_until: float | None = None
    latest_task: TaskRef | None = None

    @classmethod
    def from_json(cls, doc: Any) -> WorkerInfo:
        if not isinstance(doc, dict) or not isinstance(doc.get("workerGroup"), str) \
                or not isinstance(doc.get("workerId"), str):
            raise ValueError("a worker without workerGroup and workerId")
        return cls(doc["workerGroup"], doc["workerId"], str(doc.get("state") or ""),
                   parse_time(doc.get("firstClaim")), parse_time(doc.get("lastDateActive")),
                   parse_time(doc.get("quarantineUntil")), _task_ref(doc.get("latestTask")))


@frozen
class Run:
    task_id: str
    run_id: int
    state: str
    reason_resolved: str = ""
    worker_group: str = ""
    worker_id: str = ""

    @property
    def resolved(self) -> bool:
        return self.state in RESOLVED


def _task_ref(doc: Any) -> TaskRef | None:
    if isinstance(doc, dict) and isinstance(doc.get("taskId"), str) and isinstance(doc.get("runId"), int):
        return TaskRef(doc["taskId"], doc["runId"])
    return None


def _pool_path(provisioner_id: str, worker_type: str) -> str:
    return (f"/api/worker-manager/v1/provisioners/{segment(provisioner_id)}/worker-types/"
            f"{segment(worker_type)}/workers")


async def list_workers(tc: TaskclusterHttp, provisioner_id: str, worker_type: str, *,
                       page_size: int = 1000, max_pages: int = 1000) -> list[WorkerInfo]:
    """Every worker of a pool, following C{continuationToken}."""
    what = f"worker-manager listWorkers {provisioner_id}/{worker_type}"
    out: list[WorkerInfo] = []
    query: dict[str, str] = {"limit": str(page_size)}
    for _ in range(max_pages):
        page = await tc.get(what, _pool_path(provisioner_id, worker_type), query)
        workers = page.get("workers") if isinstance(page, dict) else None
        if not isinstance(workers, list):
            raise TaskclusterError(f"{what}: the answer has no workers list")
        for doc in workers:
            try:
                out.append(WorkerInfo.from_json(doc))
            except ValueError as e:
                raise TaskclusterError(f"{what}: {e}") from None
        token = page.get("continuationToken")
        if not token:
            return out
        query = {"limit": str(page_size), "continuationToken": str(token)}
    raise TaskclusterError(f"{what}: more than {max_pages} pages")


async def get_recent_tasks(tc: TaskclusterHttp, provisioner_id: str, worker_type: str, worker_group: str,
                           worker_id: str) -> list[TaskRef]:
    """A worker's C{recentTasks}, oldest first."""
    what = f"worker-manager getWorker {worker_group}/{worker_id}"
    path = f"{_pool_path(provisioner_id, worker_type)}/{segment(worker_group)}/{segment(worker_id)}"
    doc = await tc.get(what, path)
    recent = doc.get("recentTasks", []) if isinstance(doc, dict) else None
    if not isinstance(recent, list):
        raise TaskclusterError(f"{what}: recentTasks is not a list")
    return [ref for ref in map(_task_ref, recent) if ref is not None]


async def pending_tasks(tc: TaskclusterHttp, task_queue_id: str) -> int:
    """C{pendingTasks} of a task queue (C{provisionerId/workerType})."""
    what = f"queue taskQueueCounts {task_queue_id}"
    doc = await tc.get(what, f"/api/queue/v1/task-queues/{segment(task_queue_id)}/counts")
    count = doc.get("pendingTasks") if isinstance(doc, dict) else None
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise TaskclusterError(f"{what}: pendingTasks is not a count")
    return count


async def task_runs(tc: TaskclusterHttp, task_id: str) -> list[Run]:
    """A task's runs (C{queue.status})."""
    what = f"queue status {task_id}"
    doc = await tc.get(what, f"/api/queue/v1/task/{segment(task_id)}/status")
    runs = doc.get("status", {}).get("runs") if isinstance(doc, dict) and isinstance(doc.get("status"), dict) \
        else None
    if not isinstance(runs, list):
        raise TaskclusterError(f"{what}: the answer has no status.runs")
    out = []
    for r in runs:
        if isinstance(r, dict) and isinstance(r.get("runId"), int) and isinstance(r.get("state"), str):
            out.append(Run(task_id, r["runId"], r["state"], str(r.get("reasonResolved") or ""),
                           str(r.get("workerGroup") or ""), str(r.get("workerId") or "")))
    return out
