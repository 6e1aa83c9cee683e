"""
The liveness sweep: every machine probed once per C{interval} seconds,
spread evenly over the interval (machine i of N starts at i * interval / N
into the round: no thundering herd), at most C{concurrency} probes in
flight.  A round starts every C{interval} seconds of the injected clock
whatever the previous one did; a machine whose previous probe is still in
flight is skipped for that round (never probed twice at once), and a probe
still waiting for a free slot when the next round starts is dropped (counted
as C{late}), so a slow round never piles up work.  Probes still in flight
when the next round starts run on: their answers are reported and counted in
the round that started them, never as late or failed.

The sweep only probes and reports (C{report(machine, result, error)}); what
a failed probe means is the health tracker's business.  With several
rollers, C{machines()} is this roller's share, and C{skip} drops a machine
that moved to another roller since the round began (counted as C{moved}).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from roller.drivers.liveness import LivenessResult
from roller.inventory import Machine

__all__ = ["LivenessSweep", "RoundStats"]

log = Logger()

#: Probes are started by ticks at least this far apart (seconds): 5000
#: machines a minute is 84 starts a second, in ticks of a few each.
MIN_TICK = 0.05

Report = Callable[[Machine, "LivenessResult | None", "str | None"], None]


@define
class RoundStats:
    number: int
    started: float
    machines: int
    probed: int = 0
    skipped: int = 0  # the previous probe of the machine was still in flight
    moved: int = 0  # another roller looks after it since the round began
    late: int = 0  # still waiting for a slot when the next round began
    errors: int = 0  # the probe could not be carried out
    ended: float | None = None

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


@define
class LivenessSweep:
    clock: IReactorTime
    machines: Callable[[], Sequence[Machine]]
    probe: Callable[[Machine], Deferred[LivenessResult]]
    report: Report
    interval: float = 300.0
    #: machines not to probe after all when their turn comes (with several rollers: moved to another)
    skip: Callable[[Machine], bool] | None = None
    concurrency: int = 100
    rounds: deque[RoundStats] = field(factory=lambda: deque(maxlen=20))
    _round: RoundStats | None = None
    _due: deque[tuple[float, Machine]] = field(factory=deque)
    _waiting: deque[Machine] = field(factory=deque)
    _in_flight: dict[tuple[str, str], Deferred[LivenessResult]] = field(factory=dict)
    _tick_call: IDelayedCall | None = None
    _round_call: IDelayedCall | None = None
    _running: bool = False
    _count: int = 0
    _outstanding: int = 0

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._begin_round()

    def stop(self) -> None:
        """Stop: no new probe starts; the ones in flight are cancelled."""
        self._running = False
        for call in (self._tick_call, self._round_call):
            if call is not None and call.active():
                call.cancel()
        self._tick_call = self._round_call = None
        self._due.clear()
        self._waiting.clear()
        for d in list(self._in_flight.values()):
            d.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- rounds

    def _begin_round(self) -> None:
        self._round_call = None
        if not self._running:
            return
        # The previous round's tick chain ends here (a tick due now would start a second chain beside
        # the new round's).  Its machines already due start now, if a slot is free: ticks are MIN_TICK
        # apart, so with more than 1/MIN_TICK machines a second the last few fall due with the next
        # round.  Only what still waits for a slot is late; probes in flight run on and report.
        if self._tick_call is not None and self._tick_call.active():
            self._tick_call.cancel()
        self._tick_call = None
        if self._round is not None and self._round.ended is None:
            self._take_due(self.clock.seconds())
            self._launch()
            self._round.late += len(self._waiting) + len(self._due)
            self._finish_round_if_done(force=True)
        self._waiting.clear()
        now = self.clock.seconds()
        machines = sorted(self.machines(), key=lambda m: (m.worker_group, m.worker_id))
        self._count += 1
        self._round = RoundStats(self._count, now, len(machines))
        self.rounds.append(self._round)
        self._outstanding = 0
        slot = self.interval / len(machines) if machines else 0.0
        self._due = deque((now + i * slot, m) for i, m in enumerate(machines))
        self._round_call = self.clock.callLater(self.interval, self._begin_round)
        self._tick()
        self._finish_round_if_done()

    def _tick(self) -> None:
        self._tick_call = None
        now = self.clock.seconds()
        self._take_due(now)
        self._launch()
        if self._due:
            delay = max(self._due[0][0] - now, MIN_TICK)
            self._tick_call = self.clock.callLater(delay, self._tick)
        self._finish_round_if_done()  # its last machines may all have been skipped or failed to start

    def _take_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now:
            self._waiting.append(self._due.popleft()[1])

    def _launch(self) -> None:
        r = self._round
        while self._waiting and len(self._in_flight) < self.concurrency and r is not None:
            machine = self._waiting.popleft()
            key = (machine.worker_group, machine.worker_id)
            if key in self._in_flight:
                r.skipped += 1
                continue
            if self.skip is not None and self.skip(machine):
                r.moved += 1
                continue
            try:
                d = self.probe(machine)
            except Exception as e:  # noqa: BLE001 -- a probe that cannot start is reported, never stops the sweep
                r.errors += 1
                self._report(machine, None, str(e) or type(e).__name__)
                continue
            self._in_flight[key] = d
            self._outstanding += 1
            d.addBoth(self._probed, machine, key, r)

    def _probed(self, result: LivenessResult | Failure, machine: Machine, key: tuple[str, str],
                r: RoundStats) -> None:
        self._in_flight.pop(key, None)
        if isinstance(result, Failure):
            if self._running:
                r.errors += 1
                self._report(machine, None, result.getErrorMessage() or repr(result.value))
        else:
            r.probed += 1
            self._report(machine, result, None)
        if r is self._round:
            self._outstanding -= 1
        if self._round is not None:
            # a slot is free (for the current round, whichever round this probe was of); the current
            # round may be over now, also when this probe was of an earlier round
            self._launch()
            self._finish_round_if_done()

    def _finish_round_if_done(self, force: bool = False) -> None:
        r = self._round
        if r is None or r.ended is not None:
            return
        if force or (not self._due and not self._waiting and self._outstanding == 0):
            r.ended = self.clock.seconds()

    def _report(self, machine: Machine, result: LivenessResult | None, error: str | None) -> None:
        try:
            self.report(machine, result, error)
        except Exception:  # noqa: BLE001 -- a broken consumer must not stop the sweep
            log.failure("Liveness report for {machine} failed", machine=machine.worker_id)
