"""
`roller actions`: the worker-context action definitions, and --register
against a Klein fake of the queue's declareProvisioner (and one without it,
as Taskcluster has been since v107).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mohawk
import pytest
import pytest_twisted
from attrs import define, field
from klein import Klein
from twisted.internet import reactor
from twisted.web.server import Site

from roller.actions import ActionsError, action_definitions, register
from roller.tasks import builtin_tasks

ROOT = Path(__file__).resolve().parent.parent
CLIENT, TOKEN = "project/releng/roller", "tc-token-0123456789abcdef"


@define
class FakeQueue:
    declare: bool = True
    declared: dict = field(factory=dict)
    url: str = ""
    app = Klein()

    @app.route("/api/queue/v1/provisioners/<pid>", methods=["PUT"])
    def declare_provisioner(self, request, pid):
        request.setHeader(b"Content-Type", b"application/json")
        raw = request.content.read()
        if not self.declare:
            request.setResponseCode(404)
            return json.dumps({"code": "ResourceNotFound", "message": "Not Found"}).encode()
        try:
            mohawk.Receiver(lambda cid: {"id": cid, "key": {CLIENT: TOKEN}[cid], "algorithm": "sha256"},
                            request.getHeader(b"authorization").decode(), self.url + request.uri.decode(), "PUT",
                            content=raw, content_type=request.getHeader(b"content-type").decode())
        except Exception as e:
            request.setResponseCode(401)
            return json.dumps({"code": "AuthenticationFailed", "message": f"{type(e).__name__}\nmore"}).encode()
        self.declared[pid] = json.loads(raw)
        return json.dumps({"provisionerId": pid}).encode()


@pytest.fixture
def queue():
    fake = FakeQueue()
    port = reactor.listenTCP(0, Site(fake.app.resource()), interface="127.0.0.1")
    fake.url = f"http://127.0.0.1:{port.getHost().port}"
    yield fake
    port.stopListening()


def test_definitions_for_the_allowed_tasks_only():
    actions = action_definitions(builtin_tasks(), ("reboot", "ipmi_reset", "nope"), "https://roller.example.com/")
    assert actions == [
        {"name": "ipmi_reset", "title": "IPMI reset", "context": "worker", "method": "POST",
         "url": "https://roller.example.com/api/v1/workers/<workerId>/group/<workerGroup>/jobs?task_name=ipmi_reset",
         "description": builtin_tasks().get("ipmi_reset").description},
        {"name": "reboot", "title": "Reboot", "context": "worker", "method": "POST",
         "url": "https://roller.example.com/api/v1/workers/<workerId>/group/<workerGroup>/jobs?task_name=reboot",
         "description": builtin_tasks().get("reboot").description},
    ]
    with pytest.raises(ActionsError, match="server.public_url"):
        action_definitions(builtin_tasks(), ("reboot",), "")


@pytest_twisted.ensureDeferred
async def test_register_declares_the_actions_with_a_signed_request(queue):
    actions = action_definitions(builtin_tasks(), ("reboot",), "https://roller.example.com")
    line = await register(reactor, queue.url, "releng-hardware", actions, CLIENT, TOKEN)
    assert line == f"declared 1 action(s) on provisioner releng-hardware at {queue.url}"
    assert queue.declared == {"releng-hardware": {"actions": actions}}
    with pytest.raises(ActionsError) as info:
        await register(reactor, queue.url, "releng-hardware", actions, CLIENT, "wrong-token-xxxxxxxxxx")
    # the first line of Taskcluster's message
    assert str(info.value) == f"queue.declareProvisioner on {queue.url} answered HTTP 401: MacMismatch"


@pytest_twisted.ensureDeferred
async def test_register_says_plainly_when_the_deployment_lacks_it(queue):
    queue.declare = False
    with pytest.raises(ActionsError) as info:
        await register(reactor, queue.url, "p", [], CLIENT, TOKEN)
    assert "has no queue.declareProvisioner (Taskcluster removed it and worker actions in v107)" in str(info.value)
    assert "hook or an action task" in str(info.value)


def test_cli_prints_the_definitions(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ROLLER_SERVER_PUBLIC_URL": "https://roller.example.com",
           "ROLLER_TASKS_ALLOWED": "reboot,ping"}
    r = subprocess.run([sys.executable, "-m", "roller.cli", "--state-dir", str(tmp_path / "state"), "actions"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [a["name"] for a in json.loads(r.stdout)] == ["ping", "reboot"]
    env.pop("ROLLER_SERVER_PUBLIC_URL")
    r = subprocess.run([sys.executable, "-m", "roller.cli", "--state-dir", str(tmp_path / "state"), "actions"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("roller actions: roller's public URL is needed")
