"""The machines table: the inventory."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred

from roller.errors import Conflict
from roller.inventory import Machine
from roller.store.db import Cursor, Database


def _row(row: Any) -> Machine:
    return Machine.from_json(json.loads(row["data"]))


class MachineTable:
    def __init__(self, db: Database, clock: Any):
        self._db = db
        self._clock = clock

    def get(self, worker_group: str, worker_id: str) -> "Deferred[Machine | None]":
        def q(c: Cursor) -> Machine | None:
            row = c.execute(
                "SELECT data FROM machines WHERE worker_group = ? AND worker_id = ?",
                (worker_group, worker_id),
            ).fetchone()
            return None if row is None else _row(row)

        return self._db.read(q)

    def by_worker_id(self, worker_id: str) -> "Deferred[list[Machine]]":
        def q(c: Cursor) -> list[Machine]:
            rows = c.execute(
                "SELECT data FROM machines WHERE worker_id = ? ORDER BY worker_group", (worker_id,)
            ).fetchall()
            return [_row(r) for r in rows]

        return self._db.read(q)

    def list(
        self,
        *,
        worker_group: str | None = None,
        pool: str | None = None,
        q: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> "Deferred[list[Machine]]":
        where, args = [], []
        if worker_group is not None:
            where.append("worker_group = ?")
            args.append(worker_group)
        if pool is not None:
            where.append("pool = ?")
            args.append(pool)
        if q:
            like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append(
                "(worker_id LIKE ? ESCAPE '\\' OR fqdn LIKE ? ESCAPE '\\' OR ip LIKE ? ESCAPE '\\')"
            )
            args += [like, like, like]
        sql = "SELECT data FROM machines"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY worker_group, worker_id LIMIT ? OFFSET ?"
        args += [limit, offset]

        def run(c: Cursor) -> list[Machine]:
            return [_row(r) for r in c.execute(sql, args).fetchall()]

        return self._db.read(run)

    def count(self) -> "Deferred[int]":
        return self._db.read(lambda c: c.execute("SELECT count(*) FROM machines").fetchone()[0])

    def insert(self, machine: Machine) -> "Deferred[Machine]":
        """Add a new machine; L{Conflict} if one with its key exists."""
        now = self._clock.seconds()

        def run(c: Cursor) -> Machine:
            exists = c.execute(
                "SELECT 1 FROM machines WHERE worker_group = ? AND worker_id = ?", machine.key
            ).fetchone()
            if exists:
                raise Conflict(
                    f"machine {machine.worker_group}/{machine.worker_id} already exists",
                    code="machine_exists",
                )
            self._upsert(c, machine, now)
            return machine

        return self._db.write(run)

    def put(self, machine: Machine) -> "Deferred[bool]":
        """Insert or replace; True if it was created."""
        now = self._clock.seconds()

        def run(c: Cursor) -> bool:
            existed = c.execute(
                "SELECT 1 FROM machines WHERE worker_group = ? AND worker_id = ?", machine.key
            ).fetchone()
            self._upsert(c, machine, now)
            return existed is None

        return self._db.write(run)

    def put_many(self, machines: list[Machine]) -> "Deferred[int]":
        now = self._clock.seconds()

        def run(c: Cursor) -> int:
            for m in machines:
                self._upsert(c, m, now)
            return len(machines)

        return self._db.write(run)

    @staticmethod
    def _upsert(c: Cursor, m: Machine, now: float) -> None:
        c.execute(
            "INSERT INTO machines (worker_group, worker_id, fqdn, ip, pool, data, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (worker_group, worker_id) DO UPDATE SET"
            " fqdn = excluded.fqdn, ip = excluded.ip, pool = excluded.pool,"
            " data = excluded.data, updated_at = excluded.updated_at",
            (m.worker_group, m.worker_id, m.fqdn, m.ip, m.pool, json.dumps(m.to_json()), now, now),
        )

    def delete(self, worker_group: str, worker_id: str) -> "Deferred[bool]":
        def run(c: Cursor) -> bool:
            c.execute(
                "DELETE FROM machines WHERE worker_group = ? AND worker_id = ?", (worker_group, worker_id)
            )
            return c.rowcount > 0

        return self._db.write(run)
