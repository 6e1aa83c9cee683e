"""
PDU outlets as power drivers: L{IPowerDriver} over SNMP.

    pdus = SnmpPdus(reactor, SnmpClient(reactor), min_interval=1.0)
    power = pdus.for_machine(machine, secrets)     # an IPowerDriver
    result = await power.off()                      # SET, then read back until off
    result = await power.cycle()                    # the PDU's own reboot
    result = await power.cycle(off_for=10)          # off, 10 s, on

L{SnmpPdus} is built once per process and shared by every job: it holds
the SNMP client, the models detected per PDU, and an L{EndpointPacer}
that sends at most one request at a time to each PDU, at least
C{min_interval} seconds after the previous one finished.  Weak PDU
firmware drops or garbles concurrent requests; one job alone sends several
(SET, then status reads), and jobs on different outlets of the same PDU
may run at once if the queue allows it.  The pacing is per PDU: a slow or
dead PDU delays only requests to itself.

After every command the outlet's state is read back until it is the one
asked for, or C{settle_timeout} (C{reboot_timeout} for a reboot) passes:
a PDU that accepted the SET but did not switch fails the action.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from roller.drivers.power import (
    IPowerDriver,
    PowerActionError,
    PowerAuthError,
    PowerError,
    PowerResult,
    PowerSettingError,
    PowerStateMismatch,
    PowerTimeout,
)
from roller.drivers.snmp.client import (
    SnmpAuthError,
    SnmpClient,
    SnmpConfigError,
    SnmpError,
    SnmpErrorStatus,
    SnmpNoSuchObject,
    SnmpTarget,
    SnmpTimeout,
)
from roller.drivers.snmp.models import (
    MODELS,
    OFF,
    ON,
    SYS_OBJECT_ID,
    OutletAddress,
    OutletStatus,
    PduModel,
    model_for_sys_object_id,
)
from roller.inventory import Machine
from roller.secrets import Credential, Secrets

log = Logger()

__all__ = ["EndpointPacer", "PduOutletPower", "SnmpPdus"]

ProgressCallback = Callable[[str], object]


class _Lane:
    __slots__ = ("queue", "busy", "last_done", "timer")

    def __init__(self) -> None:
        self.queue: collections.deque = collections.deque()
        self.busy = False
        self.last_done: float | None = None
        self.timer: Any = None


class EndpointPacer:
    """
    Runs operations one at a time per key, in order, with at least
    C{min_interval} seconds between the end of one and the start of the
    next.  Different keys never wait for each other.

    @param clock: C{IReactorTime}.
    @param min_interval: Seconds of quiet between two operations on a key.
    """

    def __init__(self, clock: IReactorTime, min_interval: float = 0.0):
        if isinstance(min_interval, bool) or not isinstance(min_interval, (int, float)) or min_interval < 0:
            raise ValueError(f"min_interval must be a non-negative number, not {min_interval!r}")
        self.clock = clock
        self.min_interval = float(min_interval)
        self._lanes: dict[str, _Lane] = {}

    def busy(self, key: str) -> bool:
        """Whether an operation on C{key} runs now."""
        lane = self._lanes.get(key)
        return lane is not None and lane.busy

    def waiting(self, key: str) -> int:
        """How many operations on C{key} wait for their turn."""
        lane = self._lanes.get(key)
        return len(lane.queue) if lane else 0

    def run(self, key: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Deferred:
        """
        Call C{fn(*args, **kw)} (which may return a Deferred) when C{key}'s
        turn comes.  Cancelling the result removes a waiting call from the
        queue, or cancels a running one's Deferred.
        """
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        entry: list = [fn, args, kw, None]  # [fn, args, kw, running Deferred]

        def cancel(d: Deferred) -> None:
            if entry[3] is not None:
                entry[3].cancel()
            else:
                try:
                    lane.queue.remove(entry)
                except ValueError:
                    pass

        d: Deferred = Deferred(cancel)
        entry.append(d)
        lane.queue.append(entry)
        self._pump(key)
        return d

    def _pump(self, key: str) -> None:
        lane = self._lanes.get(key)
        if lane is None or lane.busy or lane.timer is not None:
            return
        wait = 0.0
        if lane.last_done is not None:
            wait = lane.last_done + self.min_interval - self.clock.seconds()
        if wait > 0:
            # Too soon for the next one (or, if none waits, to forget the key).
            def later() -> None:
                lane.timer = None
                self._pump(key)
            lane.timer = self.clock.callLater(wait, later)
            return
        if not lane.queue:
            del self._lanes[key]
            return
        entry = lane.queue.popleft()
        fn, args, kw, _, outer = entry
        lane.busy = True
        inner = maybeDeferred(fn, *args, **kw)
        entry[3] = inner

        def finished(result: Any) -> None:
            lane.busy = False
            lane.last_done = self.clock.seconds()
            if not outer.called:
                outer.callback(result) if not _is_failure(result) else outer.errback(result)
            elif _is_failure(result) and not result.check(CancelledError):
                log.failure("paced call on {key} failed after its caller left", result, key=key)
            self._pump(key)

        inner.addBoth(finished)


def _is_failure(result: Any) -> bool:
    from twisted.python.failure import Failure

    return isinstance(result, Failure)


class SnmpPdus:
    """
    Everything PDU outlets share in one roller process.

    @param reactor: Clock and network.
    @param client: The process's L{SnmpClient}.
    @param min_interval: Seconds between two requests to one PDU.
    @param settle_timeout: Seconds an outlet may take to read back the
        state asked for after on/off.
    @param reboot_timeout: The same after a PDU-native reboot.
    @param poll_interval: Seconds between status reads while waiting.
    @param default_off_for: Seconds off for a roller-timed cycle on a model
        without a native reboot.
    @param community_version: C{"1"} or C{"2c"} for community credentials,
        or None to use each model's own default.
    @param detect_ttl: Seconds a model found by C{auto} is remembered.
    """

    def __init__(self, reactor: IReactorTime, client: SnmpClient, *, min_interval: float = 1.0,
                 settle_timeout: float = 30.0, reboot_timeout: float = 90.0,
                 poll_interval: float = 1.0, default_off_for: float = 5.0,
                 community_version: str | None = None, detect_ttl: float = 3600.0,
                 default_credential: str | None = None):
        for name, value in (("settle_timeout", settle_timeout), ("reboot_timeout", reboot_timeout),
                            ("poll_interval", poll_interval), ("detect_ttl", detect_ttl)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        if community_version not in (None, "1", "2c"):
            raise ValueError(f"community_version must be 1, 2c or None, not {community_version!r}")
        self.reactor = reactor
        self.client = client
        self.pacer = EndpointPacer(reactor, min_interval)
        self.settle_timeout = float(settle_timeout)
        self.reboot_timeout = float(reboot_timeout)
        self.poll_interval = float(poll_interval)
        self.default_off_for = float(default_off_for)
        self.community_version = community_version
        self.detect_ttl = float(detect_ttl)
        self.default_credential = default_credential
        self._models: dict[tuple[str, int], tuple[PduModel, float]] = {}
        self._detecting: dict[tuple[str, int], list[Deferred]] = {}

    def __repr__(self) -> str:
        return (f"SnmpPdus(min_interval={self.pacer.min_interval:g}, "
                f"settle_timeout={self.settle_timeout:g}, client={self.client!r})")

    # -- building drivers

    def outlet(self, host: str, outlet: str, credential: Credential, *, model: str = "auto",
               port: int = 161, on_progress: ProgressCallback | None = None) -> PduOutletPower:
        """An L{IPowerDriver} for one outlet; raises L{PowerError} (config) at once if unusable."""
        return PduOutletPower(self, host, port, outlet, model, credential, on_progress)

    def for_machine(self, machine: Machine, secrets: Secrets | None, *,
                    on_progress: ProgressCallback | None = None) -> PduOutletPower:
        """
        The L{IPowerDriver} of C{machine}'s PDU outlet (its C{pdu}
        settings; the credential named there, else C{default_credential}).

        @raise PowerError: kind C{"config"}: no pdu settings, no or unknown
            credential, a credential that is not SNMP, a bad outlet name.
        """
        access = getattr(machine, "pdu", None)
        if access is None:
            raise PowerSettingError(f"machine {machine.worker_id} has no pdu settings")
        name = access.credential or self.default_credential
        if not name:
            raise PowerSettingError(f"machine {machine.worker_id}: pdu.credential is not set and there is "
                             "no default SNMP credential (snmp.credential)")
        if secrets is None:
            raise PowerSettingError("no secrets file is loaded: cannot read SNMP credentials")
        try:
            credential = secrets.get(name)
        except KeyError as e:
            raise PowerSettingError(f"machine {machine.worker_id}: {e}") from None
        return self.outlet(access.host, access.outlet, credential, model=access.model,
                           port=access.port, on_progress=on_progress)

    # -- shared services

    def key(self, host: str, port: int) -> str:
        """The pacing key of a PDU."""
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def request(self, op: str, target: SnmpTarget, *args: Any) -> Deferred:
        """A paced GET or SET on C{target}'s PDU."""
        fn = self.client.set if op == "set" else self.client.get
        return self.pacer.run(self.key(target.host, target.port), fn, target, *args)

    def detect(self, target: SnmpTarget) -> Deferred:
        """
        The L{PduModel} of the PDU at C{target}, from its sysObjectID
        (remembered for C{detect_ttl} seconds; concurrent callers share one
        GET).
        """
        where = (target.host, target.port)
        now = self.reactor.seconds()
        cached = self._models.get(where)
        if cached is not None and cached[1] > now:
            return Deferred.fromCoroutine(_value(cached[0]))
        waiters = self._detecting.get(where)
        d: Deferred = Deferred(lambda d: waiters_list.remove(d) if d in waiters_list else None)
        if waiters is not None:
            waiters_list = waiters
            waiters.append(d)
            return d
        waiters_list = self._detecting[where] = [d]

        def got(varbinds: list) -> PduModel:
            value = varbinds[0].value
            model = model_for_sys_object_id(value) if isinstance(value, str) else None
            if model is None:
                known = ", ".join(sorted(MODELS))
                raise PowerSettingError(
                    f"PDU {target.where} reports sysObjectID {value!r}, which matches no PDU model "
                    f"roller knows; set pdu.model to one of {known}")
            self._models[where] = (model, self.reactor.seconds() + self.detect_ttl)
            log.info("PDU {where} identified as {model} (sysObjectID {oid})", where=target.where,
                     model=model.name, oid=value)
            return model

        def fan_out(result: Any) -> None:
            waiting = self._detecting.pop(where, [])
            for w in waiting:
                if not w.called:
                    w.callback(result) if not _is_failure(result) else w.errback(result)

        request = self.request("get", target, [SYS_OBJECT_ID])
        request.addCallback(got)
        request.addBoth(fan_out)
        return d

    def forget_model(self, host: str, port: int = 161) -> None:
        """Drop a remembered C{auto} model (the PDU was replaced)."""
        self._models.pop((host, port), None)


async def _value(value: Any) -> Any:
    return value


@implementer(IPowerDriver)
class PduOutletPower:
    """
    One PDU outlet as an L{IPowerDriver}.  Built by L{SnmpPdus.outlet} /
    L{SnmpPdus.for_machine}.
    """

    def __init__(self, pdus: SnmpPdus, host: str, port: int, outlet: str, model: str,
                 credential: Credential, on_progress: ProgressCallback | None = None):
        self.pdus = pdus
        self.host = host
        self.port = port
        self.outlet_label = outlet
        self.model_name = model
        self.credential = credential
        self.on_progress = on_progress
        if model != "auto" and model not in MODELS:
            raise PowerSettingError(f"unknown PDU model {model!r}; known: auto, {', '.join(sorted(MODELS))}")
        try:
            # Validate the credential and host once, up front.
            self._target(MODELS.get(model))
            if model != "auto":
                MODELS[model].outlet(outlet)
        except SnmpConfigError as e:
            raise PowerSettingError(str(e)) from None
        except ValueError as e:
            raise PowerSettingError(f"PDU {self._where()}: {e}") from None

    @property
    def description(self) -> str:
        return (f"outlet {self.outlet_label} of PDU {self._where()} ({self.model_name}, "
                f"credential {self.credential.name!r})")

    def __repr__(self) -> str:
        return f"<PduOutletPower {self.description}>"

    def _where(self) -> str:
        return self.pdus.key(self.host, self.port)

    def _target(self, model: PduModel | None) -> SnmpTarget:
        version = None
        if self.credential.kind == "snmp-community":
            version = self.pdus.community_version or (model.version if model else "2c")
        return SnmpTarget(self.host, self.credential, port=self.port, version=version)

    def _progress(self, message: str) -> None:
        if self.on_progress is None:
            return
        try:
            self.on_progress(message)
        except Exception:  # noqa: BLE001 -- a failing progress callback must not fail the action
            log.failure("progress callback failed for {message!r}", message=message)

    # -- IPowerDriver

    def status(self) -> Deferred:
        return Deferred.fromCoroutine(self._status_result())

    def on(self) -> Deferred:
        return Deferred.fromCoroutine(self._switch("on"))

    def off(self) -> Deferred:
        return Deferred.fromCoroutine(self._switch("off"))

    def cycle(self, off_for: float | None = None) -> Deferred:
        if off_for is not None and (isinstance(off_for, bool) or not isinstance(off_for, (int, float))
                                    or not 0 <= off_for <= 3600):
            raise ValueError(f"off_for must be seconds from 0 to 3600, not {off_for!r}")
        return Deferred.fromCoroutine(self._cycle(off_for))

    def reset(self) -> Deferred:
        return self.cycle()

    # -- internals

    async def _resolve(self) -> tuple[PduModel, OutletAddress, SnmpTarget]:
        model = MODELS.get(self.model_name)
        if model is None:
            probe = self._target(None)
            try:
                model = await self.pdus.detect(probe)
            except SnmpError as e:
                raise self._error(e, "identify (sysObjectID)", sent=False) from None
            self._progress(f"PDU {self._where()} identified as {model.title}")
        try:
            outlet = model.outlet(self.outlet_label)
        except ValueError as e:
            raise PowerSettingError(f"PDU {self._where()} ({model.name}): {e}") from None
        return model, outlet, self._target(model)

    def _error(self, e: SnmpError, what: str, sent: bool) -> PowerError:
        text = f"{what} {self.description}: {e}"
        host, port = e.host or self.host, e.port or self.port
        if isinstance(e, SnmpTimeout):
            return PowerTimeout(text, sent=sent, host=host, port=port)
        if isinstance(e, SnmpAuthError):
            return PowerAuthError(text, host=host, port=port)
        if isinstance(e, SnmpNoSuchObject):
            return PowerSettingError(text + " (check pdu.model and pdu.outlet)", host=host, port=port)
        if isinstance(e, SnmpErrorStatus):
            return PowerActionError(text, host=host, port=port)
        if isinstance(e, SnmpConfigError):
            return PowerSettingError(text, host=host, port=port)
        return PowerError(text, kind="protocol", sent=sent, host=host, port=port)

    async def _read(self, model: PduModel, outlet: OutletAddress, target: SnmpTarget) -> OutletStatus:
        varbinds = await self.pdus.request("get", target, [model.status(outlet)])
        return model.decode(varbinds[0].value)

    async def _status_result(self) -> PowerResult:
        model, outlet, target = await self._resolve()
        try:
            status = await self._read(model, outlet, target)
        except SnmpError as e:
            raise self._error(e, "cannot read the state of", sent=False) from None
        return PowerResult(status.state, f"{self.description} is {status}", raw=status.label)

    async def _command(self, model: PduModel, outlet: OutletAddress, target: SnmpTarget,
                       action: str) -> None:
        oid, value = model.command(outlet, action)
        self._progress(f"PDU {self._where()}: {action} outlet {outlet.label} (SET {oid} = {value})")
        try:
            await self.pdus.request("set", target, [(oid, value)])
        except SnmpError as e:
            raise self._error(e, f"cannot switch {action}", sent=isinstance(e, SnmpTimeout)) from None

    async def _wait_for(self, model: PduModel, outlet: OutletAddress, target: SnmpTarget,
                        want: str, timeout: float, action: str) -> tuple[OutletStatus, float, list[str]]:
        """
        Read the state until it is C{want}; (last status, seconds taken,
        distinct labels seen in order).
        """
        clock = self.pdus.reactor
        start = clock.seconds()
        deadline = start + timeout
        seen: list[str] = []
        last: OutletStatus | None = None
        last_error: SnmpError | None = None
        while True:
            try:
                last = await self._read(model, outlet, target)
                last_error = None
                if not seen or seen[-1] != last.label:
                    seen.append(last.label)
                if last.state == want:
                    return last, clock.seconds() - start, seen
            except (SnmpAuthError, SnmpNoSuchObject, SnmpConfigError) as e:
                raise self._error(e, f"{action} sent, but cannot read back", sent=True) from None
            except SnmpError as e:
                # A busy PDU may miss a read while it switches: keep trying
                # until the deadline.
                last_error = e
            now = clock.seconds()
            if now >= deadline:
                if last_error is not None:
                    got = f"the last read failed: {last_error}"
                else:
                    got = f"it reads {last}" + (f" (seen: {' -> '.join(seen)})" if len(seen) > 1 else "")
                raise PowerStateMismatch(f"{action} sent to {self.description}, but it did not read back "
                                         f"{want} within {timeout:g} s: {got}", host=self.host, port=self.port)
            await deferLater(clock, min(self.pdus.poll_interval, max(deadline - now, 0.0)), lambda: None)

    async def _switch(self, action: str) -> PowerResult:
        model, outlet, target = await self._resolve()
        await self._command(model, outlet, target, action)
        status, took, seen = await self._wait_for(model, outlet, target, action,
                                                  self.pdus.settle_timeout, action)
        path = " -> ".join(seen)
        return PowerResult(status.state, f"{self.description}: switched {action}, read back "
                                         f"{path} after {took:.1f} s", raw=status.label)

    async def _cycle(self, off_for: float | None) -> PowerResult:
        model, outlet, target = await self._resolve()
        clock = self.pdus.reactor
        started = clock.seconds()
        if off_for is None and model.native_reboot:
            await self._command(model, outlet, target, "reboot")
            status, took, seen = await self._wait_for(model, outlet, target, ON,
                                                      self.pdus.reboot_timeout, "reboot")
            went_off = len(seen) > 1
            path = " -> ".join(seen)
            note = "" if went_off else " (the off phase was not observed: the PDU may not have acted yet)"
            return PowerResult(status.state, f"{self.description}: rebooted by the PDU, read back "
                                             f"{path} after {took:.1f} s{note}", raw=status.label)
        if off_for is None:
            off_for = self.pdus.default_off_for
        await self._command(model, outlet, target, "off")
        off_status, took_off, seen_off = await self._wait_for(model, outlet, target, OFF,
                                                              self.pdus.settle_timeout, "off")
        self._progress(f"PDU {self._where()}: outlet {outlet.label} off after {took_off:.1f} s; "
                       f"waiting {off_for:g} s")
        if off_for > 0:
            await deferLater(clock, off_for, lambda: None)
        await self._command(model, outlet, target, "on")
        status, took_on, seen_on = await self._wait_for(model, outlet, target, ON,
                                                        self.pdus.settle_timeout, "on")
        return PowerResult(status.state, f"{self.description}: cycled (off, {off_for:g} s, on), read "
                                         f"back {' -> '.join(seen_off)} then {' -> '.join(seen_on)}; "
                                         f"{clock.seconds() - started:.1f} s in all", raw=status.label)

