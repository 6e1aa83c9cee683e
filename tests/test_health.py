"""
/__heartbeat__ (database writable, reactor lag), /__version__ (version.json)
and the driver-error and per-endpoint metrics, through StubTreq on a
synchronous SQLite store and a SyncClock.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import Deferred

from roller import __version__
from roller.auth import AnonymousAuthenticator
from roller.inventory import Machine
from roller.metrics import Metrics
from roller.queue import JobQueue
from roller.tasks import TaskFailed, TaskRegistry, TaskSpec
from roller.testing.syncdb import result_of, sync_store
from roller.version import PACKAGED, load_version
from roller.web.api import Api

BASE = "http://roller.test"


class Env:
    def __init__(self, tmp_path: Any, **api: Any):
        self.store, self.clock = sync_store(str(tmp_path / "health.db"))
        self.runs: dict[str, Deferred] = {}

        async def power(ctx: Any, params: Any) -> str:
            d: Deferred = Deferred()
            self.runs[ctx.job.id] = d
            return await d

        async def reboot(ctx: Any, params: Any) -> str:
            ctx.log("ssh_reboot failed: refused", method="ssh_reboot", outcome="failed")
            ctx.log("ipmi_reset failed: busy", method="ipmi_reset", outcome="failed")
            ctx.log("snmp_reboot skipped: no pdu", method="snmp_reboot", outcome="skipped")
            raise TaskFailed("failed")

        pdu = lambda m: (f"pdu:{m.pdu.host}",) if m.pdu else ()
        tasks = TaskRegistry([TaskSpec(name="power", description="", run=power, endpoints=pdu),
                              TaskSpec(name="reboot", description="", run=reboot)])
        self.queue = JobQueue(self.store, tasks, self.clock)
        result_of(Deferred.fromCoroutine(self.queue.start()))
        self.metrics = Metrics(self.queue, self.clock)
        self.api = Api(self.store, self.queue, tasks, AnonymousAuthenticator(), allowed_tasks=("power", "reboot"),
                       clock=self.clock, metrics=self.metrics, **api)
        self.client = StubTreq(self.api.app.resource())
        for i in range(1, 4):
            result_of(self.store.machines.put(Machine.from_json(
                {"worker_id": f"m{i}", "worker_group": "g", "pdu": {"host": f"pdu{1 + i // 3}", "outlet": "AA1"}})))

    def request(self, method: str, path: str) -> tuple[int, Any]:
        d = self.client.request(method, BASE + path)
        self.client.flush()
        response = result_of(d)
        content = self.client.content(response)
        self.client.flush()
        body = result_of(content)
        try:
            return response.code, json.loads(body)
        except ValueError:
            return response.code, body.decode()

    def submit(self, task: str, worker: str) -> str:
        code, body = self.request("POST", f"/api/v1/workers/{worker}/group/g/jobs?task_name={task}")
        assert code == 201, body
        return body["task_id"]


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def test_heartbeat_ok_then_failing_on_reactor_lag(tmp_path):
    env = Env(tmp_path, max_lag=2.0)
    assert env.request("GET", "/__heartbeat__") == (200, {
        "status": "ok", "checks": {"database": "ok", "reactor_lag": "ok"},
        "queue": {"running": 0, "queued": 0, "unrecorded": 0}})
    env.metrics.start()
    env.clock.advance(1.0)  # on time
    assert env.request("GET", "/__heartbeat__")[0] == 200
    env.clock.advance(4.5)  # the next 1 s tick fired 3.5 s late
    assert env.metrics.lag == pytest.approx(3.5)
    code, body = env.request("GET", "/__heartbeat__")
    assert code == 500 and body["status"] == "error"
    assert body["checks"] == {"database": "ok", "reactor_lag": "error: 3.5 s, over 2 s"}
    env.clock.advance(1.0)  # back on time
    assert env.request("GET", "/__heartbeat__")[0] == 200
    env.metrics.stop()


def test_heartbeat_fails_when_the_database_is_not_writable(tmp_path):
    env = Env(tmp_path)
    # reads still work; a write is refused (as on a read-only file or a full disk)
    for pool in env.store.db.pools:
        pool.runInteraction(lambda c: c.execute("PRAGMA query_only = ON"))
    code, body = env.request("GET", "/__heartbeat__")
    assert code == 500
    assert body["checks"]["database"] == ("error: not writable: the database is read-only (read-only file system "
                                          "or file)")
    assert body["checks"]["reactor_lag"] == "ok"


def test_version_from_version_json(tmp_path):
    path = tmp_path / "version.json"
    path.write_text(json.dumps({"source": "https://example.com/roller", "version": "1.2.3",
                                "commit": "abc123", "build": "https://ci.example.com/1", "other": 1}))
    env = Env(tmp_path, version_info=load_version(str(path)))
    assert env.request("GET", "/__version__") == (200, {
        "name": "roller", "source": "https://example.com/roller", "version": "1.2.3", "commit": "abc123",
        "build": "https://ci.example.com/1"})


def test_version_falls_back_to_the_packaged_file(tmp_path):
    assert os.path.exists(PACKAGED)
    with open(PACKAGED) as f:
        assert set(json.load(f)) == {"source", "version", "commit", "build"}
    default = Env(tmp_path).request("GET", "/__version__")[1]
    assert default["version"] == __version__ and set(default) == {"name", "source", "version", "commit", "build"}
    (tmp_path / "bad.json").write_text("[1, 2")
    assert load_version(str(tmp_path / "bad.json"))["version"] == __version__
    assert load_version(str(tmp_path / "missing.json"))["commit"] == ""


def test_driver_errors_and_endpoint_load(tmp_path):
    env = Env(tmp_path)
    a = env.submit("power", "m1")  # pdu1
    env.submit("power", "m2")      # pdu1: waits for it (one job per endpoint)
    c = env.submit("power", "m3")  # pdu2
    env.submit("reboot", "m3")     # waits for m3
    _, text = env.request("GET", "/metrics")
    assert sample(text, "roller_endpoint_jobs_running", endpoint="pdu:pdu1") == 1
    assert sample(text, "roller_endpoint_jobs_running", endpoint="pdu:pdu2") == 1
    env.runs[c].callback("ok")  # m3's reboot now runs and fails two attempts
    env.runs[a].callback("ok")
    _, text = env.request("GET", "/metrics")
    assert sample(text, "roller_endpoint_jobs_running", endpoint="pdu:pdu2") is None
    assert sample(text, "roller_endpoint_jobs_running", endpoint="pdu:pdu1") == 1  # m2 now
    assert sample(text, "roller_driver_errors_total", kind="ssh_reboot") == 1
    assert sample(text, "roller_driver_errors_total", kind="ipmi_reset") == 1
    assert sample(text, "roller_driver_errors_total", kind="snmp_reboot") is None
