"""
A fake XenAPI pool master: Klein, XML-RPC, on loopback.

    fake = FakeXenApi(users={"root": "xenroot"})
    vm = fake.add_vm("0f2c...", power_state="Running")   # or power=PowerState(...)
    url = fake.listen(reactor)                           # http://127.0.0.1:PORT/
    ...
    fake.methods()        # ["session.login_with_password", "VM.get_by_uuid", ...]
    await fake.stop()

It speaks XenAPI's XML-RPC dialect on C{POST /}: every answer is
C{{'Status': 'Success', 'Value': ...}} or C{{'Status': 'Failure',
'ErrorDescription': [CODE, ...]}}, with the error codes and parameters the
real xapi uses:

  - C{session.login_with_password(user, password[, version, originator])}:
    a session reference, or C{SESSION_AUTHENTICATION_FAILED user
    "Authentication failure"}; C{HOST_IS_SLAVE master} when L{master} is
    set.
  - C{session.logout(session)}.
  - C{VM.get_by_uuid(session, uuid)}: a reference, or C{UUID_INVALID VM uuid}.
  - C{VM.get_power_state(session, vm)}: C{Running}, C{Halted}, C{Paused},
    C{Suspended}.
  - C{VM.clean_shutdown(session, vm)}, C{VM.hard_shutdown(session, vm)},
    C{VM.start(session, vm, start_paused, force)}: C{VM_BAD_POWER_STATE vm
    expected actual} (lower case) when the VM is not in the right state.
    L{clean_shutdown} picks how the clean shutdown behaves: C{"ok"},
    C{"fail"} (answers L{clean_shutdown_error}, as a VM without PV tools
    does) or C{"hang"} (never answers; for timeouts).
  - A call with a reference that is not a live session fails with
    C{SESSION_INVALID ref}; a wrong number of parameters with
    C{MESSAGE_PARAMETER_COUNT_MISMATCH}; an unknown method with
    C{MESSAGE_METHOD_UNKNOWN}.

L{failures} forces a failure per method (every call, after the session
check), e.g. C{fake.failures["VM.start"] = ["VM_BAD_POWER_STATE", ...]}.

A VM may be backed by a fleet L{roller.sim.fleet.PowerState}: shutdowns
call C{power_off()}, C{VM.start} calls C{power_on()}, and the power state
read is the simulated machine's.

Every call is recorded in L{calls} as C{(method, params)}, with the
password replaced by C{***}.
"""

from __future__ import annotations

import uuid as uuidlib
import xmlrpc.client
from collections.abc import Awaitable, Callable
from typing import Any
from xml.parsers.expat import ExpatError

from attrs import define, field
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP
from twisted.logger import Logger

from roller.sim.fleet import PowerState
from roller.sim.web import base_url, serve

log = Logger()

__all__ = ["FakeVM", "FakeXenApi"]

STATES = ("Running", "Halted", "Paused", "Suspended")

# method -> (minimum, maximum) parameter count
_ARITY = {
    "session.login_with_password": (2, 4),
    "session.logout": (1, 1),
    "VM.get_by_uuid": (2, 2),
    "VM.get_power_state": (2, 2),
    "VM.clean_shutdown": (2, 2),
    "VM.hard_shutdown": (2, 2),
    "VM.start": (4, 4),
}


class _Failure(Exception):
    def __init__(self, *description: Any):
        super().__init__(*description)
        self.description = [str(d) for d in description]


@define
class FakeVM:
    """One VM: its uuid, reference and power (own state or a fleet PowerState)."""

    uuid: str
    ref: str
    name_label: str = ""
    power_state: str = "Running"
    power: PowerState | None = None

    @property
    def state(self) -> str:
        if self.power is not None:
            return "Running" if self.power.on else "Halted"
        return self.power_state

    def halt(self) -> None:
        if self.power is not None:
            self.power.power_off()
        self.power_state = "Halted"

    def run(self) -> None:
        if self.power is not None:
            self.power.power_on()
        self.power_state = "Running"


@define
class FakeXenApi:
    """
    The fake pool master; see the module docstring.

    @ivar users: user name -> password.
    @ivar master: When set, every login answers C{HOST_IS_SLAVE master}.
    @ivar clean_shutdown: C{"ok"}, C{"fail"} or C{"hang"}.
    @ivar clean_shutdown_error: The C{ErrorDescription} of C{"fail"} (the
        VM reference is appended).
    @ivar failures: method -> C{ErrorDescription} answered to every call.
    """

    users: dict[str, str] = field(factory=lambda: {"root": "xenroot"})
    master: str | None = None
    clean_shutdown: str = "ok"
    clean_shutdown_error: tuple[str, ...] = ("VM_LACKS_FEATURE_SHUTDOWN",)
    failures: dict[str, list[str]] = field(factory=dict)
    vms: dict[str, FakeVM] = field(factory=dict)
    calls: list[tuple[str, tuple]] = field(factory=list)
    sessions: dict[str, str] = field(factory=dict)
    logged_out: list[str] = field(factory=list)
    _hanging: list[Deferred] = field(factory=list, init=False)
    _port: Any = field(default=None, init=False)

    app = Klein()

    # -- set-up and inspection

    def add_vm(self, uuid: str | None = None, *, power_state: str = "Running", power: PowerState | None = None,
               name_label: str = "") -> FakeVM:
        if power_state not in STATES:
            raise ValueError(f"power_state must be one of {', '.join(STATES)}")
        uuid = uuid or str(uuidlib.uuid4())
        vm = FakeVM(uuid=uuid, ref=f"OpaqueRef:{uuidlib.uuid4()}", name_label=name_label,
                    power_state=power_state, power=power)
        self.vms[uuid] = vm
        return vm

    def methods(self) -> list[str]:
        """The methods called so far, in order."""
        return [m for m, _ in self.calls]

    def listen(self, reactor: IReactorTCP, interface: str = "127.0.0.1", port: int = 0) -> str:
        """Start listening; the pool URL (C{http://ADDRESS:PORT/})."""
        self._port = serve(self.app, reactor, interface, port)
        return self.url

    @property
    def url(self) -> str:
        return base_url(self._port) + "/"

    @property
    def port(self) -> int:
        return self._port.getHost().port

    async def stop(self) -> None:
        """Stop listening; calls left hanging are cancelled."""
        for d in self._hanging:
            if not d.called:
                d.cancel()
        self._hanging.clear()
        if self._port is not None:
            port, self._port = self._port, None
            await port.stopListening()

    # -- the XML-RPC endpoint

    @app.route("/", methods=["POST"])
    async def rpc(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/xml")
        body = request.content.read()
        try:
            params, method = xmlrpc.client.loads(body)
        except (ExpatError, ValueError, TypeError):
            return _answer({"Status": "Failure", "ErrorDescription": ["XMLRPC_UNMARSHAL_FAILURE"]})
        if method is None:  # a methodResponse, not a call
            return _answer({"Status": "Failure", "ErrorDescription": ["XMLRPC_UNMARSHAL_FAILURE"]})
        self.calls.append((method, _masked(method, params)))
        try:
            value = await self._dispatch(method, params)
        except _Failure as f:
            return _answer({"Status": "Failure", "ErrorDescription": f.description})
        return _answer({"Status": "Success", "Value": value})

    async def _dispatch(self, method: str, params: tuple) -> Any:
        handler = _HANDLERS.get(method)
        if handler is None:
            raise _Failure("MESSAGE_METHOD_UNKNOWN", method)
        low, high = _ARITY[method]
        if not low <= len(params) <= high:
            raise _Failure("MESSAGE_PARAMETER_COUNT_MISMATCH", method, high, len(params))
        if method != "session.login_with_password" and params[0] not in self.sessions:
            raise _Failure("SESSION_INVALID", params[0])
        if method in self.failures:
            raise _Failure(*self.failures[method])
        return await handler(self, *params)

    def _vm(self, ref: Any) -> FakeVM:
        for vm in self.vms.values():
            if vm.ref == ref:
                return vm
        raise _Failure("HANDLE_INVALID", "VM", ref)

    async def _hang(self) -> None:
        d: Deferred[None] = Deferred()
        self._hanging.append(d)
        await d

    # -- methods

    async def _login(self, user: str, password: str, version: str = "1.0", originator: str = "") -> str:
        if self.master is not None:
            raise _Failure("HOST_IS_SLAVE", self.master)
        if self.users.get(user) != password:
            raise _Failure("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
        ref = f"OpaqueRef:{uuidlib.uuid4()}"
        self.sessions[ref] = user
        return ref

    async def _logout(self, session: str) -> str:
        self.sessions.pop(session, None)
        self.logged_out.append(session)
        return ""

    async def _get_by_uuid(self, session: str, uuid: str) -> str:
        vm = self.vms.get(uuid)
        if vm is None:
            raise _Failure("UUID_INVALID", "VM", uuid)
        return vm.ref

    async def _get_power_state(self, session: str, ref: str) -> str:
        return self._vm(ref).state

    async def _clean_shutdown(self, session: str, ref: str) -> str:
        vm = self._vm(ref)
        if vm.state != "Running":
            raise _Failure("VM_BAD_POWER_STATE", ref, "running", vm.state.lower())
        if self.clean_shutdown == "fail":
            raise _Failure(*self.clean_shutdown_error, ref)
        if self.clean_shutdown == "hang":
            await self._hang()
        vm.halt()
        return ""

    async def _hard_shutdown(self, session: str, ref: str) -> str:
        vm = self._vm(ref)
        if vm.state == "Halted":
            raise _Failure("VM_BAD_POWER_STATE", ref, "running", "halted")
        vm.halt()
        return ""

    async def _start(self, session: str, ref: str, start_paused: bool, force: bool) -> str:
        vm = self._vm(ref)
        if vm.state != "Halted":
            raise _Failure("VM_BAD_POWER_STATE", ref, "halted", vm.state.lower())
        if start_paused:
            vm.power_state = "Paused"
        else:
            vm.run()
        return ""


_HANDLERS: dict[str, Callable[..., Awaitable[Any]]] = {
    "session.login_with_password": FakeXenApi._login,
    "session.logout": FakeXenApi._logout,
    "VM.get_by_uuid": FakeXenApi._get_by_uuid,
    "VM.get_power_state": FakeXenApi._get_power_state,
    "VM.clean_shutdown": FakeXenApi._clean_shutdown,
    "VM.hard_shutdown": FakeXenApi._hard_shutdown,
    "VM.start": FakeXenApi._start,
}


def _masked(method: str, params: tuple) -> tuple:
    if method == "session.login_with_password" and len(params) >= 2:
        return (params[0], "***", *params[2:])
    return tuple(params)


def _answer(result: dict) -> bytes:
    return xmlrpc.client.dumps((result,), methodresponse=True, allow_none=True).encode("utf-8")
