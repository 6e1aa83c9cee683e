"""
The charts' aggregates (roller/store/stats.py) on a real SQLite store with
jobs, reboot events and remediations at known times on a task.Clock, and
the C{/stats} page and fleet sparkline (roller/web/stats_html.py): each
chart with its table, the cache that recomputes at most once a minute of
the dashboard's clock, and empty history; and the history's and the
aggregates' statements giving the same answers on PostgreSQL.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from test_dashboard import Env, make_env
from twisted.internet.defer import Deferred, ensureDeferred

from roller.inventory import Machine
from roller.jobs import Job, JobEvent, State
from roller.store.history import HistoryQueries, JobQuery
from roller.store.stats import SLACK, StatsQueries
from roller.testing.postgres import postgres_server, store_path  # noqa: F401 -- fixtures
from roller.testing.syncdb import SyncClock, result_of, sync_store
from roller.web.stats_html import CACHE_SECONDS, StatsCache, day_end, hour_end

#: 2023-11-14T22:00:00Z, a whole hour; "now" is 30 minutes into the next one
HOUR = 1_699_999_200
NOW = HOUR + 3600 + 1800
SVG = "{http://www.w3.org/2000/svg}"
_n = [0]


def job(finished: float | None, state: State = State.succeeded, *, task: str = "ping", worker: str = "m1",
        group: str = "g1", created: float | None = None) -> Job:
    _n[0] += 1
    created = finished - 60 if created is None and finished is not None else (created or NOW)
    return Job(id=f"00000000-0000-7000-8000-{_n[0]:012d}", task_name=task, worker_id=worker, worker_group=group,
               created_at=created, params={}, requester="t", state=state,
               started_at=None if finished is None else created + 1, finished_at=finished)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = make_env(tmp_path)
    e.clock.advance(NOW)
    e.add_machine("m1", "g1", ip="192.0.2.1", pool="mac")
    e.add_machine("m2", "g1", ip="192.0.2.2", pool="linux")
    e.add_machine("m3", "g2", ip="192.0.2.3")
    return e


def insert(env: Env, *jobs: Job) -> list[Job]:
    # in the order they were requested, as the queue writes them
    return [result_of(env.store.jobs.insert(j)) for j in sorted(jobs, key=lambda j: j.created_at)]


def reboot(env: Env, finished: float, attempts: list[tuple[str, str, float, float]]) -> Job:
    """A reboot job whose log records each (method, outcome, started, ended) as roller.tasks.reboot does."""
    state = State.succeeded if attempts and attempts[-1][1] == "succeeded" else State.failed
    (j,) = insert(env, job(finished, state, task="reboot", created=attempts[0][2] - 5 if attempts else None))
    events = []
    for method, outcome, start, end in attempts:
        events.append(JobEvent(j.id, start, "log", f"{method}: starting", {"method": method, "step": "initiate"}))
        events.append(JobEvent(j.id, start + 1, "log", "waiting", {"method": method, "step": "waiting_for_down"}))
        events.append(JobEvent(j.id, end, "log", f"{method} {outcome}: x", {"method": method, "outcome": outcome}))
    events.append(JobEvent(j.id, finished, "state", "done", {"state": state.value}))
    result_of(env.store.jobs.add_events(events))
    return j


# -- the aggregates ------------------------------------------------------------------------


def test_jobs_per_hour_by_final_state(env: Env) -> None:
    until = HOUR + 7200  # the end of the hour in progress
    insert(env,
           job(until - 10, State.succeeded), job(until - 20, State.succeeded), job(until - 30, State.failed),
           job(HOUR + 3600, State.timed_out),  # the first second of the last hour
           job(HOUR + 3599.5, State.cancelled),  # the hour before
           job(until - 24 * 3600, State.interrupted),  # the first second of the window
           job(until - 24 * 3600 - 1, State.failed),  # just before it: left out
           job(until + 5, State.failed),  # after it
           job(None, State.running, created=HOUR), job(None, State.queued, created=HOUR + 100),  # not ended
           job(HOUR - 3600, State.failed, created=HOUR - 3600 - SLACK + 10),  # waited long, still in
           job(HOUR - 3600, State.failed, created=HOUR - 3600 - 24 * 3600 - SLACK - 10))  # waited longer: out
    b = result_of(StatsQueries(env.store).hourly(until, 24))
    assert (b.since, b.width, b.n) == (until - 24 * 3600, 3600, 24)
    assert b.counts["succeeded"][23] == 2 and b.counts["failed"][23] == 1 and b.counts["timed_out"][23] == 1
    assert b.counts["cancelled"][22] == 1 and b.counts["interrupted"][0] == 1
    assert b.counts["failed"][21] == 1  # the one that waited less than SLACK
    assert sum(b.totals) == 7 and set(b.counts) == {"succeeded", "failed", "timed_out", "cancelled", "interrupted"}
    assert all(len(v) == 24 for v in b.counts.values())


def test_failures_by_pool_and_reboot_methods(env: Env) -> None:
    until = HOUR + 7200
    insert(env, *[job(HOUR - i * 3600, State.failed, worker="m1") for i in range(3)],
           *[job(HOUR - i * 3600, State.succeeded, worker="m1") for i in range(5)],
           job(HOUR, State.timed_out, worker="m2"), job(HOUR, State.succeeded, worker="m2"),
           job(HOUR, State.failed, worker="m3", group="g2"),  # no pool
           job(HOUR, State.failed, worker="gone", group="g9"),  # no machine any more
           job(until - 8 * 86400, State.failed, worker="m2"))  # before the 7 days
    reboot(env, HOUR + 100, [("ssh_reboot", "succeeded", HOUR, HOUR + 90)])
    reboot(env, HOUR + 200, [("ssh_reboot", "succeeded", HOUR + 100, HOUR + 130)])
    reboot(env, HOUR + 300, [("ssh_reboot", "failed", HOUR + 100, HOUR + 160),
                             ("ipmi_reset", "failed", HOUR + 160, HOUR + 200),
                             ("ipmi_cycle", "succeeded", HOUR + 200, HOUR + 300)])
    reboot(env, HOUR + 400, [("snmp_reboot", "failed", HOUR + 300, HOUR + 400)])
    week = result_of(StatsQueries(env.store).week(until, day_end(NOW), 7))
    pools = {p.pool: (p.failed, p.finished) for p in week.pools}
    # the reboot jobs ran on m1 (mac): 3 succeeded, 1 failed
    assert pools == {"mac": (3 + 1, 8 + 4), "linux": (1, 2), None: (2, 2)}
    assert [p.pool for p in week.pools][0] == "mac"  # most failures first
    m = week.methods
    assert list(m)[:4] == ["ssh", "ipmi", "pdu", "redfish"]
    assert (m["ssh"].succeeded, m["ssh"].failed, m["ssh"].success_rate) == (2, 1, pytest.approx(2 / 3))
    assert m["ssh"].median_recover == 60  # 90 and 30
    assert (m["ipmi"].succeeded, m["ipmi"].failed, m["ipmi"].median_recover) == (1, 1, 100)
    assert (m["pdu"].succeeded, m["pdu"].failed, m["pdu"].median_recover) == (0, 1, None)
    assert m["redfish"].attempts == 0 and m["redfish"].success_rate is None
    assert "xen" not in m


def test_remediations_per_day(env: Env) -> None:
    today = day_end(NOW) - 86400
    for t, dry in [(today + 10, False), (today + 20, True), (today - 1, False), (today - 6 * 86400, True),
                   (today - 7 * 86400 + 5, False)]:  # the last one is 8 days back: out
        result_of(env.store.health.add_remediation(("g1", "m1"), "p", "reboot", t, dry, None, "r"))
    week = result_of(StatsQueries(env.store).week(hour_end(NOW), day_end(NOW), 7))
    r = week.remediations
    assert (r.since, r.width, r.n) == (today - 6 * 86400, 86400, 7)
    assert r.counts["remediation"] == (0, 0, 0, 0, 0, 1, 1)
    assert r.counts["dry_run"] == (1, 0, 0, 0, 0, 0, 1)


# -- the cache -----------------------------------------------------------------------------


def test_cache_recomputes_once_a_ttl_and_shares_a_computation() -> None:
    cache = StatsCache(ttl=60)
    calls: list[Deferred[int]] = []

    async def compute() -> int:
        d: Deferred[int] = Deferred()
        calls.append(d)
        return await d

    first = ensureDeferred(cache.get("k", 100.0, compute))
    second = ensureDeferred(cache.get("k", 101.0, compute))  # while the first is computed: waits for it
    assert len(calls) == 1
    calls[0].callback(7)
    assert result_of(first) == 7 and result_of(second) == 7
    assert result_of(ensureDeferred(cache.get("k", 159.9, compute))) == 7 and len(calls) == 1
    again = ensureDeferred(cache.get("k", 160.0, compute))
    assert len(calls) == 2
    calls[1].callback(8)
    assert result_of(again) == 8
    # a failure reaches every waiter and is not kept
    third = ensureDeferred(cache.get("k", 500.0, compute))
    fourth = ensureDeferred(cache.get("k", 500.0, compute))
    calls[2].errback(RuntimeError("db down"))
    for d in (third, fourth):
        failure = []
        d.addErrback(failure.append)
        assert failure and failure[0].check(RuntimeError)
    later = ensureDeferred(cache.get("k", 500.0, compute))
    assert len(calls) == 4
    calls[3].callback(9)
    assert result_of(later) == 9
    # a clock that went back does not keep a stale value for ever
    assert result_of(ensureDeferred(cache.get("k", 500.0, compute))) == 9
    ensureDeferred(cache.get("k", 100.0, compute))
    assert len(calls) == 5


# -- the page and the sparkline -------------------------------------------------------------


def svg_of(html: str, chart_id: str) -> ET.Element:
    m = re.search(rf'<svg [^>]*id="{chart_id}".*?</svg>', html, re.S)
    assert m, f"no chart {chart_id}"
    return ET.fromstring(m.group(0))


def table_rows(html: str, table_id: str) -> list[list[str]]:
    m = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', html, re.S)
    assert m, f"no table {table_id}"
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", m.group(1), re.S)]


def test_stats_page_charts_and_tables(env: Env) -> None:
    insert(env, job(NOW - 600, State.failed), job(NOW - 700, State.succeeded), job(NOW - 3 * 3600, State.failed,
                                                                                   worker="m2"))
    reboot(env, NOW - 1000, [("ssh_reboot", "succeeded", NOW - 1100, NOW - 1040)])
    result_of(env.store.health.add_remediation(("g1", "m1"), "p", "reboot", NOW - 50, False, None, "r"))
    r = env.get("/stats")
    assert r.code == 200, r.text
    html = r.text
    assert '<link rel="stylesheet" href="/static/charts.css">' in html
    assert " style=" not in html and "<style" not in html
    for chart_id in ("jobs-24h", "jobs-7d", "failures-by-pool", "reboot-success", "reboot-recover", "remediations"):
        root = svg_of(html, chart_id)
        assert root.get("role") == "img" and root.find(SVG + "title") is not None
    day = svg_of(html, "jobs-24h")
    assert [b.get("data-value") for b in day.iter(SVG + "rect") if b.get("class", "").startswith("bar ")] == \
        ["1", "2", "1"]  # 3 h ago: failed; this hour: succeeded (a ping and the reboot), failed
    desc = day.find(SVG + "desc").text
    assert desc.startswith("4 jobs ended in the 24 hours to 15 Nov 00:00 UTC: 2 succeeded, 2 failed.")
    # the table alternative: 24 hourly rows with <time>, the totals at the foot
    rows = table_rows(html, "table-day")
    assert len(rows) == 24 and rows[-1] == ["2023-11-14 23:00 UTC", "2", "1", "3"]
    assert re.search(r'<time datetime="2023-11-14T23:00:00.000Z" data-format="datetime"', html)
    assert "<summary>Table of these figures</summary>" in html
    # most failures first, then the highest rate
    assert table_rows(html, "table-pools") == [["linux", "1", "1", "100%"], ["mac", "1", "3", "33%"]]
    assert '<a href="/jobs?pool=mac&amp;state=failed&amp;state=timed_out&amp;since=' in html
    assert table_rows(html, "table-methods")[0] == ["ssh", "1", "1", "0", "100%", "60 s"]
    assert table_rows(html, "table-rem")[-1][1:] == ["1", "0", "1"]
    assert len(table_rows(html, "table-week")) == 7
    assert "Fleet health is not running in this roller" in html


def test_stats_are_cached_for_a_minute_of_the_dashboards_clock(env: Env) -> None:
    insert(env, job(NOW - 60, State.failed))
    first = env.get("/stats").text
    assert "1 jobs ended in the 24 hours" in first
    spark = re.search(r'aria-label="([^"]*)"', env.get("/").text.split('id="fleet-sparkline"', 1)[1]).group(1)
    assert spark == "Jobs per hour, last 24 hours: 1 ended (1 failed), at most 1 in one hour"
    insert(env, job(NOW - 30, State.succeeded))
    env.clock.advance(CACHE_SECONDS - 1)
    assert "1 jobs ended in the 24 hours" in env.get("/stats").text  # not recomputed yet
    assert "1 ended (1 failed)" in env.get("/").text
    env.clock.advance(1)
    assert "2 jobs ended in the 24 hours" in env.get("/stats").text
    assert "2 ended (1 failed)" in env.get("/").text


def test_empty_history(env: Env) -> None:
    r = env.get("/stats")
    assert r.code == 200
    assert r.text.count(">no data</text>") >= 4
    assert "0 jobs ended in the 24 hours" in r.text
    assert "No reboot method was attempted in the last 7 days." in r.text
    fleet = env.get("/")
    assert "Jobs per hour, last 24 hours: none ended" in fleet.text
    assert '<a class="sparkline-link" href="/stats">' in fleet.text


def test_windows() -> None:
    assert hour_end(HOUR) == HOUR + 3600 and hour_end(HOUR + 3599.9) == HOUR + 3600
    assert day_end(HOUR) % 86400 == 0 and 0 < day_end(HOUR) - HOUR <= 86400




# -- both engines ----------------------------------------------------------------------------

def test_history_and_aggregates_on_both_engines(store_path: str) -> None:
    """The same answers from SQLite and PostgreSQL: the statements are portable."""
    clock = SyncClock()
    clock.advance(NOW)
    store, _ = sync_store(store_path, clock)
    try:
        for worker, pool in (("m1", "mac"), ("m2", None)):
            result_of(store.machines.put(Machine.from_json({"worker_id": worker, "worker_group": "g1",
                                                            **({"pool": pool} if pool else {})})))
        jobs = [job(HOUR + i * 60, (State.succeeded, State.failed, State.timed_out)[i % 3],
                    worker=("m1", "m2")[i % 2], task=("ping", "reboot")[i % 2 and i % 3 == 1]) for i in range(30)]
        jobs = [result_of(store.jobs.insert(j)) for j in jobs]
        j = next(x for x in jobs if x.task_name == "reboot")
        result_of(store.jobs.add_events([
            JobEvent(j.id, HOUR + 10, "log", "s", {"method": "redfish_reboot", "step": "initiate"}),
            JobEvent(j.id, HOUR + 55, "log", "ok", {"method": "redfish_reboot", "outcome": "succeeded"})]))
        result_of(store.health.add_remediation(("g1", "m1"), "p", "reboot", NOW - 10, True, None, "r"))
        history = HistoryQueries(store)
        newest = [x.id for x in sorted(jobs, key=lambda x: x.seq, reverse=True)]
        assert [x.id for x in result_of(history.page(JobQuery(), limit=100)).jobs] == newest
        failed = result_of(history.page(JobQuery(states=("failed", "timed_out"), pool="mac"), limit=5))
        expected = [x.id for x in sorted(jobs, key=lambda x: x.seq, reverse=True)
                    if x.state in (State.failed, State.timed_out) and x.worker_id == "m1"]
        assert [x.id for x in failed.jobs] == expected[:5] and failed.older is not None
        since = result_of(history.page(JobQuery(since=HOUR + 600, until=HOUR + 1200, task="ping"), limit=100))
        assert [x.id for x in since.jobs] == [x.id for x in sorted(jobs, key=lambda x: x.seq, reverse=True)
                                              if HOUR + 600 <= x.created_at < HOUR + 1200 and x.task_name == "ping"]
        queries = StatsQueries(store)
        day = result_of(queries.hourly(hour_end(NOW), 24))
        assert sum(day.totals) == 30 and day.counts["failed"][22] == 10
        week = result_of(queries.week(hour_end(NOW), day_end(NOW), 7))
        assert {p.pool: (p.failed, p.finished) for p in week.pools} == {"mac": (10, 15), None: (10, 15)}
        assert (week.methods["redfish"].succeeded, week.methods["redfish"].median_recover) == (1, 45)
        assert week.remediations.counts["dry_run"][-1] == 1
    finally:
        result_of(store.close())


def test_the_fleet_page_shows_without_its_sparkline_when_the_figures_fail(env: Env, monkeypatch: Any) -> None:
    def broken(self: Any, until: int, hours: int = 24) -> Any:
        raise RuntimeError("the figures failed")

    monkeypatch.setattr(StatsQueries, "hourly", broken)
    r = env.get("/")
    assert r.code == 200 and "sparkline-link" not in r.text
    monkeypatch.undo()
    env.clock.advance(1)  # a failure is not cached: the next page has it
    assert "sparkline-link" in env.get("/").text
