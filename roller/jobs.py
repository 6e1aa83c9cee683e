"""
The job model: one run of a task on a machine, and its state machine.

    queued -> running -> succeeded | failed | cancelled | timed_out
    queued -> cancelled
    running (found at start-up) -> interrupted
"""

from __future__ import annotations

import os
import time
import uuid
from enum import Enum
from typing import Any, overload

from attrs import evolve, field, frozen

from roller import timetext


class State(str, Enum):  # noqa: UP042 -- a StrEnum would change str(state) ("State.queued") in messages
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    timed_out = "timed_out"
    interrupted = "interrupted"

    @property
    def final(self) -> bool:
        return self not in (State.queued, State.running)

    def __str__(self) -> str:
        return self.value


_ALLOWED = {
    State.queued: {State.running, State.cancelled, State.interrupted},
    State.running: {State.succeeded, State.failed, State.cancelled, State.timed_out, State.interrupted},
}

PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 0, 100, 50


class InvalidTransition(Exception):
    pass


@overload
def iso(ts: float) -> str: ...
@overload
def iso(ts: float | None) -> str | None: ...
def iso(ts: float | None) -> str | None:
    return None if ts is None else timetext.iso(ts)


def new_job_id() -> str:
    """
    A UUID version 7 (RFC 9562): 48 bits of Unix time in milliseconds, then
    74 random bits.  Ids made later sort later, so the database's indexes
    on job ids grow at their end; random (version 4) ids scattered every
    insert across the whole index, and submitting got slower as the
    history grew.  Still unguessable.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits; 74 used
    value = ((ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64
             | 0b10 << 62 | rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


@frozen
class Job:
    id: str
    task_name: str
    worker_id: str
    worker_group: str
    created_at: float
    params: dict[str, Any] = field(factory=dict)
    requester: str = "anonymous"
    origin_ip: str | None = None
    reason: str = ""
    priority: int = PRIORITY_DEFAULT
    state: State = State.queued
    started_at: float | None = None
    finished_at: float | None = None
    result: str | None = None
    error: str | None = None
    seq: int | None = None  # store row number: FIFO order and paging cursor
    batch_id: str | None = None  # the batch it is a member of (roller.batches), if any

    @property
    def machine_key(self) -> tuple[str, str]:
        return (self.worker_group, self.worker_id)

    def transition(self, state: State, now: float, *, result: str | None = None, error: str | None = None) -> Job:
        if state not in _ALLOWED.get(self.state, ()):
            raise InvalidTransition(f"job {self.id}: {self.state} -> {state}")
        changes: dict[str, Any] = {"state": state}
        if state is State.running:
            changes["started_at"] = now
        else:
            changes["finished_at"] = now
            changes["result"] = result
            changes["error"] = error
        return evolve(self, **changes)

    def to_json(self) -> dict[str, Any]:
        duration = None
        if self.started_at is not None and self.finished_at is not None:
            duration = round(self.finished_at - self.started_at, 3)
        return {
            "task_id": self.id,
            "task_name": self.task_name,
            "worker_id": self.worker_id,
            "worker_group": self.worker_group,
            "state": self.state.value,
            "priority": self.priority,
            "params": self.params,
            "requester": self.requester,
            "origin_ip": self.origin_ip,
            "reason": self.reason,
            "created": iso(self.created_at),
            "started": iso(self.started_at),
            "finished": iso(self.finished_at),
            "duration_s": duration,
            "result": self.result,
            "error": self.error,
            "batch_id": self.batch_id,
        }


@frozen
class JobEvent:
    job_id: str
    time: float
    kind: str  # "state" or "log"
    message: str
    data: dict[str, Any] = field(factory=dict)
    id: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "time": iso(self.time), "kind": self.kind, "message": self.message}
        if self.data:
            out["data"] = self.data
        return out
