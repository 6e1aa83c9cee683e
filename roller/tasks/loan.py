"""
C{loan} and C{return_loan}: lend a machine to a person, and take it back.

C{loan} (params C{borrower}, an email address; C{reason}, else the job's
reason; C{expires}, an ISO time or a duration such as C{"7d"}, C{"12h"},
C{"2w"}, at most C{loans.max_duration} ahead) quarantines the worker in
Taskcluster until the expiry (L{roller.quarantine}) and then records the
loan.  A machine already on loan is refused; when Taskcluster refuses or
cannot be reached, the job fails and no loan is recorded.

C{return_loan} lifts the quarantine (C{quarantineUntil} = now, as
Taskcluster's own UI does), closes the loan and then reimages the machine
in the same job, through the C{reimage} task's code: the job's log and
result tell the whole story, and the machine stays busy in the queue
(one job per machine) so nothing else runs on it between the two steps.

Taskcluster credentials: the C{password} credential C{loans.credential}
(username = client id, password = access token), which needs the scope
C{queue:quarantine-worker:<provisionerId>/<workerType>/<workerGroup>/<workerId>}.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from roller.jobs import iso
from roller.quarantine import QuarantineError, TaskclusterQueue, worker_pool
from roller.secrets import UnknownCredential
from roller.store import Store
from roller.store.loans import AlreadyOnLoan, Loan
from roller.tasks import reimage
from roller.tasks.base import Param, TaskContext, TaskFailed, TaskSpec, driver_errors

_EMAIL = re.compile(r"^[^@\s<>\"']{1,64}@[-A-Za-z0-9.]{1,253}\.[A-Za-z]{2,63}$")
_DURATION = re.compile(r"^(\d{1,6})\s*([mhdw])$")
_UNIT = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _borrower(value: str) -> str:
    value = value.strip()
    if not _EMAIL.fullmatch(value):
        raise ValueError("must be an email address")
    return value


def _expires(value: str) -> str:
    value = value.strip()
    if _DURATION.fullmatch(value):
        return value
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("must be an ISO 8601 time (2030-01-31T18:00:00Z) or a duration such as 7d, 12h, 2w, "
                         "90m") from None
    return value


def expiry(value: str, now: float) -> float:
    """The time C{value} (a checked C{expires} parameter) means at C{now}."""
    m = _DURATION.fullmatch(value)
    if m:
        return now + int(m.group(1)) * _UNIT[m.group(2)]
    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _queue(ctx: TaskContext) -> tuple[TaskclusterQueue, tuple[str, str]]:
    """The Taskcluster queue client and the machine's (provisionerId, workerType)."""
    s = ctx.config
    with driver_errors(QuarantineError):
        pool = worker_pool(ctx.machine, s.loans_provisioner_id)
    root = s.loans_root_url or s.auth_root_url
    if not root:
        raise TaskFailed("no Taskcluster deployment to quarantine the worker in: set loans.root_url "
                         "(or auth.root_url)")
    try:
        if ctx.secrets is None:
            raise UnknownCredential(s.loans_credential)
        cred = ctx.secrets.get(s.loans_credential)
    except KeyError:  # UnknownCredential included
        raise TaskFailed(f"the Taskcluster credential {s.loans_credential!r} (loans.credential) is not in "
                         "the secrets file") from None
    if not cred.username or not cred.password:
        raise TaskFailed(f"the credential {s.loans_credential!r} must be of type password "
                         "(username = client id, password = access token)")
    return TaskclusterQueue(ctx.reactor, root, cred.username, cred.password, timeout=s.loans_timeout), pool


def _store(ctx: TaskContext) -> Store:
    if ctx.store is None:
        raise TaskFailed("loans need roller's store, which this job was not given")
    return ctx.store


def _machine(ctx: TaskContext) -> str:
    return f"{ctx.machine.worker_id} ({ctx.machine.worker_group})"


async def run_loan(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    store, m, s = _store(ctx), ctx.machine, ctx.config
    now = ctx.reactor.seconds()
    reason = (params.get("reason") or ctx.job.reason or "").strip()
    if not reason:
        raise TaskFailed("a loan needs a reason (params.reason or the job's reason)")
    until = expiry(params["expires"], now)
    if until <= now:
        raise TaskFailed(f"the loan would end in the past ({iso(until)}); give a later expires")
    if until - now > s.loans_max_duration:
        raise TaskFailed(f"a loan may last at most {s.loans_max_duration / 86400:g} days "
                         f"(loans.max_duration); {params['expires']} ends {iso(until)}")
    current = await store.loans.active(m.worker_group, m.worker_id)
    if current is not None:
        raise TaskFailed(f"{_machine(ctx)} is already on loan to {current.borrower} until "
                         f"{iso(current.expires_at)}; return it first (return_loan)")
    queue, (provisioner, worker_type) = _queue(ctx)
    info = f"on loan to {params['borrower']}: {reason}"[:1000]
    ctx.log(f"quarantining {provisioner}/{worker_type}/{m.worker_group}/{m.worker_id} until {iso(until)}",
            step="quarantine")
    with driver_errors(QuarantineError, prefix="not loaned: "):
        await queue.quarantine(provisioner, worker_type, m.worker_group, m.worker_id, until, info)
    try:
        loan = await store.loans.insert(Loan(
            worker_group=m.worker_group, worker_id=m.worker_id, borrower=params["borrower"], reason=reason,
            started_at=now, expires_at=until, job_id=ctx.job.id))
    except AlreadyOnLoan as e:
        raise TaskFailed(f"{e} (a loan recorded at the same time)") from None
    ctx.log(f"loan {loan.id} recorded", step="recorded", loan=loan.id)
    return f"loaned to {loan.borrower} until {iso(until)}; quarantined in Taskcluster"


ReimageRun = Callable[[TaskContext, Mapping[str, Any]], Awaitable[str]]


async def return_loan(ctx: TaskContext, params: Mapping[str, Any], reimage_run: ReimageRun = reimage.run) -> str:
    store, m = _store(ctx), ctx.machine
    loan = await store.loans.active(m.worker_group, m.worker_id)
    if loan is None:
        raise TaskFailed(f"{_machine(ctx)} is not on loan; nothing to return (use reimage to reimage it)")
    queue, (provisioner, worker_type) = _queue(ctx)
    now = ctx.reactor.seconds()
    ctx.log(f"lifting the quarantine of {provisioner}/{worker_type}/{m.worker_group}/{m.worker_id}",
            step="unquarantine")
    with driver_errors(QuarantineError, prefix="not returned (still on loan): "):
        await queue.quarantine(provisioner, worker_type, m.worker_group, m.worker_id, now,
                               f"returned by {loan.borrower}")
    assert loan.id is not None  # read from the store, so it has its row id
    await store.loans.close(loan.id, ctx.reactor.seconds(), ctx.job.id)
    ctx.log(f"loan {loan.id} of {loan.borrower} closed; reimaging", step="returned", loan=loan.id)
    try:
        done = await reimage_run(ctx, {"efi": params.get("efi", False)})
    except TaskFailed as e:
        raise TaskFailed(f"returned by {loan.borrower} and the quarantine lifted, but the reimage failed: {e}; "
                         "run reimage again") from None
    return f"returned by {loan.borrower}; quarantine lifted; reimaged: {done}"


async def run_return(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    return await return_loan(ctx, params)


LOAN = TaskSpec(
    name="loan",
    description="Lend the machine: record the borrower, reason and expiry, and quarantine the worker in "
                "Taskcluster until then. Refused when it is already on loan.",
    run=run_loan,
    params=(
        Param("borrower", str, None, "email address of the borrower", check=_borrower, required=True),
        Param("expires", str, "7d", "end of the loan: an ISO 8601 time or a duration (90m, 12h, 7d, 2w)",
              check=_expires),
        Param("reason", str, None, "why (defaults to the job's reason)"),
    ),
    timeout=120.0,
)

RETURN = TaskSpec(
    name="return_loan",
    description="Take a loaned machine back: lift its Taskcluster quarantine, close the loan and reimage it "
                "(one-time PXE boot and power cycle through its BMC).",
    run=run_return,
    params=(Param("efi", bool, False, "UEFI PXE boot for the reimage"),),
    timeout=reimage.TASK.timeout + 300.0,
    destructive=True,
    endpoints=reimage.endpoints,
)

TASKS = (LOAN, RETURN)
