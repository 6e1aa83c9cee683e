"""
C{ssh_reboot}: ask the machine to reboot itself over SSH (seed parity).

Tries C{reboot}, C{sudo reboot}, C{shutdown -f -t 3 -r} in order until one
is accepted.  A connection dropped after the command was sent is a host
going down: the reboot counts as initiated.  Connection, authentication
and host-key failures end the attempt at once: another command would meet
the same wall.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from roller.drivers.ssh import SshCommandInterrupted, SshConnectionLost, ssh_target
from roller.inventory import Machine
from roller.tasks.base import TaskContext, TaskFailed, TaskSpec, driver_errors

COMMANDS = ("reboot", "sudo reboot", "shutdown -f -t 3 -r")


def not_applicable(machine: Machine) -> str | None:
    if machine.ssh is None:
        return "the machine has no ssh settings"
    if machine.address is None:
        return "the machine has neither an ip nor an fqdn"
    return None


async def initiate(ctx: TaskContext) -> str:
    """Send the reboot; a line saying which command was accepted.  L{TaskFailed} otherwise."""
    s = ctx.config
    shell = ctx.driver_set.shell
    with driver_errors():
        target = ssh_target(ctx.machine, ctx.secrets, default_user=s.ssh_user,
                            default_credential=s.ssh_credential or None,
                            default_policy=s.ssh_host_key_policy)
    refusals = []
    for command in COMMANDS:
        ctx.log(f"ssh {target.user}@{target.host}:{target.port}: {command}")
        with driver_errors():
            try:
                result = await shell.run(target, command, on_line=ctx.log)
            except SshCommandInterrupted as e:
                # A host going down often drops or stalls the session: the reboot
                # is initiated; verifying that it went down is the caller's job.
                if not e.command_sent:
                    raise
                how = "dropped" if isinstance(e, SshConnectionLost) else "stalled"
                return f"ssh reboot sent (`{command}`; the connection {how} as the host went down)"
        if result.exit_status == 0:
            return f"ssh reboot sent (`{command}` accepted)"
        detail = (result.stderr or result.stdout).strip().splitlines()
        refusals.append(f"`{command}` exited {result.exit_status}"
                        + (f": {detail[-1][:200]}" if detail else ""))
        ctx.log(refusals[-1])
    raise TaskFailed("no reboot command was accepted: " + "; ".join(refusals))


async def run(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    reason = not_applicable(ctx.machine)
    if reason:
        raise TaskFailed(f"cannot reboot over ssh: {reason}")
    return await initiate(ctx)


TASK = TaskSpec(
    name="ssh_reboot",
    description="Ask the machine to reboot itself over SSH (reboot, sudo reboot, shutdown -r); does not wait for it.",
    run=run,
    timeout=120.0,
    destructive=True,
)
