"""
SNMP SETs per second against a real net-snmp snmpd on 127.0.0.1, three
clients in the same run.  Manual; not part of CI.

    python bench/snmp.py [--seconds-cap S] [--window W] [--rounds R] [--v3] [--quick]

The agent (L{roller.testing.snmpd.SnmpAgent}, PDU emulation off) serves
an Integer32 that SETs change in its memory (C{override -rw}, C speed);
snmpd's own CPU per SET is printed too.  Each client runs as its own
process (this file with C{--client}) and keeps at most W SETs in flight:

  - roller: L{roller.drivers.snmp.client.SnmpClient} on the Twisted reactor;
  - pysnmp-asyncio: pysnmp's high-level API, C{pysnmp.hlapi.v3arch.asyncio.set_cmd}
    (one SnmpEngine, one target, an asyncio.Semaphore(W)); it resolves
    the OID through the MIB machinery on every request;
  - pysnmp-lowlevel: pysnmp's own low-level API on asyncio, the honest
    baseline: one SnmpEngine configured once (C{config.add_target_address}),
    C{cmdgen.SetCommandGenerator().send_varbinds} with a parsed OID, W in
    flight;
  - snmpset: one C{snmpset} process per SET, W at a time.

Printed per client: SETs/s, client CPU ms per SET (user+sys of the client
process and, for snmpset, of its children) and the agent's CPU per SET;
then the ratios roller/snmpset, roller/pysnmp-asyncio and
roller/pysnmp-lowlevel (targets: >= 5x, >= 1x and >= 1x).  Rounds are interleaved; the best round of each is kept.
Every SET must succeed, and the last value must read back.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---------------------------------------------------------------- clients


def _credential(args: argparse.Namespace) -> Any:
    from roller.testing.snmpd import agent_credentials

    creds = agent_credentials()
    return creds["roller-priv" if args.v3 else "v2c"]


def client_roller(args: argparse.Namespace) -> dict:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults

    from roller.drivers.snmp.client import SnmpClient, SnmpTarget
    from roller.testing.snmpd import BENCH_OID

    out: dict = {}

    async def run() -> None:
        client = SnmpClient(reactor, timeout=5.0, retries=1)
        target = SnmpTarget("127.0.0.1", _credential(args), port=args.port)
        await client.set(target, [(BENCH_OID, 0)])  # warm-up: transport, v3 discovery
        sem = DeferredSemaphore(args.window)
        started, cpu = time.perf_counter(), _cpu_self()
        await gatherResults([sem.run(client.set, target, [(BENCH_OID, i)]) for i in range(args.count)])
        out.update(seconds=time.perf_counter() - started, cpu=_cpu_self() - cpu)
        last = await client.get(target, [BENCH_OID])
        out["last"] = last[0].value
        client.close()

    def go() -> None:
        d = Deferred.fromCoroutine(run())
        d.addErrback(lambda f: out.update(error=f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    return out


def client_asyncio(args: argparse.Namespace) -> dict:
    import asyncio

    from pysnmp.hlapi.v3arch.asyncio import (
        CommunityData,
        ContextData,
        ObjectIdentity,
        ObjectType,
        SnmpEngine,
        UdpTransportTarget,
        UsmUserData,
        get_cmd,
        set_cmd,
        usmAesCfb128Protocol,
        usmHMACSHAAuthProtocol,
    )
    from pysnmp.proto.rfc1902 import Integer32

    from roller.testing.snmpd import BENCH_OID

    cred = _credential(args)
    if args.v3:
        auth = UsmUserData(cred.user, cred.auth_key, cred.priv_key, authProtocol=usmHMACSHAAuthProtocol,
                           privProtocol=usmAesCfb128Protocol)
    else:
        auth = CommunityData(cred.community)

    async def main() -> dict:
        engine = SnmpEngine()
        target = await UdpTransportTarget.create(("127.0.0.1", args.port), timeout=5, retries=1)
        ctx = ContextData()

        async def one(i: int, sem: asyncio.Semaphore) -> None:
            async with sem:
                err, status, index, vbs = await set_cmd(engine, auth, target, ctx,
                                                        ObjectType(ObjectIdentity(BENCH_OID), Integer32(i)))
                if err or status:
                    raise RuntimeError(f"SET {i}: {err or status.prettyPrint()}")

        await one(0, asyncio.Semaphore(1))
        sem = asyncio.Semaphore(args.window)
        started, cpu = time.perf_counter(), _cpu_self()
        await asyncio.gather(*(one(i, sem) for i in range(args.count)))
        seconds, used = time.perf_counter() - started, _cpu_self() - cpu
        err, status, index, vbs = await get_cmd(engine, auth, target, ctx, ObjectType(ObjectIdentity(BENCH_OID)))
        engine.close_dispatcher()
        return {"seconds": seconds, "cpu": used, "last": int(vbs[0][1])}

    return asyncio.run(main())


def client_lowlevel(args: argparse.Namespace) -> dict:
    import asyncio

    from pysnmp.carrier.asyncio.dgram import udp
    from pysnmp.entity import config, engine
    from pysnmp.entity.rfc3413 import cmdgen
    from pysnmp.proto.rfc1902 import Integer32, ObjectName

    from roller.testing.snmpd import BENCH_OID

    cred = _credential(args)

    async def main() -> dict:
        eng = engine.SnmpEngine()
        if args.v3:
            config.add_v3_user(eng, cred.user, config.USM_AUTH_HMAC96_SHA, cred.auth_key,
                               config.USM_PRIV_CFB128_AES, cred.priv_key)
            config.add_target_parameters(eng, "creds", cred.user, "authPriv", 3)
        else:
            config.add_v1_system(eng, "area", cred.community)
            config.add_target_parameters(eng, "creds", "area", "noAuthNoPriv", 1)
        config.add_transport(eng, udp.DOMAIN_NAME, udp.UdpAsyncioTransport().open_client_mode())
        config.add_target_address(eng, "target", udp.DOMAIN_NAME, ("127.0.0.1", args.port), "creds",
                                  timeout=500, retryCount=1)
        loop = asyncio.get_running_loop()
        oid = ObjectName(BENCH_OID)
        setter, getter = cmdgen.SetCommandGenerator(), cmdgen.GetCommandGenerator()

        def send(generator: Any, varbinds: list) -> asyncio.Future:
            done: asyncio.Future = loop.create_future()

            def answered(snmp_engine: Any, handle: Any, indication: Any, status: Any, index: Any, vbs: Any,
                         ctx: Any) -> None:
                if done.done():
                    return
                if indication or status:
                    done.set_exception(RuntimeError(f"{indication or status.prettyPrint()}"))
                else:
                    done.set_result(vbs)

            generator.send_varbinds(eng, "target", None, "", varbinds, answered)
            return done

        async def one(i: int, sem: asyncio.Semaphore) -> None:
            async with sem:
                await send(setter, [(oid, Integer32(i))])

        await one(0, asyncio.Semaphore(1))  # warm-up: v3 discovery
        sem = asyncio.Semaphore(args.window)
        started, cpu = time.perf_counter(), _cpu_self()
        await asyncio.gather(*(one(i, sem) for i in range(args.count)))
        seconds, used = time.perf_counter() - started, _cpu_self() - cpu
        vbs = await send(getter, [(oid, None)])
        eng.close_dispatcher()
        return {"seconds": seconds, "cpu": used, "last": int(vbs[0][1])}

    return asyncio.run(main())


def client_snmpset(args: argparse.Namespace) -> dict:
    from roller.testing.snmpd import BENCH_OID

    cred = _credential(args)
    if args.v3:
        auth = ["-v3", "-l", "authPriv", "-u", cred.user, "-a", "SHA", "-A", cred.auth_key, "-x", "AES",
                "-X", cred.priv_key]
    else:
        auth = ["-v2c", "-c", cred.community]
    base = ["snmpset", *auth, "-t", "5", "-r", "1", "-On", "-Oq", "-M", "/dev/null",
            f"127.0.0.1:{args.port}", BENCH_OID, "i"]
    env = {"PATH": "/usr/bin:/bin", "MIBS": ""}
    running: dict[int, subprocess.Popen] = {}
    started, cpu, cpu_children = time.perf_counter(), _cpu_self(), _cpu_children()
    i = 0
    failures = 0
    while i < args.count or running:
        while i < args.count and len(running) < args.window:
            p = subprocess.Popen([*base, str(i)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 stdin=subprocess.DEVNULL, env=env)
            running[p.pid] = p
            i += 1
        pid, status = os.wait()
        p = running.pop(pid, None)
        if p is not None:
            p.returncode = os.waitstatus_to_exitcode(status)
            failures += p.returncode != 0
    seconds = time.perf_counter() - started
    used = (_cpu_self() - cpu) + (_cpu_children() - cpu_children)
    if failures:
        return {"error": f"{failures} snmpset runs failed"}
    return {"seconds": seconds, "cpu": used, "last": args.count - 1}


CLIENTS = {"roller": client_roller, "pysnmp-asyncio": client_asyncio, "pysnmp-lowlevel": client_lowlevel,
           "snmpset": client_snmpset}


# ---------------------------------------------------------------- driver


def run_client(name: str, port: int, count: int, window: int, v3: bool, agent_pid: int) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--client", name, "--port", str(port),
            "--count", str(count), "--window", str(window)] + (["--v3"] if v3 else [])
    agent_cpu = _proc_cpu(agent_pid)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    agent_used = _proc_cpu(agent_pid) - agent_cpu
    if r.returncode != 0:
        raise SystemExit(f"{name} client failed:\n{r.stdout}\n{r.stderr}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if "error" in result:
        raise SystemExit(f"{name} client failed: {result['error']}")
    if result["last"] != count - 1:
        raise SystemExit(f"{name}: last value read back {result['last']}, expected {count - 1}")
    result["rate"] = count / result["seconds"]
    result["cpu_ms"] = result["cpu"] / count * 1000
    result["agent_ms"] = agent_used / count * 1000  # includes the warm-up SET and final GET
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", choices=sorted(CLIENTS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=16, help="SETs in flight per client (16)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, best kept (3)")
    parser.add_argument("--sets", type=int, default=4000, help="SETs per round for the pysnmp clients (4000)")
    parser.add_argument("--snmpset-sets", type=int, default=400, help="SETs per round for snmpset (400)")
    parser.add_argument("--v3", action="store_true", help="SNMPv3 authPriv (SHA/AES) instead of v2c")
    parser.add_argument("--quick", action="store_true", help="1 round, 1000/100 SETs")
    args = parser.parse_args()

    if args.client:
        print(json.dumps(CLIENTS[args.client](args)))
        return

    from roller.testing.snmpd import SnmpAgent, skip_reason

    reason = skip_reason()
    if reason:
        raise SystemExit(reason)
    if args.quick:
        args.rounds, args.sets, args.snmpset_sets = 1, 1000, 100
    best: dict[str, dict] = {}
    mode = "SNMPv3 authPriv SHA/AES" if args.v3 else "SNMPv2c"
    print(f"SNMP SET benchmark: {mode}, window {args.window}, {args.rounds} round(s), "
          f"{args.sets} SETs (snmpset: {args.snmpset_sets}) per round, {os.cpu_count()} cores")
    with SnmpAgent(pdus=False) as agent:
        for round_no in range(1, args.rounds + 1):
            for name in CLIENTS:
                count = args.snmpset_sets if name == "snmpset" else args.sets
                r = run_client(name, agent.port, count, args.window, args.v3, agent.pid)
                print(f"  round {round_no} {name:15s} {r['rate']:8.0f} SETs/s   client CPU "
                      f"{r['cpu_ms']:6.3f} ms/SET   snmpd CPU {r['agent_ms']:6.3f} ms/SET", flush=True)
                if name not in best or r["rate"] > best[name]["rate"]:
                    best[name] = r
    print()
    print(f"{'client':15s} {'SETs/s':>8s} {'client CPU ms/SET':>18s}")
    for name in CLIENTS:
        r = best[name]
        print(f"{name:15s} {r['rate']:8.0f} {r['cpu_ms']:18.3f}")
    roller, asyncio_, snmpset = best["roller"], best["pysnmp-asyncio"], best["snmpset"]
    low = best["pysnmp-lowlevel"]
    print()
    print(f"throughput  roller/snmpset {roller['rate'] / snmpset['rate']:5.1f}x (target >= 5x)   "
          f"roller/pysnmp-asyncio {roller['rate'] / asyncio_['rate']:4.2f}x (target >= 1x)   "
          f"roller/pysnmp-lowlevel {roller['rate'] / low['rate']:4.2f}x (target >= 1x)")
    print(f"CPU per SET snmpset/roller {snmpset['cpu_ms'] / roller['cpu_ms']:5.1f}x   "
          f"pysnmp-asyncio/roller {asyncio_['cpu_ms'] / roller['cpu_ms']:4.2f}x   "
          f"pysnmp-lowlevel/roller {low['cpu_ms'] / roller['cpu_ms']:4.2f}x")


if __name__ == "__main__":
    main()
