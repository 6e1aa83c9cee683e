"""
Seconds since the epoch as UTC text, the same characters as C{datetime}
gives, in a fraction of its time.

Every job in an API answer carries three or four ISO-8601 times, and every
row of a dashboard table two or three: C{datetime.fromtimestamp(ts, UTC)}
and C{isoformat()} or C{strftime()} cost 5-7 us a time, more than the
rest of a row.  Here the date of each day is worked out once (kept for
L{DAYS_KEPT} days) and the time of day is plain arithmetic.  The seconds
are split into whole seconds and microseconds exactly as C{datetime}
rounds them (half to even), so the text is identical; times outside
1970-9999 (and NaN, infinities) go through C{datetime} itself.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta

__all__ = ["iso", "iso_and_full", "utc_text"]

_EPOCH = date(1970, 1, 1)
#: 9999-12-31 23:59:59.999999 is the last time C{datetime} can hold
_END = 253402300800.0
#: distinct days whose date text is kept
DAYS_KEPT = 4096
_days: dict[int, str] = {}


def _day(n: int) -> str:
    text = _days.get(n)
    if text is None:
        if len(_days) >= DAYS_KEPT:
            _days.clear()
        text = _days[n] = (_EPOCH + timedelta(days=n)).isoformat()
    return text


def _split(ts: float) -> tuple[int, int] | None:
    """(whole seconds, microseconds) as C{datetime.fromtimestamp} rounds them; None outside 1970-9999."""
    if not 0.0 <= ts < _END:  # also False for NaN
        return None
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)  # half to even, as datetime's _PyTime_ROUND_HALF_EVEN
    if us >= 1_000_000:
        return int(whole) + 1, us - 1_000_000
    return int(whole), us


def _clock(secs: int) -> tuple[str, int, int, int]:
    """(date text, hours, minutes, seconds) of whole seconds since the epoch."""
    days, rest = divmod(secs, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    return _day(days), hours, minutes, seconds


def iso(ts: float) -> str:
    """C{ts} as ISO-8601 UTC with milliseconds: C{2026-12-06T20:03:05.123Z}."""
    parts = _split(ts)
    if parts is None:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    day, hours, minutes, seconds = _clock(parts[0])
    return f"{day}T{hours:02d}:{minutes:02d}:{seconds:02d}.{parts[1] // 1000:03d}Z"


def iso_and_full(ts: float) -> tuple[str, str]:
    """C{(iso(ts), utc_text(ts, "%Y-%m-%d %H:%M:%S UTC"))}, worked out together (a dashboard time element)."""
    parts = _split(ts)
    if parts is None:
        return iso(ts), utc_text(ts, "%Y-%m-%d %H:%M:%S UTC")
    day, hours, minutes, seconds = _clock(parts[0])
    clock = f"{hours:02d}:{minutes:02d}:{seconds:02d}"
    return f"{day}T{clock}.{parts[1] // 1000:03d}Z", f"{day} {clock} UTC"


def utc_text(ts: float, fmt: str) -> str:
    """
    C{ts} formatted by C{fmt}, one of C{"%Y-%m-%d %H:%M UTC"},
    C{"%Y-%m-%d"}, C{"%H:%M:%S"}, C{"%Y-%m-%d %H:%M:%S UTC"} (others
    through C{strftime}).
    """
    parts = _split(ts)
    if parts is None or fmt not in _SHAPES:
        return datetime.fromtimestamp(ts, UTC).strftime(fmt)
    return _SHAPES[fmt](*_clock(parts[0]))


_SHAPES = {
    "%Y-%m-%d %H:%M UTC": lambda d, h, m, s: f"{d} {h:02d}:{m:02d} UTC",
    "%Y-%m-%d": lambda d, h, m, s: d,
    "%H:%M:%S": lambda d, h, m, s: f"{h:02d}:{m:02d}:{s:02d}",
    "%Y-%m-%d %H:%M:%S UTC": lambda d, h, m, s: f"{d} {h:02d}:{m:02d}:{s:02d} UTC",
}
