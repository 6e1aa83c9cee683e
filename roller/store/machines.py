"""
The machines table: the inventory.

Every machine is also kept in memory (a few KB each), so the lookups a job
submission makes cost no trip to the database thread.  Writes through this
table update the cache once committed; writes by another process (the
C{roller import} command) are picked up by L{MachineTable.refresh}, which
the service calls every few seconds and which reloads only when SQLite's
C{data_version} says another connection committed.

On PostgreSQL, where several rollers share the table, every write here
bumps the C{change_counters} row and records the machines it touched in
C{machine_changes} under that version, in the write's transaction.  The
counter's row lock makes writers take turns, so versions are given out in
commit order without gaps: a roller that last saw version I{v} and now sees
I{w} reloads just the machines of versions I{v}+1..I{w}.  A write of more
than L{CHANGES_PER_WRITE} machines (an import) records "everything"
instead, and only the last L{CHANGES_KEPT} versions are kept: a roller
further behind than that, or facing more than L{RELOAD_ALL_OVER} changed
machines, reloads the whole table as before.
"""

from __future__ import annotations

import builtins
import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from roller.errors import Conflict
from roller.inventory import Machine
from roller.store.db import Cursor, Database, StoreError, key_values
from roller.store.where import Where

#: a write touching more machines than this records "everything changed" (one row) instead of each
CHANGES_PER_WRITE = 1000
#: versions of C{machine_changes} kept; older ones are deleted by the write that passes this many
CHANGES_KEPT = 10_000
#: more changed machines than this since the last refresh: the whole table is read instead
RELOAD_ALL_OVER = 5_000
#: the C{machine_changes} row that stands for every machine (no machine has an empty worker group)
EVERYTHING = ("", "")


def _row(row: Any) -> Machine:
    return Machine.from_json(json.loads(row["data"]))


class MachineTable:
    def __init__(self, db: Database, clock: IReactorTime):
        self._db = db
        self._clock = clock
        self._cache: dict[tuple[str, str], Machine] = {}
        self._by_worker: dict[str, dict[str, Machine]] = {}
        self._data_version: int | None = None

    def load(self) -> Deferred[int]:
        """(Re)load the cache from the database; how many machines."""
        return Deferred.fromCoroutine(self._load())

    def refresh(self) -> Deferred[bool]:
        """Reload if another process changed the table since; True if it did."""
        return Deferred.fromCoroutine(self._refresh())

    async def _load(self) -> int:

        def q(c: Cursor) -> tuple[int, list[Machine]]:
            version = self._version(c)
            return version, [_row(r) for r in c.execute("SELECT data FROM machines").fetchall()]

        version, machines = await self._db.read_on_writer(q)
        self._cache = {}
        self._by_worker = {}
        for m in machines:
            self._remember(m)
        self._data_version = version
        return len(machines)

    async def _refresh(self) -> bool:
        if self._db.dialect.postgresql and self._data_version is not None:
            return await self._refresh_changed(self._data_version)
        version = await self._db.read_on_writer(self._version)
        if version == self._data_version:
            return False
        await self._load()
        return True

    async def _refresh_changed(self, seen: int) -> bool:
        """PostgreSQL: reload only the machines changed since version C{seen} (or all, when that is cheaper)."""

        def q(c: Cursor) -> tuple[int, builtins.list[tuple[str, str]] | None, builtins.list[Machine]]:
            version = self._version(c)
            if version == seen:
                return version, [], []
            rows = c.execute("SELECT version, worker_group, worker_id FROM machine_changes"
                             " WHERE version > ? AND version <= ?", (seen, version)).fetchall()
            keys = {(r[1], r[2]) for r in rows}
            if (len({r[0] for r in rows}) != version - seen  # pruned (or never recorded): too far behind
                    or EVERYTHING in keys or len(keys) > RELOAD_ALL_OVER):
                return version, None, []
            found: builtins.list[Machine] = []
            ordered = sorted(keys)
            for values, args in key_values(ordered):
                found += [_row(r) for r in c.execute(
                    f"WITH k(g, w) AS (VALUES {values}) SELECT m.data FROM k"
                    " JOIN machines m ON m.worker_group = k.g AND m.worker_id = k.w", args).fetchall()]
            return version, ordered, found

        version, keys, found = await self._db.read_on_writer(q)
        if keys is None:
            await self._load()
            return True
        if version == seen or (self._data_version is not None and version <= self._data_version):
            return False  # nothing new (or a write of ours moved the version on meanwhile)
        for key in keys:
            self._forget(*key)
        for m in found:
            self._remember(m)
        self._data_version = version
        return True

    def _version(self, c: Cursor) -> int:
        """What changes when another connection (or roller) changed the table."""
        if self._db.dialect.postgresql:
            return int(c.execute("SELECT version FROM change_counters WHERE name = 'machines'").fetchone()[0])
        return int(c.execute("PRAGMA data_version").fetchone()[0])

    def _bump(self, c: Cursor, keys: builtins.list[tuple[str, str]]) -> int:
        """
        On PostgreSQL, count a change of the machines C{keys} (in the write's
        transaction) and record which they were; the counter's new value.
        """
        if not self._db.dialect.postgresql:
            return 0
        version = int(c.execute("UPDATE change_counters SET version = version + 1 WHERE name = 'machines'"
                                " RETURNING version").fetchone()[0])
        touched = sorted(set(keys)) if len(keys) <= CHANGES_PER_WRITE else [EVERYTHING]
        c.executemany("INSERT INTO machine_changes (version, worker_group, worker_id) VALUES (?, ?, ?)",
                      [(version, *key) for key in touched])
        if version % 100 == 0:
            c.execute("DELETE FROM machine_changes WHERE version <= ?", (version - CHANGES_KEPT,))
        return version

    def _own_change(self, version: int) -> None:
        """
        A write of ours committed, bumping the counter to C{version}: on
        PostgreSQL, no reload for it, unless another roller's change came
        between (then the next refresh reloads).
        """
        if self._db.dialect.postgresql and self._data_version is not None and version == self._data_version + 1:
            self._data_version = version

    def _remember(self, m: Machine) -> None:
        self._cache[m.key] = m
        self._by_worker.setdefault(m.worker_id, {})[m.worker_group] = m

    def _forget(self, worker_group: str, worker_id: str) -> None:
        self._cache.pop((worker_group, worker_id), None)
        groups = self._by_worker.get(worker_id, {})
        groups.pop(worker_group, None)
        if not groups:
            self._by_worker.pop(worker_id, None)

    def snapshot(self) -> builtins.list[Machine]:
        """Every machine, from memory (the inventory as last loaded)."""
        return list(self._cache.values())

    def cached(self, key: tuple[str, str]) -> Machine | None:
        """The machine C{(worker_group, worker_id)} from memory, at once (None if there is none)."""
        return self._cache.get(key)

    def get(self, worker_group: str, worker_id: str) -> Deferred[Machine | None]:
        if self._db.closed:
            return fail(StoreError("the database is closed"))
        return succeed(self._cache.get((worker_group, worker_id)))

    def by_worker_id(self, worker_id: str) -> Deferred[list[Machine]]:
        if self._db.closed:
            return fail(StoreError("the database is closed"))
        groups = self._by_worker.get(worker_id, {})
        return succeed([groups[g] for g in sorted(groups)])

    def list(
        self,
        *,
        worker_group: str | None = None,
        pool: str | None = None,
        q: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> Deferred[builtins.list[Machine]]:
        w = Where().equal("worker_group", worker_group).equal("pool", pool).contains(("worker_id", "fqdn", "ip"), q)
        sql = f"SELECT data FROM machines{w.clause} ORDER BY worker_group, worker_id LIMIT ? OFFSET ?"
        args = [*w.args, limit, offset]

        def run(c: Cursor) -> list[Machine]:
            return [_row(r) for r in c.execute(sql, args).fetchall()]

        return self._db.read(run)

    def count(self) -> Deferred[int]:
        return succeed(len(self._cache))

    def insert(self, machine: Machine) -> Deferred[Machine]:
        """Add a new machine; L{Conflict} if one with its key exists."""
        now = self._clock.seconds()

        def run(c: Cursor) -> int:
            exists = c.execute(
                "SELECT 1 FROM machines WHERE worker_group = ? AND worker_id = ?", machine.key
            ).fetchone()
            if exists:
                raise Conflict(
                    f"machine {machine.worker_group}/{machine.worker_id} already exists",
                    code="machine_exists",
                )
            self._upsert(c, machine, now)
            return self._bump(c, [machine.key])

        def committed(version: int) -> Machine:
            self._own_change(version)
            return self._committed(machine)

        return self._db.write(run).addCallback(committed)

    def put(self, machine: Machine) -> Deferred[bool]:
        """Insert or replace; True if it was created."""
        now = self._clock.seconds()

        def run(c: Cursor) -> tuple[bool, int]:
            existed = c.execute(
                "SELECT 1 FROM machines WHERE worker_group = ? AND worker_id = ?", machine.key
            ).fetchone()
            self._upsert(c, machine, now)
            return existed is None, self._bump(c, [machine.key])

        def committed(result: tuple[bool, int]) -> bool:
            created, version = result
            self._own_change(version)
            self._remember(machine)
            return created

        return self._db.write(run).addCallback(committed)

    def put_many(self, machines: builtins.list[Machine]) -> Deferred[int]:
        now = self._clock.seconds()

        def run(c: Cursor) -> tuple[int, int]:
            for m in machines:
                self._upsert(c, m, now)
            return len(machines), self._bump(c, [m.key for m in machines])

        def committed(result: tuple[int, int]) -> int:
            count, version = result
            self._own_change(version)
            for m in machines:
                self._remember(m)
            return count

        return self._db.write(run).addCallback(committed)

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

    def delete(self, worker_group: str, worker_id: str) -> Deferred[bool]:
        def run(c: Cursor) -> tuple[bool, int | None]:
            c.execute(
                "DELETE FROM machines WHERE worker_group = ? AND worker_id = ?", (worker_group, worker_id)
            )
            deleted = c.rowcount > 0
            return deleted, self._bump(c, [(worker_group, worker_id)]) if deleted else None

        def committed(result: tuple[bool, int | None]) -> bool:
            deleted, version = result
            if version is not None:
                self._own_change(version)
            self._forget(worker_group, worker_id)
            return deleted

        return self._db.write(run).addCallback(committed)

    def _committed(self, machine: Machine) -> Machine:
        self._remember(machine)
        return machine
