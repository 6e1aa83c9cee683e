"""
Dashboard accounts (roller/auth/accounts.py, roller/store/users.py, `roller
user ...`): the scrypt hash format, the users and sessions tables on real
SQLite, sign-in lockout and session expiry on a L{task.Clock}, and the CLI
through C{roller.cli.main} on a temporary database.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from roller import cli
from roller.auth.accounts import (
    AccountAuth, AttemptBudget, PasswordHasher, TooManyAttempts, hash_password, principal_for, role_scopes, verify_password,
)
from roller.errors import BadRequest, Forbidden, Unauthorized
from roller.store.users import NoSuchUser, UserExists
from roller.testing.syncdb import _NonThreadPool, result_of, run, sync_store
from roller.web.dashboard import IDashboardAuth

P = "project:releng:roller:"
PASSWORD = "correct horse battery"


class FakeRequest:
    """What AccountAuth reads from a request: cookies, headers, the peer."""

    def __init__(self, cookies: dict[str, str] | None = None, host: str = "127.0.0.1",
                 headers: dict[bytes, bytes] | None = None):
        self.cookies = {k.encode(): v.encode() for k, v in (cookies or {}).items()}
        self.headers = headers or {}
        self.host = host
        self.set: list[tuple] = []

    def getCookie(self, name: bytes) -> bytes | None:
        return self.cookies.get(name)

    def getHeader(self, name: bytes) -> bytes | None:
        return self.headers.get(name.lower())

    def getClientAddress(self) -> Any:
        return IPv4Address("TCP", self.host, 40000)

    def isSecure(self) -> bool:
        return False

    def addCookie(self, name: bytes, value: bytes, **kw: Any) -> None:
        self.set.append((name, value, kw))


def failure_of(d: Any) -> Any:
    if inspect.iscoroutine(d):
        d = Deferred.fromCoroutine(d)
    out: list = []
    d.addBoth(out.append)
    assert out and hasattr(out[0], "check"), f"expected a failure, got {out!r}"
    return out[0]


@pytest.fixture
def env(tmp_path: Path) -> Any:
    store, clock = sync_store(str(tmp_path / "acc.db"))
    clock.advance(1_700_000_000)
    auth = AccountAuth(store.users, clock, PasswordHasher(clock, _NonThreadPool(), ln=10), scope_prefix=P,
                       tasks=("ping", "reboot"), session_idle=3600.0, session_max=86400.0, max_failures=3,
                       ip_max_failures=5, lockout=600.0)
    yield store, clock, auth
    result_of(store.close())


def add(store: Any, clock: Any, name: str, role: str, password: str = PASSWORD) -> None:
    result_of(store.users.add(name, role, hash_password(password, ln=10), clock.seconds()))


# -- KDF ---------------------------------------------------------------------------------


def test_scrypt_hash_is_self_describing_salted_and_verifies() -> None:
    h1, h2 = hash_password(PASSWORD), hash_password(PASSWORD)
    assert h1.startswith("$scrypt$ln=14,r=8,p=1$") and h1 != h2  # per-hash salt
    assert PASSWORD not in h1
    assert verify_password(PASSWORD, h1) and not verify_password(PASSWORD + "x", h1)
    # the parameters are read from the hash: an older, cheaper one still verifies
    salt = b"0123456789abcdef"
    cheap = hash_password(PASSWORD, ln=10, salt=salt)
    key = hashlib.scrypt(PASSWORD.encode(), salt=salt, n=1024, r=8, p=1, dklen=32)
    assert cheap.split("$")[-1].startswith(__import__("base64").b64encode(key).decode()[:40])
    assert verify_password(PASSWORD, cheap)
    # malformed or tampered hashes (huge cost) are refused, not computed
    for bad in ("", "plain", "$scrypt$ln=30,r=8,p=1$" + cheap.split("$", 4)[4], cheap.replace("$scrypt$", "$bcrypt$")):
        assert not verify_password(PASSWORD, bad)


def test_hasher_runs_in_the_thread_pool() -> None:
    calls: list = []

    class Pool(_NonThreadPool):
        def callInThreadWithCallback(self, onResult: Any, f: Any, *a: Any, **kw: Any) -> None:
            calls.append(f)
            super().callInThreadWithCallback(onResult, f, *a, **kw)

    from roller.testing.syncdb import SyncClock

    hasher = PasswordHasher(SyncClock(), Pool(), ln=10)
    encoded = result_of(hasher.hash(PASSWORD))
    assert result_of(hasher.verify(PASSWORD, encoded)) is True
    assert result_of(hasher.verify("nope", encoded)) is False
    assert result_of(hasher.verify(PASSWORD, None)) is False  # no such user: still a KDF run
    assert len(calls) == 4


def test_roles_map_to_api_scopes(env: Any) -> None:
    store, clock, auth = env
    assert role_scopes("viewer", P) == (P + "jobs:read", P + "machines:read", P + "loans:read")
    op = role_scopes("operator", P, ("ping", "reboot"))
    assert P + "reboot" in op and P + "jobs:cancel" in op and P + "inventory:write" not in op
    add(store, clock, "ann", "admin")
    admin = principal_for(result_of(store.users.get("ann")), P)
    assert admin.id == "user:ann"
    assert all(admin.has_scope(P + s) for s in ("reboot", "inventory:write", "audit:read", "jobs:cancel"))
    with pytest.raises(ValueError):
        role_scopes("root", P)


# -- store ----------------------------------------------------------------------------------


def test_users_table_add_list_passwd_remove(env: Any) -> None:
    store, clock, auth = env
    add(store, clock, "bob", "viewer")
    with pytest.raises(UserExists):
        add(store, clock, "bob", "admin")
    assert [u.name for u in result_of(store.users.list())] == ["bob"]
    assert "scrypt" not in repr(result_of(store.users.get("bob")))  # no hash in logs
    result_of(store.users.add_session("h1", "bob", clock.seconds(), clock.seconds() + 10))
    result_of(store.users.set_password("bob", hash_password("another password", ln=10), clock.seconds()))
    assert result_of(store.users.sessions_of("bob")) == 0  # a new password ends the sessions
    assert result_of(store.users.add_first_admin("eve", "x", clock.seconds())) is None  # users exist
    result_of(store.users.add_session("h2", "bob", clock.seconds(), clock.seconds() + 10))
    result_of(store.users.remove("bob"))
    assert result_of(store.users.session("h2")) is None and result_of(store.users.count()) == 0
    with pytest.raises(NoSuchUser):
        result_of(store.users.remove("bob"))


# -- sign-in, lockout and sessions ---------------------------------------------------------------


def test_login_makes_a_session_stored_only_as_a_hash(env: Any, tmp_path: Path) -> None:
    store, clock, auth = env
    verifyObject(IDashboardAuth, auth)
    add(store, clock, "olga", "operator")
    user, sid = run(auth.login("olga", PASSWORD, "192.0.2.1"))
    assert user.name == "olga" and len(sid) == 43
    viewer = result_of(auth.viewer(FakeRequest({"roller_session": sid})))
    assert viewer.id == "user:olga" and viewer.role == "operator" and viewer.may(P + "reboot")
    assert not viewer.may(P + "inventory:write") and sid not in repr(viewer)
    db = sqlite3.connect(tmp_path / "acc.db")
    dump = "\n".join(db.iterdump())
    assert sid not in dump and PASSWORD not in dump
    assert hashlib.sha256(sid.encode()).hexdigest() in dump
    # no or a forged cookie: sign in
    for cookies in ({}, {"roller_session": "x" * 43}, {"roller_session": "<script>"}):
        f = failure_of(auth.viewer(FakeRequest(cookies)))
        assert f.check(Unauthorized) and f.value.code == "sign_in_required"
    run(auth.logout(viewer))
    assert failure_of(auth.viewer(FakeRequest({"roller_session": sid}))).value.code == "sign_in_required"


def test_wrong_password_and_unknown_user_get_the_same_answer(env: Any) -> None:
    store, clock, auth = env
    add(store, clock, "olga", "operator")
    wrong = failure_of(auth.login("olga", "not the password", "192.0.2.1"))
    nobody = failure_of(auth.login("nobody", PASSWORD, "192.0.2.2"))
    assert wrong.check(Unauthorized) and nobody.check(Unauthorized)
    assert wrong.value.message == nobody.value.message
    assert wrong.value.message.startswith("Wrong user name or password.")


def test_user_lockout_after_failures_expires_on_the_clock(env: Any) -> None:
    store, clock, auth = env
    add(store, clock, "olga", "operator")
    for i in range(3):
        failure_of(auth.login("olga", f"guess {i}", f"192.0.2.{i}"))  # several addresses
    assert result_of(store.users.get("olga")).locked_until == clock.seconds() + 600
    # locked: even the right password is refused, and the answer says so
    f = failure_of(auth.login("olga", PASSWORD, "198.51.100.9"))
    assert f.check(TooManyAttempts) and f.value.status == 429 and f.value.code == "account_locked"
    assert "even the right password is refused" in f.value.message and "10 minutes" in f.value.message
    assert f.value.retry_after == 600
    clock.advance(599)
    f = failure_of(auth.login("olga", PASSWORD, "198.51.100.9"))
    assert f.check(TooManyAttempts) and f.value.retry_after == 1
    clock.advance(2)
    user, _ = run(auth.login("olga", PASSWORD, "198.51.100.9"))
    assert user.name == "olga" and result_of(store.users.get("olga")).failed_logins == 0


def test_address_lockout_covers_every_user_name(env: Any) -> None:
    store, clock, auth = env
    add(store, clock, "olga", "operator")
    for i in range(5):
        failure_of(auth.login(f"user{i}", "guess", "203.0.113.7"))
    f = failure_of(auth.login("olga", PASSWORD, "203.0.113.7"))
    assert f.check(TooManyAttempts) and f.value.status == 429 and "10 minutes" in f.value.message
    assert run(auth.login("olga", PASSWORD, "203.0.113.8"))[0].name == "olga"  # another address
    clock.advance(601)
    assert run(auth.login("olga", PASSWORD, "203.0.113.7"))[0].name == "olga"


class HeldHasher:
    """Password checks that answer only when the test says: the attempts stay under way."""

    def __init__(self) -> None:
        self.held: list[tuple[str, str | None, Deferred]] = []

    def verify(self, password: str, encoded: str | None) -> Deferred:
        d: Deferred = Deferred()
        self.held.append((password, encoded, d))
        return d

    def answer(self, count: int | None = None) -> None:
        """Answer the oldest C{count} held checks (all by default), truthfully."""
        count = len(self.held) if count is None else count
        now, self.held = self.held[:count], self.held[count:]
        for password, encoded, d in now:
            d.callback(encoded is not None and verify_password(password, encoded))


def held_auth(store: Any, clock: Any, **kw: Any) -> tuple[AccountAuth, HeldHasher]:
    hasher = HeldHasher()
    options = {"max_failures": 3, "ip_max_failures": 20, "lockout": 600.0, **kw}
    return AccountAuth(store.users, clock, hasher, scope_prefix=P, tasks=("ping",), **options), hasher


def settle(coro: Any) -> list:
    """Start a sign-in; the list gets its result or failure when it ends."""
    out: list = []
    Deferred.fromCoroutine(coro).addBoth(out.append)
    return out


def test_concurrent_wrong_passwords_cannot_make_way_for_the_right_one(env: Any) -> None:
    store, clock, _ = env
    add(store, clock, "olga", "operator")
    auth, hasher = held_auth(store, clock)
    wrong = [settle(auth.login("olga", f"guess {i}", "203.0.113.7")) for i in range(60)]
    right = settle(auth.login("olga", PASSWORD, "203.0.113.7"))
    # counted before the hash: only max_failures attempts got as far as the password check
    assert len(hasher.held) == 3
    refused = [r[0] for r in wrong + [right] if r]
    assert len(refused) == 58 and all(f.check(TooManyAttempts) for f in refused)
    assert "Too many sign-in attempts for this account at once" in right[0].value.message
    hasher.answer()
    assert [r[0].check(Unauthorized) is not None for r in wrong[:3]] == [True] * 3
    assert result_of(store.users.get("olga")).locked_until == clock.seconds() + 600
    assert result_of(store.users.sessions_of("olga")) == 0
    # locked: the right password, from anywhere, is refused (at once) until the lock ends
    f = failure_of(auth.login("olga", PASSWORD, "198.51.100.1"))
    assert f.check(TooManyAttempts) and f.value.code == "account_locked" and hasher.held == []
    clock.advance(599)
    assert failure_of(auth.login("olga", PASSWORD, "198.51.100.1")).value.code == "account_locked"
    clock.advance(1)
    later = settle(auth.login("olga", PASSWORD, "198.51.100.1"))
    hasher.answer()
    assert later[0][0].name == "olga" and result_of(store.users.sessions_of("olga")) == 1


def test_a_success_keeps_the_failures_of_attempts_alongside_it(env: Any) -> None:
    store, clock, _ = env
    add(store, clock, "olga", "operator")
    auth, hasher = held_auth(store, clock)
    typo = settle(auth.login("olga", "typo", "192.0.2.1"))
    hasher.answer()  # a failure that ended before the success began: the success forgets it
    assert typo[0].check(Unauthorized)
    clock.advance(1)
    guess = settle(auth.login("olga", "guess 1", "203.0.113.7"))
    mine = settle(auth.login("olga", PASSWORD, "192.0.2.1"))
    clock.advance(1)
    hasher.answer(1)  # the guess fails while the right password is being checked
    hasher.answer()
    assert guess[0].check(Unauthorized) and mine[0][0].name == "olga"
    # the guess still counts: two more failures lock the account (had the typo counted, one would)
    for i in (2, 3):
        attempt = settle(auth.login("olga", f"guess {i}", "203.0.113.7"))
        hasher.answer()
        assert attempt[0].check(Unauthorized)
    f = failure_of(auth.login("olga", PASSWORD, "192.0.2.1"))
    assert f.check(TooManyAttempts) and f.value.code == "account_locked"


def test_a_lock_set_while_hashing_refuses_the_right_password(env: Any) -> None:
    store, clock, _ = env
    add(store, clock, "olga", "operator")
    auth, hasher = held_auth(store, clock)
    mine = settle(auth.login("olga", PASSWORD, "192.0.2.1"))
    # meanwhile another roller on the same database locks the account
    result_of(store.users.record_failure("olga", clock.seconds(), 1, 600.0))
    hasher.answer()
    assert mine[0].check(TooManyAttempts) and mine[0].value.code == "account_locked"
    assert result_of(store.users.sessions_of("olga")) == 0


def test_address_budget_holds_under_concurrency(env: Any) -> None:
    store, clock, _ = env
    add(store, clock, "olga", "operator")
    auth, hasher = held_auth(store, clock, ip_max_failures=5)
    names = [settle(auth.login(f"user{i}", "guess", "2001:db8:1::7")) for i in range(10)]
    assert len(hasher.held) == 5
    assert all(r[0].check(TooManyAttempts) for r in names[5:])
    assert "from your address at once" in names[5][0].value.message
    hasher.answer()
    # the same /64 is the same address
    f = failure_of(auth.login("olga", PASSWORD, "2001:db8:1::8"))
    assert f.check(TooManyAttempts) and "Too many failed sign-ins from your address" in f.value.message
    other = settle(auth.login("olga", PASSWORD, "2001:db8:2::1"))
    hasher.answer()
    assert other[0][0].name == "olga"


def test_unknown_names_lock_like_real_ones(env: Any) -> None:
    store, clock, auth = env
    add(store, clock, "olga", "operator")
    answers = []
    for name in ("olga", "nobody"):
        for i in range(3):
            failure_of(auth.login(name, f"guess {i}", f"192.0.2.{i}"))
        f = failure_of(auth.login(name, PASSWORD, "198.51.100.9"))
        answers.append((f.value.status, f.value.code, f.value.message))
    assert answers[0] == answers[1] and answers[0][:2] == (429, "account_locked")


def test_attempt_budget_is_bounded_and_keeps_live_keys() -> None:
    budget = AttemptBudget(max_keys=10)
    budget.reserve("busy", 0.0)  # under way
    budget.failed("locked", 0.0, 1, 600.0)  # locked
    for i in range(8):
        budget.failed(f"k{i}", float(i), 5, 600.0)
    assert len(budget) == 10
    budget.reserve("new", 9.0)
    assert len(budget) <= 10 and "new" in budget._keys
    assert "busy" in budget._keys and budget.locked("locked", 9.0) == 591.0
    assert "k0" not in budget._keys and "k7" in budget._keys  # the oldest failures went first
    # idle keys (failures out of the window) go before anything else
    budget = AttemptBudget(max_keys=3)
    for key in ("a", "b", "c"):
        budget.failed(key, 0.0, 5, 10.0)
    budget.wait("a", 20.0, 5, 10.0)  # a's failure left the window
    budget.reserve("d", 20.0)
    assert set(budget._keys) == {"b", "c", "d"}


def test_session_idle_and_absolute_expiry_on_the_clock(env: Any) -> None:
    store, clock, auth = env
    add(store, clock, "vic", "viewer")
    _, sid = run(auth.login("vic", PASSWORD, "192.0.2.1"))
    req = FakeRequest({"roller_session": sid})
    for _ in range(30):  # used every 50 minutes: idle never reached, absolute at 24 h
        clock.advance(3000)
        if clock.seconds() - 1_700_000_000 >= 86400:
            break
        assert result_of(auth.viewer(req)).name == "vic"
    f = failure_of(auth.viewer(req))
    assert f.check(Unauthorized) and f.value.code == "session_expired"
    assert result_of(store.users.sessions_of("vic")) == 0  # removed
    _, sid = run(auth.login("vic", PASSWORD, "192.0.2.1"))
    clock.advance(3599)
    assert result_of(auth.viewer(FakeRequest({"roller_session": sid}))).name == "vic"
    clock.advance(3600)  # idle for an hour
    assert failure_of(auth.viewer(FakeRequest({"roller_session": sid}))).value.code == "session_expired"


def test_setup_token_until_the_first_admin(env: Any) -> None:
    store, clock, auth = env
    announced: list[str] = []
    path = run(auth.start(announced.append))
    assert announced == [path] and path == f"/setup?token={auth.setup_token}"
    assert failure_of(auth.setup_admin("wrong", "root", PASSWORD)).check(Forbidden)
    assert failure_of(auth.setup_admin(auth.setup_token, "root", "short")).check(BadRequest)
    user = run(auth.setup_admin(auth.setup_token, "root", PASSWORD))
    assert user.role == "admin" and auth.setup_token is None
    assert not run(auth.setup_pending())
    # a restart with users makes no token
    assert run(auth.start(announced.append)) is None and len(announced) == 1


def test_demo_loopback_admits_loopback_as_demo_admin_only(env: Any) -> None:
    store, clock, auth = env
    demo = AccountAuth(store.users, clock, auth.hasher, scope_prefix=P, demo_loopback=True)
    v = result_of(demo.viewer(FakeRequest(host="127.0.0.1")))
    assert v.id == "demo" and v.may(P + "inventory:write") and "demo mode" in v.note
    assert failure_of(demo.viewer(FakeRequest(host="192.0.2.5"))).check(Unauthorized)
    proxied = FakeRequest(host="127.0.0.1", headers={b"x-forwarded-for": b"198.51.100.1"})
    assert failure_of(demo.viewer(proxied)).check(Unauthorized)
    add(store, clock, "vic", "viewer")
    _, sid = run(demo.login("vic", PASSWORD, "127.0.0.1"))
    assert result_of(demo.viewer(FakeRequest({"roller_session": sid}))).id == "user:vic"  # signed in wins


# -- CLI ------------------------------------------------------------------------------------------


async def roller(tmp_path: Path, *argv: str, stdin: str = "", monkeypatch: Any) -> tuple[int, str, str]:
    """C{roller --state-dir TMP ARGV...} in this process, on the running reactor."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    monkeypatch.delenv("ROLLER_CONFIG", raising=False)
    out, err = io.StringIO(), io.StringIO()
    args = cli._parser().parse_args(["--state-dir", str(tmp_path / "state"), *argv])
    code = await cli.execute(reactor, args, out, err)
    return code, out.getvalue(), err.getvalue()


@pytest_twisted.ensureDeferred
async def test_cli_user_add_list_passwd_remove_audited(tmp_path: Path, monkeypatch: Any) -> None:
    async def r(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        return await roller(tmp_path, *argv, stdin=stdin, monkeypatch=monkeypatch)

    assert (await r("user", "add", "alice", "--role", "operator", "--password-stdin", stdin=PASSWORD + "\n"))[0] == 0
    prompts = iter(["second password!", "second password!"])
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt="": next(prompts))
    assert (await r("user", "add", "vic", "--role", "viewer"))[0] == 0
    code, out, err = await r("user", "add", "alice", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 2 and "exists already" in err
    code, out, err = await r("user", "add", "bad name", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 2 and "user name" in err
    code, out, err = await r("user", "add", "short", "--role", "admin", "--password-stdin", stdin="abc\n")
    assert code == 2 and "at least 10" in err
    mismatch = iter(["one password!!", "another one!!"])
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt="": next(mismatch))
    code, out, err = await r("user", "passwd", "alice")
    assert code == 2 and "differ" in err
    code, out, err = await r("user", "list")
    assert code == 0 and "alice" in out and "operator" in out and "vic" in out and "scrypt" not in out
    listed = json.loads((await r("user", "list", "--json"))[1])
    assert [(u["name"], u["role"]) for u in listed] == [("alice", "operator"), ("vic", "viewer")]
    assert "scrypt" not in json.dumps(listed)
    assert (await r("user", "passwd", "alice", "--password-stdin", stdin="a brand new one\n"))[0] == 0
    assert (await r("user", "remove", "vic"))[0] == 0
    code, out, err = await r("user", "remove", "vic")
    assert code == 2 and "no user vic" in err
    db = sqlite3.connect(tmp_path / "state" / "roller.db")
    (stored,) = db.execute("SELECT password_hash FROM users WHERE name = 'alice'").fetchone()
    assert verify_password("a brand new one", stored)
    actions = [row for row in db.execute("SELECT action, target, actor FROM audit ORDER BY id")]
    assert [(a, t) for a, t, _ in actions] == [
        ("user.add", "user:alice"), ("user.add", "user:vic"), ("user.passwd", "user:alice"),
        ("user.remove", "user:vic")]
    assert all(actor.startswith("cli:") for _, _, actor in actions)
    dump = "\n".join(db.iterdump())
    assert PASSWORD not in dump and "a brand new one" not in dump and "second password!" not in dump
