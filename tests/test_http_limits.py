"""
Tests for L{roller.web.http}: request limits and JSON errors.

Integration tests listen with a real L{RollerSite} on 127.0.0.1, port 0, and
talk to it with treq or a raw TCP client through C{pytest_twisted}; every
wait is bounded by C{addTimeout} so a hang fails instead of sitting forever.
The lingering-close timer is tested on a L{MemoryReactorClock}.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

import pytest
import pytest_twisted
import treq
from klein import Klein
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.web.client import FileBodyProducer, HTTPConnectionPool
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from zope.interface import implementer

from roller.web.http import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_URI,
    LimitedRequest,
    RollerHTTPChannel,
    RollerSite,
    json_error,
)

MAX_BODY = 64 * 1024
TIMEOUT = 10  # seconds; only ever reached if something hangs


# ------------------------------------------------------------ resources


class Echo(Resource):
    """
    Answers C{{"length": N}} with the length of the body it was given.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def render_POST(self, request: Any) -> bytes:
        length = len(request.content.read())
        self.calls.append(length)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"length": length}).encode()

    render_PUT = render_POST
    render_GET = render_POST


class Boom(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        raise RuntimeError("kaboom: password=hunter2")


class RecordingRequest(LimitedRequest):
    """
    Remembers how much body it ever held in C{content}.
    """

    instances: list[RecordingRequest] = []

    max_stored = 0
    stored_now = 0

    def handleContentChunk(self, data: bytes) -> None:
        super().handleContentChunk(data)
        self.stored_now = self.content.tell()
        self.max_stored = max(self.max_stored, self.stored_now)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        type(self).instances.append(self)


# ------------------------------------------------------------ helpers


class TrackingSite(RollerSite):
    """
    A L{RollerSite} that knows when each server-side connection is gone.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        lost: Deferred[None] = Deferred()
        self.lost.append(lost)
        connectionLost = channel.connectionLost

        def tracked(reason: Any) -> None:
            connectionLost(reason)
            lost.callback(None)

        channel.connectionLost = tracked
        return channel


@pytest.fixture
def serve():
    """
    C{serve(resource, **site_kwargs)} -> (site, base_url, port_number).

    At teardown every server-side connection must already be closing because
    the client closed, not because a linger timer fired.
    """
    listening = []

    def start(resource: Any, **kwargs: Any) -> tuple[RollerSite, str, int]:
        kwargs.setdefault("max_body", MAX_BODY)
        site = TrackingSite(resource, **kwargs)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        listening.append((site, port))
        number = port.getHost().port
        return site, f"http://127.0.0.1:{number}", number

    yield start
    for site, port in listening:
        pytest_twisted.blockon(port.stopListening())
        for lost in site.lost:
            lost.addTimeout(1, reactor)
            pytest_twisted.blockon(lost)


@pytest.fixture
def pool():
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield pool
    pytest_twisted.blockon(pool.closeCachedConnections())


@pytest.fixture
def recording():
    RecordingRequest.instances = []
    yield RecordingRequest
    RecordingRequest.instances = []


class RawClient(Protocol):
    """
    Collects everything the server sends; C{closed} fires with it when the
    connection ends.
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(b"".join(self.received))


async def raw_exchange(port: int, *payloads: bytes) -> bytes:
    """
    Connect to 127.0.0.1:port, write C{payloads}, return all bytes received
    until the server closes the connection.
    """
    client = RawClient()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
    await connectProtocol(endpoint, client)
    for payload in payloads:
        client.transport.write(payload)
    closed = client.closed
    closed.addTimeout(TIMEOUT, reactor, onTimeoutCancel=_abort(client))
    return await closed


def _abort(client: RawClient):
    def onTimeout(result: Any, timeout: float) -> Any:
        client.transport.abortConnection()
        raise AssertionError(f"server did not close within {timeout}s")

    return onTimeout


def parse_responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """
    Split raw bytes into (status, headers, body) per response; bodies are
    delimited by Content-Length.
    """
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if status == 100:
            responses.append((status, headers, b""))
            data = rest
            continue
        length = int(headers[b"content-length"])
        assert len(rest) >= length, "truncated body"
        responses.append((status, headers, rest[:length]))
        data = rest[length:]
    return responses


def assert_json_error(
    status: int, headers: dict[bytes, bytes], body: bytes, want: int, code: str
) -> dict:
    assert status == want
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"cache-control"] == b"no-store"
    payload = json.loads(body)
    assert set(payload) == {"error", "message"}
    assert payload["error"] == code
    assert payload["message"]
    return payload


async def treq_json(response: Any) -> tuple[int, dict]:
    return response.code, json.loads(await treq.content(response))


# ------------------------------------------------------------ body limits


@pytest_twisted.ensureDeferred
async def test_body_under_limit_is_echoed(serve, pool):
    echo = Echo()
    _, url, _ = serve(echo)
    for size in (0, 1000, MAX_BODY):
        response = await treq.post(url + "/", data=b"x" * size, pool=pool)
        assert await treq_json(response) == (200, {"length": size})
    assert echo.calls == [0, 1000, MAX_BODY]


@pytest_twisted.ensureDeferred
async def test_chunked_body_under_limit_is_echoed(serve, pool):
    echo = Echo()
    _, url, _ = serve(echo)
    producer = FileBodyProducer(BytesIO(b"y" * 5000))
    producer.length = UNKNOWN_LENGTH  # forces Transfer-Encoding: chunked
    response = await treq.put(url + "/", data=producer, pool=pool)
    assert await treq_json(response) == (200, {"length": 5000})


@pytest_twisted.ensureDeferred
async def test_declared_length_over_limit_answered_before_body(serve, recording):
    """
    Only the headers are sent: the 413 must come anyway (no hang, no 100
    Continue), and the resource is never called.
    """
    echo = Echo()
    _, _, port = serve(echo, requestFactory=recording)
    data = await raw_exchange(
        port,
        b"POST /upload HTTP/1.1\r\nHost: t\r\n"
        b"Expect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % (10 * MAX_BODY,),
    )
    [(status, headers, body)] = parse_responses(data)
    payload = assert_json_error(status, headers, body, 413, "payload_too_large")
    assert payload["message"] == f"request body is larger than {MAX_BODY} bytes"
    assert headers[b"connection"] == b"close"
    assert echo.calls == []


@pytest_twisted.ensureDeferred
async def test_declared_length_over_limit_with_treq(serve, pool):
    echo = Echo()
    _, url, _ = serve(echo)
    response = await treq.post(url + "/", data=b"z" * (MAX_BODY + 1), pool=pool)
    code, payload = await treq_json(response)
    assert code == 413
    assert payload["error"] == "payload_too_large"
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert echo.calls == []


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_limit_raw(serve, recording):
    """
    A chunked body that never ends: refused as soon as it crosses the limit,
    and never held beyond the limit.
    """
    echo = Echo()
    site, _, port = serve(echo, requestFactory=recording)
    chunk = b"a" * 8192
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    data = await raw_exchange(
        port,
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
        *[framed] * (3 * MAX_BODY // len(chunk)),  # no terminating 0 chunk
    )
    [(status, headers, body)] = parse_responses(data)
    assert_json_error(status, headers, body, 413, "payload_too_large")
    assert headers[b"connection"] == b"close"
    assert echo.calls == []
    [request] = recording.instances
    assert request.too_large
    assert request.body_received > MAX_BODY
    assert request.max_stored <= MAX_BODY
    assert request.stored_now == 0  # what was stored was released


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_limit_with_treq(serve, pool, recording):
    echo = Echo()
    _, url, _ = serve(echo, requestFactory=recording)
    producer = FileBodyProducer(BytesIO(b"b" * (4 * MAX_BODY)), readSize=4096)
    producer.length = UNKNOWN_LENGTH
    response = await treq.post(url + "/", data=producer, pool=pool)
    code, payload = await treq_json(response)
    assert code == 413
    assert payload == {
        "error": "payload_too_large",
        "message": f"request body is larger than {MAX_BODY} bytes",
    }
    assert echo.calls == []
    assert all(r.max_stored <= MAX_BODY for r in recording.instances)


# ------------------------------------------------------------ URI / headers


@pytest_twisted.ensureDeferred
async def test_long_uri_is_414(serve, pool):
    echo = Echo()
    _, url, _ = serve(echo)
    response = await treq.get(url + "/" + "u" * 9000, pool=pool)
    code, payload = await treq_json(response)
    assert code == 414
    assert payload == {
        "error": "uri_too_long",
        "message": f"request URI is longer than {DEFAULT_MAX_URI} bytes",
    }
    assert echo.calls == []


@pytest_twisted.ensureDeferred
async def test_non_utf8_path_is_400_json(serve, pool):
    echo = Echo()
    _, url, _ = serve(echo)
    response = await treq.get(url + "/api/v1/machines/%FF/x", pool=pool)
    code, payload = await treq_json(response)
    assert code == 400
    assert payload == {"error": "bad_request", "message": "the request path is not valid UTF-8"}
    assert echo.calls == []


@pytest_twisted.ensureDeferred
async def test_uri_limit_is_configurable(serve, pool):
    echo = Echo()
    _, url, _ = serve(echo, max_uri=100)
    ok = await treq.get(url + "/" + "u" * 90, pool=pool)
    assert ok.code == 200
    await treq.content(ok)
    refused = await treq.get(url + "/" + "u" * 101, pool=pool)
    assert (await treq_json(refused))[0] == 414


@pytest_twisted.ensureDeferred
async def test_request_line_over_line_limit_is_414_then_close(serve):
    echo = Echo()
    _, _, port = serve(echo)
    data = await raw_exchange(
        port, b"GET /" + b"v" * 20000 + b" HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    [(status, headers, body)] = parse_responses(data)
    payload = assert_json_error(status, headers, body, 414, "uri_too_long")
    assert str(RollerHTTPChannel.MAX_LENGTH) in payload["message"]
    assert headers[b"connection"] == b"close"
    assert echo.calls == []


@pytest_twisted.ensureDeferred
async def test_header_line_over_line_limit_is_431(serve):
    _, _, port = serve(Echo())
    data = await raw_exchange(
        port, b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"h" * 17000 + b"\r\n\r\n"
    )
    [(status, headers, body)] = parse_responses(data)
    assert_json_error(status, headers, body, 431, "headers_too_large")


@pytest_twisted.ensureDeferred
async def test_headers_over_total_size_are_431(serve):
    _, _, port = serve(Echo())
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"h" * 1000) for i in range(20))
    data = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: t\r\n" + many + b"\r\n")
    [(status, headers, body)] = parse_responses(data)
    assert_json_error(status, headers, body, 431, "headers_too_large")


@pytest_twisted.ensureDeferred
async def test_malformed_request_is_400_json(serve):
    _, _, port = serve(Echo())
    data = await raw_exchange(port, b"NONSENSE\r\n\r\n")
    [(status, headers, body)] = parse_responses(data)
    assert_json_error(status, headers, body, 400, "bad_request")


@pytest_twisted.ensureDeferred
async def test_keep_alive_still_works(serve):
    echo = Echo()
    _, _, port = serve(echo)
    data = await raw_exchange(
        port,
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    statuses = [(s, json.loads(b)) for s, _, b in parse_responses(data)]
    assert statuses == [(200, {"length": 3}), (200, {"length": 0})]


# ------------------------------------------------------------ failures


@pytest_twisted.ensureDeferred
async def test_exception_in_resource_is_json_500_without_traceback(serve, pool):
    root = Resource()
    root.putChild(b"boom", Boom())
    _, url, _ = serve(root)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        response = await treq.get(url + "/boom", pool=pool)
        raw = await treq.content(response)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert response.code == 500
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    for leak in (b"Traceback", b"kaboom", b"hunter2", b"RuntimeError", b"<html"):
        assert leak not in raw
    payload = json.loads(raw)
    assert payload["error"] == "internal"
    error_id = payload["message"].rsplit("(id ", 1)[1].rstrip(")")
    assert payload["message"] == (
        f"internal error; see the server log (id {error_id})"
    )
    logged = [e for e in events if e.get("error_id") == error_id]
    assert len(logged) == 1
    assert logged[0]["log_failure"].check(RuntimeError)


class KleinApp:
    app = Klein()

    @app.route("/missing")
    async def missing(self, request: Any) -> bytes:
        return json_error(request, 404, "not_found", "no such machine")

    @app.route("/boom")
    async def boom(self, request: Any) -> bytes:
        raise ValueError("secret detail")


@pytest_twisted.ensureDeferred
async def test_klein_handlers(serve, pool):
    _, url, _ = serve(KleinApp().app.resource())
    missing = await treq.get(url + "/missing", pool=pool)
    assert missing.headers.getRawHeaders(b"cache-control") == [b"no-store"]
    assert await treq_json(missing) == (
        404,
        {"error": "not_found", "message": "no such machine"},
    )
    boom = await treq.get(url + "/boom", pool=pool)
    raw = await treq.content(boom)
    assert boom.code == 500
    assert b"secret detail" not in raw and b"Traceback" not in raw
    assert json.loads(raw)["error"] == "internal"


# ------------------------------------------------------------ unit level


@implementer(ITCPTransport)
class TCPStringTransport(StringTransport):
    write_closed = False
    aborted = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def connected_channel(**site_kwargs: Any) -> tuple[Any, TCPStringTransport, Any]:
    clock = MemoryReactorClock()
    site = RollerSite(Echo(), reactor=clock, **site_kwargs)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = TCPStringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock


def test_site_defaults():
    site = RollerSite(Echo())
    assert (site.max_body, site.max_uri) == (DEFAULT_MAX_BODY, 8192)
    assert DEFAULT_MAX_BODY == 1024 * 1024
    assert site.displayTracebacks is False
    assert isinstance(site.buildProtocol(None), RollerHTTPChannel)
    with pytest.raises(ValueError):
        RollerSite(Echo(), max_body=-1)


def test_lingering_close_is_cut_off_by_timer():
    channel, transport, clock = connected_channel(max_body=10)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
    [(status, headers, body)] = parse_responses(transport.value())
    assert_json_error(status, headers, body, 413, "payload_too_large")
    assert transport.write_closed and not transport.aborted
    channel.dataReceived(b"q" * 90)  # the client keeps streaming: discarded
    assert channel.discarded == 90
    clock.advance(RollerHTTPChannel.lingerTimeout)
    assert transport.aborted


def test_lingering_close_is_cut_off_by_bytes():
    channel, transport, clock = connected_channel(max_body=10)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
    assert transport.write_closed and not transport.aborted
    channel.dataReceived(b"q" * (RollerHTTPChannel.lingerBytes + 1))
    assert transport.aborted
    assert not clock.getDelayedCalls()


def test_limits_from_constructor_override_site():
    channel, _, _ = connected_channel(max_body=10, max_uri=20)
    request = LimitedRequest(channel, max_body=5)
    assert (request.max_body, request.max_uri) == (5, 20)
    request.gotLength(None)
    request.handleContentChunk(b"12345")
    assert not request.too_large and request.content.tell() == 5
    request.handleContentChunk(b"6")
    assert request.too_large and request.content.tell() == 0
    request.handleContentChunk(b"more")
    assert request.content.tell() == 0 and request.body_received == 10


# ------------------------------------------------------------ access log


def test_access_event_is_structured_and_escaped():
    """
    One C{roller.access} event per request: the fields for a JSON log and
    one line for a text log, where a crafted URI or header cannot start a
    new line or break out of its quotes.
    """
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        channel, transport, _ = connected_channel()
        channel.dataReceived(
            b'POST /x?a="b"%0A HTTP/1.1\r\nHost: t\r\nUser-Agent: evil" \x01agent\r\n'
            b"Content-Length: 2\r\n\r\nhi"
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    [status] = [s for s, _, _ in parse_responses(transport.value())]
    (event,) = [e for e in events if e.get("log_namespace") == "roller.access"]
    assert (event["method"], event["uri"], event["status"]) == ("POST", '/x?a=\\"b\\"%0A', status)
    client = transport.getPeer().host
    assert event["bytes"] > 0 and event["client"] == client
    assert event["agent"] == 'evil\\" \\x01agent' and event["referer"] == "-"
    line = event["access_line"]
    assert line == f'{client} "POST /x?a=\\"b\\"%0A HTTP/1.1" {status} {event["bytes"]} "-" "evil\\" \\x01agent"'
    assert "\n" not in line and "\x01" not in line


def test_channel_asks_the_socket_for_its_address_once():
    channel, transport, _ = connected_channel()
    asked = []
    real = transport.getHost
    transport.getHost = lambda: asked.append(1) or real()
    for _ in range(3):
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
    assert [s for s, _, _ in parse_responses(transport.value())] == [200, 200, 200]
    assert len(asked) == 1 and channel.getHost() == real()
