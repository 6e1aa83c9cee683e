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


async def wait_for_state(ctx: TaskContext, checker: ILiveness, address: str, *, alive: bool, timeout: float,
                         interval: float) -> float | None:
    """
    Poll C{checker} until the machine's liveness is C{alive}; the seconds it
    took, or None if C{timeout} passed first.  A check that errors counts
    as "not alive" (a host going down often fails oddly).
    """
    clock = ctx.reactor
    start = clock.seconds()
    deadline = start + timeout
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
    if was_down:
        down = 0.0
        ctx.log(f"{what}; it was down before: waiting for up (up to {s.reboot_up_timeout:g} s)",
                step="waiting_for_up", **fields)
    else:
        ctx.log(waiting, step="waiting_for_down", **fields)
        found = await wait_for_state(ctx, checker, address, alive=False, timeout=s.reboot_down_timeout,
                                     interval=s.reboot_poll_interval)
        if found is None:
            raise TaskFailed(f"{what}, but the host did not go down within {s.reboot_down_timeout:g} s")
        down = found
        ctx.log(f"down after {down:.0f} s; waiting for up (up to {s.reboot_up_timeout:g} s)",
                step="waiting_for_up", **fields)
    up = await wait_for_state(ctx, checker, address, alive=True, timeout=s.reboot_up_timeout,
                              interval=s.reboot_poll_interval)
    if up is None:
        raise TaskFailed(f"{what}; down after {down:.0f} s but not up again within {s.reboot_up_timeout:g} s")
    return down, up
