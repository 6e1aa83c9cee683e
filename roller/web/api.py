"""
The REST API (Klein): the contract Taskcluster action buttons, hooks and
scripts call.  See C{roller/web/openapi.py} for the published document.

Every error is C{{"error": code, "message": ...}} with its status.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

from attrs import define, field
from klein import Klein
from twisted.internet.defer import TimeoutError as WriteTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound

from roller import __version__
from roller.auth import IAuthenticator, Principal
from roller.batches.model import Batch, parse_request
from roller.batches.service import BatchService
from roller.errors import BadRequest, Conflict, Forbidden, NotFound, RollerError, Unauthorized
from roller.health.watcher import HealthWatcher
from roller.inventory import Machine, valid_worker_id
from roller.jobs import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN, State, iso
from roller.json_input import JSONInputError, JSONTooDeep, load_json
from roller.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from roller.metrics import Metrics
from roller.queue import JobQueue
from roller.store import AuditEntry, StorageUnavailable, Store
from roller.store.fleet import HEALTH_STATES
from roller.tasks import TaskRegistry
from roller.version import load_version
from roller.web.http import json_error, query_arg
from roller.web.openapi import openapi_document
from roller.web.proxy import client_ip, parse_trusted_proxies, request_target

log = Logger()

JSON_TYPES = ("application/json",)
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"
#: methods that change nothing; every other one is refused cross-site (L{cross_site_refusal})
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
#: the content types a page on another site may POST without a CORS preflight
SIMPLE_TYPES = frozenset({b"application/x-www-form-urlencoded", b"multipart/form-data", b"text/plain"})


def origin_key(url: str) -> tuple[str, str, int] | None:
    """
    (scheme, host, port) of an http(s) URL or an C{Origin} value, for
    comparing origins (host in lower case, default ports filled in); None
    for anything else (C{null}, another scheme, garbage).
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


def cross_site_refusal(request: IRequest, allowed: frozenset) -> tuple[int, str, str] | None:
    """
    Why a request that may change something must be refused as coming from
    a page on another site (the status, code and message), or None.

    A browser marks what a page makes it send: C{Origin} on every POST, PUT
    and DELETE (C{null} when it hides it), C{Sec-Fetch-Site} on every
    request.  So a mutating request is refused when its C{Origin} is present
    and neither roller's own origin (the scheme and C{Host} it was reached
    at), nor C{public_url}'s, nor one of C{cors_origins} (C{allowed}); or,
    without C{Origin}, when C{Sec-Fetch-Site} says C{cross-site} or
    C{same-site} (another origin on the same site: another port on the same
    host is one).  And a POST body a page could send without a preflight (a
    form or C{text/plain}) is refused on these JSON routes.  curl, scripts
    and Taskcluster's clients send neither header and no such body:
    unaffected.  Safe methods (GET, HEAD, OPTIONS) are never refused here.
    """
    if request.method in SAFE_METHODS:
        return None
    origin = request.getHeader(b"origin")
    if origin is not None:
        text = origin.decode("latin-1")
        key = origin_key(text)
        if key is None or key not in allowed and key != _own_origin(request):
            return (403, "cross_site_request",
                    f"a page from another origin ({text[:100]}) may not change anything here; only roller's "
                    "own origin, server.public_url and server.cors_origins may")
    else:
        site = (request.getHeader(b"sec-fetch-site") or b"").strip().lower()
        if site in (b"cross-site", b"same-site"):
            return (403, "cross_site_request",
                    f"a page from another origin (Sec-Fetch-Site: {site.decode('latin-1')}) may not change "
                    "anything here")
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if request.method == b"POST" and ctype in SIMPLE_TYPES and _has_body(request):
        return (415, "unsupported_media_type",
                f"a {ctype.decode('latin-1')} body is not accepted here; send JSON (Content-Type: application/json)")
    return None


def _own_origin(request: IRequest) -> tuple[str, str, int] | None:
    host = request.getHeader(b"host")
    if not host:
        return None
    return origin_key(("https://" if request.isSecure() else "http://") + host.decode("latin-1"))


def _has_body(request: IRequest) -> bool:
    content = request.content
    if content is None:
        return False
    try:
        position = content.tell()
        content.seek(0, 2)
        size = content.tell()
        content.seek(position)
    except (OSError, ValueError):
        return True
    return size > 0


def _json(request: IRequest, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode()


_INTEGER = re.compile(r"-?[0-9]+")


def _int_arg(request: IRequest, name: str, default: int, low: int, high: int) -> int:
    raw = query_arg(request, name)
    if raw is None or raw == "":
        return default
    try:
        if not _INTEGER.fullmatch(raw):  # int() alone also takes " 7", "+7", "1_0" and "٧"
            raise ValueError(raw)
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw[:40]!r}", code="invalid_query") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be from {low} to {high}, got {value}", code="invalid_query")
    return value


def _worker_id(value: str | None, what: str = "worker_id") -> str:
    if value is None or value == "":
        raise BadRequest(f"{what} is required", code="missing_parameter")
    if not valid_worker_id(value):
        raise BadRequest(
            f"{what} {value[:140]!r} must be 1-128 characters of letters, digits, '-' and '_'",
            code="invalid_worker_id",
        )
    return value


def _json_number(text: str) -> int | float:
    """
    A JSON number written with a fraction or exponent: an C{int} when its
    value is integral.  JSON (and JSON Schema's C{integer}) does not tell
    C{1.0} from C{1}, so neither do the validators behind the API.
    """
    value = float(text)
    return int(value) if value.is_integer() else value


def _body(request: IRequest, *, required: bool = False) -> Any:
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        if required:
            raise BadRequest("a JSON body is required", code="missing_body")
        return None
    ctype = (request.getHeader(b"content-type") or b"application/json").split(b";")[0].strip().lower()
    if ctype.decode("latin-1") not in JSON_TYPES:
        raise BadRequest("the body must be JSON (Content-Type: application/json)", code="unsupported_media_type",
                         status=415)
    try:
        return load_json(raw, parse_float=_json_number)
    except JSONTooDeep as e:  # valid or not, more nesting than roller reads
        raise BadRequest(f"the body is refused: {e}"[:200], code="bad_json") from None
    except JSONInputError as e:
        raise BadRequest(f"the body is not valid JSON: {e}"[:200], code="invalid_json") from None


def _health_states(value: str | None) -> frozenset[str] | None:
    """C{?health=down,degraded}: the states asked for, or None for no filter; 400 for an unknown one."""
    if not value:
        return None
    names = value.split(",")
    states = frozenset(names)
    unknown = sorted(repr(n) if not n else n for n in states - set(HEALTH_STATES))
    if unknown:
        raise BadRequest(f"health: unknown state(s) {', '.join(unknown)[:200]} (known: {', '.join(HEALTH_STATES)})",
                         code="invalid_query")
    return states


def _check_reason(reason: str) -> str:
    if len(reason) > 1000:
        raise BadRequest("reason must be at most 1000 characters", code="invalid_body")
    return reason


_BATCH_ID = re.compile(r"[-_0-9a-zA-Z]{1,64}")


def _batch_id(value: str | None) -> str | None:
    """C{?batch_id=}: None when absent or empty; 400 for a value no batch can have."""
    if not value:
        return None
    if not _BATCH_ID.fullmatch(value):
        raise BadRequest(f"batch_id {value[:70]!r} is not a batch id (1-64 letters, digits, '-' and '_')",
                         code="invalid_query")
    return value


def _flag(request: IRequest, name: str, true: tuple[str, ...] = ("true", "1"), default: bool = False) -> bool:
    """A boolean query parameter: C{false} or C{0} is false, one of C{true} is true; absent or empty: C{default}."""
    raw = (query_arg(request, name) or "").lower()
    if raw == "":
        return default
    if raw in ("false", "0"):
        return False
    if raw in true:
        return True
    raise BadRequest(f"{name} must be {' or '.join(true)} or false, got {raw[:40]!r}", code="invalid_query")


#: /__heartbeat__ waits this long (seconds) for its database write.
HEARTBEAT_WRITE_TIMEOUT = 3.0


@define
class Api:
    store: Store
    queue: JobQueue
    tasks: TaskRegistry
    authenticator: IAuthenticator
    allowed_tasks: tuple[str, ...]
    scope_prefix: str = "project:releng:roller:"
    cors_origins: tuple[str, ...] = ()
    clock: IReactorTime = field(kw_only=True)
    openapi: dict = field(factory=dict)
    #: Peers (IPs/CIDRs) whose X-Forwarded-For names the client (origin_ip, audit).
    trusted_proxies: tuple = field(default=(), converter=parse_trusted_proxies)
    #: What GET /metrics serves; by default one of its own, observing C{queue}
    #: (without the reactor lag loop, which whoever owns the reactor starts).
    metrics: Metrics | None = field(default=None, kw_only=True)
    #: /__heartbeat__ fails when the measured reactor lag is above this (seconds).
    max_lag: float = field(default=5.0, kw_only=True)
    #: What /__version__ answers (L{roller.version.load_version}).
    version_info: dict = field(factory=load_version, kw_only=True)
    #: roller's public URL (C{server.public_url}): its origin may send mutating requests.
    public_url: str = field(default="", kw_only=True)
    #: fleet health (L{roller.health.watcher.HealthWatcher}), when the service runs one
    health: HealthWatcher | None = field(default=None, kw_only=True)
    #: batches (L{roller.batches.service.BatchService}), when the service runs them
    batches: BatchService | None = field(default=None, kw_only=True)
    _allowed_origins: frozenset = field(init=False, factory=frozenset)

    app = Klein()
    # "/a//b" is not "/a/b": no merging (werkzeug answers 308 for it, which
    # Klein sends without a Location), just 404
    app.url_map.merge_slashes = False

    def __attrs_post_init__(self) -> None:
        if not self.openapi:
            self.openapi = openapi_document(self.tasks, self.allowed_tasks, __version__)
        if self.metrics is None:
            self.metrics = Metrics(self.queue, self.clock)
        self._allowed_origins = frozenset(
            k for k in map(origin_key, (*self.cors_origins, self.public_url)) if k is not None)

    # -- plumbing

    @app.handle_errors(RollerError)
    def _roller_error(self, request: IRequest, failure: Any) -> bytes:
        e = failure.value
        if isinstance(e, Unauthorized):
            request.setHeader(b"WWW-Authenticate", b"Hawk")
        retry_after = getattr(e, "retry_after", None)  # StorageUnavailable: 503 storage_unavailable
        if retry_after is not None:
            request.setHeader(b"Retry-After", str(int(retry_after)).encode())
        return json_error(request, e.status, e.code, e.message)

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request: IRequest, failure: Any) -> bytes:
        allowed = sorted(set(failure.value.valid_methods or ()))
        request.setHeader(b"Allow", ", ".join(allowed).encode())
        method = request.method.decode("latin-1", "replace")
        return json_error(request, 405, "method_not_allowed",
                          f"{method} is not allowed here; allowed: {', '.join(allowed)}")

    @app.handle_errors(RouteNotFound)
    def _route_not_found(self, request: IRequest, failure: Any) -> bytes:
        return json_error(request, 404, "not_found", f"no such resource: {request.path.decode('latin-1')[:200]}")

    @app.handle_errors(HTTPException)
    def _http_exception(self, request: IRequest, failure: Any) -> bytes:
        e = failure.value
        if e.code is None or e.code < 400:  # a routing redirect: the API names each resource one way
            return self._route_not_found(request, failure)
        return json_error(request, e.code, "bad_request", e.description or e.name)

    def _cors(self, request: IRequest) -> bool:
        """
        CORS headers for an allowed C{Origin} (True if it is one); first of
        all, a request that would change something from a page on another
        site is refused (L{cross_site_refusal}).  Every route calls this first.
        """
        refusal = cross_site_refusal(request, self._allowed_origins)
        if refusal is not None:
            raise RollerError(refusal[2], code=refusal[1], status=refusal[0])
        origin = request.getHeader(b"origin")
        request.setHeader(b"Vary", b"Origin")
        if origin is None:
            return False
        origin_s = origin.decode("latin-1")
        if origin_s in self.cors_origins:
            request.setHeader(b"Access-Control-Allow-Origin", origin)
            return True
        return False

    def _preflight(self, request: IRequest) -> bytes:
        if self._cors(request):
            request.setHeader(b"Access-Control-Allow-Methods", CORS_METHODS.encode())
            request.setHeader(b"Access-Control-Allow-Headers", CORS_HEADERS.encode())
            request.setHeader(b"Access-Control-Max-Age", b"600")
        request.setResponseCode(204)
        return b""

    def _client_ip(self, request: IRequest) -> str | None:
        return client_ip(request, self.trusted_proxies)

    async def _authorize(self, request: IRequest, scope: str, *more: str) -> Principal:
        """The principal, which must hold C{scope} and every one of C{more} (a 403 names the first it lacks)."""
        try:
            target = request_target(request, self.trusted_proxies)
        except BadRequest:
            # a target or Host roller cannot read: the authenticator reads the request itself
            # and refuses it in its own order (no credentials first)
            target = None
        principal = await self.authenticator.authenticate(request, target)
        for required in (scope, *more):
            if not principal.has_scope(required):  # the message says if authorizedScopes removed it
                raise Forbidden(principal.lacks(required), code="insufficient_scope")
        return principal

    async def _audit(self, principal: Principal, request: IRequest, action: str, target: str,
                     result: str, params: dict | None = None) -> None:
        await self.store.audit.add(AuditEntry(
            time=self.clock.seconds(), actor=principal.id, source_ip=self._client_ip(request),
            action=action, target=target, params=params, result=result,
        ))

    # -- jobs

    @app.route("/api/v1/workers/<worker_id>/group/<worker_group>/jobs", methods=["POST"])
    async def post_worker_job(self, request: IRequest, worker_id: str, worker_group: str) -> bytes:
        self._cors(request)
        _worker_id(worker_id, "worker_id")
        _worker_id(worker_group, "worker_group")

        async def find() -> Machine:
            machine = await self.store.machines.get(worker_group, worker_id)
            if machine is None:
                raise NotFound(f"no machine {worker_id} in worker group {worker_group}", code="unknown_machine")
            return machine

        return await self._submit(request, find, {})

    @app.route("/api/v1/workers/<worker_id>/group/<worker_group>/jobs", methods=["OPTIONS"])
    def options_worker_job(self, request: IRequest, worker_id: str, worker_group: str) -> bytes:
        return self._preflight(request)

    @app.route("/api/v1/jobs", methods=["POST"])
    async def post_job(self, request: IRequest) -> bytes:
        self._cors(request)
        worker_id = _worker_id(query_arg(request, "tc_worker_id"), "tc_worker_id")

        async def find() -> Machine:
            machines = await self.store.machines.by_worker_id(worker_id)
            if not machines:
                raise NotFound(f"no machine has worker id {worker_id}", code="unknown_machine")
            if len(machines) > 1:
                groups = ", ".join(m.worker_group for m in machines)
                raise Conflict(
                    f"worker id {worker_id} is in several worker groups ({groups}); use "
                    f"POST /api/v1/workers/{worker_id}/group/<worker_group>/jobs",
                    code="ambiguous_worker",
                )
            return machines[0]

        return await self._submit(request, find, {"tc_worker_id": worker_id})

    @app.route("/api/v1/jobs", methods=["OPTIONS"])
    def options_jobs(self, request: IRequest) -> bytes:
        return self._preflight(request)

    async def _submit(self, request: IRequest, find: Callable[[], Awaitable[Machine]], extra: dict) -> bytes:
        task_name = query_arg(request, "task_name")
        if not task_name:
            raise BadRequest("task_name is required", code="missing_parameter")
        spec = self.tasks.get(task_name)
        if spec is None:
            raise BadRequest(f"unknown task {task_name[:64]!r}; see GET /api/v1/tasks", code="unknown_task")
        if task_name not in self.allowed_tasks:
            raise BadRequest(f"task {task_name} is not allowed on this roller", code="task_not_allowed")
        priority = _int_arg(request, "priority", PRIORITY_DEFAULT, PRIORITY_MIN, PRIORITY_MAX)
        reason = query_arg(request, "reason") or ""
        _check_reason(reason)
        body = _body(request)
        params = None
        if body is not None:
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object", code="invalid_body")
            unknown = sorted(set(body) - {"params", "reason", "priority"})
            if unknown:
                raise BadRequest(f"unknown body field(s): {', '.join(unknown)}"[:200], code="invalid_body")
            params = body.get("params")
            if "reason" in body:
                if not isinstance(body["reason"], str):
                    raise BadRequest("reason must be a string", code="invalid_body")
                reason = _check_reason(body["reason"])
            if "priority" in body:
                p = body["priority"]
                if isinstance(p, bool) or not isinstance(p, int) or not PRIORITY_MIN <= p <= PRIORITY_MAX:
                    raise BadRequest(f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}",
                                     code="invalid_body")
                priority = p
        principal = await self._authorize(request, self.scope_prefix + task_name)
        machine = await find()
        target = f"{machine.worker_group}/{machine.worker_id}"
        job, created = await self.queue.submit(
            task_name, machine, params=params, requester=principal.id,
            origin_ip=self._client_ip(request), reason=reason, priority=priority,
            audit=lambda job: AuditEntry(
                time=job.created_at, actor=principal.id, source_ip=job.origin_ip,
                action=f"job.create:{task_name}", target=target, result=f"queued {job.id}",
                params={"params": job.params, "priority": priority, "reason": reason},
            ),
        )
        request.setHeader(b"Location", f"/api/v1/jobs/{job.id}".encode())
        body = {"task_name": task_name, "worker_id": machine.worker_id,
                "worker_group": machine.worker_group, "task_id": job.id, **extra,
                "state": job.state.value}
        return _json(request, body, 201 if created else 200)

    @app.route("/api/v1/jobs/<task_id>", methods=["GET"])
    async def get_job(self, request: IRequest, task_id: str) -> bytes:
        self._cors(request)
        await self._authorize(request, self.scope_prefix + "jobs:read")
        job = self.queue.active(task_id) or await self.store.jobs.get(task_id)
        if job is None:
            raise NotFound(f"no job {task_id[:64]}", code="unknown_job")
        # events not yet written (in flight, or held while the database refuses writes): taken before
        # the read too, so one written meanwhile is in the read or in this list, never in neither
        before = self.queue.unrecorded_events(task_id)
        events = await self.store.jobs.events(task_id, limit=1000)
        stored = {(e.time, e.kind, e.message) for e in events}
        for e in before + self.queue.unrecorded_events(task_id):
            key = (e.time, e.kind, e.message)
            if key not in stored:
                stored.add(key)
                events.append(e)
        return _json(request, {**job.to_json(), "events": [e.to_json() for e in events]})

    @app.route("/api/v1/jobs/<task_id>", methods=["DELETE"])
    async def delete_job(self, request: IRequest, task_id: str) -> bytes:
        self._cors(request)
        principal = await self._authorize(request, self.scope_prefix + "jobs:cancel")
        job = await self.queue.cancel(task_id, by=principal.id)
        await self._audit(principal, request, "job.cancel", f"{job.worker_group}/{job.worker_id}",
                          f"{job.state.value} {job.id}")
        return _json(request, job.to_json())

    @app.route("/api/v1/jobs/<task_id>", methods=["OPTIONS"])
    def options_job(self, request: IRequest, task_id: str) -> bytes:
        return self._preflight(request)

    @app.route("/api/v1/jobs", methods=["GET"])
    async def list_jobs(self, request: IRequest) -> bytes:
        self._cors(request)
        await self._authorize(request, self.scope_prefix + "jobs:read")
        states = []
        for raw in (query_arg(request, "state") or "").split(","):
            if raw:
                try:
                    states.append(State(raw))
                except ValueError:
                    raise BadRequest(
                        f"state {raw[:40]!r} is not one of {', '.join(s.value for s in State)}",
                        code="invalid_query") from None
        worker_id = query_arg(request, "worker_id")
        worker_group = query_arg(request, "worker_group")
        if worker_id is not None:
            _worker_id(worker_id)
        if worker_group is not None:
            _worker_id(worker_group, "worker_group")
        task_name = query_arg(request, "task_name")
        batch_id = _batch_id(query_arg(request, "batch_id"))
        limit = _int_arg(request, "limit", 50, 1, 1000)
        before = query_arg(request, "before")
        before_seq = None
        if before:
            before_seq = _int_arg(request, "before", 0, 1, 2**62)
        jobs = await self.store.jobs.list(
            worker_id=worker_id, worker_group=worker_group, task_name=task_name,
            states=states, before=before_seq, limit=limit, batch_id=batch_id,
        )
        live = [self.queue.active(j.id) or j for j in jobs]
        if states:  # a job whose end is not recorded yet is listed as what it is now
            live = [j for j in live if j.state in states]
        next_before = jobs[-1].seq if len(jobs) == limit else None
        return _json(request, {"jobs": [j.to_json() for j in live], "next_before": next_before})

    # -- batches

    def _batches(self) -> BatchService:
        if self.batches is None:  # an API built without the service's batches (tests, tools)
            raise NotFound("batches are not part of this API", code="not_found")
        return self.batches

    @app.route("/api/v1/batches", methods=["POST"])
    async def post_batch(self, request: IRequest) -> bytes:
        self._cors(request)
        service = self._batches()
        dry_run = _flag(request, "dry_run")
        body = _body(request, required=True)
        batch = parse_request(body, tasks=self.tasks, allowed_tasks=self.allowed_tasks, defaults=service.defaults)
        task_name = batch.task_name
        # both scopes before the selector is resolved: a refused request learns nothing about the fleet
        principal = await self._authorize(request, self.scope_prefix + task_name,
                                          self.scope_prefix + "batches:create")
        if dry_run:
            return _json(request, service.dry_run(batch, await service.resolve(batch)))
        origin_ip = self._client_ip(request)

        def audit(created: Batch) -> AuditEntry:
            return AuditEntry(
                time=created.created_at, actor=principal.id, source_ip=origin_ip,
                action=f"batch.create:{task_name}", target=f"batch/{created.id}",
                result=f"created {created.id}: {created.total} member(s)",
                params={"params": created.params, "selector": created.selector.to_json(),
                        "rollout": created.rollout.to_json(), "priority": created.priority,
                        "reason": created.reason},
            )

        view = await service.create(batch, requester=principal.id, origin_ip=origin_ip, audit=audit)
        request.setHeader(b"Location", f"/api/v1/batches/{quote(view['batch_id'])}".encode())
        return _json(request, view, 201)

    @app.route("/api/v1/batches", methods=["GET"])
    async def list_batches(self, request: IRequest) -> bytes:
        self._cors(request)
        service = self._batches()
        limit = _int_arg(request, "limit", 50, 1, 1000)
        before = _int_arg(request, "before", 0, 1, 2**62) if query_arg(request, "before") else None
        await self._authorize(request, self.scope_prefix + "jobs:read")
        batches, next_before = await service.list(limit=limit, before=before)
        return _json(request, {"batches": batches, "next_before": next_before})

    @app.route("/api/v1/batches", methods=["OPTIONS"])
    def options_batches(self, request: IRequest) -> bytes:
        return self._preflight(request)

    @app.route("/api/v1/batches/<batch_id>", methods=["GET"])
    async def get_batch(self, request: IRequest, batch_id: str) -> bytes:
        self._cors(request)
        service = self._batches()
        members = _flag(request, "members", default=True)
        await self._authorize(request, self.scope_prefix + "jobs:read")
        view = await service.view(batch_id, members=members) if _BATCH_ID.fullmatch(batch_id) else None
        if view is None:
            raise NotFound(f"no batch {batch_id[:64]}", code="unknown_batch")
        return _json(request, view)

    @app.route("/api/v1/batches/<batch_id>", methods=["DELETE"])
    async def delete_batch(self, request: IRequest, batch_id: str) -> bytes:
        self._cors(request)
        service = self._batches()
        running = _flag(request, "running", ("cancel", "true", "1"))
        principal = await self._authorize(request, self.scope_prefix + "jobs:cancel")
        if not _BATCH_ID.fullmatch(batch_id):
            raise NotFound(f"no batch {batch_id[:64]}", code="unknown_batch")
        view = await service.cancel(batch_id, by=principal.id, running=running)
        counts = view.get("counts", {})
        await self._audit(principal, request, "batch.cancel", f"batch/{batch_id}",
                          f"{view.get('state')} {batch_id}: {counts.get('skipped', 0)} skipped, "
                          f"{counts.get('cancelled', 0)} cancelled", {"running": running})
        return _json(request, view)

    @app.route("/api/v1/batches/<batch_id>", methods=["OPTIONS"])
    def options_batch(self, request: IRequest, batch_id: str) -> bytes:
        return self._preflight(request)

    # -- audit

    @app.route("/api/v1/audit", methods=["GET"])
    async def list_audit(self, request: IRequest) -> bytes:
        self._cors(request)
        target = query_arg(request, "target")
        limit = _int_arg(request, "limit", 100, 1, 1000)
        before = query_arg(request, "before")
        before_id = _int_arg(request, "before", 0, 1, 2**62) if before else None
        await self._authorize(request, self.scope_prefix + "audit:read")
        entries = await self.store.audit.list(target=target, before=before_id, limit=limit)
        next_before = entries[-1].id if len(entries) == limit else None
        return _json(request, {"entries": [e.to_json() for e in entries], "next_before": next_before})

    # -- loans

    @app.route("/api/v1/loans", methods=["GET"])
    async def list_loans(self, request: IRequest) -> bytes:
        self._cors(request)
        flags = {}
        for name in ("active", "overdue"):
            raw = (query_arg(request, name) or "").lower()
            if raw not in ("", "true", "false", "1", "0"):
                raise BadRequest(f"{name} must be true or false", code="invalid_query")
            flags[name] = None if raw == "" else raw in ("true", "1")
        group, worker = query_arg(request, "worker_group"), query_arg(request, "worker_id")
        if group is not None:
            _worker_id(group, "worker_group")
        if worker is not None:
            _worker_id(worker)
        limit = _int_arg(request, "limit", 100, 1, 1000)
        offset = _int_arg(request, "offset", 0, 0, 10**9)
        await self._authorize(request, self.scope_prefix + "loans:read")
        now = self.clock.seconds()
        loans = await self.store.loans.list(
            active=flags["active"], overdue_at=now if flags["overdue"] else None, worker_group=group,
            worker_id=worker, limit=limit, offset=offset)
        if flags["overdue"] is False:
            loans = [loan for loan in loans if not loan.overdue(now)]
        return _json(request, {"loans": [loan.to_json(now) for loan in loans], "offset": offset, "limit": limit})

    # -- tasks

    @app.route("/api/v1/tasks", methods=["GET"])
    def list_tasks(self, request: IRequest) -> bytes:
        self._cors(request)
        return _json(request, {"tasks": [t.to_json(t.name in self.allowed_tasks) for t in self.tasks]})

    # -- machines

    @app.route("/api/v1/machines", methods=["GET"])
    async def list_machines(self, request: IRequest) -> bytes:
        self._cors(request)
        await self._authorize(request, self.scope_prefix + "machines:read")
        group = query_arg(request, "worker_group")
        if group is not None:
            _worker_id(group, "worker_group")
        limit = _int_arg(request, "limit", 100, 1, 1000)
        offset = _int_arg(request, "offset", 0, 0, 10**9)
        pool, q = query_arg(request, "pool"), query_arg(request, "q")
        states = _health_states(query_arg(request, "health"))
        if states is None:
            machines = await self.store.machines.list(worker_group=group, pool=pool, q=q, limit=limit, offset=offset)
        else:
            watcher = self._health()
            needle = (q or "").lower()
            wanted = [m for m in self.store.machines.snapshot()
                      if (group is None or m.worker_group == group) and (pool is None or m.pool == pool)
                      and (not needle or any(needle in (v or "").lower() for v in (m.worker_id, m.fqdn, m.ip)))
                      and watcher.state_of(m.key) in states]
            machines = sorted(wanted, key=lambda m: m.key)[offset:offset + limit]
        return _json(request, {"machines": [m.to_json() for m in machines], "offset": offset, "limit": limit})

    # -- fleet health

    def _health(self) -> HealthWatcher:
        if self.health is None:  # an API built without the service's watcher (tests, tools)
            raise NotFound("fleet health is not part of this API", code="not_found")
        return self.health

    @app.route("/api/v1/health", methods=["GET"])
    async def get_health(self, request: IRequest) -> bytes:
        self._cors(request)
        await self._authorize(request, self.scope_prefix + "health:read")
        return _json(request, self._health().status())

    @app.route("/api/v1/health/pause", methods=["POST"])
    async def pause_health(self, request: IRequest) -> bytes:
        return await self._set_paused(request, True)

    @app.route("/api/v1/health/resume", methods=["POST"])
    async def resume_health(self, request: IRequest) -> bytes:
        return await self._set_paused(request, False)

    async def _set_paused(self, request: IRequest, paused: bool) -> bytes:
        self._cors(request)
        principal = await self._authorize(request, self.scope_prefix + "health:admin")
        watcher = self._health()
        await watcher.set_paused(paused, principal.id, source_ip=self._client_ip(request))
        return _json(request, watcher.status())

    @app.route("/api/v1/machines/<worker_group>/<worker_id>/health", methods=["GET"])
    async def get_machine_health(self, request: IRequest, worker_group: str, worker_id: str) -> bytes:
        self._cors(request)
        await self._authorize(request, self.scope_prefix + "health:read")
        machine = await self._machine(worker_group, worker_id)
        return _json(request, await self._machine_health(machine))

    @app.route("/api/v1/machines/<worker_group>/<worker_id>/maintenance", methods=["PUT"])
    async def put_maintenance(self, request: IRequest, worker_group: str, worker_id: str) -> bytes:
        self._cors(request)
        _worker_id(worker_group, "worker_group")
        _worker_id(worker_id)
        principal = await self._authorize(request, self.scope_prefix + "health:admin")
        body = _body(request, required=True)
        if not isinstance(body, dict) or not isinstance(body.get("maintenance"), bool) \
                or set(body) - {"maintenance", "reason"}:
            raise BadRequest('the body must be {"maintenance": true|false, "reason": "..."}', code="invalid_body")
        reason = _check_reason(body.get("reason") or "") if isinstance(body.get("reason", ""), str) else None
        if reason is None:
            raise BadRequest("reason must be a string", code="invalid_body")
        machine = await self._machine(worker_group, worker_id)
        watcher = self._health()
        await watcher.set_maintenance(machine.key, body["maintenance"], principal.id, reason,
                                      source_ip=self._client_ip(request))
        return _json(request, await self._machine_health(machine))

    async def _machine_health(self, machine: Machine) -> dict[str, Any]:
        watcher = self._health()
        h = watcher.health_of(machine.key)
        transitions = await watcher.transitions(machine.key)
        return {
            "worker_group": machine.worker_group, "worker_id": machine.worker_id,
            "pool": machine.pool,
            "state": h.state.value if h else "unknown", "since": iso(h.since) if h else None,
            "maintenance": bool(h and h.maintenance),
            "findings": [{**f.to_json(), "since": iso(f.since)} for f in (h.finding_list() if h else [])],
            "transitions": [{"time": iso(t.time), "old": t.old, "new": t.new, "reason": t.reason}
                            for t in transitions],
        }

    @app.route("/api/v1/machines", methods=["POST"])
    async def create_machine(self, request: IRequest) -> bytes:
        self._cors(request)
        principal = await self._authorize(request, self.scope_prefix + "inventory:write")
        machine = Machine.from_json(_body(request, required=True))
        await self.store.machines.insert(machine)
        await self._audit(principal, request, "machine.create", f"{machine.worker_group}/{machine.worker_id}",
                          "created", machine.to_json())
        request.setHeader(b"Location", self._machine_url(machine))
        return _json(request, machine.to_json(), 201)

    @app.route("/api/v1/machines/<worker_group>/<worker_id>", methods=["GET"])
    async def get_machine(self, request: IRequest, worker_group: str, worker_id: str) -> bytes:
        self._cors(request)
        await self._authorize(request, self.scope_prefix + "machines:read")
        machine = await self._machine(worker_group, worker_id)
        return _json(request, machine.to_json())

    @app.route("/api/v1/machines/<worker_group>/<worker_id>", methods=["PUT"])
    async def put_machine(self, request: IRequest, worker_group: str, worker_id: str) -> bytes:
        self._cors(request)
        _worker_id(worker_group, "worker_group")
        _worker_id(worker_id)
        principal = await self._authorize(request, self.scope_prefix + "inventory:write")
        machine = Machine.from_json(_body(request, required=True), worker_id=worker_id, worker_group=worker_group)
        created = await self.store.machines.put(machine)
        await self._audit(principal, request, "machine.put", f"{worker_group}/{worker_id}",
                          "created" if created else "updated", machine.to_json())
        return _json(request, machine.to_json(), 201 if created else 200)

    @app.route("/api/v1/machines/<worker_group>/<worker_id>", methods=["DELETE"])
    async def delete_machine(self, request: IRequest, worker_group: str, worker_id: str) -> bytes:
        self._cors(request)
        _worker_id(worker_group, "worker_group")
        _worker_id(worker_id)
        principal = await self._authorize(request, self.scope_prefix + "inventory:write")
        if not await self.store.machines.delete(worker_group, worker_id):
            raise NotFound(f"no machine {worker_id} in worker group {worker_group}", code="unknown_machine")
        await self._audit(principal, request, "machine.delete", f"{worker_group}/{worker_id}", "deleted")
        request.setResponseCode(204)
        return b""

    async def _machine(self, worker_group: str, worker_id: str) -> Machine:
        _worker_id(worker_group, "worker_group")
        _worker_id(worker_id)
        machine = await self.store.machines.get(worker_group, worker_id)
        if machine is None:
            raise NotFound(f"no machine {worker_id} in worker group {worker_group}", code="unknown_machine")
        return machine

    @staticmethod
    def _machine_url(m: Machine) -> bytes:
        return f"/api/v1/machines/{quote(m.worker_group)}/{quote(m.worker_id)}".encode()

    # -- the document and operations

    @app.route("/api/v1/openapi.json", methods=["GET"])
    def openapi_json(self, request: IRequest) -> bytes:
        self._cors(request)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(self.openapi).encode()

    @app.route("/__lbheartbeat__", methods=["GET"])
    def lbheartbeat(self, request: IRequest) -> bytes:
        return _json(request, {"status": "ok"})

    @app.route("/__heartbeat__", methods=["GET"])
    async def heartbeat(self, request: IRequest) -> bytes:
        checks: dict[str, str] = {}
        try:
            # a real committed write (one row overwritten: the database does not
            # grow), so a full disk, a read-only file system or a lock fails here
            await self.store.db.check_write().addTimeout(HEARTBEAT_WRITE_TIMEOUT, self.clock)
            checks["database"] = "ok"
        except StorageUnavailable as e:  # logged once by the store
            checks["database"] = f"error: not writable: {e.what}"
        except WriteTimeout:
            checks["database"] = (f"error: not writable: a write did not finish within "
                                  f"{HEARTBEAT_WRITE_TIMEOUT:g} s (the database is locked or its disk is slow)")
        except Exception as e:  # noqa: BLE001 -- the heartbeat reports whatever made the check fail
            log.failure("Heartbeat database check failed")
            checks["database"] = f"error: not writable ({type(e).__name__})"
        lag = self.metrics.lag if self.metrics is not None else None
        if lag is not None and lag > self.max_lag:
            checks["reactor_lag"] = f"error: {lag:.1f} s, over {self.max_lag:g} s"
        else:
            checks["reactor_lag"] = "ok"
        ok = all(v == "ok" for v in checks.values())
        return _json(request, {"status": "ok" if ok else "error", "checks": checks,
                               "queue": {"running": len(self.queue.running()), "queued": self.queue.depth,
                                         "unrecorded": self.queue.unrecorded}},
                     200 if ok else 500)

    @app.route("/metrics", methods=["GET"])
    def prometheus_metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", METRICS_CONTENT_TYPE.encode())
        request.setHeader(b"Cache-Control", b"no-store")
        if self.metrics is None:
            return json_error(request, 404, "not_found", "this roller keeps no metrics")
        return self.metrics.exposition()

    @app.route("/__version__", methods=["GET"])
    def version(self, request: IRequest) -> bytes:
        return _json(request, self.version_info)
