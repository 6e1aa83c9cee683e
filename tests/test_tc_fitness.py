"""
Taskcluster fitness: the rule (L{assess}, pure) and the poller against a
loopback fake of worker-manager and the queue that verifies Hawk with
mohawk and pages with continuationToken.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from roller.health.fitness import FitnessPoller, FitnessRules, assess
from roller.http_client import close_pool, pooled_client
from roller.taskcluster.http import TaskclusterError, TaskclusterHttp
from roller.taskcluster.workers import Run, WorkerInfo
from roller.testing.tc_workers import FakeTaskclusterWorkers

NOW = 1_800_000_000.0
RULES = FitnessRules(missing_after=3600, window=10, min_success_rate=0.85, min_runs=5, max_consecutive_failures=3)
KEY = ("mdc1", "w1")


def runs(*states: str) -> list[Run]:
    out = []
    for i, s in enumerate(states):
        state, _, reason = s.partition(":")
        out.append(Run(f"t{i}", 0, state, reason))
    return out


def worker(**kw: Any) -> WorkerInfo:
    return WorkerInfo("mdc1", "w1", **kw)


def kinds(found: dict) -> list[str]:
    return [k for k, _ in found[KEY]]


def test_six_failures_out_of_ten_is_failing() -> None:
    history = runs(*["failed", "completed"] * 4, "failed", "failed")
    assert len(history) == 10 and sum(r.state == "failed" for r in history) == 6
    found = assess([KEY], {KEY: worker(last_date_active=NOW)}, {KEY: history}, 0, NOW, RULES)
    assert kinds(found) == ["failing"]
    assert "4 of its last 10 task runs succeeded (40%, below 85%)" in found[KEY][0][1]


def test_healthy_worker_has_no_finding_and_old_runs_fall_out_of_the_window() -> None:
    history = runs(*["failed"] * 2, *["completed"] * 10)
    assert assess([KEY], {KEY: worker(last_date_active=NOW)}, {KEY: history}, 3, NOW, RULES) == {KEY: []}
    # 9 of 10 = 90%: fine; 8 of 10 = 80%: failing
    assert kinds(assess([KEY], {KEY: worker()}, {KEY: runs("failed", *["completed"] * 9)}, 0, NOW, RULES)) == []
    assert kinds(assess([KEY], {KEY: worker()}, {KEY: runs("failed", "failed", *["completed"] * 8)}, 0, NOW,
                        RULES)) == ["failing"]


def test_consecutive_failures_and_what_does_not_count() -> None:
    assert kinds(assess([KEY], {KEY: worker()}, {KEY: runs("completed", "failed", "exception:worker-shutdown",
                                                           "failed")}, 0, NOW, RULES)) == ["failing"]
    # canceled / superseded / deadline-exceeded runs say nothing about the worker
    history = runs("completed", "failed", "exception:canceled", "failed", "exception:superseded")
    assert kinds(assess([KEY], {KEY: worker()}, {KEY: history}, 0, NOW, RULES)) == []
    # too few runs to judge a rate: 1 of 2 is not "failing" yet
    assert kinds(assess([KEY], {KEY: worker()}, {KEY: runs("failed", "completed")}, 0, NOW, RULES)) == []


def test_missing_only_while_the_pool_has_pending_work() -> None:
    stale = worker(last_date_active=NOW - 7200)
    assert kinds(assess([KEY], {KEY: stale}, {}, 0, NOW, RULES)) == []
    found = assess([KEY], {KEY: stale}, {}, 4, NOW, RULES)
    assert kinds(found) == ["missing"] and "last active 2 h ago while its pool has 4 pending" in found[KEY][0][1]
    assert kinds(assess([KEY], {KEY: worker(last_date_active=NOW - 60)}, {}, 4, NOW, RULES)) == []
    unlisted = assess([KEY], {}, {}, 0, NOW, RULES)
    assert kinds(unlisted) == ["missing"] and "does not list" in unlisted[KEY][0][1]


def test_quarantine_is_mirrored_until_it_ends() -> None:
    assert kinds(assess([KEY], {KEY: worker(quarantine_until=NOW + 3600)}, {}, 0, NOW, RULES)) == ["quarantined"]
    assert kinds(assess([KEY], {KEY: worker(quarantine_until=NOW - 1)}, {}, 0, NOW, RULES)) == []


# -- against the fake, over HTTP ---------------------------------------------------------------------


CLIENT = ("project/releng/roller-health", "health-access-token-0123456789")


@pytest.fixture
def fake() -> Any:
    f = FakeTaskclusterWorkers({CLIENT[0]: CLIENT[1]}, page_size=7)
    port = f.listen(reactor)
    yield f
    port.stopListening()


async def _poller(fake: FakeTaskclusterWorkers, token: str = CLIENT[1]) -> tuple[FitnessPoller, Any]:
    http, pool = pooled_client(reactor)
    tc = TaskclusterHttp(reactor, http, fake.url, CLIENT[0], token, timeout=10)
    return FitnessPoller(tc, RULES), pool


@pytest_twisted.ensureDeferred
async def test_poll_pages_signs_and_caches_resolved_runs(fake: FakeTaskclusterWorkers) -> None:
    pool_id = "releng-hardware/gecko-t-linux"
    for n in range(20):
        fake.add_worker(pool_id, "mdc1", f"w{n:02d}", last_active=NOW - (7200 if n == 3 else 60))
        fake.add_runs(pool_id, "mdc1", f"w{n:02d}", ["completed"] * 10)
    fake.add_runs(pool_id, "mdc1", "w05", ["failed", "failed", "failed"])
    fake.add_runs(pool_id, "mdc1", "w06", ["failed", "completed"] * 2 + ["failed", "failed", "completed"] * 2)
    fake.add_worker(pool_id, "mdc1", "w19", last_active=NOW - 60, quarantine_until=NOW + 600)
    fake.pending[pool_id] = 12
    machines = [("mdc1", f"w{n:02d}") for n in range(21)]  # w20 is not in Taskcluster
    poller, pool = await _poller(fake)
    try:
        result = await poller.poll("releng-hardware", "gecko-t-linux", machines, NOW)
        assert fake.refused == [] and fake.requests["listWorkers"] == 3  # 20 workers, pages of 7
        assert result.pending == 12 and result.workers_listed == 20
        found = {k: [kind for kind, _ in v] for k, v in result.findings.items() if v}
        assert found == {("mdc1", "w03"): ["missing"], ("mdc1", "w05"): ["failing"],
                         ("mdc1", "w06"): ["failing"], ("mdc1", "w19"): ["quarantined"],
                         ("mdc1", "w20"): ["missing"]}
        statuses = fake.requests["status"]
        # a second poll with nothing new asks for no recent tasks and no run again
        again = await poller.poll("releng-hardware", "gecko-t-linux", machines, NOW)
        assert again.findings == result.findings
        assert fake.requests["status"] == statuses and fake.requests["getWorker"] == 19
        # a new run on one worker: one getWorker, one status
        fake.add_runs(pool_id, "mdc1", "w05", ["completed"])
        third = await poller.poll("releng-hardware", "gecko-t-linux", machines, NOW)
        assert fake.requests["getWorker"] == 20 and fake.requests["status"] == statuses + 1
        # the streak is broken, but the last 10 runs hold 3 failures: 70%
        assert third.findings[("mdc1", "w05")] == [("failing", "7 of its last 10 task runs succeeded (70%, below 85%)")]
    finally:
        await close_pool(pool)


@pytest_twisted.ensureDeferred
async def test_taskcluster_down_or_refusing_is_an_error_not_a_finding(fake: FakeTaskclusterWorkers) -> None:
    fake.add_worker("p/t", "mdc1", "w1", last_active=NOW)
    poller, pool = await _poller(fake)
    wrong, pool2 = await _poller(fake, token="not-the-access-token-at-all")
    try:
        fake.down = True
        with pytest.raises(TaskclusterError, match="HTTP 503"):
            await poller.poll("p", "t", [("mdc1", "w1")], NOW)
        fake.down = False
        with pytest.raises(TaskclusterError, match="HTTP 401 AuthenticationFailed") as e:
            await wrong.poll("p", "t", [("mdc1", "w1")], NOW)
        assert "not-the-access-token" not in str(e.value)
        assert (await poller.poll("p", "t", [("mdc1", "w1")], NOW)).findings == {("mdc1", "w1"): []}
    finally:
        await close_pool(pool)
        await close_pool(pool2)
