"""
In-process ICMP echo: the protocol on a MemoryReactorClock with a scripted
socket (retries, timeouts, matching replies, cancel), then for real
against 127.0.0.1 on a raw socket (root) and on a ping socket (when the
test may open net.ipv4.ping_group_range).
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock

from roller.drivers.liveness import ILiveness
from roller.health.icmp import ECHO_REPLY, IcmpEcho, checksum
from roller.testing.syncdb import result_of


class ScriptedSocket:
    """Records what is sent; answers nothing by itself."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self._real = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        self.sent.append((data, address))

    def recvfrom(self, size: int) -> Any:
        raise BlockingIOError

    def fileno(self) -> int:
        return self._real.fileno()

    def close(self) -> None:
        self._real.close()


def reply(request: bytes, *, raw: bool = False, kind: int = ECHO_REPLY, ident: int | None = None) -> bytes:
    _, _, _, req_ident, seq = struct.unpack("!BBHHH", request[:8])
    body = struct.pack("!BBHHH", kind, 0, 0, req_ident if ident is None else ident, seq) + request[8:]
    return (b"\x45" + b"\x00" * 19 + body) if raw else body


def prober(raw: bool = False, count: int = 2) -> tuple[IcmpEcho, MemoryReactorClock, ScriptedSocket]:
    clock = MemoryReactorClock()
    sock = ScriptedSocket()
    return IcmpEcho(clock, sock, raw=raw, timeout=1.0, count=count), clock, sock  # type: ignore[arg-type]


def test_checksum_is_rfc1071() -> None:
    # the example of RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2, checksum 220d
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    packet = struct.pack("!BBHHH", 8, 0, 0, 1, 2) + b"abc"
    filled = packet[:2] + struct.pack("!H", checksum(packet)) + packet[4:]
    assert checksum(filled) == 0


def test_reply_to_the_second_request_is_alive() -> None:
    echo, clock, sock = prober()
    d = echo.check("192.0.2.7")
    assert len(sock.sent) == 1 and sock.sent[0][1] == ("192.0.2.7", 0)
    clock.advance(1.0)  # no answer: the second request
    assert len(sock.sent) == 2
    # a late reply to the first request matches nothing; a reply from elsewhere neither
    echo._received(reply(sock.sent[0][0]), "192.0.2.7")
    echo._received(reply(sock.sent[1][0]), "192.0.2.8")
    assert not d.called
    echo._received(reply(sock.sent[1][0]), "192.0.2.7")
    result = result_of(d)
    assert result.alive and "192.0.2.7" in result.detail
    assert clock.getDelayedCalls() == [] or not any(c.active() for c in clock.getDelayedCalls())


def test_no_reply_after_count_requests_is_down_and_leaves_nothing_behind() -> None:
    echo, clock, sock = prober(count=3)
    d = echo.check("192.0.2.9")
    for _ in range(3):
        assert not d.called
        clock.advance(1.0)
    result = result_of(d)
    assert not result.alive and "3 request(s)" in result.detail and len(sock.sent) == 3
    assert not any(c.active() for c in clock.getDelayedCalls()) and echo._probes == {}


def test_raw_socket_checks_identifier_and_checksum() -> None:
    echo, clock, sock = prober(raw=True)
    d = echo.check("192.0.2.10")
    packet = sock.sent[0][0]
    assert checksum(packet) == 0  # we filled in the checksum
    echo._received(reply(packet, raw=True, ident=(echo._ident + 1) & 0xFFFF), "192.0.2.10")  # another process's
    echo._received(reply(packet, raw=True, kind=8), "192.0.2.10")  # our own request, seen on loopback
    assert not d.called
    echo._received(reply(packet, raw=True), "192.0.2.10")
    assert result_of(d).alive


def test_cancel_forgets_the_probe_and_its_timer() -> None:
    echo, clock, sock = prober()
    d = echo.check("192.0.2.11")
    d.cancel()
    assert echo._probes == {} and not any(c.active() for c in clock.getDelayedCalls())
    assert isinstance(d.result.value, CancelledError)
    d.addErrback(lambda f: None)


def test_only_ipv4_literals() -> None:
    echo, _, _ = prober()
    for bad in ("example.org", "::1", "-c 1"):
        with pytest.raises(ValueError):
            echo.check(bad)


def test_provides_iliveness() -> None:
    from zope.interface.verify import verifyObject

    echo, _, _ = prober()
    assert verifyObject(ILiveness, echo)


# -- for real, on loopback -----------------------------------------------------------------------------

PING_GROUP_RANGE = Path("/proc/sys/net/ipv4/ping_group_range")


@pytest.fixture
def ping_sockets_allowed() -> Any:
    """Let this process's group open ICMP ping sockets for the test, then restore the range."""
    try:
        before = PING_GROUP_RANGE.read_text()
        PING_GROUP_RANGE.write_text(f"{os.getgid()} {os.getgid()}")
    except OSError as e:
        pytest.skip(f"cannot change net.ipv4.ping_group_range here: {e}")
    yield
    PING_GROUP_RANGE.write_text(before)


async def _alive_and_closed(echo: IcmpEcho) -> None:
    try:
        results = [await echo.check("127.0.0.1") for _ in range(3)]
        assert all(r.alive for r in results), results
        assert echo.received == 3
    finally:
        echo.close()


@pytest_twisted.ensureDeferred
async def test_ping_socket_against_loopback(ping_sockets_allowed: Any) -> None:
    echo = IcmpEcho.open(reactor, timeout=2.0)
    assert echo is not None and not echo.raw
    await _alive_and_closed(echo)


@pytest_twisted.ensureDeferred
async def test_raw_socket_against_loopback() -> None:
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except PermissionError:
        pytest.skip("no CAP_NET_RAW: a raw ICMP socket is not allowed")
    sock.setblocking(False)
    await _alive_and_closed(IcmpEcho(reactor, sock, raw=True, timeout=2.0))
