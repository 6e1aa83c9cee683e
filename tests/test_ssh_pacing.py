"""
L{roller.drivers.ssh_pacing.HandshakePacer} on a task.Clock (a zero-delay
call that runs after C{advance(x)} measures a lag of C{x}), and its use by
L{roller.drivers.ssh.ConchShell} on a memory reactor.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from roller.drivers.ssh import ConchShell, SshConnectFailed, SshTarget
from roller.drivers.ssh_pacing import HandshakePacer


def taken(d) -> bool:
    out: list = []
    d.addBoth(out.append)
    return bool(out) and out[0] is None


def test_slots_up_to_the_limit_then_wait_in_order():
    clock = Clock()
    pacer = HandshakePacer(clock, 100, start=2, minimum=1)
    first, second, third, fourth = (pacer.acquire() for _ in range(4))
    assert (taken(first), taken(second), taken(third), taken(fourth)) == (True, True, False, False)
    assert (pacer.running, pacer.waiting) == (2, 2)
    pacer.release()
    assert taken(third) and not taken(fourth)
    assert (pacer.running, pacer.waiting) == (2, 1)
    clock.advance(0.050)  # the lag measured when they had to wait: 50 ms, one slot fewer
    assert pacer.limit == 1
    pacer.release()
    assert not taken(fourth)  # one handshake still runs: the limit
    pacer.release()
    assert taken(fourth) and (pacer.running, pacer.waiting) == (1, 0)


def test_more_slots_while_the_reactor_keeps_up():
    clock = Clock()
    pacer = HandshakePacer(clock, 100, start=4, minimum=2)
    ds = [pacer.acquire() for _ in range(6)]
    assert [taken(d) for d in ds] == [True] * 4 + [False] * 2
    clock.advance(0)  # measured at once: no lag
    assert pacer.limit == 5 and [taken(d) for d in ds] == [True] * 5 + [False]
    pacer.release()  # a handshake ended: its slot goes to the last one, and the lag is measured again
    assert taken(ds[5]) and pacer.running == 5
    clock.advance(0)
    assert pacer.limit == 5  # nobody waits: nothing to measure for


def test_a_quarter_fewer_slots_while_the_reactor_lags():
    clock = Clock()
    pacer = HandshakePacer(clock, 100, start=16, minimum=4)
    ds = [pacer.acquire() for _ in range(20)]
    assert sum(taken(d) for d in ds) == 16
    clock.advance(0.050)  # the zero-delay call ran 50 ms late
    assert pacer.limit == 12
    for _ in range(5):
        pacer.release()
    assert pacer.running == 12 and pacer.waiting == 3  # 16 - 5, then one more: up to the new limit
    for _ in range(10):  # lagging again and again: never below the minimum
        pacer._measured(clock.seconds() - 0.050)
    assert pacer.limit == 4


def test_slots_held_by_silent_hosts_are_made_up_for():
    """
    Handshakes that wait on hosts that never answer cost no CPU: while runs
    wait and the reactor keeps up, a slot more every 50 ms, with no
    handshake ending meanwhile.
    """
    clock = Clock()
    pacer = HandshakePacer(clock, 100, start=4, minimum=1)
    ds = [pacer.acquire() for _ in range(20)]
    assert sum(taken(d) for d in ds) == 4
    clock.advance(0)
    assert sum(taken(d) for d in ds) == 5
    for _ in range(15):
        clock.advance(0.050)
    assert all(taken(d) for d in ds) and pacer.limit == 20
    clock.advance(1.0)
    assert pacer.limit == 20 and clock.getDelayedCalls() == []  # nobody waits: no more measuring


def test_bounds_and_a_lag_in_between_changes_nothing():
    clock = Clock()
    pacer = HandshakePacer(clock, 3, start=16, minimum=8)
    assert (pacer.limit, pacer.minimum, pacer.maximum) == (3, 3, 3)
    ds = [pacer.acquire() for _ in range(4)]
    clock.advance(0)
    assert pacer.limit == 3 and not taken(ds[3])  # never above the maximum
    pacer = HandshakePacer(clock, 100, start=10)
    ds = [pacer.acquire() for _ in range(11)]
    clock.advance(0.005)  # between low and high
    assert pacer.limit == 10


def test_cancelled_while_waiting_takes_no_slot():
    clock = Clock()
    pacer = HandshakePacer(clock, 100, start=1, minimum=1)
    running, waiting = pacer.acquire(), pacer.acquire()
    waiting.cancel()
    failures: list = []
    waiting.addErrback(failures.append)
    assert failures[0].check(CancelledError) and pacer.waiting == 0
    pacer.release()
    assert pacer.running == 0
    assert taken(pacer.acquire())


def test_conch_shell_paces_its_handshakes(tmp_path: Path):
    """
    Runs beyond the pacer's slots wait (their connect timeout not started);
    a slot frees when a handshake ends, here by timing out.
    """
    from tests.test_ssh import _key, _write_key

    reactor = MemoryReactorClock()
    key = _write_key(tmp_path / "id", _key())
    shell = ConchShell(reactor, tmp_path / "known_hosts", connect_timeout=5.0, max_sessions=100)
    shell._handshakes = HandshakePacer(reactor, 100, start=2, minimum=1)
    target = SshTarget(host="10.0.0.5", port=2222, user="relops", key_path=str(key))
    runs = [shell.run(target, "reboot") for _ in range(3)]
    assert len(reactor.tcpClients) == 2 and shell.sessions_waiting == 1
    reactor.advance(5.0)  # the first two time out (and the lag measured 5 s: one slot only now)
    failures: list = []
    for d in runs[:2]:
        d.addErrback(failures.append)
    assert [f.check(SshConnectFailed) for f in failures] == [SshConnectFailed] * 2
    assert len(reactor.tcpClients) == 3 and shell.sessions_waiting == 0
    reactor.advance(4.9)
    assert not runs[2].called
    reactor.advance(0.1)
    runs[2].addErrback(failures.append)
    assert failures[-1].check(SshConnectFailed)
