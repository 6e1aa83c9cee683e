"""
Watching a machine go down and come back: liveness polled on the injected
clock until a condition holds or a deadline passes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.task import deferLater

from roller.drivers.liveness import LivenessError


async def wait_for_state(ctx: Any, checker: Any, address: str, *, alive: bool, timeout: float,
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
