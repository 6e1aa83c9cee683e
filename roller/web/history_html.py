"""
The dashboard's job history page, C{/jobs}: every job, filtered and paged.

The route lives in L{roller.web.dashboard.Dashboard} and hands over here.
Reading it needs what the queue page needs (a viewer of the dashboard).

Query parameters (the fleet's count chips and the machine pages link with
these names): C{state} (one of L{STATES}; repeated or comma-separated for
several), C{task}, C{pool}, C{group}, C{worker} (a worker id; with
C{group}, one machine), C{requester}, C{batch} (a batch id), C{since} and
C{until} (ISO-8601 dates or date-times, UTC unless they carry an offset; a
date alone as C{until} includes that day), and C{before} (the keyset
cursor of the "older" link).  A bad value is a 400 page saying which and
why.  Newest first, L{PAGE_SIZE} a page (L{roller.store.history}).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from twisted.web.iweb import IRequest

from roller.auth.dashboard import Viewer
from roller.errors import BadRequest
from roller.inventory import TAG_RE, valid_worker_id
from roller.jobs import State
from roller.store.history import HistoryQueries, JobQuery, JobRow
from roller.web import history_rows
from roller.web.http import query_arg

if TYPE_CHECKING:
    from roller.web.dashboard import Dashboard

__all__ = ["PAGE_SIZE", "STATES", "jobs_page", "parse_query", "parse_time"]

PAGE_SIZE = 100
#: jobs looked at, at most, per page of a filter without an index (L{roller.store.history})
MAX_SCAN = 200_000
STATES = tuple(s.value for s in State)
_TASK = re.compile(r"[-_.0-9A-Za-z]{1,64}")
_BATCH = re.compile(r"[-_0-9A-Za-z]{1,64}")
_CURSOR = re.compile(r"[0-9]{1,18}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_EXAMPLE = "e.g. 2026-03-01 or 2026-03-01T08:30 (UTC) or 2026-03-01T08:30+01:00"


def _args(request: IRequest, name: str) -> list[str]:
    """Every non-blank value of query parameter C{name}, stripped."""
    values = []
    for raw in request.args.get(name.encode(), []):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadRequest(f"query parameter {name} is not valid UTF-8", code="invalid_query") from None
        if text:
            values.append(text)
    return values


def _arg(request: IRequest, name: str) -> str | None:
    return (query_arg(request, name) or "").strip() or None


def parse_time(name: str, text: str, *, end_of_day: bool = False) -> float:
    """
    An ISO-8601 date or date-time as a POSIX time: UTC unless it carries
    an offset; a date alone is its midnight (UTC), or the next midnight with
    C{end_of_day}.  L{BadRequest} saying what was expected otherwise.
    """
    if len(text) > 40:
        raise BadRequest(f"{name} is too long to be a date or time ({_EXAMPLE})")
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise BadRequest(f"{name} {text!r} is not a date ({_EXAMPLE})") from None
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        try:
            return (start + (timedelta(days=1) if end_of_day else timedelta())).timestamp()
        except OverflowError:
            raise BadRequest(f"{name} {text!r} is out of range") from None
    try:
        when = datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError:
        raise BadRequest(f"{name} {text!r} is not an ISO-8601 date or date-time ({_EXAMPLE})") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return when.timestamp()
    except (OverflowError, ValueError):
        raise BadRequest(f"{name} {text!r} is out of range") from None


def parse_query(request: IRequest) -> JobQuery:
    """The page's filters from the query string; L{BadRequest} (a 400 page) for any bad value."""
    states: list[str] = []
    for value in _args(request, "state"):
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if part not in STATES:
                raise BadRequest(f"state {part[:40]!r} is not a job state: use {', '.join(STATES)} "
                                 "(several: repeat state= or separate them with commas)")
            if part not in states:
                states.append(part)
    task = _arg(request, "task")
    if task is not None and not _TASK.fullmatch(task):
        raise BadRequest("task must be a task name (letters, digits, '-', '_' and '.')")
    pool = _arg(request, "pool")
    if pool is not None and not TAG_RE.fullmatch(pool):
        raise BadRequest("pool must be a pool name (letters, digits and -_.:/, at most 64)")
    group = _arg(request, "group")
    if group is not None and not valid_worker_id(group):
        raise BadRequest("group must be a worker group name (letters, digits, '-' and '_')")
    worker = _arg(request, "worker")
    if worker is not None and not valid_worker_id(worker):
        raise BadRequest("worker must be a worker id (letters, digits, '-' and '_')")
    requester = _arg(request, "requester")
    if requester is not None and (len(requester) > 200 or _CONTROL.search(requester)):
        raise BadRequest("requester must be at most 200 characters, without control characters")
    batch = _arg(request, "batch")
    if batch is not None and not _BATCH.fullmatch(batch):
        raise BadRequest("batch must be a batch id (letters, digits, '-' and '_')")
    raw_since, raw_until = _arg(request, "since"), _arg(request, "until")
    since = None if raw_since is None else parse_time("since", raw_since)
    until = None if raw_until is None else parse_time("until", raw_until, end_of_day=True)
    if since is not None and until is not None and since >= until:
        raise BadRequest(f"since ({raw_since}) must be before until ({raw_until})")
    raw_before = _arg(request, "before")
    before = None
    if raw_before is not None:
        if not _CURSOR.fullmatch(raw_before):
            raise BadRequest("before must be a job number (the 'Older' link carries it)")
        before = int(raw_before)
    return JobQuery(states=tuple(states), task=task, pool=pool, group=group, worker=worker,
                    requester=requester, batch=batch, since=since, until=until, before=before)


def _filters(request: IRequest, q: JobQuery) -> list[tuple[str, str]]:
    """The filters as query pairs, as given (times as typed), without the cursor."""
    pairs: list[tuple[str, str]] = [("state", s) for s in q.states]
    for name in ("task", "pool", "group", "worker", "requester", "batch", "since", "until"):
        value = _arg(request, name)
        if value is not None:
            pairs.append((name, value))
    return pairs


def _summary(q: JobQuery, pairs: list[tuple[str, str]]) -> str:
    words = {"task": "task", "pool": "pool", "group": "group", "worker": "worker", "requester": "requested by",
             "batch": "batch", "since": "since", "until": "until"}
    parts = []
    if q.states:
        parts.append(" or ".join(s.replace("_", " ") for s in q.states))
    parts += [f"{words[k]} {v}" for k, v in pairs if k in words]
    return ", ".join(parts)


async def jobs_page(dashboard: Dashboard, request: IRequest, viewer: Viewer) -> bytes:
    """The C{/jobs} page."""
    q = parse_query(request)
    page = await HistoryQueries(dashboard.store).page(q, limit=PAGE_SIZE, max_scan=MAX_SCAN)
    jobs = []
    for j in page.jobs:  # live ones as the queue has them now
        live = None if j.final else dashboard.queue.active(j.id)
        jobs.append(j if live is None else JobRow.of(live))
    pairs = _filters(request, q)
    older = None
    if page.older is not None:
        older = "/jobs?" + urlencode([*pairs, ("before", str(page.older))])
    newest = None
    if q.before is not None:
        newest = "/jobs" + ("?" + urlencode(pairs) if pairs else "")
    values: dict[str, Any] = dict.fromkeys(("task", "pool", "group", "worker", "requester", "batch", "since",
                                            "until"), "")
    values.update((k, v) for k, v in pairs if k != "state")
    task_names = sorted({*dashboard.tasks.names(), *([q.task] if q.task else [])})
    return dashboard.render(
        request, "jobs.html", viewer, section="jobs", jobs=bool(jobs), older=older,
        rows_html=history_rows.rows_html(jobs, history_rows.cache_of(dashboard.store.db)), newest=newest,
        searched_to=page.searched_to, states=STATES, chosen=set(q.states), values=values, task_names=task_names,
        filtered=bool(pairs), summary=_summary(q, pairs), page_size=PAGE_SIZE,
        machine_only=q.worker is not None and q.group is not None,
    )
