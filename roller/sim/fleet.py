"""
A fleet simulator: fake CI machines that really go down and come back up.

Tests and the demo share it.  Everything runs on one injected reactor; only
L{main} (the C{python -m roller.sim.fleet} entry point) picks the global
one.

    fleet = Fleet(reactor, 10, ssh_port=2222, down_for=10)
    await fleet.start()                      # all machines listen
    fleet.write_client_files(directory)      # key, known_hosts, secrets.toml
    fleet.inventory_json()                   # roller Machine JSON dicts
    ...
    await fleet.stop()

Pieces:

  - L{PowerState}: the power of one simulated machine (C{on}, listeners,
    C{power_off}/C{power_on}/C{reboot}/C{cycle}, a C{history} of
    C{(time, event)}).  It knows nothing of SSH; SNMP PDU, IPMI and Redfish
    front-ends attach to the same object.
  - L{SimulatedMachine}: a Conch SSH server on C{address:ssh_port} that
    listens only while the power is on.  C{reboot}, C{sudo reboot},
    C{shutdown -r now} and C{shutdown -f -t 3 -r} are accepted and, after
    C{reboot_delay} seconds, call C{power.reboot(down_for)}.  When the power
    goes off the listening port is closed and every connection is dropped,
    so SSH and a TCP-connect liveness check both fail; when it comes back
    the machine listens again on the same address and port.
  - L{Fleet}: N machines on distinct loopback addresses (the whole of
    127.0.0.0/8 is local on Linux, no configuration needed), one host key
    per machine, one user key pair for roller; optionally, for any subset,
    an IPMI BMC (a real C{ipmi_sim}) and/or a Redfish service
    (L{roller.sim.redfish_sim}) that switch the machine's PowerState,
    written to the inventory (C{ipmi}, C{redfish}, C{reboot_methods}) and
    the secrets file (credential C{fleet-bmc}) like its SSH access.

Behaviours (per machine, see L{BEHAVIOURS}):

  - C{"normal"}: as above.
  - C{"hang"}: accepts TCP connections and never says anything (the SSH
    handshake never completes): for timeout tests.
  - C{"refuse-reboot"}: every reboot command, with or without C{sudo},
    exits 1 with "permission denied" on stderr; other commands work.
  - C{"never-down"}: reboot commands exit 0 but the machine never goes down.

Reboot styles (per machine, see L{REBOOT_STYLES}): C{"exit0"} answers a
reboot command with exit status 0 and closes the channel; C{"drop"} closes
the TCP connection at once without an exit status, as real hosts often do
when C{reboot} kills sshd.  Either way the power goes down C{reboot_delay}
seconds later.

Other commands: C{true}, C{false}, C{echo ...}, C{uptime},
C{cat /proc/uptime} (seconds since the last power-on: a driver can tell
that a reboot happened), C{hostname}, C{whoami}, C{sleep N} (answers after
N seconds: for command timeouts), C{exit N}; anything else exits 127 with
C{sh: 1: NAME: not found} on stderr, like C{/bin/sh}.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attrs import frozen
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.avatar import ConchUser
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import connection
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.common import getNS
from twisted.conch.ssh.factory import SSHFactory
from twisted.conch.ssh.keys import Key
from twisted.conch.ssh.transport import SSHServerTransport
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IReactorTCP,
    IReactorTime,
    IReactorUNIX,
)
from twisted.internet.protocol import Factory, Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

log = Logger()

__all__ = [
    "BEHAVIOURS",
    "REBOOT_STYLES",
    "ClientFiles",
    "Fleet",
    "PowerState",
    "SimulatedMachine",
    "fleet_addresses",
    "generate_key",
    "main",
]

BEHAVIOURS = ("normal", "hang", "refuse-reboot", "never-down")
REBOOT_STYLES = ("exit0", "drop")
DEFAULT_USER = "roller"
DEFAULT_CREDENTIAL = "fleet-ssh"
DEFAULT_BMC_CREDENTIAL = "fleet-bmc"

PowerListener = Callable[[bool], object]


class IFleetReactor(IReactorTime, IReactorTCP, IReactorUNIX):
    """
    What the fleet simulator needs of its reactor: time, TCP listeners (the
    SSH servers, Redfish BMCs) and a UNIX listener (an IPMI BMC's chassis
    control).  The global reactor and C{MemoryReactorClock} provide it.
    """


def generate_key() -> Key:
    """A fresh ed25519 private key as a Conch L{Key} (about 60 us)."""
    return Key(ed25519.Ed25519PrivateKey.generate())


# ---------------------------------------------------------------- power


class PowerState:
    """
    The power of one simulated machine, shared by all its front-ends.

    Front-ends (the SSH server, an SNMP PDU outlet, an IPMI or Redfish BMC)
    call the methods; whoever must react to the power (the SSH server that
    stops listening) registers a listener.

    @ivar history: C{(time, event)} pairs, oldest first.  Events are the
        requests C{"power_off"}, C{"power_on"}, C{"reboot"}, C{"cycle"} and
        the transitions C{"down"} and C{"up"}; see L{transitions}.
    @ivar default_down_for: Seconds off for L{reboot}/L{cycle} without an
        argument.
    @ivar name: For log messages.
    """

    def __init__(self, clock: IReactorTime, on: bool = True, *, default_down_for: float = 5.0, name: str = ""):
        self._clock = clock
        self._on = bool(on)
        self._listeners: list[PowerListener] = []
        self._pending: IDelayedCall | None = None
        self.default_down_for = default_down_for
        self.name = name
        self.history: list[tuple[float, str]] = []

    def __repr__(self) -> str:
        return f"<PowerState {self.name or hex(id(self))} {'on' if self._on else 'off'}>"

    @property
    def on(self) -> bool:
        """Whether the machine has power."""
        return self._on

    @property
    def pending(self) -> IDelayedCall | None:
        """The scheduled power-on of a L{reboot}/L{cycle} in progress, if any."""
        return self._pending

    def transitions(self) -> list[tuple[float, str]]:
        """Only the C{"down"} and C{"up"} entries of L{history}."""
        return [(t, e) for t, e in self.history if e in ("down", "up")]

    def events(self) -> list[str]:
        """The event names of L{history}, without times."""
        return [e for _, e in self.history]

    def add_listener(self, listener: PowerListener) -> None:
        """Call C{listener(on)} after every transition."""
        self._listeners.append(listener)

    def remove_listener(self, listener: PowerListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def power_off(self) -> None:
        """Cut the power now; cancels a scheduled power-on."""
        self._record("power_off")
        self._cancel_pending()
        self._set(False)

    def power_on(self) -> None:
        """Power on now (no-op if on); cancels a scheduled power-on."""
        self._record("power_on")
        self._cancel_pending()
        self._set(True)

    def reboot(self, down_for: float | None = None) -> None:
        """
        Go down now and come back after C{down_for} seconds (default
        L{default_down_for}).  Like a PDU outlet reboot, this powers a
        machine that is off on too; a front-end with other semantics (IPMI
        reset of a machine that is off) checks L{on} first.
        """
        self._record("reboot")
        self._off_then_on(down_for)

    def cycle(self, down_for: float | None = None) -> None:
        """Power cycle: off now, on after C{down_for} seconds."""
        self._record("cycle")
        self._off_then_on(down_for)

    def stop(self) -> None:
        """Cancel a scheduled power-on (end of a test or of the demo)."""
        self._cancel_pending()

    # -- internals

    def _off_then_on(self, down_for: float | None) -> None:
        down_for = self.default_down_for if down_for is None else down_for
        if down_for < 0:
            raise ValueError(f"down_for must not be negative, got {down_for!r}")
        self._cancel_pending()
        self._set(False)
        self._pending = self._clock.callLater(down_for, self._come_back)

    def _come_back(self) -> None:
        self._pending = None
        self._set(True)

    def _cancel_pending(self) -> None:
        if self._pending is not None:
            if self._pending.active():
                self._pending.cancel()
            self._pending = None

    def _record(self, event: str) -> None:
        self.history.append((self._clock.seconds(), event))

    def _set(self, on: bool) -> None:
        if on == self._on:
            return
        self._on = on
        self._record("up" if on else "down")
        for listener in list(self._listeners):
            try:
                listener(on)
            except Exception:  # noqa: BLE001 -- one failing front-end must not keep the others from the news
                log.failure("power listener {listener!r} of {power!r} failed", listener=listener, power=self)


# ---------------------------------------------------------------- SSH server


def _parse_command(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def _is_reboot(argv: Sequence[str]) -> bool:
    """C{reboot}, C{shutdown -r ...}, optionally after C{sudo [-n]} and a path."""
    argv = list(argv)
    if argv and argv[0] == "sudo":
        argv = argv[1:]
        while argv and argv[0].startswith("-"):
            argv = argv[1:]
    if not argv:
        return False
    program = argv[0].rsplit("/", 1)[-1]
    if program == "reboot":
        return True
    if program == "shutdown":
        return any(a in ("-r", "/r", "--reboot") for a in argv[1:])
    return False


def _uptime_line(now: float, up: float) -> str:
    clock = time.strftime("%H:%M:%S", time.gmtime(now))
    minutes = int(up // 60)
    if minutes < 60:
        span = f"{minutes} min"
    elif minutes < 24 * 60:
        span = f"{minutes // 60}:{minutes % 60:02d}"
    else:
        span = f"{minutes // (24 * 60)} days, {minutes % (24 * 60) // 60}:{minutes % 60:02d}"
    return f" {clock} up {span},  1 user,  load average: 0.00, 0.00, 0.00\n"


class _SessionChannel(SSHChannel):
    """
    A session channel that runs one C{exec} request against the machine.
    C{pty-req} and C{env} are accepted and ignored; C{shell} is refused.
    """

    name = b"session"

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        assert isinstance(self.avatar, _Avatar)
        self.user: _Avatar = self.avatar
        self.machine: SimulatedMachine = self.avatar.machine
        self._started: bool = False
        self._timer: IDelayedCall | None = None

    def request_pty_req(self, data: bytes) -> int:
        return 1

    def request_env(self, data: bytes) -> int:
        return 1

    def request_shell(self, data: bytes) -> int:
        return 0

    def request_exec(self, data: bytes) -> int:
        if self._started:
            return 0
        self._started = True
        command, _ = getNS(data)
        # Answer after the channel-success reply has gone out.
        self._timer = self.machine.reactor.callLater(0, self._run, command.decode("utf-8", "replace"))
        return 1

    def _run(self, command: str) -> None:
        self._timer = None
        if self.closing:
            return
        self.machine._execute(self, command)

    # -- used by SimulatedMachine._execute

    def finish(self, status: int, out: str = "", err: str = "") -> None:
        if self.closing:
            return
        if out:
            self.write(out.encode("utf-8"))
        if err:
            self.writeExtended(connection.EXTENDED_DATA_STDERR, err.encode("utf-8"))
        assert self.conn is not None  # set when the channel was opened
        self.conn.sendRequest(self, b"exit-status", struct.pack(">L", status & 0xFFFFFFFF))
        self.conn.sendEOF(self)
        self.loseConnection()

    def finish_later(self, delay: float, status: int, out: str = "", err: str = "") -> None:
        def done() -> None:
            self._timer = None
            self.finish(status, out, err)

        self._timer = self.machine.reactor.callLater(delay, done)

    def drop_connection(self) -> None:
        """Close the TCP connection without an exit status or SSH goodbye."""
        assert self.conn is not None and self.conn.transport is not None
        tcp = self.conn.transport.transport
        assert tcp is not None
        tcp.loseConnection()

    def closed(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _Avatar(ConchUser):
    def __init__(self, username: bytes, machine: SimulatedMachine):
        super().__init__()
        self.username = username
        self.machine = machine
        self.channelLookup[b"session"] = _SessionChannel


@implementer(IRealm)
class _Realm:
    def __init__(self, machine: SimulatedMachine):
        self.machine = machine

    def requestAvatar(self, avatarId: bytes | tuple[()], mind: object,
                      *interfaces: type[Interface]) -> tuple[type[Interface], _Avatar, Callable[[], None]]:
        if IConchUser not in interfaces or not isinstance(avatarId, bytes):
            raise NotImplementedError("only SSH")
        return IConchUser, _Avatar(avatarId, self.machine), lambda: None


class _ServerTransport(SSHServerTransport):
    factory: _SSHFactory

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        # Conch logs every client's goodbye ("disconnected by user") as an
        # error; for a simulator that is noise.
        log.debug("{machine}: client disconnected, code {code}: {description!r}",
                  machine=self.factory.machine.name, code=reasonCode, description=description)

    def connectionMade(self) -> None:
        self.factory.machine._connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.machine._connections.discard(self)
        super().connectionLost(reason)


#: Key exchanges that need a moduli file (RFC 4419 group exchange), which the
#: simulator does not have.  Twisted decides this with its private
#: C{twisted.conch.ssh._kex.isDynamicPrimesGroup}; the simulator goes by the
#: RFC's names instead, and tests/test_fleet.py checks that the result is what
#: Twisted's own C{SSHFactory.buildProtocol} offers without primes, so a new
#: dynamic-group algorithm in Twisted fails that test instead of a handshake.
DYNAMIC_GROUP_PREFIX = b"diffie-hellman-group-exchange-"


def fixed_group_key_exchanges(algorithms: Iterable[bytes]) -> list[bytes]:
    """C{algorithms} without the group-exchange ones (those need primes from a moduli file)."""
    return [k for k in algorithms if not k.startswith(DYNAMIC_GROUP_PREFIX)]


class _SSHFactory(SSHFactory):
    protocol = _ServerTransport
    noisy = False
    primes = None  # no moduli file: fixed groups and curve25519 only

    def __init__(self, machine: SimulatedMachine):
        self.machine = machine
        key = machine.host_key
        self.publicKeys = {key.sshType(): key.public()}
        self.privateKeys = {key.sshType(): key}
        self.portal = Portal(
            _Realm(machine),
            [SSHPublicKeyChecker(InMemorySSHKeyDB({machine.user.encode(): list(machine.authorized_keys)}))],
        )

    def buildProtocol(self, addr: IAddress | None) -> SSHServerTransport:
        # SSHFactory.buildProtocol logs a line per connection about the
        # missing moduli file; do its work without the noise.
        t = Factory.buildProtocol(self, addr)
        assert isinstance(t, SSHServerTransport)
        t.supportedPublicKeys = [
            alg for key in self.privateKeys.values() for alg in key.supportedSignatureAlgorithms()
        ]
        t.supportedKeyExchanges = fixed_group_key_exchanges(t.supportedKeyExchanges)
        return t


class _Silent(Protocol):
    """The "hang" behaviour: accept, read and never answer."""

    def _machine(self) -> SimulatedMachine:
        assert isinstance(self.factory, _SilentFactory)
        return self.factory.machine

    def connectionMade(self) -> None:
        self._machine()._connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._machine()._connections.discard(self)


class _SilentFactory(ServerFactory):
    protocol = _Silent
    noisy = False

    def __init__(self, machine: SimulatedMachine):
        self.machine = machine


class SimulatedMachine:
    """
    One simulated machine: an SSH server that listens while its power is on.

    The public attributes may be changed while it runs (a test can make a
    machine start refusing reboots); C{behaviour} C{"hang"} (a different
    listener), C{address}, C{ssh_port}, C{host_key}, C{authorized_keys} and
    C{user} take effect at the next power-on.

    @ivar commands: C{(time, command, exit status or None when the
        connection was dropped)} for every command run, oldest first.
    @ivar booted_at: Reactor time of the last power-on (or of L{start}).
    @ivar last_error: The failure of the last attempt to listen, if it
        failed (another process holds the port).
    """

    def __init__(
        self,
        reactor: IFleetReactor,
        address: str,
        ssh_port: int,
        host_key: Key,
        authorized_keys: Iterable[Key],
        power: PowerState,
        reboot_delay: float = 1.0,
        down_for: float = 5.0,
        behaviour: str = "normal",
        *,
        reboot_style: str = "exit0",
        user: str = DEFAULT_USER,
        name: str | None = None,
    ):
        if ipaddress.ip_address(address).version != 4:
            raise ValueError(f"address must be IPv4, got {address!r}")
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour must be one of {', '.join(BEHAVIOURS)}, got {behaviour!r}")
        if reboot_style not in REBOOT_STYLES:
            raise ValueError(f"reboot_style must be one of {', '.join(REBOOT_STYLES)}, got {reboot_style!r}")
        self.reactor = reactor
        self.address = address
        self.ssh_port = ssh_port
        self.host_key = host_key
        self.authorized_keys = list(authorized_keys)
        self.power = power
        self.reboot_delay = reboot_delay
        self.down_for = down_for
        self.behaviour = behaviour
        self.reboot_style = reboot_style
        self.user = user
        self.name = name or address
        self.commands: list[tuple[float, str, int | None]] = []
        self.booted_at = reactor.seconds()
        self.last_error: Failure | None = None
        self.running = False
        self._port: IListeningPort | None = None
        self._closing: Deferred | None = None
        self._connections: set[Any] = set()
        self._os_reboot: IDelayedCall | None = None

    def __repr__(self) -> str:
        return (f"<SimulatedMachine {self.name} {self.address}:{self.ssh_port} {self.behaviour} "
                f"power {'on' if self.power.on else 'off'}>")

    @property
    def listening(self) -> bool:
        """Whether the port is open right now."""
        return self._port is not None

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def start(self) -> Deferred:
        """
        Follow the power from now on.  The Deferred fires once the machine
        listens (at once if the power is off: it will listen when the power
        comes on), or fails with C{CannotListenError}.
        """
        if not self.running:
            self.running = True
            self.booted_at = self.reactor.seconds()
            self.power.add_listener(self._power_changed)
        if not self.power.on:
            return succeed(None)
        return self._listen()

    def stop(self) -> Deferred:
        """Stop listening, drop every connection and forget the power."""
        self.running = False
        self.power.remove_listener(self._power_changed)
        self._cancel_os_reboot()
        self._go_dark()
        return self._when_closed()

    # -- power

    def _power_changed(self, on: bool) -> None:
        if not self.running:
            return
        if on:
            self.booted_at = self.reactor.seconds()
            log.debug("{machine} is up", machine=self.name)
            self._listen().addErrback(lambda f: None)  # recorded in last_error
        else:
            log.debug("{machine} is down", machine=self.name)
            self._cancel_os_reboot()
            self._go_dark()

    def _go_dark(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            closing = defer.maybeDeferred(port.stopListening)
            if not closing.called:
                self._closing = closing

            def closed(result: Any) -> None:
                if self._closing is closing:
                    self._closing = None
                if isinstance(result, Failure):
                    log.failure("{machine} could not stop listening", result, machine=self.name)

            closing.addBoth(closed)
        for conn in list(self._connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abortConnection()
        self._connections.clear()

    def _when_closed(self) -> Deferred:
        d: Deferred = Deferred()
        if self._closing is None:
            d.callback(None)
        else:
            def fire(result: object) -> object:
                d.callback(None)
                return result

            self._closing.addBoth(fire)
        return d

    def _listen(self) -> Deferred:
        def listen(_: Any) -> IListeningPort | None:
            if not (self.running and self.power.on):
                return None
            if self._port is None:
                factory = _SilentFactory(self) if self.behaviour == "hang" else _SSHFactory(self)
                try:
                    # Twisted annotates listenTCP's factory as a ServerFactory; any IProtocolFactory works.
                    self._port = self.reactor.listenTCP(
                        self.ssh_port, factory, backlog=128, interface=self.address)  # type: ignore[arg-type]
                except Exception:
                    self.last_error = Failure()
                    log.error("{machine} cannot listen on {address}:{port}: {error}", machine=self.name,
                              address=self.address, port=self.ssh_port, error=self.last_error.value)
                    raise
                self.last_error = None
            return self._port

        return self._when_closed().addCallback(listen)

    # -- commands

    def _cancel_os_reboot(self) -> None:
        if self._os_reboot is not None and self._os_reboot.active():
            self._os_reboot.cancel()
        self._os_reboot = None

    def _schedule_os_reboot(self) -> None:
        if self.behaviour == "never-down" or self._os_reboot is not None:
            return

        def go_down() -> None:
            self._os_reboot = None
            log.debug("{machine} reboots (down for {down_for} s)", machine=self.name, down_for=self.down_for)
            self.power.reboot(self.down_for)

        self._os_reboot = self.reactor.callLater(self.reboot_delay, go_down)

    def _execute(self, channel: _SessionChannel, command: str) -> None:
        now = self.reactor.seconds()
        argv = _parse_command(command)
        log.info("{machine} runs {command!r}", machine=self.name, command=command)

        def answer(status: int, out: str = "", err: str = "") -> None:
            self.commands.append((now, command, status))
            channel.finish(status, out, err)

        if _is_reboot(argv):
            if self.behaviour == "refuse-reboot":
                program = " ".join(argv[:2]) if argv[0] == "sudo" else argv[0]
                answer(1, err=f"{program}: permission denied\n")
                return
            self._schedule_os_reboot()
            if self.reboot_style == "drop":
                self.commands.append((now, command, None))
                channel.drop_connection()
            else:
                answer(0)
            return
        program = argv[0] if argv else ""
        if not argv or program == "true" or program == ":":
            answer(0)
        elif program == "false":
            answer(1)
        elif program == "echo":
            answer(0, " ".join(argv[1:]) + "\n")
        elif program == "hostname":
            answer(0, self.name + "\n")
        elif program == "whoami":
            answer(0, channel.user.username.decode() + "\n")
        elif program == "uptime":
            answer(0, _uptime_line(now, now - self.booted_at))
        elif argv == ["cat", "/proc/uptime"]:
            answer(0, f"{now - self.booted_at:.2f} 0.00\n")
        elif program == "exit":
            try:
                answer(int(argv[1]) if len(argv) > 1 else 0)
            except ValueError:
                answer(2, err=f"sh: 1: exit: Illegal number: {argv[1]}\n")
        elif program == "sleep" and len(argv) == 2:
            try:
                seconds = float(argv[1])
            except ValueError:
                answer(1, err=f"sleep: invalid time interval '{argv[1]}'\n")
                return
            self.commands.append((now, command, 0))
            channel.finish_later(seconds, 0)
        else:
            answer(127, err=f"sh: 1: {program}: not found\n")


# ---------------------------------------------------------------- fleet


def fleet_addresses(base: str, count: int) -> list[str]:
    """
    C{count} loopback addresses from C{base} ("127.0.1."): 127.0.1.1 to
    127.0.1.254, then 127.0.2.1 and on (no .0 or .255 hosts).
    """
    prefix = base.rstrip(".")
    parts = prefix.split(".")
    if len(parts) != 3 or not all(p.isdigit() and int(p) <= 255 for p in parts) or parts[0] != "127":
        raise ValueError(f"base must look like '127.X.Y.', got {base!r}")
    a, b, c = (int(p) for p in parts)
    if count < 0:
        raise ValueError("count must not be negative")
    last_c = c + (count - 1) // 254 if count else c
    if last_c > 255:
        raise ValueError(f"{count} machines do not fit after {base} (at most {(256 - c) * 254})")
    return [f"{a}.{b}.{c + i // 254}.{i % 254 + 1}" for i in range(count)]


@frozen
class ClientFiles:
    """What L{Fleet.write_client_files} wrote (absolute paths)."""

    directory: str
    private_key: str
    public_key: str
    known_hosts: str
    known_hosts_openssh: str
    secrets: str


class Fleet:
    """
    C{count} simulated machines on loopback addresses.

    @param base: Address prefix; see L{fleet_addresses}.
    @param ssh_port: The port every machine listens on (each on its own
        address).
    @param overrides: Per machine index (0-based), keyword arguments for
        L{SimulatedMachine} (C{behaviour}, C{reboot_style},
        C{reboot_delay}, C{down_for}), e.g. C{{1: {"behaviour": "hang"}}}.
    @param shared_host_key: One host key for all machines instead of one
        each (generation is fast either way: ~60 ms for 1000).
    @param user_key: roller's private key; generated if not given.
    @param ipmi: Indices of the machines that get an IPMI BMC: a real
        C{ipmi_sim} on 127.0.0.1 (a free UDP port each) whose chassis
        control switches the machine's L{PowerState} (see
        L{roller.sim.ipmisim}; C{openipmi} must be installed).
    @param redfish: Indices of the machines that get a Redfish service
        (L{roller.sim.redfish_sim.RedfishBmc}) on their own address,
        at C{redfish_port} (0: a free port each).
    @param bmc_user: The BMC user (IPMI and Redfish).
    @param bmc_password: Its password; random by default.
    @param bmc_credential: The name of that credential in C{secrets.toml}.
    @param bmc_dir: Where the C{ipmi_sim} files go (a temporary directory
        per BMC by default).

    @ivar machines: The L{SimulatedMachine}s, in address order.
    @ivar user_key: roller's private key (authorized on every machine).
    """

    def __init__(
        self,
        reactor: IFleetReactor,
        count: int,
        base: str = "127.0.1.",
        ssh_port: int = 2222,
        *,
        user: str = DEFAULT_USER,
        reboot_delay: float = 1.0,
        down_for: float = 5.0,
        behaviour: str = "normal",
        reboot_style: str = "exit0",
        overrides: Mapping[int, Mapping[str, Any]] | None = None,
        shared_host_key: bool = False,
        user_key: Key | None = None,
        worker_prefix: str = "sim",
        credential: str = DEFAULT_CREDENTIAL,
        ipmi: Iterable[int] = (),
        redfish: Iterable[int] = (),
        redfish_port: int = 0,
        bmc_user: str = "admin",
        bmc_password: str | None = None,
        bmc_credential: str = DEFAULT_BMC_CREDENTIAL,
        bmc_dir: str | os.PathLike | None = None,
    ):
        self.reactor = reactor
        self.ssh_port = ssh_port
        self.user = user
        self.credential = credential
        self.worker_prefix = worker_prefix
        self.user_key = user_key if user_key is not None else generate_key()
        self._width = max(3, len(str(count)))
        overrides = dict(overrides or {})
        unknown = [i for i in overrides if not 0 <= i < count]
        if unknown:
            raise ValueError(f"overrides for machines that do not exist: {unknown}")
        self.ipmi_indices = sorted(set(ipmi))
        self.redfish_indices = sorted(set(redfish))
        unknown = [i for i in self.ipmi_indices + self.redfish_indices if not 0 <= i < count]
        if unknown:
            raise ValueError(f"BMCs for machines that do not exist: {sorted(set(unknown))}")
        self.redfish_port = redfish_port
        self.bmc_user = bmc_user
        # IPMI passwords are at most 16 bytes for ipmi_sim (20 in IPMI 2.0).
        self.bmc_password = bmc_password if bmc_password is not None else "bmc-" + os.urandom(6).hex()
        self.bmc_credential = bmc_credential
        self.bmc_dir = Path(bmc_dir) if bmc_dir is not None else None
        #: worker id -> the machine's IPMI BMC (an L{roller.sim.ipmisim.IpmiSim}), once started.
        self.ipmi_bmcs: dict[str, Any] = {}
        #: worker id -> the machine's Redfish BMC (a L{roller.sim.redfish_sim.RedfishBmc}), once started.
        self.redfish_bmcs: dict[str, Any] = {}
        shared = generate_key() if shared_host_key else None
        self.machines: list[SimulatedMachine] = []
        for i, address in enumerate(fleet_addresses(base, count)):
            name = self.worker_id(i)
            kw: dict[str, Any] = dict(reboot_delay=reboot_delay, down_for=down_for, behaviour=behaviour,
                                      reboot_style=reboot_style)
            kw.update(overrides.get(i, {}))
            power = PowerState(reactor, default_down_for=kw["down_for"], name=name)
            self.machines.append(SimulatedMachine(
                reactor, address, ssh_port, shared or generate_key(), [self.user_key.public()], power,
                user=user, name=name, **kw,
            ))

    def __len__(self) -> int:
        return len(self.machines)

    def __iter__(self):
        return iter(self.machines)

    def __getitem__(self, index: int) -> SimulatedMachine:
        return self.machines[index]

    def worker_id(self, index: int) -> str:
        """C{sim-001} for index 0."""
        return f"{self.worker_prefix}-{index + 1:0{self._width}d}"

    def machine(self, name_or_address: str) -> SimulatedMachine:
        """The machine with that worker id or address."""
        for m in self.machines:
            if name_or_address in (m.name, m.address):
                return m
        raise KeyError(name_or_address)

    @property
    def addresses(self) -> list[str]:
        return [m.address for m in self.machines]

    def start(self) -> Deferred:
        """
        Start every machine.  Fires with the fleet once all listen; if one
        cannot listen the others are stopped again and the Deferred fails
        with that machine's error (e.g. C{CannotListenError}).
        """
        ds = [m.start() for m in self.machines]
        d = defer.gatherResults(ds, consumeErrors=True)

        def failed(f: Failure) -> Deferred:
            first = f.value.subFailure if isinstance(f.value, defer.FirstError) else f
            return self.stop().addCallback(lambda _: first)

        return d.addCallback(lambda _: self._start_bmcs()).addCallbacks(lambda _: self, failed)

    def _start_bmcs(self) -> None:
        """
        Start the Redfish services (each on its machine's address) and the
        IPMI BMCs (one C{ipmi_sim} per machine on 127.0.0.1, a free UDP
        port each), all sharing their machine's L{PowerState}.  Starting
        an C{ipmi_sim} blocks for its readiness probe (tens of ms).
        """
        from roller.sim.redfish_sim import RedfishBmc

        for i in self.redfish_indices:
            m = self.machines[i]
            bmc = RedfishBmc(m.power, users={self.bmc_user: self.bmc_password}, system_id=m.name,
                             down_for=m.down_for)
            self.redfish_bmcs[m.name] = bmc
            bmc.listen(self.reactor, m.address, self.redfish_port)
        if self.ipmi_indices:
            from roller.sim.ipmisim import IpmiSim

            for i in self.ipmi_indices:
                m = self.machines[i]
                workdir = self.bmc_dir / f"ipmi-{m.name}" if self.bmc_dir is not None else None
                sim = IpmiSim(workdir=workdir, username=self.bmc_user, password=self.bmc_password,
                              power=m.power, reactor=self.reactor, reset_down_for=m.down_for)
                self.ipmi_bmcs[m.name] = sim
                sim.start()

    def _stop_bmcs(self) -> Deferred:
        for sim in self.ipmi_bmcs.values():
            sim.stop()
        self.ipmi_bmcs.clear()
        bmcs = list(self.redfish_bmcs.values())
        self.redfish_bmcs.clear()
        return defer.gatherResults([defer.ensureDeferred(b.stop()) for b in bmcs])

    def stop(self) -> Deferred:
        """Stop every machine and cancel pending power-ons; fires when all ports are closed."""
        for m in self.machines:
            m.power.stop()
        bmcs = self._stop_bmcs()
        return defer.gatherResults([bmcs] + [m.stop() for m in self.machines]).addCallback(lambda _: None)

    # -- client side

    def known_hosts_lines(self, openssh_ports: bool = False) -> list[str]:
        """
        C{127.0.1.5 ssh-ed25519 AAAA...} per machine, the form Conch's
        C{KnownHostsFile} matches (it ignores ports).  With
        C{openssh_ports}, OpenSSH's C{[127.0.1.5]:2222 ...} form for a port
        other than 22.
        """
        lines = []
        for m in self.machines:
            host = m.address
            if openssh_ports and m.ssh_port != 22:
                host = f"[{host}]:{m.ssh_port}"
            lines.append(f"{host} {m.host_key.public().toString('openssh').decode('ascii')}")
        return lines

    def write_client_files(self, directory: str | os.PathLike) -> ClientFiles:
        """
        Write what a client needs into C{directory} (created if missing):
        C{fleet_ed25519} (the user private key, 0600) and C{.pub},
        C{known_hosts} (Conch form), C{known_hosts.openssh} (with ports, for
        C{ssh -o UserKnownHostsFile=...}) and C{secrets.toml} (0600) holding
        the credential C{[credentials.fleet-ssh] type = "ssh-key"}.
        """
        from roller.secrets import Credential, write_secrets

        d = Path(directory).resolve()
        d.mkdir(parents=True, exist_ok=True)
        key_path = d / "fleet_ed25519"
        _write(key_path, self.user_key.toString("openssh"), 0o600)
        pub = self.user_key.public().toString("openssh") + f" {self.user}@roller-fleet\n".encode()
        _write(d / "fleet_ed25519.pub", pub, 0o644)
        known = d / "known_hosts"
        _write(known, "".join(line + "\n" for line in self.known_hosts_lines()).encode(), 0o644)
        known_o = d / "known_hosts.openssh"
        _write(known_o, "".join(line + "\n" for line in self.known_hosts_lines(True)).encode(), 0o644)
        secrets = d / "secrets.toml"
        credentials = {self.credential: Credential(name=self.credential, kind="ssh-key", path=str(key_path))}
        if self.ipmi_indices or self.redfish_indices:
            credentials[self.bmc_credential] = Credential(name=self.bmc_credential, kind="password",
                                                          username=self.bmc_user, password=self.bmc_password)
        write_secrets(secrets, credentials)
        return ClientFiles(str(d), str(key_path), str(d / "fleet_ed25519.pub"), str(known), str(known_o), str(secrets))

    def inventory_json(self, worker_group: str = "sim") -> list[dict]:
        """roller Machine JSON for every machine (no secrets, credential by name)."""
        out = []
        for m in self.machines:
            entry: dict[str, Any] = {
                "worker_id": m.name,
                "worker_group": worker_group,
                "ip": m.address,
                "pool": worker_group,
                "tags": ["simulated"] + ([m.behaviour] if m.behaviour != "normal" else []),
                "ssh": {"user": m.user, "port": m.ssh_port, "credential": self.credential},
                "liveness": {"method": "tcp", "port": m.ssh_port},
                "reboot_methods": ["ssh_reboot"],
                "notes": f"fleet simulator: behaviour {m.behaviour}, reboot answers {m.reboot_style}, "
                         f"down for {m.down_for:g} s",
            }
            ipmi = self.ipmi_bmcs.get(m.name)
            if ipmi is not None:
                entry["ipmi"] = {"host": ipmi.host, "port": ipmi.port, "credential": self.bmc_credential}
                entry["reboot_methods"].append("ipmi_reset")
            redfish = self.redfish_bmcs.get(m.name)
            if redfish is not None:
                entry["redfish"] = {"url": redfish.url, "system": redfish.system_id,
                                    "credential": self.bmc_credential}
                entry["reboot_methods"].append("redfish_reboot")
            out.append(entry)
        return out

    def write_inventory(self, path: str | os.PathLike, worker_group: str = "sim") -> str:
        """Write L{inventory_json} as a JSON list; returns the path."""
        data = json.dumps(self.inventory_json(worker_group), indent=2) + "\n"
        _write(Path(path), data.encode(), 0o644)
        return str(path)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m roller.sim.fleet",
        description="Run simulated CI machines (SSH servers on loopback addresses that really reboot).",
    )
    p.add_argument("--count", type=int, default=10, help="number of machines (default 10)")
    p.add_argument("--dir", help="where to write the key, known_hosts, secrets.toml and inventory.json "
                                 "(default: a new temporary directory)")
    p.add_argument("--base", default="127.0.1.", help="address prefix (default 127.0.1.)")
    p.add_argument("--ssh-port", type=int, default=2222, help="SSH port on every address (default 2222)")
    p.add_argument("--down-for", type=float, default=10.0, help="seconds a rebooting machine stays down (default 10)")
    p.add_argument("--reboot-delay", type=float, default=1.0,
                   help="seconds between accepting a reboot and going down (default 1)")
    p.add_argument("--reboot-style", choices=REBOOT_STYLES, default="exit0",
                   help="answer reboot commands with exit 0 or drop the connection (default exit0)")
    p.add_argument("--worker-group", default="sim", help="worker group in inventory.json (default sim)")
    for kind in BEHAVIOURS[1:]:
        p.add_argument(f"--{kind}", type=int, default=0, metavar="N",
                       help=f"make the last N machines behave '{kind}'")
    p.add_argument("--ipmi", type=int, default=0, metavar="N",
                   help="give the first N machines an IPMI BMC (ipmi_sim on 127.0.0.1, a UDP port each)")
    p.add_argument("--redfish", type=int, default=0, metavar="N",
                   help="give the first N machines a Redfish service on their own address")
    p.add_argument("--redfish-port", type=int, default=8000,
                   help="Redfish port on every such address (default 8000; 0: a free port each)")
    p.add_argument("--verbose", "-v", action="store_true", help="log every command and power change")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run a fleet on the global reactor until SIGINT/SIGTERM.
    """
    args = _parser().parse_args(argv)
    special = [kind for kind in BEHAVIOURS[1:] for _ in range(getattr(args, kind.replace("-", "_")))]
    if args.count < 1 or len(special) > args.count:
        print("error: --count must be at least 1 and at least the number of special machines", file=sys.stderr)
        return 2
    if not (0 <= args.ipmi <= args.count and 0 <= args.redfish <= args.count):
        print("error: --ipmi and --redfish must be between 0 and --count", file=sys.stderr)
        return 2
    if args.ipmi:
        from roller.sim.ipmisim import skip_reason

        missing = skip_reason()
        if missing:
            print(f"error: --ipmi needs ipmi_sim: {missing}", file=sys.stderr)
            return 2
    overrides = {args.count - len(special) + i: {"behaviour": kind} for i, kind in enumerate(special)}

    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    level = LogLevel.debug if args.verbose else LogLevel.warn
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr),
                              [LogLevelFilterPredicate(defaultLogLevel=level)])],
        redirectStandardIO=False,
    )
    try:
        # The global reactor provides IFleetReactor; Twisted's stubs type it as a private common interface.
        fleet = Fleet(reactor, args.count, args.base, args.ssh_port,  # type: ignore[arg-type]
                      reboot_delay=args.reboot_delay, down_for=args.down_for, reboot_style=args.reboot_style,
                      overrides=overrides,
                      ipmi=range(args.ipmi), redfish=range(args.redfish), redfish_port=args.redfish_port)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    directory = args.dir or tempfile.mkdtemp(prefix="roller-fleet-")
    status = {"code": 0}

    def started(_: Any) -> None:
        files = fleet.write_client_files(directory)
        inventory = fleet.write_inventory(Path(files.directory) / "inventory.json", args.worker_group)
        first, last = fleet.machines[0], fleet.machines[-1]
        print(f"roller fleet simulator: {len(fleet)} machines {first.address} .. {last.address}, "
              f"ssh port {args.ssh_port}, user {fleet.user}")
        if overrides:
            print("  special: " + ", ".join(f"{fleet[i].name}={o['behaviour']}" for i, o in overrides.items()))
        print(f"  private key   {files.private_key}")
        print(f"  known_hosts   {files.known_hosts}  (OpenSSH form: {files.known_hosts_openssh})")
        print(f"  secrets       {files.secrets}  (credential {fleet.credential!r})")
        print(f"  inventory     {inventory}  (worker group {args.worker_group!r})")
        for name, sim in fleet.ipmi_bmcs.items():
            print(f"  ipmi          {name}: 127.0.0.1 udp port {sim.port}  (user {fleet.bmc_user}, "
                  f"credential {fleet.bmc_credential!r})")
        for name, bmc in fleet.redfish_bmcs.items():
            print(f"  redfish       {name}: {bmc.url}{bmc.system_path}  (user {fleet.bmc_user}, "
                  f"credential {fleet.bmc_credential!r})")
        print(f"  try: ssh -i {files.private_key} -o IdentitiesOnly=yes "
              f"-o UserKnownHostsFile={files.known_hosts_openssh} -p {args.ssh_port} "
              f"{fleet.user}@{first.address} uptime")
        print("Ctrl-C to stop.", flush=True)

    def failed(f: Failure) -> None:
        print(f"error: cannot start the fleet: {f.getErrorMessage()}", file=sys.stderr, flush=True)
        status["code"] = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: fleet.start().addCallbacks(started, failed))
    reactor.addSystemEventTrigger("before", "shutdown", fleet.stop)
    reactor.run()
    return status["code"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
