"""
A fake of Taskcluster's queue for loans, as a Klein app on 127.0.0.1.

Serves C{queue.quarantineWorker}: C{PUT /api/queue/v1/provisioners/P/
worker-types/T/workers/G/W} with C{{"quarantineUntil": ISO,
"quarantineInfo": ...}}, verifying the Hawk header with C{mohawk.Receiver}
(payload hash required) against its clients.  Accepted calls land in
C{calls} as dicts (provisioner_id, worker_type, worker_group, worker_id,
client_id, quarantine_until, quarantine_info) and set C{quarantined}
(worker path -> until); a refused one answers 401/400 with a
Taskcluster-style C{{"code": ..., "message": ...}}.  C{down = True}
answers 503 to everything.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import mohawk
from attrs import define, field
from klein import Klein
from mohawk import exc as hawk_exc
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.web.iweb import IRequest

from roller.sim.web import base_url, json_answer, serve

__all__ = ["FakeTaskclusterQueue"]


@define
class FakeTaskclusterQueue:
    #: client id -> access token
    clients: dict[str, str]
    calls: list[dict[str, Any]] = field(factory=list)
    refused: list[str] = field(factory=list)
    #: "P/T/G/W" -> quarantineUntil (ISO text, as received)
    quarantined: dict[str, str] = field(factory=dict)
    down: bool = False
    url: str = ""

    app = Klein()

    def listen(self, reactor: IReactorTCP) -> IListeningPort:
        port = serve(self.app, reactor)
        self.url = base_url(port)
        return port

    @app.route("/api/queue/v1/provisioners/<provisioner>/worker-types/<worker_type>/workers/<group>/<worker>",
               methods=["PUT"])
    def quarantine_worker(self, request: IRequest, provisioner: str, worker_type: str, group: str,
                          worker: str) -> bytes:
        if self.down:
            return json_answer(request, {"code": "ServiceUnavailable", "message": "down for maintenance"}, 503)
        raw = request.content.read()
        header = (request.getHeader(b"authorization") or b"").decode()
        ctype = (request.getHeader(b"content-type") or b"").decode()
        try:
            receiver = mohawk.Receiver(
                lambda cid: {"id": cid, "key": self.clients[cid], "algorithm": "sha256"},
                header, f"{self.url}{request.uri.decode()}", "PUT", content=raw, content_type=ctype,
                seen_nonce=None, accept_untrusted_content=False)
        except (hawk_exc.HawkFail, KeyError) as e:
            self.refused.append(f"{type(e).__name__}: {e}")
            return json_answer(request, {"code": "AuthenticationFailed", "message": f"Hawk: {type(e).__name__}"},
                               401)
        try:
            body = json.loads(raw)
            until = body["quarantineUntil"]
            datetime.fromisoformat(until.replace("Z", "+00:00"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return json_answer(request, {"code": "InputValidationError",
                                         "message": "quarantineUntil must be a date-time"}, 400)
        info = body.get("quarantineInfo", "")
        if not isinstance(info, str):
            return json_answer(request, {"code": "InputValidationError", "message": "quarantineInfo: string"}, 400)
        self.calls.append({"provisioner_id": provisioner, "worker_type": worker_type, "worker_group": group,
                           "worker_id": worker, "client_id": receiver.resource.credentials["id"],
                           "quarantine_until": until, "quarantine_info": info})
        self.quarantined[f"{provisioner}/{worker_type}/{group}/{worker}"] = until
        return json_answer(request, {"provisionerId": provisioner, "workerType": worker_type,
                                     "workerGroup": group, "workerId": worker, "quarantineUntil": until,
                                     "recentTasks": [], "actions": []})
