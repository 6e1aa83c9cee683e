"""
The twisted.web server roller listens with: bounded requests, JSON errors.

Every request that is too big, malformed or breaks a resource is answered
with C{{"error": code, "message": readable}} (C{Content-Type:
application/json}, C{Cache-Control: no-store}) and never with Twisted's HTML
pages, a bare dropped connection or a traceback.

  - L{LimitedRequest} stops storing a request body as soon as it is known to
    be larger than C{max_body} (declared C{Content-Length} or a chunked body
    growing past it): further data is counted and dropped, nothing is kept
    in memory or in a temporary file.  Such a request is answered C{413
    payload_too_large}; a request-target longer than C{max_uri} gets C{414
    uri_too_long}.  The resource is never called for either.
  - L{RollerHTTPChannel} makes those answers early: C{413}/C{414} go out as
    soon as the headers (or the chunk that crosses the limit) arrive, before
    any C{100 Continue} and without waiting for a body the client may never
    finish.  A request line longer than C{MAX_LENGTH} gets C{414}; a header
    line longer than C{MAX_LENGTH}, more than C{totalHeadersSize} bytes of
    headers or more than C{maxHeaders} header lines get C{431
    headers_too_large}; anything else Twisted refuses to parse gets C{400
    bad_request}.  After such an answer the channel closes "lingering": it
    half-closes (FIN after the response), keeps reading and discarding what
    the client still sends so the response is not destroyed by a TCP reset,
    and aborts the connection after C{lingerTimeout} seconds or
    C{lingerBytes} discarded bytes, whichever comes first.
  - Slow clients are dropped: a request's headers must arrive within
    C{header_timeout} seconds of its first byte (of the connection, for its
    first request), its body within C{body_timeout} seconds of its
    headers; otherwise C{408 request_timeout} (or a plain close when the
    client sent nothing at all).  Between requests a keep-alive connection
    is closed after C{idle_timeout} quiet seconds (Twisted's own
    C{TimeoutMixin} idle timeout, which every byte received restarts and
    which therefore cannot bound a request that trickles in).
  - L{RollerSite} caps the open connections at C{max_connections}.  At the
    cap, a new connection takes the place of the connection that has
    waited longest for a request to finish arriving (idle keep-alive,
    headers or body trickling in, an error answer lingering): that one is
    aborted.  Only when every connection is busy with a request (a
    resource working, a response being written) is the new connection
    refused: accepted and closed at once, nothing read or written.  Either
    way the listener stays healthy and the process never runs out of
    file descriptors because of clients; a prompt client (a load
    balancer's C{/__lbheartbeat__}) gets in even while slow ones hold
    every slot.  L{RollerSite.connection_stats} counts it all for
    C{/metrics}.
  - L{LimitedRequest.processingFailed} (an exception escaping a resource,
    Klein's default for unhandled errors too) answers C{500 internal} with a
    short id that is also in the logged failure.
  - L{RollerSite} puts them together::

        site = RollerSite(app.resource(), max_body=1 << 20, max_uri=8192)
        endpoint.listen(site)

L{json_error} is the one place the error body is built; Klein handlers
C{return json_error(request, 404, "not_found", "no such machine")}.

This needs Twisted internals (private attributes of L{http.HTTPChannel} and
L{server.Request}, a private hook, the signatures of the hooks it
overrides); each is listed, with why, in L{TWISTED_INTERNALS}, which
C{tests/test_twisted_internals.py} checks against the installed Twisted.
"""

from __future__ import annotations

import collections
import io
import json
import resource
import secrets
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IAddress, IDelayedCall, ITCPTransport, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols import basic
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest

from roller.errors import BadRequest

access_log = Logger(namespace="roller.access")


class TwistedInternal(NamedTuple):
    """
    A name of Twisted's that this module relies on beyond its documented
    interfaces: a private attribute it reads, a private hook it overrides,
    or a hook whose signature its override must keep.
    """

    owner: type
    name: str
    #: a method: its parameters (self included) as this module calls or overrides it; None: an attribute
    params: tuple[str, ...] | None
    #: an attribute: where it exists -- "class", "connected" (after connectionMade) or
    #: "request line" (from the request line until the request is handed on)
    exists: str
    why: str


_C, _R, _L = http.HTTPChannel, server.Request, basic.LineReceiver

#: Every use of Twisted's internals in this module, checked against the
#: installed Twisted by tests/test_twisted_internals.py (presence, where it
#: exists, signature, and that Twisted still calls the hooks).  Checked with
#: Twisted 26.10.0.  A new Twisted that fails that test needs this module
#: revisited, not the test relaxed.
TWISTED_INTERNALS: tuple[TwistedInternal, ...] = (
    # -- private names
    TwistedInternal(_C, "_handlingRequest", None, "connected",
                    "a byte arriving while a request is processed is pipelined, not the start of a new "
                    "request's header deadline; a chunked body crossing max_body is refused only while it is read"),
    TwistedInternal(_C, "_receivedHeaderSize", None, "class",
                    "the header bytes of the request being read: 431 JSON before Twisted's own limit drops "
                    "the connection"),
    TwistedInternal(_C, "_receivedHeaderCount", None, "class",
                    "the header lines of the request being read: 431 JSON past maxHeaders"),
    TwistedInternal(_C, "_networkProducer", None, "connected",
                    "lingering after an error answer: unregistered and resumed so the rest of the request is "
                    "read and discarded (the transport, or Twisted's _NoPushProducer)"),
    TwistedInternal(_C, "_command", None, "request line",
                    "the method of a request refused before its body (_rejectEarly)"),
    TwistedInternal(_C, "_path", None, "request line",
                    "the request-target of a request refused before its body, checked against max_uri"),
    TwistedInternal(_C, "_version", None, "request line",
                    "the protocol version of a request refused before its body"),
    TwistedInternal(_C, "_respondToBadRequestAndDisconnect", ("self",), "class",
                    "Twisted calls it for whatever it cannot parse: overridden to answer 400 JSON"),
    TwistedInternal(_R, "_disconnected", None, "class",
                    "a write request deferred to a later reactor turn is not processed if its client left"),
    # -- hooks overridden (their signatures must stay as the overrides have them)
    TwistedInternal(_C, "dataReceived", ("self", "data"), "class", "a request's first byte starts its deadline"),
    TwistedInternal(_C, "lineReceived", ("self", "line"), "class", "431 before Twisted's header-size limit"),
    TwistedInternal(_C, "headerReceived", ("self", "line"), "class", "431 past maxHeaders"),
    TwistedInternal(_C, "allHeadersReceived", ("self",), "class", "413/414 before 100 Continue and the body"),
    TwistedInternal(_C, "allContentReceived", ("self",), "class", "the request is complete: its deadline ends"),
    TwistedInternal(_C, "rawDataReceived", ("self", "data"), "class", "a chunked body crossing max_body: 413"),
    TwistedInternal(_C, "requestDone", ("self", "request"), "class", "back to waiting for the next request"),
    TwistedInternal(_C, "loseConnection", ("self",), "class", "closing lingering after an error answer"),
    TwistedInternal(_C, "connectionLost", ("self", "reason"), "class", "deadlines cancelled, the site's count"),
    TwistedInternal(_C, "getHost", ("self",), "class", "the local address asked of the socket once"),
    TwistedInternal(_L, "lineLengthExceeded", ("self", "line"), "class", "an over-long line: 414 or 431 JSON"),
    TwistedInternal(_R, "gotLength", ("self", "length"), "class", "a declared body over max_body is not stored"),
    TwistedInternal(_R, "handleContentChunk", ("self", "data"), "class", "body bytes past max_body are dropped"),
    TwistedInternal(_R, "process", ("self",), "class", "limits, UTF-8 path and the write admission first"),
    TwistedInternal(_R, "processingFailed", ("self", "reason"), "class", "500 JSON with an id, no traceback"),
    TwistedInternal(server.Site, "buildProtocol", ("self", "addr"), "class", "the connection cap"),
    TwistedInternal(server.Site, "log", ("self", "request"), "class", "the structured access log"),
)


def _abort(transport: ITransport | None) -> None:
    """
    Abort (reset) a connection.  Every transport roller serves on has
    C{abortConnection} (TCP, TLS, UNIX); another one is closed normally.
    """
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    elif transport is not None:
        transport.loseConnection()


def _escape(value: bytes | str) -> str:
    """Printable ASCII only: anything else (and C{"}, C{\\}) as a Python escape."""
    if isinstance(value, str):
        value = value.encode("utf-8", "backslashreplace")
    if value.isascii() and value.isalnum():
        return value.decode("ascii")
    text = repr(value)[2:-1]  # b'...' or b"..."
    return text.replace("\\'", "'").replace('"', '\\"')


def query_arg(request: IRequest, name: str) -> str | None:
    """
    The last value of query parameter C{name}, or None; L{BadRequest}
    C{invalid_query} if it is not UTF-8.
    """
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"query parameter {name} is not valid UTF-8", code="invalid_query") from None


__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_URI",
    "connection_limit",
    "LimitedRequest",
    "RollerHTTPChannel",
    "RollerSite",
    "json_error",
    "json_error_body",
    "query_arg",
    "send_json_error",
]

log = Logger()

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB
DEFAULT_MAX_URI = 8192
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 60.0
#: Longer than the 60 s idle timeout of common load balancers, so a
#: balancer never reuses a connection roller is closing at that moment.
DEFAULT_IDLE_TIMEOUT = 75.0

#: Requests that never wait behind writes (L{RollerSite.admit}).
_READ_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})

#: Reason phrases for the statuses this module writes itself.
_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
}


def _printable(value: object, limit: int = 200) -> str:
    """
    Bytes from the wire as a short str for a log line.
    """
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def connection_limit(
    configured: int,
    reserve: int,
    *,
    ceiling: int = 10_000,
    can_raise: bool = True,
) -> int:
    """
    How many client connections to serve so that clients can never take
    the file descriptors roller needs for itself (C{EMFILE}).

    C{configured} connections (0: C{ceiling}) plus C{reserve} descriptors
    (the database, jobs' SSH/SNMP/IPMI sockets and processes, logs) must fit
    under the soft C{RLIMIT_NOFILE}.  If they do not, the soft limit is
    raised towards the hard one when C{can_raise} (not with C{select()},
    which cannot watch descriptors over 1023); if they still do not, the
    cap is what fits (at least a quarter of the soft limit), with a warning
    when C{configured} asked for more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinity = resource.RLIM_INFINITY
    want = configured or ceiling
    need = want + reserve
    if can_raise and soft != infinity and need > soft:
        target = need if hard == infinity else min(need, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError) as e:
                log.warn("Could not raise the open-files limit from {soft} to {target}: {why}",
                         soft=soft, target=target, why=str(e))
            else:
                log.info("Raised the open-files limit from {soft} to {target} for {want} connections",
                         soft=soft, target=target, want=want)
                soft = target
    if soft == infinity or need <= soft:
        return want
    limit = max(soft - reserve, soft // 4, 1)
    if configured:
        log.warn(
            "server.max_connections = {configured} needs {need} file descriptors but the open-files limit "
            "is {soft} (hard {hard}): serving at most {limit} connections; raise the limit "
            "(LimitNOFILE= in a systemd unit, ulimit -n)",
            configured=configured, need=need, soft=soft, hard="unlimited" if hard == infinity else hard,
            limit=limit)
    else:
        log.info("At most {limit} connections: the open-files limit is {soft}, {reserve} kept for roller itself",
                 limit=limit, soft=soft, reserve=reserve)
    return limit


def json_error_body(code: str, message: str) -> bytes:
    """
    The UTF-8 JSON error body C{{"error": code, "message": message}}.
    """
    return json.dumps({"error": code, "message": message}).encode("utf-8")


def json_error(request: IRequest, status: int, code: str, message: str) -> bytes:
    """
    Prepare C{request} for a JSON error response and return its body.

    Sets the response code, C{Content-Type: application/json},
    C{Cache-Control: no-store}, C{X-Content-Type-Options: nosniff} and
    C{Content-Length}, and returns the body
    bytes I{without writing them}, so a Klein handler can simply
    C{return json_error(request, 409, "conflict", "...")}.  Code that is not
    a Klein handler writes and finishes with L{send_json_error}.

    @param status: the HTTP status, e.g. C{413}.
    @param code: the stable machine-readable code, e.g. C{"payload_too_large"}.
    @param message: a readable sentence for the operator; never a secret.
    @return: the encoded body.
    """
    body = json_error_body(code, message)
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    return body


def send_json_error(request: IRequest, status: int, code: str, message: str) -> None:
    """
    L{json_error}, then write the body and finish C{request}.
    """
    body = json_error(request, status, code, message)
    request.write(body)
    request.finish()


class LimitedRequest(server.Request):
    """
    A L{server.Request} that refuses bodies over C{max_body} bytes and
    request-targets over C{max_uri} bytes without buffering them.

    The limits come from the constructor keywords, else from the same-named
    attributes of the channel's site (L{RollerSite} has them), else from the
    class attributes.

    @ivar too_large: C{True} once the body is known to exceed C{max_body};
        from then on nothing more is stored and C{content} is empty.
    @ivar body_received: body bytes seen so far (stored or not).
    """

    max_body: int = DEFAULT_MAX_BODY
    max_uri: int = DEFAULT_MAX_URI
    too_large: bool = False
    body_received: int = 0

    def __init__(
        self,
        channel: http.HTTPChannel,
        *args: object,
        max_body: int | None = None,
        max_uri: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(channel, *args, **kwargs)
        site = getattr(channel, "site", None)
        if max_body is None:
            max_body = getattr(site, "max_body", None)
        if max_uri is None:
            max_uri = getattr(site, "max_uri", None)
        if max_body is not None:
            self.max_body = max_body
        if max_uri is not None:
            self.max_uri = max_uri

    # -- body ---------------------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        """
        Refuse to allocate storage for a declared body over C{max_body}.
        """
        if length is not None and length > self.max_body:
            self._drop_body()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """
        Store C{data} unless the body is (now) over C{max_body}.
        """
        self.body_received += len(data)
        if self.too_large:
            return
        if self.body_received > self.max_body:
            self._drop_body()
            return
        super().handleContentChunk(data)

    def _drop_body(self) -> None:
        """
        Mark the request too large and release whatever body was stored.
        """
        self.too_large = True
        old, self.content = self.content, io.BytesIO()
        if old is not None:
            try:
                old.close()
            except OSError:
                pass

    # -- limits -------------------------------------------------------------

    def limit_violation(
        self, uri: bytes | None = None
    ) -> tuple[int, str, str] | None:
        """
        The (status, code, message) this request must be refused with, or
        L{None} if it is within limits.

        @param uri: the request-target, when C{self.uri} is not set yet.
        """
        if uri is None:
            uri = self.uri
        if len(uri) > self.max_uri:
            return (
                414,
                "uri_too_long",
                f"request URI is longer than {self.max_uri} bytes",
            )
        if self.too_large:
            return (
                413,
                "payload_too_large",
                f"request body is larger than {self.max_body} bytes",
            )
        return None

    def reject(self, status: int, code: str, message: str) -> None:
        """
        Answer with a JSON error and C{Connection: close} without calling
        any resource, then let the channel close the connection.
        """
        if self.site is None:
            self.site = getattr(self.channel, "site", None)
        if not self.responseHeaders.hasHeader(b"Server"):
            self.setHeader(b"Server", server.version)
        if not self.responseHeaders.hasHeader(b"Date"):
            self.setHeader(b"Date", http.datetimeToString())
        self.setHeader(b"Connection", b"close")
        closeAfterResponse = getattr(self.channel, "closeAfterResponse", None)
        if closeAfterResponse is not None:
            closeAfterResponse()
        else:
            self.channel.persistent = False
        log.info(
            "Refused {method} from {peer}: {status} {code}",
            method=_printable(self.method),
            peer=getattr(self.client, "host", self.client),
            status=status,
            code=code,
        )
        send_json_error(self, status, code, message)

    def process(self) -> None:
        """
        Refuse over-limit requests; hand the others to the resource tree.
        """
        violation = self.limit_violation()
        if violation is not None:
            self.reject(*violation)
            return
        try:
            unquote_to_bytes(self.path).decode("utf-8")
        except UnicodeDecodeError:
            self.reject(400, "bad_request", "the request path is not valid UTF-8")
            return
        admit = getattr(self.site or getattr(self.channel, "site", None), "admit", None)
        if self.method not in _READ_METHODS and admit is not None and not admit(self._process_admitted):
            return  # the site calls _process_admitted in a later reactor turn
        super().process()

    def _process_admitted(self) -> None:
        """A deferred write's turn: process it unless its client is gone."""
        if not self._disconnected:
            super().process()

    # -- failures -----------------------------------------------------------

    def processingFailed(self, reason: Failure) -> Failure:
        """
        An exception escaped the resource: log it with a short id and answer
        C{500} JSON naming that id.  Never a traceback in the response.
        """
        error_id = secrets.token_hex(4)
        log.failure(
            "Unhandled error in {method} {path} (id {error_id})",
            failure=reason,
            method=_printable(self.method),
            path=_printable(self.path),
            error_id=error_id,
        )
        if self.finished or self._disconnected:
            return reason
        if self.startedWriting:
            # The status line is gone; a truncated body must not look whole.
            _abort(self.channel.transport)
            return reason
        # Headers the resource set for the response it never produced.
        for name in (b"Content-Disposition", b"ETag", b"Last-Modified", b"Location"):
            self.responseHeaders.removeHeader(name)
        send_json_error(
            self,
            500,
            "internal",
            f"internal error; see the server log (id {error_id})",
        )
        return reason


class RollerHTTPChannel(http.HTTPChannel):
    """
    An L{http.HTTPChannel} that answers limit violations and unparsable
    requests with JSON errors as early as possible and closes lingering.

    @ivar lingerTimeout: seconds to keep discarding input after an error
        response before aborting the connection.
    @ivar lingerBytes: bytes to discard after an error response before
        aborting the connection.
    """

    lingerTimeout: float = 5.0
    lingerBytes: int = 4 << 20
    #: Seconds for a request's headers, from its first byte (for a new
    #: connection: from the connection); None: no limit.
    headerTimeout: float | None = DEFAULT_HEADER_TIMEOUT
    #: Seconds for a request's body, from the end of its headers.
    bodyTimeout: float | None = DEFAULT_BODY_TIMEOUT

    _draining = False
    _lingering = False
    _lingerCall = None
    discarded = 0

    _readCall = None
    _readPhase = "headers"
    #: Bytes of the request now being read have arrived.
    _readStarted = False
    #: No longer counted by the site (lost, or aborted to make room).
    _countedOut = False
    #: L{isSecure}, worked out once: a connection's transport is TLS or not for its whole life
    _secure: bool | None = None

    def isSecure(self) -> bool:
        # (HTTPChannel adapts the transport to ISSLTransport on every call, and a request asks
        # several times: the Host check, Klein's URL, the Hawk target)
        if self._secure is None:
            self._secure = bool(super().isSecure())
        return self._secure

    _host = None

    def getHost(self) -> object:
        """
        The local address, asked of the socket once: every request reads it
        (twisted.web and Klein both), and a connection's never changes.
        """
        if self._host is None:
            self._host = super().getHost()
        return self._host

    # -- read deadlines and the site's bookkeeping ---------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._siteCall("_channel_waiting")
        # A new connection must send its first request's headers in time.
        self._startReadDeadline("headers")

    def _siteCall(self, name: str) -> None:
        method = getattr(getattr(self, "site", None), name, None)
        if method is not None:
            method(self)

    def _startReadDeadline(self, phase: str) -> None:
        self._cancelReadDeadline()
        self._readPhase = phase
        seconds = self.headerTimeout if phase == "headers" else self.bodyTimeout
        if seconds:
            self._readCall = self.callLater(seconds, self._readTimedOut)

    def _cancelReadDeadline(self) -> None:
        if self._readCall is not None:
            if self._readCall.active():
                self._readCall.cancel()
            self._readCall = None

    def _readTimedOut(self) -> None:
        """
        The request did not arrive in time: 408 if the client sent part of
        one, else just close (an idle new connection gets no answer).
        """
        self._readCall = None
        phase = self._readPhase
        method = getattr(getattr(self, "site", None), "count_dropped", None)
        if method is not None:
            method(f"{phase}_timeout")
        if self.transport is None or self._draining:
            return
        if not self._readStarted:
            self.closeAfterResponse()
            self.loseConnection()
            return
        seconds = self.headerTimeout if phase == "headers" else self.bodyTimeout
        self._respondRaw(
            408,
            "request_timeout",
            f"the request {phase} did not arrive within {seconds:g} seconds",
        )

    def allContentReceived(self) -> None:
        # The request is complete: the resource works on it now.
        self._cancelReadDeadline()
        self._readStarted = False
        self._siteCall("_channel_busy")
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        if self.persistent and not self._draining:
            # Idle until the next request (Twisted's idle timeout runs);
            # a pipelined one already buffered is played back just now.
            self._siteCall("_channel_waiting")
        super().requestDone(request)

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._draining:
            self._discard(data)
            return
        if not (self._readStarted or self._handlingRequest):
            # The first bytes of a request: its headers are due.
            self._readStarted = True
            if self._readCall is None:
                self._startReadDeadline("headers")
            self._siteCall("_channel_waiting")
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if self._draining:
            self._discard(data)
            return
        super().rawDataReceived(data)
        # A chunked body may just have crossed max_body.
        if not (self._draining or self._handlingRequest) and self.requests:
            request = self.requests[-1]
            if getattr(request, "too_large", False) and not request.finished:
                self._rejectEarly(
                    request,
                    (
                        413,
                        "payload_too_large",
                        f"request body is larger than {request.max_body} bytes",
                    ),
                )

    def lineReceived(self, line: bytes) -> None:
        if self._draining:
            self._discard(line)
            return
        # A request exists from the request line until its response is done;
        # in line mode that means: headers are being read.
        if self.requests and (
            self._receivedHeaderSize + len(line) > self.totalHeadersSize
        ):
            self._headersTooLarge()
            return
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self._headersTooLarge()
            return False
        return super().headerReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A line longer than C{MAX_LENGTH}: the request line (414) or a header
        line (431).  Twisted would just drop the connection.
        """
        if self.requests:
            self._headersTooLarge()
        else:
            self._respondRaw(
                414,
                "uri_too_long",
                f"request line is longer than {self.MAX_LENGTH} bytes",
            )

    def allHeadersReceived(self) -> None:
        """
        Refuse an over-long URI or an over-long declared body now, before
        C{100 Continue} and before the body is read.
        """
        request = self.requests[-1]
        self._startReadDeadline("body")
        violation = None
        limit_violation = getattr(request, "limit_violation", None)
        if limit_violation is not None:
            if self.length is not None and self.length > request.max_body:
                request.too_large = True
            violation = limit_violation(self._path)
        if violation is None:
            super().allHeadersReceived()
            return
        # Raw mode, not allContentReceived(), once lineReceived() resumes;
        # what arrives next is drained.
        self.length = None
        self._rejectEarly(request, violation)

    # -- error answers ------------------------------------------------------

    def _rejectEarly(
        self, request: LimitedRequest, violation: tuple[int, str, str]
    ) -> None:
        """
        Answer C{request} before its body has been read.
        """
        request.method = self._command
        request.uri = self._path
        request.clientproto = self._version
        request.path = self._path.split(b"?", 1)[0]
        request.args = {}
        if request.content is None:
            request.content = io.BytesIO()
        request.reject(*violation)

    def _headersTooLarge(self) -> None:
        self._respondRaw(
            431,
            "headers_too_large",
            f"request headers are larger than {self.totalHeadersSize} bytes "
            f"or more than {self.maxHeaders} lines",
        )

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        Twisted's hook for anything it cannot parse: JSON 400, not a bare one.
        """
        self._respondRaw(400, "bad_request", "malformed HTTP request")

    def _respondRaw(self, status: int, code: str, message: str) -> None:
        """
        Write a complete JSON error response straight to the transport (no
        L{Request} is usable yet) and close lingering.
        """
        if self._draining or self.transport is None:
            return
        body = json_error_body(code, message)
        self.transport.writeSequence(
            [
                b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
                b"Date: %s\r\n" % (http.datetimeToString(),),
                b"Content-Type: application/json\r\n",
                b"Cache-Control: no-store\r\n",
                b"X-Content-Type-Options: nosniff\r\n",
                b"Content-Length: %d\r\n" % (len(body),),
                b"Connection: close\r\n\r\n",
                body,
            ]
        )
        peer = self.transport.getPeer()
        log.info(
            "Refused request from {peer}: {status} {code}",
            peer=getattr(peer, "host", peer),
            status=status,
            code=code,
        )
        self.closeAfterResponse()
        self.loseConnection()

    # -- closing ------------------------------------------------------------

    def closeAfterResponse(self) -> None:
        """
        Stop parsing input; close the connection lingering once the current
        response is written.
        """
        self._draining = True
        self.persistent = False
        self._cancelReadDeadline()

    def loseConnection(self) -> None:
        if not self._draining:
            super().loseConnection()
            return
        if self._lingering:
            return
        self._lingering = True
        # Lingering is the first thing to go when the site needs room.
        self._siteCall("_channel_waiting")
        transport = self.transport
        if transport is None:
            return
        self.setTimeout(None)
        # Twisted types _networkProducer IPushProducer; it is the transport (an IConsumer) or its
        # _NoPushProducer, and HTTPChannel.loseConnection unregisters it the same way.
        self._networkProducer.unregisterProducer()  # type: ignore[attr-defined]
        # HTTPChannel may have paused reading; we must read to discard.
        self._networkProducer.resumeProducing()
        if (
            self.lingerTimeout
            and ITCPTransport.providedBy(transport)
            and hasattr(transport, "loseWriteConnection")
        ):
            self._lingerCall = self.callLater(self.lingerTimeout, self._abortLinger)
            transport.loseWriteConnection()
        else:
            transport.loseConnection()

    def _discard(self, data: bytes) -> None:
        self.discarded += len(data)
        if self._lingering and self.discarded > self.lingerBytes:
            self._abortLinger()

    def _abortLinger(self) -> None:
        if self._lingerCall is not None and self._lingerCall.active():
            self._lingerCall.cancel()
        self._lingerCall = None
        _abort(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._lingerCall is not None and self._lingerCall.active():
            self._lingerCall.cancel()
        self._lingerCall = None
        self._cancelReadDeadline()
        self._siteCall("_channel_lost")
        super().connectionLost(reason)


class _Refused(Protocol):
    """
    A connection over L{RollerSite.max_connections} with nothing to make
    room: closed as soon as it is made, nothing read or written.  (A
    protocol rather than C{None} from C{buildProtocol}: a TLS listener wraps
    whatever the site returns.)
    """

    def connectionMade(self) -> None:
        _abort(self.transport)


class RollerSite(server.Site):
    """
    roller's L{server.Site}: L{LimitedRequest}s on L{RollerHTTPChannel}s,
    JSON errors, no tracebacks.

    @param resource: the root resource, e.g. C{app.resource()} of a Klein app.
    @param max_body: largest request body accepted, in bytes.
    @param max_uri: longest request-target accepted, in bytes.
    @param header_timeout: seconds a request's headers may take to arrive
        (L{RollerHTTPChannel.headerTimeout}); None: no limit.
    @param body_timeout: seconds a request's body may take to arrive
        after its headers; None: no limit.
    @param idle_timeout: seconds a connection may stay silent (between
        keep-alive requests, or within one): Twisted's C{timeout}.
    @param max_connections: connections open at once, over all the
        listeners this site serves; 0: no cap (see L{connection_limit}).
    @param kwargs: anything L{server.Site} takes (C{requestFactory},
        C{logPath}, C{logFormatter}, C{reactor}, C{parsePOSTFormSubmission}).
    """

    protocol = RollerHTTPChannel  # type: ignore[assignment]
    requestFactory = LimitedRequest
    displayTracebacks = False
    #: Write requests (not GET, HEAD, OPTIONS) started per reactor turn;
    #: the others wait in order for the next turns (L{admit}).
    writes_per_turn = 32

    def __init__(
        self,
        resource: object,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        max_uri: int = DEFAULT_MAX_URI,
        header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
        body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_connections: int = 0,
        **kwargs: object,
    ) -> None:
        for name, value in (("max_body", max_body), ("max_uri", max_uri), ("max_connections", max_connections)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, not {value!r}")
        for name, seconds in (("header_timeout", header_timeout), ("body_timeout", body_timeout),
                              ("idle_timeout", idle_timeout)):
            if seconds is not None and (not isinstance(seconds, (int, float)) or seconds <= 0):
                raise ValueError(f"{name} must be a positive number or None, not {seconds!r}")
        kwargs.setdefault("timeout", idle_timeout)
        # Forms are read by the routes that take them (roller.web.dashboard._form,
        # roller.web.admin._multipart); Twisted's own parsing would mix a POST's
        # form fields into the query arguments, and a deeply nested multipart
        # body raises RecursionError inside it (a dropped connection).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)
        self.max_body = max_body
        self.max_uri = max_uri
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        #: Channels open now (an evicted one no longer counts).
        self.connections_open = 0
        #: Connections closed at once: over the cap, nothing to evict.
        self.connections_refused = 0
        #: Connections closed by roller before their request arrived, by
        #: reason: C{headers_timeout}, C{body_timeout}, C{evicted}.
        self.connections_dropped: dict[str, int] = {}
        # Channels not working on a request, the longest waiting first
        # (a dict keeps insertion order; re-inserting moves to the end).
        self._waiting: dict[RollerHTTPChannel, None] = {}
        self._writes_started = 0
        self._writes_waiting: collections.deque[Callable[[], None]] = collections.deque()
        self._turn_call: IDelayedCall | None = None

    # -- reads before writes --------------------------------------------------

    def admit(self, process: Callable[[], None]) -> bool:
        """
        May a write request start now?  At most L{writes_per_turn} start in
        one reactor turn; the others wait, in arrival order, and C{process}
        is called in a later turn.  Reads never wait: with a thousand
        clients a turn that parsed and started every pending submission
        would hold up the database answers that GETs wait for.
        """
        if self._turn_call is None:
            self._turn_call = self.reactor.callLater(0, self._next_turn)
        if not self._writes_waiting and self._writes_started < self.writes_per_turn:
            self._writes_started += 1
            return True
        self._writes_waiting.append(process)
        return False

    def _next_turn(self) -> None:
        self._turn_call = None
        self._writes_started = 0
        waiting = self._writes_waiting
        while waiting and self._writes_started < self.writes_per_turn:
            self._writes_started += 1
            process = waiting.popleft()
            try:
                process()
            except Exception:  # noqa: BLE001 -- one request failing must not stop the others waiting this turn
                log.failure("A deferred request failed to start")
        if waiting or self._writes_started:
            self._turn_call = self.reactor.callLater(0, self._next_turn)

    # -- connections --------------------------------------------------------

    def buildProtocol(self, addr: IAddress | None) -> Any:  # RollerHTTPChannel or _Refused
        if self.max_connections and self.connections_open >= self.max_connections:
            if not self._evict():
                self.connections_refused += 1
                return _Refused()
        channel = super().buildProtocol(addr)
        channel.headerTimeout = self.header_timeout
        channel.bodyTimeout = self.body_timeout
        self.connections_open += 1
        return channel

    def _evict(self) -> bool:
        """
        Abort the connection that has waited longest for a request; False
        if every connection is busy with one.
        """
        while self._waiting:
            channel = next(iter(self._waiting))
            del self._waiting[channel]
            if channel._countedOut or channel.transport is None:
                continue
            channel._countedOut = True
            self.connections_open -= 1
            self.count_dropped("evicted")
            _abort(channel.transport)
            return True
        return False

    def count_dropped(self, reason: str) -> None:
        self.connections_dropped[reason] = self.connections_dropped.get(reason, 0) + 1

    def _channel_waiting(self, channel: RollerHTTPChannel) -> None:
        if not channel._countedOut:
            self._waiting.pop(channel, None)
            self._waiting[channel] = None

    def _channel_busy(self, channel: RollerHTTPChannel) -> None:
        self._waiting.pop(channel, None)

    def _channel_lost(self, channel: RollerHTTPChannel) -> None:
        self._waiting.pop(channel, None)
        if not channel._countedOut:
            channel._countedOut = True
            self.connections_open -= 1

    def connection_stats(self) -> dict[str, Any]:
        """
        For C{/metrics}: C{open}, C{max} (0: no cap), C{refused}, and
        C{dropped} by reason.
        """
        return {
            "open": self.connections_open,
            "max": self.max_connections,
            "refused": self.connections_refused,
            "dropped": dict(self.connections_dropped),
        }

    def log(self, request: http.Request) -> None:
        """
        One access event per request, in the C{roller.access} namespace,
        with its fields (client, method, uri, status, bytes, referer,
        agent) as structured data for the JSON log; the text log shows them
        as one line.  Everything taken from the request is escaped: a
        crafted URI or header cannot forge a log line.
        """
        client = getattr(request.getClientAddress(), "host", "-")
        method, uri, protocol = _escape(request.method), _escape(request.uri), _escape(request.clientproto)
        status, sent = request.code, request.sentLength
        referer = _escape(request.getHeader(b"referer") or b"-")
        agent = _escape(request.getHeader(b"user-agent") or b"-")
        # The line is built here: a one-field format is four times cheaper
        # for the text log than formatting eight fields per request.
        access_log.info(
            "{access_line}",
            access_line=f'{client} "{method} {uri} {protocol}" {status} {sent} "{referer}" "{agent}"',
            client=client, method=method, uri=uri, protocol=protocol, status=status, bytes=sent,
            referer=referer, agent=agent,
        )

    def acceptableProtocols(self) -> list[bytes]:
        """
        HTTP/1.1 only: the limits live in L{RollerHTTPChannel}, which an
        ALPN-negotiated HTTP/2 connection would bypass.
        """
        return [b"http/1.1"]
