"""
L{TaskclusterAuthenticator}: Hawk verified by Taskcluster's auth service
(C{auth.mode = "taskcluster"}).

Each request's C{Authorization} header is forwarded, with the method,
resource, host, port and source IP the client used (see
L{roller.auth.hawk.RequestTarget}: the web layer works them out behind
trusted proxies), to the unauthenticated
C{POST {rootUrl}/api/auth/v1/authenticate-hawk}.  Its answer:

  - C{auth-success} -> a L{Principal} (client id, scopes, expiry); when the
    service returns the request's payload C{hash} (Taskcluster does not check
    payloads itself), it must match the body;
  - C{auth-failed} -> L{Unauthorized} quoting the service's message;
  - C{no-auth} -> L{Unauthorized}; a request without C{Authorization} is
    refused at once, without asking the service.

The service being unreachable, slow (C{timeout}: the call is cancelled),
answering non-200, or with anything but the documented JSON is
L{UnavailableError} C{auth_unavailable} (503): it never becomes a 401, and
since the API authenticates before it queues, nothing is queued.
"""

from __future__ import annotations

import hmac

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseFailed
from twisted.web.iweb import IRequest
from zope.interface import implementer

from roller import __version__
from roller.auth import IAuthenticator, Principal
from roller.auth.hawk import (
    NO_CREDENTIALS,
    QUOTE_MAX,
    RequestTarget,
    authorization_header,
    authorized_scopes_of,
    direct_target,
    make_principal,
    payload_hash,
    request_body,
)
from roller.errors import RollerError, Unauthorized, UnavailableError
from roller.http_client import close_pool, pooled_client
from roller.json_input import load_json

__all__ = ["AUTHENTICATE_HAWK_PATH", "TaskclusterAuthenticator"]

log = Logger()

AUTHENTICATE_HAWK_PATH = "/api/auth/v1/authenticate-hawk"
#: An answer longer than this is not Taskcluster's (which is a few KB at most).
MAX_RESPONSE = 1 << 20


class _TooLarge(Exception):
    pass


class IAuthReactor(IReactorTCP, IReactorTime):
    """What L{TaskclusterAuthenticator} needs of a reactor: its HTTP pool's connections and the call's timeout."""


def _valid_root_url(root_url: str) -> str:
    root = root_url.strip().rstrip("/")
    if not root.startswith(("http://", "https://")) or len(root) <= len("https://"):
        raise ValueError(f"root_url must be an http(s) URL, got {root_url[:100]!r}")
    return root


def _timed_out(result: object, timeout: float) -> object:
    if isinstance(result, Failure):
        return Failure(TimeoutError(f"no answer within {timeout:g} s"))
    return result  # it came just in time


@implementer(IAuthenticator)
class TaskclusterAuthenticator:
    """
    @param reactor: for the HTTP client and the timeout.
    @param root_url: the Taskcluster deployment, e.g.
        C{https://firefox-ci-tc.services.mozilla.com}.
    @param treq_client: a L{treq.client.HTTPClient}; by default one with its
        own persistent connection pool on C{reactor} (see L{close}).
    @param timeout: seconds for the whole call, answer included.
    """

    def __init__(
        self,
        reactor: IAuthReactor,
        root_url: str,
        treq_client: HTTPClient | None = None,
        timeout: float = 5.0,
    ):
        self.reactor = reactor
        self.root_url = _valid_root_url(root_url)
        self.url = self.root_url + AUTHENTICATE_HAWK_PATH
        self.timeout = timeout
        self._pool: HTTPConnectionPool | None = None
        if treq_client is None:
            treq_client, self._pool = pooled_client(reactor, max_per_host=10)
        self.http = treq_client

    def close(self) -> Deferred:
        """Close the idle connections of the pool this authenticator made."""
        return close_pool(self._pool)

    # -- IAuthenticator

    def authenticate(self, request: IRequest, target: RequestTarget | None = None) -> Deferred[Principal]:
        try:
            header = authorization_header(request)
            if header is None:
                raise Unauthorized(NO_CREDENTIALS)
            if target is None:
                target = direct_target(request)
        except RollerError as e:
            return fail(e)
        question: dict[str, object] = {
            "method": target.method.lower(),
            "resource": target.resource,
            "host": target.host,
            "port": target.port,
            "authorization": header,
        }
        if target.source_ip is not None:
            question["sourceIp"] = target.source_ip
        d = Deferred.fromCoroutine(self._ask(question))
        # On timeout the call is cancelled (closing its connection); whatever the
        # cancellation became (Agent wraps it in ResponseNeverReceived), it is a timeout.
        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=_timed_out)
        d.addErrback(self._unavailable)
        return d.addCallback(self._principal, request, target)

    async def _ask(self, question: dict[str, object]) -> object:
        headers: dict[bytes | str, list[bytes | str]] = {
            "Accept": ["application/json"], "User-Agent": [f"roller/{__version__}"]}
        response = await self.http.post(self.url, json=question, headers=headers)
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_RESPONSE:
                raise _TooLarge()
            chunks.append(data)

        await treq.collect(response, collect)
        body = b"".join(chunks)
        if response.code != 200:
            raise UnavailableError(
                f"the Taskcluster auth service at {self.root_url} answered HTTP {response.code} "
                f"to authenticate-hawk: {body[:QUOTE_MAX].decode('utf-8', 'replace')!r}",
                code="auth_unavailable")
        try:
            return load_json(body)
        except (ValueError, UnicodeDecodeError):
            raise UnavailableError(
                f"the Taskcluster auth service at {self.root_url} answered authenticate-hawk "
                "with something that is not JSON", code="auth_unavailable") from None

    def _unavailable(self, failure: Failure) -> Failure:
        """Any failure to get an answer is a 503 (never a 401)."""
        error: UnavailableError
        if isinstance(failure.value, UnavailableError):
            error = failure.value
        elif failure.check(TimeoutError):
            error = UnavailableError(
                f"the Taskcluster auth service at {self.root_url} did not answer within "
                f"{self.timeout:g} s: cannot authenticate the request now; retry later",
                code="auth_unavailable")
        elif failure.check(_TooLarge):
            error = UnavailableError(
                f"the Taskcluster auth service at {self.root_url} sent an answer larger than "
                f"{MAX_RESPONSE} bytes", code="auth_unavailable")
        elif failure.check(CancelledError):
            return failure  # our caller went away; nobody reads this
        else:
            why = failure.value
            if isinstance(why, ResponseFailed) and why.reasons:
                why = why.reasons[0].value
            kind = "cannot reach" if isinstance(why, (ConnectError, DNSLookupError)) else "lost the connection to"
            error = UnavailableError(
                f"roller {kind} the Taskcluster auth service at {self.root_url} "
                f"({type(why).__name__}: {str(why)[:QUOTE_MAX]}): cannot authenticate the request now; "
                "retry later", code="auth_unavailable")
        log.warn("Taskcluster authentication unavailable: {why}", why=error.message)
        return Failure(error)

    def _principal(self, answer: object, request: IRequest, target: RequestTarget) -> Principal:
        def malformed(what: str) -> UnavailableError:
            log.warn("Taskcluster auth service answered {what}", what=what)
            return UnavailableError(
                f"the Taskcluster auth service at {self.root_url} answered authenticate-hawk "
                f"with {what}", code="auth_unavailable")

        if not isinstance(answer, dict):
            raise malformed("JSON that is not an object")
        status = answer.get("status")
        if status == "auth-failed":
            message = answer.get("message")
            message = message if isinstance(message, str) and message else "no reason given"
            log.info("Taskcluster refused credentials from {ip}: {message}", ip=target.source_ip,
                     message=message[:QUOTE_MAX])
            raise Unauthorized(f"Taskcluster refused the credentials: {message[:1000]}")
        if status == "no-auth":
            raise Unauthorized(NO_CREDENTIALS)
        if status != "auth-success":
            raise malformed(f"an unknown status {str(status)[:40]!r}")
        client_id, scopes, expires = answer.get("clientId"), answer.get("scopes"), answer.get("expires")
        if not isinstance(client_id, str) or not client_id:
            raise malformed("auth-success without a clientId")
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise malformed("auth-success without a list of scopes")
        if expires is not None and not isinstance(expires, str):
            expires = None
        their_hash = answer.get("hash")
        if isinstance(their_hash, str) and their_hash:
            body, content_type = request_body(request)
            if not hmac.compare_digest(their_hash.encode("ascii", "replace"),
                                       payload_hash(body, content_type).encode("ascii")):
                raise Unauthorized("the Hawk payload hash does not match the request body")
        return make_principal(client_id, scopes, expires,
                              authorized_scopes=authorized_scopes_of(authorization_header(request) or ""))
