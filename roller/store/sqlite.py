"""
The SQLite-only parts of keeping a database for years, in one place:
the lock a running roller holds, online backup, restore, the integrity
check, and vacuuming.  (The store's ordinary statements are portable SQL;
these are not, and another engine would bring its own.)

Everything here is synchronous: the C{roller db} commands call it in
their own process, the service through L{roller.store.db.Database.on_writer}.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from attrs import frozen

from roller import __version__
from roller.store.db import Cursor, StoreError, create_private, newer_schema_message, upgraded_by
from roller.store.schema import MIGRATIONS

__all__ = ["DatabaseInUse", "DatabaseLock", "acquire_lock", "backup", "check", "restore", "vacuum",
           "incremental_vacuum", "auto_vacuum", "Check", "Backup"]

#: a database at most this large is converted to incremental auto-vacuum at start-up (one VACUUM)
START_VACUUM_MAX_BYTES = 64 << 20


class DatabaseInUse(StoreError):
    """A roller holds the database's lock (or another C{roller db restore} does)."""


def lock_path(db_path: str) -> str:
    return db_path + ".lock"


class DatabaseLock:
    """
    An exclusive C{flock} on C{<database>.lock}, holding the pid of its
    holder: a running roller keeps it for its whole life, so a second
    roller on the same file, C{roller db restore} and C{roller db vacuum}
    can tell and refuse.  The kernel drops it when the process dies
    (even by C{kill -9}); the file itself stays.
    """

    def __init__(self, path: str, fd: int):
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def acquire_lock(db_path: str, what: str = "a roller") -> DatabaseLock | None:
    """
    Take the lock of the database at C{db_path} (None for an in-memory
    one); L{DatabaseInUse} saying who holds it if someone does.
    """
    if db_path == ":memory:" or db_path.startswith("file:"):
        return None
    path = lock_path(db_path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as e:
        raise StoreError(f"cannot open the lock file {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise DatabaseInUse(f"the database {db_path} is in use by {holder or 'another process'} "
                                f"(it holds {path})") from None
        raise StoreError(f"cannot lock {path}: {e.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
    return DatabaseLock(path, fd)


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    pid, _, what = text.partition(" ")
    return f"{what or 'a process'} (pid {pid})" if pid.isdigit() else ""


def check_not_in_use(db_path: str) -> None:
    """L{DatabaseInUse} if a roller holds the database's lock now (a check at start-up: one line)."""
    lock = acquire_lock(db_path)
    if lock is not None:
        lock.release()


# -- reading a database file


def _connect(path: str, *, must_exist: bool = True, timeout: float = 5.0) -> sqlite3.Connection:
    if must_exist and not os.path.isfile(path):
        raise StoreError(f"no database file {path}")
    try:
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # "file is not a database" here
    except sqlite3.Error as e:
        raise StoreError(f"{path} is not a readable SQLite database: {e}") from None
    return conn


def schema_version(c: Cursor | sqlite3.Connection) -> int:
    """The number of migrations applied (0: not a roller database, or a new one)."""
    try:
        row = c.execute("SELECT version FROM schema_version").fetchone()
    except sqlite3.OperationalError:
        return 0
    return 0 if row is None else int(row[0])


def check_schema(path: str) -> None:
    """
    Before start-up, and before every C{roller db} command: L{StoreError}
    in one line if the database at C{path} is from a newer roller.
    """
    if path == ":memory:" or not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    conn = _connect(path)
    try:
        version = schema_version(conn)
        if version > len(MIGRATIONS):
            raise StoreError(newer_schema_message(path, version, upgraded_by(conn.cursor())))
    finally:
        conn.close()


def auto_vacuum(c: Cursor | sqlite3.Connection) -> str:
    return {0: "none", 1: "full", 2: "incremental"}.get(c.execute("PRAGMA auto_vacuum").fetchone()[0], "?")


@frozen
class Check:
    """What C{roller db check} reports."""

    path: str
    integrity: list[str]  # ["ok"] when sound
    version: int
    known: int  # this roller's schema version
    upgraded_by: str | None
    counts: dict[str, int]
    size: int  # bytes of the main file
    page_size: int
    pages: int
    free_pages: int
    auto_vacuum: str

    @property
    def ok(self) -> bool:
        return self.integrity == ["ok"] and 0 < self.version <= self.known

    def problems(self) -> list[str]:
        out = []
        if self.integrity != ["ok"]:
            out.append(f"integrity check failed: {'; '.join(self.integrity[:3])}"
                       + (f" (and {len(self.integrity) - 3} more)" if len(self.integrity) > 3 else ""))
        if self.version == 0:
            out.append("not a roller database (no schema version)")
        elif self.version > self.known:
            out.append(newer_schema_message(self.path, self.version, self.upgraded_by))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "problems": self.problems(), "integrity": self.integrity,
                "schema_version": self.version, "roller_schema_version": self.known, "roller_version": __version__,
                "upgraded_by": self.upgraded_by, "counts": self.counts, "size": self.size,
                "page_size": self.page_size, "pages": self.pages, "free_pages": self.free_pages,
                "auto_vacuum": self.auto_vacuum}


def _check(conn: sqlite3.Connection, path: str, quick: bool = False) -> Check:
    try:
        rows = conn.execute("PRAGMA quick_check" if quick else "PRAGMA integrity_check").fetchall()
        integrity = [line.strip() for r in rows for line in str(r[0]).splitlines()
                     if line.strip() and not line.startswith("*** in database")]
    except sqlite3.DatabaseError as e:  # too damaged to check
        integrity = [str(e)]
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                         " AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    counts: dict[str, int] = {}
    for t in tables:
        try:
            counts[t] = conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
        except sqlite3.DatabaseError as e:  # a damaged table: the integrity check says more
            counts[t] = -1
            if integrity == ["ok"]:
                integrity = [f"table {t}: {e}"]
    return Check(path=path, integrity=integrity, version=schema_version(conn), known=len(MIGRATIONS),
                 upgraded_by=upgraded_by(conn.cursor()), counts=counts,
                 size=os.path.getsize(path) if os.path.isfile(path) else 0,
                 page_size=conn.execute("PRAGMA page_size").fetchone()[0],
                 pages=conn.execute("PRAGMA page_count").fetchone()[0],
                 free_pages=conn.execute("PRAGMA freelist_count").fetchone()[0], auto_vacuum=auto_vacuum(conn))


def check(path: str, *, quick: bool = False) -> Check:
    """
    C{PRAGMA integrity_check} (or the faster C{quick_check}), the schema
    version against this roller's, and the rows of every table.  Reads
    only, in one read transaction: a running roller keeps writing.
    """
    conn = _connect(path)
    try:
        conn.execute("PRAGMA query_only=ON")
        conn.execute("BEGIN")
        try:
            return _check(conn, path, quick)
        finally:
            conn.execute("ROLLBACK")
    except sqlite3.Error as e:
        raise StoreError(f"cannot check {path}: {e}") from None
    finally:
        conn.close()


# -- backup and restore


@frozen
class Backup:
    path: str
    size: int
    pages: int
    seconds: float
    steps: int  # backup steps taken
    restarts: int  # times a roller's commit made the stepped copy start over
    check: Check


class _Restarted(Exception):
    pass


def _copy(src: sqlite3.Connection, dest: sqlite3.Connection, step_pages: int, max_restarts: int,
          sleep: float) -> tuple[int, int]:
    """
    Copy with SQLite's online backup API, C{step_pages} pages a step (the
    source is read-locked only during a step).  SQLite starts over when
    another connection commits between steps; after C{max_restarts} of
    those, the rest is copied in one step (one read transaction, which WAL
    lets the roller write beside).  (steps, restarts).
    """
    steps = 0
    restarts = 0
    last = -1

    def progress(status: int, remaining: int, total: int) -> None:
        nonlocal steps, restarts, last
        steps += 1
        if last >= 0 and remaining > last:
            restarts += 1
            if restarts > max_restarts:
                raise _Restarted()
        last = remaining
        if sleep > 0 and remaining:
            time.sleep(sleep)

    try:
        src.backup(dest, pages=step_pages, progress=progress)
    except _Restarted:
        src.backup(dest, pages=-1)
        steps += 1
    return steps, restarts


def backup(db_path: str, dest: str, *, step_pages: int = 4096, max_restarts: int = 3, sleep: float = 0.0,
           overwrite: bool = False) -> Backup:
    """
    A consistent copy of the database at C{db_path} in C{dest} (mode 0600,
    a self-contained file: rollback journal, not WAL), while a roller may
    keep writing: written to C{dest.partial}, checked (C{quick_check}),
    synced, then renamed into place.
    """
    if db_path == ":memory:":
        raise StoreError("an in-memory database cannot be backed up")
    dest = os.path.abspath(dest)
    if os.path.isdir(dest):
        raise StoreError(f"{dest} is a directory: give the backup's file name")
    if os.path.exists(dest) and not overwrite:
        raise StoreError(f"{dest} exists already (remove it, or use --overwrite)")
    if os.path.abspath(db_path) == dest:
        raise StoreError("the backup cannot be the database itself")
    if not os.path.isdir(os.path.dirname(dest)):
        raise StoreError(f"the directory {os.path.dirname(dest)} does not exist")
    check_schema(db_path)
    partial = dest + ".partial"
    started = time.perf_counter()
    src = _connect(db_path)
    try:
        _remove(partial)
        create_private(partial)
        out = sqlite3.connect(partial, isolation_level=None)
        try:
            steps, restarts = _copy(src, out, step_pages, max_restarts, sleep)
            out.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            report = _check(out, partial, quick=True)
        finally:
            out.close()
    except (sqlite3.Error, OSError) as e:
        _remove(partial)
        raise StoreError(f"backup of {db_path} into {dest} failed: {getattr(e, 'strerror', None) or e}") from None
    except BaseException:
        _remove(partial)
        raise
    finally:
        src.close()
    if report.integrity != ["ok"]:
        _remove(partial)
        raise StoreError(f"the backup of {db_path} failed its check: {'; '.join(report.integrity[:3])}")
    try:
        _fsync(partial)
        os.replace(partial, dest)
    except OSError as e:
        _remove(partial)
        raise StoreError(f"cannot write the backup {dest}: {e.strerror}") from None
    _fsync_dir(dest)
    return Backup(path=dest, size=os.path.getsize(dest), pages=report.pages, seconds=time.perf_counter() - started,
                  steps=steps, restarts=restarts, check=_with_path(report, dest))


def _with_path(c: Check, path: str) -> Check:
    from attrs import evolve

    return evolve(c, path=path, size=os.path.getsize(path))


@frozen
class Restored:
    path: str
    aside: str | None  # where the database it replaced was kept
    check: Check


def restore(backup_path: str, db_path: str, *, now: float | None = None,
            on_checked: Callable[[Check], None] | None = None) -> Restored:
    """
    Replace the database at C{db_path} with the backup at C{backup_path}.
    Refused (L{DatabaseInUse}) while a roller holds the database's lock,
    which this holds meanwhile so none starts; refused (L{StoreError}) if
    the backup fails its integrity check or comes from a newer roller (an
    older one is upgraded by the next start).  The database it replaces is
    kept aside, with its WAL, as C{<db>.before-restore-<time>}.
    """
    if db_path == ":memory:":
        raise StoreError("an in-memory database cannot be restored")
    lock = acquire_lock(db_path, "roller db restore")
    try:
        report = check(backup_path)
        if not report.ok:
            raise StoreError(f"not restoring {backup_path}: {'; '.join(report.problems())}")
        if on_checked is not None:
            on_checked(report)
        staged = db_path + ".restoring"
        _remove(staged)
        create_private(staged)
        src = _connect(backup_path)
        try:
            out = sqlite3.connect(staged, isolation_level=None)
            try:
                src.backup(out)
                out.execute("PRAGMA journal_mode=WAL")
            finally:
                out.close()
        except sqlite3.Error as e:
            _remove(staged)
            raise StoreError(f"cannot copy {backup_path}: {e}") from None
        finally:
            src.close()
        _fsync(staged)
        aside = None
        if os.path.exists(db_path):
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now if now is not None else time.time()))
            aside = f"{db_path}.before-restore-{stamp}"
            _checkpoint(db_path)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(db_path + suffix):
                    os.replace(db_path + suffix, aside + suffix)
        os.replace(staged, db_path)
        _fsync_dir(db_path)
        return Restored(path=db_path, aside=aside, check=report)
    finally:
        if lock is not None:
            lock.release()


def _checkpoint(path: str) -> None:
    """Fold the WAL into the database file (best effort: the WAL is kept with it anyway)."""
    try:
        conn = sqlite3.connect(path, timeout=5, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        pass


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- vacuum


def vacuum(c: Cursor | sqlite3.Connection) -> tuple[int, int]:
    """
    C{VACUUM} (rewrites the whole file; holds the write lock throughout)
    and switch to incremental auto-vacuum; (bytes before, after) in pages
    times page size.
    """
    page_size = c.execute("PRAGMA page_size").fetchone()[0]
    before = c.execute("PRAGMA page_count").fetchone()[0] * page_size
    c.execute("PRAGMA auto_vacuum=INCREMENTAL")
    c.execute("VACUUM")
    after = c.execute("PRAGMA page_count").fetchone()[0] * page_size
    return before, after


def vacuum_file(db_path: str) -> tuple[int, int]:
    """L{vacuum} the database at C{db_path}, refused while a roller runs on it (it would wait on every write)."""
    lock = acquire_lock(db_path, "roller db vacuum")
    try:
        conn = _connect(db_path)
        try:
            check_schema(db_path)
            return vacuum(conn)
        except sqlite3.Error as e:
            raise StoreError(f"cannot vacuum {db_path}: {e}") from None
        finally:
            conn.close()
    finally:
        if lock is not None:
            lock.release()


def incremental_vacuum(c: Cursor, pages: int) -> tuple[int, float, int] | None:
    """
    Give up to C{pages} free pages back to the file system: (pages freed,
    seconds the write lock was held, page size); None unless the database
    uses incremental auto-vacuum.
    """
    if c.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        return None
    before = c.execute("PRAGMA freelist_count").fetchone()[0]
    if before == 0:
        return 0, 0.0, 0
    started = time.perf_counter()
    c.executescript(f"PRAGMA incremental_vacuum({int(pages)})")  # executescript runs it to the end
    held = time.perf_counter() - started
    after = c.execute("PRAGMA freelist_count").fetchone()[0]
    return before - after, held, c.execute("PRAGMA page_size").fetchone()[0]


def start_vacuum_needed(c: Cursor) -> tuple[str, int]:
    """(auto_vacuum mode, file bytes): whether start-up should convert the database (see L{START_VACUUM_MAX_BYTES})."""
    size = c.execute("PRAGMA page_count").fetchone()[0] * c.execute("PRAGMA page_size").fetchone()[0]
    return auto_vacuum(c), size
