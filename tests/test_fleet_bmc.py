"""
The fleet simulator's BMC front-ends: the Redfish service
(L{roller.sim.redfish_sim}) over real HTTP on loopback, with its
machine's L{PowerState} on a L{task.Clock}; and C{python -m
roller.sim.fleet --ipmi/--redfish} serving a real C{ipmi_sim} and the
Redfish service, written to the inventory and the secrets file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from base64 import b64encode
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from roller.inventory import Machine
from roller.secrets import load_secrets
from roller.sim import ipmisim
from roller.sim.daemon import free_port_on
from roller.sim.fleet import PowerState, fleet_addresses
from roller.sim.redfish_sim import RESET_TYPES, RedfishBmc
from roller.testing.process import read_until

PASSWORD = "bmc-pw-123"


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def bmc(clock):
    power = PowerState(clock, default_down_for=5.0, name="sim-001")
    bmc = RedfishBmc(power, users={"admin": PASSWORD}, system_id="sim-001")
    bmc.listen(_reactor(), "127.0.0.1", 0)
    yield bmc
    pytest_twisted.blockon(Deferred.fromCoroutine(bmc.stop()))


async def _call(bmc: RedfishBmc, method: str, path: str, body: Any = None, password: str = PASSWORD) -> tuple:
    r = await treq.request(method, bmc.url + path, json=body, auth=("admin", password),
                          persistent=False)
    content = await r.content()
    return r.code, json.loads(content) if content else None


SYSTEM = "/redfish/v1/Systems/sim-001"
RESET = SYSTEM + "/Actions/ComputerSystem.Reset"


@pytest_twisted.ensureDeferred
async def test_redfish_resources_and_auth(bmc):
    r = await treq.get(bmc.url + "/redfish/v1/", persistent=False)  # the service root needs no auth
    root = json.loads(await r.content())
    assert r.code == 200 and root["Systems"] == {"@odata.id": "/redfish/v1/Systems"}
    assert "SessionService" not in root
    code, systems = await _call(bmc, "GET", "/redfish/v1/Systems")
    assert code == 200 and systems["Members"] == [{"@odata.id": SYSTEM}]
    code, system = await _call(bmc, "GET", SYSTEM)
    assert code == 200 and system["PowerState"] == "On"
    assert system["Actions"]["#ComputerSystem.Reset"]["ResetType@Redfish.AllowableValues"] == list(RESET_TYPES)
    assert system["Boot"]["BootSourceOverrideEnabled"] == "Disabled"
    r = await treq.get(bmc.url + SYSTEM, auth=("admin", "wrong"), persistent=False)
    assert r.code == 401 and r.headers.getRawHeaders("www-authenticate") == ['Basic realm="roller-sim"']
    assert PASSWORD not in (await r.text())
    assert (await _call(bmc, "GET", "/redfish/v1/Systems/nope"))[0] == 404
    assert bmc.requests[:2] == ["GET /redfish/v1/", "GET /redfish/v1/Systems"]


@pytest_twisted.ensureDeferred
async def test_redfish_resets_switch_the_power_state(bmc, clock):
    power = bmc.power
    assert (await _call(bmc, "POST", RESET, {"ResetType": "ForceRestart"}))[0] == 204
    # the OS is down, but the BMC reports On through a warm reset
    assert not power.on and (await _call(bmc, "GET", SYSTEM))[1]["PowerState"] == "On"
    clock.advance(5)
    assert power.on
    assert (await _call(bmc, "POST", RESET, {"ResetType": "ForceOff"}))[0] == 204
    assert not power.on and (await _call(bmc, "GET", SYSTEM))[1]["PowerState"] == "Off"
    assert (await _call(bmc, "POST", RESET, {"ResetType": "On"}))[0] == 204
    assert power.on
    assert (await _call(bmc, "POST", RESET, {"ResetType": "PowerCycle"}))[0] == 204
    assert not power.on
    clock.advance(5)
    assert power.on
    code, error = await _call(bmc, "POST", RESET, {"ResetType": "Suspend"})
    assert code == 400 and "ActionParameterNotSupported" in error["error"]["code"]
    assert bmc.resets == ["ForceRestart", "ForceOff", "On", "PowerCycle"]
    assert [e for _, e in power.transitions()] == ["down", "up", "down", "up", "down", "up"]


@pytest_twisted.ensureDeferred
async def test_redfish_boot_override_once_is_used_by_the_next_power_on(bmc, clock):
    code, system = await _call(bmc, "PATCH", SYSTEM, {"Boot": {"BootSourceOverrideTarget": "Pxe",
                                                               "BootSourceOverrideEnabled": "Once"}})
    assert code == 200 and system["Boot"]["BootSourceOverrideTarget"] == "Pxe"
    assert system["Boot"]["BootSourceOverrideEnabled"] == "Once"
    bmc.power.reboot()
    clock.advance(5)
    bmc.power.reboot()
    clock.advance(5)
    assert bmc.boots == ["Pxe", "Hdd"]
    assert (await _call(bmc, "GET", SYSTEM))[1]["Boot"]["BootSourceOverrideEnabled"] == "Disabled"
    await _call(bmc, "PATCH", SYSTEM, {"Boot": {"BootSourceOverrideTarget": "Cd",
                                                "BootSourceOverrideEnabled": "Continuous"}})
    bmc.power.power_off()
    bmc.power.power_on()
    bmc.power.power_off()
    bmc.power.power_on()
    assert bmc.boots == ["Pxe", "Hdd", "Cd", "Cd"]
    code, _ = await _call(bmc, "PATCH", SYSTEM, {"Boot": {"BootSourceOverrideTarget": "Floppy"}})
    assert code == 400


def test_main_serves_ipmi_and_redfish_bmcs(tmp_path):
    """C{python -m roller.sim.fleet --ipmi 1 --redfish 2}: BMCs in the inventory and secrets, serving."""
    reason = ipmisim.skip_reason()
    if reason:
        pytest.skip(reason)
    addrs = fleet_addresses("127.0.7.", 2)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = subprocess.Popen(
        [sys.executable, "-m", "roller.sim.fleet", "--count", "2", "--base", "127.0.7.", "--dir",
         str(tmp_path), "--ssh-port", str(free_port_on(addrs)), "--ipmi", "1", "--redfish", "2", "--redfish-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        output = read_until(child.stdout, "Ctrl-C to stop")
        assert "Ctrl-C to stop" in output, output
        assert "ipmi          sim-001: 127.0.0.1 udp port" in output
        inventory = [Machine.from_json(d) for d in json.loads((tmp_path / "inventory.json").read_text())]
        assert [m.ip for m in inventory] == addrs
        first, second = inventory
        assert first.ipmi is not None and first.ipmi.credential == "fleet-bmc" and second.ipmi is None
        assert first.reboot_methods == ("ssh_reboot", "ipmi_reset", "redfish_reboot")
        assert second.reboot_methods == ("ssh_reboot", "redfish_reboot")
        assert second.redfish.url.startswith(f"http://{addrs[1]}:") and second.redfish.system == "sim-002"
        cred = load_secrets(tmp_path / "secrets.toml").get("fleet-bmc")
        assert cred.kind == "password" and cred.username == "admin"
        assert cred.password not in output

        # the IPMI BMC answers the real ipmitool with the machine's power
        argv = [ipmisim.IPMITOOL, "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(first.ipmi.port),
                "-U", "admin", "-E", "chassis", "power", "status"]
        out = subprocess.run(argv, env=dict(os.environ, IPMI_PASSWORD=cred.password), capture_output=True,
                             text=True, timeout=20)
        assert out.stdout.strip() == "Chassis Power is on", out
        # the Redfish service answers with basic auth
        request = urllib.request.Request(second.redfish.url + "/redfish/v1/Systems/sim-002", headers={
            "Authorization": "Basic " + b64encode(f"admin:{cred.password}".encode()).decode()})
        with urllib.request.urlopen(request, timeout=5) as r:
            assert json.loads(r.read())["PowerState"] == "On"

        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 0
        assert not ipmisim.rmcp_ping("127.0.0.1", first.ipmi.port, 0.2)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
