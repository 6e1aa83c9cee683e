"""
A private PostgreSQL server for tests: Debian's C{postgresql} package
(C{make test} installs it), C{initdb} into a temporary directory as an
unprivileged user, C{pg_ctl start} on 127.0.0.1 at a free port with its
socket in that directory.  Each test gets a database of its own
(L{PostgresServer.create_database}: C{CREATE DATABASE ... TEMPLATE
template0}, a few milliseconds).

    server = PostgresServer.start()
    url = server.create_database()     # postgresql://roller@127.0.0.1:PORT/roller_1
    ...
    server.stop()

C{initdb} refuses to run as root: as root, the server runs as the
C{postgres} user the package makes (or a C{roller-pg} system user this
makes if there is none), through C{runuser}.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from typing import Any

__all__ = ["PostgresServer", "PostgresMissing", "find_bindir"]

INSTALL_HINT = ("PostgreSQL's server binaries are not installed (no /usr/lib/postgresql/*/bin/initdb): "
                "`make test` installs Debian's postgresql package (apt-get install postgresql)")


class PostgresMissing(RuntimeError):
    pass


def find_bindir() -> str:
    """The newest installed /usr/lib/postgresql/<version>/bin (L{PostgresMissing} if none)."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")

    def version(path: str) -> tuple[int, ...]:
        v = path.split("/")[-3]
        return tuple(int(p) for p in re.findall(r"\d+", v))

    if not found:
        raise PostgresMissing(INSTALL_HINT)
    return os.path.dirname(max(found, key=version))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user() -> str | None:
    """The user to run the server as (None: the current one, when it is not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "roller-pg"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "roller-pg"],
                   check=True, capture_output=True)
    return "roller-pg"


class PostgresServer:
    def __init__(self, bindir: str, base: str, port: int, user: str | None):
        self.bindir = bindir
        self.base = base
        self.port = port
        self.user = user
        self.host = "127.0.0.1"
        self.role = "roller"
        self._names = itertools.count(1)
        self.running = False
        self.max_connections = 300
        self.durable = False

    @property
    def data(self) -> str:
        return os.path.join(self.base, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "log")

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [os.path.join(self.bindir, argv[0]), *argv[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.base)
        if check and done.returncode != 0:
            log = ""
            if os.path.exists(self.log_path):
                with open(self.log_path, errors="replace") as f:
                    log = f.read()[-2000:]
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stderr.strip()}\n{log}")
        return done

    @classmethod
    def start(cls, *, max_connections: int = 300, durable: bool = False) -> PostgresServer:
        """
        A new server.  Not C{durable} (tests): no fsync at all.  C{durable}
        (benchmarks): fsync on, commits acknowledged before their WAL is
        flushed (C{synchronous_commit = off}), as durable as roller's
        SQLite default (WAL, C{synchronous = NORMAL}): a killed process
        loses nothing, a power cut may lose the last moments.
        """
        bindir = find_bindir()
        user = _server_user()
        base = tempfile.mkdtemp(prefix="roller-pg-")
        os.chmod(base, 0o700)
        if user is not None:
            pw = pwd.getpwnam(user)
            os.chown(base, pw.pw_uid, pw.pw_gid)
        server = cls(bindir, base, _free_port(), user)
        server.max_connections = max_connections
        server.durable = durable
        try:
            server._run("initdb", "-D", server.data, "-A", "trust", "-U", server.role, "-E", "UTF8",
                        "--locale=C", "--no-sync")
            server._start(max_connections)
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        return server

    def _start(self, max_connections: int = 300) -> None:
        # no slots kept for superusers (the test role is one): max_connections is what anyone gets
        durability = ("-c synchronous_commit=off" if self.durable else "-c fsync=off -c full_page_writes=off")
        opts = (f"-k {self.base} -p {self.port} -c listen_addresses={self.host} {durability} "
                f"-c max_connections={max_connections} -c superuser_reserved_connections=0")
        self._run("pg_ctl", "-D", self.data, "-o", opts, "-l", self.log_path, "-w", "-t", "60", "start")
        self.running = True

    def restart(self) -> None:
        """Start the server again after L{halt}, on the same port."""
        self._start(self.max_connections)

    def halt(self) -> None:
        """Stop the server now (connections are cut), keeping its data: what a storage outage looks like."""
        self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", check=False)
        self.running = False

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", check=False)
            self.running = False
        shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.role}@{self.host}:{self.port}/{database}"

    def _admin(self, sql: str) -> Any:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else None

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; its URL."""
        name = name or f"roller_{os.getpid()}_{next(self._names)}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_fixture() -> Any:
    """
    The session's server, as a pytest fixture (import it into a test module:
    C{from roller.testing.postgres import postgres_server}).  Missing
    binaries are an error saying what installs them, never a skip.
    """
    import pytest

    @pytest.fixture(scope="session")
    def postgres_server() -> Any:
        try:
            server = PostgresServer.start()
        except PostgresMissing as e:
            pytest.fail(str(e), pytrace=False)
        try:
            yield server
        finally:
            server.stop()

    return postgres_server


postgres_server = postgres_fixture()


def pg_rows(url: str, sql: str, *args: Any) -> list[tuple]:
    """Ask a separate, plain psycopg connection (SQLite's spelling, like the store's)."""
    import psycopg

    from roller.store.dialect import translate

    with psycopg.connect(url, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        cursor = conn.execute(translate(sql), args)
        return [tuple(r) for r in cursor.fetchall()] if cursor.description else []


def _store_path_fixture() -> Any:
    import pytest

    @pytest.fixture(params=["sqlite", "postgresql"])
    def store_path(request: Any, tmp_path: Any) -> str:
        """
        Where a store-level test opens its store, once per engine: a SQLite
        file in C{tmp_path}, then a new database on the session's server.
        (Import it with C{postgres_server} into the test module.)
        """
        if request.param == "postgresql":
            return str(request.getfixturevalue("postgres_server").create_database())
        return str(tmp_path / "roller.db")

    return store_path


store_path = _store_path_fixture()


def require_password(server: PostgresServer, role: str, password: str, database: str) -> str:
    """
    A login role of C{database} that must give C{password} (SCRAM) over
    TCP, ahead of the server's C{trust} lines; the database's URL for it
    (without the password).
    """
    import psycopg
    from psycopg import sql

    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
        conn.execute(sql.SQL("GRANT ALL ON DATABASE {} TO {}").format(sql.Identifier(database), sql.Identifier(role)))
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(database), sql.Identifier(role)))
        hba = os.path.join(server.data, "pg_hba.conf")
        with open(hba) as f:
            lines = f.read()
        with open(hba, "w") as f:
            f.write(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + lines)
        conn.execute("SELECT pg_reload_conf()")
    return f"postgresql://{role}@{server.host}:{server.port}/{database}"
