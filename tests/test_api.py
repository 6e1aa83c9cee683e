"""
The REST API (roller/web/api.py) through C{treq.testing.StubTreq(app.resource())}.

Everything runs synchronously: a real SQLite store whose adbapi pool answers
at once on a L{SyncClock}, and fake tasks whose runs the tests finish or
cancel by hand, so a job stays queued or running exactly as long as a test
wants.  No reactor is run and nothing sleeps.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from roller.auth import AnonymousAuthenticator, IAuthenticator, Principal, UnconfiguredAuthenticator
from roller.inventory import Machine
from roller.jobs import State
from roller.queue import JobQueue
from roller.tasks import Param, TaskRegistry, TaskSpec, ping
from roller.testing.syncdb import result_of, run, sync_store
from roller.web.api import Api

ORIGIN = "https://tc.example"
BASE = "http://roller.test"
JOB_KEYS = {"task_name", "worker_id", "worker_group", "task_id", "state"}
NOT_CONFIGURED = "auth.mode is not set in roller.toml"


# -- synchronous Deferreds --------------------------------------------------




# -- fakes -------------------------------------------------------------------


class Controlled:
    """Tasks whose runs the test finishes by hand."""

    def __init__(self) -> None:
        self.runs: dict[str, Deferred] = {}
        self.cancelled: list[str] = []

    def task(self, name: str) -> TaskSpec:
        async def go(ctx: Any, params: Any) -> str:
            ctx.log(f"{name} starting on {ctx.machine.worker_id}", step=1)
            job_id = ctx.job.id
            d: Deferred = Deferred(lambda _: self.cancelled.append(job_id))
            self.runs[job_id] = d
            return await d

        return TaskSpec(name=name, description=f"the {name} task", run=go, timeout=600.0,
                        params=(Param("n", int, 1, "a number", minimum=0, maximum=5),))

    def finish(self, job_id: str, value: Any = "ok") -> None:
        d = self.runs[job_id]
        assert not d.called, f"{job_id} already ended"
        if isinstance(value, Exception):
            d.errback(value)
        else:
            d.callback(value)

    def running_ids(self) -> list[str]:
        return [i for i, d in self.runs.items() if not d.called]


@implementer(IAuthenticator)
class ScopedAuthenticator:
    """Everyone is C{client_id} holding C{scopes}."""

    def __init__(self, client_id: str, scopes: tuple[str, ...]):
        self.principal = Principal(client_id, scopes)
        self.requests = 0

    def authenticate(self, request: Any, target: Any = None) -> "Deferred[Principal]":
        self.requests += 1
        return succeed(self.principal)


@attrs.frozen
class Resp:
    code: int
    headers: Any  # twisted Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return None if values is None else ",".join(values)

    def json(self) -> Any:
        assert (self.header("content-type") or "").startswith("application/json"), self.header("content-type")
        return json.loads(self.body)

    def error(self) -> tuple[str, str]:
        """The error code and message; checks the error shape."""
        body = self.json()
        assert set(body) == {"error", "message"}, body
        assert isinstance(body["error"], str) and isinstance(body["message"], str) and body["message"]
        return body["error"], body["message"]


@attrs.define
class Env:
    store: Any
    clock: Any
    ctl: Controlled
    tasks: TaskRegistry
    queue: JobQueue
    allowed: tuple[str, ...]
    api: Api = None
    client: StubTreq = None

    def make_api(self, authenticator: Any) -> Api:
        return Api(self.store, self.queue, self.tasks, authenticator, allowed_tasks=self.allowed,
                   clock=self.clock, cors_origins=(ORIGIN,))

    def use(self, authenticator: Any) -> None:
        """Answer requests with an Api using C{authenticator} (same store and queue)."""
        self.api = self.make_api(authenticator)
        self.client = StubTreq(self.api.app.resource())

    def request(self, method: str, path: str, *, body: bytes | None = None, json_body: Any = None,
                headers: dict[str, str] | None = None) -> Resp:
        hdrs = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        kwargs: dict[str, Any] = {"headers": {k: [v] for k, v in hdrs.items()}}
        if body is not None:
            kwargs["data"] = body
        d = self.client.request(method, BASE + path, **kwargs)
        self.client.flush()
        response = result_of(d)
        content = self.client.content(response)
        self.client.flush()
        return Resp(response.code, response.headers, result_of(content))

    def get(self, path: str, **kw: Any) -> Resp:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Resp:
        return self.request("POST", path, **kw)

    def put(self, path: str, **kw: Any) -> Resp:
        return self.request("PUT", path, **kw)

    def delete(self, path: str, **kw: Any) -> Resp:
        return self.request("DELETE", path, **kw)

    # -- state helpers

    def add_machine(self, worker_id: str, group: str = "g1", **data: Any) -> Machine:
        m = Machine.from_json({"worker_id": worker_id, "worker_group": group, **data})
        result_of(self.store.machines.put(m))
        return m

    def jobs(self, **filters: Any) -> list:
        return result_of(self.store.jobs.list(limit=1000, **filters))

    def job(self, job_id: str) -> Any:
        return result_of(self.store.jobs.get(job_id))

    def audit(self) -> list:
        """Audit entries, oldest first."""
        return list(reversed(result_of(self.store.audit.list(limit=1000))))

    def machines(self) -> list[Machine]:
        return result_of(self.store.machines.list())

    def submit(self, task: str, worker_id: str, group: str = "g1") -> dict:
        r = self.post(f"/api/v1/workers/{worker_id}/group/{group}/jobs?task_name={task}")
        assert r.code == 201, r.body
        return r.json()


@pytest.fixture
def env(tmp_path: Any) -> Env:
    store, clock = sync_store(str(tmp_path / "api.db"))
    ctl = Controlled()
    tasks = TaskRegistry([ctl.task("reboot"), ctl.task("power"), ctl.task("loan"), ping.TASK])
    queue = JobQueue(store, tasks, clock)
    run(queue.start())
    e = Env(store, clock, ctl, tasks, queue, allowed=("reboot", "power", "ping"))
    e.use(AnonymousAuthenticator())
    e.add_machine("m1", "g1", ip="192.0.2.1", pool="mac", fqdn="m1.releng.example.com")
    e.add_machine("m2", "g1", ip="192.0.2.2", pool="mac")
    e.add_machine("m3", "g2", ip="192.0.2.3", pool="linux")
    e.add_machine("dup", "g1", ip="192.0.2.4")
    e.add_machine("dup", "g2", ip="192.0.2.5")
    e.add_machine("noaddr", "g1")  # ping fails at once: no ip, no fqdn (no process spawned)
    return e


def tc_url(worker_id: str, group: str, query: str = "") -> str:
    return f"/api/v1/workers/{worker_id}/group/{group}/jobs" + (f"?{query}" if query else "")


# -- submitting jobs ---------------------------------------------------------


def test_post_taskcluster_form_creates_job(env: Env) -> None:
    r = env.post(tc_url("m1", "g1", "task_name=reboot"))
    assert r.code == 201, r.body
    body = r.json()
    assert set(body) == JOB_KEYS
    assert body["task_name"] == "reboot"
    assert body["worker_id"] == "m1" and body["worker_group"] == "g1"
    assert body["state"] in ("queued", "running")
    job_id = body["task_id"]
    assert r.header("location") == f"/api/v1/jobs/{job_id}"
    stored = env.job(job_id)
    assert stored.task_name == "reboot" and stored.machine_key == ("g1", "m1")
    assert stored.requester == "anonymous" and stored.origin_ip == "127.0.0.1"
    assert stored.params == {"n": 1}
    assert env.ctl.running_ids() == [job_id]  # really handed to the queue
    (entry,) = env.audit()
    assert entry.action == "job.create:reboot" and entry.target == "g1/m1"
    assert entry.actor == "anonymous" and entry.result == f"queued {job_id}"
    assert entry.source_ip == "127.0.0.1"


def test_post_seed_form_echoes_tc_worker_id(env: Env) -> None:
    r = env.post("/api/v1/jobs?tc_worker_id=m3&task_name=power")
    assert r.code == 201, r.body
    body = r.json()
    assert set(body) == JOB_KEYS | {"tc_worker_id"}
    assert body["tc_worker_id"] == "m3"
    assert (body["worker_id"], body["worker_group"], body["task_name"]) == ("m3", "g2", "power")
    assert r.header("location") == f"/api/v1/jobs/{body['task_id']}"
    assert env.job(body["task_id"]).machine_key == ("g2", "m3")
    assert [a.action for a in env.audit()] == ["job.create:power"]


@pytest.mark.parametrize("second", ["taskcluster", "seed"])
def test_duplicate_task_on_same_machine_is_200_with_same_id(env: Env, second: str) -> None:
    first = env.post(tc_url("m2", "g1", "task_name=reboot"))
    assert first.code == 201
    job_id = first.json()["task_id"]
    url = tc_url("m2", "g1", "task_name=reboot") if second == "taskcluster" \
        else "/api/v1/jobs?tc_worker_id=m2&task_name=reboot"
    again = env.post(url)
    assert again.code == 200, again.body
    assert again.json()["task_id"] == job_id
    assert again.header("location") == f"/api/v1/jobs/{job_id}"
    assert len(env.jobs()) == 1
    assert len(env.audit()) == 1  # the duplicate created nothing
    # Another task on the same machine, or the same task elsewhere, is a new job.
    other = env.post(tc_url("m2", "g1", "task_name=power"))
    elsewhere = env.post(tc_url("m1", "g1", "task_name=reboot"))
    assert other.code == elsewhere.code == 201
    assert len({job_id, other.json()["task_id"], elsewhere.json()["task_id"]}) == 3


def test_duplicate_after_the_job_ended_is_a_new_job(env: Env) -> None:
    first = env.submit("reboot", "m1")["task_id"]
    env.ctl.finish(first)
    again = env.post(tc_url("m1", "g1", "task_name=reboot"))
    assert again.code == 201 and again.json()["task_id"] != first


def test_post_body_params_priority_and_reason(env: Env) -> None:
    r = env.post(tc_url("m1", "g1", "task_name=reboot"),
                 json_body={"params": {"n": 4}, "priority": 90, "reason": "stuck in recovery"})
    assert r.code == 201, r.body
    job = env.job(r.json()["task_id"])
    assert (job.params, job.priority, job.reason) == ({"n": 4}, 90, "stuck in recovery")


def test_post_query_priority_and_reason(env: Env) -> None:
    r = env.post(tc_url("m1", "g1", "task_name=reboot&priority=0&reason=from%20a%20hook"))
    assert r.code == 201, r.body
    job = env.job(r.json()["task_id"])
    assert (job.priority, job.reason) == (0, "from a hook")


def test_post_with_charset_content_type_is_json(env: Env) -> None:
    r = env.post(tc_url("m1", "g1", "task_name=reboot"), body=b'{"params": {"n": 2}}',
                 headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.code == 201, r.body
    assert env.job(r.json()["task_id"]).params == {"n": 2}


def test_worker_id_of_128_characters_is_accepted(env: Env) -> None:
    long_id = "w" * 128
    env.add_machine(long_id, "g1")
    assert env.post(tc_url(long_id, "g1", "task_name=reboot")).code == 201
    assert env.post(f"/api/v1/jobs?tc_worker_id={long_id}&task_name=power").code == 201


def test_ping_job_end_to_end_fails_cleanly_without_an_address(env: Env) -> None:
    body = env.submit("ping", "noaddr")
    r = env.get(f"/api/v1/jobs/{body['task_id']}")
    job = r.json()
    assert job["state"] == "failed"
    assert "neither an ip nor an fqdn" in job["error"]


# -- CORS ---------------------------------------------------------------------


PREFLIGHT_PATHS = [tc_url("m1", "g1"), "/api/v1/jobs", "/api/v1/jobs/some-id"]


@pytest.mark.parametrize("path", PREFLIGHT_PATHS)
def test_preflight_allowed_origin_needs_no_auth(env: Env, path: str) -> None:
    env.use(UnconfiguredAuthenticator(NOT_CONFIGURED))
    r = env.request("OPTIONS", path, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.code in (200, 204), r.body
    assert r.header("access-control-allow-origin") == ORIGIN
    methods = {m.strip() for m in r.header("access-control-allow-methods").split(",")}
    assert {"POST", "OPTIONS"} <= methods
    assert r.header("access-control-allow-headers") == "Authorization, Content-Type"
    assert "Origin" in (r.header("vary") or "")
    assert r.header("www-authenticate") is None
    assert env.jobs() == []


@pytest.mark.parametrize("path", PREFLIGHT_PATHS)
@pytest.mark.parametrize("origin", ["https://evil.example", "https://tc.example.evil.example", None])
def test_preflight_other_origin_gets_no_cors_headers(env: Env, path: str, origin: str | None) -> None:
    headers = {"Access-Control-Request-Method": "POST"}
    if origin is not None:
        headers["Origin"] = origin
    r = env.request("OPTIONS", path, headers=headers)
    assert r.code in (200, 204)
    for name in ("access-control-allow-origin", "access-control-allow-methods",
                 "access-control-allow-headers", "access-control-allow-credentials"):
        assert r.header(name) is None, name


def test_cors_on_actual_responses(env: Env) -> None:
    ok = env.post(tc_url("m1", "g1", "task_name=reboot"), headers={"Origin": ORIGIN})
    assert ok.code == 201 and ok.header("access-control-allow-origin") == ORIGIN
    err = env.post(tc_url("m1", "g1", "task_name=nope"), headers={"Origin": ORIGIN})
    assert err.code == 400 and err.header("access-control-allow-origin") == ORIGIN
    listed = env.get("/api/v1/jobs", headers={"Origin": ORIGIN})
    assert listed.header("access-control-allow-origin") == ORIGIN
    other = env.get("/api/v1/jobs", headers={"Origin": "https://evil.example"})
    assert other.code == 200 and other.header("access-control-allow-origin") is None


# -- reading jobs -------------------------------------------------------------


def test_get_job_with_events(env: Env) -> None:
    job_id = env.submit("reboot", "m1")["task_id"]
    r = env.get(f"/api/v1/jobs/{job_id}")
    assert r.code == 200
    job = r.json()
    assert job["task_id"] == job_id and job["state"] == "running"
    assert (job["task_name"], job["worker_id"], job["worker_group"]) == ("reboot", "m1", "g1")
    assert job["started"] is not None and job["finished"] is None
    messages = [e["message"] for e in job["events"]]
    assert messages == ["queued by anonymous", "running", "reboot starting on m1"]
    assert job["events"][0]["data"] == {"state": "queued"}
    assert job["events"][2]["kind"] == "log" and job["events"][2]["data"] == {"step": 1}
    assert all(e["id"] is not None for e in job["events"])

    env.clock.advance(3)
    env.ctl.finish(job_id, "back up")
    done = env.get(f"/api/v1/jobs/{job_id}").json()
    assert done["state"] == "succeeded" and done["result"] == "back up"
    assert done["duration_s"] == 3.0
    assert done["events"][-1]["message"] == "succeeded: back up"


def test_get_unknown_job_is_404(env: Env) -> None:
    r = env.get("/api/v1/jobs/00000000-0000-0000-0000-000000000000")
    assert r.code == 404
    assert r.error()[0] == "unknown_job"


def _populate(env: Env) -> dict[str, str]:
    """Jobs in several states on several machines; name -> job id (oldest first)."""
    ids = {}
    ids["m1-reboot"] = env.submit("reboot", "m1")["task_id"]  # running, then succeeded
    ids["m1-power"] = env.submit("power", "m1")["task_id"]  # queued behind it, then running
    ids["m2-reboot"] = env.submit("reboot", "m2")["task_id"]  # running
    ids["m3-power"] = env.submit("power", "m3", "g2")["task_id"]  # running, then failed
    ids["dup2-reboot"] = env.submit("reboot", "dup", "g2")["task_id"]  # running
    env.ctl.finish(ids["m1-reboot"])
    env.ctl.finish(ids["m3-power"], RuntimeError("boom"))
    ids["m2-power"] = env.submit("power", "m2")["task_id"]  # queued behind m2-reboot
    return ids


def _list(env: Env, query: str = "") -> dict:
    r = env.get("/api/v1/jobs" + (f"?{query}" if query else ""))
    assert r.code == 200, r.body
    body = r.json()
    assert set(body) == {"jobs", "next_before"}
    return body


def test_list_jobs_newest_first_with_live_state(env: Env) -> None:
    ids = _populate(env)
    body = _list(env)
    assert [j["task_id"] for j in body["jobs"]] == list(reversed(ids.values()))
    assert body["next_before"] is None
    states = {j["task_id"]: j["state"] for j in body["jobs"]}
    assert states == {
        ids["m1-reboot"]: "succeeded", ids["m1-power"]: "running", ids["m2-reboot"]: "running",
        ids["m3-power"]: "failed", ids["dup2-reboot"]: "running", ids["m2-power"]: "queued",
    }


@pytest.mark.parametrize("query, expected", [
    ("worker_id=m1", ["m1-power", "m1-reboot"]),
    ("worker_id=dup", ["dup2-reboot"]),
    ("worker_group=g2", ["dup2-reboot", "m3-power"]),
    ("worker_id=m2&worker_group=g1", ["m2-power", "m2-reboot"]),
    ("worker_id=m2&worker_group=g2", []),
    ("task_name=power", ["m2-power", "m3-power", "m1-power"]),
    ("task_name=nope", []),
    ("state=running", ["dup2-reboot", "m2-reboot", "m1-power"]),
    ("state=queued,running", ["m2-power", "dup2-reboot", "m2-reboot", "m1-power"]),
    ("state=succeeded,failed", ["m3-power", "m1-reboot"]),
    ("state=cancelled", []),
    ("state=running&task_name=reboot&worker_group=g1", ["m2-reboot"]),
    ("limit=2", ["m2-power", "dup2-reboot"]),
])
def test_list_jobs_filters(env: Env, query: str, expected: list[str]) -> None:
    ids = _populate(env)
    body = _list(env, query)
    assert [j["task_id"] for j in body["jobs"]] == [ids[n] for n in expected]


def test_list_jobs_pages_with_next_before(env: Env) -> None:
    ids = list(_populate(env).values())  # 6 jobs
    seen: list[str] = []
    query = "limit=4"
    pages = 0
    while True:
        body = _list(env, query)
        pages += 1
        seen += [j["task_id"] for j in body["jobs"]]
        if body["next_before"] is None:
            break
        assert isinstance(body["next_before"], int)
        query = f"limit=4&before={body['next_before']}"
    assert pages == 2
    assert seen == list(reversed(ids))
    # The cursor composes with filters.
    first = _list(env, "task_name=reboot&limit=2")
    assert len(first["jobs"]) == 2 and first["next_before"] is not None
    rest = _list(env, f"task_name=reboot&limit=2&before={first['next_before']}")
    assert [j["task_id"] for j in first["jobs"] + rest["jobs"]] == [ids[4], ids[2], ids[0]]


# -- cancelling jobs ----------------------------------------------------------


def test_cancel_queued_job(env: Env) -> None:
    running = env.submit("reboot", "m1")["task_id"]
    queued = env.submit("power", "m1")["task_id"]
    assert env.job(queued).state is State.queued
    r = env.delete(f"/api/v1/jobs/{queued}")
    assert r.code == 200, r.body
    body = r.json()
    assert body["task_id"] == queued and body["state"] == "cancelled"
    assert body["error"] == "cancelled by anonymous"
    assert env.job(queued).state is State.cancelled
    assert env.job(running).state is State.running  # untouched
    assert env.ctl.cancelled == []
    env.ctl.finish(running)
    assert queued not in env.ctl.runs  # never started
    actions = [(a.action, a.target, a.result) for a in env.audit()]
    assert actions[-1] == ("job.cancel", "g1/m1", f"cancelled {queued}")


def test_cancel_running_job_cancels_its_deferred(env: Env) -> None:
    job_id = env.submit("reboot", "m1")["task_id"]
    r = env.delete(f"/api/v1/jobs/{job_id}")
    assert r.code == 200, r.body
    assert r.json()["state"] == "cancelled"
    assert env.ctl.cancelled == [job_id]
    stored = env.job(job_id)
    assert stored.state is State.cancelled and stored.error == "cancelled by anonymous"
    events = env.get(f"/api/v1/jobs/{job_id}").json()["events"]
    assert events[-1]["data"] == {"state": "cancelled"}
    # The machine is free again.
    assert env.post(tc_url("m1", "g1", "task_name=reboot")).code == 201
    assert env.audit()[1].action == "job.cancel"


def test_cancel_finished_job_is_409(env: Env) -> None:
    job_id = env.submit("reboot", "m1")["task_id"]
    env.ctl.finish(job_id)
    r = env.delete(f"/api/v1/jobs/{job_id}")
    assert r.code == 409
    code, message = r.error()
    assert code == "job_finished" and "succeeded" in message
    assert env.job(job_id).state is State.succeeded
    assert [a.action for a in env.audit()] == ["job.create:reboot"]


def test_cancel_unknown_job_is_404(env: Env) -> None:
    r = env.delete("/api/v1/jobs/no-such-job")
    assert r.code == 404
    assert r.error()[0] == "unknown_job"
    assert env.audit() == []


# -- tasks ---------------------------------------------------------------------


def test_list_tasks_with_allowed_flag(env: Env) -> None:
    r = env.get("/api/v1/tasks")
    assert r.code == 200
    tasks = {t["name"]: t for t in r.json()["tasks"]}
    assert [t["name"] for t in r.json()["tasks"]] == ["loan", "ping", "power", "reboot"]
    assert {n: t["allowed"] for n, t in tasks.items()} == {
        "loan": False, "ping": True, "power": True, "reboot": True}
    assert tasks["ping"]["params"]["count"]["type"] == "integer"
    assert tasks["reboot"]["params"]["n"] == {
        "type": "integer", "description": "a number", "default": 1, "minimum": 0, "maximum": 5}
    assert tasks["ping"]["timeout_s"] == 30.0


# -- machines ------------------------------------------------------------------


NEW = {"worker_id": "new-1", "worker_group": "mdc1", "ip": "10.0.0.7", "pool": "mac",
       "fqdn": "new-1.test.releng.example.com", "tags": ["r8"],
       "ssh": {"user": "root", "credential": "relops-key"},
       "pdu": {"host": "pdu1.example.com", "outlet": "AA8"}}


def test_create_machine(env: Env) -> None:
    r = env.post("/api/v1/machines", json_body=NEW)
    assert r.code == 201, r.body
    assert r.header("location") == "/api/v1/machines/mdc1/new-1"
    body = r.json()
    assert body["worker_id"] == "new-1" and body["pdu"]["outlet"] == "AA8"
    assert body["ssh"] == {"user": "root", "port": 22, "credential": "relops-key"}
    got = env.get("/api/v1/machines/mdc1/new-1")
    assert got.code == 200 and got.json() == body
    (entry,) = env.audit()
    assert (entry.action, entry.target, entry.result) == ("machine.create", "mdc1/new-1", "created")
    assert entry.params["ip"] == "10.0.0.7"


def test_create_duplicate_machine_is_409(env: Env) -> None:
    assert env.post("/api/v1/machines", json_body=NEW).code == 201
    r = env.post("/api/v1/machines", json_body={**NEW, "ip": "10.0.0.8"})
    assert r.code == 409
    assert r.error()[0] == "machine_exists"
    assert env.get("/api/v1/machines/mdc1/new-1").json()["ip"] == "10.0.0.7"
    assert len(env.audit()) == 1


def test_put_creates_then_updates(env: Env) -> None:
    data = {"ip": "10.0.0.9", "pool": "linux"}  # ids come from the URL
    created = env.put("/api/v1/machines/mdc2/put-1", json_body=data)
    assert created.code == 201, created.body
    assert created.json()["worker_id"] == "put-1" and created.json()["worker_group"] == "mdc2"
    updated = env.put("/api/v1/machines/mdc2/put-1",
                      json_body={"worker_id": "put-1", "worker_group": "mdc2", "ip": "10.0.0.10",
                                 "notes": "moved"})
    assert updated.code == 200, updated.body
    got = env.get("/api/v1/machines/mdc2/put-1").json()
    assert got["ip"] == "10.0.0.10" and got["notes"] == "moved" and got["pool"] is None
    assert [(a.action, a.result) for a in env.audit()] == [("machine.put", "created"), ("machine.put", "updated")]


@pytest.mark.parametrize("data", [
    {"worker_id": "other", "ip": "10.0.0.9"},
    {"worker_group": "other", "ip": "10.0.0.9"},
])
def test_put_body_ids_must_match_url(env: Env, data: dict) -> None:
    r = env.put("/api/v1/machines/mdc2/put-1", json_body=data)
    assert r.code == 400
    code, message = r.error()
    assert code == "invalid" and "does not match the URL" in message
    assert env.get("/api/v1/machines/mdc2/put-1").code == 404
    assert env.audit() == []


def test_delete_machine_then_404(env: Env) -> None:
    r = env.delete("/api/v1/machines/g1/m2")
    assert r.code == 204 and r.body == b""
    assert env.get("/api/v1/machines/g1/m2").code == 404
    again = env.delete("/api/v1/machines/g1/m2")
    assert again.code == 404
    assert again.error()[0] == "unknown_machine"
    assert [(a.action, a.target) for a in env.audit()] == [("machine.delete", "g1/m2")]


def test_get_unknown_machine_is_404(env: Env) -> None:
    r = env.get("/api/v1/machines/g1/nope")
    assert r.code == 404
    assert r.error()[0] == "unknown_machine"


def _machine_ids(env: Env, query: str = "") -> list[str]:
    r = env.get("/api/v1/machines" + (f"?{query}" if query else ""))
    assert r.code == 200, r.body
    return [f"{m['worker_group']}/{m['worker_id']}" for m in r.json()["machines"]]


@pytest.mark.parametrize("query, expected", [
    ("", ["g1/dup", "g1/m1", "g1/m2", "g1/noaddr", "g2/dup", "g2/m3"]),
    ("worker_group=g2", ["g2/dup", "g2/m3"]),
    ("pool=mac", ["g1/m1", "g1/m2"]),
    ("pool=none", []),
    ("q=m", ["g1/m1", "g1/m2", "g2/m3"]),
    ("q=releng.example", ["g1/m1"]),  # fqdn
    ("q=192.0.2.5", ["g2/dup"]),  # ip
    ("q=_", []),  # LIKE wildcards are literal
    ("q=%25", []),
    ("limit=2", ["g1/dup", "g1/m1"]),
    ("limit=2&offset=2", ["g1/m2", "g1/noaddr"]),
    ("limit=2&offset=6", []),
    ("worker_group=g1&pool=mac&q=m2", ["g1/m2"]),
])
def test_list_machines_filters(env: Env, query: str, expected: list[str]) -> None:
    assert _machine_ids(env, query) == expected


def test_list_machines_reports_paging(env: Env) -> None:
    body = env.get("/api/v1/machines?limit=3&offset=1").json()
    assert body["limit"] == 3 and body["offset"] == 1 and len(body["machines"]) == 3
    default = env.get("/api/v1/machines").json()
    assert (default["limit"], default["offset"]) == (100, 0)


# -- bad input: one test per case ----------------------------------------------


def _assert_nothing_queued(env: Env) -> None:
    assert env.jobs() == []
    assert env.queue.depth == 0 and env.ctl.runs == {}
    assert env.audit() == []


BAD_POSTS = [
    # (url, body, status, code, message fragment)
    pytest.param(tc_url("m1", "g1"), None, 400, "missing_parameter", "task_name", id="tc-missing-task_name"),
    pytest.param(tc_url("m1", "g1", "task_name="), None, 400, "missing_parameter", "task_name",
                 id="tc-empty-task_name"),
    pytest.param("/api/v1/jobs?tc_worker_id=m1", None, 400, "missing_parameter", "task_name",
                 id="seed-missing-task_name"),
    pytest.param(tc_url("m1", "g1", "task_name=format_disk"), None, 400, "unknown_task", "format_disk",
                 id="tc-unknown-task"),
    pytest.param("/api/v1/jobs?tc_worker_id=m1&task_name=format_disk", None, 400, "unknown_task", "format_disk",
                 id="seed-unknown-task"),
    pytest.param(tc_url("m1", "g1", "task_name=loan"), None, 400, "task_not_allowed", "loan",
                 id="tc-task-not-allowed"),
    pytest.param("/api/v1/jobs?tc_worker_id=m1&task_name=loan", None, 400, "task_not_allowed", "loan",
                 id="seed-task-not-allowed"),
    pytest.param(tc_url("m.1", "g1", "task_name=reboot"), None, 400, "invalid_worker_id", "worker_id",
                 id="tc-worker_id-dot"),
    pytest.param(tc_url("m%201", "g1", "task_name=reboot"), None, 400, "invalid_worker_id", "worker_id",
                 id="tc-worker_id-space"),
    pytest.param(tc_url("m%C3%A91", "g1", "task_name=reboot"), None, 400, "invalid_worker_id", "worker_id",
                 id="tc-worker_id-non-ascii"),
    pytest.param(tc_url("w" * 129, "g1", "task_name=reboot"), None, 400, "invalid_worker_id", "worker_id",
                 id="tc-worker_id-129-chars"),
    pytest.param(tc_url("m1", "g.1", "task_name=reboot"), None, 400, "invalid_worker_id", "worker_group",
                 id="tc-worker_group-dot"),
    pytest.param(tc_url("m1", "g" * 129, "task_name=reboot"), None, 400, "invalid_worker_id", "worker_group",
                 id="tc-worker_group-129-chars"),
    pytest.param("/api/v1/jobs?task_name=reboot", None, 400, "missing_parameter", "tc_worker_id",
                 id="seed-missing-tc_worker_id"),
    pytest.param("/api/v1/jobs?tc_worker_id=&task_name=reboot", None, 400, "missing_parameter", "tc_worker_id",
                 id="seed-empty-tc_worker_id"),
    pytest.param("/api/v1/jobs?tc_worker_id=m/1&task_name=reboot", None, 400, "invalid_worker_id", "tc_worker_id",
                 id="seed-tc_worker_id-slash"),
    pytest.param("/api/v1/jobs?tc_worker_id=m%3B1&task_name=reboot", None, 400, "invalid_worker_id",
                 "tc_worker_id", id="seed-tc_worker_id-semicolon"),
    pytest.param(f"/api/v1/jobs?tc_worker_id={'w' * 129}&task_name=reboot", None, 400, "invalid_worker_id",
                 "tc_worker_id", id="seed-tc_worker_id-129-chars"),
    pytest.param(tc_url("ghost", "g1", "task_name=reboot"), None, 404, "unknown_machine", "ghost",
                 id="tc-unknown-machine"),
    pytest.param(tc_url("m3", "g1", "task_name=reboot"), None, 404, "unknown_machine", "m3",
                 id="tc-machine-in-other-group"),
    pytest.param("/api/v1/jobs?tc_worker_id=ghost&task_name=reboot", None, 404, "unknown_machine", "ghost",
                 id="seed-unknown-machine"),
    pytest.param("/api/v1/jobs?tc_worker_id=dup&task_name=reboot", None, 409, "ambiguous_worker", "g1, g2",
                 id="seed-ambiguous-worker"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'{"params": {"n": 1}', 400, "invalid_json", "JSON",
                 id="malformed-json"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b"\xff\xfe{}", 400, "invalid_json", "JSON",
                 id="body-not-utf8"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b"[1, 2]", 400, "invalid_body", "object",
                 id="body-is-a-list"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'"reboot"', 400, "invalid_body", "object",
                 id="body-is-a-string"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'{"task_name": "x"}', 400, "invalid_body", "task_name",
                 id="body-unknown-field"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'{"params": {"x": 1}}', 400, "invalid", "x",
                 id="params-unknown"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'{"params": {"n": 6}}', 400, "invalid", "params.n",
                 id="params-above-maximum"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'{"params": {"n": -1}}', 400, "invalid", "params.n",
                 id="params-below-minimum"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'{"params": {"n": "3"}}', 400, "invalid", "params.n",
                 id="params-wrong-type"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'{"params": {"n": true}}', 400, "invalid", "params.n",
                 id="params-bool-for-int"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'{"params": [1]}', 400, "invalid", "params",
                 id="params-not-an-object"),
    pytest.param("/api/v1/jobs?tc_worker_id=m1&task_name=ping", b'{"params": {"count": 11}}', 400, "invalid",
                 "params.count", id="seed-ping-count-out-of-range"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot&priority=101"), None, 400, "invalid_query", "priority",
                 id="query-priority-too-high"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot&priority=-1"), None, 400, "invalid_query", "priority",
                 id="query-priority-negative"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot&priority=high"), None, 400, "invalid_query", "priority",
                 id="query-priority-not-integer"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot&priority=1.5"), None, 400, "invalid_query", "priority",
                 id="query-priority-float"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'{"priority": 101}', 400, "invalid_body", "priority",
                 id="body-priority-too-high"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'{"priority": "5"}', 400, "invalid_body", "priority",
                 id="body-priority-string"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'{"priority": true}', 400, "invalid_body", "priority",
                 id="body-priority-bool"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'{"priority": 5.5}', 400, "invalid_body", "priority",
                 id="body-priority-float"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), b'{"reason": 7}', 400, "invalid_body", "reason",
                 id="body-reason-not-string"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot"), json.dumps({"reason": "x" * 1001}).encode(), 400,
                 "invalid_body", "reason", id="body-reason-too-long"),
    pytest.param(tc_url("m1", "g1", "task_name=reboot&reason=" + "x" * 1001), None, 400, "invalid_body", "reason",
                 id="query-reason-too-long"),
    pytest.param(tc_url("m1", "g1", "task_name=%FF"), None, 400, "invalid_query", "UTF-8",
                 id="query-not-utf8"),
]


@pytest.mark.parametrize("url, body, status, code, fragment", BAD_POSTS)
def test_bad_job_post(env: Env, url: str, body: bytes | None, status: int, code: str, fragment: str) -> None:
    headers = {"Content-Type": "application/json"} if body is not None else None
    r = env.post(url, body=body, headers=headers)
    assert r.code == status, r.body
    got_code, message = r.error()
    assert got_code == code
    assert fragment in message
    assert r.header("location") is None
    _assert_nothing_queued(env)


@pytest.mark.parametrize("url", [
    tc_url("m1%0A", "g1", "task_name=reboot"),
    "/api/v1/jobs?tc_worker_id=m1%0A&task_name=reboot",
])
def test_worker_id_with_trailing_newline_is_400(env: Env, url: str) -> None:
    r = env.post(url)
    assert r.code == 400, r.body
    assert r.error()[0] == "invalid_worker_id"


@pytest.mark.parametrize("method, path, allowed", [
    ("GET", tc_url("m1", "g1", "task_name=reboot"), {"OPTIONS", "POST"}),
    ("PUT", "/api/v1/jobs", {"GET", "HEAD", "OPTIONS", "POST"}),
    ("PATCH", "/api/v1/jobs/some-id", {"DELETE", "GET", "HEAD", "OPTIONS"}),
    ("POST", "/api/v1/jobs/some-id", {"DELETE", "GET", "HEAD", "OPTIONS"}),
    ("DELETE", "/api/v1/tasks", {"GET", "HEAD"}),
    ("PATCH", "/api/v1/machines/g1/m1", {"DELETE", "GET", "HEAD", "PUT"}),
    ("DELETE", "/api/v1/machines", {"GET", "HEAD", "POST"}),
])
def test_wrong_method_is_405_with_allow(env: Env, method: str, path: str, allowed: set[str]) -> None:
    r = env.request(method, path)
    assert r.code == 405, r.body
    code, message = r.error()
    assert code == "method_not_allowed" and method in message
    assert {m.strip() for m in r.header("allow").split(",")} == allowed
    _assert_nothing_queued(env)


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/v1/nope"),
    ("POST", "/api/v2/jobs?tc_worker_id=m1&task_name=reboot"),
    ("GET", "/"),
    ("GET", "/api/v1/workers/m1/group/g1"),
    ("GET", "/api/v1/machines/g1"),
    ("GET", "/api/v1/machines/g1/m1/extra"),
])
def test_unknown_route_is_404_json(env: Env, method: str, path: str) -> None:
    r = env.request(method, path)
    assert r.code == 404
    code, message = r.error()
    assert code == "not_found" and path.split("?")[0][:40] in message
    _assert_nothing_queued(env)


@pytest.mark.parametrize("method, path, ctype", [
    ("POST", tc_url("m1", "g1", "task_name=reboot"), "text/plain"),
    ("POST", "/api/v1/jobs?tc_worker_id=m1&task_name=reboot", "application/x-www-form-urlencoded"),
    ("POST", "/api/v1/machines", "text/plain"),
    ("PUT", "/api/v1/machines/g9/x1", "application/xml"),
])
def test_unsupported_content_type_is_415(env: Env, method: str, path: str, ctype: str) -> None:
    body = json.dumps({"worker_id": "x1", "worker_group": "g9"}).encode()
    r = env.request(method, path, body=body, headers={"Content-Type": ctype})
    assert r.code == 415, r.body
    assert r.error()[0] == "unsupported_media_type"
    _assert_nothing_queued(env)
    assert env.get("/api/v1/machines/g9/x1").code == 404


@pytest.mark.parametrize("method, path, body, code, fragment", [
    ("POST", "/api/v1/machines", None, "missing_body", "body"),
    ("POST", "/api/v1/machines", b"   ", "missing_body", "body"),
    ("POST", "/api/v1/machines", b"{worker_id: 1}", "invalid_json", "JSON"),
    ("POST", "/api/v1/machines", b"[]", "invalid", "object"),
    ("POST", "/api/v1/machines", b'{"worker_group": "g9"}', "invalid", "worker_id"),
    ("POST", "/api/v1/machines", b'{"worker_id": "x.1", "worker_group": "g9"}', "invalid", "worker_id"),
    ("POST", "/api/v1/machines", b'{"worker_id": "x1", "worker_group": "g9", "colour": "red"}', "invalid",
     "colour"),
    ("POST", "/api/v1/machines", b'{"worker_id": "x1", "worker_group": "g9", "ip": "300.1.1.1"}', "invalid",
     "ip"),
    ("POST", "/api/v1/machines", b'{"worker_id": "x1", "worker_group": "g9", "ssh": {"port": 0}}', "invalid",
     "ssh.port"),
    ("PUT", "/api/v1/machines/g9/x1", None, "missing_body", "body"),
    ("PUT", "/api/v1/machines/g9/x1", b'{"ip": ', "invalid_json", "JSON"),
    ("PUT", "/api/v1/machines/g9/x1", b'"x"', "invalid", "object"),
    ("PUT", "/api/v1/machines/g9/x.1", b"{}", "invalid_worker_id", "worker_id"),
    ("PUT", "/api/v1/machines/g.9/x1", b"{}", "invalid_worker_id", "worker_group"),
    ("DELETE", "/api/v1/machines/g9/x.1", None, "invalid_worker_id", "worker_id"),
    ("GET", "/api/v1/machines/g9/" + "x" * 129, None, "invalid_worker_id", "worker_id"),
])
def test_bad_machine_request_is_400(env: Env, method: str, path: str, body: bytes | None, code: str,
                                    fragment: str) -> None:
    before = env.machines()
    headers = {"Content-Type": "application/json"} if body is not None else None
    r = env.request(method, path, body=body, headers=headers)
    assert r.code == 400, r.body
    got, message = r.error()
    assert got == code and fragment in message
    assert env.machines() == before
    assert env.audit() == []


@pytest.mark.parametrize("query, fragment", [
    ("limit=0", "limit"),
    ("limit=1001", "limit"),
    ("limit=ten", "limit"),
    ("before=0", "before"),
    ("before=abc", "before"),
    ("state=done", "state"),
    ("state=queued,,bogus", "state"),
    ("worker_id=a.b", "worker_id"),
    ("worker_group=" + "g" * 129, "worker_group"),
])
def test_bad_job_list_query_is_400(env: Env, query: str, fragment: str) -> None:
    r = env.get(f"/api/v1/jobs?{query}")
    assert r.code == 400, r.body
    code, message = r.error()
    assert code in ("invalid_query", "invalid_worker_id") and fragment in message


@pytest.mark.parametrize("query, fragment", [
    ("limit=0", "limit"),
    ("limit=1001", "limit"),
    ("offset=-1", "offset"),
    ("offset=x", "offset"),
    ("worker_group=g%201", "worker_group"),
])
def test_bad_machine_list_query_is_400(env: Env, query: str, fragment: str) -> None:
    r = env.get(f"/api/v1/machines?{query}")
    assert r.code == 400, r.body
    code, message = r.error()
    assert code in ("invalid_query", "invalid_worker_id") and fragment in message


# -- authentication and scopes -------------------------------------------------


def _mutations(env: Env) -> list[tuple[str, str, bytes | None]]:
    """Every mutating call, each valid (it succeeds with full access)."""
    job_id = env.submit("reboot", "m1")["task_id"]  # made with full access first
    machine = json.dumps({"worker_id": "new-1", "worker_group": "mdc1", "ip": "10.0.0.7"}).encode()
    return [
        ("POST", tc_url("m2", "g1", "task_name=reboot"), None),
        ("POST", "/api/v1/jobs?tc_worker_id=m3&task_name=power", None),
        ("DELETE", f"/api/v1/jobs/{job_id}", None),
        ("POST", "/api/v1/machines", machine),
        ("PUT", "/api/v1/machines/g1/m2", b'{"ip": "10.9.9.9"}'),
        ("DELETE", "/api/v1/machines/g1/m2", None),
    ]


MUTATION_IDS = ["post-tc-form", "post-seed-form", "delete-job", "post-machine", "put-machine", "delete-machine"]


def _snapshot(env: Env) -> tuple:
    return ([(j.id, j.state) for j in env.jobs()], env.machines(), env.audit(),
            sorted(env.ctl.running_ids()), list(env.ctl.cancelled))


@pytest.mark.parametrize("index", range(len(MUTATION_IDS)), ids=MUTATION_IDS)
def test_unconfigured_auth_refuses_mutations_with_401(env: Env, index: int) -> None:
    method, path, body = _mutations(env)[index]
    before = _snapshot(env)
    env.use(UnconfiguredAuthenticator(NOT_CONFIGURED))
    headers = {"Content-Type": "application/json"} if body is not None else None
    r = env.request(method, path, body=body, headers=headers)
    assert r.code == 401, r.body
    assert r.header("www-authenticate") == "Hawk"
    code, message = r.error()
    assert code == "auth_not_configured" and NOT_CONFIGURED in message
    assert _snapshot(env) == before  # nothing queued, stored, cancelled or audited


@pytest.mark.parametrize("index", range(len(MUTATION_IDS)), ids=MUTATION_IDS)
def test_mutations_succeed_with_full_access(env: Env, index: int) -> None:
    """The control for the 401/403 tests: the same calls work when allowed."""
    method, path, body = _mutations(env)[index]
    headers = {"Content-Type": "application/json"} if body is not None else None
    r = env.request(method, path, body=body, headers=headers)
    assert r.code in (200, 201, 204), r.body


def test_unconfigured_auth_still_serves_open_reads(env: Env) -> None:
    job_id = env.submit("reboot", "m1")["task_id"]
    env.use(UnconfiguredAuthenticator(NOT_CONFIGURED))
    for path in ["/api/v1/tasks", "/api/v1/openapi.json", "/metrics", "/__heartbeat__", "/__lbheartbeat__",
                 "/__version__"]:
        r = env.get(path)
        assert r.code == 200, (path, r.body)
        assert r.header("www-authenticate") is None
    for path in ["/api/v1/jobs", f"/api/v1/jobs/{job_id}", "/api/v1/jobs?state=running",
                 "/api/v1/machines", "/api/v1/machines/g1/m1"]:
        r = env.get(path)
        assert r.code == 401, (path, r.body)
        assert r.header("www-authenticate") == "Hawk"
        assert r.error()[0] == "auth_not_configured"
    env.use(AnonymousAuthenticator())
    assert env.get(f"/api/v1/jobs/{job_id}").json()["state"] == "running"


@pytest.mark.parametrize("path, scope", [
    ("/api/v1/jobs", "jobs:read"), ("/api/v1/jobs/JOB", "jobs:read"),
    ("/api/v1/machines", "machines:read"), ("/api/v1/machines/g1/m1", "machines:read"),
])
def test_reads_need_their_scope(env: Env, path: str, scope: str) -> None:
    path = path.replace("JOB", env.submit("reboot", "m1")["task_id"])
    env.use(ScopedAuthenticator("client/ci", ("project:releng:roller:reboot", "project:releng:roller:audit:read")))
    r = env.get(path)
    assert r.code == 403, r.body
    code, message = r.error()
    assert code == "insufficient_scope" and "project:releng:roller:" + scope in message
    for held in ("project:releng:roller:" + scope, "project:releng:roller:*", "*"):
        env.use(ScopedAuthenticator("client/ci", (held,)))
        assert env.get(path).code == 200, (held, path)


def test_scoped_authenticator_provides_the_interface() -> None:
    verifyObject(IAuthenticator, ScopedAuthenticator("c", ()))


@pytest.mark.parametrize("url", [
    tc_url("noaddr", "g1", "task_name=ping"),
    "/api/v1/jobs?tc_worker_id=noaddr&task_name=ping",
])
def test_missing_task_scope_is_403_naming_it(env: Env, url: str) -> None:
    env.use(ScopedAuthenticator("client/ci", ("project:releng:roller:other",)))
    r = env.post(url)
    assert r.code == 403, r.body
    code, message = r.error()
    assert code == "insufficient_scope"
    assert "project:releng:roller:ping" in message and "client/ci" in message
    _assert_nothing_queued(env)


@pytest.mark.parametrize("scopes", [("project:releng:roller:*",), ("project:releng:roller:ping",), ("*",),
                                    ("project:releng:roller:other", "project:releng:roller:p*")])
def test_matching_scope_is_accepted(env: Env, scopes: tuple[str, ...]) -> None:
    env.use(ScopedAuthenticator("client/ci", scopes))
    r = env.post("/api/v1/jobs?tc_worker_id=noaddr&task_name=ping")
    assert r.code == 201, r.body
    job = env.job(r.json()["task_id"])
    assert job.requester == "client/ci"
    (entry,) = env.audit()
    assert entry.actor == "client/ci" and entry.action == "job.create:ping"


def test_scope_of_one_task_does_not_grant_another(env: Env) -> None:
    env.use(ScopedAuthenticator("client/ci", ("project:releng:roller:ping",)))
    r = env.post(tc_url("m1", "g1", "task_name=reboot"))
    assert r.code == 403
    assert "project:releng:roller:reboot" in r.error()[1]
    _assert_nothing_queued(env)


@pytest.mark.parametrize("index, scope", [
    (2, "project:releng:roller:jobs:cancel"),
    (3, "project:releng:roller:inventory:write"),
    (4, "project:releng:roller:inventory:write"),
    (5, "project:releng:roller:inventory:write"),
], ids=MUTATION_IDS[2:])
def test_other_mutations_need_their_scope(env: Env, index: int, scope: str) -> None:
    method, path, body = _mutations(env)[index]
    before = _snapshot(env)
    env.use(ScopedAuthenticator("client/ci", ("project:releng:roller:reboot", "project:releng:roller:ping")))
    headers = {"Content-Type": "application/json"} if body is not None else None
    r = env.request(method, path, body=body, headers=headers)
    assert r.code == 403, r.body
    code, message = r.error()
    assert code == "insufficient_scope" and scope in message
    assert _snapshot(env) == before


def test_custom_scope_prefix(env: Env) -> None:
    def use(scopes: tuple[str, ...]) -> None:
        env.api = Api(env.store, env.queue, env.tasks, ScopedAuthenticator("c", scopes),
                      allowed_tasks=env.allowed, scope_prefix="project:relops:", clock=env.clock)
        env.client = StubTreq(env.api.app.resource())

    use(("project:relops:reboot",))
    assert env.post(tc_url("m1", "g1", "task_name=reboot")).code == 201
    use(("project:releng:roller:*",))
    r = env.post(tc_url("m2", "g1", "task_name=reboot"))
    assert r.code == 403 and "project:relops:reboot" in r.error()[1]


# -- audit ---------------------------------------------------------------------


def test_mutations_write_audit_entries(env: Env) -> None:
    env.use(ScopedAuthenticator("relops/alice", ("*",)))
    job_id = env.post(tc_url("m1", "g1", "task_name=reboot&reason=hung"),
                      headers={"Content-Type": "application/json"}).json()["task_id"]
    env.post(tc_url("m1", "g1", "task_name=reboot"))  # duplicate: no entry
    env.delete(f"/api/v1/jobs/{job_id}")
    env.post("/api/v1/machines", json_body={"worker_id": "a1", "worker_group": "gx"})
    env.put("/api/v1/machines/gx/a1", json_body={"notes": "rack 3"})
    env.delete("/api/v1/machines/gx/a1")
    entries = env.audit()
    assert [(e.action, e.target, e.result) for e in entries] == [
        ("job.create:reboot", "g1/m1", f"queued {job_id}"),
        ("job.cancel", "g1/m1", f"cancelled {job_id}"),
        ("machine.create", "gx/a1", "created"),
        ("machine.put", "gx/a1", "updated"),
        ("machine.delete", "gx/a1", "deleted"),
    ]
    assert {e.actor for e in entries} == {"relops/alice"}
    assert all(e.source_ip == "127.0.0.1" for e in entries)
    assert entries[0].params == {"params": {"n": 1}, "priority": 50, "reason": "hung"}
    assert entries[3].params["notes"] == "rack 3"
    times = [e.time for e in entries]
    assert times == sorted(times)


def test_audit_api_needs_its_scope_and_pages(env: Env) -> None:
    env.use(ScopedAuthenticator("relops/alice", ("*",)))
    job_id = env.post(tc_url("m1", "g1", "task_name=reboot")).json()["task_id"]
    env.delete(f"/api/v1/jobs/{job_id}")
    env.post("/api/v1/machines", json_body={"worker_id": "a1", "worker_group": "gx"})
    r = env.get("/api/v1/audit?limit=2")
    assert r.code == 200
    page = r.json()
    assert [e["action"] for e in page["entries"]] == ["machine.create", "job.cancel"]
    assert page["entries"][0]["actor"] == "relops/alice"
    older = env.get(f"/api/v1/audit?before={page['next_before']}").json()
    assert [e["action"] for e in older["entries"]] == ["job.create:reboot"] and older["next_before"] is None
    only = env.get("/api/v1/audit?target=g1/m1").json()
    assert [e["action"] for e in only["entries"]] == ["job.cancel", "job.create:reboot"]
    env.use(ScopedAuthenticator("sheriff", ("project:releng:roller:reboot",)))
    r = env.get("/api/v1/audit")
    assert r.code == 403 and "project:releng:roller:audit:read" in r.json()["message"]


def test_audit_time_comes_from_the_injected_clock(env: Env) -> None:
    env.clock.advance(1234.5)
    env.submit("reboot", "m1")
    (entry,) = env.audit()
    assert entry.time == 1234.5


# -- operations ----------------------------------------------------------------


def test_heartbeat(env: Env) -> None:
    env.submit("reboot", "m1")
    env.submit("power", "m1")
    r = env.get("/__heartbeat__")
    assert r.code == 200
    body = r.json()
    assert body["status"] == "ok" and body["checks"] == {"database": "ok", "reactor_lag": "ok"}
    assert body["queue"] == {"running": 1, "queued": 1, "unrecorded": 0}


def test_heartbeat_reports_a_broken_database(env: Env) -> None:
    result_of(env.store.close())
    r = env.get("/__heartbeat__")
    assert r.code == 500
    body = r.json()
    assert body["status"] == "error" and body["checks"]["database"].startswith("error")


def test_lbheartbeat(env: Env) -> None:
    r = env.get("/__lbheartbeat__")
    assert r.code == 200 and r.json() == {"status": "ok"}


def test_version(env: Env) -> None:
    from roller import __version__

    r = env.get("/__version__")
    assert r.code == 200
    body = r.json()
    assert body["version"] == __version__ and body["name"] == "roller"
    assert set(body) >= {"source", "version", "commit"}


def test_json_responses_are_not_cached(env: Env) -> None:
    for r in (env.get("/api/v1/jobs"), env.get("/api/v1/jobs/nope"), env.post(tc_url("m1", "g1"))):
        assert r.header("cache-control") == "no-store"
