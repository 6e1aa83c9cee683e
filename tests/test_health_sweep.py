"""The liveness sweep on task.Clock: spread over the interval, bounded concurrency, rounds that never pile up."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from roller.drivers.liveness import LivenessResult
from roller.health.sweep import LivenessSweep
from roller.inventory import Machine


def fleet(n: int) -> list[Machine]:
    return [Machine(worker_id=f"m{i:03d}", worker_group="g", ip=f"127.0.0.{i + 1}") for i in range(n)]


class Probes:
    """Probes answered by hand (or at once with `auto`)."""

    def __init__(self, clock: Clock, auto: float | None = None, alive: bool = True):
        self.clock = clock
        self.auto = auto
        self.alive = alive
        self.started: list[tuple[float, str]] = []
        self.pending: dict[str, Deferred[LivenessResult]] = {}
        self.outstanding = self.most = 0

    def __call__(self, machine: Machine) -> Deferred[LivenessResult]:
        self.started.append((self.clock.seconds(), machine.worker_id))
        d: Deferred[LivenessResult] = Deferred()
        self.outstanding += 1
        self.most = max(self.most, self.outstanding)

        def done(result: Any) -> Any:
            self.outstanding -= 1
            return result

        d.addBoth(done)
        if self.auto is not None:
            self.clock.callLater(self.auto, d.callback, LivenessResult(self.alive, "scripted"))
        else:
            self.pending[machine.worker_id] = d
        return d


def sweep(machines: list[Machine], probes: Probes, clock: Clock, **kw: Any) -> tuple[LivenessSweep, list]:
    reports: list = []
    s = LivenessSweep(clock, lambda: machines, probes, lambda m, r, e: reports.append((m.worker_id, r, e)), **kw)
    return s, reports


def test_starts_are_spread_evenly_over_the_interval() -> None:
    clock = Clock()
    probes = Probes(clock, auto=0.5)
    s, reports = sweep(fleet(60), probes, clock, interval=60.0, concurrency=10)
    s.start()
    clock.pump([0.05] * 1201)  # one minute in 50 ms steps
    starts = [t for t, _ in probes.started[:60]]
    assert len(starts) == 60 and [w for _, w in probes.started[:60]] == [f"m{i:03d}" for i in range(60)]
    # machine i starts at i seconds into the round (within one tick), never two in the same second
    assert all(abs(t - i) <= 0.05 + 1e-9 for i, t in enumerate(starts)), starts
    assert probes.most == 1  # half a second each, one a second: never two at once
    first = s.rounds[0]
    assert (first.probed, first.skipped, first.late, first.errors) == (60, 0, 0, 0)
    assert first.ended is not None and first.duration is not None and first.duration <= 60.0
    assert len(reports) == 60 and all(r.alive for _, r, _ in reports)
    # the next round began at 60 s
    assert abs(s.rounds[1].started - 60.0) <= 0.05 + 1e-9
    s.stop()
    assert not [c for c in clock.getDelayedCalls() if c.active() and c.func.__name__ != "callback"]


def test_concurrency_is_bounded_and_slow_probes_never_pile_up() -> None:
    clock = Clock()
    probes = Probes(clock)  # nothing answers until told
    machines = fleet(20)
    s, reports = sweep(machines, probes, clock, interval=10.0, concurrency=4)
    s.start()
    clock.pump([0.1] * 99)  # most of the first round
    assert len(probes.pending) == 4 and s.in_flight == 4  # the bound holds
    clock.advance(0.2)  # the second round: 16 never started are late; the 4 in flight are skipped
    first, second = s.rounds[0], s.rounds[1]
    assert first.late == 16 and first.ended is not None
    for w in list(probes.pending):
        probes.pending.pop(w).callback(LivenessResult(False, "no reply"))
    assert [r.alive for _, r, _ in reports] == [False] * 4
    clock.pump([0.1] * 100)
    assert second.skipped == 0 and probes.most == 4  # never more than the bound at once
    s.stop()
    assert s.in_flight == 0


def test_a_probe_that_cannot_start_or_fails_is_reported_as_an_error() -> None:
    clock = Clock()
    machines = fleet(3)

    def probe(machine: Machine) -> Deferred[LivenessResult]:
        if machine.worker_id == "m000":
            raise ValueError("machine m000 has neither an ip nor an fqdn")
        d: Deferred[LivenessResult] = Deferred()
        if machine.worker_id == "m001":
            d.errback(RuntimeError("ping is not installed"))
        else:
            d.callback(LivenessResult(True, "ok"))
        return d

    reports: list = []
    s = LivenessSweep(clock, lambda: machines, probe, lambda m, r, e: reports.append((m.worker_id, r, e)),
                      interval=3.0, concurrency=5)
    s.start()
    clock.pump([1.0] * 3)
    assert reports[0] == ("m000", None, "machine m000 has neither an ip nor an fqdn")
    assert reports[1] == ("m001", None, "ping is not installed")
    assert reports[2][0] == "m002" and reports[2][1].alive
    assert s.rounds[0].errors == 2 and s.rounds[0].probed == 1
    s.stop()


def test_a_broken_report_consumer_does_not_stop_the_sweep() -> None:
    clock = Clock()
    probes = Probes(clock, auto=0.1)
    calls = []

    def report(m: Machine, r: Any, e: Any) -> None:
        calls.append(m.worker_id)
        raise RuntimeError("consumer bug")

    s = LivenessSweep(clock, lambda: fleet(2), probes, report, interval=2.0, concurrency=2)
    s.start()
    clock.pump([0.1] * 50)
    assert calls.count("m000") >= 2 and calls.count("m001") >= 2
    s.stop()


def test_probes_in_flight_when_the_next_round_starts_are_neither_late_nor_failed_nor_probed_twice() -> None:
    clock = Clock()
    probes = Probes(clock)  # answered by hand
    machines = fleet(4)
    s, reports = sweep(machines, probes, clock, interval=4.0, concurrency=10)
    s.start()
    clock.pump([1.0] * 3)  # m000..m003 started at 0, 1, 2, 3
    probes.pending.pop("m000").callback(LivenessResult(True, "ok"))
    probes.pending.pop("m001").callback(LivenessResult(True, "ok"))
    slow = dict(probes.pending)
    assert sorted(slow) == ["m002", "m003"]
    clock.advance(1.0)  # the second round cuts the first short while m002 and m003 are in flight
    first, second = s.rounds[0], s.rounds[1]
    assert (first.late, first.errors, first.probed, first.ended) == (0, 0, 2, 4.0)
    assert not any(d.called for d in slow.values())  # not cancelled: they may still answer
    assert [w for w, _, _ in reports] == ["m000", "m001"]  # nothing reported for them (no failure)
    assert s.in_flight == 3  # m002, m003 and the second round's m000

    probes.pending.pop("m000").callback(LivenessResult(True, "ok"))
    clock.advance(1.0)  # 5 s: m001 of the second round
    probes.pending.pop("m001").callback(LivenessResult(True, "ok"))
    clock.advance(1.0)  # 6 s: m002 is still in flight from the first round: skipped, not probed twice
    assert [w for _, w in probes.started].count("m002") == 1
    probes.pending.pop("m002").callback(LivenessResult(True, "slow but alive"))
    assert reports[-1][0] == "m002" and reports[-1][1].alive and reports[-1][2] is None
    clock.advance(1.0)  # 7 s: m003 too
    assert [w for _, w in probes.started].count("m003") == 1
    # the second round has nothing of its own left in flight: it is over, within its interval
    assert (second.probed, second.skipped, second.late, second.errors) == (2, 2, 0, 0)
    assert second.ended == 7.0
    probes.pending.pop("m003").callback(LivenessResult(False, "no reply"))
    # the late answers belong to the round that asked, as answers, not errors
    assert (first.probed, first.errors, first.late) == (4, 0, 0)
    assert (second.probed, second.errors) == (2, 0)
    assert [(w, r.alive) for w, r, _ in reports] == [
        ("m000", True), ("m001", True), ("m000", True), ("m001", True), ("m002", True), ("m003", False)]

    clock.advance(1.0)  # 8 s: the third round probes every machine again, each once
    third = s.rounds[2]
    assert [w for t, w in probes.started if t >= 8.0] == ["m000"]
    clock.pump([1.0] * 3)
    assert [w for t, w in probes.started if t >= 8.0] == ["m000", "m001", "m002", "m003"]
    assert third.skipped == 0
    s.stop()
    assert s.in_flight == 0


def test_a_round_starting_before_the_last_tick_of_the_previous_one_leaves_one_tick_chain() -> None:
    clock = Clock()
    probes = Probes(clock, auto=0.01)
    # 200 machines a second: starts are 5 ms apart, ticks 50 ms apart, so the round's last tick
    # falls due together with the next round
    s, _ = sweep(fleet(200), probes, clock, interval=1.0, concurrency=500)
    s.start()
    chains = []
    for _ in range(100):  # five seconds
        clock.advance(0.05)
        chains.append(len([c for c in clock.getDelayedCalls() if c.active() and c.func == s._tick]))
    assert max(chains) == 1, chains  # one tick chain, not one more per round
    rounds = list(s.rounds)[:-1]
    # the machines that fell due with the next round were probed in their own round, not dropped as late
    assert [(r.probed, r.late) for r in rounds] == [(200, 0)] * len(rounds) and len(rounds) >= 4
    s.stop()
