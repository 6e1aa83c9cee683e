"""
HTTP for roller's peers, over treq.

  - L{pooled_client}: a treq client on a persistent pool of its own, for
    Taskcluster, Bugzilla, notify and webhooks; its owner closes the pool
    (L{close_pool}) when it stops.  A request is never repeated by the pool
    on its own: these are POSTs whose failure is reported, not retried
    blindly.
  - L{HttpConversation}: the requests of one driver operation to one peer
    (a Redfish BMC, a XenAPI pool) over one persistent connection, each
    bounded by a timeout on the injected clock, redirects followed on the
    same origin only, bodies read up to a limit; a request that gets no
    answer raises the driver's own error, chosen by L{transport_error}.
  - L{tls_policy}: the HTTPS policy of such a peer (system trust store, a
    CA file of its own, or an explicit C{verify_tls = false}).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

from attrs import frozen
from OpenSSL import SSL, crypto
from treq.client import HTTPClient
from twisted.internet import error, ssl
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IPushProducer, IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from roller.json_input import load_json

__all__ = [
    "HttpConversation",
    "HttpReply",
    "MAX_BODY",
    "close_pool",
    "endpoint",
    "pooled_client",
    "tls_policy",
    "transport_error",
]

#: Largest response body an L{HttpConversation} reads by default (bytes).
MAX_BODY = 4 * 1024 * 1024

#: Same-origin redirects followed per GET.
MAX_REDIRECTS = 5


def endpoint(url: str | None) -> tuple[str | None, int | None]:
    """The host and port of a URL (C{None}s when it has none), e.g. for a driver error."""
    if not url:
        return None, None
    try:
        parts = urlsplit(url)
        return parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None, None


def pooled_client(reactor: IReactorTCP, *, connect_timeout: float | None = None,
                  max_per_host: int = 2) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client on a new persistent pool of its own; both."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.retryAutomatically = False
    agent = Agent(reactor, pool=pool, connectTimeout=connect_timeout)
    return HTTPClient(agent), pool


def close_pool(pool: HTTPConnectionPool | None) -> Deferred[None]:
    """Close a pool's idle connections (nothing to do for a client given from outside)."""
    return succeed(None) if pool is None else pool.closeCachedConnections()


@implementer(IPolicyForHTTPS)
class _NoVerification:
    """TLS without any certificate check: only for an explicit C{verify_tls = false}."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.CertificateOptions(verify=False)


_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def tls_policy(ca_file: str | None, verify_tls: bool, what: str = "", *,
               error: Callable[[str], Exception] = ValueError) -> IPolicyForHTTPS:
    """
    The HTTPS policy for a peer: the system trust store, the CAs of
    C{ca_file} alone, or (C{verify_tls} false) none.

    @param error: Builds the exception raised (the driver's configuration
        error) from its one-line message.
    @raise Exception: C{error(message)}: the CA file cannot be read or
        holds no certificate.
    """
    if not verify_tls:
        return _NoVerification()
    if not ca_file:
        return BrowserLikePolicyForHTTPS()
    label = f"{what}: " if what else ""
    try:
        with open(ca_file, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise error(f"{label}cannot read CA file {ca_file}: {e.strerror or e}") from None
    try:
        certs = [ssl.Certificate.loadPEM(block) for block in _PEM_RE.findall(pem)]
    except (crypto.Error, ValueError) as e:
        raise error(f"{label}CA file {ca_file} holds a certificate that cannot be loaded: {e}") from None
    if not certs:
        raise error(f"{label}CA file {ca_file} holds no PEM certificate")
    return BrowserLikePolicyForHTTPS(trustRoot=ssl.trustRootFromCertificates(certs))


def _reasons(failure: Failure) -> list[Failure]:
    """The failure and those wrapped in ResponseFailed & co, flattened."""
    out = [failure]
    for inner in getattr(failure.value, "reasons", None) or ():
        if isinstance(inner, Failure):
            out.extend(_reasons(inner))
    return out


def transport_error(failure: Failure, *, where: str, request: str, timeout: float,
                    make: Callable[..., Exception], timeout_error: Callable[..., Exception],
                    url: str, tls_hint: str = "") -> Exception:
    """
    A readable error for a request that got no HTTP answer.

    @param where: The peer, e.g. C{"Redfish https://bmc:443"}.
    @param request: What was asked, e.g. C{"GET /redfish/v1/"}.
    @param make: Builds the connection error: C{make(message, reason=...,
        url=...)}.
    @param timeout_error: Builds the timeout error: C{timeout_error(message,
        url=...)}.
    @param tls_hint: What to do about a certificate that is not trusted.
    """
    if failure.check(DeferredTimeout):
        return timeout_error(f"{where} did not answer {request} within {timeout:g} s", url=url)
    for f in _reasons(failure):
        if f.check(error.ConnectionRefusedError):
            return make(f"cannot connect to {where}: connection refused", reason="refused", url=url)
        if f.check(error.DNSLookupError):
            return make(f"cannot connect to {where}: host name does not resolve", reason="dns", url=url)
        if f.check(error.NoRouteError):
            return make(f"cannot connect to {where}: no route to host", reason="unreachable", url=url)
        if f.check(error.TimeoutError, error.TCPTimedOutError):
            return make(f"cannot connect to {where}: no connection within {timeout:g} s",
                        reason="connect", url=url)
        if f.check(SSL.Error):
            detail = _ssl_detail(f.value)
            hint = f" ({tls_hint})" if tls_hint else ""
            return make(f"TLS with {where} failed: {detail}{hint}", reason="tls", url=url)
        if f.check(error.ConnectError):
            return make(f"cannot connect to {where}: {f.getErrorMessage()}", reason="connect", url=url)
    for f in _reasons(failure):
        if f.check(error.ConnectionLost, error.ConnectionDone, ResponseDone, PotentialDataLoss):
            return make(f"{where} closed the connection during {request} without an answer",
                        reason="closed", url=url)
    return make(f"{where}: {request} failed: {failure.getErrorMessage()[:300]}", reason="closed", url=url)


def _ssl_detail(value: Any) -> str:
    try:
        parts = [p[2] for p in value.args[0] if isinstance(p, tuple) and len(p) >= 3]
    except (IndexError, TypeError):
        parts = []
    return "; ".join(parts) or str(value)[:200] or "handshake failed"


class _BodyTooLarge(Exception):
    pass


class _BodyReader(Protocol):
    """Collects a response body up to a limit; cancelling its Deferred hangs up."""

    def __init__(self, limit: int):
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.deferred: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[bytes]) -> None:
        self._hang_up()

    def _hang_up(self) -> None:
        # A response body's transport is the connection's producer proxy.
        producer = IPushProducer(self.transport, None)
        if producer is not None:
            producer.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.deferred.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.deferred.errback(_BodyTooLarge(f"answer larger than {self.limit} bytes"))
            self._hang_up()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.deferred.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.deferred.callback(b"".join(self.chunks))
        else:
            self.deferred.errback(reason)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return (parts.scheme, (parts.hostname or "").lower(), port)


@frozen
class HttpReply:
    """An HTTP answer: status, headers (lower-case names, first value) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return load_json(self.body, max_depth=64) if self.body.strip() else {}


class HttpConversation:
    """
    Requests to one peer for one operation over one persistent connection
    (a pool of one per host, closed by L{close}), each bounded by
    C{timeout} seconds on C{clock}.

    @ivar sent: C{"METHOD PATH"} of every request sent, in order.
    """

    def __init__(self, reactor: IReactorTCP, clock: IReactorTime, base_url: str, policy: IPolicyForHTTPS, *,
                 timeout: float, where: str, make_error: Callable[..., Exception],
                 timeout_error: Callable[..., Exception], limit: int = MAX_BODY, tls_hint: str = ""):
        self.clock = clock
        self.base_url = base_url
        self.timeout = timeout
        self.where = where
        self.limit = limit
        self._make_error = make_error
        self._timeout_error = timeout_error
        self.tls_hint = tls_hint
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 1
        self.pool.retryAutomatically = True
        agent = Agent(reactor, contextFactory=policy, connectTimeout=timeout, pool=self.pool)
        self.client = HTTPClient(agent)
        self.sent: list[str] = []

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        if not path.startswith("/"):
            path = "/" + path
        return self.base_url + path

    async def request(self, method: str, path: str, *, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None, timeout: float | None = None,
                      label: str | None = None) -> HttpReply:
        """
        Send one request; its L{HttpReply} whatever the status.  No answer
        raises the error L{transport_error} picks; cancelling hangs up.
        """
        timeout = self.timeout if timeout is None else timeout
        label = label or f"{method} {path}"
        self.sent.append(f"{method} {path}")

        async def exchange() -> HttpReply:
            url = self.url(path)
            sending: dict[bytes | str, bytes | str] = {k: v for k, v in (headers or {}).items()}
            for _ in range(MAX_REDIRECTS + 1):
                response = await self.client.request(method, url, data=body, headers=sending,
                                                     unbuffered=True, allow_redirects=False)
                reader = _BodyReader(self.limit)
                response.deliverBody(reader)
                payload = await reader.deferred
                hdrs = {k.decode("latin-1").lower(): v[0].decode("latin-1")
                        for k, v in response.headers.getAllRawHeaders() if v}
                reply = HttpReply(response.code, hdrs, payload)
                # Follow redirects of reads on the same origin only: the
                # credentials (basic auth, X-Auth-Token) go with them.
                target = urljoin(url, hdrs.get("location", ""))
                if (reply.status not in (301, 302, 303, 307, 308) or method not in ("GET", "HEAD")
                        or not hdrs.get("location") or _origin(target) != _origin(self.base_url)):
                    return reply
                url = target
            return reply

        def timed_out(result: Any, seconds: float) -> Failure:
            # Agent wraps the cancellation (ResponseNeverReceived), which
            # addTimeout's default would not recognise.
            if isinstance(result, Failure) and not any(f.check(CancelledError) for f in _reasons(result)):
                return result
            return Failure(DeferredTimeout(f"{label} timed out after {seconds:g} s"))

        d = Deferred.fromCoroutine(exchange())
        d.addTimeout(timeout, self.clock, onTimeoutCancel=timed_out)
        try:
            return await d
        except CancelledError:
            raise
        except _BodyTooLarge as e:
            raise self._make_error(f"{self.where}: {label}: {e}", reason="closed",
                                   url=self.base_url) from None
        except Exception:  # noqa: BLE001 -- whatever ended the exchange becomes the driver's one error
            failure = Failure()
            if any(f.check(CancelledError) for f in _reasons(failure)):
                raise CancelledError() from None  # the caller cancelled
            raise transport_error(failure, where=self.where, request=label, timeout=timeout,
                                  make=self._make_error, timeout_error=self._timeout_error,
                                  url=self.base_url, tls_hint=self.tls_hint) from None

    def close(self) -> None:
        """Close the cached connection (not waited for)."""
        self.pool.closeCachedConnections().addErrback(lambda f: None)
