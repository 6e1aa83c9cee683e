"""
Jobs newest first, filtered, through the jobs table's indexes: what the
API's job list and the C{/jobs} page ask for, read without walking the
history.

Each filter is answered by one or more index walks, each an equality on an
index's leading columns and then C{seq} downwards, stopping after a page;
several walks are merged (L{newest}):

- a batch: C{jobs_batch} (batch_id, seq);
- a machine: C{jobs_machine} (worker_id, worker_group, seq), or
  C{jobs_machine_task} with a task; a worker id without its group, one walk
  per group it has jobs in (L{groups_of}: an index probe per group);
- a task: C{jobs_task_state} (task_name, state, seq), one walk per state
  asked for (every state when none is);
- states: C{jobs_state} (state, seq), one walk per state;
- a worker group alone: C{jobs_group} (worker_group, seq);
- nothing: the primary key.

The other filters are checked on the rows a walk reads (within one
machine's, one batch's, one task's or one state's jobs).  They are written
as expressions (C{CAST(state AS TEXT)}) so that SQLite's planner, which has
no statistics, never walks their index instead of the leading one's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attrs import frozen

from roller.jobs import State
from roller.store.db import Cursor
from roller.store.where import Param, Where

__all__ = ["JobFilter", "STATES", "groups_of", "leads", "newest"]

#: every state a job can be in
STATES = tuple(s.value for s in State)


@frozen
class JobFilter:
    """C{None} (or empty) is no filter."""

    worker_id: str | None = None
    worker_group: str | None = None
    task_name: str | None = None
    states: tuple[str, ...] = ()
    batch_id: str | None = None


def _checked(column: str) -> str:
    """C{column} as an expression: checked on the rows read, never an index to walk."""
    return f"CAST({column} AS TEXT)"


def groups_of(c: Cursor, worker_id: str) -> list[str]:
    """The worker groups with jobs of worker C{worker_id}: one C{jobs_machine} probe per group."""
    groups: list[str] = []
    sql = "SELECT worker_group FROM jobs WHERE worker_id = ? ORDER BY worker_group LIMIT 1"
    args: list[Param] = [worker_id]
    while (r := c.execute(sql, args).fetchone()) is not None:
        groups.append(r[0])
        sql = "SELECT worker_group FROM jobs WHERE worker_id = ? AND worker_group > ? ORDER BY worker_group LIMIT 1"
        args = [worker_id, r[0]]
    return groups


def leads(c: Cursor, f: JobFilter) -> tuple[list[Where], Where]:
    """
    The index walks answering C{f} (their leading equalities) and the
    conditions left to check on the rows they read.
    """
    rest = Where()
    states = list(dict.fromkeys(f.states))  # (a state asked for twice is walked once)
    if f.batch_id is not None:
        walks = [Where().equal("batch_id", f.batch_id)]
        rest.equal(_checked("worker_id"), f.worker_id).equal(_checked("worker_group"), f.worker_group)
        rest.equal(_checked("task_name"), f.task_name).one_of(_checked("state"), states)
    elif f.worker_id is not None:
        groups = [f.worker_group] if f.worker_group is not None else groups_of(c, f.worker_id)
        walks = [Where().equal("worker_id", f.worker_id).equal("worker_group", g).equal("task_name", f.task_name)
                 for g in groups]
        rest.one_of(_checked("state"), states)
    elif f.task_name is not None:
        walks = [Where().equal("task_name", f.task_name).equal("state", s) for s in (states or STATES)]
        rest.equal(_checked("worker_group"), f.worker_group)
    elif states:
        walks = [Where().equal("state", s) for s in states]
        rest.equal(_checked("worker_group"), f.worker_group)
    else:
        walks = [Where().equal("worker_group", f.worker_group)]  # (no group: the primary key)
    return walks, rest


def newest(c: Cursor, select: str, f: JobFilter, *, before: int | None = None, since: int | None = None,
           limit: int, extra: Where | None = None) -> list[Any]:
    """
    The rows of C{select} (C{"SELECT seq, ... FROM jobs"}: C{seq} first)
    of the jobs matching C{f} and C{extra}, with C{since <= seq < before},
    newest first, at most C{limit}.
    """
    walks, rest = leads(c, f)
    rows: list[Any] = []
    for walk in walks:
        conditions: list[str] = [*walk.conditions, *rest.conditions, *(extra.conditions if extra else ())]
        args: list[Param] = [*walk.args, *rest.args, *(extra.args if extra else ())]
        for bound, cond in ((before, "seq < ?"), (since, "seq >= ?")):
            if bound is not None:
                conditions.append(cond)
                args.append(bound)
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        rows += c.execute(f"{select}{where} ORDER BY seq DESC LIMIT ?", [*args, limit]).fetchall()
    if len(walks) > 1:
        rows.sort(key=_seq, reverse=True)
    return rows[:limit]


def _seq(row: Sequence[Any]) -> int:
    return int(row[0])
