"""
`reboot` escalation and `reimage` end to end through BMCs: the real
RollerService on the real reactor, its REST API over HTTP, and a fleet of
simulated machines whose IPMI BMC (a real `ipmi_sim`, driven by the real
`ipmitool`) and Redfish service (roller.sim.redfish_sim) switch the
same power state their SSH server lives on.  SSH refuses to reboot, so the
escalation must go on to the BMC, and the machine must be seen down, then
up (its SSH port closes and opens again).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from roller.sim import ipmisim
from roller.sim.fleet import Fleet
from roller.testing.harness import ApiHarness, free_port, start_roller

BASE = "127.0.6."


async def _start(tmp_path: Any, *, ipmi: tuple[int, ...], redfish: tuple[int, ...], count: int) -> ApiHarness:
    fleet = Fleet(reactor, count, BASE, free_port(BASE + "1"), reboot_delay=0.1, down_for=1.5,
                  behaviour="refuse-reboot", ipmi=ipmi, redfish=redfish, bmc_dir=tmp_path / "bmc")
    await fleet.start()
    return await start_roller(
        tmp_path, fleet, reactor,
        ipmi_min_interval=0.0, ipmi_retry_delay=0.05, ipmi_power_wait=5.0, ipmi_power_poll=0.1,
        ipmi_timeout=5.0, redfish_request_timeout=5.0, redfish_power_timeout=5.0,
        redfish_poll_interval=0.05)


async def _stop(h: ApiHarness) -> None:
    await h.stop()


def _outcomes(job: dict) -> list[str]:
    return [e["message"] for e in job["events"] if e.get("data", {}).get("outcome") or
            any(w in e["message"] for w in (" skipped: ", " failed: ", " succeeded: "))]


@pytest_twisted.ensureDeferred
async def test_reboot_escalates_from_ssh_to_ipmi_reset_through_a_real_bmc(tmp_path):
    reason = ipmisim.skip_reason()
    if reason:
        pytest.skip(reason)
    h = await _start(tmp_path, ipmi=(0,), redfish=(), count=1)
    try:
        machine = h.fleet.machine("sim-001")
        bmc = h.fleet.ipmi_bmcs["sim-001"]
        job = await h.run("sim-001", "reboot")
        assert job["state"] == "succeeded", (job.get("error"), [e["message"] for e in job["events"]])
        assert job["result"].startswith("ipmi_reset: ipmi power reset sent:"), job["result"]
        messages = [e["message"] for e in job["events"]]
        assert any(m.startswith("ssh_reboot failed: no reboot command was accepted") for m in messages)
        assert any(m.startswith("ipmi_reset succeeded: down after") for m in messages)
        assert "set reset 1" in bmc.calls()
        assert [e for _, e in machine.power.transitions()] == ["down", "up"]
        assert machine.listening
        assert h.fleet.bmc_password not in json.dumps(job)
    finally:
        await _stop(h)


@pytest_twisted.ensureDeferred
async def test_reboot_escalates_to_redfish_and_reimage_pxe_boots_once(tmp_path):
    h = await _start(tmp_path, ipmi=(), redfish=(0, 1), count=2)
    try:
        # reboot: ssh refused -> redfish_reboot (ForceRestart), verified down and up
        machine = h.fleet.machine("sim-001")
        bmc = h.fleet.redfish_bmcs["sim-001"]
        job = await h.run("sim-001", "reboot")
        assert job["state"] == "succeeded", (job.get("error"), [e["message"] for e in job["events"]])
        assert job["result"].startswith("redfish_reboot: redfish reboot: ForceRestart sent;"), job["result"]
        messages = [e["message"] for e in job["events"]]
        assert any(m.startswith("ssh_reboot failed: no reboot command was accepted") for m in messages)
        assert any(m.startswith("redfish_reboot succeeded: down after") for m in messages)
        assert bmc.resets == ["ForceRestart"]
        assert [e for _, e in machine.power.transitions()] == ["down", "up"]
        assert bmc.boots == ["Hdd"]
        assert h.fleet.bmc_password not in json.dumps(job)

        # reimage: one-time PXE boot override, PowerCycle, down, up; the next boot is from disk again
        other = h.fleet.machine("sim-002")
        bmc2 = h.fleet.redfish_bmcs["sim-002"]
        job = await h.run("sim-002", "reimage")
        assert job["state"] == "succeeded", (job.get("error"), [e["message"] for e in job["events"]])
        assert job["result"].startswith("redfish: PXE boot set and PowerCycle sent;"), job["result"]
        steps = [e["message"].split(":")[0] for e in job["events"] if e["message"].startswith("step ")]
        assert steps == ["step 1/3", "step 2/3", "step 3/3"]
        assert bmc2.resets == ["PowerCycle"]
        assert bmc2.boots == ["Pxe"] and bmc2.boot_enabled == "Disabled"
        assert [e for _, e in other.power.transitions()] == ["down", "up"]

        # the generic power tasks through the same Redfish front-end: the machine really goes dark
        job = await h.run("sim-002", "power_off", {"params": {"via": "redfish"}})
        assert job["state"] == "succeeded", (job.get("error"), [e["message"] for e in job["events"]])
        assert job["result"].endswith("is Off") and not other.power.on and not other.listening
        job = await h.run("sim-002", "power_status")
        assert job["result"].startswith("power is off:")
        job = await h.run("sim-002", "power_on")
        assert job["state"] == "succeeded" and other.power.on
        assert bmc2.resets == ["PowerCycle", "ForceOff", "On"]
    finally:
        await _stop(h)
