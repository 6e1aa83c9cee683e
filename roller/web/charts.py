"""
Charts drawn on the server as inline SVG: stacked bars, lines, horizontal
bars and a sparkline.  Pure functions from numbers to markup; nothing here
reads the database, the clock or a template.

Every chart is an C{<svg role="img">} named by its C{<title>} and
described by its C{<desc>} (C{aria-labelledby}); the page puts a table of
the same numbers beside it for screen readers and for reading exact
values.  Nothing is styled inline (the dashboard's Content-Security-Policy
forbids it): colours, dashes and hatches come from classes that
C{static/charts.css} styles, light and dark.  A series is told apart by
more than its colour: stacked segments are filled with a pattern per
series (solid, hatched, dotted ...), lines are dashed differently and each
carries its label at its end.

    svg = stacked_bars("jobs-24h", "Jobs per hour", "...", labels, [Series("failed", "failed", (0, 2, 1))])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from attrs import frozen
from markupsafe import Markup, escape

__all__ = ["Series", "HBar", "nice_scale", "stacked_bars", "line_chart", "hbars", "sparkline"]


@frozen
class Series:
    """One series: C{key} names its CSS class (C{s-<key>}), C{label} is what readers see."""

    key: str
    label: str
    values: tuple[float, ...]


@frozen
class HBar:
    """One horizontal bar: its label, its length and the text written after it (the value by default)."""

    label: str
    value: float
    text: str = ""


#: each series key's fill pattern in stacked bars (anything else is solid)
PATTERNS = {
    "failed": "hatch",
    "timed_out": "cross",
    "interrupted": "lines",
    "cancelled": "dots",
    "dry_run": "dots",
}

_FONT = 12  # px in the viewBox; charts.css sets the same size


def _n(value: float) -> str:
    """A coordinate: at most two decimals, no trailing zeros."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _count(value: float) -> str:
    """A value as readers see it: whole numbers without decimals."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def nice_scale(top: float, ticks: int = 4) -> tuple[float, float]:
    """
    The axis maximum and tick step for data reaching C{top}: a step of
    1, 2 or 5 times a power of ten, and a maximum that is a whole number of
    steps at or above C{top} (C{(1, 1)} for empty or all-zero data).
    """
    if not top or top <= 0 or not math.isfinite(top):
        return 1.0, 1.0
    raw = top / ticks
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if top >= 1 and step < 1:
        step = 1.0
    return step * math.ceil(top / step - 1e-9), float(step)


def _ids(chart_id: str) -> tuple[str, str]:
    return f"{chart_id}-title", f"{chart_id}-desc"


def _open(chart_id: str, title: str, desc: str, width: float, height: float, kind: str) -> list[str]:
    t, d = _ids(chart_id)
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(chart_id)}" class="chart chart-{kind}" '
        f'width="{_n(width)}" height="{_n(height)}" viewBox="0 0 {_n(width)} {_n(height)}" role="img" '
        f'aria-labelledby="{escape(t)} {escape(d)}" '
        f'focusable="false">',
        f'<title id="{escape(t)}">{escape(title)}</title>',
        f'<desc id="{escape(d)}">{escape(desc)}</desc>',
    ]


def _pattern_defs(chart_id: str, keys: Sequence[str]) -> list[str]:
    """A fill pattern per series key: a background in the series' colour, its hatch on top."""
    out = ["<defs>"]
    for key in dict.fromkeys(keys):
        kind = PATTERNS.get(key, "solid")
        out.append(f'<pattern id="{escape(chart_id)}-p-{escape(key)}" patternUnits="userSpaceOnUse" '
                   'width="6" height="6">')
        out.append(f'<rect class="fill s-{escape(key)}" width="6" height="6"/>')
        if kind == "hatch":
            out.append('<path class="hatch" d="M-1,1 l2,-2 M0,6 l6,-6 M5,7 l2,-2"/>')
        elif kind == "cross":
            out.append('<path class="hatch" d="M0,0 l6,6 M0,6 l6,-6"/>')
        elif kind == "lines":
            out.append('<path class="hatch" d="M0,3 h6"/>')
        elif kind == "dots":
            out.append('<circle class="dot" cx="3" cy="3" r="1.2"/>')
        out.append("</pattern>")
    out.append("</defs>")
    return out


def _fill(chart_id: str, key: str) -> str:
    return f'fill="url(#{escape(chart_id)}-p-{escape(key)})"'


def _y_axis(ymax: float, step: float, left: float, right: float, top: float, plot_h: float) -> list[str]:
    out = ['<g class="axis y-axis">']
    k = 0
    while k * step <= ymax + 1e-9:
        v = k * step
        y = top + plot_h - v / ymax * plot_h
        out.append(f'<line class="grid" x1="{_n(left)}" x2="{_n(right)}" y1="{_n(y)}" y2="{_n(y)}"/>')
        out.append(f'<text x="{_n(left - 4)}" y="{_n(y + _FONT / 3)}" text-anchor="end">{_count(v)}</text>')
        k += 1
    out.append("</g>")
    return out


def _x_labels(labels: Sequence[str], x_of: list[float], baseline: float) -> list[str]:
    out = ['<g class="axis x-axis">']
    for x, text in zip(x_of, labels, strict=False):
        if text:
            out.append(f'<line class="tick" x1="{_n(x)}" x2="{_n(x)}" y1="{_n(baseline)}" y2="{_n(baseline + 4)}"/>')
            out.append(f'<text x="{_n(x)}" y="{_n(baseline + 4 + _FONT)}" text-anchor="middle">{escape(text)}</text>')
    out.append("</g>")
    return out


def _legend(chart_id: str, series: Sequence[Series], y: float, left: float, line: bool = False) -> list[str]:
    out = ['<g class="legend">']
    x = left
    for s in series:
        if line:
            out.append(f'<line class="line s-{escape(s.key)}" x1="{_n(x)}" x2="{_n(x + 18)}" '
                       f'y1="{_n(y - 4)}" y2="{_n(y - 4)}"/>')
        else:
            out.append(f'<rect class="swatch" x="{_n(x)}" y="{_n(y - 10)}" width="12" height="12" '
                       f'{_fill(chart_id, s.key)}/>')
        x += 22 if line else 16
        out.append(f'<text x="{_n(x)}" y="{_n(y)}">{escape(s.label)}</text>')
        x += 12 * len(s.label) + 18  # room for the larger text of small screens (charts.css)
    out.append("</g>")
    return out


def stacked_bars(chart_id: str, title: str, desc: str, labels: Sequence[str], series: Sequence[Series], *,
                 width: float = 880, height: float = 260, bar_titles: Sequence[str] | None = None) -> Markup:
    """
    One bar per bucket (C{labels}: each bucket's x-axis label, "" for none),
    the series stacked in order from the axis up; each segment's tooltip
    (C{<title>}) says its bucket (C{bar_titles}, else its label), series
    and value.  Zero values draw nothing.
    """
    n = len(labels)
    if any(len(s.values) != n for s in series):
        raise ValueError("every series needs one value per label")
    left, right, top, bottom = 40.0, 8.0, 26.0, 22.0
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(s.values[i] for s in series) for i in range(n)]
    ymax, step = nice_scale(max(totals, default=0))
    out = _open(chart_id, title, desc, width, height, "bars")
    out += _pattern_defs(chart_id, [s.key for s in series])
    out += _legend(chart_id, series, 14, left)
    out += _y_axis(ymax, step, left, width - right, top, plot_h)
    slot = plot_w / max(n, 1)
    gap = min(2.0, slot * 0.2)
    baseline = top + plot_h
    out.append('<g class="bars">')
    for i in range(n):
        x = left + i * slot + gap / 2
        y = baseline
        when = (bar_titles[i] if bar_titles else labels[i]) or str(i)
        for s in series:
            v = s.values[i]
            if v <= 0:
                continue
            h = v / ymax * plot_h
            y -= h
            out.append(f'<rect class="bar s-{escape(s.key)}" x="{_n(x)}" y="{_n(y)}" width="{_n(slot - gap)}" '
                       f'height="{_n(h)}" {_fill(chart_id, s.key)} data-value="{_count(v)}">'
                       f'<title>{escape(when)}: {_count(v)} {escape(s.label)}</title></rect>')
    out.append("</g>")
    out.append(f'<line class="baseline" x1="{_n(left)}" x2="{_n(width - right)}" y1="{_n(baseline)}" '
               f'y2="{_n(baseline)}"/>')
    out += _x_labels(labels, [left + (i + 0.5) * slot for i in range(n)], baseline)
    if not any(totals):
        out.append(f'<text class="no-data" x="{_n(left + plot_w / 2)}" y="{_n(top + plot_h / 2)}" '
                   'text-anchor="middle">no data</text>')
    out.append("</svg>")
    return Markup("".join(out))


def line_chart(chart_id: str, title: str, desc: str, labels: Sequence[str], series: Sequence[Series], *,
               width: float = 880, height: float = 260) -> Markup:
    """
    One line per series over the buckets of C{labels}, each dashed after
    its own fashion (C{s-<key>}) and named at its right end.
    """
    n = len(labels)
    if any(len(s.values) != n for s in series):
        raise ValueError("every series needs one value per label")
    left, right, top, bottom = 40.0, 8.0, 26.0, 22.0
    plot_w, plot_h = width - left - right, height - top - bottom
    ymax, step = nice_scale(max((v for s in series for v in s.values), default=0))
    out = _open(chart_id, title, desc, width, height, "lines")
    out += _legend(chart_id, series, 14, left, line=True)
    out += _y_axis(ymax, step, left, width - right, top, plot_h)
    baseline = top + plot_h
    x_of = [left + (plot_w * (i / (n - 1)) if n > 1 else plot_w / 2) for i in range(n)]
    out.append('<g class="lines">')
    for s in series:
        points = " ".join(f"{_n(x_of[i])},{_n(baseline - s.values[i] / ymax * plot_h)}" for i in range(n))
        peak = _count(max(s.values, default=0))
        out.append(f'<polyline class="line s-{escape(s.key)}" points="{points}">'
                   f"<title>{escape(s.label)}: {_count(sum(s.values))} in all, at most {peak} in one"
                   "</title></polyline>")
    out.append("</g>")
    out.append(f'<line class="baseline" x1="{_n(left)}" x2="{_n(width - right)}" y1="{_n(baseline)}" '
               f'y2="{_n(baseline)}"/>')
    out += _x_labels(labels, x_of, baseline)
    if not any(v for s in series for v in s.values):
        out.append(f'<text class="no-data" x="{_n(left + plot_w / 2)}" y="{_n(top + plot_h / 2)}" '
                   'text-anchor="middle">no data</text>')
    out.append("</svg>")
    return Markup("".join(out))


def hbars(chart_id: str, title: str, desc: str, bars: Sequence[HBar], *, max_value: float | None = None,
          width: float = 720, key: str = "bar", label_width: float = 160) -> Markup:
    """
    Horizontal bars, one row each, top to bottom in the order given, the
    label on the left and the text (or value) after the bar.  C{max_value}
    fixes the scale (e.g. 100 for percentages); else the largest value.
    """
    row, top = 22.0, 4.0
    height = top * 2 + row * max(len(bars), 1)
    left, right = label_width, 130.0
    plot_w = width - left - right
    top_value = max_value if max_value else nice_scale(max((b.value for b in bars), default=0))[0]
    out = _open(chart_id, title, desc, width, height, "hbars")
    out.append('<g class="bars">')
    for i, b in enumerate(bars):
        y = top + i * row
        w = max(0.0, min(b.value, top_value)) / top_value * plot_w
        label = b.label if len(b.label) <= 22 else b.label[:21] + "…"
        out.append(f'<text class="label" x="{_n(left - 6)}" y="{_n(y + row / 2 + _FONT / 3)}" '
                   f'text-anchor="end">{escape(label)}</text>')
        out.append(f'<rect class="bar s-{escape(key)}" x="{_n(left)}" y="{_n(y + 3)}" width="{_n(w)}" '
                   f'height="{_n(row - 6)}" data-value="{_count(b.value)}">'
                   f'<title>{escape(b.label)}: {escape(b.text or _count(b.value))}</title></rect>')
        out.append(f'<text class="value" x="{_n(left + w + 4)}" y="{_n(y + row / 2 + _FONT / 3)}">'
                   f'{escape(b.text or _count(b.value))}</text>')
    out.append("</g>")
    out.append(f'<line class="baseline" x1="{_n(left)}" x2="{_n(left)}" y1="{_n(top)}" y2="{_n(height - top)}"/>')
    if not bars:
        out.append(f'<text class="no-data" x="{_n(left + plot_w / 2)}" y="{_n(height / 2 + _FONT / 3)}" '
                   'text-anchor="middle">no data</text>')
    out.append("</svg>")
    return Markup("".join(out))


def sparkline(chart_id: str, title: str, values: Sequence[float], *, width: float = 120,
              height: float = 28) -> Markup:
    """
    A small line of C{values} (oldest first) with no axes, its area shaded
    and its last point marked; C{title} is its accessible name and should
    carry the figures (total, peak).
    """
    pad = 2.0
    top = max(values, default=0) or 1
    n = len(values)
    xs = [pad + ((width - 2 * pad) * i / (n - 1) if n > 1 else (width - 2 * pad) / 2) for i in range(n)]
    ys = [height - pad - v / top * (height - 2 * pad) for v in values]
    # sized and coloured by attributes too: readable on a page without charts.css
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(chart_id)}" class="chart sparkline" '
           f'width="{_n(width)}" height="{_n(height)}" viewBox="0 0 {_n(width)} {_n(height)}" role="img" '
           f'aria-label="{escape(title)}" focusable="false">',
           f"<title>{escape(title)}</title>"]
    if n:
        points = " ".join(f"{_n(x)},{_n(y)}" for x, y in zip(xs, ys, strict=True))
        area = f"{_n(xs[0])},{_n(height - pad)} {points} {_n(xs[-1])},{_n(height - pad)}"
        out.append(f'<polygon class="area" points="{area}" fill="currentColor" opacity=".18"/>')
        out.append(f'<polyline class="line" points="{points}" fill="none" stroke="currentColor" stroke-width="1.5"/>')
        out.append(f'<circle class="last" cx="{_n(xs[-1])}" cy="{_n(ys[-1])}" r="2" fill="currentColor"/>')
    out.append(f'<line class="baseline" x1="{_n(pad)}" x2="{_n(width - pad)}" y1="{_n(height - pad)}" '
               f'y2="{_n(height - pad)}" stroke="currentColor" opacity=".4"/>')
    out.append("</svg>")
    return Markup("".join(out))
