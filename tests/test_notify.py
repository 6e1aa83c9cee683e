"""
roller.notify against Klein fakes of Taskcluster notify and of a webhook
receiver on 127.0.0.1, fed by a real JobQueue (synchronous SQLite store).
"""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from roller.config import ConfigError, load_settings
from roller.inventory import Machine
from roller.jobs import State
from roller.notify import SIGNATURE_HEADER, Notifier, notifier_from_settings, parse_rules, webhook_signature
from roller.queue import JobQueue
from roller.secrets import Credential, Secrets
from roller.tasks import TaskFailed, TaskRegistry, TaskSpec
from roller.testing.notify import FakeTaskclusterNotify, FakeWebhook
from roller.testing.syncdb import run, sync_store

CLIENT, TOKEN = "project/releng/roller", "tc-access-token-0123456789"
SECRET = "webhook-secret-abcdef"


@pytest.fixture
def peers():
    tc = FakeTaskclusterNotify({CLIENT: TOKEN})
    good, bad = FakeWebhook(), FakeWebhook(status=500)
    ports = [tc.listen(reactor), good.listen(reactor), bad.listen(reactor)]
    yield tc, good, bad
    for p in ports:
        p.stopListening()


@pytest.fixture
def logged():
    lines: list[str] = []

    def observer(event: dict) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


async def ok(ctx, params):
    return "rebooted"


async def broken(ctx, params):
    raise TaskFailed("ipmi_reset failed: busy")


def make_queue(tmp_path) -> JobQueue:
    store, _ = sync_store(str(tmp_path / "n.db"))
    tasks = TaskRegistry([TaskSpec(name="reboot", description="", run=ok),
                          TaskSpec(name="ping", description="", run=ok),
                          TaskSpec(name="reimage", description="", run=broken)])
    # the queue on the real reactor (the notifier's HTTP needs it); the store answers at once
    q = JobQueue(store, tasks, reactor)
    run(q.start())
    return q


def machine(n: int) -> Machine:
    return Machine.from_json({"worker_id": f"w{n}", "worker_group": "g", "ip": f"127.0.0.{n}"})


def settings(tc: FakeTaskclusterNotify, rules: list[dict]):
    env = {"ROLLER_NOTIFY_RULES": json.dumps(rules), "ROLLER_NOTIFY_ROOT_URL": tc.url,
           "ROLLER_SERVER_PUBLIC_URL": "https://roller.example.com"}
    return load_settings(None, env, {})


def secrets(token: str = TOKEN) -> Secrets:
    return Secrets({"taskcluster-notify": Credential(name="taskcluster-notify", kind="password",
                                                     username=CLIENT, password=token),
                    "webhook": Credential(name="webhook", kind="token", value=SECRET)})


@pytest_twisted.ensureDeferred
async def test_job_end_notifies_taskcluster_and_signed_webhooks(tmp_path, peers, logged):
    tc, good, bad = peers
    s = settings(tc, [{"tasks": ["reboot"], "on": ["succeeded", "failed"], "email": ["relops@example.com"],
                       "matrix_rooms": ["!ops:example.com"], "slack_channels": ["C0123"],
                       "webhooks": [good.url, bad.url]}])
    notifier = notifier_from_settings(s, reactor, secrets)
    q = make_queue(tmp_path)
    notifier.start(q)
    job, _ = run(q.submit("reboot", machine(1), requester="client/ci", reason="stuck"))
    final = await q.wait(job.id)
    await notifier.stop()
    assert final.state is State.succeeded  # the failing webhook did not change the job

    by_kind = {kind: (cid, body) for kind, cid, body in tc.received}
    assert set(by_kind) == {"email", "matrix", "slack"} and tc.refused == []
    assert all(cid == CLIENT for cid, _ in by_kind.values())
    email = by_kind["email"][1]
    assert email["address"] == "relops@example.com"
    assert email["subject"] == "roller: reboot succeeded on w1 (g)"
    assert "Requested by: client/ci" in email["content"] and "Result: rebooted" in email["content"]
    assert email["link"]["href"] == f"https://roller.example.com/jobs/{job.id}"
    assert by_kind["matrix"][1]["roomId"] == "!ops:example.com"
    assert by_kind["slack"][1]["channelId"] == "C0123"

    (headers, raw), = good.received
    assert headers[SIGNATURE_HEADER.lower()] == "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    assert headers["x-roller-event"] == "job.finished"
    document = json.loads(raw)
    assert document["event"] == "job.finished"
    assert document["job"]["task_id"] == job.id and document["job"]["state"] == "succeeded"
    assert len(bad.received) == 1
    assert ("webhook", bad.url, "HTTP 500") in notifier.sent
    assert any(f"Notification by webhook to {bad.url} refused: HTTP 500" in line for line in logged)
    # no "started" notification: the rule asks only for succeeded and failed
    assert all(b.get("subject", "").find("started") < 0 for _, _, b in tc.received)


@pytest_twisted.ensureDeferred
async def test_start_notifications_skip_ping_and_rules_filter_tasks(tmp_path, peers):
    tc, good, _ = peers
    s = settings(tc, [{"tasks": ["*"], "webhooks": [good.url]}])
    notifier = notifier_from_settings(s, reactor, secrets)
    q = make_queue(tmp_path)
    notifier.start(q)
    ping, _ = run(q.submit("ping", machine(1)))
    reimage, _ = run(q.submit("reimage", machine(2)))
    await q.wait(ping.id)
    assert (await q.wait(reimage.id)).state is State.failed
    await notifier.stop()
    seen = sorted((json.loads(raw)["job"]["task_name"], h["x-roller-event"], json.loads(raw)["job"]["state"])
                  for h, raw in good.received)
    assert seen == [("ping", "job.finished", "succeeded"), ("reimage", "job.finished", "failed"),
                    ("reimage", "job.started", "running")]


@pytest_twisted.ensureDeferred
async def test_bad_credentials_are_logged_never_shown_and_never_fail_the_job(tmp_path, peers, logged):
    tc, _, _ = peers
    s = settings(tc, [{"tasks": ["reboot"], "on": ["succeeded"], "email": ["a@example.com"]}])
    wrong = "wrong-token-XYZXYZXYZXYZ"
    notifier = notifier_from_settings(s, reactor, lambda: secrets(wrong))
    q = make_queue(tmp_path)
    notifier.start(q)
    job, _ = run(q.submit("reboot", machine(1)))
    assert (await q.wait(job.id)).state is State.succeeded
    await notifier.stop()
    assert tc.received == [] and tc.refused  # the fake checked the Hawk MAC and refused it
    assert notifier.sent == [("email", "a@example.com", "HTTP 401")]
    assert not any(wrong in line or TOKEN in line for line in logged)


@pytest_twisted.ensureDeferred
async def test_unreachable_endpoint_is_logged(tmp_path, logged):
    notifier = Notifier(reactor, parse_rules([{"webhooks": ["http://127.0.0.1:1/hook"]}]), timeout=5)
    q = make_queue(tmp_path)
    notifier.start(q)
    job, _ = run(q.submit("reboot", machine(1)))
    assert (await q.wait(job.id)).state is State.succeeded
    await notifier.stop()
    outcomes = [o for kind, _, o in notifier.sent]
    assert len(outcomes) == 2 and all(o.startswith("failed: ") for o in outcomes)
    assert any("Notification by webhook to http://127.0.0.1:1/hook failed" in line for line in logged)


def test_rules_are_validated():
    assert parse_rules([]) == ()
    with pytest.raises(ValueError, match="notifies nobody"):
        parse_rules([{"tasks": ["reboot"]}])
    with pytest.raises(ValueError, match="unknown key"):
        parse_rules([{"email": ["a@b"], "emails": ["x"]}])
    with pytest.raises(ValueError, match="unknown event"):
        parse_rules([{"email": ["a@b"], "on": ["finished"]}])
    with pytest.raises(ValueError, match="not an http"):
        parse_rules([{"webhooks": ["ftp://x"]}])
    with pytest.raises(ConfigError, match="notify.rules"):
        load_settings(None, {"ROLLER_NOTIFY_RULES": "not json"}, {})
    assert notifier_from_settings(load_settings(None, {}, {}), reactor, lambda: None) is None


def test_rules_from_toml(tmp_path):
    config = tmp_path / "roller.toml"
    config.write_text('[[notify.rules]]\ntasks = ["reboot"]\non = ["failed"]\nemail = ["relops@example.com"]\n'
                      '[[notify.rules]]\nwebhooks = ["https://hooks.example.com/x"]\n')
    rules = load_settings(str(config), {}, {}).notify_rules
    assert [r.email for r in rules] == [("relops@example.com",), ()]
    assert rules[0].matches("reboot", "failed") and not rules[0].matches("reboot", "succeeded")
    assert rules[1].matches("anything", "started")




@pytest_twisted.ensureDeferred
async def test_health_transitions_notify_the_rules_that_ask_for_them(peers):
    _, good, _ = peers
    rules = parse_rules([{"on": ["health.down", "health.failing"], "webhooks": [good.url]},
                         {"on": ["succeeded"], "webhooks": [good.url]}], False)
    notifier = Notifier(reactor, rules, webhook_secret=lambda: SECRET, dashboard_url="https://roller.example",
                        timeout=5)
    try:
        notifier.health_transition("mdc1", "w1", "healthy", "down", "2 liveness checks in a row failed", ["down"])
        notifier.health_transition("mdc1", "w2", "healthy", "degraded", "4 of 10 runs", ["failing"])
        notifier.health_transition("mdc1", "w3", "down", "healthy", "1/1 replies", [])  # nobody asked
        await notifier.stop()
        # both are sent at once: they may arrive in either order
        received = sorted(good.received, key=lambda r: json.loads(r[1])["machine"]["worker_id"])
        bodies = [json.loads(body) for _, body in received]
        assert [(b["event"], b["machine"]["worker_id"], b["new"]) for b in bodies] == [
            ("health.down", "w1", "down"), ("health.degraded", "w2", "degraded")]
        assert bodies[1]["findings"] == ["failing"]
        for headers, body in received:
            assert headers["x-roller-event"] == json.loads(body)["event"]
            assert headers["x-roller-signature-256"] == webhook_signature(SECRET, body)
    finally:
        await notifier.stop()
