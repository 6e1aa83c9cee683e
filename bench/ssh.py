"""
Remote commands per second against a real OpenSSH sshd: roller's Conch
client (L{roller.drivers.ssh.ConchShell}) side by side with the OpenSSH
client driven by C{xargs -P}.  Manual; not part of CI.  See bench/README.md.

    python bench/ssh.py [--commands N] [--window W] [--rounds R] [--quick] [--keep]

One sshd (L{roller.testing.sshd.SshServer}: 127.0.0.1, a free port,
C{MaxStartups 1000:30:1000}, ForceCommand running the command with
C{/bin/sh -c}; run as root it logs in as the system user it creates) and
one ed25519 user key serve three clients, one after the other, R
interleaved rounds, the best kept:

  - conch: this file run as its own process (C{--conch}) on its own
    reactor: N C{ConchShell.run(target, "true")} calls, W in flight, each a
    new SSH connection (key exchange, public-key auth, exec), host key
    checked against a known_hosts file in OpenSSH's format;
  - openssh: C{seq N | xargs -P W -I{} ssh -i KEY -o
    UserKnownHostsFile=... -o StrictHostKeyChecking=yes -p PORT
    USER@127.0.0.1 true}, OpenSSH's defaults (9.2: the sntrup761x25519
    key exchange, about 90 ms of client CPU per connection);
  - openssh-c25519: the same with C{-o KexAlgorithms=curve25519-sha256},
    the key exchange Conch negotiates: like for like.

A round counts only if all N commands exited 0 and sshd's ForceCommand
logged exactly N commands.  Printed: commands/s, client CPU per command
(measured inside the Conch process; xargs and its ssh children from
RUSAGE_CHILDREN), sshd CPU per command (the listener plus the
per-connection children it reaped), the CPU other processes used, and the
ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from common import REPO, child_mode, machine_busy, report, tree_cpu

sys.path.insert(0, REPO)


# -- the Conch client (its own process)


def conch_client(spec: dict[str, Any]) -> dict[str, Any]:
    from twisted.internet import defer

    from roller.drivers.ssh import ConchShell, SshTarget

    async def go(reactor: Any) -> dict[str, Any]:
        shell = ConchShell(reactor, spec["known_hosts"], connect_timeout=60, command_timeout=60)
        target = SshTarget(host=spec["host"], port=spec["port"], user=spec["user"], key_path=spec["key"])
        shell.load_key(target)  # parse the key before the clock starts
        n, window = spec["commands"], spec["window"]
        statuses: dict[str, int] = {}
        errors: list[str] = []
        issued = 0
        done = defer.Deferred()
        t0, cpu0 = time.monotonic(), time.process_time()

        def one() -> None:
            nonlocal issued
            issued += 1
            d = shell.run(target, spec["command"])
            d.addCallbacks(lambda r: finished(str(r.exit_status)), failed)

        def failed(f: Any) -> None:
            if len(errors) < 5:
                errors.append(f"{f.type.__name__}: {f.getErrorMessage()}"[:300])
            finished(f.type.__name__)

        def finished(key: str) -> None:
            statuses[key] = statuses.get(key, 0) + 1
            if issued < n:
                one()
            elif sum(statuses.values()) == n and not done.called:
                done.callback(None)

        for _ in range(min(window, n)):
            one()
        await done
        return {"seconds": time.monotonic() - t0, "cpu": time.process_time() - cpu0, "statuses": statuses,
                "errors": errors}

    from twisted.internet import reactor

    out: dict[str, Any] = {}

    def start() -> None:
        d = defer.ensureDeferred(go(reactor))
        d.addCallbacks(out.update, lambda f: out.update(failure=f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if "failure" in out:
        raise SystemExit(out["failure"])
    return out


# -- one round of each


def run_conch(server: Any, key: str, known_hosts: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = {"host": server.host, "port": server.port, "user": server.user, "key": key,
            "known_hosts": known_hosts, "commands": args.commands, "window": args.window,
            "command": args.command}
    env = dict(os.environ, PYTHONPATH=REPO)
    busy0, t0 = machine_busy(), time.monotonic()
    sshd0 = tree_cpu(server.pid)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--conch", json.dumps(spec)],
                            stdout=subprocess.PIPE, env=env)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"conch client exited with {proc.returncode}")
    r = json.loads(out)
    r["sshd_cpu"] = tree_cpu(server.pid) - sshd0
    r["client_cpu"] = r["cpu"]  # measured in the client around the commands (no interpreter start-up)
    r["busy"] = (machine_busy() - busy0) * r["seconds"] / (time.monotonic() - t0)  # roughly: minus start-up
    r["ok"] = r["statuses"].get("0", 0)
    return r


def run_openssh(server: Any, key: str, known_hosts: str, args: argparse.Namespace,
                kex: str | None = None) -> dict[str, Any]:
    ssh = ["ssh", "-F", "/dev/null", "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
           "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
           "-o", "LogLevel=ERROR", "-p", str(server.port)]
    if kex:
        ssh += ["-o", f"KexAlgorithms={kex}"]
    ssh += [f"{server.user}@{server.host}", args.command]
    # xargs exits 123 if any ssh failed; sshd's command log counts what ran.
    busy0 = machine_busy()
    sshd0 = tree_cpu(server.pid)
    t0 = time.monotonic()
    proc = subprocess.Popen(["xargs", "-P", str(args.window), "-I{}", *ssh], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate("".join(f"{i}\n" for i in range(1, args.commands + 1)).encode())
    seconds = time.monotonic() - t0
    # communicate() reaped it; its and its children's CPU is in our RUSAGE_CHILDREN
    return {"seconds": seconds, "xargs_status": proc.returncode, "stderr": err.decode(errors="replace")[-600:],
            "sshd_cpu": tree_cpu(server.pid) - sshd0, "busy": machine_busy() - busy0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", "-n", type=int, default=1000, help="commands per client and round (1000)")
    parser.add_argument("--window", "-w", type=int, default=32, help="commands in flight (32)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds, best kept (2, quick 1)")
    parser.add_argument("--command", default="true", help="the remote command (true)")
    parser.add_argument("--quick", action="store_true", help="smoke run, a few seconds: 100 commands, 1 round")
    parser.add_argument("--keep", action="store_true", help="keep sshd's directory (config, log)")
    parser.add_argument("--conch", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if child_mode(args.conch, conch_client):
        return
    if args.quick:
        args.commands = min(args.commands, 100)
    args.rounds = args.rounds or (1 if args.quick else 2)

    from roller.testing.sshd import SshServer, generate_key, skip_reason

    why = skip_reason()
    if why:
        raise SystemExit(f"cannot run: {why}")
    workdir = tempfile.mkdtemp(prefix="roller-ssh-bench-")
    os.chmod(workdir, 0o755)  # sshd's login user reads authorized_keys below it
    server = SshServer(workdir=os.path.join(workdir, "sshd"))
    clients = {
        "conch": lambda: run_conch(server, key, known_hosts, args),
        "openssh": lambda: run_openssh(server, key, known_hosts, args),
        "openssh-c25519": lambda: run_openssh(server, key, known_hosts, args, kex="curve25519-sha256"),
    }
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in clients}
    problems: list[str] = []
    try:
        key = os.path.join(workdir, "client_ed25519")
        server.authorize(generate_key(key, comment="roller-bench"))
        known_hosts = os.path.join(workdir, "known_hosts")
        with open(known_hosts, "w") as f:
            f.write(server.known_hosts_line() + "\n")
        server.behave("execute")  # ForceCommand: exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
        server.start()
        print(f"roller ssh bench: {os.cpu_count()} CPUs, sshd {server.host}:{server.port} as {server.user!r}, "
              f"{args.commands} x {args.command!r}, {args.window} in flight, {args.rounds} round(s); "
              f"work dir {workdir}", flush=True)
        for n in range(args.rounds):
            order = list(clients) if n % 2 == 0 else list(reversed(clients))
            for which in order:
                server.reset()
                server.behave("execute")
                children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                r = clients[which]()
                if which != "conch":
                    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    r["client_cpu"] = (children1.ru_utime - children0.ru_utime
                                       + children1.ru_stime - children0.ru_stime)
                logged = len(server.commands())
                r["logged"] = logged
                r["rate"] = args.commands / r["seconds"]
                ok = (r.get("ok") == args.commands) if which == "conch" else (r["xargs_status"] == 0)
                if not ok or logged != args.commands:
                    detail = r.get("errors") or r.get("stderr") or r.get("statuses")
                    problems.append(f"{which} round {n + 1}: {logged}/{args.commands} commands reached sshd; "
                                    f"{r.get('statuses', r.get('xargs_status'))}: {detail}")
                r["valid"] = ok and logged == args.commands
                # CPU the rest of the machine used meanwhile (other people's work)
                r["others"] = max(0.0, r["busy"] - r["client_cpu"] - r["sshd_cpu"]) / r["seconds"]
                per = 1000 / args.commands
                print(f"  {which:<14} {r['rate']:6.0f} commands/s ({r['seconds']:.1f} s)  CPU per command: "
                      f"client {per * r['client_cpu']:5.1f} ms  sshd {per * r['sshd_cpu']:5.1f} ms  cores: ours "
                      f"{(r['client_cpu'] + r['sshd_cpu']) / r['seconds']:.2f}  others {r['others']:.2f}", flush=True)
                results[which].append(r)
    finally:
        server.stop()
        if not args.keep:
            server.close()
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    best = {}
    for which in clients:
        valid = [r for r in results[which] if r["valid"]] or results[which]
        best[which] = max(valid, key=lambda r: r["rate"])
    c = best["conch"]
    rounds = "" if args.rounds == 1 else f", best of {args.rounds}"
    print(f"ssh: {args.commands} x {args.command!r}, {args.window} in flight{rounds}   commands/s   ratio   "
          "CPU/command: client   sshd")
    labels = {"conch": "roller ConchShell (curve25519)",
              "openssh": "OpenSSH ssh, xargs (sntrup761)",
              "openssh-c25519": "OpenSSH ssh, xargs (curve25519)"}
    for which, r in best.items():
        ratio = "" if which == "conch" else f"{c['rate'] / r['rate']:5.2f}x"
        per = 1000 / args.commands
        print(f"  {labels[which]:<47} {r['rate']:7.0f}   {ratio:>6}   {per * r['client_cpu']:13.1f} ms "
              f"{per * r['sshd_cpu']:5.1f} ms")
    print("  (ratio: Conch commands/s over that client's; target >= 1x.  OpenSSH 9.2 defaults to the "
          "sntrup761x25519 key exchange, Conch offers curve25519-sha256 at best)")
    others = max(r["others"] for rs in results.values() for r in rs)
    if others > 0.25:
        print(f"NOTE: other processes used up to {others:.2f} of {os.cpu_count()} CPUs during the rounds: "
              "the figures are noisy (more --rounds, or a quiet machine)")
    report(problems)


if __name__ == "__main__":
    main()
