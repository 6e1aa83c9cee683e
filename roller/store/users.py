"""
Dashboard accounts and their sessions.

A user row holds the name, the role, the encoded password hash (never the
password; see L{roller.auth.accounts}), and the failed-login counter and
lock.  A session row is keyed by the SHA-256 of the session id: the id
itself lives only in the browser's cookie, so a copy of the database lets
nobody sign in.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred

from roller.store.db import Cursor, Database

ROLES = ("viewer", "operator", "admin")


class UserExists(Exception):
    pass


class NoSuchUser(Exception):
    pass


@frozen
class User:
    name: str
    role: str
    password_hash: str
    created_at: float
    updated_at: float
    failed_logins: int = 0
    locked_until: float = 0.0

    def __repr__(self) -> str:  # no hash in logs or tracebacks
        return f"User(name={self.name!r}, role={self.role!r})"


@frozen
class Session:
    id_hash: str
    user: User
    created_at: float
    expires_at: float
    last_seen: float


def _user(r: Any, prefix: str = "") -> User:
    return User(name=r[prefix + "name"], role=r[prefix + "role"], password_hash=r[prefix + "password_hash"],
                created_at=r[prefix + "created_at"], updated_at=r[prefix + "updated_at"],
                failed_logins=r[prefix + "failed_logins"], locked_until=r[prefix + "locked_until"])


class UserTable:
    def __init__(self, db: Database):
        self._db = db

    # -- users

    def add(self, name: str, role: str, password_hash: str, now: float) -> Deferred[User]:
        def w(c: Cursor) -> User:
            if c.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise UserExists(name)
            c.execute("INSERT INTO users (name, role, password_hash, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                      (name, role, password_hash, now, now))
            return User(name, role, password_hash, now, now)

        return self._db.write(w)

    def add_first_admin(self, name: str, password_hash: str, now: float) -> Deferred[User | None]:
        """Add an admin only if there is no user at all (the setup page); None if there was one."""
        def w(c: Cursor) -> User | None:
            if c.execute("SELECT 1 FROM users LIMIT 1").fetchone():
                return None
            c.execute("INSERT INTO users (name, role, password_hash, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                      (name, "admin", password_hash, now, now))
            return User(name, "admin", password_hash, now, now)

        return self._db.write(w)

    def get(self, name: str) -> Deferred[User | None]:
        def q(c: Cursor) -> User | None:
            r = c.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
            return None if r is None else _user(r)

        return self._db.read(q)

    def list(self) -> Deferred[list[User]]:
        return self._db.read(lambda c: [_user(r) for r in c.execute("SELECT * FROM users ORDER BY name")])

    def count(self) -> Deferred[int]:
        return self._db.read(lambda c: c.execute("SELECT count(*) FROM users").fetchone()[0])

    def _update(self, name: str, sql: str, args: tuple) -> Deferred[None]:
        def w(c: Cursor) -> None:
            if c.execute(sql, (*args, name)).rowcount == 0:
                raise NoSuchUser(name)

        return self._db.write(w)

    def set_password(self, name: str, password_hash: str, now: float) -> Deferred[None]:
        """New hash, lock cleared, every session of the user ended."""
        def w(c: Cursor) -> None:
            n = c.execute("UPDATE users SET password_hash = ?, updated_at = ?, failed_logins = 0, locked_until = 0"
                          " WHERE name = ?", (password_hash, now, name)).rowcount
            if n == 0:
                raise NoSuchUser(name)
            c.execute("DELETE FROM sessions WHERE user_name = ?", (name,))

        return self._db.write(w)

    def set_role(self, name: str, role: str, now: float) -> Deferred[None]:
        return self._update(name, "UPDATE users SET role = ?, updated_at = ? WHERE name = ?", (role, now))

    def remove(self, name: str) -> Deferred[None]:
        """The user and (by cascade) their sessions."""
        def w(c: Cursor) -> None:
            c.execute("DELETE FROM sessions WHERE user_name = ?", (name,))
            if c.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 0:
                raise NoSuchUser(name)

        return self._db.write(w)

    def record_failure(self, name: str, now: float, max_failures: int, lockout: float) -> Deferred[User | None]:
        """
        Count a failed sign-in; at C{max_failures} lock the account for
        C{lockout} seconds (and start counting again).  The updated user.
        """
        def w(c: Cursor) -> User | None:
            r = c.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
            if r is None:
                return None
            failed = r["failed_logins"] + 1
            locked = r["locked_until"]
            if failed >= max_failures:
                failed, locked = 0, now + lockout
            c.execute("UPDATE users SET failed_logins = ?, locked_until = ? WHERE name = ?", (failed, locked, name))
            return _user({**dict(r), "failed_logins": failed, "locked_until": locked})

        return self._db.write(w)

    def clear_failures(self, name: str) -> Deferred[None]:
        def w(c: Cursor) -> None:
            c.execute("UPDATE users SET failed_logins = 0, locked_until = 0 WHERE name = ? AND"
                      " (failed_logins != 0 OR locked_until != 0)", (name,))

        return self._db.write(w)

    # -- sessions

    def add_session(self, id_hash: str, name: str, now: float, expires_at: float) -> Deferred[None]:
        def w(c: Cursor) -> None:
            c.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))  # keep the table small
            c.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)", (id_hash, name, now, expires_at, now))

        return self._db.write(w)

    def session(self, id_hash: str) -> Deferred[Session | None]:
        def q(c: Cursor) -> Session | None:
            r = c.execute(
                "SELECT s.id_hash, s.created_at AS s_created_at, s.expires_at, s.last_seen, u.* FROM sessions s"
                " JOIN users u ON u.name = s.user_name WHERE s.id_hash = ?", (id_hash,)).fetchone()
            if r is None:
                return None
            return Session(id_hash=r["id_hash"], user=_user(r), created_at=r["s_created_at"],
                           expires_at=r["expires_at"], last_seen=r["last_seen"])

        return self._db.read(q)

    def touch_session(self, id_hash: str, now: float) -> Deferred[None]:
        return self._db.write(lambda c: c.execute("UPDATE sessions SET last_seen = ? WHERE id_hash = ?",
                                                  (now, id_hash)) and None)

    def remove_session(self, id_hash: str) -> Deferred[None]:
        return self._db.write(lambda c: c.execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash,)) and None)

    def sessions_of(self, name: str) -> Deferred[int]:
        return self._db.read(lambda c: c.execute("SELECT count(*) FROM sessions WHERE user_name = ?",
                                                 (name,)).fetchone()[0])
