"""
An SNMP client with a Deferred API: pysnmp's engine on the Twisted reactor.

    client = SnmpClient(reactor, timeout=2.0, retries=2)
    target = SnmpTarget("10.0.0.5", credential=secrets.get("pdu-v3"))
    varbinds = await client.get(target, ["1.3.6.1.2.1.1.2.0"])
    await client.set(target, [("1.3.6.1.4.1.1718.3.2.3.1.11.1.1.8", 3)])
    client.close()

One client per process: every request goes through a pysnmp engine's
command generators (C{GetCommandGenerator}, C{SetCommandGenerator}) over
the Twisted carrier of L{roller.drivers.snmp.carrier}, and any number can
be in flight at once.  One engine serves every community and every v3
user name; a v3 user name that comes with several sets of keys (one per
PDU, or old and new keys while they rotate) gets one engine per set, as
pysnmp's USM holds one set per user name in an engine (see L{SnmpClient}).

Deadlines and retries are roller's, on the injected reactor: each attempt
has C{timeout} seconds, then the request is sent again (a new request id)
up to C{retries} times.  The engine itself never retransmits (its targets
have C{retryCount=0}); its own expiry is only a backstop.  Cancelling the
Deferred (or a timed-out attempt) I{releases} the request inside the
engine: the engine forgets it, will not retransmit it, and drops a late
answer.  So a cancelled SET is never sent again behind the caller's back.

Credentials are L{roller.secrets.Credential}s: C{snmp-community} (v1 or
v2c; GETs use C{read_community} when set, SETs C{community}) and
C{snmp-v3} (USM: noAuthNoPriv, authNoPriv, authPriv with MD5, SHA,
SHA-224/256/384/512 and DES, AES-128/192/256).  Error messages name the
credential, never a secret.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from attrs import field, frozen
from pyasn1.type import univ
from pysnmp.entity import config as snmp_config
from pysnmp.entity import engine as snmp_engine
from pysnmp.entity.rfc3413 import cmdgen
from pysnmp.error import PySnmpError
from pysnmp.proto import errind, rfc1902, rfc1905
from pysnmp.proto.api import v2c, verdec
from pysnmp.proto.error import StatusInformation
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from roller.drivers.errors import DriverError
from roller.drivers.reactor import IUdpReactor
from roller.drivers.snmp import ber
from roller.drivers.snmp.carrier import (
    SNMP_UDP6_DOMAIN,
    SNMP_UDP_DOMAIN,
    TwistedDispatcher,
    Udp6Transport,
    UdpTransport,
)
from roller.secrets import Credential

log = Logger()

__all__ = [
    "AUTH_PROTOCOLS",
    "PRIV_PROTOCOLS",
    "SnmpAuthError",
    "SnmpClient",
    "SnmpConfigError",
    "SnmpError",
    "SnmpErrorStatus",
    "SnmpNoSuchObject",
    "SnmpProtocolError",
    "SnmpTarget",
    "SnmpTimeout",
    "VarBind",
    "normalize_oid",
]

Value = int | bytes | str | None

#: secrets-file protocol names -> pysnmp USM service ids.
AUTH_PROTOCOLS: dict[str, tuple[int, ...]] = {
    "none": snmp_config.USM_AUTH_NONE,
    "MD5": snmp_config.USM_AUTH_HMAC96_MD5,
    "SHA": snmp_config.USM_AUTH_HMAC96_SHA,
    "SHA224": snmp_config.USM_AUTH_HMAC128_SHA224,
    "SHA256": snmp_config.USM_AUTH_HMAC192_SHA256,
    "SHA384": snmp_config.USM_AUTH_HMAC256_SHA384,
    "SHA512": snmp_config.USM_AUTH_HMAC384_SHA512,
}
#: AES192/AES256 are the key-extension of draft-blumenthal-aes-usm, which
#: net-snmp calls AES192/AES256 (its "AES192C/AES256C" are the Cisco/Reeder
#: variant, not offered here).
PRIV_PROTOCOLS: dict[str, tuple[int, ...]] = {
    "none": snmp_config.USM_PRIV_NONE,
    "DES": snmp_config.USM_PRIV_CBC56_DES,
    "AES": snmp_config.USM_PRIV_CFB128_AES,
    "AES192": snmp_config.USM_PRIV_CFB192_AES_BLUMENTHAL,
    "AES256": snmp_config.USM_PRIV_CFB256_AES_BLUMENTHAL,
}

# errorIndications that mean "the agent refused our v3 credentials".
_AUTH_INDICATIONS = {
    errind.WrongDigest: "wrong digest: the authentication key or protocol does not match the agent's",
    errind.UnknownUserName: "unknown user name",
    errind.UnknownSecurityName: "unknown security name",
    errind.DecryptionError: "decryption error: the privacy key or protocol does not match the agent's",
    errind.UnsupportedSecurityLevel: "unsupported security level for this user",
    errind.AuthenticationFailure: "authentication failure",
    errind.AuthenticationError: "authentication error",
    errind.NotInTimeWindow: "not in time window (clock/boots mismatch)",
    errind.UnknownCommunityName: "unknown community name",
}


class SnmpError(DriverError):
    """
    An SNMP request failed.  The message is one readable line naming the
    agent (and the credential, never its secret).

    @ivar host: The agent's host.
    @ivar port: Its UDP port.
    """

    host: str
    port: int

    def __init__(self, message: str, host: str = "", port: int = 0):
        super().__init__(message, host=host, port=port)


class SnmpConfigError(SnmpError):
    """The request cannot be made as configured (credential, host, value)."""


class SnmpTimeout(SnmpError):
    """
    No answer after every attempt.  For v1/v2c this is also what a wrong
    community looks like: agents drop such requests silently.

    @ivar attempts: How many times the request was sent.
    """

    def __init__(self, message: str, host: str = "", port: int = 0, attempts: int = 0):
        super().__init__(message, host, port)
        self.attempts = attempts


class SnmpAuthError(SnmpError):
    """The agent rejected the SNMPv3 credentials (USM report)."""


class SnmpProtocolError(SnmpError):
    """Any other failure reported by the engine (bad response, send error)."""


class SnmpErrorStatus(SnmpError):
    """
    The agent answered with a non-zero error-status.

    @ivar status: Its name (C{notWritable}, C{wrongValue}, C{noSuchName}...).
    @ivar index: The 1-based error-index.
    @ivar oid: The OID the error-index points at, if any.
    """

    def __init__(self, message: str, host: str = "", port: int = 0, status: str = "",
                 index: int = 0, oid: str | None = None):
        super().__init__(message, host, port)
        self.status = status
        self.index = index
        self.oid = oid


class SnmpNoSuchObject(SnmpError):
    """
    A varbind came back as C{noSuchObject}, C{noSuchInstance} or
    C{endOfMibView} (an agent may also answer a SET on an unknown OID like
    this, with error-status noError).

    @ivar oid: The OID.
    @ivar kind: C{"noSuchObject"}, C{"noSuchInstance"} or C{"endOfMibView"}.
    """

    def __init__(self, message: str, host: str = "", port: int = 0, oid: str = "", kind: str = ""):
        super().__init__(message, host, port)
        self.oid = oid
        self.kind = kind


@frozen
class VarBind:
    """One answered variable: a dotted OID and its value as a Python object."""

    oid: str
    value: Value

    def __iter__(self):
        return iter((self.oid, self.value))


def normalize_oid(oid: Any) -> str:
    """
    A dotted OID without a leading dot (C{".1.3.6"} -> C{"1.3.6"}).

    @raise ValueError: It is not one.
    """
    if isinstance(oid, tuple):
        parts = oid
    else:
        if not isinstance(oid, str):
            raise ValueError(f"an OID must be a dotted string, not {type(oid).__name__}")
        text = oid[1:] if oid.startswith(".") else oid
        try:
            parts = tuple(int(p) for p in text.split("."))
        except ValueError:
            raise ValueError(f"{oid[:80]!r} is not a dotted numeric OID") from None
    if len(parts) < 2 or any(p < 0 or p > 0xFFFFFFFF for p in parts) or parts[0] > 2:
        raise ValueError(f"{oid!r} is not a valid OID")
    return ".".join(str(p) for p in parts)


def _py_value(value: Any) -> Value:
    """A pyasn1 value as int / bytes / dotted str / None."""
    if isinstance(value, univ.Null):
        return None
    if isinstance(value, univ.ObjectIdentifier):
        return ".".join(str(p) for p in value)
    if isinstance(value, rfc1902.IpAddress):
        return value.prettyPrint()
    if isinstance(value, univ.OctetString):
        return bytes(value.asOctets())
    if isinstance(value, univ.Integer):
        return int(value)
    return value.prettyPrint()


def _asn1_value(value: Any) -> Any:
    """A Python value for a SET: int -> Integer32, str/bytes -> OCTET STRING."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not an SNMP value; use 1/2 (TruthValue) or an integer")
    if isinstance(value, int):
        if not -(2 ** 31) <= value < 2 ** 31:
            raise ValueError(f"integer {value} does not fit an Integer32")
        return rfc1902.Integer32(value)
    if isinstance(value, str):
        return rfc1902.OctetString(value.encode("utf-8"))
    if isinstance(value, bytes):
        return rfc1902.OctetString(value)
    if hasattr(value, "tagSet"):  # already pyasn1
        return value
    raise ValueError(f"cannot send a {type(value).__name__} as an SNMP value")


def _display(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@frozen(repr=False)
class SnmpTarget:
    """
    An SNMP agent and how to talk to it.

    @ivar host: IP address or host name.
    @ivar credential: An C{snmp-community} or C{snmp-v3} credential.
    @ivar port: UDP port.
    @ivar version: C{"1"} or C{"2c"} for community credentials (default
        C{"2c"}); always C{"3"} for C{snmp-v3}.
    @ivar context: SNMPv3 context name.
    """

    host: str
    credential: Credential
    port: int = 161
    version: str | None = field(default=None)
    context: str = ""

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host or self.host.startswith("-"):
            raise SnmpConfigError(f"invalid SNMP host {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise SnmpConfigError(f"invalid SNMP port {self.port!r}", self.host)
        cred = self.credential
        if not isinstance(cred, Credential) or cred.kind not in ("snmp-community", "snmp-v3"):
            kind = getattr(cred, "kind", type(cred).__name__)
            name = getattr(cred, "name", "?")
            raise SnmpConfigError(
                f"credential {name!r} for {_display(self.host, self.port)} is of type {kind}; "
                "SNMP needs snmp-community or snmp-v3", self.host, self.port)
        if cred.kind == "snmp-v3":
            if self.version not in (None, "3"):
                raise SnmpConfigError(f"credential {cred.name!r} is snmp-v3; version {self.version!r} "
                                      "is not possible with it", self.host, self.port)
            object.__setattr__(self, "version", "3")
        else:
            if self.version is None:
                object.__setattr__(self, "version", "2c")
            elif self.version not in ("1", "2c"):
                raise SnmpConfigError(f"credential {cred.name!r} is a community; version must be "
                                      f"1 or 2c, not {self.version!r}", self.host, self.port)

    @property
    def settled_version(self) -> str:
        """C{"1"}, C{"2c"} or C{"3"}: L{version} as settled when the target was built."""
        if self.version is None:
            raise SnmpConfigError("SNMP target built without a version", self.host, self.port)
        return self.version

    @property
    def where(self) -> str:
        """C{host:port} for messages."""
        return _display(self.host, self.port)

    def describe(self) -> str:
        """C{"host:port (v2c, credential 'x')"}: safe to log."""
        return f"{self.where} (SNMPv{self.version}, credential {self.credential.name!r})"

    def __repr__(self) -> str:
        return f"SnmpTarget({self.describe()})"

    __str__ = __repr__


def _abandoned() -> StatusInformation:
    return StatusInformation(errorIndication=_ABANDONED)


class _Abandoned(errind.ErrorIndication):
    """Our own marker: the request was released by roller (cancel/timeout)."""


_ABANDONED = _Abandoned("request released by roller")


class _Request:
    """One GET or SET with its attempts."""

    __slots__ = ("client", "target", "op", "varbinds", "timeout", "retries", "address",
                 "attempts", "handle", "timer", "deferred", "finished", "lane")

    def __init__(self, client: SnmpClient, target: SnmpTarget, op: str, varbinds: list,
                 timeout: float, retries: int, lane: _Lane):
        self.client = client
        self.lane = lane
        self.target = target
        self.op = op
        self.varbinds = varbinds
        self.timeout = timeout
        self.retries = retries
        self.address: Any = None
        self.attempts = 0
        self.handle: int | None = None
        self.timer: Any = None
        self.finished = False
        self.deferred: Deferred = Deferred(self._cancel)

    # -- sending

    def send(self, address: tuple) -> None:
        self.address = address
        self._attempt()

    def _attempt(self) -> None:
        if self.finished:
            return
        self.attempts += 1
        try:
            self.handle = self.lane.send(self)
        except SnmpError as e:
            self._fail(e)
            return
        except (PySnmpError, StatusInformation) as e:
            self._fail(SnmpProtocolError(f"SNMP {self.op} to {self.target.where} could not be sent: "
                                         f"{_indication_text(e)}", self.target.host, self.target.port))
            return
        if not self.finished:
            self.timer = self.client.reactor.callLater(self.timeout, self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
        self._release()
        if self.attempts <= self.retries:
            log.debug("snmp {op} {where}: no answer within {t:g} s, attempt {n} of {total}",
                      op=self.op, where=self.target.where, t=self.timeout, n=self.attempts,
                      total=self.retries + 1)
            self._attempt()
            return
        self._fail(SnmpTimeout(self.client._timeout_message(self), self.target.host,
                               self.target.port, attempts=self.attempts))

    def _release(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            self.lane.abandon(handle)

    def _finish(self) -> bool:
        """Mark the request done and stop its timer; False if it already was."""
        if self.finished:
            return False
        self.finished = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        return True

    def _cancel(self, d: Deferred) -> None:
        if self._finish():
            self._release()

    # -- completion

    def _fail(self, error: Exception) -> None:
        if self._finish():
            self.deferred.errback(error)

    def on_response(self, snmpEngine: Any, sendRequestHandle: int, errorIndication: Any,
                    errorStatus: Any, errorIndex: Any, varBinds: Any, cbCtx: Any) -> None:
        if errorIndication is _ABANDONED or sendRequestHandle != self.handle or self.finished:
            return
        self.lane.forget(sendRequestHandle)
        self.handle = None
        if errorIndication:
            if isinstance(errorIndication, errind.RequestTimedOut):
                # The engine's backstop expiry beat our own timer; same thing.
                if self.timer is not None and self.timer.active():
                    self.timer.cancel()
                self._timed_out()
                return
            self._fail(self.client._indication_error(self, errorIndication))
            return
        t = self.target
        if errorStatus and int(errorStatus):
            status = errorStatus.prettyPrint()
            index = int(errorIndex or 0)
            oid = None
            if 0 < index <= len(self.varbinds):
                oid = ".".join(str(p) for p in self.varbinds[index - 1].getComponentByPosition(0))
            at = f" at {oid}" if oid else ""
            self._fail(SnmpErrorStatus(
                f"{t.where} answered the SNMP {self.op} with error-status {status}{at}"
                + _STATUS_HINTS.get(status, ""), t.host, t.port, status=status, index=index, oid=oid))
            return
        result = []
        for name, value in varBinds:
            oid = ".".join(str(p) for p in name)
            if isinstance(value, (rfc1905.NoSuchObject, rfc1905.NoSuchInstance, rfc1905.EndOfMibView)):
                kind = type(value).__name__
                kind = kind[0].lower() + kind[1:]
                self._fail(SnmpNoSuchObject(
                    f"{t.where} has no {oid} ({kind}) for the SNMP {self.op}: wrong OID or outlet "
                    "for this device, or not readable/writable with this credential",
                    t.host, t.port, oid=oid, kind=kind))
                return
            result.append(VarBind(oid, _py_value(value)))
        if self._finish():
            self.deferred.callback(result)


_STATUS_HINTS = {
    "noSuchName": " (SNMPv1: the OID does not exist, or the community may not write it)",
    "notWritable": " (the object is read-only)",
    "noAccess": " (the credential may not access it)",
    "authorizationError": " (the credential is not authorized for this)",
    "wrongType": " (the agent expects another value type)",
    "wrongValue": " (the agent rejected this value)",
    "readOnly": " (the community is read-only)",
}


def _indication_text(e: Any) -> str:
    if isinstance(e, StatusInformation):
        e = e.get("errorIndication", e)
    return str(e) or type(e).__name__


class _Lane:
    """
    One pysnmp engine with its transport dispatcher, its sockets and what
    is registered in it: communities, SNMPv3 users, target parameters and
    addresses.

    pysnmp's USM holds one set of keys per user name in an engine: its
    rows are indexed by user name, and the keys localized for each agent
    (engine id) are cloned from that row the first time the agent is
    reached, then kept.  So a lane holds each user name with one set of
    keys for good (never changed, never removed), and the client puts a
    credential whose user name a lane already holds with other keys (or
    other protocols) in another lane.
    """

    def __init__(self, client: SnmpClient, number: int):
        self.client = client
        self.number = number
        self.engine = snmp_engine.SnmpEngine()
        self.dispatcher = TwistedDispatcher(client.reactor, client.timer_resolution)
        self.engine.register_transport_dispatcher(self.dispatcher)
        self.get_generator = cmdgen.GetCommandGenerator()
        self.set_generator = cmdgen.SetCommandGenerator()
        self.transports: dict[tuple, Any] = {}
        self.targets: dict[tuple, str] = {}
        self.params: dict[tuple, str] = {}
        self.communities: dict[str, str] = {}
        #: user name -> the USM keys registered for it (see L{_usm_keys}).
        self.users: dict[str, tuple] = {}
        self.names = itertools.count(1)
        # sendRequestHandle -> (sendPduHandle, mp model, cbFun, cbCtx) of the
        # engine message carrying it right now (see track).
        self.inflight: dict[int, tuple] = {}
        self.requests = 0  # requests using this lane now
        self.idle_timer: Any = None
        self.closed = False
        md = self.engine.message_dispatcher
        self._md_send_pdu = md.send_pdu
        md.send_pdu = self.track

    def __repr__(self) -> str:
        return (f"<SNMP engine {self.number}: {len(self.users)} v3 user(s), "
                f"{len(self.communities)} communit(y/ies), {self.requests} request(s)>")

    # -- use

    def acquire(self) -> None:
        self.requests += 1
        if self.idle_timer is not None:
            if self.idle_timer.active():
                self.idle_timer.cancel()
            self.idle_timer = None

    def release(self) -> None:
        self.requests -= 1
        if self.requests <= 0 and self.number > 0 and not self.closed and self.idle_timer is None:
            self.requests = 0
            self.idle_timer = self.client.reactor.callLater(self.client.idle_close, self._idle)

    def _idle(self) -> None:
        self.idle_timer = None
        if self.requests == 0:
            self.client._retire(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        self.idle_timer = None
        self.engine.close_dispatcher()
        self.transports.clear()
        self.users.clear()
        self.communities.clear()

    # -- registration

    def add_user(self, keys: tuple) -> None:
        """Register an SNMPv3 user (L{_usm_keys}) that this lane does not hold yet."""
        user, auth, auth_key, priv, priv_key = keys
        snmp_config.add_v3_user(self.engine, user, AUTH_PROTOCOLS[auth], auth_key,
                                PRIV_PROTOCOLS[priv], priv_key)
        self.users[user] = keys

    def security(self, target: SnmpTarget, write: bool) -> tuple[str, str]:
        """(securityName, securityLevel) of C{target}'s credential in this engine."""
        cred = target.credential
        if cred.kind == "snmp-community":
            community = cred.community if write else (cred.read_community or cred.community)
            if community is None:
                raise SnmpConfigError(f"credential {cred.name!r} has no community", target.host, target.port)
            index = self.communities.get(community)
            if index is None:
                index = f"c{next(self.names)}"
                snmp_config.add_v1_system(self.engine, index, community)
                self.communities[community] = index
            return index, "noAuthNoPriv"
        if cred.user is None:
            raise SnmpConfigError(f"credential {cred.name!r} has no SNMPv3 user", target.host, target.port)
        if (cred.priv_protocol or "none") != "none":
            return cred.user, "authPriv"
        if (cred.auth_protocol or "none") != "none":
            return cred.user, "authNoPriv"
        return cred.user, "noAuthNoPriv"

    def transport(self, domain: tuple) -> None:
        if domain in self.transports:
            return
        transport_class = Udp6Transport if domain == SNMP_UDP6_DOMAIN else UdpTransport
        try:
            transport = transport_class(self.client.reactor).open_client_mode()
        except PySnmpError as e:
            raise SnmpConfigError(f"cannot open an SNMP socket: {e}") from None
        snmp_config.add_transport(self.engine, domain, transport)
        self.transports[domain] = transport

    def target_name(self, target: SnmpTarget, address: tuple, write: bool) -> str:
        host = address[0]
        domain = SNMP_UDP6_DOMAIN if ":" in host else SNMP_UDP_DOMAIN
        security_name, level = self.security(target, write)
        mp_model = {"1": 0, "2c": 1, "3": 3}[target.settled_version]
        key = (domain, host, address[1], security_name, level, mp_model)
        name = self.targets.get(key)
        if name is not None:
            return name
        self.transport(domain)
        pkey = (security_name, level, mp_model)
        params = self.params.get(pkey)
        if params is None:
            params = f"p{next(self.names)}"
            snmp_config.add_target_parameters(self.engine, params, security_name, level, mp_model)
            self.params[pkey] = params
        name = f"t{next(self.names)}"
        snmp_config.add_target_address(self.engine, name, domain, (host, address[1]), params,
                                       timeout=int(self.client.ENGINE_TIMEOUT * 100), retryCount=0)
        self.targets[key] = name
        return name

    # -- sending

    def send(self, request: _Request) -> int:
        """
        Hand one attempt to the engine; the engine's sendRequestHandle.

        This is the command generator's C{send_varbinds} with the PDU built
        from prepared VarBinds (a fresh PDU, hence request id, per attempt).
        """
        if self.closed:
            raise SnmpConfigError("the SNMP client is closed", request.target.host, request.target.port)
        target = request.target
        name = self.target_name(target, request.address, write=request.op == "SET")
        if request.op == "SET":
            generator, pdu = self.set_generator, rfc1905.SetRequestPDU()
        else:
            generator, pdu = self.get_generator, rfc1905.GetRequestPDU()
        v2c.apiPDU.set_defaults(pdu)
        varbind_list = pdu.setComponentByPosition(3).getComponentByPosition(3)
        for index, varbind in enumerate(request.varbinds):
            varbind_list.setComponentByPosition(index, varbind, verifyConstraints=False,
                                                matchTags=False, matchConstraints=False)
        return generator.send_pdu(self.engine, name, None, target.context, pdu,
                                  generator.process_response_varbinds, (request.on_response, None))

    # -- engine bookkeeping

    def track(self, snmpEngine: Any, transportDomain: Any, transportAddress: Any,
              messageProcessingModel: Any, securityModel: Any, securityName: Any,
              securityLevel: Any, contextEngineId: Any, contextName: Any, pduVersion: Any,
              PDU: Any, expectResponse: Any, timeout: float = 0, cbFun: Any = None,
              cbCtx: Any = None) -> Any:
        """
        Wraps this engine's C{message_dispatcher.send_pdu}: remembers which
        engine message (sendPduHandle) carries each command-generator
        request (the first item of the context cmdgen passes) right now, so
        that L{abandon} can release it.  v3 discovery re-sends update it.
        """
        handle = self._md_send_pdu(snmpEngine, transportDomain, transportAddress,
                                   messageProcessingModel, securityModel, securityName,
                                   securityLevel, contextEngineId, contextName, pduVersion, PDU,
                                   expectResponse, timeout, cbFun, cbCtx)
        if expectResponse and isinstance(cbCtx, tuple) and cbCtx:
            self.inflight[cbCtx[0]] = (handle, messageProcessingModel, cbFun, cbCtx)
        return handle

    def forget(self, send_request_handle: int) -> None:
        self.inflight.pop(send_request_handle, None)

    def abandon(self, send_request_handle: int) -> None:
        """
        Release a request inside the engine: drop its message state (no
        retransmission, a late answer is discarded) and let the command
        generator clean up its own record.
        """
        entry = self.inflight.pop(send_request_handle, None)
        if entry is None or self.closed:
            return
        pdu_handle, mp_model, cb_fun, cb_ctx = entry
        try:
            self.engine.message_dispatcher.release_state_information(self.engine, pdu_handle, mp_model)
            cb_fun(self.engine, None, None, None, None, None, None, None, None, _abandoned(),
                   pdu_handle, cb_ctx)
        except Exception:  # noqa: BLE001 -- the engine's own cleanup; logged, the request is gone anyway
            log.failure("could not release SNMP request {handle}", handle=send_request_handle)


def _usm_keys(cred: Credential) -> tuple:
    """What an SNMPv3 credential registers in an engine: user, protocols and keys."""
    return (cred.user, cred.auth_protocol or "none", cred.auth_key, cred.priv_protocol or "none",
            cred.priv_key)


class SnmpClient:
    """
    GET and SET through pysnmp engines on the Twisted reactor.

    Community credentials and SNMPv3 users all go through one engine
    (lane 0) as long as no two v3 credentials share a user name with
    different keys or protocols; each further set of keys for a user name
    already held gets another engine (a lane, with its own socket),
    created when first used and closed after C{idle_close} seconds without
    a request.  So any number of credentials may share a user name (each
    PDU with its own keys; old and new keys side by side while they
    rotate), and a changed credential is used as it is now, never as an
    engine remembers it.

    @param reactor: C{IReactorUDP}, C{IReactorTime} (and, for host names,
        C{IReactorPluggableNameResolver}) provider.
    @param timeout: Default seconds to wait for an answer to each attempt.
    @param retries: Default number of re-sends after a silent attempt.
    @param timer_resolution: Seconds between the engines' housekeeping ticks.
    @param idle_close: Seconds an extra engine (not lane 0) stays open
        without requests.
    """

    #: The engine's own request expiry, in seconds: a backstop only.
    ENGINE_TIMEOUT = 120.0

    def __init__(self, reactor: IUdpReactor, *, timeout: float = 2.0, retries: int = 2,
                 timer_resolution: float = 0.5, idle_close: float = 300.0):
        _check_timeout(timeout)
        _check_retries(retries)
        if isinstance(idle_close, bool) or not isinstance(idle_close, (int, float)) or idle_close <= 0:
            raise ValueError(f"idle_close must be a positive number of seconds, not {idle_close!r}")
        self.reactor = reactor
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.timer_resolution = timer_resolution
        self.idle_close = float(idle_close)
        # pyasn1 (de)serialization is most of the engine's CPU per request:
        # byte-identical fast paths for the version peek and for v1/v2c
        # messages (roller.drivers.snmp.ber); v3 is untouched.
        _install_version_peek()
        ber.install()
        self._lane_numbers = itertools.count(0)
        self._base = _Lane(self, next(self._lane_numbers))
        self._lanes: list[_Lane] = [self._base]
        #: v3 keys (L{_usm_keys}) -> the lane holding them.
        self._by_keys: dict[tuple, _Lane] = {}
        self._requests: set[_Request] = set()
        self._closed = False
        # Per-request work that repeats (PDU control SETs and status GETs
        # use the same OIDs and values over and over): prepared VarBinds by
        # (OID, value) and parsed addresses by (host, port); bounded.
        self._varbinds: dict[tuple, Any] = {}
        # ... and, for new values of known OIDs (a benchmark's counter), the
        # parsed ObjectName by OID as given (never modified once built).
        self._names_by_oid: dict[str, Any] = {}
        self._addresses: dict[tuple, tuple | None] = {}

    def __repr__(self) -> str:
        return (f"SnmpClient(timeout={self.timeout:g}, retries={self.retries}, "
                f"in_flight={len(self._requests)}, engines={len(self._lanes)})")

    @property
    def engine(self) -> Any:
        """The first engine (communities, and v3 users while their names are distinct)."""
        return self._base.engine

    @property
    def dispatcher(self) -> TwistedDispatcher:
        """The first engine's transport dispatcher."""
        return self._base.dispatcher

    @property
    def engines(self) -> int:
        """How many pysnmp engines are open."""
        return len(self._lanes)

    @property
    def _inflight(self) -> dict[int, tuple]:
        """Engine messages of unanswered requests, every engine's."""
        out: dict[int, tuple] = {}
        for lane in self._lanes:
            out.update(lane.inflight)
        return out

    def idle(self) -> bool:
        """Nothing is in flight and no engine holds state for a request."""
        return not self._requests and all(
            not lane.inflight and not lane.dispatcher.jobs_are_pending() for lane in self._lanes)

    @property
    def in_flight(self) -> int:
        """Requests not yet answered, failed or cancelled."""
        return len(self._requests)

    # -- public API

    def get(self, target: SnmpTarget, oids: Iterable[str], *, timeout: float | None = None,
            retries: int | None = None) -> Deferred[list[VarBind]]:
        """
        GET C{oids} (dotted strings) from C{target}.

        @return: A Deferred firing with one L{VarBind} per OID, in order, or
            failing with an L{SnmpError}.  Cancelling it releases the
            request.
        """
        try:
            varbinds = [self._varbind(o, None) for o in oids]
        except ValueError as e:
            return fail(SnmpConfigError(str(e), getattr(target, "host", ""), getattr(target, "port", 0)))
        return self._request(target, "GET", varbinds, timeout, retries)

    def set(self, target: SnmpTarget, varbinds: Iterable[Sequence[Any]], *,
            timeout: float | None = None, retries: int | None = None
            ) -> Deferred[list[VarBind]]:
        """
        SET C{(oid, value)} pairs on C{target}; values are ints (sent as
        Integer32), str/bytes (OCTET STRING) or pyasn1 objects.

        @return: A Deferred firing with the agent's answer varbinds, or
            failing with an L{SnmpError}.  Note that a SET may have reached
            the agent even when the answer never came back (L{SnmpTimeout})
            or the Deferred was cancelled.
        """
        try:
            prepared = [self._varbind(o, v, True) for o, v in varbinds]
        except (ValueError, TypeError) as e:
            return fail(SnmpConfigError(f"bad SET varbind: {e}", getattr(target, "host", ""),
                                        getattr(target, "port", 0)))
        return self._request(target, "SET", prepared, timeout, retries)

    def close(self) -> None:
        """Cancel everything in flight and close the sockets."""
        if self._closed:
            return
        self._closed = True
        for request in list(self._requests):
            request.deferred.cancel()
        for lane in self._lanes:
            lane.close()
        self._lanes = [self._base]
        self._by_keys.clear()

    # -- lanes

    def _lane(self, target: SnmpTarget) -> _Lane:
        """
        The lane C{target}'s credential is registered in (registering it
        first if needed: lane 0 for communities, else the first lane that
        does not hold the v3 user name yet, else a new one).

        @raise SnmpConfigError: unsupported protocols, or pysnmp refused
            the credential.
        """
        cred = target.credential
        if cred.kind != "snmp-v3":
            return self._base
        keys = _usm_keys(cred)
        lane = self._by_keys.get(keys)
        if lane is not None:
            return lane
        auth, priv = keys[1], keys[3]
        if auth not in AUTH_PROTOCOLS or priv not in PRIV_PROTOCOLS:
            raise SnmpConfigError(f"credential {cred.name!r}: unsupported protocol {auth}/{priv}",
                                  target.host, target.port)
        for lane in self._lanes:
            if cred.user not in lane.users:
                break
        else:
            lane = _Lane(self, next(self._lane_numbers))
            self._lanes.append(lane)
            log.info("SNMPv3 user {user!r} of credential {name!r} has other keys or protocols than "
                     "another credential with that user name: using SNMP engine {number} for it",
                     user=cred.user, name=cred.name, number=lane.number)
        try:
            lane.add_user(keys)
        except PySnmpError as e:
            raise SnmpConfigError(f"credential {cred.name!r}: pysnmp refused the SNMPv3 user: "
                                  f"{type(e).__name__}", target.host, target.port) from None
        self._by_keys[keys] = lane
        return lane

    def _retire(self, lane: _Lane) -> None:
        """Close an extra lane that has been idle; its credentials register again when used."""
        if lane is self._base or lane.requests:
            return
        log.debug("closing idle SNMP engine {number}", number=lane.number)
        for keys in [k for k, v in self._by_keys.items() if v is lane]:
            del self._by_keys[keys]
        self._lanes.remove(lane)
        lane.close()

    # -- requests

    def _request(self, target: SnmpTarget, op: str, varbinds: list, timeout: float | None,
                 retries: int | None) -> Deferred:
        if self._closed:
            return fail(SnmpConfigError("the SNMP client is closed"))
        if not isinstance(target, SnmpTarget):
            return fail(TypeError(f"target must be an SnmpTarget, not {type(target).__name__}"))
        if not varbinds:
            return fail(SnmpConfigError(f"SNMP {op} to {target.where} with no OID"))
        try:
            timeout = self.timeout if timeout is None else _check_timeout(timeout)
            retries = self.retries if retries is None else _check_retries(retries)
            lane = self._lane(target)
        except ValueError as e:
            return fail(SnmpConfigError(str(e), target.host, target.port))
        except SnmpConfigError as e:
            return fail(e)
        request = _Request(self, target, op, varbinds, float(timeout), int(retries), lane)
        lane.acquire()
        self._requests.add(request)
        request.deferred.addBoth(self._done, request)
        key = (target.host, target.port)
        try:
            address = self._addresses[key]
        except KeyError:
            address = _literal_address(target.host, target.port)
            if len(self._addresses) >= _CACHE_SIZE:
                self._addresses.clear()
            self._addresses[key] = address
        if address is not None:
            request.send(address)
            return request.deferred
        # A host name: resolve it first (cancellable), then send.
        resolving = self._resolve(target, timeout)

        def resolved(address: tuple) -> None:
            if not request.finished:
                request.send(address)

        def unresolved(f: Any) -> None:
            if f.check(CancelledError):
                return
            request._fail(f.value if f.check(SnmpError) else SnmpConfigError(
                f"cannot resolve {target.host!r}: {f.getErrorMessage()}", target.host, target.port))

        resolving.addCallbacks(resolved, unresolved)
        def stop_resolving(f: Failure) -> Failure:
            resolving.cancel()
            return f

        request.deferred.addErrback(stop_resolving)
        return request.deferred

    def _done(self, result: Any, request: _Request) -> Any:
        self._requests.discard(request)
        request.lane.release()
        return result

    def _resolve(self, target: SnmpTarget, timeout: float) -> Deferred:
        d = self.reactor.resolve(target.host, timeout=(max(1, int(timeout)),))

        def got(ip: str) -> tuple:
            return (ip, target.port)

        return d.addCallback(got)

    def _varbind(self, oid: Any, value: Any, is_set: bool = False) -> Any:
        """
        The prepared C{VarBind} for C{oid} and C{value} (C{None}: a GET's
        Null), from the cache when it was prepared before.  VarBinds are
        never modified once built, so requests share them.

        @raise ValueError: A bad OID or value.
        """
        kind = type(value)
        # Only str OIDs: a tuple of floats would equal (and hash like) a
        # tuple of ints that normalizes differently.
        key = (is_set, oid, kind, value) if kind in _CACHEABLE and type(oid) is str else None
        if key is not None:
            found = self._varbinds.get(key)
            if found is not None:
                return found
        name = self._names_by_oid.get(oid) if type(oid) is str else None
        if name is None:
            name = rfc1902.ObjectName(normalize_oid(oid))
            if type(oid) is str:
                if len(self._names_by_oid) >= _CACHE_SIZE:
                    self._names_by_oid.clear()
                self._names_by_oid[oid] = name
        syntax = _asn1_value(value) if is_set else None
        varbind = v2c.apiVarBind.set_oid_value(rfc1905.VarBind(), (name, syntax))
        if key is not None:
            if len(self._varbinds) >= _CACHE_SIZE:
                self._varbinds.clear()
            self._varbinds[key] = varbind
        return varbind

    # -- messages

    def _timeout_message(self, request: _Request) -> str:
        t = request.target
        if t.version == "3":
            why = "agent down, unreachable or filtered, or not speaking SNMPv3 on that port"
            if (t.credential.priv_protocol or "none") != "none":
                why += (f"; or a wrong privacy key or protocol in credential "
                        f"{t.credential.name!r}: agents drop what they cannot decrypt")
        else:
            why = (f"agent down, unreachable or filtered, or it ignored the request: a wrong "
                   f"{'write' if request.op == 'SET' else 'read'} community in credential "
                   f"{t.credential.name!r} looks exactly like this")
        tries = "1 attempt" if request.attempts == 1 else f"{request.attempts} attempts"
        return (f"no answer from {t.where} to SNMPv{t.version} {request.op} after {tries} of "
                f"{request.timeout:g} s ({why})")

    def _indication_error(self, request: _Request, indication: Any) -> SnmpError:
        t = request.target
        for kind, text in _AUTH_INDICATIONS.items():
            if isinstance(indication, kind):
                return SnmpAuthError(
                    f"{t.where} rejected the SNMPv{t.version} {request.op} with credential "
                    f"{t.credential.name!r}: {text}", t.host, t.port)
        return SnmpProtocolError(f"SNMP {request.op} to {t.where} failed: "
                                 f"{_indication_text(indication)}", t.host, t.port)


#: Bound of the per-client caches (prepared VarBinds, parsed addresses).
_CACHE_SIZE = 4096
#: Value types whose VarBinds are cached (hashable, and equal values encode
#: alike; bool is refused by _asn1_value anyway).
_CACHEABLE = frozenset((int, str, bytes, type(None)))


def _peek_message_version(whole_msg: Any) -> Any:
    """
    pysnmp's C{decode_message_version}, without pyasn1 for the usual case.

    The engine decodes the version of every incoming message before it
    decodes the whole message; with pyasn1 that is about as costly as
    encoding a request.  For a definite-length, minimally encoded SEQUENCE
    that spans the whole datagram (pyasn1 refuses trailing bytes there)
    and whose first element is a small INTEGER this reads it from the
    bytes and
    returns the same C{univ.Integer}; anything else goes to pysnmp's own
    function, so the engine's behaviour (errors included) is unchanged.
    """
    if type(whole_msg) is bytes and len(whole_msg) > 4 and whole_msg[0] == 0x30:
        first = whole_msg[1]
        if first < 0x80:
            start, length = 2, first
        elif first == 0x81 and whole_msg[2] >= 0x80:
            start, length = 3, whole_msg[2]
        elif first == 0x82 and whole_msg[2]:
            start, length = 4, int.from_bytes(whole_msg[2:4], "big")
        else:  # indefinite or non-minimal length, or a huge message: pyasn1 decides
            start, length = 0, 0
        end = start + length
        if start and end == len(whole_msg) and start + 2 < end and whole_msg[start] == 0x02:
            size = whole_msg[start + 1]
            if 1 <= size <= 4 and start + 2 + size <= end:
                return univ.Integer(int.from_bytes(whole_msg[start + 2:start + 2 + size], "big",
                                                   signed=True))
    assert _decode_message_version is not None  # installed only where there is one
    return _decode_message_version(whole_msg)


_decode_message_version: Callable[[Any], Any] | None = getattr(verdec, "decode_message_version", None)


def _install_version_peek() -> bool:
    """
    Make the engine's dispatcher (L{rfc3412}) use L{_peek_message_version};
    whether it does.  If pysnmp no longer has the function this replaces
    (see L{ber.PINNED}), nothing is patched and a warning is logged.
    """
    current = getattr(verdec, "decode_message_version", None)
    if current is _peek_message_version:
        return True
    if current is None or current is not _decode_message_version:
        ber.warn_not_installed("version peek", "pysnmp.proto.api.verdec.decode_message_version is "
                               + ("missing" if current is None else "not the function roller wraps"))
        return False
    verdec.decode_message_version = _peek_message_version
    return True


def _literal_address(host: str, port: int) -> tuple | None:
    try:
        return (str(ipaddress.ip_address(host.split("%", 1)[0])), port)
    except ValueError:
        return None


def _check_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise ValueError(f"timeout must be a number of seconds in (0, 3600], not {value!r}")
    return float(value)


def _check_retries(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
        raise ValueError(f"retries must be an integer from 0 to 20, not {value!r}")
    return value
