"""
In-process ICMP echo (IPv4) on the reactor: one socket for every probe,
no child process per probe.

Linux offers unprivileged ICMP "ping sockets" (C{SOCK_DGRAM},
C{IPPROTO_ICMP}) to the groups in C{net.ipv4.ping_group_range}; the kernel
fills in the identifier and checksum and hands back only this socket's
replies.  A process with C{CAP_NET_RAW} (root, or systemd's
C{AmbientCapabilities=CAP_NET_RAW}) may use a raw socket instead; then
roller writes the identifier and checksum itself and keeps only replies
carrying its identifier.  L{IcmpEcho.open} tries both and answers C{None}
when neither is allowed; the caller then runs the C{ping} binary
(L{roller.drivers.liveness.IcmpPing}).

L{IcmpEcho.check} implements L{roller.drivers.liveness.ILiveness} for IPv4
literals: C{count} echo requests, C{timeout} seconds apart, alive on the
first reply.  Cancelling a check forgets it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from roller.drivers.liveness import ILiveness, LivenessResult

__all__ = ["IcmpEcho", "IcmpReactor", "checksum"]

log = Logger()

ECHO_REQUEST, ECHO_REPLY = 8, 0
_HEADER = struct.Struct("!BBHHH")
_PAYLOAD = b"roller-liveness-" + b"\x00" * 16


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of C{data}."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class _Probe:
    def __init__(self, address: str, count: int, d: Deferred[LivenessResult]):
        self.address = address
        self.left = count
        self.sent = 0
        self.d = d
        self.seq = -1
        self.timer: IDelayedCall | None = None


class IcmpReactor(IReactorTime, IReactorFDSet):
    """What L{IcmpEcho} uses of the reactor: timers and a reader."""


@implementer(ILiveness, IReadDescriptor)
class IcmpEcho:
    """
    @ivar raw: C{True} on a raw socket (identifier and checksum are ours).
    """

    def __init__(self, reactor: IcmpReactor, sock: socket.socket, *, raw: bool, timeout: float = 1.0,
                 count: int = 2):
        self.reactor = reactor
        self._sock = sock
        self.raw = raw
        self.timeout = timeout
        self.count = count
        self._ident = os.getpid() & 0xFFFF
        self._seq = 0
        self._probes: dict[int, _Probe] = {}
        self.sent = 0
        self.received = 0
        reactor.addReader(self)

    @classmethod
    def open(cls, reactor: IcmpReactor, **kw: Any) -> IcmpEcho | None:
        """An in-process prober, or C{None} when the kernel allows neither socket kind."""
        for kind, raw in ((socket.SOCK_DGRAM, False), (socket.SOCK_RAW, True)):
            try:
                sock = socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EPERM, errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT):
                    continue
                raise
            sock.setblocking(False)
            return cls(reactor, sock, raw=raw, **kw)
        return None

    # -- ILiveness

    def check(self, address: str) -> Deferred[LivenessResult]:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"in-process ICMP needs an IP address, not {address[:100]!r}") from None
        if ip.version != 4:
            raise ValueError("in-process ICMP is IPv4 only")
        if len(self._probes) >= 0xFFFF:
            raise ValueError("too many ICMP probes in flight")
        d: Deferred[LivenessResult] = Deferred(lambda _: self._forget(probe))
        probe = _Probe(str(ip), self.count, d)
        self._send(probe)
        return d

    def close(self) -> None:
        self.reactor.removeReader(self)
        for probe in list(self._probes.values()):
            self._forget(probe)
            probe.d.errback(Failure(CancelledError("the ICMP prober closed")))
        self._sock.close()

    # -- probes

    def _next_seq(self) -> int:
        for _ in range(0x10000):
            self._seq = (self._seq + 1) & 0xFFFF
            if self._seq not in self._probes:
                return self._seq
        raise ValueError("no free ICMP sequence number")

    def _send(self, probe: _Probe) -> None:
        if probe.seq >= 0:
            self._probes.pop(probe.seq, None)
        probe.seq = self._next_seq()
        self._probes[probe.seq] = probe
        header = _HEADER.pack(ECHO_REQUEST, 0, 0, self._ident, probe.seq)
        if self.raw:
            header = _HEADER.pack(ECHO_REQUEST, 0, checksum(header + _PAYLOAD), self._ident, probe.seq)
        probe.left -= 1
        probe.sent += 1
        self.sent += 1
        try:
            self._sock.sendto(header + _PAYLOAD, (probe.address, 0))
        except OSError as e:  # no route, network unreachable: a "no" for this attempt
            log.debug("ICMP to {address} not sent: {error}", address=probe.address, error=e)
        probe.timer = self.reactor.callLater(self.timeout, self._timed_out, probe)

    def _timed_out(self, probe: _Probe) -> None:
        probe.timer = None
        if probe.left > 0:
            self._send(probe)
            return
        self._forget(probe)
        probe.d.callback(LivenessResult(False, f"no ICMP echo reply from {probe.address} to {probe.sent} "
                                               f"request(s) ({self.timeout:g} s each)"))

    def _forget(self, probe: _Probe) -> None:
        if self._probes.get(probe.seq) is probe:
            del self._probes[probe.seq]
        if probe.timer is not None and probe.timer.active():
            probe.timer.cancel()
        probe.timer = None

    # -- IReadDescriptor

    def fileno(self) -> int:
        return self._sock.fileno()

    def doRead(self) -> None:
        for _ in range(256):  # a bounded batch per reactor turn
            try:
                data, (source, _) = self._sock.recvfrom(2048)
            except BlockingIOError:
                return
            except OSError as e:
                log.debug("ICMP receive: {error}", error=e)
                return
            self._received(data, source)

    def _received(self, data: bytes, source: str) -> None:
        if self.raw:
            if len(data) < 20:
                return
            data = data[(data[0] & 0x0F) * 4:]
        if len(data) < _HEADER.size:
            return
        kind, _, _, ident, seq = _HEADER.unpack_from(data)
        if kind != ECHO_REPLY or (self.raw and ident != self._ident):
            return
        probe = self._probes.get(seq)
        if probe is None or probe.address != source:
            return
        self.received += 1
        self._forget(probe)
        probe.d.callback(LivenessResult(True, f"ICMP echo reply from {source}"))

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "IcmpEcho"
