"""
The fleet page's rows, kept per machine between commits.

A busy fleet commits all the time (jobs start and end, the health sweep
records findings), and the fleet page used to read its 200 rows again after
every commit: a few index lookups per machine, per view.  L{MachineRows}
keeps each machine's row as it was read and, when the database changed,
works out which machines the change touched with a few cheap statements
(L{MachineRows.sync}), forgetting only those:

- jobs: those added since (C{seq} above the highest seen) and those whose
  queued or running state changed (the C{jobs_state} index holds the
  unfinished ones): the machine's last job or newest ping;
- loans: the active ones (a handful, by index): lent, returned, extended;
- health: the transitions recorded since (the health watcher records one
  with every change of state); when more machines have a health row, the
  recorded state of the rows kept without one is read (fewer: every row is
  forgotten);
- the inventory: each row remembers the machine it was read for
  (C{store.machines.cached}, which follows roller's own changes at once and
  other processes' at the next inventory refresh), and is read again when
  that machine is no longer equal;
- the history pruned (the oldest finished job of some state rose) forgets
  every row.

A row is read again only when it is shown after that.  Everything runs on
the database thread, under the caller's lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from roller.store.db import Cursor, key_values

__all__ = ["MachineRows"]

Key = tuple[str, str]
R = TypeVar("R")

_HEALTH_ROWS = "SELECT count(*) FROM health"
#: the oldest finished job of each state, through the jobs_state index: one that rose means jobs were
#: deleted (the history pruned, oldest first); finished jobs never change state
_LOWEST = "SELECT " + ", ".join(
    f"(SELECT min(seq) FROM jobs WHERE state = '{s}')"
    for s in ("succeeded", "failed", "cancelled", "timed_out", "interrupted"))


class MachineRows(Generic[R]):
    """
    Rows by machine C{(worker_group, worker_id)}, read with C{fetch(cursor,
    keys) -> {key: row}} when missing and forgotten when L{sync} finds their
    machine changed.
    """

    def __init__(self, fetch: Callable[[Cursor, list[Key]], dict[Key, R]], size: int = 100_000, *,
                 inventory: Callable[[Key], Any] | None = None):
        self._fetch = fetch
        self.size = size
        self._inventory = inventory
        self._rows: dict[Key, R] = {}
        self._machines: dict[Key, Any] = {}  # the inventory's machine each row was read for
        self._no_health: set[Key] = set()  # the rows kept with no recorded health
        self._version: Any = None
        self._max_seq: int | None = None
        self._min_seq: tuple[Any, ...] | None = None
        self._active: dict[int, tuple[str, Key]] = {}
        self._loans: dict[Key, tuple[Any, ...]] = {}
        self._health_rows: int | None = None
        self._transition: int | None = None
        #: machines forgotten because they changed, and times every row was forgotten (for tests and benchmarks)
        self.changed = 0
        self.cleared = 0

    def __len__(self) -> int:
        return len(self._rows)

    def forget_all(self) -> None:
        self._rows.clear()
        self._machines.clear()
        self._no_health.clear()
        self.cleared += 1

    def sync(self, c: Cursor, version: Any) -> None:
        """
        Forget the rows of the machines changed since the last call.
        C{version} (L{roller.store.db.data_version}, read before this) says
        whether anything was committed at all.
        """
        if version == self._version:
            return
        self._version = version
        dirty: set[Key] = set()
        wholesale = False
        # jobs added since, and the unfinished ones that moved on
        if self._max_seq is None:
            top = c.execute("SELECT max(seq) FROM jobs").fetchone()[0]
            self._max_seq = top if top is not None else 0
        else:
            for seq, g, w in c.execute("SELECT seq, worker_group, worker_id FROM jobs WHERE seq > ?",
                                       (self._max_seq,)).fetchall():
                dirty.add((g, w))
                self._max_seq = max(self._max_seq, seq)
        active = {r[0]: (r[1], (r[2], r[3])) for r in c.execute(
            "SELECT seq, state, worker_group, worker_id FROM jobs WHERE state IN ('queued', 'running')").fetchall()}
        for seq in self._active.keys() | active.keys():
            before, now = self._active.get(seq), active.get(seq)
            if before != now:
                dirty.add((before or now)[1])  # type: ignore[index]  # (one of them is set)
        self._active = active
        low = tuple(c.execute(_LOWEST).fetchone())
        if self._min_seq is not None and any(before is not None and (now is None or now > before)
                                             for before, now in zip(self._min_seq, low, strict=True)):
            wholesale = True
        self._min_seq = low
        # active loans
        loans = {(r[0], r[1]): tuple(r[2:]) for r in c.execute(
            "SELECT worker_group, worker_id, id, borrower, expires_at FROM loans WHERE returned_at IS NULL").fetchall()}
        for key in self._loans.keys() | loans.keys():
            if self._loans.get(key) != loans.get(key):
                dirty.add(key)
        self._loans = loans
        # recorded health: the transitions since, or every state when machines gained or lost their row
        if self._transition is None:
            top = c.execute("SELECT max(id) FROM health_transitions").fetchone()[0]
            self._transition = top if top is not None else 0
        else:
            for tid, g, w in c.execute("SELECT id, worker_group, worker_id FROM health_transitions WHERE id > ?",
                                       (self._transition,)).fetchall():
                dirty.add((g, w))
                self._transition = max(self._transition, tid)
        health_rows = c.execute(_HEALTH_ROWS).fetchone()[0]
        if self._health_rows is not None and health_rows < self._health_rows:
            wholesale = True
        elif self._health_rows is not None and health_rows > self._health_rows:
            dirty.update(self._gained_health(c))
        self._health_rows = health_rows
        if wholesale:
            self.forget_all()
            return
        for key in dirty:
            self._machines.pop(key, None)
            self._no_health.discard(key)
            if self._rows.pop(key, None) is not None:
                self.changed += 1

    def _gained_health(self, c: Cursor) -> set[Key]:
        """The machines kept with no recorded health (a row's C{health} None) that have some now."""
        out: set[Key] = set()
        for values, args in key_values(list(self._no_health)):
            out.update((r[0], r[1]) for r in c.execute(
                f"WITH k(g, w) AS (VALUES {values}) SELECT h.worker_group, h.worker_id FROM k"
                " JOIN health h ON h.worker_group = k.g AND h.worker_id = k.w", args).fetchall())
        return out

    def get(self, c: Cursor, keys: Iterable[Key]) -> list[R]:
        """The rows of C{keys}, in order (reading those not kept); machines that do not exist are left out."""
        keys = list(keys)
        inventory, kept = self._inventory, self._machines
        if inventory is not None:  # a row read for a machine since edited (or removed) is read again
            for k in keys:
                if k in self._rows:
                    m = inventory(k)
                    if m is not kept.get(k):
                        if m == kept.get(k):
                            kept[k] = m  # (the inventory reloaded: the same machine, a new object)
                        else:
                            del self._rows[k]
                            self._no_health.discard(k)
                            self.changed += 1
        missing = [k for k in keys if k not in self._rows]
        if missing:
            found = self._fetch(c, missing)
            if len(self._rows) + len(found) > self.size:
                self.forget_all()
            self._rows.update(found)
            self._no_health.update(k for k, row in found.items() if getattr(row, "health", None) is None)
            if inventory is not None:
                for k in found:
                    kept[k] = inventory(k)
            out = []
            for k in keys:
                row = self._rows.get(k)
                if row is None:
                    row = found.get(k)
                if row is not None:
                    out.append(row)
            return out
        return [self._rows[k] for k in keys]
