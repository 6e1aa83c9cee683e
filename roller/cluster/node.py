"""
One roller's part in a cluster of rollers sharing a PostgreSQL database.

    node = ClusterNode(store, reactor, settings)
    await node.join()                       # registered in the rollers table
    queue = JobQueue(..., cluster=node)     # starts jobs only once node.claim() says so
    node.start(queue)                       # heartbeats, takeovers, the shared queue, others' events
    ...
    await node.leave()                      # after the queue stopped

Every C{takeover_after / 3} seconds the node renews its heartbeat (its
running jobs live as long as it does) and looks for rollers silent for
C{takeover_after} seconds (or, on this host, whose process is gone): their
running jobs become C{interrupted} and they leave the table, in one
transaction only one survivor gets.  Their queued jobs need no handing over:
every C{poll_interval} the node reads the shared queue and offers the jobs
it can reach to its L{JobQueue}, which claims them (L{roller.cluster.sql.claim}).
It also reads the events other rollers wrote and hands them to the queue's
listeners, so the API's live streams and the dashboard show jobs that run
elsewhere as they happen.  L{ClusterNode.shares} says which live roller
looks after which machine's health (L{roller.cluster.shares}).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from roller.cluster import sql
from roller.cluster.shares import Shares
from roller.config import Settings
from roller.jobs import Job, JobEvent
from roller.store import StorageUnavailable, Store

if TYPE_CHECKING:
    from roller.queue import JobQueue

log = Logger()

#: events read at most per poll; and how far back each poll looks again (ids
#: are taken before their transaction commits, so a later id may show first)
EVENTS_PER_POLL = 2000
EVENT_LOOKBACK = 500
#: queued jobs read per poll
QUEUED_PER_POLL = 2000


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ClusterNode:
    def __init__(self, store: Store, clock: IReactorTime, settings: Settings, *, host: str | None = None,
                 pid: int | None = None, pid_alive: Callable[[int], bool] = _pid_alive):
        self._store = store
        self._db = store.db
        self._clock = clock
        self.takeover_after = settings.cluster_takeover_after
        self.reach = tuple(settings.cluster_reach)
        self.poll_interval = settings.cluster_poll_interval
        self.endpoint_max_running = settings.endpoint_max_running
        self.endpoint_min_interval = settings.endpoint_min_interval
        self.host = host or settings.cluster_host or socket.gethostname()
        self.sweeps = settings.health_enabled  # whether it takes a share of the health sweeps
        self.pid = os.getpid() if pid is None else pid
        self.id = f"{self.host}/{self.pid}/{uuid.uuid4().hex[:8]}"
        self._pid_alive = pid_alive
        self._queue: JobQueue | None = None
        self._beat: LoopingCall | None = None
        self._poll: LoopingCall | None = None
        self._events_after = 0
        self._floor = 0  # events up to this id were written before this roller joined
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()
        self._joined = False
        self.taken_over = 0  # rollers this node took over
        self._rollers: list[dict[str, Any]] = []  # as last read (every heartbeat)
        self._beat_ok = clock.seconds()  # when a heartbeat was last written
        self._fence_listeners: list[Callable[[str], None]] = []
        self.membership = 0  # bumped whenever the live rollers (or what they reach or do) change
        self._live_seen: list[tuple[str, tuple[str, ...], bool]] = []

    def on_fence(self, listener: Callable[[str], None]) -> None:
        """C{listener(why)} when this roller learns the others may have taken its work over (batches let go)."""
        self._fence_listeners.append(listener)

    # -- what the queue asks

    def reaches(self, worker_group: str) -> bool:
        return not self.reach or worker_group in self.reach

    def claim(self, job: Job, endpoints: tuple[str, ...], now: float) -> Deferred[str]:
        """L{sql.CLAIMED}, L{sql.GONE} or L{sql.BLOCKED} (also when another roller's claim of the machine won)."""
        d = self._db.write(sql.claim, job.id, job.worker_group, job.worker_id, endpoints, now, self.id,
                           self.endpoint_max_running, self.endpoint_min_interval)

        def raced(failure: Any) -> str:
            from roller.store.db import integrity_errors

            failure.trap(*integrity_errors())  # jobs_one_running_per_machine: another roller's claim won
            return sql.BLOCKED

        return d.addErrback(raced)

    def alone(self) -> bool:
        """No other roller is alive (as of the last heartbeat, or joining)."""
        return not [r for r in self._rollers if r["id"] != self.id and not self._dead(r)]

    def unreachable(self, worker_group: str) -> str | None:
        """
        Why a job of C{worker_group} waits, if no running roller reaches its
        group (as of the last heartbeat); None if one does.
        """
        alive = [r for r in self._rollers if r["id"] == self.id or r["silent"] <= self.takeover_after]
        if any(not r["reach"] or worker_group in r["reach"] for r in alive) or not alive:
            return None
        reaches = "; ".join(f"{r['id']}: {', '.join(r['reach'])}" for r in alive)
        return (f"waiting: no running roller reaches worker group {worker_group} ({reaches}); the job stays queued "
                "until a roller whose cluster.reach includes it runs")

    def _set_rollers(self, rollers: list[dict[str, Any]]) -> None:
        self._rollers = rollers
        seen = sorted((r["id"], tuple(r.get("reach") or ()), bool(r.get("sweeps", True))) for r in self.live())
        if seen != self._live_seen:
            self._live_seen = seen
            self.membership += 1

    def live(self) -> list[dict[str, Any]]:
        """The rollers alive as of the last look (this one always among them, with its reach)."""
        out = [r for r in self._rollers if r["id"] != self.id and not self._dead(r)]
        out.append({"id": self.id, "reach": list(self.reach), "sweeps": self.sweeps})
        return out

    def shares(self) -> Shares:
        """Who looks after which machine now (health sweeps, fitness polls, remediation): the live sweepers."""
        return Shares(self.id, [r for r in self.live() if r.get("sweeps", True)])

    def cancel_queued(self, job: Job, event: JobEvent) -> Deferred[bool]:
        return self._db.write(sql.cancel_queued, job, event)

    def unclaim(self, job_id: str) -> Deferred[bool]:
        return self._db.write(sql.unclaim, job_id, self.id)

    def request_cancel(self, job_id: str, by: str) -> Deferred[str | None]:
        """Ask the roller running C{job_id} to cancel it (it does at its next poll); its id, None if none runs it."""
        return self._db.write(sql.request_cancel, job_id, by)

    # -- membership

    async def join(self) -> None:
        await self._db.write(sql.register, self.id, self.host, self.pid, self.reach,
                             self.sweeps)
        self._events_after = self._floor = await self._db.read(sql.last_event_id)
        self._set_rollers(await self._db.read(sql.rollers))
        self._joined = True
        log.info("Joined the rollers sharing {db} as {id} (reach: {reach}; takeover after {after:g} s)",
                 db=self._db.path, id=self.id, reach=", ".join(self.reach) or "all worker groups",
                 after=self.takeover_after)

    def start(self, queue: JobQueue) -> None:
        self._queue = queue
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = self._clock
        self._beat.start(max(self.takeover_after / 3, 0.5), now=True).addErrback(
            lambda f: log.failure("Cluster heartbeat loop failed", f))
        self._poll = LoopingCall(self._look)
        self._poll.clock = self._clock
        self._poll.start(self.poll_interval, now=True).addErrback(
            lambda f: log.failure("Cluster poll loop failed", f))

    def stop_polling(self) -> None:
        """No more jobs from the shared queue (shutting down); the heartbeat goes on while jobs finish."""
        if self._poll is not None and self._poll.running:
            self._poll.stop()

    def stop(self) -> None:
        for loop in (self._beat, self._poll):
            if loop is not None and loop.running:
                loop.stop()

    async def leave(self) -> None:
        """Leave the table (after the queue stopped: its running jobs are recorded as ended)."""
        self.stop()
        if self._joined:
            self._joined = False
            try:
                # a job still marked running here (its end could not be recorded) would hold its machine for good
                left = await self._db.write(sql.take_over, self.id, "roller stopped before the end of the job was "
                                            "recorded", self._clock.seconds(), -1e12)
            except StorageUnavailable:
                return  # the others take it over after takeover_after
            if left:
                log.warn("Left the rollers with {count} job(s) still recorded as running here: marked interrupted",
                         count=len(left))

    async def _heartbeat(self) -> None:
        now = self._clock.seconds()
        try:
            if not await self._db.beat(sql.heartbeat, self.id):  # not queued behind writes waiting on locks
                log.error("Another roller took this one ({id}) over (no heartbeat for {after:g} s): its running jobs "
                          "were marked interrupted; stopping them here and joining again", id=self.id,
                          after=self.takeover_after)
                self._fence("another roller took this one over (its heartbeat stopped for cluster.takeover_after)")
                await self._db.write(sql.register, self.id, self.host, self.pid, self.reach,
                                     self.sweeps)
            self._beat_ok = now
            await self._take_over_dead()
        except StorageUnavailable:
            # logged by the store.  Silent this long, the others take this roller's jobs over: stop them
            # here too, so no machine is driven by two rollers
            if now - self._beat_ok >= self.takeover_after:
                self._fence(f"roller lost the database for {now - self._beat_ok:.0f} s (cluster.takeover_after "
                            f"= {self.takeover_after:g}): another roller may have taken its jobs over")

    def _fence(self, why: str) -> None:
        for listener in list(self._fence_listeners):
            try:
                listener(why)
            except Exception:  # noqa: BLE001 -- one listener's bug must not keep the jobs running
                log.failure("Cluster fence listener failed")
        if self._queue is not None:
            stopped = self._queue.interrupt_running(why)
            if stopped:
                log.warn("Interrupted {count} running job(s): {why}", count=stopped, why=why)

    def _dead(self, r: dict[str, Any]) -> str | None:
        """Why the registered roller C{r} counts as dead; None while it lives."""
        if r["silent"] > self.takeover_after:
            return (f"roller {r['id']} stopped (no heartbeat for {r['silent']:.0f} s; "
                    f"cluster.takeover_after = {self.takeover_after:g})")
        if r["host"] == self.host and (r["pid"] == self.pid or not self._pid_alive(r["pid"])):
            return f"roller {r['id']} stopped (its process on {self.host} is gone)"
        return None

    async def _take_over_dead(self) -> None:
        self._set_rollers(await self._db.read(sql.rollers))
        for r in self._rollers:
            if r["id"] == self.id:
                continue
            why = self._dead(r)
            if why is None:
                continue
            silent_for = self.takeover_after if r["silent"] > self.takeover_after else 0.0  # checked again, locked
            jobs = await self._db.write(sql.take_over, r["id"], why, self._clock.seconds(), silent_for)
            if jobs is None:
                continue
            self.taken_over += 1
            log.warn("Took over roller {dead}: {why}; {count} running job(s) marked interrupted, its queued jobs "
                     "run here or on the other rollers", dead=r["id"], why=why, count=len(jobs))
            if self._queue is not None:
                self._queue.pump()

    # -- the shared queue and the others' events

    async def _look(self) -> None:
        queue = self._queue
        if queue is None or not queue.accepting:
            return
        try:
            await self._store.machines.refresh()  # machines another roller added
            self._set_rollers(await self._db.read(sql.rollers))  # who runs, and what they reach
            new = queue.unknown(await self._db.read(sql.queued, self.reach, QUEUED_PER_POLL))
            if new:
                queue.adopt(await self._db.read(sql.queued_jobs, new))
            for job_id, by in await self._db.read(sql.cancels_for, self.id):
                queue.cancel_here(job_id, by)
            await self._relay_events(queue)
        except StorageUnavailable:
            pass  # logged by the store; the next poll tries again

    async def _relay_events(self, queue: JobQueue) -> None:
        after = max(self._floor, self._events_after - EVENT_LOOKBACK)
        rows = await self._db.read(sql.events_after, after, EVENTS_PER_POLL)
        for job, event, roller_id in rows:
            assert event.id is not None
            if event.id in self._seen:
                continue
            self._remember(event.id)
            if roller_id != self.id:
                queue.relay(job, event, running_here=False)
        if rows:
            self._events_after = max(self._events_after, max(e.id or 0 for _, e, _ in rows))
        while self._seen_order and self._seen_order[0] <= self._events_after - EVENT_LOOKBACK:
            self._seen.discard(self._seen_order.popleft())

    def _remember(self, event_id: int) -> None:
        self._seen.add(event_id)
        self._seen_order.append(event_id)
