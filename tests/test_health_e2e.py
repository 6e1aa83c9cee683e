"""
Fleet health end to end: the real RollerService on the real reactor, a
fleet of simulated machines that really stop listening when their power
goes off, each with a Redfish service on the same power; liveness sweeps
by TCP connect, remediation by policy through ordinary `reboot` jobs, and
the REST API (health, machine health, maintenance, pause/resume, metrics).
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor

from roller.sim.fleet import Fleet
from roller.store.loans import Loan
from roller.testing.harness import ApiHarness, free_port, start_roller
from roller.testing.results import eventually

BASE = "127.0.7."
POLICY = {"name": "revive", "pools": ["sim"], "when": ["down"], "after": 0, "do": ["reboot"],
          "max_concurrent": 2, "cooldown": 30, "max_per_day": 5}


async def _start(tmp_path: Any, count: int, **settings: Any) -> ApiHarness:
    fleet = Fleet(reactor, count, BASE, free_port(BASE + "1"), reboot_delay=0.1, down_for=1.5,
                  redfish=tuple(range(count)), bmc_dir=tmp_path / "bmc")
    await fleet.start()
    options = dict(health_sweep_interval=0.25, health_down_after=2, health_probe_timeout=0.5, health_tick=0.1,
                   health_tc_interval=3600.0, health_remediate=True, health_policies=(POLICY,),
                   redfish_request_timeout=5.0, redfish_power_timeout=5.0, redfish_poll_interval=0.05,
                   reboot_poll_interval=0.05)
    options.update(settings)
    return await start_roller(tmp_path, fleet, reactor, **options)


async def _get(h: ApiHarness, path: str) -> Any:
    r = await treq.get(h.url + path, pool=h.pool)
    body = json.loads(await r.content())
    assert r.code == 200, body
    return body


async def _send(h: ApiHarness, method: str, path: str, body: Any = None) -> Any:
    r = await treq.request(method, h.url + path, json=body, pool=h.pool)
    answer = json.loads(await r.content())
    assert r.code == 200, answer
    return answer


async def _state(h: ApiHarness, worker: str) -> str:
    return str((await _get(h, f"/api/v1/machines/sim/{worker}/health"))["state"])


async def _until_state(h: ApiHarness, worker: str, state: str, timeout: float = 30.0) -> None:
    async def check() -> bool:
        return await _state(h, worker) == state

    await eventually(check, f"{worker} {state}", timeout=timeout, interval=0.05, reactor=reactor)


async def _health_jobs(h: ApiHarness) -> list[dict]:
    jobs = (await _get(h, "/api/v1/jobs?limit=200"))["jobs"]
    return [j for j in jobs if j["requester"] == "roller/health"]


def _most_at_once(jobs: list[dict]) -> int:
    """The most jobs running at the same time, from their recorded start and end times."""
    edges = []
    for j in jobs:
        edges.append((j["started"], 1))
        edges.append((j["finished"], -1))
    most = now = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        now += step
        most = max(most, now)
    return most


@pytest_twisted.ensureDeferred
async def test_dead_machines_are_found_down_rebooted_within_limits_and_healthy_again(tmp_path: Any) -> None:
    # a pool of 22: 10 die, sim-011 is loaned and sim-012 in maintenance (both die too), 10 stay up
    h = await _start(tmp_path, 22)
    dead = [f"sim-{n:03d}" for n in range(1, 11)]
    try:
        for n in range(1, 23):
            await _until_state(h, f"sim-{n:03d}", "healthy")
        store = h.service.store
        assert store is not None
        now = reactor.seconds()
        await store.loans.insert(Loan("sim", "sim-011", "alice", "debugging", now, now + 3600))
        maintenance = await _send(h, "PUT", "/api/v1/machines/sim/sim-012/maintenance",
                                  {"maintenance": True, "reason": "new disk"})
        assert maintenance["state"] == "maintenance" and maintenance["maintenance"]
        await _until_state(h, "sim-011", "loaned")
        for worker in [*dead, "sim-011", "sim-012"]:
            h.fleet.machine(worker).power.power_off()
        await _until_state(h, "sim-001", "down")

        async def all_remediated() -> list[dict]:  # found down, rebooted by the policy, back up
            jobs = await _health_jobs(h)
            return jobs if len(jobs) == 10 and all(j["state"] not in ("queued", "running") for j in jobs) else []

        jobs = await eventually(all_remediated, "ten remediations", timeout=120, interval=0.1, reactor=reactor)
        for worker in dead:
            await _until_state(h, worker, "healthy")
        assert sorted(j["worker_id"] for j in jobs) == dead
        assert all(j["task_name"] == "reboot" and j["state"] == "succeeded" for j in jobs), [
            (j["worker_id"], j["state"], j.get("error")) for j in jobs]
        assert all(j["reason"].startswith("revive: down since ") for j in jobs)
        # never more than max_concurrent = 2 at once, from the jobs' recorded start and end times
        assert 1 <= _most_at_once(jobs) <= 2
        # the loaned and the maintenance machines stayed dark and untouched
        assert not h.fleet.machine("sim-011").power.on and not h.fleet.machine("sim-012").power.on
        assert await _state(h, "sim-011") == "loaned" and await _state(h, "sim-012") == "maintenance"
        detail = await _get(h, "/api/v1/machines/sim/sim-001/health")
        states = [(t["old"], t["new"]) for t in detail["transitions"]]
        assert ("healthy", "down") in states and ("down", "healthy") in states
        status = await _get(h, "/api/v1/health")
        assert status["pools"]["sim"]["healthy"] == 20 and not status["paused"]
        assert sorted(m["worker_id"] for m in (await _get(h, "/api/v1/machines?health=loaned,maintenance"))[
            "machines"]) == ["sim-011", "sim-012"]
        metrics = (await (await treq.get(h.url + "/metrics", pool=h.pool)).content()).decode()
        assert 'roller_machines{health="healthy",pool="sim"} 20.0' in metrics
        assert 'roller_remediations_total{outcome="queued",policy="revive",task="reboot"} 10.0' in metrics
        audit = (await _get(h, "/api/v1/audit?limit=100"))["entries"]
        assert sum(e["actor"] == "roller/health" and e["action"] == "job.create:reboot" for e in audit) == 10
    finally:
        await h.stop()


@pytest_twisted.ensureDeferred
async def test_pause_stops_remediation_and_resume_restarts_it(tmp_path: Any) -> None:
    h = await _start(tmp_path, 2)
    try:
        await _until_state(h, "sim-001", "healthy")
        paused = await _send(h, "POST", "/api/v1/health/pause")
        assert paused["paused"] and paused["paused_by"] == "anonymous"
        h.fleet.machine("sim-001").power.power_off()
        await _until_state(h, "sim-001", "down")
        watcher = h.service.health
        assert watcher is not None
        ticks = len(watcher.held)

        async def a_few_ticks() -> bool:
            return "remediation is paused" in watcher.held and watcher.sweep.rounds[-1].number >= 8

        await eventually(a_few_ticks, "ticks while paused", timeout=10, interval=0.05, reactor=reactor)
        assert ticks is not None and await _health_jobs(h) == []
        assert await _state(h, "sim-001") == "down"
        await _send(h, "POST", "/api/v1/health/resume")
        await _until_state(h, "sim-001", "healthy")
        assert [j["worker_id"] for j in await _health_jobs(h)] == ["sim-001"]
        actions = [e["action"] for e in (await _get(h, "/api/v1/audit?limit=100"))["entries"]]
        assert "health.pause" in actions and "health.resume" in actions
    finally:
        await h.stop()


@pytest_twisted.ensureDeferred
async def test_dry_run_queues_nothing_and_reports(tmp_path: Any) -> None:
    h = await _start(tmp_path, 1, health_policies=({**POLICY, "dry_run": True},))
    try:
        await _until_state(h, "sim-001", "healthy")
        h.fleet.machine("sim-001").power.power_off()
        await _until_state(h, "sim-001", "down")
        watcher = h.service.health
        assert watcher is not None

        async def reported() -> bool:
            return ("revive", "reboot", "dry_run") in watcher.remediated

        await eventually(reported, "dry run reported", timeout=10, interval=0.05, reactor=reactor)
        assert await _health_jobs(h) == [] and await _state(h, "sim-001") == "down"
        assert not h.fleet.machine("sim-001").power.on
        metrics = (await (await treq.get(h.url + "/metrics", pool=h.pool)).content()).decode()
        assert 'roller_remediations_total{outcome="dry_run",policy="revive",task="reboot"} 1.0' in metrics
    finally:
        await h.stop()


@pytest_twisted.ensureDeferred
async def test_taskcluster_fitness_findings_and_nothing_acts_while_it_is_down(tmp_path: Any) -> None:
    from roller.secrets import Credential
    from roller.testing.tc_workers import FakeTaskclusterWorkers

    tc = FakeTaskclusterWorkers({"project/releng/roller-health": "health-token-0123456789abcdef"})
    port = tc.listen(reactor)
    now = reactor.seconds()
    # the pool "sim" is a bare worker type: provisioner loans.provisioner_id ("releng-hardware")
    pool = "releng-hardware/sim"
    for n in (1, 2):
        tc.add_worker(pool, "sim", f"sim-00{n}", last_active=now)
    tc.add_runs(pool, "sim", "sim-001", ["failed", "completed"] * 4 + ["failed", "failed"])  # 6 of 10 failed
    tc.add_runs(pool, "sim", "sim-002", ["completed"] * 10)
    tc.down = True  # Taskcluster is down from the start
    fleet = Fleet(reactor, 2, BASE, free_port(BASE + "1"), reboot_delay=0.1, down_for=1.5)
    await fleet.start()
    h = await start_roller(
        tmp_path, fleet, reactor,
        credentials={"taskcluster-health": Credential(name="taskcluster-health", kind="password",
                                                      username="project/releng/roller-health",
                                                      password="health-token-0123456789abcdef")},
        health_sweep_interval=0.25, health_probe_timeout=0.5, health_tick=0.1, health_tc_interval=0.3,
        health_root_url=tc.url, health_remediate=True,
        health_policies=({**POLICY, "name": "fix-failing", "when": ["failing"]},))
    try:
        async def asked() -> bool:
            return "HTTP 503" in (await _get(h, "/api/v1/health"))["taskcluster"].get(pool, "")

        await eventually(asked, "a poll of the pool", timeout=10, interval=0.05, reactor=reactor)
        await _until_state(h, "sim-001", "unknown")
        detail = await _get(h, "/api/v1/machines/sim/sim-001/health")
        assert [f["kind"] for f in detail["findings"]] == ["unknown"]
        assert "HTTP 503" in detail["findings"][0]["detail"]
        assert "HTTP 503" in (await _get(h, "/api/v1/health"))["taskcluster"][pool]
        watcher = h.service.health
        assert watcher is not None

        async def polled_again() -> bool:
            return tc.requests["listWorkers"] >= 4

        await eventually(polled_again, "several polls while down", timeout=10, interval=0.05, reactor=reactor)
        assert await _health_jobs(h) == []  # nothing acts on what is not known
        # Taskcluster is back: 6 failures of 10 make sim-001 failing, and the policy acts on it
        tc.down = False

        async def remediated() -> list[dict]:
            return [j for j in await _health_jobs(h) if j["state"] not in ("queued", "running")]

        (job,) = await eventually(remediated, "the failing worker rebooted", timeout=30, interval=0.1,
                                  reactor=reactor)
        assert job["worker_id"] == "sim-001" and job["reason"].startswith("fix-failing: failing since ")
        assert "4 of its last 10 task runs succeeded" in job["reason"]
        detail = await _get(h, "/api/v1/machines/sim/sim-001/health")
        assert [f["kind"] for f in detail["findings"] if f["source"] == "taskcluster"] == ["failing"]
        assert await _state(h, "sim-002") == "healthy"
        assert (await _get(h, "/api/v1/health"))["taskcluster"] == {pool: "ok"}
        assert tc.refused == []
    finally:
        await h.stop()
        await port.stopListening()
