"""
The rows of the C{/jobs} table, built in Python rather than by the
template (a hundred rows through Jinja2 macros cost several times the
rest of the page), and the finished ones kept: a finished job's row never
changes, so a page seen again is mostly dictionary lookups.

The markup is what C{templates/_macros.html} would write: C{m.state} for
the state badge and C{m.at(ts, "full")} for the time.
"""

from __future__ import annotations

from collections.abc import Iterable
from weakref import WeakKeyDictionary

from markupsafe import Markup, escape

from roller.jobs import iso
from roller.store.db import Database
from roller.store.history import JobRow
from roller.web import dashboard as _dash  # (a cycle: the dashboard imports this module's user)
from roller.web.times import utc

__all__ = ["RowCache", "row_html", "rows_html", "cache_of"]

_DASH = '<span class="muted">—</span>'


def _truncate(text: str, length: int = 120) -> str:
    """Jinja2's C{truncate} filter: cut at a word boundary, add '...'."""
    if len(text) <= length + 5:
        return text
    return text[: length - 3].rsplit(" ", 1)[0] + "..."


def row_html(j: JobRow) -> str:
    """One job's C{<tr>}."""
    e, d = escape, _dash
    state = j.state
    took = d.duration(j.finished_at - j.started_at) if j.finished_at and j.started_at else _DASH
    outcome = j.error or j.result or ""
    batch = _DASH
    if j.batch_id:
        batch = (f'<a href="{e(d.batch_url(j.batch_id))}"><code>{e(j.batch_id[-8:])}</code>'
                 '<span class="visually-hidden"> batch</span></a>')
    return (
        "<tr>\n"
        f'<td><a href="{e(d.job_url(j.id))}"><code>{e(j.id[-8:])}</code><span class="visually-hidden"> '
        f"({e(j.task_name)} on {e(j.worker_id)})</span></a></td>\n"
        f"<td>{e(j.task_name)}</td>\n"
        f'<td><a href="{e(d.machine_url(j.worker_group, j.worker_id))}">{e(j.worker_id)}</a> '
        f'<span class="muted">{e(j.worker_group)}</span></td>\n'
        f'<td><span class="state state-{e(state)}">{e(state.replace("_", " "))}</span></td>\n'
        f"<td>{e(j.requester)}</td>\n"
        f"<td>{batch}</td>\n"
        f'<td><time datetime="{iso(j.created_at)}" data-format="full" title="{utc(j.created_at)}">'
        f"{utc(j.created_at)}</time></td>\n"
        f"<td>{took}</td>\n"
        f'<td class="outcome">{e(_truncate(outcome)) if outcome else ""}</td>\n'
        "</tr>\n"
    )


class RowCache:
    """The rows of finished jobs, by (id, state, finished_at); emptied when it reaches C{size}."""

    def __init__(self, size: int = 5000):
        self.size = size
        self._rows: dict[tuple[str, str, float | None], str] = {}

    def row(self, j: JobRow) -> str:
        if not j.final:
            return row_html(j)
        key = (j.id, j.state, j.finished_at)
        html = self._rows.get(key)
        if html is None:
            if len(self._rows) >= self.size:
                self._rows.clear()
            html = self._rows[key] = row_html(j)
        return html


def rows_html(jobs: Iterable[JobRow], cache: RowCache) -> Markup:
    return Markup("".join(cache.row(j) for j in jobs))


#: one cache per database (job ids are unique only within one)
_caches: WeakKeyDictionary[Database, RowCache] = WeakKeyDictionary()


def cache_of(db: Database) -> RowCache:
    cache = _caches.get(db)
    if cache is None:
        cache = _caches[db] = RowCache()
    return cache
