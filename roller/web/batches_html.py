"""
The dashboard's side of batches (L{roller.batches}): what the fleet page's
selection form and the confirmation form mean, and how a batch's JSON
(L{roller.batches.model.batch_view}) is shown.

The fleet page's form (C{POST /batches}) names its machines either one by
one (checkboxes C{m} = C{"<worker_group>/<worker_id>"}) or, with C{all=1},
by the filter the page shows (C{f_q}, C{f_group}, C{f_pool}, C{f_state},
C{f_health}): then the batch's selector I{is} that filter, resolved by the
L{roller.batches.service.BatchService} when the batch is created, never
the ids of the page that was visible.  The confirmation page carries the
same fields on, plus the rollout limits (C{max_concurrent},
C{max_per_pool}, C{stop_after_failures}: blank is no limit), the reason
and C{include_loaned} / C{include_maintenance}.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from roller.batches.model import NO_POOL, Limit, Rollout
from roller.errors import BadRequest

__all__ = ["FILTER_FIELDS", "IBatches", "filter_selector", "form_request", "limit_fields", "MEMBERS_SHOWN"]

#: the fleet filter's fields, carried as C{f_<name>}
FILTER_FIELDS = ("q", "group", "pool", "state", "health")
#: members listed on a batch page (the API has them all)
MEMBERS_SHOWN = 2000
#: the rollout fields of the confirmation form
LIMIT_FIELDS = ("max_concurrent", "max_per_pool", "stop_after_failures")


class IBatches(Protocol):
    """What the dashboard and its live stream use of L{roller.batches.service.BatchService}."""

    def subscribe(self, listener: Any) -> Any: ...

    async def view(self, batch_id: str, *, members: bool = True) -> dict[str, Any] | None: ...


def filter_selector(values: Mapping[str, str | None]) -> dict[str, Any]:
    """
    The batch selector (JSON) of a fleet filter: C{q}, C{group}, C{pool} as
    they are, C{state} and C{health} as one-element lists; empty when no
    filter is set (a batch never selects the whole fleet by accident).
    """
    out: dict[str, Any] = {}
    for name in FILTER_FIELDS:
        value = values.get(name)
        if value:
            out[name] = [value] if name in ("state", "health") else value
    return out


def _one(form: Mapping[str, list[str]], name: str) -> str:
    values = form.get(name) or [""]
    return values[-1].strip()


def form_request(form: Mapping[str, list[str]]) -> tuple[dict[str, Any], list[tuple[str, str]], dict[str, str]]:
    """
    The batch request body (as C{POST /api/v1/batches} takes it) a fleet or
    confirmation form describes; the hidden fields that carry its selection
    on to the next form; and the limit fields as typed (C{{}} when the form
    had none: the configured defaults apply).  L{BadRequest} when it names
    no machine.
    """
    hidden: list[tuple[str, str]] = []
    if _one(form, "all") == "1":
        values = {name: _one(form, "f_" + name) or None for name in FILTER_FIELDS}
        selector: dict[str, Any] = filter_selector(values)
        if not selector:
            raise BadRequest("\"Select all matching\" needs a filter (a pool, a group, a search...): a batch never "
                             "selects the whole fleet by accident. Filter the fleet first, or tick the machines.",
                             code="invalid_form")
        hidden.append(("all", "1"))
        hidden.extend(("f_" + name, value) for name, value in values.items() if value)
    else:
        machines = []
        for value in dict.fromkeys(form.get("m", [])):
            group, sep, worker = value.partition("/")
            if not sep:
                raise BadRequest(f"{value[:140]!r} is not a machine (worker_group/worker_id)", code="invalid_form")
            machines.append({"worker_group": group, "worker_id": worker})
            hidden.append(("m", value))
        if not machines:
            raise BadRequest("No machine was selected: tick the machines to run the task on, or \"Select all "
                             "machines matching this filter\". Nothing was done.", code="invalid_form")
        selector = {"machines": machines}
    for flag in ("include_loaned", "include_maintenance"):
        if _one(form, flag) == "1":
            selector[flag] = True
    body: dict[str, Any] = {"task_name": _one(form, "task"), "selector": selector, "reason": _one(form, "reason")}
    typed: dict[str, str] = {}
    if any(name in form for name in LIMIT_FIELDS):
        rollout: dict[str, Any] = {}
        for name in LIMIT_FIELDS:
            raw = typed[name] = _one(form, name)
            if not raw:
                rollout[name] = None
            elif name == "stop_after_failures":
                rollout[name] = int(raw) if raw.isdigit() and len(raw) < 10 else raw
            else:
                rollout[name] = raw
        body["rollout"] = rollout
    return body, hidden, typed


def _limit_text(limit: Limit | None) -> str:
    return "" if limit is None else str(limit.to_json())


def limit_fields(rollout: Rollout) -> dict[str, str]:
    """A rollout as the confirmation form's fields (blank: no limit)."""
    return {
        "max_concurrent": _limit_text(rollout.max_concurrent),
        "max_per_pool": _limit_text(rollout.max_per_pool),
        "stop_after_failures": "" if rollout.stop_after_failures is None else str(rollout.stop_after_failures),
    }


def pool_rows(view: Mapping[str, Any], pool_sizes: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """
    The pools a batch (or dry run) touches: name, members, machines in the
    pool (when known) and how many of them may be out at once.
    """
    per_pool = (view.get("limits") or {}).get("max_per_pool") or {}
    rows = []
    for pool, count in (view.get("pools") or {}).items():
        rows.append({
            "pool": pool or None, "members": count,
            "size": (pool_sizes or {}).get(pool if pool else NO_POOL),
            "at_once": per_pool.get(pool),
        })
    return rows
