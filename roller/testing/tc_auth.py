"""
A fake of Taskcluster's auth service: C{POST /api/auth/v1/authenticate-hawk}.

It verifies the forwarded Hawk header with C{mohawk.Receiver} the way
Taskcluster's C{signaturevalidator.js} does with the hawk library: the MAC
over method, resource, host and port; a timestamp skew of 15 minutes; no
nonce check; no payload check (the service never sees the body: a payload
C{hash} the client sent is covered by the MAC and returned as C{hash});
C{ext.authorizedScopes} restricting the scopes.  Temporary credentials
(C{ext.certificate}) are refused as unsupported by this fake.

Answers have Taskcluster's shape::

    {"status": "auth-success", "scheme": "hawk", "clientId": ..., "scopes": [...], "expires": ...}
    {"status": "auth-failed", "message": "..."}
    {"status": "no-auth", "scheme": "none", "scopes": ["assume:anonymous"], "expires": ...}

Every question received is kept in C{questions}.  C{behaviour} makes it
misbehave: C{"error"} answers HTTP 500, C{"garbage"} 200 with a body that is
not JSON, C{"hang"} never answers (until L{release}).

    fake = FakeTaskclusterAuth({"project/releng/ci": ("token", ["project:releng:roller:*"])})
    port = fake.listen(reactor)             # 127.0.0.1, a free port
    authenticator = TaskclusterAuthenticator(reactor, fake.url)
"""

from __future__ import annotations

import base64
import json
import math
import time

import mohawk
from attrs import define, field
from klein import Klein
from mohawk import exc as hawk_exc
from mohawk.util import parse_authorization_header
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.web.iweb import IRequest

from roller.auth.scopes import satisfies
from roller.sim.web import base_url, json_answer, serve

__all__ = ["FakeTaskclusterAuth", "TASKCLUSTER_SKEW"]

#: Taskcluster's allowed clock skew (services/auth/src/signaturevalidator.js).
TASKCLUSTER_SKEW = 15 * 60
EXPIRES = "3000-01-01T00:00:00.000Z"


@define
class FakeTaskclusterAuth:
    """
    @ivar clients: client id -> (access token, scopes).
    @ivar clock: its C{seconds()} is the service's time (default: the real time).
    """

    clients: dict[str, tuple[str, list[str]]]
    clock: IReactorTime | None = None
    skew: float = TASKCLUSTER_SKEW
    behaviour: str = "normal"
    url: str = ""
    questions: list[dict] = field(factory=list)
    _held: list[Deferred] = field(factory=list)

    app = Klein()

    def listen(self, reactor: IReactorTCP, port: int = 0) -> IListeningPort:
        """Serve on 127.0.0.1 and set C{url}; the listening port (C{stopListening} it)."""
        listening = serve(self.app, reactor, port=port)
        self.url = self.root_url(listening)
        return listening

    @staticmethod
    def root_url(port: IListeningPort) -> str:
        return base_url(port)

    @property
    def waiting(self) -> int:
        """How many questions C{"hang"} holds (their clients still connected)."""
        return len(self._held)

    def release(self) -> None:
        """Let the questions held by C{"hang"} end (with a 500)."""
        for d in list(self._held):
            if not d.called:
                d.callback(None)

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.time()

    @app.route("/api/auth/v1/authenticate-hawk", methods=["POST"])
    async def authenticate_hawk(self, request: IRequest) -> bytes:
        try:
            question = json.loads(request.content.read())
        except ValueError:
            return json_answer(request, {"code": "MalformedPayload", "message": "not JSON"}, 400)
        self.questions.append(question)
        if self.behaviour == "hang":
            d: Deferred = Deferred()
            self._held.append(d)
            def hung_up(_: object) -> None:  # the client hung up
                if not d.called:
                    d.cancel()

            # IRequest omits notifyFinish; the twisted.web.server.Request Klein passes has it
            request.notifyFinish().addErrback(hung_up)  # type: ignore[attr-defined]
            try:
                await d
            except CancelledError:
                return b""
            finally:
                self._held.remove(d)
            return json_answer(request, {"code": "InternalServerError", "message": "released"}, 500)
        if self.behaviour == "error":
            return json_answer(request, {"code": "InternalServerError", "message": "boom"}, 500)
        if self.behaviour == "garbage":
            request.setHeader(b"Content-Type", b"text/html")
            return b"<html>bad gateway</html>"
        if not isinstance(question, dict) or not (
            isinstance(question.get("method"), str) and isinstance(question.get("resource"), str)
            and isinstance(question.get("host"), str) and isinstance(question.get("port"), int)
            and not isinstance(question.get("port"), bool)
            and isinstance(question.get("authorization", ""), str)
            and isinstance(question.get("sourceIp", ""), str)
        ):
            return json_answer(request, {"code": "InputValidationError", "message": "bad question"}, 400)
        return json_answer(request, self.verify(question))

    def verify(self, q: dict) -> dict:
        header = q.get("authorization")
        if not header:
            return {"status": "no-auth", "scheme": "none", "scopes": ["assume:anonymous"], "expires": EXPIRES}
        try:
            attributes = parse_authorization_header(header)
            client_id = attributes["id"]
        except (hawk_exc.HawkFail, ValueError, KeyError):
            return {"status": "auth-failed", "message": "Bad Request: Invalid header syntax"}
        if client_id not in self.clients:
            return {"status": "auth-failed", "message": f"Client ID {client_id} does not exist"}
        token, scopes = self.clients[client_id]
        scopes = list(scopes)
        if attributes.get("ext"):
            try:
                text = attributes["ext"].replace("-", "+").replace("_", "/").rstrip("=")
                ext = json.loads(base64.b64decode(text + "=" * (-len(text) % 4)))
            except ValueError:
                return {"status": "auth-failed", "message": "Failed to parse ext"}
            if isinstance(ext, dict) and ext.get("certificate"):
                return {"status": "auth-failed", "message": "this fake does not support temporary credentials"}
            authorized = ext.get("authorizedScopes") if isinstance(ext, dict) else None
            if authorized is not None:
                if not isinstance(authorized, list) or not all(isinstance(s, str) for s in authorized):
                    return {"status": "auth-failed", "message": "ext.authorizedScopes must be an array"}
                if not all(satisfies(scopes, s) for s in authorized):
                    return {"status": "auth-failed",
                            "message": "Supplied credentials do not satisfy authorizedScopes; credentials have "
                                       "scopes:\n\n```\n" + "\n".join(scopes) + "\n```\n\nauthorizedScopes are:"
                                       "\n\n```\n" + "\n".join(authorized) + "\n```"}
                scopes = authorized
        host = f"[{q['host']}]" if ":" in q["host"] else q["host"]
        url = f"http://{host}:{q['port']}{q['resource']}"
        now = self._now()
        try:
            mohawk.Receiver(
                lambda cid: {"id": cid, "key": token, "algorithm": "sha256"},
                header, url=url, method=q["method"].upper(),
                localtime_offset_in_seconds=now - time.time(),
                timestamp_skew_in_seconds=self.skew,
                seen_nonce=lambda *a: False,  # Taskcluster keeps no nonces
            )
        except hawk_exc.MissingContent:
            # The MAC (over the claimed payload hash) is right; the body is not
            # ours to check.  Check the timestamp, which mohawk had not reached.
            if abs(int(attributes["ts"]) - math.floor(now)) > self.skew:
                return {"status": "auth-failed", "message": "Unauthorized: Stale timestamp"}
        except hawk_exc.MacMismatch:
            return {"status": "auth-failed", "message": "Unauthorized: Bad mac"}
        except hawk_exc.TokenExpired:
            return {"status": "auth-failed", "message": "Unauthorized: Stale timestamp"}
        except (hawk_exc.HawkFail, ValueError, KeyError):
            return {"status": "auth-failed", "message": "Bad Request: Invalid header syntax"}
        answer = {"status": "auth-success", "scheme": "hawk", "clientId": client_id, "scopes": scopes,
                  "expires": EXPIRES}
        if attributes.get("hash"):
            answer["hash"] = attributes["hash"]
        return answer
