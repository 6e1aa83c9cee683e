"""
Power tasks: C{snmp_reboot} (seed parity) and the generic C{power_on},
C{power_off}, C{power_cycle}, C{power_status}.

The generic tasks work on whatever L{IPowerDriver} L{power_driver} finds
for the machine, through each driver's C{for_machine}: its PDU outlet
(C{pdu} settings, over SNMP), its BMC over IPMI (C{ipmi}) or Redfish
(C{redfish}), or its VM's pool over XenAPI (C{xen}).  The C{via}
parameter names one; C{auto} (the default) takes the first the machine
has settings for, in the order of L{VIA}: pdu, ipmi, redfish, xen (the
inventory has no per-machine power-method field; the outlet comes first
because it works whatever state the BMC or OS is in).  Every action reads
the state back from the device before the task succeeds; progress lines
(commands sent, states read) are job events.

The tasks declare their PDU and BMC (IPMI host, Redfish URL host) as
shared endpoints (C{pdu:HOST}, C{bmc:HOST}) so the queue serialises jobs
per device; the driver itself also paces the requests
it sends to one PDU (see L{roller.drivers.snmp.pdu}).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred

from roller.drivers.power import IPowerDriver, PowerError, PowerResult
from roller.inventory import Machine
from roller.tasks.base import Param, TaskContext, TaskFailed, TaskSpec, driver_errors

__all__ = [
    "POWER_CYCLE",
    "POWER_OFF",
    "POWER_ON",
    "POWER_STATUS",
    "SNMP_REBOOT",
    "TASKS",
    "initiate",
    "not_applicable",
    "power_driver",
    "power_endpoints",
    "pdu_endpoints",
]


def pdu_endpoints(machine: Machine) -> tuple[str, ...]:
    """The queue endpoint of a machine's PDU: C{("pdu:HOST",)}."""
    return (f"pdu:{machine.pdu.host}",) if machine.pdu is not None else ()


def power_endpoints(machine: Machine) -> tuple[str, ...]:
    """
    The queue endpoints of a machine's power control: its PDU and its BMC,
    whichever it has (the task may use either, so it holds both).
    """
    ipmi = getattr(machine, "ipmi", None)
    bmc: tuple[str, ...] = (f"bmc:{ipmi.host}",) if ipmi is not None else ()
    redfish = getattr(machine, "redfish", None)
    host = urlsplit(redfish.url).hostname if redfish is not None else None
    if host and f"bmc:{host}" not in bmc:
        bmc += (f"bmc:{host}",)
    return pdu_endpoints(machine) + bmc


def not_applicable(machine: Machine) -> str | None:
    """Why C{snmp_reboot} cannot be tried on C{machine}, or None."""
    if machine.pdu is None:
        return "the machine has no pdu settings"
    return None


#: Power methods the generic tasks can use, in the order C{via=auto} tries
#: them: (name, machine attribute, Drivers attribute).
VIA = (("pdu", "pdu", "pdus"), ("ipmi", "ipmi", "ipmi"), ("redfish", "redfish", "redfish"),
       ("xen", "xen", "xen"))


def power_driver(ctx: TaskContext, via: str = "auto") -> IPowerDriver:
    """
    The machine's power driver: with C{via="auto"} the first of L{VIA}
    (PDU outlet, IPMI BMC, Redfish BMC, Xen VM) it has settings for; or
    the one C{via} names.

    @raise TaskFailed: The machine has no such power method, roller has no
        driver for it, or its settings are unusable (unknown credential,
        bad outlet, ...).
    """
    machine = ctx.machine
    for name, attribute, driver_name in VIA:
        if via not in ("auto", name) or getattr(machine, attribute, None) is None:
            continue
        drivers = getattr(ctx.drivers, driver_name, None)
        if drivers is None:
            raise TaskFailed(f"this roller has no {name} power driver configured")
        with driver_errors():
            return drivers.for_machine(machine, ctx.secrets, on_progress=ctx.log)
    if via != "auto":
        raise TaskFailed(f"machine {machine.worker_id} has no {via} settings")
    raise TaskFailed(f"machine {machine.worker_id} has no power control roller can use: it has "
                     "none of pdu, ipmi, redfish or xen settings")


async def _act(ctx: TaskContext, what: str, call: Callable[[], Deferred[PowerResult]]) -> PowerResult:
    def note_sent(e: Exception) -> None:
        if isinstance(e, PowerError) and e.sent:
            ctx.log(f"{what}: the command may have reached the device", sent=True, kind=e.kind)

    with driver_errors(PowerError, on_error=note_sent):
        result = await call()
    ctx.log(result.detail, state=result.state)
    return result


async def initiate(ctx: TaskContext, off_for: float | None = None) -> str:
    """
    Reboot through the PDU (the C{snmp_reboot} method of the C{reboot}
    task): the PDU's own reboot, or off / C{off_for} seconds / on; a line
    saying what happened.  L{TaskFailed} otherwise.
    """
    power = power_driver(ctx, "pdu")
    ctx.log(f"power cycling {power.description}"
            + (f" (off for {off_for:g} s)" if off_for else " (PDU reboot command)"))
    result = await _act(ctx, "snmp_reboot", lambda: power.cycle(off_for))
    return result.detail


async def run_snmp_reboot(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    reason = not_applicable(ctx.machine)
    if reason:
        raise TaskFailed(f"cannot reboot through a PDU: {reason}")
    delay = params.get("delay") or 0
    return await initiate(ctx, float(delay) if delay else None)


async def run_power_on(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    power = power_driver(ctx, params.get("via", "auto"))
    return (await _act(ctx, "power_on", power.on)).detail


async def run_power_off(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    power = power_driver(ctx, params.get("via", "auto"))
    return (await _act(ctx, "power_off", power.off)).detail


async def run_power_cycle(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    power = power_driver(ctx, params.get("via", "auto"))
    off_for = params.get("off_for")
    return (await _act(ctx, "power_cycle", lambda: power.cycle(off_for))).detail


async def run_power_status(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    power = power_driver(ctx, params.get("via", "auto"))
    result = await _act(ctx, "power_status", power.status)
    return f"power is {result.state}: {result.detail}"


_VIA = Param("via", str, "auto", "which power control to use: auto (the first the machine has of: "
                                "PDU outlet, IPMI BMC, Redfish BMC, Xen VM), pdu, ipmi, redfish or xen",
             choices=("auto", "pdu", "ipmi", "redfish", "xen"))

SNMP_REBOOT = TaskSpec(
    name="snmp_reboot",
    description="Power-cycle the machine's PDU outlet over SNMP: the PDU's reboot command, or with "
                "delay > 0 off, wait that many seconds, on. Reads the outlet back; does not wait "
                "for the machine to boot.",
    run=run_snmp_reboot,
    params=(Param("delay", int, 0, "seconds to leave the outlet off (0: the PDU's own reboot "
                                   "command)", minimum=0, maximum=600),),
    timeout=900.0,
    destructive=True,
    endpoints=pdu_endpoints,
)

POWER_ON = TaskSpec(
    name="power_on",
    description="Switch the machine's power on (PDU outlet, BMC or Xen VM) and read it back.",
    run=run_power_on,
    params=(_VIA,),
    timeout=180.0,
    destructive=True,
    endpoints=power_endpoints,
)

POWER_OFF = TaskSpec(
    name="power_off",
    description="Switch the machine's power off (PDU outlet, BMC or Xen VM) and read it back.",
    run=run_power_off,
    params=(_VIA,),
    timeout=180.0,
    destructive=True,
    endpoints=power_endpoints,
)

POWER_CYCLE = TaskSpec(
    name="power_cycle",
    description="Power-cycle the machine (PDU outlet, BMC or Xen VM): the device's own cycle, or off for off_for "
                "seconds then on; reads the state back.",
    run=run_power_cycle,
    params=(Param("off_for", float, None, "seconds to stay off (default: the device's own power "
                                          "cycle)", minimum=0, maximum=600), _VIA),
    timeout=900.0,
    destructive=True,
    endpoints=power_endpoints,
)

POWER_STATUS = TaskSpec(
    name="power_status",
    description="Read the machine's power state (PDU outlet, BMC or Xen VM).",
    run=run_power_status,
    params=(_VIA,),
    timeout=60.0,
    endpoints=power_endpoints,
)

TASKS = (SNMP_REBOOT, POWER_ON, POWER_OFF, POWER_CYCLE, POWER_STATUS)
