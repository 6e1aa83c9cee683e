"""
The one WHERE-clause builder of the store: optional filters, AND-ed, with
their parameters in order.

    w = Where()
    w.equal("worker_id", worker_id)          # skipped when None
    w.one_of("state", ["queued", "running"])  # skipped when empty
    w.contains(("worker_id", "fqdn"), q)      # case-insensitive substring; skipped when empty
    rows = c.execute(f"SELECT ... FROM jobs{w.clause} ORDER BY seq DESC LIMIT ?", [*w.args, limit])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: a value SQLite binds to a C{?}
Param = str | int | float | bytes | None


def like_pattern(text: str) -> str:
    """A C{LIKE ... ESCAPE '\\'} pattern matching C{text} anywhere, its C{%}, C{_} and C{\\} taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class Where:
    """Conditions AND-ed into one C{WHERE} clause, and the parameters of their C{?}s."""

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.args: list[Param] = []

    def add(self, condition: str, *args: Param) -> Where:
        """Any condition, with the values of its C{?}s."""
        self.conditions.append(condition)
        self.args.extend(args)
        return self

    def equal(self, column: str, value: Param) -> Where:
        """C{column = value}, unless C{value} is None (no filter)."""
        if value is not None:
            self.add(f"{column} = ?", value)
        return self

    def one_of(self, column: str, values: Iterable[Param]) -> Where:
        """C{column IN (values)}, unless there are none (no filter)."""
        values = list(values)
        if values:
            self.add(f"{column} IN ({', '.join('?' * len(values))})", *values)
        return self

    def contains(self, columns: Sequence[str], text: str | None) -> Where:
        """Any of C{columns} contains C{text} (SQLite's C{LIKE}: ASCII case-insensitive), unless it is empty."""
        if text:
            pattern = like_pattern(text)
            self.add("(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in columns) + ")", *[pattern] * len(columns))
        return self

    @property
    def clause(self) -> str:
        """C{" WHERE a AND b"}, or C{""} when there is no condition."""
        return " WHERE " + " AND ".join(self.conditions) if self.conditions else ""
