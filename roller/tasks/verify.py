"""
Watching a machine go down and come back: liveness polled on the injected
clock until a condition holds or a deadline passes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.task import deferLater

from roller.drivers.liveness import ILiveness, LivenessError
from roller.tasks.base import TaskContext, TaskFailed
from roller.tasks.down_times import down_times


async def wait_for_state(ctx: TaskContext, checker: ILiveness, address: str, *, alive: bool, timeout: float,
                         interval: float, first_after: float = 0.0) -> float | None:
    """
    Poll C{checker} until the machine's liveness is C{alive}; the seconds it
    took, or None if C{timeout} passed first.  A check that errors counts
    as "not alive" (a host going down often fails oddly).  The first check
    is made C{first_after} seconds from now (at most C{timeout}).
    """
    clock = ctx.reactor
    start = clock.seconds()
    deadline = start + timeout
    if first_after > 0:
        await deferLater(clock, min(first_after, timeout), lambda: None)
    while True:
        try:
            result = await checker.check(address)
            now_alive = result.alive
        except (LivenessError, DeferredTimeout):
            now_alive = False
        now = clock.seconds()
        if now_alive is alive:
            return now - start
        if now >= deadline:
            return None
        await deferLater(clock, min(interval, max(deadline - now, 0.0)), lambda: None)


async def is_alive(checker: ILiveness, address: str) -> bool:
    """One liveness check; one that errors counts as "not alive"."""
    try:
        return (await checker.check(address)).alive
    except (LivenessError, DeferredTimeout):
        return False


async def wait_down_then_up(ctx: TaskContext, checker: ILiveness, address: str, what: str, waiting: str,
                            *, was_down: bool = False, **fields: Any) -> tuple[float, float]:
    """
    After C{what} was done to the machine: log C{waiting}, wait for it to
    go down within C{reboot.down_timeout}, then to come back within
    C{reboot.up_timeout} (polled every C{reboot.poll_interval}); the
    seconds each took.  Each step is logged with C{fields}.  A machine that
    was already down before (C{was_down}: a dead machine powered on) only
    has to come up.

    @raise TaskFailed: It did not go down, or not up again, in time; the
        message starts with C{what}.
    """
    s = ctx.config
    quiet = 0.0
    if was_down:
        down = 0.0
        ctx.log(f"{what}; it was down before: waiting for up (up to {s.reboot_up_timeout:g} s)",
                step="waiting_for_up", **fields)
    else:
        ctx.log(waiting, step="waiting_for_down", **fields)
        # it was up a moment ago (the reboot was just sent): the first look is one interval later
        found = await wait_for_state(ctx, checker, address, alive=False, timeout=s.reboot_down_timeout,
                                     interval=s.reboot_poll_interval, first_after=s.reboot_poll_interval)
        if found is None:
            raise TaskFailed(f"{what}, but the host did not go down within {s.reboot_down_timeout:g} s")
        down = found
        quiet = down_times(ctx.reactor).quiet(_kind(ctx, fields))
        ctx.log(f"down after {down:.0f} s; waiting for up (up to {s.reboot_up_timeout:g} s"
                + (f"; first look after {quiet:.0f} s: machines like it took {2 * quiet:.0f} s or more lately)"
                   if quiet >= s.reboot_poll_interval else ")"),
                step="waiting_for_up", **fields)
    # just seen down: the first look for up is an interval later, or later still (quiet)
    up = await wait_for_state(ctx, checker, address, alive=True, timeout=s.reboot_up_timeout,
                              interval=s.reboot_poll_interval,
                              first_after=0.0 if was_down else max(quiet, s.reboot_poll_interval))
    if up is None:
        raise TaskFailed(f"{what}; down after {down:.0f} s but not up again within {s.reboot_up_timeout:g} s")
    if not was_down:
        down_times(ctx.reactor).note(_kind(ctx, fields), up)
    return down, up


def _kind(ctx: TaskContext, fields: dict[str, Any]) -> tuple[str, str, str]:
    """Machines expected to take as long to come back: the pool (else group), the task, the method."""
    m = ctx.machine
    return (m.pool or f"group:{m.worker_group}", ctx.job.task_name, str(fields.get("method", "")))
