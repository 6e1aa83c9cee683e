"""
The C{ping} task: is the machine reachable?

ICMP through the C{ping} binary, or a TCP connect to a configured port for
hosts whose ICMP is filtered (the machine's C{liveness} settings).  Every
line of output becomes a job event as it arrives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from roller.drivers.liveness import LivenessError, liveness_for
from roller.tasks.base import Param, TaskContext, TaskFailed, TaskSpec, driver_errors


async def run(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    machine = ctx.machine
    address = machine.address
    if address is None:
        raise TaskFailed(f"machine {machine.worker_id} has neither an ip nor an fqdn to ping")
    method = machine.liveness.method
    count = params["count"]
    if method == "icmp":
        checker = liveness_for("icmp", ctx.reactor, on_line=ctx.log, count=count, timeout=count + 4.0)
        ctx.log(f"ping -c {count} {address}")
    else:
        checker = liveness_for("tcp", ctx.reactor, port=machine.liveness.port, on_line=ctx.log)
        ctx.log(f"tcp connect {address}:{machine.liveness.port}")
    with driver_errors(LivenessError, ValueError):
        result = await checker.check(address)
    if not result.alive:
        raise TaskFailed(f"{address} is not answering: {result.detail}")
    return f"{address} is up: {result.detail}"


TASK = TaskSpec(
    name="ping",
    description="Check that the machine answers: ICMP echo, or a TCP connect where ICMP is filtered.",
    run=run,
    params=(Param("count", int, 3, "echo requests to send (ICMP only)", minimum=1, maximum=10),),
    timeout=30.0,
)
