"""
No secret in any output: a real RollerService (auth.mode local) over a small
simulated fleet with every kind of credential roller holds, each a
distinctive random value -- an encrypted SSH key's passphrase, the BMC
password (IPMI through a real ipmi_sim and Redfish), PDU SNMP communities,
a local Hawk client's access token, the Bugzilla API key and the webhook
signing secret.  Jobs succeed and fail (wrong password, wrong community,
unreachable machine); then every API response (bodies and headers), every
dashboard page (signed in as an admin), the service's log and the whole
database are searched for every secret value, plain, base64 and hex.

A planted canary (machine notes, not a secret) must be found by the same
search in each kind of output, so a search that sees nothing cannot pass.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
from typing import Any

import mohawk
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from roller.auth.accounts import hash_password
from roller.notify import SIGNATURE_HEADER, parse_rules
from roller.secrets import Credential, HawkClient, Secrets, load_secrets, write_secrets
from roller.sim import ipmisim
from roller.sim.fleet import Fleet
from roller.sim.pdu_sim import SimulatedPdu
from roller.testing.bugzilla import FakeBugzilla
from roller.testing.harness import ApiHarness, free_port, start_roller
from roller.testing.notify import FakeWebhook
from roller.testing.results import eventually

BASE = "127.0.9."
CLIENT = "project/releng/roller-leakcheck"
ADMIN_PASSWORD = "leak admin password"


def rnd(prefix: str, n: int = 10) -> str:
    return prefix + os.urandom(n).hex()


def forms(secret: str) -> set[str]:
    """The secret as it could show: plain, base64 (both alphabets, unpadded) and hex."""
    raw = secret.encode()
    b64 = base64.b64encode(raw).decode().rstrip("=")
    return {secret, b64, base64.urlsafe_b64encode(raw).decode().rstrip("="), raw.hex(), raw.hex().upper()}


def leaks(secrets: dict[str, str], outputs: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(secret name, output kind) for every secret form found in an output."""
    found = []
    for kind, texts in outputs.items():
        blob = "\n".join(texts)
        for name, value in secrets.items():
            if any(f in blob for f in forms(value)):
                found.append((name, kind))
    return found


class Signed(ApiHarness):
    """L{ApiHarness} whose requests are signed by the local Hawk client; every answer is kept."""

    token: str
    seen: list[str]

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        url = self.url + path
        raw = json.dumps(body).encode() if body is not None else b""
        ctype = "application/json" if body is not None else ""
        header = mohawk.Sender(credentials={"id": CLIENT, "key": self.token, "algorithm": "sha256"},
                               url=url, method=method, content=raw, content_type=ctype).request_header
        headers = {"Authorization": [header]}
        if body is not None:
            headers["Content-Type"] = [ctype]
        r = await treq.request(method, url, data=raw or None, headers=headers, pool=self.pool).addTimeout(20, reactor)
        content = await r.content()
        self.seen.append(f"{method} {path} {r.code} {list(r.headers.getAllRawHeaders())!r}\n"
                         + content.decode("utf-8", "replace"))
        return r.code, content

    async def post(self, worker_id: str, task: str = "reboot", body: dict | None = None) -> dict:
        code, content = await self.request(
            "POST", f"/api/v1/workers/{worker_id}/group/{self.group}/jobs?task_name={task}", body)
        assert code == 201, content
        return json.loads(content)

    async def job(self, task_id: str) -> dict:
        code, content = await self.request("GET", f"/api/v1/jobs/{task_id}")
        assert code == 200, content
        return json.loads(content)


async def sign_in_and_fetch(base: str, paths: list[str]) -> list[str]:
    """Sign in to the dashboard as the admin; the pages (status, headers, body)."""
    cookies: dict[str, str] = {}

    async def get(path: str) -> tuple[Any, str]:
        r = await treq.get(base + path, allow_redirects=False, persistent=False,
                           headers={"Cookie": ["; ".join(f"{k}={v}" for k, v in cookies.items())]})
        text = (await r.content()).decode("utf-8", "replace")
        for raw in r.headers.getRawHeaders("set-cookie", []):
            name, value = raw.split(";", 1)[0].split("=", 1)
            cookies[name] = value
        return r, text

    r, page = await get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = await treq.post(base + "/login", allow_redirects=False, persistent=False,
                        data={"csrf_token": token, "next": "/", "user": "root", "password": ADMIN_PASSWORD},
                        headers={"Cookie": ["; ".join(f"{k}={v}" for k, v in cookies.items())]})
    await r.content()
    assert r.code == 303, "admin sign-in failed"
    for raw in r.headers.getRawHeaders("set-cookie", []):
        name, value = raw.split(";", 1)[0].split("=", 1)
        cookies[name] = value
    pages = []
    for path in paths:
        r, text = await get(path)
        assert r.code == 200, (path, r.code, text[:300])
        pages.append(f"{path} {list(r.headers.getAllRawHeaders())!r}\n{text}")
    return pages


@pytest_twisted.ensureDeferred
async def test_no_secret_in_any_output(tmp_path):
    if ipmisim.skip_reason():
        pytest.skip(ipmisim.skip_reason())
    log: list[str] = []

    def observe(event: dict) -> None:
        log.append(formatEvent(event) or "")
        log.append(repr(event))

    globalLogPublisher.addObserver(observe)
    try:
        await _run(tmp_path, log)
    finally:
        globalLogPublisher.removeObserver(observe)


async def _run(tmp_path, log: list[str]) -> None:
    secrets = {
        "ssh passphrase": rnd("sshpass-"),
        "bmc password": "bmc-" + os.urandom(6).hex(),  # ipmi_sim takes at most 16 bytes
        "wrong bmc password": "bad-" + os.urandom(6).hex(),
        "pdu community": rnd("rw-"),
        "pdu read community": rnd("ro-"),
        "wrong community": rnd("guess-"),
        "hawk access token": rnd("hawk-token-", 16),
        "bugzilla api key": rnd("bzkey-", 16),
        "webhook secret": rnd("hooksecret-", 16),
    }
    fleet = Fleet(reactor, 3, BASE, free_port(BASE + "1"), reboot_delay=0.05, down_for=1.0,
                  ipmi=(0, 1), redfish=(0, 1), bmc_password=secrets["bmc password"], bmc_dir=tmp_path / "bmc")
    key_path = tmp_path / "fleet_key_encrypted"
    key_path.write_bytes(fleet.user_key.toString("openssh", subtype="v1",
                                                 passphrase=secrets["ssh passphrase"].encode()))
    key_path.chmod(0o600)
    await fleet.start()
    pdus = []
    for i in range(2):
        pdu = SimulatedPdu(reactor, "sentry3", community=secrets["pdu community"],
                           read_community=secrets["pdu read community"], name=f"pdu{i + 1}")
        pdu.attach("AA1", fleet[i].power)
        pdu.start("127.0.0.1")
        pdus.append(pdu)
    bugzilla = FakeBugzilla(api_key=secrets["bugzilla api key"],
                            products={"Infrastructure & Operations": ["DCOps", "CIDuty"]})
    bz_port = bugzilla.listen(reactor)
    hook = FakeWebhook()
    hook_port = hook.listen(reactor)
    closed_port = free_port(BASE + "3")

    def inventory(entries: list[dict]) -> list[dict]:
        for i, entry in enumerate(entries[:2]):
            entry["pdu"] = {"host": "127.0.0.1", "port": pdus[i]._port.getHost().port, "outlet": "AA1",
                            "model": "auto", "credential": "pdu" if i == 0 else "pdu-wrong"}
        entries[1]["ipmi"]["credential"] = "bmc-wrong"
        entries[1]["redfish"]["credential"] = "bmc-wrong"
        entries[2]["ssh"]["port"] = closed_port  # unreachable
        entries[2]["liveness"]["port"] = closed_port
        return entries

    credentials = {
        fleet.credential: Credential(name=fleet.credential, kind="ssh-key", path=str(key_path),
                                     passphrase=secrets["ssh passphrase"]),
        "pdu": Credential(name="pdu", kind="snmp-community", community=secrets["pdu community"],
                          read_community=secrets["pdu read community"]),
        "pdu-wrong": Credential(name="pdu-wrong", kind="snmp-community", community=secrets["wrong community"],
                                read_community=secrets["wrong community"]),
        "bmc-wrong": Credential(name="bmc-wrong", kind="password", username=fleet.bmc_user,
                                password=secrets["wrong bmc password"]),
        "bugzilla": Credential(name="bugzilla", kind="token", value=secrets["bugzilla api key"]),
        "webhook": Credential(name="webhook", kind="token", value=secrets["webhook secret"]),
    }
    h = await start_roller(
        tmp_path, fleet, reactor, inventory=inventory, harness=Signed, credentials=credentials,
        auth_mode="local", bugzilla_url=bugzilla.url, notify_rules=parse_rules([{"webhooks": [hook.url]}]),
        allowed_tasks=("ssh_reboot", "snmp_reboot", "ipmi_status", "redfish_reboot", "file_bugzilla_bug",
                       "power_status"),
        reboot_down_timeout=2.0, reboot_up_timeout=3.0,
        snmp_timeout=0.25, snmp_retries=1, snmp_min_interval=0.0, snmp_settle_timeout=2.0,
        snmp_reboot_timeout=3.0, snmp_poll_interval=0.02,
        ipmi_min_interval=0.0, ipmi_retry_delay=0.05, ipmi_power_wait=5.0, ipmi_power_poll=0.1, ipmi_timeout=5.0,
        redfish_request_timeout=5.0, redfish_power_timeout=5.0, redfish_poll_interval=0.05)
    h.token, h.seen = secrets["hawk access token"], []
    service = h.service
    try:
        # the local Hawk client joins the secrets file, as an operator would add it (then SIGHUP)
        current = load_secrets(service.settings.secrets_file)
        write_secrets(service.settings.secrets_file, Secrets(current.as_dict(), clients={
            CLIENT: HawkClient(id=CLIENT, access_token=secrets["hawk access token"], scopes=("*",))}))
        assert service.reload_secrets()
        await service.store.users.add("root", "admin", hash_password(ADMIN_PASSWORD, ln=10), reactor.seconds())

        outcomes = {}
        for worker, task in [("sim-001", "ssh_reboot"), ("sim-001", "snmp_reboot"), ("sim-001", "ipmi_status"),
                             ("sim-001", "redfish_reboot"), ("sim-001", "file_bugzilla_bug"),
                             ("sim-002", "snmp_reboot"), ("sim-002", "ipmi_status"), ("sim-002", "redfish_reboot"),
                             ("sim-003", "ssh_reboot")]:
            job = await h.run(worker, task, deadline=30.0)
            outcomes[(worker, task)] = job
            await _until_up(fleet, worker)
        states = {k: j["state"] for k, j in outcomes.items()}
        assert states == {
            ("sim-001", "ssh_reboot"): "succeeded", ("sim-001", "snmp_reboot"): "succeeded",
            ("sim-001", "ipmi_status"): "succeeded", ("sim-001", "redfish_reboot"): "succeeded",
            ("sim-001", "file_bugzilla_bug"): "succeeded",
            ("sim-002", "snmp_reboot"): "failed", ("sim-002", "ipmi_status"): "failed",
            ("sim-002", "redfish_reboot"): "failed", ("sim-003", "ssh_reboot"): "failed",
        }, {k: (j["state"], j.get("error")) for k, j in outcomes.items()}
        errors = {k: j.get("error") or "" for k, j in outcomes.items()}
        assert "credential 'pdu-wrong'" in errors[("sim-002", "snmp_reboot")]
        assert "wrong password" in errors[("sim-002", "ipmi_status")]
        assert "was refused (HTTP 401" in errors[("sim-002", "redfish_reboot")]
        assert "connection refused" in errors[("sim-003", "ssh_reboot")]
        # the secrets really were used: the peers saw them
        assert bugzilla.bugs
        assert hook.received and all(SIGNATURE_HEADER.lower() in hdrs for hdrs, _ in hook.received)

        # the planted canary (not a secret) for the self-check
        canary = rnd("planted-canary-")
        code, _ = await h.request("PUT", "/api/v1/machines/sim/canary-1", {"ip": "192.0.2.9", "notes": canary})
        assert code == 201
        for path in ["/api/v1/jobs", "/api/v1/jobs?worker_id=sim-001", "/api/v1/machines", "/api/v1/machines/sim/sim-001",
                     "/api/v1/machines/sim/canary-1", "/api/v1/audit", "/api/v1/tasks", "/api/v1/openapi.json",
                     "/metrics", "/__heartbeat__", "/__lbheartbeat__", "/__version__"]:
            await h.request("GET", path)
        bad = await treq.get(  # a refused request (bad MAC): the 401 answer must not help either
h.url + "/api/v1/jobs", pool=h.pool, headers={"Authorization": [
            f'Hawk id="{CLIENT}", ts="1", nonce="x", mac="AAAA"']})
        assert bad.code == 401
        h.seen.append(f"{bad.code} {list(bad.headers.getAllRawHeaders())!r}\n{(await bad.content()).decode()}")
        api = list(h.seen)

        job_ids = [j["task_id"] for j in outcomes.values()]
        pages = await sign_in_and_fetch(h.url, [
            "/", "/queue", "/audit", "/admin", "/machines/sim/sim-001", "/machines/sim/sim-002",
            "/machines/sim/sim-003", "/machines/sim/canary-1", "/admin/machines/sim/sim-001/edit",
            "/admin/machines/sim/canary-1/edit", *[f"/jobs/{i}" for i in job_ids]])
    finally:
        await h.stop()
        for pdu in pdus:
            pdu.stop()
        await bz_port.stopListening()
        await hook_port.stopListening()

    db = sqlite3.connect(service.settings.db_path)
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"jobs", "audit"} <= tables
        dump = list(db.iterdump())
    finally:
        db.close()
    outputs = {"api": api, "dashboard": pages, "log": log, "database": dump}

    # self-check: the same search finds the planted canary in every kind of output it covers
    assert sorted(kind for _, kind in leaks({"canary": canary}, outputs)) == ["api", "dashboard", "database"]
    assert leaks({"canary": canary}, {"log": log + [base64.b64encode(canary.encode()).decode()]})
    assert leaks({"canary": canary}, {"log": log + [canary.encode().hex()]})
    assert len(log) > 100 and any("sim-002" in line for line in log)

    assert leaks(secrets, outputs) == []


async def _until_up(fleet: Fleet, worker: str, deadline: float = 5.0) -> None:
    machine = fleet.machine(worker)
    if worker == "sim-003":
        return
    await eventually(lambda: machine.power.on and machine.listening, f"{worker} to come back", timeout=deadline)
