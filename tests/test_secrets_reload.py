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
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh.keys import Key
from twisted.internet import reactor
from twisted.internet.task import deferLater

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


# ---------------------------------------------------------------- every other kind

BASE = "127.0.14."


async def _until_up(fleet: Fleet, worker: str, deadline: float = 10.0) -> None:
    machine = fleet.machine(worker)
    end = reactor.seconds() + deadline
    while not (machine.power.on and machine.listening):
        assert reactor.seconds() < end, f"{worker} did not come back"
        await deferLater(reactor, 0.02, lambda: None)


def _key_file(path: Path, key: Key) -> None:
    """Replace the key file at C{path} (a new file renamed over it, as an operator's tools do)."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(key.toString("openssh", subtype="v1"))
    tmp.chmod(0o600)
    os.replace(tmp, path)


@pytest_twisted.ensureDeferred
async def test_every_credential_kind_follows_the_secrets_file_on_reload(tmp_path):
    if ipmisim.skip_reason():
        pytest.skip(ipmisim.skip_reason())
    good = {"bmc": "bmc-" + os.urandom(5).hex(), "community": "rw-" + os.urandom(6).hex(),
            "bugzilla": "bz-" + os.urandom(12).hex()}
    bad = {"bmc": "bad-" + os.urandom(5).hex(), "community": "guess-" + os.urandom(6).hex(),
           "bugzilla": "bzbad-" + os.urandom(12).hex()}
    fleet = Fleet(reactor, 1, BASE, free_port(BASE + "1"), reboot_delay=0.05, down_for=0.2,
                  ipmi=(0,), redfish=(0,), bmc_password=good["bmc"], bmc_dir=tmp_path / "bmc")
    await fleet.start()
    pdu = SimulatedPdu(reactor, "sentry3", community=good["community"], name="pdu1")
    pdu.attach("AA1", fleet[0].power)
    pdu.start("127.0.0.1")
    bugzilla = FakeBugzilla(api_key=good["bugzilla"], products={"Infrastructure & Operations": ["DCOps", "CIDuty"]})
    bz_port = bugzilla.listen(reactor)
    key_path = tmp_path / "roller_key"
    _key_file(key_path, fleet.user_key)
    other_key = Key(ed25519.Ed25519PrivateKey.generate())

    def credentials(v: dict) -> dict[str, Credential]:
        return {
            fleet.credential: Credential(name=fleet.credential, kind="ssh-key", path=str(key_path)),
            fleet.bmc_credential: Credential(name=fleet.bmc_credential, kind="password",
                                             username=fleet.bmc_user, password=v["bmc"]),
            "pdu": Credential(name="pdu", kind="snmp-community", community=v["community"]),
            "bugzilla": Credential(name="bugzilla", kind="token", value=v["bugzilla"]),
        }

    def inventory(entries: list[dict]) -> list[dict]:
        entries[0]["pdu"] = {"host": "127.0.0.1", "port": pdu._port.getHost().port, "outlet": "AA1",
                             "model": "sentry3", "credential": "pdu"}
        return entries

    h = await start_roller(
        tmp_path, fleet, reactor, inventory=inventory, credentials=credentials(good), bugzilla_url=bugzilla.url,
        allowed_tasks=("ssh_reboot", "power_status", "file_bugzilla_bug"), reboot_down_timeout=3.0,
        reboot_up_timeout=5.0, snmp_timeout=0.25, snmp_retries=0, snmp_min_interval=0.0,
        ipmi_min_interval=0.0, ipmi_retry_delay=0.05, ipmi_timeout=5.0,
        redfish_request_timeout=5.0, redfish_power_timeout=5.0, redfish_poll_interval=0.05)
    service = h.service
    jobs = [("ssh_reboot", None), ("power_status", {"via": "ipmi"}), ("power_status", {"via": "redfish"}),
            ("power_status", {"via": "pdu"}), ("file_bugzilla_bug", None)]

    async def outcome() -> dict[str, str]:
        out = {}
        for task, params in jobs:
            job = await h.run("sim-001", task, {"params": params} if params else None, deadline=30.0)
            out[f"{task} {json.dumps(params)}"] = job["state"] + ("" if job["state"] == "succeeded"
                                                                  else f": {job.get('error')}")
            await _until_up(fleet, "sim-001")
        return out

    def reload(v: dict, key: Key) -> None:
        current = load_secrets(service.settings.secrets_file)
        write_secrets(service.settings.secrets_file,
                      Secrets({**current.as_dict(), **credentials(v)}, clients=current.clients))
        _key_file(key_path, key)  # same path, other content: the cached parsed key must not stay
        assert service.reload_secrets()

    try:
        first = await outcome()
        assert all(v == "succeeded" for v in first.values()), first
        reload(bad, other_key)
        second = await outcome()
        assert all(v.startswith("failed") for v in second.values()), second
        reload(good, fleet.user_key)
        third = await outcome()
        assert all(v == "succeeded" for v in third.values()), third
        assert len(bugzilla.bugs) >= 1
    finally:
        await h.stop()
        pdu.stop()
        await bz_port.stopListening()


# ---------------------------------------------------------------- local Hawk clients

CLIENT = "project/releng/roller-ci"


@pytest_twisted.ensureDeferred
async def test_local_hawk_clients_follow_a_reload_and_a_replay_stays_refused(tmp_path):
    import mohawk
    import treq

    old_token, new_token = "tok-Old-" + os.urandom(8).hex(), "tok-New-" + os.urandom(8).hex()
    secrets_file = tmp_path / "secrets.toml"

    def clients(token: str) -> None:
        write_secrets(secrets_file, Secrets({}, clients={
            CLIENT: HawkClient(id=CLIENT, access_token=token, scopes=("project:releng:roller:*",))}))

    clients(old_token)
    s = load_settings(None, {}, {"server.listen": "tcp:0:interface=127.0.0.1", "state_dir": str(tmp_path / "state")})
    s = evolve(s, secrets_file=str(secrets_file), allowed_tasks=("ping",), auth_mode="local")
    service = RollerService(s, reactor)
    service.startService()
    await service.ready
    await service.store.machines.put(Machine.from_json({"worker_id": "m1", "worker_group": "g1"}))
    url = f"http://127.0.0.1:{service.ports[0].getHost().port}/api/v1/workers/m1/group/g1/jobs?task_name=ping"

    def signed(token: str) -> str:
        return mohawk.Sender(credentials={"id": CLIENT, "key": token, "algorithm": "sha256"},
                             url=url, method="POST", content="", content_type="").request_header

    async def post(header: str) -> int:
        r = await treq.post(url, headers={"Authorization": [header]}, persistent=False).addTimeout(10, reactor)
        await r.content()
        return r.code

    try:
        first = signed(old_token)
        assert await post(first) == 201
        clients(new_token)
        assert service.reload_secrets()
        assert await post(signed(new_token)) == 201
        assert await post(signed(old_token)) == 401
        # a request seen before the reload cannot be replayed after it, even
        # with its client's token back in force
        clients(old_token)
        assert service.reload_secrets()
        assert await post(first) == 401
        assert await post(signed(old_token)) == 201
    finally:
        await service.stopService()
