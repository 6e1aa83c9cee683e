"""
C{reimage}: boot the machine from the network once, so it reinstalls.

Step 1 sets a one-time PXE boot (IPMI C{chassis bootdev pxe}, or a Redfish
boot override), step 2 power-cycles it through the same BMC, step 3
verifies it went down and came back (as C{reboot} does).  The job log says
which step it is in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from roller.inventory import Machine
from roller.tasks import ipmi as ipmi_task
from roller.tasks import redfish as redfish_task
from roller.tasks.base import Param, TaskContext, TaskFailed, TaskSpec, driver_errors
from roller.tasks.verify import wait_down_then_up


def _via(machine: Machine) -> str:
    if machine.ipmi is not None:
        return "ipmi"
    if machine.redfish is not None:
        return "redfish"
    raise TaskFailed(f"cannot reimage {machine.worker_id}: it has neither ipmi nor redfish settings "
                     "(a one-time PXE boot needs its BMC)")


async def _pxe_and_cycle(ctx: TaskContext, via: str, efi: bool) -> str:
    if via == "ipmi":
        ipmi = ipmi_task.tool(ctx)
        bmc = ipmi.target(ctx.machine, ctx.secrets)
        ctx.log("step 1/3: one-time PXE boot through IPMI", step="pxe")
        said = await ipmi.set_boot_device(bmc, "pxe", efi, ctx.log)
        ctx.log(f"step 2/3: power cycle through IPMI ({said})", step="cycle")
        return await ipmi_task.initiate_cycle(ctx)
    driver = redfish_task.driver(ctx)
    target = redfish_task.target(ctx)
    ctx.log("step 1/3: one-time PXE boot through Redfish", step="pxe")
    said = await driver.set_boot_device(target, "pxe", efi, ctx.log)
    ctx.log(f"step 2/3: power cycle through Redfish ({said})", step="cycle")
    return await driver.cycle(target, ctx.log)


async def run(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    s = ctx.config
    machine = ctx.machine
    via = _via(machine)
    started = ctx.reactor.seconds()
    with driver_errors():
        detail = await _pxe_and_cycle(ctx, via, params["efi"])
    address = machine.address
    if address is None:
        return f"{via}: PXE boot set and {detail}; not verified (the machine has no ip or fqdn)"
    down, up = await wait_down_then_up(ctx, ctx.driver_set.liveness(machine), address,
                                       f"{via}: PXE boot set and {detail}",
                                       f"step 3/3: waiting for down (up to {s.reboot_down_timeout:g} s)")
    return (f"{via}: PXE boot set and {detail}; down after {down:.0f} s, up after {up:.0f} s. "
            f"Completed in {ctx.reactor.seconds() - started:.0f} seconds")


def endpoints(machine: Machine) -> tuple[str, ...]:
    return ipmi_task.endpoints(machine) or redfish_task.endpoints(machine)


TASK = TaskSpec(
    name="reimage",
    description="Set a one-time PXE boot through the BMC (IPMI or Redfish), power cycle the machine and "
                "verify it went down and came back.",
    run=run,
    params=(Param("efi", bool, False, "UEFI PXE boot (ipmitool options=efiboot)"),),
    timeout=3600.0,
    destructive=True,
    endpoints=endpoints,
)
