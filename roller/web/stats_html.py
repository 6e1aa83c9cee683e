"""
The dashboard's charts: the C{/stats} page and the fleet page's sparkline.

The route lives in L{roller.web.dashboard.Dashboard} and hands over here.
The aggregates (L{roller.store.stats}) are computed at most once per
L{CACHE_SECONDS} per roller, on the dashboard's clock, with the charts
drawn from them (L{roller.web.charts}); requests meanwhile, and requests
arriving while they are computed, share the result.  So the fleet page
never recomputes its sparkline per request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode
from weakref import WeakKeyDictionary

from markupsafe import Markup, escape
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from roller.auth.dashboard import Viewer
from roller.jobs import iso
from roller.store.db import Database
from roller.store.stats import FAILED, Buckets, StatsQueries, WeekStats
from roller.web import charts
from roller.web.charts import HBar, Series
from roller.web.times import utc

if TYPE_CHECKING:
    from roller.web.dashboard import Dashboard

__all__ = ["CACHE_SECONDS", "StatsCache", "stats_page", "fleet_sparkline"]

#: how long computed aggregates are served before they are computed again
CACHE_SECONDS = 60.0
#: the final states charted, in stacking order (the axis up)
STATES = ("succeeded", "failed", "timed_out", "interrupted", "cancelled")
DAYS = 7
#: pools shown in the failures chart (the table lists them all)
POOLS_SHOWN = 15

T = TypeVar("T")
log = Logger()


class StatsCache:
    """Values computed at most once per C{ttl} seconds of C{clock} time; concurrent askers share one computation."""

    def __init__(self, ttl: float = CACHE_SECONDS):
        self.ttl = ttl
        self._values: dict[Hashable, tuple[float, Any]] = {}
        self._waiting: dict[Hashable, list[Deferred[Any]]] = {}

    async def get(self, key: Hashable, now: float, compute: Callable[[], Awaitable[T]]) -> T:
        hit = self._values.get(key)
        if hit is not None and hit[0] - self.ttl <= now < hit[0]:
            return hit[1]
        waiters = self._waiting.get(key)
        if waiters is not None:
            d: Deferred[T] = Deferred()
            waiters.append(d)
            return await d
        self._waiting[key] = []
        try:
            value = await compute()
        except BaseException:
            failure = Failure()
            for w in self._waiting.pop(key, []):
                w.errback(failure)
            raise
        self._values[key] = (now + self.ttl, value)
        for w in self._waiting.pop(key, []):
            w.callback(value)
        return value


#: one cache per database (the Dashboard is an attrs class without room for it)
_caches: WeakKeyDictionary[Database, StatsCache] = WeakKeyDictionary()


def cache_of(dashboard: Dashboard) -> StatsCache:
    db = dashboard.store.db
    cache = _caches.get(db)
    if cache is None:
        cache = _caches[db] = StatsCache()
    return cache


def _utc(ts: float, fmt: str) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(fmt)


def hour_end(now: float) -> int:
    """The end of the current UTC hour: the charts' last bucket is the hour in progress."""
    return (int(now) // 3600 + 1) * 3600


def day_end(now: float) -> int:
    return (int(now) // 86400 + 1) * 86400


def _series(b: Buckets, keys: tuple[str, ...] = STATES) -> list[Series]:
    """The states present, in charting order (others after them)."""
    present = [k for k in keys if k in b.counts] + sorted(k for k in b.counts if k not in keys)
    return [Series(k, k.replace("_", " "), tuple(float(v) for v in b.counts[k])) for k in present]


def _table(b: Buckets, series: list[Series]) -> dict[str, Any]:
    """
    A chart's table alternative: one row per bucket (its start as a
    C{<time>} in L{roller.web.times}' "datetime" or "date" format, each
    series, the total).
    """
    fmt = "date" if b.width >= 86400 else "datetime"
    rows = []
    for i in range(b.n):
        start = b.since + i * b.width
        rows.append({"iso": iso(start), "text": utc(start, fmt), "title": utc(start),
                     "values": [int(s.values[i]) for s in series], "total": b.total(i)})
    return {"columns": [s.label for s in series], "rows": rows, "format": fmt,
            "totals": [int(sum(s.values)) for s in series], "total": sum(b.totals)}


def day_chart(b: Buckets, chart_id: str = "jobs-24h") -> tuple[Markup, dict[str, Any]]:
    series = _series(b)
    labels = [_utc(b.since + i * 3600, "%H:00") if i % 3 == 0 else "" for i in range(b.n)]
    titles = [_utc(b.since + i * 3600, "%d %b %H:00 UTC") for i in range(b.n)]
    total = sum(b.totals)
    desc = (f"{total} jobs ended in the 24 hours to {_utc(b.since + b.n * 3600, '%d %b %H:00')} UTC"
            + (": " + ", ".join(f"{int(sum(s.values))} {s.label}" for s in series) if series else "") + ".")
    svg = charts.stacked_bars(chart_id, "Jobs per hour by final state, last 24 hours (UTC)", desc, labels,
                              series, bar_titles=titles)
    return svg, {**_table(b, series), "desc": desc}


def week_chart(b: Buckets) -> tuple[Markup, dict[str, Any]]:
    series = _series(b)
    labels = [_utc(b.since + i * 3600, "%a %d") if (b.since + i * 3600) % 86400 == 0 else "" for i in range(b.n)]
    total = sum(b.totals)
    peak = max(b.totals, default=0)
    desc = (f"{total} jobs ended in the last {b.n // 24} days, at most {peak} in one hour"
            + (": " + ", ".join(f"{int(sum(s.values))} {s.label}" for s in series) if series else "") + ".")
    svg = charts.line_chart("jobs-7d", "Jobs per hour by final state, last 7 days (UTC)", desc, labels, series)
    # the table alternative sums each day (168 rows would read badly)
    days = b.n // 24
    day = Buckets(b.since, 86400, days, {k: tuple(sum(v[d * 24:(d + 1) * 24]) for d in range(days))
                                         for k, v in b.counts.items()})
    return svg, {**_table(day, _series(day)), "desc": desc}


def pools_chart(week: WeekStats, since: float) -> tuple[Markup, list[dict[str, Any]]]:
    pools = [p for p in week.pools if p.finished]
    bars = [HBar(p.pool or "(no pool)", p.failed, f"{p.failed} of {p.finished} ({p.rate:.0%})")
            for p in pools[:POOLS_SHOWN] if p.failed]
    failed = sum(p.failed for p in pools)
    desc = (f"{failed} failed or timed-out jobs in {sum(1 for p in pools if p.failed)} pools over {DAYS} days"
            + (f"; most in {bars[0].label}: {bars[0].text}" if bars else "") + ".")
    svg = charts.hbars("failures-by-pool", f"Failed jobs by pool, last {DAYS} days", desc, bars, key="failed",
                       width=560)
    since_text = iso(since)
    rows = []
    for p in pools:
        link = None
        if p.pool is not None:
            link = "/jobs?" + urlencode([("pool", p.pool), *(("state", s) for s in FAILED), ("since", since_text)])
        rows.append({"pool": p.pool or "(no pool)", "failed": p.failed, "finished": p.finished,
                     "rate": f"{p.rate:.0%}", "link": link})
    return svg, rows


def _seconds(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.0f} s" if v < 120 else f"{v / 60:.1f} min"


def methods_charts(week: WeekStats) -> tuple[Markup, Markup, list[dict[str, Any]]]:
    methods = list(week.methods.values())
    rate_bars = [HBar(m.family, 100 * (m.success_rate or 0),
                      f"{m.success_rate:.0%} of {m.attempts}" if m.attempts else "no attempts") for m in methods]
    tried = [m for m in methods if m.attempts]
    rate_desc = ("; ".join(f"{m.family} {m.success_rate:.0%} of {m.attempts} attempts" for m in tried)
                 if tried else f"No reboot method was attempted in the last {DAYS} days") + "."
    rates = charts.hbars("reboot-success", f"Reboot success rate by method, last {DAYS} days", rate_desc,
                         rate_bars, max_value=100, key="succeeded", label_width=70, width=380)
    recovered = [m for m in methods if m.median_recover is not None]
    time_bars = [HBar(m.family, m.median_recover or 0, _seconds(m.median_recover)) for m in methods]
    time_desc = ("; ".join(f"{m.family} {_seconds(m.median_recover)} (median of {len(m.recover_seconds)})"
                           for m in recovered) if recovered else "No reboot succeeded in the last 7 days") + "."
    times = charts.hbars("reboot-recover", f"Median time to recover by reboot method, last {DAYS} days",
                         time_desc, time_bars, key="recover", label_width=70, width=380)
    rows = [{"family": m.family, "attempts": m.attempts, "succeeded": m.succeeded, "failed": m.failed,
             "rate": "—" if m.success_rate is None else f"{m.success_rate:.0%}",
             "median": _seconds(m.median_recover)} for m in methods]
    return rates, times, rows


def remediations_chart(b: Buckets) -> tuple[Markup, dict[str, Any]]:
    series = [Series("remediation", "jobs queued", tuple(float(v) for v in b.counts["remediation"])),
              Series("dry_run", "dry runs", tuple(float(v) for v in b.counts["dry_run"]))]
    labels = [_utc(b.since + i * 86400, "%a %d") for i in range(b.n)]
    desc = (f"{int(sum(series[0].values))} remediation jobs queued by fleet health and "
            f"{int(sum(series[1].values))} dry runs over {b.n} days.")
    svg = charts.stacked_bars("remediations", f"Remediations per day, last {b.n} days (UTC)", desc, labels,
                              series, height=200)
    return svg, {**_table(b, series), "desc": desc}


async def _compute(dashboard: Dashboard, now: float) -> Markup:
    queries = StatsQueries(dashboard.store)
    h_end, d_end = hour_end(now), day_end(now)
    day = await queries.hourly(h_end, 24)
    week = await queries.week(h_end, d_end, DAYS)
    day_svg, day_table = day_chart(day)
    week_svg, week_table = week_chart(week.hourly)
    pools_svg, pools = pools_chart(week, h_end - DAYS * 86400)
    rates_svg, times_svg, methods = methods_charts(week)
    rem_svg, rem_table = remediations_chart(week.remediations)
    context = {"computed_at": now, "day_svg": day_svg, "day": day_table, "week_svg": week_svg, "week": week_table,
               "pools_svg": pools_svg, "pools": pools, "rates_svg": rates_svg, "times_svg": times_svg,
               "methods": methods, "rem_svg": rem_svg, "rem": rem_table,
               "health_running": dashboard.health is not None, "cache_seconds": int(CACHE_SECONDS)}
    # the same for every viewer until the figures are computed again: rendered once, here
    return Markup(dashboard.env.get_template("_stats_body.html").render(**context))


async def stats_page(dashboard: Dashboard, request: IRequest, viewer: Viewer) -> bytes:
    """The C{/stats} page."""
    now = dashboard.clock.seconds()
    body = await cache_of(dashboard).get("stats", now, lambda: _compute(dashboard, now))
    return dashboard.render(request, "stats.html", viewer, section="stats", body=body)


async def _sparkline(dashboard: Dashboard, now: float) -> Markup:
    b = await StatsQueries(dashboard.store).hourly(hour_end(now), 24)
    totals = b.totals
    total, peak = sum(totals), max(totals, default=0)
    failed = sum(sum(b.counts.get(s, ())) for s in FAILED)
    title = (f"Jobs per hour, last 24 hours: {total} ended ({failed} failed), at most {peak} in one hour"
             if total else "Jobs per hour, last 24 hours: none ended")
    svg = charts.sparkline("fleet-sparkline", title, [float(v) for v in totals])
    return Markup('<a class="sparkline-link" href="/stats">{svg}<span class="sparkline-text">{text}</span></a>'
                  ).format(svg=svg, text=escape(f"{total} job{'' if total == 1 else 's'} in 24 h"))


async def fleet_sparkline(dashboard: Dashboard) -> Markup:
    """
    The fleet page's small chart of recent jobs (jobs per hour over 24 h),
    linking to C{/stats}; nothing (and a log line) if it cannot be had: the
    fleet page shows without it.
    """
    now = dashboard.clock.seconds()
    try:
        return await cache_of(dashboard).get("sparkline", now, lambda: _sparkline(dashboard, now))
    except Exception as e:  # noqa: BLE001 -- the fleet page matters more than its sparkline
        log.warn("The fleet page's sparkline is left out: {error}", error=e)
        return Markup("")
