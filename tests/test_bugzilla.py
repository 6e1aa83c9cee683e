"""
file_bugzilla_bug and the reboot escalation's last step, against the Klein
fake of the Bugzilla REST API (roller.testing.bugzilla) on 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from attrs import evolve
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from roller.bugzilla import API_KEY_HEADER, BugzillaClient, BugzillaError
from roller.config import ConfigError, load_settings
from roller.drivers.registry import Drivers
from roller.drivers.ssh import CommandResult
from roller.inventory import Machine
from roller.jobs import Job
from roller.secrets import Credential, Secrets
from roller.tasks import TaskContext, TaskFailed, builtin_tasks
from roller.tasks import bugzilla as bugzilla_task
from roller.tasks import reboot
from roller.testing.bugzilla import FakeBugzilla

KEY = "bz-api-key-0123456789abcdef"
PRODUCTS = {"Infrastructure & Operations": ["DCOps", "CIDuty"]}


@pytest.fixture
def fake():
    bz = FakeBugzilla(api_key=KEY, products={k: list(v) for k, v in PRODUCTS.items()})
    port = bz.listen(reactor)
    yield bz
    port.stopListening()


@pytest.fixture
def logged():
    events: list[str] = []

    def observer(event: dict) -> None:
        events.append(formatEvent(event) or "")
        events.append(repr(event))

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


MACHINE = {"worker_id": "t-linux64-ms-001", "worker_group": "mdc1", "fqdn": "t-linux64-ms-001.test.releng.mdc1",
           "ip": "10.49.40.1", "ssh": {"user": "u", "port": 22}, "bug_cc": ["owner@example.com"]}


class Up:
    """A liveness check that finds the machine up, without sending anything."""

    def check(self, address: str) -> Deferred:
        from roller.drivers.liveness import LivenessResult

        return succeed(LivenessResult(True, f"{address} is up (scripted)"))


def context(fake: FakeBugzilla, *, clock: Any = None, shell: Any = None, key: str = KEY, **settings: Any):
    s = evolve(load_settings(None, {}, {}), bugzilla_url=fake.url, bugzilla_cc=("relops@example.com",),
               ssh_credential="sshkey", **settings)
    machine = Machine.from_json(MACHINE)
    secrets = Secrets({"bugzilla": Credential(name="bugzilla", kind="token", value=key),
                       "sshkey": Credential(name="sshkey", kind="ssh-key", path="/dev/null")})
    events: list[tuple[str, dict]] = []
    job = Job(id="job-1", task_name="reboot", worker_id=machine.worker_id, worker_group=machine.worker_group,
              created_at=0.0, requester="client/ci", reason="stuck in a loop")
    drivers = Drivers(shell=shell, liveness=lambda m: Up())
    ctx = TaskContext(job=job, machine=machine, reactor=clock or reactor,
                      log=lambda m, **d: events.append((m, d)), settings=s, secrets=secrets, drivers=drivers)
    return ctx, events


def run_task(ctx) -> Deferred:
    spec = builtin_tasks().get("file_bugzilla_bug")
    return Deferred.fromCoroutine(spec.run(ctx, {}))


def writes(fake: FakeBugzilla) -> list[dict]:
    return [r for r in fake.requests if r["method"] != "GET"]


@pytest_twisted.ensureDeferred
async def test_new_tracker_and_new_reboot_bug(fake):
    ctx, events = context(fake)
    result = await run_task(ctx)
    tracker = next(b for b in fake.bugs.values() if b["alias"] == "t-linux64-ms-001")
    bug = next(b for b in fake.bugs.values() if b["alias"] is None)
    assert result == f"filed bug {bug['id']} blocking tracker bug {tracker['id']}"
    assert tracker["component"] == "CIDuty" and tracker["summary"] == "t-linux64-ms-001 problem tracking"
    assert bug["summary"] == "t-linux64-ms-001 is unreachable" and bug["component"] == "DCOps"
    assert bug["blocks"] == [tracker["id"]] and tracker["depends_on"] == [bug["id"]]
    assert bug["cc"] == ["owner@example.com", "relops@example.com"]
    description = fake.comments[bug["id"]][0]
    assert "t-linux64-ms-001 (10.49.40.1)" in description
    assert "Requested by client/ci (job job-1), reason: stuck in a loop." in description
    assert "- none (filed directly)" in description
    # every write carried the key in its header
    assert writes(fake) and all(r["headers"][API_KEY_HEADER.lower()] == [KEY] for r in writes(fake))
    assert [d.get("step") for _, d in events] == ["tracker_created", "bug_filed"]


@pytest_twisted.ensureDeferred
async def test_closed_tracker_is_reopened(fake):
    tracker = fake.add_bug("t-linux64-ms-001 problem tracking", alias="t-linux64-ms-001", status="RESOLVED",
                           resolution="FIXED", component="CIDuty")
    ctx, events = context(fake)
    result = await run_task(ctx)
    assert fake.bugs[tracker]["status"] == "REOPENED" and fake.bugs[tracker]["resolution"] == ""
    assert "Reopened by roller" in fake.comments[tracker][-1]
    (bug,) = fake.bugs[tracker]["depends_on"]
    assert result == f"filed bug {bug} blocking tracker bug {tracker}"
    assert ("reopened tracker bug %d (alias t-linux64-ms-001)" % tracker) in [m for m, _ in events]


@pytest_twisted.ensureDeferred
async def test_existing_reboot_bug_gets_a_comment(fake):
    tracker = fake.add_bug("t-linux64-ms-001 problem tracking", alias="t-linux64-ms-001", component="CIDuty")
    # an old, closed reboot bug is not reused; the open one (not yet blocking the tracker) is
    fake.add_bug("t-linux64-ms-001 is unreachable", status="RESOLVED", resolution="FIXED", blocks=(tracker,))
    open_bug = fake.add_bug("t-linux64-ms-001 is unreachable")
    ctx, _ = context(fake)
    before = len(fake.bugs)
    result = await run_task(ctx)
    assert result == f"commented on bug {open_bug} (blocks tracker bug {tracker})"
    assert len(fake.bugs) == before
    assert fake.bugs[open_bug]["blocks"] == [tracker]
    assert "could not be rebooted by roller again" in fake.comments[open_bug][-1]
    assert "owner@example.com" in fake.bugs[open_bug]["cc"]


@pytest_twisted.ensureDeferred
async def test_bugzilla_error_object_becomes_the_job_error(fake, logged):
    ctx, events = context(fake, bugzilla_component="NoSuchComponent")
    with pytest.raises(TaskFailed) as info:
        await run_task(ctx)
    assert str(info.value) == (f"Bugzilla POST {fake.url}/rest/bug: Bugzilla error 51: There is no component "
                               "named 'NoSuchComponent' in the 'Infrastructure & Operations' product.")


@pytest_twisted.ensureDeferred
async def test_wrong_key_is_reported_and_the_key_never_shown(fake, logged):
    ctx, events = context(fake, key="wrong-key-ABCDEFGHIJKLMNOP")
    with pytest.raises(TaskFailed) as info:
        await run_task(ctx)
    assert "Bugzilla error 306: The API key you specified is invalid" in str(info.value)
    # a peer echoing the key (here: as the product name) is masked
    ctx, events = context(fake, bugzilla_tracker_product=KEY)
    with pytest.raises(TaskFailed) as info:
        await run_task(ctx)
    assert "There is no product named '***'" in str(info.value)
    assert KEY not in str(info.value)
    assert all(KEY not in m and KEY not in repr(d) for m, d in events)
    assert not any(KEY in line for line in logged)
    assert KEY not in repr(bugzilla_task.client(ctx))


@pytest_twisted.ensureDeferred
async def test_unreachable_bugzilla_is_a_readable_failure():
    bz = BugzillaClient(reactor, "http://127.0.0.1:1", KEY, timeout=5)
    with pytest.raises(BugzillaError) as info:
        await bz.bug_by_alias("x")
    assert info.value.message.startswith("Bugzilla GET http://127.0.0.1:1/rest/bug: ")
    assert "refused" in info.value.message.lower() and KEY not in info.value.message


def test_timeout_cancels_the_call():
    clock = Clock()

    class Hanging:
        def request(self, *a, **kw):
            return Deferred()

    bz = BugzillaClient(clock, "https://bugzilla.example", KEY, timeout=30, treq_client=Hanging())
    d = Deferred.fromCoroutine(bz.create({"summary": "x"}))
    clock.advance(30)
    failure = []
    d.addErrback(failure.append)
    assert failure and failure[0].value.message == "Bugzilla POST https://bugzilla.example/rest/bug: no answer within 30 s"


def test_not_configured_and_bad_templates():
    s = load_settings(None, {}, {})
    assert s.bugzilla_url == ""
    ctx = TaskContext(job=None, machine=None, reactor=None, log=None, settings=s, drivers=None)
    assert bugzilla_task.not_applicable(ctx) == "bugzilla.url is not configured"
    with pytest.raises(ConfigError, match="bugzilla.summary.*unknown field.*hots"):
        load_settings(None, {"ROLLER_BUGZILLA_SUMMARY": "{hots} down"}, {})
    with pytest.raises(ConfigError, match="bugzilla.url.*must be an http"):
        load_settings(None, {"ROLLER_BUGZILLA_URL": "bugzilla.example"}, {})


class RefusingShell:
    """Every reboot command exits 1: ssh_reboot fails at once."""

    def __init__(self):
        self.commands: list[str] = []

    def run(self, target, command, on_line=None):
        self.commands.append(command)
        return succeed(CommandResult(1, "", "permission denied", None))


@pytest_twisted.ensureDeferred
async def test_reboot_whose_every_method_fails_files_the_bug(fake):
    shell = RefusingShell()
    # the escalation waits on a Clock; Bugzilla is reached on the real reactor
    ctx, events = context(fake, clock=Clock(), shell=shell,
                          reboot_methods=("ssh_reboot", "ipmi_reset", "file_bugzilla_bug"))
    client = BugzillaClient(reactor, fake.url, KEY)
    ctx = evolve(ctx, drivers=evolve(ctx.drivers, bugzilla=client))
    try:
        with pytest.raises(TaskFailed) as info:
            await Deferred.fromCoroutine(reboot.run(ctx, {}))
        assert shell.commands  # ssh_reboot was tried
        (bug,) = [b for b in fake.bugs.values() if b["alias"] is None]
        tracker = fake.bugs[bug["blocks"][0]]
        assert tracker["alias"] == "t-linux64-ms-001"
        message = str(info.value)
        assert message.startswith("failed: ssh_reboot failed: ")
        assert "ipmi_reset skipped: the machine has no ipmi settings" in message
        assert message.endswith(f"file_bugzilla_bug done: filed bug {bug['id']} blocking tracker bug {tracker['id']}")
        description = fake.comments[bug["id"]][0]
        assert "- ssh_reboot failed: " in description
        assert "- ipmi_reset skipped: the machine has no ipmi settings" in description
        assert events[-1][1] == {"method": "file_bugzilla_bug", "outcome": "done"}

        # a second failing reboot comments on the same bug
        with pytest.raises(TaskFailed) as info:
            await Deferred.fromCoroutine(reboot.run(ctx, {}))
        assert info.value.args[0].endswith(f"file_bugzilla_bug done: commented on bug {bug['id']} "
                                           f"(blocks tracker bug {tracker['id']})")
        assert len(fake.bugs) == 2
    finally:
        await client.close()  # after both runs: the second one uses it too
