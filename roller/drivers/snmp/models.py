"""
PDU models: where each vendor keeps its outlet control and status, and
what the values mean.

Every model is a small L{PduModel} registered by name in L{MODELS} (the
names are L{roller.inventory.PDU_MODELS}); C{"auto"} is resolved from the
agent's C{sysObjectID.0} by L{model_for_sys_object_id}.

An outlet is written the way the inventory does (C{"AA8"}, C{"8"}): up to
two letters, then the outlet number.  For ServerTech the letters are the
tower (unit) and infeed (input cord): C{"AA8"} = tower A (1), infeed A (1),
outlet 8; C{"B8"} = tower B, infeed A.  Models with a unit index (Raritan
linked PDUs, Baytech modules, Eaton daisy chains) take one letter for the
unit; APC and CyberPower only numbers.

The OIDs and values come from the vendors' MIBs as read by the authors of
other open tools (Network UPS Tools' snmp-ups subdrivers, the seed's
snmp_reboot); each table says how sure it is.  A model whose OIDs turn out
different on some firmware is a new entry here, nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from attrs import field, frozen

__all__ = [
    "MODELS",
    "Action",
    "OutletAddress",
    "OutletStatus",
    "PduModel",
    "SYS_OBJECT_ID",
    "model_for_sys_object_id",
    "parse_outlet",
]

#: SNMPv2-MIB sysObjectID.0
SYS_OBJECT_ID = "1.3.6.1.2.1.1.2.0"

Action = str  # "on" | "off" | "reboot"
ACTIONS = ("on", "off", "reboot")

# Canonical outlet states.
ON, OFF, CHANGING, UNKNOWN = "on", "off", "changing", "unknown"

_PORT_RE = re.compile(r"^([A-Za-z]{0,2})([0-9]{1,4})$")


@frozen
class OutletAddress:
    """
    A parsed outlet.

    @ivar label: As written in the inventory (C{"AA8"}).
    @ivar unit: Tower / unit / module / PDU id, 1-based (1 when not given).
    @ivar feed: Infeed / input cord, 1-based (1 when not given).
    @ivar number: Outlet number, 1-based.
    """

    label: str
    unit: int
    feed: int
    number: int


@frozen
class OutletStatus:
    """
    An outlet's state as read from the PDU.

    @ivar state: C{"on"}, C{"off"}, C{"changing"} (a command is pending or
        a reboot is in progress) or C{"unknown"} (a value the table does
        not know, or an error state).
    @ivar raw: The integer read.
    @ivar label: The MIB's name for it (C{"offWait"}), or C{"value N"}.
    """

    state: str
    raw: int
    label: str

    def __str__(self) -> str:
        return f"{self.state} ({self.label})" if self.label != self.state else self.state


def parse_outlet(text: str, letters: int) -> OutletAddress:
    """
    Parse C{"AA8"}-style outlet names.

    @param letters: How many letters the model accepts (0, 1 or 2).
    @raise ValueError: Not an outlet name, or more letters than the model
        has units for.
    """
    if not isinstance(text, str):
        raise ValueError(f"outlet must be a string like 'AA8' or '8', not {type(text).__name__}")
    m = _PORT_RE.match(text.strip())
    if not m:
        raise ValueError(f"outlet {text[:20]!r} is not valid: up to two letters then a number, like 'AA8' or '8'")
    prefix, number = m.group(1).upper(), int(m.group(2))
    if number < 1:
        raise ValueError(f"outlet {text!r}: outlet numbers start at 1")
    if len(prefix) > letters:
        if letters == 0:
            raise ValueError(f"outlet {text!r}: this PDU model numbers its outlets; write just the number")
        raise ValueError(f"outlet {text!r}: this PDU model takes at most {letters} letter(s) "
                         "(unit{}) before the number".format(", infeed" if letters == 2 else ""))
    unit = ord(prefix[0]) - ord("A") + 1 if prefix else 1
    feed = ord(prefix[1]) - ord("A") + 1 if len(prefix) > 1 else 1
    return OutletAddress(label=text.strip(), unit=unit, feed=feed, number=number)


@frozen
class PduModel:
    """
    One PDU family's outlet control.

    @ivar name: The inventory's model name.
    @ivar title: For messages.
    @ivar sys_object_ids: C{sysObjectID} prefixes that identify it.
    @ivar commands: action -> (OID template, value).  Templates use
        C{{unit}}, C{{unit0}} (0-based), C{{feed}} and C{{outlet}}.
    @ivar status_oid: Template of the status object.
    @ivar states: raw value -> (canonical state, MIB label).
    @ivar letters: How many letters an outlet name may have.
    @ivar version: SNMP version used with community credentials.
    @ivar native_reboot: Whether C{commands} has a reboot that the PDU
        carries out itself (off, its own delay, on).
    @ivar confidence: How sure the table is, for operators reading it.
    """

    name: str
    title: str
    sys_object_ids: tuple[str, ...]
    commands: Mapping[Action, tuple[str, int]]
    status_oid: str
    states: Mapping[int, tuple[str, str]]
    letters: int = 0
    version: str = "2c"
    confidence: str = ""
    native_reboot: bool = field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "native_reboot", "reboot" in self.commands)

    def outlet(self, text: str) -> OutletAddress:
        """See L{parse_outlet}."""
        return parse_outlet(text, self.letters)

    @staticmethod
    def _fill(template: str, outlet: OutletAddress) -> str:
        return template.format(unit=outlet.unit, unit0=outlet.unit - 1, feed=outlet.feed,
                               outlet=outlet.number)

    def command(self, outlet: OutletAddress, action: Action) -> tuple[str, int]:
        """The C{(oid, value)} to SET for C{action}."""
        if action not in self.commands:
            raise ValueError(f"{self.title} has no {action} command")
        template, value = self.commands[action]
        return self._fill(template, outlet), value

    def status(self, outlet: OutletAddress) -> str:
        """The OID to GET for the outlet's state."""
        return self._fill(self.status_oid, outlet)

    def decode(self, raw: object) -> OutletStatus:
        """Turn the value read from L{status} into an L{OutletStatus}."""
        if not isinstance(raw, int) or isinstance(raw, bool):
            return OutletStatus(UNKNOWN, -1, f"non-integer {raw!r}"[:60])
        state, label = self.states.get(raw, (UNKNOWN, f"value {raw}"))
        return OutletStatus(state, raw, label)


def _model(**kw: object) -> PduModel:
    return PduModel(**kw)  # type: ignore[arg-type]


_SENTRY3 = "1.3.6.1.4.1.1718.3.2.3.1"
_SENTRY4 = "1.3.6.1.4.1.1718.4.1.8"
_EATON = "1.3.6.1.4.1.534.6.6.7.6.6.1"

MODELS: dict[str, PduModel] = {m.name: m for m in (
    _model(
        name="sentry3", title="ServerTech Sentry3 (Sentry3-MIB)",
        sys_object_ids=("1.3.6.1.4.1.1718.3",),
        # outletControlAction: none(0) on(1) off(2) reboot(3) -- the seed
        # and several tools agree.
        commands={"on": (_SENTRY3 + ".11.{unit}.{feed}.{outlet}", 1),
                  "off": (_SENTRY3 + ".11.{unit}.{feed}.{outlet}", 2),
                  "reboot": (_SENTRY3 + ".11.{unit}.{feed}.{outlet}", 3)},
        # outletStatus; values from Sentry3-MIB (fairly sure of 0-3, less of
        # the rest).
        status_oid=_SENTRY3 + ".5.{unit}.{feed}.{outlet}",
        states={0: (OFF, "off"), 1: (ON, "on"), 2: (CHANGING, "offWait"), 3: (CHANGING, "onWait"),
                4: (UNKNOWN, "offError"), 5: (UNKNOWN, "onError"), 6: (UNKNOWN, "noComm"),
                7: (CHANGING, "reading"), 8: (OFF, "offFixed"), 9: (ON, "onFixed")},
        letters=2,
        confidence="control OID and values certain (seed, DESIGN.md); status values from the MIB",
    ),
    _model(
        name="sentry4", title="ServerTech Sentry4 (Sentry4-MIB)",
        sys_object_ids=("1.3.6.1.4.1.1718.4",),
        # st4OutletControlAction (index unit.cord.outlet): none(0) on(1)
        # off(2) reboot(3) queueOn(4) queueOff(5) queueReboot(6).
        commands={"on": (_SENTRY4 + ".5.1.2.{unit}.{feed}.{outlet}", 1),
                  "off": (_SENTRY4 + ".5.1.2.{unit}.{feed}.{outlet}", 2),
                  "reboot": (_SENTRY4 + ".5.1.2.{unit}.{feed}.{outlet}", 3)},
        # st4OutletState (st4OutletStatusTable): unknown(0) on(1) off(2).
        # Less sure of this column than of the control one.
        status_oid=_SENTRY4 + ".3.1.1.{unit}.{feed}.{outlet}",
        states={0: (UNKNOWN, "unknown"), 1: (ON, "on"), 2: (OFF, "off")},
        letters=2,
        confidence="control OID from DESIGN.md and public tools; status column from the MIB, unverified",
    ),
    _model(
        name="apc_rpdu", title="APC Rack PDU (PowerNet-MIB rPDU)",
        # masterSwitchrPDU and later (AP78xx/79xx, AP86xx); see apc_masterswitch.
        sys_object_ids=("1.3.6.1.4.1.318.1.3.4.5", "1.3.6.1.4.1.318.1.3.4.6",
                        "1.3.6.1.4.1.318.1.3.4.7", "1.3.6.1.4.1.318.1.3.4.8",
                        "1.3.6.1.4.1.318.1.3.4.9"),
        # rPDUOutletControlOutletCommand: immediateOn(1) immediateOff(2)
        # immediateReboot(3) (4-6 delayed, 7 cancel).
        commands={"on": ("1.3.6.1.4.1.318.1.1.12.3.3.1.1.4.{outlet}", 1),
                  "off": ("1.3.6.1.4.1.318.1.1.12.3.3.1.1.4.{outlet}", 2),
                  "reboot": ("1.3.6.1.4.1.318.1.1.12.3.3.1.1.4.{outlet}", 3)},
        # rPDUOutletStatusOutletState: outletStatusOn(1) outletStatusOff(2).
        status_oid="1.3.6.1.4.1.318.1.1.12.3.5.1.1.4.{outlet}",
        states={1: (ON, "outletStatusOn"), 2: (OFF, "outletStatusOff")},
        confidence="OIDs and values certain; the sysObjectID split between rPDU and "
                   "MasterSwitch product ids is from memory",
    ),
    _model(
        name="apc_masterswitch", title="APC MasterSwitch (PowerNet-MIB sPDU)",
        sys_object_ids=("1.3.6.1.4.1.318.1.3.4.1", "1.3.6.1.4.1.318.1.3.4.2",
                        "1.3.6.1.4.1.318.1.3.4.3", "1.3.6.1.4.1.318.1.3.4.4"),
        # sPDUOutletCtl: outletOn(1) outletOff(2) outletReboot(3); the same
        # object reads the state (4 = outletUnknown, 5-7 = *WithDelay).
        commands={"on": ("1.3.6.1.4.1.318.1.1.4.4.2.1.3.{outlet}", 1),
                  "off": ("1.3.6.1.4.1.318.1.1.4.4.2.1.3.{outlet}", 2),
                  "reboot": ("1.3.6.1.4.1.318.1.1.4.4.2.1.3.{outlet}", 3)},
        status_oid="1.3.6.1.4.1.318.1.1.4.4.2.1.3.{outlet}",
        states={1: (ON, "outletOn"), 2: (OFF, "outletOff"), 3: (CHANGING, "outletReboot"),
                4: (UNKNOWN, "outletUnknown"), 5: (CHANGING, "outletOnWithDelay"),
                6: (CHANGING, "outletOffWithDelay"), 7: (CHANGING, "outletRebootWithDelay")},
        version="1",
        confidence="OID and 1-3 certain; 4-7 from the MIB",
    ),
    _model(
        name="raritan", title="Raritan PX2/PX3 (PDU2-MIB)",
        sys_object_ids=("1.3.6.1.4.1.13742.6",),
        # switchingOperation (index pduId.outletId): off(0) on(1) cycle(2).
        commands={"on": ("1.3.6.1.4.1.13742.6.4.1.2.1.2.{unit}.{outlet}", 1),
                  "off": ("1.3.6.1.4.1.13742.6.4.1.2.1.2.{unit}.{outlet}", 0),
                  "reboot": ("1.3.6.1.4.1.13742.6.4.1.2.1.2.{unit}.{outlet}", 2)},
        # outletSwitchingState is a SensorStateEnumeration: on(7) off(8);
        # the others are sensor states that do not apply to a relay.
        status_oid="1.3.6.1.4.1.13742.6.4.1.2.1.3.{unit}.{outlet}",
        states={7: (ON, "on"), 8: (OFF, "off"), -1: (UNKNOWN, "unavailable")},
        letters=1,
        confidence="certain (PDU2-MIB; NUT raritan-px2 subdriver)",
    ),
    _model(
        name="cyberpower", title="CyberPower ePDU (CPS-MIB ePDU)",
        sys_object_ids=("1.3.6.1.4.1.3808.1.1.3",),
        # ePDUOutletControlOutletCommand: immediateOn(1) immediateOff(2)
        # immediateReboot(3).  Newer ePDU2 firmware (sysObjectID
        # .3808.1.1.6) uses ePDU2OutletSwitched* instead: not covered.
        commands={"on": ("1.3.6.1.4.1.3808.1.1.3.3.3.1.1.4.{outlet}", 1),
                  "off": ("1.3.6.1.4.1.3808.1.1.3.3.3.1.1.4.{outlet}", 2),
                  "reboot": ("1.3.6.1.4.1.3808.1.1.3.3.3.1.1.4.{outlet}", 3)},
        # ePDUOutletStatusOutletState: outletStatusOn(1) outletStatusOff(2).
        status_oid="1.3.6.1.4.1.3808.1.1.3.3.5.1.1.4.{outlet}",
        states={1: (ON, "outletStatusOn"), 2: (OFF, "outletStatusOff")},
        confidence="control OID from DESIGN.md; status column from CPS-MIB, unverified on hardware",
    ),
    _model(
        name="baytech", title="Baytech RPC (Baytech MIB, sBTA modules)",
        sys_object_ids=("1.3.6.1.4.1.4779",),
        # sBTAModulesRPCOutletState (index module.outlet): writing off(0)
        # on(1) reboot(2); reads off(0) on(1).
        commands={"on": ("1.3.6.1.4.1.4779.1.3.5.3.1.3.{unit}.{outlet}", 1),
                  "off": ("1.3.6.1.4.1.4779.1.3.5.3.1.3.{unit}.{outlet}", 0),
                  "reboot": ("1.3.6.1.4.1.4779.1.3.5.3.1.3.{unit}.{outlet}", 2)},
        status_oid="1.3.6.1.4.1.4779.1.3.5.3.1.3.{unit}.{outlet}",
        states={0: (OFF, "off"), 1: (ON, "on"), 2: (CHANGING, "reboot")},
        letters=1,
        confidence="OID from DESIGN.md and NUT baytech subdriver; reboot(2) readback unverified",
    ),
    _model(
        name="eaton", title="Eaton ePDU (EATON-EPDU-MIB, Marlin)",
        sys_object_ids=("1.3.6.1.4.1.534.6.6.7",),
        # outletControlOffCmd(3) / OnCmd(4) / RebootCmd(5) (index
        # strappingIndex.outlet, strapping 0 = the master unit) take a delay
        # in seconds: 0 = now, -1 = cancel.
        commands={"off": (_EATON + ".3.{unit0}.{outlet}", 0),
                  "on": (_EATON + ".4.{unit0}.{outlet}", 0),
                  "reboot": (_EATON + ".5.{unit0}.{outlet}", 0)},
        # outletControlStatus: off(0) on(1) pendingOff(2) pendingOn(3).
        status_oid=_EATON + ".2.{unit0}.{outlet}",
        states={0: (OFF, "off"), 1: (ON, "on"), 2: (CHANGING, "pendingOff"),
                3: (CHANGING, "pendingOn")},
        letters=1,
        confidence="OIDs and values from NUT eaton-pdu-marlin subdriver; fairly sure",
    ),
)}


def model_for_sys_object_id(sys_object_id: str) -> PduModel | None:
    """
    The model whose C{sysObjectID} prefix matches (longest prefix wins,
    matching whole sub-identifiers), or None.
    """
    oid = sys_object_id.strip().lstrip(".")
    best: PduModel | None = None
    best_len = -1
    for model in MODELS.values():
        for prefix in model.sys_object_ids:
            if (oid == prefix or oid.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = model, len(prefix)
    return best
