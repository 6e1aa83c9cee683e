"""
The generic power tasks (C{power_on}, C{power_off}, C{power_cycle},
C{power_status}) on machines whose power method is Redfish or XenAPI:
L{roller.drivers.redfish.RedfishPower} against a real sushy-emulator and
L{roller.drivers.xen.XenPower} against the Klein XenAPI fake, each change
read back from the peer itself.  Also the method choice of
L{roller.tasks.pdu.power_driver}.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from roller.config import load_settings
from roller.drivers.power import IPowerDriver, PowerError
from roller.drivers.redfish import RedfishDriver, RedfishPower
from roller.drivers.xen import XenApiDriver, XenPower
from roller.inventory import Machine
from roller.jobs import Job
from roller.secrets import Credential, Secrets
from roller.tasks import TaskContext, TaskFailed
from roller.tasks import pdu as power_tasks
from roller.testing.sushy import SushyEmulator, fake_system, skip_reason
from roller.testing.xenapi import FakeXenApi

PASSWORD = "pw-Power-5ecret"
VM = "6a0d3e0c-9b1f-4c55-8f0e-1f2a3b4c5d6e"
SECRETS = Secrets({
    "bmc": Credential(name="bmc", kind="password", username="admin", password=PASSWORD),
    "pool": Credential(name="pool", kind="password", username="root", password=PASSWORD),
    "wrong": Credential(name="wrong", kind="password", username="root", password="not-" + PASSWORD),
})


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _machine(**access: Any) -> Machine:
    return Machine.from_json({"worker_id": "w1", "worker_group": "g", "ip": "127.0.0.9", **access})


def _context(machine: Machine, **drivers: Any) -> tuple[TaskContext, list[str]]:
    events: list[str] = []
    job = Job(id="j", task_name="power_status", worker_id=machine.worker_id,
              worker_group=machine.worker_group, created_at=0.0)
    ctx = TaskContext(job=job, machine=machine, reactor=_reactor(), log=lambda m, **d: events.append(m),
                      settings=load_settings(None, {}, {}), secrets=SECRETS,
                      drivers=SimpleNamespace(**drivers))
    return ctx, events


async def _run(task: Any, ctx: TaskContext, params: dict | None = None) -> str:
    return await task.run(ctx, task.parse_params(params or {}))


# ---------------------------------------------------------------- Redfish (sushy-emulator)


@pytest.fixture(scope="module")
def sushy():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with SushyEmulator([fake_system("generic", "On"), fake_system("other", "Off")],
                       users={"admin": PASSWORD}) as emulator:
        yield emulator


def _redfish_driver() -> RedfishDriver:
    return RedfishDriver(_reactor(), request_timeout=5.0, power_timeout=10.0, poll_interval=0.05)


@pytest_twisted.ensureDeferred
async def test_generic_power_tasks_over_redfish(sushy):
    machine = _machine(redfish={"url": sushy.url, "system": "generic", "credential": "bmc"})
    ctx, events = _context(machine, redfish=_redfish_driver())
    power = power_tasks.power_driver(ctx)
    assert isinstance(power, RedfishPower) and verifyObject(IPowerDriver, power)
    assert power.description == f"Redfish {sushy.url} system generic (credential 'bmc' (user 'admin'))"

    assert (await _run(power_tasks.POWER_STATUS, ctx)).startswith("power is on:")
    off = await _run(power_tasks.POWER_OFF, ctx)
    assert "ForceOff sent" in off and off.endswith("is Off")
    assert sushy.power_state("generic") == "Off"
    assert (await _run(power_tasks.POWER_STATUS, ctx)).startswith("power is off:")
    on = await _run(power_tasks.POWER_ON, ctx)
    assert "On sent" in on and sushy.power_state("generic") == "On"
    # sushy offers no PowerCycle: ForceOff, read back Off, On, read back On
    cycled = await _run(power_tasks.POWER_CYCLE, ctx)
    assert cycled.startswith("ForceOff then On sent") and sushy.power_state("generic") == "On"
    cycled = await _run(power_tasks.POWER_CYCLE, ctx, {"off_for": 0.1, "via": "redfish"})
    assert "cycled (off, 0.1 s, on)" in cycled and sushy.power_state("generic") == "On"
    assert PASSWORD not in " ".join(events)
    assert power_tasks.POWER_ON.endpoints(machine) == ("bmc:127.0.0.1",)


@pytest_twisted.ensureDeferred
async def test_redfish_power_errors_are_power_errors(sushy):
    machine = _machine(redfish={"url": sushy.url, "system": "other", "credential": "wrong"})
    ctx, _ = _context(machine, redfish=_redfish_driver())
    with pytest.raises(TaskFailed) as info:
        await _run(power_tasks.POWER_ON, ctx)
    assert "credential 'wrong' (user 'root') was refused (HTTP 401" in str(info.value)
    assert PASSWORD not in str(info.value)
    power = _redfish_driver().for_machine(machine, SECRETS)
    with pytest.raises(PowerError) as error:
        await power.status()
    assert error.value.kind == "auth"
    assert sushy.power_state("other") == "Off"
    with pytest.raises(PowerError, match="unknown credential 'nope'") as config:
        _redfish_driver().for_machine(_machine(redfish={"url": sushy.url, "credential": "nope"}), SECRETS)
    assert config.value.kind == "config"


def test_redfish_default_credential_comes_from_the_driver():
    machine = _machine(redfish={"url": "https://10.0.0.5"})
    with pytest.raises(PowerError, match="no Redfish credential"):
        _redfish_driver().for_machine(machine, SECRETS)
    driver = RedfishDriver(_reactor(), default_credential="bmc")
    assert driver.for_machine(machine, SECRETS).target.credential == "bmc"


# ---------------------------------------------------------------- XenAPI (the Klein fake)


@pytest.fixture
def xen():
    fake = FakeXenApi(users={"root": PASSWORD})
    fake.listen(_reactor())
    yield fake
    pytest_twisted.blockon(Deferred.fromCoroutine(fake.stop()))


def _xen_driver(**kw: Any) -> XenApiDriver:
    return XenApiDriver(_reactor(), timeout=5.0, shutdown_timeout=5.0, start_delay=0, **kw)


@pytest_twisted.ensureDeferred
async def test_generic_power_tasks_over_xenapi(xen):
    vm = xen.add_vm(VM, power_state="Running")
    machine = _machine(xen={"vm_uuid": VM})
    ctx, events = _context(machine, xen=_xen_driver(default_url=xen.url, default_credential="pool"))
    power = power_tasks.power_driver(ctx)
    assert isinstance(power, XenPower) and verifyObject(IPowerDriver, power)
    assert power.description == f"XenAPI 127.0.0.1:{xen.port} VM {VM} (credential 'pool' (user 'root'))"

    assert await _run(power_tasks.POWER_STATUS, ctx) == f"power is on: VM {VM} is Running"
    assert await _run(power_tasks.POWER_OFF, ctx) == f"VM {VM}: hard shutdown; read back Halted"
    assert vm.state == "Halted"
    assert await _run(power_tasks.POWER_OFF, ctx) == f"VM {VM} was already Halted"
    assert await _run(power_tasks.POWER_ON, ctx) == f"VM {VM}: started; read back Running"
    assert vm.state == "Running"
    xen.calls.clear()
    assert (await _run(power_tasks.POWER_CYCLE, ctx)).startswith(f"VM {VM} clean shutdown; started")
    assert "VM.clean_shutdown" in xen.methods() and vm.state == "Running"
    xen.calls.clear()
    assert await _run(power_tasks.POWER_CYCLE, ctx, {"off_for": 0.05}) == \
        f"VM {VM}: hard shutdown, 0.05 s off, started; read back Running"
    assert [m for m in xen.methods() if m.startswith("VM.") and "shutdown" in m or m == "VM.start"] == \
        ["VM.hard_shutdown", "VM.start"]
    assert (await power.reset()).state == "on"
    # every action (7) logged in and out, no session left open
    assert len(xen.logged_out) == 7 and not xen.sessions
    assert PASSWORD not in " ".join(events)


class _StuckPower:
    """A fleet-like power that ignores every request (the VM never starts)."""

    on = False

    def power_on(self) -> None:
        pass

    def power_off(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_xenapi_read_back_mismatch_and_failures(xen):
    xen.add_vm(VM, power_state="Halted", power=_StuckPower())
    machine = _machine(xen={"vm_uuid": VM, "url": xen.url, "credential": "pool"})
    ctx, _ = _context(machine, xen=_xen_driver())
    with pytest.raises(TaskFailed, match=f"VM {VM} reads back Halted after started \\(wanted Running\\)"):
        await _run(power_tasks.POWER_ON, ctx)
    power = _xen_driver().for_machine(machine, SECRETS)
    with pytest.raises(PowerError) as error:
        await power.on()
    assert error.value.kind == "unreached" and error.value.sent

    xen.failures["VM.get_power_state"] = ["INTERNAL_ERROR", "xapi is sad"]
    with pytest.raises(TaskFailed, match="XenAPI error: INTERNAL_ERROR xapi is sad \\(VM.get_power_state"):
        await _run(power_tasks.POWER_STATUS, ctx)
    xen.failures.clear()

    wrong = _machine(xen={"vm_uuid": VM, "url": xen.url, "credential": "wrong"})
    ctx, _ = _context(wrong, xen=_xen_driver())
    with pytest.raises(TaskFailed) as info:
        await _run(power_tasks.POWER_STATUS, ctx)
    assert "SESSION_AUTHENTICATION_FAILED" in str(info.value) and PASSWORD not in str(info.value)
    with pytest.raises(PowerError, match="no XenAPI pool URL") as config:
        _xen_driver().for_machine(_machine(xen={"vm_uuid": VM}), SECRETS)
    assert config.value.kind == "config"


# ---------------------------------------------------------------- which method


class _Named:
    """A driver registry entry whose for_machine answers its own name."""

    def __init__(self, name: str):
        self.name = name

    def for_machine(self, machine: Any, secrets: Any, on_progress: Any = None) -> str:
        return self.name


def test_method_order_is_pdu_ipmi_redfish_xen_unless_via_names_one():
    drivers = {"pdus": _Named("pdu"), "ipmi": _Named("ipmi"), "redfish": _Named("redfish"),
               "xen": _Named("xen")}
    pdu = {"host": "10.0.0.2", "outlet": "AA1"}
    ipmi = {"host": "10.0.0.3"}
    redfish = {"url": "https://10.0.0.4"}
    xen = {"vm_uuid": VM}
    cases = [
        (dict(pdu=pdu, ipmi=ipmi, redfish=redfish, xen=xen), "pdu"),
        (dict(ipmi=ipmi, redfish=redfish, xen=xen), "ipmi"),
        (dict(redfish=redfish, xen=xen), "redfish"),
        (dict(xen=xen), "xen"),
    ]
    for access, chosen in cases:
        ctx, _ = _context(_machine(**access), **drivers)
        assert power_tasks.power_driver(ctx) == chosen, access
    ctx, _ = _context(_machine(pdu=pdu, ipmi=ipmi, redfish=redfish, xen=xen), **drivers)
    for via in ("pdu", "ipmi", "redfish", "xen"):
        assert power_tasks.power_driver(ctx, via) == via
    ctx, _ = _context(_machine(ipmi=ipmi), **drivers)
    with pytest.raises(TaskFailed, match="has no redfish settings"):
        power_tasks.power_driver(ctx, "redfish")
    ctx, _ = _context(_machine(), **drivers)
    with pytest.raises(TaskFailed, match="none of pdu, ipmi, redfish or xen settings"):
        power_tasks.power_driver(ctx)
    ctx, _ = _context(_machine(xen=xen))
    with pytest.raises(TaskFailed, match="this roller has no xen power driver configured"):
        power_tasks.power_driver(ctx)
    assert power_tasks.POWER_STATUS.parse_params({"via": "xen"}) == {"via": "xen"}
    assert power_tasks.power_endpoints(_machine(ipmi=ipmi, redfish=redfish)) == ("bmc:10.0.0.3", "bmc:10.0.0.4")
    assert power_tasks.power_endpoints(_machine(ipmi={"host": "10.0.0.4"}, redfish=redfish)) == ("bmc:10.0.0.4",)
