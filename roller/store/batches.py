"""
The batches and batch_members tables: batches (L{roller.batches}) and
where each of their members stands.

A batch and all its members (and the audit entry of its request) are
written in one transaction; later changes are written by
L{BatchTable.save}, one transaction for whatever changed in a reactor turn
(the service coalesces them).  A member's job carries the batch's id
(C{jobs.batch_id}), so a job whose member row was not written yet (a crash
between the two) is found again at start-up.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable
from typing import Any

from attrs import evolve, frozen
from twisted.internet.defer import Deferred

from roller.batches.model import Batch, BatchState, Excluded, Member, MemberState, Rollout, Selector
from roller.store.audit import AuditEntry, add_audits
from roller.store.db import Cursor, Database, insert_rows
from roller.store.where import Where

__all__ = ["BatchRecord", "BatchSummary", "BatchTable"]

_BATCH_COLUMNS = ("id, task_name, params, selector, rollout, requester, origin_ip, reason, priority, state,"
                  " created_at, finished_at, halt_reason, total, excluded, pool_sizes")
_MEMBER_COLUMNS = ("batch_id, position, worker_group, worker_id, pool, state, job_id, joined, attempts, started_at,"
                   " finished_at, error")


@frozen
class BatchRecord:
    """A batch as stored: the batch, its members in rollout order, who was left out, its pools' sizes."""

    batch: Batch
    members: list[Member]
    excluded: list[Excluded]
    pool_sizes: dict[str, int]


@frozen
class BatchSummary:
    """A batch without its members: their counts by state and by pool."""

    batch: Batch
    counts: dict[str, int]  # member state -> members
    pools: dict[str, int]  # pool key -> members
    excluded: list[Excluded]
    pool_sizes: dict[str, int]


def _batch(r: Any) -> Batch:
    return Batch(
        id=r["id"], task_name=r["task_name"], params=json.loads(r["params"]),
        selector=Selector.from_json(json.loads(r["selector"])),
        rollout=Rollout.from_json(json.loads(r["rollout"])),
        created_at=r["created_at"], requester=r["requester"], origin_ip=r["origin_ip"], reason=r["reason"],
        priority=r["priority"], state=BatchState(r["state"]), finished_at=r["finished_at"],
        halt_reason=r["halt_reason"], total=r["total"], seq=r["seq"],
    )


def _extras(r: Any) -> tuple[list[Excluded], dict[str, int]]:
    excluded = [Excluded(e["worker_group"], e["worker_id"], e["reason"]) for e in json.loads(r["excluded"])]
    return excluded, {str(k): int(v) for k, v in json.loads(r["pool_sizes"]).items()}


def _member(r: Any) -> Member:
    return Member(
        batch_id=r[0], position=r[1], worker_group=r[2], worker_id=r[3], pool=r[4], state=MemberState(r[5]),
        job_id=r[6], joined=bool(r[7]), attempts=r[8], started_at=r[9], finished_at=r[10], error=r[11],
    )


def _member_row(m: Member) -> tuple:
    return (m.batch_id, m.position, m.worker_group, m.worker_id, m.pool, m.state.value, m.job_id, int(m.joined),
            m.attempts, m.started_at, m.finished_at, m.error)


def _members_of(c: Cursor, batch_ids: builtins.list[str]) -> dict[str, builtins.list[Member]]:
    out: dict[str, builtins.list[Member]] = {i: [] for i in batch_ids}
    for i in batch_ids:
        rows = c.execute(f"SELECT {_MEMBER_COLUMNS} FROM batch_members WHERE batch_id = ? ORDER BY position",
                         (i,)).fetchall()
        out[i] = [_member(r) for r in rows]
    return out


class BatchTable:
    def __init__(self, db: Database):
        self._db = db

    def insert(self, batch: Batch, members: Iterable[Member], *, excluded: Iterable[Excluded] = (),
               pool_sizes: dict[str, int] | None = None, audit: AuditEntry | None = None,
               owner: str | None = None) -> Deferred[Batch]:
        """
        Persist a new batch, all its members and the audit entry of its
        request in one transaction; the batch with its C{seq}.  C{owner}:
        the roller that drives it, with several rollers (L{roller.cluster}).
        """
        rows = [_member_row(m) for m in members]
        excluded_json = json.dumps([e.to_json() for e in excluded])
        sizes_json = json.dumps(pool_sizes or {})

        def run(c: Cursor) -> Batch:
            seq = c.execute(
                f"INSERT INTO batches ({_BATCH_COLUMNS}) VALUES ({', '.join('?' * 16)}) RETURNING seq",
                (batch.id, batch.task_name, json.dumps(batch.params), json.dumps(batch.selector.to_json()),
                 json.dumps(batch.rollout.to_json()), batch.requester, batch.origin_ip, batch.reason,
                 batch.priority, batch.state.value, batch.created_at, batch.finished_at, batch.halt_reason,
                 batch.total, excluded_json, sizes_json)).fetchone()[0]
            if owner is not None:
                c.execute("UPDATE batches SET owner = ? WHERE id = ?", (owner, batch.id))
            if rows:
                insert_rows(c, f"batch_members ({_MEMBER_COLUMNS})", rows)
            if audit is not None:
                add_audits(c, [audit])
            return evolve(batch, seq=seq)

        return self._db.write(run)

    def save(self, batches: Iterable[Batch] = (), members: Iterable[Member] = (),
             owner: str | None = None) -> Deferred[None]:
        """
        Write the state of C{batches} and C{members} (their changing
        columns) in one transaction; with C{owner} (several rollers), only
        those of batches that roller drives.
        """
        mine = () if owner is None else (owner,)
        batch_rows = [(b.state.value, b.finished_at, b.halt_reason, b.id, *mine) for b in batches]
        member_rows = [(m.state.value, m.job_id, int(m.joined), m.attempts, m.started_at, m.finished_at, m.error,
                        m.batch_id, m.position, *mine) for m in members]
        batch_owned = member_owned = ""
        if owner is not None:
            batch_owned = " AND owner = ?"
            member_owned = " AND EXISTS (SELECT 1 FROM batches b WHERE b.id = batch_members.batch_id AND b.owner = ?)"

        def run(c: Cursor) -> None:
            if batch_rows:
                c.executemany("UPDATE batches SET state = ?, finished_at = ?, halt_reason = ? WHERE id = ?"
                              + batch_owned, batch_rows)
            if member_rows:
                c.executemany("UPDATE batch_members SET state = ?, job_id = ?, joined = ?, attempts = ?,"
                              " started_at = ?, finished_at = ?, error = ? WHERE batch_id = ? AND position = ?"
                              + member_owned, member_rows)

        return self._db.write(run)

    def unfinished(self) -> Deferred[builtins.list[BatchRecord]]:
        """Every batch not finished yet (running, or halted/cancelled with members in flight), with its members."""

        def run(c: Cursor) -> builtins.list[BatchRecord]:
            rows = c.execute(f"SELECT seq, {_BATCH_COLUMNS} FROM batches WHERE finished_at IS NULL"
                             " ORDER BY seq").fetchall()
            members = _members_of(c, [r["id"] for r in rows])
            return [BatchRecord(_batch(r), members[r["id"]], *_extras(r)) for r in rows]

        return self._db.read(run)

    def get(self, batch_id: str) -> Deferred[BatchRecord | None]:
        def run(c: Cursor) -> BatchRecord | None:
            r = c.execute(f"SELECT seq, {_BATCH_COLUMNS} FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if r is None:
                return None
            return BatchRecord(_batch(r), _members_of(c, [batch_id])[batch_id], *_extras(r))

        return self._db.read(run)

    def list(self, *, limit: int = 50, before: int | None = None) -> Deferred[builtins.list[BatchSummary]]:
        """Newest first, without their members (counted); C{before} is a C{seq} cursor for the next page."""
        w = Where()
        if before is not None:
            w.add("seq < ?", before)
        sql = f"SELECT seq, {_BATCH_COLUMNS} FROM batches{w.clause} ORDER BY seq DESC LIMIT ?"
        args = [*w.args, limit]

        def run(c: Cursor) -> builtins.list[BatchSummary]:
            out = []
            for r in c.execute(sql, args).fetchall():
                counts = {s.value: 0 for s in MemberState}
                pools: dict[str, int] = {}
                for pool, state, n in c.execute("SELECT COALESCE(pool, ''), state, count(*) FROM batch_members"
                                                " WHERE batch_id = ? GROUP BY 1, 2", (r["id"],)):
                    counts[state] = counts.get(state, 0) + n
                    pools[pool] = pools.get(pool, 0) + n
                out.append(BatchSummary(_batch(r), counts, dict(sorted(pools.items())), *_extras(r)))
            return out

        return self._db.read(run)
