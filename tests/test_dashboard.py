"""
The dashboard (roller/web/dashboard.py), the live event hub
(roller/web/events.py) and the composed site (roller/web/site.py).

Pages and forms go through treq's C{RequestTraversalAgent} (what
C{treq.testing.StubTreq} uses, without its cookie jar) over C{root_resource(...)}
on a real SQLite store that answers synchronously (L{sync_store}) and fake
tasks the tests finish by hand: nothing sleeps.  The Server-Sent Events
stream is tested twice: the hub alone with a fake request (buffer,
catch-up, heartbeats on a L{Clock}, slow clients), and over a real
loopback socket with treq through C{pytest_twisted}.
"""

from __future__ import annotations

import json
import re
from http.cookiejar import CookieJar
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, _SynchronousProducer
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from roller.auth import AnonymousAuthenticator
from roller.errors import Forbidden
from roller.inventory import Machine
from roller.jobs import Job, JobEvent, State
from roller.queue import JobQueue
from roller.store import AuditEntry
from roller.tasks import TaskRegistry, TaskSpec
from roller.tasks.base import TaskFailed
from roller.testing.results import eventually
from roller.testing.syncdb import result_of, run, sync_store
from roller.web.api import Api
from roller.web.dashboard import (
    CsrfProtection,
    Dashboard,
    FleetFilter,
    IDashboardAuth,
    LoopbackDashboardAuth,
    Viewer,
    find_asset_dir,
    merge_events,
)
from roller.web.events import EventHub
from roller.web.http import RollerSite
from roller.web.site import root_resource

BASE = "http://127.0.0.1:8000"
REPO = Path(__file__).resolve().parent.parent


# -- synchronous Deferreds ------------------------------------------------------




# -- fakes ------------------------------------------------------------------------


class Controlled:
    """Tasks whose runs the test ends by hand."""

    def __init__(self) -> None:
        self.runs: dict[str, Deferred] = {}

    def task(self, name: str, destructive: bool = False) -> TaskSpec:
        async def go(ctx: Any, params: Any) -> str:
            ctx.log(f"{name} starting on {ctx.machine.worker_id}")
            d: Deferred = Deferred()
            self.runs[ctx.job.id] = d
            return await d

        return TaskSpec(name=name, description=f"the {name} task", run=go, timeout=600.0,
                        destructive=destructive)

    def finish(self, job_id: str, value: Any = "ok") -> None:
        d = self.runs[job_id]
        if isinstance(value, Exception):
            d.errback(value)
        else:
            d.callback(value)


class NoCookies(CookieJar):
    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Any) -> None:
        pass


@attrs.frozen
class Resp:
    code: int
    headers: Any
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return None if values is None else ",".join(values)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@attrs.define
class Env:
    store: Any
    clock: Clock
    ctl: Controlled
    queue: JobQueue
    hub: EventHub
    dashboard: Dashboard
    client: HTTPClient
    agent: RequestTraversalAgent
    cookies: dict[str, str] = attrs.field(factory=dict)

    def request(self, method: str, path: str, *, form: dict | None = None, headers: dict | None = None,
                cookies: bool = True, body: bytes | None = None) -> Resp:
        hdrs = {k: [v] for k, v in (headers or {}).items()}
        if cookies and self.cookies:
            hdrs["Cookie"] = ["; ".join(f"{k}={v}" for k, v in self.cookies.items())]
        kwargs: dict[str, Any] = {"headers": hdrs, "allow_redirects": False}
        if form is not None:
            kwargs["data"] = urlencode(form).encode()
            hdrs["Content-Type"] = ["application/x-www-form-urlencoded"]
        elif body is not None:
            kwargs["data"] = body
        d = self.client.request(method, BASE + path, **kwargs)
        self.agent.flush()
        response = result_of(d)
        content = treq.content(response)
        self.agent.flush()
        resp = Resp(response.code, response.headers, result_of(content))
        for raw in resp.headers.getRawHeaders("set-cookie") or []:
            jar = SimpleCookie()
            jar.load(raw)
            for k, morsel in jar.items():
                self.cookies[k] = morsel.value
        return resp

    def get(self, path: str, **kw: Any) -> Resp:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Resp:
        return self.request("POST", path, **kw)

    def token(self, path: str = "/machines/g1/m1") -> str:
        """The CSRF token of a page (loading it also sets the cookie)."""
        r = self.get(path)
        assert r.code == 200, r.text
        return csrf_of(r.text)

    def add_machine(self, worker_id: str, group: str = "g1", **data: Any) -> Machine:
        m = Machine.from_json({"worker_id": worker_id, "worker_group": group, **data})
        result_of(self.store.machines.put(m))
        return m

    def submit(self, task: str, worker_id: str, group: str = "g1", **kw: Any) -> Job:
        machine = result_of(self.store.machines.get(group, worker_id))
        job, created = run(self.queue.submit(task, machine, **kw))
        assert created
        return job

    def jobs(self) -> list[Job]:
        return result_of(self.store.jobs.list(limit=1000))

    def audit(self) -> list[AuditEntry]:
        return result_of(self.store.audit.list(limit=1000))


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no csrf_token field in the page"
    return m.group(1)


def make_env(tmp_path: Path, **dashboard_kw: Any) -> Env:
    store, clock = sync_store(str(tmp_path / "dash.db"))
    ctl = Controlled()
    tasks = TaskRegistry([ctl.task("reboot", destructive=True), ctl.task("ping"), ctl.task("loan")])
    queue = JobQueue(store, tasks, clock)
    hub = EventHub(queue, clock, stream="abc", heartbeat_interval=15.0)
    hub.start()
    run(queue.start())
    api = Api(store, queue, tasks, AnonymousAuthenticator(), allowed_tasks=("reboot", "ping"), clock=clock)
    dashboard = Dashboard(store, queue, tasks, ("reboot", "ping"), clock=clock, hub=hub, **dashboard_kw)
    agent = RequestTraversalAgent(root_resource(api, dashboard, hub))
    # StubTreq's client, minus its cookie jar: the tests decide which cookies are sent
    client = HTTPClient(agent, cookiejar=NoCookies(), data_to_body_producer=_SynchronousProducer)
    return Env(store, clock, ctl, queue, hub, dashboard, client, agent)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = make_env(tmp_path)
    e.clock.advance(1_700_000_000)
    e.add_machine("m1", "g1", ip="192.0.2.1", pool="mac", fqdn="m1.releng.example.com",
                  ssh={"user": "builder", "credential": "mac-ssh-key"},
                  ipmi={"host": "192.0.2.101", "credential": "bmc-admin"})
    e.add_machine("m2", "g1", ip="192.0.2.2", pool="mac")
    e.add_machine("m3", "g2", ip="192.0.2.3", pool="linux")
    e.add_machine("m4", "g2", ip="192.0.2.4")
    return e


# -- composition and static files -------------------------------------------------------


def test_root_routes_api_dashboard_and_static(env: Env) -> None:
    r = env.get("/api/v1/tasks")
    assert r.code == 200 and r.header("content-type") == "application/json"
    assert {t["name"] for t in json.loads(r.body)["tasks"]} == {"reboot", "ping", "loan"}
    assert json.loads(env.get("/__lbheartbeat__").body) == {"status": "ok"}
    assert env.get("/__version__").code == 200
    assert env.get("/metrics").header("content-type").startswith(("application/json", "text/plain"))  # the API's
    assert env.get("/api/v1/nope").header("content-type") == "application/json"  # the API's own 404
    r = env.get("/")
    assert r.code == 200 and r.header("content-type") == "text/html; charset=utf-8"
    css = env.get("/static/roller.css")
    assert css.code == 200 and css.header("content-type").startswith("text/css")
    assert css.header("x-content-type-options") == "nosniff"
    js = env.get("/static/roller.js")
    assert js.code == 200 and js.header("content-type").startswith("text/javascript")
    assert env.get("/static/").code == 404  # no directory listing
    assert env.get("/static/nope.css").code == 404
    assert env.get("/static/../setup.py").code == 404
    page = env.get("/no/such/page")
    assert page.code == 404 and "no such page" in page.text


def test_pages_carry_security_headers(env: Env) -> None:
    r = env.get("/")
    csp = r.header("content-security-policy")
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert r.header("x-frame-options") == "DENY"
    assert r.header("cache-control") == "no-store"
    cookie = r.header("set-cookie")
    assert "roller_csrf=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "<script>" not in r.text and ' onclick=' not in r.text  # nothing inline: the CSP forbids it


def test_static_js_never_builds_html_from_text() -> None:
    js = (REPO / "static" / "roller.js").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js


def test_assets_are_found_next_to_the_package_or_given(tmp_path: Path) -> None:
    assert find_asset_dir("templates") == REPO / "templates"
    assert find_asset_dir("static") == REPO / "static"
    assert find_asset_dir("static", tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_asset_dir("static", tmp_path / "missing")


# -- fleet overview -----------------------------------------------------------------------


def rows_of(html: str) -> list[str]:
    """Worker ids in the fleet table, in order."""
    return re.findall(r'<th scope="row"><a href="/machines/[^"]+">([^<]+)</a>', html)


def test_fleet_lists_machines_with_last_job_and_counts(env: Env) -> None:
    j1 = env.submit("ping", "m1")
    env.ctl.finish(j1.id, TaskFailed("host 192.0.2.1 did not answer 3 pings"))
    env.submit("reboot", "m2")  # running
    env.submit("ping", "m2")  # queued behind it: m2's last job
    html = env.get("/").text
    assert rows_of(html) == ["m1", "m2", "m3", "m4"]
    assert "<strong>4</strong> machines" in html
    assert "1 running, 1 waiting" in html
    row_m1 = html[html.index(">m1<"):html.index(">m2<")]
    assert ">g1<" in row_m1 and ">mac<" in row_m1 and f'href="/jobs/{j1.id}">ping<' in row_m1
    assert "state-failed" in row_m1 and "host 192.0.2.1 did not answer 3 pings" in row_m1
    row_m2 = html[html.index(">m2<"):html.index(">m3<")]
    assert "state-queued" in row_m2  # the newest job, not the running one
    # counts by last-job state, each a filter link
    assert re.search(r'href="/\?state=failed">.*?<strong>1</strong>', html)
    assert re.search(r'href="/\?state=none">.*?<strong>2</strong>', html)


def test_fleet_filters_by_group_pool_state_and_search(env: Env) -> None:
    j = env.submit("ping", "m3", "g2")
    env.ctl.finish(j.id)
    assert rows_of(env.get("/?group=g2").text) == ["m3", "m4"]
    assert rows_of(env.get("/?pool=mac").text) == ["m1", "m2"]
    assert rows_of(env.get("/?state=succeeded").text) == ["m3"]
    assert rows_of(env.get("/?state=none&group=g2").text) == ["m4"]
    assert rows_of(env.get("/?q=releng.example").text) == ["m1"]  # host name
    assert rows_of(env.get("/?q=192.0.2.4").text) == ["m4"]  # address
    assert rows_of(env.get("/?q=m_").text) == []  # LIKE wildcards are literal
    empty = env.get("/?q=zzz").text
    assert "No machine matches this search" in empty
    for bad, why in (("/?state=bogus", "state must be one of"), ("/?group=a%20b", "group must be"),
                     ("/?sort=evil", "sort must be one of"), ("/?page=0", "page must be"),
                     ("/?dir=sideways", "dir must"),
                     ("/?liveness=sideways", "liveness must be one of up, down, never"),
                     ("/?loan=maybe", "loan must be one of loaned, overdue, free"),
                     ("/?tag=a%20b", "tag must be a tag")):
        r = env.get(bad)
        assert r.code == 400 and "Bad request" in r.text and why in r.text, bad


def test_fleet_sorts_and_paginates(env: Env) -> None:
    env.dashboard.page_size = 3
    for i in range(5, 8):
        env.add_machine(f"m{i}", "g3", pool="aaa")
    first = env.get("/").text
    assert rows_of(first) == ["m1", "m2", "m3"]
    assert "Page 1 of 3" in first and 'href="/?page=2" rel="next"' in first
    assert rows_of(env.get("/?page=3").text) == ["m7"]
    assert "There is no page 9" in env.get("/?page=9").text
    desc = env.get("/?sort=name&dir=desc").text
    assert rows_of(desc) == ["m7", "m6", "m5"] and 'aria-sort="descending"' in desc
    assert rows_of(env.get("/?sort=pool").text) == ["m5", "m6", "m7"]  # aaa < linux < mac, none last
    j = env.submit("ping", "m4", "g2")
    env.ctl.finish(j.id, TaskFailed("down"))
    assert rows_of(env.get("/?sort=state").text)[0] == "m4"  # problems first
    assert rows_of(env.get("/?sort=last").text)[0] == "m4"  # most recent first


def test_fleet_query_uses_the_job_index_and_is_fast_for_5000_machines(tmp_path: Path) -> None:
    e = make_env(tmp_path)
    now = 1_700_000_000.0

    def fill(c: Any) -> None:
        c.executemany(
            "INSERT INTO machines (worker_group, worker_id, ip, pool, data, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(f"grp{i % 7}", f"w{i:05d}", None, f"pool{i % 5}",
              json.dumps({"worker_group": f"grp{i % 7}", "worker_id": f"w{i:05d}", "pool": f"pool{i % 5}"}),
              now, now) for i in range(5000)])
        c.executemany(
            "INSERT INTO jobs (id, task_name, worker_group, worker_id, requester, priority, state, created_at)"
            " VALUES (?, 'ping', ?, ?, 'tc', 50, ?, ?)",
            [(f"job-{n}", f"grp{(n % 5000) % 7}", f"w{n % 5000:05d}",
              "failed" if n % 5000 == 42 and n >= 15000 else "succeeded", now + n) for n in range(20000)])

    result_of(e.store.db.write(fill))
    result_of(e.store.machines.load())
    plan = " | ".join(result_of(e.dashboard.fleet.explain()))
    assert "jobs_machine" in plan, plan  # one index lookup per machine, no scan of the job history
    r = e.get("/?state=failed")
    assert rows_of(r.text) == ["w00042"]
    assert "<strong>5000</strong> machines" in r.text
    page = result_of(e.dashboard.fleet.page(FleetFilter(), limit=200))
    assert len(page.rows) == 200 and page.total == 5000
    assert page.rows[0].worker_id == "w00042"  # problems first: its last job failed
    assert page.rows[1].worker_id == "w00000" and page.rows[1].last.id == "job-15000"  # the newest of four
    assert rows_of(e.get("/?page=25").text)  # the last page renders (its timing: bench/dashboard.py)


# -- machine page ---------------------------------------------------------------------------


def test_machine_page_shows_inventory_jobs_audit_and_buttons(env: Env) -> None:
    job = env.submit("ping", "m1", requester="client/ci", reason="check")
    result_of(env.store.audit.add(AuditEntry(time=env.clock.seconds(), actor="client/ci", action="machine.put",
                                             target="g1/m1", result="updated", source_ip="10.0.0.9")))
    r = env.get("/machines/g1/m1")
    assert r.code == 200
    html = r.text
    for text in ("m1.releng.example.com", "192.0.2.1", "mac", "user builder, port 22, credential mac-ssh-key",
                 "192.0.2.101:623 (lanplus), credential bmc-admin", "bmc-admin, mac-ssh-key",
                 "names only", "ICMP ping"):
        assert text in html, text
    assert f'href="/jobs/{job.id}">ping<' in html and "client/ci" in html
    assert "machine.put" in html and "from 10.0.0.9" in html
    # one form, one button per allowed task, CSRF token; reboot asks first
    assert 'action="/machines/g1/m1/jobs"' in html
    reboot = r'<button type="submit" name="task" value="reboot"[^>]*class="danger" data-confirm="Run reboot on m1\?'
    assert re.search(reboot, html)
    assert 'value="ping"' in html and 'value="loan"' not in html  # loan is not allowed
    assert csrf_of(html).startswith("v1.")
    assert '<label for="reason">' in html
    # the status first, then the tasks; destructive ones in a menu, help collapsed; one "Liveness" row
    assert html.index('id="status"') < html.index('id="run-h"') < html.index('id="inv-h"')
    menu = html[html.index('<details class="menu" id="destructive-tasks">'):]
    assert menu.index('value="reboot"') < menu.index("</details>")
    assert '<details class="help">' in html and "<summary>What each task does</summary>" in html
    assert html.count("<dt>Liveness</dt>") == 1 and "<dt>Liveness check</dt>" not in html
    assert f'href="/jobs/{job.id}">ping</a> <span class="state state-' in html  # the last job, in the status
    assert 'href="/jobs?group=g1&amp;worker=m1" id="all-jobs">All jobs of this machine</a>' in html


def test_machine_page_offers_only_the_tasks_its_settings_can_run(env: Env) -> None:
    """m2 has an address and nothing else: ping runs; reboot is listed with why not, as no button."""
    html = env.get("/machines/g1/m2").text
    assert 'name="task" value="ping"' in html
    assert 'value="reboot"' not in html
    unavailable = html[html.index('id="unavailable-tasks"'):]
    unavailable = unavailable[:unavailable.index("</details>")]
    assert "1 task m2's settings cannot run" in unavailable
    assert "<strong>reboot</strong>: the machine has none of ssh, ipmi, pdu, redfish or xen settings." in unavailable
    m1 = env.get("/machines/g1/m1").text  # ssh and ipmi: reboot offered, nothing listed as unavailable
    assert 'value="reboot"' in m1 and 'id="unavailable-tasks"' not in m1
    env.add_machine("m9", "g1", ip="192.0.2.9", reboot_methods=["snmp_reboot"], ssh={"user": "x"})
    m9 = env.get("/machines/g1/m9").text  # its own reboot methods decide
    assert 'value="reboot"' not in m9 and "none of its reboot methods (snmp_reboot)" in m9


def test_machine_page_empty_states_and_unknown(env: Env) -> None:
    html = env.get("/machines/g2/m4").text
    assert "No job has run on m4 yet." in html and "Nothing about m4 in the audit log yet." in html
    r = env.get("/machines/g2/nope")
    assert r.code == 404 and "There is no machine nope in worker group g2." in r.text
    assert env.get("/machines/g2/bad%20id").code == 404


def test_machine_note_and_other_text_are_escaped(env: Env) -> None:
    evil = "<script>alert(1)</script>"
    env.add_machine("x1", "g1", notes=evil, pool="mac")
    job = env.submit("ping", "x1", requester='"><img src=x onerror=alert(2)>', reason=evil)
    env.ctl.finish(job.id, TaskFailed(evil))
    result_of(env.store.audit.add(AuditEntry(time=1, actor=evil, action="machine.put", target="g1/x1",
                                             result=evil, params={"notes": evil})))
    for path in ("/machines/g1/x1", f"/jobs/{job.id}", "/audit", "/?q=x1"):
        html = env.get(path).text
        assert "<script>alert" not in html and "<img src=x" not in html, path
    machine = env.get("/machines/g1/x1").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in machine
    assert "Failed: &lt;script&gt;alert(1)&lt;/script&gt;" in env.get(f"/jobs/{job.id}").text
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in env.get(f"/jobs/{job.id}").text


# -- CSRF and submitting ------------------------------------------------------------------------


def test_post_without_or_with_wrong_token_is_403_and_queues_nothing(env: Env) -> None:
    token = env.token("/machines/g1/m1")
    attempts = [
        ({"task": "ping"}, {}),  # no token
        ({"task": "ping", "csrf_token": ""}, {}),
        ({"task": "ping", "csrf_token": "v1.1700000000.forged"}, {}),
        ({"task": "ping", "csrf_token": token[:-2] + "AA"}, {}),
        ({"task": "ping", "csrf_token": token}, {"Origin": "https://evil.example"}),
        ({"task": "ping", "csrf_token": token}, {"Sec-Fetch-Site": "cross-site"}),
    ]
    for form, headers in attempts:
        r = env.post("/machines/g1/m1/jobs", form=form, headers=headers)
        assert r.code == 403, (form, headers, r.text)
        assert r.header("content-type") == "text/html; charset=utf-8"
        assert "Not allowed" in r.text and "Nothing was done." in r.text
    assert "has no security token" in env.post("/machines/g1/m1/jobs", form={"task": "ping"}).text
    # a JSON or bodiless POST has no form, hence no token
    assert env.post("/machines/g1/m1/jobs", body=b'{"task": "ping"}').code == 403
    # the right token without the cookie it belongs to
    r = env.post("/machines/g1/m1/jobs", form={"task": "ping", "csrf_token": token}, cookies=False)
    assert r.code == 403 and "did not send roller&#39;s security cookie" in r.text
    # cancelling needs a token too
    job = env.submit("ping", "m2")
    assert env.post(f"/jobs/{job.id}/cancel", form={}).code == 403
    assert env.queue.active(job.id).state is State.running
    assert [j.id for j in env.jobs()] == [job.id] and env.audit() == []


def test_token_from_another_browser_or_roller_is_refused(env: Env, tmp_path: Path) -> None:
    token = env.token()
    cookie = env.cookies["roller_csrf"]
    env.cookies["roller_csrf"] = "A" * 43  # another browser's cookie
    assert env.post("/machines/g1/m1/jobs", form={"task": "ping", "csrf_token": token}).code == 403
    env.cookies["roller_csrf"] = cookie
    env.dashboard.csrf = CsrfProtection()  # roller restarted: a new secret
    r = env.post("/machines/g1/m1/jobs", form={"task": "ping", "csrf_token": token})
    assert r.code == 403 and "roller restarted" in r.text
    assert env.jobs() == []


def test_token_expires(env: Env) -> None:
    token = env.token()
    env.clock.advance(13 * 3600)
    r = env.post("/machines/g1/m1/jobs", form={"task": "ping", "csrf_token": token})
    assert r.code == 403 and "too old" in r.text


def test_ping_button_queues_a_job_and_redirects_to_it(env: Env) -> None:
    token = env.token("/machines/g1/m1")
    r = env.post("/machines/g1/m1/jobs", form={"task": "ping", "csrf_token": token, "reason": "looks stuck"},
                 headers={"Origin": BASE, "Host": "127.0.0.1:8000"})
    assert r.code == 303, r.text
    (job,) = env.jobs()
    assert r.header("location") == f"/jobs/{job.id}"
    assert (job.task_name, job.worker_id, job.requester, job.reason) == ("ping", "m1", "dashboard:local", "looks stuck")
    assert job.origin_ip == "127.0.0.1"
    (entry,) = env.audit()
    assert (entry.actor, entry.action, entry.target) == ("dashboard:local", "job.create:ping", "g1/m1")
    assert entry.params["via"] == "dashboard"
    # the same again: that job, said so
    r = env.post("/machines/g1/m1/jobs", form={"task": "ping", "csrf_token": token})
    assert r.header("location") == f"/jobs/{job.id}?existing=1"
    assert "already queued or running on m1" in env.get(r.header("location")).text


def test_reboot_asks_for_confirmation_without_javascript(env: Env) -> None:
    token = env.token("/machines/g1/m1")
    r = env.post("/machines/g1/m1/jobs", form={"task": "reboot", "csrf_token": token, "reason": "hung"})
    assert r.code == 200 and "Run reboot on m1?" in r.text
    assert env.jobs() == []
    assert 'name="confirm" value="yes"' in r.text and 'value="hung"' in r.text
    confirm_token = csrf_of(r.text)
    r = env.post("/machines/g1/m1/jobs", form={"task": "reboot", "csrf_token": confirm_token,
                                               "confirm": "yes", "reason": "hung"})
    assert r.code == 303
    (job,) = env.jobs()
    assert job.task_name == "reboot" and job.reason == "hung"


def test_unknown_or_disallowed_task_and_machine(env: Env) -> None:
    token = env.token()
    r = env.post("/machines/g1/m1/jobs", form={"task": "loan", "csrf_token": token})
    assert r.code == 400 and "not a task this roller runs" in r.text
    r = env.post("/machines/g1/nope/jobs", form={"task": "ping", "csrf_token": token})
    assert r.code == 404
    assert env.get("/machines/g1/m1/jobs").code == 405
    assert env.jobs() == []


def test_viewer_without_scope_cannot_run_or_cancel(tmp_path: Path) -> None:
    class PingOnly:
        def viewer(self, request: Any) -> Deferred:
            return succeed(Viewer(id="u", name="Una", scopes=("project:releng:roller:ping",)))

    e = make_env(tmp_path, auth=PingOnly())
    e.add_machine("m1", "g1", ip="192.0.2.1", ipmi={"host": "192.0.2.101"})
    html = e.get("/machines/g1/m1").text
    assert re.search(r'value="reboot"[^>]* disabled', html) and "You may not run this task." in html
    assert "Una" in html
    token = csrf_of(html)
    r = e.post("/machines/g1/m1/jobs", form={"task": "reboot", "csrf_token": token, "confirm": "yes"})
    assert r.code == 403 and "Una may not run reboot" in r.text
    job = e.submit("ping", "m1")
    assert "job-cancel" not in e.get(f"/jobs/{job.id}").text
    assert e.post(f"/jobs/{job.id}/cancel", form={"csrf_token": token}).code == 403


def test_loopback_auth_refuses_remote_and_proxied_clients() -> None:
    auth = LoopbackDashboardAuth()
    verifyObject(IDashboardAuth, auth)

    def viewer_for(host: str, headers: dict[bytes, bytes] = {}) -> Any:
        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", host, 12345)
        for k, v in headers.items():
            request.requestHeaders.setRawHeaders(k, [v])
        out: list = []
        auth.viewer(request).addBoth(out.append)
        return out[0]

    assert viewer_for("127.0.0.1").id == "dashboard:local"
    assert viewer_for("127.8.9.10").may("project:releng:roller:reboot")
    remote = viewer_for("192.0.2.7")
    assert remote.check(Forbidden) and "answers only on loopback" in remote.value.message
    proxied = viewer_for("127.0.0.1", {b"X-Forwarded-For": b"198.51.100.1"})
    assert proxied.check(Forbidden) and "proxy" in proxied.value.message


def test_remote_client_gets_a_readable_403_page(env: Env) -> None:
    r = env.get("/", headers={"X-Forwarded-For": "198.51.100.1"})
    assert r.code == 403 and "cannot be used through a proxy" in r.text and "text/html" in r.header("content-type")
    stream = env.get("/events", headers={"X-Forwarded-For": "198.51.100.1"})
    assert stream.code == 403 and json.loads(stream.body)["error"] == "dashboard_local_only"
    assert env.hub.client_count == 0


# -- job page -------------------------------------------------------------------------------------


def test_job_page_shows_state_requester_timeline_and_cancel(env: Env) -> None:
    job = env.submit("reboot", "m1", requester="client/tc-admin", reason="stuck", origin_ip="10.1.2.3")
    html = env.get(f"/jobs/{job.id}").text
    assert "reboot on" in html and "client/tc-admin" in html and "from 10.1.2.3" in html and "stuck" in html
    assert 'class="state state-running"' in html and "Running now" in html
    assert "queued by client/tc-admin" in html and "reboot starting on m1" in html  # the timeline
    assert 'id="job-cancel"' in html and f'action="/jobs/{job.id}/cancel"' in html
    assert re.search(r'data-stream="/events\?job=' + job.id + r'&amp;after=abc-\d+"', html)
    queued = env.submit("ping", "m1")
    q_html = env.get(f"/jobs/{queued.id}").text
    assert "Waiting in the queue (position 1 of 1)" in q_html and 'id="job-cancel"' in q_html
    env.ctl.finish(job.id)
    done = env.get(f"/jobs/{job.id}").text
    assert "Succeeded: ok" in done and 'id="job-cancel"' not in done and "data-stream" not in done


def test_failed_job_says_why_in_plain_words(env: Env) -> None:
    job = env.submit("reboot", "m2")
    env.ctl.finish(job.id, TaskFailed("ssh_reboot failed: connection refused by 192.0.2.2:22"))
    html = env.get(f"/jobs/{job.id}").text
    assert "Failed: ssh_reboot failed: connection refused by 192.0.2.2:22" in html
    assert 'class="outcome outcome-failed"' in html


def test_unknown_job_is_a_404_page(env: Env) -> None:
    r = env.get("/jobs/00000000-0000-0000-0000-000000000000")
    assert r.code == 404 and "There is no job" in r.text


def test_job_timeline_merges_events_not_yet_stored() -> None:
    stored = [JobEvent("j", 1.0, "state", "queued by x"), JobEvent("j", 2.0, "log", "same")]
    live = [JobEvent("j", 1.0, "state", "queued by x"), JobEvent("j", 2.0, "log", "same"),
            JobEvent("j", 2.0, "log", "same"), JobEvent("j", 3.0, "state", "running")]
    merged = merge_events(stored, live)
    assert [(e.time, e.message) for e in merged] == [(1.0, "queued by x"), (2.0, "same"), (2.0, "same"),
                                                     (3.0, "running")]
    assert merge_events(stored, []) == stored


# -- cancelling and the queue page ---------------------------------------------------------------


def test_queue_page_lists_running_and_queued_with_priority_and_age(env: Env) -> None:
    html = env.get("/queue").text
    assert "Nothing is running." in html and "Nothing is waiting." in html
    running = env.submit("reboot", "m1")
    env.clock.advance(30)
    waiting = env.submit("ping", "m1", priority=80)
    env.clock.advance(95)
    html = env.get("/queue").text
    run_part, wait_part = html.split('id="queued-h"')
    assert f'href="/jobs/{running.id}">reboot<' in run_part and "2.1 min" in run_part
    assert f'href="/jobs/{waiting.id}">ping<' in wait_part and "<td>80</td>" in wait_part and "1.6 min" in wait_part
    assert f"job {waiting.id[:8]} (ping on m1)" in wait_part  # the cancel button's name
    assert re.search(r'data-stream="/events\?kinds=state&amp;after=abc-\d+"', html)


def test_cancel_queued_job_from_the_queue_page(env: Env) -> None:
    env.submit("reboot", "m1")
    waiting = env.submit("ping", "m1")
    token = env.token("/queue")
    r = env.post(f"/jobs/{waiting.id}/cancel", form={"csrf_token": token, "next": "/queue"})
    assert r.code == 303 and r.header("location") == f"/queue?cancelled={waiting.id}"
    assert result_of(env.store.jobs.get(waiting.id)).state is State.cancelled
    html = env.get(r.header("location")).text
    assert f"Cancelled job {waiting.id[:8]}" in html and "Nothing is waiting." in html
    entry = env.audit()[0]
    assert (entry.action, entry.actor, entry.result) == ("job.cancel", "dashboard:local", f"cancelled {waiting.id}")
    # cancelling again: a readable conflict
    r = env.post(f"/jobs/{waiting.id}/cancel", form={"csrf_token": token, "next": "/queue"})
    assert r.code == 409 and "already ended: cancelled" in r.text


def test_cancel_running_job_from_its_page(env: Env) -> None:
    job = env.submit("reboot", "m2")
    token = env.token(f"/jobs/{job.id}")
    r = env.post(f"/jobs/{job.id}/cancel", form={"csrf_token": token, "next": f"/jobs/{job.id}"})
    assert r.header("location") == f"/jobs/{job.id}?cancelled=1"
    html = env.get(r.header("location")).text
    assert "Cancel requested" in html and "Cancelled (cancelled by dashboard:local)." in html
    # an open redirect is not possible
    other = env.submit("ping", "m3", "g2")
    r = env.post(f"/jobs/{other.id}/cancel", form={"csrf_token": token, "next": "//evil.example/x"})
    assert r.header("location") == f"/jobs/{other.id}?cancelled=1"


# -- audit page -----------------------------------------------------------------------------------------


def test_audit_page_lists_filters_and_pages(env: Env) -> None:
    assert "The audit log is empty" in env.get("/audit").text
    for i in range(105):
        result_of(env.store.audit.add(AuditEntry(time=1_700_000_000 + i, actor=f"client/{i}", action="machine.put",
                                                 target="g1/m1" if i % 2 else "g2/m3", result="updated",
                                                 params={"n": i})))
    html = env.get("/audit").text
    assert html.count("<tr>") == 101  # header + 100 entries
    assert "client/104" in html and "client/4<" not in html
    assert 'href="/machines/g1/m1">g1/m1<' in html
    older = re.search(r'href="(/audit\?before=\d+)" rel="next"', html).group(1)
    assert "client/4<" in env.get(older).text
    only = env.get("/audit?target=g2/m3").text
    assert "g1/m1<" not in only and "client/104" in only
    assert "Nothing in the audit log for g9/x." in env.get("/audit?target=g9/x").text
    assert env.get("/audit?before=abc").code == 400


# -- the event hub alone --------------------------------------------------------------------------------


class FakeQueue:
    def __init__(self) -> None:
        self.listeners: list = []

    def subscribe(self, listener: Any) -> Any:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class FakeChannel:
    def __init__(self) -> None:
        self.transport = FakeTransport()


class StreamRequest(DummyRequest):
    """A DummyRequest that records writes and has a transport to abort."""

    def __init__(self, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__([b"events"])
        for k, v in (headers or {}).items():
            self.requestHeaders.setRawHeaders(k, [v])
        self.channel = FakeChannel()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def frames(self) -> list[dict]:
        return parse_sse(b"".join(self.written))


def parse_sse(raw: bytes) -> list[dict]:
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        frame: dict = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                frame.setdefault("comment", []).append(line[1:].strip())
            elif ": " in line:
                k, v = line.split(": ", 1)
                frame[k] = json.loads(v) if k == "data" else v
        out.append(frame)
    return out


def fake_job(job_id: str = "j1", state: State = State.running) -> Job:
    return Job(id=job_id, task_name="ping", worker_id="w", worker_group="g", created_at=0.0, state=state)


def publish(hub: EventHub, job_id: str, message: str, kind: str = "log") -> None:
    hub.publish(fake_job(job_id), JobEvent(job_id, 1.0, kind, message))


def test_hub_numbers_and_buffers_a_bounded_ring() -> None:
    queue, clock = FakeQueue(), Clock()
    hub = EventHub(queue, clock, capacity=3, stream="f00")
    hub.start()
    assert hub.last_id == "f00-0"
    for i in range(5):
        queue.listeners[0](fake_job(), JobEvent("j1", float(i), "log", f"line {i}"))
    assert [e.id for e in hub.recent()] == [3, 4, 5]
    assert hub.last_id == "f00-5" and hub.parse_id("f00-5") == 5 and hub.parse_id("bad-5") is None
    assert hub.missed("f00-4") == (4, True)
    assert hub.missed("f00-1")[1] is False  # evicted
    assert hub.missed("beef-4")[1] is False  # another roller's id
    assert hub.missed("f00-99")[1] is False  # from the future
    hub.stop()
    assert queue.listeners == []


def test_hub_streams_with_filters_catch_up_reset_and_heartbeat() -> None:
    queue, clock = FakeQueue(), Clock()
    hub = EventHub(queue, clock, capacity=100, stream="f00", heartbeat_interval=15)
    hub.start()
    publish(hub, "j1", "before")
    everything, only_j2 = StreamRequest(), StreamRequest()
    hub.attach(everything)
    hub.attach(only_j2, job_id="j2", kinds=("state",))
    publish(hub, "j1", "hello")
    publish(hub, "j2", "a log line")
    publish(hub, "j2", "running", kind="state")
    first = everything.frames()
    assert first[0]["retry"] == "2000"
    assert [f["data"]["event"]["message"] for f in first[1:]] == ["hello", "a log line", "running"]
    assert [f["id"] for f in first[1:]] == ["f00-2", "f00-3", "f00-4"]
    assert first[1]["data"]["job"]["task_id"] == "j1" and first[1]["data"]["job"]["state"] == "running"
    assert [f["data"]["event"]["message"] for f in only_j2.frames()[1:]] == ["running"]
    # heartbeats on the injected clock
    clock.advance(15)
    assert everything.frames()[-1] == {"comment": ["heartbeat"]}
    # reconnecting with Last-Event-ID: the missed ones, then live
    again = StreamRequest({b"Last-Event-ID": b"f00-2"})
    hub.resource().render(again)
    assert [f["id"] for f in again.frames()[1:]] == ["f00-3", "f00-4"]
    # an id the hub cannot honour: reset
    stale = StreamRequest({b"Last-Event-ID": b"dead-2"})
    hub.resource().render(stale)
    assert stale.frames()[1]["event"] == "reset" and stale.frames()[1]["id"] == "f00-4"
    # a client that went away is forgotten
    assert hub.client_count == 4
    everything.processingFailed(Failure(ConnectionError("gone")))
    assert hub.client_count == 3
    hub.stop()
    assert hub.client_count == 0 and only_j2.finished


def test_hub_drops_a_slow_client_and_keeps_serving_the_others() -> None:
    queue, clock = FakeQueue(), Clock()
    hub = EventHub(queue, clock, stream="f00", max_pending_bytes=4000, max_stall=30)
    hub.start()
    slow, fast, stalled = StreamRequest(), StreamRequest(), StreamRequest()
    hub.attach(slow)
    hub.attach(fast)
    hub.attach(stalled)
    slow.producer.pauseProducing()  # its transport's buffer is full
    stalled.producer.pauseProducing()
    publish(hub, "j1", "x" * 1000)
    slow.producer.resumeProducing()  # drained: the queued frame goes out
    assert slow.frames()[-1]["data"]["event"]["message"] == "x" * 1000
    slow.producer.pauseProducing()
    for i in range(5):
        publish(hub, "j1", f"{i}" * 1000)
    assert slow.channel.transport.aborted and hub.dropped == 2  # slow and stalled: both over 4000 bytes
    assert len(fast.frames()) == 7 and not fast.channel.transport.aborted
    # a client stuck longer than max_stall is dropped at the next heartbeat even if quiet
    quiet = StreamRequest()
    hub.attach(quiet)
    quiet.producer.pauseProducing()
    clock.advance(45)
    clock.advance(15)
    assert quiet.channel.transport.aborted and hub.dropped == 3
    assert hub.client_count == 1


def test_stream_rejects_bad_filters_and_too_many_clients(env: Env) -> None:
    assert env.get("/events?kinds=everything").code == 400
    assert env.get("/events?job=%3Cx%3E").code == 400
    env.hub.max_clients = 0
    r = env.get("/events")
    assert r.code == 503 and json.loads(r.body)["error"] == "too_many_streams"


# -- the stream over a real socket ------------------------------------------------------------------------


class SSEClient(Protocol):
    """Collects SSE frames from a treq response body."""

    def __init__(self) -> None:
        self.raw = b""
        self.closed: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.raw += data

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(None)

    def frames(self) -> list[dict]:
        complete = self.raw[:self.raw.rfind(b"\n\n") + 2] if b"\n\n" in self.raw else b""
        return parse_sse(complete)

    def messages(self) -> list[str]:
        return [f["data"]["event"]["message"] for f in self.frames() if "data" in f and "event" not in f]

    def disconnect(self) -> None:
        self.transport.stopProducing()


@pytest.fixture
def live(tmp_path: Path):
    e = make_env(tmp_path)
    e.add_machine("m1", "g1", ip="192.0.2.1")
    e.add_machine("m2", "g1", ip="192.0.2.2")
    api = Api(e.store, e.queue, TaskRegistry(), AnonymousAuthenticator(), allowed_tasks=(), clock=e.clock)
    site = RollerSite(root_resource(api, e.dashboard, e.hub), reactor=reactor)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield e, f"http://127.0.0.1:{port.getHost().port}", pool
    e.hub.stop()
    pytest_twisted.blockon(pool.closeCachedConnections())
    pytest_twisted.blockon(port.stopListening())


async def connect(url: str, pool: Any, headers: dict | None = None) -> tuple[Any, SSEClient]:
    response = await treq.get(url, headers=headers or {}, pool=pool, unbuffered=True).addTimeout(5, reactor)
    client = SSEClient()
    response.deliverBody(client)
    return response, client


@pytest_twisted.ensureDeferred
async def test_sse_over_loopback_live_then_catch_up_with_last_event_id(live: Any) -> None:
    e, base, pool = live
    job = e.submit("reboot", "m1")
    page = await treq.get(f"{base}/jobs/{job.id}", pool=pool)
    html = (await page.content()).decode()
    stream = re.search(r'data-stream="([^"]+)"', html).group(1).replace("&amp;", "&")
    response, client = await connect(base + stream, pool)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    e.submit("ping", "m2")  # another job: filtered out
    e.queue._log(job.id, "step one", {})
    await eventually(lambda: "step one" in client.messages(), "the first live event")
    assert client.messages() == ["step one"]
    last_seen = client.frames()[-1]["id"]
    client.disconnect()
    await client.closed
    await eventually(lambda: e.hub.client_count == 0, "the hub to forget the client")
    # missed while disconnected
    e.queue._log(job.id, "step two", {})
    e.ctl.finish(job.id, "rebooted")
    _, again = await connect(f"{base}/events?job={job.id}", pool, {"Last-Event-ID": last_seen})
    await eventually(lambda: len(again.messages()) >= 2, "the missed events")
    assert again.messages() == ["step two", "succeeded: rebooted"]
    assert again.frames()[-1]["data"]["job"]["state"] == "succeeded"
    again.disconnect()
    await again.closed


@pytest_twisted.ensureDeferred
async def test_sse_slow_reader_is_dropped_without_blocking_others(live: Any) -> None:
    e, base, pool = live
    e.hub.max_pending_bytes = 64 * 1024
    _, slow = await connect(f"{base}/events", pool)
    _, fast = await connect(f"{base}/events", pool)
    await eventually(lambda: e.hub.client_count == 2 and slow.frames() and fast.frames(), "both streams")
    slow.transport.pauseProducing()  # stop reading: the kernel buffers fill, then roller's
    sent = 0
    big = "y" * 8000
    while e.hub.dropped == 0 and sent < 20000:
        for _ in range(5):  # 40 KB a reactor turn: what a reading client absorbs without backlog
            publish(e.hub, "j1", big)
            sent += 1
        heartbeat = await treq.get(f"{base}/__lbheartbeat__", pool=pool).addTimeout(5, reactor)
        assert heartbeat.code == 200  # the reactor keeps answering
        await heartbeat.content()
    assert e.hub.dropped == 1, f"slow client not dropped after {sent} events"
    print(f"slow client dropped after {sent} events of 8 KB")
    await eventually(lambda: len(fast.messages()) == sent, "the fast client to get every event", timeout=20)
    assert e.hub.client_count == 1
    fast.disconnect()
    slow.transport.resumeProducing()
    await fast.closed
    await slow.closed.addTimeout(5, reactor)


def test_fleet_and_machine_pages_show_liveness_and_loans(env: Env) -> None:
    from roller.store.loans import Loan

    now = env.clock.seconds()
    down = env.submit("ping", "m1")
    env.ctl.finish(down.id, TaskFailed("192.0.2.1 is not answering"))
    env.clock.advance(120)
    up = env.submit("ping", "m3", "g2")
    env.ctl.finish(up.id, "192.0.2.3 is up")
    env.submit("reboot", "m3", "g2")  # newer than the ping, still running: liveness stays the ping's
    result_of(env.store.loans.insert(Loan(worker_group="g1", worker_id="m2", borrower="dev@example.com",
                                          reason="debug", started_at=now, expires_at=now + 86400)))
    result_of(env.store.loans.insert(Loan(worker_group="g2", worker_id="m3", borrower="late@example.com",
                                          reason="debug", started_at=now - 7200, expires_at=now + 60)))
    html = env.get("/").text
    assert ">Liveness</a></th>" in html and ">Loan</a></th>" in html  # sortable, like every column
    row = {w: html[html.index(f">{w}<"):html.index("</tr>", html.index(f">{w}<"))] for w in ("m1", "m2", "m3", "m4")}
    assert f'href="/jobs/{down.id}" class="live live-down"' in row["m1"] and "2 min ago" in row["m1"]
    assert f'href="/jobs/{up.id}" class="live live-up"' in row["m3"] and "just now" in row["m3"]
    assert "live-" not in row["m2"] and "live-" not in row["m4"]
    assert "dev@example.com until" in row["m2"] and "overdue" not in row["m2"]
    # m3's loan ended 60 s ago (the clock moved 120 s): overdue, highlighted
    assert "loan-overdue" in row["m3"] and ">overdue</strong> late@example.com" in row["m3"]
    assert "loan" not in row["m1"] and "loan" not in row["m4"]
    # filters by liveness (newest finished ping) and loan
    assert rows_of(env.get("/?liveness=down").text) == ["m1"]
    assert rows_of(env.get("/?liveness=up").text) == ["m3"]
    assert rows_of(env.get("/?liveness=never").text) == ["m2", "m4"]
    assert rows_of(env.get("/?loan=loaned").text) == ["m2", "m3"]
    assert rows_of(env.get("/?loan=overdue").text) == ["m3"]
    assert rows_of(env.get("/?loan=free&group=g1").text) == ["m1"]
    assert rows_of(env.get("/?sort=liveness").text)[:2] == ["m1", "m3"]  # down, up, then never pinged
    assert rows_of(env.get("/?sort=loan").text)[:2] == ["m3", "m2"]  # the loan ending first
    assert rows_of(html)[0] == "m1"  # problems first: its newest ping failed

    m3 = env.get("/machines/g2/m3").text
    assert 'class="live live-up">up</a>' in m3 and "192.0.2.3 is up" in m3
    assert "loan-overdue" in m3 and "on loan to late@example.com until" in m3
    m4 = env.get("/machines/g2/m4").text
    assert "never pinged" in m4 and "not on loan" in m4
    m1 = env.get("/machines/g1/m1").text
    assert 'class="live live-down">down</a>' in m1 and "192.0.2.1 is not answering" in m1


def test_ago_is_plain_text_the_fleet_rows_insert_unescaped():
    import re

    from roller.web.dashboard import ago

    now = 1_800_000_000.0
    deltas = [0, 0.4, 1, 59.5, 89.9, 90, 3599, 5400, 86400 * 1.4, 86400 * 400, -5, -7200, -86400 * 30]
    texts = [ago(now - d, now) for d in deltas] + [ago(None, now)]
    assert all(re.fullmatch(r"[a-z0-9 ]+", t) for t in texts), texts
    assert texts[0] == "just now" and texts[3] == "60 s ago" and texts[-2] == "in 30 days"


def test_row_cache_works_out_each_ago_once_a_second():
    from roller.web.fleet_html import RowCache

    cache, calls = RowCache(), []

    def fmt(ts: float) -> str:
        calls.append(ts)
        return f"{ts:g}"

    assert [cache.ago(5.0, 100.2, fmt), cache.ago(5.0, 100.9, fmt), cache.ago(7.0, 100.9, fmt)] == ["5", "5", "7"]
    assert calls == [5.0, 7.0]
    assert cache.ago(5.0, 101.0, fmt) == "5" and calls == [5.0, 7.0, 5.0]  # a new second: worked out again


# -- fleet health --------------------------------------------------------------------------


def health_env(tmp_path: Path) -> tuple[Env, Any]:
    from attrs import evolve

    from roller.config import load_settings
    from roller.health.watcher import HealthWatcher

    e = make_env(tmp_path)
    e.clock.advance(1_700_000_000)
    e.add_machine("m1", "g1", ip="192.0.2.1", pool="mac")
    e.add_machine("m2", "g1", ip="192.0.2.2", pool="mac")
    settings = evolve(load_settings(None, {}, {}), health_enabled=False)
    watcher = HealthWatcher(e.clock, e.store, e.queue, settings)  # type: ignore[arg-type]
    run(watcher.start())
    e.dashboard.health = watcher
    return e, watcher


def test_fleet_shows_health_filters_by_it_and_pauses_remediation(tmp_path: Path) -> None:
    e, watcher = health_env(tmp_path)
    watcher.tracker.liveness(("g1", "m1"), True, "up")
    for _ in range(2):
        watcher.tracker.liveness(("g1", "m2"), False, "no reply")
    run(watcher._flush())
    html = e.get("/").text
    assert '<span class="health health-healthy">healthy</span>' in html
    assert '<span class="health health-down">down</span>' in html
    down = e.get("/?health=down").text
    assert [r for r in rows_of(down)] and "m2" in down and "/machines/g1/m1" not in down
    assert e.get("/?health=sad").code == 400
    assert "Remediation is off" in html
    token = csrf_of(html)
    r = e.post("/health/pause", form={"csrf_token": token}, headers={"Origin": BASE})
    assert r.code == 303 and watcher.paused and watcher.paused_by == "dashboard:local"
    assert "Remediation is paused" in e.get("/").text
    assert e.post("/health/pause", form={"csrf_token": "forged"}, headers={"Origin": BASE}).code == 403
    r = e.post("/health/resume", form={"csrf_token": token}, headers={"Origin": BASE})
    assert r.code == 303 and not watcher.paused
    assert [a.action for a in e.audit()][:2] == ["health.resume", "health.pause"]


def test_machine_page_health_and_maintenance_toggle(tmp_path: Path) -> None:
    e, watcher = health_env(tmp_path)
    page = e.get("/machines/g1/m1").text
    assert "Health: <span class=\"health health-unknown\">unknown</span>" in page and "Not checked yet" in page
    token = csrf_of(page)
    r = e.post("/machines/g1/m1/maintenance", form={"csrf_token": token, "maintenance": "on", "reason": "disk"},
               headers={"Origin": BASE})
    assert r.code == 303 and watcher.tracker.get(("g1", "m1")).maintenance
    page = e.get("/machines/g1/m1").text
    assert "health-maintenance" in page and "End maintenance" in page
    assert result_of(e.store.health.maintenance()) == {("g1", "m1"): "dashboard:local: disk"}
    assert e.post("/machines/g1/m1/maintenance", form={"csrf_token": token, "maintenance": "maybe"},
                  headers={"Origin": BASE}).code == 400
    e.post("/machines/g1/m1/maintenance", form={"csrf_token": token, "maintenance": "off"}, headers={"Origin": BASE})
    assert not watcher.tracker.get(("g1", "m1")).maintenance
    assert [a.action for a in e.audit()].count("machine.maintenance") == 2


def test_fleet_problems_first_pool_strip_and_tags(tmp_path: Path) -> None:
    """Down, then degraded, then a failed last job, then the rest (by name within); the pool strip's links filter."""
    e, watcher = health_env(tmp_path)  # m1, m2 in pool mac
    e.add_machine("a0", "g1", ip="192.0.2.10", pool="mac", tags=["gpu", "rack-4"])
    e.add_machine("m3", "g2", ip="192.0.2.3", pool="linux", tags=["gpu"])
    e.add_machine("z9", "g2", ip="192.0.2.9", pool="linux")
    e.add_machine("m4", "g2", ip="192.0.2.4")
    failed = e.submit("ping", "a0")
    e.ctl.finish(failed.id, TaskFailed("no reply"))
    e.submit("reboot", "m4", "g2")  # running
    for _ in range(2):
        watcher.tracker.liveness(("g2", "z9"), False, "no reply")  # down
    watcher.tracker.liveness(("g1", "m1"), True, "up")
    watcher.tracker.liveness(("g2", "m3"), True, "up")
    run(watcher._flush())
    html = e.get("/").text
    # problems first: z9 (down), a0 (its ping failed: liveness down), m4 (running) is not a problem
    order = rows_of(html)
    assert order[:2] == ["a0", "z9"] or order[:2] == ["z9", "a0"], order
    assert order[2:] == ["m1", "m2", "m3", "m4"]  # the rest by name (group, then id)
    assert "problems first" in html
    assert rows_of(e.get("/?sort=health").text)[0] == "z9"
    # the pool strip: per pool, each count a link to the machines counted
    strip = html[html.index('id="pool-strip"'):html.index("</section>", html.index('id="pool-strip"'))]
    assert '<a href="/?pool=linux"' in strip and '<a href="/?pool=mac"' in strip
    assert 'href="/?pool=linux&amp;health=down" aria-label="1 down in linux">1</a>' in strip
    assert 'href="/?pool=mac&amp;health=healthy" aria-label="1 healthy in mac">1</a>' in strip
    assert rows_of(e.get("/?pool=linux&health=down").text) == ["z9"]
    # tags
    assert rows_of(e.get("/?tag=gpu").text) == ["a0", "m3"]
    assert rows_of(e.get("/?tag=rack-4").text) == ["a0"]
    assert rows_of(e.get("/?tag=rack").text) == []  # whole tags only
    # every column header is a sort link
    thead = html[html.index("<thead>", html.index('class="fleet"')):html.index("</thead>", html.index('class="fleet"'))]
    assert thead.count("<a href=") == 10


def test_fleet_order_settles_within_two_seconds_while_rows_are_fresh(env: Env) -> None:
    """The order over the whole fleet is reused for up to 2 s of commits; each row shown is always fresh."""
    assert rows_of(env.get("/").text) == ["m1", "m2", "m3", "m4"]
    j = env.submit("ping", "m4", "g2")
    env.ctl.finish(j.id, TaskFailed("down"))
    html = env.get("/").text
    assert rows_of(html) == ["m1", "m2", "m3", "m4"]  # the order of a moment ago...
    assert "state-failed" in html[html.index(">m4<"):]  # ...with m4's row as it is now
    env.clock.advance(2)
    assert rows_of(env.get("/").text) == ["m4", "m1", "m2", "m3"]  # problems first again
    # the viewer's own change (here: put in maintenance, which calls forget()) shows at once
    j = env.submit("ping", "m3", "g2")
    env.ctl.finish(j.id, TaskFailed("down"))
    assert rows_of(env.get("/").text)[:2] == ["m4", "m1"]  # settled again
    env.dashboard.fleet.forget()
    assert rows_of(env.get("/").text) == ["m3", "m4", "m1", "m2"]


def test_fleet_and_machine_pages_link_to_the_job_history(env: Env) -> None:
    j = env.submit("ping", "m1")
    env.ctl.finish(j.id, TaskFailed("no reply"))
    fleet = env.get("/").text
    link = re.search(r'<a href="(/jobs\?state=failed&amp;since=[^"]+)">Jobs failed in the last 24 h</a>', fleet)
    assert link, "no link to the failed jobs"
    r = env.get(link.group(1).replace("&amp;", "&"))
    assert r.code == 200 and f"/jobs/{j.id}" in r.text
    machine = env.get("/machines/g1/m1").text
    r = env.get(re.search(r'<a href="([^"]+)" id="all-jobs">', machine).group(1).replace("&amp;", "&"))
    assert r.code == 200 and f"/jobs/{j.id}" in r.text


def test_navigation_and_the_fleet_page_live_hooks(env: Env) -> None:
    html = env.get("/").text
    nav = html[html.index('<nav aria-label="Main">'):html.index("</nav>")]
    assert [m for m in re.findall(r'<a href="([^"]+)"', nav)] == ["/", "/queue", "/jobs", "/stats", "/audit"]
    assert 'aria-current="page">Fleet</a>' in nav
    # the table names its event stream (kinds=state, after the hub's last id); the search answers "/"
    stream = f"/events?kinds=state&amp;after={env.hub.last_id}"
    assert f'id="fleet" aria-describedby="showing" data-stream="{stream}"' in html
    assert '<input id="q" name="q" type="search"' in html and 'aria-keyshortcuts="/"' in html
    for part in ('id="fleet-counts"', 'id="pool-strip"', 'id="showing"', 'id="fleet-rows"'):
        assert part in html, part  # what the live update swaps in
    # times carry UTC text and a UTC tooltip; the footer says so until the browser rewrites them
    j = env.submit("ping", "m1")
    env.ctl.finish(j.id)
    page = env.get(f"/jobs/{j.id}").text
    assert re.search(r'<time datetime="[^"]+Z" data-relative title="\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC">', page)
    assert re.search(r'<time datetime="[^"]+Z" data-format="time" title="[^"]+ UTC">\d\d:\d\d:\d\d</time>', page)
    assert '<span id="tz-note">times are UTC</span>' in page
