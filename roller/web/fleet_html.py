"""
The rows of the fleet table as HTML, built in Python.

The fleet page shows up to 200 machines.  Kept because it was measured
(issue 13, C{bench/dashboard.py}, 5000 machines, the README's benchmark
table): with this module the page costs 2.0-2.2 ms of server CPU; with the
same rows rendered by the C{fleet_row} Jinja2 macro of
C{templates/_macros.html}, 11.1-12.2 ms (5.5x; the threshold for dropping
this module was 1.2x).  Per row: the macro ~45 µs, this ~13 µs, and ~3 µs
for a row shown before (L{RowCache}).

Every value is HTML-escaped (L{markupsafe.escape} unless it is plain text);
the result is L{Markup} for the template to insert as is
(C{templates/fleet.html}).  It must stay byte for byte the HTML of the
C{fleet_row} macro (built from the C{state}, C{when} and C{error_line}
macros): C{tests/test_fleet_html.py} renders the same rows both ways.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from urllib.parse import quote

from attrs import frozen
from markupsafe import Markup, escape

from roller.jobs import iso
from roller.store.fleet import STRIP, FleetRow
from roller.web.times import utc

__all__ = ["PoolRow", "RowCache", "fleet_rows_html", "pool_strip", "truncate"]

#: a row's HTML up to its state badge (after its "<tr>" and selection cell), the "when" <time> opening,
#: its time, the error line, the liveness cell's opening and its time, and its selection cell
_Parts = tuple[str, str, float | None, str, str, float | None, str]

_DASH = '<span class="muted">—</span>'
#: text that HTML-escaping and URL-quoting leave as it is (worker ids, groups, pools, IPs, job ids)
_PLAIN = re.compile(r"[-_.:0-9A-Za-z]*")


#: characters HTML-escaping changes
_SPECIAL = re.compile("[&<>\"']")


def _h(value: object) -> str:
    """C{value} HTML-escaped as a template shows it (None as "None"; plain text costs one search)."""
    text = str(value)
    return text if _SPECIAL.search(text) is None else str(escape(text))


def _q(text: str) -> str:
    """C{text} as one URL path segment."""
    return text if _PLAIN.fullmatch(text) and text not in (".", "..") else quote(text, safe="")


def truncate(text: str, length: int = 160) -> str:
    """Like Jinja2's C{truncate} filter: cut at a word boundary, add '...'."""
    if len(text) <= length + 5:
        return text
    return text[: length - 3].rsplit(" ", 1)[0] + "..."


def _state(value: str | None) -> str:
    return (f'<span class="state state-{_h(value or "none")}">'
            f'{_h((value or "never run").replace("_", " "))}</span>')


def _liveness(row: FleetRow) -> tuple[str, float | None]:
    """The fixed start of the liveness cell (up to the "ago" text) and its time."""
    live = getattr(row, "liveness", None)
    if live is None:
        return "", None
    stamp = iso(live.at)
    word = "up" if live.up else "down"
    title = _h(truncate(live.detail, 120)) if live.detail else word
    return (f'<a href="/jobs/{_q(live.job_id)}" class="live live-{word}" title="{title}">{word}</a> '
            f'<time datetime="{stamp}" data-relative title="{utc(live.at)}">'), live.at


def _loan(row: FleetRow, now: float | None) -> str:
    loan = getattr(row, "loan", None)
    if loan is None:
        return _DASH
    stamp = iso(loan.expires_at)
    overdue = now is not None and loan.overdue(now)
    status = '<strong class="overdue">overdue</strong> ' if overdue else ""
    return (f'<span class="loan{" loan-overdue" if overdue else ""}">{status}{_h(loan.borrower)} until '
            f'<time datetime="{stamp}" data-format="date" title="{utc(loan.expires_at)}">'
            f'{utc(loan.expires_at, "date")}</time></span>')


def _parts(row: FleetRow) -> _Parts:
    """What of a row's HTML does not change with the time or the queue."""
    group, wid, last = row.worker_group, row.worker_id, row.last
    live_open, live_ts = _liveness(row)
    health = _h(row.health or "unknown")
    pick = (f'<td class="pick"><input type="checkbox" name="m" value="{_h(group)}/{_h(wid)}" '
            f'aria-label="Select {_h(wid)}"></td>\n')
    head = (f'<th scope="row"><a href="/machines/{_q(group)}/{_q(wid)}">'
            f'{_h(wid)}</a></th>\n<td><span class="health health-{health}">{health}</span></td>\n'
            f"<td>{_h(group)}</td>\n<td>{_h(row.pool or '—')}</td>\n"
            f'<td class="wide">{_h(row.ip or row.fqdn or "—")}</td>\n<td>')
    if last is None:
        return head + _DASH + "</td>\n<td>", "", None, "", live_open, live_ts, pick
    ts = last.finished_at or last.started_at or last.created_at
    stamp = iso(ts)
    error = f'<p class="error-line">{escape(truncate(last.error))}</p>' if last.error else ""
    return (f'{head}<a href="/jobs/{_q(last.id)}">{_h(last.task_name)}</a></td>\n<td>',
            f'<time datetime="{stamp}" data-relative title="{utc(ts)}">', ts, error, live_open, live_ts, pick)


class RowCache:
    """
    The fixed parts of rows already shown, by row: the fleet queries hand
    out the same (immutable) row object for a machine until a commit touches
    it (L{roller.store.fleet_rows.MachineRows}), found here by identity
    without hashing it, and equal ones after (a row compares by value), so a
    page seen again only adds its states and times.
    """

    def __init__(self, size: int = 20000):
        self.size = size
        self._parts: dict[FleetRow, _Parts] = {}
        self._same: dict[int, tuple[FleetRow, _Parts]] = {}  # by id(row), holding the row (its id stays its own)
        self._ago: dict[float, str] = {}  # "5 min ago" by time, for the current second
        self._ago_second: int | None = None

    def ago(self, ts: float, now: float, fmt: Callable[[float], str]) -> str:
        """C{fmt(ts)}, worked out once a second per time shown (pages are seen again and again)."""
        second = int(now)
        if second != self._ago_second or len(self._ago) >= self.size:
            self._ago.clear()
            self._ago_second = second
        text = self._ago.get(ts)
        if text is None:
            text = self._ago[ts] = fmt(ts)
        return text

    def parts(self, row: FleetRow) -> _Parts:
        same = self._same.get(id(row))
        if same is not None and same[0] is row:
            return same[1]
        parts = self._parts.get(row)
        if parts is None:
            if len(self._parts) >= self.size:
                self._parts.clear()
            parts = self._parts[row] = _parts(row)
        if len(self._same) >= self.size:
            self._same.clear()
        self._same[id(row)] = (row, parts)
        return parts


_STATES: dict[str | None, str] = {}


def fleet_rows_html(rows: Iterable[tuple[FleetRow, str | None]], ago: Callable[[float], str],
                    cache: RowCache | None = None, now: float | None = None, pick: bool = False) -> Markup:
    """
    C{<tr>} elements for C{rows}: pairs of a L{roller.store.fleet.FleetRow}
    and the state to show for its last job (the live one for jobs still in
    the queue).  C{now} decides which loans are overdue.  C{ago} must return
    plain text that needs no escaping (L{roller.web.dashboard.ago}: digits,
    letters and spaces); it is inserted as it is.  With C{pick}, each row
    starts with a checkbox C{m} = C{"<worker_group>/<worker_id>"} (the fleet
    page's selection for a batch).
    """
    parts = cache.parts if cache is not None else _parts
    if cache is not None and now is not None:
        fmt = ago
        ago = lambda ts: cache.ago(ts, now, fmt)  # noqa: E731
    out = []
    for row, state in rows:
        head, time_open, ts, error, live_open, live_ts, pick_cell = parts(row)
        head = ("<tr>\n" + pick_cell + head) if pick else ("<tr>\n" + head)
        live = f"{live_open}{ago(live_ts)}</time>" if live_ts is not None else _DASH
        tail = f"<td>{live}</td>\n<td>{_loan(row, now) if row.loan is not None else _DASH}</td>\n</tr>\n"
        badge = _STATES.get(state)
        if badge is None:
            badge = _state(state)
            if len(_STATES) < 64:
                _STATES[state] = badge
        if ts is None:
            out.append(f"{head}{badge}</td>\n<td>{_DASH}</td>\n{tail}")
        else:
            if error and state not in ("failed", "timed_out"):
                error = ""
            out.append(f"{head}{badge}{error}</td>\n<td>{time_open}{ago(ts)}</time></td>\n{tail}")
    return Markup("".join(out))


@frozen
class PoolRow:
    """One pool of the fleet page's strip: its machines, and how many are in each of L{STRIP}."""

    pool: str
    total: int
    counts: dict[str, int]

    def query(self, column: str) -> dict[str, str]:
        """The fleet filter that lists the machines counted in C{column}."""
        if column == "running":
            return {"pool": self.pool, "state": "running"}
        if column == "loaned":
            return {"pool": self.pool, "loan": "loaned"}
        return {"pool": self.pool, "health": column}


def pool_strip(pools: dict[str, dict[str, int]], running: dict[str, int]) -> list[PoolRow]:
    """
    The strip's rows from L{roller.store.fleet.FleetQueries.pools} and the
    machines running a job now by pool: health counts as recorded, "loaned"
    the machines with an active loan, "running" those the queue runs a job on.
    """
    out = []
    for pool, counts in pools.items():
        row = {c: counts.get(c, 0) for c in STRIP}
        row["loaned"] = counts.get("loaned_now", 0)
        row["running"] = running.get(pool, 0)
        out.append(PoolRow(pool, counts.get("total", 0), row))
    return out
