"""
Fleet health divided between two rollers on one real PostgreSQL database,
in process (each roller its own store, node, queue and health watcher,
driven by hand): rendezvous shares (roller.cluster.shares), each watcher
sweeping and recording only its share and showing the others' machines
from the database, and remediation: never decided twice for a machine,
the pool limits counted across rollers.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from attrs import evolve
from test_cluster_queue import Roller
from test_queue import Controlled
from twisted.internet.defer import succeed

from roller.cluster.shares import owner
from roller.config import load_settings
from roller.drivers.liveness import LivenessResult
from roller.health.policy import Action
from roller.health.watcher import HealthWatcher, policies_from_settings
from roller.inventory import Machine
from roller.testing.postgres import PostgresServer, pg_rows
from roller.testing.syncdb import result_of, run

MACHINES = 12
FLEET = 40  # (one test: machines enough that some of a joining roller's are always still due)


def test_rendezvous_shares_move_only_the_machines_of_a_roller_that_joins_or_leaves() -> None:
    keys = [("g", f"m{i:03d}") for i in range(600)]
    three = [{"id": r, "reach": []} for r in ("a/1/x", "b/2/y", "c/3/z")]
    before = {k: owner(*k, three) for k in keys}
    counts = {r["id"]: list(before.values()).count(r["id"]) for r in three}
    assert all(120 <= n <= 280 for n in counts.values()), counts  # roughly even
    # c leaves: only c's machines move, spread over a and b
    after = {k: owner(*k, three[:2]) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert set(moved) == {k for k in keys if before[k] == "c/3/z"}
    assert {after[k] for k in moved} == {"a/1/x", "b/2/y"}
    # reach: a machine goes only to a roller that reaches its group; none reaches it: no owner
    far = [{"id": "a/1/x", "reach": ["g"]}, {"id": "b/2/y", "reach": ["h"]}]
    assert {owner("g", f"m{i}", far) for i in range(50)} == {"a/1/x"}
    assert owner("nowhere", "m1", far) is None
    assert owner("g", "m1", []) is None
    # the same on every call (no per-process salt)
    assert owner("g", "m001", three) == before[("g", "m001")]


POLICY = [{"name": "revive", "pools": ["p"], "when": ["down"], "after": 0, "do": ["a"], "max_concurrent": 1,
           "cooldown": 600, "max_per_day": 5}]


class Watching(Roller):
    def __init__(self, url: str, host: str, ctl: Controlled, **env: str):
        super().__init__(url, host, ctl, **env)
        env = {"ROLLER_HEALTH_ENABLED": "false", "ROLLER_HEALTH_REMEDIATE": "true", "ROLLER_HEALTH_DOWN_AFTER": "1"}
        settings = evolve(load_settings(environ=env), health_policies=tuple(POLICY))
        self.probed: list[tuple[str, str]] = []
        self.watcher = HealthWatcher(self.clock, self.store, self.queue, settings,  # type: ignore[arg-type]
                                     policies=policies_from_settings(settings, ["a", "b"]), cluster=self.node)

    def sweep(self, alive: bool) -> list[Machine]:
        """One round by hand: every machine of this roller's share answers C{alive}."""
        mine = self.watcher._swept()
        for m in mine:
            self.watcher._probed(m, LivenessResult(alive=alive, detail="answered" if alive else "no answer"), None)
        run(self.watcher._flush())
        return mine


@pytest.fixture
def pair(postgres_server: PostgresServer) -> Any:
    url = postgres_server.create_database()
    ctl = Controlled()
    a = Watching(url, "host-a", ctl)
    b = Watching(url, "host-b", ctl)
    for i in range(MACHINES):
        result_of(a.store.machines.put(Machine.from_json({"worker_id": f"m{i:02d}", "worker_group": "g",
                                                    "ip": "127.0.0.1", "pool": "p"})))
    assert result_of(b.store.machines.refresh()) is True
    a.look()  # each sees the other
    b.look()
    run(a.watcher.start())
    run(b.watcher.start())
    yield url, ctl, a, b
    run(a.watcher.stop())
    run(b.watcher.stop())
    a.close()
    b.close()


def test_each_roller_sweeps_and_records_its_share_and_shows_the_others_from_the_database(pair: Any) -> None:
    url, _, a, b = pair
    mine_a = {m.key for m in a.sweep(alive=False)}
    mine_b = {m.key for m in b.sweep(alive=True)}
    everyone = {("g", f"m{i:02d}") for i in range(MACHINES)}
    assert mine_a and mine_b and not mine_a & mine_b and mine_a | mine_b == everyone
    assert a.watcher.share == {"roller": a.node.id, "rollers": 2, "machines": len(mine_a), "fleet": MACHINES,
                               "unreached": 0}
    # each wrote its own machines only
    rows = dict(((g, w), s) for g, w, s in pg_rows(url, "SELECT worker_group, worker_id, state FROM health"))
    assert {k for k, s in rows.items() if s == "down"} == mine_a
    assert {k for k, s in rows.items() if s == "healthy"} == mine_b
    # each shows the whole fleet after its next tick: the other's machines as the other recorded them
    run(a.watcher._tick())
    run(b.watcher._tick())
    for w in (a.watcher, b.watcher):
        assert {k for k in everyone if w.state_of(k) == "down"} == mine_a
        assert {k for k in everyone if w.state_of(k) == "healthy"} == mine_b
    # B's tick did not remediate A's down machines; A's tick remediated one (max_concurrent 1 for the pool)
    jobs = pg_rows(url, "SELECT worker_group, worker_id, requester FROM jobs")
    assert len(jobs) == 1 and (jobs[0][0], jobs[0][1]) in mine_a, jobs


def test_a_remediation_is_never_decided_twice_and_the_pool_limit_holds_across_rollers(pair: Any) -> None:
    url, ctl, a, b = pair
    mine_a = a.sweep(alive=False)
    mine_b = b.sweep(alive=False)
    # both decided on the same history (nothing remediated yet) to act on the same machine: only one acts
    target = mine_a[0]
    (action,), _ = policies_plan(a.watcher, target)
    run(a.watcher._remediate(action, a.clock.seconds()))
    run(b.watcher._remediate(action, b.clock.seconds()))
    rows = pg_rows(url, "SELECT worker_id, job_id FROM remediations")
    assert len(rows) == 1 and rows[0][1] is not None, rows
    assert pg_rows(url, "SELECT count(*) FROM jobs") == [(1,)]
    # B's own down machine is held back: the pool's one remediation at a time runs on A's machine
    run(b.watcher._tick())
    assert pg_rows(url, "SELECT count(*) FROM jobs") == [(1,)]
    assert any("1 machine(s) of pool p already under revive" in line for line in b.watcher.held), b.watcher.held
    assert {line.split(":")[0] for line in b.watcher.held} <= {f"g/{m.worker_id}" for m in mine_b}
    # once that job ended, B may act on its own share
    (job_id,) = ctl.running_ids()
    ctl.finish(job_id)
    a.look()
    b.look()
    run(b.watcher._tick())
    jobs = pg_rows(url, "SELECT worker_id FROM jobs WHERE requester = 'roller/health' ORDER BY seq")
    assert len(jobs) == 2 and jobs[1][0] in {m.worker_id for m in mine_b}, jobs


def policies_plan(watcher: HealthWatcher, target: Machine) -> tuple[list[Action], list[str]]:
    from roller.health.policy import plan

    return plan(watcher.policies, [watcher.tracker.machines[target.key]], now=watcher.clock.seconds(), paused=False,
                busy=lambda k: False, history=[], pool_sizes={"p": MACHINES})


def test_a_machine_no_live_roller_reaches_is_probed_by_nobody_and_says_so(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    ctl = Controlled()
    a = Watching(url, "host-a", ctl, ROLLER_CLUSTER_REACH="g")
    b = Watching(url, "host-b", ctl, ROLLER_CLUSTER_REACH="g")
    try:
        for worker, group in (("m1", "g"), ("m2", "g"), ("far-1", "far")):
            result_of(a.store.machines.put(Machine.from_json({"worker_id": worker, "worker_group": group,
                                                             "ip": "127.0.0.1", "pool": "p"})))
        result_of(b.store.machines.refresh())
        a.look()
        b.look()
        swept = {m.worker_id for m in a.sweep(alive=True)} | {m.worker_id for m in b.sweep(alive=True)}
        assert swept == {"m1", "m2"}
        assert a.watcher.share is not None and a.watcher.share["unreached"] == 1
        first = min((a, b), key=lambda r: r.node.id)  # the first live roller records it
        h = first.watcher.health_of(("far", "far-1"))
        assert h is not None and h.state.value == "unknown"
        assert [f.detail for f in h.finding_list()] == [
            "liveness could not be checked: no running roller reaches worker group far (cluster.reach): nobody "
            "probes it"]
        rows = pg_rows(url, "SELECT state, findings FROM health WHERE worker_id = 'far-1'")
        assert rows and rows[0][0] == "unknown" and "nobody probes it" in rows[0][1], rows
    finally:
        a.close()
        b.close()


def test_a_roller_without_health_sweeps_takes_no_share_and_shows_the_fleet(pair: Any) -> None:
    url, ctl, a, b = pair
    c = Watching(url, "host-c", ctl, ROLLER_HEALTH_ENABLED="false")
    try:
        for r in (a, b, c):
            r.look()
        assert c.node.sweeps is False
        assert pg_rows(url, "SELECT sweeps FROM rollers WHERE id = ?", c.node.id) == [(0,)]
        mine_a = {m.key for m in a.sweep(alive=False)}
        mine_b = {m.key for m in b.sweep(alive=True)}
        assert len(mine_a | mine_b) == MACHINES and a.watcher.share is not None
        assert a.watcher.share["rollers"] == 2  # C is live, but does not sweep
        run(c.watcher.start())
        run(c.watcher._follow())
        assert {k for k in mine_a | mine_b if c.watcher.state_of(k) == "down"} == mine_a
        assert {k for k in mine_a | mine_b if c.watcher.state_of(k) == "healthy"} == mine_b
        run(c.watcher.stop())
    finally:
        c.close()


def test_a_machine_that_moves_to_a_joining_roller_mid_round_is_not_probed_again_by_the_first(
        postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    ctl = Controlled()
    a = Roller(url, "host-a", ctl)
    try:
        for i in range(FLEET):
            result_of(a.store.machines.put(Machine.from_json({"worker_id": f"m{i:02d}", "worker_group": "g",
                                                             "ip": "127.0.0.1", "pool": "p"})))
        a.look()
        probed: list[tuple[str, str]] = []

        def probe(m: Machine) -> Any:
            probed.append(m.key)
            return succeed(LivenessResult(alive=True, detail="answered"))

        settings = load_settings(environ={"ROLLER_HEALTH_SWEEP_INTERVAL": "40"})
        watcher = HealthWatcher(a.clock, a.store, a.queue, settings, probe=probe,  # type: ignore[arg-type]
                                cluster=a.node)
        run(watcher.start())  # alone: the whole fleet, one machine a second
        a.clock.advance(5.5)
        first = list(probed)
        assert len(first) == 6
        b = Roller(url, "host-b", ctl)  # joins mid-round
        try:
            a.look()
            shares = a.node.shares()
            moved = {k for k in (("g", f"m{i:02d}") for i in range(FLEET)) if not shares.mine(*k)}
            assert moved - set(first), (moved, first)  # some of B's machines were still due in A's round
            a.clock.advance(34.0)  # the rest of the round
            assert not (set(probed[len(first):]) & moved), (probed, moved)
            assert watcher.sweep.rounds[0].moved == len(moved - set(first)) and len(watcher.sweep.rounds) == 1
        finally:
            run(watcher.stop())
            b.close()
    finally:
        a.close()


class RecordingFitness:
    """Stands in for the Taskcluster fitness poller: records the machines each poll asks about."""

    def __init__(self) -> None:
        self.tc: Any = None
        self.asked: list[tuple[str, str]] = []

    async def poll(self, provisioner: str, worker_type: str, keys: list[tuple[str, str]], now: float) -> Any:
        self.asked.extend(keys)
        return SimpleNamespace(findings={})


def test_taskcluster_fitness_polls_are_divided_by_machine(pair: Any) -> None:
    _, _, a, b = pair
    asked = []
    for r in (a, b):
        settings = evolve(r.watcher.settings, health_root_url="http://127.0.0.1:9")
        w = HealthWatcher(r.clock, r.store, r.queue, settings, cluster=r.node,  # type: ignore[arg-type]
                          credential=lambda name: ("project/releng/roller", "token"))
        fitness = RecordingFitness()
        w._fitness = fitness  # type: ignore[assignment]
        try:
            run(w._poll_taskcluster())
        finally:
            run(w.stop())
        asked.append(set(fitness.asked))
        assert w.tc_status == {f"{settings.loans_provisioner_id}/p": "ok"}
    everyone = {("g", f"m{i:02d}") for i in range(MACHINES)}
    assert asked[0] and asked[1] and not asked[0] & asked[1] and asked[0] | asked[1] == everyone
    assert asked[0] == {k for k in everyone if a.node.shares().mine(*k)}
