"""
Several PDUs with the same SNMPv3 user name and keys of their own, through
the REST API: three real net-snmp snmpd agents on three loopback addresses
(three PDU hosts for roller's queue), each knowing the user C{pduadmin}
with other pass phrases and other protocols (SHA/AES, SHA-256/AES-256,
MD5/DES).  Three credentials name that user, one per PDU.  Jobs on every
PDU run at the same time, and every one switches its outlet; a credential
with the right user but another PDU's keys is refused by the agent.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from attrs import evolve
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from roller.config import load_settings
from roller.inventory import Machine
from roller.secrets import write_secrets
from roller.service import RollerService
from roller.testing.harness import ApiHarness
from roller.testing.snmpd import SnmpAgent, skip_reason

SKIP = skip_reason()
USER = "pduadmin"
#: PDU -> (loopback address, the user's protocols and pass phrases there)
PDUS = {
    "a": ("127.0.12.1", ("SHA", "alpha-auth-phrase", "AES", "alpha-priv-phrase", "priv")),
    "b": ("127.0.12.2", ("SHA256", "bravo-auth-phrase", "AES256", "bravo-priv-phrase", "priv")),
    "c": ("127.0.12.3", ("MD5", "charlie-auth-phrase", "DES", "charlie-priv-phrase", "priv")),
}
OUTLETS = ("3", "5")
MODEL = "apc_rpdu"


@pytest.fixture(scope="module")
def agents():
    if SKIP:
        pytest.skip(SKIP)
    started: dict[str, SnmpAgent] = {}
    try:
        for name, (host, keys) in PDUS.items():
            started[name] = SnmpAgent(host=host, users={USER: keys}, settle=0.05, reboot_off=0.15).start()
        yield started
    finally:
        for agent in started.values():
            agent.close()


def credential(agent: SnmpAgent, name: str):
    return evolve(agent.credentials()[USER], name=name)


async def start(tmp_path, agents: dict[str, SnmpAgent]) -> ApiHarness:
    creds = {f"pdu-{n}": credential(a, f"pdu-{n}") for n, a in agents.items()}
    # the user of PDU a with the keys of PDU b: must not work on a
    creds["pdu-a-wrong"] = credential(agents["b"], "pdu-a-wrong")
    assert len({c.user for c in creds.values()}) == 1
    secrets_file = tmp_path / "secrets.toml"
    write_secrets(secrets_file, creds)
    s = load_settings(None, {}, {"auth.mode": "none", "server.listen": "tcp:0:interface=127.0.0.1",
                                 "state_dir": str(tmp_path / "state")})
    s = evolve(s, secrets_file=str(secrets_file), snmp_timeout=3.0, snmp_retries=1, snmp_min_interval=0.0,
               snmp_settle_timeout=5.0, snmp_reboot_timeout=5.0, snmp_poll_interval=0.03)
    service = RollerService(s, reactor)
    service.startService()
    await service.ready
    for n, agent in agents.items():
        for outlet in OUTLETS:
            await service.store.machines.put(Machine.from_json({
                "worker_id": f"m-{n}-{outlet}", "worker_group": "v3keys", "ip": "127.0.0.1",
                "pdu": {"host": agent.host, "port": agent.port, "outlet": outlet, "model": MODEL,
                        "credential": f"pdu-{n}"},
            }))
    await service.store.machines.put(Machine.from_json({
        "worker_id": "m-a-wrong", "worker_group": "v3keys", "ip": "127.0.0.1",
        "pdu": {"host": agents["a"].host, "port": agents["a"].port, "outlet": "7", "model": MODEL,
                "credential": "pdu-a-wrong"},
    }))
    return ApiHarness(service, None, reactor, group="v3keys")


def together(coroutines) -> Deferred:
    return gatherResults([Deferred.fromCoroutine(c) for c in coroutines])


def secrets_of(agents: dict[str, SnmpAgent]) -> set[str]:
    return {k for a in agents.values() for keys in a.users.values() for k in keys if k and "phrase" in k}


@pytest_twisted.ensureDeferred
async def test_pdus_sharing_a_user_name_with_their_own_keys_work_side_by_side_and_at_once(tmp_path, agents):
    h = await start(tmp_path, agents)
    try:
        before = {n: len(a.commands(MODEL)) for n, a in agents.items()}
        # every job of every PDU submitted before any is awaited: they run together
        posted = await together([h.post(f"m-{n}-{o}", "snmp_reboot") for n in agents for o in OUTLETS])
        jobs = await together([h.wait(p["task_id"], deadline=30.0) for p in posted])
        for p, job in zip(posted, jobs):
            assert job["state"] == "succeeded", (p["worker_id"], job.get("error"),
                                                 [e["message"] for e in job["events"]])
            assert "rebooted by the PDU" in job["result"], job["result"]
        for n, agent in agents.items():
            done = agent.commands(MODEL)[before[n]:]
            # each agent received its own machines' reboots and no other (a SET whose answer came after
            # the timeout on a starved machine is sent again: the same outlet twice is no mix-up)
            assert sorted({port for _, port, _ in done}) == sorted(f"{MODEL}:{o}" for o in OUTLETS), n
            assert {a for _, _, a in done} == {"reboot"}
        # jobs on different PDUs ran at the same time (one PDU runs one job at
        # a time): the first job of each PDU started before any of them ended
        firsts = [min((j for p, j in zip(posted, jobs) if p["worker_id"].startswith(f"m-{n}-")),
                      key=lambda j: j["started"]) for n in agents]
        assert max(j["started"] for j in firsts) < min(j["finished"] for j in firsts), "the PDUs ran one by one"
        # and again, now that every engine knows its agent
        again = await together([h.run(f"m-{n}-{OUTLETS[0]}", "power_status") for n in agents])
        assert [j["state"] for j in again] == ["succeeded"] * len(agents), [j.get("error") for j in again]

        # the right user with another PDU's keys: the agent refuses it
        wrong = await h.run("m-a-wrong", "power_status")
        assert wrong["state"] == "failed"
        assert "pdu-a-wrong" in wrong["error"], wrong["error"]
        text = json.dumps([*jobs, *again, wrong])
        assert not any(k in text for k in secrets_of(agents)), "an SNMPv3 pass phrase leaked into a job"
    finally:
        await h.stop()
