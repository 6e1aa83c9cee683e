"""
The job history: its queries (roller/store/history.py: every filter, keyset
paging without duplicates or gaps, the bounded walk of filters without an
index, the time-to-seq binary search) on a real SQLite store, and the
C{/jobs} page (roller/web/history_html.py) through the composed site: rows
and their links, filters kept in the form, the "older" link to the end,
every bad value a 400 page saying why; and job ids in the audit log as
links.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from test_dashboard import Env, make_env

from roller.errors import BadRequest
from roller.jobs import Job, State
from roller.store import AuditEntry
from roller.store.history import SPAN, HistoryQueries, JobQuery, JobRow, first_seq_at
from roller.testing.syncdb import result_of
from roller.web import history_html
from roller.web.history_html import parse_time

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
STATES = [State.succeeded, State.failed, State.timed_out, State.cancelled, State.interrupted, State.succeeded]
MACHINES = [("g1", "m1", "mac"), ("g1", "m2", "mac"), ("g2", "m3", "linux"), ("g2", "m1", None)]


def job(i: int, created: float, **kw: Any) -> Job:
    group, worker, _ = MACHINES[i % len(MACHINES)]
    state = STATES[i % len(STATES)]
    fields: dict[str, Any] = dict(
        id=f"00000000-0000-7000-8000-{i:012d}", task_name=("reboot", "ping", "loan")[i % 3], worker_id=worker,
        worker_group=group, created_at=created, params={}, requester=("alice", "bob", "roller/health")[i % 3 - 1],
        state=state, started_at=created + 1, finished_at=created + 30, result="ok" if state is State.succeeded
        else None, error=None if state is State.succeeded else f"error of job {i}",
        batch_id="batch-a" if i % 5 == 0 else ("batch-b" if i % 5 == 1 else None))
    fields.update(kw)
    return Job(**fields)


def pool_of(j: Job) -> str | None:
    return {(g, w): p for g, w, p in MACHINES}[(j.worker_group, j.worker_id)]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = make_env(tmp_path)
    e.clock.advance(T0)
    for group, worker, pool in MACHINES:
        e.add_machine(worker, group, ip="192.0.2.9", **({"pool": pool} if pool else {}))
    return e


def insert(env: Env, jobs: list[Job]) -> list[Job]:
    return [result_of(env.store.jobs.insert(j)) for j in jobs]


@pytest.fixture
def history(env: Env) -> list[Job]:
    """120 finished jobs, one every 10 minutes over 20 hours (several at the same second too)."""
    jobs = [job(i, T0 - 20 * 3600 + (i // 2) * 1200) for i in range(120)]
    return insert(env, jobs)


def page(env: Env, q: JobQuery, limit: int = 1000, max_scan: int = 1_000_000) -> Any:
    return result_of(HistoryQueries(env.store).page(q, limit=limit, max_scan=max_scan))


def newest_first(jobs: list[Job]) -> list[str]:
    return [j.id for j in sorted(jobs, key=lambda j: j.seq or 0, reverse=True)]


# -- the queries -------------------------------------------------------------------------


def test_first_seq_at_matches_a_scan(env: Env) -> None:
    assert result_of(env.store.db.read(first_seq_at, T0)) == 1  # no job at all
    jobs = insert(env, [job(i, T0 + (i // 3) * 10.0) for i in range(90)])
    # holes in seq, as retention leaves them
    result_of(env.store.db.write(lambda c: c.execute("DELETE FROM jobs WHERE seq % 4 = 0 OR seq BETWEEN 40 AND 55")))
    left = sorted((j for j in jobs if not (j.seq % 4 == 0 or 40 <= j.seq <= 55)), key=lambda j: j.seq)
    for when in [T0 - 5, T0, T0 + 1, T0 + 10, T0 + 95, T0 + 130, T0 + 175, T0 + 290, T0 + 300, T0 + 10_000]:
        got = result_of(env.store.db.read(first_seq_at, when))
        first = next((j for j in left if j.created_at >= when), None)
        # every job at or after `when` has seq >= got, every earlier one has seq < got
        assert all(j.seq >= got for j in left if j.created_at >= when)
        assert all(j.seq < got for j in left if j.created_at < when)
        if first is None:
            assert got > left[-1].seq


FILTERS: list[tuple[dict[str, Any], Any]] = [
    ({}, lambda j: True),
    ({"states": ("failed",)}, lambda j: j.state is State.failed),
    ({"states": ("failed", "timed_out", "interrupted")}, lambda j: j.state.value in ("failed", "timed_out", "interrupted")),
    ({"task": "reboot"}, lambda j: j.task_name == "reboot"),
    ({"task": "nope"}, lambda j: False),
    ({"pool": "mac"}, lambda j: pool_of(j) == "mac"),
    ({"pool": "linux", "states": ("succeeded",)}, lambda j: pool_of(j) == "linux" and j.state is State.succeeded),
    ({"group": "g2"}, lambda j: j.worker_group == "g2"),
    ({"worker": "m1"}, lambda j: j.worker_id == "m1"),
    ({"worker": "m1", "group": "g2"}, lambda j: (j.worker_group, j.worker_id) == ("g2", "m1")),
    ({"requester": "roller/health"}, lambda j: j.requester == "roller/health"),
    ({"batch": "batch-a"}, lambda j: j.batch_id == "batch-a"),
    ({"batch": "batch-b", "task": "ping"}, lambda j: j.batch_id == "batch-b" and j.task_name == "ping"),
    ({"since": T0 - 10 * 3600}, lambda j: j.created_at >= T0 - 10 * 3600),
    ({"until": T0 - 10 * 3600}, lambda j: j.created_at < T0 - 10 * 3600),
    ({"since": T0 - 15 * 3600, "until": T0 - 5 * 3600 + 1, "task": "loan"},
     lambda j: T0 - 15 * 3600 <= j.created_at < T0 - 5 * 3600 + 1 and j.task_name == "loan"),
    ({"since": T0 + 1}, lambda j: False),
]


@pytest.mark.parametrize("filters,matches", FILTERS, ids=[repr(f) for f, _ in FILTERS])
def test_every_filter(env: Env, history: list[Job], filters: dict[str, Any], matches: Any) -> None:
    expected = newest_first([j for j in history if matches(j)])
    got = page(env, JobQuery(**filters))
    assert [j.id for j in got.jobs] == expected
    assert got.older is None and got.searched_to is None
    if expected:  # the jobs come back whole
        first = next(j for j in history if j.id == got.jobs[0].id)
        assert got.jobs[0] == JobRow.of(first)


@pytest.mark.parametrize("filters", [{}, {"states": ("failed", "succeeded")}, {"task": "ping"}, {"pool": "mac"},
                                     {"worker": "m1", "group": "g1"}, {"requester": "alice", "since": T0 - 12 * 3600}])
@pytest.mark.parametrize("max_scan", [1_000_000, 17])
def test_keyset_pages_have_no_duplicates_or_gaps(env: Env, history: list[Job], filters: dict[str, Any],
                                                 max_scan: int) -> None:
    expected = [j.id for j in page(env, JobQuery(**filters)).jobs]
    seen: list[str] = []
    before = None
    for _ in range(200):
        got = page(env, JobQuery(**filters, before=before), limit=7, max_scan=max_scan)
        assert len(got.jobs) <= 7
        seen += [j.id for j in got.jobs]
        if before is None:  # new jobs arriving meanwhile do not shift the older pages
            insert(env, [job(1000 + len(seen), T0 + len(seen), task_name="ping", worker_id="m1", worker_group="g1")])
        if got.older is None:
            break
        assert before is None or got.older < before
        before = got.older
    assert seen == expected and len(set(seen)) == len(seen)


def test_a_filter_without_an_index_looks_at_a_bounded_number_of_jobs(env: Env, history: list[Job]) -> None:
    rare = [j for j in history if j.task_name == "loan" and j.worker_group == "g2"]
    q = JobQuery(task="loan", group="g2")
    first = page(env, q, limit=100, max_scan=50)
    newest_50 = sorted(history, key=lambda j: j.seq or 0)[-50:]
    assert [j.id for j in first.jobs] == newest_first([j for j in newest_50 if j in rare])
    assert all(isinstance(j, JobRow) for j in first.jobs)
    # it stopped short: it says how far back it looked, and the cursor continues from there
    assert first.older == newest_50[0].seq
    assert first.searched_to == newest_50[0].created_at
    rest = page(env, JobQuery(task="loan", group="g2", before=first.older), limit=100, max_scan=1000)
    assert [j.id for j in first.jobs + rest.jobs] == newest_first(rare) and rest.older is None
    # an indexed filter (one machine, one worker id) is not bounded: one statement finds all of them
    machine = page(env, JobQuery(worker="m3", group="g2"), limit=100, max_scan=5)
    assert len(machine.jobs) == 30 and machine.older is None and machine.searched_to is None
    worker = page(env, JobQuery(worker="m1", task="ping"), limit=100, max_scan=5)
    assert [j.id for j in worker.jobs] == newest_first([j for j in history if j.worker_id == "m1"
                                                        and j.task_name == "ping"])
    assert worker.searched_to is None
    assert SPAN >= 1000


def test_empty_history(env: Env) -> None:
    got = page(env, JobQuery(task="ping", since=T0 - 100))
    assert got.jobs == [] and got.older is None


# -- times -------------------------------------------------------------------------------


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_parse_time() -> None:
    assert parse_time("since", "2026-03-01") == ts("2026-03-01T00:00:00+00:00")
    assert parse_time("until", "2026-03-01", end_of_day=True) == ts("2026-03-02T00:00:00+00:00")
    assert parse_time("since", "2026-03-01T08:30") == ts("2026-03-01T08:30:00+00:00")
    assert parse_time("since", "2026-03-01 08:30:15") == ts("2026-03-01T08:30:15+00:00")
    assert parse_time("since", "2026-03-01T08:30Z") == ts("2026-03-01T08:30:00+00:00")
    assert parse_time("since", "2026-03-01T08:30+01:00") == ts("2026-03-01T07:30:00+00:00")
    assert parse_time("until", "2026-03-01T08:30", end_of_day=True) == ts("2026-03-01T08:30:00+00:00")
    for bad in ("yesterday", "2026-02-30", "2026-13-01T00:00", "1700000000", "2026-03-01T25:00", "x" * 50):
        with pytest.raises(BadRequest) as e:
            parse_time("since", bad)
        assert e.value.message.startswith("since ")


# -- the page ----------------------------------------------------------------------------


def rows(html: str) -> list[str]:
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0] if "<tbody>" in html else ""
    return re.findall(r'<a href="/jobs/([-0-9a-f]+)">', body)


def test_page_lists_jobs_with_their_links(env: Env, history: list[Job]) -> None:
    queued = env.submit("ping", "m3", group="g2", requester="carol")  # starts running at once
    r = env.get("/jobs")
    assert r.code == 200, r.text
    assert r.header("content-security-policy") and "<style" not in r.text and " style=" not in r.text
    ids = rows(r.text)
    assert ids == [queued.id, *newest_first(history)[:99]]
    assert '<link rel="stylesheet" href="/static/charts.css">' in r.text
    newest = max(history, key=lambda j: j.seq or 0)
    assert f'<a href="/jobs/{newest.id}"><code>{newest.id[-8:]}</code>' in r.text
    assert f'<a href="/machines/{newest.worker_group}/{newest.worker_id}">{newest.worker_id}</a>' in r.text
    assert '<a href="/batches/batch-a">' in r.text
    assert f'<time datetime="{datetime.fromtimestamp(newest.created_at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")}"' in r.text
    assert "error of job" in r.text and "carol" in r.text
    assert 'class="state state-running"' in r.text  # as the queue has it now, not as stored
    # the older link goes on from the last row, keeping the filters, to the end
    older = re.search(r'<a href="([^"]+)" rel="next">Older', r.text)
    assert older is not None
    url = older.group(1).replace("&amp;", "&")
    second = env.get(url)
    assert second.code == 200
    assert rows(second.text) == newest_first(history)[99:]
    assert 'rel="next"' not in second.text and '<a href="/jobs">← Newest</a>' in second.text


def test_page_filters_stay_in_the_form(env: Env, history: list[Job]) -> None:
    query = [("state", "failed"), ("state", "timed_out,interrupted"), ("task", "ping"), ("pool", "mac"),
             ("since", "2023-11-14")]
    r = env.get("/jobs?" + urlencode(query))
    assert r.code == 200, r.text
    since = datetime(2023, 11, 14, tzinfo=UTC).timestamp()
    expected = newest_first([j for j in history if j.state.value in ("failed", "timed_out", "interrupted")
                             and j.task_name == "ping" and pool_of(j) == "mac" and j.created_at >= since])
    assert expected and rows(r.text) == expected
    for s in ("failed", "timed_out", "interrupted"):
        assert f'value="{s}" checked' in r.text
    assert 'value="succeeded" checked' not in r.text
    assert '<option value="ping" selected>' in r.text
    assert 'name="pool" value="mac"' in r.text and 'name="since" value="2023-11-14"' in r.text
    assert "Showing jobs: failed or timed out or interrupted, task ping, pool mac, since 2023-11-14" in r.text
    assert '<a href="/jobs">Clear</a>' in r.text
    # one machine's jobs (the machine page links here): a link back to the machine
    r = env.get("/jobs?group=g2&worker=m1")
    assert rows(r.text) == newest_first([j for j in history if (j.worker_group, j.worker_id) == ("g2", "m1")])
    assert '(<a href="/machines/g2/m1">machine page</a>)' in r.text
    # batch and requester
    assert rows(env.get("/jobs?batch=batch-b").text) == newest_first([j for j in history if j.batch_id == "batch-b"])
    assert rows(env.get("/jobs?requester=roller%2Fhealth").text) == newest_first(
        [j for j in history if j.requester == "roller/health"])[:100]
    nothing = env.get("/jobs?task=reboot&state=queued")
    assert nothing.code == 200 and "No job matches these filters." in nothing.text


def test_page_says_where_a_bounded_search_stopped(env: Env, history: list[Job], monkeypatch: Any) -> None:
    monkeypatch.setattr(history_html, "MAX_SCAN", 40)
    r = env.get("/jobs?requester=nobody")  # no index: a bounded walk
    assert r.code == 200
    assert "No match among the jobs requested since" in r.text and "Search older jobs" in r.text
    link = re.search(r'<a href="([^"]+)">Search older jobs', r.text).group(1).replace("&amp;", "&")
    assert parse_qs(urlsplit(link).query)["requester"] == ["nobody"]
    assert 'rel="next"' not in r.text
    # a task has an index (jobs_task_state): one with no jobs is answered at once, completely
    r = env.get("/jobs?task=nope-task")
    assert "No job matches these filters." in r.text and "Search older jobs" not in r.text


BAD = [
    ("state=bogus", "state 'bogus' is not a job state"),
    ("state=failed,nope", "state 'nope' is not a job state"),
    ("task=re%20boot", "task must be a task name"),
    ("pool=" + "p" * 65, "pool must be a pool name"),
    ("pool=a%20b", "pool must be a pool name"),
    ("group=g%2F1", "group must be a worker group name"),
    ("worker=m%3B1", "worker must be a worker id"),
    ("requester=" + "r" * 201, "requester must be at most 200 characters"),
    ("requester=a%00b", "requester must be at most 200 characters, without control characters"),
    ("batch=b%2F1", "batch must be a batch id"),
    ("since=yesterday", "since 'yesterday' is not an ISO-8601 date or date-time"),
    ("until=2026-02-30", "until '2026-02-30' is not a date"),
    ("since=2026-03-02&until=2026-03-01", "since (2026-03-02) must be before until (2026-03-01)"),
    ("until=9999-12-31", "until '9999-12-31' is out of range"),
    ("since=9999-12-31T23:59:59-23:00", None),
    ("since=0001-01-01&until=0001-01-02", None),
    ("before=-1", "before must be a job number"),
    ("before=abc", "before must be a job number"),
    ("state=%FF", "query parameter state is not valid UTF-8"),
]


@pytest.mark.parametrize("query,message", BAD, ids=[q[:30] for q, _ in BAD])
def test_bad_values_are_400_pages(env: Env, query: str, message: str | None) -> None:
    r = env.get("/jobs?" + query)
    if message is None:  # odd but valid
        assert r.code == 200 and "No job matches these filters." in r.text
        return
    assert r.code == 400, r.text
    assert r.header("content-type") == "text/html; charset=utf-8"
    assert message.replace("'", "&#39;") in r.text
    assert "Traceback" not in r.text


def test_blank_values_are_no_filter(env: Env, history: list[Job]) -> None:
    r = env.get("/jobs?state=&task=&pool=&group=&worker=&requester=&batch=&since=&until=&before=")
    assert r.code == 200 and rows(r.text) == newest_first(history)[:100]
    assert "Clear" not in r.text


def test_audit_log_links_job_ids(env: Env) -> None:
    j = env.submit("ping", "m1", group="g1")
    result_of(env.store.audit.add(AuditEntry(time=T0, actor="u", action="job.create:ping", target="g1/m1",
                                             result=f"queued {j.id}")))
    result_of(env.store.audit.add(AuditEntry(time=T0, actor="u", action="batch.create:ping", target="batch/b-7",
                                             result="created b-7: 3 member(s)")))
    r = env.get("/audit")
    assert r.code == 200
    assert f'queued <a href="/jobs/{j.id}" class="job-link"><code>{j.id}</code></a>' in r.text
    assert '<a href="/batches/b-7">batch/b-7</a>' in r.text
    assert '<a href="/machines/g1/m1">g1/m1</a>' in r.text
