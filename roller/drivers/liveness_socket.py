"""
A TCP liveness probe on a plain non-blocking socket: C{connect()}, wait
until the reactor says the socket is writable, read C{SO_ERROR}, close.

L{roller.drivers.liveness.TcpConnect} uses it for IP literals on a real
reactor.  Twisted's TCP client (endpoint, connector, transport, protocol
and factory, a C{callLater(0)} before connecting) costs several times the
CPU of the probe itself, and a reboot wave polls thousands of machines
every second: this is the same check, answered the same way, with only
the socket, one reactor registration and one timer.

The descriptor is registered with C{IReactorFDSet.addWriter}; the reactor
calls C{doWrite} once the connection is made or failed, or
C{connectionLost} if it saw the error first (epoll reports a refused
connect as C{EPOLLERR|EPOLLHUP}).  Either way C{SO_ERROR} says which.
Every way out (answer, timeout, cancellation) removes the descriptor
before closing the socket, so a file descriptor number reused by the
next socket is never confused with this one.
"""

from __future__ import annotations

import errno
import os
import socket

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime, IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["IFdReactor", "Outcome", "probe", "describe_errno"]

#: C{(alive, detail)}: the detail is the one line a L{LivenessResult} carries.
Outcome = tuple[bool, str]

_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY)


class IFdReactor(IReactorFDSet, IReactorTime):
    """File descriptors watched by the reactor, and time."""


def describe_errno(code: int, where: str, timeout: float) -> str:
    """The detail of a failed connect, in the words L{TcpConnect} uses for Twisted's errors."""
    if code == errno.ECONNREFUSED:
        return f"connection refused by {where}"
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"no route to {where}"
    if code == errno.ETIMEDOUT:
        return f"no connection to {where} within {timeout:g} s"
    return f"cannot connect to {where}: {os.strerror(code)}"


@implementer(IWriteDescriptor)
class _Connecting:
    """One connection attempt in flight, registered as a writer."""

    def __init__(self, reactor: IFdReactor, sock: socket.socket, where: str, timeout: float,
                 started: float) -> None:
        self.reactor = reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.where = where
        self.timeout = timeout
        self.started = started
        self.deferred: Deferred[Outcome] = Deferred(self._cancel)
        self.timer: IDelayedCall | None = None
        self.open = True

    # IWriteDescriptor

    def fileno(self) -> int:
        return self.fd if self.open else -1

    def logPrefix(self) -> str:
        return "liveness"

    def doWrite(self) -> None:
        self._answer()

    def connectionLost(self, reason: Failure) -> None:
        # the reactor has removed us already (EPOLLERR/EPOLLHUP without EPOLLIN)
        self._answer()

    # outcomes

    def _answer(self) -> None:
        if not self.open:
            return
        try:
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            code = e.errno or errno.EIO
        elapsed = self.reactor.seconds() - self.started
        self._close()
        if code == 0:
            self.deferred.callback((True, f"connected to {self.where} in {elapsed * 1000:.1f} ms"))
        else:
            self.deferred.callback((False, describe_errno(code, self.where, self.timeout)))

    def timed_out(self) -> None:
        self.timer = None
        if self.open:
            self._close()
            self.deferred.callback((False, f"no connection to {self.where} within {self.timeout:g} s"))

    def _cancel(self, d: Deferred[Outcome]) -> None:
        self._close()  # the Deferred then fails with CancelledError

    def _close(self) -> None:
        if not self.open:
            return
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.reactor.removeWriter(self)
        self.open = False
        self.sock.close()


def probe(reactor: IFdReactor, address: str, port: int, timeout: float) -> Deferred[Outcome]:
    """
    Connect to C{address} (an IP literal, already validated) on C{port};
    fires with L{Outcome} within C{timeout} seconds, never fails (except
    with C{CancelledError} when cancelled, which closes the socket).
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    where = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"
    started = reactor.seconds()
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    except OSError as e:  # out of file descriptors, ...: like a connect error
        return succeed((False, describe_errno(e.errno or errno.EIO, where, timeout)))
    try:
        code = sock.connect_ex((address, port))
    except OSError as e:
        code = e.errno or errno.EIO
    if code not in _IN_PROGRESS:
        sock.close()
        if code == 0:
            return succeed((True, f"connected to {where} in {(reactor.seconds() - started) * 1000:.1f} ms"))
        return succeed((False, describe_errno(code, where, timeout)))
    attempt = _Connecting(reactor, sock, where, timeout, started)
    attempt.timer = reactor.callLater(timeout, attempt.timed_out)
    reactor.addWriter(attempt)
    return attempt.deferred
