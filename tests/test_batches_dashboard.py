"""
Batches in the dashboard (issue 15): the fleet page's selection (a checkbox
per row, "select all N machines matching this filter", the action menu),
the one confirmation page (task, count, pools, the machines left out, the
rollout limits from the configured defaults, editable), creating the batch
(audited, requester = the viewer), the batch pages and their live stream,
cancelling a batch, and the queue page's "Cancel selected".

Same in-memory harness as test_dashboard.py (real SQLite answering
synchronously, a L{Clock}, fake tasks the tests finish by hand: nothing
sleeps), with a real L{BatchService} on the same store and queue.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import pytest
from test_dashboard import BASE, Controlled, Env, NoCookies, StreamRequest, csrf_of, make_env
from test_dashboard_login import PASSWORD
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, _SynchronousProducer

from roller.auth import AnonymousAuthenticator
from roller.auth.accounts import AccountAuth, PasswordHasher, hash_password, role_scopes
from roller.batches.model import Limit, Rollout
from roller.batches.service import BatchService
from roller.jobs import State
from roller.queue import JobQueue
from roller.store.loans import Loan
from roller.tasks import TaskRegistry
from roller.tasks.base import TaskFailed
from roller.testing.syncdb import _NonThreadPool, result_of, run, sync_store
from roller.web.api import Api
from roller.web.dashboard import Dashboard
from roller.web.events import EventHub
from roller.web.site import root_resource

P = "project:releng:roller:"
ORIGIN = {"Origin": BASE}
DEFAULTS = Rollout(max_concurrent=Limit(2), max_per_pool=Limit(50, percent=True), stop_after_failures=3)


@attrs.define
class BEnv(Env):
    batches: Any = None  # the BatchService


def make(tmp_path: Path, *, page_size: int = 200, users: dict[str, str] | None = None) -> Any:
    store, clock = sync_store(str(tmp_path / "dash.db"))
    ctl = Controlled()
    tasks = TaskRegistry([ctl.task("reboot", destructive=True), ctl.task("ping"), ctl.task("loan")])
    queue = JobQueue(store, tasks, clock)
    hub = EventHub(queue, clock, stream="abc", heartbeat_interval=15.0)
    hub.start()
    run(queue.start())
    batches = BatchService(store, queue, tasks, clock, defaults=DEFAULTS)
    run(batches.start())
    api = Api(store, queue, tasks, AnonymousAuthenticator(), allowed_tasks=("reboot", "ping"), clock=clock)
    kw: dict[str, Any] = {}
    if users is not None:
        kw["auth"] = AccountAuth(store.users, clock, PasswordHasher(clock, _NonThreadPool(), ln=10), scope_prefix=P,
                                 tasks=("reboot", "ping"), session_idle=3600.0, session_max=86400.0)
    dashboard = Dashboard(store, queue, tasks, ("reboot", "ping"), clock=clock, hub=hub, batches=batches,
                          page_size=page_size, **kw)
    agent = RequestTraversalAgent(root_resource(api, dashboard, hub))
    client = HTTPClient(agent, cookiejar=NoCookies(), data_to_body_producer=_SynchronousProducer)
    e = BEnv(store, clock, ctl, queue, hub, dashboard, client, agent, batches=batches)
    clock.advance(1_700_000_000)
    for name, role in (users or {}).items():
        result_of(store.users.add(name, role, hash_password(PASSWORD, ln=10), clock.seconds()))
    return e


def fleet(e: Any) -> None:
    """Seven machines: five in pool mac (one loaned, one in maintenance), two in linux."""
    for i in range(1, 6):
        e.add_machine(f"mac{i}", "g1", ip=f"192.0.2.{i}", pool="mac")
    e.add_machine("lin1", "g2", ip="192.0.2.21", pool="linux")
    e.add_machine("lin2", "g2", ip="192.0.2.22", pool="linux")
    now = e.clock.seconds()
    result_of(e.store.loans.insert(Loan("g1", "mac4", "dev@example.com", "debugging", now, now + 86400)))
    result_of(e.store.health.set_maintenance(("g1", "mac5"), True, "disk swap", now))


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = make(tmp_path, page_size=3)
    fleet(e)
    return e


def sign_in(e: Any, name: str) -> None:
    r = e.get("/login")
    token = csrf_of(r.text)
    r = e.post("/login", form={"csrf_token": token, "next": "/", "user": name, "password": PASSWORD})
    assert r.code == 303, r.text


def post_form(e: Any, path: str, fields: list[tuple[str, str]]) -> Any:
    """A form with repeated fields (checkboxes), as a browser sends it."""
    from urllib.parse import urlencode
    return e.request("POST", path, body=urlencode(fields).encode(),
                     headers={"Content-Type": "application/x-www-form-urlencoded", **ORIGIN})


def texts(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


# -- the fleet page ------------------------------------------------------------------------------------


def test_fleet_rows_have_checkboxes_and_the_action_menu_lists_the_tasks(env: Any) -> None:
    html = env.get("/?pool=mac").text
    assert 'action="/batches"' in html and 'id="batch-form"' in html
    assert re.findall(r'name="m" value="([^"]+)"', html) == ["g1/mac1", "g1/mac2", "g1/mac3"]  # page 1 of 2
    assert 'aria-label="Select mac1"' in html and 'id="pick-page"' in html
    assert re.findall(r'<option value="(\w+)">\1</option>', html.split('id="batch-task"')[1].split("</select>")[0]) \
        == ["reboot", "ping"]  # the allowed tasks, not "loan"
    assert "Select all 5 machines matching this filter" in html
    assert '<input type="hidden" name="f_pool" value="mac">' in html
    assert 'href="/batches"' in html  # the nav
    # without a filter there is nothing to "select all" by: a batch never takes the whole fleet by accident
    html = env.get("/").text
    assert 'name="m"' in html and "matching this filter" not in html and "Filter the fleet" in html


def test_a_viewer_sees_no_selection_and_its_posts_are_refused(tmp_path: Path) -> None:
    e = make(tmp_path, users={"vic": "viewer", "olga": "operator"})
    fleet(e)
    sign_in(e, "vic")
    html = e.get("/?pool=mac").text
    assert 'name="m"' not in html and 'id="batch-form"' not in html and "batch-task" not in html
    token = csrf_of(html)
    r = post_form(e, "/batches", [("csrf_token", token), ("task", "ping"), ("m", "g1/mac1")])
    assert r.code == 403 and "batches:create" in r.text or P + "ping" in r.text
    r = post_form(e, "/batches", [("csrf_token", token), ("task", "ping"), ("m", "g1/mac1"), ("confirm", "yes")])
    assert r.code == 403
    assert result_of(e.store.batches.list(limit=10)) == []
    # an operator holds batches:create with its tasks
    assert P + "batches:create" in role_scopes("operator", P, ("ping",))
    assert P + "batches:create" not in role_scopes("viewer", P)
    e.post("/logout", form={"csrf_token": csrf_of(e.get("/").text)}, headers=ORIGIN)
    sign_in(e, "olga")
    html = e.get("/?pool=mac").text
    assert 'id="batch-form"' in html
    r = post_form(e, "/batches", [("csrf_token", csrf_of(html)), ("task", "ping"), ("m", "g1/mac1"),
                                  ("confirm", "yes")])
    assert r.code == 303 and r.header("location").startswith("/batches/")
    view = run(e.batches.view(r.header("location").rsplit("/", 1)[1]))
    assert view["requester"] == "user:olga"


def test_posts_without_a_valid_csrf_token_do_nothing(env: Any) -> None:
    env.get("/")  # the CSRF cookie
    for token in ("", "v1.1.forged"):
        r = post_form(env, "/batches", [("csrf_token", token), ("task", "ping"), ("m", "g1/mac1"), ("confirm", "yes")])
        assert r.code == 403 and "security token" in r.text
    assert result_of(env.store.batches.list(limit=10)) == []
    job = env.submit("ping", "mac1", "g1")
    r = post_form(env, "/queue/cancel", [("csrf_token", ""), ("job", job.id)])
    assert r.code == 403 and env.queue.active(job.id) is not None


# -- the confirmation page ---------------------------------------------------------------------------------


def confirm_page(e: Any, fields: list[tuple[str, str]]) -> Any:
    token = csrf_of(e.get("/").text)
    return post_form(e, "/batches", [("csrf_token", token), *fields])


def test_confirmation_names_task_count_pools_excluded_and_limits(env: Any) -> None:
    r = confirm_page(env, [("task", "reboot"), ("all", "1"), ("f_q", "192.0.2.")])
    assert r.code == 200, r.text
    text = texts(r.text)
    assert "Run reboot on 5 machines?" in text  # 7 match, the loaned and the one in maintenance are left out
    assert "(7 selected, 2 left out: see below)" in text
    pools = r.text.split('id="pools-h"')[1].split("</table>")[0]
    # pool, members in this batch, machines in the pool, at most at once (50% of the pool's machines)
    assert re.search(r">linux</th><td>2</td><td>2</td><td>1</td>", pools)
    assert re.search(r">mac</th><td>3</td><td>5</td><td>2</td>", pools)
    excluded = texts(r.text.split('id="excluded-h"')[1].split("</table>")[0])
    assert "mac4 g1 loaned" in excluded and "mac5 g1 maintenance" in excluded
    # the limits, prefilled from the configured defaults, editable
    assert 'name="max_concurrent" value="2"' in r.text and 'name="max_per_pool" value="50%"' in r.text
    assert 'name="stop_after_failures" value="3"' in r.text
    assert "Yes, run reboot on 5 machines" in r.text and 'class="danger"' in r.text
    assert '<input type="hidden" name="all" value="1">' in r.text
    assert '<input type="hidden" name="f_q" value="192.0.2.">' in r.text
    assert result_of(env.store.batches.list(limit=10)) == [] and not env.queue.queued()  # nothing done yet
    # recalculating with other limits and the loaned machine included
    r = confirm_page(env, [("task", "reboot"), ("all", "1"), ("f_q", "192.0.2."), ("max_concurrent", "10%"),
                           ("max_per_pool", "1"), ("stop_after_failures", ""), ("include_loaned", "1")])
    assert "Run reboot on 6 machines?" in texts(r.text)
    assert 'name="max_concurrent" value="10%"' in r.text and 'name="max_per_pool" value="1"' in r.text
    assert 'name="stop_after_failures" value=""' in r.text and 'id="include_loaned" name="include_loaned" ' \
        'value="1" checked' in r.text
    # limits it cannot take: the page again, saying why; nothing created
    r = confirm_page(env, [("task", "reboot"), ("all", "1"), ("f_q", "192.0.2."), ("max_concurrent", "lots"),
                           ("max_per_pool", ""), ("stop_after_failures", ""), ("confirm", "yes")])
    assert r.code == 400 and "rollout.max_concurrent must be a count" in r.text and 'value="lots"' in r.text
    assert result_of(env.store.batches.list(limit=10)) == []


def test_ticked_machines_and_bad_selections(env: Any) -> None:
    r = confirm_page(env, [("task", "ping"), ("m", "g1/mac1"), ("m", "g2/lin1"), ("m", "g1/mac4")])
    assert r.code == 200
    text = texts(r.text)
    assert "Run ping on 2 machines?" in text and "the 3 machines you ticked" in text and "mac4 g1 loaned" in text
    assert re.findall(r'<input type="hidden" name="m" value="([^"]+)">', r.text) == ["g1/mac1", "g2/lin1", "g1/mac4"]
    r = confirm_page(env, [("task", "ping")])
    assert r.code == 400 and "No machine was selected" in r.text
    r = confirm_page(env, [("task", "ping"), ("all", "1")])
    assert r.code == 400 and "needs a filter" in r.text
    r = confirm_page(env, [("task", "loan"), ("m", "g1/mac1")])
    assert r.code == 400 and "not a task this roller runs" in r.text
    r = confirm_page(env, [("task", "ping"), ("m", "g1/mac4")])
    assert r.code == 200 and "Nothing to run" in r.text and "Yes, run" not in r.text
    r = confirm_page(env, [("task", "ping"), ("m", "g1/mac4"), ("confirm", "yes")])
    assert r.code == 400 and "excluded" in r.text  # empty_selection, readable


def test_select_all_matching_uses_the_filter_not_the_visible_page(env: Any) -> None:
    page = env.get("/?pool=mac").text
    assert re.findall(r'name="m" value="([^"]+)"', page) == ["g1/mac1", "g1/mac2", "g1/mac3"]
    # the browser sends the ticked rows of page 1 too: "all" wins, and the selector is the filter
    r = post_form(env, "/batches", [("csrf_token", csrf_of(page)), ("f_pool", "mac"), ("task", "ping"),
                                    ("all", "1"), ("m", "g1/mac1"), ("m", "g1/mac2"), ("m", "g1/mac3")])
    assert "Run ping on 3 machines?" in texts(r.text)  # mac1-3 (mac4 loaned, mac5 in maintenance)
    assert 'name="m"' not in r.text.split('class="batch-confirm"')[1]  # only the filter is carried on
    env.add_machine("mac6", "g1", pool="mac")  # joins the pool before the confirmation
    fields = re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', r.text)
    r = post_form(env, "/batches", [*fields, ("max_concurrent", "1"), ("max_per_pool", ""),
                                    ("stop_after_failures", ""), ("reason", "OS update"), ("confirm", "yes")])
    assert r.code == 303, r.text
    batch_id = r.header("location").rsplit("/", 1)[1]
    view = run(env.batches.view(batch_id))
    assert view["selector"] == {"pool": "mac"} and view["total"] == 4
    assert [m["worker_id"] for m in view["members"]] == ["mac1", "mac2", "mac3", "mac6"]
    assert view["rollout"]["max_concurrent"] == 1 and view["rollout"]["max_per_pool"] is None
    assert view["rollout"]["stop_after_failures"] is None and view["reason"] == "OS update"
    assert view["requester"] == "dashboard:local"
    entry = [a for a in env.audit() if a.action == "batch.create:ping"][0]
    assert entry.target == f"batch/{batch_id}" and entry.actor == "dashboard:local"
    assert entry.params["via"] == "dashboard" and entry.params["selector"] == {"pool": "mac"}
    # each member is an ordinary job carrying the batch id, one at a time (max_concurrent 1)
    env.clock.advance(0)
    assert [j.batch_id for j in env.queue.running()] == [batch_id]


# -- the batch pages -------------------------------------------------------------------------------------


def create(e: Any, task: str, machines: list[str], **limits: str) -> str:
    fields = [("task", task), *[("m", m) for m in machines], ("confirm", "yes"),
              *[(k, v) for k, v in limits.items()]]
    r = confirm_page(e, fields)
    assert r.code == 303, r.text
    e.clock.advance(0)
    return r.header("location").rsplit("/", 1)[1]


def finish_running(e: Any, value: Any = "ok") -> int:
    n = 0
    for job in e.queue.running():
        e.ctl.finish(job.id, value)
        n += 1
    e.clock.advance(0)
    e.clock.advance(0)
    return n


def test_batch_page_shows_progress_counts_members_and_ends(env: Any) -> None:
    batch_id = create(env, "ping", ["g1/mac1", "g1/mac2", "g2/lin1"], max_concurrent="2", max_per_pool="",
                      stop_after_failures="")
    html = env.get(f"/batches/{batch_id}").text
    assert "ping on 3 machines" in html and "dashboard:local" in html
    assert '<progress id="batch-progress" max="3" value="0">' in html
    assert re.search(r'id="count-running" class="count-item">.*?<strong>2</strong>', html)
    assert re.search(r'id="count-pending" class="count-item">.*?<strong>1</strong>', html)
    rows = re.findall(r'<tr id="member-(\d)">(.*?)</tr>', html, re.S)
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert all('href="/jobs/' in r[1] for r in rows[:2]) and "state-pending" in rows[2][1]
    assert f'data-stream="/events?batch={batch_id}"' in html and 'id="batch-cancel"' in html
    assert "at most 2 at once (2)" in texts(html)
    finish_running(env)
    finish_running(env, TaskFailed("no answer"))
    html = env.get(f"/batches/{batch_id}").text
    assert '<progress id="batch-progress" max="3" value="3">' in html and "state-failed" in html
    assert "no answer" in html and "data-stream" not in html and 'id="batch-cancel"' not in html
    listing = env.get("/batches").text
    assert f'href="/batches/{batch_id}"' in listing and "ping" in listing and "100%" in listing
    assert env.get("/batches/nope").code == 404 and env.get("/batches/a%2Fb").code == 404


def test_cancel_a_batch_from_its_page(env: Any) -> None:
    batch_id = create(env, "ping", ["g1/mac1", "g1/mac2", "g1/mac3"], max_concurrent="1", max_per_pool="",
                      stop_after_failures="")
    page = env.get(f"/batches/{batch_id}").text
    running = env.queue.running()[0]
    r = post_form(env, f"/batches/{batch_id}/cancel", [("csrf_token", csrf_of(page)), ("running", "1")])
    assert r.code == 303 and r.header("location") == f"/batches/{batch_id}?cancelled=1"
    env.clock.advance(0)
    view = run(env.batches.view(batch_id))
    assert view["state"] == "cancelled" and view["counts"]["skipped"] == 2 and view["counts"]["cancelled"] == 1
    assert result_of(env.store.jobs.get(running.id)).state is State.cancelled
    html = env.get(r.header("location")).text
    assert "Cancel requested" in html and "cancelled by dashboard:local" in html
    entry = [a for a in env.audit() if a.action == "batch.cancel"][0]
    assert entry.target == f"batch/{batch_id}" and entry.params == {"running": True, "via": "dashboard"}
    r = post_form(env, f"/batches/{batch_id}/cancel", [("csrf_token", csrf_of(page))])
    assert r.code == 409 and "already ended" in r.text


def test_batch_stream_sends_the_view_then_changes_and_ends_with_the_batch(env: Any) -> None:
    batch_id = create(env, "ping", ["g1/mac1", "g1/mac2", "g2/lin1"], max_concurrent="1", max_per_pool="",
                      stop_after_failures="")
    first = StreamRequest()
    env.hub.attach_batch(first, batch_id)
    frames = [f for f in first.frames() if "data" in f]
    assert frames[0]["data"]["full"] is True and frames[0]["data"]["batch"]["counts"]["running"] == 1
    assert [m["state"] for m in frames[0]["data"]["members"]] == ["running", "pending", "pending"]
    finish_running(env)
    deltas = [f["data"] for f in first.frames() if "data" in f][1:]
    assert deltas and not any(d["full"] for d in deltas) and deltas[-1]["batch"]["counts"]["succeeded"] == 1
    changed = [(m["position"], m["state"]) for d in deltas for m in d["members"]]
    assert changed == [(0, "succeeded"), (1, "running")] or changed == [(0, "succeeded"), (1, "queued"),
                                                                          (1, "running")]
    # a page opened mid-run gets the batch as it is now
    late = StreamRequest()
    env.hub.attach_batch(late, batch_id)
    snap = [f for f in late.frames() if "data" in f][0]["data"]
    assert [m["state"] for m in snap["members"]] == ["succeeded", "running", "pending"]
    finish_running(env)
    finish_running(env)
    for req in (first, late):
        last = req.frames()[-2:]
        assert last[0]["data"]["batch"]["state"] == "succeeded" and last[0]["data"]["batch"]["progress"] == 1.0
        assert last[1]["event"] == "end" and req.finished
    assert env.hub.client_count == 0
    # a finished batch: its view, and the end, at once
    done = StreamRequest()
    env.hub.attach_batch(done, batch_id)
    assert [f.get("event") for f in done.frames() if "data" in f] == [None, "end"] and done.finished
    # over HTTP: bad ids are refused as JSON
    r = env.get("/events?batch=a%20b")
    assert r.code == 400 and b"invalid_query" in r.body


def test_without_a_batch_service_there_is_no_selection_and_no_batch_pages(tmp_path: Path) -> None:
    e = make_env(tmp_path)
    e.add_machine("m1", "g1", pool="mac")
    html = e.get("/?pool=mac").text
    assert 'name="m"' not in html and 'id="batch-form"' not in html and 'href="/batches"' not in html
    assert e.get("/batches").code == 404 and e.get("/batches/x").code == 404
    r = e.get("/events?batch=x")
    assert r.code == 404 and b"not_found" in r.body


# -- the queue page: cancel a selection ---------------------------------------------------------------------


def test_queue_cancels_a_selection_and_says_what_became_of_each(env: Any) -> None:
    running = env.submit("reboot", "mac1", "g1")
    queued = env.submit("ping", "mac1", "g1")
    other = env.submit("ping", "lin1", "g2")
    env.ctl.finish(other.id)  # ended before the cancel reaches it
    env.clock.advance(0)
    page = env.get("/queue").text
    assert f'name="job" value="{running.id}" form="cancel-selected"' in page
    assert f'name="job" value="{queued.id}" form="cancel-selected"' in page
    assert 'action="/queue/cancel"' in page and "Cancel selected" in page
    r = post_form(env, "/queue/cancel", [("csrf_token", csrf_of(page)), ("job", running.id), ("job", queued.id),
                                         ("job", other.id)])
    assert r.code == 200, r.text
    summary = texts(r.text.split('id="summary-h"')[1].split("</section>")[0])
    assert "2 cancelled, 1 had already ended" in summary
    assert "reboot on mac1" in summary and "ping on lin1" in summary and "succeeded" in summary
    assert "Nothing is running." in r.text and "Nothing is waiting." in r.text
    for job in (running, queued):
        assert result_of(env.store.jobs.get(job.id)).state is State.cancelled
    cancels = sorted(a.result for a in env.audit() if a.action == "job.cancel")
    assert cancels == sorted([f"cancelled {running.id}", f"cancelled {queued.id}"])
    r = post_form(env, "/queue/cancel", [("csrf_token", csrf_of(page))])
    assert r.code == 400 and "No job was selected" in r.text
    r = post_form(env, "/queue/cancel", [("csrf_token", csrf_of(page)), ("job", "not/an id")])
    assert r.code == 400


def test_viewer_cannot_cancel_a_selection(tmp_path: Path) -> None:
    e = make(tmp_path, users={"vic": "viewer"})
    fleet(e)
    job = e.submit("ping", "mac1", "g1")
    sign_in(e, "vic")
    page = e.get("/queue").text
    assert "cancel-selected" not in page and 'name="job"' not in page
    r = post_form(e, "/queue/cancel", [("csrf_token", csrf_of(page)), ("job", job.id)])
    assert r.code == 403 and "jobs:cancel" in r.text
    assert e.queue.active(job.id) is not None
