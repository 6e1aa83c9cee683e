"""
Redfish: power and boot control of a machine through its BMC, over treq.

L{RedfishDriver} acts on one L{RedfishTarget} per call.  Every call is
one short conversation with the BMC:

  1. C{GET /redfish/v1/} (the service root, unauthenticated by the spec).
     If it advertises a session collection (C{Links.Sessions}, or a
     C{SessionService}), roller logs in there (C{POST} C{UserName} and
     C{Password}) and sends the returned C{X-Auth-Token}; a BMC that
     refuses the credential fails the call, one that answers anything else
     (404, 405, 501, no token) falls back to HTTP basic auth.  Without
     sessions (sushy-emulator) every request carries basic auth.
  2. Find the system: the target's C{system} (an Id, a name the BMC
     redirects, or a path C{/redfish/v1/Systems/...}), else the only member
     of C{/redfish/v1/Systems}.  A BMC with several systems and no
     C{system} configured is refused, naming them: picking one would power
     off whichever blade happened to be listed first.
  3. Act: C{ComputerSystem.Reset} with a C{ResetType} chosen among the
     system's C{ResetType@Redfish.AllowableValues} (inline, or from its
     C{@Redfish.ActionInfo}), or a C{PATCH} of C{Boot}.
  4. Read back: C{PowerState} is polled on the injected clock every
     C{poll_interval} until it is what the action should give or
     C{power_timeout} passes (L{RedfishPowerTimeout}).  BMCs apply power
     changes after a while (sushy-emulator's fake driver after 1-11 s).
  5. Log out (C{DELETE} the session), also after a failure or a
     cancellation, and close the connections.

The power verbs are those of C{IPowerDriver} (as in
L{roller.drivers.ipmi}): C{verb(target, on_event=None)} returning a
Deferred that fires with a one-line summary; C{on_event(message)} (a
job's C{ctx.log}) gets progress lines.  L{RedfishDriver.power} and
L{RedfishDriver.boot_override} do the same and fire with a L{RedfishPowerResult}
or L{BootResult} instead.

  - L{RedfishDriver.reset}: a reboot.  C{ForceRestart}, else
    C{GracefulRestart}, else C{PowerCycle}, else C{ForceOff} then C{On};
    a system that is off is powered on.  An explicit C{reset_type} is sent
    as is (after checking it is allowed).
  - L{RedfishDriver.cycle}: C{PowerCycle}, else C{ForceOff}, wait for
    C{Off}, C{On}; a system that is off is powered on.
  - L{RedfishDriver.on}: C{On} (else C{ForceOn}); nothing if already on.
  - L{RedfishDriver.off}: C{ForceOff} (else C{GracefulShutdown}), or with
    C{graceful=True} C{GracefulShutdown} and, if the system is not off
    within C{power_timeout}, C{ForceOff}; nothing if already off.
  - L{RedfishDriver.status}: the power state, lower-cased (C{"on"},
    C{"off"}, C{"powering on"}, ...).
  - L{RedfishDriver.set_boot_device}: a one-time (C{Once}) or persistent
    boot override (C{pxe} by default; C{efi} also sets the UEFI mode),
    read back; a BMC that reports C{Continuous} after a C{Once} request
    (sushy-emulator does) is accepted and the summary says so.

TLS is verified against the system's trust store, or the target's
C{ca_file} alone.  Only an explicit C{verify_tls = false} turns
verification off, and the driver then logs a warning (once per machine).

Errors
======

Every failure is a L{RedfishError} with one line an operator can act on,
naming the BMC URL, the system and the credential, never the password (a
password echoed by the peer is masked) or a session token:

  - L{RedfishConfigError}: the target cannot be built (no url, no or
    unknown credential, wrong credential type, unreadable CA file), or
    several systems and none chosen.
  - L{RedfishAuthFailed}: HTTP 401 or 403.
  - L{RedfishNotFound}: the system (or another resource) is not there
    (HTTP 404); the message lists the systems the BMC has.
  - L{RedfishUnsupported}: the ResetType or boot target is not allowed
    by the BMC, or it answered HTTP 501.
  - L{RedfishHttpError}: any other unexpected status.
  - L{RedfishProtocolError}: an answer that is not the JSON expected.
  - L{RedfishConnectFailed}: refused, unreachable, unresolvable, TLS
    verification failed, or the connection closed early (C{reason}).
  - L{RedfishTimeout}: no answer to a request within C{request_timeout}.
  - L{RedfishPowerTimeout}: the power state did not follow in time.

Cancelling the Deferred of any call aborts the request in flight (its
connection is closed); request timeouts are such cancellations on the
injected clock.

Every failure is also the shared L{roller.drivers.power.PowerError} of its
kind (L{RedfishAuthFailed} is a C{PowerAuthError}, ...), so the
C{IPowerDriver} (L{RedfishPower}) passes them on as they are.

The HTTP conversation itself (L{roller.http_client.HttpConversation}) is
shared with L{roller.drivers.xen}.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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
from roller.http_client import HttpConversation, HttpReply, endpoint, tls_policy
from roller.inventory import Machine
from roller.secrets import Secrets, UnknownCredential

if TYPE_CHECKING:
    from roller.config import Settings

log = Logger()

__all__ = [
    "BootResult",
    "RedfishAuthFailed",
    "RedfishConfigError",
    "RedfishConnectFailed",
    "RedfishDriver",
    "RedfishError",
    "RedfishHttpError",
    "RedfishNotFound",
    "RedfishPowerTimeout",
    "RedfishProtocolError",
    "RedfishTarget",
    "RedfishTimeout",
    "RedfishUnsupported",
    "RedfishPower",
    "RedfishPowerResult",
    "choose_reset_type",
    "redfish_target",
]


SERVICE_ROOT = "/redfish/v1/"
SYSTEMS = "/redfish/v1/Systems"

#: ResetTypes that leave the system on / off; others (Nmi,
#: PushPowerButton, Suspend, ...) are not waited for.
ENDS_ON = frozenset({"On", "ForceOn", "ForceRestart", "GracefulRestart", "PowerCycle"})
ENDS_OFF = frozenset({"ForceOff", "GracefulShutdown"})

#: Names accepted for boot targets when the BMC does not list its own.
_BOOT_NAMES = {"pxe": "Pxe", "hdd": "Hdd", "disk": "Hdd", "cd": "Cd", "usb": "Usb", "bios": "BiosSetup",
               "biossetup": "BiosSetup", "none": "None", "uefihttp": "UefiHttp"}

#: Preferences per action, best first.
REBOOT_TYPES = ("ForceRestart", "GracefulRestart", "PowerCycle")
CYCLE_TYPES = ("PowerCycle",)
ON_TYPES = ("On", "ForceOn")
OFF_TYPES = ("ForceOff", "GracefulShutdown")

EventCallback = Callable[..., object]  # on_event(message, **data), e.g. a job's ctx.log


# ---------------------------------------------------------------- errors


class RedfishError(PowerError):
    """
    A Redfish call failed; the message says why in one line.  A
    L{PowerError}: each subclass is also the shared error of its kind.

    @ivar message: The line (also C{str(error)}).
    @ivar url: The BMC's base URL, when known.
    @ivar status: The HTTP status, when there was one.
    """

    default_sent = True

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None,
                 sent: bool | None = None):
        host, port = endpoint(url)
        super().__init__(message, sent=sent, host=host, port=port)
        self.url = url
        self.status = status


class RedfishConfigError(RedfishError, PowerSettingError):
    """The target cannot be built from inventory and secrets, or is ambiguous."""

    default_sent = False


class RedfishAuthFailed(RedfishError, PowerAuthError):
    """The BMC refused the credential (HTTP 401) or the operation (403)."""

    default_sent = False


class RedfishNotFound(RedfishError, PowerActionError):
    """HTTP 404: the system (or another resource) is not there."""

    default_sent = False


class RedfishUnsupported(RedfishError, PowerActionError):
    """The BMC does not offer the ResetType or boot target (or answered 501)."""

    default_sent = False


class RedfishHttpError(RedfishError):
    """Another unexpected HTTP status."""


class RedfishProtocolError(RedfishError):
    """The answer is not the JSON expected."""


class RedfishConnectFailed(RedfishError, PowerConnError):
    """
    No answer could be had.  When the BMC closed the connection during a
    request (C{reason} C{"closed"}) it may have acted on it: C{kind} is
    then C{"timeout"} and C{sent} true.

    @ivar reason: C{"refused"}, C{"unreachable"}, C{"dns"}, C{"tls"},
        C{"closed"} or C{"connect"}.
    """

    def __init__(self, message: str, *, reason: str, **kw: Any):
        super().__init__(message, sent=reason == "closed", **kw)
        self.reason = reason
        if reason == "closed":
            self.kind = "timeout"


class RedfishTimeout(RedfishError, PowerTimeout):
    """A request got no answer within the request timeout; roller hung up."""


class RedfishPowerTimeout(RedfishError, PowerStateMismatch):
    """
    The power state did not become what the action should give in time.

    @ivar last_state: The last C{PowerState} read.
    """

    def __init__(self, message: str, *, last_state: str | None, **kw: Any):
        super().__init__(message, **kw)
        self.last_state = last_state


# ---------------------------------------------------------------- target


def _base_url(url: str) -> str:
    """C{scheme://host[:port]} of a BMC URL (a trailing C{/redfish/v1} is dropped)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
        raise RedfishConfigError(f"Redfish URL {url[:200]!r} is not http(s)://host[:port]")
    path = parts.path.rstrip("/")
    if path not in ("", "/redfish", "/redfish/v1"):
        raise RedfishConfigError(f"Redfish URL {url[:200]!r}: give the BMC's address "
                                 "(https://host[:port]); the path must be empty or /redfish/v1")
    return f"{parts.scheme}://{parts.netloc}"


@frozen(kw_only=True)
class RedfishTarget:
    """
    A BMC and the system to act on.

    @ivar url: The BMC's base URL, C{https://host[:port]}.
    @ivar system: The system's Id, name or path; C{None} for the only one.
    @ivar username: The Redfish user.
    @ivar password: Its password; never shown in C{repr}.
    @ivar credential: The credential's name, for messages.
    @ivar ca_file: A PEM file of the CA(s) to trust instead of the system's.
    @ivar verify_tls: C{False} only when the inventory says so explicitly.
    @ivar name: The machine (C{group/worker}), for messages and the
        once-per-machine warning.
    """

    url: str = field(converter=_base_url)
    system: str | None = None
    username: str
    password: str = field(repr=False)
    credential: str | None = None
    ca_file: str | None = None
    verify_tls: bool = True
    name: str = ""

    @property
    def secure(self) -> bool:
        return self.url.startswith("https:")

    def who(self) -> str:
        """C{"credential 'NAME' (user 'U')"} for messages."""
        cred = f"credential {self.credential!r} " if self.credential else ""
        return f"{cred}(user {self.username!r})"

    def scrub(self, text: str) -> str:
        """C{text} with the password masked."""
        if self.password and self.password in text:
            text = text.replace(self.password, "***")
        return text


def redfish_target(machine: Machine, secrets: Secrets | None, default_credential: str | None = None) -> RedfishTarget:
    """
    The L{RedfishTarget} for a L{roller.inventory.Machine}.

    @param secrets: A L{roller.secrets.Secrets}.
    @param default_credential: Used when the machine's C{redfish} section
        names none.
    @raise RedfishConfigError: No C{redfish} section, no credential, a
        credential missing from the secrets file or not of type
        C{password}, or a bad URL.
    """
    name = f"{machine.worker_group}/{machine.worker_id}"
    access = machine.redfish
    if access is None:
        raise RedfishConfigError(f"machine {name} has no redfish settings")
    cred_name = access.credential or default_credential
    if not cred_name:
        raise RedfishConfigError(f"machine {name}: no Redfish credential "
                                 "(set redfish.credential on the machine or a default)")
    try:
        if secrets is None:
            raise UnknownCredential(cred_name)
        cred = secrets.get(cred_name)
    except UnknownCredential as e:
        raise RedfishConfigError(f"machine {name}: Redfish {e}") from None
    if cred.kind != "password":
        raise RedfishConfigError(f"machine {name}: Redfish credential {cred_name!r} is of type "
                                 f"{cred.kind}, not password")
    username, password = password_login(cred)
    return RedfishTarget(url=access.url, system=access.system, username=username,
                         password=password, credential=cred_name, ca_file=access.ca_file,
                         verify_tls=access.verify_tls, name=name)


# ---------------------------------------------------------------- results


@frozen
class RedfishPowerResult:
    """
    What a power action did.

    @ivar action: C{"on"}, C{"off"}, C{"cycle"}, C{"reset"}.
    @ivar reset_types: The ResetTypes sent, in order (empty if nothing
        had to be done).
    @ivar state: The C{PowerState} read back at the end.
    @ivar system: The system's path on the BMC.
    @ivar elapsed: Seconds the action took (on the driver's clock).
    @ivar detail: One line for the job log.
    """

    action: str
    reset_types: tuple[str, ...]
    state: str | None
    system: str
    elapsed: float
    detail: str

    def __str__(self) -> str:
        return self.detail


@frozen
class BootResult:
    """
    A boot override, as read back.

    @ivar target: C{BootSourceOverrideTarget} read back.
    @ivar enabled: C{BootSourceOverrideEnabled} read back (C{"Once"}, or
        C{"Continuous"} on BMCs that do not keep C{Once}).
    @ivar detail: One line for the job log.
    """

    target: str
    enabled: str | None
    system: str
    detail: str

    def __str__(self) -> str:
        return self.detail


def choose_reset_type(allowed: Sequence[str] | None, preferences: Iterable[str]) -> str | None:
    """
    The first of C{preferences} the BMC allows.  With no list advertised
    (C{allowed} is C{None}) the first preference is tried.
    """
    preferences = list(preferences)
    if allowed is None:
        return preferences[0] if preferences else None
    for p in preferences:
        if p in allowed:
            return p
    return None


def _state_word(state: str | None) -> str:
    """C{"PoweringOn"} -> C{"powering on"}."""
    if not state:
        return "unknown"
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", state).lower()


# ---------------------------------------------------------------- the driver


class _Session:
    """One conversation with a BMC: authentication, requests, error mapping."""

    def __init__(self, driver: RedfishDriver, target: RedfishTarget, on_event: EventCallback | None):
        self.driver = driver
        self.target = target
        self.on_event = on_event
        self.where = f"Redfish {target.url}"
        policy = tls_policy(target.ca_file, target.verify_tls, self.where, error=RedfishConfigError)
        self.http = HttpConversation(
            driver.reactor, driver.clock, target.url, policy, timeout=driver.request_timeout,
            where=self.where, make_error=RedfishConnectFailed, timeout_error=RedfishTimeout,
            tls_hint="trust its CA with redfish.ca_file, or set redfish.verify_tls = false on the "
                     "machine to skip verification")
        self.token: str | None = None
        self.session_uri: str | None = None
        self.auth_mode = "basic"

    def say(self, line: str) -> None:
        if self.on_event is not None:
            try:
                self.on_event(line)
            except Exception:  # noqa: BLE001 -- a failing progress callback must not fail the action
                log.failure("on_event callback failed")

    # -- requests

    def _auth_headers(self) -> dict[str, str]:
        if self.token is not None:
            return {"X-Auth-Token": self.token}
        raw = f"{self.target.username}:{self.target.password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}

    async def send(self, method: str, path: str, payload: Any = None, *, auth: bool = True,
                   headers: Mapping[str, str] | None = None, timeout: float | None = None) -> HttpReply:
        hdrs = {"Accept": "application/json", "OData-Version": "4.0"}
        if auth:
            hdrs.update(self._auth_headers())
        body = None
        if payload is not None:
            body = json.dumps(payload).encode("utf-8")
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        return await self.http.request(method, path, body=body, headers=hdrs, timeout=timeout)

    def peer_message(self, reply: HttpReply) -> str:
        """The BMC's own error text (Redfish error body, or the start of the body)."""
        text = ""
        try:
            data = reply.json()
        except ValueError:
            data = None
        if isinstance(data, Mapping) and isinstance(data.get("error"), Mapping):
            err = data["error"]
            parts = [str(err.get("message") or err.get("code") or "")]
            for info in err.get("@Message.ExtendedInfo") or ():
                if isinstance(info, Mapping) and info.get("Message") and info["Message"] not in parts:
                    parts.append(str(info["Message"]))
            text = "; ".join(p for p in parts if p)
        elif data is None or not isinstance(data, Mapping):
            text = re.sub(r"<[^>]*>", " ", reply.body.decode("utf-8", "replace"))
        text = " ".join(text.split())[:300]
        return self.target.scrub(text)

    def fail(self, reply: HttpReply, request: str, *, not_found: str | None = None,
             unsupported: str | None = None) -> RedfishError:
        """The error for an unexpected status."""
        said = self.peer_message(reply)
        status = f"HTTP {reply.status}" + (f": {said}" if said else "")
        url = self.target.url
        if reply.status == 401:
            return RedfishAuthFailed(f"{self.where}: {self.target.who()} was refused ({status})",
                                     url=url, status=401)
        if reply.status == 403:
            return RedfishAuthFailed(f"{self.where}: {self.target.who()} may not {request} ({status})",
                                     url=url, status=403)
        if reply.status == 404:
            return RedfishNotFound(f"{self.where}: {not_found or request + ' not found'} ({status})",
                                   url=url, status=404)
        if reply.status == 501:
            return RedfishUnsupported(f"{self.where}: {unsupported or request + ' is not implemented'} "
                                      f"({status})", url=url, status=501)
        return RedfishHttpError(f"{self.where}: {request} failed ({status})", url=url, status=reply.status)

    async def get_json(self, path: str, *, what: str | None = None, not_found: str | None = None,
                       auth: bool = True) -> dict:
        reply = await self.send("GET", path, auth=auth)
        if reply.status != 200:
            raise self.fail(reply, f"GET {path}", not_found=not_found or (f"{what} not found" if what else None))
        return self._decode(reply, f"GET {path}")

    def _decode(self, reply: HttpReply, request: str) -> dict:
        try:
            data = reply.json()
        except (ValueError, UnicodeDecodeError):
            raise RedfishProtocolError(f"{self.where}: {request} did not answer JSON "
                                       f"(HTTP {reply.status})", url=self.target.url,
                                       status=reply.status) from None
        if not isinstance(data, dict):
            raise RedfishProtocolError(f"{self.where}: {request} answered JSON that is not an object",
                                       url=self.target.url, status=reply.status)
        return data

    # -- authentication

    async def open(self) -> None:
        reply = await self.send("GET", SERVICE_ROOT, auth=False)
        if reply.status in (401, 403):
            # Not per the spec, but seen: the root wants credentials too.
            reply = await self.send("GET", SERVICE_ROOT)
            if reply.status != 200:
                raise self.fail(reply, f"GET {SERVICE_ROOT}")
        elif reply.status != 200:
            raise self.fail(reply, f"GET {SERVICE_ROOT}",
                            not_found=f"no Redfish service at {SERVICE_ROOT}")
        root = self._decode(reply, f"GET {SERVICE_ROOT}")
        sessions = _odata_id((root.get("Links") or {}).get("Sessions"))
        service = _odata_id(root.get("SessionService"))
        if sessions is None and service:
            sessions = service.rstrip("/") + "/Sessions"
        if sessions is None:
            self.say(f"{self.where}: basic auth ({self.target.who()})")
            return
        reply = await self.send("POST", sessions, {"UserName": self.target.username,
                                                   "Password": self.target.password}, auth=False)
        if reply.status in (401, 403):
            raise self.fail(reply, f"POST {sessions}")
        token = reply.headers.get("x-auth-token")
        if reply.status in (200, 201) and token:
            self.token = token
            self.auth_mode = "session"
            location = reply.headers.get("location")
            if not location:
                try:
                    location = _odata_id(reply.json())
                except ValueError:
                    location = None
            if location:
                self.session_uri = urlsplit(location).path or location
            self.say(f"{self.where}: session opened ({self.target.who()})")
            return
        log.debug("{where}: session login answered HTTP {status}; using basic auth",
                  where=self.where, status=reply.status)
        self.say(f"{self.where}: no session (HTTP {reply.status}); basic auth ({self.target.who()})")

    async def close(self) -> None:
        try:
            if self.token is not None and self.session_uri:
                try:
                    reply = await self.send("DELETE", self.session_uri, timeout=min(
                        self.driver.request_timeout, 10.0))
                    if reply.status not in (200, 202, 204, 404):
                        log.info("{where}: logout answered HTTP {status}", where=self.where,
                                 status=reply.status)
                except RedfishError as e:
                    log.info("{where}: logout failed: {error}", where=self.where, error=e)
        finally:
            self.token = None
            self.http.close()

    # -- systems

    async def system(self) -> tuple[str, dict]:
        """The system resource: C{(path, body)}."""
        wanted = self.target.system
        if wanted:
            path = wanted if wanted.startswith("/") else f"{SYSTEMS}/{wanted}"
            reply = await self.send("GET", path)
            if reply.status == 404:
                members = await self._members(quiet=True)
                has = ", ".join(m.rsplit("/", 1)[-1] for m in members) if members else "none listed"
                raise self.fail(reply, f"GET {path}",
                                not_found=f"system {wanted!r} not found (the BMC has: {has})")
            if reply.status != 200:
                raise self.fail(reply, f"GET {path}")
            body = self._decode(reply, f"GET {path}")
            return _odata_id(body) or path, body
        members = await self._members()
        if not members:
            raise RedfishNotFound(f"{self.where}: {SYSTEMS} lists no system", url=self.target.url)
        if len(members) > 1:
            names = ", ".join(m.rsplit("/", 1)[-1] for m in members[:20])
            raise RedfishConfigError(f"{self.where} has {len(members)} systems ({names}); set "
                                     f"redfish.system on the machine to choose one",
                                     url=self.target.url)
        body = await self.get_json(members[0], what=f"system {members[0]}")
        return _odata_id(body) or members[0], body

    async def _members(self, quiet: bool = False) -> list[str]:
        try:
            data = await self.get_json(SYSTEMS)
        except RedfishError:
            if quiet:
                return []
            raise
        return [m for m in (_odata_id(x) for x in data.get("Members") or ()) if m]

    async def power_state(self, path: str) -> str | None:
        body = await self.get_json(path, what=f"system {path}")
        return body.get("PowerState")

    async def allowed_reset_types(self, system: dict) -> tuple[str, tuple[str, ...] | None]:
        """The Reset action's target and its allowed ResetTypes (C{None}: not advertised)."""
        path = _odata_id(system) or ""
        action = ((system.get("Actions") or {}).get("#ComputerSystem.Reset"))
        if not isinstance(action, Mapping):
            raise RedfishUnsupported(f"{self.where}: system {path} has no ComputerSystem.Reset action",
                                     url=self.target.url)
        target = action.get("target") or f"{path}/Actions/ComputerSystem.Reset"
        allowed = action.get("ResetType@Redfish.AllowableValues")
        if allowed is None and action.get("@Redfish.ActionInfo"):
            try:
                info = await self.get_json(action["@Redfish.ActionInfo"])
                for p in info.get("Parameters") or ():
                    if isinstance(p, Mapping) and p.get("Name") == "ResetType":
                        allowed = p.get("AllowableValues")
            except RedfishError as e:
                log.debug("{where}: ActionInfo unreadable: {error}", where=self.where, error=e)
        if isinstance(allowed, list):
            return target, tuple(str(a) for a in allowed)
        return target, None

    async def send_reset(self, system_path: str, action_target: str, reset_type: str) -> None:
        reply = await self.send("POST", action_target, {"ResetType": reset_type})
        self.say(f"{self.where}: {system_path} ComputerSystem.Reset {reset_type} -> HTTP {reply.status}")
        if reply.status not in (200, 202, 204):
            raise self.fail(reply, f"ComputerSystem.Reset {reset_type} on {system_path}",
                            unsupported=f"the BMC does not support ResetType {reset_type!r} on "
                                        f"{system_path}",
                            not_found=f"no Reset action at {action_target}")


def _odata_id(value: Any) -> str | None:
    if isinstance(value, Mapping):
        v = value.get("@odata.id")
        return v if isinstance(v, str) and v else None
    return None


class RedfishDriver:
    """
    Power and boot control over Redfish (see the module docstring).

    @param reactor: For connections (C{IReactorTCP}, C{IReactorTime}).
    @param clock: For timeouts and polling; the reactor by default.
    @param request_timeout: Seconds for each HTTP request (connect included).
    @param power_timeout: Seconds the power state may take to follow.
    @param poll_interval: Seconds between power-state reads.
    """

    def __init__(self, reactor: ITcpReactor, *, clock: IReactorTime | None = None, request_timeout: float = 20.0,
                 power_timeout: float = 120.0, poll_interval: float = 2.0,
                 default_credential: str | None = None):
        for name, value in (("request_timeout", request_timeout), ("power_timeout", power_timeout),
                            ("poll_interval", poll_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.request_timeout = float(request_timeout)
        self.power_timeout = float(power_timeout)
        self.poll_interval = float(poll_interval)
        self.default_credential = default_credential or None
        self._warned: set[str] = set()

    def for_machine(self, machine: Machine, secrets: Secrets | None, *,
                    on_progress: EventCallback | None = None) -> RedfishPower:
        """
        The L{IPowerDriver} of C{machine}'s Redfish BMC (with this driver's
        C{default_credential} when the machine names none).

        @raise PowerError: (kind C{"config"}) the target cannot be built.
        """
        return RedfishPower(self, redfish_target(machine, secrets, self.default_credential), on_progress)

    # -- the power verbs (IPowerDriver): each returns a Deferred firing with a
    # -- one-line summary; cancelling it hangs up.

    def status(self, target: RedfishTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """The system's power state, lower-cased: C{"on"}, C{"off"}, C{"powering on"}, ..."""

        async def act(s: _Session, path: str, system: dict) -> str:
            state = system.get("PowerState")
            s.say(f"{s.where}: {path} PowerState {state}")
            return _state_word(state)

        return self._run(target, on_event, act)

    def on(self, target: RedfishTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """Power on (C{On}, else C{ForceOn}) and read back C{On}; nothing if already on."""
        return self.power(target, "on", on_event).addCallback(str)

    def off(self, target: RedfishTarget, on_event: EventCallback | None = None, *,
            graceful: bool = False) -> Deferred[str]:
        """
        Power off (C{ForceOff}, else C{GracefulShutdown}) and read back
        C{Off}; nothing if already off.  C{graceful} asks the OS first
        (C{GracefulShutdown}) and forces it off if it is not off within
        C{power_timeout}.
        """
        return self.power(target, "off", on_event, graceful=graceful).addCallback(str)

    def cycle(self, target: RedfishTarget, on_event: EventCallback | None = None) -> Deferred[str]:
        """Power cycle (C{PowerCycle}, else C{ForceOff}, C{Off}, C{On}) and read back C{On}."""
        return self.power(target, "cycle", on_event).addCallback(str)

    def reset(self, target: RedfishTarget, on_event: EventCallback | None = None, *,
              reset_type: str | None = None) -> Deferred[str]:
        """
        Reboot (C{ForceRestart}, else C{GracefulRestart}, else C{PowerCycle},
        else C{ForceOff} and C{On}; a system that is off is powered on) and
        read back C{On}.  With C{reset_type}, send exactly that.
        """
        return self.power(target, "reset", on_event, reset_type=reset_type).addCallback(str)

    def set_boot_device(self, target: RedfishTarget, device: str = "pxe", efi: bool = False,
                        on_event: EventCallback | None = None, *, once: bool = True) -> Deferred[str]:
        """A boot override for the next boot (C{once}) or for good, read back."""
        return self.boot_override(target, device, on_event, once=once, efi=efi).addCallback(str)

    # -- the same with structured results

    def power(self, target: RedfishTarget, action: str, on_event: EventCallback | None = None, *,
              graceful: bool = False, reset_type: str | None = None) -> Deferred[RedfishPowerResult]:
        """
        C{action} (C{"on"}, C{"off"}, C{"cycle"}, C{"reset"}) as the verbs
        above, firing with a L{RedfishPowerResult}.  C{graceful} applies to
        C{"off"}, C{reset_type} to C{"reset"}: that ResetType exactly,
        refused before sending if the BMC advertises a list without it,
        then the state it implies is waited for.
        """
        if action not in ("on", "off", "cycle", "reset"):
            raise ValueError(f"unknown power action {action!r}")

        async def act(s: _Session, path: str, system: dict) -> RedfishPowerResult:
            if action == "on":
                return await self._power(s, path, system, "on", ON_TYPES, "On")
            if action == "off":
                if graceful:
                    return await self._graceful_off(s, path, system)
                return await self._power(s, path, system, "off", OFF_TYPES, "Off")
            if action == "cycle":
                return await self._restart(s, path, system, "cycle", CYCLE_TYPES)
            if reset_type is None:
                return await self._restart(s, path, system, "reset", REBOOT_TYPES)
            return await self._explicit_reset(s, path, system, reset_type)

        return self._run(target, on_event, act)

    def boot_override(self, target: RedfishTarget, device: str = "pxe",
                      on_event: EventCallback | None = None, *, once: bool = True,
                      efi: bool = False) -> Deferred[BootResult]:
        """
        Set C{Boot.BootSourceOverrideTarget} (C{pxe}, C{hdd}, C{cd}, ...;
        matched case-insensitively against what the BMC offers) with
        C{BootSourceOverrideEnabled} C{Once} (or C{Continuous}), and
        C{BootSourceOverrideMode} C{UEFI} if C{efi}; read it back.
        """

        async def act(s: _Session, path: str, system: dict) -> BootResult:
            boot = system.get("Boot") or {}
            offered = boot.get("BootSourceOverrideTarget@Redfish.AllowableValues")
            wanted = device
            if isinstance(offered, list):
                match = [o for o in offered if isinstance(o, str) and o.lower() == device.lower()]
                if not match:
                    raise RedfishUnsupported(f"{s.where}: boot target {device!r} is not offered for "
                                             f"{path} (allowed: {', '.join(map(str, offered))})",
                                             url=target.url)
                wanted = match[0]
            elif device.lower() in _BOOT_NAMES:
                wanted = _BOOT_NAMES[device.lower()]
            enabled = "Once" if once else "Continuous"
            patch: dict[str, str] = {"BootSourceOverrideTarget": wanted, "BootSourceOverrideEnabled": enabled}
            if efi:
                patch["BootSourceOverrideMode"] = "UEFI"
            headers = {}
            reply = await s.send("GET", path)
            if reply.status == 200 and reply.headers.get("etag"):
                headers["If-Match"] = reply.headers["etag"]
            reply = await s.send("PATCH", path, {"Boot": patch}, headers=headers)
            s.say(f"{s.where}: {path} Boot override {wanted} ({enabled}) -> HTTP {reply.status}")
            if reply.status not in (200, 202, 204):
                raise s.fail(reply, f"PATCH Boot of {path}",
                             unsupported=f"the BMC cannot set the boot override of {path}")
            after = (await s.get_json(path, what=f"system {path}")).get("Boot") or {}
            got, got_enabled = after.get("BootSourceOverrideTarget"), after.get("BootSourceOverrideEnabled")
            if got != wanted:
                raise RedfishProtocolError(f"{s.where}: boot override of {path} reads back {got!r}, "
                                           f"not {wanted!r}", url=target.url)
            if efi and after.get("BootSourceOverrideMode") not in (None, "UEFI"):
                raise RedfishProtocolError(f"{s.where}: boot mode of {path} reads back "
                                           f"{after.get('BootSourceOverrideMode')!r}, not 'UEFI'",
                                           url=target.url)
            detail = f"boot override {wanted} ({enabled}{', UEFI' if efi else ''}) set on {path}"
            if got_enabled != enabled:
                detail += f"; the BMC reports {got_enabled}"
            return BootResult(target=got, enabled=got_enabled, system=path, detail=detail)

        return self._run(target, on_event, act)

    # -- internals

    def _run(self, target: RedfishTarget, on_event: EventCallback | None,
             act: Callable[[_Session, str, dict], Any]) -> Deferred:
        async def conversation() -> Any:
            if not target.verify_tls and target.secure:
                key = target.name or target.url
                if key not in self._warned:
                    self._warned.add(key)
                    log.warn("Redfish {url} ({machine}): TLS certificate verification is disabled "
                             "(verify_tls = false)", url=target.url, machine=target.name or "?")
            s = _Session(self, target, on_event)
            try:
                await s.open()
                path, system = await s.system()
                return await act(s, path, system)
            finally:
                await s.close()

        return Deferred.fromCoroutine(conversation())

    def _result(self, action: str, sent: tuple[str, ...], state: str | None, path: str,
                started: float, detail: str) -> RedfishPowerResult:
        return RedfishPowerResult(action=action, reset_types=sent, state=state, system=path,
                           elapsed=self.clock.seconds() - started, detail=detail)

    async def _graceful_off(self, s: _Session, path: str, system: dict) -> RedfishPowerResult:
        started = self.clock.seconds()
        if system.get("PowerState") == "Off":
            s.say(f"{s.where}: {path} is already Off")
            return self._result("off", (), "Off", path, started, f"{path} was already Off")
        target_path, allowed = await s.allowed_reset_types(system)
        if choose_reset_type(allowed, ("GracefulShutdown",)) is None:
            s.say(f"{s.where}: GracefulShutdown is not offered; forcing it off")
            return await self._power(s, path, system, "off", OFF_TYPES, "Off")
        await s.send_reset(path, target_path, "GracefulShutdown")
        try:
            state = await self._wait(s, path, "Off", "GracefulShutdown")
            return self._result("off", ("GracefulShutdown",), state, path, started,
                                f"GracefulShutdown sent; {path} is {state}")
        except RedfishPowerTimeout as e:
            s.say(f"{e}; forcing it off")
        forced = choose_reset_type(allowed, ("ForceOff",))
        if forced is None:
            raise RedfishUnsupported(f"{s.where}: {path} did not shut down and ForceOff is not "
                                     f"offered (allowed: {', '.join(allowed or ())})", url=s.target.url)
        await s.send_reset(path, target_path, forced)
        state = await self._wait(s, path, "Off", forced)
        return self._result("off", ("GracefulShutdown", forced), state, path, started,
                            f"GracefulShutdown did not finish in {self.power_timeout:g} s; "
                            f"{forced} sent; {path} is {state}")

    async def _explicit_reset(self, s: _Session, path: str, system: dict, reset_type: str) -> RedfishPowerResult:
        started = self.clock.seconds()
        target_path, allowed = await s.allowed_reset_types(system)
        if allowed is not None and reset_type not in allowed:
            raise RedfishUnsupported(
                f"{s.where}: ResetType {reset_type!r} is not offered for {path} "
                f"(allowed: {', '.join(allowed) or 'none'})", url=s.target.url)
        await s.send_reset(path, target_path, reset_type)
        want = "On" if reset_type in ENDS_ON else "Off" if reset_type in ENDS_OFF else None
        state = await self._wait(s, path, want, reset_type) if want else system.get("PowerState")
        return self._result("reset", (reset_type,), state, path, started,
                            f"{reset_type} sent; {path} is {state}")

    async def _power(self, s: _Session, path: str, system: dict, action: str,
                     preferences: Sequence[str], want: str) -> RedfishPowerResult:
        started = self.clock.seconds()
        if system.get("PowerState") == want:
            s.say(f"{s.where}: {path} is already {want}")
            return self._result(action, (), want, path, started, f"{path} was already {want}")
        target_path, allowed = await s.allowed_reset_types(system)
        reset_type = choose_reset_type(allowed, preferences)
        if reset_type is None:
            raise RedfishUnsupported(f"{s.where}: none of {', '.join(preferences)} is offered for "
                                     f"{path} (allowed: {', '.join(allowed or ())})", url=s.target.url)
        await s.send_reset(path, target_path, reset_type)
        state = await self._wait(s, path, want, reset_type)
        return self._result(action, (reset_type,), state, path, started,
                            f"{reset_type} sent; {path} is {state}")

    async def _restart(self, s: _Session, path: str, system: dict, action: str,
                       preferences: Sequence[str]) -> RedfishPowerResult:
        started = self.clock.seconds()
        target_path, allowed = await s.allowed_reset_types(system)
        if system.get("PowerState") == "Off":
            on = choose_reset_type(allowed, ON_TYPES)
            if on is None:
                raise RedfishUnsupported(f"{s.where}: {path} is off and On is not offered",
                                         url=s.target.url)
            s.say(f"{s.where}: {path} is off; powering it on")
            await s.send_reset(path, target_path, on)
            state = await self._wait(s, path, "On", on)
            return self._result(action, (on,), state, path, started,
                                f"{path} was off; {on} sent; {path} is {state}")
        reset_type = choose_reset_type(allowed, preferences)
        if reset_type is not None:
            await s.send_reset(path, target_path, reset_type)
            state = await self._wait(s, path, "On", reset_type)
            return self._result(action, (reset_type,), state, path, started,
                                f"{reset_type} sent; {path} is {state}")
        off = choose_reset_type(allowed, ("ForceOff",))
        on = choose_reset_type(allowed, ON_TYPES)
        if off is None or on is None:
            raise RedfishUnsupported(f"{s.where}: neither {', '.join(preferences)} nor ForceOff and On "
                                     f"are offered for {path} (allowed: {', '.join(allowed or ())})",
                                     url=s.target.url)
        await s.send_reset(path, target_path, off)
        await self._wait(s, path, "Off", off)
        await s.send_reset(path, target_path, on)
        state = await self._wait(s, path, "On", on)
        return self._result(action, (off, on), state, path, started,
                            f"{off} then {on} sent; {path} is {state}")

    async def _wait(self, s: _Session, path: str, want: str, after: str) -> str:
        """Poll C{PowerState} until it is C{want}; L{RedfishPowerTimeout} after C{power_timeout}."""
        started = self.clock.seconds()
        deadline = started + self.power_timeout
        while True:
            state = await s.power_state(path)
            now = self.clock.seconds()
            if state == want:
                s.say(f"{s.where}: {path} PowerState {state} after {now - started:.1f} s")
                return state
            if now >= deadline:
                raise RedfishPowerTimeout(
                    f"{s.where}: {path} is still {state} {self.power_timeout:g} s after {after} "
                    f"(wanted {want})", last_state=state, url=s.target.url)
            await deferLater(self.clock, min(self.poll_interval, max(deadline - now, 0.0)), lambda: None)


# ---------------------------------------------------------------- as an IPowerDriver


def power_word(state: str | None) -> str:
    """A Redfish C{PowerState} (or its lower-cased word) as one of L{POWER_STATES}."""
    word = _state_word(state)
    if word in ("on", "off"):
        return word
    if word in ("powering on", "powering off", "paused"):
        return "changing"
    return "unknown"


@implementer(IPowerDriver)
class RedfishPower:
    """
    One machine's system on its Redfish BMC as an L{IPowerDriver}: the
    L{RedfishDriver} verbs bound to one L{RedfishTarget}, firing with
    L{roller.drivers.power.PowerResult}s once the C{PowerState} is read
    back, failing with L{PowerError}s.  Build it with
    L{RedfishDriver.for_machine}.

    @ivar description: C{"Redfish URL system S (credential 'C' (user 'U'))"}; no secret.
    """

    def __init__(self, driver: RedfishDriver, target: RedfishTarget,
                 on_progress: EventCallback | None = None):
        self.driver = driver
        self.target = target
        self.on_progress = on_progress
        system = f" system {target.system}" if target.system else ""
        self.description = f"Redfish {target.url}{system} ({target.who()})"

    def __repr__(self) -> str:
        return f"<RedfishPower {self.description}>"

    def status(self) -> Deferred[PowerResult]:
        """See L{IPowerDriver.status}."""
        def done(word: str) -> PowerResult:
            return PowerResult(power_word(word), f"{self.target.url}: PowerState is {word}", raw=word)

        return self.driver.status(self.target, self.on_progress).addCallback(done)

    def _power(self, action: str) -> Deferred[PowerResult]:
        def done(r: RedfishPowerResult) -> PowerResult:
            return PowerResult(power_word(r.state), r.detail, raw=r.state)

        return self.driver.power(self.target, action, self.on_progress).addCallback(done)

    def on(self) -> Deferred[PowerResult]:
        """See L{IPowerDriver.on}: C{On} (else C{ForceOn}), read back On."""
        return self._power("on")

    def off(self) -> Deferred[PowerResult]:
        """See L{IPowerDriver.off}: C{ForceOff} (else C{GracefulShutdown}), read back Off."""
        return self._power("off")

    def reset(self) -> Deferred[PowerResult]:
        """See L{IPowerDriver.reset}: C{ForceRestart} (or the best restart offered), read back On."""
        return self._power("reset")

    def cycle(self, off_for: float | None = None) -> Deferred[PowerResult]:
        """
        See L{IPowerDriver.cycle}: C{PowerCycle} (else C{ForceOff}, C{On}),
        or with C{off_for}: off (read back), C{off_for} seconds, on (read back).
        """
        if off_for is None:
            return self._power("cycle")
        if isinstance(off_for, bool) or not isinstance(off_for, (int, float)) or off_for < 0:
            return fail(ValueError(f"off_for must be a non-negative number of seconds, not {off_for!r}"))

        async def go() -> PowerResult:
            await self.driver.power(self.target, "off", self.on_progress)
            await deferLater(self.driver.clock, off_for, lambda: None)
            r = await self.driver.power(self.target, "on", self.on_progress)
            return PowerResult(power_word(r.state), f"{self.target.url}: cycled (off, {off_for:g} s, on); "
                                                      f"{r.detail}", raw=r.state)

        return Deferred.fromCoroutine(go())

    def set_boot_device(self, device: str = "pxe", efi: bool = False) -> Deferred[str]:
        """A one-time boot override (C{pxe} by default), read back; L{PowerError} on failure."""
        return self.driver.set_boot_device(self.target, device, efi, self.on_progress)


def redfish_from_settings(reactor: ITcpReactor, settings: Settings) -> RedfishDriver:
    """The L{RedfishDriver} configured by the C{redfish.*} settings (see L{roller.config})."""
    return RedfishDriver(reactor, request_timeout=settings.redfish_request_timeout,
                         power_timeout=settings.redfish_power_timeout,
                         poll_interval=settings.redfish_poll_interval,
                         default_credential=settings.redfish_credential or None)
