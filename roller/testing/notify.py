"""
Fakes of what roller notifies: Taskcluster's notify service and a webhook
receiver, as Klein apps on 127.0.0.1.

L{FakeTaskclusterNotify} serves C{POST /api/notify/v1/email|matrix|slack},
verifying the Hawk header with C{mohawk.Receiver} (payload hash included
when the client sent one) against its clients, and checking each body's
required fields (email: address, subject, content; matrix: roomId, body;
slack: channelId, text).  Accepted calls land in C{received} as
C{(kind, client_id, body)}; a refused one answers 401/400 with a
Taskcluster-style C{{"code": ..., "message": ...}}.

L{FakeWebhook} records every C{POST /hook} (headers, raw body) and answers
C{status} (default 204).
"""

from __future__ import annotations

import json
from typing import Any

import mohawk
from attrs import define, field
from klein import Klein
from mohawk import exc as hawk_exc
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.web.iweb import IRequest

from roller.sim.web import base_url, json_answer, serve

__all__ = ["FakeTaskclusterNotify", "FakeWebhook"]

REQUIRED = {"email": ("address", "subject", "content"), "matrix": ("roomId", "body"),
            "slack": ("channelId", "text")}


def _listen(app: Klein, reactor: IReactorTCP) -> tuple[IListeningPort, str]:
    port = serve(app, reactor)
    return port, base_url(port)


def _answer(request: IRequest, status: int, body: Any) -> bytes:
    return json_answer(request, body, status)


@define
class FakeTaskclusterNotify:
    #: client id -> access token
    clients: dict[str, str]
    received: list[tuple[str, str, dict]] = field(factory=list)
    refused: list[str] = field(factory=list)
    url: str = ""

    app = Klein()

    def listen(self, reactor: IReactorTCP) -> IListeningPort:
        port, self.url = _listen(self.app, reactor)
        return port

    @app.route("/api/notify/v1/<kind>", methods=["POST"])
    def notify(self, request: IRequest, kind: str) -> bytes:
        raw = request.content.read()
        header = (request.getHeader(b"authorization") or b"").decode()
        url = f"{self.url}{request.uri.decode()}"
        ctype = (request.getHeader(b"content-type") or b"").decode()
        try:
            receiver = mohawk.Receiver(
                lambda cid: {"id": cid, "key": self.clients[cid], "algorithm": "sha256"},
                header, url, "POST", content=raw, content_type=ctype, seen_nonce=None,
                accept_untrusted_content=False)
        except (hawk_exc.HawkFail, KeyError) as e:
            self.refused.append(f"{type(e).__name__}: {e}")
            return _answer(request, 401, {"code": "AuthenticationFailed", "message": f"Hawk: {type(e).__name__}"})
        if kind not in REQUIRED:
            return _answer(request, 404, {"code": "ResourceNotFound", "message": f"no such endpoint {kind}"})
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        missing = [k for k in REQUIRED[kind] if not isinstance(body, dict) or not body.get(k)]
        if missing:
            return _answer(request, 400, {"code": "InputValidationError", "message": f"missing {missing}"})
        self.received.append((kind, receiver.resource.credentials["id"], body))
        return _answer(request, 200, {})


@define
class FakeWebhook:
    status: int = 204
    received: list[tuple[dict[str, str], bytes]] = field(factory=list)
    url: str = ""

    app = Klein()

    def listen(self, reactor: IReactorTCP) -> IListeningPort:
        port, base = _listen(self.app, reactor)
        self.url = base + "/hook"
        return port

    @app.route("/hook", methods=["POST"])
    def hook(self, request: IRequest) -> bytes:
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.received.append((headers, request.content.read()))
        request.setResponseCode(self.status)
        return b""
