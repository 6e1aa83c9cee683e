"""
Dashboard accounts: roles, password hashing, sign-in with lockout, sessions,
and the one-time setup token of a roller that has no user yet.

Roles map to the API's scopes (L{role_scopes}), so the dashboard decides
with the same L{roller.auth.scopes.satisfies} as the API:

  - C{viewer}: read (C{<prefix>jobs:read}, C{<prefix>machines:read}, C{<prefix>loans:read});
  - C{operator}: read, run every offered task (C{<prefix><task>}), also on
    many machines at once (C{<prefix>batches:create}), and cancel jobs and
    batches (C{<prefix>jobs:cancel});
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

Sign-in attempts are limited per user name and per source address
(L{AttemptBudget}, in memory): an attempt is counted I{before} its password
is hashed, so that at most C{max_failures} attempts on one name (and
C{ip_max_failures} from one address) are under way or have failed within
C{lockout} seconds, however many arrive at once; the others are refused at
once (429).  Reaching the limit in failures locks the name (the address)
for C{lockout} seconds: until then even the right password is refused, and
the answer says so.  The limits are checked again once the hash is done, so
a lock that concurrent attempts brought about meanwhile also refuses a right
password.  A success forgets the failures that ended before it began, never
those of attempts that ran alongside it.  The account lock is also kept in
the store (C{locked_until}; it outlives a restart and is shared with other
processes on the database), with the store's own count of failures in a
row.  Unknown user names are counted and locked like real ones, so the
answers never say whether a user exists.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import os
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterable

from attrs import define, field
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.iweb import IRequest
from zope.interface import implementer

from roller.auth import Principal
from roller.auth.dashboard import IDashboardAuth, LoopbackDashboardAuth, Viewer
from roller.errors import BadRequest, Conflict, Forbidden, NotFound, RollerError, Unauthorized
from roller.store.users import ROLES, User, UserTable

__all__ = [
    "ROLES",
    "AccountAuth",
    "AttemptBudget",
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
        return (*read, *(prefix + t for t in tasks), prefix + "jobs:cancel", prefix + "batches:create")
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

    reactor: IReactorFromThreads
    threadpool: ThreadPool
    ln: int = SCRYPT_LOG_N
    _dummy: str | None = field(default=None, init=False, repr=False)

    def hash(self, password: str) -> Deferred[str]:
        return deferToThreadPool(self.reactor, self.threadpool, hash_password, password, ln=self.ln)

    def verify(self, password: str, encoded: str | None) -> Deferred[bool]:
        """Checks against a throw-away hash when there is no user, so both take as long."""
        if encoded is None:
            dummy = self._dummy
            if dummy is None:
                dummy = self._dummy = hash_password(secrets.token_urlsafe(16), ln=self.ln)
            return deferToThreadPool(self.reactor, self.threadpool,
                                     lambda: verify_password(password, dummy) and False)
        return deferToThreadPool(self.reactor, self.threadpool, verify_password, password, encoded)


# -- sign-in -----------------------------------------------------------------------


class TooManyAttempts(RollerError):
    """
    429: the name or address is locked, or has as many attempts under way
    as it may fail.  C{retry_after}: seconds until trying again makes sense.
    """

    status = 429
    code = "too_many_attempts"

    def __init__(self, message: str, retry_after: float = 60.0, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = max(1, math.ceil(retry_after))


@define
class _Attempts:
    """One name's or address's sign-ins: under way, failed (times), locked until."""

    pending: int = 0
    failures: deque = field(factory=deque)
    locked_until: float = 0.0

    def idle(self, now: float) -> bool:
        return not self.pending and not self.failures and self.locked_until <= now


class AttemptBudget:
    """
    Sign-in attempts per key (a user name, an address): at most C{limit} of
    them under way or failed within C{window} seconds; C{limit} failures
    within the window lock the key for C{window} seconds.

    The caller passes C{limit} and C{window} on every call (the settings may
    change).  At most C{max_keys} keys are tracked: idle ones (nothing under
    way, no failure in the window, not locked) are dropped first, then the
    ones whose failures are oldest -- never a locked key or one with an
    attempt under way.
    """

    def __init__(self, max_keys: int = 100_000):
        self.max_keys = max_keys
        self._keys: dict[str, _Attempts] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def _state(self, key: str, now: float, window: float) -> _Attempts | None:
        state = self._keys.get(key)
        if state is not None:
            while state.failures and state.failures[0] <= now - window:
                state.failures.popleft()
        return state

    def wait(self, key: str, now: float, limit: int, window: float) -> tuple[str, float] | None:
        """
        Why C{key} may not start an attempt now and for how many seconds:
        C{("locked", seconds)} or C{("busy", seconds)} (the limit is taken
        by attempts under way or failed); C{None} when it may.
        """
        state = self._state(key, now, window)
        if state is None:
            return None
        if state.locked_until > now:
            return "locked", state.locked_until - now
        if state.pending + len(state.failures) >= limit:
            # the soonest a failure leaves the window (or the attempts under way end)
            return "busy", (state.failures[0] + window - now) if state.failures else 5.0
        return None

    def reserve(self, key: str, now: float) -> None:
        """Count an attempt under way (after L{wait} said it may start)."""
        state = self._keys.get(key)
        if state is None:
            if len(self._keys) >= self.max_keys:
                self._evict(now)
            state = self._keys[key] = _Attempts()
        state.pending += 1

    def release(self, key: str) -> None:
        """The attempt under way ended (call L{failed} too if it failed)."""
        state = self._keys.get(key)
        if state is not None and state.pending:
            state.pending -= 1

    def failed(self, key: str, now: float, limit: int, window: float) -> str:
        """
        Count a failure: C{"locked"} if it locks the key now, C{"was_locked"}
        if the key was locked already (not counted), else C{"counted"}.
        """
        state = self._state(key, now, window)
        if state is None:
            state = self._keys[key] = _Attempts()
        if state.locked_until > now:
            return "was_locked"
        state.failures.append(now)
        if len(state.failures) >= limit:
            state.failures.clear()
            state.locked_until = now + window
            return "locked"
        return "counted"

    def succeeded(self, key: str, started: float) -> None:
        """Forget the failures that ended before the successful attempt began."""
        state = self._keys.get(key)
        if state is not None:
            while state.failures and state.failures[0] < started:
                state.failures.popleft()

    def locked(self, key: str, now: float) -> float:
        """Seconds C{key} stays locked (0 when it is not)."""
        state = self._keys.get(key)
        return state.locked_until - now if state is not None and state.locked_until > now else 0.0

    def _evict(self, now: float) -> None:
        idle = [k for k, st in self._keys.items() if st.idle(now)]
        for k in idle:
            del self._keys[k]
        if len(self._keys) < self.max_keys:
            return
        # still full of live keys: drop the half with the oldest failures (none under way, none locked)
        movable = sorted((st.failures[-1] if st.failures else 0.0, k) for k, st in self._keys.items()
                         if not st.pending and st.locked_until <= now)
        for _, k in movable[: max(1, len(movable) // 2)]:
            del self._keys[k]


WRONG = "Wrong user name or password."

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")


def _session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("ascii")).hexdigest()


def _minutes(seconds: float) -> str:
    m = max(1, round(seconds / 60))
    return f"{m} minute{'s' if m != 1 else ''}"



def _str_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)

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
    clock: IReactorTime
    hasher: PasswordHasher
    scope_prefix: str = "project:releng:roller:"
    tasks: tuple[str, ...] = field(default=(), converter=_str_tuple)
    session_idle: float = 12 * 3600.0
    session_max: float = 7 * 86400.0
    max_failures: int = 5
    ip_max_failures: int = 20
    lockout: float = 900.0
    demo_loopback: bool = False
    cookie_name: str = "roller_session"
    touch_interval: float = 60.0
    setup_token: str | None = field(default=None, init=False, repr=False)
    _ips: AttemptBudget = field(factory=AttemptBudget, init=False, repr=False)
    _names: AttemptBudget = field(factory=AttemptBudget, init=False, repr=False)

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

    def viewer(self, request: IRequest) -> Deferred[Viewer]:
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

    def _refuse(self, ip_key: str, name_key: str | None, now: float) -> None:
        """Raise L{TooManyAttempts} if the address or the name may not try now."""
        why = self._ips.wait(ip_key, now, self.ip_max_failures, self.lockout)
        if why is not None:
            kind, wait = why
            if kind == "locked":
                raise TooManyAttempts(f"Too many failed sign-ins from your address; try again in {_minutes(wait)}.",
                                      retry_after=wait)
            raise TooManyAttempts("Too many sign-in attempts from your address at once; try again in "
                                  f"{_minutes(wait)}.", retry_after=wait)
        if name_key is None:
            return
        why = self._names.wait(name_key, now, self.max_failures, self.lockout)
        if why is not None:
            kind, wait = why
            if kind == "locked":
                raise TooManyAttempts(f"This account is locked after {self.max_failures} failed sign-ins: even the "
                                      f"right password is refused until the lock ends, in {_minutes(wait)}.",
                                      retry_after=wait, code="account_locked")
            raise TooManyAttempts(f"Too many sign-in attempts for this account at once; try again in "
                                  f"{_minutes(wait)}.", retry_after=wait)

    def _store_locked(self, user: User | None, now: float) -> None:
        if user is not None and user.locked_until > now:
            wait = user.locked_until - now
            raise TooManyAttempts(f"This account is locked after {self.max_failures} failed sign-ins: even the "
                                  f"right password is refused until the lock ends, in {_minutes(wait)}.",
                                  retry_after=wait, code="account_locked")

    async def login(self, name: str, password: str, ip: str | None) -> tuple[User, str]:
        """
        The user and a new session id, or fail with L{Unauthorized}
        (L{WRONG}, whatever went wrong) or L{TooManyAttempts} (the address
        or the name is locked, or has its share of attempts under way).
        """
        started = self.clock.seconds()
        ip_key = _ip_key(ip)
        valid = bool(_NAME.fullmatch(name or "")) and len(password) <= MAX_PASSWORD
        name_key = name.lower() if valid else None
        # count the attempt before the work, so that no more than the limits can be under way
        self._refuse(ip_key, name_key, started)
        self._ips.reserve(ip_key, started)
        if name_key is not None:
            self._names.reserve(name_key, started)
        try:
            user = await self.users.get(name) if valid else None
            self._store_locked(user, self.clock.seconds())
            ok = await self.hasher.verify(password, user.password_hash if user is not None else None)
        finally:
            self._ips.release(ip_key)
            if name_key is not None:
                self._names.release(name_key)
        now = self.clock.seconds()
        if not ok or user is None or name_key is None:  # (no user or an invalid name: never ok)
            await self._failed(user, ip_key, name_key, ip, now)
            raise Unauthorized(f"{WRONG} After {self.max_failures} failed attempts an account is locked for "
                               f"{_minutes(self.lockout)}.", code="wrong_credentials")
        # again, now: a lock that attempts running alongside this one brought about wins
        self._refuse_locked(ip_key, name_key, now)
        fresh = await self.users.get(user.name)
        self._store_locked(fresh, self.clock.seconds())
        now = self.clock.seconds()
        self._refuse_locked(ip_key, name_key, now)
        self._names.succeeded(name_key, started)
        if fresh is not None and (fresh.failed_logins or fresh.locked_until):
            # issued in the same turn as the check above: the store writes in order, so a lock
            # that a concurrent failure brings about from now on is written after this
            await self.users.clear_failures(user.name)
        sid = secrets.token_urlsafe(32)
        await self.users.add_session(_session_hash(sid), user.name, now, now + self.session_max)
        return user, sid

    def _refuse_locked(self, ip_key: str, name_key: str | None, now: float) -> None:
        wait = self._ips.locked(ip_key, now)
        if wait:
            raise TooManyAttempts(f"Too many failed sign-ins from your address; try again in {_minutes(wait)}.",
                                  retry_after=wait)
        wait = self._names.locked(name_key, now) if name_key is not None else 0.0
        if wait:
            raise TooManyAttempts(f"This account is locked after {self.max_failures} failed sign-ins: even the "
                                  f"right password is refused until the lock ends, in {_minutes(wait)}.",
                                  retry_after=wait, code="account_locked")

    async def _failed(self, user: User | None, ip_key: str, name_key: str | None, ip: str | None,
                      now: float) -> None:
        if self._ips.failed(ip_key, now, self.ip_max_failures, self.lockout) == "locked":
            log.warn("Dashboard sign-in locked for {ip} for {seconds:.0f} s after {n} failures",
                     ip=ip_key, seconds=self.lockout, n=self.ip_max_failures)
        outcome = "counted"
        if name_key is not None:
            outcome = self._names.failed(name_key, now, self.max_failures, self.lockout)
        if user is None or outcome == "was_locked":
            return
        # the store keeps the lock (and its own count of failures in a row)
        after = await self.users.record_failure(user.name, now, 1 if outcome == "locked" else self.max_failures,
                                                self.lockout)
        if after is not None and after.locked_until > now:
            log.warn("Dashboard account {name} locked for {seconds:.0f} s after {n} failed sign-ins",
                     name=user.name, seconds=self.lockout, n=self.max_failures)

    async def logout(self, viewer: Viewer) -> None:
        if viewer.session:
            await self.users.remove_session(viewer.session)

    def set_cookie(self, request: IRequest, session_id: str) -> None:
        request.addCookie(self.cookie_name.encode(), session_id.encode(), path=b"/",  # type: ignore[call-arg]
                          httpOnly=True, sameSite="strict", secure=request.isSecure())  # (IRequest omits them)

    def clear_cookie(self, request: IRequest) -> None:
        request.addCookie(self.cookie_name.encode(), b"", path=b"/",  # type: ignore[call-arg]
                          httpOnly=True, sameSite="strict",  # (IRequest.addCookie omits them; Request has them)
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
