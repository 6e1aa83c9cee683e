"""
The batch operations and schemas of the OpenAPI document
(L{roller.web.openapi.openapi_document} merges them in): C{POST/GET
/api/v1/batches}, C{GET/DELETE /api/v1/batches/{batch_id}}, the request
L{roller.batches.model.parse_request} accepts and the JSON of
L{roller.batches.model.batch_view}.
"""

from __future__ import annotations

from roller.batches.model import _HEALTH, _LAST_STATES, _PERCENT, MAX_MEMBERS, MAX_PAUSE, BatchState, MemberState
from roller.inventory import TAG_RE
from roller.jobs import PRIORITY_MAX, PRIORITY_MIN
from roller.tasks import TaskRegistry
from roller.web.openapi import (
    REASON_MAX,
    WORKER_ID_PATTERN,
    Schema,
    _errors,
    _header,
    _int_query,
    _integer,
    _json_content,
    _json_response,
    _links,
    _nullable,
    _object,
    _op,
    _param,
    _params_schema,
    _preflight,
    _ref,
    _string,
    ecma_pattern,
)

__all__ = ["batch_paths", "batch_schemas"]

_TS = {"type": "string", "format": "date-time"}
_BATCH_LINKS = {"GetBatch": ("getBatch", ("batch_id",)), "CancelBatch": ("cancelBatch", ("batch_id",))}
_BOOL_QUERY = {"type": "string", "enum": ["true", "false", "1", "0", ""]}


def _batch_id_param() -> Schema:
    return _param("batch_id", "path", {"type": "string"}, "The batch's id (any other string is simply not found).")


def batch_paths(tasks: TaskRegistry, allowed: tuple[str, ...], secured_note: str) -> dict[str, Schema]:
    scopes = (" Scopes: `<prefix><task_name>` and `<prefix>batches:create` (a 403 names the one missing), "
              "checked before the selector is resolved.")
    location = {"Location": _header("The batch: `/api/v1/batches/{batch_id}`.",
                                    {"type": "string", "pattern": "^/api/v1/batches/"}, required=True)}
    return {
        "/api/v1/batches": {
            "post": _op(
                "createBatch", "Run a task on many machines, rolled out within limits", "batches",
                {"201": _json_response("Created: its members are persisted and the rollout has started.",
                                       _ref("Batch"), location, _links("", _BATCH_LINKS)),
                 "200": _json_response("`dry_run`: the batch as it would be (`batch_id` null, every member "
                                       "pending, `first_wave`: the members it would start at once); nothing "
                                       "was queued or written.", _ref("Batch")),
                 **_errors("400", "401", "403", "404", "415", "503")},
                parameters=[_param("dry_run", "query", _BOOL_QUERY,
                                   "`true`: resolve the selector and answer the batch it would be, without "
                                   "queueing or writing anything (same scopes).")],
                body={"required": True, "content": _json_content(_ref("BatchRequest"))},
                secured=True,
                description="The selector is resolved once, into a fixed list of members (loaned machines "
                            "and machines in maintenance are left out and listed in `excluded` unless "
                            "asked for); each member becomes an ordinary job carrying `batch_id`; a member "
                            "whose machine already has the task queued or running joins that job. 400 "
                            "`empty_selection` when no machine is left. Audited (`batch.create:<task>`). "
                            "404 `not_found` on a roller that runs no batches. " + secured_note + scopes,
            ),
            "get": _op(
                "listBatches", "Batches, newest first", "batches",
                {"200": _json_response("A page of batches (without their members).", _ref("BatchList")),
                 **_errors("400", "401", "403", "404", "503")},
                parameters=[_int_query("limit", 1, 1000, 50, "Page size"),
                            _int_query("before", 1, 2**62, None, "Batches older than this cursor (`next_before`)")],
                secured=True, description=secured_note + " Scope: `<prefix>jobs:read`.",
            ),
            "options": _preflight("preflightBatches"),
        },
        "/api/v1/batches/{batch_id}": {
            "get": _op(
                "getBatch", "A batch: its state, counts, progress and members", "batches",
                {"200": _json_response("The batch, live.", _ref("Batch")),
                 **_errors("400", "401", "403", "404", "503")},
                parameters=[_batch_id_param(),
                            _param("members", "query", _BOOL_QUERY, "`false`: leave the member list out.")],
                secured=True, description="404 `unknown_batch`. " + secured_note + " Scope: `<prefix>jobs:read`.",
            ),
            "delete": _op(
                "cancelBatch", "Cancel a batch", "batches",
                {"200": _json_response("The batch, cancelled.", _ref("Batch")),
                 **_errors("400", "401", "403", "404", "409", "503")},
                parameters=[_batch_id_param(),
                            _param("running", "query", {"type": "string", "enum": ["cancel", "true", "1", "false",
                                                                                   "0", ""]},
                                   "`cancel`: also cancel the batch's running jobs (by default they finish).")],
                secured=True,
                description="Members not started yet are skipped and the batch's own queued jobs cancelled "
                            "(a joined job, which existed before the batch, is left alone). 409 "
                            "`batch_finished` if every member already ended. Audited (`batch.cancel`). "
                            + secured_note + " Scope: `<prefix>jobs:cancel`.",
            ),
            "options": _preflight("preflightBatch", [_batch_id_param()]),
        },
    }


def _limit() -> Schema:
    return {
        "description": "a count, or a percentage (`\"25%\"`); null: no limit; left out: the configured default",
        "anyOf": [
            _integer(1, MAX_MEMBERS),
            {"type": "string", "pattern": "^[0-9]+$", "description": "a count as a string"},
            {"type": "string", "pattern": ecma_pattern(_PERCENT), "description": "a percentage above 0 and at "
                                                                                 "most 100"},
            {"type": "null"},
        ],
    }


def _names(pattern: str | None, enum: tuple[str, ...] | None, description: str) -> Schema:
    item: Schema = {"type": "string", "enum": list(enum)} if enum else _string(pattern)
    return {"description": description + " (one string is a list of one)",
            "anyOf": [{"type": "null"}, item, {"type": "array", "items": item, "maxItems": 100}]}


def batch_schemas(tasks: TaskRegistry, allowed: tuple[str, ...]) -> dict[str, Schema]:
    runnable = [name for name in dict.fromkeys(allowed) if name in tasks]
    machine = _object({"worker_group": _string(WORKER_ID_PATTERN), "worker_id": _string(WORKER_ID_PATTERN)},
                      ["worker_group", "worker_id"])
    include = {
        "include_loaned": {"type": "boolean", "default": False, "description": "keep loaned machines"},
        "include_maintenance": {"type": "boolean", "default": False, "description": "keep machines in maintenance"},
    }
    filters = ("group", "pool", "tags", "q", "health", "state")
    rollout_out = _object({
        "max_concurrent": {"type": ["integer", "string", "null"]},
        "max_per_pool": {"type": ["integer", "string", "null"]},
        "stop_after_failures": {"type": ["integer", "null"]},
        "pause_between": {"type": "number"},
    }, ["max_concurrent", "max_per_pool", "stop_after_failures", "pause_between"])
    member = _object({
        "worker_group": {"type": "string"}, "worker_id": {"type": "string"}, "pool": {"type": ["string", "null"]},
        "state": {"type": "string", "enum": [s.value for s in MemberState]},
        "task_id": {"type": ["string", "null"], "description": "its job, once started"},
        "joined": {"type": "boolean", "description": "its job existed before the batch (same task already "
                                                     "queued or running)"},
        "attempts": {"type": "integer", "minimum": 0},
        "started": {**_TS, "type": ["string", "null"]},
        "finished": {**_TS, "type": ["string", "null"]},
        "error": {"type": ["string", "null"]},
    }, ["worker_group", "worker_id", "pool", "state", "task_id", "joined", "attempts", "started", "finished",
        "error"], description="One machine of a batch and where its job stands.")
    counts = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
    batch_props: dict[str, Schema] = {
        "batch_id": {"type": ["string", "null"], "description": "null in a dry run"},
        "task_name": {"type": "string"},
        "params": {"type": "object"},
        "reason": {"type": "string"},
        "priority": _integer(PRIORITY_MIN, PRIORITY_MAX),
        "requester": {"type": "string"},
        "state": {"type": "string", "enum": [s.value for s in BatchState],
                  "description": "running; then succeeded (every member did), failed, halted (the circuit "
                                 "breaker tripped) or cancelled"},
        "created": _TS,
        "finished": {**_TS, "type": ["string", "null"]},
        "halt_reason": {"type": ["string", "null"], "description": "why it was halted or cancelled"},
        "selector": {"type": "object"},
        "rollout": rollout_out,
        "total": {"type": "integer", "minimum": 0},
        "limits": _object({
            "max_concurrent": {"type": "integer", "minimum": 0},
            "max_per_pool": {"type": ["object", "null"], "additionalProperties": {"type": "integer"},
                             "description": "members of each pool in flight at once"},
        }, ["max_concurrent", "max_per_pool"], description="the limits in force, as counts"),
        "counts": {**counts, "description": "members by state"},
        "progress": {"type": "number", "minimum": 0, "maximum": 1, "description": "members ended / total"},
        "pools": {**counts, "description": "members by pool (`\"\"`: no pool)"},
        "excluded": {"type": "array", "items": _object({
            "worker_group": {"type": "string"}, "worker_id": {"type": "string"}, "reason": {"type": "string"}},
            ["worker_group", "worker_id", "reason"])},
        "members": {"type": "array", "items": _ref("BatchMember"), "description": "in rollout order"},
        "dry_run": {"type": "boolean"},
        "first_wave": {"type": "array", "items": _object({
            "worker_group": {"type": "string"}, "worker_id": {"type": "string"},
            "pool": {"type": ["string", "null"]}}, ["worker_group", "worker_id", "pool"]),
            "description": "dry run: the members it would start at once"},
    }
    required = [k for k in batch_props if k not in ("members", "dry_run", "first_wave")]
    return {
        "BatchRequest": _object({
            "task_name": {"type": "string", "enum": runnable},
            "params": {"description": "the task's parameters (see GET /api/v1/tasks); null for the defaults",
                       **_params_schema(tasks, allowed)},
            "reason": {"type": "string", "maxLength": REASON_MAX},
            "priority": _integer(PRIORITY_MIN, PRIORITY_MAX),
            "selector": _ref("BatchSelector"),
            "rollout": _nullable(_ref("BatchRollout")),
        }, ["task_name", "selector"], description="A batch: the task, its parameters, which machines and how."),
        "BatchSelector": {
            "description": "Which machines: `machines` (an explicit list, kept in its order), or a filter "
                           "(every given field must match; `tags`: all of them; `health`, `state`: any of them) "
                           "with at least one field.",
            "anyOf": [
                _object({"machines": {"type": "array", "items": machine, "minItems": 1, "maxItems": MAX_MEMBERS},
                         **include}, ["machines"]),
                {**_object({
                    "group": _nullable(_string(WORKER_ID_PATTERN, "worker group")),
                    "pool": _nullable(_string(TAG_RE.pattern, "pool")),
                    "tags": _names(TAG_RE.pattern, None, "tags the machine has, all of them"),
                    "q": {"type": ["string", "null"], "maxLength": 200,
                          "description": "substring of the worker id, fqdn or ip"},
                    "health": _names(None, _HEALTH, "health states"),
                    "state": _names(None, _LAST_STATES, "the state of the machine's last job (`none`: never had one)"),
                    **include,
                }), "anyOf": [{"required": [name]} for name in filters]},
            ],
        },
        "BatchRollout": _object({
            "max_concurrent": _limit(),
            "max_per_pool": {**_limit(), "description": "a count, or a percentage of each pool's machines in the "
                                                        "inventory; null: no limit"},
            "stop_after_failures": {"description": "halt after this many failed members; null: never",
                                    "anyOf": [_integer(1, MAX_MEMBERS), {"type": "null"}]},
            "pause_between": {"description": "seconds between two member starts",
                              "anyOf": [{"type": "number", "minimum": 0, "maximum": MAX_PAUSE}, {"type": "null"}]},
        }, description="How the members are started; a key left out takes the configured default (batches.*)."),
        "BatchMember": member,
        "Batch": _object(batch_props, required, description="A batch, its limits in force, counts by state, "
                                                             "progress and members."),
        "BatchList": _object({
            "batches": {"type": "array", "items": _ref("Batch")},
            "next_before": {"type": ["integer", "null"], "minimum": 1,
                            "description": "pass as `before` for the next (older) page; null on the last"},
        }, ["batches", "next_before"]),
    }
