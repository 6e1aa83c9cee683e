"""
Tests for L{roller.drivers.xen} and L{roller.tasks.xen}, against the Klein
XenAPI fake (L{roller.testing.xenapi}) on 127.0.0.1 through
C{pytest_twisted}.  Delays and call timeouts run on an injected
L{task.Clock} where a test needs them; only the network is real.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from roller.drivers.xen import (
    XenApiDriver,
    XenApiFailure,
    XenAuthFailed,
    XenConfigError,
    XenConnectFailed,
    XenProtocolError,
    XenTarget,
    XenTimeout,
    xen_target,
)
from roller.inventory import Machine
from roller.jobs import Job
from roller.secrets import Credential, Secrets
from roller.sim.fleet import PowerState
from roller.tasks import TaskContext, TaskFailed
from roller.tasks import xen as xen_task
from roller.testing.liveness import DownThenUp
from roller.testing.results import eventually
from roller.testing.xenapi import FakeXenApi

PASSWORD = "xen-Pa55-word"
VM = "0f2c6b52-5f40-4d6a-9a1e-6f1d8d3c2b10"
LOGIN = "session.login_with_password"


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _driver(**kw: Any) -> XenApiDriver:
    kw.setdefault("timeout", 5.0)
    kw.setdefault("shutdown_timeout", 5.0)
    kw.setdefault("start_delay", 0)
    return XenApiDriver(_reactor(), **kw)


async def _failure(d: Any) -> BaseException:
    try:
        result = await d
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


def _stop(fake: FakeXenApi) -> None:
    pytest_twisted.blockon(Deferred.fromCoroutine(fake.stop()))


@pytest.fixture
def fake():
    fake = FakeXenApi(users={"root": PASSWORD})
    fake.listen(_reactor())
    yield fake
    _stop(fake)


def _target(fake: FakeXenApi, vm: str = VM, **kw: Any) -> XenTarget:
    fields: dict[str, Any] = dict(url=fake.url, vm_uuid=vm, username="root", password=PASSWORD,
                                  credential="xen-pool", name="g/w1")
    fields.update(kw)
    return XenTarget(**fields)


def _session(fake: FakeXenApi) -> str:
    """The session reference the driver used (from its first call after login)."""
    for method, params in fake.calls:
        if method != LOGIN:
            return params[0]
    raise AssertionError("no call after login")


# ---------------------------------------------------------------- the reboot


@pytest_twisted.ensureDeferred
async def test_reboot_flow(fake):
    vm = fake.add_vm(VM)
    lines: list[str] = []
    result = await _driver().reboot(_target(fake), on_event=lines.append)
    assert (result.vm_uuid, result.shutdown, result.state) == (VM, "clean", "Running")
    assert result.detail == f"VM {VM} clean shutdown; started (Running)"
    assert fake.methods() == [LOGIN, "VM.get_by_uuid", "VM.get_power_state", "VM.clean_shutdown",
                              "VM.start", "VM.get_power_state", "session.logout"]
    session = _session(fake)
    assert fake.calls[0] == (LOGIN, ("root", "***", "1.0", "roller"))
    assert fake.calls[1] == ("VM.get_by_uuid", (session, VM))
    assert fake.calls[4] == ("VM.start", (session, vm.ref, False, False))
    assert fake.logged_out == [session] and fake.sessions == {}
    assert not any(session in line or PASSWORD in line for line in lines)
    assert any(f"VM.clean_shutdown {VM}" in line for line in lines)


@pytest_twisted.ensureDeferred
async def test_reboot_of_a_vm_backed_by_a_fleet_power_state(fake):
    power = PowerState(Clock(), name="vm")
    fake.add_vm(VM, power=power)
    result = await _driver().reboot(_target(fake))
    assert result.state == "Running" and power.on
    assert power.events() == ["power_off", "down", "power_on", "up"]


@pytest_twisted.ensureDeferred
async def test_clean_shutdown_failure_falls_back_to_hard_shutdown(fake):
    fake.add_vm(VM)
    fake.clean_shutdown = "fail"
    lines: list[str] = []
    result = await _driver().reboot(_target(fake), on_event=lines.append)
    assert result.shutdown == "hard"
    assert result.detail == (f"VM {VM} clean shutdown failed (VM_LACKS_FEATURE_SHUTDOWN); hard shutdown; "
                             "started (Running)")
    assert fake.methods()[3:6] == ["VM.clean_shutdown", "VM.hard_shutdown", "VM.start"]
    assert fake.methods()[-1] == "session.logout"
    assert any(line.startswith("XenAPI 127.0.0.1") and "XenAPI error: VM_LACKS_FEATURE_SHUTDOWN" in line
               for line in lines)


@pytest_twisted.ensureDeferred
async def test_clean_shutdown_timeout_falls_back_to_hard_shutdown_then_waits(fake):
    fake.add_vm(VM)
    fake.clean_shutdown = "hang"
    clock = Clock()
    d = _driver(clock=clock, timeout=10.0, shutdown_timeout=60.0, start_delay=30.0).reboot(_target(fake))
    await eventually(lambda: "VM.clean_shutdown" in fake.methods())
    clock.advance(59)
    assert "VM.hard_shutdown" not in fake.methods()
    clock.advance(1)  # the clean shutdown's timeout: roller hangs up and forces it
    # then the start delay, on the same clock
    await eventually(lambda: [c.getTime() for c in clock.getDelayedCalls()] == [clock.seconds() + 30])
    assert fake.methods()[-1] == "VM.hard_shutdown"
    clock.advance(30)
    result = await d
    assert result.shutdown == "hard"
    assert "clean shutdown did not finish within 60 s; hard shutdown" in result.detail
    assert fake.methods()[-3:] == ["VM.start", "VM.get_power_state", "session.logout"]


@pytest_twisted.ensureDeferred
async def test_halted_vm_is_only_started(fake):
    fake.add_vm(VM, power_state="Halted")
    result = await _driver().reboot(_target(fake))
    assert result.shutdown == "none" and "was already halted" in result.detail
    assert "VM.clean_shutdown" not in fake.methods() and "VM.start" in fake.methods()


@pytest_twisted.ensureDeferred
async def test_paused_vm_is_hard_shut_down(fake):
    fake.add_vm(VM, power_state="Paused")
    result = await _driver().reboot(_target(fake))
    assert result.shutdown == "hard" and "was Paused; hard shutdown" in result.detail
    assert "VM.clean_shutdown" not in fake.methods()


# ---------------------------------------------------------------- failures


@pytest_twisted.ensureDeferred
async def test_auth_failure_is_readable_and_needs_no_logout(fake):
    fake.add_vm(VM)
    e = await _failure(_driver().reboot(_target(fake, password="wrong-" + PASSWORD)))
    assert isinstance(e, XenAuthFailed)
    assert e.code == "SESSION_AUTHENTICATION_FAILED"
    assert str(e) == (f"XenAPI error: SESSION_AUTHENTICATION_FAILED root Authentication failure "
                      f"(session.login_with_password on 127.0.0.1:{fake.port}); credential 'xen-pool' "
                      "(user 'root') was refused")
    assert PASSWORD not in str(e)
    assert fake.methods() == [LOGIN]


@pytest_twisted.ensureDeferred
async def test_uuid_invalid_and_logout_after_login(fake):
    e = await _failure(_driver().reboot(_target(fake, vm="no-such-vm")))
    assert isinstance(e, XenApiFailure) and e.code == "UUID_INVALID"
    assert str(e) == f"XenAPI error: UUID_INVALID VM no-such-vm (VM.get_by_uuid on 127.0.0.1:{fake.port})"
    assert fake.methods() == [LOGIN, "VM.get_by_uuid", "session.logout"]
    assert fake.logged_out == [_session(fake)]


@pytest_twisted.ensureDeferred
async def test_start_failure_still_logs_out(fake):
    fake.add_vm(VM)
    fake.failures["VM.start"] = ["VM_BAD_POWER_STATE", "OpaqueRef:vm", "halted", "running"]
    e = await _failure(_driver().reboot(_target(fake)))
    assert isinstance(e, XenApiFailure)
    assert str(e).startswith("XenAPI error: VM_BAD_POWER_STATE OpaqueRef:vm halted running (VM.start on ")
    assert fake.methods()[-2:] == ["VM.start", "session.logout"]


@pytest_twisted.ensureDeferred
async def test_cancel_during_the_delay_still_logs_out(fake):
    fake.add_vm(VM)
    clock = Clock()
    d = _driver(clock=clock, start_delay=30.0).reboot(_target(fake))
    await eventually(lambda: "VM.clean_shutdown" in fake.methods() and clock.getDelayedCalls()
                 and [c.getTime() for c in clock.getDelayedCalls()] == [30.0])
    d.cancel()
    assert isinstance(await _failure(d), CancelledError)
    assert "VM.start" not in fake.methods()
    assert fake.methods()[-1] == "session.logout" and fake.sessions == {}


@pytest_twisted.ensureDeferred
async def test_login_at_the_pool_master():
    master, member = FakeXenApi(users={"root": PASSWORD}), None
    for _ in range(5):
        master.listen(_reactor(), interface="127.0.0.3")
        member = FakeXenApi(master="127.0.0.3")
        try:
            member.listen(_reactor(), interface="127.0.0.2", port=master.port)
            break
        except Exception:  # that port is taken on 127.0.0.2: try another
            await master.stop()
    try:
        master.add_vm(VM)
        lines: list[str] = []
        result = await _driver().reboot(_target(member), on_event=lines.append)
        assert result.state == "Running"
        assert member.methods() == [LOGIN]
        assert master.methods()[0] == LOGIN and master.methods()[-1] == "session.logout"
        assert f"XenAPI 127.0.0.2:{master.port} is not the pool master; logging in at 127.0.0.3" in lines
    finally:
        await master.stop()
        await member.stop()


@pytest_twisted.ensureDeferred
async def test_pool_refusing_connections():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = await _failure(_driver().reboot(XenTarget(url=f"http://127.0.0.1:{port}/", vm_uuid=VM,
                                                  username="root", password=PASSWORD)))
    assert isinstance(e, XenConnectFailed) and e.reason == "refused"
    assert str(e) == f"cannot connect to XenAPI 127.0.0.1:{port}: connection refused"


class _Silent(Protocol):
    def connectionMade(self) -> None:
        self.factory.connected.append(self)


@pytest_twisted.ensureDeferred
async def test_pool_not_answering_times_out():
    factory = Factory.forProtocol(_Silent)
    factory.connected = []
    listening = _reactor().listenTCP(0, factory, interface="127.0.0.1")
    try:
        clock = Clock()
        url = f"http://127.0.0.1:{listening.getHost().port}/"
        d = _driver(clock=clock, timeout=30.0).reboot(XenTarget(url=url, vm_uuid=VM, username="root",
                                                                password=PASSWORD))
        await eventually(lambda: factory.connected)
        clock.advance(30)
        e = await _failure(d)
        assert isinstance(e, XenTimeout)
        assert str(e) == (f"XenAPI 127.0.0.1:{listening.getHost().port} did not answer "
                          "session.login_with_password within 30 s")
    finally:
        for p in factory.connected:
            p.transport.abortConnection()
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_not_a_xenapi_endpoint(fake):
    e = await _failure(_driver().reboot(_target(fake, url=fake.url + "not/here")))
    assert isinstance(e, XenProtocolError)
    assert "session.login_with_password answered HTTP 404" in str(e)


@pytest_twisted.ensureDeferred
async def test_power_state(fake):
    fake.add_vm(VM, power_state="Suspended")
    assert await _driver().power_state(_target(fake)) == "Suspended"
    assert fake.methods() == [LOGIN, "VM.get_by_uuid", "VM.get_power_state", "session.logout"]


# ---------------------------------------------------------------- targets


SECRETS = Secrets({
    "xen-pool": Credential(name="xen-pool", kind="password", username="root", password=PASSWORD),
    "key": Credential(name="key", kind="ssh-key", path="/dev/null"),
})


def _machine(**xen: Any) -> Machine:
    data: dict[str, Any] = {"worker_id": "t-w1", "worker_group": "g",
                            "fqdn": "t-w1.test.releng.mdc1.mozilla.com"}
    if xen:
        data["xen"] = xen
    return Machine.from_json(data)


def test_xen_target():
    t = xen_target(_machine(vm_uuid=VM, url="https://pool-a.example/", credential="xen-pool"), SECRETS)
    assert (t.url, t.vm_uuid, t.username, t.password, t.credential, t.name) == (
        "https://pool-a.example/", VM, "root", PASSWORD, "xen-pool", "g/t-w1")
    assert PASSWORD not in repr(t)
    # the seed's xen.json gave only the uuid: pool and credential from the settings
    t = xen_target(_machine(vm_uuid=VM), SECRETS, default_url="https://pool-b.example",
                   default_credential="xen-pool", ca_file="/etc/roller/xen-ca.pem")
    assert (t.url, t.ca_file, t.verify_tls) == ("https://pool-b.example/", "/etc/roller/xen-ca.pem", True)
    cases = [
        (_machine(), "has no xen settings"),
        (_machine(vm_uuid=VM, credential="xen-pool"), "no XenAPI pool URL"),
        (_machine(vm_uuid=VM, url="https://pool-a.example/"), "no XenAPI credential"),
        (_machine(vm_uuid=VM, url="https://pool-a.example/", credential="nope"), "unknown credential 'nope'"),
        (_machine(vm_uuid=VM, url="https://pool-a.example/", credential="key"), "is of type ssh-key"),
    ]
    for machine, message in cases:
        with pytest.raises(XenConfigError, match=message):
            xen_target(machine, SECRETS)


# ---------------------------------------------------------------- the task


def _settings(**changes: Any) -> Any:
    """roller's defaults with C{changes}."""
    from attrs import evolve

    from roller.config import load_settings

    return evolve(load_settings(None, {}, {}), **changes)


def _context(machine: Machine, settings: Any, drivers: Any = None):
    events: list[str] = []
    job = Job(id="j", task_name="xenapi_reboot", worker_id=machine.worker_id,
              worker_group=machine.worker_group, created_at=0.0)
    ctx = TaskContext(job=job, machine=machine, reactor=_reactor(), log=lambda m, **d: events.append(m),
                      settings=settings, secrets=SECRETS, drivers=drivers or SimpleNamespace())
    return ctx, events


@pytest_twisted.ensureDeferred
async def test_xenapi_reboot_task_with_pool_from_settings(fake):
    fake.add_vm(VM)
    settings = _settings(xen_url=fake.url, xen_credential="xen-pool", xen_start_delay=0.0)
    ctx, events = _context(_machine(vm_uuid=VM), settings)
    result = await xen_task.TASK.run(ctx, {})
    assert result == f"xenapi reboot: VM {VM} clean shutdown; started (Running)"
    assert events[0] == f"xenapi reboot of VM {VM} on 127.0.0.1:{fake.port}"
    assert fake.methods()[-1] == "session.logout"


@pytest_twisted.ensureDeferred
async def test_xenapi_reboot_task_failures_are_readable(fake):
    fake.add_vm(VM)
    settings = _settings(xen_url=fake.url, xen_credential="xen-pool")
    fake.users["root"] = "changed"
    ctx, _ = _context(_machine(vm_uuid=VM), settings, SimpleNamespace(xen=_driver()))
    with pytest.raises(TaskFailed, match="XenAPI error: SESSION_AUTHENTICATION_FAILED root") as info:
        await xen_task.initiate(ctx)
    assert PASSWORD not in str(info.value)

    ctx, _ = _context(_machine(), settings)
    assert xen_task.not_applicable(ctx.machine) == "the machine has no xen settings"
    with pytest.raises(TaskFailed, match="cannot reboot through XenAPI: the machine has no xen settings"):
        await xen_task.TASK.run(ctx, {})
    ctx, _ = _context(_machine(vm_uuid=VM), _settings())
    with pytest.raises(TaskFailed, match="no XenAPI pool URL"):
        await xen_task.TASK.run(ctx, {})


# ---------------------------------------------------------------- as a method of the reboot task


@pytest_twisted.ensureDeferred
async def test_reboot_task_escalates_to_xenapi(fake):
    from roller.tasks import reboot

    fake.add_vm(VM)
    liveness = DownThenUp()
    settings = _settings(xen_url=fake.url, xen_credential="xen-pool", xen_start_delay=0.0,
                         reboot_methods=("ssh_reboot", "xenapi_reboot"), reboot_poll_interval=0.05,
                         reboot_down_timeout=5.0, reboot_up_timeout=5.0)
    ctx, events = _context(_machine(vm_uuid=VM), settings, SimpleNamespace(liveness=lambda m: liveness))
    result = await reboot.run(ctx, {})
    assert result.startswith(f"xenapi_reboot: xenapi reboot: VM {VM} clean shutdown; started (Running)")
    assert "ssh_reboot skipped: the machine has no ssh settings" in events
    assert fake.methods()[-1] == "session.logout"
