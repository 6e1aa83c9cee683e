"""
Liveness checks: is a machine answering on the network?

Two providers of L{ILiveness}:

  - L{IcmpPing} runs the system C{ping} binary (iputils on Debian) as a
    child process through C{reactor.spawnProcess}, with an argument list and
    a minimal environment, and streams its output lines to an optional
    callback so a job can log progress live.
  - L{TcpConnect} opens a TCP connection to one port and closes it at once.

Both take the reactor as their first argument and never touch the global
one.  Every deadline is a Deferred cancellation (C{addTimeout}); cancelling
the Deferred returned by C{check} kills the C{ping} child (SIGKILL) or stops
the connection attempt.

Use L{liveness_for} to build one from a configured method name.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterable
from typing import Any

from attrs import define, field, frozen, validators
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IProcessTransport, IStreamClientEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from roller.drivers.errors import DriverError
from roller.drivers.liveness_socket import IFdReactor, Outcome
from roller.drivers.liveness_socket import probe as socket_probe
from roller.drivers.reactor import IDriverReactor, IProcessReactor, ITcpReactor

log = Logger()

__all__ = [
    "ILiveness",
    "IcmpPing",
    "LivenessError",
    "LivenessResult",
    "TcpConnect",
    "CHILD_ENV",
    "LineCallback",
    "call_on_line",
    "liveness_for",
    "validate_address",
]

#: The whole environment of the C{ping} child: a fixed PATH and the C locale
#: so its output is in English and parseable.
CHILD_ENV: dict[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C",
    "LC_ALL": "C",
}

LineCallback = Callable[[str], object]


def _as_lines(lines: Iterable[str]) -> tuple[str, ...]:
    return tuple(lines)


@frozen
class LivenessResult:
    """
    The outcome of one liveness check.

    @ivar alive: C{True} if the machine answered.
    @ivar detail: One human-readable line, e.g. C{"3/3 replies, rtt avg
        0.040 ms"} or C{"connection refused by 10.0.0.5:22"}.
    @ivar lines: The raw output lines (for ICMP: ping's stdout and stderr in
        arrival order; for TCP: the progress lines).
    """

    alive: bool = field(validator=validators.instance_of(bool))
    detail: str = field(validator=validators.instance_of(str))
    lines: tuple[str, ...] = field(default=(), converter=_as_lines)


class LivenessError(DriverError):
    """
    A liveness check could not be carried out at all (as opposed to the
    machine not answering): unknown host name, C{ping} missing or failing
    with status 2, ...

    @ivar address: The address that was checked.
    @ivar exit_code: C{ping}'s exit status, if there was one.
    @ivar lines: The output collected so far.
    """

    def __init__(
        self,
        message: str,
        address: str = "",
        exit_code: int | None = None,
        lines: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, host=address or None)
        self.address = address
        self.exit_code = exit_code
        self.lines = tuple(lines)


class ILiveness(Interface):
    """
    Checks whether a machine answers on the network.
    """

    def check(address: str) -> Deferred[LivenessResult]:
        """
        Check one address.

        @param address: An IPv4/IPv6 address or a host name.

        @return: A Deferred that fires with a L{LivenessResult}, or fails
            with C{ValueError} (bad address, before any traffic is sent),
            L{LivenessError} (the check itself failed),
            L{twisted.internet.defer.TimeoutError} or C{CancelledError}.
            Cancelling it releases everything the check holds (child
            process, socket).
        """


_LABEL = r"(?!-)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")


def validate_address(address: object) -> str:
    """
    Check that C{address} is an IP address or a DNS host name, safe to put
    on a command line.

    Rejects anything starting with C{-} (option injection), whitespace,
    shell or URL punctuation, empty strings, over-long names, and numeric
    forms that are not canonical IP addresses (C{"0x7f000001"}, C{"1.2.3"},
    C{"999.1.1.1"}), which C{ping} would otherwise interpret in surprising
    ways.

    @param address: The candidate.

    @return: The address, unchanged for host names, normalised for IP
        addresses.

    @raise ValueError: If it is none of these.
    """
    if not isinstance(address, str):
        raise ValueError(f"address must be a string, not {type(address).__name__}")
    return _validated(address)


@functools.lru_cache(maxsize=16384)
def _validated(address: str) -> str:
    """L{validate_address} of a string, remembered: a reboot wave checks each address every second."""
    if not address:
        raise ValueError("address is empty")
    if address.startswith("-"):
        raise ValueError(f"invalid address {address!r}: must not start with '-'")
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    if len(address.rstrip(".")) > 253 or not _HOSTNAME_RE.match(address):
        raise ValueError(f"invalid address {address!r}: not an IP address or host name")
    last_label = address.rstrip(".").rsplit(".", 1)[-1]
    if last_label.isdigit() or _looks_like_inet_aton(address):
        raise ValueError(f"invalid address {address!r}: not a canonical IP address")
    return address


def _looks_like_inet_aton(address: str) -> bool:
    """
    Would C{inet_aton} accept this (e.g. C{"0x7f000001"}, C{"127.1"})?
    """
    try:
        socket.inet_aton(address)
    except OSError:
        return False
    return True


def _display(address: str, port: int) -> str:
    """
    Format C{address:port}, bracketing IPv6 addresses.
    """
    if ":" in address:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def call_on_line(on_line: LineCallback | None, line: str) -> None:
    """
    Hand one line to the caller's callback; its exceptions are logged, never
    allowed to break the check.
    """
    if on_line is None:
        return
    try:
        on_line(line)
    except Exception:  # noqa: BLE001 -- a failing progress callback must not fail the action
        log.failure("on_line callback failed for {line!r}", line=line)


# ---------------------------------------------------------------- ICMP


_STATS_RE = re.compile(
    r"(?P<tx>\d+) packets transmitted, (?P<rx>\d+) (?:packets )?received"
    r"(?:, \+(?P<errors>\d+) errors)?"
)
_RTT_RE = re.compile(r"= [\d.]+/(?P<avg>[\d.]+)/")
_FROM_RE = re.compile(r"^From (?P<src>\S+?)(?: \([^)]*\))? icmp_seq=\d+ (?P<msg>.+)$")


def _summarise(lines: tuple[str, ...], alive: bool) -> str:
    """
    Turn ping's output into one line: C{"3/3 replies, rtt avg 0.040 ms"},
    C{"0/3 replies, 3 errors (Destination Host Unreachable from 10.0.0.1)"}.
    """
    tx = rx = errors = avg = None
    icmp_error = None
    for line in lines:
        stats = _STATS_RE.search(line)
        if stats:
            tx, rx, errors = stats.group("tx"), stats.group("rx"), stats.group("errors")
            continue
        if line.startswith(("rtt ", "round-trip ")):
            rtt = _RTT_RE.search(line)
            if rtt:
                avg = rtt.group("avg")
            continue
        sent_from = _FROM_RE.match(line)
        if sent_from:
            icmp_error = f"{sent_from.group('msg')} from {sent_from.group('src')}"
    if tx is None:
        return "replies received" if alive else "no reply"
    detail = f"{rx}/{tx} replies"
    if avg is not None:
        detail += f", rtt avg {avg} ms"
    if errors:
        detail += f", {errors} errors"
    if icmp_error and not alive:
        detail += f" ({icmp_error})"
    return detail


class _PingProtocol(ProcessProtocol):
    """
    Collects a C{ping} child's output line by line and fires C{deferred}
    when it exits.
    """

    def __init__(
        self,
        address: str,
        deferred: Deferred[LivenessResult],
        on_line: LineCallback | None,
    ) -> None:
        self.address = address
        self.deferred = deferred
        self.on_line = on_line
        self.lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._partial: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.get(childFD, b"") + data
        *complete, rest = buffered.split(b"\n")
        self._partial[childFD] = rest
        for raw in complete:
            self._line(childFD, raw)

    def _line(self, childFD: int, raw: bytes) -> None:
        line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
        self.lines.append(line)
        if childFD == 2:
            self.stderr_lines.append(line)
        call_on_line(self.on_line, line)

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in sorted(self._partial.items()):
            if rest:
                self._line(childFD, rest)
        self._partial.clear()
        if self.deferred.called:
            # Cancelled or timed out: we killed it; this is just the reaping.
            log.debug(
                "ping {address} ended after cancellation: {reason}",
                address=self.address,
                reason=reason.value,
            )
            return
        lines = tuple(self.lines)
        exit_code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        if exit_code in (0, 1):
            alive = exit_code == 0
            result = LivenessResult(alive=alive, detail=_summarise(lines, alive), lines=lines)
            log.debug(
                "ping {address}: {alive} ({detail})",
                address=self.address,
                alive="alive" if alive else "not alive",
                detail=result.detail,
            )
            self.deferred.callback(result)
            return
        if exit_code is None and signal is not None:
            why = f"was killed by signal {signal}"
        else:
            why = f"failed with exit status {exit_code}"
        said = (self.stderr_lines or self.lines or ["(no output)"])[-1]
        self.deferred.errback(
            LivenessError(
                f"ping {self.address} {why}: {said}",
                address=self.address,
                exit_code=exit_code,
                lines=lines,
            )
        )


@implementer(ILiveness)
@define
class IcmpPing:
    """
    Liveness by ICMP echo, running C{ping -n -c COUNT -W WAIT -- ADDRESS}.

    Exit status 0 (at least one reply) means alive, 1 (no reply) not alive,
    anything else fails the check with L{LivenessError} carrying ping's own
    message (e.g. C{"ping: foo.invalid: Name or service not known"}).
    iputils C{ping} picks IPv4 or IPv6 from the address itself.

    @ivar reactor: An C{IReactorProcess} and C{IReactorTime} provider.
    @ivar count: Echo requests to send (C{-c}); ping sends one a second.
    @ivar timeout: Overall deadline in seconds; when it passes the child is
        killed and the check fails with
        L{twisted.internet.defer.TimeoutError}.  Must leave room for
        C{count - 1} seconds of sending.
    @ivar ping_binary: The program: a name looked up in L{CHILD_ENV}'s PATH,
        or a path.
    @ivar on_line: Called with each output line (stdout and stderr) as it
        arrives.
    @ivar reply_wait: Seconds ping waits for each reply (C{-W}); by default
        as long as the deadline allows, at least 1.
    """

    reactor: IProcessReactor
    count: int = field(default=3)
    timeout: float = field(default=5.0)
    ping_binary: str = field(default="ping")
    on_line: LineCallback | None = field(default=None)
    reply_wait: int | None = field(default=None)

    @count.validator
    def _check_count(self, attribute: Any, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"count must be a positive integer, not {value!r}")

    @timeout.validator
    def _check_timeout(self, attribute: Any, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"timeout must be a positive number, not {value!r}")
        if value <= self.count - 1:
            raise ValueError(
                f"timeout {value} s is too short for {self.count} pings "
                f"(ping sends one per second)"
            )

    @reply_wait.validator
    def _check_reply_wait(self, attribute: Any, value: int | None) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"reply_wait must be a positive integer, not {value!r}")

    def wait_seconds(self) -> int:
        """
        The per-reply wait passed as C{-W}: by default what is left of the
        deadline after C{count - 1} seconds of sending and a second of slack,
        at least 1.
        """
        if self.reply_wait is not None:
            return self.reply_wait
        return max(1, int(self.timeout - (self.count - 1) - 1))

    def argv(self, address: str) -> list[str]:
        """
        The argument list for one check of an already validated C{address}.
        """
        return [
            self.ping_binary,
            "-n",
            "-c",
            str(self.count),
            "-W",
            str(self.wait_seconds()),
            "--",
            address,
        ]

    def _executable(self) -> str | None:
        if os.sep in self.ping_binary:
            return self.ping_binary
        return shutil.which(self.ping_binary, path=CHILD_ENV["PATH"])

    def check(self, address: str) -> Deferred[LivenessResult]:
        """
        Ping C{address}; see L{ILiveness.check}.
        """
        try:
            address = validate_address(address)
        except ValueError:
            return fail()
        executable = self._executable()
        if executable is None:
            return fail(
                LivenessError(
                    f"cannot ping {address}: {self.ping_binary!r} not found in "
                    f"{CHILD_ENV['PATH']} (install iputils-ping)",
                    address=address,
                )
            )

        transport: IProcessTransport | None = None

        def kill(d: Deferred[LivenessResult]) -> None:
            if transport is None:
                return
            log.debug("killing ping {address} (pid {pid})", address=address, pid=transport.pid)
            try:
                transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

        d: Deferred[LivenessResult] = Deferred(kill)
        protocol = _PingProtocol(address, d, self.on_line)
        argv = self.argv(address)
        log.debug("running {argv}", argv=argv)
        try:
            transport = self.reactor.spawnProcess(
                protocol, executable, argv, env=dict(CHILD_ENV)
            )
        except Exception as e:  # noqa: BLE001 -- any failure to start ping fails this check
            return fail(
                LivenessError(f"cannot run {executable}: {e}", address=address)
            )
        d.addTimeout(self.timeout, self.reactor)
        return d


# ---------------------------------------------------------------- TCP


_REASONS: list[tuple[type[BaseException], str]] = [
    (error.ConnectionRefusedError, "connection refused by {where}"),
    (error.NoRouteError, "no route to {where}"),
    (error.TimeoutError, "no connection to {where} within {timeout:g} s"),
    (error.TCPTimedOutError, "no connection to {where} within {timeout:g} s"),
]


@implementer(ILiveness)
@define
class TcpConnect:
    """
    Liveness by opening a TCP connection to C{port} and closing it at once.

    Connected means alive; refused, unreachable or no answer within
    C{timeout} means not alive, with the reason in C{detail}.  A host name
    that does not resolve fails the check with L{LivenessError}.

    @ivar reactor: An C{IReactorTCP}, C{IReactorTime} and (for host names)
        C{IReactorPluggableNameResolver} provider.
    @ivar port: The TCP port, e.g. 22.
    @ivar timeout: Seconds to wait for the connection.
    @ivar on_line: Called with progress lines, like L{IcmpPing.on_line}.
    @ivar plain_socket: Connect IP literals with a plain non-blocking socket
        the reactor watches (L{roller.drivers.liveness_socket}) instead of
        Twisted's TCP client: the same answers for a fraction of the CPU.
        C{None} (the default): when the reactor is a real one (a
        C{PosixReactorBase}, which provides C{IReactorFDSet}); test
        reactors that only record connections get Twisted's client.  Host
        names always go through L{HostnameEndpoint}.
    """

    reactor: ITcpReactor
    port: int = field()
    timeout: float = field(default=5.0)
    on_line: LineCallback | None = field(default=None)
    plain_socket: bool | None = field(default=None)

    @port.validator
    def _check_port(self, attribute: Any, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise ValueError(f"port must be an integer 1-65535, not {value!r}")

    @timeout.validator
    def _check_timeout(self, attribute: Any, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"timeout must be a positive number, not {value!r}")

    def endpoint(self, address: str) -> IStreamClientEndpoint:
        """
        The endpoint for an already validated C{address}: TCP4/TCP6 for IP
        literals, L{HostnameEndpoint} for names.
        """
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return HostnameEndpoint(self.reactor, address, self.port, timeout=self.timeout)
        if ip.version == 6:
            return TCP6ClientEndpoint(self.reactor, address, self.port, timeout=self.timeout)
        return TCP4ClientEndpoint(self.reactor, address, self.port, timeout=self.timeout)

    def check(self, address: str) -> Deferred[LivenessResult]:
        """
        Connect to C{address}:C{port}; see L{ILiveness.check}.
        """
        try:
            address = validate_address(address)
        except ValueError:
            return fail()
        if self._plain(address):
            return self._check_plain(address)
        where = _display(address, self.port)
        lines: list[str] = []

        def say(line: str) -> None:
            lines.append(line)
            call_on_line(self.on_line, line)

        cancelled = False

        def cancel(d: Deferred[LivenessResult]) -> None:
            nonlocal cancelled
            cancelled = True
            attempt.cancel()

        d: Deferred[LivenessResult] = Deferred(cancel)
        started = self.reactor.seconds()
        say(f"connecting to {where}")
        factory = Factory.forProtocol(Protocol)
        factory.noisy = False  # no "Starting factory" line per probe
        attempt = self.endpoint(address).connect(factory)

        def connected(protocol: Protocol) -> LivenessResult:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            elapsed_ms = (self.reactor.seconds() - started) * 1000
            detail = f"connected to {where} in {elapsed_ms:.1f} ms"
            say(detail)
            return LivenessResult(alive=True, detail=detail, lines=tuple(lines))

        def failed(reason: Failure) -> LivenessResult:
            for kind, template in _REASONS:
                if reason.check(kind):
                    detail = template.format(where=where, timeout=self.timeout)
                    break
            else:
                if reason.check(error.DNSLookupError):
                    say(f"cannot resolve {address}: {reason.value}")
                    raise LivenessError(
                        f"cannot check {where}: host name {address!r} does not resolve",
                        address=address,
                        lines=tuple(lines),
                    )
                if not reason.check(error.ConnectError):
                    return reason  # type: ignore[return-value]
                detail = f"cannot connect to {where}: {reason.getErrorMessage()}"
            say(detail)
            return LivenessResult(alive=False, detail=detail, lines=tuple(lines))

        def deliver(result: Any) -> None:
            if cancelled or d.called:
                # d has already failed with CancelledError; swallow whatever
                # the aborted attempt produced.
                return
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

        attempt.addCallbacks(connected, failed).addBoth(deliver)

        def timed_out(result: Any, timeout: float) -> Any:
            if isinstance(result, Failure) and result.check(CancelledError):
                detail = f"no connection to {where} within {timeout:g} s"
                say(detail)
                return LivenessResult(alive=False, detail=detail, lines=tuple(lines))
            return result

        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=timed_out)
        return d


    def _plain(self, address: str) -> bool:
        use = self.plain_socket
        if use is None:
            use = self.plain_socket = isinstance(self.reactor, PosixReactorBase)
        return use and _is_ip_literal(address)

    def _check_plain(self, address: str) -> Deferred[LivenessResult]:
        on_line = self.on_line
        connecting = f"connecting to {_display(address, self.port)}"
        call_on_line(on_line, connecting)

        def result(outcome: Outcome) -> LivenessResult:
            alive, detail = outcome
            call_on_line(on_line, detail)
            return LivenessResult(alive=alive, detail=detail, lines=(connecting, detail))

        reactor: IFdReactor = self.reactor  # type: ignore[assignment]  # checked by _plain
        return socket_probe(reactor, address, self.port, self.timeout).addCallback(result)


def _is_ip_literal(address: str) -> bool:
    """C{address} (validated) is an IP address: a host name has a letter in its last label."""
    return ":" in address or address.rsplit(".", 1)[-1].isdigit()


# ---------------------------------------------------------------- factory


def liveness_for(
    method: str,
    reactor: IDriverReactor,
    *,
    port: int | None = None,
    on_line: LineCallback | None = None,
    **kw: Any,
) -> ILiveness:
    """
    Build the liveness check named C{method}.

    @param method: C{"icmp"} (L{IcmpPing}) or C{"tcp"} (L{TcpConnect}, which
        needs C{port}).
    @param reactor: The reactor to run it on.
    @param port: The TCP port for C{"tcp"}; must be C{None} for C{"icmp"}.
    @param on_line: Progress callback, see L{IcmpPing.on_line}.
    @param kw: Further keyword arguments for the class (C{timeout},
        C{count}, ...).

    @raise ValueError: Unknown method, or C{port} missing or misplaced.
    """
    if method == "icmp":
        if port is not None:
            raise ValueError("liveness method 'icmp' takes no port")
        return IcmpPing(reactor, on_line=on_line, **kw)
    if method == "tcp":
        if port is None:
            raise ValueError("liveness method 'tcp' needs a port")
        return TcpConnect(reactor, port, on_line=on_line, **kw)
    raise ValueError(f"unknown liveness method {method!r} (known: 'icmp', 'tcp')")
