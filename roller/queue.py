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
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from roller.drivers.reactor import IDriverReactor
from roller.errors import Conflict, NotFound, UnavailableError
from roller.inventory import Machine
from roller.jobs import Job, JobEvent, State, new_job_id
from roller.secrets import Secrets
from roller.store import StorageUnavailable, Store
from roller.tasks import TaskContext, TaskFailed, TaskRegistry, TaskSpec

if TYPE_CHECKING:
    from roller.config import Settings
    from roller.drivers.registry import Drivers

log = Logger()

Listener = Callable[[Job, JobEvent], None]

#: seconds a cancellation of a job running on another roller waits for that roller to end it
CANCEL_ELSEWHERE_WAIT = 30.0
#: how many job ids submitted here are remembered (their events need no relaying from the shared database)
MINE_REMEMBERED = 20_000


class Cluster(Protocol):
    """
    The shared queue of several rollers (L{roller.cluster.node.ClusterNode}):
    a job starts only once the database says this roller claimed it.
    """

    poll_interval: float

    def reaches(self, worker_group: str) -> bool: ...

    def claim(self, job: Job, endpoints: tuple[str, ...], now: float) -> Deferred[str]: ...

    def cancel_queued(self, job: Job, event: JobEvent) -> Deferred[bool]: ...

    def unreachable(self, worker_group: str) -> str | None: ...

    def request_cancel(self, job_id: str, by: str) -> Deferred[str | None]: ...

    def unclaim(self, job_id: str) -> Deferred[bool]: ...


@frozen
class QueueLimits:
    max_running: int = 200
    endpoint_max_running: int = 1
    endpoint_min_interval: float = 0.0
    timeouts: dict[str, float] = field(factory=dict)
    # Jobs started per reactor turn: a burst of a thousand starts in one turn
    # would keep the API waiting; the rest start on the next turns.
    starts_per_turn: int = 50


#: Seconds before the first retry of a job's state change the database
#: refused; doubled after every failed round, up to L{RECORD_RETRY_MAX}.
RECORD_RETRY_FIRST = 1.0
RECORD_RETRY_MAX = 30.0
#: While a job's writes wait for the database, at most this many of its log
#: lines are kept (the rest are counted and the count recorded).
MAX_PENDING_LOG_EVENTS = 500
#: While writes wait, "still not recorded" is logged at most this often (s).
RECORD_LOG_INTERVAL = 60.0


@define
class _Write:
    """A job's state change (C{job} and its event) or some of its log lines (C{job} None)."""

    job: Job | None
    events: list[JobEvent]
    d: Deferred = field(factory=Deferred)


class RelayedEvents:
    """A L{JobQueue} whose C{subscribe} gives every job's events, other rollers' too."""

    def __init__(self, queue: JobQueue):
        self._queue = queue

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        return self._queue.subscribe(listener, relayed=True)


class JobRecorder:
    """
    Writes each job's state changes and log lines to the store in order,
    one write at a time per job, and retries a write the database refused
    (L{StorageUnavailable}: locked, full, read-only) with back-off on the
    injected clock until it is written: a state change that was announced
    (to the API, the live events, the job's own task) is never lost while
    roller runs, and an older one never lands after a newer one.

    L{close} (at shutdown) gives each waiting write one more attempt and
    abandons what still fails, logging which job ended how.
    """

    def __init__(self, store: Store, clock: IReactorTime):
        self._store = store
        self._clock = clock
        self._queues: dict[str, deque[_Write]] = {}
        self._in_flight: set[str] = set()
        self._held: set[str] = set()  # job ids whose next write waits for the retry
        self._dropped: Counter[str] = Counter()
        self._retry: IDelayedCall | None = None
        self._delay = RECORD_RETRY_FIRST
        self._since: float | None = None  # when writes started waiting
        self._logged = 0.0
        self._closing = False
        self._idle: list[Deferred] = []

    @property
    def unrecorded(self) -> int:
        """State changes announced and not yet written."""
        return sum(1 for q in self._queues.values() for w in q if w.job is not None)

    def pending_events(self, job_id: str) -> list[JobEvent]:
        """A job's events not yet written, in order."""
        return [e for w in self._queues.get(job_id, ()) for e in w.events]

    def state(self, job: Job, event: JobEvent) -> Deferred[Job]:
        """Write C{job}'s row and C{event}; fires with C{job} once written."""
        w = _Write(job, [event])
        self._queues.setdefault(job.id, deque()).append(w)
        self._kick(job.id)
        return w.d

    def log(self, event: JobEvent) -> None:
        """Write a job's log line (after the job's earlier writes)."""
        q = self._queues.setdefault(event.job_id, deque())
        last = q[-1] if q else None
        if last is not None and last.job is None and (len(q) > 1 or event.job_id not in self._in_flight):
            if len(last.events) >= MAX_PENDING_LOG_EVENTS:
                self._dropped[event.job_id] += 1
                return
            last.events.append(event)
        else:
            w = _Write(None, [event])
            w.d.addErrback(lambda f: None)  # its failure is logged in _written
            q.append(w)
        self._kick(event.job_id)

    def _kick(self, job_id: str) -> None:
        q = self._queues.get(job_id)
        if not q or job_id in self._in_flight or job_id in self._held:
            return
        w = q[0]
        self._in_flight.add(job_id)
        d: Deferred[Any]
        if w.job is not None:
            d = self._store.jobs.update(w.job, w.events[0])
        else:
            events = list(w.events)
            dropped = self._dropped.pop(job_id, 0)
            if dropped:
                events.append(JobEvent(job_id, events[-1].time, "log", f"{dropped} more log line(s) were not kept "
                                       "while the database was unavailable"))
            d = self._store.jobs.add_events(events)
        d.addBoth(self._written, job_id, w)

    def _written(self, result: Any, job_id: str, w: _Write) -> None:
        self._in_flight.discard(job_id)
        q = self._queues[job_id]
        fault = result.value if isinstance(result, Failure) else None
        if isinstance(fault, StorageUnavailable) and not self._closing:
            self._hold(job_id, fault)
            return
        q.popleft()
        if isinstance(result, Failure):
            if isinstance(fault, StorageUnavailable):  # closing: this was the last attempt
                self._abandon(job_id, w, result, fault)
                return
            what = f"the {w.job.state.value} state" if w.job is not None else "log lines"
            log.failure("Could not record {what} of job {job_id}", result, what=what, job_id=job_id)
            w.d.errback(result)
        else:
            self._delay = RECORD_RETRY_FIRST
            w.d.callback(w.job)
        if q:
            self._kick(job_id)
        else:
            del self._queues[job_id]
            self._settled()

    def _hold(self, job_id: str, fault: StorageUnavailable) -> None:
        self._held.add(job_id)
        now = self._clock.seconds()
        if self._since is None:
            self._since = self._logged = now
            log.warn("Holding job state changes the database refused ({why}); retrying with back-off until "
                     "they are written", why=fault.what)
        elif now - self._logged >= RECORD_LOG_INTERVAL:
            self._logged = now
            log.warn("{count} job state change(s) still not recorded after {duration:.0f} s ({why}); retrying "
                     "every {delay:g} s", count=self.unrecorded, duration=now - self._since,
                     why=fault.what, delay=self._delay)
        if self._retry is None or not self._retry.active():
            self._retry = self._clock.callLater(self._delay, self._retry_held)
            self._delay = min(self._delay * 2, RECORD_RETRY_MAX)

    def _retry_held(self) -> None:
        held, self._held = self._held, set()
        for job_id in sorted(held):
            self._kick(job_id)

    def _settled(self) -> None:
        if self._held or self._in_flight:
            return
        if self._since is not None:
            log.info("Job state changes held back for {duration:.0f} s are recorded",
                     duration=self._clock.seconds() - self._since)
            self._since = None
        if not self._queues:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _abandon(self, job_id: str, w: _Write, failure: Failure, fault: StorageUnavailable) -> None:
        """Give up on C{job_id}'s writes (shutting down, the database still refuses them)."""
        for item in [w, *self._queues.pop(job_id, ())]:
            if item.job is not None and item.job.state.final:
                job = item.job
                log.error("Job {job_id} ({task} on {worker}) ended {state} ({outcome}) but roller could not record "
                          "it before stopping ({why}); the database will show it interrupted",
                          job_id=job_id, task=job.task_name, worker=job.worker_id, state=job.state.value,
                          outcome=job.result if job.error is None else job.error, why=fault.what)
            item.d.errback(failure)
        self._dropped.pop(job_id, None)
        self._settled()

    def close(self) -> Deferred[None]:
        """
        Shutting down: try every waiting write once more now and abandon
        (log) what still fails.  Fires once nothing is left.
        """
        self._closing = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry_held()
        if not self._queues:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle.append(d)
        return d


def _shield(d: Deferred) -> Deferred:
    """A Deferred with C{d}'s result whose cancellation does not cancel C{d}."""
    out: Deferred = Deferred()

    def passon(result: Any) -> None:
        if not out.called:
            out.callback(result) if not isinstance(result, Failure) else out.errback(result)

    d.addBoth(passon)
    return out


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
        reactor: IDriverReactor,
        *,
        limits: QueueLimits = QueueLimits(),
        settings: Settings | None = None,
        secrets: Secrets | None = None,
        drivers: Drivers | None = None,
        cluster: Cluster | None = None,
    ):
        self._store = store
        self._cluster = cluster
        self._claiming: set[str] = set()  # jobs whose claim is in flight (cluster)
        self._parked: list[tuple[int, int, str]] = []  # claims refused for now (cluster): retried after a while
        self._claimed: dict[str, list[Deferred]] = {}  # fire once a claim in flight is answered
        self._unpark: Any = None
        self._mine: set[str] = set()  # jobs submitted here, recently (cluster)
        self._mine_order: deque[str] = deque()
        self._tasks = tasks
        self._reactor = reactor
        self._limits = limits
        self._settings = settings
        self._secrets = secrets
        self._drivers = drivers
        self._accepting = True
        self._jobs: dict[str, Job] = {}  # queued and running
        self._ended: dict[str, Job] = {}  # ended, the end not yet recorded
        self._ending: dict[str, list[Deferred]] = {}  # fire with the final job when it ends
        self._recorder = JobRecorder(store, reactor)
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
        self._relay_listeners: list[Listener] = []  # also other rollers' events
        self._arrival = 0

    def machines_with_jobs(self) -> set[tuple[str, str]]:
        """C{(worker_group, worker_id)} of every machine with a job queued or running."""
        return {(group, worker) for group, worker, _ in self._active_key}

    def active_job(self, worker_group: str, worker_id: str, task_name: str) -> Job | None:
        """The job of C{task_name} queued or running on the machine, if any (what L{submit} would return)."""
        job_id = self._active_key.get((worker_group, worker_id, task_name))
        return None if job_id is None else self._jobs.get(job_id)

    def set_secrets(self, secrets: Any) -> None:
        """Use these secrets for jobs started from now on (SIGHUP reload)."""
        self._secrets = secrets

    # -- observation

    def subscribe(self, listener: Listener, *, relayed: bool = False) -> Callable[[], None]:
        """
        Call C{listener(job, event)} for every job event of this roller;
        with C{relayed}, also for those of jobs other rollers run (a
        cluster: live streams show every job; metrics and notifications
        stay each roller's own).  Returns an unsubscribe.
        """
        listeners = self._relay_listeners if relayed else self._listeners
        listeners.append(listener)
        return lambda: listeners.remove(listener) if listener in listeners else None

    def relayed(self) -> RelayedEvents:
        """This queue as something whose C{subscribe} also gives other rollers' job events (for L{EventHub})."""
        return RelayedEvents(self)

    def active(self, job_id: str) -> Job | None:
        """
        The freshest copy of a job this process holds: queued, running, or
        ended with its end not yet recorded (the database refused the write
        and it is being retried), so reads never show an older state.
        """
        return self._jobs.get(job_id) or self._ended.get(job_id)

    @property
    def unrecorded(self) -> int:
        """Job state changes announced and not yet written (the database refused them)."""
        return self._recorder.unrecorded

    def unrecorded_events(self, job_id: str) -> list[JobEvent]:
        """A job's events announced and not yet written, in order (after those in the store)."""
        return self._recorder.pending_events(job_id)

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

    def end_unrecorded(self, job_id: str) -> bool:
        """Job C{job_id} ended here and its end is not written yet (L{wait} fires once it is)."""
        return job_id in self._ended

    def wait(self, job_id: str) -> Deferred[Job | None]:
        """
        Fires with the job once it has reached a final state and been
        persisted; with C{None} for a job this roller never had.
        """
        if job_id not in self._jobs and job_id not in self._ended:
            return self._store.jobs.get(job_id)
        d: Deferred = Deferred()
        self._waiters.setdefault(job_id, []).append(d)
        return d

    # -- lifecycle

    async def start(self) -> tuple[int, int]:
        """
        Recover after a restart: (jobs interrupted, jobs queued again).  In
        a cluster, nothing here: another roller's running jobs are not this
        one's to interrupt (L{roller.cluster.node} takes over dead rollers),
        and the shared queue is read by the node's polls.
        """
        if self._cluster is not None:
            self._pump()
            return 0, 0
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
        for call in (self._wakeup, self._next_turn, self._unpark):
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
        """
        Stop accepting jobs; interrupt the running ones and persist that.
        State changes the database refused get one more attempt; those it
        still refuses are logged (which job ended how) and given up.
        """
        self.stop_accepting()
        running = list(self._running)
        ends = [self._until_ended(i) for i in running]
        for job_id in running:
            self._cancel_reason[job_id] = (State.interrupted, reason)
            self._running[job_id].cancel()
        for d in ends:
            await d
        await self._recorder.close()

    def _until_ended(self, job_id: str) -> Deferred[Job]:
        """Fires with the final job as soon as running job C{job_id} ends (before it is recorded)."""
        d: Deferred = Deferred()
        self._ending.setdefault(job_id, []).append(d)
        return d

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
        batch_id: str | None = None,
    ) -> tuple[Job, bool]:
        """
        Queue C{task_name} on C{machine}; (job, created).

        If the machine already has this task queued or running, that job is
        returned with C{created} False instead of a duplicate.  The job is
        committed to the store before this returns, with the audit entry
        C{audit(job)} makes, if given, in the same transaction.  C{batch_id}:
        the batch (L{roller.batches}) the job is a member of.
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
            requester=requester, origin_ip=origin_ip, reason=reason, priority=priority, batch_id=batch_id,
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
        if self._cluster is None:
            self._enqueue(job, machine)
        else:
            self._remember_mine(job.id)
            if self._cluster.reaches(job.worker_group):
                self._enqueue(job, machine)
        self._emit(job, event)
        why = self._cluster.unreachable(job.worker_group) if self._cluster is not None else None
        if why is not None:  # in the job's events, for the API and the dashboard
            waiting = JobEvent(job.id, now, "log", why, {"waiting": "unreachable"})
            self._emit(job, waiting)
            self._recorder.log(waiting)
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
        while job_id in self._claiming:  # a claim in flight: cancel what it leads to
            d: Deferred = Deferred()
            self._claimed.setdefault(job_id, []).append(d)
            await d
        job = self._jobs.get(job_id)
        if job is None and job_id in self._ended:
            raise Conflict(f"job {job_id} already ended: {self._ended[job_id].state.value}", code="job_finished")
        if job is None:
            stored = await self._store.jobs.get(job_id)
            if stored is None:
                raise NotFound(f"no job {job_id}", code="unknown_job")
            if self._cluster is not None and not stored.state.final:
                return await self._cancel_elsewhere(stored, by)
            raise Conflict(f"job {job_id} already ended: {stored.state.value}", code="job_finished")
        message = f"cancelled by {by}"
        if job.state is State.queued:
            # Recorded before it is announced: if the database refuses it, the
            # job stays queued (and the caller gets 503), never cancelled here
            # and run after a restart.
            now = self._reactor.seconds()
            final = job.transition(State.cancelled, now, error=message)
            machine = self._machines[job_id]
            self._forget(final)
            self._ended[job_id] = final
            event = JobEvent(job_id, now, "state", message, {"state": "cancelled"})
            try:
                if self._cluster is None:
                    final = await self._store.jobs.update(final, event)
                elif not await self._cluster.cancel_queued(final, event):
                    raise Conflict(f"job {job_id} was just started by another roller: cancel it again there",
                                   code="job_running_elsewhere")
            except BaseException:
                del self._ended[job_id]
                self._requeue(job, machine)
                raise
            del self._ended[job_id]
            self._emit(final, event)
            self._notify(final)
            self._pump()
            return final
        ended = self._until_ended(job_id)
        self._cancel_reason[job_id] = (State.cancelled, message)
        self._running[job_id].cancel()
        return await ended

    # -- scheduling

    def _enqueue(self, job: Job, machine: Machine) -> None:
        self._jobs[job.id] = job
        self._machines[job.id] = machine
        self._active_key[(job.worker_group, job.worker_id, job.task_name)] = job.id
        self._arrival += 1
        heapq.heappush(self._heap, (-job.priority, job.seq or self._arrival, job.id))

    def _requeue(self, job: Job, machine: Machine) -> None:
        """Put back a queued job whose cancellation could not be recorded."""
        self._jobs[job.id] = job
        self._machines[job.id] = machine
        self._active_key.setdefault((job.worker_group, job.worker_id, job.task_name), job.id)
        self._arrival += 1
        heapq.heappush(self._heap, (-job.priority, job.seq or self._arrival, job.id))
        self._pump()

    # -- the shared queue (cluster)

    async def _cancel_elsewhere(self, job: Job, by: str) -> Job:
        """Cancel a job this roller does not hold: queued in the shared queue, or running on another roller."""
        assert self._cluster is not None
        message = f"cancelled by {by}"
        if job.state is State.queued:
            now = self._reactor.seconds()
            final = job.transition(State.cancelled, now, error=message)
            event = JobEvent(job.id, now, "state", message, {"state": "cancelled"})
            if await self._cluster.cancel_queued(final, event):
                self._emit(final, event)
                return final
            job = await self._store.jobs.get(job.id) or job  # claimed meanwhile
        if job.state is State.running:
            runner = await self._cluster.request_cancel(job.id, by)
            deadline = self._reactor.seconds() + CANCEL_ELSEWHERE_WAIT
            while runner is not None and self._reactor.seconds() < deadline:
                await deferLater(self._reactor, self._cluster.poll_interval, lambda: None)
                current = await self._store.jobs.get(job.id)
                if current is None or current.state.final:
                    return current or job
            if runner is not None:
                raise Conflict(f"job {job.id} runs on roller {runner}, which was asked to cancel it and has not "
                               "ended it yet", code="cancel_pending")
        current = await self._store.jobs.get(job.id)
        if current is not None and current.state.final:
            raise Conflict(f"job {job.id} already ended: {current.state.value}", code="job_finished")
        raise Conflict(f"job {job.id} could not be cancelled: it is {job.state.value}", code="job_busy")

    def interrupt_running(self, why: str) -> int:
        """End every running job as C{interrupted} (this roller was taken over, or lost the database); how many."""
        running = [job_id for job_id in self._running if job_id not in self._cancel_reason]
        for job_id in running:
            self._cancel_reason[job_id] = (State.interrupted, why)
            self._running[job_id].cancel()
        return len(running)

    def cancel_here(self, job_id: str, by: str) -> None:
        """Another roller was asked to cancel this roller's running job C{job_id}."""
        if job_id not in self._running or job_id in self._cancel_reason:
            return
        self._cancel_reason[job_id] = (State.cancelled, f"cancelled by {by}")
        self._running[job_id].cancel()

    def pump(self) -> None:
        """Look at the queue again now (a roller was taken over, a machine or endpoint may be free)."""
        self._pump()

    def _remember_mine(self, job_id: str) -> None:
        self._mine.add(job_id)
        self._mine_order.append(job_id)
        if len(self._mine_order) > MINE_REMEMBERED:
            self._mine.discard(self._mine_order.popleft())

    def unknown(self, queued: list[tuple[str, str, str]]) -> list[str]:
        """
        Of the shared queue's C{(id, worker_group, worker_id)}, the ids of
        the jobs L{adopt} would take: not held or ended here, of a group
        this roller reaches, on a machine it knows.
        """
        if self._cluster is None or not self._accepting:
            return []
        return [job_id for job_id, group, worker_id in queued
                if self._adoptable(job_id, group, worker_id) is not None]

    def _adoptable(self, job_id: str, worker_group: str, worker_id: str) -> Machine | None:
        """The machine of a shared-queue job this roller would take (None: not held here, reached, known)."""
        assert self._cluster is not None
        if job_id in self._jobs or job_id in self._ended or not self._cluster.reaches(worker_group):
            return None
        # (a machine not in this roller's inventory (yet): another roller may run it)
        return self._store.machines.cached((worker_group, worker_id))

    def adopt(self, jobs: list[Job]) -> int:
        """
        Queued jobs read from the shared queue (in the order to run them):
        those this roller does not hold yet and can reach join its queue,
        to be claimed like its own.  How many joined.
        """
        if self._cluster is None or not self._accepting:
            return 0
        added = 0
        for job in jobs:
            machine = self._adoptable(job.id, job.worker_group, job.worker_id)
            if machine is None or job.state is not State.queued:
                continue
            self._enqueue(job, machine)
            added += 1
        if added:
            self._pump()
        return added

    def relay(self, job: Job, event: JobEvent, running_here: bool = False) -> None:
        """
        An event another roller wrote (a job it runs, or one queued there):
        announced to this roller's listeners (live streams, the dashboard)
        unless this roller announced it itself.  A job this roller holds
        as queued that another roller now runs leaves this roller's queue.
        """
        if running_here or job.id in self._ended or job.id in self._running or job.id in self._claiming:
            return
        local = self._jobs.get(job.id)
        if local is not None:
            if job.state is State.queued:
                return  # still queued: its queued event was announced when it was adopted or submitted
            self._forget(local)  # claimed (or cancelled) elsewhere
        elif job.id in self._mine and event.kind == "state" and event.data.get("state") == "queued":
            return  # submitted here: announced then
        self._emit(job, event, relayed=True)
        if job.state.final and event.kind == "state" and event.data.get("state") == job.state.value:
            self._notify(job)

    def _claim(self, job: Job, spec: TaskSpec | None, machine: Machine, endpoints: tuple[str, ...],
               now: float) -> None:
        """Claim C{job} in the shared queue; start it if this roller got it."""
        assert self._cluster is not None
        self._claiming.add(job.id)
        self._busy.add(job.machine_key)
        for e in endpoints:
            self._endpoint_running[e] += 1

        def release() -> None:
            self._claiming.discard(job.id)
            self._busy.discard(job.machine_key)
            for e in endpoints:
                self._endpoint_running[e] -= 1
                if not self._endpoint_running[e]:
                    del self._endpoint_running[e]

        def answered(outcome: Any) -> None:
            try:
                settle(outcome)
            finally:
                for d in self._claimed.pop(job.id, []):
                    d.callback(None)

        def settle(outcome: Any) -> None:
            release()
            current = self._jobs.get(job.id)
            if isinstance(outcome, Failure):
                if not outcome.check(StorageUnavailable):
                    log.failure("Claiming job {job_id} failed", outcome, job_id=job.id)
                outcome = "blocked"
            if outcome == "claimed":
                if current is None or current.state is not State.queued or not self._accepting:
                    # shutting down meanwhile: queued again in the database, for whichever roller runs next
                    assert self._cluster is not None
                    self._cluster.unclaim(job.id).addErrback(
                        lambda f: log.failure("Could not give back job {job_id}", f, job_id=job.id))
                    return
                self._start(current, spec, machine, endpoints, now)
            elif outcome == "gone":
                if current is not None and current.state is State.queued:
                    self._forget(current)
            else:  # blocked: tried again after a poll interval (never in this pump: it would spin)
                if current is not None and current.state is State.queued:
                    self._arrival += 1
                    self._parked.append((-current.priority, current.seq or self._arrival, current.id))
                    if self._unpark is None or not self._unpark.active():
                        delay = self._cluster.poll_interval if self._cluster is not None else 1.0
                        self._unpark = self._reactor.callLater(delay, self._unpark_all)
                return
            self._pump()

        self._cluster.claim(job, endpoints, now).addBoth(answered)

    def _unpark_all(self) -> None:
        parked, self._parked = self._parked, []
        for entry in parked:
            heapq.heappush(self._heap, entry)
        self._pump()

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
        while self._heap and len(self._running) + len(self._claiming) < self._limits.max_running:
            if started >= self._limits.starts_per_turn:
                if self._next_turn is None or not self._next_turn.active():
                    self._next_turn = self._reactor.callLater(0, self._pump)
                break
            entry = heapq.heappop(self._heap)
            job = self._jobs.get(entry[2])
            if job is None or job.state is not State.queued or job.id in self._claiming:
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
            if self._cluster is not None:
                self._claim(job, spec, machine, endpoints, now)
            else:
                self._start(job, spec, machine, endpoints, now)
            started += 1
        for entry in blocked:
            heapq.heappush(self._heap, entry)
        if soonest != float("inf") and (self._wakeup is None or not self._wakeup.active()):
            self._wakeup = self._reactor.callLater(soonest, self._pump)

    def _start(self, job: Job, spec: TaskSpec | None, machine: Machine, endpoints: tuple[str, ...],
               now: float) -> None:
        job = job.transition(State.running, now)
        self._jobs[job.id] = job
        self._busy.add(job.machine_key)
        self._endpoints_of[job.id] = endpoints
        for e in endpoints:
            self._endpoint_running[e] += 1
            self._endpoint_last[e] = now
        event = JobEvent(job.id, now, "state", "running", {"state": "running"})
        self._emit(job, event)
        # retried until written; cancelling the run does not cancel the write
        persisted = _shield(self._recorder.state(job, event))
        run = Deferred.fromCoroutine(self._run(job, spec, machine, persisted))
        self._running[job.id] = run
        run.addBoth(self._finished, job.id)

    async def _run(self, job: Job, spec: TaskSpec | None, machine: Machine, persisted: Deferred) -> str:
        await persisted  # never act on a machine before the job is recorded as running
        if spec is None:  # a job recovered from the store whose task this roller no longer has
            raise TaskFailed(f"unknown task {job.task_name!r}")
        ctx = TaskContext(
            job=job, machine=machine, reactor=self._reactor,
            log=lambda message, **data: self._log(job.id, message, data),
            settings=self._settings, secrets=self._secrets, drivers=self._drivers, store=self._store,
        )
        run = spec.run

        async def call() -> str:  # a Deferred around any awaitable the task returns
            return await run(ctx, job.params)

        d = Deferred.fromCoroutine(call())
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
            spec = self._tasks.get(job.task_name)
            error = f"timed out after {self._timeout(spec):g} s" if spec is not None else "timed out"
        elif outcome.check(CancelledError):
            state, error = self._cancel_reason.pop(job_id, (State.cancelled, "cancelled"))
        elif outcome.check(TaskFailed):
            state, error = State.failed, str(outcome.value)
        else:
            log.failure("Job {job_id} ({task}) crashed", outcome, job_id=job_id, task=job.task_name)
            state, error = State.failed, f"internal error ({type(outcome.value).__name__}); see the roller log"
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
        self._ended[job_id] = final
        self._emit(final, event)
        for d in self._ending.pop(job_id, []):
            d.callback(final)
        # Retried until written (the database may refuse it for a while);
        # meanwhile reads show the end (active()), never "running".
        self._recorder.state(final, event).addCallbacks(self._recorded_end, self._unrecorded_end,
                                                        errbackArgs=(job_id,))
        self._pump()

    def _recorded_end(self, job: Job) -> None:
        self._ended.pop(job.id, None)
        self._notify(job)

    def _unrecorded_end(self, failure: Failure, job_id: str) -> None:
        """Given up (logged by the recorder): waiters learn that the end is not recorded."""
        self._ended.pop(job_id, None)
        for d in self._waiters.pop(job_id, []):
            d.errback(failure)

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
        self._recorder.log(event)

    def _emit(self, job: Job, event: JobEvent, relayed: bool = False) -> None:
        for listener in list(self._relay_listeners) if relayed else list(self._listeners) + self._relay_listeners:
            try:
                listener(job, event)
            except Exception:  # noqa: BLE001 -- a listener's bug must not stop the others or the job
                log.failure("Job event listener failed")

