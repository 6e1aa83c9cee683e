"""
C{reboot}: reboot a machine and prove it cycled, escalating through methods.

For each method in order (the task's C{methods} parameter, else the
machine's C{reboot_methods}, else the configured list): skip it, with the
reason logged, when the machine has no settings for it or roller does not
implement it yet; otherwise initiate it, then verify the machine went down
within C{reboot.down_timeout} and came back within C{reboot.up_timeout}.
The first verified method ends the job; every attempt is logged as a job
event with its method, outcome and reason.  C{file_bugzilla_bug}, when
reached, files or updates the machine's reboot bug with the attempts so
far (skipped when C{bugzilla.url} is not set); the job still fails.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from attrs import frozen

from roller.inventory import REBOOT_METHODS, Machine
from roller.tasks import bugzilla as bugzilla_task
from roller.tasks import ipmi as ipmi_task
from roller.tasks import pdu as pdu_task
from roller.tasks import redfish as redfish_task
from roller.tasks import ssh_reboot
from roller.tasks import xen as xen_task
from roller.tasks.base import Param, TaskContext, TaskFailed, TaskSpec
from roller.tasks.verify import is_alive, wait_down_then_up


@frozen
class Method:
    name: str
    not_applicable: Callable[[Machine], str | None]
    initiate: Callable[[TaskContext], Awaitable[str]]
    #: initiating it proves the host was up (it ran the command): no liveness look before it
    proves_up: bool = False


METHODS: dict[str, Method] = {
    "ssh_reboot": Method("ssh_reboot", ssh_reboot.not_applicable, ssh_reboot.initiate, proves_up=True),
    "ipmi_reset": Method("ipmi_reset", ipmi_task.not_applicable, ipmi_task.initiate_reset),
    "ipmi_cycle": Method("ipmi_cycle", ipmi_task.not_applicable, ipmi_task.initiate_cycle),
    "snmp_reboot": Method("snmp_reboot", pdu_task.not_applicable, pdu_task.initiate),
    "redfish_reboot": Method("redfish_reboot", redfish_task.not_applicable, redfish_task.initiate),
    "xenapi_reboot": Method("xenapi_reboot", xen_task.not_applicable, xen_task.initiate),
}


@frozen
class Attempt:
    method: str
    outcome: str  # "skipped", "failed", "succeeded"; "done" for file_bugzilla_bug
    reason: str

    def __str__(self) -> str:
        return f"{self.method} {self.outcome}: {self.reason}"


def _methods(ctx: TaskContext, params: Mapping[str, Any]) -> tuple[str, ...]:
    if params.get("methods"):
        return tuple(m.strip() for m in params["methods"].split(",") if m.strip())
    return ctx.machine.reboot_methods or tuple(ctx.config.reboot_methods)


async def run(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    s = ctx.config
    machine = ctx.machine
    clock = ctx.reactor
    address = machine.address
    if address is None:
        raise TaskFailed(f"machine {machine.worker_id} has neither an ip nor an fqdn")
    checker = ctx.driver_set.liveness(machine)
    started = clock.seconds()
    attempts: list[Attempt] = []

    def record(attempt: Attempt) -> None:
        attempts.append(attempt)
        ctx.log(str(attempt), method=attempt.method, outcome=attempt.outcome)

    for name in _methods(ctx, params):
        if name == "file_bugzilla_bug":
            # not a way to reboot: asks a human, and the job still fails
            reason = bugzilla_task.not_applicable(ctx)
            if reason:
                record(Attempt(name, "skipped", reason))
                continue
            ctx.log(f"{name}: asking for help in Bugzilla", method=name, step="initiate")
            try:
                detail = await bugzilla_task.file_bug(ctx, [str(a) for a in attempts])
            except TaskFailed as e:
                record(Attempt(name, "failed", str(e)))
                continue
            record(Attempt(name, "done", detail))
            continue
        method = METHODS.get(name)
        if method is None:
            record(Attempt(name, "skipped", "not implemented in this roller yet"))
            continue
        reason = method.not_applicable(machine)
        if reason:
            record(Attempt(name, "skipped", reason))
            continue
        # a machine that is down already (dead, powered off) only has to come back up; one
        # that ran the command was up (a down one fails the attempt: the next method looks)
        was_down = False if method.proves_up else not await is_alive(checker, address)
        ctx.log(f"{name}: starting" + (" (the host is down now)" if was_down else ""), method=name, step="initiate")
        try:
            detail = await method.initiate(ctx)
        except TaskFailed as e:
            record(Attempt(name, "failed", str(e)))
            continue
        try:
            down, up = await wait_down_then_up(
                ctx, checker, address, detail,
                f"{name}: {detail}; waiting for down (up to {s.reboot_down_timeout:g} s)", was_down=was_down,
                method=name)
        except TaskFailed as e:
            record(Attempt(name, "failed", str(e)))
            continue
        ctx.log(f"up after {up:.0f} s", method=name, step="up")
        record(Attempt(name, "succeeded", f"up after {up:.0f} s (it was down before)" if was_down
                       else f"down after {down:.0f} s, up after {up:.0f} s"))
        return f"{name}: {detail}. Completed in {clock.seconds() - started:.0f} seconds"
    if not attempts:
        raise TaskFailed("failed: no reboot method configured")
    raise TaskFailed("failed: " + "; ".join(str(a) for a in attempts))


def _check_methods(value: str) -> str:
    names = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in names if m not in REBOOT_METHODS]
    if not names or unknown:
        raise ValueError(f"must be a comma-separated string or a list of {', '.join(REBOOT_METHODS)}")
    return ",".join(names)


TASK = TaskSpec(
    name="reboot",
    description="Reboot the machine and verify it went down and came back, escalating through the "
                "configured methods (ssh_reboot, ipmi_reset, ipmi_cycle, snmp_reboot, ...).",
    run=run,
    params=(Param("methods", str, None,
                  "methods to try instead of the configured order, as a comma-separated string or a "
                  "list: " + ", ".join(REBOOT_METHODS), check=_check_methods, list_ok=True),),
    timeout=3600.0,
    destructive=True,
)
