"""
Dashboard accounts: roles, password hashing, sign-in with lockout, sessions,
and the one-time setup token of a roller that has no user yet.

Roles map to the API's scopes (L{role_scopes}), so the dashboard decides
with the same L{roller.auth.scopes.satisfies} as the API:

  - C{viewer}: read (C{<prefix>jobs:read}, C{<prefix>machines:read}, C{<prefix>loans:read});
  - C{operator}: read, run every offered task (C{<prefix><task>}) and cancel
    jobs (C{<prefix>jobs:cancel});
  - C{admin}: everything under the prefix (C{<prefix>*}: also
    C{inventory:write} and C{audit:read}).

Passwords are hashed with scrypt (C{hashlib.scrypt}, n=2**14, r=8, p=1, a
16-byte random salt per hash) in the self-describing form
C{$scrypt$ln=14,r=8,p=1$<salt>$<key>} (base64, no padding); hashing and
checking run in the reactor's thread pool (L{PasswordHasher}), and keys are
compared in constant time.

A session id is 32 random bytes, sent once in the C{roller_session} cookie
(C{HttpOnly; SameSite=Strict}, C{Secure} under TLS); the store keeps only
its SHA-256.  A session ends after C{session_idle} seconds without a request
or C{session_max} seconds after sign-in, on sign-out, when the user's
password changes or when the user is removed.

Failed sign-ins are counted per user (in the store: C{max_failures} in a row
lock the account for C{lockout} seconds) and per source address (in memory:
C{ip_max_failures} lock the address out for C{lockout} seconds).  The answer
never says whether the user exists.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from typing import Any, Callable

from attrs import define, field
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from roller.auth import Principal
from roller.errors import BadRequest, Conflict, Forbidden, NotFound, RollerError, Unauthorized
from roller.store.users import ROLES, User, UserTable
from roller.web.dashboard import IDashboardAuth, LoopbackDashboardAuth, Viewer

__all__ = [
    "ROLES",
    "AccountAuth",
    "PasswordHasher",
    "TooManyAttempts",
    "check_password_policy",
    "check_user_name",
    "hash_password",
    "principal_for",
    "role_scopes",
    "verify_password",
]

log = Logger()

# -- roles ---------------------------------------------------------------------


def role_scopes(role: str, prefix: str, tasks: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The scopes a dashboard role holds (see the module docstring)."""
    read = (prefix + "jobs:read", prefix + "machines:read", prefix + "loans:read")
    if role == "viewer":
        return read
    if role == "operator":
        return (*read, *(prefix + t for t in tasks), prefix + "jobs:cancel")
    if role == "admin":
        return (prefix + "*",)
    raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")


def principal_for(user: User, prefix: str, tasks: tuple[str, ...] | list[str] = ()) -> Principal:
    return Principal(f"user:{user.name}", role_scopes(user.role, prefix, tasks))


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MIN_PASSWORD = 10
MAX_PASSWORD = 1024


def check_user_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise BadRequest("a user name is 1 to 64 letters, digits and . _ @ - (starting with a letter or digit)",
                         code="invalid_user_name")
    return name


def check_password_policy(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise BadRequest(f"the password must be at least {MIN_PASSWORD} characters long", code="weak_password")
    if len(password) > MAX_PASSWORD:
        raise BadRequest(f"the password must be at most {MAX_PASSWORD} characters long", code="invalid_password")
    return password


# -- passwords -------------------------------------------------------------------

SCRYPT_LOG_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
_KEY_LEN = 32
_HASH = re.compile(r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]{16,64})\$([A-Za-z0-9+/]{32,128})")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, ln: int, r: int, p: int, dklen: int) -> bytes:
    n = 1 << ln
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen,
                          maxmem=256 * n * r * p + (1 << 20))


def hash_password(password: str, *, ln: int = SCRYPT_LOG_N, r: int = SCRYPT_R, p: int = SCRYPT_P,
                  salt: bytes | None = None) -> str:
    """C{$scrypt$ln=..,r=..,p=..$salt$key} for C{password} (CPU- and memory-hard: call in a thread)."""
    salt = os.urandom(16) if salt is None else salt
    return f"$scrypt$ln={ln},r={r},p={p}${_b64(salt)}${_b64(_scrypt(password, salt, ln, r, p, _KEY_LEN))}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether C{password} matches C{encoded}; False for a malformed or out-of-bounds hash."""
    m = _HASH.fullmatch(encoded or "")
    if m is None:
        return False
    ln, r, p = int(m[1]), int(m[2]), int(m[3])
    if not (10 <= ln <= 20 and 1 <= r <= 32 and 1 <= p <= 16):  # a tampered hash must not exhaust memory
        return False
    try:
        salt, key = _unb64(m[4]), _unb64(m[5])
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(_scrypt(password, salt, ln, r, p, len(key)), key)


@define
class PasswordHasher:
    """
    scrypt off the reactor thread.

    @param reactor: fires the results (C{callFromThread}).
    @param threadpool: where the KDF runs (the reactor's, C{reactor.getThreadPool()}).
    """

    reactor: Any
    threadpool: Any
    ln: int = SCRYPT_LOG_N
    _dummy: str | None = field(default=None, init=False, repr=False)

    def hash(self, password: str) -> "Deferred[str]":
        return deferToThreadPool(self.reactor, self.threadpool, hash_password, password, ln=self.ln)

    def verify(self, password: str, encoded: str | None) -> "Deferred[bool]":
        """Checks against a throw-away hash when there is no user, so both take as long."""
        if encoded is None:
            if self._dummy is None:
                self._dummy = hash_password(secrets.token_urlsafe(16), ln=self.ln)
            return deferToThreadPool(self.reactor, self.threadpool,
                                     lambda: verify_password(password, self._dummy) and False)
        return deferToThreadPool(self.reactor, self.threadpool, verify_password, password, encoded)


# -- sign-in -----------------------------------------------------------------------


class TooManyAttempts(RollerError):
    status = 429
    code = "too_many_attempts"


WRONG = "Wrong user name or password."

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")


def _session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("ascii")).hexdigest()


def _minutes(seconds: float) -> str:
    m = max(1, round(seconds / 60))
    return f"{m} minute{'s' if m != 1 else ''}"


@implementer(IDashboardAuth)
@define
class AccountAuth:
    """
    The dashboard's L{IDashboardAuth} with accounts and sessions.

    @param users: the store's L{UserTable}.
    @param clock: the injected clock (sessions, lockouts).
    @param hasher: a L{PasswordHasher}.
    @param scope_prefix: as the API's.
    @param tasks: the task names an operator may run (the offered tasks).
    @param demo_loopback: also let in, without sign-in, anyone on loopback
        (not through a proxy) as the admin C{demo} -- only for C{--demo}
        with C{auth.mode = "none"}; a signed-in user is still that user.
    """

    users: UserTable
    clock: Any
    hasher: PasswordHasher
    scope_prefix: str = "project:releng:roller:"
    tasks: tuple[str, ...] = field(default=(), converter=tuple)
    session_idle: float = 12 * 3600.0
    session_max: float = 7 * 86400.0
    max_failures: int = 5
    ip_max_failures: int = 20
    lockout: float = 900.0
    demo_loopback: bool = False
    cookie_name: str = "roller_session"
    touch_interval: float = 60.0
    setup_token: str | None = field(default=None, init=False, repr=False)
    _ip_failures: dict[str, tuple[int, float]] = field(factory=dict, init=False, repr=False)

    # -- first start

    async def start(self, announce: Callable[[str], None] | None = None) -> str | None:
        """
        With no user at all, make the one-time setup token and announce (log)
        the setup path C{/setup?token=...}; the token is good until the first
        admin exists.  The path, or None when there are users.
        """
        if await self.users.count():
            self.setup_token = None
            return None
        self.setup_token = secrets.token_urlsafe(32)
        path = f"/setup?token={self.setup_token}"
        if announce is not None:
            announce(path)
        else:
            log.warn("No dashboard account exists yet. Create the first admin at {path} on this roller's "
                     "address (one-time link, valid until an admin exists), or run "
                     "`roller user add NAME --role admin`.", path=path)
        return path

    async def setup_pending(self) -> bool:
        if self.setup_token is not None and await self.users.count():
            self.setup_token = None  # an admin was added with the CLI meanwhile
        return self.setup_token is not None

    def check_setup_token(self, token: str) -> None:
        if self.setup_token is None:
            raise NotFound("Setup is done: sign in with your account.", code="setup_done")
        if not hmac.compare_digest(token.encode(), self.setup_token.encode()):
            raise Forbidden("This setup link is not valid. Use the exact link roller logged at start.",
                            code="bad_setup_token")

    async def setup_admin(self, token: str, name: str, password: str) -> User:
        self.check_setup_token(token)
        check_user_name(name)
        check_password_policy(password)
        encoded = await self.hasher.hash(password)
        user = await self.users.add_first_admin(name, encoded, self.clock.seconds())
        self.setup_token = None
        if user is None:
            raise Conflict("An account exists already: sign in with it.", code="setup_done")
        log.info("First dashboard admin {name} created through the setup page", name=name)
        return user

    # -- who is looking

    def viewer_for(self, user: User, session: str = "") -> Viewer:
        p = principal_for(user, self.scope_prefix, self.tasks)
        return Viewer(id=p.id, name=user.name, scopes=p.scopes, session=session, note=user.role, role=user.role)

    def viewer(self, request: IRequest) -> "Deferred[Viewer]":
        return ensureDeferred(self._viewer(request))

    async def _viewer(self, request: IRequest) -> Viewer:
        raw = request.getCookie(self.cookie_name.encode())
        sid = raw.decode("ascii", "replace") if raw else ""
        expired = False
        if _SESSION_ID.fullmatch(sid):
            h = _session_hash(sid)
            s = await self.users.session(h)
            now = self.clock.seconds()
            if s is not None:
                if now < s.expires_at and now - s.last_seen < self.session_idle:
                    if now - s.last_seen >= self.touch_interval:
                        await self.users.touch_session(h, now)
                    return self.viewer_for(s.user, session=h)
                await self.users.remove_session(h)
                expired = True
        if self.demo_loopback:
            try:
                await LoopbackDashboardAuth().viewer(request)
            except Forbidden:
                pass
            else:
                return Viewer(id="demo", name="demo", scopes=(self.scope_prefix + "*",), role="admin",
                              note="admin: demo mode lets loopback visitors in without signing in")
        if expired:
            raise Unauthorized("Your session has expired; sign in again.", code="session_expired")
        raise Unauthorized("Sign in to use roller's dashboard.", code="sign_in_required")

    # -- sign-in and sign-out

    def _ip_locked(self, ip: str, now: float) -> float:
        count, until = self._ip_failures.get(ip, (0, 0.0))
        return until - now if until > now else 0.0

    def _ip_failed(self, ip: str, now: float) -> None:
        if len(self._ip_failures) > 10_000:
            self._ip_failures = {k: v for k, v in self._ip_failures.items() if v[1] > now}
        count, until = self._ip_failures.get(ip, (0, 0.0))
        count += 1
        if count >= self.ip_max_failures:
            count, until = 0, now + self.lockout
            log.warn("Dashboard sign-in locked for {ip} for {seconds:.0f} s after repeated failures",
                     ip=ip, seconds=self.lockout)
        self._ip_failures[ip] = (count, until)

    async def login(self, name: str, password: str, ip: str | None) -> tuple[User, str]:
        """
        The user and a new session id, or fail with L{Unauthorized}
        (L{WRONG}, whatever went wrong) or L{TooManyAttempts} (this address
        is locked out).
        """
        now = self.clock.seconds()
        ip_key = _ip_key(ip)
        wait = self._ip_locked(ip_key, now)
        if wait:
            raise TooManyAttempts(f"Too many failed sign-ins from your address; try again in {_minutes(wait)}.")
        user = await self.users.get(name) if _NAME.fullmatch(name or "") and len(password) <= MAX_PASSWORD else None
        ok = await self.hasher.verify(password, user.password_hash if user is not None else None)
        now = self.clock.seconds()
        if user is not None and user.locked_until > now:
            ok = False  # locked: even the right password is refused, with the same answer
        if not ok:
            self._ip_failed(ip_key, now)
            if user is not None and user.locked_until <= now:
                after = await self.users.record_failure(user.name, now, self.max_failures, self.lockout)
                if after is not None and after.locked_until > now:
                    log.warn("Dashboard account {name} locked for {seconds:.0f} s after {n} failed sign-ins",
                             name=user.name, seconds=self.lockout, n=self.max_failures)
            raise Unauthorized(f"{WRONG} After {self.max_failures} failed attempts an account is locked for "
                               f"{_minutes(self.lockout)}.", code="wrong_credentials")
        await self.users.clear_failures(user.name)
        sid = secrets.token_urlsafe(32)
        await self.users.add_session(_session_hash(sid), user.name, now, now + self.session_max)
        return user, sid

    async def logout(self, viewer: Viewer) -> None:
        if viewer.session:
            await self.users.remove_session(viewer.session)

    def set_cookie(self, request: IRequest, session_id: str) -> None:
        request.addCookie(self.cookie_name.encode(), session_id.encode(), path=b"/", httpOnly=True,
                          sameSite="strict", secure=request.isSecure())

    def clear_cookie(self, request: IRequest) -> None:
        request.addCookie(self.cookie_name.encode(), b"", path=b"/", httpOnly=True, sameSite="strict",
                          secure=request.isSecure(), max_age=b"0",
                          expires=b"Thu, 01 Jan 1970 00:00:00 GMT")


def _ip_key(ip: str | None) -> str:
    """The lockout key of an address: the address, or its /64 for IPv6 (one host owns a whole /64)."""
    if not ip:
        return "?"
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip[:64]
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)
