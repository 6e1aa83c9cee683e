"""
C{redfish_reboot} and C{redfish_power}: a machine's power through its BMC's
Redfish service (L{roller.drivers.redfish}).

C{redfish_reboot} sends the reset (C{ForceRestart}, else
C{GracefulRestart}, else C{PowerCycle}, else C{ForceOff} + C{On}; a machine
that is off is powered on), optionally after a one-time PXE boot override,
and reads the power state back.  As a method of the C{reboot} task
(L{initiate}) it only initiates: C{reboot} verifies down and up through
liveness.

C{redfish_power} runs one action: C{status}, C{on}, C{off},
C{graceful_off}, C{cycle}, C{reset}, or C{pxe} (one-time boot override).

Settings (with these defaults while roller's settings lack them):
C{redfish.credential} (""), C{redfish.request_timeout} (20 s),
C{redfish.power_timeout} (120 s), C{redfish.poll_interval} (2 s).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from roller.drivers.redfish import RedfishDriver, RedfishTarget, redfish_from_settings, redfish_target
from roller.inventory import Machine
from roller.tasks.base import Param, TaskContext, TaskFailed, TaskSpec, driver_errors

ACTIONS = ("status", "on", "off", "graceful_off", "cycle", "reset", "pxe")


def driver(ctx: TaskContext) -> RedfishDriver:
    """The process's Redfish driver (C{ctx.drivers.redfish}), else one built from the settings."""
    existing: RedfishDriver | None = getattr(ctx.drivers, "redfish", None)
    return existing if existing is not None else redfish_from_settings(ctx.reactor, ctx.config)


def target(ctx: TaskContext) -> RedfishTarget:
    """The machine's L{RedfishTarget}; L{TaskFailed} if it cannot be built."""
    with driver_errors():
        return redfish_target(ctx.machine, ctx.secrets, default_credential=ctx.config.redfish_credential or None)


def not_applicable(machine: Machine) -> str | None:
    if machine.redfish is None:
        return "the machine has no redfish settings"
    return None


def endpoints(machine: Machine) -> tuple[str, ...]:
    """The BMC, so the queue serializes and spaces commands to it."""
    if machine.redfish is None:
        return ()
    host = urlsplit(machine.redfish.url).hostname
    return (f"bmc:{host}",) if host else ()


async def initiate(ctx: TaskContext, pxe: bool = False) -> str:
    """Send the reboot (after a one-time PXE override if C{pxe}); a line saying what was done."""
    t = target(ctx)
    d = driver(ctx)
    system = f" system {t.system}" if t.system else ""
    ctx.log(f"redfish reboot {t.url}{system}")
    with driver_errors():
        boot = ""
        if pxe:
            boot = f"{await d.set_boot_device(t, 'pxe', on_event=ctx.log)}; "
        power = await d.reset(t, ctx.log)
    return f"redfish reboot: {boot}{power}"


async def run(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    reason = not_applicable(ctx.machine)
    if reason:
        raise TaskFailed(f"cannot reboot over Redfish: {reason}")
    return await initiate(ctx, pxe=bool(params.get("pxe")))


async def run_power(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    reason = not_applicable(ctx.machine)
    if reason:
        raise TaskFailed(f"cannot use Redfish: {reason}")
    action = params.get("action", "status")
    t = target(ctx)
    d = driver(ctx)
    ctx.log(f"redfish {action} {t.url}" + (f" system {t.system}" if t.system else ""))
    with driver_errors():
        if action == "status":
            return f"power is {await d.status(t, ctx.log)}"
        if action == "on":
            return await d.on(t, ctx.log)
        if action == "off":
            return await d.off(t, ctx.log)
        if action == "graceful_off":
            return await d.off(t, ctx.log, graceful=True)
        if action == "cycle":
            return await d.cycle(t, ctx.log)
        if action == "reset":
            return await d.reset(t, ctx.log)
        if action == "pxe":
            return await d.set_boot_device(t, "pxe", on_event=ctx.log)
    raise TaskFailed(f"unknown action {action!r}")


TASK = TaskSpec(
    name="redfish_reboot",
    description="Reboot the machine through its BMC's Redfish service (ForceRestart, GracefulRestart, "
                "PowerCycle or ForceOff+On, whichever the BMC offers), optionally PXE-booting once; "
                "reads the power state back but does not wait for the OS.",
    run=run,
    params=(Param("pxe", bool, False, "set a one-time PXE boot override first"),),
    timeout=300.0,
    destructive=True,
    endpoints=endpoints,
)

POWER_TASK = TaskSpec(
    name="redfish_power",
    description="One Redfish power action on the machine's BMC: status, on, off, graceful_off, cycle, "
                "reset, or pxe (one-time PXE boot override); changes are read back.",
    run=run_power,
    params=(Param("action", str, "status", "what to do", choices=ACTIONS),),
    timeout=600.0,
    destructive=True,
    endpoints=endpoints,
)
