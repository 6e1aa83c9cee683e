"""
Signing in to the dashboard (AccountAuth wired into the Dashboard): the
sign-in and sign-out forms, lockout, roles on every action, CSRF on the
forms, session expiry on the clock and the first-admin setup link.  Same
in-memory HTTP harness as test_dashboard.py (real SQLite, a L{Clock},
nothing sleeps).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
import treq

from roller.auth.accounts import AccountAuth, PasswordHasher, hash_password
from roller.testing.syncdb import _NonThreadPool, result_of, run
from test_dashboard import Env, csrf_of, make_env

P = "project:releng:roller:"
PASSWORD = "correct horse battery"


def make(tmp_path: Path, users: dict[str, str] | None = None, **auth_kw: Any) -> Env:
    e = make_env(tmp_path)
    e.dashboard.auth = AccountAuth(
        e.store.users, e.clock, PasswordHasher(e.clock, _NonThreadPool(), ln=10), scope_prefix=P,
        tasks=("reboot", "ping"), session_idle=3600.0, session_max=86400.0, max_failures=3, ip_max_failures=50,
        lockout=600.0, **auth_kw)
    e.clock.advance(1_700_000_000)
    for name, role in (users or {}).items():
        result_of(e.store.users.add(name, role, hash_password(PASSWORD, ln=10), e.clock.seconds()))
    e.add_machine("m1", "g1", ip="192.0.2.1", ssh={"user": "builder"})  # settings reboot can use
    return e


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make(tmp_path, {"olga": "operator", "vic": "viewer", "ann": "admin"})


def login_form(e: Env, next_: str | None = None) -> dict[str, str]:
    r = e.get("/login" + (f"?next={next_}" if next_ else ""))
    assert r.code == 200, r.text
    return {"csrf_token": csrf_of(r.text), "next": re.search(r'name="next" value="([^"]*)"', r.text).group(1)}


def sign_in(e: Env, name: str, password: str = PASSWORD, next_: str | None = None) -> Any:
    form = login_form(e, next_)
    return e.post("/login", form={**form, "user": name, "password": password})


def test_pages_need_sign_in_and_come_back_after_it(env: Env) -> None:
    r = env.get("/")
    assert r.code == 303 and r.header("location") == "/login"
    stream = env.get("/events")  # the live stream too, as JSON
    assert stream.code == 401 and json.loads(stream.body)["error"] == "sign_in_required"
    assert env.hub.client_count == 0
    r = env.get("/machines/g1/m1")
    assert r.code == 303
    target = parse_qs(urlsplit(r.header("location")).query)["next"][0]
    assert target == "/machines/g1/m1"
    r = sign_in(env, "olga", next_="/machines/g1/m1")
    assert r.code == 303 and r.header("location") == "/machines/g1/m1"
    cookie = [c for c in r.headers.getRawHeaders("set-cookie") if c.startswith("roller_session=")][0]
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and "Secure" not in cookie
    page = env.get("/machines/g1/m1")
    assert page.code == 200
    assert 'class="viewer-name">olga<' in page.text and "(operator)" in page.text and "Sign out" in page.text
    assert PASSWORD not in page.text and env.cookies["roller_session"] not in page.text
    entry = env.audit()[0]
    assert (entry.action, entry.actor) == ("user.login", "user:olga")


def test_next_must_stay_on_this_site(env: Env) -> None:
    for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        env.cookies.pop("roller_session", None)
        form = login_form(env)
        r = env.post("/login", form={**form, "next": evil, "user": "olga", "password": PASSWORD})
        assert r.code == 303 and r.header("location") == "/", evil


def test_wrong_password_unknown_user_and_lockout(env: Env) -> None:
    r = sign_in(env, "olga", "wrong password")
    assert r.code == 401 and "Wrong user name or password." in r.text and 'value="olga"' in r.text
    assert "roller_session" not in env.cookies
    unknown = sign_in(env, "nobody")
    assert unknown.code == 401 and "Wrong user name or password." in unknown.text
    sign_in(env, "olga", "wrong again")
    sign_in(env, "olga", "and again")  # third failure: locked for 10 minutes
    r = sign_in(env, "olga")  # even with the right password, and the page says so
    assert r.code == 429 and "roller_session" not in env.cookies
    assert "This account is locked after 3 failed sign-ins" in r.text and r.header("retry-after") == "600"
    env.clock.advance(601)
    assert sign_in(env, "olga").code == 303 and env.get("/").code == 200


def test_address_lockout_answers_429(tmp_path: Path) -> None:
    e = make(tmp_path, {"olga": "operator"})
    e.dashboard.auth.ip_max_failures = 2
    sign_in(e, "x", "guess one")
    sign_in(e, "y", "guess two")
    r = sign_in(e, "olga")
    assert r.code == 429 and "Too many failed sign-ins from your address" in r.text


def test_logout_needs_csrf_and_ends_the_session(env: Env) -> None:
    sign_in(env, "olga")
    old = env.cookies["roller_session"]
    page = env.get("/queue")
    assert env.post("/logout", form={}).code == 403
    assert env.get("/queue").code == 200  # still signed in
    r = env.post("/logout", form={"csrf_token": csrf_of(page.text)})
    assert r.code == 303 and r.header("location") == "/login?signed_out=1"
    assert env.cookies["roller_session"] == ""
    assert "You are signed out." in env.get("/login?signed_out=1").text
    env.cookies["roller_session"] = old  # a copy of the old cookie is worthless now
    assert env.get("/").code == 303


def test_viewer_sees_no_buttons_and_is_refused_on_post(env: Env) -> None:
    sign_in(env, "vic")
    html = env.get("/machines/g1/m1").text
    assert "Run reboot" not in html and "vic (viewer) may not run tasks" in html
    token = csrf_of(html)
    r = env.post("/machines/g1/m1/jobs", form={"task": "reboot", "confirm": "yes", "csrf_token": token})
    assert r.code == 403 and "vic may not run reboot" in r.text
    assert env.jobs() == []
    job = env.submit("ping", "m1")
    assert "job-cancel" not in env.get(f"/jobs/{job.id}").text
    assert env.post(f"/jobs/{job.id}/cancel", form={"csrf_token": token}).code == 403
    assert env.get("/audit").code == 403  # admins only
    assert 'href="/audit"' not in env.get("/").text


def test_operator_runs_reboot_and_is_recorded(env: Env) -> None:
    sign_in(env, "olga")
    html = env.get("/machines/g1/m1").text
    assert "Run reboot" in html and "disabled" not in html
    token = csrf_of(html)
    r = env.post("/machines/g1/m1/jobs", form={"task": "reboot", "confirm": "yes", "csrf_token": token,
                                               "reason": "stuck"})
    assert r.code == 303 and r.header("location").startswith("/jobs/")
    (job,) = env.jobs()
    assert job.requester == "user:olga" and job.task_name == "reboot"
    assert any(a.action == "job.create:reboot" and a.actor == "user:olga" for a in env.audit())
    assert env.post(f"/jobs/{job.id}/cancel", form={"csrf_token": token}).code == 303
    assert env.get("/audit").code == 403  # operators do not read the audit log
    sign_in_admin = make_admin_session(env)
    assert sign_in_admin.get("/audit").code == 200


def make_admin_session(env: Env) -> Env:
    env.cookies.clear()
    sign_in(env, "ann")
    return env


def test_csrf_missing_or_wrong_is_refused(env: Env) -> None:
    r = env.post("/login", form={"user": "olga", "password": PASSWORD})
    assert r.code == 403 and "security token" in r.text and "roller_session" not in env.cookies
    sign_in(env, "olga")
    r = env.post("/machines/g1/m1/jobs", form={"task": "ping"})
    assert r.code == 403 and "no security token" in r.text
    r = env.post("/machines/g1/m1/jobs", form={"task": "ping", "csrf_token": "v1.1700000000.forged"})
    assert r.code == 403
    # a token from before sign-in (bound to no session) is not accepted after it
    assert env.jobs() == []


def test_session_expires_when_idle_and_at_most_after_max(env: Env) -> None:
    sign_in(env, "olga")
    env.clock.advance(3599)
    assert env.get("/").code == 200
    env.clock.advance(3601)  # idle for more than an hour
    r = env.get("/queue")
    assert r.code == 303 and r.header("location") == "/login?next=%2Fqueue&expired=1"
    assert "Your session has expired" in env.get(r.header("location")).text
    page = sign_in(env, "olga")
    assert page.code == 303
    for _ in range(40):  # busy all day: the absolute limit (24 h here) still ends it
        env.clock.advance(3000)
        if env.get("/").code != 200:
            break
    assert env.get("/").code == 303
    token_post = env.post("/machines/g1/m1/jobs", form={"task": "ping", "csrf_token": "x"})
    assert token_post.code == 401 and "Sign in" in token_post.text and env.jobs() == []


def test_setup_link_creates_the_first_admin_once(tmp_path: Path) -> None:
    e = make(tmp_path)
    path = run(e.dashboard.auth.start(lambda p: None))
    token = parse_qs(urlsplit(path).query)["token"][0]
    assert "No account exists yet" in e.get("/login").text
    assert e.get("/setup?token=wrong").code == 403
    page = e.get(path)
    assert page.code == 200 and "Create the first admin" in page.text
    form = {"csrf_token": csrf_of(page.text), "token": token, "user": "root"}
    r = e.post("/setup", form={**form, "password": PASSWORD, "password2": PASSWORD + "!"})
    assert r.code == 400 and "differ" in r.text
    r = e.post("/setup", form={**form, "password": "short", "password2": "short"})
    assert r.code == 400 and "at least 10" in r.text
    assert e.post("/setup", form={**form, "token": "wrong", "password": PASSWORD, "password2": PASSWORD}).code == 403
    r = e.post("/setup", form={**form, "password": PASSWORD, "password2": PASSWORD})
    assert r.code == 303 and r.header("location") == "/"
    home = e.get("/")
    assert home.code == 200 and "(admin)" in home.text
    assert e.get(path).code == 404  # used up
    assert e.post("/setup", form={**form, "password": PASSWORD, "password2": PASSWORD}).code == 404
    assert [(a.action, a.target) for a in e.audit()][-1] == ("user.add", "user:root")
    assert token not in "".join(str(a.params) + a.result for a in e.audit())


def test_demo_mode_admits_loopback_and_says_so(tmp_path: Path) -> None:
    e = make(tmp_path, {"vic": "viewer"}, demo_loopback=True)
    page = e.get("/")
    assert page.code == 200 and "demo mode lets loopback visitors in without signing in" in page.text
    assert 'href="/login"' in page.text
    assert e.get("/", headers={"X-Forwarded-For": "198.51.100.1"}).code == 303  # proxied: sign in
    sign_in(e, "vic")
    assert "vic (viewer) may not run tasks" in e.get("/machines/g1/m1").text


# -- wired into RollerService ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_service_logs_a_setup_link_and_needs_sign_in(tmp_path: Path) -> None:
    from attrs import evolve
    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher

    from roller.config import load_settings
    from roller.service import RollerService

    s = load_settings(None, {}, {"server.listen": "tcp:0:interface=127.0.0.1", "state_dir": str(tmp_path / "st"),
                                 "auth.mode": "none"})
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    service = RollerService(evolve(s, allowed_tasks=("ping",)), reactor)
    try:
        service.startService()
        await service.ready
    finally:
        globalLogPublisher.removeObserver(seen.append)
    try:
        base = f"http://127.0.0.1:{service.ports[0].getHost().port}"
        paths = [e["path"] for e in seen if "path" in e and str(e["path"]).startswith("/setup?token=")]
        assert len(paths) == 1 and service.dashboard_auth.setup_token in paths[0]

        async def get(path: str) -> Any:
            r = await treq.get(base + path, allow_redirects=False, persistent=False).addTimeout(10, reactor)
            await treq.content(r)
            return r

        r = await get("/")  # not demo: loopback alone is not enough
        assert r.code == 303 and r.headers.getRawHeaders("location") == ["/login"]
        assert (await get(paths[0])).code == 200
        assert (await get("/setup?token=nope")).code == 403
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_lockout_holds_against_concurrent_sign_ins_over_http(tmp_path: Path) -> None:
    """60 wrong passwords, then the right one, at once, from one address, at a running roller."""
    from attrs import evolve
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredList

    from roller.config import load_settings
    from roller.service import RollerService

    s = load_settings(None, {}, {"server.listen": "tcp:0:interface=127.0.0.1", "state_dir": str(tmp_path / "st"),
                                 "auth.mode": "none"})
    service = RollerService(evolve(s, allowed_tasks=("ping",)), reactor)
    service.startService()
    await service.ready
    try:
        store = service.store
        await store.users.add("olga", "operator", hash_password(PASSWORD), reactor.seconds())  # real scrypt
        base = f"http://127.0.0.1:{service.ports[0].getHost().port}"
        page = await treq.get(base + "/login", persistent=False).addTimeout(10, reactor)
        text = (await treq.content(page)).decode()
        cookie = [c.split(";")[0] for c in page.headers.getRawHeaders("set-cookie") if c.startswith("roller_csrf=")]
        headers = {"Cookie": cookie, "Content-Type": ["application/x-www-form-urlencoded"]}
        token = csrf_of(text)

        async def attempt(password: str) -> tuple[int, str, str | None]:
            body = f"csrf_token={token}&next=%2F&user=olga&password={password.replace(' ', '+')}"
            r = await treq.post(base + "/login", data=body.encode(), headers=headers, allow_redirects=False,
                                persistent=False).addTimeout(60, reactor)
            return r.code, (await treq.content(r)).decode(), (r.headers.getRawHeaders("set-cookie") or [None])[0]

        first_429: Deferred = Deferred()

        async def wrong(i: int) -> tuple[int, str, str | None]:
            answer = await attempt(f"wrong guess {i}")
            if answer[0] == 429 and not first_429.called:
                first_429.callback(None)
            return answer

        wrongs = [Deferred.fromCoroutine(wrong(i)) for i in range(60)]
        # once the limit is reached (the admitted ones may still be hashing), the right one
        await DeferredList([first_429, DeferredList(wrongs)], fireOnOneCallback=True)
        code, body, set_cookie = await attempt(PASSWORD)
        answers = [r for _, r in await DeferredList(wrongs, consumeErrors=False)]
        assert code == 429 and ("is locked" in body or "at once" in body), (code, body)
        assert set_cookie is None or not set_cookie.startswith("roller_session=")
        codes = sorted(c for c, _, _ in answers)
        # exactly login_max_failures (5) attempts were checked and counted; the rest refused at once
        assert codes.count(401) == s.login_max_failures and codes.count(429) == 60 - s.login_max_failures, codes
        user = await store.users.get("olga")
        assert user.locked_until > reactor.seconds() and await store.users.sessions_of("olga") == 0
        code, body, _ = await attempt(PASSWORD)  # and it stays locked
        assert code == 429 and "This account is locked after 5 failed sign-ins" in body
    finally:
        await service.stopService()
