"""
Fleet health end to end through a real C{twistd -n roller} process.

The simulated fleet (L{roller.sim.fleet.Fleet}, each machine with a Redfish
BMC on its own address) and the loopback Taskcluster queue fake (for the
loan's quarantine) run in this test's reactor; roller runs as a child
process configured by a TOML file (health on, a one-second sweep,
remediation on with a C{reboot} policy) and is seen through its HTTP API
only.  Time passes for real: every wait polls observable state, and what
"within two sweep intervals" means is counted in sweep rounds from roller's
own records, never measured with a wall clock.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.client import HTTPConnectionPool

from roller.secrets import Credential, load_secrets, write_secrets
from roller.sim.daemon import free_port
from roller.sim.fleet import Fleet
from roller.testing.process import RollerProcess
from roller.testing.results import eventually
from roller.testing.tc_queue import FakeTaskclusterQueue

BASE = "127.0.17."
SWEEP = 1.0  # health.sweep_interval: the smallest allowed
TC_CLIENT, TC_TOKEN = "project/releng/roller-loans", "loans-token-0123456789abcdef"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def _config(tables: dict[str, dict[str, Any]], policies: list[dict[str, Any]], top: dict[str, Any]) -> str:
    lines = [f"{k} = {_toml(v)}" for k, v in top.items()]
    for name, table in tables.items():
        lines += ["", f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in table.items())]
    for policy in policies:
        lines += ["", "[[health.policies]]", *(f"{k} = {_toml(v)}" for k, v in policy.items())]
    return "\n".join(lines) + "\n"


class Roller:
    """A twistd roller over a started fleet, and its API through treq (the reactor keeps running)."""

    def __init__(self, tmp_path: Path, fleet: Fleet, tc: FakeTaskclusterQueue):
        self.fleet = fleet
        files = fleet.write_client_files(tmp_path / "fleet")
        secrets = tmp_path / "secrets.toml"
        write_secrets(secrets, {**load_secrets(files.secrets).as_dict(), "taskcluster-queue": Credential(
            name="taskcluster-queue", kind="password", username=TC_CLIENT, password=TC_TOKEN)})
        config = tmp_path / "roller.toml"
        config.write_text(_config(
            {
                "ssh": {"known_hosts": files.known_hosts_openssh, "connect_timeout": 1.0, "command_timeout": 2.0},
                "reboot": {"down_timeout": 3.0, "up_timeout": 10.0, "poll_interval": 0.05},
                "redfish": {"request_timeout": 5.0, "power_timeout": 5.0, "poll_interval": 0.05},
                "tasks": {"allowed": ["ping", "reboot", "loan"]},
                "loans": {"root_url": tc.url, "timeout": 5.0},
                "health": {"enabled": True, "sweep_interval": SWEEP, "down_after": 2, "probe_timeout": 0.5,
                           "tick": 1.0, "tc_interval": 3600.0, "remediate": True},
            },
            [{"name": "revive", "pools": ["sim"], "when": ["down"], "after": 0, "do": ["reboot"],
              "max_concurrent": 2, "cooldown": 30, "max_per_day": 5}],
            {"secrets_file": str(secrets)},
        ))
        self.process = RollerProcess(["--auth", "none", "--config", str(config)], state_dir=tmp_path / "state")
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def start(self) -> None:
        await deferToThread(self.process.start, 30.0)  # it polls with blocking sleeps: not in the reactor
        for entry in self.fleet.inventory_json("sim"):
            await self.call("POST", "/api/v1/machines", entry, expect=201)

    async def stop(self) -> None:
        await self.pool.closeCachedConnections()
        await deferToThread(self.process.close)

    async def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        r = await treq.request(method, self.process.url(path), json=body, pool=self.pool)
        answer = json.loads(await r.content())
        assert r.code == expect, (method, path, r.code, answer, self.process.log_tail())
        return answer

    async def health(self, worker: str) -> dict:
        return dict(await self.call("GET", f"/api/v1/machines/sim/{worker}/health"))

    async def until_state(self, worker: str, state: str, timeout: float = 30.0) -> dict:
        last: dict = {}

        async def check() -> dict:
            last.clear()
            last.update(await self.health(worker))
            return dict(last) if last["state"] == state else {}

        return await eventually(check, f"{worker} {state}", timeout=timeout, interval=0.05, reactor=reactor,
                                describe=lambda: f"last seen {json.dumps(last)[:1500]}\n{self.process.log_tail(30)}")

    async def health_jobs(self) -> list[dict]:
        jobs = (await self.call("GET", "/api/v1/jobs?limit=500"))["jobs"]
        return [j for j in jobs if j["requester"] == "roller/health"]

    async def rounds_later(self, n: int) -> dict:
        """Wait until n more sweep rounds (hence about n remediation ticks) have begun; the health status."""
        first = (await self.call("GET", "/api/v1/health"))["sweep"]["round"]

        async def check() -> dict:
            status = dict(await self.call("GET", "/api/v1/health"))
            return status if status["sweep"]["round"] >= first + n else {}

        return await eventually(check, f"{n} more sweep rounds", timeout=30, interval=0.1, reactor=reactor)


async def _setup(tmp_path: Path, count: int) -> tuple[Roller, Fleet, FakeTaskclusterQueue, Any]:
    fleet = Fleet(reactor, count, BASE, free_port(BASE + "1"), reboot_delay=0.1, down_for=1.5,
                  redfish=tuple(range(count)), bmc_dir=tmp_path / "bmc")
    await fleet.start()
    tc = FakeTaskclusterQueue(clients={TC_CLIENT: TC_TOKEN})
    port = tc.listen(reactor)
    roller = Roller(tmp_path, fleet, tc)
    try:
        await roller.start()
    except BaseException:
        await roller.stop()
        await fleet.stop()
        await port.stopListening()
        raise
    return roller, fleet, tc, port


async def _teardown(roller: Roller, fleet: Fleet, port: Any) -> None:
    try:
        await roller.stop()
    finally:
        await fleet.stop()
        await port.stopListening()


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _round_at(rounds: list[dict], iso_time: str) -> int:
    """The sweep round a time (milliseconds, from the API) fell in."""
    t = parse_iso(iso_time) + 0.001
    return max(r["round"] for r in rounds if r["started"] <= t)


@pytest_twisted.ensureDeferred
async def test_a_dead_machine_is_down_within_two_rounds_rebooted_by_policy_and_healthy_again(tmp_path: Path) -> None:
    # sim-001 dies and is revived; sim-002 (loaned) and sim-003 (in maintenance) die too and stay untouched
    roller, fleet, tc, port = await _setup(tmp_path, 3)
    try:
        for worker in ("sim-001", "sim-002", "sim-003"):
            await roller.until_state(worker, "healthy")
        loan = await roller.call("POST", "/api/v1/workers/sim-002/group/sim/jobs?task_name=loan",
                                 {"params": {"borrower": "dev@example.com", "reason": "debug", "expires": "7d"}},
                                 expect=201)
        job = await roller.call("GET", f"/api/v1/jobs/{loan['task_id']}")

        async def loaned() -> dict:
            j = dict(await roller.call("GET", f"/api/v1/jobs/{loan['task_id']}"))
            return j if j["state"] not in ("queued", "running") else {}

        job = await eventually(loaned, "the loan", timeout=30, interval=0.05, reactor=reactor)
        assert job["state"] == "succeeded", job
        assert [c["worker_id"] for c in tc.calls] == ["sim-002"]  # quarantined in Taskcluster
        maintenance = await roller.call("PUT", "/api/v1/machines/sim/sim-003/maintenance",
                                        {"maintenance": True, "reason": "new disk"})
        assert maintenance["state"] == "maintenance"
        await roller.until_state("sim-002", "loaned")

        for worker in ("sim-001", "sim-002", "sim-003"):
            fleet.machine(worker).power.power_off()
        died_by = (await roller.call("GET", "/api/v1/health"))["sweep"]["round"]  # died in this round or before

        down = await roller.until_state("sim-001", "down")
        status = await roller.call("GET", "/api/v1/health")
        (went_down,) = [t for t in down["transitions"] if t["new"] == "down"]
        assert went_down["old"] == "healthy"
        # found down by the second round after it died at the latest (sweep.interval = 1 s, down_after = 2)
        assert _round_at(status["sweep"]["recent"], went_down["time"]) <= died_by + 2, (went_down, status["sweep"])
        assert [f["kind"] for f in down["findings"]] == ["down"]

        async def revived() -> list[dict]:
            jobs = await roller.health_jobs()
            return jobs if jobs and all(j["state"] not in ("queued", "running") for j in jobs) else []

        (job,) = await eventually(revived, "the remediation of sim-001", timeout=60, interval=0.1, reactor=reactor)
        assert (job["worker_id"], job["task_name"], job["state"]) == ("sim-001", "reboot", "succeeded"), job
        assert job["reason"].startswith("revive: down since ") and "liveness checks in a row failed" in job["reason"]
        assert fleet.machine("sim-001").power.on
        healthy = await roller.until_state("sim-001", "healthy")
        assert [(t["old"], t["new"]) for t in healthy["transitions"]][:2] == [("down", "healthy"), ("healthy", "down")]
        assert parse_iso(healthy["transitions"][0]["time"]) >= parse_iso(job["started"])

        # more ticks go by: the loaned and the maintenance machines are known dead, and left alone
        status = await roller.rounds_later(3)
        for worker, state in (("sim-002", "loaned"), ("sim-003", "maintenance")):
            h = await roller.health(worker)
            assert h["state"] == state and [f["kind"] for f in h["findings"]] == ["down"], h
            assert not fleet.machine(worker).power.on
        assert [j["worker_id"] for j in await roller.health_jobs()] == ["sim-001"]
        assert status["pools"]["sim"]["healthy"] == 1 and not status["paused"]
        audit = (await roller.call("GET", "/api/v1/audit?limit=200"))["entries"]
        created = [e for e in audit if e["actor"] == "roller/health"]
        assert [(e["action"], e["target"]) for e in created] == [("job.create:reboot", "sim/sim-001")]
    finally:
        await _teardown(roller, fleet, port)


@pytest_twisted.ensureDeferred
async def test_pause_stops_new_remediation_until_resumed(tmp_path: Path) -> None:
    roller, fleet, tc, port = await _setup(tmp_path, 1)
    try:
        await roller.until_state("sim-001", "healthy")
        paused = await roller.call("POST", "/api/v1/health/pause")
        assert paused["paused"] and paused["paused_by"] == "anonymous"
        fleet.machine("sim-001").power.power_off()
        await roller.until_state("sim-001", "down")
        status = await roller.rounds_later(3)  # ticks go by while it is down and remediation paused
        assert status["paused"] and status["held"] == ["remediation is paused"]
        assert await roller.health_jobs() == []
        assert (await roller.health("sim-001"))["state"] == "down" and not fleet.machine("sim-001").power.on

        resumed = await roller.call("POST", "/api/v1/health/resume")
        assert not resumed["paused"]
        await roller.until_state("sim-001", "healthy")
        (job,) = await roller.health_jobs()
        assert (job["worker_id"], job["task_name"], job["state"]) == ("sim-001", "reboot", "succeeded"), job
        actions = [e["action"] for e in (await roller.call("GET", "/api/v1/audit?limit=100"))["entries"]]
        assert actions.index("health.resume") < actions.index("health.pause")  # newest first
    finally:
        await _teardown(roller, fleet, port)
