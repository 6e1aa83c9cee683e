"""
A simulated PDU: an SNMP (v1/v2c) agent on the Twisted reactor whose
outlets switch the fleet simulator's L{PowerState}s.

    pdu = SimulatedPdu(reactor, model="sentry3", name="pdu1")
    pdu.attach("AA1", machine.power)          # outlet AA1 feeds that machine
    port = pdu.start("127.0.0.1")             # UDP port
    ...                                       # roller's PDU driver talks to it
    pdu.stop()

SETs of the model's control OIDs call C{power_off()}, C{power_on()} or
C{reboot()} on the outlet's L{PowerState}, so the machine's SSH front-end
really goes down and comes back; GETs of the status OID read the power
state (a reboot in progress reads as the model's transitional state where
it has one, else off).  C{sysObjectID.0} is the model's, so C{auto}
detection works.  Community strings are checked like a real agent: a wrong
one is dropped silently.

The OID tables are roller's own (L{roller.drivers.snmp.models}): this is a
front-end for the demo and for end-to-end tests of the job flow, not an
oracle for the tables (L{roller.testing.snmpd} is that).  SNMPv3 is not
simulated: use a real snmpd for it.

With C{boot_delay > 0} the PDU keeps the outlet's own state, as a real one
does: switching an outlet on energises it at once (it reads on) but the
machine's L{PowerState} comes on C{boot_delay} seconds later (the machine
boots, its SSH port stays closed meanwhile); a reboot reads off (or the
model's transitional state) for C{reboot_off} seconds, then on.  That is
what roller's C{reboot} task sees with a real PDU: the outlet reads back on
while the host is still down.  With the default C{boot_delay=0} the
machine's power is the outlet's state.
"""

from __future__ import annotations

from typing import Any

from pyasn1.codec.ber import decoder, encoder
from pysnmp.proto import api, rfc1902, rfc1905
from twisted.internet.interfaces import IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from roller.drivers.snmp.models import CHANGING, MODELS, OFF, ON, SYS_OBJECT_ID, PduModel
from roller.sim.fleet import PowerState

log = Logger()


class IPduReactor(IReactorTime, IReactorUDP):
    """What a simulated PDU needs of its reactor: time (settling outlets) and a UDP port."""

__all__ = ["SimulatedPdu"]

# error-status codes
_NO_SUCH_NAME, _BAD_VALUE, _WRONG_VALUE, _NOT_WRITABLE = 2, 3, 10, 17


class SimulatedPdu(DatagramProtocol):
    """
    One simulated PDU.

    @param reactor: C{IReactorUDP} and C{IReactorTime}.
    @param model: A name from L{MODELS}.
    @param community: The read-write community.
    @param read_community: The read-only community.
    @param name: For logs.
    @param boot_delay: Seconds from an outlet being switched on to the
        machine's power coming on (see the module docstring); 0: at once.
    @param reboot_off: Seconds an outlet stays off on a reboot command when
        C{boot_delay > 0} (default: the L{PowerState}'s C{default_down_for}).
    """

    noisy = False

    def __init__(self, reactor: IPduReactor, model: str = "sentry3", *, community: str = "private",
                 read_community: str = "public", name: str = "pdu", boot_delay: float = 0.0,
                 reboot_off: float | None = None):
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; one of {', '.join(sorted(MODELS))}")
        if boot_delay < 0 or (reboot_off is not None and reboot_off < 0):
            raise ValueError("boot_delay and reboot_off must not be negative")
        self.boot_delay = float(boot_delay)
        self.reboot_off = reboot_off
        # With boot_delay: label -> ON / OFF / CHANGING, and the pending
        # outlet-on (reboot) or machine power-on (boot) call.
        self._state: dict[str, str] = {}
        self._timers: dict[str, Any] = {}
        self.reactor = reactor
        self.model: PduModel = MODELS[model]
        self.community = community.encode()
        self.read_community = read_community.encode()
        self.name = name
        self.outlets: dict[str, PowerState] = {}
        self._controls: dict[str, dict[int, tuple[str, str]]] = {}  # oid -> value -> (outlet, action)
        self._status: dict[str, str] = {}  # oid -> outlet
        self._port: Any = None
        #: (time, outlet, action) of every accepted command
        self.commands: list[tuple[float, str, str]] = []
        self.requests = 0

    def __repr__(self) -> str:
        return f"<SimulatedPdu {self.name} {self.model.name} outlets={sorted(self.outlets)}>"

    @property
    def sys_object_id(self) -> str:
        return self.model.sys_object_ids[0]

    def attach(self, outlet: str, power: PowerState) -> None:
        """Make C{outlet} (C{"AA8"}, C{"3"}) feed C{power}."""
        address = self.model.outlet(outlet)
        label = address.label
        self.outlets[label] = power
        self._state[label] = ON if power.on else OFF
        for action, (oid, value) in ((a, self.model.command(address, a)) for a in self.model.commands):
            self._controls.setdefault(oid, {})[value] = (label, action)
        self._status[self.model.status(address)] = label

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; the UDP port."""
        self._port = self.reactor.listenUDP(port, self, interface=host, maxPacketSize=8192)
        return self._port.getHost().port

    def stop(self) -> None:
        for label in list(self._timers):
            self._cancel(label)
        port, self._port = self._port, None
        if port is not None:
            port.stopListening()

    # -- values

    def _raw_for(self, state: str) -> int:
        for raw, (canonical, _) in self.model.states.items():
            if canonical == state:
                return raw
        return next(raw for raw, (c, _) in self.model.states.items() if c == OFF)

    def _read(self, oid: str) -> Any | None:
        if oid == SYS_OBJECT_ID:
            return rfc1902.ObjectName(self.sys_object_id)
        label = self._status.get(oid)
        if label is None and oid in self._controls:
            # A control column read back: state-like on models that read
            # their state there, "none" otherwise.
            label = next(iter(self._controls[oid].values()))[0]
            if oid != self.model.status(self.model.outlet(label)):
                return rfc1902.Integer32(-1 if self.model.name == "eaton" else 0)
        if label is None:
            return None
        power = self.outlets[label]
        if self.boot_delay:
            state = self._state[label]
        elif power.on:
            state = ON
        elif power.pending is not None:
            state = CHANGING
        else:
            state = OFF
        if state == CHANGING and not any(c == CHANGING for c, _ in self.model.states.values()):
            state = OFF
        return rfc1902.Integer32(self._raw_for(state))

    # -- outlet state with a boot delay

    def _cancel(self, label: str) -> None:
        call = self._timers.pop(label, None)
        if call is not None and call.active():
            call.cancel()

    def _later(self, label: str, delay: float, fn: Any) -> None:
        def fire() -> None:
            self._timers.pop(label, None)
            fn()

        self._timers[label] = self.reactor.callLater(delay, fire)

    def _energise(self, label: str) -> None:
        """The outlet is on; the machine comes up after C{boot_delay}."""
        self._state[label] = ON
        power = self.outlets[label]
        if not power.on:
            self._later(label, self.boot_delay, power.power_on)

    def _switch(self, label: str, action: str) -> None:
        power = self.outlets[label]
        if not self.boot_delay:
            if action == "on":
                power.power_on()
            elif action == "off":
                power.power_off()
            else:
                power.reboot()
            return
        self._cancel(label)
        if action == "on":
            self._energise(label)
            return
        self._state[label] = OFF if action == "off" else CHANGING
        power.power_off()
        if action == "reboot":
            off = power.default_down_for if self.reboot_off is None else self.reboot_off
            self._later(label, off, lambda: self._energise(label))

    def _write(self, oid: str, value: Any) -> int | None:
        """Apply one SET varbind; an error-status or None."""
        controls = self._controls.get(oid)
        if controls is None:
            return _NOT_WRITABLE
        try:
            number = int(value)
        except (TypeError, ValueError):
            return _WRONG_VALUE
        if number not in controls:
            return _WRONG_VALUE
        label, action = controls[number]
        self.commands.append((self.reactor.seconds(), label, action))
        log.info("{pdu}: outlet {outlet} {action}", pdu=self.name, outlet=label, action=action)
        self._switch(label, action)
        return None

    # -- protocol

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        try:
            reply = self._handle(data)
        except Exception:  # noqa: BLE001 -- whatever a datagram does, the agent logs it and keeps serving
            log.failure("{pdu}: bad request from {addr!r}", pdu=self.name, addr=addr)
            return
        if reply is not None and self.transport is not None:
            self.transport.write(reply, addr)

    def _handle(self, data: bytes) -> bytes | None:
        self.requests += 1
        version = int(api.decodeMessageVersion(data))
        if version not in api.PROTOCOL_MODULES:
            return None  # SNMPv3: not simulated
        mod = api.PROTOCOL_MODULES[version]
        msg, _ = decoder.decode(data, asn1Spec=mod.Message())
        community = bytes(mod.apiMessage.get_community(msg))
        pdu = mod.apiMessage.get_pdu(msg)
        is_set = pdu.isSameTypeWith(mod.SetRequestPDU())
        if community != self.community and (is_set or community != self.read_community):
            return None  # like real agents: silence
        if not (is_set or pdu.isSameTypeWith(mod.GetRequestPDU())):
            return None
        rsp = mod.apiMessage.get_response(msg)
        rsp_pdu = mod.apiMessage.get_pdu(rsp)
        varbinds = []
        error = None
        for index, (oid, value) in enumerate(mod.apiPDU.get_varbinds(pdu), 1):
            name = str(oid)
            if is_set:
                status = self._write(name, value)
                if status is not None and error is None:
                    error = (status if version else (_NO_SUCH_NAME if status == _NOT_WRITABLE else _BAD_VALUE),
                             index)
                varbinds.append((oid, value))
            else:
                found = self._read(name)
                if found is None:
                    if version == 0:
                        error = error or (_NO_SUCH_NAME, index)
                        found = value
                    else:
                        found = rfc1905.noSuchInstance
                varbinds.append((oid, found))
        mod.apiPDU.set_varbinds(rsp_pdu, varbinds)
        if error is not None:
            mod.apiPDU.set_error_status(rsp_pdu, error[0])
            mod.apiPDU.set_error_index(rsp_pdu, error[1])
        return encoder.encode(rsp)
