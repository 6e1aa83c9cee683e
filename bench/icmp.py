"""
In-process ICMP echo (roller.health.icmp) against the `ping` binary that
roller's jobs run (roller.drivers.liveness.IcmpPing), side by side in one
run: N checks of 127.0.0.1, C in flight, wall time and this process's CPU
(plus the children's for `ping`).  This is the measurement behind the
liveness sweep's choice of probe.

    python bench/icmp.py [--count 2000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from twisted.internet import defer, task  # noqa: E402

from roller.drivers.liveness import IcmpPing  # noqa: E402
from roller.health.icmp import IcmpEcho  # noqa: E402


def cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


async def measure(name: str, check, count: int, concurrency: int) -> tuple[float, float]:
    sem = defer.DeferredSemaphore(concurrency)
    t0, c0 = time.perf_counter(), cpu()
    results = await defer.gatherResults([sem.run(check, "127.0.0.1") for _ in range(count)])
    wall, used = time.perf_counter() - t0, cpu() - c0
    alive = sum(r.alive for r in results)
    print(f"{name:28} {count} checks ({alive} alive): {count / wall:8.0f} checks/s, "
          f"{used / count * 1e6:8.0f} us CPU per check")
    return wall, used


async def main(reactor, args) -> None:
    echo = IcmpEcho.open(reactor, timeout=2.0, count=1)
    if echo is None:
        print("in-process ICMP is not allowed here (ping_group_range, no CAP_NET_RAW)")
        return
    ping = IcmpPing(reactor, count=1, timeout=3.0)
    e_wall, e_cpu = await measure(f"in-process ({'raw' if echo.raw else 'ping socket'})", echo.check,
                                  args.count, args.concurrency)
    p_wall, p_cpu = await measure("ping binary (spawnProcess)", ping.check, args.count // 4, args.concurrency)
    echo.close()
    n = args.count
    print(f"ratio: {((p_cpu / (n // 4)) / (e_cpu / n)):.0f}x less CPU per check, "
          f"{(n / e_wall) / ((n // 4) / p_wall):.0f}x the checks per second")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    task.react(lambda r: defer.ensureDeferred(main(r, parser.parse_args())))
