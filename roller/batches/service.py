"""
BatchService: runs batches.  One per roller, in the reactor.

A batch is resolved once, at creation, into a fixed list of members and
written (batch, members, audit entry) in one transaction.  Then its members
are started as ordinary jobs through L{JobQueue.submit}, as many as the
rollout allows (L{roller.batches.rollout.plan}), and followed through the
queue's job events: a map from job id to member, so a member that joined a
job someone else started is followed too.  Every change is kept in memory
(what L{BatchService.view} serves while the batch runs) and written
coalesced, one transaction per reactor turn; a write the database refuses
is retried with back-off.

After a restart, L{BatchService.start} reloads the unfinished batches,
reconciles each member with its job (a job carrying the batch's id whose
member row was not written is adopted; a job interrupted by the restart is
started once more), counts the members in flight and only then starts
more, within the limits.

With several rollers on one database (L{roller.cluster}), one roller
drives each unfinished batch, recorded as its owner: the roller that
created it.  Every C{takeover_after / 3} seconds each roller adopts the
unfinished batches whose owner left the rollers (stopped, or taken over as
dead) and resumes them the way a restart does, so the limits hold across
the handover (the members in flight are counted from their jobs).  A
roller taken over while it was only slow lets its batches go (their new
owner drives them).  The others show a batch from the database.
"""

from __future__ import annotations

import builtins
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from typing import Any, Protocol

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from roller.batches.model import (
    MAX_PAUSE,
    NO_POOL,
    Batch,
    BatchRequest,
    BatchState,
    Excluded,
    Limit,
    Member,
    MemberState,
    Rollout,
    batch_view,
)
from roller.batches.rollout import plan, tripped
from roller.cluster import sql as cluster_sql
from roller.config import Settings
from roller.errors import BadRequest, Conflict, NotFound, RollerError, UnavailableError
from roller.inventory import Machine
from roller.jobs import Job, JobEvent, State, new_job_id
from roller.queue import JobQueue
from roller.store import AuditEntry, StorageUnavailable, Store, StoreError
from roller.store.batches import BatchRecord, BatchSummary
from roller.tasks import TaskRegistry

__all__ = ["BatchService", "Resolution", "rollout_defaults"]

log = Logger()

#: seconds before retrying a write the database refused; doubled up to WRITE_RETRY_MAX
WRITE_RETRY_FIRST = 1.0
WRITE_RETRY_MAX = 30.0
#: how often a job of a member is started at most (a job interrupted by roller stopping is started once more)
MAX_ATTEMPTS = 2
_FILTER_FIELDS = ("worker_id", "fqdn", "ip")


def rollout_defaults(settings: Settings) -> Rollout:
    """The configured rollout defaults (C{batches.*} keys) of L{roller.config.Settings}."""
    def limit(name: str, text: str) -> Limit | None:
        return Limit.parse(name, text) if text else None

    stop = settings.batches_stop_after_failures
    return Rollout(max_concurrent=limit("max_concurrent", settings.batches_max_concurrent),
                   max_per_pool=limit("max_per_pool", settings.batches_max_per_pool),
                   stop_after_failures=stop or None,
                   pause_between=min(float(settings.batches_pause_between), MAX_PAUSE))


#: no limits: the rollout of a service built without configured defaults
NO_LIMITS = Rollout()


class BatchCluster(Protocol):
    """What the service asks of L{roller.cluster.node.ClusterNode}."""

    id: str
    takeover_after: float

    def on_fence(self, listener: Callable[[str], None]) -> None: ...


class HealthStates(Protocol):
    """What resolving asks of the health watcher (L{roller.health.watcher.HealthWatcher})."""

    def state_of(self, key: tuple[str, str]) -> str: ...


@frozen
class Resolution:
    members: list[Member]  # batch_id "", position 0.., state pending, in rollout order
    excluded: list[Excluded]
    pool_sizes: dict[str, int]  # machines in the inventory per pool key of the members' pools
    matched: int = 0  # machines the selector named or matched, before exclusions


@define
class _Live:
    """A batch this process runs: its state in memory, the counts the rollout needs."""

    batch: Batch
    members: list[Member]
    excluded: list[Excluded]
    pool_sizes: dict[str, int]
    by_key: dict[tuple[str, str], int] = field(factory=dict)  # machine -> position
    pending: dict[str, deque[int]] = field(factory=dict)  # pool key -> pending positions, in order
    inflight: set[int] = field(factory=set)  # positions starting, queued or running
    inflight_by_pool: Counter[str] = field(factory=Counter)
    starting: set[int] = field(factory=set)  # positions whose submit is under way
    job_ids: set[str] = field(factory=set)  # the members' current jobs
    retired: set[str] = field(factory=set)  # jobs members were done with (interrupted, started once more)
    failures: int = 0
    ended: int = 0  # members in a final state
    last_start: float | None = None
    last_failure: Member | None = None
    cancel_running: bool = False
    wake: IDelayedCall | None = None
    version: int = 0
    views: dict[bool, tuple[int, dict[str, Any]]] = field(factory=dict)

    @property
    def id(self) -> str:
        return self.batch.id


class BatchService:
    def __init__(self, store: Store, queue: JobQueue, tasks: TaskRegistry, clock: IReactorTime, *,
                 health: HealthStates | None = None, defaults: Rollout = NO_LIMITS,
                 cluster: BatchCluster | None = None):
        self.store = store
        self.cluster = cluster
        self._adopt_loop: LoopingCall | None = None
        self._adopting = False
        self.queue = queue
        self.tasks = tasks
        self.clock = clock
        self.health = health
        self.defaults = defaults
        self._live: dict[str, _Live] = {}
        self._by_job: dict[str, list[tuple[str, int]]] = {}  # job id -> (batch id, position) of its members
        self._destructive: dict[str, dict[str, str]] = {}  # pool key -> {job id: batch id or ""} in flight
        self._destructive_pool: dict[str, str] = {}  # job id -> pool key
        self._listeners: list[Callable[[str], None]] = []
        self._changed: set[str] = set()
        self._notify_call: IDelayedCall | None = None
        self._to_plan: set[str] = set()
        self._plan_call: IDelayedCall | None = None
        self._dirty_batches: set[str] = set()
        self._dirty_members: dict[str, set[int]] = {}
        # a member's end is written only after its job's end is: held here until then
        self._held_members: dict[str, set[int]] = {}  # batch id -> positions
        self._held_batches: set[str] = set()  # finished batches with members held
        self._awaiting: dict[str, builtins.list[tuple[str, int]]] = {}  # job id -> its held members
        self._flush_call: IDelayedCall | None = None
        self._writing: Deferred | None = None
        self._write_delay = WRITE_RETRY_FIRST
        self._running = False
        # relayed: with several rollers (roller.cluster), a member may run on another one
        self._unsubscribe: Callable[[], None] | None = queue.subscribe(self._job_event, relayed=True)

    # -- lifecycle

    async def start(self, *, resume: bool | Collection[str] = True) -> None:
        """
        After C{queue.start()}: resume the unfinished batches, within their
        limits; C{resume} false: none (only the batches created here are
        followed), a collection of batch ids: only those.
        """
        for job in [*self.queue.queued(), *self.queue.running()]:
            self._track_destructive(job)
        if self.cluster is not None:
            # several rollers: this one drives its own batches and those nobody alive drives
            resume = await self.store.db.write(cluster_sql.adopt_batches, self.cluster.id)
        records = await self.store.batches.unfinished() if resume else []
        if not isinstance(resume, bool):
            records = [r for r in records if r.batch.id in resume]
        self._running = True
        await self._resume(records, "resumed")
        if self.cluster is not None:
            self.cluster.on_fence(self._let_go)
            self._adopt_loop = LoopingCall(self._adopt)
            self._adopt_loop.clock = self.clock
            self._adopt_loop.start(max(self.cluster.takeover_after / 3, 0.5), now=False).addErrback(
                lambda f: log.failure("Batch adoption loop stopped", f))

    async def _resume(self, records: builtins.list[BatchRecord], how: str) -> None:
        """Load unfinished batches, reconcile each member with its job, then plan each within its limits."""
        records = [r for r in records if r.batch.id not in self._live]
        jobs = await self.store.jobs.jobs_of_batches([r.batch.id for r in records]) if records else []
        own: dict[tuple[str, tuple[str, str]], list[Job]] = {}
        for job in jobs:
            own.setdefault((job.batch_id or "", job.machine_key), []).append(job)
        loaded = []
        for record in records:
            if record.batch.id in self._live:
                continue
            live = self._load(record)
            loaded.append(live)
            await self._reconcile(live, own)
            log.info("Batch {batch_id} ({task}, {total} members) {how}: {inflight} in flight, {pending} to start",
                     batch_id=live.id, task=live.batch.task_name, total=live.batch.total, how=how,
                     inflight=len(live.inflight), pending=sum(len(d) for d in live.pending.values()))
        for live in loaded:
            if live.batch.state is BatchState.running:
                self._join_existing(live)
            self._check_end(live)
            self._plan_soon(live.id)
            self._changed_batch(live)

    async def _adopt(self) -> None:
        """Several rollers: take up the unfinished batches of rollers that left or were taken over."""
        if not self._running or self.cluster is None or self._adopting:
            return
        self._adopting = True
        before = dict(self._live)  # (not a batch created or taken over while the database answers)
        try:
            owned = set(await self.store.db.write(cluster_sql.adopt_batches, self.cluster.id))
            # another roller took over one of these (to cancel it): it drives it from now on
            self._let_go("another roller drives it now", [live for i, live in before.items() if i not in owned])
            ids = owned - set(self._live)
            if ids:
                records = [r for r in await self.store.batches.unfinished() if r.batch.id in ids]
                if self._running:
                    await self._resume(records, "adopted from a roller that left")
        except StorageUnavailable:
            pass  # logged by the store; the next look tries again
        finally:
            self._adopting = False

    async def _take_to_cancel(self, batch_id: str, by: str) -> _Live | None:
        """Several rollers: drive a batch another roller drives from now on, to cancel it here."""
        assert self.cluster is not None
        previous = await self.store.db.read(cluster_sql.batch_owner, batch_id)
        if not await self.store.db.write(cluster_sql.take_batch, batch_id, self.cluster.id):
            return self._live.get(batch_id)  # it ended meanwhile (or is already here)
        record = await self.store.batches.get(batch_id)
        if record is None:
            return None
        await self._resume([record], f"taken over from roller {previous or '(none)'} to be cancelled by {by}")
        return self._live.get(batch_id)

    def _let_go(self, why: str, batches: Iterable[_Live] | None = None) -> None:
        """Taken over (another roller adopts these batches): stop driving them here."""
        unfinished = [live for live in (self._live.values() if batches is None else batches)
                      if live.batch.finished_at is None and self._live.get(live.id) is live]
        for live in unfinished:
            if live.wake is not None and live.wake.active():
                live.wake.cancel()
            self._dirty_batches.discard(live.id)
            self._dirty_members.pop(live.id, None)
            self._held_members.pop(live.id, None)
            self._held_batches.discard(live.id)
            self._forget(live)
        if unfinished:
            log.warn("Let {count} unfinished batch(es) go to the other rollers: {why}", count=len(unfinished), why=why)

    async def stop(self) -> None:
        """Before C{queue.drain()}: start no more members; members in flight are still followed."""
        self._running = False
        if self._adopt_loop is not None and self._adopt_loop.running:
            self._adopt_loop.stop()
        for live in self._live.values():
            if live.wake is not None and live.wake.active():
                live.wake.cancel()
        if self._plan_call is not None and self._plan_call.active():
            self._plan_call.cancel()
        await self.flush()

    async def flush(self) -> None:
        """Write what changed now (one attempt; what the database refuses stays to be retried)."""
        if self._writing is not None:
            try:
                await self._writing
            except Exception:  # noqa: BLE001 -- logged where it failed
                pass
        if self._dirty_batches or self._dirty_members:
            await self._write()

    def close(self) -> None:
        """Stop following the queue (after it stopped); nothing more is started or written from here."""
        self._running = False
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._adopt_loop is not None and self._adopt_loop.running:
            self._adopt_loop.stop()
        calls = [self._flush_call, self._notify_call, self._plan_call, *(live.wake for live in self._live.values())]
        for call in calls:
            if call is not None and call.active():
                call.cancel()

    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """C{listener(batch_id)} whenever a batch or one of its members changed (at most once per turn)."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # -- resolving

    async def resolve(self, request: BatchRequest) -> Resolution:
        """The members a request selects now, in rollout order, and who is left out and why; no writes."""
        sel = request.selector
        inventory = {m.key: m for m in self.store.machines.snapshot()}
        excluded: list[Excluded] = []
        chosen: list[Machine] = []
        if sel.machines is not None:
            seen: set[tuple[str, str]] = set()
            for key in sel.machines:
                if key in seen:
                    excluded.append(Excluded(*key, "duplicate"))
                elif key not in inventory:
                    excluded.append(Excluded(*key, "unknown machine"))
                else:
                    chosen.append(inventory[key])
                seen.add(key)
            matched = len(sel.machines)
        else:
            chosen = [m for m in inventory.values() if _matches(sel, m)]
            if sel.health:
                wanted = set(sel.health)
                chosen = [m for m in chosen if self._health_of(m.key) in wanted]
            if sel.state:
                last = await self._last_states([m.key for m in chosen])
                wanted = set(sel.state)
                chosen = [m for m in chosen if last.get(m.key, "none") in wanted]
            chosen = _interleave(chosen)
            matched = len(chosen)
        if not (sel.include_loaned and sel.include_maintenance):
            loaned, maintenance = await self._unavailable()
            kept = []
            for m in chosen:
                health = self._health_of(m.key)
                if not sel.include_loaned and (m.key in loaned or health == "loaned"):
                    excluded.append(Excluded(m.worker_group, m.worker_id, "loaned"))
                elif not sel.include_maintenance and (m.key in maintenance or health == "maintenance"):
                    excluded.append(Excluded(m.worker_group, m.worker_id, "maintenance"))
                else:
                    kept.append(m)
            chosen = kept
        sizes: Counter[str] = Counter(m.pool or NO_POOL for m in inventory.values())
        members = [Member("", i, m.worker_group, m.worker_id, pool=m.pool) for i, m in enumerate(chosen)]
        pool_sizes = {p: sizes[p] for p in sorted({m.pool_key for m in members})}
        return Resolution(members=members, excluded=excluded, pool_sizes=pool_sizes, matched=matched)

    def _health_of(self, key: tuple[str, str]) -> str:
        return self.health.state_of(key) if self.health is not None else "unknown"

    async def _unavailable(self) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        loans = await self.store.loans.list(active=True, limit=1_000_000)
        maintenance = await self.store.health.maintenance()
        return {(loan.worker_group, loan.worker_id) for loan in loans}, set(maintenance)

    async def _last_states(self, keys: builtins.list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        states = await self.store.jobs.last_states(keys)
        for job in [*self.queue.queued(), *self.queue.running()]:  # fresher than the store
            states[job.machine_key] = job.state.value
        return states

    # -- creating

    def dry_run(self, request: BatchRequest, resolution: Resolution) -> dict[str, Any]:
        """What C{create} would make of C{request}: the batch's JSON, nothing queued or written."""
        batch = Batch(id="", task_name=request.task_name, selector=request.selector, rollout=request.rollout,
                      created_at=self.clock.seconds(), params=request.params, reason=request.reason,
                      priority=request.priority, total=len(resolution.members))
        members = resolution.members
        pending: dict[str, list[int]] = {}
        for m in members:
            pending.setdefault(m.pool_key, []).append(m.position)
        elsewhere = self._elsewhere(set()) if self._task_destructive(request.task_name) else {}
        first = plan(request.rollout, total=len(members), pool_sizes=resolution.pool_sizes, pending=pending,
                     active=0, active_by_pool={}, elsewhere_by_pool=elsewhere, last_start=None).start
        out = batch_view(batch, members, pool_sizes=resolution.pool_sizes, excluded=resolution.excluded)
        out["batch_id"] = None
        out["dry_run"] = True
        out["first_wave"] = [{"worker_group": members[i].worker_group, "worker_id": members[i].worker_id,
                              "pool": members[i].pool} for i in first]
        return out

    async def create(self, request: BatchRequest, *, requester: str, origin_ip: str | None = None,
                     audit: Callable[[Batch], AuditEntry] | None = None) -> dict[str, Any]:
        """Resolve, persist (batch, members, audit entry: one transaction) and start the rollout."""
        if not self._running:
            raise UnavailableError("roller is shutting down and not starting batches", code="shutting_down")
        if self.tasks.get(request.task_name) is None:
            raise BadRequest(f"unknown task {request.task_name[:64]!r}", code="unknown_task")
        resolution = await self.resolve(request)
        if not resolution.members:
            raise BadRequest(_empty_message(resolution), code="empty_selection")
        batch = Batch(id=new_job_id(), task_name=request.task_name, selector=request.selector,
                      rollout=request.rollout, created_at=self.clock.seconds(), requester=requester,
                      origin_ip=origin_ip, params=request.params, reason=request.reason, priority=request.priority,
                      total=len(resolution.members))
        members = [evolve(m, batch_id=batch.id) for m in resolution.members]
        batch = await self.store.batches.insert(batch, members, excluded=resolution.excluded,
                                                pool_sizes=resolution.pool_sizes,
                                                audit=audit(batch) if audit is not None else None,
                                                owner=self.cluster.id if self.cluster is not None else None)
        live = self._load(BatchRecord(batch, members, resolution.excluded, resolution.pool_sizes))
        self._join_existing(live)
        log.info("Batch {batch_id}: {task} on {total} machine(s) by {requester} ({excluded} excluded)",
                 batch_id=batch.id, task=batch.task_name, total=batch.total, requester=requester,
                 excluded=len(resolution.excluded))
        self._run_plan(live)
        self._changed_batch(live)
        return self._view(live, True)

    # -- reading

    async def view(self, batch_id: str, *, members: bool = True) -> dict[str, Any] | None:
        """The batch's JSON (L{batch_view}); None if there is no such batch."""
        live = self._live.get(batch_id)
        if live is not None:
            return self._view(live, members)
        record = await self.store.batches.get(batch_id)
        if record is None:
            return None
        live = self._live.get(batch_id)  # loaded meanwhile
        if live is not None:
            return self._view(live, members)
        return batch_view(record.batch, record.members, pool_sizes=record.pool_sizes, excluded=record.excluded,
                          with_members=members)

    async def list(self, *, limit: int = 50, before: int | None = None) -> tuple[builtins.list[dict[str, Any]],
                                                                                 int | None]:
        """Newest first, without members; and the C{before} cursor of the next page (None: no more)."""
        limit = max(1, min(limit, 1000))
        summaries = await self.store.batches.list(limit=limit + 1, before=before)
        more = len(summaries) > limit
        summaries = summaries[:limit]
        out = []
        for s in summaries:
            live = self._live.get(s.batch.id)
            out.append(self._view(live, False) if live is not None else _summary_view(s))
        return out, (summaries[-1].batch.seq if more and summaries else None)

    def _view(self, live: _Live, with_members: bool) -> dict[str, Any]:
        cached = live.views.get(with_members)
        if cached is None or cached[0] != live.version:
            view = batch_view(live.batch, live.members, pool_sizes=live.pool_sizes, excluded=live.excluded,
                              with_members=with_members)
            live.views[with_members] = cached = (live.version, view)
        return dict(cached[1])

    # -- cancelling

    async def cancel(self, batch_id: str, *, by: str, running: bool = False) -> dict[str, Any]:
        """
        Skip the pending members, cancel the batch's own queued jobs (and,
        with C{running}, its running ones); joined jobs are never cancelled.
        """
        live = self._live.get(batch_id)
        if live is None:
            record = await self.store.batches.get(batch_id)
            if record is None:
                raise NotFound(f"no batch {batch_id[:64]}", code="unknown_batch")
            live = self._live.get(batch_id)
            if live is None and record.batch.finished_at is None and self.cluster is not None and self._running:
                live = await self._take_to_cancel(batch_id, by)
            if live is None:
                raise Conflict(f"batch {batch_id} already ended: {record.batch.state.value}", code="batch_finished")
        if live.ended == len(live.members):
            raise Conflict(f"batch {batch_id} already ended: {live.batch.state.value}", code="batch_finished")
        if live.batch.state is BatchState.running:
            self._set_batch(live, state=BatchState.cancelled, halt_reason=f"cancelled by {by}")
        live.cancel_running = live.cancel_running or running
        self._skip_pending(live)
        log.info("Batch {batch_id} cancelled by {by}{running}", batch_id=batch_id, by=by,
                 running=" (running members too)" if running else "")
        cancels = [Deferred.fromCoroutine(self._cancel_job(live, pos, by)) for pos in sorted(live.inflight)
                   if pos not in live.starting]
        if cancels:
            await gatherResults(cancels, consumeErrors=True).addErrback(lambda f: None)
        self._check_end(live)
        return self._view(live, True)

    async def _cancel_job(self, live: _Live, pos: int, by: str) -> None:
        m = live.members[pos]
        if m.joined or m.job_id is None:
            return
        job = self.queue.active(m.job_id)
        if job is None or job.state.final:
            return
        if job.state is State.running and not live.cancel_running:
            return
        try:
            await self.queue.cancel(m.job_id, by=by)
        except (Conflict, NotFound):
            pass  # it ended meanwhile
        except Exception as e:  # noqa: BLE001 -- one job's refusal must not stop the others; logged
            log.warn("Batch {batch_id}: job {job_id} could not be cancelled: {error}", batch_id=live.id,
                     job_id=m.job_id, error=e)

    # -- the rollout

    def _load(self, record: BatchRecord) -> _Live:
        live = _Live(record.batch, list(record.members), list(record.excluded), dict(record.pool_sizes))
        for m in live.members:
            live.by_key[m.key] = m.position
            if m.state is MemberState.pending:
                live.pending.setdefault(m.pool_key, deque()).append(m.position)
            elif m.state.active:
                self._add_inflight(live, m.position)
            if m.state.final:
                live.ended += 1
            if m.state.failure:
                live.failures += 1
                live.last_failure = m
            if m.job_id is not None:
                live.job_ids.add(m.job_id)
                self._by_job.setdefault(m.job_id, []).append((live.id, m.position))
            if m.started_at is not None and (live.last_start is None or m.started_at > live.last_start):
                live.last_start = m.started_at
        self._live[live.id] = live
        return live

    async def _reconcile(self, live: _Live, own: dict[tuple[str, tuple[str, str]], builtins.list[Job]]) -> None:
        """After a restart: each member against its job (adopting a job whose member write was lost)."""
        for m in list(live.members):
            jobs = own.get((live.id, m.key), [])
            newest = jobs[-1] if jobs else None
            # each job of the member is one of its attempts: a job more than its attempts (or one still to
            # end) is one whose member write was lost; an interrupted job it is pending again after is not
            if newest is not None and newest.id != m.job_id and (
                    len(jobs) > m.attempts or not newest.state.final):
                log.info("Batch {batch_id}: adopting job {job_id} of {group}/{worker} (its member was not "
                         "recorded before roller stopped)", batch_id=live.id, job_id=newest.id,
                         group=m.worker_group, worker=m.worker_id)
                if m.state is MemberState.pending:
                    self._unpend(live, m.position)
                self._attach(live, m.position, newest, joined=False, attempts=m.attempts + 1,
                             started_at=newest.created_at)
                m = live.members[m.position]
            live.retired.update(j.id for j in jobs if j.id != m.job_id)
            if m.job_id is None or m.state.final:
                continue
            job = self.queue.active(m.job_id)
            if job is None:
                job = await self.store.jobs.get(m.job_id)
            if job is None:
                self._member_ended(live, m.position, MemberState.failed, self.clock.seconds(),
                                   "its job is missing from the database")
            else:
                self._apply(live, m.position, job)

    def _join_existing(self, live: _Live) -> None:
        """
        Pending members whose machine already runs (or queued) the task join
        that job at once: they take nothing more out of service, so no limit
        holds them back (they count as in flight from now on).
        """
        now = self.clock.seconds()
        task = live.batch.task_name
        for positions in list(live.pending.values()):
            for pos in list(positions):
                m = live.members[pos]
                job = self.queue.active_job(m.worker_group, m.worker_id, task)
                if job is None:
                    continue
                self._unpend(live, pos)
                own = job.batch_id == live.id
                self._attach(live, pos, job, joined=not own, attempts=m.attempts + 1,
                             started_at=job.created_at if own else now)
                self._apply(live, pos, job)

    def _plan_soon(self, batch_id: str) -> None:
        self._to_plan.add(batch_id)
        if self._plan_call is None or not self._plan_call.active():
            self._plan_call = self.clock.callLater(0, self._plan_all)

    def _plan_all(self) -> None:
        self._plan_call = None
        ids, self._to_plan = self._to_plan, set()
        for batch_id in sorted(ids):
            live = self._live.get(batch_id)
            if live is not None:
                self._run_plan(live)

    def _run_plan(self, live: _Live) -> None:
        if not self._running or live.batch.state is not BatchState.running:
            return
        now = self.clock.seconds()
        destructive = self._task_destructive(live.batch.task_name)
        decision = plan(live.batch.rollout, total=len(live.members), pool_sizes=live.pool_sizes,
                        pending=live.pending, active=len(live.inflight), active_by_pool=live.inflight_by_pool,
                        elsewhere_by_pool=self._elsewhere(live.job_ids) if destructive else None,
                        failures=live.failures, now=now, last_start=live.last_start)
        for pos in decision.start:
            self._unpend(live, pos)
            self._add_inflight(live, pos)
            live.starting.add(pos)
            live.last_start = now
            Deferred.fromCoroutine(self._submit(live, pos, now)).addErrback(self._submit_failed, live.id, pos)
        if decision.wait is not None:
            if live.wake is not None and live.wake.active():
                live.wake.cancel()
            live.wake = self.clock.callLater(decision.wait, self._plan_soon, live.id)

    def _submit_failed(self, failure: Failure, batch_id: str, pos: int) -> None:
        log.failure("Batch {batch_id}: starting member {pos} failed", failure, batch_id=batch_id, pos=pos)

    async def _submit(self, live: _Live, pos: int, now: float) -> None:
        if self.cluster is not None:
            # several rollers: only the batch's owner starts its members (one taken over while slow lets go)
            try:
                owner = await self.store.db.read(cluster_sql.batch_owner, live.id)
            except StorageUnavailable:
                owner = self.cluster.id  # the submission meets the same fault, and is tried again
            if owner != self.cluster.id:
                live.starting.discard(pos)
                self._remove_inflight(live, pos)
                self._repend(live, pos)
                self._let_go(f"roller {owner} drives batch {live.id} now", [live])
                return
        m = live.members[pos]
        b = live.batch
        machine = self.store.machines.cached(m.key)
        if machine is None:
            live.starting.discard(pos)
            self._member_ended(live, pos, MemberState.failed, now, "the machine is no longer in the inventory")
            return

        def audit(job: Job) -> AuditEntry:
            return AuditEntry(time=job.created_at, actor=b.requester, source_ip=b.origin_ip,
                              action=f"job.create:{b.task_name}", target=f"{m.worker_group}/{m.worker_id}",
                              result=f"queued {job.id}",
                              params={"params": job.params, "priority": b.priority, "reason": b.reason,
                                      "batch_id": b.id})
        try:
            job, created = await self.queue.submit(b.task_name, machine, params=b.params, requester=b.requester,
                                                   origin_ip=b.origin_ip, reason=b.reason, priority=b.priority,
                                                   batch_id=b.id, audit=audit)
        except (StorageUnavailable, UnavailableError) as e:
            # not started: pending again, tried again later (a refused write) or after a restart (stopping)
            live.starting.discard(pos)
            self._remove_inflight(live, pos)
            self._repend(live, pos)
            live.last_start = None if live.last_start == now else live.last_start
            if isinstance(e, StorageUnavailable) and self._running:
                log.warn("Batch {batch_id}: {group}/{worker} not started ({why}); trying again in {delay:g} s",
                         batch_id=live.id, group=m.worker_group, worker=m.worker_id, why=e.what,
                         delay=self._write_delay)
                if live.wake is None or not live.wake.active():
                    live.wake = self.clock.callLater(self._write_delay, self._plan_soon, live.id)
            return
        except RollerError as e:
            live.starting.discard(pos)
            self._member_ended(live, pos, MemberState.failed, now, f"not started: {e}")
            return
        except Exception:  # noqa: BLE001 -- not started (e.g. the database closed): kept pending, logged
            log.failure("Batch {batch_id}: {group}/{worker} not started", batch_id=live.id,
                        group=m.worker_group, worker=m.worker_id)
            live.starting.discard(pos)
            self._remove_inflight(live, pos)
            self._repend(live, pos)
            return
        live.starting.discard(pos)
        current = self.queue.active(job.id) or job
        self._attach(live, pos, current, joined=not created, attempts=m.attempts + 1, started_at=now)
        if not current.state.final:
            self._apply(live, pos, current)
        if live.batch.state is BatchState.cancelled and created:
            await self._cancel_job(live, pos, live.batch.halt_reason or "cancelled")

    def _attach(self, live: _Live, pos: int, job: Job, *, joined: bool, attempts: int, started_at: float) -> None:
        """Make C{job} the member's job (its state is applied by L{_apply})."""
        m = live.members[pos]
        if m.job_id is not None and m.job_id != job.id:
            self._unmap(m.job_id, live.id, pos)
        if m.job_id != job.id:
            self._by_job.setdefault(job.id, []).append((live.id, pos))
        live.job_ids.add(job.id)
        self._set_member(live, pos, job_id=job.id, joined=joined, attempts=attempts, started_at=started_at)

    def _unmap(self, job_id: str, batch_id: str, pos: int) -> None:
        entries = self._by_job.get(job_id)
        if entries and (batch_id, pos) in entries:
            entries.remove((batch_id, pos))
            if not entries:
                del self._by_job[job_id]

    def _apply(self, live: _Live, pos: int, job: Job) -> None:
        """The member's job is C{job} (as it is now): mirror its state."""
        m = live.members[pos]
        if m.state.final:
            return
        if job.state is State.queued or job.state is State.running:
            self._add_inflight(live, pos)
            state = MemberState.of_job(job.state)
            if m.state is not state:
                self._set_member(live, pos, state=state)
            return
        now = job.finished_at if job.finished_at is not None else self.clock.seconds()
        if job.state is State.interrupted and m.attempts < MAX_ATTEMPTS:
            # roller stopped under it: started once more (after the restart, if it is stopping)
            self._unmap(job.id, live.id, pos)
            live.job_ids.discard(job.id)
            live.retired.add(job.id)  # its events, relayed late from another roller, are not the retry's
            self._remove_inflight(live, pos)
            self._set_member(live, pos, state=MemberState.pending, job_id=None, error=job.error)
            self._repend(live, pos)
            self._plan_soon(live.id)
            return
        self._member_ended(live, pos, MemberState.of_job(job.state), now, job.error)

    def _member_ended(self, live: _Live, pos: int, state: MemberState, now: float, error: str | None) -> None:
        m = live.members[pos]
        if m.state.final:
            return
        if m.state is MemberState.pending:
            self._unpend(live, pos)
        if m.job_id is not None and self.queue.end_unrecorded(m.job_id):
            self._release_when_recorded(live, pos, m.job_id)
        else:
            self._remove_inflight(live, pos)
        self._set_member(live, pos, state=state, finished_at=now, error=error)
        live.ended += 1
        if state.failure:
            live.failures += 1
            live.last_failure = live.members[pos]
            if live.batch.state is BatchState.running and tripped(live.batch.rollout, live.failures):
                self._halt(live)
        self._check_end(live)
        self._plan_soon(live.id)

    def _release_when_recorded(self, live: _Live, pos: int, job_id: str) -> None:
        """
        The member's slot is given back once its job's end is recorded, not
        when it is announced: killed in between, the job reads as running
        until the restart interrupts it, and no other member may have been
        started beside it past the limits (the recorded history never shows
        more in flight than the rollout allows).  A refused write keeps the
        slot until the queue's retry gets it through.
        """
        def recorded(result: Any) -> None:
            if isinstance(result, Failure) or self._live.get(live.id) is not live:
                return  # given up at shutdown (nothing more starts), or no longer driven here
            self._remove_inflight(live, pos)
            self._plan_soon(live.id)

        self.queue.wait(job_id).addBoth(recorded)

    def _halt(self, live: _Live) -> None:
        last = live.last_failure
        why = f"stopped after {live.failures} failed member{'s' if live.failures != 1 else ''}"
        if last is not None:
            why += f"; last: {last.worker_group}/{last.worker_id}: {last.error or last.state.value}"
        log.warn("Batch {batch_id} halted: {why}", batch_id=live.id, why=why)
        self._set_batch(live, state=BatchState.halted, halt_reason=why)
        self._skip_pending(live)

    def _skip_pending(self, live: _Live) -> None:
        now = self.clock.seconds()
        for positions in list(live.pending.values()):
            for pos in list(positions):
                self._member_ended(live, pos, MemberState.skipped, now, None)
        live.pending.clear()

    def _check_end(self, live: _Live) -> None:
        if live.ended < len(live.members) or live.batch.finished_at is not None:
            return
        state = live.batch.state
        if state is BatchState.running:
            ok = all(m.state is MemberState.succeeded for m in live.members)
            state = BatchState.succeeded if ok else BatchState.failed
        self._set_batch(live, state=state, finished_at=self.clock.seconds())
        if live.wake is not None and live.wake.active():
            live.wake.cancel()
        log.info("Batch {batch_id} ended {state}", batch_id=live.id, state=state.value)

    # -- bookkeeping

    def _unpend(self, live: _Live, pos: int) -> None:
        q = live.pending.get(live.members[pos].pool_key)
        if q is None:
            return
        if q and q[0] == pos:
            q.popleft()
        elif pos in q:
            q.remove(pos)
        if not q:
            del live.pending[live.members[pos].pool_key]

    def _repend(self, live: _Live, pos: int) -> None:
        key = live.members[pos].pool_key
        q = live.pending.get(key)
        if q is None:
            live.pending[key] = deque([pos])
        elif pos not in q:
            live.pending[key] = deque(sorted([*q, pos]))

    def _add_inflight(self, live: _Live, pos: int) -> None:
        if pos not in live.inflight:
            live.inflight.add(pos)
            live.inflight_by_pool[live.members[pos].pool_key] += 1

    def _remove_inflight(self, live: _Live, pos: int) -> None:
        if pos in live.inflight:
            live.inflight.discard(pos)
            key = live.members[pos].pool_key
            live.inflight_by_pool[key] -= 1
            if live.inflight_by_pool[key] <= 0:
                del live.inflight_by_pool[key]

    def _set_member(self, live: _Live, pos: int, **changes: Any) -> None:
        live.members[pos] = evolve(live.members[pos], **changes)
        self._dirty_members.setdefault(live.id, set()).add(pos)
        self._changed_batch(live)
        self._schedule_write()

    def _set_batch(self, live: _Live, **changes: Any) -> None:
        live.batch = evolve(live.batch, **changes)
        self._dirty_batches.add(live.id)
        self._changed_batch(live)
        self._schedule_write()

    def _changed_batch(self, live: _Live) -> None:
        live.version += 1
        self._changed.add(live.id)
        if self._notify_call is None or not self._notify_call.active():
            self._notify_call = self.clock.callLater(0, self._notify)

    def _notify(self) -> None:
        self._notify_call = None
        changed, self._changed = self._changed, set()
        for batch_id in sorted(changed):
            for listener in list(self._listeners):
                try:
                    listener(batch_id)
                except Exception:  # noqa: BLE001 -- a listener's bug must not stop the others
                    log.failure("Batch listener failed")

    # -- job events

    def _job_event(self, job: Job, event: JobEvent) -> None:
        if event.kind != "state":
            return
        self._track_destructive(job)
        targets = list(self._by_job.get(job.id, ()))
        if job.batch_id is not None:
            live = self._live.get(job.batch_id)
            pos = live.by_key.get(job.machine_key) if live is not None else None
            if live is not None and pos is not None and (live.id, pos) not in targets and job.id not in live.retired:
                m = live.members[pos]
                if not m.state.final and (pos in live.starting or m.job_id is None):
                    # its submit has not returned yet: the job is the member's
                    self._attach(live, pos, job, joined=False, attempts=m.attempts + 1,
                                 started_at=m.started_at or job.created_at)
                    if m.state is MemberState.pending and pos not in live.starting:
                        self._unpend(live, pos)
                    targets.append((live.id, pos))
        for batch_id, pos in targets:
            live = self._live.get(batch_id)
            if live is not None and live.members[pos].job_id == job.id:
                self._apply(live, pos, job)

    def _task_destructive(self, task_name: str) -> bool:
        spec = self.tasks.get(task_name)
        return spec is not None and spec.destructive

    def _track_destructive(self, job: Job) -> None:
        if not self._task_destructive(job.task_name):
            return
        if job.state.final:
            pool = self._destructive_pool.pop(job.id, None)
            if pool is not None:
                jobs = self._destructive.get(pool, {})
                jobs.pop(job.id, None)
                if not jobs:
                    self._destructive.pop(pool, None)
                for live in self._live.values():  # room in the pool for batches waiting on it
                    if pool in live.pending:
                        self._plan_soon(live.id)
            return
        if job.id in self._destructive_pool:
            return
        machine = self.store.machines.cached(job.machine_key)
        pool = (machine.pool if machine is not None else None) or NO_POOL
        self._destructive_pool[job.id] = pool
        self._destructive.setdefault(pool, {})[job.id] = job.batch_id or ""

    def _elsewhere(self, own: set[str]) -> dict[str, int]:
        """Destructive jobs in flight per pool, other than C{own}."""
        return {pool: sum(1 for j in jobs if j not in own) for pool, jobs in self._destructive.items()}

    # -- writing

    def _schedule_write(self) -> None:
        if self._writing is None and (self._flush_call is None or not self._flush_call.active()):
            self._flush_call = self.clock.callLater(0, self._write_now)

    def _write_now(self) -> None:
        self._flush_call = None
        Deferred.fromCoroutine(self._write()).addErrback(lambda f: log.failure("Batch write failed", f))

    async def _write(self) -> None:
        if self._writing is not None:
            return
        batch_ids, self._dirty_batches = self._dirty_batches, set()
        member_keys, self._dirty_members = self._dirty_members, {}
        self._hold_unrecorded_ends(batch_ids, member_keys)
        batches = [self._live[i].batch for i in sorted(batch_ids) if i in self._live]
        members = [self._live[i].members[p] for i, ps in member_keys.items() if i in self._live for p in sorted(ps)]
        if not batches and not members:
            return
        # several rollers: only the batch's owner writes it (one that lost it writes nothing)
        if self.cluster is None:
            self._writing = d = self.store.batches.save(batches, members)
        else:
            self._writing = d = self.store.batches.save(batches, members, owner=self.cluster.id)
        try:
            await d
        except StorageUnavailable as e:
            self._dirty_batches |= batch_ids
            for i, ps in member_keys.items():
                self._dirty_members.setdefault(i, set()).update(ps)
            log.warn("Batches: {count} change(s) not recorded yet ({why}); retrying in {delay:g} s",
                     count=len(batches) + len(members), why=e.what, delay=self._write_delay)
            self._writing = None
            self._flush_call = self.clock.callLater(self._write_delay, self._write_now)
            self._write_delay = min(self._write_delay * 2, WRITE_RETRY_MAX)
            return
        except StoreError as e:
            log.error("Batches: {count} change(s) could not be recorded: {error}",
                      count=len(batches) + len(members), error=e)
            self._writing = None
            return
        self._writing = None
        self._write_delay = WRITE_RETRY_FIRST
        for b in batches:  # a finished batch, once written, is served from the store
            live = self._live.get(b.id)
            if live is not None and b.finished_at is not None and live.batch == b \
                    and live.id not in self._dirty_batches and not self._dirty_members.get(live.id):
                self._forget(live)
        if self._dirty_batches or self._dirty_members:
            self._schedule_write()

    def _hold_unrecorded_ends(self, batch_ids: set[str], member_keys: dict[str, set[int]]) -> None:
        """
        Take out of this write the members that ended with a job whose end
        the queue has not recorded yet, and the finished batches they belong
        to; they are written once it is.  Killed in between, roller finds
        the member still in flight and its job interrupted, and starts it
        once more, as for any member running at a kill: never a member
        recorded as ended beside a job that was not (its in-flight count
        after a restart or a takeover would be short of what ran).
        """
        for batch_id, positions in member_keys.items():
            live = self._live.get(batch_id)
            if live is None:
                continue
            for pos in list(positions):
                m = live.members[pos]
                if m.state.final and m.job_id is not None and self.queue.end_unrecorded(m.job_id):
                    positions.discard(pos)
                    self._held_members.setdefault(batch_id, set()).add(pos)
                    waiting = self._awaiting.setdefault(m.job_id, [])
                    waiting.append((batch_id, pos))
                    if len(waiting) == 1:
                        self.queue.wait(m.job_id).addBoth(self._end_recorded, m.job_id)
        for batch_id in list(batch_ids):
            live = self._live.get(batch_id)
            if batch_id in self._held_members and live is not None and live.batch.finished_at is not None:
                batch_ids.discard(batch_id)
                self._held_batches.add(batch_id)

    def _end_recorded(self, result: Any, job_id: str) -> None:
        """A held member's job end is written (or given up at shutdown: the member stays unwritten)."""
        for batch_id, pos in self._awaiting.pop(job_id, []):
            held = self._held_members.get(batch_id)
            if held is None or pos not in held:
                continue
            held.discard(pos)
            if not held:
                del self._held_members[batch_id]
            if isinstance(result, Failure) or batch_id not in self._live:
                continue
            self._dirty_members.setdefault(batch_id, set()).add(pos)
            if batch_id not in self._held_members and batch_id in self._held_batches:
                self._held_batches.discard(batch_id)
                self._dirty_batches.add(batch_id)
            self._schedule_write()

    def _forget(self, live: _Live) -> None:
        del self._live[live.id]
        for m in live.members:
            if m.job_id is not None:
                self._unmap(m.job_id, live.id, m.position)

    # -- for tests and metrics

    def live(self, batch_id: str) -> tuple[Batch, builtins.list[Member]] | None:
        """A batch this process runs now, and its members (None once it ended and was recorded)."""
        live = self._live.get(batch_id)
        return None if live is None else (live.batch, list(live.members))


def _matches(sel: Any, m: Machine) -> bool:
    if sel.group is not None and m.worker_group != sel.group:
        return False
    if sel.pool is not None and m.pool != sel.pool:
        return False
    if sel.tags and not set(sel.tags) <= set(m.tags):
        return False
    if sel.q is not None:
        q = sel.q.lower()
        if not any(q in (getattr(m, f) or "").lower() for f in _FILTER_FIELDS):
            return False
    return True


def _interleave(machines: Iterable[Machine]) -> list[Machine]:
    """Round-robin over pools (sorted), each pool in worker_id order: no pool is drained first."""
    pools: dict[str, list[Machine]] = {}
    for m in machines:
        pools.setdefault(m.pool or NO_POOL, []).append(m)
    queues = [deque(sorted(ms, key=lambda m: (m.worker_id, m.worker_group))) for _, ms in sorted(pools.items())]
    out: list[Machine] = []
    while queues:
        for q in queues:
            out.append(q.popleft())
        queues = [q for q in queues if q]
    return out


def _empty_message(r: Resolution) -> str:
    if not r.matched:
        return "the selector matched no machine; nothing to run"
    reasons = Counter(e.reason for e in r.excluded)
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    return (f"the selector matched {r.matched} machine(s) and all {len(r.excluded)} were excluded ({why}); "
            "nothing to run (include_loaned / include_maintenance include loaned machines and machines in "
            "maintenance)")


def _summary_view(s: BatchSummary) -> dict[str, Any]:
    """L{batch_view} without members, from the counts the store keeps."""
    out = batch_view(s.batch, [], pool_sizes=s.pool_sizes, excluded=s.excluded, with_members=False)
    total = sum(s.counts.values())
    done = sum(n for state, n in s.counts.items() if MemberState(state).final)
    out.update({
        "limits": s.batch.rollout.resolved(total, {p: s.pool_sizes.get(p, n) for p, n in s.pools.items()}),
        "counts": {st.value: s.counts.get(st.value, 0) for st in MemberState},
        "progress": 1.0 if not total else round(done / total, 4),
        "pools": dict(s.pools),
    })
    return out

