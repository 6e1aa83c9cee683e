"""
How many SSH handshakes run at once: as many as the reactor keeps up with.

A handshake (TCP connect, key exchange, host key check, authentication,
starting the command) costs the reactor about a millisecond of CPU spread
over a dozen packets.  Against a fleet on a fast network the handshakes are
CPU-bound: a hundred at once only make every reactor turn longer, and
everything else waits behind them -- API requests, job submissions, the
liveness polls of jobs already running.  Measured with bench/fanout.py,
4000 reboots (ssh.max_sessions fixed): 100 at once, submissions 418/s,
GET p99 135 ms, all verified after 26.2 s; 16 at once, 826/s, 46 ms,
22.4 s.  On a slow network the same handshakes mostly wait for round
trips, and a small fixed limit would make them queue for nothing.

So L{HandshakePacer} adapts between C{minimum} and C{maximum}: when a run
has to wait for a handshake slot, it measures how late a zero-delay call
runs (the reactor's lag), then allows one more handshake if the lag was
under C{low}, a quarter fewer if it was over C{high}; and again every
C{again} seconds while runs wait (one measurement at a time), so slots
held by hosts that never answer (no CPU) are soon made up for.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["HandshakePacer"]


class HandshakePacer:
    """
    Slots for SSH handshakes in progress; see the module docstring.

    @ivar limit: Slots now.
    @ivar running: Slots taken.
    """

    def __init__(self, clock: IReactorTime, maximum: int, *, start: int = 16, minimum: int = 4,
                 low: float = 0.003, high: float = 0.010, again: float = 0.050) -> None:
        self.clock = clock
        self.maximum = max(1, maximum)
        self.minimum = max(1, min(minimum, self.maximum))
        self.limit = max(self.minimum, min(start, self.maximum))
        self.low, self.high, self.again = low, high, again
        self.running = 0
        self._waiting: deque[Deferred[None]] = deque()
        self._probe: IDelayedCall | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def acquire(self) -> Deferred[None]:
        """Fires once a slot is taken; cancelling it while it waits takes none."""
        if self.running < self.limit and not self._waiting:
            self.running += 1
            return succeed(None)
        d: Deferred[None] = Deferred(self._waiting.remove)
        self._waiting.append(d)
        self._measure()
        return d

    def release(self) -> None:
        """Give back a slot taken with L{acquire}."""
        self.running -= 1
        self._admit()
        if self._waiting:
            self._measure()

    def _admit(self) -> None:
        while self._waiting and self.running < self.limit:
            d = self._waiting.popleft()
            self.running += 1
            d.callback(None)

    def _measure(self) -> None:
        if self._probe is None:
            self._probe = self.clock.callLater(0, self._measured, self.clock.seconds())

    def _measured(self, asked: float) -> None:
        self._probe = None
        lag = self.clock.seconds() - asked
        if lag > self.high:
            self.limit = max(self.minimum, self.limit - max(1, self.limit // 4))
        elif lag < self.low:
            self.limit = min(self.maximum, self.limit + 1)
        self._admit()
        if self._waiting:
            # again soon even if no handshake ends meanwhile: slots held by hosts that
            # never answer cost no CPU, and must not keep the others waiting
            self._probe = self.clock.callLater(self.again, self._measure_again)

    def _measure_again(self) -> None:
        self._probe = None
        if self._waiting:
            self._measure()
