"""
Reading jobs and machines over the REST API needs a scope
(C{<prefix>jobs:read}, C{<prefix>machines:read}), checked like the mutating
calls: requests signed with mohawk exactly as the official C{taskcluster}
client signs them (and by the official client itself), against a real
L{Api} on 127.0.0.1, authenticated locally and through the fake
Taskcluster auth service.  The tasks list, the OpenAPI document and the
ops endpoints stay open.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import taskcluster
import treq
from twisted.internet import reactor, threads

from roller.auth.accounts import role_scopes
from roller.auth.hawk import LocalHawkAuthenticator
from roller.auth.taskcluster import TaskclusterAuthenticator
from roller.testing.tc_auth import FakeTaskclusterAuth
from test_auth_hawk import Served, _block, _serve, _unserve, sign

P = "project:releng:roller:"
JOBS_READER = "project/releng/jobs-reader"
MACHINES_READER = "project/releng/machines-reader"
WRITER = "project/releng/writer"  # may reboot and write the inventory, not read
ROLLER_STAR = "project/releng/roller-star"
STAR = "project/releng/star"
CLIENTS: dict[str, tuple[str, list[str]]] = {
    JOBS_READER: ("jobs-reader-TOKEN-aaaaaaaaaaaaaaaaaaaaaaaa", [P + "jobs:read"]),
    MACHINES_READER: ("machines-reader-TOKEN-bbbbbbbbbbbbbbbbbbbb", [P + "machines:read"]),
    WRITER: ("writer-TOKEN-cccccccccccccccccccccccccccc", [P + "reboot", P + "inventory:write", P + "jobs:cancel"]),
    ROLLER_STAR: ("roller-star-TOKEN-dddddddddddddddddddddddd", [P + "*"]),
    STAR: ("star-TOKEN-eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee", ["*"]),
}
MODES = ["local", "taskcluster"]


@pytest.fixture
def served(tmp_path: Any) -> Any:
    s = _block(_serve(tmp_path))
    yield s
    _block(_unserve(s))


@pytest.fixture
def auth() -> Any:
    fake = FakeTaskclusterAuth({cid: (tok, list(scopes)) for cid, (tok, scopes) in CLIENTS.items()})
    port = fake.listen(reactor)
    made: list[Any] = []

    def make(mode: str) -> Any:
        if mode == "local":
            a = LocalHawkAuthenticator(reactor, CLIENTS)
        else:
            a = TaskclusterAuthenticator(reactor, fake.url, timeout=5.0)
        made.append(a)
        return a

    yield make

    async def close() -> None:
        for a in made:
            if hasattr(a, "close"):
                await a.close()
        fake.release()
        await port.stopListening()

    _block(close())


async def get(served: Served, path: str, client: str | None) -> tuple[int, Any, Any]:
    url = served.base + path
    headers = {}
    if client is not None:
        headers["Authorization"] = [sign(url, client, token=CLIENTS[client][0], method="GET")]
    response = await treq.get(url, headers=headers, persistent=False).addTimeout(10, reactor)
    raw = await treq.content(response)
    return response.code, response.headers, json.loads(raw) if raw else None


async def _job_id(served: Served) -> str:
    url = served.base + "/api/v1/workers/m1/group/g1/jobs?task_name=reboot"
    response = await treq.post(url, headers={"Authorization": [sign(url, WRITER, token=CLIENTS[WRITER][0])]},
                               persistent=False)
    body = json.loads(await treq.content(response))
    assert response.code == 201, body
    return body["task_id"]


READS = [("/api/v1/jobs", "jobs:read"), ("/api/v1/jobs?state=running&worker_id=m1", "jobs:read"),
         ("/api/v1/jobs/JOB", "jobs:read"), ("/api/v1/machines", "machines:read"),
         ("/api/v1/machines?worker_group=g1", "machines:read"), ("/api/v1/machines/g1/m1", "machines:read")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path, scope", READS)
@pytest_twisted.ensureDeferred
async def test_reads_need_their_scope(served: Served, auth: Any, mode: str, path: str, scope: str) -> None:
    await served.serve(auth(mode))
    path = path.replace("JOB", await _job_id(served))

    code, headers, body = await get(served, path, None)
    assert code == 401, body
    assert headers.getRawHeaders("www-authenticate") == ["Hawk"]
    assert body["error"] == "unauthorized"

    code, _, body = await get(served, path, WRITER)
    assert code == 403, body
    assert body == {"error": "insufficient_scope", "message": f"{WRITER} lacks the scope {P}{scope}"}

    other = MACHINES_READER if scope == "jobs:read" else JOBS_READER
    code, _, body = await get(served, path, other)
    assert code == 403 and P + scope in body["message"], body

    for client in (JOBS_READER if scope == "jobs:read" else MACHINES_READER, ROLLER_STAR, STAR):
        code, headers, body = await get(served, path, client)
        assert code == 200, (client, body)
        assert headers.getRawHeaders("www-authenticate") is None
    if path.startswith("/api/v1/jobs/"):
        assert body["state"] in ("queued", "running") and body["worker_id"] == "m1"
    elif path.startswith("/api/v1/machines/"):
        assert body["worker_id"] == "m1"
    else:
        assert body["jobs" if scope == "jobs:read" else "machines"]


@pytest.mark.parametrize("path", ["/api/v1/tasks", "/api/v1/openapi.json", "/__lbheartbeat__", "/__heartbeat__",
                                  "/__version__", "/metrics"])
@pytest_twisted.ensureDeferred
async def test_open_reads_need_nothing(served: Served, auth: Any, path: str) -> None:
    await served.serve(auth("local"))
    response = await treq.get(served.base + path, persistent=False).addTimeout(10, reactor)
    await treq.content(response)
    assert response.code == 200
    assert response.headers.getRawHeaders("www-authenticate") is None


def test_dashboard_roles_use_the_same_read_scopes() -> None:
    """The viewer role holds exactly the scopes the API asks for reads."""
    assert set(role_scopes("viewer", P)) == {P + "jobs:read", P + "machines:read", P + "loans:read"}


@pytest_twisted.ensureDeferred
async def test_official_client_reads_a_job(served: Served, auth: Any) -> None:
    await served.serve(auth("local"))
    job_id = await _job_id(served)
    reference = {"reference": {"serviceName": "roller", "apiVersion": "v1", "entries": [
        {"type": "function", "method": "get", "name": "getJob", "stability": "stable",
         "route": "/jobs/<taskId>", "args": ["taskId"], "query": []},
        {"type": "function", "method": "get", "name": "listMachines", "stability": "stable",
         "route": "/machines", "args": [], "query": ["worker_group"]},
    ]}}
    base = served.base

    class RollerClient(taskcluster.client.createApiClient("Roller", reference)):
        def _constructUrl(self, route: str) -> str:
            return f"{base}/api/v1/{route}"

    def call(client_id: str, method: str, *args: Any) -> Any:
        c = RollerClient({"rootUrl": base, "maxRetries": 0,
                          "credentials": {"clientId": client_id, "accessToken": CLIENTS[client_id][0]}})
        try:
            return getattr(c, method)(*args)
        finally:
            c.session.close()

    job = await threads.deferToThread(call, JOBS_READER, "getJob", job_id)
    assert job["task_id"] == job_id
    with pytest.raises(taskcluster.exceptions.TaskclusterRestFailure) as info:
        await threads.deferToThread(call, JOBS_READER, "listMachines")
    assert info.value.status_code == 403
    machines = await threads.deferToThread(call, MACHINES_READER, "listMachines")
    assert [m["worker_id"] for m in machines["machines"]] == ["m1", "m2"]
