"""
SQLite through C{twisted.enterprise.adbapi}: one connection, WAL, group commit.

All statements run on the pool's single thread and connection, so there is
exactly one writer.  Writes are queued and committed together: every write
asked for while a transaction is in flight joins the next one, each in its
own SAVEPOINT so one failing write fails only its own Deferred.  A write's
Deferred fires only after COMMIT returned, which is what lets the API
answer 201 only for a job that is on disk.

Storage faults (the database locked by another process past the busy
timeout, a full disk, a read-only file system, an I/O error) fail the
operations they hit with L{StorageUnavailable}, which the web layer answers
with 503 C{storage_unavailable} and C{Retry-After}.  The first fault is
logged in one line (repeated at most every L{FAULT_LOG_INTERVAL} seconds
while it lasts), recovery in another.  After a fault that can leave the
connection unusable (SQLite keeps a connection opened on a read-only file
system read-only for good), the connection is closed and the next operation
opens a new one: roller recovers by itself once the fault clears.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from attrs import define
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from roller import __version__
from roller.errors import UnavailableError
from roller.store import pg
from roller.store.dialect import POSTGRESQL, SQLITE, Dialect, ddl, is_postgresql_url
from roller.store.schema import HEARTBEAT_TABLE, MIGRATIONS

log = Logger()
T = TypeVar("T")


class IStoreReactor(IReactorCore, IReactorFromThreads, IReactorTime):
    """
    What the store needs of a reactor: adbapi's start and shutdown
    triggers, answers from the database thread, and the clock (fault logs,
    machine timestamps).
    """

A = TypeVar("A")
Cursor = sqlite3.Cursor


@define
class _Write:
    fn: Callable[..., Any]
    rows: bool  # made by write_rows: combines with its neighbours of the same fn
    args: Any  # write(): the arguments; write_rows(): the item
    d: Deferred
    timed: bool = False  # made by write_timed: its result is (result, seconds the transaction held the lock)


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
        except Exception as e:  # noqa: BLE001 -- whatever a write raises fails that write alone
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

#: SQLite: a passive WAL checkpoint, on a connection and thread of its own, after this many group
#: commits (the writer's own automatic checkpoint is off: run inside COMMIT, it made that commit, and
#: every write waiting behind it, wait for the copy and its fsync — seconds on a busy disk)
CHECKPOINT_EVERY = 32
#: SQLite: after a checkpoint let the writer restart the WAL, its file is cut back to this size
WAL_SIZE_LIMIT = 64 << 20
#: SQLite: the page cache of the writer's and the reader's connection, in KiB (SQLite's default is
#: 2 MB).  A long history's working set is the indexes every submission writes into at scattered
#: places (jobs_machine, jobs_machine_task, audit_target) and the pages the lookups read; with 2 MB
#: each of those is a read from the file.  Pages are allocated as they are used: a small database
#: costs no more; at most 2 x 64 MB (the checkpointer's connection keeps the default).  No
#: mmap_size: a read error on a mapped page kills the process (SIGBUS) instead of becoming the
#: storage fault roller reports and outlives (StorageUnavailable).
CACHE_KIB = 64 << 10

#: rows per multi-row INSERT (16 parameters a row stays far below SQLite's 32766)
ROWS_PER_INSERT = 256
#: machine keys per C{VALUES} list (L{key_values})
KEYS_PER_STATEMENT = 400


def key_values(keys: list[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """
    Machine keys C{(worker_group, worker_id)} a statement at a time: each
    chunk's C{(?, ?), (?, ?), ...} (for C{WITH k(g, w) AS (VALUES ...)})
    and its parameters.
    """
    for i in range(0, len(keys), KEYS_PER_STATEMENT):
        chunk = keys[i:i + KEYS_PER_STATEMENT]
        yield ", ".join(["(?, ?)"] * len(chunk)), [v for key in chunk for v in key]


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


#: the migration that adds C{schema_version.roller_version}: the version of
#: the roller that last upgraded the schema
ROLLER_VERSION_MIGRATION = 8


def upgraded_by(c: Cursor) -> str | None:
    """The version of the roller that last upgraded the database's schema, if it says."""
    try:
        row = c.execute("SELECT roller_version FROM schema_version").fetchone()
    except Exception:  # noqa: BLE001 -- sqlite3's or psycopg's "no such column"
        return None  # older than the column
    return None if row is None or row[0] is None else str(row[0])


def newer_schema_message(path: str, version: int, by: str | None) -> str:
    """One line: the database at C{path} is from a newer roller, which this one will not touch."""
    who, run = (f"roller {by}", f"roller {by} or newer") if by else ("a newer roller", "a newer roller")
    return (f"the database {path} is at schema version {version}, upgraded by {who}; this roller ({__version__}) "
            f"knows schema versions up to {len(MIGRATIONS)} and never downgrades one: run {run}, "
            "or restore a backup this roller made")


class StorageUnavailable(UnavailableError, StoreError):
    """
    The database cannot take this operation now (a storage fault); answered
    503 C{storage_unavailable} with C{Retry-After: retry_after}.

    @ivar kind: C{locked}, C{disk_full}, C{read_only}, C{io_error} or C{cannot_open};
        on PostgreSQL also C{unreachable} (server down, connection lost) and
        C{busy} (too many connections).
    @ivar what: what is wrong, e.g. "the disk holding the database is full".
    @ivar detail: SQLite's own words (for the log, not the client).
    """

    code = "storage_unavailable"

    def __init__(self, kind: str, what: str, retry_after: int, detail: str = ""):
        super().__init__(f"{what}; try again later")
        self.kind = kind
        self.what = what
        self.retry_after = retry_after
        self.detail = detail


#: SQLite primary result codes that are storage faults: (kind, what is wrong).
_FAULTS = {
    5: ("locked", "the database is locked by another process"),  # SQLITE_BUSY
    6: ("locked", "the database is locked"),  # SQLITE_LOCKED
    8: ("read_only", "the database is read-only (read-only file system or file)"),  # SQLITE_READONLY
    10: ("io_error", "the disk holding the database reported an I/O error"),  # SQLITE_IOERR
    13: ("disk_full", "the disk holding the database is full"),  # SQLITE_FULL
    14: ("cannot_open", "the database file cannot be opened (missing, unwritable or read-only)"),  # SQLITE_CANTOPEN
}
#: For errors without a result code: what SQLite says for each.
_FAULT_WORDS = (("database is locked", 5), ("database table is locked", 6), ("readonly database", 8),
                ("disk i/o error", 10), ("disk is full", 13), ("unable to open database file", 14))
#: Faults after which the connection is closed and a new one opened.
_REOPEN = frozenset({"read_only", "io_error", "cannot_open", "unreachable"})
#: Seconds a client is told to wait (Retry-After) per kind of fault.
RETRY_AFTER = {"locked": 5, "busy": 5, "unreachable": 10}
RETRY_AFTER_DEFAULT = 30
#: While a fault lasts, it is logged again at most this often (seconds).
FAULT_LOG_INTERVAL = 60.0


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    seen = 0
    while e is not None and seen < 10:
        yield e
        e = e.__cause__ or e.__context__
        seen += 1


def storage_fault(error: BaseException) -> StorageUnavailable | None:
    """
    The L{StorageUnavailable} that C{error} (or an error it was raised
    while handling, e.g. a failed C{ROLLBACK TO} after the fault) stands
    for; None if it is not a storage fault.
    """
    for e in _chain(error):
        if isinstance(e, StorageUnavailable):
            return e
        found = pg.pg_fault(e)
        if found is not None:
            kind, what = found
            detail = " ".join(str(e).split())
            return StorageUnavailable(kind, what, RETRY_AFTER.get(kind, RETRY_AFTER_DEFAULT),
                                      detail=f"{type(e).__name__}: {detail}")
        if not isinstance(e, sqlite3.Error):
            continue
        code = getattr(e, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary not in _FAULTS:
            text = str(e).lower()
            primary = next((c for words, c in _FAULT_WORDS if words in text), None)
        if primary in _FAULTS:
            kind, what = _FAULTS[primary]
            name = getattr(e, "sqlite_errorname", None) or type(e).__name__
            return StorageUnavailable(kind, what, RETRY_AFTER.get(kind, RETRY_AFTER_DEFAULT),
                                      detail=f"{name}: {e}")
    return None


def _read_fault(error: BaseException, reading: bool) -> StorageUnavailable | None:
    fault = storage_fault(error)
    if fault is not None and reading and fault.kind == "read_only":
        return None  # a write through the query-only readers' connection: a bug, not the storage
    return fault


def _failure_as_fault(failure: Failure, reading: bool = False) -> Failure:
    """C{failure}, or a failure with its L{StorageUnavailable} if it is a storage fault."""
    fault = _read_fault(failure.value, reading) if failure.value is not None else None
    if fault is None or fault is failure.value:
        return failure
    return Failure(fault)


class _Connection(adbapi.Connection):
    """
    adbapi's connection wrapper, able to drop its connection (the next
    operation opens a new one) and quiet about rolling back one that is
    gone or has no transaction (our statements manage transactions).
    """

    def drop(self) -> None:
        if self._connection is not None:
            try:
                self._pool.disconnect(self._connection)
            except Exception:  # noqa: BLE001 -- closing a broken connection may itself fail, in any way
                self._pool.connections.pop(self._pool.threadID(), None)
            self._connection = None

    def commit(self) -> None:
        if self._connection is not None:
            self._connection.commit()

    def rollback(self) -> None:
        if self._connection is not None:
            try:
                self._connection.rollback()
            except Exception:  # noqa: BLE001 -- sqlite3's or psycopg's: the connection is gone anyway
                pass

    @property
    def stale(self) -> bool:
        """A PostgreSQL connection known to be closed or broken (SQLite's never are)."""
        c = self._connection
        return c is None or bool(getattr(c, "closed", False) or getattr(c, "broken", False))

    def renew(self) -> None:
        """Close this connection (whatever state it is in) and open a new one."""
        self.drop()
        self._connection = self._pool.connect()


class _Pool(adbapi.ConnectionPool):
    connectionFactory = _Connection


def integrity_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a broken constraint (UNIQUE, CHECK, FOREIGN KEY) raises, on either engine."""
    return (sqlite3.IntegrityError, *pg.integrity_errors())


def _unreachable(error: BaseException) -> bool:
    """Whether C{error} is PostgreSQL's server gone or connection lost: a new connection may work at once."""
    fault = storage_fault(error)
    return fault is not None and fault.kind == "unreachable"


def _drop_if_broken(conn: Any, error: BaseException, reading: bool = False) -> None:
    """After a fault that can leave C{conn} unusable, close it: the next operation opens a new one."""
    fault = _read_fault(error, reading)
    if fault is not None and fault.kind in _REOPEN and isinstance(conn, _Connection):
        conn.drop()


def create_private(path: str) -> None:
    """
    Create the database file C{path} (and its directory) readable by its
    owner only, if it does not exist: it holds password hashes and the
    audit log.  SQLite gives the C{-wal} and C{-shm} files it makes next to
    it the same mode.
    """
    if path == ":memory:" or path.startswith("file:"):
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        return
    os.close(fd)


def data_version(c: Cursor, dialect: Dialect) -> tuple[Any, ...]:
    """
    A value that changes whenever anything was committed to the database,
    by any connection (for caches of query results).  SQLite: C{PRAGMA
    data_version} (other connections' commits) with the connection's own
    C{total_changes}; PostgreSQL: the WAL insert position (every committed
    change writes WAL before its COMMIT returns; it may also move for
    other reasons, which only costs a cache miss).
    """
    if dialect.postgresql:
        return ("pg", str(c.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]))
    conn = c.connection
    return (id(conn), c.execute("PRAGMA data_version").fetchone()[0], conn.total_changes)


def write_heartbeat(c: Cursor, now: float) -> None:
    """A real, committed write that does not grow the database: one row, overwritten."""
    c.execute("INSERT INTO heartbeat (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
              (now,))


def check_writable(path: str, now: float, *, timeout: float = 5.0, user: str | None = None,
                   password: str | None = None) -> None:
    """
    Synchronously, before roller starts: open the database at C{path}
    (creating it, owner-only, if new) and commit a write.  L{StoreError}
    saying what is wrong if it cannot take one (read-only file system or
    file, full disk, missing permissions, locked for C{timeout} seconds).
    """
    if path == ":memory:":
        return
    if is_postgresql_url(path):
        _check_writable_pg(path, now, user, password)
        return
    try:
        create_private(path)
        mode = os.stat(path).st_mode & 0o777
        if mode & 0o077:
            log.warn("The database {path} is readable or writable by other users (mode {mode:o}); it holds password "
                     "hashes and the audit log: chmod 600 {path}*", path=path, mode=mode)
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    except (OSError, sqlite3.Error) as e:
        raise StoreError(f"cannot open the database {path}: {_why(e)}") from None
    try:
        _incremental_if_new(conn)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(HEARTBEAT_TABLE)
        write_heartbeat(conn.cursor(), now)
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        raise StoreError(f"the database {path} cannot take a write: {_why(e)}") from None
    finally:
        conn.close()


def _check_writable_pg(url: str, now: float, user: str | None, password: str | None) -> None:
    """L{check_writable} on PostgreSQL: connect, make the heartbeat table, commit a write."""
    try:
        target = pg.parse_url(url)
    except pg.PgUrlError as e:
        raise StoreError(str(e)) from None
    try:
        conn = pg.connect(**target.kwargs(password, user))
    except ImportError as e:
        raise StoreError(str(e)) from None
    except Exception as e:  # noqa: BLE001 -- psycopg's connection errors say why
        raise StoreError(f"cannot connect to the database {target.display}: {_why(e)}") from None
    try:
        c = conn.cursor()
        c.execute("BEGIN")
        c.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
        if c.execute("SELECT to_regclass('schema_version')").fetchone()[0] is not None:
            version = int(c.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])
            if version > len(MIGRATIONS):
                raise StoreError(newer_schema_message(target.display, version, upgraded_by(c)))
        for statement in ddl(HEARTBEAT_TABLE, POSTGRESQL):
            c.execute(statement)
        write_heartbeat(c, now)
        c.execute("COMMIT")
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 -- psycopg's errors say why
        raise StoreError(f"the database {target.display} cannot take a write: {_why(e)}") from None
    finally:
        conn.close()


#: the advisory lock (a number of roller's own) migrations hold on PostgreSQL, so two rollers starting
#: together migrate one after the other
MIGRATION_LOCK = 0x726F6C6C6572  # "roller"


def _why(e: BaseException) -> str:
    fault = storage_fault(e)
    if fault is not None:
        return f"{fault.what} ({fault.detail})"
    return str(e) or type(e).__name__


def _incremental_if_new(conn: sqlite3.Connection) -> None:
    """
    A new (empty) database frees the pages pruning empties with C{PRAGMA
    incremental_vacuum} (L{roller.store.sqlite}): set before WAL and the
    first table.  An older database keeps its mode until one C{VACUUM}
    (C{roller db vacuum}, or at start-up when it is small); setting it on
    one that has tables would rewrite its header at every commit.
    """
    if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")


def _open_connection(conn: sqlite3.Connection, synchronous: str = "NORMAL", *, autocheckpoint: bool = True) -> None:
    conn.row_factory = sqlite3.Row
    _incremental_if_new(conn)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    if not autocheckpoint:  # L{Database} checkpoints on a connection of its own
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")


def _open_checkpointer(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA busy_timeout=0")  # a passive checkpoint never waits anyway


def _passive_checkpoint(conn: Any) -> None:
    cursor = conn.cursor()
    try:
        cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    finally:
        cursor.close()


def _open_reader(conn: sqlite3.Connection) -> None:
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA query_only=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")


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
    @param checkpoints: SQLite: the pool that runs the WAL checkpoints (the
        writer's connection has its automatic ones off), every
        L{CHECKPOINT_EVERY} group commits, never more than one at a time.
    """

    def __init__(self, pool: adbapi.ConnectionPool, readers: adbapi.ConnectionPool | None = None, *,
                 path: str = ":memory:", reactor: IStoreReactor, dialect: Dialect = SQLITE,
                 checkpoints: adbapi.ConnectionPool | None = None):
        self._pool = pool
        self._readers = readers
        self._checkpoints = checkpoints
        self._commits = 0  # group commits since the last checkpoint began
        self._checkpointing = False
        self._last_checkpoint = False  # the one at close was started
        #: the SQLite file, or the PostgreSQL URL (which never holds a password)
        self.path = path
        self.dialect = dialect
        self._reactor = reactor  # the pools' (cp_reactor)
        #: the storage fault the last failed operation hit, until a write succeeds
        self.fault: StorageUnavailable | None = None
        self._fault_since = 0.0
        self._fault_logged = 0.0
        self._refused = 0
        self._pending: list[_Write] = []
        self._flushing = False
        self._closed = False  # close() was called: no new work is accepted
        self._pool_closed = False
        self._reads = 0  # reads handed to the pool and not yet answered
        self._close_waiters: list[Deferred] = []

    @classmethod
    def connect(cls, path: str, reactor: IStoreReactor, *, synchronous: str = "NORMAL", user: str | None = None,
                password: str | None = None) -> Database:
        """
        Make the pool.  C{synchronous} is SQLite's: NORMAL survives a killed
        process (WAL), FULL also survives losing power.
        """
        if is_postgresql_url(path):
            return cls.connect_postgresql(path, reactor, user=user, password=password)
        create_private(path)

        def pool(openfun: Callable[[sqlite3.Connection], None]) -> adbapi.ConnectionPool:
            return _Pool(
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

        if path == ":memory:":  # one connection is the whole database
            return cls(pool(lambda conn: _open_connection(conn, synchronous)), path=path, reactor=reactor)
        writer = pool(lambda conn: _open_connection(conn, synchronous, autocheckpoint=False))
        return cls(writer, pool(_open_reader), path=path, reactor=reactor, checkpoints=pool(_open_checkpointer))

    @classmethod
    def connect_postgresql(cls, url: str, reactor: IStoreReactor, *, user: str | None = None,
                           password: str | None = None, readers: int = 4) -> Database:
        """
        The pools on PostgreSQL: one connection for the writes (group commit
        as on SQLite), and up to C{readers} for reads, which need not wait
        for one another.  No connection is made until the first operation.
        """
        try:
            target = pg.parse_url(url)
        except pg.PgUrlError as e:
            raise StoreError(str(e)) from None
        pg._psycopg()  # psycopg missing: say so now, in one line

        def pool(size: int) -> adbapi.ConnectionPool:
            return _Pool("roller.store.pg", cp_min=1, cp_max=size, cp_reactor=reactor, cp_noisy=False,
                         **target.kwargs(password, user))

        return cls(pool(1), pool(readers), path=target.display, reactor=reactor, dialect=POSTGRESQL)

    @property
    def pools(self) -> list[adbapi.ConnectionPool]:
        """The writer's pool, then the readers' and the checkpointer's if there are."""
        return [self._pool] + [p for p in (self._readers, self._checkpoints) if p is not None]

    @property
    def closed(self) -> bool:
        return self._closed

    def read(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run C{fn(cursor, *args)} on the readers' connection; its result."""
        return self._read(self._readers or self._pool, fn, args)

    def read_on_writer(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Like L{read}, on the writer's connection: for C{PRAGMA data_version},
        which counts commits by I{other} connections.
        """
        return self._read(self._pool, fn, args)

    def on_writer(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{fn(cursor, *args)} on the writer's connection outside any
        transaction, after the writes before it: for statements that make
        their own (C{VACUUM}, C{PRAGMA incremental_vacuum}).
        """
        return self._read(self._pool, fn, args, reading=False)

    def beat(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        A one-statement write committed on its own, at once: a roller's
        heartbeat.  On PostgreSQL it runs on a readers' connection (in
        autocommit), so it never waits behind the group commit's queue or
        the locks a write transaction waits on: a roller whose writes wait
        is not taken for dead.  On SQLite (one host) it is an ordinary write.
        """
        if not self.dialect.postgresql or self._readers is None:
            return self.write(fn, *args)
        return self._read(self._readers, fn, args, reading=False)

    def _read(self, pool: adbapi.ConnectionPool, fn: Callable[..., T], args: tuple,
              reading: bool = True) -> Deferred[T]:
        if self._closed:
            return fail(StoreError("the database is closed"))

        def attempt(conn: Any) -> T:
            cursor = conn.cursor()
            try:
                return fn(cursor, *args)
            finally:
                cursor.close()

        def run(conn: Any) -> T:
            try:
                if self.dialect.postgresql:
                    if conn.stale:
                        conn.renew()
                    try:
                        return attempt(conn)
                    except Exception as e:
                        if not (reading and _unreachable(e)):
                            raise
                    conn.renew()  # a server restarted since this connection's last use: once more, anew
                return attempt(conn)
            except Exception as e:
                _drop_if_broken(conn, e, reading=reading)
                raise

        def answered(result: Any) -> Any:
            self._reads -= 1
            if isinstance(result, Failure):
                result = self._fault_of(result, reading=reading)
            self._maybe_finish_close()
            return result

        self._reads += 1
        return pool.runWithConnection(run).addBoth(answered)

    def write(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{fn(cursor, *args)} in a transaction; fire once committed.
        """
        return self._add(fn, False, args)

    def write_rows(self, fn: Callable[[Cursor, list[A]], list[T]], item: A) -> Deferred[T]:
        """
        Like L{write}, for writes that combine: consecutive pending writes
        made with the same C{fn} run as one call C{fn(cursor, items)}, which
        returns one result per item (e.g. one multi-row C{INSERT} for a burst
        of submissions instead of a statement per job).  If that call fails,
        each item is tried again alone, in its own savepoint, so a bad item
        fails only its own Deferred.
        """
        return self._add(fn, True, item)

    def write_timed(self, fn: Callable[..., T], *args: Any) -> Deferred[tuple[T, float]]:
        """
        Like L{write}; fires with C{(result, held)}: the seconds the
        transaction it was committed in held the write lock (from C{BEGIN
        IMMEDIATE} to C{COMMIT}, with whatever writes joined it).
        """
        return self._add(fn, False, args, timed=True)

    def _add(self, fn: Callable[..., Any], rows: bool, args: Any, timed: bool = False) -> Deferred:
        if self._closed:
            return fail(StoreError("the database is closed"))
        d: Deferred = Deferred()
        self._pending.append(_Write(fn, rows, args, d, timed))
        if not self._flushing:
            self._flush()
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        units = _units(batch)
        writes = [w for unit in units for w in unit]
        timed = any(w.timed for w in writes)
        self._flushing = True

        def run(conn: Any) -> list[tuple[bool, Any]]:
            try:
                if self.dialect.postgresql and conn.stale:
                    conn.renew()
                outcomes = transaction(conn)
            except Exception as e:
                _drop_if_broken(conn, e)
                raise
            for ok, value in outcomes:
                if not ok:
                    _drop_if_broken(conn, value)
            return outcomes

        def begin(conn: Any) -> Cursor:
            """
            Open the write transaction.  On PostgreSQL, a connection whose
            server restarted since its last use fails here, before anything
            was written: then once more on a new connection.
            """
            cursor = conn.cursor()
            try:
                cursor.execute(self.dialect.begin_write)
                return cursor
            except Exception as e:
                cursor.close()
                if not (self.dialect.postgresql and _unreachable(e)):
                    raise
            conn.renew()
            cursor = conn.cursor()
            cursor.execute(self.dialect.begin_write)
            return cursor

        def transaction(conn: Any) -> list[tuple[bool, Any]]:
            outcomes: list[tuple[bool, Any]] = []
            single = len(units) == 1 and len(units[0]) == 1  # a lone write needs no savepoint
            began = time.perf_counter()
            cursor = begin(conn)
            try:
                if single:
                    try:
                        outcomes.append((True, _call(cursor, units[0])[0]))
                    except Exception as e:  # noqa: BLE001 -- whatever the write raises fails it alone
                        cursor.execute("ROLLBACK")
                        return [(False, e)]
                else:
                    for unit in units:
                        outcomes.extend(_in_savepoint(cursor, unit))
                cursor.execute("COMMIT")
                if timed:
                    held = time.perf_counter() - began  # BEGIN IMMEDIATE to COMMIT: the write lock's hold
                    outcomes = [(ok, (value, held)) if ok and w.timed else (ok, value)
                                for w, (ok, value) in zip(writes, outcomes, strict=True)]
            except BaseException:
                try:
                    cursor.execute("ROLLBACK")
                except Exception:  # noqa: BLE001 -- sqlite3's or psycopg's: the transaction is gone anyway
                    pass
                raise
            finally:
                cursor.close()
            return outcomes

        def done(outcomes: Any) -> None:
            # Still "flushing" while the callbacks run: a write they ask for
            # joins the next batch instead of starting a second transaction
            # next to this one's follow-up.
            try:
                if isinstance(outcomes, Failure):
                    outcomes = self._fault_of(outcomes)
                    for w in writes:
                        w.d.errback(outcomes)
                else:
                    failures = {i: self._fault_of(Failure(value))
                                for i, (ok, value) in enumerate(outcomes) if not ok}
                    if len(failures) < len(outcomes) and not any(
                            isinstance(f.value, StorageUnavailable) for f in failures.values()):
                        self._recovered()  # writes are committed again
                    for i, (w, (ok, value)) in enumerate(zip(writes, outcomes, strict=True)):
                        if ok:
                            w.d.callback(value)
                        else:
                            w.d.errback(failures[i])
                    self._committed()
            finally:
                self._flushing = False
            if self._pending:
                self._flush()
            else:
                self._maybe_finish_close()

        self._pool.runWithConnection(run).addBoth(done)

    def checkpoint(self) -> Deferred[None]:
        """
        SQLite: a passive WAL checkpoint now, beside the writer (on the
        checkpointer's connection; on the writer's for an in-memory one);
        nothing on PostgreSQL.
        """
        if self._checkpoints is None:  # PostgreSQL, or an in-memory database: no WAL
            return succeed(None)
        if self._closed:
            return fail(StoreError("the database is closed"))
        return self._checkpoints.runWithConnection(_passive_checkpoint).addErrback(self._fault_of)

    def _committed(self) -> None:
        """After a group commit: every L{CHECKPOINT_EVERY}, a passive checkpoint in its own thread."""
        if self._checkpoints is None:
            return
        self._commits += 1
        if self._checkpointing or self._closed or self._commits < CHECKPOINT_EVERY:
            return
        self._commits = 0
        self._checkpoint_in_background()

    def _checkpoint_in_background(self) -> None:
        """One passive checkpoint on the checkpointer's connection; close waits for it."""
        assert self._checkpoints is not None
        self._checkpointing = True

        def done(result: Any) -> None:
            self._checkpointing = False
            if isinstance(result, Failure):  # the next write says what is wrong with the storage
                log.debug("WAL checkpoint failed: {error}", error=result.getErrorMessage())
            self._maybe_finish_close()

        self._checkpoints.runWithConnection(_passive_checkpoint).addBoth(done)

    # -- storage faults

    def _fault_of(self, failure: Failure, reading: bool = False) -> Failure:
        """C{failure} as a L{StorageUnavailable} if it is a storage fault (noted and logged)."""
        failure = _failure_as_fault(failure, reading)
        if isinstance(failure.value, StorageUnavailable):
            self._note_fault(failure.value)
            if failure.value.kind in _REOPEN:
                self._drop_connections()
        return failure

    def _drop_connections(self) -> None:
        """
        Close every pool's connection, in its own thread, after a fault that
        can leave them unusable; the next operation opens new ones.  All of
        them: SQLite shares a file's read-only state between the connections
        of a process, so a writer reopened next to the old reader would stay
        read-only.
        """
        if self._pool_closed:
            return
        for pool in self.pools:
            def drop(pool: adbapi.ConnectionPool = pool) -> None:
                conn = pool.connections.get(pool.threadID())
                if conn is not None:
                    pool.disconnect(conn)

            deferToThreadPool(self._reactor, pool.threadpool, drop).addErrback(lambda f: None)

    def _note_fault(self, fault: StorageUnavailable) -> None:
        now = self._reactor.seconds()
        if self.fault is None or self.fault.kind != fault.kind:
            log.error("Database {path} unavailable: {why} ({detail}); what needs it is refused with 503 "
                      "until it recovers", path=self.path, why=fault.what, detail=fault.detail)
            if self.fault is None:
                self._fault_since = now
            self._fault_logged = now
            self._refused = 0
        elif now - self._fault_logged >= FAULT_LOG_INTERVAL:
            log.error("Database {path} still unavailable after {duration:.0f} s: {why} ({detail}); {refused} "
                      "operation(s) refused since the last report", path=self.path, duration=now - self._fault_since,
                      why=fault.what, detail=fault.detail, refused=self._refused)
            self._fault_logged = now
            self._refused = 0
        self._refused += 1
        self.fault = fault

    def _recovered(self) -> None:
        if self.fault is not None:
            log.info("Database {path} takes writes again, after {duration:.0f} s unavailable ({why})",
                     path=self.path, duration=self._reactor.seconds() - self._fault_since,
                     why=self.fault.what)
            self.fault = None

    def check_write(self) -> Deferred[None]:
        """
        Commit a real write (the C{heartbeat} row, overwritten: the database
        does not grow); fails with L{StorageUnavailable} if the database
        cannot take one now.
        """
        now = self._reactor.seconds()
        return self.write(write_heartbeat, now)

    def migrate(self) -> Deferred[int]:
        """Apply the migrations not yet applied; the resulting version."""

        def run(cursor: Cursor) -> int:
            if self.dialect.postgresql:  # two rollers starting together: one migrates, the other waits
                cursor.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = cursor.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                cursor.execute("INSERT INTO schema_version VALUES (0)")
                version = 0
            else:
                version = row[0]
            if version > len(MIGRATIONS):
                raise StoreError(newer_schema_message(self.path, version, upgraded_by(cursor)))
            for n, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in ddl(script, self.dialect):
                    cursor.execute(statement)
                cursor.execute("UPDATE schema_version SET version = ?", (n,))
                log.info("Database migrated to schema version {version}", version=n)
            if version < len(MIGRATIONS) and len(MIGRATIONS) >= ROLLER_VERSION_MIGRATION:
                cursor.execute("UPDATE schema_version SET roller_version = ?", (__version__,))
            return len(MIGRATIONS)

        return self.write(run)

    def close(self) -> Deferred[None]:
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
        if self._flushing or self._pending or self._reads or self._checkpointing:
            return
        if self._checkpoints is not None and not self._last_checkpoint:
            # one last passive checkpoint, so the file is whole (and shrunk after pruning) at close even
            # when another process still has the database open (then no close folds the WAL back)
            self._last_checkpoint = True
            self._checkpoint_in_background()
            return
        self._pool_closed = True
        for pool in self.pools:
            pool.close()
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)
