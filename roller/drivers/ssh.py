"""
SSH: run one command on a machine with Twisted Conch.

L{ConchShell} provides L{IRemoteShell}: C{run(target, command, on_line)}
opens a new SSH connection with
L{twisted.conch.endpoints.SSHCommandClientEndpoint.newConnection}, checks
the server's host key against roller's own known_hosts file, authenticates
with the private key of the machine's C{ssh-key} credential (never an
agent, never a password, never a prompt), runs the command with stdin
closed (like C{ssh -n}), streams its output lines to C{on_line}, and fires
with a L{CommandResult}.  Each call has its own connection and state, so
any number can be in flight on one reactor.

Build the L{SshTarget} from inventory and secrets with L{ssh_target}.

Host keys
=========

The known_hosts file uses OpenSSH's format, keyed by host I{and} port: a
host on port 22 is C{HOST}, on another port C{[HOST]:PORT}, exactly what
C{ssh-keyscan -p PORT HOST} prints (details: L{roller.drivers.known_hosts}).
roller does not use Conch's C{KnownHostsFile} matching, which ignores
ports; it passes Conch a C{KnownHostsFile} subclass whose
C{verifyHostKey} applies the target's policy:

  - C{strict} (the default): the key must be in the file.  An unknown host
    fails with L{HostKeyUnknown}; a host filed with other keys fails with
    L{HostKeyChanged}; a key filed C{@revoked} with L{HostKeyRevoked}.
  - C{accept-new}: as strict, except that a host with no line at all has
    its key appended to the file (locked, one atomic append; the file is
    created 0600) and accepted -- trust on first use.  A changed key is
    refused all the same.

The check runs during key exchange, before authentication: a host that
fails it never sees roller's key signature, let alone the command.

Errors
======

Every failure is an L{SshError} subclass whose message an operator can act
on, naming the host, port, user, key file and credential but never a
passphrase or key material:

  - L{SshConfigError} (L{SshKeyError}): the target cannot be built or the
    key file cannot be used (missing, not a private key, encrypted without a
    passphrase, wrong passphrase); nothing was sent.
  - L{HostKeyUnknown}, L{HostKeyChanged}, L{HostKeyRevoked}: see above.
  - L{SshConnectFailed}: refused, unreachable, unresolvable, closed during
    the handshake, or no session within C{connect_timeout}; C{reason} says
    which.
  - L{SshAuthFailed}: the server did not accept the key.
  - L{SshChannelFailed}: the server refused to open a session or to run
    the command.
  - L{SshCommandInterrupted}: the command was sent but no exit status came
    back: L{SshConnectionLost} (the connection dropped -- what a
    C{reboot} usually looks like) or L{SshCommandTimeout} (no exit within
    C{command_timeout}; roller closed the connection).  Both carry
    C{command_sent} and the output so far.

Cancelling the Deferred from C{run} at any point closes the connection
(C{abortConnection}) and fails it with C{CancelledError}; both timeouts are
such cancellations (C{addTimeout} on the injected reactor).

Conch details this module relies on
===================================

  - The connection Deferred of C{SSHCommandClientEndpoint} fires when the
    C{exec} request is confirmed; the protocol then sees the channel as its
    transport.
  - Conch's command channel drops stderr (SSH extended data) and reports
    exit status 0 and a closed channel alike (C{ConnectionDone}), so
    L{_CommandProtocol} hooks the channel's C{extReceived},
    C{request_exit_status} and C{request_exit_signal} (looked up on the
    instance by C{SSHChannel.requestReceived}) to get stderr, a reliable
    "the command exited" and the signal name.
  - Conch's C{_CommandTransport.connectionLost} does not upcall once the
    command runs (twisted/twisted#7901): when the TCP connection drops --
    a machine going down under C{reboot} -- the channel and its protocol
    are never told, and the run would hang until the command timeout.
    L{_CommandProtocol} therefore also wraps that transport's
    C{connectionLost} and fails the run with L{SshConnectionLost}.
  - Conch signs RSA user keys with C{ssh-rsa} (SHA-1), which OpenSSH 8.8+
    refuses by default: use ed25519 or ECDSA keys.
  - The same bug leaves the endpoint hanging when the connection drops
    after authentication but before the C{exec} request is confirmed (a
    window of one round trip); the connect timeout then ends the run with
    L{SshConnectFailed} (C{reason="timeout"}), whose message says the
    command may have been sent.  A C{reboot} cannot fall in that window:
    sshd confirms C{exec} before it starts the command.
  - Conch connects with C{TCP4ClientEndpoint}: IPv4 and IPv6 literals and
    host names that resolve to IPv4 work.
  - The connection is built by subclasses of Conch's private
    C{_NewConnectionHelper} and C{_CommandTransport} (what
    C{SSHCommandClientEndpoint.newConnection} uses): one factory class
    instead of one per connection, and L{_QuickUserAuth}, which sends the
    signed public key request at once instead of C{none} and a query
    first (two round trips fewer per connection).
"""

from __future__ import annotations

import importlib
import inspect
import os
import struct
import time
import typing
from collections.abc import Callable
from typing import Any, cast

from attrs import field, frozen
from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.endpoints import (
    AuthenticationFailed,
    SSHCommandClientEndpoint,
    _CommandTransport,
    _ConnectionReady,
    _NewConnectionHelper,
    _UserAuth,
)
from twisted.conch.error import ConchError
from twisted.conch.ssh.common import getNS
from twisted.conch.ssh.connection import EXTENDED_DATA_STDERR
from twisted.conch.ssh.keys import BadKeyError, EncryptedKeyError, Key
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import Interface, implementer

from roller.drivers.errors import DriverError
from roller.drivers.known_hosts import (
    KNOWN,
    REVOKED,
    UNKNOWN,
    KnownHosts,
    Lookup,
    fingerprint,
    host_name,
)
from roller.drivers.liveness import LineCallback, call_on_line, validate_address
from roller.drivers.reactor import ITcpReactor
from roller.drivers.ssh_pacing import HandshakePacer
from roller.inventory import Machine
from roller.secrets import Secrets, UnknownCredential

log = Logger()

#: Every private or undocumented piece of Conch this module relies on (see
#: "Conch details" in the module docstring), as (module, attribute, its
#: parameters).  L{conch_internals_problems} checks them; tests/test_ssh.py
#: fails when a Twisted release removes one or changes its signature.
CONCH_INTERNALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # wrapped per connection: it does not upcall once the command runs (twisted#7901)
    ("twisted.conch.endpoints", "_CommandTransport.connectionLost", ("self", "reason")),
    # replaced per channel, to get stderr (Conch drops extended data)
    ("twisted.conch.endpoints", "_CommandChannel.extReceived", ("self", "dataType", "data")),
    # looks request_exit_status / request_exit_signal up on the channel instance
    ("twisted.conch.ssh.channel", "SSHChannel.requestReceived", ("self", "requestType", "data")),
    # channel.conn: EOF on stdin at once, like ssh -n
    ("twisted.conch.ssh.connection", "SSHConnection.sendEOF", ("self", "channel")),
    # subclassed: the connection is made by roller's own helper and transport (_Helper, _Transport)
    ("twisted.conch.endpoints", "_NewConnectionHelper.__init__",
     ("self", "reactor", "hostname", "port", "command", "username", "keys", "password", "agentEndpoint",
      "knownHosts", "ui", "tty")),
    ("twisted.conch.endpoints", "_NewConnectionHelper.secureConnection", ("self",)),
    ("twisted.conch.endpoints", "_CommandTransport.__init__", ("self", "creator")),
    ("twisted.conch.endpoints", "_CommandTransport.connectionSecure", ("self",)),
    ("twisted.conch.endpoints", "_ConnectionReady.__init__", ("self", "ready")),
    # _QuickUserAuth: the signed public key request at once
    ("twisted.conch.endpoints", "_UserAuth.getPublicKey", ("self",)),
    ("twisted.conch.ssh.userauth", "SSHUserAuthClient.ssh_USERAUTH_PK_OK_publickey", ("self", "packet")),
)


class _TcpTransport(typing.Protocol):
    def abortConnection(self) -> None: ...


class _SshTransport(typing.Protocol):
    transport: _TcpTransport


class _SshConnection(typing.Protocol):
    transport: _SshTransport

    def sendEOF(self, channel: _Channel) -> None: ...


class _Channel(typing.Protocol):
    """What L{_CommandProtocol} uses of Conch's command channel (its transport)."""

    conn: _SshConnection


def conch_internals_problems() -> list[str]:
    """What of L{CONCH_INTERNALS} the installed Twisted lacks or has changed; empty if nothing."""
    problems = []
    for module_name, path, parameters in CONCH_INTERNALS:
        try:
            obj: object = importlib.import_module(module_name)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            problems.append(f"{module_name}.{path} is missing")
            continue
        if not callable(obj):
            problems.append(f"{module_name}.{path} is not a function")
            continue
        found = tuple(inspect.signature(obj).parameters)
        if found != parameters:
            problems.append(f"{module_name}.{path} takes ({', '.join(found)}), not ({', '.join(parameters)})")
    return problems

__all__ = [
    "CommandResult",
    "ConchShell",
    "HOST_KEY_POLICIES",
    "HostKeyChanged",
    "HostKeyError",
    "HostKeyRevoked",
    "HostKeyUnknown",
    "IRemoteShell",
    "MAX_OUTPUT",
    "SshAuthFailed",
    "SshChannelFailed",
    "SshCommandInterrupted",
    "SshCommandTimeout",
    "SshConfigError",
    "SshConnectFailed",
    "SshConnectionLost",
    "SshError",
    "SshKeyError",
    "SshTarget",
    "ssh_target",
]

HOST_KEY_POLICIES = ("strict", "accept-new")

#: Bytes of stdout and of stderr kept (and passed to C{on_line}) per command.
MAX_OUTPUT = 1024 * 1024

#: A partial line longer than this is delivered as a line of its own.
MAX_LINE = 64 * 1024


# ---------------------------------------------------------------- errors


class SshError(DriverError):
    """
    An SSH command could not be run, or its outcome is not known.

    @ivar message: One operator-readable line (also C{str(error)}).
    @ivar host: The target host, when known.
    @ivar port: The target port, when known.
    """


class SshConfigError(SshError):
    """The target cannot be built from inventory and secrets, or is unusable."""


class SshKeyError(SshConfigError):
    """The private key file cannot be used (missing, encrypted, wrong passphrase, ...)."""


class HostKeyError(SshError):
    """
    The server's host key was not accepted; nothing was authenticated.

    @ivar known_hosts: The known_hosts file consulted.
    @ivar key_type: The presented key's type, e.g. C{"ssh-ed25519"}.
    @ivar fingerprint: The presented key's C{SHA256:...} fingerprint.
    """

    def __init__(self, message: str, *, host: str, port: int, known_hosts: str,
                 key_type: str, fingerprint: str):
        super().__init__(message, host=host, port=port)
        self.known_hosts = known_hosts
        self.key_type = key_type
        self.fingerprint = fingerprint


class HostKeyUnknown(HostKeyError):
    """The host has no line in the known_hosts file and the policy is strict."""


class HostKeyChanged(HostKeyError):
    """
    The known_hosts file holds other keys for the host.

    @ivar expected: C{"keytype SHA256:... (line N)"} for each filed key.
    """

    def __init__(self, message: str, *, expected: tuple[str, ...], **kw: Any):
        super().__init__(message, **kw)
        self.expected = expected


class HostKeyRevoked(HostKeyError):
    """The presented key is marked C{@revoked} in the known_hosts file."""


class SshConnectFailed(SshError):
    """
    No SSH session could be set up; the command was not sent.

    @ivar reason: C{"refused"}, C{"unreachable"}, C{"dns"}, C{"timeout"},
        C{"closed"} (the server hung up before the command was sent) or
        C{"protocol"}.
    """

    def __init__(self, message: str, *, reason: str, **kw: Any):
        super().__init__(message, **kw)
        self.reason = reason


class SshAuthFailed(SshError):
    """The server did not accept the key (or hung up while authenticating)."""


class SshChannelFailed(SshError):
    """The server refused to open a session channel or to run the command."""


class SshCommandInterrupted(SshError):
    """
    The command was sent but no exit status came back.

    @ivar command_sent: Whether the C{exec} request had been sent (always
        true for the subclasses raised by L{ConchShell}).
    @ivar confirmed: Whether the server had confirmed the command started.
    @ivar stdout: Output received so far.
    @ivar stderr: Error output received so far.
    """

    def __init__(self, message: str, *, command_sent: bool, confirmed: bool,
                 stdout: str = "", stderr: str = "", **kw: Any):
        super().__init__(message, **kw)
        self.command_sent = command_sent
        self.confirmed = confirmed
        self.stdout = stdout
        self.stderr = stderr


class SshConnectionLost(SshCommandInterrupted):
    """
    The connection dropped after the command was sent, before it reported an
    exit status: for a reboot, the machine going down.
    """


class SshCommandTimeout(SshCommandInterrupted):
    """The command did not finish within the command timeout; roller hung up."""


# ---------------------------------------------------------------- models


def _check_host(value: Any) -> str:
    try:
        return validate_address(value)
    except ValueError as e:
        raise SshConfigError(f"SSH host: {e}") from None


def _check_port(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise SshConfigError(f"SSH port must be an integer 1-65535, not {value!r}")


def _check_user(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value or len(value) > 64 or any(
        c.isspace() or c in "@:/" or not c.isprintable() for c in value
    ):
        raise SshConfigError(f"SSH user name {str(value)[:80]!r} is not valid")


def _check_key_path(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise SshConfigError("SSH key path must be a non-empty string")


def _check_policy(instance: Any, attribute: Any, value: Any) -> None:
    if value not in HOST_KEY_POLICIES:
        raise SshConfigError(f"host_key_policy must be one of {', '.join(HOST_KEY_POLICIES)}, "
                             f"not {value!r}")


@frozen(kw_only=True)
class SshTarget:
    """
    Where and how to run a command.

    @ivar host: IP address or host name (validated like liveness addresses).
    @ivar port: TCP port.
    @ivar user: Remote user.
    @ivar key_path: The private key file (ed25519, ecdsa; rsa only where the
        server accepts C{ssh-rsa} signatures).
    @ivar passphrase: Its passphrase, if encrypted; never shown in C{repr}.
    @ivar host_key_policy: C{"strict"} or C{"accept-new"}.
    @ivar credential: The credential's name, for messages.
    """

    host: str = field(converter=_check_host)
    port: int = field(default=22, validator=_check_port)
    user: str = field(validator=_check_user)
    key_path: str = field(validator=_check_key_path)
    passphrase: str | None = field(default=None, repr=False)
    host_key_policy: str = field(default="strict", validator=_check_policy)
    credential: str | None = None

    @property
    def where(self) -> str:
        """C{user@host:port} (IPv6 bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"

    @property
    def address(self) -> str:
        """C{host:port} (IPv6 bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def key_description(self) -> str:
        """C{"key FILE (credential NAME)"}."""
        cred = f" (credential {self.credential!r})" if self.credential else ""
        return f"key {self.key_path}{cred}"


@frozen
class CommandResult:
    """
    How a command ended.

    @ivar exit_status: Its exit status, or C{None} if it was killed by a
        signal.
    @ivar stdout: Its standard output (UTF-8, undecodable bytes replaced;
        at most L{MAX_OUTPUT} bytes).
    @ivar stderr: Its standard error, likewise.
    @ivar signal: The signal that killed it, as the server names it without
        C{SIG} (C{"TERM"}, C{"KILL"}), or C{None}.
    """

    exit_status: int | None
    stdout: str
    stderr: str
    signal: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.exit_status == 0


def ssh_target(
    machine: Machine,
    secrets: Secrets | None,
    default_user: str | None = None,
    default_credential: str | None = None,
    default_policy: str = "strict",
) -> SshTarget:
    """
    The L{SshTarget} for a L{roller.inventory.Machine}.

    The machine's C{ssh} section (if any) overrides the defaults: C{user},
    C{port} (22), C{credential}, C{host_key_policy}.

    @param secrets: A L{roller.secrets.Secrets}.
    @raise SshConfigError: No address, no user, no credential, a credential
        missing from the secrets file or not of type C{ssh-key}.
    """
    name = f"{machine.worker_group}/{machine.worker_id}"
    address = machine.address
    if not address:
        raise SshConfigError(f"machine {name} has neither an ip nor an fqdn to SSH to")
    access = machine.ssh
    user = (access.user if access else None) or default_user
    if not user:
        raise SshConfigError(f"machine {name}: no SSH user (set ssh.user on the machine or a default)")
    cred_name = (access.credential if access else None) or default_credential
    if not cred_name:
        raise SshConfigError(f"machine {name}: no SSH credential "
                             "(set ssh.credential on the machine or a default)")
    try:
        if secrets is None:
            raise UnknownCredential(cred_name)
        cred = secrets.get(cred_name)
    except UnknownCredential as e:
        raise SshConfigError(f"machine {name}: SSH {e}") from None
    if cred.kind != "ssh-key" or cred.path is None:
        raise SshConfigError(f"machine {name}: credential {cred_name!r} is of type {cred.kind}, "
                             "not ssh-key")
    policy = (access.host_key_policy if access else None) or default_policy
    return SshTarget(
        host=address,
        port=access.port if access else 22,
        user=user,
        key_path=cred.path,
        passphrase=cred.passphrase,
        host_key_policy=policy,
        credential=cred_name,
    )


# ---------------------------------------------------------------- interface


class IRemoteShell(Interface):
    """Runs commands on machines."""

    def run(target: SshTarget, command: str, on_line: LineCallback | None = None
            ) -> Deferred[CommandResult]:
        """
        Run C{command} (interpreted by the remote user's shell) on C{target}.

        @param on_line: Called with each line of stdout and stderr (without
            the newline) as it arrives; its exceptions are logged and
            ignored.

        @return: A Deferred firing with a L{CommandResult} (whatever the exit
            status), or failing with an L{SshError} subclass or
            C{CancelledError}.  Cancelling it closes the connection.
        """


# ---------------------------------------------------------------- the shell


class _Stream:
    """One output stream: the bytes kept and the line splitting."""

    def __init__(self, on_line: LineCallback | None):
        self._on_line = on_line
        self._parts: list[bytes] = []
        self._size = 0
        self._partial = b""
        self.truncated = False

    def feed(self, data: bytes) -> None:
        if self.truncated:
            return
        room = MAX_OUTPUT - self._size
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        self._parts.append(data)
        self._size += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            self._emit(raw)
        if len(self._partial) > MAX_LINE:
            self._emit(self._partial)
            self._partial = b""
        if self.truncated:
            self.flush()
            call_on_line(self._on_line, f"[roller: output beyond {MAX_OUTPUT} bytes dropped]")

    def _emit(self, raw: bytes) -> None:
        call_on_line(self._on_line, raw.rstrip(b"\r").decode("utf-8", "replace"))

    def flush(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""

    def text(self) -> str:
        return b"".join(self._parts).decode("utf-8", "replace")


def _tail(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return ""
    last = lines[-1].strip()
    return last if len(last) <= 200 else last[:200] + "..."


class _CommandProtocol(Protocol):
    """
    The protocol on the command's channel: collects output, fires
    C{finished} with a L{CommandResult} or L{SshConnectionLost}.
    Cancelling C{finished} aborts the TCP connection.
    """

    def __init__(self, target: SshTarget, on_line: LineCallback | None):
        self.target = target
        self.finished: Deferred[CommandResult] = Deferred(self._abort)
        self.stdout = _Stream(on_line)
        self.stderr = _Stream(on_line)
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.exited = False

    # -- hooks on Conch's channel (see the module docstring)

    def makeConnection(self, transport: Any) -> None:
        self._hook(transport)
        super().makeConnection(transport)

    def _hook(self, channel: Any) -> None:
        ext_received = channel.extReceived
        exit_status = getattr(channel, "request_exit_status", None)
        exit_signal = getattr(channel, "request_exit_signal", None)

        def extReceived(data_type: int, data: bytes) -> None:
            if data_type == EXTENDED_DATA_STDERR:
                self.stderr.feed(data)
            else:
                ext_received(data_type, data)

        def request_exit_status(data: bytes) -> Any:
            (self.exit_status,) = struct.unpack(">L", data[:4])
            self.exited = True
            return exit_status(data) if exit_status else 1

        def request_exit_signal(data: bytes) -> Any:
            name, _ = getNS(data)
            self.exit_signal = name.decode("ascii", "replace")
            self.exited = True
            return exit_signal(data) if exit_signal else 1

        channel.extReceived = extReceived
        channel.request_exit_status = request_exit_status
        channel.request_exit_signal = request_exit_signal

        # Conch's _CommandTransport.connectionLost does not upcall once the
        # command runs, so the channel never learns that the TCP connection
        # dropped (twisted/twisted#7901): listen for it ourselves.
        ssh_transport = channel.conn.transport
        transport_lost = ssh_transport.connectionLost

        def connectionLost(reason: Failure | None = None) -> None:
            try:
                transport_lost(reason)
            finally:
                self._transport_lost(reason)

        ssh_transport.connectionLost = connectionLost

    # -- IProtocol

    def connectionMade(self) -> None:
        try:
            channel = self._channel()
            channel.conn.sendEOF(channel)  # nothing on stdin, like ssh -n
        except Exception:  # noqa: BLE001 -- the command runs anyway; logged
            log.failure("could not send EOF to {where}", where=self.target.where)

    def dataReceived(self, data: bytes) -> None:
        self.stdout.feed(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        """The channel closed (Conch calls this on a clean close only)."""
        self._finish(tcp_reason=None, channel_reason=reason)

    def _transport_lost(self, reason: Failure | None) -> None:
        """The TCP connection under the channel ended."""
        self._finish(tcp_reason=reason, channel_reason=None)

    def _finish(self, tcp_reason: Failure | None, channel_reason: Failure | None) -> None:
        self.stdout.flush()
        self.stderr.flush()
        if self.finished.called:
            return  # done already, or cancelled (we closed it)
        out, err = self.stdout.text(), self.stderr.text()
        code = getattr(channel_reason.value, "exitCode", None) if channel_reason is not None else None
        if self.exited or code is not None:
            status = self.exit_status if self.exit_status is not None else code
            if self.exit_signal is not None:
                status = None
            self.finished.callback(CommandResult(status, out, err, self.exit_signal))
            return
        if tcp_reason is None:
            how = "the server closed the session without reporting an exit status"
        elif tcp_reason.check(error.ConnectionDone):
            how = "the server closed the connection before the command reported an exit status"
        else:
            how = ("the connection was lost before the command reported an exit status "
                   f"({tcp_reason.getErrorMessage()})")
        said = _tail(err) or _tail(out)
        self.finished.errback(SshConnectionLost(
            f"{self.target.where}: {how}; the command had been sent"
            + (f" (last output: {said!r})" if said else " (no output)"),
            command_sent=True, confirmed=True, stdout=out, stderr=err,
            host=self.target.host, port=self.target.port,
        ))

    def _channel(self) -> _Channel:
        # Protocol types its transport ITransport; Conch gives this protocol
        # its command channel, whose connection is set (see CONCH_INTERNALS).
        return cast(_Channel, self.transport)

    def _abort(self, d: Deferred) -> None:
        try:
            self._channel().conn.transport.transport.abortConnection()
        except Exception:  # noqa: BLE001 -- cancelling must not raise; logged
            log.failure("could not close the SSH connection to {where}", where=self.target.where)


class _OneProtocolFactory(Factory):
    noisy = False  # no "Starting factory" line per connection

    def __init__(self, protocol: Protocol):
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def _conch_logger(namespace: str) -> Any:
    """
    A C{_log} for a subclass of a Conch class: Conch's own namespace, which
    roller's log observer quiets (a C{Logger} class attribute would name the
    subclass's module instead, and every connection would log its chatter).
    """

    def get(self: object) -> Logger:
        return Logger(namespace=namespace, source=self)

    return property(get)


class _QuickUserAuth(_UserAuth):
    """
    Conch's client authentication, sending the signed public key request at
    once: Conch first asks for C{none} and then whether the key would do
    (two round trips, four packets, before the one that counts).  A server
    that refuses it answers as it would have after the query; Conch's own
    handling of that failure (no other key, no password: authentication
    failed) is unchanged.
    """

    _log = _conch_logger("twisted.conch.endpoints._UserAuth")

    def serviceStarted(self) -> None:
        if self.agent is not None or not self.keys:
            super().serviceStarted()
            return
        self.authenticatedWith = []
        public = self.getPublicKey()  # takes the key (self.key) for signData
        self.lastPublicKey = public
        self.triedPublicKeys = [public]
        self.lastAuth = b"publickey"
        self.ssh_USERAUTH_PK_OK_publickey(b"")  # signs, then sends the request with the signature


class _Transport(_CommandTransport):
    """Conch's command transport, authenticating with L{_QuickUserAuth} (roller never uses an agent)."""

    _log = _conch_logger("twisted.conch.endpoints._CommandTransport")

    def connectionSecure(self) -> None:
        self._state = b"AUTHENTICATING"
        self._userauth = _QuickUserAuth(self.creator.username, _ConnectionReady(self.connectionReady))
        self._userauth.password = self.creator.password
        if self.creator.keys:
            self._userauth.keys = list(self.creator.keys)
        self.requestService(self._userauth)


class _Helper(_NewConnectionHelper):
    """
    Conch's new-connection helper, with L{_Transport} and one factory class
    (Conch's C{connectProtocol} defines a class per connection).
    """

    def secureConnection(self) -> Deferred:
        protocol = _Transport(self)
        ready = protocol.connectionReady
        endpoint = TCP4ClientEndpoint(self.reactor, self.hostname.decode("ascii"), self.port)
        d = endpoint.connect(_OneProtocolFactory(protocol))
        d.addCallback(lambda _: ready)
        return d


class _NoPrompts:
    """The C{ui} given to Conch: never asks anyone anything."""

    def prompt(self, text: bytes) -> Deferred[bool]:
        return succeed(False)

    def warn(self, text: Any) -> None:
        log.warn("ssh: {text}", text=text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


class _HostKeyCheck(KnownHostsFile):
    """
    What Conch's endpoint calls to verify the host key (it accepts only
    C{KnownHostsFile} instances): delegates to L{_Run.check_host_key}.
    """

    def __init__(self, run: _Run):
        super().__init__(FilePath(run.shell.known_hosts.path))
        self._run = run

    def verifyHostKey(self, ui: Any, hostname: bytes, ip: bytes, key: Key) -> Deferred[bool]:
        try:
            self._run.check_host_key(key)
        except Exception:  # noqa: BLE001 -- Conch wants the refusal as a failed Deferred
            return fail()
        return succeed(True)


class _Run:
    """The state of one L{ConchShell.run} call."""

    def __init__(self, shell: ConchShell, target: SshTarget, command: str, key: Key,
                 on_line: LineCallback | None):
        self.shell = shell
        self.target = target
        self.command = command
        self.key = key
        self.protocol = _CommandProtocol(target, on_line)
        # connecting -> authenticating (host key accepted) -> running
        self.phase = "connecting"

    def start(self, handshake_over: Callable[[], object] = lambda: None) -> Deferred[CommandResult]:
        """Connect and run; C{handshake_over} is called once, when the command started or the connection failed."""
        t = self.target
        command = self.command.encode("utf-8")
        # what SSHCommandClientEndpoint.newConnection builds, with roller's helper
        helper = _Helper(
            self.shell.reactor,
            t.host.encode("ascii"),
            t.port,
            command,
            t.user.encode("utf-8"),
            keys=[self.key],
            password=None,
            agentEndpoint=None,
            knownHosts=_HostKeyCheck(self),
            # Conch types this as a ConsoleUI; it only calls prompt / warn on it
            ui=_NoPrompts(),  # type: ignore[arg-type]
        )
        endpoint = SSHCommandClientEndpoint(helper, command)
        log.debug("ssh {where}: connecting", where=t.where)
        d = endpoint.connect(_OneProtocolFactory(self.protocol))
        d.addTimeout(self.shell.connect_timeout, self.shell.reactor,
                     onTimeoutCancel=self._connect_timed_out)

        def over(result: Any) -> Any:
            handshake_over()
            return result

        d.addBoth(over)
        d.addErrback(self._connect_failed)
        d.addCallback(self._running)
        return d

    # -- host key

    def check_host_key(self, key: Key) -> None:
        t = self.target
        kh = self.shell.known_hosts
        key_type = key.sshType().decode("ascii", "replace")
        blob = key.blob()
        try:
            found = kh.lookup(t.host, t.port, key_type, blob)
        except OSError as e:
            raise SshConfigError(f"cannot read the known_hosts file {kh.path}: {e.strerror or e}",
                                 host=t.host, port=t.port) from None
        if found.status == UNKNOWN and t.host_key_policy == "accept-new":
            try:
                found = kh.add(t.host, t.port, key_type, blob, comment=self._comment())
            except OSError as e:
                raise SshConfigError(f"cannot add the host key of {t.address} to {kh.path}: "
                                     f"{e.strerror or e}", host=t.host, port=t.port) from None
            if found.status == UNKNOWN:
                log.info("ssh {address}: accepted new {key_type} host key {fp} (accept-new), "
                         "saved to {path}", address=t.address, key_type=key_type,
                         fp=fingerprint(blob), path=kh.path)
                found = Lookup(KNOWN, found.name)
        self._judge(found, key_type, blob)
        self.phase = "authenticating"

    def _comment(self) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.shell.reactor.seconds()))
        return f"roller accept-new {stamp}"

    def _judge(self, found: Lookup, key_type: str, blob: bytes) -> None:
        t = self.target
        path = self.shell.known_hosts.path
        fp = fingerprint(blob)
        who = t.host if t.port == 22 else f"{t.host} (port {t.port})"
        kw: dict[str, Any] = dict(host=t.host, port=t.port, known_hosts=path, key_type=key_type, fingerprint=fp)
        if found.status == KNOWN:
            return
        if found.status == UNKNOWN:
            raise HostKeyUnknown(
                f"host key of {who} is not in {path}; verify it and add it with "
                f"`ssh-keyscan -p {t.port} {t.host} >> {path}`, or set host_key_policy = "
                f"accept-new for this machine (it presented {key_type} {fp})", **kw)
        if found.status == REVOKED:
            line = found.entries[0].line_number
            raise HostKeyRevoked(
                f"host key of {who} ({key_type} {fp}) is marked @revoked in {path} (line {line}); "
                "refusing to connect", **kw)
        expected = tuple(e.describe() for e in found.entries)
        name = host_name(t.host, t.port)
        raise HostKeyChanged(
            f"HOST KEY CHANGED for {who}: {path} has {', '.join(expected)} but the server "
            f"presented {key_type} {fp}; this is a reinstalled machine or a man-in-the-middle. "
            f"After verifying the new key out of band, remove the stale line(s) with "
            f"`ssh-keygen -R '{name}' -f {path}` and add the new key",
            expected=expected, **kw)

    # -- connecting

    def _connect_timed_out(self, result: Any, timeout: float) -> Any:
        t = self.target
        if self.phase == "connecting":
            detail = ("no SSH handshake: the host may be down or filtered, or the port is "
                      "not an SSH server")
        else:
            detail = ("the host key was accepted, but authenticating or starting the command "
                      "did not complete; if the connection dropped after authentication, the "
                      "command may have been sent")
        raise SshConnectFailed(f"timed out after {timeout:g} s connecting to {t.where} ({detail})",
                               reason="timeout", host=t.host, port=t.port)

    def _connect_failed(self, reason: Failure) -> Any:
        t = self.target
        kw: dict[str, Any] = dict(host=t.host, port=t.port)
        if reason.check(SshError):
            return reason
        if reason.check(CancelledError, error.ConnectingCancelledError):
            raise CancelledError()
        if reason.check(error.ConnectionRefusedError):
            raise SshConnectFailed(f"connection refused by {t.address}: nothing listens there "
                                   "(sshd down, or the machine is booting)", reason="refused", **kw)
        if reason.check(error.DNSLookupError):
            raise SshConnectFailed(f"cannot resolve {t.host!r} to connect to {t.address}",
                                   reason="dns", **kw)
        if reason.check(error.TimeoutError, error.TCPTimedOutError):
            raise SshConnectFailed(f"TCP connection to {t.address} timed out", reason="timeout", **kw)
        if reason.check(error.NoRouteError):
            raise SshConnectFailed(f"no route to {t.address}", reason="unreachable", **kw)
        if reason.check(AuthenticationFailed):
            fp = fingerprint(self.key.blob())
            hint = ""
            if self.key.type() == "RSA":
                hint = ("; note: Conch signs RSA keys with ssh-rsa (SHA-1), which OpenSSH 8.8+ "
                        "refuses by default: use an ed25519 key")
            raise SshAuthFailed(
                f"{t.where} did not accept the {t.key_description()} "
                f"({self.key.sshType().decode()} {fp}): is that public key in the "
                f"authorized_keys of {t.user!r} there?{hint}", **kw)
        if reason.check(ConchError):
            what = reason.value.args[0] if reason.value is not None and reason.value.args else ""
            if what == "Channel closed.":
                raise SshConnectionLost(
                    f"the connection to {t.where} was lost right after the command was sent, "
                    "before the server confirmed it started",
                    command_sent=True, confirmed=False, **kw)
            if what == "channel request failed":
                raise SshChannelFailed(f"{t.where} refused to run the command", **kw)
            desc = what.decode("utf-8", "replace") if isinstance(what, bytes) else str(what)
            raise SshChannelFailed(f"{t.where} refused to open a session: {desc}", **kw)
        if reason.check(error.ConnectionClosed):
            if self.phase == "connecting":
                raise SshConnectFailed(
                    f"{t.address} closed the connection during the SSH handshake (not an SSH "
                    "server, sshd refusing new connections (MaxStartups), or no common algorithm)",
                    reason="closed", **kw)
            raise SshConnectFailed(f"{t.where} closed the connection after authentication, "
                                   "before the command was sent", reason="closed", **kw)
        if reason.check(error.ConnectError):
            raise SshConnectFailed(f"cannot connect to {t.address}: {reason.getErrorMessage()}",
                                   reason="unreachable", **kw)
        log.failure("ssh {where}: unexpected failure", reason, where=t.where)
        raise SshConnectFailed(f"SSH session with {t.where} failed: "
                               f"{getattr(reason.type, '__name__', reason.type)}", reason="protocol", **kw)

    # -- running

    def _running(self, protocol: _CommandProtocol) -> Deferred[CommandResult]:
        self.phase = "running"
        log.debug("ssh {where}: command started", where=self.target.where)
        finished = protocol.finished
        finished.addTimeout(self.shell.command_timeout, self.shell.reactor,
                            onTimeoutCancel=self._command_timed_out)
        return finished

    def _command_timed_out(self, result: Any, timeout: float) -> Any:
        out, err = self.protocol.stdout.text(), self.protocol.stderr.text()
        said = _tail(err) or _tail(out)
        raise SshCommandTimeout(
            f"the command on {self.target.where} did not finish within {timeout:g} s; "
            "roller closed the connection"
            + (f" (last output: {said!r})" if said else " (no output)"),
            command_sent=True, confirmed=True, stdout=out, stderr=err,
            host=self.target.host, port=self.target.port)


@implementer(IRemoteShell)
class ConchShell:
    """
    L{IRemoteShell} over Conch.

    @ivar reactor: An C{IReactorTCP} and C{IReactorTime} provider.
    @ivar known_hosts: The L{KnownHosts} file.
    @ivar connect_timeout: Seconds for TCP connect, key exchange,
        authentication and starting the command.
    @ivar command_timeout: Seconds for the command to exit once started.
    """

    def __init__(self, reactor: ITcpReactor, known_hosts_path: str | os.PathLike,
                 connect_timeout: float = 10.0, command_timeout: float = 60.0, max_sessions: int = 100):
        for name, value in (("connect_timeout", connect_timeout),
                            ("command_timeout", command_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        self.reactor = reactor
        self.known_hosts = KnownHosts(known_hosts_path)
        self.connect_timeout = float(connect_timeout)
        self.command_timeout = float(command_timeout)
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ValueError(f"max_sessions must be a positive integer, not {max_sessions!r}")
        # At most this many SSH sessions at once: a thousand simultaneous key
        # exchanges would hold the reactor for seconds.  Of those, the
        # handshakes in progress: as many as the reactor keeps up with
        # (roller.drivers.ssh_pacing).  The connect timeout starts when a run
        # gets both slots, not while it waits for one.
        self._sessions = DeferredSemaphore(max_sessions)
        self._handshakes = HandshakePacer(reactor, max_sessions)
        # Parsed keys by (file identity, passphrase): decrypting an OpenSSH
        # key costs ~0.1 s of bcrypt; stat()ing it again notices a new file.
        self._keys: dict[tuple, Key] = {}

    def __repr__(self) -> str:
        return (f"ConchShell(known_hosts={self.known_hosts.path!r}, "
                f"connect_timeout={self.connect_timeout:g}, command_timeout={self.command_timeout:g})")

    def run(self, target: SshTarget, command: str,
            on_line: LineCallback | None = None) -> Deferred[CommandResult]:
        """See L{IRemoteShell.run}."""
        if not isinstance(target, SshTarget):
            return fail(TypeError(f"target must be an SshTarget, not {type(target).__name__}"))
        if not isinstance(command, str) or not command.strip() or "\0" in command:
            return fail(ValueError("command must be a non-empty string without NUL"))
        try:
            key = self.load_key(target)
        except SshKeyError:
            return fail()
        return Deferred.fromCoroutine(self._run_in_slot(target, command, key, on_line))

    async def _run_in_slot(self, target: SshTarget, command: str, key: Key,
                           on_line: LineCallback | None) -> CommandResult:
        await self._sessions.acquire()  # cancelled while waiting: no slot was taken
        try:
            await self._handshakes.acquire()
            return await _Run(self, target, command, key, on_line).start(self._handshakes.release)
        finally:
            self._sessions.release()

    @property
    def sessions_waiting(self) -> int:
        """Runs waiting for a session slot, or for a handshake slot once they have one."""
        return len(self._sessions.waiting) + self._handshakes.waiting

    def load_key(self, target: SshTarget) -> Key:
        """
        The private key of C{target}, parsed (cached while the file is
        unchanged).

        @raise SshKeyError: It cannot be used; the message never holds the
            passphrase or key material.
        """
        path = target.key_path
        what = target.key_description()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise SshKeyError(f"SSH {what} does not exist") from None
        except OSError as e:
            raise SshKeyError(f"cannot read SSH {what}: {e.strerror or e}") from None
        cache_key = (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, target.passphrase)
        key = self._keys.get(cache_key)
        if key is not None:
            return key
        passphrase = target.passphrase.encode("utf-8") if target.passphrase is not None else None
        try:
            key = Key.fromFile(path, passphrase=passphrase)
        except EncryptedKeyError:
            raise SshKeyError(f"SSH {what} is encrypted but no passphrase is configured") from None
        except BadKeyError:
            if passphrase is not None:
                raise SshKeyError(f"cannot decrypt SSH {what}: wrong passphrase, or the file is "
                                  "not a private key") from None
            raise SshKeyError(f"SSH {what} is not a private key roller can read (ed25519, ecdsa "
                              "or rsa, OpenSSH or PEM format)") from None
        except OSError as e:
            raise SshKeyError(f"cannot read SSH {what}: {e.strerror or e}") from None
        except Exception as e:  # noqa: BLE001 -- Conch's parsers may raise anything
            # Conch's parsers may raise anything on a damaged file; never
            # show their message (it can quote the file's content).
            raise SshKeyError(f"SSH {what} could not be parsed ({type(e).__name__})") from None
        if key.isPublic():
            raise SshKeyError(f"SSH {what} is a public key; the credential must name the "
                              "private key file")
        if len(self._keys) >= 256:
            self._keys.clear()
        self._keys[cache_key] = key
        return key
