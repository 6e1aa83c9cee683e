"""
IPMI: power and boot control of a machine's BMC through C{ipmitool}.

L{IpmiTool} runs one C{ipmitool} child per command with
C{reactor.spawnProcess}: an argument list (no shell), stdin closed and a
minimal environment.  The BMC password travels only in that environment,
as C{IPMI_PASSWORD}, read by C{ipmitool -E}: it is never on the command
line (so never in C{ps} or C{/proc/PID/cmdline}), never in a log line, a
job event or an error message (every text roller shows is also scrubbed
of it, in case a BMC or C{ipmitool} ever echoes it).

Generic power tasks use L{IpmiTool.for_machine}, an
L{roller.drivers.power.IPowerDriver} bound to one machine's BMC
(L{IpmiPower}: C{status/on/off/cycle/reset()} firing with a
C{PowerResult} once read back; errors are L{IpmiError}s, which are
C{PowerError}s).  The IPMI tasks and the driver's other users build an
L{IpmiTarget} from inventory and secrets with L{ipmi_target}, then

    tool = IpmiTool(reactor, min_interval=5.0)
    state = await tool.status(target)            # "on" | "off"
    detail = await tool.cycle(target, on_event=ctx.log)
    lines = await tool.sel_list(target, last=15)
    await tool.set_boot_device(target, "pxe", efi=True)

The command line
================

::

    ipmitool -I lanplus -H HOST -p PORT -U USER -E -C 3 -N 1 -R 2 -v [BRIDGE...] COMMAND...

  - C{-I lanplus} (IPMI 2.0 / RMCP+) unless the machine says C{lan}
    (IPMI 1.5).
  - C{-C 3} (cipher suite 3: RAKP-HMAC-SHA1 / HMAC-SHA1-96 / AES-CBC-128)
    for C{lanplus}, configurable (C{cipher_suite}; C{None} leaves it to
    C{ipmitool}).  ipmitool 1.8.19 defaults to suite 17 and, against a BMC
    without it (OpenIPMI's C{ipmi_sim}, many older BMCs), stalls about
    10 s per command on cipher-suite discovery: keep C{-C 3} for those.
  - C{-N}/C{-R}: ipmitool's own per-request timeout and retries
    (C{request_timeout}, C{request_retries}); a BMC that never answers
    costs about 2 s at C{-N 1 -R 1}, 6 s at C{-N 1 -R 2}, 20 s with
    ipmitool's defaults.
  - C{-v}: ipmitool then says I{why} a session failed (C{RAKP 2 HMAC is
    invalid}, C{unauthorized name}, C{Get Auth Capabilities error}), which
    is how a wrong password is told apart from a BMC that is not there
    (and a wrong password is never retried: BMCs lock accounts out).  It
    also makes C{sel list} print each record as a block; L{sel_lines}
    folds them back into one line each.
  - The machine's C{ipmi.bridge} arguments (Moonshot cartridges behind the
    chassis BMC: C{-B 0 -b 7 -T 0x86 -t 0x72}) come last, before the
    command.

Weak BMCs
=========

BMCs break under concurrent sessions, so the commands to one BMC (host and
port; the cartridges of a Moonshot chassis share theirs) run one at a
time, in order, and the next one starts no sooner than C{min_interval}
seconds (Ironic uses 5) after the previous one ended, on the injected
clock.  Cancelling a command that waits for its turn takes it out of the
line; cancelling a running one kills its C{ipmitool} (SIGKILL) and frees
the BMC at once.

Transient failures -- C{insufficient resources for session}, C{Node
busy}, a BMC that did not answer the session set-up, and (for commands
that are safe to repeat) roller's own deadline -- are retried up to
C{retries} times, after C{retry_delay} seconds doubling up to
C{retry_max_delay}; every retry is reported through C{on_event}, so it
becomes a job event.  C{chassis power cycle} and C{reset} are repeated only
when the BMC cannot have acted on them (no session was set up, or it said
busy), never after a deadline that left their fate unknown.

Power changes are read back: after C{on}/C{off}/C{cycle}/C{reset},
C{chassis power status} is polled every C{power_poll} seconds (and the
BMC interval) until it shows the expected state (C{on}; C{off} for
C{off}) or C{power_wait} passes, which fails with L{IpmiStateMismatch}.

Errors
======

Every failure is an L{IpmiError} whose one-line message names the BMC
(C{host:port}), the user and the credential, never the password:

  - L{IpmiConfigError}: no ipmi settings, no or wrong credential, a bad
    host, a password too long for the protocol, C{ipmitool} not installed;
    nothing was sent.
  - L{IpmiAuthFailed}: C{authentication failed for user X at BMC
    host:port} (wrong password or user name, or too little privilege).
  - L{IpmiUnreachable}: the BMC did not answer the session set-up.
  - L{IpmiTimeout}: C{ipmitool} did not finish within C{timeout}; roller
    killed it.
  - L{IpmiCommandFailed}: the BMC answered but refused the command, or
    gave an answer roller does not understand.
  - L{IpmiStateMismatch}: the power change was accepted but the state
    read back is not the expected one.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from attrs import field, frozen
from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredLock, fail
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from roller.drivers.liveness import validate_address
from roller.drivers.power import (
    IPowerDriver,
    PowerActionError,
    PowerAuthError,
    PowerError,
    PowerResult,
    PowerSettingError,
    PowerStateMismatch,
    PowerTimeout,
    password_login,
)
from roller.drivers.reactor import IProcessReactor
from roller.inventory import BRIDGE_ARG_RE, Machine
from roller.secrets import Secrets, UnknownCredential

if TYPE_CHECKING:
    from roller.config import Settings


log = Logger()

__all__ = [
    "CHILD_ENV",
    "INTERFACES",
    "IIpmi",
    "IpmiAuthFailed",
    "IpmiCommandFailed",
    "IpmiConfigError",
    "IpmiError",
    "IpmiPower",
    "IpmiResult",
    "IpmiStateMismatch",
    "IpmiTarget",
    "IpmiTimeout",
    "IpmiTool",
    "IpmiUnreachable",
    "POWER_ACTIONS",
    "classify",
    "ipmi_target",
    "ipmitool_from_settings",
    "sel_lines",
]

#: The environment of every C{ipmitool} child, plus C{IPMI_PASSWORD}.
CHILD_ENV: dict[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C",
    "LC_ALL": "C",
}
PASSWORD_ENV = "IPMI_PASSWORD"
INTERFACES = ("lanplus", "lan")
#: Longest password per interface (IPMI 2.0: 20 bytes, IPMI 1.5: 16).
MAX_PASSWORD = {"lanplus": 20, "lan": 16}
#: IPMI user names are at most 16 bytes.
MAX_USER = 16
#: Output kept per stream of one ipmitool run.
MAX_OUTPUT = 256 * 1024
#: The power verbs and the state each must read back.
POWER_ACTIONS = {"on": "on", "off": "off", "cycle": "on", "reset": "on"}
BOOT_DEVICES = ("pxe", "disk", "cdrom", "bios", "safe", "diag", "floppy", "none")
REDACTED = "***"

EventCallback = Callable[..., object]


# ---------------------------------------------------------------- errors


class IpmiError(PowerError):
    """
    An IPMI command could not be run, failed, or its outcome is unknown.

    A L{roller.drivers.power.PowerError}: C{kind} is C{"config"},
    C{"auth"}, C{"timeout"}, C{"refused"} or C{"unreached"} (by subclass)
    and C{sent} is L{maybe_sent}.

    @ivar message: One operator-readable line (also C{str(error)}); never
        holds the password.
    @ivar host: The BMC host, when known.
    @ivar port: The BMC port, when known.
    @ivar transient: Whether trying again later may succeed.
    @ivar maybe_sent: Whether the BMC may have received the command (a
        session was set up); decides whether a non-idempotent command may
        be repeated.
    @ivar detail: What ipmitool said (its last meaningful lines, scrubbed).
    @ivar exit_code: ipmitool's exit status, if it exited.
    @ivar attempts: How many times the command was tried.
    """

    transient = False
    default_sent = True

    def __init__(self, message: str, *, host: str | None = None, port: int | None = None,
                 detail: str = "", exit_code: int | None = None, transient: bool | None = None,
                 maybe_sent: bool | None = None, attempts: int = 1):
        super().__init__(message, sent=maybe_sent, host=host, port=port)
        self.detail = detail
        self.exit_code = exit_code
        if transient is not None:
            self.transient = transient
        self.attempts = attempts

    @property
    def maybe_sent(self) -> bool:
        return self.sent


class IpmiConfigError(IpmiError, PowerSettingError):
    """The target cannot be built from inventory and secrets, or ipmitool is missing; nothing was sent."""

    default_sent = False


class IpmiAuthFailed(IpmiError, PowerAuthError):
    """The BMC refused the user name or password (or its privilege); nothing was run."""

    default_sent = False


class IpmiUnreachable(IpmiError, PowerTimeout):
    """The BMC did not answer the session set-up (down, wrong address, overloaded)."""

    transient = True
    default_sent = False


class IpmiTimeout(IpmiError, PowerTimeout):
    """ipmitool did not finish within roller's deadline and was killed; the outcome is unknown."""

    transient = True


class IpmiCommandFailed(IpmiError, PowerActionError):
    """The BMC answered but refused the command (or ipmitool failed otherwise)."""


class IpmiStateMismatch(IpmiError, PowerStateMismatch):
    """
    A power change was accepted but the state read back is not the expected one.
    (C{kind} C{"unreached"}.)

    @ivar expected: C{"on"} or C{"off"}.
    @ivar actual: The last state read, or C{None} if none could be read.
    """

    def __init__(self, message: str, *, expected: str, actual: str | None, **kw: Any):
        super().__init__(message, **kw)
        self.expected = expected
        self.actual = actual


# ---------------------------------------------------------------- target


def _check_host(value: Any) -> str:
    try:
        return validate_address(value)
    except ValueError as e:
        raise IpmiConfigError(f"BMC host: {e}") from None


def _check_port(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise IpmiConfigError(f"BMC port must be an integer 1-65535, not {value!r}")


def _check_interface(instance: Any, attribute: Any, value: Any) -> None:
    if value not in INTERFACES:
        raise IpmiConfigError(f"IPMI interface must be one of {', '.join(INTERFACES)}, not {value!r}")


def _check_user(instance: Any, attribute: Any, value: Any) -> None:
    if (not isinstance(value, str) or not value or value.startswith("-")
            or len(value.encode("utf-8")) > MAX_USER
            or any(not c.isprintable() or c.isspace() for c in value)):
        raise IpmiConfigError(f"IPMI user name {str(value)[:40]!r} is not valid (1-{MAX_USER} "
                              "printable characters, no spaces, not starting with '-')")


def _as_args(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _check_bridge(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(a, str) and BRIDGE_ARG_RE.fullmatch(a)
                                                for a in value):
        raise IpmiConfigError("IPMI bridge must be ipmitool bridging arguments "
                              "(-B/-b/-T/-t and their values)")


@frozen(kw_only=True)
class IpmiTarget:
    """
    A BMC and how to log in to it.

    @ivar host: IP address or host name.
    @ivar port: UDP port (623).
    @ivar username: IPMI user.
    @ivar password: Its password; never shown in C{repr}.
    @ivar interface: C{"lanplus"} (IPMI 2.0) or C{"lan"} (IPMI 1.5).
    @ivar bridge: Extra ipmitool bridging arguments, appended as they are.
    @ivar credential: The credential's name, for messages.
    """

    host: str = field(converter=_check_host)
    port: int = field(default=623, validator=_check_port)
    username: str = field(validator=_check_user)
    password: str = field(repr=False)
    interface: str = field(default="lanplus", validator=_check_interface)
    bridge: tuple[str, ...] = field(default=(), converter=_as_args, validator=_check_bridge)
    credential: str | None = None

    def __attrs_post_init__(self) -> None:
        cred = f" of credential {self.credential!r}" if self.credential else ""
        if not isinstance(self.password, str) or "\0" in self.password:
            raise IpmiConfigError(f"the IPMI password{cred} must be a string without NUL")
        limit = MAX_PASSWORD[self.interface]
        if len(self.password.encode("utf-8")) > limit:
            raise IpmiConfigError(f"the IPMI password{cred} is longer than {limit} bytes, the "
                                  f"limit of interface {self.interface}")

    @property
    def address(self) -> str:
        """C{host:port} (IPv6 bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def bmc(self) -> str:
        """C{BMC host:port}, plus the bridge target when bridged."""
        where = f"BMC {self.address}"
        if self.bridge:
            where += f" (bridged {' '.join(self.bridge)})"
        return where

    @property
    def slot(self) -> tuple[str, int]:
        """What commands are serialized on: the BMC's host and port."""
        return (self.host.lower(), self.port)


def ipmi_target(machine: Machine, secrets: Secrets | None, default_credential: str | None = None) -> IpmiTarget:
    """
    The L{IpmiTarget} of a L{roller.inventory.Machine}.

    @param secrets: A L{roller.secrets.Secrets}.
    @param default_credential: Used when the machine's C{ipmi} section names none.
    @raise IpmiConfigError: No ipmi section, no credential, a credential
        missing from the secrets file or not of type C{password}, or
        unusable values.
    """
    name = f"{machine.worker_group}/{machine.worker_id}"
    access = machine.ipmi
    if access is None:
        raise IpmiConfigError(f"machine {name} has no ipmi settings")
    cred_name = access.credential or default_credential
    if not cred_name:
        raise IpmiConfigError(f"machine {name}: no IPMI credential (set ipmi.credential on the "
                              "machine or ipmi.credential in the settings)",
                              host=access.host, port=access.port)
    if secrets is None:
        raise IpmiConfigError(f"machine {name}: no secrets file loaded for IPMI credential "
                              f"{cred_name!r}", host=access.host, port=access.port)
    try:
        cred = secrets.get(cred_name)
    except UnknownCredential as e:
        raise IpmiConfigError(f"machine {name}: IPMI {e}", host=access.host, port=access.port) from None
    if cred.kind != "password":
        raise IpmiConfigError(f"machine {name}: credential {cred_name!r} is of type {cred.kind}, "
                              "not password", host=access.host, port=access.port)
    username, password = password_login(cred)
    try:
        return IpmiTarget(host=access.host, port=access.port, username=username,
                          password=password, interface=access.interface,
                          bridge=access.bridge, credential=cred_name)
    except IpmiConfigError as e:
        raise IpmiConfigError(f"machine {name}: {e}", host=access.host, port=access.port) from None


# ---------------------------------------------------------------- results


@frozen
class IpmiResult:
    """
    One ipmitool run that exited 0.

    @ivar command: The ipmitool command (after the options), e.g.
        C{("chassis", "power", "status")}.
    @ivar stdout: Its standard output (scrubbed).
    @ivar stderr: Its standard error (scrubbed; with C{-v}, diagnostics).
    @ivar attempts: How many runs it took.
    """

    command: tuple[str, ...]
    stdout: str
    stderr: str
    attempts: int = 1

    @property
    def lines(self) -> list[str]:
        """The non-empty lines of stdout."""
        return [line for line in self.stdout.splitlines() if line.strip()]


# ---------------------------------------------------------------- classification

# (pattern, error class, reason): the first match in ipmitool's output wins.
_AUTH = [
    (r"RAKP 2 HMAC is invalid|invalid integrity check value|Activate Session command failed"
     r"|Activate Session error|Invalid (?:Session )?AuthType|password is incorrect",
     "wrong password"),
    (r"unauthorized name|Invalid user name", "unknown user name"),
    (r"unauthorized role or privilege|Requested privilege level exceeds limit"
     r"|Insufficient privilege level|invalid role",
     "the user lacks the privilege for this command"),
]
_TRANSIENT = [
    r"insufficient resources for (?:session|role)",
    r"insufficient resources to create",
    r"\bnode busy\b",
    r"\bbusy\b",
]
_UNANSWERED = [
    r"Get Auth Capabilities (?:error|command failed)",
    r"Get Session Challenge command failed",
    r"no response from RAKP",
    r"No response from remote controller",
    r"Unable to establish (?:IPMI v2 / RMCP\+|IPMI v1\.5 / RMCP|LAN) session",
    r"Unable to Get Channel Authentication Capabilities",
    r"Error: Received an Unexpected Open Session Response",
]
_CIPHER = r"no cipher suite match|invalid (?:authentication|integrity|confidentiality) algorithm"
_NOISE = re.compile(r"^(Loading IANA PEN Registry|Running Get VSO Capabilities|Invalid completion "
                    r"code received: Invalid command|Discovered IPMB address)", re.I)


def _said(stderr: str, stdout: str, limit: int = 3) -> str:
    """ipmitool's last few meaningful lines, joined with '; '."""
    lines = [ln.strip().lstrip("> ").strip() for ln in (stderr + "\n" + stdout).splitlines()]
    lines = [ln for ln in lines if ln and not _NOISE.match(ln)]
    out: list[str] = []
    for ln in lines:
        if ln not in out:
            out.append(ln)
    return "; ".join(out[-limit:])[:400]


def classify(target: IpmiTarget, command: Sequence[str], exit_code: int, stdout: str,
             stderr: str) -> IpmiError:
    """
    The L{IpmiError} for an ipmitool run that exited C{exit_code} (not 0)
    with this (already scrubbed) output.
    """
    text = stderr + "\n" + stdout
    said = _said(stderr, stdout) or "(no output)"
    what = " ".join(command)
    kw: dict[str, Any] = dict(host=target.host, port=target.port, detail=said, exit_code=exit_code)
    cred = f" (credential {target.credential!r})" if target.credential else ""
    for pattern, why in _AUTH:
        if re.search(pattern, text, re.I):
            return IpmiAuthFailed(
                f"authentication failed for user {target.username} at {target.bmc}{cred}: "
                f"{why} (ipmitool: {said})", **kw)
    if re.search(_CIPHER, text, re.I):
        return IpmiCommandFailed(
            f"{target.bmc} refused the session's algorithms (ipmitool: {said}); try another "
            f"cipher suite (ipmi.cipher_suite, ipmitool -C)", maybe_sent=False, transient=False, **kw)
    for pattern in _TRANSIENT:
        if re.search(pattern, text, re.I):
            # The BMC refused to open a session or to run the command: nothing happened.
            return IpmiCommandFailed(f"{target.bmc} is busy: {said}", transient=True,
                                     maybe_sent=False, **kw)
    for pattern in _UNANSWERED:
        if re.search(pattern, text, re.I):
            return IpmiUnreachable(f"{target.bmc} is not answering (ipmitool: {said})", **kw)
    if re.search(r"\bTimeout\b", text) and re.search(r"failed", text, re.I):
        # Completion code 0xC3 "Timeout": the BMC may or may not have acted.
        return IpmiCommandFailed(f"{target.bmc} timed out running `{what}`: {said}",
                                 transient=True, maybe_sent=True, **kw)
    return IpmiCommandFailed(f"`ipmitool {what}` at {target.bmc} failed with exit status "
                             f"{exit_code}: {said}", **kw)


# ---------------------------------------------------------------- the child


class _Collector:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> None:
        room = MAX_OUTPUT - self.size
        if room > 0:
            self.chunks.append(data[:room])
            self.size += min(len(data), room)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")


class _IpmitoolProtocol(ProcessProtocol):
    """Collects one ipmitool child's output; fires C{deferred} with C{(exit_code, stdout, stderr)}."""

    def __init__(self) -> None:
        self.deferred: Deferred = Deferred(self._cancel)
        self.out = _Collector()
        self.err = _Collector()
        self.ended = False

    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        (self.err if childFD == 2 else self.out).add(data)

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        if self.deferred.called:
            return  # killed by us (cancel or deadline): just the reaping
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.deferred.callback((code, sig, self.out.text(), self.err.text()))

    def _cancel(self, d: Deferred) -> None:
        self.kill()

    def kill(self) -> None:
        if self.ended or self.transport is None:
            return
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass
        except OSError:
            log.failure("could not kill ipmitool (pid {pid})", pid=getattr(self.transport, "pid", None))


class _Bmc:
    """The line of commands for one BMC."""

    def __init__(self) -> None:
        self.lock = DeferredLock()
        self.last_end: float | None = None
        self.users = 0


def _call(on_event: EventCallback | None, message: str, **data: Any) -> None:
    if on_event is None:
        return
    try:
        on_event(message, **data)
    except Exception:  # noqa: BLE001 -- a failing progress callback must not fail the action
        log.failure("on_event callback failed for {message!r}", message=message)


# ---------------------------------------------------------------- interface


class IIpmi(Interface):
    """
    Power and boot control through any BMC (the verbs of C{IPowerDriver},
    on/off/cycle/reset/status, plus boot device and SEL), given the target
    on each call; L{IpmiPower} binds them to one machine.

    Every method takes an L{IpmiTarget} and an optional C{on_event(message,
    **data)} callback (a job's C{ctx.log}), and returns a Deferred that
    fails with an L{IpmiError} subclass or C{CancelledError}; cancelling it
    kills the running ipmitool and frees the BMC.
    """

    def status(target: IpmiTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """C{"on"} or C{"off"}."""

    def on(target: IpmiTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """Power on and read back C{on}; fires with a one-line summary."""

    def off(target: IpmiTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """Power off (hard) and read back C{off}; fires with a one-line summary."""

    def cycle(target: IpmiTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """Power cycle and read back C{on}; fires with a one-line summary."""

    def reset(target: IpmiTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """Hard reset and read back C{on}; fires with a one-line summary."""

    def set_boot_device(target: IpmiTarget, device: str = "pxe", efi: bool = False,
                        on_event: EventCallback | None = None) -> Deferred[str]:
        """C{chassis bootdev DEVICE [options=efiboot]} for the next boot."""

    def sel_list(target: IpmiTarget, last: int = 15,
                 on_event: EventCallback | None = None) -> Deferred[list[str]]:
        """The last C{last} System Event Log entries, one line each."""


# ---------------------------------------------------------------- the driver


def _positive(name: str, value: Any, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
            value == 0 and not zero):
        raise ValueError(f"{name} must be a {'non-negative' if zero else 'positive'} number, "
                         f"not {value!r}")
    return float(value)


@implementer(IIpmi)
class IpmiTool:
    """
    L{IIpmi} by running C{ipmitool}.

    @ivar reactor: An C{IReactorProcess} and C{IReactorTime} provider.
    @ivar ipmitool: The program: a name looked up in L{CHILD_ENV}'s PATH,
        or a path.
    @ivar cipher_suite: C{-C} for lanplus (3), or C{None} for ipmitool's
        default.
    @ivar timeout: Seconds one ipmitool run may take before it is killed.
    @ivar request_timeout: ipmitool's C{-N}, or C{None}.
    @ivar request_retries: ipmitool's C{-R} (at least 1: ipmitool reads 0
        as its default), or C{None}.
    @ivar retries: How many times a transient failure is retried.
    @ivar retry_delay: Seconds before the first retry; doubles each time.
    @ivar retry_max_delay: Longest wait between retries.
    @ivar min_interval: Seconds between the end of one command to a BMC
        and the start of the next.
    @ivar power_wait: Seconds to wait for a power change to read back.
    @ivar power_poll: Seconds between power status reads while waiting.
    @ivar default_credential: The credential for machines that name none
        (for L{ipmi_target}).
    @ivar verbose: Pass C{-v} (needed to tell a wrong password from a
        silent BMC).
    """

    def __init__(self, reactor: IProcessReactor, *, ipmitool: str = "ipmitool", cipher_suite: int | None = 3,
                 timeout: float = 30.0, request_timeout: int | None = 1,
                 request_retries: int | None = 2, retries: int = 3, retry_delay: float = 5.0,
                 retry_max_delay: float = 60.0, min_interval: float = 5.0,
                 power_wait: float = 60.0, power_poll: float = 2.0,
                 default_credential: str | None = None, verbose: bool = True):
        if cipher_suite is not None and (isinstance(cipher_suite, bool) or not isinstance(
                cipher_suite, int) or not 0 <= cipher_suite <= 255):
            raise ValueError(f"cipher_suite must be an integer 0-255 or None, not {cipher_suite!r}")
        for name, value in (("request_timeout", request_timeout), ("request_retries", request_retries)):
            # ipmitool takes -R 0 for "its default" (4 retries, ~20 s on a silent BMC).
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {value!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative integer, not {retries!r}")
        if not isinstance(ipmitool, str) or not ipmitool:
            raise ValueError("ipmitool must be a program name or path")
        self.reactor = reactor
        self.ipmitool = ipmitool
        self.cipher_suite = cipher_suite
        self.timeout = _positive("timeout", timeout)
        self.request_timeout = request_timeout
        self.request_retries = request_retries
        self.retries = retries
        self.retry_delay = _positive("retry_delay", retry_delay, zero=True)
        self.retry_max_delay = _positive("retry_max_delay", retry_max_delay, zero=True)
        self.min_interval = _positive("min_interval", min_interval, zero=True)
        self.power_wait = _positive("power_wait", power_wait, zero=True)
        self.power_poll = _positive("power_poll", power_poll)
        self.default_credential = default_credential or None
        self.verbose = verbose
        self._bmcs: dict[tuple[str, int], _Bmc] = {}

    def __repr__(self) -> str:
        return (f"IpmiTool(ipmitool={self.ipmitool!r}, cipher_suite={self.cipher_suite!r}, "
                f"timeout={self.timeout:g}, retries={self.retries}, min_interval={self.min_interval:g})")

    # -- building blocks

    def target(self, machine: Machine, secrets: Secrets | None) -> IpmiTarget:
        """L{ipmi_target} with this driver's default credential."""
        return ipmi_target(machine, secrets, self.default_credential)

    def for_machine(self, machine: Machine, secrets: Secrets | None, *,
                    on_progress: EventCallback | None = None) -> IpmiPower:
        """
        The L{IPowerDriver} of C{machine}'s BMC.

        @raise IpmiConfigError: (a L{PowerError} of kind C{"config"}) no
            ipmi settings, no or unknown credential, not a password
            credential, unusable values.
        """
        return IpmiPower(self, self.target(machine, secrets), on_progress)

    def argv(self, target: IpmiTarget, command: Sequence[str]) -> list[str]:
        """The argument list of one run; the password is not in it (C{-E})."""
        args = [self.ipmitool, "-I", target.interface, "-H", target.host, "-p", str(target.port),
                "-U", target.username, "-E"]
        if target.interface == "lanplus" and self.cipher_suite is not None:
            args += ["-C", str(self.cipher_suite)]
        if self.request_timeout is not None:
            args += ["-N", str(self.request_timeout)]
        if self.request_retries is not None:
            args += ["-R", str(self.request_retries)]
        if self.verbose:
            args.append("-v")
        return args + list(target.bridge) + list(command)

    def env(self, target: IpmiTarget) -> dict[str, str]:
        """The child's whole environment: L{CHILD_ENV} and the password."""
        return {**CHILD_ENV, PASSWORD_ENV: target.password}

    def _executable(self) -> str | None:
        if os.sep in self.ipmitool:
            return self.ipmitool if os.access(self.ipmitool, os.X_OK) else None
        return shutil.which(self.ipmitool, path=CHILD_ENV["PATH"])

    def busy(self, target: IpmiTarget) -> bool:
        """Whether a command to this BMC is running or waiting."""
        bmc = self._bmcs.get(target.slot)
        return bmc is not None and bmc.users > 0

    # -- one command, serialized and retried

    def run(self, target: IpmiTarget, command: Sequence[str], on_event: EventCallback | None = None,
            *, idempotent: bool = True) -> Deferred[IpmiResult]:
        """
        Run one ipmitool command (e.g. C{["chassis", "power", "status"]})
        in this BMC's line, retrying transient failures.

        @param idempotent: Whether repeating the command is harmless when
            its outcome is unknown (false for cycle and reset).
        @return: A Deferred firing with an L{IpmiResult} (exit status 0) or
            failing with an L{IpmiError} or C{CancelledError}.
        """
        if not isinstance(target, IpmiTarget):
            return fail(TypeError(f"target must be an IpmiTarget, not {type(target).__name__}"))
        command = tuple(command)
        if not command or not all(isinstance(c, str) and c and not c.startswith("-") and "\0" not in c
                                  for c in command):
            return fail(ValueError(f"not an ipmitool command: {command!r}"))
        return Deferred.fromCoroutine(self._run(target, command, on_event, idempotent))

    async def _run(self, target: IpmiTarget, command: tuple[str, ...],
                   on_event: EventCallback | None, idempotent: bool) -> IpmiResult:
        what = " ".join(command)
        attempt = 0
        while True:
            attempt += 1
            try:
                code, sig, out, err = await self._once(target, command)
            except IpmiError as e:
                failure: IpmiError = e
            else:
                out, err = self.scrub(target, out), self.scrub(target, err)
                if code == 0:
                    return IpmiResult(command, out, err, attempt)
                if code is None:
                    failure = IpmiCommandFailed(
                        f"ipmitool `{what}` for {target.bmc} was killed by signal {sig}",
                        host=target.host, port=target.port)
                else:
                    failure = classify(target, command, code, out, err)
            failure.attempts = attempt
            retry = failure.transient and (idempotent or not failure.maybe_sent)
            if not retry or attempt > self.retries:
                if attempt > 1:
                    failure.message += f" (gave up after {attempt} attempts)"
                    failure.args = (failure.message,)
                raise failure
            delay = min(self.retry_delay * 2 ** (attempt - 1), self.retry_max_delay)
            log.info("ipmitool {command} at {bmc}: {error}; retrying in {delay:g} s",
                     command=what, bmc=target.address, error=failure.message, delay=delay)
            _call(on_event, f"ipmi {what}: {failure.message}; retrying in {delay:g} s "
                            f"(attempt {attempt + 1} of {self.retries + 1})",
                  bmc=target.address, command=what, attempt=attempt + 1, retry_in=delay,
                  error=type(failure).__name__)
            await deferLater(self.reactor, delay, lambda: None)

    async def _once(self, target: IpmiTarget, command: tuple[str, ...]) -> tuple:
        """One ipmitool run in the BMC's line: C{(exit code, signal, stdout, stderr)}."""
        executable = self._executable()
        if executable is None:
            raise IpmiConfigError(f"{self.ipmitool} is not installed or not executable "
                                  "(apt-get install -y ipmitool)", host=target.host, port=target.port)
        key = target.slot
        bmc = self._bmcs.get(key)
        if bmc is None:
            bmc = self._bmcs[key] = _Bmc()
        bmc.users += 1
        try:
            await bmc.lock.acquire()
            spawned = False
            try:
                if bmc.last_end is not None:
                    wait = bmc.last_end + self.min_interval - self.reactor.seconds()
                    if wait > 0:
                        await deferLater(self.reactor, wait, lambda: None)
                spawned = True
                return await self._spawn(executable, target, command)
            finally:
                if spawned:
                    bmc.last_end = self.reactor.seconds()
                bmc.lock.release()
        finally:
            bmc.users -= 1
            if bmc.users == 0 and self.min_interval == 0:
                self._bmcs.pop(key, None)
            self._prune()

    def _prune(self) -> None:
        """Forget idle BMCs whose interval has passed (thousands of machines)."""
        if len(self._bmcs) < 1024:
            return
        now = self.reactor.seconds()
        for key, bmc in list(self._bmcs.items()):
            if bmc.users == 0 and (bmc.last_end is None or now - bmc.last_end >= self.min_interval):
                del self._bmcs[key]

    def _spawn(self, executable: str, target: IpmiTarget, command: tuple[str, ...]) -> Deferred:
        what = " ".join(command)
        protocol = _IpmitoolProtocol()
        args = self.argv(target, command)
        log.debug("ipmitool {command} at {bmc} as {user}", command=what, bmc=target.address,
                  user=target.username)
        try:
            self.reactor.spawnProcess(protocol, executable, args, env=self.env(target), path="/")
        except Exception as e:  # noqa: BLE001 -- any failure to start ipmitool fails this command
            return fail(IpmiConfigError(f"cannot run {executable}: {type(e).__name__}: "
                                        f"{self.scrub(target, str(e))}",
                                        host=target.host, port=target.port))
        d = protocol.deferred

        def timed_out(result: Any, timeout: float) -> Any:
            said = _said(self.scrub(target, protocol.err.text()), self.scrub(target, protocol.out.text()))
            raise IpmiTimeout(
                f"{target.bmc} did not complete `{what}` within {timeout:g} s; roller killed "
                f"ipmitool" + (f" (last output: {said})" if said else " (no answer)"),
                host=target.host, port=target.port, detail=said)

        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=timed_out)
        return d

    @staticmethod
    def scrub(target: IpmiTarget, text: str) -> str:
        """C{text} with the target's password masked."""
        if target.password and target.password in text:
            text = text.replace(target.password, REDACTED)
        return text

    # -- operations

    def status(self, target: IpmiTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """See L{IIpmi.status}."""
        return Deferred.fromCoroutine(self._status(target, on_event))

    async def _status(self, target: IpmiTarget, on_event: EventCallback | None) -> str:
        result = await self.run(target, ("chassis", "power", "status"), on_event)
        match = re.search(r"Chassis Power is (on|off)\b", result.stdout, re.I)
        if not match:
            raise IpmiCommandFailed(f"{target.bmc} gave an unexpected answer to `chassis power "
                                    f"status`: {_said('', result.stdout) or '(nothing)'}",
                                    host=target.host, port=target.port)
        return match.group(1).lower()

    def power(self, target: IpmiTarget, action: str, on_event: EventCallback | None = None, *,
              verify: bool = True) -> Deferred[str]:
        """
        C{chassis power ACTION} (on, off, cycle, reset), then, if
        C{verify}, read the state back until it is the expected one.

        @return: A Deferred firing with a one-line summary.
        """
        if action not in POWER_ACTIONS:
            return fail(ValueError(f"power action must be one of {', '.join(POWER_ACTIONS)}, "
                                   f"not {action!r}"))
        if not isinstance(target, IpmiTarget):
            return fail(TypeError(f"target must be an IpmiTarget, not {type(target).__name__}"))
        return Deferred.fromCoroutine(self._power(target, action, on_event, verify))

    def on(self, target: IpmiTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """See L{IIpmi.on}."""
        return self.power(target, "on", on_event)

    def off(self, target: IpmiTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """See L{IIpmi.off}."""
        return self.power(target, "off", on_event)

    def cycle(self, target: IpmiTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """See L{IIpmi.cycle}."""
        return self.power(target, "cycle", on_event)

    def reset(self, target: IpmiTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """See L{IIpmi.reset}."""
        return self.power(target, "reset", on_event)

    async def _power(self, target: IpmiTarget, action: str, on_event: EventCallback | None,
                     verify: bool) -> str:
        command = ("chassis", "power", action)
        _call(on_event, f"ipmi {target.address}: chassis power {action}", bmc=target.address,
              command=" ".join(command))
        result = await self.run(target, command, on_event, idempotent=action in ("on", "off"))
        said = _said("", result.stdout, 1) or f"chassis power {action} accepted"
        if not verify:
            return f"{target.bmc}: {said}"
        expected = POWER_ACTIONS[action]
        started = self.reactor.seconds()
        deadline = started + self.power_wait
        actual: str | None = None
        reads = 0
        while True:
            try:
                actual = await self._status(target, on_event)
                reads += 1
            except (IpmiUnreachable, IpmiTimeout) as e:
                # A BMC may drop sessions while it switches power; keep trying until the deadline.
                _call(on_event, f"ipmi {target.address}: cannot read the power state yet: {e}",
                      bmc=target.address, command="chassis power status")
            else:
                if actual == expected:
                    took = self.reactor.seconds() - started
                    _call(on_event, f"ipmi {target.address}: chassis power is {actual}",
                          bmc=target.address, power=actual)
                    return f"{target.bmc}: {said}; power is {actual} (read back after {took:.0f} s)"
            if self.reactor.seconds() >= deadline:
                break
            await deferLater(self.reactor, min(self.power_poll, max(deadline - self.reactor.seconds(), 0.0)),
                             lambda: None)
        state = f"still {actual}" if actual is not None else "could not be read"
        raise IpmiStateMismatch(
            f"{target.bmc} accepted `chassis power {action}` but the power {state} after "
            f"{self.power_wait:g} s (expected {expected})",
            expected=expected, actual=actual, host=target.host, port=target.port)

    def set_boot_device(self, target: IpmiTarget, device: str = "pxe", efi: bool = False,
                        on_event: EventCallback | None = None) -> Deferred[str]:
        """See L{IIpmi.set_boot_device}."""
        if device not in BOOT_DEVICES:
            return fail(ValueError(f"boot device must be one of {', '.join(BOOT_DEVICES)}, not {device!r}"))
        command = ("chassis", "bootdev", device) + (("options=efiboot",) if efi else ())

        async def go() -> str:
            _call(on_event, f"ipmi {target.address}: {' '.join(command)}", bmc=target.address,
                  command=" ".join(command))
            result = await self.run(target, command, on_event)
            return _said("", result.stdout, 1) or f"boot device set to {device}"

        return Deferred.fromCoroutine(go())

    def sel_list(self, target: IpmiTarget, last: int = 15,
                 on_event: EventCallback | None = None) -> Deferred[list[str]]:
        """See L{IIpmi.sel_list}."""
        if isinstance(last, bool) or not isinstance(last, int) or not 0 < last <= 10000:
            return fail(ValueError(f"last must be an integer 1-10000, not {last!r}"))

        async def go() -> list[str]:
            result = await self.run(target, ("sel", "list", "last", str(last)), on_event)
            return sel_lines(result.stdout)

        return Deferred.fromCoroutine(go())


@implementer(IPowerDriver)
class IpmiPower:
    """
    One machine's BMC as an L{IPowerDriver}: the L{IpmiTool} verbs bound to
    one L{IpmiTarget}, firing with L{PowerResult}s once the state is read
    back.  Build it with L{IpmiTool.for_machine}.

    @ivar description: C{"IPMI BMC host:port (user NAME)"}; no secret.
    """

    def __init__(self, tool: IpmiTool, target: IpmiTarget, on_progress: EventCallback | None = None):
        self.tool = tool
        self.target = target
        self.on_progress = on_progress
        self.description = f"IPMI {target.bmc} (user {target.username})"

    def __repr__(self) -> str:
        return f"<IpmiPower {self.description}>"

    def status(self) -> Deferred[PowerResult]:
        """See L{IPowerDriver.status}."""
        return self.tool.status(self.target, self.on_progress).addCallback(
            lambda state: PowerResult(state, f"{self.target.bmc}: chassis power is {state}"))

    def _power(self, action: str) -> Deferred[PowerResult]:
        return self.tool.power(self.target, action, self.on_progress).addCallback(
            lambda detail: PowerResult(POWER_ACTIONS[action], detail))

    def on(self) -> Deferred[PowerResult]:
        """See L{IPowerDriver.on}."""
        return self._power("on")

    def off(self) -> Deferred[PowerResult]:
        """See L{IPowerDriver.off}: a hard power off."""
        return self._power("off")

    def reset(self) -> Deferred[PowerResult]:
        """See L{IPowerDriver.reset}: C{chassis power reset}, read back on."""
        return self._power("reset")

    def cycle(self, off_for: float | None = None) -> Deferred[PowerResult]:
        """
        See L{IPowerDriver.cycle}: C{chassis power cycle}, or with
        C{off_for}, C{off} (read back), C{off_for} seconds, C{on} (read back).
        """
        if off_for is None:
            return self._power("cycle")
        if isinstance(off_for, bool) or not isinstance(off_for, (int, float)) or off_for < 0:
            return fail(ValueError(f"off_for must be a non-negative number of seconds, not {off_for!r}"))

        async def go() -> PowerResult:
            await self.tool.power(self.target, "off", self.on_progress)
            await deferLater(self.tool.reactor, off_for, lambda: None)
            await self.tool.power(self.target, "on", self.on_progress)
            return PowerResult("on", f"{self.target.bmc}: cycled (off, {off_for:g} s, on), read back on")

        return Deferred.fromCoroutine(go())

    def set_boot_device(self, device: str = "pxe", efi: bool = False) -> Deferred[str]:
        """C{chassis bootdev DEVICE [options=efiboot]} for the next boot."""
        return self.tool.set_boot_device(self.target, device, efi, self.on_progress)

    def sel_list(self, last: int = 15) -> Deferred[list[str]]:
        """The last C{last} SEL entries, one line each."""
        return self.tool.sel_list(self.target, last, self.on_progress)


def sel_lines(stdout: str) -> list[str]:
    """
    One line per SEL record from C{sel list} output.

    With C{-v} (which roller passes to tell authentication failures apart),
    ipmitool prints each record as a block of C{Key : Value} lines; they
    are folded into the compact form ipmitool prints without it::

        2 | S+ 70/001 | Power Supply #0x02 | Failure detected | Asserted

    Output that is not in blocks (no C{-v}) is returned line by line.
    """
    if "SEL Record ID" not in stdout:
        return [line for line in stdout.splitlines() if line.strip()]
    out = []
    for block in re.split(r"\n\s*\n", stdout):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip():
                fields.setdefault(key.strip(), value.strip())
        if not fields:
            continue
        record = fields.pop("SEL Record ID", "?")
        try:
            parts = [str(int(record, 16))]
        except ValueError:
            parts = [record]
        stamp = fields.pop("Timestamp", "")
        if stamp:
            half = stamp.split()
            if len(half) % 2 == 0 and half[: len(half) // 2] == half[len(half) // 2:]:
                stamp = " ".join(half[: len(half) // 2])  # ipmitool prints date and time twice
            parts.append(stamp)
        sensor, number = fields.pop("Sensor Type", ""), fields.pop("Sensor Number", "")
        description = fields.pop("Description", "")
        direction = fields.pop("Event Direction", "")
        if sensor or description:
            if sensor:
                parts.append(f"{sensor} #0x{number}" if number else sensor)
            if description:
                parts.append(description)
            if direction:
                parts.append("Deasserted" if "Deassert" in direction else "Asserted")
        else:
            parts.extend(f"{k}: {v}" for k, v in fields.items() if v)
        out.append(" | ".join(parts))
    return out


def ipmitool_from_settings(reactor: IProcessReactor, settings: Settings) -> IpmiTool:
    """The L{IpmiTool} configured by the C{ipmi.*} settings (see L{roller.config})."""
    cipher = settings.ipmi_cipher_suite
    return IpmiTool(
        reactor,
        ipmitool=settings.ipmi_ipmitool,
        cipher_suite=None if cipher < 0 else cipher,
        timeout=settings.ipmi_timeout,
        request_timeout=settings.ipmi_request_timeout,
        request_retries=settings.ipmi_request_retries,
        retries=settings.ipmi_retries,
        retry_delay=settings.ipmi_retry_delay,
        min_interval=settings.ipmi_min_interval,
        power_wait=settings.ipmi_power_wait,
        power_poll=settings.ipmi_power_poll,
        default_credential=settings.ipmi_credential or None,
    )
