"""
The batch routes of the REST API (roller/web/api.py) through
C{treq.testing.StubTreq}, over a real SQLite store (synchronous, on a
L{SyncClock}), the real job queue and the real L{BatchService}, with fake
tasks whose runs the tests end by hand: a member stays running exactly as
long as a test wants.  Every answer is checked against the OpenAPI
document's schema for it.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from roller import __version__
from roller.auth import AnonymousAuthenticator, IAuthenticator, Principal
from roller.batches.model import Rollout
from roller.batches.service import BatchService
from roller.inventory import Machine
from roller.queue import JobQueue
from roller.tasks import TaskFailed, TaskRegistry, TaskSpec
from roller.testing.syncdb import result_of, run, sync_store
from roller.web.api import Api
from roller.web.openapi import openapi_document

BASE = "http://roller.test"
ORIGIN = "https://tc.example"
PREFIX = "project:releng:roller:"
ALLOWED = ("reboot", "power")


class Controlled:
    """Tasks whose runs the test ends by hand."""

    def __init__(self) -> None:
        self.runs: dict[str, Deferred] = {}

    def task(self, name: str, destructive: bool = True) -> TaskSpec:
        async def go(ctx: Any, params: Any) -> str:
            d: Deferred = Deferred(lambda _: None)
            self.runs[ctx.job.id] = d
            return await d

        return TaskSpec(name=name, description=f"the {name} task", run=go, timeout=600.0, destructive=destructive)

    def running(self) -> list[str]:
        return [i for i, d in self.runs.items() if not d.called]

    def finish(self, job_id: str, value: Any = "ok") -> None:
        d = self.runs[job_id]
        if isinstance(value, Exception):
            d.errback(value)
        else:
            d.callback(value)


@implementer(IAuthenticator)
class Scoped:
    def __init__(self, scopes: tuple[str, ...], client: str = "project/releng/ci"):
        self.principal = Principal(client, scopes)

    def authenticate(self, request: Any, target: Any = None) -> Deferred[Principal]:
        return succeed(self.principal)


@attrs.frozen
class Resp:
    code: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> tuple[str, str]:
        body = self.json()
        assert set(body) == {"error", "message"}, body
        return body["error"], body["message"]


@attrs.define
class Env:
    store: Any
    clock: Any
    ctl: Controlled
    tasks: TaskRegistry
    queue: JobQueue
    service: BatchService
    client: StubTreq = None
    doc: dict = attrs.field(factory=dict)

    def use(self, authenticator: Any, *, batches: bool = True) -> None:
        api = Api(self.store, self.queue, self.tasks, authenticator, allowed_tasks=ALLOWED, clock=self.clock,
                  cors_origins=(ORIGIN,), batches=self.service if batches else None)
        self.doc = json.loads(json.dumps(api.openapi))
        self.client = StubTreq(api.app.resource())

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> Resp:
        hdrs = {k: [v] for k, v in (headers or {}).items()}
        kwargs: dict[str, Any] = {"headers": hdrs}
        if body is not None:
            raw = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", ["application/json"])
        if raw is not None:
            kwargs["data"] = raw
        d = self.client.request(method, BASE + path, **kwargs)
        self.client.flush()
        response = result_of(d)
        content = self.client.content(response)
        self.client.flush()
        self.settle()
        return Resp(response.code, response.headers, result_of(content))

    def settle(self) -> None:
        """Let the service's and the queue's same-turn calls run (the clock does not move)."""
        for _ in range(5):
            self.clock.advance(0)

    def check(self, schema: str, value: Any) -> None:
        """C{value} is valid for the OpenAPI document's C{schema}."""
        registry = Registry().with_resource("urn:roller", Resource.from_contents(
            {**self.doc, "$schema": "https://json-schema.org/draft/2020-12/schema"}))
        validator = Draft202012Validator({"$ref": f"urn:roller#/components/schemas/{schema}"}, registry=registry)
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(value)]
        assert not errors, errors

    def create(self, body: dict, expect: int = 201) -> dict:
        r = self.request("POST", "/api/v1/batches", body)
        assert r.code == expect, r.body
        view = r.json()
        self.check("Batch", view)
        return view

    def view(self, batch_id: str) -> dict:
        r = self.request("GET", f"/api/v1/batches/{batch_id}")
        assert r.code == 200, r.body
        self.check("Batch", r.json())
        return r.json()

    def jobs(self, **filters: Any) -> list:
        return result_of(self.store.jobs.list(limit=1000, **filters))

    def audit(self) -> list:
        return list(reversed(result_of(self.store.audit.list(limit=1000))))

    def end_running(self, value: Any = "ok") -> int:
        ids = self.ctl.running()
        for job_id in ids:
            self.ctl.finish(job_id, value)
        self.settle()
        return len(ids)


@pytest.fixture
def env(tmp_path: Any) -> Env:
    store, clock = sync_store(str(tmp_path / "batches.db"))
    clock.advance(1_700_000_000)
    ctl = Controlled()
    tasks = TaskRegistry([ctl.task("reboot"), ctl.task("power"), ctl.task("loan")])
    queue = JobQueue(store, tasks, clock)
    run(queue.start())
    service = BatchService(store, queue, tasks, clock, defaults=Rollout())
    run(service.start())
    e = Env(store, clock, ctl, tasks, queue, service)
    e.use(AnonymousAuthenticator())
    # pool "mac": 8 machines, pool "linux": 4, one machine without a pool
    entries = [{"worker_id": f"mac-{i}", "worker_group": "mdc1", "pool": "mac", "ip": f"192.0.2.{i + 1}",
                "tags": ["m1"]} for i in range(8)]
    entries += [{"worker_id": f"lin-{i}", "worker_group": "mdc2", "pool": "linux", "ip": f"192.0.2.{i + 20}"}
                for i in range(4)]
    entries.append({"worker_id": "lonely", "worker_group": "mdc2", "ip": "192.0.2.40"})
    for entry in entries:
        result_of(store.machines.put(Machine.from_json(entry)))
    return e


MAC = {"task_name": "reboot", "selector": {"pool": "mac"}, "reason": "OS update",
       "rollout": {"max_concurrent": 3, "max_per_pool": "25%"}}


# -- creating


def test_create_starts_within_limits_and_is_audited(env: Env) -> None:
    r = env.request("POST", "/api/v1/batches", MAC)
    assert r.code == 201, r.body
    view = r.json()
    env.check("Batch", view)
    batch_id = view["batch_id"]
    assert r.headers.getRawHeaders("location") == [f"/api/v1/batches/{batch_id}"]
    assert view["state"] == "running" and view["total"] == 8 and view["task_name"] == "reboot"
    assert view["limits"] == {"max_concurrent": 3, "max_per_pool": {"mac": 2}}  # 25% of 8
    assert view["requester"] == "anonymous" and view["reason"] == "OS update"
    # max_per_pool binds: 2 in flight, not 3
    assert len(env.ctl.running()) == 2
    live = env.view(batch_id)
    assert live["counts"]["running"] == 2 and live["counts"]["pending"] == 6
    jobs = env.jobs()
    assert len(jobs) == 2 and {j.batch_id for j in jobs} == {batch_id}
    assert all(j.reason == "OS update" and j.requester == "anonymous" for j in jobs)
    actions = [(a.action, a.target) for a in env.audit()]
    assert actions[0] == ("batch.create:reboot", f"batch/{batch_id}")
    assert sorted(actions[1:]) == sorted(("job.create:reboot", f"mdc1/{j.worker_id}") for j in jobs)
    first = env.audit()[0]
    assert first.actor == "anonymous" and first.source_ip == "127.0.0.1"
    assert first.params["selector"] == {"pool": "mac"} and first.params["rollout"]["max_concurrent"] == 3

    # each member that ends lets the next one start, never more than 2 at once
    seen = set()
    while env.ctl.running():
        assert len(env.ctl.running()) <= 2
        seen.update(env.ctl.running())
        env.end_running()
    done = env.view(batch_id)
    assert done["state"] == "succeeded" and done["finished"] is not None and done["progress"] == 1.0
    assert done["counts"]["succeeded"] == 8 and len(seen) == 8
    assert {m["task_id"] for m in done["members"]} == seen


def test_jobs_carry_batch_id_and_the_jobs_list_filters_by_it(env: Env) -> None:
    a = env.create({**MAC, "rollout": {"max_concurrent": None, "max_per_pool": None}})
    b = env.create({"task_name": "power", "selector": {"pool": "linux"}})
    a_jobs = {m["task_id"] for m in env.view(a["batch_id"])["members"]}
    assert len(a_jobs) == 8 and None not in a_jobs
    r = env.request("GET", f"/api/v1/jobs?batch_id={a['batch_id']}")
    assert r.code == 200
    listed = r.json()["jobs"]
    assert {j["task_id"] for j in listed} == a_jobs
    assert {j["batch_id"] for j in listed} == {a["batch_id"]}
    env.check("JobList", r.json())
    r = env.request("GET", f"/api/v1/jobs/{listed[0]['task_id']}")
    assert r.json()["batch_id"] == a["batch_id"]
    assert len(env.request("GET", f"/api/v1/jobs?batch_id={b['batch_id']}").json()["jobs"]) == 4
    assert env.request("GET", "/api/v1/jobs?batch_id=nope").json()["jobs"] == []
    r = env.request("GET", "/api/v1/jobs?batch_id=no%20such")
    assert r.code == 400 and r.error()[0] == "invalid_query"


def test_a_member_joins_a_job_already_running(env: Env) -> None:
    r = env.request("POST", "/api/v1/workers/lin-1/group/mdc2/jobs?task_name=reboot")
    assert r.code == 201
    existing = r.json()["task_id"]
    view = env.create({"task_name": "reboot", "selector": {"machines": [
        {"worker_group": "mdc2", "worker_id": "lin-0"}, {"worker_group": "mdc2", "worker_id": "lin-1"}]}})
    members = {m["worker_id"]: m for m in env.view(view["batch_id"])["members"]}
    assert members["lin-1"]["joined"] is True and members["lin-1"]["task_id"] == existing
    assert members["lin-0"]["joined"] is False and members["lin-0"]["task_id"] != existing
    # a joined job keeps no batch id of its own; cancelling the batch leaves it running
    r = env.request("DELETE", f"/api/v1/batches/{view['batch_id']}?running=cancel")
    assert r.code == 200, r.body
    assert existing in env.ctl.running()


def test_explicit_machines_keep_their_order_and_unknown_ones_are_excluded(env: Env) -> None:
    machines = [{"worker_group": "mdc1", "worker_id": w} for w in ("mac-5", "mac-1", "ghost", "mac-5")]
    r = env.request("POST", "/api/v1/batches?dry_run=true", {"task_name": "reboot", "selector": {"machines": machines}})
    assert r.code == 200, r.body
    view = r.json()
    env.check("Batch", view)
    assert [m["worker_id"] for m in view["members"]] == ["mac-5", "mac-1"]
    assert sorted((e["worker_id"], e["reason"]) for e in view["excluded"]) == [("ghost", "unknown machine"),
                                                                               ("mac-5", "duplicate")]


# -- dry run


def test_dry_run_writes_and_queues_nothing(env: Env) -> None:
    body = {"task_name": "reboot", "selector": {"group": "mdc1"}, "rollout": {"max_concurrent": "50%"}}
    r = env.request("POST", "/api/v1/batches?dry_run=true", body)
    assert r.code == 200, r.body
    view = r.json()
    env.check("Batch", view)
    assert view["batch_id"] is None and view["dry_run"] is True and view["total"] == 8
    assert all(m["state"] == "pending" and m["task_id"] is None for m in view["members"])
    assert view["limits"]["max_concurrent"] == 4
    assert len(view["first_wave"]) == 4
    assert r.headers.getRawHeaders("location") is None
    assert env.jobs() == [] and env.ctl.running() == [] and env.audit() == []
    assert env.request("GET", "/api/v1/batches").json() == {"batches": [], "next_before": None}
    # false is not a dry run
    assert env.request("POST", "/api/v1/batches?dry_run=false", body).code == 201


def test_selection_interleaves_pools(env: Env) -> None:
    view = env.request("POST", "/api/v1/batches?dry_run=1", {"task_name": "reboot", "selector": {"q": "-"}}).json()
    pools = [m["pool"] for m in view["members"]]
    assert pools[:8] == ["linux", "mac"] * 4 or pools[:8] == ["mac", "linux"] * 4, pools


# -- scopes


@pytest.mark.parametrize("scopes, missing", [
    ((PREFIX + "reboot",), PREFIX + "batches:create"),
    ((PREFIX + "batches:create", PREFIX + "power"), PREFIX + "reboot"),
    ((PREFIX + "jobs:*",), PREFIX + "reboot"),
])
def test_403_names_the_missing_scope_and_changes_nothing(env: Env, scopes: tuple[str, ...], missing: str) -> None:
    env.use(Scoped(scopes))
    for path in ("/api/v1/batches", "/api/v1/batches?dry_run=true"):
        r = env.request("POST", path, MAC)
        assert r.code == 403, r.body
        code, message = r.error()
        assert code == "insufficient_scope" and missing in message
    # refused before the selector is resolved: an empty selection is still 403, not 400
    r = env.request("POST", "/api/v1/batches", {**MAC, "selector": {"pool": "nothing-here"}})
    assert r.code == 403
    assert env.jobs() == [] and env.audit() == [] and env.ctl.running() == []
    env.use(AnonymousAuthenticator())
    assert env.request("GET", "/api/v1/batches").json()["batches"] == []


def test_both_scopes_are_enough(env: Env) -> None:
    env.use(Scoped((PREFIX + "reboot", PREFIX + "batches:create", PREFIX + "jobs:read")))
    view = env.create(MAC)
    assert view["requester"] == "project/releng/ci"
    assert env.request("GET", f"/api/v1/batches/{view['batch_id']}").code == 200
    # cancelling needs jobs:cancel
    r = env.request("DELETE", f"/api/v1/batches/{view['batch_id']}")
    assert r.code == 403 and PREFIX + "jobs:cancel" in r.error()[1]
    env.use(Scoped((PREFIX + "reboot", PREFIX + "batches:create")))
    r = env.request("GET", f"/api/v1/batches/{view['batch_id']}")
    assert r.code == 403 and PREFIX + "jobs:read" in r.error()[1]
    assert env.request("GET", "/api/v1/batches").code == 403


# -- bad input


@pytest.mark.parametrize("body, code, words", [
    (None, "missing_body", "body is required"),
    ([], "invalid_body", "JSON object"),
    ({"selector": {"pool": "mac"}}, "missing_parameter", "task_name"),
    ({"task_name": "reboot"}, "missing_parameter", "selector"),
    ({"task_name": "nope", "selector": {"pool": "mac"}}, "unknown_task", "nope"),
    ({"task_name": "loan", "selector": {"pool": "mac"}}, "task_not_allowed", "loan"),
    ({"task_name": "reboot", "selector": {}}, "invalid_body", "at least one filter"),
    ({"task_name": "reboot", "selector": {"pool": "mac", "machines": []}}, "invalid_body", "either machines"),
    ({"task_name": "reboot", "selector": {"machines": [{"worker_group": "g"}]}}, "invalid_body", "machines[0]"),
    ({"task_name": "reboot", "selector": {"health": ["sick"]}}, "invalid_body", "selector.health"),
    ({**MAC, "rollout": {"max_concurrent": "150%"}}, "invalid_body", "max_concurrent"),
    ({**MAC, "rollout": {"max_per_pool": 0}}, "invalid_body", "max_per_pool"),
    ({**MAC, "rollout": {"stop_after_failures": True}}, "invalid_body", "stop_after_failures"),
    ({**MAC, "rollout": {"speed": 3}}, "invalid_body", "speed"),
    ({**MAC, "priority": 1000}, "invalid_body", "priority"),
    ({**MAC, "extra": 1}, "invalid_body", "extra"),
    ({**MAC, "selector": {"pool": "no-such-pool"}}, "empty_selection", "matched no machine"),
])
def test_bad_bodies_are_400_with_their_code(env: Env, body: Any, code: str, words: str) -> None:
    r = env.request("POST", "/api/v1/batches", body)
    assert r.code == 400, r.body
    got, message = r.error()
    assert got == code and words in message, message
    assert env.jobs() == [] and env.audit() == []


def test_bad_json_queries_and_media_types(env: Env) -> None:
    r = env.request("POST", "/api/v1/batches", raw=b"{not json", headers={"Content-Type": "application/json"})
    assert r.code == 400 and r.error()[0] == "invalid_json"
    r = env.request("POST", "/api/v1/batches", raw=json.dumps(MAC).encode(), headers={"Content-Type": "text/plain"})
    assert r.code == 415
    for path in ("/api/v1/batches?dry_run=maybe", "/api/v1/batches?limit=0", "/api/v1/batches?before=x",
                 "/api/v1/batches/abc?members=perhaps"):
        method = "POST" if "dry_run" in path else "GET"
        r = env.request(method, path, MAC if method == "POST" else None)
        assert r.code == 400 and r.error()[0] == "invalid_query", (path, r.body)
    r = env.request("DELETE", "/api/v1/batches/abc?running=now")
    assert r.code == 400 and r.error()[0] == "invalid_query"


# -- reading


def test_get_unknown_and_without_members(env: Env) -> None:
    for batch_id in ("0190e0e0-0000-7000-8000-000000000000", "x" * 300, "a.b"):
        r = env.request("GET", f"/api/v1/batches/{batch_id}")
        assert r.code == 404 and r.error()[0] == "unknown_batch", batch_id
    view = env.create(MAC)
    r = env.request("GET", f"/api/v1/batches/{view['batch_id']}?members=false")
    assert r.code == 200 and "members" not in r.json()
    env.check("Batch", r.json())


def test_list_is_newest_first_and_paged(env: Env) -> None:
    ids = []
    for n in range(3):
        ids.append(env.create({"task_name": "power", "selector": {"machines": [
            {"worker_group": "mdc1", "worker_id": f"mac-{n}"}]}})["batch_id"])
        env.clock.advance(1)
    r = env.request("GET", "/api/v1/batches?limit=2")
    assert r.code == 200
    page = r.json()
    env.check("BatchList", page)
    assert [b["batch_id"] for b in page["batches"]] == [ids[2], ids[1]]
    assert all("members" not in b for b in page["batches"])
    assert page["next_before"] is not None
    rest = env.request("GET", f"/api/v1/batches?limit=2&before={page['next_before']}").json()
    assert [b["batch_id"] for b in rest["batches"]] == [ids[0]]
    assert rest["next_before"] is None


# -- cancelling


def test_delete_skips_pending_cancels_queued_and_leaves_running(env: Env) -> None:
    view = env.create({**MAC, "rollout": {"max_concurrent": 2, "max_per_pool": None}})
    batch_id = view["batch_id"]
    running = env.ctl.running()
    assert len(running) == 2
    r = env.request("DELETE", f"/api/v1/batches/{batch_id}")
    assert r.code == 200, r.body
    cancelled = r.json()
    env.check("Batch", cancelled)
    assert cancelled["state"] == "cancelled" and cancelled["counts"]["skipped"] == 6
    assert "cancelled by anonymous" in cancelled["halt_reason"]
    assert cancelled["finished"] is None  # two members still in flight
    assert env.ctl.running() == running  # without running=cancel they finish
    entry = env.audit()[-1]
    assert (entry.action, entry.target) == ("batch.cancel", f"batch/{batch_id}")
    assert entry.params == {"running": False}
    env.end_running()
    done = env.view(batch_id)
    assert done["state"] == "cancelled" and done["finished"] is not None
    assert done["counts"]["succeeded"] == 2 and done["counts"]["skipped"] == 6
    assert len(env.jobs(batch_id=batch_id)) == 2  # nothing more was started
    r = env.request("DELETE", f"/api/v1/batches/{batch_id}")
    assert r.code == 409 and r.error()[0] == "batch_finished"


def test_delete_running_cancel_cancels_its_running_jobs(env: Env) -> None:
    view = env.create({**MAC, "rollout": {"max_concurrent": 3, "max_per_pool": None}})
    r = env.request("DELETE", f"/api/v1/batches/{view['batch_id']}?running=cancel")
    assert r.code == 200, r.body
    env.settle()
    assert env.ctl.running() == []
    done = env.view(view["batch_id"])
    assert done["state"] == "cancelled" and done["finished"] is not None
    assert done["counts"]["cancelled"] == 3 and done["counts"]["skipped"] == 5
    assert env.audit()[-1].params == {"running": True}


def test_delete_unknown_batch_is_404(env: Env) -> None:
    r = env.request("DELETE", "/api/v1/batches/0190e0e0-0000-7000-8000-000000000000")
    assert r.code == 404 and r.error()[0] == "unknown_batch"


# -- failures and the circuit breaker through the API


def test_circuit_breaker_halts_and_says_why(env: Env) -> None:
    view = env.create({**MAC, "rollout": {"max_concurrent": 2, "max_per_pool": None, "stop_after_failures": 2}})
    batch_id = view["batch_id"]
    env.end_running(TaskFailed("BMC said no"))
    assert env.ctl.running() == []  # two failures: nothing more starts
    done = env.view(batch_id)
    assert done["state"] == "halted" and done["finished"] is not None
    assert done["counts"]["failed"] == 2 and done["counts"]["skipped"] == 6
    assert "2 failed" in done["halt_reason"] and "BMC said no" in done["halt_reason"]


# -- plumbing


def test_without_a_batch_service_the_routes_are_404(env: Env) -> None:
    env.use(AnonymousAuthenticator(), batches=False)
    for method, path in (("POST", "/api/v1/batches"), ("GET", "/api/v1/batches"), ("GET", "/api/v1/batches/x"),
                         ("DELETE", "/api/v1/batches/x")):
        r = env.request(method, path, MAC if method == "POST" else None)
        assert r.code == 404 and r.error()[0] == "not_found", (method, path)


def test_cors_preflight_and_cross_site_refusal(env: Env) -> None:
    r = env.request("OPTIONS", "/api/v1/batches", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert r.code == 204
    assert r.headers.getRawHeaders("access-control-allow-origin") == [ORIGIN]
    r = env.request("OPTIONS", "/api/v1/batches/abc", headers={"Origin": ORIGIN})
    assert r.code == 204
    r = env.request("POST", "/api/v1/batches", MAC, headers={"Origin": "https://evil.example"})
    assert r.code == 403 and r.error()[0] == "cross_site_request"
    assert env.jobs() == []


def test_openapi_documents_the_batch_routes() -> None:
    from roller.tasks import builtin_tasks

    doc = openapi_document(builtin_tasks(), ("reboot",), __version__)
    ops = {(m, p): op for p, item in doc["paths"].items() for m, op in item.items()}
    for key, op_id in ((("post", "/api/v1/batches"), "createBatch"), (("get", "/api/v1/batches"), "listBatches"),
                       (("get", "/api/v1/batches/{batch_id}"), "getBatch"),
                       (("delete", "/api/v1/batches/{batch_id}"), "cancelBatch")):
        op = ops[key]
        assert op["operationId"] == op_id and op["security"] == [{"hawk": []}]
        assert "404" in op["responses"] and "403" in op["responses"]
    create = ops[("post", "/api/v1/batches")]
    assert "batches:create" in create["description"] and "<task_name>" in create["description"]
    assert {"200", "201"} <= set(create["responses"])
    assert doc["components"]["schemas"]["BatchRequest"]["properties"]["task_name"]["enum"] == ["reboot"]
    assert any(p["name"] == "batch_id" for p in ops[("get", "/api/v1/jobs")]["parameters"])
