"""
`reboot` end to end: the real RollerService on the real reactor, its REST
API over HTTP, the Conch SSH driver, and a fleet of simulated machines that
really stop listening while "down".  Short simulated delays keep it quick.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from roller.inventory import IpmiAccess
from roller.secrets import Credential, load_secrets
from roller.sim import ipmisim
from roller.sim.fleet import Fleet
from roller.testing.harness import ApiHarness, free_port, start_roller


async def start(tmp_path, count: int, overrides: dict | None = None, extra_credentials: dict | None = None,
                **settings: Any) -> ApiHarness:
    base = "127.0.4."
    fleet = Fleet(reactor, count, base, free_port(base + "1"), reboot_delay=0.1, down_for=1.5,
                  overrides=overrides)
    await fleet.start()
    return await start_roller(tmp_path, fleet, reactor, credentials=extra_credentials or {}, **settings)


async def stop(h: ApiHarness) -> None:
    await h.stop()


@pytest_twisted.ensureDeferred
async def test_reboot_over_ssh_is_verified_down_and_up(tmp_path):
    h = await start(tmp_path, 2)
    try:
        created = await h.post("sim-001")
        job = await h.wait(created["task_id"])
        assert job["state"] == "succeeded", job
        assert job["result"].startswith("ssh_reboot: ssh reboot sent (`reboot` accepted). Completed in")
        messages = [e["message"] for e in job["events"]]
        assert any("waiting for down" in m for m in messages)
        assert any(m.startswith("down after") and "waiting for up" in m for m in messages)
        assert any(m.startswith("up after") for m in messages)
        machine = h.fleet.machine("sim-001")
        assert [e for _, e in machine.power.transitions()] == ["down", "up"]
        assert [c[1] for c in machine.commands][:1] == ["reboot"]
        # the other machine was not touched
        assert h.fleet.machine("sim-002").power.transitions() == []
    finally:
        await stop(h)


@pytest_twisted.ensureDeferred
async def test_escalation_cases(tmp_path):
    h = await start(tmp_path, 4, overrides={1: {"behaviour": "refuse-reboot"},
                                            2: {"behaviour": "never-down"},
                                            3: {"behaviour": "hang"}})
    try:
        ids = {}
        for n in (2, 3, 4):
            ids[n] = (await h.post(f"sim-00{n}", body={"params": {"methods": "ssh_reboot,file_bugzilla_bug"}}))["task_id"]
        refused = await h.wait(ids[2])
        assert refused["state"] == "failed"
        assert refused["error"].startswith("failed: ssh_reboot failed: no reboot command was accepted: "
                                           "`reboot` exited 1")
        assert "file_bugzilla_bug skipped: bugzilla.url is not configured" in refused["error"]
        never_down = await h.wait(ids[3])
        assert never_down["state"] == "failed"
        assert "did not go down within 3 s" in never_down["error"]
        hung = await h.wait(ids[4])
        assert hung["state"] == "failed"
        assert hung["error"].startswith("failed: ssh_reboot failed: timed out after 1 s connecting to roller@127.0.4.4")
    finally:
        await stop(h)


@pytest_twisted.ensureDeferred
async def test_unknown_host_key_is_refused_and_never_commanded(tmp_path):
    h = await start(tmp_path, 1)
    try:
        # forget the fleet's host keys: strict policy must refuse to talk
        open(h.service.settings.ssh_known_hosts, "w").close()
        job = await h.wait((await h.post("sim-001", body={"params": {"methods": ["ssh_reboot"]}}))["task_id"])
        assert job["state"] == "failed"
        assert "not in" in job["error"] and "known_hosts" in job["error"]
        assert h.fleet.machine("sim-001").commands == []
    finally:
        await stop(h)


@pytest_twisted.ensureDeferred
async def test_cancel_while_waiting_for_up(tmp_path):
    h = await start(tmp_path, 1)
    h.fleet.machine("sim-001").down_for = 30.0
    try:
        task_id = (await h.post("sim-001"))["task_id"]
        await h.wait(task_id, until=lambda j: any(e["message"].startswith("down after") for e in j["events"]))
        r = await treq.delete(f"{h.url}/api/v1/jobs/{task_id}", pool=h.pool)
        assert r.code == 200
        job = await h.job(task_id)
        assert job["state"] == "cancelled"
        assert job["error"] == "cancelled by anonymous"
    finally:
        h.fleet.machine("sim-001").power.power_on()
        await stop(h)


@pytest_twisted.ensureDeferred
async def test_many_machines_rebooted_at_once(tmp_path):
    count = 60
    h = await start(tmp_path, count)
    try:
        ids = [(await h.post(f"sim-{n:03d}"))["task_id"] for n in range(1, count + 1)]
        jobs = [await h.wait(i) for i in ids]
        assert [j["state"] for j in jobs] == ["succeeded"] * count, [
            (j["worker_id"], j["error"]) for j in jobs if j["state"] != "succeeded"]
        assert all([e for _, e in m.power.transitions()] == ["down", "up"] for m in h.fleet.machines)
    finally:
        await stop(h)


@pytest_twisted.ensureDeferred
async def test_reimage_sets_pxe_and_cycles_through_a_real_bmc(tmp_path):
    sim_skip = ipmisim.skip_reason()
    if sim_skip:
        pytest.skip(sim_skip)
    h = await start(tmp_path, 1, extra_credentials={"bmc": Credential(
        name="bmc", kind="password", username="admin", password="bmc-" + os.urandom(4).hex())},
        ipmi_min_interval=0.0, ipmi_retry_delay=0.05, ipmi_power_wait=5.0, ipmi_power_poll=0.1, ipmi_timeout=5.0)
    machine = h.fleet.machine("sim-001")
    password = load_secrets(h.service.settings.secrets_file).get("bmc").password
    bmc = ipmisim.IpmiSim(workdir=tmp_path / "bmc", power=machine.power, reactor=reactor, password=password)
    bmc.start()
    try:
        m = await h.service.store.machines.get("sim", "sim-001")
        await h.service.store.machines.put(m.replace(ipmi=IpmiAccess(host="127.0.0.1", port=bmc.port,
                                                                     credential="bmc")))
        created = await h.post("sim-001", task="reimage")
        job = await h.wait(created["task_id"])
        assert job["state"] == "succeeded", job
        assert job["result"].startswith("ipmi: PXE boot set and ipmi power cycle sent")
        steps = [e["message"] for e in job["events"] if e["message"].startswith("step ")]
        assert [m.split(":")[0] for m in steps] == ["step 1/3", "step 2/3", "step 3/3"]
        assert bmc.boot_device == "pxe"
        assert [e for _, e in machine.power.transitions()][:2] == ["down", "up"]
        assert password not in json.dumps(job)
    finally:
        bmc.stop()
        await stop(h)
