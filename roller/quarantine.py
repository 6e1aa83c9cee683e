"""
Taskcluster's C{queue.quarantineWorker}, for loans.

    PUT {root_url}/api/queue/v1/provisioners/{provisionerId}/worker-types/{workerType}
        /workers/{workerGroup}/{workerId}
    {"quarantineUntil": "<ISO time>", "quarantineInfo": "<why>"}

Hawk-signed (C{mohawk.Sender}, sha256, payload hash) with the client id
and access token of a C{password} credential (username = client id,
password = access token), as the official client signs it.  Setting
C{quarantineUntil} in the past lifts a quarantine.  The method is C{PUT}
in Taskcluster's API reference (C{taskcluster.Queue.funcinfo}).

A machine's worker pool comes from its inventory C{pool}: either
C{provisionerId/workerType}, or a bare worker type under the configured
C{loans.provisioner_id}.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import mohawk
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.web.client import Agent

from roller import __version__
from roller.drivers.reactor import ITcpReactor
from roller.inventory import Machine
from roller.jobs import iso
from roller.json_input import load_json

__all__ = ["QuarantineError", "TaskclusterQueue", "worker_pool"]


class QuarantineError(Exception):
    """The quarantine could not be set; the message says why in one line (never a secret)."""


def worker_pool(machine: Machine, default_provisioner: str) -> tuple[str, str]:
    """C{(provisionerId, workerType)} of a machine, or L{QuarantineError}."""
    pool = machine.pool or ""
    if not pool:
        raise QuarantineError(f"{machine.worker_id} has no pool: set its pool to its Taskcluster worker type "
                              "(or provisionerId/workerType) so it can be quarantined")
    if "/" in pool:
        provisioner, _, worker_type = pool.partition("/")
    else:
        provisioner, worker_type = default_provisioner, pool
    if not provisioner or not worker_type or "/" in worker_type:
        raise QuarantineError(f"the pool {pool!r} of {machine.worker_id} is not a worker type or "
                              "provisionerId/workerType (and loans.provisioner_id is empty)")
    return provisioner, worker_type


def _seg(text: str) -> str:
    return quote(text, safe="")


class TaskclusterQueue:
    """
    @param root_url: the Taskcluster deployment (C{https://tc.example.com}).
    @param client_id: and C{access_token}: the credentials to sign with.
    """

    def __init__(self, reactor: ITcpReactor, root_url: str, client_id: str, access_token: str, *,
                 timeout: float = 30.0, treq_client: HTTPClient | None = None):
        self.reactor = reactor
        self.root_url = root_url.rstrip("/")
        self._creds = {"id": client_id, "key": access_token, "algorithm": "sha256"}
        self.timeout = timeout
        self.http = treq_client or HTTPClient(Agent(reactor, connectTimeout=timeout))

    def quarantine(self, provisioner_id: str, worker_type: str, worker_group: str, worker_id: str,
                   until: float, info: str) -> Deferred[dict]:
        """Set the worker's C{quarantineUntil}; the worker document Taskcluster answers."""
        d = Deferred.fromCoroutine(self._put(provisioner_id, worker_type, worker_group, worker_id, until, info))
        d.addTimeout(self.timeout, self.reactor)
        d.addErrback(self._failed)
        return d

    def _failed(self, f: Any) -> Any:
        if f.check(QuarantineError):
            return f
        if f.check(TimeoutError, CancelledError):
            raise QuarantineError(f"the Taskcluster queue at {self.root_url} did not answer within "
                                  f"{self.timeout:g} s")
        why = f.getErrorMessage() or f.type.__name__
        raise QuarantineError(f"the Taskcluster queue at {self.root_url} is unreachable: {why}"[:300])

    async def _put(self, provisioner_id: str, worker_type: str, worker_group: str, worker_id: str,
                   until: float, info: str) -> dict:
        url = (f"{self.root_url}/api/queue/v1/provisioners/{_seg(provisioner_id)}/worker-types/"
               f"{_seg(worker_type)}/workers/{_seg(worker_group)}/{_seg(worker_id)}")
        raw = json.dumps({"quarantineUntil": iso(until), "quarantineInfo": info}).encode()
        sender = mohawk.Sender(credentials=self._creds, url=url, method="PUT", content=raw,
                               content_type="application/json")
        headers: dict[bytes | str, list[bytes | str]] = {
                   "Content-Type": ["application/json"], "Authorization": [sender.request_header],
                   "User-Agent": [f"roller/{__version__}"]}
        response = await self.http.put(url, data=raw, headers=headers)
        body = await response.content()
        if 200 <= response.code < 300:
            try:
                return load_json(body)
            except ValueError:
                return {}
        try:
            error = load_json(body)
            detail = f"{error.get('code', '')}: {error.get('message', '')}".strip(": ")
        except (ValueError, AttributeError):
            detail = body[:200].decode("utf-8", "replace")
        raise QuarantineError(f"the Taskcluster queue refused quarantineWorker for {worker_id}: "
                              f"HTTP {response.code} {detail}"[:400])
