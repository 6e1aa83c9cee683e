"""
Tests for the PDU models, the per-PDU pacer, the PDU outlet power driver
and the power tasks.

The pacer and the models are unit-tested on a L{task.Clock}.  The driver
and the tasks run against a real net-snmp C{snmpd} whose PDU tables are
emulated by a C{pass_persist} script (L{roller.testing.snmpd}), written
from the vendors' MIBs independently of L{roller.drivers.snmp.models}.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from roller.drivers.power import IPowerDriver, PowerError, PowerTimeout
from roller.drivers.snmp import make_pdus
from roller.drivers.snmp.client import SnmpClient
from roller.drivers.snmp.models import MODELS, model_for_sys_object_id, parse_outlet
from roller.drivers.snmp.pdu import EndpointPacer, SnmpPdus
from roller.inventory import PDU_MODELS, Machine
from roller.jobs import Job
from roller.secrets import Credential, Secrets
from roller.tasks import TaskContext, TaskFailed
from roller.tasks import pdu as pdu_tasks
from roller.testing.snmpd import SilentAgent, SnmpAgent, skip_reason

SKIP = skip_reason()
needs_snmpd = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

# A port in each model's outlet syntax, on a unit/feed other than the first
# where the model has them.
PORTS = {
    "sentry3": "BA7", "sentry4": "AA8", "apc_rpdu": "5", "apc_masterswitch": "3",
    "raritan": "12", "cyberpower": "4", "baytech": "A9", "eaton": "B2",
}


# ---------------------------------------------------------------- models


def test_every_inventory_model_has_a_driver():
    assert set(PDU_MODELS) == set(MODELS) | {"auto"}
    for model in MODELS.values():
        outlet = model.outlet(PORTS[model.name])
        for action in ("on", "off", "reboot"):
            oid, value = model.command(outlet, action)
            assert all(p.isdigit() for p in oid.split(".")), oid
            assert isinstance(value, int)
        assert model.native_reboot
        assert model.decode(10_000).state == "unknown"
        assert {s for s, _ in model.states.values()} >= {"on", "off"}


def test_outlet_names():
    assert parse_outlet("AA8", 2) == parse_outlet("8", 2).__class__("AA8", 1, 1, 8)
    b = parse_outlet("bc12", 2)
    assert (b.unit, b.feed, b.number) == (2, 3, 12)
    assert MODELS["sentry3"].command(parse_outlet("AA8", 2), "reboot") == \
        ("1.3.6.1.4.1.1718.3.2.3.1.11.1.1.8", 3)
    assert MODELS["eaton"].command(MODELS["eaton"].outlet("8"), "off") == \
        ("1.3.6.1.4.1.534.6.6.7.6.6.1.3.0.8", 0)
    with pytest.raises(ValueError, match="numbers its outlets"):
        MODELS["apc_rpdu"].outlet("A8")
    with pytest.raises(ValueError, match="at most 1 letter"):
        MODELS["raritan"].outlet("AA8")
    for bad in ("", "0", "AAA1", "8A", "-1", "A 8"):
        with pytest.raises(ValueError):
            parse_outlet(bad, 2)


def test_sys_object_id_longest_prefix_on_whole_arcs():
    assert model_for_sys_object_id("1.3.6.1.4.1.1718.3").name == "sentry3"
    assert model_for_sys_object_id(".1.3.6.1.4.1.1718.4.2").name == "sentry4"
    assert model_for_sys_object_id("1.3.6.1.4.1.318.1.3.4.5").name == "apc_rpdu"
    assert model_for_sys_object_id("1.3.6.1.4.1.318.1.3.4.1").name == "apc_masterswitch"
    assert model_for_sys_object_id("1.3.6.1.4.1.13742.6").name == "raritan"
    assert model_for_sys_object_id("1.3.6.1.4.1.534.6.6.7").name == "eaton"
    assert model_for_sys_object_id("1.3.6.1.4.1.17180") is None
    assert model_for_sys_object_id("1.3.6.1.4.1.8072.3.2.10") is None


# ---------------------------------------------------------------- pacer


class Op:
    """An operation the test finishes by hand."""

    def __init__(self, clock: Clock, log: list, name: str):
        self.clock, self.log, self.name = clock, log, name
        self.d: Deferred | None = None
        self.cancelled = False

    def __call__(self) -> Deferred:
        self.log.append((self.clock.seconds(), self.name))
        self.d = Deferred(lambda d: setattr(self, "cancelled", True))
        return self.d


def test_pacer_serialises_per_key_with_a_minimum_interval():
    clock = Clock()
    pacer = EndpointPacer(clock, min_interval=2.0)
    log: list = []
    a1, a2, b1 = Op(clock, log, "a1"), Op(clock, log, "a2"), Op(clock, log, "b1")
    d1, d2, d3 = pacer.run("pdu-a", a1), pacer.run("pdu-a", a2), pacer.run("pdu-b", b1)
    assert log == [(0, "a1"), (0, "b1")]  # another PDU does not wait
    assert pacer.waiting("pdu-a") == 1
    clock.advance(5)
    a1.d.callback("one")
    assert d1.result == "one"
    clock.advance(1.9)
    assert len(log) == 2
    clock.advance(0.1)
    assert log[-1] == (7.0, "a2")
    a2.d.errback(ValueError("boom"))
    d2.addErrback(lambda f: f.trap(ValueError))
    b1.d.callback("b")
    assert d3.result == "b"
    clock.advance(10)
    assert pacer._lanes == {}  # idle keys are forgotten


def test_pacer_cancel_waiting_and_running():
    clock = Clock()
    pacer = EndpointPacer(clock, min_interval=1.0)
    log: list = []
    ops = [Op(clock, log, f"op{i}") for i in range(3)]
    ds = [pacer.run("pdu", op) for op in ops]
    ds[1].cancel()  # waiting: dropped from the queue
    ds[1].addErrback(lambda f: f.trap(CancelledError))
    ds[0].cancel()  # running: its Deferred is cancelled
    assert ops[0].cancelled
    ds[0].addErrback(lambda f: f.trap(CancelledError))
    clock.advance(1.0)
    assert [n for _, n in log] == ["op0", "op2"]


def test_a_dead_pdu_never_delays_another():
    clock = Clock()
    pacer = EndpointPacer(clock, min_interval=1.0)
    log: list = []
    dead = [Op(clock, log, f"dead{i}") for i in range(3)]
    for op in dead:
        pacer.run("dead-pdu", op)
    live = Op(clock, log, "live")
    d = pacer.run("live-pdu", live)
    live.d.callback("ok")
    assert d.result == "ok" and pacer.waiting("dead-pdu") == 2


# ---------------------------------------------------------------- driver on a real agent


@pytest.fixture(scope="module")
def agent():
    if SKIP:
        pytest.skip(SKIP)
    with SnmpAgent(settle=0.05, reboot_off=0.15) as a:
        yield a


@pytest.fixture
def pdus():
    p = SnmpPdus(global_reactor, SnmpClient(global_reactor, timeout=1.0, retries=1),
                 min_interval=0.0, settle_timeout=3.0, reboot_timeout=3.0, poll_interval=0.03,
                 default_off_for=0.1)
    yield p
    p.client.close()


@needs_snmpd
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("model", sorted(MODELS))
async def test_each_model_switches_and_reads_back(agent, pdus, model):
    port = PORTS[model]
    for cred in ("v2c", "roller-priv"):
        progress: list[str] = []
        power = pdus.outlet(agent.host, port, agent.credentials()[cred], model=model,
                            port=agent.port, on_progress=progress.append)
        verifyObject(IPowerDriver, power)
        off = await power.off()
        assert off.state == "off", off
        assert agent.outlet_state(model, port) == "off"
        assert (await power.status()).state == "off"
        on = await power.on()
        assert on.state == "on" and agent.outlet_state(model, port) == "on"
        assert "switched on, read back" in on.detail
        cycled = await power.cycle()  # the PDU's own reboot
        assert cycled.state == "on"
        assert "rebooted by the PDU" in cycled.detail
        assert "not observed" not in cycled.detail  # the off phase was seen
        assert any("SET" in line for line in progress)
    actions = [action for _, _, action in agent.commands(model)]
    assert actions == ["off", "on", "reboot"] * 2


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_delayed_cycle_reads_back_off_then_on(agent, pdus):
    power = pdus.outlet(agent.host, "AB3", agent.credentials()["roller-sha512"], model="sentry3",
                        port=agent.port)
    result = await power.cycle(off_for=0.2)
    assert result.state == "on"
    assert "cycled (off, 0.2 s, on)" in result.detail and "offWait" in result.detail
    (t_off, _, off), (t_on, _, on) = [c for c in agent.commands("sentry3") if c[1].endswith(":1.2.3")]
    assert (off, on) == ("off", "on")
    assert t_on >= t_off + 0.2  # the agent saw the on no sooner than off_for after the off


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_outlet_that_does_not_exist(agent, pdus):
    power = pdus.outlet(agent.host, "99", agent.credentials()["v2c"], model="apc_rpdu", port=agent.port)
    with pytest.raises(PowerError) as e:
        await power.off()
    assert e.value.kind in ("refused", "config")
    assert "outlet 99" in str(e.value)
    with pytest.raises(PowerError) as e:
        await power.status()
    assert e.value.kind == "config" and "check pdu.model and pdu.outlet" in str(e.value)


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_auto_detects_the_model_from_sys_object_id(pdus):
    with SnmpAgent(sys_object_id="1.3.6.1.4.1.1718.3", settle=0.05) as a:
        power = pdus.outlet(a.host, "AA8", a.credentials()["v2c"], port=a.port)
        result = await power.off()
        assert result.state == "off" and "(auto" in power.description
        assert a.outlet_state("sentry3", "AA8") == "off"
        assert pdus._models[(a.host, a.port)][0].name == "sentry3"
        # concurrent first uses share one detection
        pdus.forget_model(a.host, a.port)
        both = await gatherResults([power.status(), power.status()])
        assert [r.state for r in both] == ["off", "off"]


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_auto_with_an_unknown_device_says_what_to_do(agent, pdus):
    power = pdus.outlet(agent.host, "8", agent.credentials()["v2c"], port=agent.port)
    with pytest.raises(PowerError) as e:
        await power.on()
    assert e.value.kind == "config"
    assert "1.3.6.1.4.1.8072.3.2.10" in str(e.value) and "set pdu.model" in str(e.value)


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_an_outlet_that_does_not_switch_in_time_fails_after_sending(pdus):
    with SnmpAgent(settle=5.0) as slow:
        power = pdus.outlet(slow.host, "1", slow.credentials()["v2c"], model="eaton", port=slow.port)
        pdus.settle_timeout = 0.3
        with pytest.raises(PowerError) as e:
            await power.off()
        assert e.value.kind == "unreached" and e.value.sent
        assert "did not read back off within 0.3 s" in str(e.value) and "pendingOff" in str(e.value)


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_a_dead_pdu_times_out_without_delaying_a_live_one(agent):
    pdus = SnmpPdus(global_reactor, SnmpClient(global_reactor, timeout=0.4, retries=1),
                    min_interval=0.2, settle_timeout=3.0, poll_interval=0.03)
    try:
        with SilentAgent() as silent:
            creds = agent.credentials()
            dead = pdus.outlet(silent.host, "1", creds["v2c"], model="apc_rpdu", port=silent.port)
            live = pdus.outlet(agent.host, "6", creds["v2c"], model="apc_rpdu", port=agent.port)
            dead_d = dead.off()
            dead_d2 = dead.on()  # queued behind the first on the dead PDU
            live_d = live.off()
            # The live PDU's SET went out at once, beside the dead one's (not queued behind it):
            assert pdus.client.in_flight == 2
            result = await live_d
            assert result.state == "off"
            with pytest.raises(PowerTimeout) as e:
                await dead_d
            assert e.value.sent and "no answer from" in str(e.value)
            dead_d2.cancel()
            with pytest.raises(CancelledError):
                await dead_d2
    finally:
        pdus.client.close()


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_one_pdu_gets_one_request_at_a_time(agent):
    pdus = SnmpPdus(global_reactor, SnmpClient(global_reactor, timeout=1.0, retries=1),
                    min_interval=0.1, settle_timeout=3.0, poll_interval=0.01)
    try:
        creds = agent.credentials()
        outlets = [pdus.outlet(agent.host, str(n), creds["v2c"], model="cyberpower", port=agent.port)
                   for n in (10, 11, 12)]
        busy = []
        original = pdus.client.get

        def watch(*a: Any, **kw: Any):
            busy.append(pdus.pacer.busy(pdus.key(agent.host, agent.port)))
            return original(*a, **kw)

        pdus.client.get = watch
        results = await gatherResults([o.off() for o in outlets])
        assert [r.state for r in results] == ["off"] * 3
        times = sorted(t for t, p, a in agent.commands("cyberpower") if p.split(":")[1] in ("10", "11", "12"))
        assert len(times) == 3
        assert all(b - a >= 0.1 for a, b in zip(times, times[1:]))
        assert all(busy)
    finally:
        pdus.client.close()


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_cancelling_an_action_cancels_the_driver(pdus):
    with SilentAgent() as silent:
        power = pdus.outlet(silent.host, "AA1", Credential(name="c", kind="snmp-community",
                                                            community="x"), model="sentry4",
                            port=silent.port)
        d = power.off()
        d.cancel()
        with pytest.raises(CancelledError):
            await d
        assert pdus.client.in_flight == 0 and not pdus.client._inflight


# ---------------------------------------------------------------- tasks


def _context(agent: SnmpAgent, pdus: SnmpPdus, pdu: dict | None, task: str = "power_on",
             secrets: Secrets | None = None):
    data: dict[str, Any] = {"worker_id": "w1", "worker_group": "g", "ip": "127.0.0.9"}
    if pdu is not None:
        data["pdu"] = pdu
    machine = Machine.from_json(data)
    events: list[tuple[str, dict]] = []
    job = Job(id="j", task_name=task, worker_id="w1", worker_group="g", created_at=0.0)
    ctx = TaskContext(job=job, machine=machine, reactor=global_reactor,
                      log=lambda m, **d: events.append((m, d)),
                      secrets=secrets if secrets is not None else Secrets(agent.credentials()),
                      drivers=SimpleNamespace(pdus=pdus))
    return ctx, events


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_power_tasks(agent, pdus):
    pdu = {"host": agent.host, "port": agent.port, "outlet": "7", "model": "raritan",
           "credential": "roller-priv"}
    ctx, events = _context(agent, pdus, pdu)
    for spec in pdu_tasks.TASKS:
        assert spec.endpoints(ctx.machine) == (f"pdu:{agent.host}",)
    result = await pdu_tasks.POWER_OFF.run(ctx, {})
    assert "switched off" in result and agent.outlet_state("raritan", "7") == "off"
    assert (await pdu_tasks.POWER_STATUS.run(ctx, {})).startswith("power is off")
    result = await pdu_tasks.POWER_ON.run(ctx, {})
    assert "switched on" in result and agent.outlet_state("raritan", "7") == "on"
    result = await pdu_tasks.POWER_CYCLE.run(ctx, pdu_tasks.POWER_CYCLE.parse_params({"off_for": 0.1}))
    assert "cycled (off, 0.1 s, on)" in result
    result = await pdu_tasks.POWER_CYCLE.run(ctx, pdu_tasks.POWER_CYCLE.parse_params({}))
    assert "rebooted by the PDU" in result
    assert any("SET" in m for m, _ in events)
    assert [a for _, _, a in agent.commands("raritan") if True][-5:] == ["off", "on", "off", "on", "reboot"]


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_snmp_reboot_task_native_and_delayed(agent, pdus):
    pdu = {"host": agent.host, "port": agent.port, "outlet": "AA8", "model": "sentry3",
           "credential": "v2c"}
    ctx, events = _context(agent, pdus, pdu, task="snmp_reboot")
    spec = pdu_tasks.SNMP_REBOOT
    assert spec.parse_params({}) == {"delay": 0}
    result = await spec.run(ctx, spec.parse_params({}))
    assert "rebooted by the PDU" in result
    result = await spec.run(ctx, spec.parse_params({"delay": 0}))
    before = len(agent.commands("sentry3"))
    # The seed's delayed variant: off, wait, on (1 s here).
    result = await spec.run(ctx, spec.parse_params({"delay": 1}))
    assert "cycled (off, 1 s, on)" in result
    (t_off, _, off), (t_on, _, on) = agent.commands("sentry3")[before:]
    assert (off, on) == ("off", "on") and t_on >= t_off + 1.0  # on no sooner than the delay after off
    assert pdu_tasks.not_applicable(ctx.machine) is None
    # as a method of the reboot task: initiate() returns a line
    line = await pdu_tasks.initiate(ctx)
    assert "rebooted by the PDU" in line


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_tasks_fail_clearly(agent, pdus):
    ctx, _ = _context(agent, pdus, None)
    assert "no pdu settings" in pdu_tasks.not_applicable(ctx.machine)
    with pytest.raises(TaskFailed, match="none of pdu, ipmi, redfish or xen settings"):
        await pdu_tasks.POWER_ON.run(ctx, {})
    with pytest.raises(TaskFailed, match="cannot reboot through a PDU"):
        await pdu_tasks.SNMP_REBOOT.run(ctx, {"delay": 0})
    pdu = {"host": agent.host, "port": agent.port, "outlet": "1", "model": "eaton",
           "credential": "missing"}
    ctx, _ = _context(agent, pdus, pdu)
    with pytest.raises(TaskFailed, match="unknown credential 'missing'"):
        await pdu_tasks.POWER_OFF.run(ctx, {})
    secrets = Secrets({"ssh": Credential(name="ssh", kind="ssh-key", path="/k")})
    ctx, _ = _context(agent, pdus, dict(pdu, credential="ssh"), secrets=secrets)
    with pytest.raises(TaskFailed, match="SNMP needs snmp-community or snmp-v3"):
        await pdu_tasks.POWER_OFF.run(ctx, {})
    wrong = Secrets({"bad": Credential(name="bad", kind="snmp-v3", user="roller-priv",
                                       auth_protocol="SHA", auth_key="definitely-wrong",
                                       priv_protocol="AES", priv_key="priv-pass-phrase-1")})
    ctx, events = _context(agent, pdus, dict(pdu, credential="bad"), secrets=wrong)
    with pytest.raises(TaskFailed) as e:
        await pdu_tasks.POWER_STATUS.run(ctx, {})
    assert "wrong digest" in str(e.value) and "definitely-wrong" not in str(e.value)


def test_make_pdus_from_settings_defaults():
    clock = Clock()
    settings = SimpleNamespace(snmp_timeout=3.0, snmp_retries=1, snmp_min_interval=2.0,
                               snmp_community_version="1", snmp_credential="pdu")
    pdus = make_pdus(clock, settings)
    assert (pdus.client.timeout, pdus.client.retries, pdus.pacer.min_interval) == (3.0, 1, 2.0)
    assert pdus.community_version == "1" and pdus.default_credential == "pdu"
    defaults = make_pdus(clock, None)
    assert defaults.pacer.min_interval == 1.0 and defaults.community_version is None


# ---------------------------------------------------------------- simulated PDU (fleet front-end)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("model", ["sentry3", "eaton", "apc_masterswitch"])
async def test_simulated_pdu_switches_the_fleet_power_state(model):
    from roller.sim.fleet import PowerState
    from roller.sim.pdu_sim import SimulatedPdu

    power = PowerState(global_reactor, on=True, default_down_for=0.1, name="m1")
    sim = SimulatedPdu(global_reactor, model, community="rw-secret", read_community="ro-secret")
    outlet = "AA3" if model == "sentry3" else "3"
    sim.attach(outlet, power)
    port = sim.start("127.0.0.1")
    pdus = SnmpPdus(global_reactor, SnmpClient(global_reactor, timeout=0.3, retries=0),
                    min_interval=0.0, settle_timeout=2.0, reboot_timeout=2.0, poll_interval=0.02)
    cred = Credential(name="sim", kind="snmp-community", community="rw-secret", read_community="ro-secret")
    try:
        driver = pdus.outlet("127.0.0.1", outlet, cred, port=port)  # auto
        assert (await driver.off()).state == "off" and not power.on
        assert (await driver.on()).state == "on" and power.on
        result = await driver.cycle()
        assert result.state == "on" and power.on
        assert power.events()[-3:] == ["reboot", "down", "up"]
        assert [a for _, _, a in sim.commands] == ["off", "on", "reboot"]
        wrong = Credential(name="wrong", kind="snmp-community", community="guess")
        with pytest.raises(PowerTimeout):
            await pdus.outlet("127.0.0.1", outlet, wrong, model=model, port=port).status()
    finally:
        power.stop()
        sim.stop()
        pdus.client.close()


def test_generic_power_tasks_pick_the_pdu_or_the_bmc():
    from roller.drivers.power import PowerResult

    class FakeDriver:
        description = "fake"

        def __init__(self, kind: str):
            self.kind = kind
            self.machines: list = []

        def for_machine(self, machine, secrets, *, on_progress=None):
            self.machines.append(machine.worker_id)
            return self

        def on(self):
            return succeed(PowerResult("on", f"{self.kind} on"))

    from twisted.internet.defer import succeed

    pdu, ipmi = FakeDriver("pdu"), FakeDriver("ipmi")

    def ctx_for(data: dict) -> TaskContext:
        machine = Machine.from_json({"worker_id": "w2", "worker_group": "g", **data})
        job = Job(id="j", task_name="power_on", worker_id="w2", worker_group="g", created_at=0.0)
        return TaskContext(job=job, machine=machine, reactor=Clock(), log=lambda m, **d: None,
                           secrets=Secrets({}), drivers=SimpleNamespace(pdus=pdu, ipmi=ipmi))

    both = ctx_for({"pdu": {"host": "10.0.0.2", "outlet": "AA1"}, "ipmi": {"host": "10.0.1.2"}})
    bmc_only = ctx_for({"ipmi": {"host": "10.0.1.3"}})
    run = pdu_tasks.POWER_ON.run

    def result(ctx: TaskContext, params: dict) -> Any:
        out: list = []
        Deferred.fromCoroutine(run(ctx, pdu_tasks.POWER_ON.parse_params(params))).addBoth(out.append)
        return out[0]

    assert result(both, {}) == "pdu on"
    assert result(both, {"via": "ipmi"}) == "ipmi on"
    assert result(bmc_only, {}) == "ipmi on"
    failure = result(bmc_only, {"via": "pdu"})
    assert failure.check(TaskFailed) and "has no pdu settings" in str(failure.value)
    assert pdu_tasks.POWER_ON.endpoints(both.machine) == ("pdu:10.0.0.2", "bmc:10.0.1.2")
    assert pdu_tasks.SNMP_REBOOT.endpoints(both.machine) == ("pdu:10.0.0.2",)
