"""
Batches end to end: a real twistd roller (Hawk auth, local clients) over a
simulated fleet of 206 machines in its own process (SSH servers on loopback
addresses that really go down and come back up when rebooted; 6 never
answer SSH, one accepts a reboot and never goes down).

Rollout limits are asserted from the member jobs' recorded times (each job
is in flight from its creation to its end), read through the API after the
batch ended: never by sampling while it runs.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pytest

from roller.testing.fleet_roller import FleetProcess, fleet_roller, signed
from roller.testing.process import RollerProcess, wait_for

PREFIX = "project:releng:roller:"
ADMIN = "project/releng/relops"
NO_BATCHES = "project/releng/reboot-only"
POOLS = {"alpha": 100, "beta": 60, "gamma": 32, "delta": 8}  # 25% of each: 25, 15, 8, 2
HUNG = 6
COUNT = sum(POOLS.values()) + HUNG + 1  # and one that never goes down
FINAL = ("succeeded", "failed", "cancelled", "timed_out", "interrupted")


class Fleet:
    """The fleet, its roller and who is where."""

    def __init__(self, fleet: FleetProcess, roller: RollerProcess):
        self.fleet = fleet
        self.roller = roller
        self.pool_of: dict[str, str] = {}
        self.by_pool: dict[str, list[str]] = {}

    def api(self, method: str, path: str, body: Any = None, expect: int | None = 200,
            client: str | None = ADMIN) -> Any:
        r = signed(self.roller, client, method, path, body)
        if expect is not None and r.status != expect:
            raise AssertionError(f"{method} {path}: expected {expect}, got {r!r}\n{self.roller.log_tail()}")
        return r.json() if expect is not None else r

    def create(self, body: dict, expect: int = 201) -> dict:
        return self.api("POST", "/api/v1/batches", body, expect)

    def wait_finished(self, batch_id: str, timeout: float = 120.0) -> dict:
        last: dict = {}

        def done() -> dict | None:
            last.update(self.api("GET", f"/api/v1/batches/{batch_id}?members=false"))
            return dict(last) if last.get("finished") else None

        wait_for(done, timeout, f"batch {batch_id} to finish", interval=0.2,
                 describe=lambda: f"last seen: {last.get('state')} {last.get('counts')}\n{self.roller.log_tail()}")
        return self.api("GET", f"/api/v1/batches/{batch_id}")

    def batch_jobs(self, batch_id: str) -> list[dict]:
        return list(self.api("GET", f"/api/v1/jobs?batch_id={batch_id}&limit=1000")["jobs"])

    def machines(self, names: Iterable[str]) -> list[dict]:
        return [{"worker_group": "sim", "worker_id": w} for w in names]


def _t(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def peaks(jobs: list[dict], pool_of: dict[str, str]) -> tuple[int, dict[str, int]]:
    """
    The most jobs in flight at once over all C{jobs}, and per pool: each job
    from its creation (queued counts) to its end; at equal times an end
    comes before a start.
    """
    events = []
    for j in jobs:
        assert j["finished"] is not None, j
        events.append((_t(j["created"]), 1, pool_of[j["worker_id"]]))
        events.append((_t(j["finished"]), -1, pool_of[j["worker_id"]]))
    events.sort(key=lambda e: (e[0], e[1]))
    now, top = 0, 0
    by_pool: dict[str, int] = {}
    top_pool: dict[str, int] = {}
    for _, delta, pool in events:
        now += delta
        by_pool[pool] = by_pool.get(pool, 0) + delta
        top = max(top, now)
        top_pool[pool] = max(top_pool.get(pool, 0), by_pool[pool])
    return top, top_pool


@pytest.fixture(scope="module")
def env(tmp_path_factory: Any) -> Any:
    tmp = tmp_path_factory.mktemp("batches-e2e")
    fleet = FleetProcess(tmp / "fleet", COUNT, "127.0.15.", hang=HUNG, never_down=1, down_for=1.0,
                         reboot_delay=0.05)
    roller = None
    try:
        fleet.start()
        roller = fleet_roller(tmp / "roller", fleet, clients={
            ADMIN: [PREFIX + "*"],
            NO_BATCHES: [PREFIX + "reboot", PREFIX + "jobs:read"],
        })
        roller.start()
        e = Fleet(fleet, roller)
        names = [fleet.worker_id(i) for i in range(COUNT)]
        pools = [p for p, n in POOLS.items() for _ in range(n)] + ["hung"] * HUNG + ["odd"]
        for entry, name, pool in zip(fleet.inventory(), names, pools, strict=True):
            assert entry["worker_id"] == name
            entry.update(pool=pool, tags=["e2e"] if pool in POOLS else [pool])
            e.api("POST", "/api/v1/machines", entry, 201)
            e.pool_of[name] = pool
            e.by_pool.setdefault(pool, []).append(name)
        yield e
    except BaseException:
        if roller is not None:
            print(roller.log_tail(200))
        raise
    finally:
        if roller is not None:
            roller.close()
        fleet.close()


def test_403_without_batches_create(env: Fleet) -> None:
    body = {"task_name": "reboot", "selector": {"pool": "alpha"}}
    r = env.api("POST", "/api/v1/batches", body, None, client=NO_BATCHES)
    assert r.status == 403, r
    assert r.json()["error"] == "insufficient_scope"
    assert PREFIX + "batches:create" in r.json()["message"]
    r = env.api("POST", "/api/v1/batches", body, None, client=None)
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Hawk"
    assert env.api("GET", "/api/v1/batches", client=NO_BATCHES)["batches"] == []


def test_dry_run_starts_nothing(env: Fleet) -> None:
    view = env.api("POST", "/api/v1/batches?dry_run=true",
                   {"task_name": "reboot", "selector": {"tags": ["e2e"]},
                    "rollout": {"max_concurrent": 10, "max_per_pool": "25%"}})
    assert view["batch_id"] is None and view["dry_run"] is True and view["total"] == 200
    assert view["pools"] == POOLS
    assert view["limits"] == {"max_concurrent": 10, "max_per_pool": {"alpha": 25, "beta": 15, "delta": 2,
                                                                      "gamma": 8}}
    wave = view["first_wave"]
    assert len(wave) == 10 and sum(1 for m in wave if m["pool"] == "delta") <= 2
    assert env.api("GET", "/api/v1/jobs?limit=5")["jobs"] == []
    assert env.api("GET", "/api/v1/batches")["batches"] == []


def test_200_machine_reboot_within_max_concurrent_and_max_per_pool(env: Fleet) -> None:
    view = env.create({"task_name": "reboot", "selector": {"tags": ["e2e"]}, "reason": "e2e rollout",
                       "rollout": {"max_concurrent": 10, "max_per_pool": "25%"}})
    batch_id = view["batch_id"]
    assert view["total"] == 200 and view["state"] == "running"
    done = env.wait_finished(batch_id, timeout=240)
    odd = [(m["worker_id"], m["state"], m["attempts"], m["error"])
           for m in done["members"] if m["state"] != "succeeded"]
    assert done["state"] == "succeeded" and not odd, (done["counts"], odd[:5])
    assert done["counts"]["succeeded"] == 200 and done["progress"] == 1.0
    jobs = env.batch_jobs(batch_id)
    assert len(jobs) == 200 and {j["state"] for j in jobs} == {"succeeded"}
    assert {j["task_id"] for j in jobs} == {m["task_id"] for m in done["members"]}
    assert all(j["reason"] == "e2e rollout" and j["requester"] == ADMIN for j in jobs)
    top, by_pool = peaks(jobs, env.pool_of)
    assert top == 10, top  # the first wave fills the limit, and nothing ever goes past it
    limits = {"alpha": 25, "beta": 15, "gamma": 8, "delta": 2}
    assert all(by_pool[p] <= limits[p] for p in limits), by_pool
    assert by_pool["delta"] == 2, by_pool  # the small pool's limit is what holds it back
    assert all(j["result"] for j in jobs)


def test_stop_after_failures_halts_and_starts_nothing_more(env: Fleet) -> None:
    hung = env.by_pool["hung"]
    normal = env.by_pool["beta"][:6]
    order = [hung[0], normal[0], hung[1], hung[2], normal[1], hung[3], normal[2], hung[4], normal[3], normal[4]]
    view = env.create({"task_name": "reboot", "selector": {"machines": env.machines(order)},
                       "rollout": {"max_concurrent": 2, "max_per_pool": None, "stop_after_failures": 3}})
    done = env.wait_finished(view["batch_id"])
    assert done["state"] == "halted", done["counts"]
    counts = done["counts"]
    assert counts["failed"] + counts["timed_out"] >= 3 and counts["skipped"] >= 1, counts
    assert done["halt_reason"].startswith("stopped after 3 failed members; last: sim/"), done["halt_reason"]
    assert any(h in done["halt_reason"] for h in hung), done["halt_reason"]
    jobs = env.batch_jobs(view["batch_id"])
    started = [m for m in done["members"] if m["state"] != "skipped"]
    assert len(jobs) == len(started)
    assert all(m["task_id"] is None for m in done["members"] if m["state"] == "skipped")
    failures = sorted(_t(j["finished"]) for j in jobs if j["state"] in ("failed", "timed_out"))
    third = failures[2]
    assert all(_t(j["created"]) <= third for j in jobs), "a member started after the breaker tripped"


def test_cancel_skips_the_rest_and_lets_running_members_finish(env: Fleet) -> None:
    view = env.create({"task_name": "reboot", "selector": {"pool": "alpha"},
                       "rollout": {"max_concurrent": 2, "max_per_pool": None}})
    batch_id = view["batch_id"]
    wait_for(lambda: env.api("GET", f"/api/v1/batches/{batch_id}?members=false")["counts"]["succeeded"] >= 2,
             60, "two members to succeed", describe=env.roller.log_tail)
    cancelled = env.api("DELETE", f"/api/v1/batches/{batch_id}")
    assert cancelled["state"] == "cancelled" and cancelled["halt_reason"] == f"cancelled by {ADMIN}"
    # at most max_concurrent members were being started or in flight; the rest are skipped
    started = {m["worker_id"] for m in cancelled["members"] if m["state"] != "skipped"}
    assert 2 <= len(started) <= 4 and cancelled["counts"]["skipped"] == 100 - len(started)
    done = env.wait_finished(batch_id)
    assert done["state"] == "cancelled"
    jobs = env.batch_jobs(batch_id)
    assert {j["worker_id"] for j in jobs} == started  # nothing more was started
    assert {j["task_id"] for j in jobs} == {m["task_id"] for m in done["members"] if m["task_id"]}
    # the members in flight finished (or, caught being started, were cancelled at once)
    assert all(m["state"] in ("succeeded", "cancelled", "skipped") for m in done["members"])
    entries = env.api("GET", f"/api/v1/audit?target=batch/{batch_id}")["entries"]
    assert [e["action"] for e in entries] == ["batch.cancel", "batch.create:reboot"]
    assert env.api("DELETE", f"/api/v1/batches/{batch_id}", expect=409)["error"] == "batch_finished"


def test_a_member_joins_a_job_already_there(env: Fleet) -> None:
    # a reboot of the machine that never goes down waits reboot.down_timeout (3 s) before it fails
    hung = env.by_pool["odd"][0]
    existing = env.api("POST", f"/api/v1/workers/{hung}/group/sim/jobs?task_name=reboot", None, 201)["task_id"]
    other = env.by_pool["gamma"][0]
    view = env.create({"task_name": "reboot", "selector": {"machines": env.machines([hung, other])}})
    done = env.wait_finished(view["batch_id"])
    members = {m["worker_id"]: m for m in done["members"]}
    assert members[hung]["joined"] is True and members[hung]["task_id"] == existing
    assert members[hung]["state"] == "failed"  # the job it joined failed: so did the member
    assert members[other]["joined"] is False and members[other]["state"] == "succeeded"
    assert done["state"] == "failed"
    job = env.api("GET", f"/api/v1/jobs/{existing}")
    assert job["batch_id"] is None  # a joined job stays what it was
    assert [j["task_id"] for j in env.batch_jobs(view["batch_id"])] == [members[other]["task_id"]]


def test_kill_9_mid_batch_resumes_within_its_limits(env: Fleet) -> None:
    gamma, delta = env.by_pool["gamma"], env.by_pool["delta"]
    names = list(dict.fromkeys(n for pair in zip(gamma[:16], delta + delta, strict=True) for n in pair))
    assert len(names) == 24  # gamma 16 and delta 8, interleaved
    view = env.create({"task_name": "reboot", "selector": {"machines": env.machines(names)},
                       "rollout": {"max_concurrent": 5, "max_per_pool": "25%"}})
    batch_id = view["batch_id"]
    assert view["total"] == 24
    wait_for(lambda: env.api("GET", f"/api/v1/batches/{batch_id}?members=false")["counts"]["succeeded"] >= 6,
             60, "six members to succeed", describe=env.roller.log_tail)
    assert env.roller.kill() == -signal.SIGKILL
    env.roller.start()
    done = env.wait_finished(batch_id)
    assert done["state"] == "succeeded", (done["counts"], [m for m in done["members"] if m["error"]])
    assert done["counts"]["succeeded"] == 24
    jobs = env.batch_jobs(batch_id)
    interrupted = [j for j in jobs if j["state"] == "interrupted"]
    assert interrupted, "nothing was running at the kill"
    retried = {j["worker_id"] for j in interrupted}
    assert all(m["attempts"] == 2 for m in done["members"] if m["worker_id"] in retried), (
        [(m["worker_id"], m["attempts"], m["state"]) for m in done["members"] if m["worker_id"] in retried],
        [(j["worker_id"], j["state"], j["created"], j["finished"]) for j in jobs if j["worker_id"] in retried],
        env.roller.log_events(150, without=("[roller.access#", "[roller.drivers.")))
    assert {j["state"] for j in jobs} == {"succeeded", "interrupted"}
    # over the whole run, before and after the kill (an interrupted job was in flight until the restart)
    top, by_pool = peaks(jobs, env.pool_of)
    spans = sorted((j["created"], j["finished"], j["worker_id"], j["state"]) for j in jobs)
    assert top <= 5 and by_pool["gamma"] <= 8 and by_pool["delta"] <= 2, (top, by_pool, spans,
                                                                         env.roller.log_events())
    assert "resumed" in env.roller.log_text()
