"""
`snmp_reboot` through the REST API over SNMPv3 (authPriv, SHA/AES) for
every PDU model: the real RollerService on the real reactor, and a real
net-snmp snmpd whose PDU tables are emulated independently of roller's
model tables (L{roller.testing.snmpd}).  The outlet is read back off, then
on; no key appears in the job.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from attrs import evolve
from twisted.internet import reactor

from roller.config import load_settings
from roller.drivers.snmp.models import MODELS
from roller.inventory import Machine
from roller.secrets import write_secrets
from roller.service import RollerService
from roller.testing.harness import ApiHarness
from roller.testing.snmpd import V3_USERS, SnmpAgent, skip_reason

SKIP = skip_reason()
# a port in each model's outlet syntax (as tests/test_snmp_pdu.py uses)
PORTS = {
    "sentry3": "BA7", "sentry4": "AA8", "apc_rpdu": "5", "apc_masterswitch": "3",
    "raritan": "12", "cyberpower": "4", "baytech": "A9", "eaton": "B2",
}


@pytest.fixture(scope="module")
def agent():
    if SKIP:
        pytest.skip(SKIP)
    with SnmpAgent(settle=0.05, reboot_off=0.15) as a:
        yield a


async def _start(tmp_path, agent: SnmpAgent) -> ApiHarness:
    secrets_file = tmp_path / "secrets.toml"
    write_secrets(secrets_file, {"pdu-v3": evolve(agent.credentials()["roller-priv"], name="pdu-v3")})
    s = load_settings(None, {}, {"auth.mode": "none", "server.listen": "tcp:0:interface=127.0.0.1",
                                 "state_dir": str(tmp_path / "state")})
    s = evolve(s, secrets_file=str(secrets_file), snmp_timeout=1.0, snmp_retries=1, snmp_min_interval=0.0,
               snmp_settle_timeout=3.0, snmp_reboot_timeout=3.0, snmp_poll_interval=0.03)
    service = RollerService(s, reactor)
    service.startService()
    await service.ready
    for model in MODELS:
        await service.store.machines.put(Machine.from_json({
            "worker_id": f"pdu-{model.replace('_', '-')}", "worker_group": "v3", "ip": "127.0.0.1",
            "pdu": {"host": agent.host, "port": agent.port, "outlet": PORTS[model], "model": model,
                    "credential": "pdu-v3"},
        }))
    return ApiHarness(service, None, reactor, group="v3")


@pytest_twisted.ensureDeferred
async def test_snmp_reboot_over_v3_through_the_api_for_every_model(tmp_path, agent):
    assert set(PORTS) == set(MODELS)
    h = await _start(tmp_path, agent)
    try:
        before = {model: len(agent.commands(model)) for model in MODELS}
        ids = {model: (await h.post(f"pdu-{model.replace('_', '-')}", "snmp_reboot"))["task_id"]
               for model in MODELS}
        keys = [k for k in V3_USERS["roller-priv"] if k and "pass-phrase" in k]
        assert keys
        for model, task_id in ids.items():
            job = await h.wait(task_id, deadline=20.0)
            assert job["state"] == "succeeded", (model, job.get("error"), [e["message"] for e in job["events"]])
            assert "rebooted by the PDU" in job["result"], (model, job["result"])
            assert "not observed" not in job["result"], (model, job["result"])  # the off phase was read back
            text = json.dumps(job)
            assert not any(k in text for k in keys), f"an SNMPv3 key leaked into the {model} job"
            assert [a for _, _, a in agent.commands(model)[before[model]:]] == ["reboot"], model
            assert agent.outlet_state(model, PORTS[model]) == "on"
    finally:
        await h.stop()
