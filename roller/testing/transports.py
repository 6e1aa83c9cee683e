"""Transports for driving protocols in tests without sockets."""

from __future__ import annotations

from twisted.internet.interfaces import ITCPTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

__all__ = ["TCPStringTransport"]


@implementer(ITCPTransport)
class TCPStringTransport(StringTransport):
    """A C{StringTransport} that is also an C{ITCPTransport}, recording half-closes and aborts."""

    write_closed = False
    aborted = False
    no_delay = False
    keep_alive = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = bool(enabled)

    def getTcpNoDelay(self) -> bool:
        return self.no_delay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keep_alive = bool(enabled)

    def getTcpKeepAlive(self) -> bool:
        return self.keep_alive

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()
