"""The health API's scopes and bad input, on task.Clock with a real (synchronous) store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from attrs import evolve
from treq.testing import StubTreq
from twisted.internet.defer import succeed
from zope.interface import implementer

from roller.auth import IAuthenticator, Principal
from roller.config import load_settings
from roller.health.watcher import HealthWatcher
from roller.inventory import Machine
from roller.queue import JobQueue
from roller.tasks import builtin_tasks
from roller.testing.results import result_of
from roller.testing.syncdb import run, sync_store
from roller.web.api import Api

PREFIX = "project:releng:roller:"


@implementer(IAuthenticator)
class As:
    def __init__(self, *scopes: str):
        self.principal = Principal("client/x", tuple(PREFIX + s for s in scopes))

    def authenticate(self, request: Any, target: Any = None) -> Any:
        return succeed(self.principal)


@pytest.fixture
def env(tmp_path: Path) -> Any:
    store, clock = sync_store(str(tmp_path / "h.db"))
    result_of(store.machines.insert(Machine(worker_id="w1", worker_group="mdc1", ip="127.0.0.2", pool="p")))
    settings = evolve(load_settings(None, {}, {}), health_enabled=False)
    queue = JobQueue(store, builtin_tasks(), clock)
    run(queue.start())
    watcher = HealthWatcher(clock, store, queue, settings)  # type: ignore[arg-type]
    run(watcher.start())

    def request(scopes: tuple[str, ...], method: str, path: str, body: Any = None) -> tuple[int, Any]:
        api = Api(store, queue, builtin_tasks(), As(*scopes), allowed_tasks=("ping",), clock=clock, health=watcher)
        client = StubTreq(api.app.resource())
        d = client.request(method, "http://127.0.0.1" + path, data=None if body is None else json.dumps(body),
                           headers={"Content-Type": ["application/json"]})
        client.flush()
        response = result_of(d)
        return response.code, json.loads(result_of(response.content()) or b"null")

    return request, watcher, store


def test_reading_needs_health_read_and_changing_needs_health_admin(env: Any) -> None:
    request, watcher, store = env
    assert request((), "GET", "/api/v1/health")[0] == 403
    code, body = request(("health:read",), "GET", "/api/v1/health")
    assert code == 200 and body["paused"] is False
    code, body = request(("health:read",), "POST", "/api/v1/health/pause")
    assert code == 403 and body["error"] == "insufficient_scope" and "health:admin" in body["message"]
    assert request(("health:read",), "PUT", "/api/v1/machines/mdc1/w1/maintenance", {"maintenance": True})[0] == 403
    assert not watcher.paused
    code, body = request(("health:admin",), "POST", "/api/v1/health/pause")
    assert code == 200 and body["paused"] and body["paused_by"] == "client/x" and watcher.paused
    assert result_of(store.health.flag("remediation_paused")) == "client/x"
    code, body = request(("health:admin",), "PUT", "/api/v1/machines/mdc1/w1/maintenance",
                         {"maintenance": True, "reason": "disk"})
    assert code == 200 and body["state"] == "maintenance" and body["maintenance"]
    code, body = request(("health:read",), "GET", "/api/v1/machines/mdc1/w1/health")
    assert code == 200 and body["transitions"][0]["new"] == "maintenance"
    actions = [e.action for e in result_of(store.audit.list(limit=10))]
    assert "health.pause" in actions and "machine.maintenance" in actions


@pytest.mark.parametrize("body, message", [
    ({}, "the body must be"), ({"maintenance": "yes"}, "the body must be"), ([], "the body must be"),
    ({"maintenance": True, "reason": 5}, "reason must be a string"),
    ({"maintenance": True, "colour": "red"}, "the body must be"),
    ({"maintenance": True, "reason": "x" * 1001}, "at most 1000"),
])
def test_bad_maintenance_bodies_are_400(env: Any, body: Any, message: str) -> None:
    request, watcher, _ = env
    code, answer = request(("health:admin",), "PUT", "/api/v1/machines/mdc1/w1/maintenance", body)
    assert code == 400 and message in answer["message"], answer
    assert not watcher.tracker.get(("mdc1", "w1")).maintenance


def test_unknown_machine_and_bad_health_filter(env: Any) -> None:
    request, _, _ = env
    code, body = request(("health:admin",), "PUT", "/api/v1/machines/mdc1/nope/maintenance", {"maintenance": True})
    assert code == 404 and body["error"] == "unknown_machine"
    assert request(("health:read",), "GET", "/api/v1/machines/mdc1/nope/health")[0] == 404
    code, body = request(("machines:read",), "GET", "/api/v1/machines?health=sad")
    assert code == 400 and body["error"] == "invalid_query" and "sad" in body["message"]
    assert request(("machines:read",), "GET", "/api/v1/machines?health=down,")[0] == 400
    code, body = request(("machines:read",), "GET", "/api/v1/machines?health=unknown")
    assert code == 200 and [m["worker_id"] for m in body["machines"]] == ["w1"]
    code, body = request(("machines:read",), "GET", "/api/v1/machines?health=healthy")
    assert code == 200 and body["machines"] == []
