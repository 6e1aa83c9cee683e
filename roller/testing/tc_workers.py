"""
A fake of the Taskcluster services fleet health reads, as a Klein app on
127.0.0.1, answering as the real ones do:

  - worker-manager C{listWorkers}
    (C{GET /api/worker-manager/v1/provisioners/P/worker-types/T/workers},
    paged: C{limit}, C{continuationToken}) and C{getWorker}
    (C{.../workers/G/W}, with C{recentTasks});
  - queue C{taskQueueCounts} (C{GET /api/queue/v1/task-queues/P%2FT/counts})
    and C{status} (C{GET /api/queue/v1/task/ID/status}).

Every request must carry a valid Hawk header (C{mohawk.Receiver}) from one
of C{clients}; others get 401 with a Taskcluster-style error.  C{down =
True} answers 503 to everything.  C{requests} counts calls by name.

Build a pool with L{FakeTaskclusterWorkers.add_worker} and
L{FakeTaskclusterWorkers.add_runs} (each run resolved C{completed},
C{failed} or C{exception}).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import mohawk
from attrs import define, field
from klein import Klein
from mohawk import exc as hawk_exc
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.web.iweb import IRequest

from roller.sim.web import base_url, json_answer, serve

__all__ = ["FakeTaskclusterWorkers"]


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@define
class FakeTaskclusterWorkers:
    #: client id -> access token
    clients: dict[str, str]
    #: "P/T" -> {(group, id): worker document}
    pools: dict[str, dict[tuple[str, str], dict[str, Any]]] = field(factory=dict)
    #: "P/T" -> pendingTasks
    pending: dict[str, int] = field(factory=dict)
    #: taskId -> status runs
    tasks: dict[str, list[dict[str, Any]]] = field(factory=dict)
    #: (group, id) -> [{taskId, runId}], oldest first
    recent: dict[tuple[str, str], list[dict[str, Any]]] = field(factory=dict)
    requests: Counter[str] = field(factory=Counter)
    refused: list[str] = field(factory=list)
    nonces: set[tuple[str, str, str]] = field(factory=set)
    down: bool = False
    page_size: int = 100
    url: str = ""
    _seq: int = 0

    app = Klein()

    def listen(self, reactor: IReactorTCP) -> IListeningPort:
        port = serve(self.app, reactor)
        self.url = base_url(port)
        return port

    # -- building the world

    def add_worker(self, pool: str, group: str, worker_id: str, *, last_active: float | None = None,
                   quarantine_until: float | None = None, first_claim: float | None = None) -> None:
        self.pools.setdefault(pool, {})[(group, worker_id)] = {
            "workerPoolId": pool, "workerGroup": group, "workerId": worker_id, "state": "running",
            "providerId": "static", "firstClaim": iso(first_claim), "lastDateActive": iso(last_active),
            "quarantineUntil": iso(quarantine_until), "latestTask": None, "capacity": 1,
        }
        self.recent.setdefault((group, worker_id), [])

    def add_runs(self, pool: str, group: str, worker_id: str, outcomes: list[str]) -> None:
        """Tasks run by the worker, oldest first: C{"completed"}, C{"failed"} or C{"exception:REASON"}."""
        for outcome in outcomes:
            self._seq += 1
            task_id = f"task{self._seq:06d}"
            state, _, reason = outcome.partition(":")
            reason = reason or {"completed": "completed", "failed": "failed"}.get(state, "worker-shutdown")
            self.tasks[task_id] = [{"runId": 0, "state": state, "reasonCreated": "scheduled",
                                    "reasonResolved": reason, "workerGroup": group, "workerId": worker_id}]
            ref = {"taskId": task_id, "runId": 0}
            self.recent[(group, worker_id)] = (self.recent[(group, worker_id)] + [ref])[-20:]
            self.pools[pool][(group, worker_id)]["latestTask"] = ref

    # -- the services

    def _seen(self, sender_id: str, nonce: str, timestamp: str) -> bool:
        key = (sender_id, nonce, timestamp)
        if key in self.nonces:
            return True
        self.nonces.add(key)
        return False

    def _refuse(self, request: IRequest, name: str) -> bytes | None:
        self.requests[name] += 1
        if self.down:
            return json_answer(request, {"code": "ServiceUnavailable", "message": "down for maintenance"}, 503)
        header = (request.getHeader(b"authorization") or b"").decode()
        try:
            mohawk.Receiver(lambda cid: {"id": cid, "key": self.clients[cid], "algorithm": "sha256"},
                            header, f"{self.url}{request.uri.decode()}", request.method.decode(),
                            content=b"", content_type="", seen_nonce=self._seen, accept_untrusted_content=True)
        except (hawk_exc.HawkFail, KeyError) as e:
            self.refused.append(f"{name}: {type(e).__name__}")
            return json_answer(request, {"code": "AuthenticationFailed", "message": f"Hawk: {type(e).__name__}"},
                               401)
        return None

    @app.route("/api/worker-manager/v1/provisioners/<provisioner>/worker-types/<worker_type>/workers",
               methods=["GET"])
    def list_workers(self, request: IRequest, provisioner: str, worker_type: str) -> bytes:
        refused = self._refuse(request, "listWorkers")
        if refused is not None:
            return refused
        workers = list(self.pools.get(f"{provisioner}/{worker_type}", {}).values())
        args = request.args or {}
        try:
            limit = min(int(args.get(b"limit", [b"1000"])[0]), self.page_size)
            start = int(args.get(b"continuationToken", [b"0"])[0])
        except ValueError:
            return json_answer(request, {"code": "InvalidRequestArguments", "message": "bad paging"}, 400)
        page = workers[start:start + limit]
        body: dict[str, Any] = {"workers": page}
        if start + limit < len(workers):
            body["continuationToken"] = str(start + limit)
        return json_answer(request, body)

    @app.route("/api/worker-manager/v1/provisioners/<provisioner>/worker-types/<worker_type>/workers/<group>/"
               "<worker>", methods=["GET"])
    def get_worker(self, request: IRequest, provisioner: str, worker_type: str, group: str, worker: str) -> bytes:
        refused = self._refuse(request, "getWorker")
        if refused is not None:
            return refused
        doc = self.pools.get(f"{provisioner}/{worker_type}", {}).get((group, worker))
        if doc is None:
            return json_answer(request, {"code": "ResourceNotFound", "message": "no such worker"}, 404)
        return json_answer(request, {**doc, "recentTasks": self.recent.get((group, worker), [])})

    @app.route("/api/queue/v1/task-queues/<path:task_queue_id>/counts", methods=["GET"])
    def counts(self, request: IRequest, task_queue_id: str) -> bytes:
        refused = self._refuse(request, "taskQueueCounts")
        if refused is not None:
            return refused
        queue_id = unquote(task_queue_id)
        return json_answer(request, {"taskQueueId": queue_id, "pendingTasks": self.pending.get(queue_id, 0),
                                     "claimedTasks": 0})

    @app.route("/api/queue/v1/task/<task_id>/status", methods=["GET"])
    def status(self, request: IRequest, task_id: str) -> bytes:
        refused = self._refuse(request, "status")
        if refused is not None:
            return refused
        runs = self.tasks.get(task_id)
        if runs is None:
            return json_answer(request, {"code": "ResourceNotFound", "message": f"no task {task_id}"}, 404)
        return json_answer(request, {"status": {"taskId": task_id, "state": runs[-1]["state"], "runs": runs}})
