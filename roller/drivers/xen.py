"""
XenAPI: reboot a Xen VM through its pool master, XML-RPC over treq.

Requests are encoded with the standard library (C{xmlrpc.client.dumps}
and C{loads}) and sent with treq (C{twisted.web.xmlrpc.Proxy} uses a
deprecated HTTP/1.0 client).  XenAPI answers every call with
C{{'Status': 'Success', 'Value': ...}} or C{{'Status': 'Failure',
'ErrorDescription': [CODE, ...]}}; a failure becomes L{XenApiFailure},
whose message reads C{XenAPI error: VM_BAD_POWER_STATE OpaqueRef:...
halted running (VM.start on pool.example)}.

L{XenApiDriver.reboot}, for one L{XenTarget}:

  1. C{session.login_with_password(user, password, "1.0", "roller")}; a
     pool member that is not the master answers C{HOST_IS_SLAVE MASTER}
     and roller logs in at the master instead (same scheme and port).
  2. C{VM.get_by_uuid}, C{VM.get_power_state}.
  3. C{Running}: C{VM.clean_shutdown}, and if it fails (no PV tools:
     C{VM_LACKS_FEATURE_SHUTDOWN}, ...) or does not return within
     C{shutdown_timeout}, C{VM.hard_shutdown}.  C{Paused} or C{Suspended}:
     C{VM.hard_shutdown}.  C{Halted}: nothing to shut down.
  4. Wait C{start_delay} seconds on the injected clock.
  5. C{VM.start(vm, False, False)} (not paused, not forced) and read the
     power state back.
  6. C{session.logout}, always once logged in: after a failure, and after
     a cancellation too (bounded by C{logout_timeout}).

An https pool URL is verified against the system's trust store (or
C{ca_file}); with C{verify_tls} false it is not, and the driver logs a
warning once per pool.  Progress lines go to C{on_event(message)} (a job's
C{ctx.log}).

Errors are L{XenError} subclasses with one readable line naming the pool,
the VM and the credential, never the password or the session reference
(a session reference is a bearer token; it is masked in messages).

Cancelling the Deferred of any call aborts the request in flight; every
timeout is such a cancellation on the injected clock.
"""

from __future__ import annotations

import xmlrpc.client
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit
from xml.parsers.expat import ExpatError

from attrs import field, frozen
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from roller.drivers.power import (
    IPowerDriver,
    PowerActionError,
    PowerAuthError,
    PowerConnError,
    PowerError,
    PowerResult,
    PowerSettingError,
    PowerStateMismatch,
    PowerTimeout,
    password_login,
)
from roller.drivers.reactor import ITcpReactor
from roller.http_client import HttpConversation, endpoint, tls_policy
from roller.inventory import Machine
from roller.secrets import Secrets, UnknownCredential

if TYPE_CHECKING:
    from roller.config import Settings

log = Logger()

__all__ = [
    "XenApiDriver",
    "XenApiFailure",
    "XenAuthFailed",
    "XenConfigError",
    "XenConnectFailed",
    "XenError",
    "XenPower",
    "XenProtocolError",
    "XenStateMismatch",
    "XenRebootResult",
    "XenTarget",
    "XenTimeout",
    "xen_target",
]

#: Largest XML-RPC answer read (bytes).
MAX_BODY = 8 * 1024 * 1024

API_VERSION = "1.0"
ORIGINATOR = "roller"

EventCallback = Callable[..., object]  # on_event(message, **data), e.g. a job's ctx.log


# ---------------------------------------------------------------- errors


class XenError(PowerError):
    """
    A XenAPI call failed; the message says why in one line.  A
    L{PowerError}: each subclass is also the shared error of its kind.

    @ivar message: The line (also C{str(error)}).
    @ivar url: The pool URL, when known.
    """

    default_sent = True

    def __init__(self, message: str, *, url: str | None = None, sent: bool | None = None):
        host, port = endpoint(url)
        super().__init__(message, sent=sent, host=host, port=port)
        self.url = url


class XenConfigError(XenError, PowerSettingError):
    """The target cannot be built from inventory, settings and secrets."""

    default_sent = False


class XenConnectFailed(XenError, PowerConnError):
    """
    The pool could not be reached (C{sent} when it closed the connection
    during a call, which it may have acted on).

    @ivar reason: C{"refused"}, C{"unreachable"}, C{"dns"}, C{"tls"},
        C{"closed"} or C{"connect"}.
    """

    def __init__(self, message: str, *, reason: str, **kw: Any):
        super().__init__(message, sent=reason == "closed", **kw)
        self.reason = reason


class XenTimeout(XenError, PowerTimeout):
    """A call got no answer within its timeout; roller hung up."""


class XenProtocolError(XenError):
    """Not an XML-RPC XenAPI answer (HTTP error status, bad XML, a fault)."""


#: Calls that act on nothing: a failure of theirs changed no VM.
_HARMLESS_CALLS = ("session.login_with_password", "VM.get_by_uuid")


class XenApiFailure(XenError, PowerActionError):
    """
    XenAPI answered C{Status: Failure}.

    @ivar description: The C{ErrorDescription} (secrets masked).
    @ivar method: The call that failed, e.g. C{"VM.start"}.
    """

    def __init__(self, message: str, *, description: tuple[str, ...], method: str, **kw: Any):
        kw.setdefault("sent", method not in _HARMLESS_CALLS)
        super().__init__(message, **kw)
        self.description = description
        self.method = method

    @property
    def code(self) -> str:
        """The error code, e.g. C{"VM_BAD_POWER_STATE"}."""
        return self.description[0] if self.description else ""


class XenAuthFailed(XenApiFailure, PowerAuthError):
    """C{SESSION_AUTHENTICATION_FAILED}: the pool refused the credential."""

    kind = PowerAuthError.kind  # not XenApiFailure's (a refused action)


class XenStateMismatch(XenError, PowerStateMismatch):
    """The VM's power state read back is not what the action should give."""


#: XenAPI power states as L{roller.drivers.power.POWER_STATES}.
POWER_WORDS = {"Running": "on", "Halted": "off", "Paused": "unknown", "Suspended": "off"}


# ---------------------------------------------------------------- target


def _check_url(value: Any) -> str:
    if not isinstance(value, str):
        raise XenConfigError(f"XenAPI URL must be a string, not {type(value).__name__}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        raise XenConfigError(f"XenAPI URL {value[:200]!r} is not http(s)://host[:port][/path]")
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", ""))


@frozen(kw_only=True)
class XenTarget:
    """
    A VM and the pool that runs it.

    @ivar url: The pool master's XenAPI URL, e.g. C{https://xen-pool/}.
    @ivar vm_uuid: The VM's UUID.
    @ivar username: The pool user.
    @ivar password: Its password; never shown in C{repr}.
    @ivar credential: The credential's name, for messages.
    @ivar ca_file: A PEM file of the CA(s) to trust for an https URL.
    @ivar verify_tls: Whether to verify the pool's certificate.
    @ivar name: The machine (C{group/worker}), for messages.
    """

    url: str = field(converter=_check_url)
    vm_uuid: str
    username: str
    password: str = field(repr=False)
    credential: str | None = None
    ca_file: str | None = None
    verify_tls: bool = True
    name: str = ""

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    def who(self) -> str:
        cred = f"credential {self.credential!r} " if self.credential else ""
        return f"{cred}(user {self.username!r})"


def xen_target(machine: Machine, secrets: Secrets | None, *, default_url: str | None = None,
               default_credential: str | None = None, ca_file: str | None = None,
               verify_tls: bool = True) -> XenTarget:
    """
    The L{XenTarget} for a L{roller.inventory.Machine}: its C{xen.vm_uuid},
    C{xen.url} (else C{default_url}) and C{xen.credential} (else
    C{default_credential}, of type C{password}).

    @raise XenConfigError: No C{xen} section, no URL, no credential, a
        credential missing or not of type C{password}.
    """
    name = f"{machine.worker_group}/{machine.worker_id}"
    access = machine.xen
    if access is None:
        raise XenConfigError(f"machine {name} has no xen settings")
    url = access.url or default_url
    if not url:
        raise XenConfigError(f"machine {name}: no XenAPI pool URL (set xen.url on the machine or a default)")
    cred_name = access.credential or default_credential
    if not cred_name:
        raise XenConfigError(f"machine {name}: no XenAPI credential "
                             "(set xen.credential on the machine or a default)")
    try:
        if secrets is None:
            raise UnknownCredential(cred_name)
        cred = secrets.get(cred_name)
    except UnknownCredential as e:
        raise XenConfigError(f"machine {name}: XenAPI {e}") from None
    if cred.kind != "password":
        raise XenConfigError(f"machine {name}: XenAPI credential {cred_name!r} is of type {cred.kind}, "
                             "not password")
    username, password = password_login(cred)
    return XenTarget(url=url, vm_uuid=access.vm_uuid, username=username, password=password,
                     credential=cred_name, ca_file=ca_file, verify_tls=verify_tls, name=name)


@frozen
class XenRebootResult:
    """
    How a reboot went.

    @ivar vm_uuid: The VM.
    @ivar shutdown: C{"clean"}, C{"hard"} or C{"none"} (it was halted).
    @ivar state: The power state read back after C{VM.start}.
    @ivar detail: One line for the job log.
    """

    vm_uuid: str
    shutdown: str
    state: str | None
    detail: str

    def __str__(self) -> str:
        return self.detail


# ---------------------------------------------------------------- the driver


class _Pool:
    """One conversation with a pool: XML-RPC calls, the session, error mapping."""

    def __init__(self, driver: XenApiDriver, target: XenTarget, on_event: EventCallback | None):
        self.driver = driver
        self.target = target
        self.on_event = on_event
        self.url = target.url
        self.session: str | None = None
        self._secrets = [target.password] if target.password else []
        self._open(self.url)

    @property
    def where(self) -> str:
        return f"XenAPI {urlsplit(self.url).netloc}"

    def _open(self, url: str) -> None:
        self.url = url
        policy = tls_policy(self.target.ca_file, self.target.verify_tls, f"XenAPI {url}",
                            error=lambda message: XenConfigError(message, url=url))
        base = urlunsplit(urlsplit(url)[:2] + ("", "", ""))
        self.http = HttpConversation(
            self.driver.reactor, self.driver.clock, base, policy, timeout=self.driver.timeout,
            where=self.where, make_error=XenConnectFailed, timeout_error=XenTimeout, limit=MAX_BODY,
            tls_hint="trust its CA with xen.ca_file, or set xen.verify_tls = false to skip verification")

    def say(self, line: str) -> None:
        if self.on_event is not None:
            try:
                self.on_event(line)
            except Exception:  # noqa: BLE001 -- a failing progress callback must not fail the action
                log.failure("on_event callback failed")

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret and secret in text:
                text = text.replace(secret, "***")
        return text

    async def call(self, method: str, *params: Any, timeout: float | None = None) -> Any:
        """One XML-RPC call; its C{Value}, or the error for anything else."""
        path = urlsplit(self.url).path or "/"
        body = xmlrpc.client.dumps(params, method, allow_none=True).encode("utf-8")
        reply = await self.http.request("POST", path, body=body, timeout=timeout,
                                        headers={"Content-Type": "text/xml", "User-Agent": "roller"},
                                        label=method)
        if reply.status != 200:
            raise XenProtocolError(f"{self.where}: {method} answered HTTP {reply.status} "
                                   f"(is {self.url} a XenAPI endpoint?)", url=self.url)
        try:
            (result,), _ = xmlrpc.client.loads(reply.body)
        except xmlrpc.client.Fault as f:
            raise XenProtocolError(f"{self.where}: {method}: XML-RPC fault {f.faultCode}: "
                                   f"{self.scrub(str(f.faultString))[:300]}", url=self.url) from None
        except (ExpatError, ValueError, TypeError, xmlrpc.client.ResponseError):
            raise XenProtocolError(f"{self.where}: {method} did not answer XML-RPC", url=self.url) from None
        if not isinstance(result, dict) or result.get("Status") not in ("Success", "Failure"):
            raise XenProtocolError(f"{self.where}: {method} answered something other than a "
                                   "XenAPI Status", url=self.url)
        if result["Status"] == "Success":
            return result.get("Value")
        raw = result.get("ErrorDescription") or ["UNKNOWN_ERROR"]
        if not isinstance(raw, (list, tuple)):
            raw = [raw]
        description = tuple(self.scrub(str(d)) for d in raw)
        text = " ".join(d for d in description if d)[:500]
        kind = XenAuthFailed if description[0] == "SESSION_AUTHENTICATION_FAILED" else XenApiFailure
        message = f"XenAPI error: {text} ({method} on {urlsplit(self.url).netloc})"
        if kind is XenAuthFailed:
            message += f"; {self.target.who()} was refused"
        raise kind(message, description=description, method=method, url=self.url)

    async def login(self) -> None:
        args = (self.target.username, self.target.password, API_VERSION, ORIGINATOR)
        try:
            session = await self.call("session.login_with_password", *args)
        except XenApiFailure as e:
            if e.code != "HOST_IS_SLAVE" or len(e.description) < 2:
                raise
            master = e.description[1]
            old = urlsplit(self.url)
            netloc = f"[{master}]" if ":" in master else master
            if old.port:
                netloc += f":{old.port}"
            self.say(f"{self.where} is not the pool master; logging in at {master}")
            self.http.close()
            self._open(urlunsplit((old.scheme, netloc, old.path, "", "")))
            session = await self.call("session.login_with_password", *args)
        if not isinstance(session, str) or not session:
            raise XenProtocolError(f"{self.where}: login answered no session", url=self.url)
        self.session = session
        self._secrets.append(session)
        self.say(f"{self.where}: logged in ({self.target.who()})")

    async def logout(self) -> None:
        try:
            if self.session is not None:
                session, self.session = self.session, None
                try:
                    await self.call("session.logout", session, timeout=self.driver.logout_timeout)
                    self.say(f"{self.where}: logged out")
                except Exception as e:  # noqa: BLE001 -- CancelledError included: the caller's outcome stands
                    log.info("{where}: logout failed: {error}", where=self.where, error=e)
                    self.say(f"{self.where}: logout failed: {e}")
        finally:
            self.http.close()


class XenApiDriver:
    """
    Reboot Xen VMs through XenAPI (see the module docstring).

    @param reactor: For connections.
    @param clock: For timeouts and the start delay; the reactor by default.
    @param timeout: Seconds for each call but clean_shutdown, hard_shutdown
        and start (connect included).
    @param shutdown_timeout: Seconds C{VM.clean_shutdown} may take before
        roller gives up on it and uses C{VM.hard_shutdown}; also the bound
        of C{hard_shutdown} and C{start}.
    @param start_delay: Seconds between the shutdown and C{VM.start}.
    @param logout_timeout: Seconds for C{session.logout}.
    """

    def __init__(self, reactor: ITcpReactor, *, clock: IReactorTime | None = None, timeout: float = 30.0,
                 shutdown_timeout: float = 120.0, start_delay: float = 5.0, logout_timeout: float = 10.0,
                 default_url: str | None = None, default_credential: str | None = None,
                 ca_file: str | None = None, verify_tls: bool = True):
        for name, value in (("timeout", timeout), ("shutdown_timeout", shutdown_timeout),
                            ("logout_timeout", logout_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        if isinstance(start_delay, bool) or not isinstance(start_delay, (int, float)) or start_delay < 0:
            raise ValueError(f"start_delay must be a number of at least 0, not {start_delay!r}")
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.timeout = float(timeout)
        self.shutdown_timeout = float(shutdown_timeout)
        self.start_delay = float(start_delay)
        self.logout_timeout = float(logout_timeout)
        self.default_url = default_url or None
        self.default_credential = default_credential or None
        self.ca_file = ca_file or None
        self.verify_tls = verify_tls
        self._warned: set[str] = set()

    def target(self, machine: Machine, secrets: Secrets | None) -> XenTarget:
        """L{xen_target} with this driver's defaults (pool URL, credential, TLS)."""
        return xen_target(machine, secrets, default_url=self.default_url,
                          default_credential=self.default_credential, ca_file=self.ca_file,
                          verify_tls=self.verify_tls)

    def for_machine(self, machine: Machine, secrets: Secrets | None, *,
                    on_progress: EventCallback | None = None) -> XenPower:
        """
        The L{IPowerDriver} of C{machine}'s VM.

        @raise PowerError: (kind C{"config"}) the target cannot be built.
        """
        return XenPower(self, self.target(machine, secrets), on_progress)

    def _with_session(self, target: XenTarget, on_event: EventCallback | None,
                      act: Callable[[_Pool, str], Any]) -> Deferred:
        async def conversation() -> Any:
            if not target.verify_tls and target.url.startswith("https:") and target.host not in self._warned:
                self._warned.add(target.host)
                log.warn("XenAPI {host}: TLS certificate verification is disabled (xen.verify_tls = false)",
                         host=target.host)
            pool = _Pool(self, target, on_event)
            try:
                await pool.login()
                vm = await pool.call("VM.get_by_uuid", pool.session, target.vm_uuid)
                return await act(pool, vm)
            finally:
                await pool.logout()

        return Deferred.fromCoroutine(conversation())

    def power_state(self, target: XenTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """The VM's power state: C{"Running"}, C{"Halted"}, C{"Paused"} or C{"Suspended"}."""

        async def act(pool: _Pool, vm: str) -> str:
            return await pool.call("VM.get_power_state", pool.session, vm)

        return self._with_session(target, on_event, act)

    def reboot(self, target: XenTarget, on_event: EventCallback | None = None, *,
               shutdown_timeout: float | None = None,
               start_delay: float | None = None) -> Deferred[XenRebootResult]:
        """Shut the VM down (clean, else hard), wait, start it; see the module docstring."""
        shutdown_timeout = self.shutdown_timeout if shutdown_timeout is None else shutdown_timeout
        start_delay = self.start_delay if start_delay is None else start_delay
        uuid = target.vm_uuid

        async def act(pool: _Pool, vm: str) -> XenRebootResult:
            s = pool.session
            state = await pool.call("VM.get_power_state", s, vm)
            pool.say(f"{pool.where}: VM {uuid} is {state}")
            if state == "Halted":
                how, shutdown = "was already halted", "none"
            elif state == "Running":
                try:
                    pool.say(f"{pool.where}: VM.clean_shutdown {uuid}")
                    await pool.call("VM.clean_shutdown", s, vm, timeout=shutdown_timeout)
                    how, shutdown = "clean shutdown", "clean"
                except XenTimeout:
                    why = f"clean shutdown did not finish within {shutdown_timeout:g} s"
                    pool.say(f"{pool.where}: {why}; VM.hard_shutdown")
                    await self._hard_shutdown(pool, vm, shutdown_timeout)
                    how, shutdown = f"{why}; hard shutdown", "hard"
                except XenApiFailure as e:
                    why = f"clean shutdown failed ({' '.join(e.description[:1])})"
                    pool.say(f"{pool.where}: {e}; VM.hard_shutdown")
                    await self._hard_shutdown(pool, vm, shutdown_timeout)
                    how, shutdown = f"{why}; hard shutdown", "hard"
            else:
                pool.say(f"{pool.where}: VM.hard_shutdown {uuid} (it is {state})")
                await self._hard_shutdown(pool, vm, shutdown_timeout)
                how, shutdown = f"was {state}; hard shutdown", "hard"
            if start_delay > 0:
                pool.say(f"{pool.where}: waiting {start_delay:g} s before VM.start")
                await deferLater(self.clock, start_delay, lambda: None)
            pool.say(f"{pool.where}: VM.start {uuid}")
            await pool.call("VM.start", s, vm, False, False, timeout=shutdown_timeout)
            after = await pool.call("VM.get_power_state", s, vm)
            return XenRebootResult(vm_uuid=uuid, shutdown=shutdown, state=after,
                                   detail=f"VM {uuid} {how}; started ({after})")

        return self._with_session(target, on_event, act)

    def power(self, target: XenTarget, action: str, on_event: EventCallback | None = None, *,
              off_for: float = 0.0) -> Deferred[tuple[str, str]]:
        """
        A hard power action on the VM, read back: C{"on"} (C{VM.start};
        a paused or suspended VM is hard-shut down first), C{"off"}
        (C{VM.hard_shutdown}), C{"reset"} (C{VM.hard_shutdown}, C{off_for}
        seconds, C{VM.start}).  Nothing is sent when the VM already is in
        the wanted state.  Fires with C{(power_state, detail)}; a state
        read back other than the wanted one fails with L{XenStateMismatch}.
        """
        if action not in ("on", "off", "reset"):
            raise ValueError(f"unknown power action {action!r}")
        uuid = target.vm_uuid
        want = "Halted" if action == "off" else "Running"

        async def act(pool: _Pool, vm: str) -> tuple[str, str]:
            s = pool.session
            state = await pool.call("VM.get_power_state", s, vm)
            pool.say(f"{pool.where}: VM {uuid} is {state}")
            if state == want and action != "reset":
                return state, f"VM {uuid} was already {state}"
            done = []
            if state != "Halted":
                pool.say(f"{pool.where}: VM.hard_shutdown {uuid}")
                await self._hard_shutdown(pool, vm, self.shutdown_timeout)
                done.append("hard shutdown")
            if action != "off":
                if action == "reset" and off_for > 0:
                    pool.say(f"{pool.where}: waiting {off_for:g} s before VM.start")
                    await deferLater(self.clock, off_for, lambda: None)
                    done.append(f"{off_for:g} s off")
                pool.say(f"{pool.where}: VM.start {uuid}")
                await pool.call("VM.start", s, vm, False, False, timeout=self.shutdown_timeout)
                done.append("started")
            after = await pool.call("VM.get_power_state", s, vm)
            if after != want:
                raise XenStateMismatch(f"{pool.where}: VM {uuid} reads back {after} after "
                                       f"{', '.join(done)} (wanted {want})", url=pool.url)
            pool.say(f"{pool.where}: VM {uuid} is {after}")
            return after, f"VM {uuid}: {', '.join(done)}; read back {after}"

        return self._with_session(target, on_event, act)

    async def _hard_shutdown(self, pool: _Pool, vm: str, timeout: float) -> None:
        try:
            await pool.call("VM.hard_shutdown", pool.session, vm, timeout=timeout)
        except XenApiFailure as e:
            # It may have gone down meanwhile (the clean shutdown finishing).
            try:
                state = await pool.call("VM.get_power_state", pool.session, vm)
            except XenError:
                raise e from None
            if state != "Halted":
                raise
            pool.say(f"{pool.where}: {e}, but the VM is halted")


@implementer(IPowerDriver)
class XenPower:
    """
    One Xen VM as an L{IPowerDriver}: hard power actions through the
    pool's XenAPI, each in its own session, read back with
    C{VM.get_power_state}.  C{cycle()} is L{XenApiDriver.reboot} (clean
    shutdown, falling back to hard; C{start_delay}; start); C{cycle(off_for)}
    and C{reset()} are a hard shutdown, a pause and C{VM.start}.  Build it
    with L{XenApiDriver.for_machine}.

    @ivar description: C{"XenAPI HOST VM UUID (credential 'C' (user 'U'))"}; no secret.
    """

    def __init__(self, driver: XenApiDriver, target: XenTarget, on_progress: EventCallback | None = None):
        self.driver = driver
        self.target = target
        self.on_progress = on_progress
        self.description = f"XenAPI {target.host} VM {target.vm_uuid} ({target.who()})"

    def __repr__(self) -> str:
        return f"<XenPower {self.description}>"

    @staticmethod
    def _result(state_detail: tuple[str, str]) -> PowerResult:
        state, detail = state_detail
        return PowerResult(POWER_WORDS.get(state, "unknown"), detail, raw=state)

    def status(self) -> Deferred[PowerResult]:
        """See L{IPowerDriver.status}."""
        return self.driver.power_state(self.target, self.on_progress).addCallbacks(
            lambda state: self._result((state, f"VM {self.target.vm_uuid} is {state}")))

    def on(self) -> Deferred[PowerResult]:
        """See L{IPowerDriver.on}: C{VM.start}, read back Running."""
        return self.driver.power(self.target, "on", self.on_progress).addCallback(self._result)

    def off(self) -> Deferred[PowerResult]:
        """See L{IPowerDriver.off}: C{VM.hard_shutdown}, read back Halted."""
        return self.driver.power(self.target, "off", self.on_progress).addCallback(self._result)

    def reset(self) -> Deferred[PowerResult]:
        """See L{IPowerDriver.reset}: C{VM.hard_shutdown} then C{VM.start}, read back Running."""
        return self.driver.power(self.target, "reset", self.on_progress).addCallback(self._result)

    def cycle(self, off_for: float | None = None) -> Deferred[PowerResult]:
        """See L{IPowerDriver.cycle} and the class docstring."""
        if off_for is None:
            def done(r: XenRebootResult) -> PowerResult:
                if r.state != "Running":
                    raise XenStateMismatch(f"XenAPI {self.target.host}: {r.detail}, but it reads back {r.state} "
                                           "(wanted Running)", url=self.target.url)
                return PowerResult("on", r.detail, raw=r.state)

            return self.driver.reboot(self.target, self.on_progress).addCallback(done)
        if isinstance(off_for, bool) or not isinstance(off_for, (int, float)) or off_for < 0:
            return fail(ValueError(f"off_for must be a non-negative number of seconds, not {off_for!r}"))
        return self.driver.power(self.target, "reset", self.on_progress,
                                 off_for=float(off_for)).addCallback(self._result)


def xen_from_settings(reactor: ITcpReactor, settings: Settings) -> XenApiDriver:
    """The L{XenApiDriver} configured by the C{xen.*} settings (see L{roller.config})."""
    return XenApiDriver(reactor, timeout=settings.xen_timeout, shutdown_timeout=settings.xen_shutdown_timeout,
                        start_delay=settings.xen_start_delay, default_url=settings.xen_url or None,
                        default_credential=settings.xen_credential or None,
                        ca_file=settings.xen_ca_file or None, verify_tls=settings.xen_verify_tls)
