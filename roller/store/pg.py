"""
PostgreSQL through psycopg 3, for L{roller.store.db.Database}.

The store's code is the same on both engines: a connection made here hands
out cursors that take SQLite's spelling (L{roller.store.dialect.translate}),
bind parameters on the client the way SQLite does (an untyped C{NULL}
parameter is fine), give rows that answer by index and by column name like
C{sqlite3.Row}, store a Python C{bool} as 0/1 (roller's flags are INTEGER
columns) and read C{numeric} aggregates (C{sum}, C{avg}) as plain numbers.
Transactions are the store's own (autocommit: C{BEGIN} ... C{COMMIT}).

The URL is C{postgresql://user@host:port/database}; the password, if the
server wants one, comes from the secrets file (never from the URL, which
appears in logs and messages: L{parse_url} refuses one).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from roller.store.dialect import translate

__all__ = ["PgUrl", "parse_url", "connect", "Row", "is_pg_error", "pg_fault", "integrity_errors"]

#: DB-API module attributes (L{twisted.enterprise.adbapi} reads them: this module is the pool's "driver")
apilevel = "2.0"
threadsafety = 2
paramstyle = "qmark"

#: seconds to wait for the server when connecting
CONNECT_TIMEOUT = 5


class PgUrlError(ValueError):
    pass


class PgUrl:
    """A parsed C{database.url}: what to connect to, and how to name it in messages (no password)."""

    def __init__(self, user: str | None, host: str, port: int, database: str, options: dict[str, str]):
        self.user = user
        self.host = host
        self.port = port
        self.database = database
        self.options = options

    @property
    def display(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"postgresql://{user}{self.host}:{self.port}/{self.database}"

    def kwargs(self, password: str | None = None, user: str | None = None) -> dict[str, Any]:
        """psycopg's connect arguments; C{user} serves when the URL names none."""
        kw: dict[str, Any] = {"host": self.host, "port": self.port, "dbname": self.database,
                              "connect_timeout": CONNECT_TIMEOUT, "application_name": "roller", **self.options}
        if self.user or user:
            kw["user"] = self.user or user
        if password is not None:
            kw["password"] = password
        return kw


def parse_url(url: str) -> PgUrl:
    """
    C{postgresql://user@host:port/database[?sslmode=...]}; L{PgUrlError}
    saying what is wrong (never echoing a password).
    """
    try:
        parts = urlsplit(url)
        port = parts.port or 5432
    except ValueError:
        raise PgUrlError("database.url is not a valid URL: postgresql://user@host:port/database") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise PgUrlError("database.url must start with postgresql://")
    if parts.password is not None:
        raise PgUrlError("database.url must not hold a password: put it in the secrets file "
                         "(a password credential named by database.credential)")
    database = unquote(parts.path.lstrip("/"))
    if not parts.hostname or not database or "/" in database:
        raise PgUrlError("database.url needs a host and a database: postgresql://user@host:port/database")
    options: dict[str, str] = {}
    for pair in filter(None, parts.query.split("&")):
        key, _, value = pair.partition("=")
        if key not in ("sslmode", "sslrootcert", "sslcert", "sslkey", "target_session_attrs"):
            raise PgUrlError(f"database.url: unsupported option {key!r} "
                             "(sslmode, sslrootcert, sslcert, sslkey, target_session_attrs)")
        options[key] = unquote(value)
    return PgUrl(unquote(parts.username) if parts.username else None, parts.hostname, port, database, options)


class Row(tuple):
    """A row by index and by column name, like C{sqlite3.Row}."""

    _index: dict[str, int]

    def __new__(cls, values: Iterable[Any], index: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._index[key])
            except KeyError:
                raise IndexError(f"no such column: {key}") from None
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor: Any) -> Any:
    names = [c.name for c in cursor.description or ()]
    index = {name: i for i, name in enumerate(names)}

    def make(values: Sequence[Any]) -> Row:
        return Row(values, index)

    return make


_driver: Any = None


def _psycopg() -> Any:
    """psycopg, and the cursor and adapters made from it (imported on first use: SQLite needs none of it)."""
    global _driver
    if _driver is not None:
        return _driver
    try:
        import psycopg
        from psycopg.adapt import Dumper, Loader
        from psycopg.pq import Format
    except ImportError:
        raise ImportError("database.url names PostgreSQL, which needs psycopg: "
                          "pip install 'roller[postgresql]' (psycopg[binary])") from None

    class Cursor(psycopg.ClientCursor):
        """SQLite's spelling in, PostgreSQL's out; always formatted (so a doubled % is one)."""

        def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
            return super().execute(translate(query), () if params is None else params, **kw)

        def executemany(self, query: Any, params_seq: Any, **kw: Any) -> Any:
            return super().executemany(translate(query), params_seq, **kw)

    class BoolAsInt(Dumper):
        oid = psycopg.adapters.types["int8"].oid

        def dump(self, obj: bool) -> bytes:
            return b"1" if obj else b"0"

        def quote(self, obj: bool) -> bytes:
            return b"1" if obj else b"0"

    class NumericAsNumber(Loader):
        format = Format.TEXT

        def load(self, data: Any) -> int | float:
            text = bytes(data).decode()
            try:
                return int(text)
            except ValueError:
                return float(text)

    adapters = psycopg.adapt.AdaptersMap(psycopg.adapters)
    adapters.register_dumper(bool, BoolAsInt)
    adapters.register_loader("numeric", NumericAsNumber)
    _driver = (psycopg, Cursor, adapters)
    return _driver


def connect(**kwargs: Any) -> Any:
    """A psycopg connection as the store uses it (the adbapi pool's C{connect})."""
    psycopg, cursor, adapters = _psycopg()
    conn = psycopg.connect(autocommit=True, cursor_factory=cursor, **kwargs)
    conn.adapters.register_dumper(bool, adapters.get_dumper(bool, psycopg.adapt.PyFormat.AUTO))
    conn.adapters.register_loader("numeric", adapters.get_loader(adapters.types["numeric"].oid,
                                                                 psycopg.pq.Format.TEXT))
    conn.row_factory = _row_factory
    return conn


def _loaded() -> Any:
    """psycopg if something imported it (an error can only be psycopg's then)."""
    return sys.modules.get("psycopg")


def is_pg_error(e: BaseException) -> bool:
    psycopg = _loaded()
    return psycopg is not None and isinstance(e, psycopg.Error)


def integrity_errors() -> tuple[type[BaseException], ...]:
    """psycopg's IntegrityError (none while psycopg is not loaded)."""
    psycopg = _loaded()
    return () if psycopg is None else (psycopg.IntegrityError,)


#: SQLSTATE (or its class, the first two characters) -> (kind, what is wrong)
_FAULTS = {
    "08": ("unreachable", "the database server cannot be reached"),
    "57P01": ("unreachable", "the database server is shutting down"),
    "57P02": ("unreachable", "the database server crashed"),
    "57P03": ("unreachable", "the database server is starting up or shutting down"),
    "53300": ("busy", "the database server has too many connections"),
    "53100": ("disk_full", "the disk holding the database is full"),
    "53": ("busy", "the database server is out of resources"),
    "40P01": ("locked", "the database is locked (deadlock)"),
    "55P03": ("locked", "the database is locked"),
    "25006": ("read_only", "the database is read-only (a standby server)"),
    "58030": ("io_error", "the disk holding the database reported an I/O error"),
}


def pg_fault(e: BaseException) -> tuple[str, str] | None:
    """(kind, what) if C{e} is a psycopg error that is a storage fault."""
    psycopg = _loaded()
    if psycopg is None or not isinstance(e, psycopg.Error):
        return None
    state = getattr(e, "sqlstate", None) or ""
    if state:
        found = _FAULTS.get(state) or _FAULTS.get(state[:2])
        if found:
            return found
    if isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)) and not state:
        text = str(e).lower()  # refused while connecting: psycopg gives the server's words, not its code
        if "too many clients" in text or "remaining connection slots" in text:
            return _FAULTS["53300"]
        return "unreachable", "the database server cannot be reached"  # no answer: connecting, or the link broke
    return None


def check(url: str, *, user: str | None = None, password: str | None = None) -> dict[str, Any]:
    """
    C{roller db check} on PostgreSQL, synchronously, reading only: the
    schema version, who upgraded it, the rows of every table, the
    database's size and the server's version.  (PostgreSQL checks its own
    pages; C{pg_amcheck} checks indexes.)
    """
    target = parse_url(url)
    psycopg = _psycopg()[0]
    try:
        conn = connect(**target.kwargs(password, user))
    except psycopg.Error as e:
        raise PgCheckError(f"cannot connect to the database {target.display}: {' '.join(str(e).split())}") from None
    try:
        c = conn.cursor()
        c.execute("BEGIN READ ONLY")
        tables = [r[0] for r in c.execute("SELECT table_name FROM information_schema.tables WHERE table_schema ="
                                          " current_schema() AND table_type = 'BASE TABLE' ORDER BY table_name")]
        version, by = 0, None
        if "schema_version" in tables:
            row = c.execute("SELECT * FROM schema_version").fetchone()
            if row is not None:
                version = int(row["version"])
                by = row["roller_version"] if "roller_version" in row.keys() else None
        counts = {t: int(c.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables}
        size = int(c.execute("SELECT pg_database_size(current_database())").fetchone()[0])
        server = str(c.execute("SHOW server_version").fetchone()[0])
        c.execute("ROLLBACK")
    except psycopg.Error as e:
        raise PgCheckError(f"cannot check {target.display}: {' '.join(str(e).split())}") from None
    finally:
        conn.close()
    return {"path": target.display, "schema_version": version, "upgraded_by": by, "counts": counts, "size": size,
            "server_version": server}


class PgCheckError(Exception):
    pass
