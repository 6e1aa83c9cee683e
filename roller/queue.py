"""
The in-process job queue: priority then FIFO, one job per machine, caps.

Jobs are persisted before L{JobQueue.submit} returns, so an accepted job
is never lost.  The scheduler runs on the reactor: a heap ordered by
(priority, arrival), a set of busy machines, and per-endpoint counters and
last-command times for shared endpoints (a PDU, a BMC) that weak firmware
needs protected.  A job's timeout is a Deferred cancellation; cancelling a
running job cancels its Deferred, which kills its process or closes its
connection.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Any, Callable

from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from roller.errors import Conflict, NotFound, UnavailableError
from roller.inventory import Machine
from roller.jobs import Job, JobEvent, State, new_job_id
from roller.store import Store
from roller.tasks import TaskContext, TaskFailed, TaskRegistry, TaskSpec

log = Logger()

Listener = Callable[[Job, JobEvent], None]


@frozen
class QueueLimits:
    max_running: int = 200
    endpoint_max_running: int = 1
    endpoint_min_interval: float = 0.0
    timeouts: dict[str, float] = field(factory=dict)
    # Jobs started per reactor turn: a burst of a thousand starts in one turn
    # would keep the API waiting; the rest start on the next turns.
    starts_per_turn: int = 50


class JobQueue:
    """
    @param store: where jobs and their events are persisted.
    @param tasks: the registry of runnable tasks.
    @param reactor: the clock and the reactor tasks use; injected.
    """

    def __init__(
        self,
        store: Store,
        tasks: TaskRegistry,
        reactor: Any,
        *,
        limits: QueueLimits = QueueLimits(),
        settings: Any = None,
        secrets: Any = None,
        drivers: Any = None,
    ):
        self._store = store
        self._tasks = tasks
        self._reactor = reactor
        self._limits = limits
        self._settings = settings
        self._secrets = secrets
        self._drivers = drivers
        self._accepting = True
        self._jobs: dict[str, Job] = {}  # queued and running
        self._machines: dict[str, Machine] = {}  # job id -> machine snapshot
        self._heap: list[tuple[int, int, str]] = []
        self._active_key: dict[tuple[str, str, str], str] = {}  # (group, worker, task) -> job id
        self._submitting: dict[tuple[str, str, str], list[Deferred]] = {}
        self._busy: set[tuple[str, str]] = set()
        self._running: dict[str, Deferred] = {}
        self._endpoints_of: dict[str, tuple[str, ...]] = {}
        self._endpoint_running: Counter[str] = Counter()
        self._endpoint_last: dict[str, float] = {}
        self._wakeup: Any = None
        self._next_turn: Any = None
        self._pumping = False
        self._pump_again = False
        self._cancel_reason: dict[str, tuple[State, str]] = {}
        self._waiters: dict[str, list[Deferred]] = {}
        self._listeners: list[Listener] = []
        self._arrival = 0

    def set_secrets(self, secrets: Any) -> None:
        """Use these secrets for jobs started from now on (SIGHUP reload)."""
        self._secrets = secrets

    # -- observation

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call C{listener(job, event)} for every job event; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def active(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def queued(self) -> list[Job]:
        return sorted(
            (j for j in self._jobs.values() if j.state is State.queued),
            key=lambda j: (-j.priority, j.seq or 0),
        )

    def running(self) -> list[Job]:
        return [self._jobs[i] for i in self._running]

    def endpoint_load(self) -> dict[str, int]:
        """Jobs running now per shared endpoint (C{"pdu:host"}, C{"bmc:host"})."""
        return dict(self._endpoint_running)

    @property
    def depth(self) -> int:
        return len(self._jobs) - len(self._running)

    def wait(self, job_id: str) -> "Deferred[Job]":
        """Fires with the job once it has reached a final state and been persisted."""
        if job_id not in self._jobs:
            return self._store.jobs.get(job_id)
        d: Deferred = Deferred()
        self._waiters.setdefault(job_id, []).append(d)
        return d

    # -- lifecycle

    async def start(self) -> tuple[int, int]:
        """Recover after a restart: (jobs interrupted, jobs queued again)."""
        now = self._reactor.seconds()
        interrupted, queued = await self._store.jobs.recover(now)
        for job in interrupted:
            log.warn("Job {job_id} ({task} on {worker}) was running when roller stopped: interrupted",
                     job_id=job.id, task=job.task_name, worker=job.worker_id)
        requeued = 0
        for job in queued:
            machine = await self._store.machines.get(job.worker_group, job.worker_id)
            spec = self._tasks.get(job.task_name)
            if machine is None or spec is None:
                why = "the machine is no longer in the inventory" if machine is None else \
                    f"task {job.task_name} no longer exists"
                failed = job.transition(State.running, now).transition(State.failed, now, error=why)
                await self._store.jobs.update(failed, JobEvent(job.id, now, "state", f"failed: {why}",
                                                               {"state": "failed"}))
                continue
            self._enqueue(job, machine)
            requeued += 1
        if queued:
            log.info("Queued {count} job(s) again after restart", count=requeued)
        self._pump()
        return len(interrupted), requeued

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        """
        Refuse new jobs (L{UnavailableError} C{shutting_down}) and start no
        more; queued jobs stay queued in the store and run after a restart.
        """
        self._accepting = False
        for call in (self._wakeup, self._next_turn):
            if call is not None and call.active():
                call.cancel()

    async def drain(self, grace: float) -> int:
        """
        Stop accepting, let the running jobs finish for up to C{grace}
        seconds on the injected clock, then interrupt those still running.
        The number interrupted.
        """
        self.stop_accepting()
        running = list(self._running)
        if running and grace > 0:
            log.info("Shutting down: waiting up to {grace} s for {count} running job(s)",
                     grace=grace, count=len(running))
            done: Deferred = Deferred()

            def end(_: Any = None) -> None:
                if not done.called:
                    done.callback(None)

            timer = self._reactor.callLater(grace, end)
            gatherResults([self.wait(i) for i in running], consumeErrors=True).addBoth(end)
            await done
            if timer.active():
                timer.cancel()
        left = len(self._running)
        if left:
            log.warn("Shutting down: interrupting {count} job(s) still running after {grace} s",
                     count=left, grace=grace)
        await self.stop(f"roller was shutting down and the job was still running after the {grace:g} s "
                        "grace period (server.shutdown_grace)")
        return left

    async def stop(self, reason: str = "roller is shutting down") -> None:
        """Stop accepting jobs; interrupt the running ones and persist that."""
        self.stop_accepting()
        running = list(self._running)
        waits = [self.wait(i) for i in running]
        for job_id in running:
            self._cancel_reason[job_id] = (State.interrupted, reason)
            self._running[job_id].cancel()
        for d in waits:
            await d

    # -- submitting and cancelling

    async def submit(
        self,
        task_name: str,
        machine: Machine,
        *,
        params: dict[str, Any] | None = None,
        requester: str = "anonymous",
        origin_ip: str | None = None,
        reason: str = "",
        priority: int = 50,
        audit: Callable[[Job], Any] | None = None,
    ) -> tuple[Job, bool]:
        """
        Queue C{task_name} on C{machine}; (job, created).

        If the machine already has this task queued or running, that job is
        returned with C{created} False instead of a duplicate.  The job is
        committed to the store before this returns, with the audit entry
        C{audit(job)} makes, if given, in the same transaction.
        """
        if not self._accepting:
            raise UnavailableError("roller is shutting down and not accepting jobs", code="shutting_down")
        spec = self._tasks.get(task_name)
        if spec is None:
            raise NotFound(f"unknown task {task_name!r}", code="unknown_task")
        clean = spec.parse_params(params)  # bad parameters are refused even for a duplicate
        key = (machine.worker_group, machine.worker_id, task_name)
        existing = self._active_key.get(key)
        if existing is not None:
            return self._jobs[existing], False
        if key in self._submitting:
            d: Deferred = Deferred()
            self._submitting[key].append(d)
            return await d, False
        now = self._reactor.seconds()
        job = Job(
            id=new_job_id(), task_name=task_name, worker_id=machine.worker_id,
            worker_group=machine.worker_group, created_at=now, params=clean,
            requester=requester, origin_ip=origin_ip, reason=reason, priority=priority,
        )
        event = JobEvent(job.id, now, "state", f"queued by {requester}", {"state": "queued"})
        self._submitting[key] = []
        try:
            job = await self._store.jobs.insert(job, event, audit(job) if audit else None)
        except BaseException:
            for d in self._submitting.pop(key):
                d.errback()
            raise
        waiters = self._submitting.pop(key)
        self._enqueue(job, machine)
        self._emit(job, event)
        for d in waiters:
            d.callback(job)
        self._pump()
        return job, True

    async def cancel(self, job_id: str, by: str = "anonymous") -> Job:
        """
        Cancel a job: a queued one is removed, a running one's Deferred is
        cancelled.  The final job, once persisted.  L{Conflict} if it has
        already finished, L{NotFound} if there is no such job.
        """
        job = self._jobs.get(job_id)
        if job is None:
            stored = await self._store.jobs.get(job_id)
            if stored is None:
                raise NotFound(f"no job {job_id}", code="unknown_job")
            raise Conflict(f"job {job_id} already ended: {stored.state.value}", code="job_finished")
        message = f"cancelled by {by}"
        if job.state is State.queued:
            now = self._reactor.seconds()
            final = job.transition(State.cancelled, now, error=message)
            self._forget(final)
            event = JobEvent(job_id, now, "state", message, {"state": "cancelled"})
            final = await self._store.jobs.update(final, event)
            self._emit(final, event)
            self._notify(final)
            self._pump()
            return final
        done = self.wait(job_id)
        self._cancel_reason[job_id] = (State.cancelled, message)
        self._running[job_id].cancel()
        return await done

    # -- scheduling

    def _enqueue(self, job: Job, machine: Machine) -> None:
        self._jobs[job.id] = job
        self._machines[job.id] = machine
        self._active_key[(job.worker_group, job.worker_id, job.task_name)] = job.id
        self._arrival += 1
        heapq.heappush(self._heap, (-job.priority, job.seq or self._arrival, job.id))

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        self._machines.pop(job.id, None)
        key = (job.worker_group, job.worker_id, job.task_name)
        if self._active_key.get(key) == job.id:
            del self._active_key[key]

    def _endpoint_wait(self, endpoints: tuple[str, ...], now: float) -> float | None:
        """None if every endpoint is free now; else seconds to wait (inf: until one ends)."""
        wait = 0.0
        for e in endpoints:
            if self._endpoint_running[e] >= self._limits.endpoint_max_running:
                return float("inf")
            last = self._endpoint_last.get(e)
            if last is not None:
                wait = max(wait, last + self._limits.endpoint_min_interval - now)
        return wait if wait > 0 else None

    def _pump(self) -> None:
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        if not self._accepting:
            return
        now = self._reactor.seconds()
        blocked: list[tuple[int, int, str]] = []
        soonest = float("inf")
        started = 0
        while self._heap and len(self._running) < self._limits.max_running:
            if started >= self._limits.starts_per_turn:
                if self._next_turn is None or not self._next_turn.active():
                    self._next_turn = self._reactor.callLater(0, self._pump)
                break
            entry = heapq.heappop(self._heap)
            job = self._jobs.get(entry[2])
            if job is None or job.state is not State.queued:
                continue
            if job.machine_key in self._busy:
                blocked.append(entry)
                continue
            machine = self._machines[job.id]
            spec = self._tasks.get(job.task_name)
            endpoints = spec.endpoints(machine) if spec else ()
            wait = self._endpoint_wait(endpoints, now)
            if wait is not None:
                soonest = min(soonest, wait)
                blocked.append(entry)
                continue
            self._start(job, spec, machine, endpoints, now)
            started += 1
        for entry in blocked:
            heapq.heappush(self._heap, entry)
        if soonest != float("inf") and (self._wakeup is None or not self._wakeup.active()):
            self._wakeup = self._reactor.callLater(soonest, self._pump)

    def _start(self, job: Job, spec: TaskSpec, machine: Machine, endpoints: tuple[str, ...], now: float) -> None:
        job = job.transition(State.running, now)
        self._jobs[job.id] = job
        self._busy.add(job.machine_key)
        self._endpoints_of[job.id] = endpoints
        for e in endpoints:
            self._endpoint_running[e] += 1
            self._endpoint_last[e] = now
        event = JobEvent(job.id, now, "state", "running", {"state": "running"})
        self._emit(job, event)
        persisted = self._store.jobs.update(job, event)
        run = Deferred.fromCoroutine(self._run(job, spec, machine, persisted))
        self._running[job.id] = run
        run.addBoth(self._finished, job.id)

    async def _run(self, job: Job, spec: TaskSpec, machine: Machine, persisted: Deferred) -> str:
        await persisted  # never act on a machine before the job is recorded as running
        ctx = TaskContext(
            job=job, machine=machine, reactor=self._reactor,
            log=lambda message, **data: self._log(job.id, message, data),
            settings=self._settings, secrets=self._secrets, drivers=self._drivers, store=self._store,
        )
        d = Deferred.fromCoroutine(spec.run(ctx, job.params))
        d.addTimeout(self._timeout(spec), self._reactor)
        return await d

    def _timeout(self, spec: TaskSpec) -> float:
        """A task's timeout: the configured one (tasks.timeouts), else its own."""
        return self._limits.timeouts.get(spec.name, spec.timeout)

    def _finished(self, outcome: Any, job_id: str) -> None:
        job = self._jobs[job_id]
        del self._running[job_id]
        now = self._reactor.seconds()
        result = error = None
        if not isinstance(outcome, Failure):
            state, result = State.succeeded, str(outcome)
        elif outcome.check(TimeoutError):
            state = State.timed_out
            error = f"timed out after {self._timeout(self._tasks.get(job.task_name)):g} s"
        elif outcome.check(CancelledError):
            state, error = self._cancel_reason.pop(job_id, (State.cancelled, "cancelled"))
        elif outcome.check(TaskFailed):
            state, error = State.failed, str(outcome.value)
        else:
            log.failure("Job {job_id} ({task}) crashed", outcome, job_id=job_id, task=job.task_name)
            state, error = State.failed, f"internal error ({outcome.type.__name__}); see the roller log"
        self._cancel_reason.pop(job_id, None)
        if error is not None and self._secrets is not None:
            error = self._secrets.redact(error)
        final = job.transition(state, now, result=result, error=error)
        message = f"{state.value}: {result if error is None else error}"
        event = JobEvent(job_id, now, "state", message, {"state": state.value})
        self._forget(final)
        self._busy.discard(job.machine_key)
        for e in self._endpoints_of.pop(job_id, ()):
            self._endpoint_running[e] -= 1
            if not self._endpoint_running[e]:
                del self._endpoint_running[e]
        self._emit(final, event)
        self._store.jobs.update(final, event).addCallbacks(
            self._notify,
            lambda f: log.failure("Could not record the end of job {job_id}", f, job_id=job_id),
        )
        self._pump()

    def _notify(self, job: Job) -> Job:
        for d in self._waiters.pop(job.id, []):
            d.callback(job)
        return job

    # -- events

    def _log(self, job_id: str, message: str, data: dict[str, Any]) -> None:
        if self._secrets is not None:
            message = self._secrets.redact(message)
        job = self._jobs.get(job_id)
        event = JobEvent(job_id, self._reactor.seconds(), "log", message, data)
        if job is not None:
            self._emit(job, event)
        self._store.jobs.add_events([event]).addErrback(
            lambda f: log.failure("Could not record an event of job {job_id}", f, job_id=job_id)
        )

    def _emit(self, job: Job, event: JobEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(job, event)
            except Exception:
                log.failure("Job event listener failed")

