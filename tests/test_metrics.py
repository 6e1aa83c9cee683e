"""
Tests for L{roller.metrics} and C{GET /metrics}, through
C{treq.testing.StubTreq(api.app.resource())} on a synchronous SQLite store
(see tests/test_api.py): fake tasks the tests finish by hand, a
L{SyncClock} advanced by hand, no reactor run.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from roller.auth import AnonymousAuthenticator
from roller.inventory import Machine
from roller.metrics import Metrics
from roller.queue import JobQueue
from roller.tasks import TaskFailed, TaskRegistry, TaskSpec
from roller.testing.syncdb import result_of, sync_store
from roller.web.api import Api

BASE = "http://roller.test"



class Env:
    def __init__(self, tmp_path: Any):
        self.store, self.clock = sync_store(str(tmp_path / "metrics.db"))
        self.runs: dict[str, Deferred] = {}

        def task(name: str) -> TaskSpec:
            async def go(ctx: Any, params: Any) -> str:
                d: Deferred = Deferred()
                self.runs[ctx.job.id] = d
                return await d

            return TaskSpec(name=name, description=name, run=go, timeout=600.0)

        self.queue = JobQueue(self.store, TaskRegistry([task("reboot"), task("power")]), self.clock)
        result_of(Deferred.fromCoroutine(self.queue.start()))
        self.api = Api(self.store, self.queue, self.queue._tasks, AnonymousAuthenticator(),
                       allowed_tasks=("reboot", "power"), clock=self.clock)
        self.client = StubTreq(self.api.app.resource())
        for i in range(1, 4):
            result_of(self.store.machines.put(Machine.from_json({"worker_id": f"m{i}", "worker_group": "g"})))

    def request(self, method: str, path: str) -> tuple[int, Any, bytes]:
        d = self.client.request(method, BASE + path)
        self.client.flush()
        response = result_of(d)
        content = self.client.content(response)
        self.client.flush()
        return response.code, response.headers, result_of(content)

    def submit(self, task: str, worker: str) -> str:
        code, _, body = self.request("POST", f"/api/v1/workers/{worker}/group/g/jobs?task_name={task}")
        assert code == 201, body
        return json.loads(body)["task_id"]

    def scrape(self) -> str:
        code, headers, body = self.request("GET", "/metrics")
        assert code == 200, body
        assert headers.getRawHeaders("content-type") == [CONTENT_TYPE_LATEST]
        return body.decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


@pytest.fixture
def env(tmp_path: Any) -> Env:
    return Env(tmp_path)


def test_empty_exposition(env: Env) -> None:
    text = env.scrape()
    assert sample(text, "roller_jobs_queued") == 0
    assert sample(text, "roller_jobs_running") == 0
    assert sample(text, "roller_reactor_lag_seconds") == 0
    assert "# TYPE roller_jobs_total counter" in text
    assert "# TYPE roller_job_duration_seconds histogram" in text


def test_job_counters_gauges_and_durations(env: Env) -> None:
    ok = env.submit("reboot", "m1")
    bad = env.submit("reboot", "m2")
    power = env.submit("power", "m3")
    text = env.scrape()
    assert sample(text, "roller_jobs_running") == 3
    assert sample(text, "roller_jobs_queued") == 0
    assert "roller_jobs_total{" not in text

    env.clock.advance(2.5)
    env.runs[ok].callback("done")
    env.clock.advance(1.0)
    env.runs[bad].errback(TaskFailed("no"))
    text = env.scrape()
    assert 'roller_jobs_total{state="succeeded",task="reboot"} 1.0' in text
    assert 'roller_jobs_total{state="failed",task="reboot"} 1.0' in text
    assert sample(text, "roller_jobs_running") == 1
    assert sample(text, "roller_job_duration_seconds_count", task="reboot") == 2
    assert sample(text, "roller_job_duration_seconds_sum", task="reboot") == pytest.approx(2.5 + 3.5)
    assert sample(text, "roller_job_duration_seconds_bucket", task="reboot", le="1.0") == 0
    assert sample(text, "roller_job_duration_seconds_bucket", task="reboot", le="2.5") == 1  # le: at most
    assert sample(text, "roller_job_duration_seconds_bucket", task="reboot", le="5.0") == 2
    assert sample(text, "roller_job_duration_seconds_count", task="power") is None

    # A second job on a busy machine waits in the queue; cancelling it counts, without a duration.
    waiting = env.submit("reboot", "m3")
    assert sample(env.scrape(), "roller_jobs_queued") == 1
    code, _, _ = env.request("DELETE", f"/api/v1/jobs/{waiting}")
    assert code == 200
    env.runs[power].callback("on")
    text = env.scrape()
    assert sample(text, "roller_jobs_queued") == 0 and sample(text, "roller_jobs_running") == 0
    assert sample(text, "roller_jobs_total", state="cancelled", task="reboot") == 1
    assert sample(text, "roller_jobs_total", state="succeeded", task="power") == 1
    assert sample(text, "roller_job_duration_seconds_count", task="reboot") == 2
    assert sample(text, "roller_job_duration_seconds_count", task="power") == 1


def test_registries_are_per_instance(env: Env) -> None:
    other = Metrics(env.queue, env.clock)
    ok = env.submit("reboot", "m1")
    env.runs[ok].callback("done")
    text = other.exposition().decode()
    assert sample(text, "roller_jobs_total", state="succeeded", task="reboot") == 1
    other.stop()  # unsubscribes
    ok = env.submit("reboot", "m1")
    env.runs[ok].callback("done")
    assert sample(other.exposition().decode(), "roller_jobs_total", state="succeeded", task="reboot") == 1
    assert sample(env.scrape(), "roller_jobs_total", state="succeeded", task="reboot") == 2


def test_reactor_lag() -> None:
    clock = Clock()
    queue = JobQueue(None, TaskRegistry([]), clock)
    metrics = Metrics(queue, clock)
    lag = lambda: sample(metrics.exposition().decode(), "roller_reactor_lag_seconds")  # noqa: E731
    metrics.start()
    clock.advance(1.3)  # due at 1.0
    assert lag() == pytest.approx(0.3)
    clock.advance(0.7)  # due at 2.0
    assert lag() == pytest.approx(0.0, abs=1e-9)
    clock.advance(1.6)  # due at 3.0
    assert lag() == pytest.approx(0.6)
    clock.advance(0.4)  # due at 4.0
    assert lag() == pytest.approx(0.0, abs=1e-9)
    metrics.stop()
    assert not clock.getDelayedCalls()
