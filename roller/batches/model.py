"""
Batches: one task over many machines, rolled out within limits.

A batch is created from a request (L{parse_request}): the task, its
parameters, a I{selector} (an explicit list of machines, or a filter over
the inventory) resolved once, at creation, into a fixed list of members,
and a I{rollout}: how many members may be in flight at once over the whole
batch and per pool, a circuit breaker (stop after K failed members) and a
pause between starts.  Each member becomes an ordinary job carrying the
batch's id.

This module is the contract: the request's parsing and the JSON shapes the
API, the dashboard and the command line share.  L{roller.batches.service}
runs batches; L{roller.store.batches} keeps them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any

from attrs import field, frozen

from roller.errors import BadRequest
from roller.inventory import TAG_RE, valid_worker_id
from roller.jobs import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN, State, iso

#: the most machines one batch may name or select
MAX_MEMBERS = 20_000
#: the longest pause between member starts (seconds): a day
MAX_PAUSE = 86_400.0
_PERCENT = re.compile(r"^\s*([0-9]{1,3}(?:\.[0-9]+)?)\s*%\s*$")
#: fleet health states a filter may name (L{roller.store.fleet.HEALTH_STATES})
_HEALTH = ("healthy", "degraded", "down", "unknown", "loaned", "quarantined", "maintenance")
#: last-job states a filter may name: a job state, or "none" (never had a job)
_LAST_STATES = (*(s.value for s in State), "none")


class BatchState(str, Enum):  # noqa: UP042 -- str(state) is its value, as for roller.jobs.State
    running = "running"  # members still to start or in flight
    succeeded = "succeeded"  # every member succeeded
    failed = "failed"  # every member ended, some not succeeded
    halted = "halted"  # the circuit breaker tripped (stop_after_failures): nothing more was started
    cancelled = "cancelled"  # DELETE: nothing more was started

    @property
    def final(self) -> bool:
        return self is not BatchState.running

    def __str__(self) -> str:
        return self.value


class MemberState(str, Enum):  # noqa: UP042
    pending = "pending"  # not started yet: no job
    queued = "queued"  # its job is queued
    running = "running"  # its job is running
    succeeded = "succeeded"
    failed = "failed"
    timed_out = "timed_out"
    cancelled = "cancelled"  # its job was cancelled
    interrupted = "interrupted"  # its job was interrupted twice by roller stopping (once: it is started again)
    skipped = "skipped"  # never started: the batch was halted or cancelled first

    @property
    def final(self) -> bool:
        return self not in (MemberState.pending, MemberState.queued, MemberState.running)

    @property
    def active(self) -> bool:
        """In flight: counts against the rollout's limits."""
        return self in (MemberState.queued, MemberState.running)

    @property
    def failure(self) -> bool:
        """Counts towards C{stop_after_failures}."""
        return self in (MemberState.failed, MemberState.timed_out, MemberState.interrupted)

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of_job(cls, state: State) -> MemberState:
        return cls(state.value)


@frozen
class Limit:
    """A count (C{10}) or a percentage (C{"25%"}) of some total."""

    value: float
    percent: bool = False

    def of(self, total: int) -> int:
        """The count this limit allows out of C{total}: at least 1 (a percentage rounds down)."""
        if not self.percent:
            return max(1, int(self.value))
        return max(1, math.floor(total * self.value / 100 + 1e-9))

    def to_json(self) -> int | str:
        if self.percent:
            return f"{self.value:g}%"
        return int(self.value)

    @classmethod
    def parse(cls, name: str, raw: Any) -> Limit:
        """C{10}, C{"10"} or C{"10%"} (0 < percentage <= 100); L{BadRequest} naming C{name} otherwise."""
        if isinstance(raw, bool):
            raise _invalid(f"rollout.{name} must be a count (e.g. 10) or a percentage (e.g. \"25%\")")
        if isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit()):
            n = int(raw)
            if not 1 <= n <= MAX_MEMBERS:
                raise _invalid(f"rollout.{name} must be from 1 to {MAX_MEMBERS}")
            return cls(n)
        if isinstance(raw, str):
            m = _PERCENT.match(raw)
            if m is not None:
                pct = float(m.group(1))
                if 0 < pct <= 100:
                    return cls(pct, percent=True)
                raise _invalid(f"rollout.{name} must be a percentage above 0% and at most 100%")
        raise _invalid(f"rollout.{name} must be a count (e.g. 10) or a percentage (e.g. \"25%\")")


@frozen
class Rollout:
    """
    How a batch's members are started.  C{None} limits are no limit (the
    queue's own C{queue.max_running} and endpoint caps still hold).
    """

    max_concurrent: Limit | None = None
    max_per_pool: Limit | None = None
    stop_after_failures: int | None = None
    pause_between: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "max_concurrent": None if self.max_concurrent is None else self.max_concurrent.to_json(),
            "max_per_pool": None if self.max_per_pool is None else self.max_per_pool.to_json(),
            "stop_after_failures": self.stop_after_failures,
            "pause_between": self.pause_between,
        }

    @classmethod
    def from_json(cls, raw: Any, defaults: Rollout | None = None) -> Rollout:
        """
        Parse C{rollout}; a key left out takes its value from C{defaults}
        (the configured defaults), an explicit C{null} means no limit.
        """
        base = defaults or cls()
        if raw is None:
            return base
        if not isinstance(raw, Mapping):
            raise _invalid("rollout must be an object")
        unknown = sorted(set(raw) - {"max_concurrent", "max_per_pool", "stop_after_failures", "pause_between"})
        if unknown:
            raise _invalid(f"rollout: unknown field(s) {', '.join(map(str, unknown))}"[:200])
        limits = {"max_concurrent": base.max_concurrent, "max_per_pool": base.max_per_pool}
        for name in limits:
            if name in raw:
                limits[name] = None if raw[name] is None else Limit.parse(name, raw[name])
        stop = base.stop_after_failures
        if "stop_after_failures" in raw:
            stop = raw["stop_after_failures"]
            if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int)
                                     or not 1 <= stop <= MAX_MEMBERS):
                raise _invalid(f"rollout.stop_after_failures must be a count from 1 to {MAX_MEMBERS}, or null")
        pause = base.pause_between
        if "pause_between" in raw:
            p = 0.0 if raw["pause_between"] is None else raw["pause_between"]
            if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= MAX_PAUSE:
                raise _invalid(f"rollout.pause_between must be seconds from 0 to {MAX_PAUSE:g}")
            pause = float(p)
        return cls(max_concurrent=limits["max_concurrent"], max_per_pool=limits["max_per_pool"],
                   stop_after_failures=stop, pause_between=pause)

    def resolved(self, members: int, pool_sizes: Mapping[str, int]) -> dict[str, Any]:
        """
        The limits in force for C{members} members whose pools have
        C{pool_sizes} machines in the inventory (the percentage of
        C{max_per_pool} is of the whole pool, not of the batch's share).
        """
        return {
            "max_concurrent": members if self.max_concurrent is None else min(members, self.max_concurrent.of(members)),
            "max_per_pool": None if self.max_per_pool is None else {
                pool: self.max_per_pool.of(size) for pool, size in sorted(pool_sizes.items())
            },
        }


#: the pool name members without a pool are counted under for C{max_per_pool}
NO_POOL = ""


@frozen
class Selector:
    """
    Which machines: C{machines}, an explicit list of C{(worker_group,
    worker_id)}; or a filter (every given field must match; C{tags}: the
    machine has all of them; C{health} and C{state}: any of the listed).
    Loaned machines and machines in maintenance are left out (and listed as
    excluded, with why) unless C{include_loaned} / C{include_maintenance}.
    """

    machines: tuple[tuple[str, str], ...] | None = None
    group: str | None = None
    pool: str | None = None
    tags: tuple[str, ...] = ()
    q: str | None = None
    health: tuple[str, ...] = ()
    state: tuple[str, ...] = ()
    include_loaned: bool = False
    include_maintenance: bool = False

    @property
    def is_filter(self) -> bool:
        return self.machines is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.machines is not None:
            out["machines"] = [{"worker_group": g, "worker_id": w} for g, w in self.machines]
        for name in ("group", "pool", "q"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("tags", "health", "state"):
            if getattr(self, name):
                out[name] = list(getattr(self, name))
        if self.include_loaned:
            out["include_loaned"] = True
        if self.include_maintenance:
            out["include_maintenance"] = True
        return out

    @classmethod
    def from_json(cls, raw: Any) -> Selector:
        if not isinstance(raw, Mapping):
            raise _invalid("selector must be an object: {\"machines\": [...]} or a filter "
                           "({\"pool\", \"group\", \"tags\", \"q\", \"health\", \"state\"})")
        known = {"machines", "group", "pool", "tags", "q", "health", "state", "include_loaned", "include_maintenance"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise _invalid(f"selector: unknown field(s) {', '.join(map(str, unknown))}"[:200])
        for name in ("include_loaned", "include_maintenance"):
            if not isinstance(raw.get(name, False), bool):
                raise _invalid(f"selector.{name} must be true or false")
        loaned, maintenance = bool(raw.get("include_loaned")), bool(raw.get("include_maintenance"))
        if "machines" in raw:
            if set(raw) - {"machines", "include_loaned", "include_maintenance"}:
                raise _invalid("selector: give either machines or a filter, not both")
            return cls(machines=_machine_list(raw["machines"]), include_loaned=loaned,
                       include_maintenance=maintenance)
        group = _opt_id(raw, "group")
        pool = _opt_tag(raw, "pool")
        q = raw.get("q")
        if q is not None and (not isinstance(q, str) or len(q) > 200):
            raise _invalid("selector.q must be a string of at most 200 characters")
        tags = _str_list(raw, "tags", lambda t: TAG_RE.fullmatch(t) is not None, "tags of letters, digits and -_.:/")
        health = _str_list(raw, "health", lambda h: h in _HEALTH, f"health states ({', '.join(_HEALTH)})")
        state = _str_list(raw, "state", lambda s: s in _LAST_STATES, f"last-job states ({', '.join(_LAST_STATES)})")
        sel = cls(group=group, pool=pool, tags=tags, q=q or None, health=health, state=state,
                  include_loaned=loaned, include_maintenance=maintenance)
        if sel.group is None and sel.pool is None and not sel.tags and sel.q is None and not sel.health \
                and not sel.state:
            raise _invalid("selector: name the machines or give at least one filter (pool, group, tags, q, "
                           "health, state); a batch never selects the whole fleet by accident")
        return sel


@frozen
class BatchRequest:
    """What C{POST /api/v1/batches} asks for, validated (not yet resolved)."""

    task_name: str
    selector: Selector
    rollout: Rollout
    params: dict[str, Any] = field(factory=dict)  # parsed by the task's TaskSpec.parse_params
    reason: str = ""
    priority: int = PRIORITY_DEFAULT


def parse_request(body: Any, *, tasks: Any, allowed_tasks: Iterable[str],
                  defaults: Rollout | None = None) -> BatchRequest:
    """
    Validate a batch request's JSON body: C{{"task_name", "params",
    "reason", "priority", "selector", "rollout"}}.  L{BadRequest}
    (C{invalid_body}, C{unknown_task}, C{task_not_allowed}) with a message
    naming the field otherwise.  C{tasks} is the L{roller.tasks.TaskRegistry}.
    """
    if not isinstance(body, Mapping):
        raise _invalid("the body must be a JSON object with task_name and selector")
    unknown = sorted(set(body) - {"task_name", "params", "reason", "priority", "selector", "rollout"})
    if unknown:
        raise _invalid(f"unknown body field(s): {', '.join(map(str, unknown))}"[:200])
    task_name = body.get("task_name")
    if not isinstance(task_name, str) or not task_name:
        raise BadRequest("task_name is required", code="missing_parameter")
    spec = tasks.get(task_name)
    if spec is None:
        raise BadRequest(f"unknown task {task_name[:64]!r}; see GET /api/v1/tasks", code="unknown_task")
    if task_name not in set(allowed_tasks):
        raise BadRequest(f"task {task_name} is not allowed on this roller", code="task_not_allowed")
    params = spec.parse_params(body.get("params"))
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 1000:
        raise _invalid("reason must be a string of at most 1000 characters")
    priority = body.get("priority", PRIORITY_DEFAULT)
    if isinstance(priority, bool) or not isinstance(priority, int) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise _invalid(f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}")
    if "selector" not in body:
        raise BadRequest("selector is required", code="missing_parameter")
    return BatchRequest(task_name=task_name, params=params, reason=reason, priority=priority,
                        selector=Selector.from_json(body["selector"]),
                        rollout=Rollout.from_json(body.get("rollout"), defaults))


@frozen
class Member:
    """One machine of a batch, and where its job stands."""

    batch_id: str
    position: int  # 0-based, the rollout's order
    worker_group: str
    worker_id: str
    pool: str | None = None
    state: MemberState = MemberState.pending
    job_id: str | None = None
    joined: bool = False  # its job existed before the batch (same task already queued or running)
    attempts: int = 0  # jobs started for it (a job interrupted by roller stopping is started once more)
    started_at: float | None = None  # when its job was submitted (or joined)
    finished_at: float | None = None
    error: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.worker_group, self.worker_id)

    @property
    def pool_key(self) -> str:
        return self.pool or NO_POOL

    def to_json(self) -> dict[str, Any]:
        return {
            "worker_group": self.worker_group, "worker_id": self.worker_id, "pool": self.pool,
            "state": self.state.value, "task_id": self.job_id, "joined": self.joined, "attempts": self.attempts,
            "started": iso(self.started_at), "finished": iso(self.finished_at), "error": self.error,
        }


@frozen
class Excluded:
    """A machine the selector matched and the batch leaves out, and why."""

    worker_group: str
    worker_id: str
    reason: str  # "loaned", "maintenance", "unknown machine", "duplicate"

    def to_json(self) -> dict[str, Any]:
        return {"worker_group": self.worker_group, "worker_id": self.worker_id, "reason": self.reason}


@frozen
class Batch:
    id: str
    task_name: str
    selector: Selector
    rollout: Rollout
    created_at: float
    requester: str = "anonymous"
    origin_ip: str | None = None
    params: dict[str, Any] = field(factory=dict)
    reason: str = ""
    priority: int = PRIORITY_DEFAULT
    state: BatchState = BatchState.running
    finished_at: float | None = None
    halt_reason: str | None = None  # why it was halted or cancelled
    total: int = 0
    seq: int | None = None  # store row number: newest-first paging cursor

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_id": self.id, "task_name": self.task_name, "params": self.params, "reason": self.reason,
            "priority": self.priority, "requester": self.requester, "state": self.state.value,
            "created": iso(self.created_at), "finished": iso(self.finished_at), "halt_reason": self.halt_reason,
            "selector": self.selector.to_json(), "rollout": self.rollout.to_json(), "total": self.total,
        }


def counts_of(members: Iterable[Member]) -> dict[str, int]:
    """Members by state: every L{MemberState} named, zeros included."""
    out = {s.value: 0 for s in MemberState}
    for m in members:
        out[m.state.value] += 1
    return out


def batch_view(batch: Batch, members: list[Member], *, pool_sizes: Mapping[str, int],
               excluded: Iterable[Excluded] = (), with_members: bool = True) -> dict[str, Any]:
    """
    The JSON of C{GET /api/v1/batches/{id}} (and of a dry run, with
    C{batch_id} None): the batch, its limits in force, counts by state,
    progress (members ended / total), the pools it touches, and its members
    in rollout order.
    """
    counts = counts_of(members)
    done = sum(1 for m in members if m.state.final)
    pools: dict[str, int] = {}
    for m in members:
        pools[m.pool_key] = pools.get(m.pool_key, 0) + 1
    out = batch.to_json()
    out.update({
        "limits": batch.rollout.resolved(len(members), {p: pool_sizes.get(p, n) for p, n in pools.items()}),
        "counts": counts,
        "progress": 1.0 if not members else round(done / len(members), 4),
        "pools": dict(sorted(pools.items())),
        "excluded": [e.to_json() for e in excluded],
    })
    if with_members:
        out["members"] = [m.to_json() for m in members]
    return out


def _invalid(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_body")


def _opt_id(raw: Mapping, name: str) -> str | None:
    v = raw.get(name)
    if v is None:
        return None
    if not isinstance(v, str) or not valid_worker_id(v):
        raise _invalid(f"selector.{name} must be 1-128 characters of letters, digits, '-' and '_'")
    return v


def _opt_tag(raw: Mapping, name: str) -> str | None:
    v = raw.get(name)
    if v is None:
        return None
    if not isinstance(v, str) or TAG_RE.fullmatch(v) is None:
        raise _invalid(f"selector.{name} must be 1-64 characters of letters, digits and -_.:/")
    return v


def _str_list(raw: Mapping, name: str, ok: Any, what: str) -> tuple[str, ...]:
    v = raw.get(name)
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > 100 or not all(isinstance(x, str) and ok(x) for x in v):
        raise _invalid(f"selector.{name} must be a list of {what}"[:200])
    return tuple(dict.fromkeys(v))


def _machine_list(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise _invalid("selector.machines must be a non-empty list of {\"worker_group\", \"worker_id\"}")
    if len(raw) > MAX_MEMBERS:
        raise _invalid(f"selector.machines may name at most {MAX_MEMBERS} machines")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or set(item) != {"worker_group", "worker_id"}:
            raise _invalid(f"selector.machines[{i}] must be {{\"worker_group\", \"worker_id\"}}")
        g, w = item["worker_group"], item["worker_id"]
        if not (isinstance(g, str) and valid_worker_id(g) and isinstance(w, str) and valid_worker_id(w)):
            raise _invalid(f"selector.machines[{i}]: worker_group and worker_id must be 1-128 characters of "
                           "letters, digits, '-' and '_'")
        out.append((g, w))
    return tuple(out)
