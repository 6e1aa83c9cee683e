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

from roller.drivers.ipmi import IpmiConfigError, IpmiError, IpmiTarget
from roller.tasks.base import Param, TaskContext, TaskFailed, TaskSpec

__all__ = ["TASKS", "METHOD_NAMES", "not_applicable", "initiate_cycle", "initiate_reset"]


def not_applicable(machine: Any) -> str | None:
    """Why IPMI cannot be used on C{machine}, or C{None}."""
    if machine.ipmi is None:
        return "the machine has no ipmi settings"
    return None


def endpoints(machine: Any) -> tuple[str, ...]:
    """The shared endpoint of a machine's BMC: C{("bmc:HOST",)}."""
    return (f"bmc:{machine.ipmi.host}",) if machine.ipmi is not None else ()


def _target(ctx: TaskContext) -> IpmiTarget:
    reason = not_applicable(ctx.machine)
    if reason:
        raise TaskFailed(f"cannot use IPMI: {reason}")
    try:
        return ctx.drivers.ipmi.target(ctx.machine, ctx.secrets)
    except IpmiConfigError as e:
        raise TaskFailed(str(e)) from None


async def _power(ctx: TaskContext, action: str) -> str:
    target = _target(ctx)
    try:
        return await ctx.drivers.ipmi.power(target, action, ctx.log)
    except IpmiError as e:
        raise TaskFailed(str(e)) from None


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
    try:
        state = await ctx.drivers.ipmi.status(target, ctx.log)
    except IpmiError as e:
        raise TaskFailed(str(e)) from None
    ctx.log(f"chassis power is {state}", power=state)
    return f"{target.bmc}: chassis power is {state}"


async def run_list(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    target = _target(ctx)
    last = params.get("last", 15)
    ctx.log(f"ipmi {target.address}: sel list last {last}", bmc=target.address)
    try:
        lines = await ctx.drivers.ipmi.sel_list(target, last, ctx.log)
    except IpmiError as e:
        raise TaskFailed(str(e)) from None
    for line in lines:
        ctx.log(line, sel=True)
    if not lines:
        return f"{target.bmc}: the SEL has no entries"
    return f"{target.bmc}: {len(lines)} SEL entr{'y' if len(lines) == 1 else 'ies'}:\n" + "\n".join(lines)


async def run_pxe(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    target = _target(ctx)
    try:
        detail = await ctx.drivers.ipmi.set_boot_device(target, "pxe", bool(params.get("efi")), ctx.log)
    except IpmiError as e:
        raise TaskFailed(str(e)) from None
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
    tool = ctx.drivers.ipmi
    try:
        state = await tool.status(target, ctx.log)
        ctx.log(f"ipmi {target.address}: chassis power is {state}", power=state)
        if state == "off":
            if action == "reset":
                raise TaskFailed(f"{target.bmc}: chassis power is off; a reset would not start it")
            detail = await tool.power(target, "on", ctx.log)
            return f"ipmi power on (the machine was off): {detail}"
        detail = await tool.power(target, action, ctx.log, verify=False)
    except IpmiError as e:
        raise TaskFailed(str(e)) from None
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
