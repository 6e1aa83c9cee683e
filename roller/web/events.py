"""
Live job events for browsers: an L{EventHub} fans the queue's events out to
Server-Sent Events (SSE) clients.

    hub = EventHub(queue, reactor)
    hub.start()                       # before queue.start(), to see every event
    site = RollerSite(root_resource(api, dashboard, hub))   # serves hub.resource() at /events
    ...
    hub.stop()                        # ends every stream

  - The hub subscribes to L{JobQueue.subscribe} and numbers every event it
    receives: ids increase by one.  On the wire an id is
    C{"<stream>-<n>"}: C{stream} is a random token of this hub, so an id a
    browser kept from before a restart is recognised as foreign.
  - The last C{capacity} events stay in a ring buffer.  A client that
    reconnects with C{Last-Event-ID} (browsers send it by themselves), or
    asks with C{?after=ID}, first gets the events it missed from the buffer.
    If they are no longer all there (or the id is foreign) it gets one
    C{event: reset} instead, meaning "resynchronise from the store" (the job
    page reloads itself).
  - Every C{heartbeat_interval} seconds of the injected clock each client
    gets an SSE comment, so proxies keep the connection and dead peers are
    found.
  - Writing never blocks the reactor: each client is a push producer
    registered on its request.  While the transport's buffer is full the
    client is paused and frames wait in its own queue; a client whose queue
    grows past C{max_pending_bytes}, or that stays paused longer than
    C{max_stall} seconds, is dropped (its connection aborted).  The other
    clients are not affected.

Filters (query parameters): C{job=<id>} (only that job's events),
C{kinds=state} or C{kinds=log} (only state changes or only log lines).

C{batch=<id>} streams one batch instead (the batch page), fed by
L{roller.batches.service.BatchService.subscribe} once L{EventHub.watch_batches}
was called: first the batch's whole view, then, each time it changes, its
summary and the members that changed; the stream ends (C{event: end}) once
the batch has ended.  Every (re)connection starts with the whole view, so
nothing is missed and no ids are needed::

    {"batch": {"batch_id", "state", "halt_reason", "finished", "total",
               "progress", "counts"},
     "members": [{"position", "worker_group", "worker_id", "state",
                  "task_id", "joined", "error", ...}],
     "full": true|false}

Each frame's data is one JSON object::

    {"job": {"task_id", "task_name", "worker_id", "worker_group", "state",
             "result", "error", "started", "finished"},
     "event": {"time", "kind", "message", "data"?}}
"""

from __future__ import annotations

import json
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from functools import cached_property
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from roller.errors import RollerError
from roller.jobs import Job, JobEvent, iso
from roller.queue import JobQueue
from roller.web.http import json_error, query_arg

__all__ = ["EventHub", "HubEvent", "EventStreamResource"]

log = Logger()

KINDS = ("state", "log")
_JOB_ID = re.compile(r"[-0-9A-Za-z]{1,64}")
_BATCH_ID = re.compile(r"[-_0-9A-Za-z]{1,64}")
_WIRE_ID = re.compile(r"([0-9a-f]{1,32})-([0-9]{1,18})")


@frozen
class HubEvent:
    """
    One event as the hub keeps it: its number, the job and event, and the
    encoded frame, made when a stream first needs it (most events are
    published with no dashboard watching).
    """

    id: int
    job: Job
    event: JobEvent
    wire_id: str

    @cached_property
    def frame(self) -> bytes:
        return sse_frame({"job": job_summary(self.job), "event": _event_json(self.event)}, event_id=self.wire_id)

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def kind(self) -> str:
        return self.event.kind


def job_summary(job: Job) -> dict[str, Any]:
    """The part of a job a live page needs with each event."""
    return {
        "task_id": job.id, "task_name": job.task_name, "worker_id": job.worker_id,
        "worker_group": job.worker_group, "state": job.state.value, "result": job.result,
        "error": job.error, "started": iso(job.started_at), "finished": iso(job.finished_at),
    }


def sse_frame(data: Any, *, event_id: str | None = None, event: str | None = None) -> bytes:
    """
    One SSE frame.  JSON is written with C{ensure_ascii}: no raw CR, LF or
    non-ASCII separators can end a C{data:} line early.
    """
    lines = []
    if event is not None:
        lines.append(f"event: {event}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=True))
    return ("\n".join(lines) + "\n\n").encode("ascii")


HEARTBEAT = b": heartbeat\n\n"


class EventHub:
    """
    @param queue: the L{JobQueue} (anything with C{subscribe(listener)}).
    @param clock: the injected clock (heartbeats, stall detection).
    @param capacity: events kept for catch-up.
    @param heartbeat_interval: seconds between heartbeat comments.
    @param max_clients: streams served at once; more are refused with 503.
    @param max_pending_bytes: per client, bytes queued while its connection
        is backed up before it is dropped.
    @param max_stall: seconds a client may stay backed up before it is dropped.
    @param retry_ms: the reconnection delay suggested to browsers.
    @param stream: this hub's id prefix (random by default).
    """

    def __init__(
        self,
        queue: JobQueue,
        clock: IReactorTime,
        *,
        capacity: int = 10_000,
        heartbeat_interval: float = 15.0,
        max_clients: int = 1000,
        max_pending_bytes: int = 1 << 20,
        max_stall: float = 60.0,
        retry_ms: int = 2000,
        stream: str | None = None,
    ):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.queue = queue
        self.clock = clock
        self.capacity = capacity
        self.heartbeat_interval = heartbeat_interval
        self.max_clients = max_clients
        self.max_pending_bytes = max_pending_bytes
        self.max_stall = max_stall
        self.retry_ms = retry_ms
        self.stream = stream or secrets.token_hex(4)
        if not re.fullmatch(r"[0-9a-f]{1,32}", self.stream):
            raise ValueError("stream must be 1-32 lower-case hex digits")
        self._buffer: deque[HubEvent] = deque(maxlen=capacity)
        self._last = 0
        self._everything: set[_Client] = set()  # clients without a job filter
        self._by_job: dict[str, set[_Client]] = {}
        self._by_batch: dict[str, set[_Client]] = {}
        self._batches: Any = None  # the BatchService (L{watch_batches})
        self._batch_watch: dict[str, _BatchWatch] = {}
        self._unwatch_batches: Callable[[], None] | None = None
        self._view_seq = 0
        self._unsubscribe: Callable[[], None] | None = None
        self._heartbeat: LoopingCall | None = None
        #: slow clients dropped since start (for metrics and tests)
        self.dropped = 0

    # -- lifecycle

    def start(self) -> None:
        """Subscribe to the queue and start the heartbeat."""
        if self._unsubscribe is None:
            self._unsubscribe = self.queue.subscribe(self._listen)
        if self._heartbeat is None and self.heartbeat_interval > 0:
            self._heartbeat = LoopingCall(self._beat)
            self._heartbeat.clock = self.clock
            self._heartbeat.start(self.heartbeat_interval, now=False)

    def stop(self) -> None:
        """Unsubscribe, stop the heartbeat and end every stream."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._unwatch_batches is not None:
            self._unwatch_batches()
            self._unwatch_batches = None
        if self._heartbeat is not None:
            if self._heartbeat.running:
                self._heartbeat.stop()
            self._heartbeat = None
        for client in list(self._clients()):
            client.close()

    @property
    def running(self) -> bool:
        return self._unsubscribe is not None

    # -- ids

    def wire_id(self, n: int) -> str:
        return f"{self.stream}-{n}"

    @property
    def last_id(self) -> str:
        """The wire id of the newest event (C{"<stream>-0"} before the first)."""
        return self.wire_id(self._last)

    @property
    def last_number(self) -> int:
        return self._last

    def parse_id(self, wire_id: str | None) -> int | None:
        """The number in one of this hub's wire ids; None if malformed or foreign."""
        if not wire_id:
            return None
        m = _WIRE_ID.fullmatch(wire_id.strip())
        if m is None or m.group(1) != self.stream:
            return None
        return int(m.group(2))

    # -- events in

    def _listen(self, job: Job, event: JobEvent) -> None:
        self.publish(job, event)

    def publish(self, job: Job, event: JobEvent) -> HubEvent:
        """Number, keep and fan out one event (the queue listener)."""
        self._last += 1
        n = self._last
        hub_event = HubEvent(n, job, event, self.wire_id(n))
        self._buffer.append(hub_event)
        for client in list(self._everything):
            client.offer(hub_event)
        for client in list(self._by_job.get(job.id, ())):
            client.offer(hub_event)
        return hub_event

    def recent(self, job_id: str | None = None, *, after: int = 0, upto: int | None = None) -> list[HubEvent]:
        """Buffered events (of C{job_id}) numbered above C{after} (and at most C{upto})."""
        oldest = self._buffer[0].id if self._buffer else self._last + 1
        start = max(0, after + 1 - oldest)
        out = []
        for i in range(start, len(self._buffer)):
            e = self._buffer[i]
            if upto is not None and e.id > upto:
                break
            if job_id is None or e.job.id == job_id:
                out.append(e)
        return out

    def missed(self, last_event_id: str | None) -> tuple[int, bool]:
        """
        Where a reconnecting client resumes: (number to replay after,
        complete?).  Not complete when the id is foreign, from the future,
        or older than the buffer: then the client must resynchronise.
        """
        if last_event_id is None or last_event_id.strip() == "":
            return self._last, True
        n = self.parse_id(last_event_id)
        if n is None or n > self._last:
            return self._last, False
        oldest = self._buffer[0].id if self._buffer else self._last + 1
        return n, n + 1 >= oldest

    # -- clients

    def _clients(self) -> Iterable[_Client]:
        yield from self._everything
        for clients in self._by_job.values():
            yield from clients
        for clients in self._by_batch.values():
            yield from clients

    @property
    def client_count(self) -> int:
        return (len(self._everything) + sum(len(c) for c in self._by_job.values())
                + sum(len(c) for c in self._by_batch.values()))

    def attach(self, request: Request, *, job_id: str | None = None, kinds: tuple[str, ...] = KINDS,
               last_event_id: str | None = None) -> _Client:
        """
        Start streaming to C{request}: headers, the catch-up (or a reset),
        then live events until the client goes away or the hub stops.
        """
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        client = _Client(self, request, job_id, kinds)
        (self._everything if job_id is None else self._by_job.setdefault(job_id, set())).add(client)
        request.registerProducer(client, True)
        request.notifyFinish().addBoth(lambda _: self._remove(client))
        client.send(f"retry: {self.retry_ms}\n: connected to roller\n\n".encode())
        after, complete = self.missed(last_event_id)
        if not complete:
            client.send(sse_frame(
                {"reason": "events were missed (roller restarted, or too many since); reload"},
                event="reset", event_id=self.last_id,
            ))
        else:
            for e in self.recent(job_id, after=after):
                client.offer(e)
        return client

    def _remove(self, client: _Client) -> None:
        if client.batch_id is not None:
            watchers = self._by_batch.get(client.batch_id)
            if watchers is not None:
                watchers.discard(client)
                if not watchers:
                    del self._by_batch[client.batch_id]
                    self._batch_watch.pop(client.batch_id, None)
            client.closed = True
            return
        self._everything.discard(client)
        if client.job_id is not None:
            clients = self._by_job.get(client.job_id)
            if clients is not None:
                clients.discard(client)
                if not clients:
                    del self._by_job[client.job_id]
        client.closed = True

    def _drop(self, client: _Client, why: str) -> None:
        self.dropped += 1
        log.warn("Dropped a slow live-events client {peer}: {why}", peer=client.peer, why=why)
        self._remove(client)
        client.abort()

    def _beat(self) -> None:
        now = self.clock.seconds()
        for client in list(self._clients()):
            if client.paused:
                if client.paused_since is not None and now - client.paused_since > self.max_stall:
                    self._drop(client, f"its connection has been backed up for over {self.max_stall:g} s")
            else:
                client.send(HEARTBEAT)

    # -- batches

    def watch_batches(self, batches: Any) -> None:
        """
        Serve C{?batch=} streams from C{batches} (a
        L{roller.batches.service.BatchService}: its C{subscribe} and C{view}).
        """
        if self._batches is batches:
            return
        if self._unwatch_batches is not None:
            self._unwatch_batches()
        self._batches = batches
        self._unwatch_batches = batches.subscribe(self._batch_changed)

    @property
    def batches_watched(self) -> bool:
        return self._batches is not None

    def attach_batch(self, request: Request, batch_id: str) -> _Client:
        """Stream batch C{batch_id} to C{request}: its whole view, then its changes, until it ends."""
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        client = _Client(self, request, None, (), batch_id=batch_id)
        self._by_batch.setdefault(batch_id, set()).add(client)
        request.registerProducer(client, True)
        request.notifyFinish().addBoth(lambda _: self._remove(client))
        client.send(f"retry: {self.retry_ms}\n: connected to roller\n\n".encode())
        self._snapshot(client)
        return client

    def _fetch(self, batch_id: str) -> tuple[int, Deferred[dict[str, Any] | None]]:
        self._view_seq += 1
        return self._view_seq, Deferred.fromCoroutine(self._batches.view(batch_id))

    def _snapshot(self, client: _Client) -> None:
        """The whole view to one client; it gets the changes seen after that view was asked for."""
        batch_id = client.batch_id
        assert batch_id is not None
        seq, d = self._fetch(batch_id)

        def got(view: dict[str, Any] | None) -> None:
            if client.closed:
                return
            watch = self._batch_watch.get(batch_id)
            if watch is not None and watch.sent_seq > seq:
                self._snapshot(client)  # a change was sent while this view was on its way: ask again
                return
            if view is None:
                client.send(sse_frame({"reason": f"no batch {batch_id}"}, event="end"))
                client.close()
                return
            client.view_seq = seq
            client.send(sse_frame({"batch": _batch_summary(view), "members": _members(view), "full": True}))
            if view.get("finished") is not None:
                client.send(sse_frame({"state": view.get("state")}, event="end"))
                client.close()
                return
            if batch_id not in self._batch_watch:
                self._batch_watch[batch_id] = _BatchWatch(sent_seq=seq, members=_member_map(view))

        d.addCallbacks(got, lambda f: self._view_failed(client.batch_id, f, [client]))

    def _batch_changed(self, batch_id: str) -> None:
        watch = self._batch_watch.get(batch_id)
        if watch is None or batch_id not in self._by_batch:
            return  # nobody is watching it (or its first view is still on its way, and will be fresher)
        if watch.fetching:
            watch.dirty = True
            return
        watch.fetching, watch.dirty = True, False
        seq, d = self._fetch(batch_id)

        def got(view: dict[str, Any] | None) -> None:
            clients = [c for c in self._by_batch.get(batch_id, ()) if c.view_seq is not None and c.view_seq < seq]
            watch.sent_seq = max(watch.sent_seq, seq)
            if view is None:
                for c in clients:
                    c.send(sse_frame({"reason": f"no batch {batch_id}"}, event="end"))
                    c.close()
                return
            members = _member_map(view)
            changed = [m for pos, m in members.items() if watch.members.get(pos) != m]
            watch.members = members
            frame = sse_frame({"batch": _batch_summary(view), "members": changed, "full": False})
            finished = view.get("finished") is not None
            end = sse_frame({"state": view.get("state")}, event="end") if finished else b""
            for c in clients:
                c.send(frame)
                if finished:
                    c.send(end)
                    c.close()

        def done(_: Any) -> None:
            watch.fetching = False
            if watch.dirty and self._batch_watch.get(batch_id) is watch:
                self._batch_changed(batch_id)

        d.addCallbacks(got, lambda f: self._view_failed(batch_id, f, list(self._by_batch.get(batch_id, ()))))
        d.addBoth(done)

    def _view_failed(self, batch_id: str | None, failure: Failure, clients: list[_Client]) -> None:
        log.failure("Could not read batch {batch_id} for its live stream", failure, batch_id=batch_id)
        for c in clients:  # the browser reconnects and starts over with the whole view
            c.abort()
            self._remove(c)

    # -- the web resource

    def resource(self, authorize: Callable[[IRequest], Any] | None = None) -> EventStreamResource:
        """
        The C{/events} resource.  C{authorize(request)}, if given, may return
        a Deferred; when it fails (with a L{RollerError}) the stream is refused.
        """
        return EventStreamResource(self, authorize)


@define
class _BatchWatch:
    """A watched batch: its members as last sent, and the view being fetched."""

    sent_seq: int = 0  # the newest view sent
    members: dict[int, dict[str, Any]] = field(factory=dict)
    fetching: bool = False
    dirty: bool = False  # changed while a view was on its way


_SUMMARY = ("batch_id", "state", "halt_reason", "finished", "total", "progress", "counts")


def _batch_summary(view: dict[str, Any]) -> dict[str, Any]:
    return {k: view.get(k) for k in _SUMMARY}


def _member_map(view: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {i: {"position": i, **m} for i, m in enumerate(view.get("members") or ())}


def _members(view: dict[str, Any]) -> list[dict[str, Any]]:
    return list(_member_map(view).values())


def _event_json(event: JobEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"time": iso(event.time), "kind": event.kind, "message": event.message}
    if event.data:
        out["data"] = event.data
    return out


@implementer(IPushProducer)
class _Client:
    """One SSE connection: a push producer its request pauses and resumes."""

    def __init__(self, hub: EventHub, request: Request, job_id: str | None, kinds: tuple[str, ...], *,
                 batch_id: str | None = None):
        self.hub = hub
        self.request = request
        self.job_id = job_id
        self.kinds = kinds
        self.batch_id = batch_id
        self.view_seq: int | None = None  # the batch view it has (None: not yet)
        self.paused = False
        self.paused_since: float | None = None
        self.pending: deque[bytes] = deque()
        self.pending_bytes = 0
        self.closed = False
        peer = request.getClientAddress()
        self.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"

    def offer(self, e: HubEvent) -> None:
        if e.kind in self.kinds and (self.job_id is None or e.job.id == self.job_id):
            self.send(e.frame)

    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        if self.paused or self.pending:
            self.pending.append(frame)
            self.pending_bytes += len(frame)
            if self.pending_bytes > self.hub.max_pending_bytes:
                self.hub._drop(self, f"more than {self.hub.max_pending_bytes} bytes waiting to be sent")
            return
        self.request.write(frame)

    # IPushProducer: called by the HTTP channel as its transport fills and drains

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.paused_since = self.hub.clock.seconds()

    def resumeProducing(self) -> None:
        self.paused = False
        self.paused_since = None
        # Each write may pause us again; keep the rest for the next resume.
        while self.pending and not self.paused and not self.closed:
            frame = self.pending.popleft()
            self.pending_bytes -= len(frame)
            self.request.write(frame)

    def stopProducing(self) -> None:
        self.hub._remove(self)

    # ending

    def close(self) -> None:
        """End the stream cleanly (the hub is stopping)."""
        self.hub._remove(self)
        self.pending.clear()
        request = self.request
        if getattr(request, "_disconnected", False) or getattr(request, "finished", False):
            return
        try:
            request.unregisterProducer()
            request.finish()
        except Exception:  # noqa: BLE001 -- closing one stream must not stop the hub closing the others
            log.failure("Could not end a live-events stream")

    def abort(self) -> None:
        """Drop the connection now, discarding whatever is buffered."""
        self.pending.clear()
        self.pending_bytes = 0
        channel = getattr(self.request, "channel", None)
        transport = getattr(channel, "transport", None)
        if transport is None:
            return
        abort = getattr(transport, "abortConnection", None)
        (abort or transport.loseConnection)()


class EventStreamResource(Resource):
    """
    C{GET /events[?job=ID][&kinds=state,log][&after=ID]}: the SSE stream.
    C{Last-Event-ID} (sent by browsers when they reconnect) wins over C{after}.
    """

    isLeaf = True

    def __init__(self, hub: EventHub, authorize: Callable[[IRequest], Any] | None = None):
        super().__init__()
        self.hub = hub
        self.authorize = authorize

    def render_GET(self, request: Request) -> bytes | int:
        try:
            job_id, kinds, after = self._parse(request)
            batch_id = query_arg(request, "batch") or None
            if batch_id is not None:
                if not _BATCH_ID.fullmatch(batch_id) or job_id is not None:
                    raise RollerError("batch must be a batch id (and no job with it)", code="invalid_query")
                if not self.hub.batches_watched:
                    raise RollerError("batches are not running in this roller", code="not_found", status=404)
        except RollerError as e:
            return json_error(request, e.status, e.code, e.message)
        if self.hub.client_count >= self.hub.max_clients:
            request.setHeader(b"Retry-After", b"30")
            return json_error(request, 503, "too_many_streams",
                              f"roller is serving {self.hub.max_clients} live streams already; try again later")
        last = request.getHeader(b"last-event-id")
        last_id = last.decode("latin-1") if last is not None else after
        d = maybeDeferred(self.authorize, request) if self.authorize is not None else None
        def attach() -> None:
            if batch_id is not None:
                self.hub.attach_batch(request, batch_id)
            else:
                self.hub.attach(request, job_id=job_id, kinds=kinds, last_event_id=last_id)

        if d is None:
            attach()
            return NOT_DONE_YET

        def allowed(_: Any) -> None:
            if getattr(request, "_disconnected", False):
                return
            attach()

        def refused(failure: Failure) -> None:
            if getattr(request, "_disconnected", False):
                return
            if isinstance(failure.value, RollerError):
                e = failure.value
                body = json_error(request, e.status, e.code, e.message)
            else:
                log.failure("Live-events authorization failed", failure)
                body = json_error(request, 500, "internal", "internal error; see the server log")
            request.write(body)
            request.finish()

        d.addCallbacks(allowed, refused)
        d.addErrback(lambda f: log.failure("Could not start a live-events stream", f))
        return NOT_DONE_YET

    def render_HEAD(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return b""

    @staticmethod
    def _parse(request: IRequest) -> tuple[str | None, tuple[str, ...], str | None]:
        def arg(name: str) -> str | None:
            return query_arg(request, name)

        job_id = arg("job") or None
        if job_id is not None and not _JOB_ID.fullmatch(job_id):
            raise RollerError("job must be a job id", code="invalid_query")
        kinds: tuple[str, ...] = KINDS
        raw = arg("kinds")
        if raw:
            kinds = tuple(k for k in raw.split(",") if k)
            bad = [k for k in kinds if k not in KINDS]
            if bad or not kinds:
                raise RollerError(f"kinds must be a comma-separated list of {', '.join(KINDS)}",
                                  code="invalid_query")
        after = arg("after") or None
        return job_id, kinds, after
