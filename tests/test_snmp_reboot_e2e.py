"""
Reboots through a PDU outlet, end to end: the real RollerService on the real
reactor, its REST API over HTTP, the SNMP driver on the Twisted carrier, and
simulated PDUs (L{roller.sim.pdu_sim}) on loopback UDP whose outlets
power the fleet simulator's machines (their SSH ports really close while
the power is off, and stay closed while they "boot").
"""

from __future__ import annotations

import json
import os

import pytest_twisted
from twisted.internet import reactor

from roller.drivers.snmp.models import MODELS
from roller.secrets import Credential
from roller.sim.fleet import Fleet
from roller.sim.pdu_sim import SimulatedPdu
from roller.testing.harness import ApiHarness, free_port, start_roller
from roller.testing.results import eventually

BOOT = 0.3  # seconds from outlet on to the machine's SSH port listening
OFF = 0.3  # seconds a PDU reboot keeps the outlet off


def _outlet(model: str) -> str:
    return "AA1" if model.startswith("sentry") else "1"


class Harness(ApiHarness):
    """L{ApiHarness} with the simulated PDUs; no finished job may quote a community."""

    pdus: list[SimulatedPdu]
    communities: list[str]

    async def post(self, worker_id: str, task: str = "reboot", body: dict | None = None) -> str:
        return (await super().post(worker_id, task, body))["task_id"]

    async def wait(self, task_id: str, deadline: float = 15.0, **kw) -> dict:
        job = await super().wait(task_id, deadline, **kw)
        text = json.dumps(job)
        assert not any(c in text for c in self.communities), "a community leaked into the job"
        return job

    async def until_up(self, worker_id: str, deadline: float = 5.0) -> list[str]:
        """The machine's down/up transitions once it is up again."""
        power = self.fleet.machine(worker_id).power
        await eventually(lambda: power.on and self.fleet.machine(worker_id).listening, f"{worker_id} to come back",
                         timeout=deadline, describe=lambda: power.history)
        return [e for _, e in power.transitions()]

    async def stop(self) -> None:
        for sim in self.pdus:
            sim.stop()
        await super().stop()  # its HTTP connections, the service, the fleet


async def start(tmp_path, machines: list[dict]) -> Harness:
    """
    One simulated machine per entry of C{machines}: C{model} (the PDU
    model feeding it, one PDU per machine), and optionally C{credential}
    (the machine's pdu credential, default C{pdu}), C{fleet} (overrides for
    the fleet simulator) and C{inventory} (extra inventory keys).
    """
    base = "127.0.7."
    overrides = {i: m["fleet"] for i, m in enumerate(machines) if "fleet" in m}
    fleet = Fleet(reactor, len(machines), base, free_port(base + "1"), reboot_delay=0.05, down_for=1.0,
                  overrides=overrides)
    await fleet.start()
    rw, ro = "rw-" + os.urandom(6).hex(), "ro-" + os.urandom(6).hex()
    sims = []
    for i, m in enumerate(machines):
        sim = SimulatedPdu(reactor, m["model"], community=rw, read_community=ro, name=f"pdu{i + 1}",
                           boot_delay=BOOT, reboot_off=OFF)
        sim.attach(_outlet(m["model"]), fleet[i].power)
        sim.start("127.0.0.1")
        sims.append(sim)

    def inventory(entries: list[dict]) -> list[dict]:
        for sim, entry, m in zip(sims, entries, machines):
            entry["pdu"] = {"host": "127.0.0.1", "port": sim._port.getHost().port,
                            "outlet": _outlet(m["model"]), "model": "auto",
                            "credential": m.get("credential", "pdu")}
            entry["reboot_methods"] = ["ssh_reboot", "snmp_reboot"]
            entry.update(m.get("inventory", {}))
        return entries

    h = await start_roller(
        tmp_path, fleet, reactor, inventory=inventory, harness=Harness,
        credentials={
            "pdu": Credential(name="pdu", kind="snmp-community", community=rw, read_community=ro),
            "pdu-wrong": Credential(name="pdu-wrong", kind="snmp-community", community="guess-" + rw,
                                    read_community=ro),
        },
        reboot_down_timeout=2.0, reboot_up_timeout=3.0,
        snmp_timeout=0.25, snmp_retries=1, snmp_min_interval=0.0, snmp_settle_timeout=2.0,
        snmp_reboot_timeout=3.0, snmp_poll_interval=0.02)
    h.pdus, h.communities = sims, [rw, ro]
    return h


async def stop(h: Harness) -> None:
    await h.stop()


def _messages(job: dict) -> list[str]:
    return [e["message"] for e in job["events"]]


@pytest_twisted.ensureDeferred
async def test_snmp_reboot_through_the_api_for_every_model(tmp_path):
    models = sorted(MODELS)
    h = await start(tmp_path, [{"model": m} for m in models])
    try:
        ids = [await h.post(h.fleet.worker_id(i), "snmp_reboot") for i in range(len(models))]
        for i, (model, task_id) in enumerate(zip(models, ids)):
            job = await h.wait(task_id)
            worker = h.fleet.worker_id(i)
            assert job["state"] == "succeeded", (model, job)
            # The outlet was read back off (or rebooting) first, then on.
            assert "rebooted by the PDU, read back " in job["result"], job["result"]
            path = job["result"].split("read back ", 1)[1].split(" after ", 1)[0].split(" -> ")
            canonical = {label: state for state, label in MODELS[model].states.values()}
            assert [canonical[label] for label in path][-1] == "on", (model, path)
            assert canonical[path[0]] in ("off", "changing"), (model, path)
            assert "not observed" not in job["result"]
            messages = _messages(job)
            assert any(f"identified as {MODELS[model].title}" in m for m in messages), messages
            assert any(": reboot outlet " in m and "(SET " in m for m in messages), messages
            assert [a for _, _, a in h.pdus[i].commands] == ["reboot"]
            # ... and the machine really went down and came back.
            assert await h.until_up(worker) == ["down", "up"], model
    finally:
        await stop(h)


@pytest_twisted.ensureDeferred
async def test_reboot_escalates_to_the_pdu_when_ssh_fails(tmp_path):
    h = await start(tmp_path, [
        {"model": "sentry3", "fleet": {"behaviour": "refuse-reboot"}},
        {"model": "apc_rpdu", "inventory": {"ssh": {"user": "roller", "credential": "no-such-key"}}},
    ])
    try:
        refused, no_key = [await h.post(h.fleet.worker_id(i), "reboot") for i in (0, 1)]
        for i, task_id in enumerate((refused, no_key)):
            job = await h.wait(task_id)
            assert job["state"] == "succeeded", job
            assert job["result"].startswith("snmp_reboot: "), job["result"]
            messages = _messages(job)
            ssh_failed = [m for m in messages if m.startswith("ssh_reboot failed: ")]
            assert len(ssh_failed) == 1, messages
            if i == 1:
                assert "no-such-key" in ssh_failed[0]
            rest = messages[messages.index(ssh_failed[0]):]
            assert any(m.startswith("snmp_reboot: ") and "waiting for down" in m for m in rest), rest
            assert any(m.startswith("down after") for m in rest)
            assert any(m.startswith("up after") for m in rest)
            assert any(m.startswith("snmp_reboot succeeded: ") for m in rest)
            assert [a for _, _, a in h.pdus[i].commands] == ["reboot"]
            assert [e for _, e in h.fleet[i].power.transitions()] == ["down", "up"]
        assert [c[1:] for c in h.fleet[0].commands][:1] == [("reboot", 1)]
        assert h.fleet[1].commands == []
    finally:
        await stop(h)


@pytest_twisted.ensureDeferred
async def test_delayed_snmp_reboot_and_a_wrong_community(tmp_path):
    h = await start(tmp_path, [{"model": "sentry4"}, {"model": "raritan", "credential": "pdu-wrong"}])
    try:
        delayed = await h.post(h.fleet.worker_id(0), "snmp_reboot", {"params": {"delay": 1}})
        wrong = await h.post(h.fleet.worker_id(1), "snmp_reboot")
        failed = await h.wait(wrong, deadline=5.0)
        assert failed["state"] == "failed"
        error = failed["error"]
        assert "cannot switch reboot outlet 1 of PDU 127.0.0.1:" in error, error
        assert "no answer" in error and "2 attempts" in error, error
        assert "wrong write community in credential 'pdu-wrong'" in error, error
        assert h.pdus[1].commands == [] and h.fleet[1].power.transitions() == []

        job = await h.wait(delayed)
        assert job["state"] == "succeeded", job
        assert "cycled (off, 1 s, on), read back off then on" in job["result"], job["result"]
        messages = _messages(job)
        off = next(i for i, m in enumerate(messages) if ": off outlet AA1 (SET " in m)
        waited = next(i for i, m in enumerate(messages) if "outlet AA1 off after" in m and "waiting 1 s" in m)
        on = next(i for i, m in enumerate(messages) if ": on outlet AA1 (SET " in m)
        assert off < waited < on
        assert [a for _, _, a in h.pdus[0].commands] == ["off", "on"]
        (t_off, _, _), (t_on, _, _) = h.pdus[0].commands
        assert t_on - t_off >= 1.0
        assert await h.until_up(h.fleet.worker_id(0)) == ["down", "up"]
    finally:
        await stop(h)
