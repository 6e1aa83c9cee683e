"""
loan and return_loan against the Klein fake of Taskcluster's queue
(roller.testing.tc_queue) on 127.0.0.1, the loans table, and
GET /api/v1/loans.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from attrs import evolve
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from roller.auth import Principal
from roller.config import load_settings
from roller.errors import ValidationError
from roller.inventory import Machine
from roller.jobs import Job, iso
from roller.queue import JobQueue
from roller.secrets import Credential, Secrets
from roller.store.loans import Loan
from roller.tasks import TaskContext, TaskFailed, builtin_tasks
from roller.tasks import loan as loan_task
from roller.testing.syncdb import result_of, sync_store
from roller.testing.tc_queue import FakeTaskclusterQueue
from roller.web.api import Api

CLIENT, TOKEN = "project/releng/roller", "tc-access-token-0123456789"
NOW = 1_900_000_000.0
MACHINE = {"worker_id": "t-linux64-ms-001", "worker_group": "mdc1", "fqdn": "t-linux64-ms-001.test",
           "ip": "10.49.40.1", "pool": "gecko-t-linux"}


@pytest.fixture
def fake():
    q = FakeTaskclusterQueue(clients={CLIENT: TOKEN})
    port = q.listen(reactor)
    yield q
    port.stopListening()


@pytest.fixture(params=["memory", "postgresql"])
def store(request):
    """The loan tests that use the store directly run on SQLite and on PostgreSQL."""
    path = ":memory:" if request.param == "memory" else request.getfixturevalue("postgres_server").create_database()
    s, _ = sync_store(path)
    yield s
    result_of(s.close())


class At:
    """The real reactor (for HTTP), with C{seconds()} fixed at C{now}."""

    def __init__(self, now: float):
        self.now = now

    def seconds(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


def context(fake: FakeTaskclusterQueue, store: Any, *, task: str = "loan", now: float = NOW, token: str = TOKEN,
            machine: dict | None = None, job_id: str = "job-1", reason: str = "") -> tuple[TaskContext, list]:
    s = evolve(load_settings(None, {}, {}), loans_root_url=fake.url, loans_timeout=5.0)
    secrets = Secrets({"taskcluster-queue": Credential(name="taskcluster-queue", kind="password", username=CLIENT,
                                                       password=token)})
    m = Machine.from_json(machine or MACHINE)
    job = Job(id=job_id, task_name=task, worker_id=m.worker_id, worker_group=m.worker_group, created_at=now,
              requester="client/relops", reason=reason)
    events: list = []
    ctx = TaskContext(job=job, machine=m, reactor=At(now), log=lambda msg, **d: events.append((msg, d)),
                      settings=s, secrets=secrets, store=store)
    return ctx, events


def run_task(ctx: TaskContext, raw: dict) -> Deferred:
    spec = builtin_tasks().get(ctx.job.task_name)
    return Deferred.fromCoroutine(spec.run(ctx, spec.parse_params(raw)))


LOAN = {"borrower": "dev@example.com", "reason": "debug bug 1234", "expires": "7d"}


@pytest_twisted.ensureDeferred
async def test_loan_quarantines_until_expiry_and_records_the_loan(fake, store):
    ctx, events = context(fake, store)
    result = await run_task(ctx, LOAN)
    until = NOW + 7 * 86400
    assert "dev@example.com" in result and iso(until) in result
    assert fake.calls == [{
        "provisioner_id": "releng-hardware", "worker_type": "gecko-t-linux", "worker_group": "mdc1",
        "worker_id": "t-linux64-ms-001", "client_id": CLIENT, "quarantine_until": iso(until),
        "quarantine_info": "on loan to dev@example.com: debug bug 1234"}]
    assert not fake.refused
    loan = result_of(store.loans.active("mdc1", "t-linux64-ms-001"))
    assert (loan.borrower, loan.reason, loan.expires_at, loan.job_id) == ("dev@example.com", "debug bug 1234",
                                                                         until, "job-1")
    assert [x.id for x in result_of(store.loans.list(active=True))] == [loan.id]
    # overdue once the clock passes the expiry, not before
    assert result_of(store.loans.list(overdue_at=until - 1)) == []
    assert [x.id for x in result_of(store.loans.list(overdue_at=until + 1))] == [loan.id]
    assert not loan.overdue(until - 1) and loan.overdue(until + 1)
    assert [d.get("step") for _, d in events] == ["quarantine", "recorded"]


@pytest_twisted.ensureDeferred
async def test_iso_expiry_and_pool_with_provisioner(fake, store):
    ctx, _ = context(fake, store, machine={**MACHINE, "pool": "proj-relops/mac-mini"}, reason="job reason")
    await run_task(ctx, {"borrower": "dev@example.com", "expires": "2030-04-01T12:00:00Z"})
    call = fake.calls[0]
    assert (call["provisioner_id"], call["worker_type"]) == ("proj-relops", "mac-mini")
    assert call["quarantine_until"] == "2030-04-01T12:00:00.000Z"
    assert call["quarantine_info"].endswith("job reason")


@pytest_twisted.ensureDeferred
async def test_second_loan_is_refused(fake, store):
    await run_task(context(fake, store)[0], LOAN)
    ctx, _ = context(fake, store, job_id="job-2")
    with pytest.raises(TaskFailed, match="already on loan to dev@example.com until"):
        await run_task(ctx, {**LOAN, "borrower": "other@example.com"})
    assert len(fake.calls) == 1
    assert len(result_of(store.loans.list())) == 1


@pytest_twisted.ensureDeferred
async def test_queue_down_fails_and_records_nothing(fake, store):
    fake.down = True
    with pytest.raises(TaskFailed, match="not loaned: .*HTTP 503 ServiceUnavailable"):
        await run_task(context(fake, store)[0], LOAN)
    assert result_of(store.loans.list()) == []


@pytest_twisted.ensureDeferred
async def test_queue_unreachable_fails_and_records_nothing(store):
    closed = FakeTaskclusterQueue(clients={CLIENT: TOKEN})
    await closed.listen(reactor).stopListening()  # its URL now refuses connections
    with pytest.raises(TaskFailed, match="not loaned: the Taskcluster queue at .* is unreachable"):
        await run_task(context(closed, store)[0], LOAN)
    assert result_of(store.loans.list()) == []


@pytest_twisted.ensureDeferred
async def test_bad_credentials_are_refused_without_showing_the_token(fake, store):
    with pytest.raises(TaskFailed) as e:
        await run_task(context(fake, store, token="wrong-token-zzz")[0], LOAN)
    assert "HTTP 401" in str(e.value) and "wrong-token-zzz" not in str(e.value)
    assert fake.refused and not fake.calls
    assert result_of(store.loans.list()) == []


@pytest_twisted.ensureDeferred
async def test_return_lifts_the_quarantine_and_reimages(fake, store):
    await run_task(context(fake, store)[0], LOAN)
    later = NOW + 3600
    ctx, events = context(fake, store, task="return_loan", now=later, job_id="job-2")
    reimaged: list = []

    async def reimage(ctx: TaskContext, params: Any) -> str:
        # the quarantine is already lifted and the loan closed when the reimage starts
        reimaged.append((dict(params), fake.calls[-1]["quarantine_until"],
                         result_of(store.loans.active("mdc1", "t-linux64-ms-001"))))
        return "PXE boot set and power cycled"

    result = await Deferred.fromCoroutine(loan_task.return_loan(ctx, {"efi": False}, reimage_run=reimage))
    assert result.startswith("returned by dev@example.com; quarantine lifted; reimaged: PXE boot")
    assert len(fake.calls) == 2 and fake.calls[1]["quarantine_until"] == iso(later)
    assert reimaged == [({"efi": False}, iso(later), None)]
    [loan] = result_of(store.loans.list(active=False))
    assert (loan.returned_at, loan.return_job_id) == (later, "job-2")
    # the machine may be loaned again
    await run_task(context(fake, store, now=later, job_id="job-3")[0], LOAN)
    assert len(result_of(store.loans.list(active=True))) == 1


@pytest_twisted.ensureDeferred
async def test_return_runs_the_reimage_task_code(fake, store):
    """Through the registered task: the real reimage path, which needs a BMC this machine lacks."""
    await run_task(context(fake, store)[0], LOAN)
    ctx, _ = context(fake, store, task="return_loan", job_id="job-2")
    with pytest.raises(TaskFailed, match="quarantine lifted, but the reimage failed: cannot reimage "
                                         "t-linux64-ms-001: it has neither ipmi nor redfish"):
        await run_task(ctx, {})
    assert result_of(store.loans.active("mdc1", "t-linux64-ms-001")) is None
    assert fake.calls[-1]["quarantine_until"] == iso(NOW)


@pytest_twisted.ensureDeferred
async def test_return_of_a_machine_not_on_loan_is_refused(fake, store):
    with pytest.raises(TaskFailed, match="is not on loan"):
        await run_task(context(fake, store, task="return_loan")[0], {})
    assert fake.calls == []


@pytest_twisted.ensureDeferred
async def test_return_keeps_the_loan_when_the_queue_is_down(fake, store):
    await run_task(context(fake, store)[0], LOAN)
    fake.down = True
    with pytest.raises(TaskFailed, match="not returned \\(still on loan\\)"):
        await run_task(context(fake, store, task="return_loan", job_id="job-2")[0], {})
    assert result_of(store.loans.active("mdc1", "t-linux64-ms-001")) is not None


def test_params_are_checked_at_submission():
    spec = builtin_tasks().get("loan")
    with pytest.raises(ValidationError, match="is required"):
        spec.parse_params({"reason": "x"})
    with pytest.raises(ValidationError, match="email"):
        spec.parse_params({"borrower": "not an address"})
    with pytest.raises(ValidationError, match="duration"):
        spec.parse_params({"borrower": "a@example.com", "expires": "next week"})
    assert spec.parse_params({"borrower": "a@example.com"})["expires"] == "7d"
    assert loan_task.expiry("12h", 100.0) == 100.0 + 12 * 3600
    assert loan_task.expiry("2030-01-01T00:00:00", 0) == loan_task.expiry("2030-01-01T00:00:00Z", 0)


@pytest_twisted.ensureDeferred
async def test_expiry_is_bounded_and_in_the_future(fake, store):
    with pytest.raises(TaskFailed, match="at most 90 days"):
        await run_task(context(fake, store)[0], {**LOAN, "expires": "91d"})
    with pytest.raises(TaskFailed, match="in the past"):
        await run_task(context(fake, store)[0], {**LOAN, "expires": "2001-01-01T00:00:00Z"})
    with pytest.raises(TaskFailed, match="needs a reason"):
        await run_task(context(fake, store)[0], {"borrower": "a@example.com"})
    assert fake.calls == []


@pytest_twisted.ensureDeferred
async def test_loan_job_through_the_queue(fake):
    """The queue gives the task the store: a submitted loan job ends with the loan recorded."""
    store, _ = sync_store()
    ctx, _ = context(fake, store)
    queue = JobQueue(store, builtin_tasks(), reactor, settings=ctx.settings, secrets=ctx.secrets)
    await queue.start()
    machine = Machine.from_json(MACHINE)
    job, _ = await queue.submit("loan", machine, params=LOAN, requester="client/relops")
    done = await queue.wait(job.id)
    assert done.state.value == "succeeded", done.error
    assert result_of(store.loans.active("mdc1", "t-linux64-ms-001")).borrower == "dev@example.com"
    await queue.stop()


# -- GET /api/v1/loans


class Scoped:
    def __init__(self, scopes: tuple[str, ...]):
        self.principal = Principal(id="client/reader", scopes=scopes)

    def authenticate(self, request: Any, target: Any = None) -> Any:
        from twisted.internet.defer import succeed
        return succeed(self.principal)


def api_get(store: Any, clock: Clock, path: str, scopes: tuple[str, ...] = ("project:releng:roller:loans:read",)):
    queue = JobQueue(store, builtin_tasks(), clock)
    api = Api(store, queue, builtin_tasks(), Scoped(scopes), allowed_tasks=(), clock=clock)
    client = StubTreq(api.app.resource())
    d = client.get("http://roller.test" + path)
    client.flush()
    response = result_of(d)
    body = client.content(response)
    client.flush()
    return response.code, json.loads(result_of(body))


def test_api_lists_active_and_overdue_loans():
    store, _ = sync_store()
    clock = Clock()
    clock.advance(NOW)
    for wid, expires in (("a", NOW + 100), ("b", NOW + 1000)):
        result_of(store.loans.insert(Loan(worker_group="g", worker_id=wid, borrower=f"{wid}@example.com",
                                          reason="r", started_at=NOW, expires_at=expires)))
    old = result_of(store.loans.insert(Loan(worker_group="g", worker_id="c", borrower="c@example.com", reason="r",
                                            started_at=NOW - 10, expires_at=NOW - 5)))
    result_of(store.loans.close(old.id, NOW - 1, "job-x"))

    code, body = api_get(store, clock, "/api/v1/loans?active=true")
    assert code == 200
    assert [x["worker_id"] for x in body["loans"]] == ["b", "a"]
    assert [x["overdue"] for x in body["loans"]] == [False, False]
    assert api_get(store, clock, "/api/v1/loans?overdue=true")[1]["loans"] == []

    clock.advance(500)  # a is now past its expiry
    code, body = api_get(store, clock, "/api/v1/loans?overdue=true")
    assert [(x["worker_id"], x["overdue"], x["expires_at"]) for x in body["loans"]] == [("a", True, iso(NOW + 100))]
    code, body = api_get(store, clock, "/api/v1/loans?active=false")
    assert [(x["worker_id"], x["returned_at"], x["return_job_id"]) for x in body["loans"]] == [
        ("c", iso(NOW - 1), "job-x")]
    assert len(api_get(store, clock, "/api/v1/loans")[1]["loans"]) == 3

    code, body = api_get(store, clock, "/api/v1/loans?active=maybe")
    assert code == 400 and body["error"] == "invalid_query"
    code, body = api_get(store, clock, "/api/v1/loans", scopes=("project:releng:roller:jobs:read",))
    assert code == 403 and set(body) == {"error", "message"}
