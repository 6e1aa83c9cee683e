"""roller.timetext: the same characters as datetime, for every time it is given."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import pytest

from roller import timetext
from roller.web.times import FORMATS

FMTS = sorted(set(FORMATS.values()))


def reference_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def samples() -> list[float]:
    rng = random.Random(18)
    out = [0.0, 0.0005, 0.0015, 0.9995, 0.9999995, 0.9999994, 1.0, 59.9999995, 86399.9999995, 86400.0,
           951782400.0 - 1e-7,  # just before 2000-02-29 (a leap day)
           951782400.0, 1709164800.5, 4107542399.9999995, 253402300799.999,
           1765051385.1234565, 1765051385.1234575]  # ties of the microsecond rounding (half to even)
    out += [rng.uniform(0, 4.2e9) for _ in range(20_000)]  # 1970 .. 2103
    out += [rng.uniform(0, 253402300799.0) for _ in range(5000)]  # to 9999
    out += [round(rng.uniform(1.6e9, 1.9e9), 6) + 5e-7 for _ in range(5000)]  # near .5 microseconds
    out += [math.nextafter(float(n), 0.0) for n in range(0, 200_000, 997)]  # just under whole seconds
    return out


def test_iso_is_datetimes_text() -> None:
    bad = [(ts, timetext.iso(ts), reference_iso(ts)) for ts in samples() if timetext.iso(ts) != reference_iso(ts)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("fmt", FMTS)
def test_utc_text_is_strftimes_text(fmt: str) -> None:
    bad = [ts for ts in samples() if timetext.utc_text(ts, fmt) != datetime.fromtimestamp(ts, UTC).strftime(fmt)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("ts", [-1.5, -86400.25, -0.0000001])
def test_times_outside_the_fast_range_go_through_datetime(ts: float) -> None:
    assert timetext.iso(ts) == reference_iso(ts)
    assert timetext.utc_text(ts, "%Y-%m-%d %H:%M:%S UTC") == datetime.fromtimestamp(ts, UTC).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


@pytest.mark.parametrize("ts", [math.nan, math.inf, -math.inf, 1e20, 253402300800.0,
                                253402300799.9999995])  # the last rounds up to the year 10000
def test_impossible_times_fail_as_datetime_does(ts: float) -> None:
    with pytest.raises((ValueError, OverflowError, OSError)):
        timetext.iso(ts)
    with pytest.raises((ValueError, OverflowError, OSError)):
        timetext.utc_text(ts, "%Y-%m-%d")


def test_other_formats_go_through_strftime() -> None:
    assert timetext.utc_text(1765051385.5, "%A %d %B") == datetime.fromtimestamp(1765051385.5, UTC).strftime(
        "%A %d %B")


def test_the_days_kept_are_bounded() -> None:
    for n in range(timetext.DAYS_KEPT * 2 + 5):
        timetext.iso(n * 86400.0)
    assert len(timetext._days) <= timetext.DAYS_KEPT
    assert timetext.iso(3 * 86400.0) == "1970-01-04T00:00:00.000Z"


def test_iso_and_full_are_the_two_texts() -> None:
    full = "%Y-%m-%d %H:%M:%S UTC"
    bad = [ts for ts in samples() + [-3.25] if timetext.iso_and_full(ts) != (reference_iso(ts),
                                                                           datetime.fromtimestamp(ts, UTC).strftime(full))]
    assert not bad, bad[:5]
