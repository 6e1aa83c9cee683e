"""
The demo fleet, so a newcomer who runs roller with C{--demo} sees jobs work:

- C{demo-1} .. C{demo-3} on 127.0.0.2-4 answer ICMP (ping succeeds);
- C{demo-closed} fails its liveness check (TCP to a closed port);
- C{sim-001} .. C{sim-NNN}: simulated machines (L{roller.sim.fleet}) on
  127.0.1.x, served by this same process, with an SSH server that accepts
  C{reboot} and then really goes down and comes back: C{reboot} works on
  them end to end.  Their key, known_hosts and credential are written to
  C{STATE_DIR/demo/} and used only by this process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from attrs import frozen

from roller.inventory import Machine
from roller.secrets import Secrets, load_secrets
from roller.store import Store

if TYPE_CHECKING:
    from roller.service import IRollerReactor

DEMO_MACHINES = [
    {"worker_id": "demo-1", "worker_group": "demo", "ip": "127.0.0.2", "pool": "demo-linux",
     "notes": "answers ICMP on loopback"},
    {"worker_id": "demo-2", "worker_group": "demo", "ip": "127.0.0.3", "pool": "demo-linux"},
    {"worker_id": "demo-3", "worker_group": "demo", "ip": "127.0.0.4", "pool": "demo-mac"},
    {"worker_id": "demo-closed", "worker_group": "demo", "ip": "127.0.0.5", "pool": "demo-mac",
     "liveness": {"method": "tcp", "port": 9},
     "notes": "liveness by TCP to a port nobody listens on: its ping fails, to show a failure"},
]


@frozen
class DemoFleet:
    fleet: Any
    secrets: Secrets
    known_hosts: str


async def seed_demo_fleet(store: Store, extra: Sequence[Mapping[str, Any]] = ()) -> int:
    """Add (or refresh) the demo machines; how many were new."""
    added = 0
    for data in [*DEMO_MACHINES, *extra]:
        machine = Machine.from_json(data)
        if await store.machines.put(machine):
            added += 1
    return added


async def start_demo_fleet(reactor: IRollerReactor, state_dir: str, *, count: int, ssh_port: int,
                           down_for: float = 8.0, reboot_delay: float = 1.0) -> DemoFleet:
    from roller.sim.fleet import Fleet, IFleetReactor

    # the process's reactor provides every IReactor* interface; IRollerReactor names the ones roller's
    # own code uses, and the simulator's UNIX listeners are not among them
    fleet = Fleet(cast(IFleetReactor, reactor), count, "127.0.1.", ssh_port, reboot_delay=reboot_delay,
                  down_for=down_for, worker_prefix="sim", credential="demo-fleet-ssh")
    await fleet.start()
    files = fleet.write_client_files(os.path.join(state_dir, "demo"))
    return DemoFleet(fleet=fleet, secrets=load_secrets(files.secrets), known_hosts=files.known_hosts_openssh)
