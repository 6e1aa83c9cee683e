"""
C{xenapi_reboot}: reboot a Xen VM through its pool's XenAPI (seed parity).

The seed kept C{xen.json}: worker FQDN -> C{{"xen_uuid": ...}}; the legacy
import turns that into the machine's C{xen.vm_uuid}.  The pool URL and the
credential come from the machine's C{xen} section, else from the settings.

The driver (L{roller.drivers.xen}) logs in, shuts the VM down cleanly
(hard if that fails or takes longer than C{xen.shutdown_timeout}), waits
C{xen.start_delay}, starts it, reads its power state back and logs out.
As a method of the C{reboot} task (L{initiate}) this is the initiation:
C{reboot} then verifies through liveness that the guest went down and
came back.

Settings (with these defaults while roller's settings lack them):
C{xen.url} (""), C{xen.credential} (""), C{xen.ca_file} (""),
C{xen.verify_tls} (true), C{xen.timeout} (30 s),
C{xen.shutdown_timeout} (120 s), C{xen.start_delay} (5 s).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from roller.drivers.xen import XenApiDriver, XenTarget, xen_from_settings, xen_target
from roller.inventory import Machine
from roller.tasks.base import TaskContext, TaskFailed, TaskSpec, driver_errors


def driver(ctx: TaskContext) -> XenApiDriver:
    """The process's XenAPI driver (C{ctx.drivers.xen}), else one built from the settings."""
    existing: XenApiDriver | None = getattr(ctx.drivers, "xen", None)
    return existing if existing is not None else xen_from_settings(ctx.reactor, ctx.config)


def target(ctx: TaskContext) -> XenTarget:
    """The machine's L{XenTarget}; L{TaskFailed} if it cannot be built."""
    s = ctx.config
    with driver_errors():
        return xen_target(ctx.machine, ctx.secrets, default_url=s.xen_url or None,
                          default_credential=s.xen_credential or None, ca_file=s.xen_ca_file or None,
                          verify_tls=s.xen_verify_tls)


def not_applicable(machine: Machine) -> str | None:
    if machine.xen is None:
        return "the machine has no xen settings"
    return None


async def initiate(ctx: TaskContext) -> str:
    """Shut the VM down and start it again; a line saying how.  L{TaskFailed} otherwise."""
    t = target(ctx)
    ctx.log(f"xenapi reboot of VM {t.vm_uuid} on {t.host}")
    with driver_errors():
        result = await driver(ctx).reboot(t, ctx.log)
    return f"xenapi reboot: {result}"


async def run(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    reason = not_applicable(ctx.machine)
    if reason:
        raise TaskFailed(f"cannot reboot through XenAPI: {reason}")
    return await initiate(ctx)


TASK = TaskSpec(
    name="xenapi_reboot",
    description="Reboot a Xen VM through its pool's XenAPI: clean shutdown (hard shutdown if that fails "
                "or hangs), a short pause, start; does not wait for the guest OS.",
    run=run,
    timeout=600.0,
    destructive=True,
)
