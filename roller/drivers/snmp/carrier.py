"""
A Twisted carrier for pysnmp 7: the engine's transport dispatcher and its
UDP transports (IPv4 and IPv6) on an injected reactor.

pysnmp ships an asyncio carrier (C{pysnmp.carrier.asyncio}); this is the
same contract (C{pysnmp.carrier.base}) over Twisted:

  - L{TwistedDispatcher} subclasses C{AbstractTransportDispatcher}.  A
    C{LoopingCall} on the injected reactor calls C{handle_timer_tick(now)}
    while at least one transport is registered; the engine hangs its
    request-expiry and cache housekeeping on those ticks.
  - L{UdpTransport} / L{Udp6Transport} are C{DatagramProtocol}s that also
    implement C{AbstractTransport}: C{open_client_mode} binds an ephemeral
    port with C{listenUDP}, C{open_server_mode} a given one (for agents),
    C{send_message} writes a datagram, C{close_transport} stops listening.
    Received datagrams go straight to the dispatcher's callback.

No threads, no asyncio loop: everything runs in the reactor thread.  Only
the reactor passed in is used, so unit tests can run the engine on a
C{MemoryReactorClock}.
"""

from __future__ import annotations

import socket
from typing import Any

from pysnmp.carrier import error as carrier_error
from pysnmp.carrier.base import (
    AbstractTransport,
    AbstractTransportAddress,
    AbstractTransportDispatcher,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from roller.drivers.reactor import IUdpReactor

log = Logger()

__all__ = [
    "SNMP_UDP6_DOMAIN",
    "SNMP_UDP_DOMAIN",
    "TwistedDispatcher",
    "Udp6Transport",
    "Udp6TransportAddress",
    "UdpTransport",
    "UdpTransportAddress",
]

#: Transport domains (SNMPv2-TM snmpUDPDomain, TRANSPORT-ADDRESS-MIB
#: transportDomainUdpIpv6), the same tuples pysnmp's own carriers use.
SNMP_UDP_DOMAIN = (1, 3, 6, 1, 6, 1, 1)
SNMP_UDP6_DOMAIN = (1, 3, 6, 1, 2, 1, 100, 1, 2)


class TwistedDispatcher(AbstractTransportDispatcher):
    """
    pysnmp transport dispatcher driven by a Twisted reactor.

    @param reactor: An C{IReactorTime} (and C{IReactorUDP} for the
        transports) provider.
    @param timer_resolution: Seconds between engine timer ticks.  roller's
        client enforces its own per-request deadlines on the reactor, so the
        engine's ticks are only housekeeping and a backstop: the default is
        coarse.
    """

    def __init__(self, reactor: IUdpReactor, timer_resolution: float = 0.5):
        super().__init__()
        self.reactor = reactor
        self.set_timer_resolution(timer_resolution)
        self._transports = 0
        self._loop: LoopingCall | None = None

    def __repr__(self) -> str:
        return f"<TwistedDispatcher transports={self._transports} ticking={self.ticking}>"

    @property
    def ticking(self) -> bool:
        """Whether the timer loop runs."""
        return self._loop is not None and self._loop.running

    def _tick(self) -> None:
        try:
            self.handle_timer_tick(self.reactor.seconds())
        except Exception:  # noqa: BLE001 -- the timer loop must keep running; logged
            log.failure("pysnmp timer tick failed")

    def _start_ticking(self) -> None:
        if self.ticking:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor
        d = self._loop.start(self.get_timer_resolution(), now=False)
        d.addErrback(lambda f: log.failure("pysnmp timer loop stopped", f))

    def _stop_ticking(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    # -- AbstractTransportDispatcher

    def register_transport(self, tDomain: tuple[int, ...], transport: AbstractTransport) -> None:
        super().register_transport(tDomain, transport)
        self._transports += 1
        self._start_ticking()

    def unregister_transport(self, tDomain: tuple[int, ...]) -> None:
        super().unregister_transport(tDomain)
        self._transports -= 1
        if self._transports <= 0:
            self._transports = 0
            self._stop_ticking()

    def run_dispatcher(self, timeout: float = 0.0) -> None:
        """The reactor runs the show; there is no loop to run here."""
        raise carrier_error.CarrierError(
            "TwistedDispatcher does not run a loop of its own: run the Twisted reactor")

    def close_dispatcher(self) -> None:
        """Close every transport and stop the timer."""
        super().close_dispatcher()
        self._transports = 0
        self._stop_ticking()


class UdpTransportAddress(tuple, AbstractTransportAddress):
    """An IPv4 C{(host, port)}."""


class Udp6TransportAddress(tuple, AbstractTransportAddress):
    """An IPv6 C{(host, port, flowinfo, scopeid)}."""


class _DgramTransport(DatagramProtocol, AbstractTransport):
    """
    One UDP socket serving the engine: all targets of one address family
    share it (requests are matched to responses by the engine, by request
    id or message id).
    """

    PROTO_TRANSPORT_DISPATCHER = TwistedDispatcher
    ADDRESS_TYPE: type = UdpTransportAddress
    SOCK_FAMILY = socket.AF_INET
    DEFAULT_INTERFACE = ""
    noisy = False

    def __init__(self, reactor: IUdpReactor):
        self.reactor = reactor
        self._port: Any = None

    def __repr__(self) -> str:
        where = self.local_address() if self._port is not None else "closed"
        return f"<{type(self).__name__} {where}>"

    def local_address(self) -> tuple[str, int]:
        """The bound C{(host, port)}."""
        if self._port is None:
            raise carrier_error.CarrierError(f"{type(self).__name__} is not open")
        address = self._port.getHost()
        return (address.host, address.port)

    # -- AbstractTransport

    def _listen(self, iface: tuple | None, default_port: int | None) -> _DgramTransport:
        if self._port is not None:
            raise carrier_error.CarrierError(f"{self!r} is already open")
        host = self.DEFAULT_INTERFACE
        port = default_port
        if iface is not None:
            host, port = iface[0], iface[1]
        try:
            self._port = self.reactor.listenUDP(port or 0, self, interface=host, maxPacketSize=8192)
        except Exception as e:  # noqa: BLE001 -- pysnmp's engine expects a CarrierError for any failure
            raise carrier_error.CarrierError(
                f"cannot open a UDP socket on {host or '*'}:{port or 0}: {e}") from None
        return self

    def open_client_mode(self, iface: tuple | None = None, allow_broadcast: bool = False
                         ) -> _DgramTransport:
        """Bind an ephemeral port (or C{iface}) to send requests from."""
        return self._listen(iface, 0)

    def open_server_mode(self, iface: tuple | None = None, sock: Any = None) -> _DgramTransport:
        """Bind C{iface} to receive requests (for an agent)."""
        if iface is None:
            raise carrier_error.CarrierError("open_server_mode needs an interface (host, port)")
        return self._listen(iface, None)

    def close_transport(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            port.stopListening()
        AbstractTransport.close_transport(self)

    def normalize_address(self, address: Any) -> tuple:
        """The C{(host, port)} Twisted writes to."""
        return (str(address[0]), int(address[1]))

    def send_message(self, outgoingMessage: Any, transportAddress: Any) -> None:
        if self._port is None:
            raise carrier_error.CarrierError(f"{type(self).__name__} is closed")
        try:
            self._port.write(bytes(outgoingMessage), self.normalize_address(transportAddress))
        except Exception as e:  # noqa: BLE001 -- pysnmp's engine expects a CarrierError for any failure
            # The engine turns a CarrierError into a failed request.
            raise carrier_error.CarrierError(
                f"cannot send to {transportAddress!r}: {type(e).__name__}: {e}") from None

    # -- DatagramProtocol

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        cb = self._callback_function
        if cb is None:
            return
        try:
            cb(self, self.ADDRESS_TYPE(addr), datagram)
        except Exception:  # noqa: BLE001 -- a bad datagram must never hurt the socket; logged
            # A malformed or unexpected datagram must never hurt the socket.
            log.failure("pysnmp could not process a datagram from {addr!r}", addr=addr)


class UdpTransport(_DgramTransport):
    """UDP over IPv4."""

    DOMAIN = SNMP_UDP_DOMAIN


class Udp6Transport(_DgramTransport):
    """UDP over IPv6."""

    DOMAIN = SNMP_UDP6_DOMAIN
    ADDRESS_TYPE = Udp6TransportAddress
    SOCK_FAMILY = socket.AF_INET6
    DEFAULT_INTERFACE = "::"

    def normalize_address(self, address: Any) -> tuple:
        host = str(address[0]).split("%", 1)[0]  # zone ids are not routable here
        return (host, int(address[1]))

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        host, port = addr[0], addr[1]
        super().datagramReceived(datagram, (host, port, 0, 0))
