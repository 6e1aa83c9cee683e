"""
The IPMI driver and tasks against a real BMC: OpenIPMI's C{ipmi_sim} on
127.0.0.1 (L{roller.sim.ipmisim}), driven by the real C{ipmitool}
through C{reactor.spawnProcess} on the global reactor (C{pytest_twisted}).

Every power operation is read back from the simulator; a wrong password, a
BMC that does not answer, a transient "insufficient resources" (a wrapper
script in front of the real ipmitool) and the process list (the password
must never be on a command line) are checked for real.  Only loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred

from roller.drivers.ipmi import (
    IpmiAuthFailed,
    IpmiStateMismatch,
    IpmiTimeout,
    IpmiTool,
    IpmiUnreachable,
)
from roller.inventory import Machine
from roller.jobs import Job
from roller.secrets import Credential, Secrets
from roller.sim.fleet import PowerState
from roller.sim.ipmisim import IPMITOOL, IpmiSim, free_udp_port, skip_reason
from roller.tasks import TaskContext, TaskFailed
from roller.tasks import ipmi as ipmi_tasks
from roller.testing.results import eventually

_SKIP = skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class RecordingReactor:
    """The real reactor, keeping the process transports it spawns (and when)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.processes: list[Any] = []
        self.spawned_at: list[float] = []

    def spawnProcess(self, *args: Any, **kw: Any) -> Any:
        transport = self._reactor.spawnProcess(*args, **kw)
        self.processes.append(transport)
        self.spawned_at.append(self._reactor.seconds())
        return transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class Events(list):
    def __call__(self, message: str, **data: Any) -> None:
        self.append((message, data))

    def messages(self) -> list[str]:
        return [m for m, _ in self]


def tool(reactor: Any = None, **kw: Any) -> IpmiTool:
    """Fast settings for a local simulator (the real defaults space commands 5 s apart)."""
    values: dict[str, Any] = dict(ipmitool=IPMITOOL, timeout=5.0, request_timeout=1, request_retries=1,
                                  retries=2, retry_delay=0.05, min_interval=0.02, power_wait=5.0,
                                  power_poll=0.1)
    values.update(kw)
    return IpmiTool(reactor or _reactor(), **values)


@pytest.fixture
def bmc(tmp_path: Path):
    sim = IpmiSim(workdir=tmp_path / "bmc", password="s3cret-" + os.urandom(3).hex())
    sim.start()
    yield sim
    sim.stop()


async def gone(pid: int, within: float = 5.0) -> bool:
    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    return await eventually(gone, f"pid {pid} to be gone", timeout=within, reactor=_reactor())


def no_secret(password: str, *texts: Any) -> None:
    for text in texts:
        assert password not in str(text), text


# ------------------------------------------------------------ operations, read back


@pytest_twisted.ensureDeferred
async def test_power_operations_read_back(bmc):
    t = tool()
    target = bmc.target()
    events = Events()
    assert await t.status(target) == "off"
    assert "power is on" in await t.on(target, events)
    assert bmc.power == "on"
    assert "set power 1" in bmc.calls()
    assert "power is off" in await t.off(target, events)
    assert bmc.power == "off"
    assert await t.status(target) == "off"
    await t.on(target)
    bmc.clear_calls()
    detail = await t.cycle(target, events)
    assert "Chassis Power Control: Cycle; power is on" in detail
    calls = bmc.calls()
    assert calls.index("set power 0") < calls.index("set power 1"), calls  # really went down and up
    assert bmc.power == "on"
    detail = await t.reset(target, events)
    assert "Chassis Power Control: Reset; power is on" in detail
    assert bmc.resets() == 1
    no_secret(bmc.password, events, detail)


@pytest_twisted.ensureDeferred
async def test_reset_of_a_machine_that_is_off_does_not_read_back(bmc):
    t = tool(power_wait=0.3)
    with pytest.raises(IpmiStateMismatch) as e:
        await t.reset(bmc.target())
    assert str(e.value) == (f"BMC 127.0.0.1:{bmc.port} accepted `chassis power reset` but the power still "
                            "off after 0.3 s (expected on)")
    assert bmc.resets() == 0


@pytest_twisted.ensureDeferred
async def test_stuck_machine_is_a_mismatch(bmc):
    bmc.stick()
    with pytest.raises(IpmiStateMismatch) as e:
        await tool(power_wait=0.3).on(bmc.target())
    assert (e.value.expected, e.value.actual) == ("on", "off")


@pytest_twisted.ensureDeferred
async def test_sel_list_and_boot_device(bmc):
    t = tool()
    lines = await t.sel_list(bmc.target(), 15)
    assert lines == ["1 | S+ 70/001 | System Event #0x01 | Undetermined system hardware failure | Asserted",
                     "2 | S+ 70/001 | Power Supply #0x02 | Failure detected | Asserted"]
    assert await t.sel_list(bmc.target(), 1) == lines[1:]
    assert await t.set_boot_device(bmc.target(), "pxe", efi=True) == "Set Boot Device to pxe"
    assert bmc.boot_device == "pxe"


@pytest_twisted.ensureDeferred
async def test_ipmi_v15_lan_interface(bmc):
    assert await tool().status(bmc.target(interface="lan")) == "off"


@pytest_twisted.ensureDeferred
async def test_power_driver_interface(bmc):
    m = Machine.from_json({"worker_id": "t-1", "worker_group": "mdc1",
                           "ipmi": {"host": "127.0.0.1", "port": bmc.port, "credential": "bmc"}})
    secrets = Secrets({"bmc": Credential(name="bmc", kind="password", username=bmc.username,
                                         password=bmc.password)})
    events = Events()
    power = tool().for_machine(m, secrets, on_progress=events)
    assert (await power.status()).state == "off"
    assert (await power.on()).state == "on" and bmc.power == "on"
    result = await power.cycle(0.1)
    assert result.detail == f"BMC 127.0.0.1:{bmc.port}: cycled (off, 0.1 s, on), read back on"
    assert (await power.off()).state == "off" and bmc.power == "off"
    no_secret(bmc.password, events)


# ------------------------------------------------------------ failures


@pytest_twisted.ensureDeferred
async def test_wrong_password(bmc):
    reactor = RecordingReactor(_reactor())
    wrong = "not-" + bmc.password
    with pytest.raises(IpmiAuthFailed) as e:
        await tool(reactor).status(bmc.target(password=wrong))
    message = str(e.value)
    assert message.startswith(f"authentication failed for user admin at BMC 127.0.0.1:{bmc.port} "
                              "(credential 'ipmisim'): wrong password")
    no_secret(wrong, message, e.value.detail)
    no_secret(bmc.password, message, e.value.detail)
    assert len(reactor.processes) == 1  # not retried


@pytest_twisted.ensureDeferred
async def test_unknown_user(bmc):
    with pytest.raises(IpmiAuthFailed) as e:
        await tool().status(bmc.target(username="nobody"))
    assert "authentication failed for user nobody" in str(e.value)
    assert "unknown user name" in str(e.value)


@pytest_twisted.ensureDeferred
async def test_bmc_not_answering_times_out(bmc):
    port = free_udp_port()  # nothing listens there
    reactor = RecordingReactor(_reactor())
    with pytest.raises(IpmiTimeout) as e:
        await tool(reactor, timeout=0.5, retries=0, request_timeout=2, request_retries=3).status(
            bmc.target(port=port))
    # roller's 0.5 s timeout ended it, not ipmitool's own 3 tries of 2 s (that is IpmiUnreachable, after
    # ipmitool exits by itself): no sooner than 0.5 s after the spawn in reactor time, and by a kill.
    assert reactor.seconds() >= reactor.spawned_at[0] + 0.5
    assert str(e.value).startswith(f"BMC 127.0.0.1:{port} did not complete `chassis power status` "
                                   "within 0.5 s; roller killed ipmitool")
    [process] = reactor.processes
    assert await gone(process.pid)
    await eventually(lambda: process.status is not None, "ipmitool's exit status")
    assert os.WIFSIGNALED(process.status), process.status


@pytest_twisted.ensureDeferred
async def test_bmc_not_answering_ipmitool_gives_up(bmc):
    port = free_udp_port()
    events = Events()
    with pytest.raises(IpmiUnreachable) as e:
        await tool(timeout=5.0, retries=0, request_timeout=1, request_retries=1).status(
            bmc.target(port=port), events)
    assert str(e.value) == (f"BMC 127.0.0.1:{port} is not answering (ipmitool: Get Auth Capabilities error; "
                            "Error issuing Get Channel Authentication Capabilities request; Error: Unable to "
                            "establish IPMI v2 / RMCP+ session)")


@pytest_twisted.ensureDeferred
async def test_transient_error_then_success(bmc, tmp_path):
    marker = tmp_path / "failed-once"
    calls = tmp_path / "calls"
    wrapper = tmp_path / "ipmitool"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"echo \"$*\" >> '{calls}'\n"
        f"if [ ! -e '{marker}' ]; then\n"
        f"    : > '{marker}'\n"
        "    echo 'Error in open session response message : insufficient resources for session' >&2\n"
        "    echo 'Error: Unable to establish IPMI v2 / RMCP+ session' >&2\n"
        "    exit 1\n"
        "fi\n"
        f"exec {IPMITOOL} \"$@\"\n")
    wrapper.chmod(0o755)
    events = Events()
    reactor = RecordingReactor(_reactor())
    t = tool(reactor, ipmitool=str(wrapper), retry_delay=0.2)
    assert "power is on" in await t.on(bmc.target(), events)
    assert reactor.spawned_at[1] >= reactor.spawned_at[0] + 0.2  # the retry waited retry_delay (reactor time)
    assert len(calls.read_text().splitlines()) == 3  # on (busy), on, status
    retries = [m for m in events.messages() if "retrying" in m]
    assert retries == [f"ipmi chassis power on: BMC 127.0.0.1:{bmc.port} is busy: Error in open session "
                       "response message : insufficient resources for session; Error: Unable to establish "
                       "IPMI v2 / RMCP+ session; retrying in 0.2 s (attempt 2 of 3)"]
    assert bmc.power == "on"


@pytest_twisted.ensureDeferred
async def test_password_never_on_the_command_line(bmc):
    """
    A command to a BMC that does not answer runs for seconds: look at the
    live ipmitool process, then cancel it, which kills it.
    """
    reactor = RecordingReactor(_reactor())
    target = bmc.target(port=free_udp_port())
    d = tool(reactor, timeout=30.0, request_timeout=5, request_retries=3).status(target)

    def exec_done() -> list[bytes] | None:
        """ipmitool's argv, once the child has exec'd it (before that /proc shows the forked Python)."""
        if not reactor.processes:
            return None
        argv = Path(f"/proc/{reactor.processes[0].pid}/cmdline").read_bytes().split(b"\0")
        return argv if argv[0] == IPMITOOL.encode() else None

    cmdline = await eventually(exec_done, "ipmitool to be exec'd")
    [process] = reactor.processes
    pid = process.pid
    assert cmdline[0] == IPMITOOL.encode() and b"-E" in cmdline
    assert not any(bmc.password.encode() in arg for arg in cmdline)
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"IPMI_PASSWORD={bmc.password}".encode() in environ  # -E reads it from there
    ps = subprocess.run(["ps", "-eo", "pid,args", "--width", "4096"], capture_output=True, text=True).stdout
    assert str(pid) in ps and bmc.password not in ps
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert await gone(pid)
    assert process.status is not None and os.WIFSIGNALED(process.status)
    assert os.WTERMSIG(process.status) == signal.SIGKILL


# ------------------------------------------------------------ the line per BMC


@pytest_twisted.ensureDeferred
async def test_commands_to_one_bmc_are_serialized_and_spaced(bmc):
    reactor = RecordingReactor(_reactor())
    t = tool(reactor, min_interval=0.25)
    target = bmc.target()
    results = await gather([t.status(target), t.status(target), t.status(target)])
    assert results == ["off", "off", "off"]
    starts = reactor.spawned_at  # reactor time
    assert all(b >= a + 0.25 for a, b in zip(starts, starts[1:])), starts


async def gather(ds: list[Deferred]) -> list[Any]:
    return [await d for d in ds]


# ------------------------------------------------------------ tasks


def context(bmc: IpmiSim, t: IpmiTool):
    m = Machine.from_json({"worker_id": "t-1", "worker_group": "mdc1", "ip": "127.0.0.1",
                           "ipmi": {"host": "127.0.0.1", "port": bmc.port, "credential": "bmc"}})
    secrets = Secrets({"bmc": Credential(name="bmc", kind="password", username=bmc.username,
                                         password=bmc.password)})
    events = Events()
    job = Job(id="j", task_name="ipmi", worker_id=m.worker_id, worker_group=m.worker_group, created_at=0.0)
    ctx = TaskContext(job=job, machine=m, reactor=_reactor(), log=events, secrets=secrets,
                      drivers=type("Drivers", (), {"ipmi": t})())
    return ctx, events


def task(name: str):
    return {s.name: s for s in ipmi_tasks.TASKS}[name]


@pytest_twisted.ensureDeferred
async def test_seed_tasks(bmc):
    ctx, events = context(bmc, tool())
    assert await task("ipmi_status").run(ctx, {}) == f"BMC 127.0.0.1:{bmc.port}: chassis power is off"
    assert "power is on" in await task("ipmi_on").run(ctx, {})
    assert "Cycle; power is on" in await task("ipmi_cycle").run(ctx, {})
    assert "Reset; power is on" in await task("ipmi_reset").run(ctx, {})
    assert "power is off" in await task("ipmi_off").run(ctx, {})
    listing = await task("ipmi_list").run(ctx, {"last": 15})
    assert listing.startswith(f"BMC 127.0.0.1:{bmc.port}: 2 SEL entries:\n")
    assert await task("ipmi_pxe").run(ctx, {"efi": False}) == f"BMC 127.0.0.1:{bmc.port}: Set Boot Device to pxe"
    assert bmc.power == "off" and bmc.boot_device == "pxe"
    no_secret(bmc.password, events)
    bad, _ = context(bmc, tool())
    bad = TaskContext(job=bad.job, machine=bad.machine, reactor=bad.reactor, log=bad.log, drivers=bad.drivers,
                      secrets=Secrets({"bmc": Credential(name="bmc", kind="password", username="admin",
                                                         password="wrong")}))
    with pytest.raises(TaskFailed) as e:
        await task("ipmi_on").run(bad, {})
    assert str(e.value).startswith(f"authentication failed for user admin at BMC 127.0.0.1:{bmc.port}")


@pytest_twisted.ensureDeferred
async def test_bmc_backed_by_a_fleet_power_state(tmp_path):
    reactor = _reactor()
    power = PowerState(reactor, on=True, default_down_for=0.3, name="t-1")
    sim = IpmiSim(workdir=tmp_path / "bmc", power=power, reactor=reactor, reset_down_for=0.3)
    sim.start()
    try:
        ctx, _ = context(sim, tool())
        assert "power is off" in await task("ipmi_off").run(ctx, {})
        assert not power.on
        assert "power is on" in await task("ipmi_on").run(ctx, {})
        assert power.on
        assert "Reset; power is on" in await task("ipmi_reset").run(ctx, {})
        assert power.events()[:6] == ["power_off", "down", "power_on", "up", "reboot", "down"]
        # The reboot method as the escalation uses it: sent, the machine goes down for real.
        detail = await ipmi_tasks.initiate_cycle(ctx)
        assert detail.startswith("ipmi power cycle sent: ")
        assert "set power 0" in sim.calls()
    finally:
        sim.stop()
        power.stop()
