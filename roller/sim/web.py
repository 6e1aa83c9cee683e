"""
What the Klein fakes of roller's HTTP peers share (Taskcluster auth and
notify, Bugzilla, XenAPI, Redfish BMCs): serving an app on loopback, and
JSON answers.

L{serve} returns a listening port whose C{stopListening} also closes the
connections still open to it (keep-alive clients, a client waiting on a
hung route), as a peer that goes away does: a stopped fake leaves no socket
or timer behind on the reactor.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory, IReactorTCP
from twisted.protocols.policies import WrappingFactory
from twisted.web.iweb import IRequest
from twisted.web.server import Site
from zope.interface import implementer

__all__ = ["base_url", "json_answer", "listen_closing", "serve"]


@implementer(IListeningPort)
class _ServedPort:
    """The listening port of L{serve}: stopping it also closes its open connections."""

    def __init__(self, port: IListeningPort, connections: WrappingFactory) -> None:
        self._port = port
        self._connections = connections

    def startListening(self) -> None:
        self._port.startListening()

    def stopListening(self) -> Deferred[None]:
        stopped = self._port.stopListening()
        d: Deferred[None] = stopped if isinstance(stopped, Deferred) else succeed(None)
        for wrapper in list(self._connections.protocols):
            if wrapper.transport is not None:
                wrapper.transport.abortConnection()
        return d

    def getHost(self) -> IAddress:
        return self._port.getHost()


def listen_closing(reactor: IReactorTCP, factory: IProtocolFactory, interface: str = "127.0.0.1",
                   port: int = 0) -> IListeningPort:
    """C{listenTCP}, but stopping the port also closes the connections still open to it."""
    connections = WrappingFactory(factory)  # keeps the open connections, each until it is lost
    connections.noisy = False
    # Twisted's annotation asks for a ServerFactory; listenTCP takes any IProtocolFactory, as WrappingFactory is.
    listening = reactor.listenTCP(port, connections, interface=interface)  # type: ignore[arg-type]
    return _ServedPort(listening, connections)


def serve(app: Klein, reactor: IReactorTCP, interface: str = "127.0.0.1", port: int = 0) -> IListeningPort:
    """Serve C{app} on C{interface}; the listening port (C{stopListening} it: that closes its connections too)."""
    site = Site(app.resource())
    site.noisy = False
    return listen_closing(reactor, site, interface, port)


def base_url(listening: IListeningPort) -> str:
    """C{http://HOST:PORT} of a listening port (IPv6 hosts bracketed)."""
    address: Any = listening.getHost()
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"http://{host}:{address.port}"


def json_answer(request: IRequest, body: Any, status: int = 200, *,
                content_type: bytes = b"application/json; charset=utf-8") -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", content_type)
    return json.dumps(body).encode()
