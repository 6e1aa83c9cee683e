"""
The fleet table's rows built in Python (roller/web/fleet_html.py, kept because
bench/dashboard.py measured it several times faster) and by the C{fleet_row}
Jinja macro of templates/_macros.html (built from the shared C{state}, C{when}
and C{error_line} macros) must be the same HTML, byte for byte.
"""

from __future__ import annotations

import itertools

from roller.store.fleet import FleetRow, LastJob, Liveness, LoanState
from roller.web.dashboard import ago, template_environment
from roller.web.fleet_html import RowCache, fleet_rows_html

NOW = 1_700_000_000.0
HOSTILE = "<script>alert('x')</script> & \"quoted\""
LONG = "word " * 60  # past the 160 (error) and 120 (liveness title) cuts


def _last(state: str, error: str | None = None, **times: float | None) -> LastJob:
    return LastJob(id="0c2d-job/..", task_name="reboot", state=state, created_at=times.get("created", NOW - 4000),
                   started_at=times.get("started"), finished_at=times.get("finished"), error=error, result=None,
                   requester="ci")


def _rows() -> list[tuple[FleetRow, str | None]]:
    lasts = [
        None,
        _last("succeeded", finished=NOW - 30, started=NOW - 60),
        _last("failed", error=HOSTILE, finished=NOW - 7200),
        _last("timed_out", error=LONG, started=NOW - 100),
        _last("failed", error=None),
        _last("succeeded", error="an old error not shown"),
    ]
    livenesses = [None, Liveness("ping-1", "succeeded", NOW - 5, None),
                  Liveness("ping/2", "failed", NOW - 200_000, HOSTILE), Liveness("p3", "failed", NOW - 1, LONG)]
    loans = [None, LoanState("ops@example.com", NOW + 86_400), LoanState(HOSTILE, NOW - 10), LoanState("x", NOW)]
    names = [("g1", "m1", "pool-a", "10.0.0.1", None), ("grp <b>", "m/..", None, None, "m.example.com"),
             ("g.", "..", HOSTILE, None, None), ("g", "ünï", "p", "2001:db8::1", "h")]
    rows = []
    for i, (last, live, loan) in enumerate(itertools.product(lasts, livenesses, loans)):
        group, wid, pool, ip, fqdn = names[i % len(names)]
        row = FleetRow(worker_group=group, worker_id=f"{wid}{i}", fqdn=fqdn, ip=ip, pool=pool, last=last,
                       loan=loan, liveness=live)
        shown = last.state if last is not None else None
        if last is not None and i % 5 == 0:
            shown = "running"  # the queue's live state for a job still in it
        rows.append((row, shown))
    return rows


def _by_macro(rows: list[tuple[FleetRow, str | None]], pick: bool = False) -> str:
    template = template_environment().from_string(
        '{% import "_macros.html" as m with context %}{% for row, shown in rows %}'
        "{{ m.fleet_row(row, shown, pick) }}{% endfor %}")
    return template.render(rows=rows, now=NOW, ago=lambda ts: ago(ts, NOW), pick=pick)


def test_python_rows_are_the_macro_rows() -> None:
    rows = _rows()
    expected = _by_macro(rows)
    assert "&lt;script&gt;" in expected and "<script>" not in expected
    assert fleet_rows_html(rows, lambda ts: ago(ts, NOW), now=NOW) == expected
    cache = RowCache()
    for _ in range(2):  # the cached parts give the same HTML, the second time too
        assert fleet_rows_html(rows, lambda ts: ago(ts, NOW), cache, now=NOW) == expected
    picked = _by_macro(rows, pick=True)  # with a selection checkbox per row (the fleet page's batch form)
    assert picked.count('<td class="pick"><input type="checkbox" name="m" value="') == len(rows)
    assert 'value="grp &lt;b&gt;/m/..1"' in picked
    for _ in range(2):
        assert fleet_rows_html(rows, lambda ts: ago(ts, NOW), cache, now=NOW, pick=True) == picked
    assert fleet_rows_html(rows, lambda ts: ago(ts, NOW), cache, now=NOW) == expected
