"""
Tests for the fleet simulator (L{roller.sim.fleet}).

PowerState and the pure helpers run on L{task.Clock}; the machines run on
the real reactor through C{pytest_twisted}, on 127.0.1.x / 127.0.2.x and a
random free port, and are driven by Conch's own SSH client
(L{SSHCommandClientEndpoint}) and, when installed, by OpenSSH's C{ssh}.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.endpoints import SSHCommandClientEndpoint
from twisted.conch.ssh.keys import Key
from twisted.conch.ssh.transport import SSHClientTransport
from twisted.internet import defer, error, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.filepath import FilePath

from roller.inventory import Machine
from roller.secrets import load_secrets
from roller.sim.daemon import free_port_on
from roller.sim.fleet import Fleet, PowerState, SimulatedMachine, fleet_addresses, generate_key
from roller.testing.process import read_until
from roller.testing.results import eventually


def reactor():
    from twisted.internet import reactor as r

    return r


# ---------------------------------------------------------------- PowerState (task.Clock)


def test_power_reboot_goes_down_then_up():
    clock = task.Clock()
    power = PowerState(clock, name="m1")
    seen: list[bool] = []
    power.add_listener(seen.append)
    clock.advance(10)
    power.reboot(5)
    assert not power.on and seen == [False]
    clock.advance(4.9)
    assert not power.on
    clock.advance(0.1)
    assert power.on and seen == [False, True]
    assert power.history == [(10, "reboot"), (10, "down"), (15, "up")]
    assert power.transitions() == [(10, "down"), (15, "up")]
    assert power.pending is None


def test_power_off_on_and_cycle():
    clock = task.Clock()
    power = PowerState(clock, default_down_for=3)
    seen: list[bool] = []
    power.add_listener(seen.append)
    power.power_on()  # already on: no transition, no notification
    assert seen == [] and power.events() == ["power_on"]
    power.power_off()
    power.power_off()
    assert seen == [False]
    power.power_on()
    assert seen == [False, True]
    power.cycle()  # default_down_for
    clock.advance(3)
    assert seen == [False, True, False, True]
    assert power.events() == ["power_on", "power_off", "down", "power_off", "power_on", "up",
                              "cycle", "down", "up"]


def test_power_off_cancels_scheduled_power_on():
    clock = task.Clock()
    power = PowerState(clock)
    power.reboot(5)
    clock.advance(1)
    power.power_off()
    assert power.pending is None
    clock.advance(100)
    assert not power.on
    assert clock.getDelayedCalls() == []


def test_power_on_during_reboot_comes_up_at_once():
    clock = task.Clock()
    power = PowerState(clock)
    power.reboot(5)
    power.power_on()
    assert power.on and clock.getDelayedCalls() == []


def test_power_reboot_while_off_turns_on_later_and_stop_cancels():
    clock = task.Clock()
    power = PowerState(clock, on=False)
    power.reboot(2)
    clock.advance(2)
    assert power.on
    power.reboot(2)
    power.stop()
    assert clock.getDelayedCalls() == [] and not power.on


def test_power_listener_failure_does_not_stop_others():
    clock = task.Clock()
    power = PowerState(clock)
    seen: list[bool] = []

    def broken(on: bool) -> None:
        raise RuntimeError("boom")

    power.add_listener(broken)
    power.add_listener(seen.append)
    with capturedLogs() as events:
        power.power_off()
    assert seen == [False]
    assert [e["log_failure"].value.args for e in events if "log_failure" in e] == [("boom",)]
    power.remove_listener(seen.append)
    power.power_on()
    assert seen == [False]


def test_power_rejects_negative_down_for():
    with pytest.raises(ValueError):
        PowerState(task.Clock()).reboot(-1)


# ---------------------------------------------------------------- pure helpers


def test_fleet_addresses_skip_0_and_255_and_spill():
    addrs = fleet_addresses("127.0.1.", 300)
    assert addrs[0] == "127.0.1.1" and addrs[253] == "127.0.1.254" and addrs[254] == "127.0.2.1"
    assert len(set(addrs)) == 300
    assert not any(a.endswith((".0", ".255")) for a in addrs)
    assert fleet_addresses("127.0.5", 2) == ["127.0.5.1", "127.0.5.2"]
    with pytest.raises(ValueError):
        fleet_addresses("10.0.0.", 1)
    with pytest.raises(ValueError):
        fleet_addresses("127.0.255.", 255)


def test_key_generation_gives_distinct_keys():
    # How fast (the reason a fleet can have a host key per machine): bench/fleet.py.
    keys = [generate_key() for _ in range(1000)]
    assert len({k.public().blob() for k in keys}) == 1000


def test_inventory_json_is_valid_roller_machines():
    fleet = Fleet(MemoryReactorClock(), 3, ssh_port=2200, overrides={2: {"behaviour": "hang"}})
    data = fleet.inventory_json()
    machines = [Machine.from_json(d) for d in data]
    assert [m.worker_id for m in machines] == ["sim-001", "sim-002", "sim-003"]
    assert [m.ip for m in machines] == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    m = machines[0]
    assert m.worker_group == "sim"
    assert (m.ssh.user, m.ssh.port, m.ssh.credential) == ("roller", 2200, "fleet-ssh")
    assert (m.liveness.method, m.liveness.port) == ("tcp", 2200)
    assert "hang" in machines[2].tags
    assert Fleet(MemoryReactorClock(), 1000).inventory_json("big")[-1]["worker_id"] == "sim-1000"
    assert json.loads(json.dumps(data)) == data


def test_write_client_files(tmp_path):
    fleet = Fleet(MemoryReactorClock(), 2, ssh_port=2200)
    files = fleet.write_client_files(tmp_path / "client")
    assert stat.S_IMODE(os.stat(files.private_key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(files.secrets).st_mode) == 0o600
    assert Key.fromFile(files.private_key) == fleet.user_key
    cred = load_secrets(files.secrets).get("fleet-ssh")
    assert (cred.kind, cred.path) == ("ssh-key", files.private_key)
    lines = open(files.known_hosts).read().splitlines()
    assert lines == fleet.known_hosts_lines()
    assert lines[0].startswith("127.0.1.1 ssh-ed25519 AAAA")
    assert open(files.known_hosts_openssh).read().startswith("[127.0.1.1]:2200 ssh-ed25519 AAAA")
    known = KnownHostsFile.fromPath(FilePath(files.known_hosts))
    for m in fleet.machines:
        assert known.hasHostKey(m.address.encode(), m.host_key.public())
    # Each machine has its own host key unless asked to share one.
    assert fleet[0].host_key != fleet[1].host_key
    shared = Fleet(MemoryReactorClock(), 2, shared_host_key=True)
    assert shared[0].host_key == shared[1].host_key


def test_machine_follows_power_on_memory_reactor():
    reactor = MemoryReactorClock()
    power = PowerState(reactor)
    m = SimulatedMachine(reactor, "127.0.1.9", 2200, generate_key(), [], power, behaviour="hang")
    m.start()
    assert m.listening
    assert [(p, i) for p, _, _, i in reactor.tcpServers] == [(2200, "127.0.1.9")]
    power.reboot(5)
    assert not m.listening
    reactor.advance(5)
    assert m.listening and len(reactor.tcpServers) == 2
    m.stop()
    power.reboot(1)
    reactor.advance(1)
    assert not m.listening and len(reactor.tcpServers) == 2


def test_bad_arguments_are_refused():
    power = PowerState(task.Clock())
    with pytest.raises(ValueError):
        SimulatedMachine(MemoryReactorClock(), "127.0.1.1", 22, generate_key(), [], power, behaviour="odd")
    with pytest.raises(ValueError):
        SimulatedMachine(MemoryReactorClock(), "127.0.1.1", 22, generate_key(), [], power, reboot_style="x")
    with pytest.raises(ValueError):
        Fleet(MemoryReactorClock(), 2, overrides={5: {"behaviour": "hang"}})


# ---------------------------------------------------------------- real reactor helpers


class _RefuseUI:
    """Never accept an unknown host key (the known_hosts file must match)."""

    def prompt(self, text: Any) -> defer.Deferred:
        return defer.succeed(False)

    def warn(self, text: Any) -> None:
        pass


class _Collect(Protocol):
    """
    stdout and the exit status of one command: 0, the status, or
    C{"dropped"} when the TCP connection went away before the channel closed.

    Conch's command endpoint never tells the protocol when the TCP
    connection is lost mid-command (twisted/twisted#7901:
    C{_CommandTransport.connectionLost} does not upcall, so the channel is
    never closed); upcall here, and remember that the loss came first.
    """

    def __init__(self) -> None:
        self.out = b""
        self.dropped = False
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        ssh = self.transport.conn.transport
        endpoint_lost = ssh.connectionLost

        def lost(reason: Any = None) -> None:
            self.dropped = True
            endpoint_lost(reason)
            SSHClientTransport.connectionLost(ssh, reason)

        ssh.connectionLost = lost

    def dataReceived(self, data: bytes) -> None:
        self.out += data

    def connectionLost(self, reason: Any) -> None:
        if self.dropped:
            status = "dropped"
        elif reason.check(error.ProcessTerminated):
            status = reason.value.exitCode
        elif reason.check(error.ConnectionDone):
            status = 0
        else:
            status = reason
        self.done.callback((status, self.out.decode()))


def endpoint(fleet: Fleet, machine: SimulatedMachine, command: str, known_hosts: str) -> SSHCommandClientEndpoint:
    return SSHCommandClientEndpoint.newConnection(
        reactor(), command.encode(), b"roller", machine.address.encode(), port=machine.ssh_port,
        keys=[fleet.user_key], knownHosts=KnownHostsFile.fromPath(FilePath(known_hosts)), ui=_RefuseUI(),
    )


async def run(fleet: Fleet, machine: SimulatedMachine, command: str, known_hosts: str,
              timeout: float = 5.0) -> tuple[Any, str]:
    """Run C{command} over SSH: (exit status, stdout)."""
    proto = await endpoint(fleet, machine, command, known_hosts).connect(
        Factory.forProtocol(_Collect)).addTimeout(timeout, reactor())
    return await proto.done.addTimeout(timeout, reactor())


async def tcp_alive(machine: SimulatedMachine) -> bool:
    try:
        p = await TCP4ClientEndpoint(reactor(), machine.address, machine.ssh_port, timeout=1).connect(
            Factory.forProtocol(Protocol))
    except error.ConnectError:
        return False
    p.transport.loseConnection()
    return True


async def wait_for(predicate: Callable[[], Any], what: str = "the condition") -> Any:
    """L{eventually} on this module's reactor."""
    return await eventually(predicate, what, reactor=reactor())


@pytest.fixture
def client_dir(tmp_path):
    return tmp_path / "client"


@pytest_twisted.async_yield_fixture
async def fleet(client_dir):
    """Three normal machines (reboot_delay 0.2 s, down 0.5 s) plus hang, refuse-reboot, never-down, drop."""
    addrs = fleet_addresses("127.0.1.", 7)
    f = Fleet(reactor(), 7, ssh_port=free_port_on(addrs), reboot_delay=0.2, down_for=0.5, overrides={
        3: {"behaviour": "hang"},
        4: {"behaviour": "refuse-reboot"},
        5: {"behaviour": "never-down"},
        6: {"reboot_style": "drop"},
    })
    await f.start()
    f.files = f.write_client_files(client_dir)
    try:
        yield f
    finally:
        await f.stop()


# ---------------------------------------------------------------- real reactor tests


@pytest_twisted.ensureDeferred
async def test_echo_on_every_machine(fleet):
    results = await defer.gatherResults([
        defer.ensureDeferred(run(fleet, m, f"echo hi {m.name}", fleet.files.known_hosts)) for m in fleet[:3]
    ])
    assert results == [(0, f"hi {m.name}\n") for m in fleet[:3]]
    assert all(m.listening for m in fleet)


@pytest_twisted.ensureDeferred
async def test_simple_commands(fleet):
    m, kh = fleet[0], fleet.files.known_hosts
    assert await run(fleet, m, "true", kh) == (0, "")
    assert await run(fleet, m, "false", kh) == (1, "")
    assert await run(fleet, m, "exit 3", kh) == (3, "")
    assert await run(fleet, m, "frobnicate --all", kh) == (127, "")
    assert await run(fleet, m, "hostname", kh) == (0, "sim-001\n")
    assert await run(fleet, m, "sleep 0.05", kh) == (0, "")
    status, out = await run(fleet, m, "uptime", kh)
    assert status == 0 and " up 0 min,  1 user,  load average: " in out
    status, out = await run(fleet, m, "cat /proc/uptime", kh)
    assert status == 0 and float(out.split()[0]) >= 0
    assert [(c, s) for _, c, s in m.commands][:4] == [("true", 0), ("false", 1), ("exit 3", 3),
                                                      ("frobnicate --all", 127)]
    assert m.power.history == []


@pytest_twisted.ensureDeferred
async def test_wrong_host_key_is_refused(fleet, tmp_path):
    # known_hosts of machine 1 given for machine 0's address: Conch refuses.
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"{fleet[0].address} {fleet[1].host_key.public().toString('openssh').decode()}\n")
    with pytest.raises(Exception) as e:
        await run(fleet, fleet[0], "true", str(wrong))
    assert "HostKeyChanged" in repr(e.value) or "changed" in str(e.value).lower()


@pytest_twisted.ensureDeferred
async def test_wrong_user_key_is_refused(fleet):
    m = fleet[0]
    ep = SSHCommandClientEndpoint.newConnection(
        reactor(), b"true", b"roller", m.address.encode(), port=m.ssh_port, keys=[generate_key()],
        knownHosts=KnownHostsFile.fromPath(FilePath(fleet.files.known_hosts)), ui=_RefuseUI())
    with pytest.raises(Exception):
        await ep.connect(Factory.forProtocol(_Collect)).addTimeout(5, reactor())
    assert m.commands == []


@pytest_twisted.ensureDeferred
async def test_reboot_goes_down_and_comes_back(fleet):
    m = fleet[1]
    assert await run(fleet, m, "reboot", fleet.files.known_hosts) == (0, "")
    asked, command, status = m.commands[-1]  # reactor time the command ran
    assert (command, status) == ("reboot", 0)
    await wait_for(lambda: defer.ensureDeferred(tcp_alive(m)).addCallback(lambda alive: not alive), "down")
    assert not m.listening and not m.power.on
    await wait_for(lambda: tcp_alive(m), "back up")
    assert await run(fleet, m, "echo back", fleet.files.known_hosts) == (0, "back\n")
    assert m.power.events() == ["reboot", "down", "up"]
    (t_down, _), (t_up, _) = m.power.transitions()
    # In reactor time: down no sooner than reboot_delay after the command, up no sooner than
    # down_for after going down (the exact schedule: the task.Clock tests above).
    assert t_down >= asked + m.reboot_delay
    assert t_up >= t_down + m.down_for
    status, out = await run(fleet, m, "cat /proc/uptime", fleet.files.known_hosts)
    assert float(out.split()[0]) <= reactor().seconds() - t_up + 0.005  # uptime restarted at the power-on


@pytest_twisted.ensureDeferred
async def test_all_reboot_commands_are_accepted(fleet):
    ms = fleet[:3]
    commands = ["sudo reboot", "shutdown -f -t 3 -r", "shutdown -r now"]
    results = await defer.gatherResults([
        defer.ensureDeferred(run(fleet, m, c, fleet.files.known_hosts)) for m, c in zip(ms, commands)
    ])
    assert results == [(0, "")] * 3
    for m in ms:
        await wait_for(lambda m=m: m.power.events()[-3:] == ["reboot", "down", "up"] and m.listening)


@pytest_twisted.ensureDeferred
async def test_drop_style_reboot_closes_connection_without_status(fleet):
    m = fleet[6]
    assert await run(fleet, m, "reboot", fleet.files.known_hosts) == ("dropped", "")
    assert m.commands[-1][1:] == ("reboot", None)
    await wait_for(lambda: m.power.events() == ["reboot", "down", "up"] and m.listening)
    assert await run(fleet, m, "true", fleet.files.known_hosts) == (0, "")


@pytest_twisted.ensureDeferred
async def test_power_off_drops_connections_and_closes_port(fleet):
    m = fleet[2]
    proto = await endpoint(fleet, m, "sleep 30", fleet.files.known_hosts).connect(Factory.forProtocol(_Collect))
    await wait_for(lambda: m.commands)
    m.power.power_off()
    assert await proto.done.addTimeout(5, reactor()) == ("dropped", "")
    assert not await tcp_alive(m)
    m.power.power_on()
    await wait_for(lambda: tcp_alive(m))
    assert await run(fleet, m, "true", fleet.files.known_hosts) == (0, "")


@pytest_twisted.ensureDeferred
async def test_hang_machine_accepts_tcp_but_never_speaks_ssh(fleet):
    m = fleet[3]
    assert await tcp_alive(m)
    with pytest.raises(defer.TimeoutError):  # the timeout cancelled the connection attempt
        await endpoint(fleet, m, "true", fleet.files.known_hosts).connect(
            Factory.forProtocol(_Collect)).addTimeout(0.5, reactor())
    await wait_for(lambda: m.connection_count == 0)  # the cancelled client hung up


@pytest_twisted.ensureDeferred
async def test_refuse_reboot_exits_1_and_stays_up(fleet):
    m = fleet[4]
    assert await run(fleet, m, "reboot", fleet.files.known_hosts) == (1, "")
    assert await run(fleet, m, "sudo reboot", fleet.files.known_hosts) == (1, "")
    assert await run(fleet, m, "echo still", fleet.files.known_hosts) == (0, "still\n")
    assert m._os_reboot is None and m.power.history == [] and m.listening


@pytest_twisted.ensureDeferred
async def test_never_down_accepts_reboot_but_stays_up(fleet):
    m = fleet[5]
    assert await run(fleet, m, "sudo reboot", fleet.files.known_hosts) == (0, "")
    assert m._os_reboot is None and m.power.history == [] and m.listening


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
@pytest_twisted.ensureDeferred
async def test_openssh_client(fleet):
    from twisted.internet.utils import getProcessOutputAndValue

    files = fleet.files

    async def ssh(m: SimulatedMachine, command: str) -> tuple[int, str, str]:
        out, err, code = await getProcessOutputAndValue(shutil.which("ssh"), [
            "-F", "/dev/null", "-i", files.private_key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={files.known_hosts_openssh}", "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=5", "-p", str(m.ssh_port), f"roller@{m.address}", command,
        ], env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, reactor=reactor())
        return code, out.decode(), err.decode()

    assert await ssh(fleet[0], "echo hi") == (0, "hi\n", "")
    code, out, err = await ssh(fleet[0], "nosuch")
    assert (code, out) == (127, "") and "nosuch: not found" in err
    code, out, err = await ssh(fleet[4], "sudo reboot")
    assert code == 1 and "permission denied" in err
    code, out, err = await ssh(fleet[6], "reboot")
    assert code == 255  # connection closed by the "rebooting" host


@pytest_twisted.ensureDeferred
async def test_200_machines_start_and_stop(tmp_path):
    addrs = fleet_addresses("127.0.2.", 200)
    big = Fleet(reactor(), 200, base="127.0.2.", ssh_port=free_port_on(addrs))
    await big.start()
    try:
        assert all(m.listening for m in big)
        alive = await defer.gatherResults([defer.ensureDeferred(tcp_alive(m)) for m in big])
        assert all(alive)
        files = big.write_client_files(tmp_path)
        assert len(open(files.known_hosts).read().splitlines()) == 200
        assert await run(big, big[-1], "echo last", files.known_hosts) == (0, "last\n")
    finally:
        await big.stop()
    assert not any(m.listening for m in big)
    assert not await tcp_alive(big[0])  # how long building, starting and stopping take: bench/fleet.py


def test_main_runs_until_sigterm(tmp_path):
    """C{python -m roller.sim.fleet}: writes the files, serves, exits 0 on SIGTERM."""
    addrs = fleet_addresses("127.0.4.", 3)
    port = free_port_on(addrs)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = subprocess.Popen(
        [sys.executable, "-m", "roller.sim.fleet", "--count", "3", "--base", "127.0.4.", "--dir",
         str(tmp_path), "--ssh-port", str(port), "--down-for", "10", "--hang", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        output = read_until(child.stdout, "Ctrl-C to stop")
        assert "Ctrl-C to stop" in output, output
        assert "sim-003=hang" in output
        inventory = json.loads((tmp_path / "inventory.json").read_text())
        assert [Machine.from_json(d).ip for d in inventory] == addrs
        assert inventory[0]["ssh"]["port"] == port
        assert load_secrets(tmp_path / "secrets.toml").get("fleet-ssh").path == str(tmp_path / "fleet_ed25519")
        with socket.create_connection((addrs[0], port), timeout=5) as s:
            assert s.recv(100).startswith(b"SSH-2.0-")
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 0
        with pytest.raises(OSError):
            socket.create_connection((addrs[0], port), timeout=2).close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


def test_fixed_group_key_exchanges_match_twisted():
    """
    The simulator offers what Twisted's own SSHFactory offers without a
    moduli file, decided by the RFC 4419 names instead of Twisted's private
    C{_kex.isDynamicPrimesGroup}: if Twisted adds or renames a dynamic-group
    algorithm, this fails here rather than in a handshake.
    """
    from twisted.conch.ssh.factory import SSHFactory
    from twisted.conch.ssh.transport import SSHServerTransport

    from roller.sim.fleet import fixed_group_key_exchanges

    key = generate_key()
    factory = SSHFactory()
    factory.publicKeys = {key.sshType(): key.public()}
    factory.privateKeys = {key.sshType(): key}
    factory.primes = None
    with capturedLogs():
        theirs = factory.buildProtocol(None).supportedKeyExchanges
    ours = fixed_group_key_exchanges(SSHServerTransport.supportedKeyExchanges)
    assert ours == theirs
    assert any(k.startswith(b"diffie-hellman-group-exchange-") for k in SSHServerTransport.supportedKeyExchanges)
    machine = SimulatedMachine(MemoryReactorClock(), "127.0.1.1", 22, key, [], PowerState(task.Clock()))
    from roller.sim.fleet import _SSHFactory

    assert _SSHFactory(machine).buildProtocol(None).supportedKeyExchanges == theirs


def test_sim_does_not_import_testing():
    """roller/sim is product code: nothing in it imports roller.testing (tests import roller.sim, not back)."""
    import ast
    import pathlib

    import roller.sim

    offenders = []
    for path in pathlib.Path(roller.sim.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "roller.testing" or n.startswith("roller.testing.")]
    assert offenders == []
