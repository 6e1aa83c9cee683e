"""
How fast the fleet simulator (L{roller.sim.fleet}) is built, started and
stopped: the timings tests/test_fleet.py used to assert, measured here
instead.  Manual; not part of CI.  See bench/README.md.

    python bench/fleet.py [--keys N] [--machines M] [--base 127.0.2.]

Prints the time to generate N ed25519 keys (one host key per machine is
affordable because this is fast), and for M machines on loopback
addresses: building the Fleet, starting it (every machine listening) and
stopping it (every port closed), on the global reactor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from roller.sim.daemon import free_port_on  # noqa: E402
from roller.sim.fleet import Fleet, fleet_addresses, generate_key  # noqa: E402


async def measure(reactor: object, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    keys = [generate_key() for _ in range(args.keys)]
    keyed = time.perf_counter()
    assert len({k.public().blob() for k in keys}) == args.keys
    print(f"{args.keys} ed25519 keys   {keyed - started:.3f} s")

    addrs = fleet_addresses(args.base, args.machines)
    started = time.perf_counter()
    fleet = Fleet(reactor, args.machines, base=args.base, ssh_port=free_port_on(addrs))
    built = time.perf_counter()
    await fleet.start()
    listening = time.perf_counter()
    await fleet.stop()
    stopped = time.perf_counter()
    assert not any(m.listening for m in fleet)
    print(f"{args.machines} machines     build {built - started:.3f} s, start {listening - built:.3f} s, "
          f"stop {stopped - listening:.3f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--machines", type=int, default=200)
    p.add_argument("--base", default="127.0.2.")
    args = p.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(measure(reactor, args)))


if __name__ == "__main__":
    main()
