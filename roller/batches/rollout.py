"""
The rollout decision: which pending members of a batch may start now.

Pure: no I/O, no clock of its own.  The service (L{roller.batches.service})
keeps the counts it needs as jobs come and go and calls L{plan} after every
change; the work is O(pools + starts), not O(members).

    decision = plan(rollout, total=len(members), pool_sizes=sizes, pending=pending_by_pool,
                    active=3, active_by_pool={"p1": 2, "p2": 1}, elsewhere_by_pool={"p1": 1},
                    failures=0, now=clock.seconds(), last_start=None)
    decision.start  # positions to submit now, in rollout order
    decision.wait   # seconds until the pause between starts allows the next one, if that is what holds it
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence

from attrs import frozen

from roller.batches.model import Rollout

__all__ = ["Decision", "plan", "pool_limit", "tripped"]


@frozen
class Decision:
    start: tuple[int, ...] = ()  # member positions to start now, in rollout order
    wait: float | None = None  # call again after this many seconds (the pause between starts holds the next one)


def tripped(rollout: Rollout, failures: int) -> bool:
    """The circuit breaker: C{failures} failed members reach C{stop_after_failures}."""
    return rollout.stop_after_failures is not None and failures >= rollout.stop_after_failures


def concurrent_limit(rollout: Rollout, total: int) -> float:
    """Members in flight at once over the whole batch (inf: no limit)."""
    return math.inf if rollout.max_concurrent is None else rollout.max_concurrent.of(total)


def pool_limit(rollout: Rollout, pool_size: int) -> float:
    """Machines of a pool of C{pool_size} in the inventory that may be in flight at once (inf: no limit)."""
    return math.inf if rollout.max_per_pool is None else rollout.max_per_pool.of(pool_size)


def plan(rollout: Rollout, *, total: int, pool_sizes: Mapping[str, int], pending: Mapping[str, Sequence[int]],
         active: int, active_by_pool: Mapping[str, int], elsewhere_by_pool: Mapping[str, int] | None = None,
         failures: int = 0, running: bool = True, now: float = 0.0, last_start: float | None = None) -> Decision:
    """
    The members to start now.

    @param total: the batch's members (C{max_concurrent} as a percentage is of them).
    @param pool_sizes: machines per pool key in the inventory (C{max_per_pool} as a percentage is of them;
        a pool missing counts as the batch's pending and active members of it).
    @param pending: per pool key, the positions of its pending members in rollout order.
    @param active: the batch's members in flight (queued or running).
    @param active_by_pool: the same per pool key.
    @param elsewhere_by_pool: destructive jobs in flight on machines of each pool outside this batch:
        they count against C{max_per_pool} too.
    @param failures: failed members (C{stop_after_failures}).
    @param running: False once the batch is halted, cancelled or its service stopping: nothing starts.
    @param last_start: when the batch last started a member (C{pause_between}).
    """
    if not running or tripped(rollout, failures):
        return Decision()
    budget = concurrent_limit(rollout, total) - active
    if budget <= 0:
        return Decision()
    if rollout.pause_between > 0:
        if last_start is not None and now < last_start + rollout.pause_between:
            if any(pending.values()):
                return Decision(wait=last_start + rollout.pause_between - now)
            return Decision()
        budget = 1
    elsewhere = elsewhere_by_pool or {}
    room: dict[str, float] = {}
    heads: list[tuple[int, str, int]] = []  # (position, pool, index in its pending list)
    for pool, positions in pending.items():
        if not positions:
            continue
        in_flight = active_by_pool.get(pool, 0)
        size = pool_sizes.get(pool)
        if size is None:
            size = len(positions) + in_flight
        room[pool] = pool_limit(rollout, size) - in_flight - elsewhere.get(pool, 0)
        if room[pool] > 0:
            heads.append((positions[0], pool, 0))
    heapq.heapify(heads)
    start: list[int] = []
    while heads and len(start) < budget:
        position, pool, i = heapq.heappop(heads)
        start.append(position)
        room[pool] -= 1
        positions = pending[pool]
        if room[pool] > 0 and i + 1 < len(positions):
            heapq.heappush(heads, (positions[i + 1], pool, i + 1))
    wait = None
    if rollout.pause_between > 0 and start and len(start) < sum(len(p) for p in pending.values()):
        wait = rollout.pause_between
    return Decision(start=tuple(start), wait=wait)
