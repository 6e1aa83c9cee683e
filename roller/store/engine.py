"""
Which database a roller's settings name, and how to log in to it.

SQLite (C{database.path}, the default) needs nothing more.  PostgreSQL
(C{database.url}) may need a password: it comes from the secrets file, as
the C{password} credential named by C{database.credential} (whose
C{username} serves when the URL names no user); never from the URL, the
command line or a log line.

    store = await open_configured_store(settings, reactor)
"""

from __future__ import annotations

from attrs import frozen

from roller.config import Settings
from roller.secrets import Secrets, SecretsError, UnknownCredential, load_secrets
from roller.store import Store, open_store
from roller.store.db import IStoreReactor, StoreError
from roller.store.dialect import is_postgresql_url

__all__ = ["Login", "database_target", "database_login", "open_configured_store", "is_postgresql"]


@frozen(repr=False)
class Login:
    user: str | None = None
    password: str | None = None

    def __repr__(self) -> str:
        return f"Login(user={self.user!r}, password={'***' if self.password else None})"


def database_target(settings: Settings) -> str:
    """The PostgreSQL URL if C{database.url} is set, else the SQLite file."""
    return settings.db_url or settings.db_path


def is_postgresql(settings: Settings) -> bool:
    return is_postgresql_url(database_target(settings))


def database_login(settings: Settings, secrets: Secrets | None = None) -> Login:
    """
    The PostgreSQL login from the secrets file (read now unless given);
    L{StoreError} in one line, naming the credential and the file, never a
    value, when it cannot be had.
    """
    name = settings.db_credential
    if not is_postgresql(settings) or not name:
        return Login()
    try:
        cred = (secrets if secrets is not None else load_secrets(settings.secrets_file)).get(name)
    except UnknownCredential:
        raise StoreError(f"database.credential names {name!r}, which the secrets file "
                         f"{settings.secrets_file} does not hold") from None
    except SecretsError as e:
        raise StoreError(f"cannot read the database password: {e}") from None
    if cred.kind != "password" or not cred.password:
        raise StoreError(f"database.credential {name!r} must be a password credential (type = \"password\", "
                         f"password = \"...\") in {settings.secrets_file}")
    return Login(user=cred.username or None, password=cred.password)


async def open_configured_store(settings: Settings, reactor: IStoreReactor, *,
                                secrets: Secrets | None = None) -> Store:
    """L{open_store} on the database C{settings} name, logged in."""
    login = database_login(settings, secrets)
    return await open_store(database_target(settings), reactor, synchronous=settings.db_synchronous.upper(),
                            user=login.user, password=login.password)
