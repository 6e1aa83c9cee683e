"""
The IPMI tasks (seed parity): C{ipmi_on}, C{ipmi_off}, C{ipmi_cycle},
C{ipmi_reset}, C{ipmi_status}, C{ipmi_list} (C{sel list last 15}), plus
C{ipmi_pxe} (next boot from the network), and the C{ipmi_reset} /
C{ipmi_cycle} methods of the C{reboot} escalation.

All go through C{ctx.drivers.ipmi} (an L{roller.drivers.ipmi.IpmiTool}),
which serializes commands per BMC, keeps the minimum interval between them,
retries transient errors (each retry is a job event) and reads a power
change back until it shows (C{on} after on/cycle/reset, C{off} after off).
Every ipmitool command is logged as a job event; the password never is.

Each task declares the endpoint C{bmc:HOST}, so the queue also spaces the
jobs that share a BMC (all cartridges of a Moonshot chassis).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from roller.drivers.ipmi import IpmiTarget, IpmiTool
from roller.inventory import Machine
from roller.tasks.base import Param, TaskContext, TaskFailed, TaskSpec, driver_errors

__all__ = ["TASKS", "METHOD_NAMES", "not_applicable", "initiate_cycle", "initiate_reset"]


def not_applicable(machine: Machine) -> str | None:
    """Why IPMI cannot be used on C{machine}, or C{None}."""
    if machine.ipmi is None:
        return "the machine has no ipmi settings"
    return None


def endpoints(machine: Machine) -> tuple[str, ...]:
    """The shared endpoint of a machine's BMC: C{("bmc:HOST",)}."""
    return (f"bmc:{machine.ipmi.host}",) if machine.ipmi is not None else ()


def tool(ctx: TaskContext) -> IpmiTool:
    """The process's IPMI driver; L{TaskFailed} if this roller has none."""
    ipmi = ctx.driver_set.ipmi
    if ipmi is None:
        raise TaskFailed("this roller has no ipmi power driver configured")
    return ipmi


def _target(ctx: TaskContext) -> IpmiTarget:
    reason = not_applicable(ctx.machine)
    if reason:
        raise TaskFailed(f"cannot use IPMI: {reason}")
    with driver_errors():
        return tool(ctx).target(ctx.machine, ctx.secrets)


async def _power(ctx: TaskContext, action: str) -> str:
    target = _target(ctx)
    with driver_errors():
        return await tool(ctx).power(target, action, ctx.log)


async def run_on(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    return await _power(ctx, "on")


async def run_off(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    return await _power(ctx, "off")


async def run_cycle(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    return await _power(ctx, "cycle")


async def run_reset(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    return await _power(ctx, "reset")


async def run_status(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    target = _target(ctx)
    with driver_errors():
        state = await tool(ctx).status(target, ctx.log)
    ctx.log(f"chassis power is {state}", power=state)
    return f"{target.bmc}: chassis power is {state}"


async def run_list(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    target = _target(ctx)
    last = params.get("last", 15)
    ctx.log(f"ipmi {target.address}: sel list last {last}", bmc=target.address)
    with driver_errors():
        lines = await tool(ctx).sel_list(target, last, ctx.log)
    for line in lines:
        ctx.log(line, sel=True)
    if not lines:
        return f"{target.bmc}: the SEL has no entries"
    return f"{target.bmc}: {len(lines)} SEL entr{'y' if len(lines) == 1 else 'ies'}:\n" + "\n".join(lines)


async def run_pxe(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    target = _target(ctx)
    with driver_errors():
        detail = await tool(ctx).set_boot_device(target, "pxe", bool(params.get("efi")), ctx.log)
    return f"{target.bmc}: {detail}" + (" (EFI)" if params.get("efi") else "")


# -- the reboot escalation's methods: Method(name, not_applicable, initiate)


async def _initiate(ctx: TaskContext, action: str) -> str:
    """
    For the reboot escalation, which proves the reboot by watching the host
    go down and come back: read the power first, then send C{action}
    without waiting for a read-back (a cycle reads C{on} again long before
    the host answers; the liveness watch is the real proof).  A machine
    that is off cannot be reset: C{ipmi_reset} fails at once, so the
    escalation moves on, and C{ipmi_cycle} powers it on instead (many BMCs
    refuse a cycle of a machine that is off).
    """
    target = _target(ctx)
    ipmi = tool(ctx)
    with driver_errors():
        state = await ipmi.status(target, ctx.log)
        ctx.log(f"ipmi {target.address}: chassis power is {state}", power=state)
        if state == "off":
            if action == "reset":
                raise TaskFailed(f"{target.bmc}: chassis power is off; a reset would not start it")
            detail = await ipmi.power(target, "on", ctx.log)
            return f"ipmi power on (the machine was off): {detail}"
        detail = await ipmi.power(target, action, ctx.log, verify=False)
    return f"ipmi power {action} sent: {detail}"


async def initiate_reset(ctx: TaskContext) -> str:
    """The C{ipmi_reset} reboot method: a line for the reboot task, L{TaskFailed} otherwise."""
    return await _initiate(ctx, "reset")


async def initiate_cycle(ctx: TaskContext) -> str:
    """The C{ipmi_cycle} reboot method: a line for the reboot task, L{TaskFailed} otherwise."""
    return await _initiate(ctx, "cycle")


METHOD_NAMES = ("ipmi_reset", "ipmi_cycle")

_POWER_TIMEOUT = 600.0  # retries with back-off, the BMC interval, then up to ipmi.power_wait
_QUERY_TIMEOUT = 300.0

TASKS = (
    TaskSpec(name="ipmi_on", description="Power the machine on through its BMC (ipmitool chassis power on) "
             "and read the power state back.", run=run_on, timeout=_POWER_TIMEOUT,
             destructive=True, endpoints=endpoints),
    TaskSpec(name="ipmi_off", description="Power the machine off hard through its BMC (ipmitool chassis power "
             "off) and read the power state back.", run=run_off, timeout=_POWER_TIMEOUT,
             destructive=True, endpoints=endpoints),
    TaskSpec(name="ipmi_cycle", description="Power cycle the machine through its BMC (ipmitool chassis power "
             "cycle) and wait until the power reads on again.", run=run_cycle,
             timeout=_POWER_TIMEOUT, destructive=True, endpoints=endpoints),
    TaskSpec(name="ipmi_reset", description="Hard reset the machine through its BMC (ipmitool chassis power "
             "reset) and check the power reads on.", run=run_reset, timeout=_POWER_TIMEOUT,
             destructive=True, endpoints=endpoints),
    TaskSpec(name="ipmi_status", description="Read the machine's power state from its BMC (ipmitool chassis "
             "power status).", run=run_status, timeout=_QUERY_TIMEOUT, endpoints=endpoints),
    TaskSpec(name="ipmi_list", description="Show the last entries of the BMC's System Event Log (ipmitool sel "
             "list last 15).", run=run_list, timeout=_QUERY_TIMEOUT, endpoints=endpoints,
             params=(Param("last", int, 15, "how many of the newest SEL entries to show",
                           minimum=1, maximum=1000),)),
    TaskSpec(name="ipmi_pxe", description="Make the machine boot from the network next time (ipmitool "
             "chassis bootdev pxe [options=efiboot]); does not reboot it.", run=run_pxe,
             timeout=_QUERY_TIMEOUT, destructive=True, endpoints=endpoints,
             params=(Param("efi", bool, False, "EFI network boot (options=efiboot)"),)),
)
