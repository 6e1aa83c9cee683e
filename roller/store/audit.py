"""The audit table: an append-only record of every mutating action."""

from __future__ import annotations

import builtins
import json
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred

from roller.jobs import iso
from roller.store.db import Cursor, Database, insert_rows
from roller.store.where import Where


@frozen
class AuditEntry:
    time: float
    actor: str
    action: str
    result: str
    source_ip: str | None = None
    target: str | None = None
    params: dict[str, Any] | None = None
    id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "time": iso(self.time), "actor": self.actor, "source_ip": self.source_ip,
            "action": self.action, "target": self.target, "params": self.params, "result": self.result,
        }


def add_audit(c: Cursor, entry: AuditEntry) -> None:
    """Write C{entry} with cursor C{c} (inside another write's transaction)."""
    add_audits(c, [entry])


def add_audits(c: Cursor, entries: list[AuditEntry]) -> None:
    """Write C{entries} (multi-row C{INSERT}s)."""
    if entries:
        insert_rows(c, "audit (time, actor, source_ip, action, target, params, result)", [
            (e.time, e.actor, e.source_ip, e.action, e.target,
             None if e.params is None else json.dumps(e.params), e.result)
            for e in entries
        ])


class AuditTable:
    def __init__(self, db: Database):
        self._db = db

    def add(self, entry: AuditEntry) -> Deferred[None]:
        return self._db.write(add_audit, entry)

    def list(self, *, target: str | None = None, before: int | None = None,
             limit: int = 100) -> Deferred[builtins.list[AuditEntry]]:
        w = Where().equal("target", target)
        if before is not None:
            w.add("id < ?", before)
        sql = f"SELECT * FROM audit{w.clause} ORDER BY id DESC LIMIT ?"
        args = [*w.args, limit]

        def q(c: Cursor) -> list[AuditEntry]:
            return [
                AuditEntry(
                    id=r["id"], time=r["time"], actor=r["actor"], source_ip=r["source_ip"],
                    action=r["action"], target=r["target"],
                    params=json.loads(r["params"]) if r["params"] else None, result=r["result"],
                )
                for r in c.execute(sql, args).fetchall()
            ]

        return self._db.read(q)
