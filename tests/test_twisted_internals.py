"""
The Twisted internals roller/web/http.py relies on (its TWISTED_INTERNALS
registry) are still there, where and as it expects them, and Twisted still
calls the private hooks it overrides.  A failure here means a Twisted upgrade
changed them: revisit roller/web/http.py (and the registry), do not relax this.
"""

from __future__ import annotations

import inspect

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import http, server
from twisted.web.resource import Resource

from roller.web.http import TWISTED_INTERNALS, RollerHTTPChannel, RollerSite, TwistedInternal


def _channel() -> http.HTTPChannel:
    """A plain Twisted HTTPChannel, connected, with a request that never finishes."""

    class Held(http.Request):
        def process(self) -> None:
            pass  # processed: never answered, so the channel stays busy with it

    channel = http.HTTPChannel()
    channel.requestFactory = Held  # type: ignore[assignment]
    channel.callLater = Clock().callLater  # its timeouts on a clock, not the reactor
    channel.makeConnection(StringTransport())
    return channel


def _where(entry: TwistedInternal) -> object:
    """An object on which C{entry}'s attribute must exist."""
    if entry.exists == "class":
        return entry.owner
    channel = _channel()
    if entry.exists == "request line":
        channel.dataReceived(b"GET /x HTTP/1.1\r\n")
    else:
        assert entry.exists == "connected", entry
    assert isinstance(channel, entry.owner)
    return channel


@pytest.mark.parametrize("entry", TWISTED_INTERNALS, ids=lambda e: f"{e.owner.__name__}.{e.name}")
def test_internal_is_where_http_py_expects_it(entry: TwistedInternal) -> None:
    assert entry.why and entry.exists in ("class", "connected", "request line")
    target = _where(entry)
    assert hasattr(target, entry.name), f"Twisted has no {entry.owner.__name__}.{entry.name} ({entry.why})"
    if entry.params is not None:
        method = getattr(entry.owner, entry.name)
        assert callable(method), entry
        params = tuple(inspect.signature(method).parameters)
        assert params == entry.params, (
            f"{entry.owner.__name__}.{entry.name}{params} is not {entry.params}: roller/web/http.py overrides "
            f"or calls it that way ({entry.why})")


def test_registry_lists_every_private_twisted_name_http_py_uses() -> None:
    """Every `self._x` of RollerHTTPChannel and LimitedRequest that Twisted defines is in the registry."""
    import re

    import roller.web.http as module

    source = inspect.getsource(module)
    listed = {e.name for e in TWISTED_INTERNALS}
    ours = set(vars(module.RollerHTTPChannel)) | set(vars(module.LimitedRequest))
    used = {f"_{n}" for n in re.findall(r"\bself\._([A-Za-z]\w*)", source)} - ours
    reading = _channel()
    reading.dataReceived(b"GET /x HTTP/1.1\r\n")  # the names that exist while a request line is held too
    twisted = {n for n in used if any(hasattr(o, n) for o in (http.HTTPChannel, server.Request, reading))}
    assert {"_command", "_handlingRequest", "_networkProducer"} <= twisted  # the check sees them
    assert twisted <= listed, f"private Twisted names used but not in TWISTED_INTERNALS: {sorted(twisted - listed)}"


def test_twisted_reads_the_internals_as_http_py_assumes() -> None:
    channel = _channel()
    # the network producer can be unregistered and resumed (what lingering does)
    producer = channel._networkProducer
    assert callable(producer.unregisterProducer) and callable(producer.resumeProducing)
    assert channel._handlingRequest is False
    channel.dataReceived(b"GET /x HTTP/1.1\r\n")
    assert (channel._command, channel._path, channel._version) == (b"GET", b"/x", b"HTTP/1.1")
    size = channel._receivedHeaderSize
    channel.dataReceived(b"Host: a\r\nX-A: b\r\nX-B: c\r\n")
    # counted as each header is handed on; the last line waits for a possible continuation
    assert channel._receivedHeaderSize > size and channel._receivedHeaderCount == 2
    channel.dataReceived(b"\r\n")
    assert channel._handlingRequest is True  # until the request is answered
    request = channel.requests[-1]
    assert request._disconnected is False
    channel.connectionLost(Exception("gone"))  # type: ignore[arg-type]
    assert request._disconnected is True


def test_twisted_calls_the_bad_request_hook() -> None:
    called = []

    class Recording(http.HTTPChannel):
        def _respondToBadRequestAndDisconnect(self) -> None:
            called.append(True)
            super()._respondToBadRequestAndDisconnect()

    channel = Recording()
    channel.callLater = Clock().callLater
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"NOT A REQUEST LINE AT ALL\r\n\r\n")
    assert called, "Twisted no longer calls _respondToBadRequestAndDisconnect for a malformed request"


def test_roller_channel_answers_through_the_hook() -> None:
    site = RollerSite(Resource(), reactor=Clock())
    channel = site.buildProtocol(None)
    assert isinstance(channel, RollerHTTPChannel)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"NOT A REQUEST LINE AT ALL\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b'"error": "bad_request"' in transport.value()
    assert isinstance(site, server.Site)
