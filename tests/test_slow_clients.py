"""
Slow clients: read deadlines, the connection cap, and what a load balancer
still gets while slow connections pile up.

  - the channel's deadlines on a L{MemoryReactorClock} (time only moves when
    the test says so);
  - the cap on real loopback sockets against an in-process L{RollerSite};
  - a real C{twistd roller} child: one header line at a time is cut off by
    a short C{server.header_timeout}, and with its open-files limit lowered
    (C{setrlimit} before C{exec}) more slow connections than it can hold do
    not stop C{/__lbheartbeat__} nor an ordinary request, and no C{EMFILE}.

Nothing here asserts how long anything took: waits are bounded only so that
a hang fails.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from roller.testing.process import RollerProcess, wait_for
from roller.testing.transports import TCPStringTransport as SharedTransport
from roller.web.http import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    RollerHTTPChannel,
    RollerSite,
    connection_limit,
)

HANG = 30  # seconds; only reached if something hangs


# ------------------------------------------------------------ helpers


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"hello": "world"}'

    render_POST = render_GET


class Held(Resource):
    """Never answers GET /held until the test fires C{release}; others at once."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []
        self.arrived: list[Deferred] = []

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/held":
            self.held.append(request)
            if self.arrived:
                self.arrived.pop(0).callback(None)
            return NOT_DONE_YET
        return b"ok"

    def release(self) -> None:
        for request in self.held:
            request.write(b"done")
            request.finish()
        self.held = []


class TCPStringTransport(SharedTransport):
    @property
    def closing(self) -> bool:
        return self.write_closed or self.aborted or self.disconnecting


def memory_site(**kwargs: Any) -> tuple[RollerSite, MemoryReactorClock]:
    clock = MemoryReactorClock()
    kwargs.setdefault("resource", Hello())
    return RollerSite(kwargs.pop("resource"), reactor=clock, **kwargs), clock


def connect(site: RollerSite, port: int = 40000) -> tuple[Any, TCPStringTransport]:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
    transport = TCPStringTransport()
    channel.makeConnection(transport)
    return channel, transport


def responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers[b"content-length"])
        out.append((int(lines[0].split(b" ")[1]), headers, rest[:length]))
        data = rest[length:]
    return out


def assert_408(data: bytes) -> dict:
    [(status, headers, body)] = responses(data)
    assert status == 408
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"connection"] == b"close"
    payload = json.loads(body)
    assert payload["error"] == "request_timeout" and payload["message"]
    return payload


GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


# ------------------------------------------------------------ deadlines (task clock)


def test_one_header_line_at_a_time_is_cut_off_at_the_header_deadline():
    """
    Every line restarts Twisted's idle timeout, never the header deadline:
    at 1 line per 2 s a request that is still incomplete at 10 s gets 408.
    """
    site, clock = memory_site(header_timeout=10, idle_timeout=5)
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    for i in range(4):  # 8 s
        clock.advance(2)
        channel.dataReceived(b"X-Slow-%d: 1\r\n" % i)
    assert transport.value() == b"" and not transport.closing
    clock.advance(2)  # 10 s after the first byte
    payload = assert_408(transport.value())
    assert "headers" in payload["message"] and "10" in payload["message"]
    assert transport.closing
    assert site.connection_stats()["dropped"] == {"headers_timeout": 1}


def test_silent_new_connection_is_closed_without_an_answer():
    site, clock = memory_site(header_timeout=3)
    channel, transport = connect(site)
    clock.advance(2.9)
    assert not transport.closing
    clock.advance(0.1)
    assert transport.closing and transport.value() == b""
    assert site.connection_stats()["dropped"] == {"headers_timeout": 1}


def test_slow_body_is_cut_off_at_the_body_deadline():
    site, clock = memory_site(header_timeout=10, body_timeout=20, idle_timeout=5)
    channel, transport = connect(site)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
    for _ in range(9):  # 18 s: no header deadline any more, the body one runs
        clock.advance(2)
        channel.dataReceived(b"x")
    assert transport.value() == b"" and not transport.closing
    clock.advance(2)
    payload = assert_408(transport.value())
    assert "body" in payload["message"]
    assert site.connection_stats()["dropped"] == {"body_timeout": 1}


def test_keep_alive_waits_the_idle_timeout_not_the_header_deadline():
    """
    Between requests only the idle timeout runs; the next request's
    headers get their own full deadline from its first byte.
    """
    site, clock = memory_site(header_timeout=10, idle_timeout=30)
    channel, transport = connect(site)
    channel.dataReceived(GET)
    assert [s for s, _, _ in responses(transport.value())] == [200]
    transport.clear()
    clock.advance(25)  # idle: longer than the header deadline
    assert not transport.closing
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    clock.advance(9)
    assert not transport.closing
    channel.dataReceived(b"Host: t\r\n\r\n")
    assert [s for s, _, _ in responses(transport.value())] == [200]
    clock.advance(29)
    assert not transport.closing
    clock.advance(1)  # 30 s idle
    assert transport.closing and site.connection_stats()["dropped"] == {}


def test_prompt_requests_leave_no_deadline_behind():
    site, clock = memory_site()
    channel, transport = connect(site)
    channel.dataReceived(GET + GET)  # pipelined
    assert [s for s, _, _ in responses(transport.value())] == [200, 200]
    # only Twisted's idle timeout (and the site's log-time tick) remain
    calls = [c for c in clock.getDelayedCalls() if c.active()]
    assert channel._readCall is None
    assert any(c.getTime() == DEFAULT_IDLE_TIMEOUT for c in calls)
    assert not any(c.getTime() == DEFAULT_HEADER_TIMEOUT for c in calls)


def test_site_passes_its_deadlines_to_channels():
    site, _ = memory_site(header_timeout=3, body_timeout=4, idle_timeout=5)
    channel, _ = connect(site)
    assert (channel.headerTimeout, channel.bodyTimeout, channel.timeOut) == (3, 4, 5)
    with pytest.raises(ValueError):
        RollerSite(Hello(), header_timeout=0)
    with pytest.raises(ValueError):
        RollerSite(Hello(), max_connections=-1)


# ------------------------------------------------------------ the cap (in memory)


def test_at_the_cap_the_longest_waiting_connection_makes_room():
    site, clock = memory_site(max_connections=2)
    slow1, t1 = connect(site, 1)
    slow1.dataReceived(b"GET / HTTP/1.1\r\n")
    clock.advance(1)
    slow2, t2 = connect(site, 2)
    slow2.dataReceived(b"GET / HTTP/1.1\r\n")
    clock.advance(1)
    slow1.dataReceived(b"X-Still-Here: 1\r\n")  # trickling does not make it younger
    prompt, t3 = connect(site, 3)
    assert t1.aborted and not t2.closing
    prompt.dataReceived(GET)
    assert [s for s, _, _ in responses(t3.value())] == [200]
    stats = site.connection_stats()
    assert stats == {"open": 2, "max": 2, "refused": 0, "dropped": {"evicted": 1}}
    slow1.connectionLost(None)  # the abort lands: counted once only
    assert site.connection_stats()["open"] == 2


def test_at_the_cap_with_every_connection_busy_the_new_one_is_refused():
    held = Held()
    site, clock = memory_site(resource=held, max_connections=2)
    busy = [connect(site, p) for p in (1, 2)]
    for channel, _ in busy:
        channel.dataReceived(b"GET /held HTTP/1.1\r\nHost: t\r\n\r\n")
    refused = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3))
    assert not isinstance(refused, RollerHTTPChannel)
    transport = TCPStringTransport()
    refused.makeConnection(transport)
    assert transport.aborted and transport.value() == b""
    assert site.connection_stats() == {"open": 2, "max": 2, "refused": 1, "dropped": {}}
    held.release()
    # the two are idle again: a new connection may take one's place
    channel, t = connect(site, 4)
    channel.dataReceived(GET)
    assert [s for s, _, _ in responses(t.value())] == [200]
    assert busy[0][1].aborted and site.connection_stats()["dropped"] == {"evicted": 1}


def test_connection_limit_follows_the_open_files_limit(monkeypatch):
    import resource

    limits = {"now": (1024, 1024)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits["now"])

    def setrlimit(which: int, value: tuple[int, int]) -> None:
        if value[0] > limits["now"][1]:
            raise ValueError("not allowed")
        limits["now"] = value

    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert connection_limit(0, 200) == 824  # cannot raise: what fits
    assert connection_limit(100, 200) == 100
    assert connection_limit(5000, 200) == 824
    assert connection_limit(0, 2000) == 256  # a quarter, not nothing
    limits["now"] = (1024, 524288)  # systemd's default: soft 1024, hard high
    assert connection_limit(0, 200) == 10_000 and limits["now"] == (10_200, 524288)
    assert connection_limit(0, 200, ceiling=1024, can_raise=False) == 1024


# ------------------------------------------------------------ the cap (real sockets)


class Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(self.received)


async def open_client(port: int, payload: bytes = b"") -> Client:
    client = Client()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=HANG), client)
    if payload:
        client.transport.write(payload)
    return client


@pytest_twisted.ensureDeferred
async def test_excess_connection_is_refused_on_a_real_socket():
    held = Held()
    site = RollerSite(held, max_connections=2)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    number = port.getHost().port
    clients = []
    try:
        for _ in range(2):
            arrived: Deferred = Deferred()
            held.arrived.append(arrived)
            clients.append(await open_client(number, b"GET /held HTTP/1.1\r\nHost: t\r\n\r\n"))
            await arrived.addTimeout(HANG, reactor)
        extra = await open_client(number, GET)
        assert await extra.closed.addTimeout(HANG, reactor) == b""
        assert site.connection_stats()["refused"] == 1
        held.release()
        for client in clients:
            client.transport.loseConnection()
        await Deferred.fromCoroutine(_gone(clients))
        again = await open_client(number, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = await again.closed.addTimeout(HANG, reactor)
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok")
    finally:
        for client in clients:
            client.transport.abortConnection()
        await port.stopListening()


async def _gone(clients: list[Client]) -> None:
    for client in clients:
        await client.closed.addTimeout(HANG, reactor)


# ------------------------------------------------------------ a real roller


class LimitedRoller(RollerProcess):
    """A roller whose open-files limit (soft and hard) is C{nofile}."""

    def __init__(self, *args: Any, nofile: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nofile = nofile

    def command(self) -> list[str]:
        return [sys.executable, "-c",
                "import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({self.nofile}, {self.nofile})); "
                "os.execv(sys.argv[1], sys.argv[1:])",
                *super().command()]


def metric_values(roller: RollerProcess) -> dict[tuple[str, tuple], float]:
    r = roller.get("/metrics")
    assert r.status == 200, r
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def slow_socket(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=HANG)
    s.sendall(b"GET /__lbheartbeat__ HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return s


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0)
    try:
        return s.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_twistd_cuts_off_one_header_line_at_a_time(tmp_path):
    env = {"ROLLER_SERVER_HEADER_TIMEOUT": "1", "ROLLER_SERVER_IDLE_TIMEOUT": "60"}
    with RollerProcess(["--auth", "none"], state_dir=tmp_path / "state", env=env) as roller:
        s = socket.create_connection(("127.0.0.1", roller.port), timeout=HANG)
        with s:
            s.sendall(b"GET /__lbheartbeat__ HTTP/1.1\r\n")
            s.settimeout(0.2)
            received = b""
            for i in range(HANG * 5):  # one header line per 0.2 s until roller hangs up
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    try:
                        s.sendall(b"X-Slow-%d: 1\r\n" % i)
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    continue
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
            else:
                pytest.fail("roller kept a slow client's connection open")
        assert_408(received)
        assert roller.get("/__lbheartbeat__").status == 200
        stats = metric_values(roller)
        assert stats[("roller_http_connections_dropped_total", (("reason", "headers_timeout"),))] >= 1


def test_twistd_with_few_file_descriptors_keeps_serving_past_slow_connections(tmp_path):
    """
    256 descriptors: more slow connections than that.  Without a cap roller
    hits EMFILE and stops answering; with it, the slow ones give way.
    """
    env = {"ROLLER_QUEUE_MAX_RUNNING": "10", "ROLLER_SERVER_HEADER_TIMEOUT": "600"}
    roller = LimitedRoller(["--auth", "none"], state_dir=tmp_path / "state", env=env, nofile=256)
    slow: list[socket.socket] = []
    with roller:
        limit = int(metric_values(roller)[("roller_http_connections_max", ())])
        assert 0 < limit <= 256 - 64 - 3 * 10
        try:
            for _ in range(300):
                slow.append(slow_socket(roller.port))
            # what a load balancer and an ordinary client see meanwhile
            assert roller.get("/__lbheartbeat__").status == 200
            r = roller.get("/api/v1/tasks")
            assert r.status == 200 and r.json()
            stats = metric_values(roller)
            assert stats[("roller_http_connections", ())] <= limit
            evicted = stats[("roller_http_connections_dropped_total", (("reason", "evicted"),))]
            assert evicted >= 300 - limit
            wait_for(lambda: sum(closed_by_server(s) for s in slow) >= 300 - limit, HANG,
                     "roller to close the slow connections it evicted")
        finally:
            for s in slow:
                s.close()
        log = roller.log_text()
        assert "EMFILE" not in log and "Too many open files" not in log


# ------------------------------------------------------------ reads before writes


def test_writes_beyond_the_turn_budget_wait_and_reads_do_not():
    """
    At most C{writes_per_turn} POSTs start in one reactor turn, the rest in
    arrival order in the next turns; a GET arriving behind them is answered
    at once; a waiting POST whose client left is never started.
    """
    site, clock = memory_site(resource=Hello())
    site.writes_per_turn = 2
    posts = [connect(site, p) for p in range(1, 6)]
    for channel, _ in posts:
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    reader, rt = connect(site, 9)
    reader.dataReceived(GET)
    answered = lambda: [bool(t.value()) for _, t in posts]  # noqa: E731
    assert answered() == [True, True, False, False, False]
    assert [s for s, _, _ in responses(rt.value())] == [200]
    posts[3][0].connectionLost(None)  # gave up while waiting
    clock.advance(0)
    assert answered() == [True, True, True, False, True]
    clock.advance(0)
    clock.advance(0)
    assert not [c for c in clock.getDelayedCalls() if c.getTime() == clock.seconds()]
