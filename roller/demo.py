"""
The demo fleet: a few machines on loopback addresses, so a newcomer who
starts roller with C{--demo} sees jobs run at once.
"""

from __future__ import annotations

from roller.inventory import Machine
from roller.store import Store

DEMO_MACHINES = [
    {"worker_id": "demo-1", "worker_group": "demo", "ip": "127.0.0.2", "pool": "demo-linux",
     "notes": "answers ICMP on loopback"},
    {"worker_id": "demo-2", "worker_group": "demo", "ip": "127.0.0.3", "pool": "demo-linux"},
    {"worker_id": "demo-3", "worker_group": "demo", "ip": "127.0.0.4", "pool": "demo-mac"},
    {"worker_id": "demo-closed", "worker_group": "demo", "ip": "127.0.0.5", "pool": "demo-mac",
     "liveness": {"method": "tcp", "port": 9},
     "notes": "liveness by TCP to a port nobody listens on: its ping fails, to show a failure"},
]


async def seed_demo_fleet(store: Store) -> int:
    """Add the demo machines that are missing; how many were added."""
    added = 0
    for data in DEMO_MACHINES:
        machine = Machine.from_json(data)
        if await store.machines.get(*machine.key) is None:
            await store.machines.put(machine)
            added += 1
    return added
