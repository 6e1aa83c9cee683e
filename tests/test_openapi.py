"""
Tests for L{roller.web.openapi}: the published OpenAPI 3.1 document.

  - it is a valid OpenAPI 3.1 document (C{openapi_spec_validator});
  - it lists exactly the Klein routes and methods of L{roller.web.api.Api};
  - schemathesis, run as a child process against a live roller (a real
    L{RollerSite} on 127.0.0.1, a real SQLite store, the job queue with the
    builtin tasks), finds no response that contradicts it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import attrs
import pytest_twisted
import treq
from openapi_spec_validator import validate
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from roller import __version__
from roller.auth import AnonymousAuthenticator
from roller.batches.service import BatchService
from roller.inventory import Machine
from roller.jobs import Job, JobEvent, State, new_job_id
from roller.queue import JobQueue
from roller.store import open_store
from roller.tasks import TaskFailed, TaskRegistry, builtin_tasks
from roller.web.api import Api
from roller.web.http import RollerSite
from roller.web.openapi import PY_SPACE, WORKER_ID_PATTERN, openapi_document

ALLOWED = ("ping",)
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
SCHEMATHESIS_TIMEOUT = 150  # seconds; only reached if something hangs


def _document() -> dict:
    return openapi_document(builtin_tasks(), ALLOWED, __version__)


# ----------------------------------------------------------------- static


def test_valid_openapi_31() -> None:
    doc = _document()
    assert doc["openapi"] == "3.1.0"
    validate(doc)
    # It survives JSON, as served.
    validate(json.loads(json.dumps(doc)))


def test_valid_for_any_allow_list() -> None:
    tasks = builtin_tasks()
    for allowed in ((), tuple(tasks.names()), ("ping", "no-such-task")):
        doc = openapi_document(tasks, allowed, __version__)
        validate(doc)
        task_name = doc["paths"]["/api/v1/jobs"]["post"]["parameters"][1]
        assert task_name["name"] == "task_name" and task_name["required"] is True
        assert task_name["schema"].get("enum", []) == [n for n in allowed if n in tasks]


def _klein_routes() -> dict[str, set[str]]:
    """{OpenAPI path: methods} from the werkzeug Map behind C{Api.app}, HEAD ignored."""
    routes: dict[str, set[str]] = {}
    for rule in Api.app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        routes.setdefault(path, set()).update(m.lower() for m in rule.methods or () if m != "HEAD")
    return routes


def test_routes_match_document() -> None:
    doc = _document()
    documented = {
        path: {m for m in item if m in HTTP_METHODS}
        for path, item in doc["paths"].items()
    }
    assert documented == _klein_routes()


def test_every_operation_documents_errors() -> None:
    """
    Each operation has an operationId, the transport errors, a JSON Error
    for every 4xx/5xx, and 401 (with WWW-Authenticate) and 403 exactly when
    it needs credentials.
    """
    doc = _document()
    responses = doc["components"]["responses"]
    assert responses["Unauthorized"]["headers"]["WWW-Authenticate"]["required"] is True
    ids = set()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            ids.add(op["operationId"])
            codes = set(op["responses"])
            assert {"400", "413", "414", "431"} <= codes, (method, path)
            secured = bool(op["security"])
            assert ("401" in codes) == secured == ("403" in codes), (method, path)
            for code, response in op["responses"].items():
                if code[0] in "45":
                    if "$ref" in response:
                        response = responses[response["$ref"].rsplit("/", 1)[1]]
                    schema = response["content"]["application/json"]["schema"]
                    assert schema in ({"$ref": "#/components/schemas/Error"},
                                      {"$ref": "#/components/schemas/Heartbeat"}), (method, path, code)
    assert len(ids) == sum(len(item) for item in doc["paths"].values())


def test_path_parameters_pattern() -> None:
    doc = _document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for p in op.get("parameters", ()):
                if p["in"] == "path" and p["name"] in ("worker_id", "worker_group") and method != "options":
                    assert p["schema"]["pattern"] == WORKER_ID_PATTERN == "^[-_0-9a-zA-Z]{1,128}$"


def test_examples_match_schemas() -> None:
    """What the models really write validates against the response schemas."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    doc = json.loads(json.dumps(_document()))
    registry = Registry().with_resource("urn:roller", Resource.from_contents(
        {**doc, "$schema": "https://json-schema.org/draft/2020-12/schema"}))

    def check(name: str, value: Any) -> None:
        validator = Draft202012Validator({"$ref": f"urn:roller#/components/schemas/{name}"},
                                         registry=registry)
        errors = list(validator.iter_errors(value))
        assert not errors, [e.message for e in errors]

    machine = Machine.from_json({
        "worker_id": "w1", "worker_group": "g1", "fqdn": "W1.example.com", "ip": "10.0.0.1",
        "pool": "p", "tags": "a, b", "ssh": {"user": "u", "credential": "k"},
        "ipmi": {"host": "bmc1", "bridge": ["-B", "0"]}, "pdu": {"host": "pdu1", "outlet": 8},
        "redfish": {"url": "https://bmc", "verify_tls": False}, "xen": {"vm_uuid": "abc"},
        "liveness": {"method": "tcp"}, "reboot_methods": "ssh_reboot,ipmi_reset", "bug_cc": ["a@b.c"],
    })
    check("Machine", machine.to_json())
    check("Machine", Machine.from_json({"worker_id": "w", "worker_group": "g"}).to_json())
    check("MachineInput", machine.to_json())
    for task in builtin_tasks():
        check("Task", task.to_json(True))
    job = Job(id=new_job_id(), task_name="gone", worker_id="w", worker_group="g", created_at=1e9)
    check("Job", job.to_json())
    done = job.transition(State.running, 1e9 + 1).transition(State.failed, 1e9 + 2, error="no")
    event = JobEvent(job.id, 1e9, "state", "queued", {"state": "queued"}, id=1)
    check("JobWithEvents", {**done.to_json(), "events": [event.to_json()]})


def test_python_whitespace_class() -> None:
    """The patterns' spelled-out \\s is exactly Python's."""
    cls = re.compile(f"[{PY_SPACE}]")
    assert all(bool(cls.match(chr(c))) == chr(c).isspace() for c in range(0x110000))


# ----------------------------------------------------------------- live


def _loopback_only(registry: TaskRegistry) -> TaskRegistry:
    """
    The builtin tasks, refusing (as a failed job) any machine whose address
    is not a 127.x address: schemathesis creates machines with arbitrary
    addresses and may queue jobs on them, and this test must not touch
    anything but the loopback interface.
    """

    def guard(run: Any) -> Any:
        async def guarded(ctx: Any, params: Any) -> str:
            if not re.fullmatch(r"127(\.[0-9]{1,3}){3}", ctx.machine.address or ""):
                raise TaskFailed(f"test guard: not pinging {ctx.machine.address!r}")
            return await run(ctx, params)

        return guarded

    return TaskRegistry([attrs.evolve(t, run=guard(t.run)) for t in registry])


class _Collect(ProcessProtocol):
    """Collects a child's output; C{done} fires with its exit code."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.done: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        self.done.callback(-1 if code is None else code)


async def _run_child(argv: list[str], cwd: str, timeout: float) -> tuple[int, str]:
    """Run C{argv} without blocking the reactor; kill it (by its PID) after C{timeout}."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", HOME=cwd, PYTHONUNBUFFERED="1",
               COLUMNS="120", TERM="dumb")
    proto = _Collect()
    transport = reactor.spawnProcess(proto, argv[0], argv, env=env, path=cwd)
    timer = reactor.callLater(timeout, lambda: transport.signalProcess("KILL"))
    try:
        code = await proto.done
    finally:
        if timer.active():
            timer.cancel()
        try:
            transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
    return code, proto.output.decode("utf-8", "replace")


# The schemathesis configuration.  Every check runs (the default when no
# --checks is given: an explicit --checks on the command line would override
# the per-operation setting below), except:
#
#   ignored_auth: the server runs with AnonymousAuthenticator (auth mode
#     "none"), which by design accepts requests without credentials, while the
#     document (rightly) declares Hawk on the mutating operations.  For the same
#     reason the run passes --generation-with-security-parameters false: no
#     "request without Authorization must be refused" cases.
#   use_after_free on GET /api/v1/jobs/{task_id} only: DELETE on a job cancels
#     it and the job stays readable (state "cancelled") as history, by design.
#     The check still applies to machines, whose DELETE removes them.
#
# 413, 414 and 431 are how RollerSite refuses an over-long body, URI or header
# block before the API sees it; they are documented on every operation, so
# they count as a rejection of invalid data, and as a legitimate answer to
# valid data that is too long to send (a 1000-character `reason` of 4-byte
# characters is a 12 KB URI).
SCHEMATHESIS_CONFIG = """
[checks.ignored_auth]
enabled = false

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "414", "415", "422",
                     "428", "429", "431", "5xx"]

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "413", "414", "429", "431", "5xx"]

[phases.stateful]
# Longer scenarios than the default 6 steps, so that created machines get
# jobs and those jobs are read and cancelled through the links.
max-steps = 20

[phases.stateful.inference]
# Only the document's links.  "location-headers" makes schemathesis 4.32 scan
# 2xx bodies for URLs with urlsplit(), which raises (an internal error) on a
# stored Redfish URL such as "http://[x"; "dependency-analysis" links the
# names in GET /api/v1/tasks to `task_name`, but only the allowed ones
# (`allowed: true`) are valid there, which the enum already says.
algorithms = []

[[operations]]
include-path = "/api/v1/jobs/{task_id}"
include-method = "GET"
checks.use_after_free.enabled = false

# A valid batch request whose selector matches no machine is refused (400
# `empty_selection`): which machines exist is not something a schema says.
[[operations]]
include-path = "/api/v1/batches"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "413", "414",
                                                     "429", "431", "5xx"]
"""


def _schemathesis_argv(url: str, config: str) -> list[str]:
    return [
        sys.executable, "-m", "schemathesis.cli", "--config-file", config, "run", url,
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", "30",
        "--workers", "1",
        "--seed", "20240611",
        "--generation-database", "none",
        "--generation-with-security-parameters", "false",
        "--request-timeout", "10",
        "--no-color",
    ]


@pytest_twisted.ensureDeferred
async def test_schemathesis_against_live_roller(tmp_path: Any) -> None:
    store = await open_store(str(tmp_path / "s.db"), reactor)
    tasks = _loopback_only(builtin_tasks())
    queue = JobQueue(store, tasks, reactor)
    batches = BatchService(store, queue, tasks, reactor)
    port = None
    try:
        # Two machines on loopback, so that some generated job requests find them
        # ("0" is what schemathesis draws first for the worker id pattern).
        await store.machines.put_many([
            Machine.from_json({"worker_id": "0", "worker_group": "0", "ip": "127.0.0.1"}),
            Machine.from_json({"worker_id": "1", "worker_group": "0", "ip": "127.0.0.2"}),
        ])
        await queue.start()
        await batches.start()
        api = Api(store=store, queue=queue, tasks=tasks, authenticator=AnonymousAuthenticator(),
                  allowed_tasks=ALLOWED, clock=reactor, batches=batches)
        site = RollerSite(api.app.resource(), reactor=reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        base = f"http://127.0.0.1:{port.getHost().port}"

        # The served document is the one built here.
        response = await treq.get(base + "/api/v1/openapi.json", persistent=False).addTimeout(10, reactor)
        assert response.code == 200
        assert await response.json() == json.loads(json.dumps(api.openapi))

        config = tmp_path / "schemathesis.toml"
        config.write_text(SCHEMATHESIS_CONFIG)
        code, output = await _run_child(
            _schemathesis_argv(base + "/api/v1/openapi.json", str(config)), str(tmp_path),
            SCHEMATHESIS_TIMEOUT)
        print(output)  # shown with -s
        assert code == 0, "schemathesis failed:\n" + output
    finally:
        if port is not None:
            await port.stopListening()
        await batches.stop()
        await queue.stop()
        batches.close()
        await store.close()
