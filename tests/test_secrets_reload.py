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
  - The XenAPI pool password, the Taskcluster credentials of loans and
    notify, and the webhook signing secret, each rotated on its peer: the
    old secret in the file fails, the reloaded new one succeeds; no secret
    in any job, log line or notification.
"""

from __future__ import annotations

import hashlib
import hmac
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
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from roller.config import load_settings
from roller.inventory import Machine
from roller.notify import parse_rules
from roller.secrets import Credential, HawkClient, Secrets, load_secrets, write_secrets
from roller.service import RollerService
from roller.sim import ipmisim
from roller.sim.fleet import Fleet
from roller.sim.pdu_sim import SimulatedPdu
from roller.testing.bugzilla import FakeBugzilla
from roller.testing.harness import ApiHarness, free_port, start_roller
from roller.testing.notify import FakeTaskclusterNotify
from roller.testing.process import RollerProcess, wait_for
from roller.testing.results import eventually
from roller.testing.snmpd import SnmpAgent, skip_reason
from roller.testing.tc_queue import FakeTaskclusterQueue
from roller.testing.xenapi import FakeXenApi

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
    await eventually(lambda: machine.power.on and machine.listening, f"{worker} to come back", timeout=deadline)


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
    fleet = Fleet(reactor, 1, BASE, free_port(BASE + "1"), reboot_delay=0.05, down_for=1.0,
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


# ---------------------------------------------------------------- XenAPI, loans, notify, webhooks
#
# The Taskcluster credentials of loans (queue.quarantineWorker) and notify,
# the webhook signing secret and the XenAPI pool password, each against its
# peer on loopback (the XenAPI fake, the Taskcluster queue and notify fakes
# verifying Hawk with mohawk, a webhook receiver checking the HMAC): every
# peer takes the old secret, then only a new one; jobs and notifications
# with the old one in the file fail for that reason; after the file is
# rewritten and roller reloaded, the next ones succeed.  Taskcluster's
# authenticate-hawk (auth.mode = "taskcluster") is called without any
# credential of roller's, so no secret of it is involved in a reload.

XEN_VM = "6f1d8d3c-0f2c-4d6a-9a1e-5f402b10c6b5"
QUEUE_CLIENT, NOTIFY_CLIENT = "project/releng/roller-loans", "project/releng/roller-notify"


class _SignedWebhook:
    """A webhook receiver that accepts only bodies signed (HMAC-SHA256) with C{secret}."""

    def __init__(self, secret: str):
        self.secret = secret
        self.accepted: list[dict] = []
        self.refused: list[str] = []
        hook = self

        class Hook(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                raw = request.content.read()
                got = (request.getHeader("x-roller-signature-256") or "").encode()
                want = b"sha256=" + hmac.new(hook.secret.encode(), raw, hashlib.sha256).hexdigest().encode()
                if not hmac.compare_digest(got, want):
                    hook.refused.append("no signature" if not got else "signature mismatch")
                    request.setResponseCode(401)
                    return b""
                hook.accepted.append(json.loads(raw))
                request.setResponseCode(204)
                return b""

        self.resource = Hook()
        self.port: Any = None

    def listen(self) -> str:
        site = Site(self.resource)
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        return f"http://127.0.0.1:{self.port.getHost().port}/hook"


@pytest_twisted.ensureDeferred
async def test_xenapi_loans_notify_and_webhook_credentials_take_effect_on_reload(tmp_path):
    def fresh(label: str) -> str:
        return f"{label}-{os.urandom(10).hex()}"

    old = {k: fresh(k + "-old") for k in ("xen", "queue", "notify", "webhook")}
    new = {k: fresh(k + "-new") for k in ("xen", "queue", "notify", "webhook")}
    every_secret = (*old.values(), *new.values())

    xen = FakeXenApi(users={"root": old["xen"]})
    xen.add_vm(XEN_VM, power_state="Running")
    xen_url = xen.listen(reactor)
    tc_queue = FakeTaskclusterQueue(clients={QUEUE_CLIENT: old["queue"]})
    tc_notify = FakeTaskclusterNotify(clients={NOTIFY_CLIENT: old["notify"]})
    hook = _SignedWebhook(old["webhook"])
    ports = [tc_queue.listen(reactor), tc_notify.listen(reactor)]
    hook_url = hook.listen()
    ports.append(hook.port)

    secrets_file = tmp_path / "secrets.toml"

    def write(v: dict) -> None:
        write_secrets(secrets_file, {
            "xen-pool": Credential(name="xen-pool", kind="password", username="root", password=v["xen"]),
            "taskcluster-queue": Credential(name="taskcluster-queue", kind="password", username=QUEUE_CLIENT,
                                            password=v["queue"]),
            "taskcluster-notify": Credential(name="taskcluster-notify", kind="password", username=NOTIFY_CLIENT,
                                             password=v["notify"]),
            "webhook": Credential(name="webhook", kind="token", value=v["webhook"]),
        })

    write(old)
    lines: list[str] = []

    def observer(event: dict) -> None:
        lines.append(formatEvent(event) or "")
        lines.append(repr(event))
        if event.get("log_failure") is not None:
            lines.append(event["log_failure"].getTraceback())

    globalLogPublisher.addObserver(observer)
    s = load_settings(None, {}, {"auth.mode": "none", "server.listen": "tcp:0:interface=127.0.0.1",
                                 "state_dir": str(tmp_path / "state")})
    s = evolve(s, secrets_file=str(secrets_file), allowed_tasks=("xenapi_reboot", "power_status", "loan"),
               xen_timeout=5.0, xen_shutdown_timeout=5.0, xen_start_delay=0.0,
               loans_root_url=tc_queue.url, loans_timeout=5.0, loans_provisioner_id="releng-hardware",
               notify_root_url=tc_notify.url, notify_timeout=5.0,
               notify_rules=parse_rules([{"tasks": ["xenapi_reboot"], "on": ["succeeded", "failed"],
                                          "email": ["relops@example.com"], "webhooks": [hook_url]}]))
    service = RollerService(s, reactor)
    service.startService()
    await service.ready
    h = ApiHarness(service, None, reactor, group="rot")
    jobs: list[dict] = []

    async def run(worker: str, task: str, body: dict | None = None) -> dict:
        job = await h.run(worker, task, body)
        jobs.append(job)
        return job

    async def notified(count: int) -> list[tuple[str, str, str]]:
        """The outcomes of the last two notifications (sorted) once C{count} have ended."""
        await eventually(lambda: len(service.notifier.sent) >= count, f"{count} notifications", timeout=20.0,
                         describe=lambda: service.notifier.sent)
        return sorted(service.notifier.sent[count - 2:count])

    def loan(n: int) -> dict:
        return {"params": {"borrower": "dev@example.com", "expires": "7d", "reason": f"debug bug {n}"}}

    try:
        await service.store.machines.put(Machine.from_json(
            {"worker_id": "vm1", "worker_group": "rot", "xen": {"vm_uuid": XEN_VM, "url": xen_url,
                                                                "credential": "xen-pool"}}))
        for n in (1, 2):
            await service.store.machines.put(Machine.from_json(
                {"worker_id": f"hw{n}", "worker_group": "rot", "pool": "gecko-t-linux"}))

        # 1. the file and every peer agree: everything works
        assert (await run("vm1", "xenapi_reboot"))["state"] == "succeeded", jobs[-1].get("error")
        assert (await run("vm1", "power_status", {"params": {"via": "xen"}}))["state"] == "succeeded"
        assert (await run("hw1", "loan", loan(1)))["state"] == "succeeded", jobs[-1].get("error")
        assert await notified(2) == [("email", "relops@example.com", "ok"), ("webhook", hook_url, "ok")]
        assert [c["client_id"] for c in tc_queue.calls] == [QUEUE_CLIENT]

        # 2. every peer's secret is rotated; the file still holds the old ones
        xen.users["root"] = new["xen"]
        tc_queue.clients[QUEUE_CLIENT] = new["queue"]
        tc_notify.clients[NOTIFY_CLIENT] = new["notify"]
        hook.secret = new["webhook"]
        job = await run("vm1", "xenapi_reboot")
        assert job["state"] == "failed", job
        assert "SESSION_AUTHENTICATION_FAILED" in job["error"] and "credential 'xen-pool'" in job["error"], job
        job = await run("vm1", "power_status", {"params": {"via": "xen"}})
        assert job["state"] == "failed" and "SESSION_AUTHENTICATION_FAILED" in job["error"], job
        job = await run("hw2", "loan", loan(2))
        assert job["state"] == "failed", job
        assert "HTTP 401 AuthenticationFailed" in job["error"] and "not loaned" in job["error"], job
        assert await notified(4) == [("email", "relops@example.com", "HTTP 401"), ("webhook", hook_url, "HTTP 401")]
        assert len(tc_queue.calls) == 1 and tc_queue.refused and tc_notify.refused
        assert hook.refused == ["signature mismatch"]
        assert any("Notification by email to relops@example.com refused: HTTP 401" in line for line in lines)

        # 3. the operator writes the new secrets and roller reloads (what SIGHUP calls)
        write(new)
        assert service.reload_secrets()
        assert (await run("vm1", "xenapi_reboot"))["state"] == "succeeded", jobs[-1].get("error")
        assert (await run("vm1", "power_status", {"params": {"via": "xen"}}))["state"] == "succeeded"
        assert (await run("hw2", "loan", loan(3)))["state"] == "succeeded", jobs[-1].get("error")
        assert await notified(6) == [("email", "relops@example.com", "ok"), ("webhook", hook_url, "ok")]
        assert [c["worker_id"] for c in tc_queue.calls] == ["hw1", "hw2"]
        assert len(hook.accepted) == 2 and hook.accepted[-1]["job"]["state"] == "succeeded"
        assert [cid for _, cid, _ in tc_notify.received] == [NOTIFY_CLIENT, NOTIFY_CLIENT]
        assert xen.vms[XEN_VM].state == "Running"

        # no secret, old or new, in any job (events, errors, results), in
        # what the peers were sent, or in any log line
        for job in jobs:
            full = await h.job(job["task_id"])
            text = json.dumps(full)
            assert full["events"] and not any(k in text for k in every_secret), full
        sent = json.dumps([b for _, _, b in tc_notify.received] + hook.accepted + tc_queue.calls)
        assert not any(k in sent for k in every_secret)
        assert not any(k in line for line in lines for k in every_secret)
    finally:
        await h.stop()
        globalLogPublisher.removeObserver(observer)
        await xen.stop()
        for port in ports:
            await port.stopListening()
