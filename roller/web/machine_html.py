"""
The machine page's two tables (its recent jobs, its audit entries) as HTML
rows built in Python.

With a long history every machine page shows 25 jobs and 50 audit entries.
Rendered through the C{state}, C{when} and C{error_line} macros those rows
were most of the page's time: bench/history.py (1 000 000 jobs, a quiet
machine) measured the page at p50 6.4-7.3 ms before, and the queries
behind it at 0.3 ms each.  As for the fleet table (L{roller.web.fleet_html},
whose helpers these rows share), each value is HTML-escaped and the rows
must stay byte for byte what the macros make: C{tests/test_machine_html.py}
renders the same rows both ways.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from urllib.parse import quote

from markupsafe import Markup, escape

from roller.jobs import Job
from roller.store import AuditEntry
from roller.timetext import iso_and_full
from roller.web.fleet_html import _DASH, _h, _state, truncate

__all__ = ["audit_rows_html", "job_rows_html"]

#: the states whose error line a job row shows
_FAILED = ("failed", "timed_out", "interrupted")


def _when(ts: float | None, ago: Callable[[float], str]) -> str:
    """The C{when} macro: C{ago} must return plain text (L{roller.web.dashboard.ago}: digits and words)."""
    if not ts:
        return _DASH
    stamp, full = iso_and_full(ts)
    return f'<time datetime="{stamp}" data-relative title="{full}">{ago(ts)}</time>'


def job_rows_html(jobs: Iterable[Job], ago: Callable[[float], str], duration: Callable[[float], str]) -> Markup:
    """C{<tr>} elements for C{jobs}: task (linked), state and error, requester, created, time taken."""
    out = []
    for j in jobs:
        state = j.state.value
        error = (f'<p class="error-line">{escape(truncate(j.error))}</p>'
                 if state in _FAILED and j.error else "")
        took = _h(duration(j.finished_at - j.started_at)) if j.finished_at and j.started_at else "—"
        out.append(f'<tr>\n<td><a href="/jobs/{quote(j.id, safe="")}">{_h(j.task_name)}</a></td>\n'
                   f"<td>{_state(state)}{error}</td>\n<td>{_h(j.requester)}</td>\n"
                   f"<td>{_when(j.created_at, ago)}</td>\n<td>{took}</td>\n</tr>\n")
    return Markup("".join(out))


def audit_rows_html(entries: Iterable[AuditEntry], ago: Callable[[float], str]) -> Markup:
    """C{<tr>} elements for C{entries}: when, who (and from where), action, result."""
    out = []
    for a in entries:
        source = f' <span class="muted">from {_h(a.source_ip)}</span>' if a.source_ip else ""
        out.append(f"<tr><td>{_when(a.time, ago)}</td><td>{_h(a.actor)}{source}</td>"
                   f"<td>{_h(a.action)}</td><td>{_h(a.result)}</td></tr>\n")
    return Markup("".join(out))
