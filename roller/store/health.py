"""
Fleet health in the database: each machine's current health (state, since,
findings, the operator's maintenance flag), the transitions between states
(one row per change, never one per probe), the remediations started, and
roller-wide health flags (remediation paused).

Rows are plain values (states as text, findings as dicts): the health
layer above (L{roller.health}) gives them meaning.
"""

from __future__ import annotations

import builtins
import json
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred

from roller.store.db import Cursor, Database

__all__ = ["HealthRow", "HealthTable", "RemediationRow", "TransitionRow"]


@frozen
class HealthRow:
    worker_group: str
    worker_id: str
    state: str
    since: float
    findings: tuple[dict[str, Any], ...]  # {"source", "kind", "since", "detail"}
    maintenance: bool
    maintenance_reason: str


@frozen
class TransitionRow:
    time: float
    old: str
    new: str
    reason: str


@frozen
class RemediationRow:
    id: int
    worker_group: str
    worker_id: str
    policy: str
    task: str
    time: float
    dry_run: bool
    job_id: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "worker_group": self.worker_group, "worker_id": self.worker_id,
                "policy": self.policy, "task": self.task, "time": self.time, "dry_run": self.dry_run,
                "job_id": self.job_id, "reason": self.reason}


def _findings(text: str) -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(text or "[]"))


class HealthTable:
    def __init__(self, db: Database):
        self._db = db

    def all(self) -> Deferred[builtins.list[HealthRow]]:
        def run(c: Cursor) -> builtins.list[HealthRow]:
            rows = c.execute("SELECT worker_group, worker_id, state, since, findings, maintenance,"
                             " maintenance_reason FROM health").fetchall()
            return [HealthRow(r[0], r[1], r[2], r[3], _findings(r[4]), bool(r[5]), r[6]) for r in rows]

        return self._db.read(run)

    def save(self, key: tuple[str, str], state: str, since: float, findings: builtins.list[dict[str, Any]],
             transition: TransitionRow | None) -> Deferred[None]:
        """
        Write a machine's health (and the transition that led to it, if any)
        in one transaction.  The maintenance flag is not written here: only
        L{set_maintenance} changes it, so a flag set by another process (the
        C{roller} command) is never overwritten.
        """
        data = json.dumps(findings)

        def run(c: Cursor) -> None:
            c.execute("INSERT INTO health (worker_group, worker_id, state, since, findings) VALUES (?, ?, ?, ?, ?)"
                      " ON CONFLICT (worker_group, worker_id) DO UPDATE SET state = excluded.state,"
                      " since = excluded.since, findings = excluded.findings",
                      (*key, state, since, data))
            if transition is not None:
                c.execute("INSERT INTO health_transitions (worker_group, worker_id, time, old, new, reason)"
                          " VALUES (?, ?, ?, ?, ?, ?)", (*key, transition.time, transition.old,
                                                         transition.new, transition.reason))

        return self._db.write(run)

    def set_maintenance(self, key: tuple[str, str], on: bool, reason: str, now: float) -> Deferred[None]:
        """Set or clear a machine's maintenance flag (the health watcher picks it up)."""
        return self._db.write(lambda c: c.execute(
            "INSERT INTO health (worker_group, worker_id, state, since, maintenance, maintenance_reason)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (worker_group, worker_id) DO UPDATE SET"
            " maintenance = excluded.maintenance, maintenance_reason = excluded.maintenance_reason",
            (*key, "maintenance" if on else "unknown", now, int(on), reason if on else "")) and None)

    def maintenance(self) -> Deferred[dict[tuple[str, str], str]]:
        """The machines in maintenance, with the reason given."""
        return self._db.read(lambda c: {(r[0], r[1]): r[2] for r in c.execute(
            "SELECT worker_group, worker_id, maintenance_reason FROM health WHERE maintenance = 1").fetchall()})

    def transitions(self, key: tuple[str, str], limit: int = 50) -> Deferred[builtins.list[TransitionRow]]:
        """A machine's transitions, newest first."""

        def run(c: Cursor) -> builtins.list[TransitionRow]:
            rows = c.execute("SELECT time, old, new, reason FROM health_transitions WHERE worker_group = ?"
                             " AND worker_id = ? ORDER BY id DESC LIMIT ?", (*key, limit)).fetchall()
            return [TransitionRow(r[0], r[1], r[2], r[3]) for r in rows]

        return self._db.read(run)

    def forget(self, key: tuple[str, str]) -> Deferred[None]:
        return self._db.write(lambda c: c.execute("DELETE FROM health WHERE worker_group = ? AND worker_id = ?",
                                                  key) and None)

    # -- remediations

    def add_remediation(self, key: tuple[str, str], policy: str, task: str, time: float, dry_run: bool,
                        job_id: str | None, reason: str) -> Deferred[int]:
        def run(c: Cursor) -> int:
            row = c.execute("INSERT INTO remediations (worker_group, worker_id, policy, task, time, dry_run, job_id,"
                            " reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                            (*key, policy, task, time, int(dry_run), job_id, reason)).fetchone()
            return int(row[0])

        return self._db.write(run)

    def remediations(self, since: float, *, limit: int = 100_000) -> Deferred[builtins.list[RemediationRow]]:
        """Remediations at or after C{since}, oldest first (through C{remediations_time})."""

        def run(c: Cursor) -> builtins.list[RemediationRow]:
            rows = c.execute("SELECT id, worker_group, worker_id, policy, task, time, dry_run, job_id, reason"
                             " FROM remediations WHERE time >= ? ORDER BY time, id LIMIT ?", (since, limit)).fetchall()
            return [RemediationRow(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8]) for r in rows]

        return self._db.read(run)

    def remediations_after(self, after_id: int, *, limit: int = 10_000) -> Deferred[builtins.list[RemediationRow]]:
        """Remediations recorded after the one with id C{after_id}, oldest first (another roller's too)."""

        def run(c: Cursor) -> builtins.list[RemediationRow]:
            rows = c.execute("SELECT id, worker_group, worker_id, policy, task, time, dry_run, job_id, reason"
                             " FROM remediations WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
            return [RemediationRow(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8]) for r in rows]

        return self._db.read(run)

    # -- flags

    def flag(self, name: str) -> Deferred[str | None]:
        def run(c: Cursor) -> str | None:
            r = c.execute("SELECT value FROM health_flags WHERE name = ?", (name,)).fetchone()
            return None if r is None else str(r[0])

        return self._db.read(run)

    def set_flag(self, name: str, value: str) -> Deferred[None]:
        return self._db.write(lambda c: c.execute(
            "INSERT INTO health_flags (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET"
            " value = excluded.value", (name, value)) and None)
