"""
SQLite through C{twisted.enterprise.adbapi}: one connection, WAL, group commit.

All statements run on the pool's single thread and connection, so there is
exactly one writer.  Writes are queued and committed together: every write
asked for while a transaction is in flight joins the next one, each in its
own SAVEPOINT so one failing write fails only its own Deferred.  A write's
Deferred fires only after COMMIT returned, which is what lets the API
answer 201 only for a job that is on disk.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Callable, TypeVar

from attrs import define
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from roller.store.schema import MIGRATIONS

log = Logger()
T = TypeVar("T")
A = TypeVar("A")
Cursor = sqlite3.Cursor


@define
class _Write:
    fn: Callable[..., Any]
    rows: bool  # made by write_rows: combines with its neighbours of the same fn
    args: Any  # write(): the arguments; write_rows(): the item
    d: Deferred


def _units(pending: list[_Write]) -> list[list[_Write]]:
    """Pending writes in order, neighbouring L{Database.write_rows} of one fn together."""
    units: list[list[_Write]] = []
    for w in pending:
        last = units[-1] if units else None
        if w.rows and last is not None and last[0].rows and last[0].fn is w.fn:
            last.append(w)
        else:
            units.append([w])
    return units


def _call(cursor: Cursor, unit: list[_Write]) -> list[Any]:
    """Run one unit: a plain write, or combined rows; one result per write."""
    first = unit[0]
    if not first.rows:
        return [first.fn(cursor, *first.args)]
    results = first.fn(cursor, [w.args for w in unit])
    if len(results) != len(unit):
        raise StoreError(f"{first.fn!r} returned {len(results)} results for {len(unit)} rows")
    return results


def _in_savepoint(cursor: Cursor, unit: list[_Write]) -> list[tuple[bool, Any]]:
    """
    Run C{unit} in a savepoint: on failure its changes are undone and, for
    combined rows, each row is tried alone so only the bad ones fail.
    """
    cursor.execute("SAVEPOINT w")
    try:
        try:
            return [(True, r) for r in _call(cursor, unit)]
        except Exception as e:
            cursor.execute("ROLLBACK TO w")
            if len(unit) == 1:
                return [(False, e)]
        return [outcome for w in unit for outcome in _in_savepoint(cursor, [w])]
    finally:
        cursor.execute("RELEASE w")


#: Writes committed together at most.  Their Deferreds fire in one reactor
#: turn: a thousand submissions answered at once would hold the reactor
#: (and every other request) for a quarter of a second.
MAX_BATCH = 64

#: rows per multi-row INSERT (16 parameters a row stays far below SQLite's 32766)
ROWS_PER_INSERT = 256


def insert_rows(c: Cursor, into: str, rows: list[tuple], returning: str = "") -> list[Any]:
    """
    C{INSERT INTO <into> VALUES (...), (...)}: one statement per
    L{ROWS_PER_INSERT} rows; the C{RETURNING} rows if asked for (in no
    promised order).
    """
    out: list[Any] = []
    for i in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[i:i + ROWS_PER_INSERT]
        row = "(" + ", ".join("?" * len(chunk[0])) + ")"
        sql = f"INSERT INTO {into} VALUES {', '.join([row] * len(chunk))}"
        args = [value for r in chunk for value in r]
        if returning:
            out += c.execute(f"{sql} RETURNING {returning}", args).fetchall()
        else:
            c.execute(sql, args)
    return out


class StoreError(Exception):
    """The database could not be opened or migrated; the message says why."""


def _open_connection(conn: sqlite3.Connection, synchronous: str = "NORMAL") -> None:
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")


def _open_reader(conn: sqlite3.Connection) -> None:
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA query_only=ON")
    conn.execute("PRAGMA busy_timeout=5000")


class Database:
    """
    An adbapi pool of one SQLite connection with batched writes, and
    optionally a second, read-only one for reads.

    @param pool: an L{adbapi.ConnectionPool} of C{sqlite3} connections made
        with C{isolation_level=None} (transactions are ours).
    @param readers: the pool L{read} uses, if not C{pool}.  With WAL a
        reader sees every transaction committed before its read began and
        never waits for the writer: a status query is not queued behind a
        burst of a thousand job updates.
    """

    def __init__(self, pool: adbapi.ConnectionPool, readers: adbapi.ConnectionPool | None = None):
        self._pool = pool
        self._readers = readers
        self._pending: list[_Write] = []
        self._flushing = False
        self._closed = False  # close() was called: no new work is accepted
        self._pool_closed = False
        self._reads = 0  # reads handed to the pool and not yet answered
        self._close_waiters: list[Deferred] = []

    @classmethod
    def connect(cls, path: str, reactor: Any, *, synchronous: str = "NORMAL") -> "Database":
        """
        Make the pool.  C{synchronous} is SQLite's: NORMAL survives a killed
        process (WAL), FULL also survives losing power.
        """
        if path != ":memory:":
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
        def pool(openfun: Callable[[sqlite3.Connection], None]) -> adbapi.ConnectionPool:
            return adbapi.ConnectionPool(
                "sqlite3",
                path,
                check_same_thread=False,
                isolation_level=None,
                cached_statements=512,  # multi-row INSERTs come in many sizes
                cp_min=1,
                cp_max=1,
                cp_openfun=openfun,
                cp_reactor=reactor,
            )

        writer = pool(lambda conn: _open_connection(conn, synchronous))
        if path == ":memory:":  # one connection is the whole database
            return cls(writer)
        return cls(writer, pool(_open_reader))

    @property
    def pools(self) -> list[adbapi.ConnectionPool]:
        """The writer's pool, then the readers' if there is one."""
        return [self._pool] + ([self._readers] if self._readers is not None else [])

    @property
    def closed(self) -> bool:
        return self._closed

    def read(self, fn: Callable[..., T], *args: Any) -> "Deferred[T]":
        """Run C{fn(cursor, *args)} on the readers' connection; its result."""
        return self._read(self._readers or self._pool, fn, args)

    def read_on_writer(self, fn: Callable[..., T], *args: Any) -> "Deferred[T]":
        """
        Like L{read}, on the writer's connection: for C{PRAGMA data_version},
        which counts commits by I{other} connections.
        """
        return self._read(self._pool, fn, args)

    def _read(self, pool: adbapi.ConnectionPool, fn: Callable[..., T], args: tuple) -> "Deferred[T]":
        if self._closed:
            return fail(StoreError("the database is closed"))

        def run(conn: Any) -> T:
            cursor = conn.cursor()
            try:
                return fn(cursor, *args)
            finally:
                cursor.close()

        def answered(result: Any) -> Any:
            self._reads -= 1
            self._maybe_finish_close()
            return result

        self._reads += 1
        return pool.runWithConnection(run).addBoth(answered)

    def write(self, fn: Callable[..., T], *args: Any) -> "Deferred[T]":
        """
        Run C{fn(cursor, *args)} in a transaction; fire once committed.
        """
        return self._add(fn, False, args)

    def write_rows(self, fn: Callable[[Cursor, list[A]], list[T]], item: A) -> "Deferred[T]":
        """
        Like L{write}, for writes that combine: consecutive pending writes
        made with the same C{fn} run as one call C{fn(cursor, items)}, which
        returns one result per item (e.g. one multi-row C{INSERT} for a burst
        of submissions instead of a statement per job).  If that call fails,
        each item is tried again alone, in its own savepoint, so a bad item
        fails only its own Deferred.
        """
        return self._add(fn, True, item)

    def _add(self, fn: Callable[..., Any], rows: bool, args: Any) -> Deferred:
        if self._closed:
            return fail(StoreError("the database is closed"))
        d: Deferred = Deferred()
        self._pending.append(_Write(fn, rows, args, d))
        if not self._flushing:
            self._flush()
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        units = _units(batch)
        self._flushing = True

        def run(conn: Any) -> list[tuple[bool, Any]]:
            outcomes: list[tuple[bool, Any]] = []
            cursor = conn.cursor()
            single = len(units) == 1 and len(units[0]) == 1  # a lone write needs no savepoint
            cursor.execute("BEGIN IMMEDIATE")
            try:
                if single:
                    try:
                        outcomes.append((True, _call(cursor, units[0])[0]))
                    except Exception as e:
                        cursor.execute("ROLLBACK")
                        return [(False, e)]
                else:
                    for unit in units:
                        outcomes.extend(_in_savepoint(cursor, unit))
                cursor.execute("COMMIT")
            except BaseException:
                try:
                    cursor.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
            finally:
                cursor.close()
            return outcomes

        writes = [w for unit in units for w in unit]

        def done(outcomes: Any) -> None:
            # Still "flushing" while the callbacks run: a write they ask for
            # joins the next batch instead of starting a second transaction
            # next to this one's follow-up.
            try:
                if isinstance(outcomes, Failure):
                    for w in writes:
                        w.d.errback(outcomes)
                else:
                    for w, (ok, value) in zip(writes, outcomes):
                        if ok:
                            w.d.callback(value)
                        else:
                            w.d.errback(Failure(value))
            finally:
                self._flushing = False
            if self._pending:
                self._flush()
            else:
                self._maybe_finish_close()

        self._pool.runWithConnection(run).addBoth(done)

    def migrate(self) -> "Deferred[int]":
        """Apply the migrations not yet applied; the resulting version."""

        def run(cursor: Cursor) -> int:
            cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = cursor.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                cursor.execute("INSERT INTO schema_version VALUES (0)")
                version = 0
            else:
                version = row[0]
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"the database is at schema version {version}, newer than this roller "
                    f"knows ({len(MIGRATIONS)}); upgrade roller"
                )
            for n, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        cursor.execute(statement)
                cursor.execute("UPDATE schema_version SET version = ?", (n,))
                log.info("Database migrated to schema version {version}", version=n)
            return len(MIGRATIONS)

        return self.write(run)

    def close(self) -> "Deferred[None]":
        """
        Stop accepting work (new reads and writes fail with L{StoreError}),
        finish every read and write already accepted, then close the pool.
        Fires when the connection is closed.
        """
        if self._pool_closed:
            return succeed(None)
        self._closed = True
        d: Deferred = Deferred()
        self._close_waiters.append(d)
        self._maybe_finish_close()
        return d

    def _maybe_finish_close(self) -> None:
        if not self._closed or self._pool_closed:
            return
        if self._flushing or self._pending or self._reads:
            return
        self._pool_closed = True
        for pool in self.pools:
            pool.close()
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)
