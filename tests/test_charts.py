"""
The server-drawn SVG charts (roller/web/charts.py): well-formed SVG (parsed
with xml.etree), named for screen readers, values mapped to the right bar
heights and line points, empty data drawn as "no data", nothing styled
inline.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from roller.web.charts import HBar, Series, hbars, line_chart, nice_scale, sparkline, stacked_bars

SVG = "{http://www.w3.org/2000/svg}"


def parse(markup: str) -> ET.Element:
    root = ET.fromstring(str(markup))
    assert root.tag == SVG + "svg"
    assert "style" not in markup and "<script" not in markup  # the CSP forbids inline styles
    return root


def named(root: ET.Element) -> tuple[str, str]:
    """The chart's accessible name and description, through aria-labelledby."""
    assert root.get("role") == "img"
    ids = root.get("aria-labelledby", "").split()
    by_id = {e.get("id"): e.text for e in root.iter() if e.get("id")}
    assert len(ids) == 2 and all(i in by_id for i in ids)
    title, desc = (by_id[i] for i in ids)
    assert root.find(SVG + "title") is not None and root.find(SVG + "desc") is not None
    return title, desc


def bars_of(root: ET.Element) -> list[ET.Element]:
    return [e for e in root.iter(SVG + "rect") if "bar" in (e.get("class") or "").split()]


def test_nice_scale() -> None:
    assert nice_scale(0) == (1.0, 1.0)
    assert nice_scale(-3) == (1.0, 1.0)
    assert nice_scale(float("nan")) == (1.0, 1.0)
    assert nice_scale(9) == (10.0, 5.0)
    assert nice_scale(100) == (100.0, 50.0)
    assert nice_scale(8) == (8.0, 2.0)
    assert nice_scale(1) == (1.0, 1.0)
    top, step = nice_scale(0.3)
    assert top >= 0.3 and step < 1
    for value in (3, 7, 13, 48, 99, 101, 999, 12345):
        top, step = nice_scale(value)
        assert value <= top < value + step + 1e-9 and step in {m * 10 ** k for m in (1, 2, 5) for k in range(6)}


def test_stacked_bars_heights_follow_the_values() -> None:
    svg = stacked_bars("c1", "Jobs per hour", "8 jobs & more", ["00:00", "", "02:00"],
                       [Series("succeeded", "succeeded", (4, 0, 2)), Series("failed", "failed", (4, 1, 0))],
                       width=340, height=240, bar_titles=["h0", "h1", "h2"])
    root = parse(svg)
    assert named(root) == ("Jobs per hour", "8 jobs & more")
    bars = bars_of(root)
    # zero values draw nothing: 4+4, 1, 2 -> four segments
    assert [(b.get("class"), b.get("data-value")) for b in bars] == [
        ("bar s-succeeded", "4"), ("bar s-failed", "4"), ("bar s-failed", "1"), ("bar s-succeeded", "2")]
    top, bottom = 26.0, 240 - 22.0  # the plot area of stacked_bars
    plot_h = bottom - top
    ymax, _ = nice_scale(8)
    heights = [float(b.get("height")) for b in bars]
    assert heights == pytest.approx([4 / ymax * plot_h, 4 / ymax * plot_h, 1 / ymax * plot_h, 2 / ymax * plot_h],
                                    abs=0.01)
    # stacked from the axis up: the first segment sits on the baseline, the second on top of it
    s0, f0 = bars[0], bars[1]
    assert float(s0.get("y")) + float(s0.get("height")) == pytest.approx(bottom, abs=0.01)
    assert float(f0.get("y")) + float(f0.get("height")) == pytest.approx(float(s0.get("y")), abs=0.01)
    # the same x for a bucket's segments, later buckets to the right
    assert s0.get("x") == f0.get("x") and float(bars[2].get("x")) > float(s0.get("x"))
    # each segment says what it is; patterns tell the series apart without colour
    assert bars[1].find(SVG + "title").text == "h0: 4 failed"
    assert bars[1].get("fill") == "url(#c1-p-failed)" and bars[0].get("fill") == "url(#c1-p-succeeded)"
    patterns = {p.get("id"): p for p in root.iter(SVG + "pattern")}
    assert set(patterns) == {"c1-p-succeeded", "c1-p-failed"}
    assert patterns["c1-p-failed"].find(SVG + "path") is not None  # hatched
    assert patterns["c1-p-succeeded"].find(SVG + "path") is None  # solid
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "00:00" in texts and "02:00" in texts and "succeeded" in texts and "failed" in texts
    assert "no data" not in texts


def test_stacked_bars_empty_and_escaped() -> None:
    root = parse(stacked_bars("c2", "<b>x</b>", "d", ["a", "b"], [Series("failed", "f<1>", (0, 0))]))
    assert bars_of(root) == []
    assert "no data" in [t.text for t in root.iter(SVG + "text")]
    assert named(root)[0] == "<b>x</b>"  # escaped in the markup, text in the tree
    parse(stacked_bars("c3", "t", "d", [], []))
    with pytest.raises(ValueError):
        stacked_bars("c4", "t", "d", ["a"], [Series("x", "x", (1, 2))])


def test_line_chart_points() -> None:
    svg = line_chart("l1", "Lines", "desc", ["a", "", "c"], [Series("failed", "failed", (0, 5, 10)),
                                                             Series("succeeded", "ok", (10, 10, 10))],
                     width=248, height=240)
    root = parse(svg)
    named(root)
    lines = [e for e in root.iter(SVG + "polyline")]
    assert [e.get("class") for e in lines] == ["line s-failed", "line s-succeeded"]
    points = [[tuple(map(float, p.split(","))) for p in e.get("points").split()] for e in lines]
    left, plot_w, top, plot_h = 40.0, 248 - 48.0, 26.0, 240 - 48.0
    assert [x for x, _ in points[0]] == pytest.approx([left, left + plot_w / 2, left + plot_w])
    assert [y for _, y in points[0]] == pytest.approx([top + plot_h, top + plot_h / 2, top])  # 0, 5, 10 of 10
    assert [y for _, y in points[1]] == pytest.approx([top] * 3)
    assert lines[0].find(SVG + "title").text == "failed: 15 in all, at most 10 in one"
    empty = parse(line_chart("l2", "t", "d", ["a"], [Series("x", "x", (0,))]))
    assert "no data" in [t.text for t in empty.iter(SVG + "text")]


def test_hbars_lengths() -> None:
    svg = hbars("h1", "Failures", "by pool", [HBar("mac", 30, "30 of 60"), HBar("linux", 15), HBar("z", 0)],
                width=600, label_width=100)
    root = parse(svg)
    named(root)
    bars = bars_of(root)
    plot_w = 600 - 100 - 130.0
    top, _ = nice_scale(30)
    assert [float(b.get("width")) for b in bars] == pytest.approx([30 / top * plot_w, 15 / top * plot_w, 0])
    assert all(b.get("x") == "100" for b in bars)
    texts = [t.text for t in root.iter(SVG + "text")]
    assert texts[:2] == ["mac", "30 of 60"] and "15" in texts
    # a fixed scale: 50 of 100 is half the width; values beyond it stop at the edge
    half = bars_of(parse(hbars("h2", "t", "d", [HBar("a", 50), HBar("b", 150)], max_value=100, width=600,
                               label_width=100)))
    assert [float(b.get("width")) for b in half] == pytest.approx([plot_w / 2, plot_w])
    assert "no data" in [t.text for t in parse(hbars("h3", "t", "d", [])).iter(SVG + "text")]


def test_sparkline() -> None:
    root = ET.fromstring(str(sparkline("s1", "Jobs: 7 in 24 h", [0, 2, 4, 1], width=100, height=20)))
    assert root.get("role") == "img" and root.get("aria-label") == "Jobs: 7 in 24 h"
    assert root.find(SVG + "title").text == "Jobs: 7 in 24 h"
    pts = [tuple(map(float, p.split(","))) for p in root.find(SVG + "polyline").get("points").split()]
    assert [x for x, _ in pts] == pytest.approx([2, 2 + 96 / 3, 2 + 2 * 96 / 3, 98])
    assert [y for _, y in pts] == pytest.approx([18, 18 - 8, 2, 18 - 4])  # 0, 2, 4 (the top), 1
    last = root.find(SVG + "circle")
    assert (float(last.get("cx")), float(last.get("cy"))) == pytest.approx(pts[-1])
    empty = ET.fromstring(str(sparkline("s2", "none", [])))
    assert empty.find(SVG + "polyline") is None
    flat = ET.fromstring(str(sparkline("s3", "zeros", [0, 0])))
    assert {p.split(",")[1] for p in flat.find(SVG + "polyline").get("points").split()} == {"26"}
