"""
Tests for L{roller.drivers.liveness}.

Unit tests run on L{MemoryReactorClock} (plus a small fake of
C{IReactorProcess}); integration tests run real C{ping} children and real
TCP connections on the global reactor through C{pytest_twisted}, only ever
towards 127.0.0.0/8 and ::1.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from roller.drivers.liveness import (
    CHILD_ENV,
    IcmpPing,
    ILiveness,
    LivenessError,
    LivenessResult,
    TcpConnect,
    liveness_for,
    validate_address,
)
from roller.drivers.liveness_socket import describe_errno
from roller.testing.process import ping_skip_reason
from roller.testing.results import eventually

FAKE_PING = "/opt/fake/bin/ping"

PING_OK = [
    "PING 10.0.0.5 (10.0.0.5) 56(84) bytes of data.",
    "64 bytes from 10.0.0.5: icmp_seq=1 ttl=64 time=0.041 ms",
    "64 bytes from 10.0.0.5: icmp_seq=2 ttl=64 time=0.038 ms",
    "64 bytes from 10.0.0.5: icmp_seq=3 ttl=64 time=0.041 ms",
    "",
    "--- 10.0.0.5 ping statistics ---",
    "3 packets transmitted, 3 received, 0% packet loss, time 2031ms",
    "rtt min/avg/max/mdev = 0.038/0.040/0.041/0.001 ms",
]

PING_UNREACHABLE = [
    "PING 10.0.0.5 (10.0.0.5) 56(84) bytes of data.",
    "From 10.0.0.1 icmp_seq=1 Destination Host Unreachable",
    "From 10.0.0.1 icmp_seq=2 Destination Host Unreachable",
    "From 10.0.0.1 icmp_seq=3 Destination Host Unreachable",
    "",
    "--- 10.0.0.5 ping statistics ---",
    "3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2047ms",
]

PING_SILENT = [
    "PING 10.0.0.5 (10.0.0.5) 56(84) bytes of data.",
    "",
    "--- 10.0.0.5 ping statistics ---",
    "3 packets transmitted, 0 received, 100% packet loss, time 2040ms",
]


# ------------------------------------------------------------ fakes


class FakeProcessTransport:
    """
    What L{FakeProcessReactor.spawnProcess} returns: records signals.

    @ivar signals: Signals sent, in order.
    @ivar exited: If set, C{signalProcess} raises L{ProcessExitedAlready}.
    """

    def __init__(self, protocol: Any, executable: str, args: list[str], env: Any) -> None:
        self.protocol = protocol
        self.executable = executable
        self.args = list(args)
        self.env = env
        self.pid = 4242
        self.signals: list[str] = []
        self.stdin_closed = False
        self.exited = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signalID: str) -> None:
        if self.exited:
            raise error.ProcessExitedAlready()
        self.signals.append(signalID)

    # Helpers for the tests to play the child's part.

    def output(self, *lines: str, fd: int = 1) -> None:
        for line in lines:
            self.protocol.childDataReceived(fd, line.encode() + b"\n")

    def exit(self, code: int) -> None:
        self.exited = True
        if code == 0:
            reason = Failure(error.ProcessDone(0))
        else:
            reason = Failure(error.ProcessTerminated(exitCode=code))
        self.protocol.processEnded(reason)

    def killed(self, signal: int = 9) -> None:
        self.exited = True
        self.protocol.processEnded(Failure(error.ProcessTerminated(signal=signal)))


@implementer(IReactorProcess)
class FakeProcessReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} that also records C{spawnProcess} calls.

    @ivar processes: One L{FakeProcessTransport} per spawn.
    @ivar spawn_error: If set, C{spawnProcess} raises it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcessTransport] = []
        self.spawn_error: Exception | None = None

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: str,
        args: Any = (),
        env: Any = None,
        path: Any = None,
        uid: Any = None,
        gid: Any = None,
        usePTY: bool = False,
        childFDs: Any = None,
    ) -> FakeProcessTransport:
        if self.spawn_error is not None:
            raise self.spawn_error
        transport = FakeProcessTransport(processProtocol, executable, args, env)
        self.processes.append(transport)
        processProtocol.makeConnection(transport)
        return transport


# ------------------------------------------------------------ validation

GOOD_ADDRESSES = [
    ("127.0.0.1", "127.0.0.1"),
    ("10.0.0.5", "10.0.0.5"),
    ("::1", "::1"),
    ("2001:DB8::1", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1%eth0"),
    ("t-w1064-ms-281.wintest.releng.mdc1.mozilla.com",
     "t-w1064-ms-281.wintest.releng.mdc1.mozilla.com"),
    ("host.example.com.", "host.example.com."),
    ("macmini_r8_11", "macmini_r8_11"),
    ("localhost", "localhost"),
]

BAD_ADDRESSES = [
    "-oFoo",
    "-c",
    "--help",
    "a b",
    "",
    " 10.0.0.5",
    "10.0.0.5\n",
    "host;reboot",
    "$(reboot)",
    "a..b",
    "-host.example.com",
    "host-.example.com",
    "x" * 64 + ".example.com",
    ".".join(["abcdefghi"] * 30),
    "1.2.3",
    "999.1.1.1",
    "0x7f000001",
    "127.1",
    "http://10.0.0.5/",
    "10.0.0.5:22",
    None,
    42,
]


@pytest.mark.parametrize("address,normalised", GOOD_ADDRESSES)
def test_validate_address_accepts(address: str, normalised: str) -> None:
    assert validate_address(address) == normalised


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_validate_address_rejects(address: Any) -> None:
    with pytest.raises(ValueError):
        validate_address(address)


# ------------------------------------------------------------ IcmpPing units


class IcmpPingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.seen: list[str] = []
        self.ping = IcmpPing(self.reactor, ping_binary=FAKE_PING, on_line=self.seen.append)

    def start(self, address: str = "10.0.0.5") -> tuple[Deferred, FakeProcessTransport]:
        d = self.ping.check(address)
        self.assertNoResult(d)
        self.assertEqual(len(self.reactor.processes), 1)
        return d, self.reactor.processes[0]

    def test_provides_interface(self) -> None:
        verifyObject(ILiveness, self.ping)

    def test_argv_and_env(self) -> None:
        """
        ping runs as an argument list (no shell) with a minimal environment.
        """
        _, child = self.start()
        self.assertEqual(child.executable, FAKE_PING)
        self.assertEqual(
            child.args, [FAKE_PING, "-n", "-c", "3", "-W", "2", "--", "10.0.0.5"]
        )
        self.assertEqual(child.env, {"PATH": CHILD_ENV["PATH"], "LANG": "C", "LC_ALL": "C"})
        self.assertTrue(child.stdin_closed)

    def test_argv_ipv6_and_count(self) -> None:
        ping = IcmpPing(self.reactor, count=1, timeout=2.0, ping_binary=FAKE_PING)
        ping.check("2001:DB8::1")
        self.assertEqual(
            self.reactor.processes[0].args,
            [FAKE_PING, "-n", "-c", "1", "-W", "1", "--", "2001:db8::1"],
        )

    def test_wait_seconds(self) -> None:
        """
        -W leaves room for count-1 seconds of sending within the deadline.
        """
        self.assertEqual(IcmpPing(self.reactor).wait_seconds(), 2)
        self.assertEqual(IcmpPing(self.reactor, count=1, timeout=5.0).wait_seconds(), 4)
        self.assertEqual(IcmpPing(self.reactor, count=5, timeout=5.5).wait_seconds(), 1)
        self.assertEqual(IcmpPing(self.reactor, reply_wait=7).wait_seconds(), 7)

    def test_constructor_validation(self) -> None:
        for kw in [
            {"count": 0},
            {"count": True},
            {"timeout": 0},
            {"timeout": -1.0},
            {"count": 3, "timeout": 2.0},
            {"reply_wait": 0},
        ]:
            with self.assertRaises(ValueError, msg=repr(kw)):
                IcmpPing(self.reactor, **kw)

    def test_binary_looked_up_in_child_path(self) -> None:
        """
        A bare program name is resolved in the child's PATH; a missing one
        fails with an explanation and spawns nothing.
        """
        missing = IcmpPing(self.reactor, ping_binary="no-such-ping-binary-here")
        failure = self.failureResultOf(missing.check("10.0.0.5"), LivenessError)
        self.assertIn("not found", str(failure.value))
        self.assertIn("iputils-ping", str(failure.value))
        self.assertEqual(self.reactor.processes, [])

        sh = IcmpPing(self.reactor, ping_binary="sh")
        sh.check("10.0.0.5")
        child = self.reactor.processes[0]
        self.assertEqual(child.executable, shutil.which("sh", path=CHILD_ENV["PATH"]))
        self.assertEqual(child.args[0], "sh")

    def test_bad_address_spawns_nothing(self) -> None:
        for address in ["-oFoo", "a b", "", "--", "-W1"]:
            self.failureResultOf(self.ping.check(address), ValueError)
        self.assertEqual(self.reactor.processes, [])

    def test_spawn_error(self) -> None:
        self.reactor.spawn_error = OSError(13, "Permission denied")
        failure = self.failureResultOf(self.ping.check("10.0.0.5"), LivenessError)
        self.assertIn("Permission denied", str(failure.value))

    def test_lines_reach_on_line_as_they_arrive(self) -> None:
        """
        Lines are delivered when complete, even when split across reads, from
        stdout and stderr; a final unterminated line is flushed at exit.
        """
        d, child = self.start()
        child.protocol.childDataReceived(1, b"PING 10.0.0.5 (10.0.0.5) 56(84) by")
        self.assertEqual(self.seen, [])
        child.protocol.childDataReceived(1, b"tes of data.\r\n64 bytes from 10.0.0.5: ")
        self.assertEqual(self.seen, ["PING 10.0.0.5 (10.0.0.5) 56(84) bytes of data."])
        child.protocol.childDataReceived(2, b"ping: warning: something\n")
        self.assertEqual(self.seen[-1], "ping: warning: something")
        child.protocol.childDataReceived(1, b"icmp_seq=1 ttl=64 time=0.041 ms\nno newline \xff")
        child.exit(0)
        expected = [
            "PING 10.0.0.5 (10.0.0.5) 56(84) bytes of data.",
            "ping: warning: something",
            "64 bytes from 10.0.0.5: icmp_seq=1 ttl=64 time=0.041 ms",
            "no newline \ufffd",
        ]
        self.assertEqual(self.seen, expected)
        self.assertEqual(self.successResultOf(d).lines, tuple(expected))

    def test_on_line_errors_do_not_break_the_check(self) -> None:
        def explode(line: str) -> None:
            raise RuntimeError("boom")

        ping = IcmpPing(self.reactor, ping_binary=FAKE_PING, on_line=explode)
        d = ping.check("10.0.0.5")
        child = self.reactor.processes[0]
        child.output(*PING_OK)
        child.exit(0)
        self.assertTrue(self.successResultOf(d).alive)
        self.assertTrue(self.flushLoggedErrors(RuntimeError))

    def test_exit_0_alive(self) -> None:
        d, child = self.start()
        child.output(*PING_OK)
        child.exit(0)
        self.assertEqual(
            self.successResultOf(d),
            LivenessResult(alive=True, detail="3/3 replies, rtt avg 0.040 ms", lines=tuple(PING_OK)),
        )
        self.assertEqual(self.seen, PING_OK)
        self.assertEqual(child.signals, [])

    def test_exit_0_partial_replies_alive(self) -> None:
        d, child = self.start()
        child.output(
            "3 packets transmitted, 1 received, 66.6667% packet loss, time 2030ms",
            "rtt min/avg/max/mdev = 0.500/0.500/0.500/0.000 ms",
        )
        child.exit(0)
        result = self.successResultOf(d)
        self.assertTrue(result.alive)
        self.assertEqual(result.detail, "1/3 replies, rtt avg 0.500 ms")

    def test_exit_1_not_alive(self) -> None:
        d, child = self.start()
        child.output(*PING_SILENT)
        child.exit(1)
        result = self.successResultOf(d)
        self.assertFalse(result.alive)
        self.assertEqual(result.detail, "0/3 replies")
        self.assertEqual(result.lines, tuple(PING_SILENT))

    def test_exit_1_unreachable_detail(self) -> None:
        d, child = self.start()
        child.output(*PING_UNREACHABLE)
        child.exit(1)
        result = self.successResultOf(d)
        self.assertFalse(result.alive)
        self.assertEqual(
            result.detail,
            "0/3 replies, 3 errors (Destination Host Unreachable from 10.0.0.1)",
        )

    def test_exit_1_without_statistics(self) -> None:
        d, child = self.start()
        child.exit(1)
        self.assertEqual(self.successResultOf(d), LivenessResult(False, "no reply", ()))

    def test_exit_2_error_with_stderr(self) -> None:
        d = self.ping.check("nosuchhost.invalid")
        child = self.reactor.processes[0]
        child.output("ping: nosuchhost.invalid: Name or service not known", fd=2)
        child.exit(2)
        failure = self.failureResultOf(d, LivenessError)
        self.assertEqual(
            str(failure.value),
            "ping nosuchhost.invalid failed with exit status 2: "
            "ping: nosuchhost.invalid: Name or service not known",
        )
        self.assertEqual(failure.value.exit_code, 2)
        self.assertEqual(failure.value.address, "nosuchhost.invalid")
        self.assertEqual(
            failure.value.lines, ("ping: nosuchhost.invalid: Name or service not known",)
        )

    def test_other_exit_status_is_error(self) -> None:
        d, child = self.start()
        child.exit(127)
        failure = self.failureResultOf(d, LivenessError)
        self.assertIn("exit status 127", str(failure.value))
        self.assertIn("(no output)", str(failure.value))

    def test_killed_by_someone_else(self) -> None:
        d, child = self.start()
        child.killed(15)
        failure = self.failureResultOf(d, LivenessError)
        self.assertIn("killed by signal 15", str(failure.value))

    def test_cancel_kills_child(self) -> None:
        d, child = self.start()
        child.output(PING_OK[0])
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(child.signals, ["KILL"])
        # The child's death arrives later and is only reaped, not reported.
        child.killed(9)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel_after_child_exited_already(self) -> None:
        d, child = self.start()
        child.exited = True
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(child.signals, [])

    def test_timeout_kills_child(self) -> None:
        d, child = self.start()
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.assertEqual(child.signals, [])
        self.reactor.advance(0.1)
        self.failureResultOf(d, TimeoutError)
        self.assertEqual(child.signals, ["KILL"])
        child.killed(9)

    def test_finishing_cancels_the_timer(self) -> None:
        d, child = self.start()
        child.output(*PING_OK)
        child.exit(0)
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(10)
        self.assertEqual(child.signals, [])


# ------------------------------------------------------------ TcpConnect units


class TcpConnectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.seen: list[str] = []
        self.tcp = TcpConnect(self.reactor, 22, on_line=self.seen.append)

    def start(self, address: str = "10.0.0.5") -> Deferred:
        d = self.tcp.check(address)
        self.assertNoResult(d)
        return d

    def test_provides_interface(self) -> None:
        verifyObject(ILiveness, self.tcp)

    def test_port_and_timeout_validation(self) -> None:
        for port in [0, 65536, -1, "22", None, True]:
            with self.assertRaises(ValueError, msg=repr(port)):
                TcpConnect(self.reactor, port)
        with self.assertRaises(ValueError):
            TcpConnect(self.reactor, 22, timeout=0)

    def test_bad_address(self) -> None:
        for address in ["-oFoo", "a b", ""]:
            self.failureResultOf(self.tcp.check(address), ValueError)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_connected_is_alive_and_closed(self) -> None:
        d = self.start()
        host, port, factory, timeout, bind = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("10.0.0.5", 22, 5.0))
        self.reactor.advance(0.25)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        result = self.successResultOf(d)
        self.assertTrue(result.alive)
        self.assertEqual(result.detail, "connected to 10.0.0.5:22 in 250.0 ms")
        self.assertEqual(
            result.lines, ("connecting to 10.0.0.5:22", "connected to 10.0.0.5:22 in 250.0 ms")
        )
        self.assertEqual(self.seen, list(result.lines))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_ipv6_literal(self) -> None:
        d = self.tcp.check("2001:DB8::1")
        host, port, factory, _, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port), ("2001:db8::1", 22))
        factory.clientConnectionFailed(
            self.reactor.connectors[0], Failure(error.ConnectionRefusedError())
        )
        self.assertEqual(
            self.successResultOf(d).detail, "connection refused by [2001:db8::1]:22"
        )

    def test_refused_is_not_alive(self) -> None:
        d = self.start()
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(
            self.reactor.connectors[0], Failure(error.ConnectionRefusedError())
        )
        result = self.successResultOf(d)
        self.assertFalse(result.alive)
        self.assertEqual(result.detail, "connection refused by 10.0.0.5:22")
        self.assertEqual(self.seen[-1], "connection refused by 10.0.0.5:22")

    def test_no_route_is_not_alive(self) -> None:
        d = self.start()
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(self.reactor.connectors[0], Failure(error.NoRouteError()))
        result = self.successResultOf(d)
        self.assertFalse(result.alive)
        self.assertEqual(result.detail, "no route to 10.0.0.5:22")

    def test_other_connect_error_is_not_alive(self) -> None:
        d = self.start()
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(
            self.reactor.connectors[0],
            Failure(error.ConnectError(string="Network is unreachable")),
        )
        result = self.successResultOf(d)
        self.assertFalse(result.alive)
        self.assertIn("cannot connect to 10.0.0.5:22", result.detail)
        self.assertIn("Network is unreachable", result.detail)

    def test_reactor_connect_timeout_is_not_alive(self) -> None:
        d = self.start()
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(self.reactor.connectors[0], Failure(error.TimeoutError()))
        self.assertEqual(
            self.successResultOf(d).detail, "no connection to 10.0.0.5:22 within 5 s"
        )

    def test_timeout_is_not_alive_and_stops_connecting(self) -> None:
        d = self.start()
        connector = self.reactor.connectors[0]
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.assertFalse(connector.stoppedConnecting)
        self.reactor.advance(0.1)
        result = self.successResultOf(d)
        self.assertFalse(result.alive)
        self.assertEqual(result.detail, "no connection to 10.0.0.5:22 within 5 s")
        self.assertTrue(connector.stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel_stops_connecting(self) -> None:
        d = self.start()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_hostname_uses_resolver(self) -> None:
        """
        Host names go through HostnameEndpoint and the reactor's resolver
        (MemoryReactor's resolves everything to 127.0.0.1).
        """
        d = self.start("ssh.example.com")
        host, port, factory, _, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 22))
        factory.buildProtocol(None).makeConnection(StringTransport())
        result = self.successResultOf(d)
        self.assertTrue(result.alive)
        self.assertIn("ssh.example.com:22", result.detail)

    def test_hostname_timeout(self) -> None:
        d = self.start("ssh.example.com")
        self.reactor.advance(5)
        result = self.successResultOf(d)
        self.assertFalse(result.alive)
        self.assertEqual(result.detail, "no connection to ssh.example.com:22 within 5 s")
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_unresolvable_hostname_is_error(self) -> None:
        class NoAnswers:
            def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0,
                                addressTypes: Any = None, transportSemantics: str = "TCP") -> Any:
                receiver.resolutionBegan(None)
                receiver.resolutionComplete()
                return None

        self.reactor.installNameResolver(NoAnswers())
        d = self.tcp.check("nosuchhost.invalid")
        failure = self.failureResultOf(d, LivenessError)
        self.assertIn("does not resolve", str(failure.value))
        self.assertEqual(self.reactor.tcpClients, [])


# ------------------------------------------------------------ TcpConnect on a plain socket


class PlainSocketTests(SynchronousTestCase):
    """
    L{TcpConnect} with C{plain_socket=True} on a L{MemoryReactorClock}: real
    non-blocking sockets towards loopback; the test plays the reactor
    (calls C{doWrite}/C{connectionLost} on the registered descriptor).
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.seen: list[str] = []
        self.tcp = TcpConnect(self.reactor, 22, on_line=self.seen.append, plain_socket=True)
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.addCleanup(self.server.close)
        self.listening = self.server.getsockname()[1]
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        self.closed = closed.getsockname()[1]
        closed.close()

    def start(self, port: int, address: str = "127.0.0.1") -> tuple[Deferred, Any]:
        self.tcp.port = port
        d = self.tcp.check(address)
        self.assertNoResult(d)
        [attempt] = self.reactor.getWriters()
        return d, attempt

    def writable(self, attempt: Any) -> None:
        """Wait (on the real socket, up to 5 s) until the kernel has decided the connect."""
        select.select([], [attempt.fileno()], [], 5.0)

    def assert_released(self, attempt: Any) -> None:
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(attempt.fileno(), -1)
        self.assertEqual(attempt.sock.fileno(), -1)  # closed

    def test_listening_port_is_alive_and_closed(self) -> None:
        d, attempt = self.start(self.listening)
        self.writable(attempt)
        self.reactor.advance(0.25)
        attempt.doWrite()
        result = self.successResultOf(d)
        where = f"127.0.0.1:{self.listening}"
        self.assertTrue(result.alive)
        self.assertEqual(result.detail, f"connected to {where} in 250.0 ms")
        self.assertEqual(result.lines, (f"connecting to {where}", result.detail))
        self.assertEqual(self.seen, list(result.lines))
        self.assert_released(attempt)
        # the server saw a connection, closed by the probe at once
        self.server.settimeout(5)
        accepted, _ = self.server.accept()
        with accepted:
            accepted.settimeout(5)
            self.assertEqual(accepted.recv(10), b"")
        self.assertEqual(self.reactor.tcpClients, [])  # no Twisted TCP client

    def test_refused_is_not_alive(self) -> None:
        d, attempt = self.start(self.closed)
        self.writable(attempt)
        attempt.doWrite()
        result = self.successResultOf(d)
        self.assertFalse(result.alive)
        self.assertEqual(result.detail, f"connection refused by 127.0.0.1:{self.closed}")
        self.assertEqual(self.seen[-1], result.detail)
        self.assert_released(attempt)

    def test_refused_seen_as_connection_lost(self) -> None:
        """epoll reports a refused connect as an error: the reactor calls connectionLost."""
        d, attempt = self.start(self.closed)
        self.writable(attempt)
        self.reactor.removeWriter(attempt)  # what the reactor does before connectionLost
        attempt.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(self.successResultOf(d).detail, f"connection refused by 127.0.0.1:{self.closed}")
        self.assert_released(attempt)
        attempt.doWrite()  # a late second call changes nothing

    def test_timeout_is_not_alive_and_closes(self) -> None:
        d, attempt = self.start(self.listening)
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        result = self.successResultOf(d)
        self.assertFalse(result.alive)
        self.assertEqual(result.detail, f"no connection to 127.0.0.1:{self.listening} within 5 s")
        self.assert_released(attempt)

    def test_cancel_closes(self) -> None:
        d, attempt = self.start(self.listening)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assert_released(attempt)

    def test_ipv6_literal(self) -> None:
        if not _have_ipv6_loopback():
            raise SkipTest("no IPv6 loopback")
        d, attempt = self.start(self.closed, "::1")
        self.writable(attempt)
        attempt.doWrite()
        self.assertEqual(self.successResultOf(d).detail, f"connection refused by [::1]:{self.closed}")

    def test_hostname_uses_twisted_client(self) -> None:
        d = self.tcp.check("ssh.example.com")
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(len(self.reactor.tcpClients), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_default_only_on_a_real_reactor(self) -> None:
        self.assertIsNone(TcpConnect(self.reactor, 22).plain_socket)
        memory = TcpConnect(self.reactor, self.closed)
        d = memory.check("127.0.0.1")
        self.assertEqual((memory.plain_socket, len(self.reactor.tcpClients)), (False, 1))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        real = TcpConnect(_real_reactor(), self.closed)
        self.assertEqual((real._plain("example.com"), real._plain("127.0.0.1"), real._plain("::1")),
                         (False, True, True))


@pytest.mark.parametrize("code,detail", [
    (errno.ECONNREFUSED, "connection refused by h:1"),
    (errno.EHOSTUNREACH, "no route to h:1"),
    (errno.ENETUNREACH, "no route to h:1"),
    (errno.ETIMEDOUT, "no connection to h:1 within 3 s"),
    (errno.EMFILE, "cannot connect to h:1: Too many open files"),
])
def test_describe_errno(code: int, detail: str) -> None:
    assert describe_errno(code, "h:1", 3.0) == detail


def test_validate_address_remembered_answers_and_unhashable_input() -> None:
    """Answers are remembered per string; a list or dict is still a ValueError, not a TypeError."""
    for _ in range(2):
        assert validate_address("2001:DB8::1") == "2001:db8::1"
        with pytest.raises(ValueError):
            validate_address("-oProxyCommand=x")
    for bad in (["10.0.0.5"], {"a": 1}, None):
        with pytest.raises(ValueError):
            validate_address(bad)


# ------------------------------------------------------------ liveness_for


def test_liveness_for_icmp() -> None:
    reactor = FakeProcessReactor()
    lines: list[str] = []
    check = liveness_for("icmp", reactor, on_line=lines.append, count=1, timeout=2.0)
    assert isinstance(check, IcmpPing)
    verifyObject(ILiveness, check)
    assert (check.count, check.timeout, check.on_line) == (1, 2.0, lines.append)


def test_liveness_for_tcp() -> None:
    reactor = MemoryReactorClock()
    check = liveness_for("tcp", reactor, port=2222, timeout=1.5)
    assert isinstance(check, TcpConnect)
    verifyObject(ILiveness, check)
    assert (check.port, check.timeout) == (2222, 1.5)


@pytest.mark.parametrize(
    "method,kw",
    [("tcp", {}), ("icmp", {"port": 22}), ("udp", {}), ("ICMP", {}), ("", {})],
)
def test_liveness_for_rejects(method: str, kw: dict) -> None:
    with pytest.raises(ValueError):
        liveness_for(method, MemoryReactorClock(), **kw)


# ------------------------------------------------------------ integration

needs_ping = pytest.mark.skipif(ping_skip_reason() is not None, reason=str(ping_skip_reason()))


def _have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class RecordingReactor:
    """
    Wraps the real reactor to keep the process transports it spawns, so
    tests can check their children really go away.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.processes: list[Any] = []

    def spawnProcess(self, *args: Any, **kw: Any) -> Any:
        transport = self._reactor.spawnProcess(*args, **kw)
        self.processes.append(transport)
        return transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def _real_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def _gone(pid: int, within: float = 5.0) -> bool:
    """
    Wait until C{pid} no longer exists (killed and reaped, not a zombie).
    """
    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    return await eventually(gone, f"pid {pid} to be gone", timeout=within, reactor=_real_reactor())


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-ping"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@needs_ping
@pytest_twisted.ensureDeferred
async def test_integration_ping_loopback() -> None:
    lines: list[str] = []
    result = await IcmpPing(_real_reactor(), count=1, on_line=lines.append).check("127.0.0.1")
    assert result.alive, result
    assert result.detail.startswith("1/1 replies, rtt avg "), result.detail
    assert lines and lines == list(result.lines)
    assert any("127.0.0.1 ping statistics" in line for line in lines)


@needs_ping
@pytest.mark.skipif(not _have_ipv6_loopback(), reason="no IPv6 loopback (::1) here")
@pytest_twisted.ensureDeferred
async def test_integration_ping_ipv6_loopback() -> None:
    result = await IcmpPing(_real_reactor(), count=1).check("::1")
    assert result.alive, result
    assert result.detail.startswith("1/1 replies"), result.detail


@needs_ping
@pytest_twisted.ensureDeferred
async def test_integration_ping_cancel_kills_child() -> None:
    """
    Cancelling a real ping (of 3, so it runs ~2 s) after its first reply
    kills it and leaves no process behind.
    """
    reactor = RecordingReactor(_real_reactor())
    first_reply: Deferred = Deferred()

    def on_line(line: str) -> None:
        if "bytes from" in line and not first_reply.called:
            first_reply.callback(line)

    d = IcmpPing(reactor, count=3, on_line=on_line).check("127.0.0.1")
    await first_reply
    assert not d.called
    pid = reactor.processes[0].pid
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert await _gone(pid), f"ping (pid {pid}) still exists after cancel"


@pytest_twisted.ensureDeferred
async def test_integration_timeout_kills_child(tmp_path: Path) -> None:
    """
    A child that hangs is killed at the deadline (TimeoutError) and reaped.
    """
    fake = _script(tmp_path, "echo pid $$\nexec sleep 30\n")
    reactor = RecordingReactor(_real_reactor())
    lines: list[str] = []
    d = IcmpPing(reactor, count=1, timeout=0.5, ping_binary=fake, on_line=lines.append).check(
        "127.0.0.1"
    )
    with pytest.raises(TimeoutError):
        await d
    pid = reactor.processes[0].pid
    assert lines == [f"pid {pid}"]
    assert await _gone(pid), f"child (pid {pid}) still exists after timeout"


@pytest_twisted.ensureDeferred
async def test_integration_exit_2_reports_stderr(tmp_path: Path) -> None:
    """
    ping's exit status 2 becomes a LivenessError quoting its stderr; the
    child sees exactly our argument list and environment.
    """
    fake = _script(
        tmp_path,
        'echo "args: $*"\n'
        'echo "env: $(env | sort | tr \'\\n\' \' \')"\n'
        'echo "ping: $7: Name or service not known" >&2\n'
        "exit 2\n",
    )
    lines: list[str] = []
    d = IcmpPing(_real_reactor(), count=1, ping_binary=fake, on_line=lines.append).check(
        "nosuchhost.invalid"
    )
    with pytest.raises(LivenessError) as caught:
        await d
    assert str(caught.value) == (
        "ping nosuchhost.invalid failed with exit status 2: "
        "ping: nosuchhost.invalid: Name or service not known"
    )
    assert lines[0] == "args: -n -c 1 -W 4 -- nosuchhost.invalid"
    env = set(lines[1].removeprefix("env: ").split())
    assert {f"PATH={CHILD_ENV['PATH']}", "LANG=C", "LC_ALL=C"} <= env
    # Only what the shell itself adds (PWD, SHLVL, _) besides ours.
    assert {e.split("=", 1)[0] for e in env} <= {"PATH", "LANG", "LC_ALL", "PWD", "SHLVL", "_"}


@pytest_twisted.ensureDeferred
async def test_integration_tcp_listening_port_is_alive() -> None:
    reactor = _real_reactor()
    accepted: list[Protocol] = []

    class Server(Protocol):
        def connectionMade(self) -> None:
            accepted.append(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
    try:
        number = port.getHost().port
        result = await TcpConnect(reactor, number, timeout=2.0).check("127.0.0.1")
        assert result.alive, result
        assert result.detail.startswith(f"connected to 127.0.0.1:{number} in ")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_integration_tcp_hostname_localhost() -> None:
    reactor = _real_reactor()
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        number = port.getHost().port
        result = await TcpConnect(reactor, number, timeout=2.0).check("localhost")
        assert result.alive, result
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_integration_tcp_closed_port_is_refused() -> None:
    reactor = _real_reactor()
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    result = await TcpConnect(reactor, number, timeout=2.0).check("127.0.0.1")
    assert not result.alive
    assert result.detail == f"connection refused by 127.0.0.1:{number}"
