"""
Times on the dashboard's pages.

Every time is a C{<time datetime="ISO-8601 UTC">} element whose text is
UTC (what a browser without JavaScript shows); C{static/roller.js} rewrites
the text in the browser's own time zone, one format per page, with the UTC
time in the tooltip, and keeps relative times (C{data-relative}: "5 min
ago") ticking, also in elements added later by live updates.

    {{ m.when(ts) }} -> <time datetime="..." data-relative title="2026-12-06 20:03:05 UTC">5 min ago</time>
    {{ m.at(ts) }}   -> <time datetime="..." title="2026-12-06 20:03:05 UTC">2026-12-06 20:03 UTC</time>
"""

from __future__ import annotations

from datetime import UTC, datetime

from roller.timetext import utc_text

__all__ = ["FORMATS", "utc"]

#: C{data-format} values: what of the time is shown
FORMATS = {"datetime": "%Y-%m-%d %H:%M UTC", "date": "%Y-%m-%d", "time": "%H:%M:%S", "full": "%Y-%m-%d %H:%M:%S UTC"}


def utc(value: float | str | None, format: str = "full") -> str:
    """
    C{value} (seconds since the epoch, or an ISO-8601 string) as UTC text
    in one of L{FORMATS}; C{""} for None or a string that is not a time.
    """
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return ""
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
        return moment.strftime(FORMATS.get(format, FORMATS["full"]))
    return utc_text(value, FORMATS.get(format, FORMATS["full"]))
