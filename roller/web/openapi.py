"""
The OpenAPI 3.1 document for the REST API, served at C{/api/v1/openapi.json}.

It describes exactly what L{roller.web.api.Api} does: every route and
method, every query parameter with its type and bounds, every status an
operation can answer with, and the JSON bodies (L{roller.jobs.Job.to_json},
L{roller.inventory.Machine.to_json} / C{from_json},
L{roller.tasks.base.TaskSpec.to_json}).  It is built from Python dicts by
the small helpers below; C{tests/test_openapi.py} checks it against the
Klein routes and runs schemathesis against a live roller.

Patterns and enums are taken from the modules that validate them, so the
document cannot drift from the code that enforces it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from roller.inventory import (
    BRIDGE_ARG_RE,
    CREDENTIAL_RE,
    EMAIL_RE,
    HOSTNAME_RE,
    NOTES_MAX,
    OUTLET_RE,
    PDU_MODELS,
    REBOOT_METHODS,
    REDFISH_URL_RE,
    SSH_USER_RE,
    TAG_RE,
    VM_UUID_RE,
    WORKER_ID_RE,
    XEN_URL_RE,
)
from roller.jobs import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN, State
from roller.store.fleet import HEALTH_STATES
from roller.tasks import TaskRegistry

__all__ = ["openapi_document", "WORKER_ID_PATTERN"]

Schema = dict[str, Any]

WORKER_ID_PATTERN = WORKER_ID_RE.pattern  # ^[-_0-9a-zA-Z]{1,128}$
BATCH_ID_PATTERN = "^[-_0-9a-zA-Z]{1,64}$"  # roller.web.api._BATCH_ID
STATES = [s.value for s in State]
REASON_MAX = 1000

def _space_class() -> str:
    """
    Python's C{\\s} for str patterns (and C{str.strip}'s whitespace): every
    character whose C{isspace()} is true, as ranges for a character class.
    ECMA-262's C{\\s}, which OpenAPI patterns use, is a different set (it
    has U+FEFF, lacks U+001C-U+001F and U+0085), so the patterns below spell
    Python's out.  None is above U+3000.
    """
    spaces = [c for c in range(0x3001) if chr(c).isspace()]
    runs: list[list[int]] = []
    for c in spaces:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in runs)


PY_SPACE = _space_class()
_NOT_SPACE = f"[^{PY_SPACE}]"



def ecma_pattern(regex: re.Pattern[str]) -> str:
    """
    C{regex}'s pattern as an OpenAPI (ECMA-262) pattern: Python's C{\\s} and
    C{\\S} spelled out (L{PY_SPACE}), inside a character class or not.
    """
    out, in_class, i, text = [], False, 0, regex.pattern
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            pair = text[i:i + 2]
            if pair == r"\s":
                out.append(PY_SPACE if in_class else f"[{PY_SPACE}]")
            elif pair == r"\S":
                if in_class:
                    raise ValueError(f"cannot spell \\S inside a character class: {text}")
                out.append(_NOT_SPACE)
            else:
                out.append(pair)
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


# The regular expressions roller.inventory validates with, for OpenAPI.
SSH_USER_PATTERN = ecma_pattern(SSH_USER_RE)
BRIDGE_ARG_PATTERN = ecma_pattern(BRIDGE_ARG_RE)
OUTLET_PATTERN = ecma_pattern(OUTLET_RE)
REDFISH_URL_PATTERN = ecma_pattern(REDFISH_URL_RE)
XEN_URL_PATTERN = ecma_pattern(XEN_URL_RE)
VM_UUID_PATTERN = ecma_pattern(VM_UUID_RE)
EMAIL_PATTERN = ecma_pattern(EMAIL_RE)

#: Values C{Machine.from_json} treats as "empty" where it reads C{value or
#: default} (C{notes}, C{ipmi.bridge}): every JSON value Python finds false.
FALSY: list[Any] = [None, False, 0, "", [], {}]


# ----------------------------------------------------------------- helpers


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _response_ref(name: str) -> Schema:
    return {"$ref": f"#/components/responses/{name}"}


def _nullable(schema: Schema) -> Schema:
    """C{schema} or C{null} (JSON Schema 2020-12: a list of types)."""
    if "type" in schema and isinstance(schema["type"], str):
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _string(pattern: str | None = None, description: str = "", **extra: Any) -> Schema:
    out: Schema = {"type": "string", **extra}
    if pattern is not None:
        out["pattern"] = pattern
    if description:
        out["description"] = description
    return out


def _integer(low: int, high: int, description: str = "", **extra: Any) -> Schema:
    out: Schema = {"type": "integer", "minimum": low, "maximum": high, **extra}
    if description:
        out["description"] = description
    return out


def _object(properties: dict[str, Schema], required: Iterable[str] = (), *, closed: bool = True,
            description: str = "", nullable: bool = False) -> Schema:
    out: Schema = {"type": ["object", "null"] if nullable else "object", "properties": properties}
    required = list(required)
    if required:
        out["required"] = required
    if closed:
        out["additionalProperties"] = False
    if description:
        out["description"] = description
    return out


def _list_or_csv(item_pattern: str, description: str, item_enum: list[str] | None = None) -> Schema:
    """
    What C{roller.inventory._str_list} accepts: null, a list of strings, or
    one string of comma-separated items (blank items and surrounding
    whitespace ignored).
    """
    item: Schema = {"type": "string", "enum": item_enum} if item_enum else _string(item_pattern)
    core = item_pattern.strip("^$")
    if item_enum:
        core = "(?:" + "|".join(item_enum) + ")"
    else:
        core = f"(?:{core})"
    ws = f"[{PY_SPACE}]*"  # str.strip()
    csv = rf"^{ws}(?:{core}{ws})?(?:,{ws}(?:{core}{ws})?)*$"
    return {
        "description": description,
        "anyOf": [
            {"type": "null"},
            {"type": "array", "items": item},
            {"type": "string", "pattern": csv, "description": "comma-separated (legacy form)"},
        ],
    }


def _param(name: str, where: str, schema: Schema, description: str, *, required: bool = False,
           **extra: Any) -> Schema:
    return {"name": name, "in": where, "required": required or where == "path",
            "description": description, "schema": schema, **extra}


def _json_content(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _json_response(description: str, schema: Schema, headers: dict[str, Schema] | None = None,
                   links: dict[str, Schema] | None = None) -> Schema:
    out: Schema = {"description": description, "content": _json_content(schema)}
    if headers:
        out["headers"] = headers
    if links:
        out["links"] = links
    return out


def _links(pointer: str, targets: Mapping[str, tuple[str, tuple[str, ...]]]) -> dict[str, Schema]:
    """
    Links from a response body to other operations: C{{name: (operationId,
    path parameters)}}, each parameter read from C{pointer}/<name> in the body.
    """
    return {
        name: {"operationId": op_id,
               "parameters": {p: f"$response.body#{pointer}/{p}" for p in params}}
        for name, (op_id, params) in targets.items()
    }


_JOB_LINKS = {"GetJob": ("getJob", ("task_id",)), "CancelJob": ("cancelJob", ("task_id",))}
_MACHINE = ("worker_group", "worker_id")
_MACHINE_LINKS = {
    "GetMachine": ("getMachine", _MACHINE),
    "PutMachine": ("putMachine", _MACHINE),
    "DeleteMachine": ("deleteMachine", _MACHINE),
    "CreateWorkerJob": ("createWorkerJob", _MACHINE),
}


def _header(description: str, schema: Schema | None = None, *, required: bool = False) -> Schema:
    return {"description": description, "required": required, "schema": schema or {"type": "string"}}


#: Statuses the HTTP layer (roller.web.http.RollerSite) may answer any
#: request with before the route is reached.
_TRANSPORT = ("400", "408", "413", "414", "421", "431")

#: The shared error responses: {status: (component name, description with the error codes)}.
_ERRORS: dict[str, tuple[str, str]] = {
    "400": ("BadRequest", "Bad input (`missing_parameter`, `invalid_query`, `invalid_worker_id`, "
            "`unknown_task`, `task_not_allowed`, `invalid_body`, `empty_selection` (a batch left with no "
            "machine), `invalid_json`, `bad_json` (nested deeper "
            "than 32 levels), `missing_body`, `invalid`), or an unparsable HTTP request (`bad_request`)."),
    "401": ("Unauthorized", "Missing or invalid Hawk credentials (`unauthorized`, `auth_not_configured`)."),
    "403": ("Forbidden", "The credentials lack the required scope (`insufficient_scope`), or a call that "
            "changes something came from a web page on another origin (`cross_site_request`)."),
    "404": ("NotFound", "No such resource (`unknown_machine`, `unknown_job`, `unknown_batch`, `not_found`)."),
    "408": ("RequestTimeout", "The request's headers or body did not arrive within `server.header_timeout` / "
            "`server.body_timeout` (`request_timeout`); the connection is closed."),
    "409": ("Conflict", "Conflict with the current state (`ambiguous_worker`, `job_finished`, "
            "`machine_exists`, `batch_finished`)."),
    "413": ("PayloadTooLarge", "The request body is larger than the configured maximum (`payload_too_large`)."),
    "414": ("UriTooLong", "The request target is longer than the configured maximum (`uri_too_long`)."),
    "421": ("MisdirectedRequest", "The `Host` header names a host this roller does not answer for "
            "(`bad_host`; see `server.allowed_hosts`)."),
    "429": ("TooManyRequests", "This client sent more Hawk requests within the replay window than "
            "`auth.max_requests_per_client` allows (`too_many_requests`); only this client is refused. "
            "`Retry-After` says when to retry."),
    "415": ("UnsupportedMediaType", "A request body that is not `application/json` (`unsupported_media_type`)."),
    "431": ("HeadersTooLarge", "Request headers too large or too many (`headers_too_large`)."),
    "503": ("Unavailable", "roller is shutting down and accepts no new jobs (`shutting_down`), or cannot "
            "verify credentials now: the Taskcluster auth service is unreachable, too slow or answers "
            "wrongly (`auth_unavailable`), or its database cannot take a write now: locked, full or read-only "
            "(`storage_unavailable`, with `Retry-After`). Nothing was done; retry later."),
}


def _errors(*statuses: str) -> dict[str, Schema]:
    """The shared error responses for C{statuses} plus the transport ones."""
    with_auth = ("429",) if "401" in statuses else ()  # a Hawk client over its budget
    return {s: _response_ref(_ERRORS[s][0]) for s in sorted({*statuses, *with_auth, *_TRANSPORT})}


def _error_components() -> dict[str, Schema]:
    out = {}
    for status, (name, description) in _ERRORS.items():
        response = _json_response(description, _ref("Error"))
        if status == "401":
            response["headers"] = {"WWW-Authenticate": _header(
                "The authentication scheme to use.", {"type": "string", "const": "Hawk"}, required=True)}
        out[name] = response
    return out


_HAWK: list[dict[str, list[str]]] = [{"hawk": []}]


def _op(operation_id: str, summary: str, tag: str, responses: dict[str, Schema], *,
        parameters: list[Schema] | None = None, body: Schema | None = None,
        secured: bool = False, description: str = "") -> Schema:
    out: Schema = {"operationId": operation_id, "summary": summary, "tags": [tag]}
    if description:
        out["description"] = description
    if parameters:
        out["parameters"] = parameters
    if body is not None:
        out["requestBody"] = body
    out["security"] = _HAWK if secured else []
    out["responses"] = responses
    return out


def _preflight(operation_id: str, parameters: list[Schema] | None = None) -> Schema:
    """
    The CORS preflight: always C{204}; the C{Access-Control-*} headers only
    when the request's C{Origin} is one of the configured origins.  Path
    parameters are not validated here.
    """
    return _op(
        operation_id, "CORS preflight", "cors", {
            "204": {
                "description": "Preflight answered. The Access-Control headers are present only for a "
                               "configured Origin.",
                "headers": {
                    "Access-Control-Allow-Origin": _header("The request's Origin, when it is allowed."),
                    "Access-Control-Allow-Methods": _header("`GET, POST, PUT, DELETE, OPTIONS`."),
                    "Access-Control-Allow-Headers": _header("`Authorization, Content-Type`."),
                    "Access-Control-Max-Age": _header("`600`.", {"type": "string", "pattern": "^[0-9]+$"}),
                    "Vary": _header("`Origin`."),
                },
            },
            # A path parameter that does not fill its segment misses the route.
            **(_errors("404") if parameters else _errors()),
        },
        parameters=parameters,
        description="Answers a CORS preflight (`Access-Control-Request-Method`) for the configured "
                    "origins.",
    )


# ----------------------------------------------------------------- schemas


def _host_schema(description: str) -> Schema:
    return {
        "description": description,
        "anyOf": [
            _string(HOSTNAME_RE.pattern, "a host name or an IPv4 address"),
            {"type": "string", "format": "ipv6"},
        ],
    }


def _port(default: int) -> Schema:
    return _nullable(_integer(1, 65535, f"TCP/UDP port (default {default})"))


def _credential() -> Schema:
    return _nullable(_string(CREDENTIAL_RE.pattern, "the name of a credential in the secrets file, "
                                                     "never the secret itself"))


def _access_input_schemas() -> dict[str, Schema]:
    """The access sub-objects as C{Machine.from_json} accepts them."""
    return {
        "SshAccessInput": _object({
            "user": _nullable(_string(SSH_USER_PATTERN, "the login user")),
            "port": _port(22),
            "credential": _credential(),
            "host_key_policy": {"type": ["string", "null"], "enum": ["strict", "accept-new", None],
                                "description": "null: the global policy"},
        }, description="How to reach the machine over SSH."),
        "IpmiAccessInput": _object({
            "host": _host_schema("the BMC"),
            "port": _port(623),
            "credential": _credential(),
            "interface": {"type": ["string", "null"], "enum": ["lanplus", "lan", None],
                          "description": "ipmitool interface (default lanplus)"},
            "bridge": {
                "description": "extra ipmitool bridging arguments, e.g. a Moonshot cartridge: "
                               "`[\"-B\",\"0\",\"-b\",\"7\",\"-T\",\"0x82\",\"-t\",\"0x72\"]`; "
                               "null or an empty list for none",
                "anyOf": [{"type": "array", "items": _string(BRIDGE_ARG_PATTERN)},
                          {"enum": FALSY, "description": "none (any false value)"}],
            },
        }, ["host"], description="How to reach the machine's BMC over IPMI."),
        "PduAccessInput": _object({
            "host": _host_schema("the PDU"),
            "outlet": {
                "description": "the outlet, e.g. `8` or `AA8` (tower, infeed, outlet on Sentry3)",
                "anyOf": [_string(OUTLET_PATTERN), _integer(0, 9999)],
            },
            "model": {"type": ["string", "null"], "enum": [*PDU_MODELS, None],
                      "description": "the PDU model (default auto: detect by sysObjectID)"},
            "port": _port(161),
            "credential": _credential(),
        }, ["host", "outlet"], description="The PDU outlet powering the machine (SNMP)."),
        "RedfishAccessInput": _object({
            "url": _string(REDFISH_URL_PATTERN, "the BMC's base URL"),
            "system": {"type": ["string", "null"], "description": "the system id (default: the only one)"},
            "credential": _credential(),
            "ca_file": {"type": ["string", "null"], "description": "a CA bundle to verify TLS with"},
            "verify_tls": {"type": "boolean", "default": True},
        }, ["url"], description="How to reach the machine's BMC over Redfish."),
        "XenAccessInput": _object({
            "vm_uuid": _string(VM_UUID_PATTERN, "the VM's uuid"),
            "url": _nullable(_string(XEN_URL_PATTERN, "the XenAPI pool master URL")),
            "credential": _credential(),
        }, ["vm_uuid"], description="The Xen VM this machine is."),
        "LivenessInput": {
            **_object({
                "method": {"type": ["string", "null"], "enum": ["icmp", "tcp", None],
                           "description": "icmp (default) or tcp"},
                "port": _nullable(_integer(1, 65535, "tcp only (default 22)")),
            }, description="How to tell whether the machine is up."),
            # A port only goes with the tcp method.
            "anyOf": [
                {"properties": {"port": {"type": "null"}}},
                {"required": ["method"], "properties": {"method": {"const": "tcp"}}},
            ],
        },
    }


def _access_output_schemas() -> dict[str, Schema]:
    """The access sub-objects as C{Machine.to_json} writes them (unset fields omitted)."""
    cred = _string(CREDENTIAL_RE.pattern, "a credential name")
    return {
        "SshAccess": _object({
            "user": _string(SSH_USER_PATTERN),
            "port": _integer(1, 65535),
            "credential": cred,
            "host_key_policy": {"type": "string", "enum": ["strict", "accept-new"]},
        }, ["port"]),
        "IpmiAccess": _object({
            "host": {"type": "string"},
            "port": _integer(1, 65535),
            "credential": cred,
            "interface": {"type": "string", "enum": ["lanplus", "lan"]},
            "bridge": {"type": "array", "items": _string(BRIDGE_ARG_PATTERN)},
        }, ["host", "port", "interface", "bridge"]),
        "PduAccess": _object({
            "host": {"type": "string"},
            "outlet": _string(OUTLET_PATTERN),
            "model": {"type": "string", "enum": list(PDU_MODELS)},
            "port": _integer(1, 65535),
            "credential": cred,
        }, ["host", "outlet", "model", "port"]),
        "RedfishAccess": _object({
            "url": _string(REDFISH_URL_PATTERN),
            "system": {"type": "string"},
            "credential": cred,
            "ca_file": {"type": "string"},
            "verify_tls": {"type": "boolean"},
        }, ["url", "verify_tls"]),
        "XenAccess": _object({
            "vm_uuid": _string(VM_UUID_PATTERN),
            "url": _string(XEN_URL_PATTERN),
            "credential": cred,
        }, ["vm_uuid"]),
        "Liveness": _object({
            "method": {"type": "string", "enum": ["icmp", "tcp"]},
            "port": _integer(1, 65535),
        }, ["method"]),
    }


_ACCESS = ("ssh", "ipmi", "pdu", "redfish", "xen")
_ACCESS_NAMES = {"ssh": "SshAccess", "ipmi": "IpmiAccess", "pdu": "PduAccess",
                 "redfish": "RedfishAccess", "xen": "XenAccess"}


def _machine_schemas() -> dict[str, Schema]:
    worker = _string(WORKER_ID_PATTERN)
    output = _object({
        "worker_id": worker,
        "worker_group": worker,
        "fqdn": {"type": ["string", "null"]},
        "ip": {"type": ["string", "null"]},
        "pool": _nullable(_string(TAG_RE.pattern)),
        "tags": {"type": "array", "items": _string(TAG_RE.pattern)},
        "liveness": _ref("Liveness"),
        "reboot_methods": {"type": ["array", "null"], "items": {"type": "string", "enum": list(REBOOT_METHODS)},
                           "description": "null: the default order for the machine's access methods"},
        "bug_cc": {"type": "array", "items": _string(EMAIL_PATTERN)},
        "notes": {"type": "string", "maxLength": NOTES_MAX},
        **{name: _nullable(_ref(_ACCESS_NAMES[name])) for name in _ACCESS},
    }, ["worker_id", "worker_group", "fqdn", "ip", "pool", "tags", "liveness", "reboot_methods",
        "bug_cc", "notes", *_ACCESS], description="A machine. Credentials are named, never included.")

    def input_properties(worker_schema: Schema) -> dict[str, Schema]:
        return {
            "worker_id": worker_schema,
            "worker_group": worker_schema,
            "fqdn": _nullable(_host_schema("the machine's host name (or address)")),
            "ip": {"description": "the machine's IP address",
                   "anyOf": [{"type": "null"}, {"type": "string", "format": "ipv4"},
                             {"type": "string", "format": "ipv6"}]},
            "pool": _nullable(_string(TAG_RE.pattern, "the worker pool")),
            "tags": _list_or_csv(TAG_RE.pattern, "tags"),
            "liveness": _nullable(_ref("LivenessInput")),
            "reboot_methods": _list_or_csv("", "reboot methods to try in order", list(REBOOT_METHODS)),
            "bug_cc": _list_or_csv(EMAIL_PATTERN, "e-mail addresses to CC on bugs"),
            "notes": {"description": "free text; any false value (null, false, 0, [], {}) means none",
                      "anyOf": [{"type": "string", "maxLength": NOTES_MAX}, {"enum": FALSY}]},
            **{name: _nullable(_ref(_ACCESS_NAMES[name] + "Input")) for name in _ACCESS},
        }

    return {
        "Machine": output,
        "MachineInput": _object(
            input_properties(_string(WORKER_ID_PATTERN)), ["worker_id", "worker_group"],
            description="A new machine. Unknown fields are refused."),
        "MachineReplace": _object(
            input_properties({
                "type": "null",
                "description": "Taken from the path; the body may repeat the path's value (anything "
                               "else is refused with 400) or leave it out.",
            }),
            description="A machine replacing (or creating) the one at its path. Unknown fields are refused."),
        "MachineList": _object({
            "machines": {"type": "array", "items": _ref("Machine")},
            "offset": _integer(0, 10**9),
            "limit": _integer(1, 1000),
        }, ["machines", "offset", "limit"]),
    }


def _job_schemas(tasks: TaskRegistry, allowed: tuple[str, ...]) -> dict[str, Schema]:
    nullable_str = {"type": ["string", "null"]}
    ts = {"type": "string", "format": "date-time"}
    job_properties: dict[str, Schema] = {
        "task_id": {"type": "string", "format": "uuid"},
        # Not an enum: history keeps jobs of tasks that may no longer exist.
        "task_name": {"type": "string"},
        "worker_id": {"type": "string"},
        "worker_group": {"type": "string"},
        "state": {"type": "string", "enum": STATES,
                  "description": "queued → running → succeeded | failed | cancelled | timed_out; "
                                 "queued → cancelled; running at start-up → interrupted"},
        "priority": _integer(PRIORITY_MIN, PRIORITY_MAX),
        "params": {"type": "object", "description": "the task's parameters, defaults filled in"},
        "requester": {"type": "string"},
        "origin_ip": nullable_str,
        "reason": {"type": "string"},
        "created": ts,
        "started": {**ts, "type": ["string", "null"]},
        "finished": {**ts, "type": ["string", "null"]},
        "duration_s": {"type": ["number", "null"], "description": "finished - started, in seconds"},
        "result": nullable_str,
        "error": nullable_str,
        "batch_id": {"type": ["string", "null"], "description": "the batch it is a member of, if any"},
    }
    job_required = list(job_properties)
    event = _object({
        "id": {"type": ["integer", "null"],
               "description": "null for an event not written to the database yet (in flight, or held while "
                              "the database refuses writes)"},
        "time": ts,
        "kind": {"type": "string", "description": "`state` or `log`"},
        "message": {"type": "string"},
        "data": {"type": "object"},
    }, ["id", "time", "kind", "message"])
    created_props = {
        "task_name": {"type": "string"},
        "worker_id": _string(WORKER_ID_PATTERN),
        "worker_group": _string(WORKER_ID_PATTERN),
        "task_id": {"type": "string", "format": "uuid"},
        "state": {"type": "string", "enum": STATES},
    }
    created_req = ["task_name", "worker_id", "worker_group", "task_id", "state"]
    return {
        "Job": _object(job_properties, job_required, description="One run of a task on a machine."),
        "JobEvent": event,
        "JobWithEvents": _object(
            {**job_properties,
             "events": {"type": "array", "items": _ref("JobEvent"), "maxItems": 1000,
                        "description": "state changes and log lines, oldest first"}},
            [*job_required, "events"], description="A job and its first 1000 events."),
        "JobList": _object({
            "jobs": {"type": "array", "items": _ref("Job")},
            "next_before": {"type": ["integer", "null"], "minimum": 1,
                            "description": "pass as `before` for the next (older) page; null on the last"},
        }, ["jobs", "next_before"]),
        "JobCreated": _object(created_props, created_req),
        "JobCreatedByWorkerId": _object(
            {**created_props, "tc_worker_id": _string(WORKER_ID_PATTERN)}, [*created_req, "tc_worker_id"]),
        "JobRequest": _object({
            "params": {
                "description": "the task's parameters (see GET /api/v1/tasks); null for the defaults",
                **_params_schema(tasks, allowed),
            },
            "reason": {"type": "string", "maxLength": REASON_MAX, "description": "overrides the query's"},
            "priority": _integer(PRIORITY_MIN, PRIORITY_MAX, "overrides the query's"),
        }, nullable=True, description="Optional; Taskcluster sends no body. A `null` body is no body."),
    }


def _param_schema(param: Any) -> Schema:
    """L{roller.tasks.base.Param.schema}, plus the length limit C{Param.parse} enforces on strings."""
    out = param.schema()
    if "string" in out.get("type", ()):  # a string, or a string-or-list (["string", "array"])
        out.setdefault("maxLength", 1000)
    return out


def _params_schema(tasks: TaskRegistry, allowed: tuple[str, ...]) -> Schema:
    """
    The union of the allowed tasks' parameter objects (or null).  The task
    is named in the query, so with several allowed tasks a body valid for
    one may be refused (400) for another.
    """
    variants = []
    for spec in tasks:
        if spec.name in allowed:
            variants.append(_object({p.name: _param_schema(p) for p in spec.params}))
    if not variants:
        return {"type": ["object", "null"]}
    if len(variants) == 1:
        return {**variants[0], "type": ["object", "null"]}
    return {"anyOf": [{"type": "null"}, *variants]}


def _task_schemas() -> dict[str, Schema]:
    param = _object({
        "type": {"anyOf": [
            {"type": "string", "enum": ["integer", "number", "string", "boolean"]},
            {"type": "array", "items": {"type": "string", "enum": ["string", "array"]},
             "description": "a string that may also be given as a list of strings"}]},
        "description": {"type": "string"},
        "default": {},
        "minimum": {"type": "number"},
        "maximum": {"type": "number"},
        "enum": {"type": "array"},
        "items": {"type": "object"},
        "minItems": {"type": "integer"},
        "maxItems": {"type": "integer"},
    }, ["type", "description"], description="A JSON Schema of one task parameter.")
    return {
        "TaskParam": param,
        "Task": _object({
            "name": {"type": "string"},
            "description": {"type": "string"},
            "destructive": {"type": "boolean"},
            "timeout_s": {"type": "number"},
            "allowed": {"type": "boolean", "description": "whether this roller accepts it over REST"},
            "params": {"type": "object", "additionalProperties": _ref("TaskParam")},
        }, ["name", "description", "destructive", "timeout_s", "allowed", "params"]),
        "TaskList": _object({"tasks": {"type": "array", "items": _ref("Task")}}, ["tasks"]),
        "AuditEntry": _object({
            "id": {"type": "integer"},
            "time": {"type": "string", "format": "date-time"},
            "actor": {"type": "string", "description": "Client id or user."},
            "source_ip": _nullable({"type": "string"}),
            "action": {"type": "string", "description": "e.g. `job.create:reboot`, `job.cancel`, `machine.put`."},
            "target": _nullable({"type": "string", "description": "`worker_group/worker_id`."}),
            "params": {"description": "What was asked, without secrets."},
            "result": {"type": "string"},
        }, ["id", "time", "actor", "source_ip", "action", "target", "params", "result"]),
        "AuditList": _object({
            "entries": {"type": "array", "items": _ref("AuditEntry")},
            "next_before": _nullable({"type": "integer", "description": "Cursor for the next page."}),
        }, ["entries", "next_before"]),
        "Loan": _object({
            "id": {"type": "integer"},
            "worker_group": {"type": "string"},
            "worker_id": {"type": "string"},
            "borrower": {"type": "string", "description": "Email address."},
            "reason": {"type": "string"},
            "started_at": {"type": "string", "format": "date-time"},
            "expires_at": {"type": "string", "format": "date-time"},
            "returned_at": _nullable({"type": "string", "format": "date-time"}),
            "active": {"type": "boolean", "description": "Not returned yet."},
            "overdue": {"type": "boolean", "description": "Active and past its expiry."},
            "job_id": _nullable({"type": "string", "description": "The `loan` job."}),
            "return_job_id": _nullable({"type": "string", "description": "The `return_loan` job."}),
        }, ["id", "worker_group", "worker_id", "borrower", "reason", "started_at", "expires_at", "returned_at",
            "active", "overdue", "job_id", "return_job_id"]),
        "LoanList": _object({
            "loans": {"type": "array", "items": _ref("Loan")},
            "offset": {"type": "integer"},
            "limit": {"type": "integer"},
        }, ["loans", "offset", "limit"]),
    }


def _health_schemas() -> dict[str, Schema]:
    ts = {"type": "string", "format": "date-time"}
    counts = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
              "description": "machines per health state"}
    return {
        "HealthStatus": _object({
            "enabled": {"type": "boolean"},
            "paused": {"type": "boolean", "description": "remediation paused (no new remediation starts)"},
            "paused_by": {"type": ["string", "null"]},
            "remediate": {"type": "boolean", "description": "`health.remediate`"},
            "policies": {"type": "array", "items": {"type": "string"}},
            "pools": {"type": "object", "additionalProperties": counts, "description": "pool -> state -> count"},
            "taskcluster": {"type": "object", "additionalProperties": {"type": "string"},
                            "description": "worker pool -> `ok` or why Taskcluster could not be asked"},
            "held": {"type": "array", "items": {"type": "string"},
                     "description": "why remediations were held back at the last decision"},
            "sweep": {"type": ["object", "null"], "description": "the latest liveness round (its `moved`: machines "
                      "another roller took over during the round; `skipped`: not probed this round)"},
            "share": {"type": ["object", "null"],
                      "description": "several rollers on PostgreSQL: this roller's share of the fleet (its id "
                                     "`roller`, the `machines` it "
                                     "probes, polls and remediates, of the `fleet`, the live `rollers` dividing it, "
                                     "and `unreached` machines of worker groups no sweeping roller reaches); null "
                                     "with one roller"},
        }, ["enabled", "paused", "pools"], closed=False),
        "MachineHealth": _object({
            "worker_group": {"type": "string"}, "worker_id": {"type": "string"},
            "pool": {"type": ["string", "null"]},
            "state": {"type": "string", "enum": list(HEALTH_STATES)},
            "since": {"type": ["string", "null"], "format": "date-time"},
            "maintenance": {"type": "boolean"},
            "findings": {"type": "array", "items": _object({
                "source": {"type": "string"}, "kind": {"type": "string"}, "since": ts,
                "detail": {"type": "string"}}, ["source", "kind", "since", "detail"])},
            "transitions": {"type": "array", "items": _object({
                "time": ts, "old": {"type": "string"}, "new": {"type": "string"}, "reason": {"type": "string"}},
                ["time", "old", "new", "reason"]), "description": "newest first"},
        }, ["worker_group", "worker_id", "state", "maintenance", "findings", "transitions"]),
        "Maintenance": _object({
            "maintenance": {"type": "boolean"},
            "reason": {"type": "string", "maxLength": 1000},
        }, ["maintenance"]),
    }


def _ops_schemas() -> dict[str, Schema]:
    return {
        "Heartbeat": _object({
            "status": {"type": "string", "enum": ["ok", "error"]},
            "checks": {"type": "object", "additionalProperties": {"type": "string"},
                       "description": "`ok` or `error: <kind>` per dependency"},
            "queue": _object({"running": {"type": "integer", "minimum": 0},
                              "queued": {"type": "integer", "minimum": 0},
                              "unrecorded": {"type": "integer", "minimum": 0,
                                             "description": "jobs whose latest state change the database "
                                                            "has not taken yet (retried until written)"}},
                             ["running", "queued"]),
        }, ["status", "checks", "queue"]),
        "LbHeartbeat": _object({"status": {"const": "ok"}}, ["status"]),
        "Version": _object({
            "name": {"const": "roller"},
            "version": {"type": "string"},
            "source": {"type": "string"},
            "commit": {"type": "string"},
            "build": {"type": "string", "description": "The CI build that made it (from version.json)."},
        }, ["name", "version", "source", "commit", "build"]),
    }


# ----------------------------------------------------------------- parameters


def _worker_path_params(validated: bool) -> list[Schema]:
    if validated:
        schema = _string(WORKER_ID_PATTERN)
        suffix = " (400 `invalid_worker_id` otherwise)"
    else:
        schema, suffix = {"type": "string"}, " (not validated by the preflight)"
    return [
        _param("worker_id", "path", schema, "Taskcluster worker id" + suffix),
        _param("worker_group", "path", schema, "Taskcluster worker group" + suffix),
    ]


def _machine_path_params(validated: bool = True) -> list[Schema]:
    # Same names, the other order in the URL.
    return list(reversed(_worker_path_params(validated)))


def _task_id_param() -> Schema:
    return _param("task_id", "path", {"type": "string", "format": "uuid"},
                  "The job's id (any other string is simply not found).")


def _int_query(name: str, low: int, high: int, default: int | None, description: str) -> Schema:
    """An integer query parameter; like absent, an empty value means the default."""
    schema: Schema = {"anyOf": [_integer(low, high), {"const": "", "description": "the default"}]}
    if default is not None:
        schema["default"] = default
    return _param(name, "query", schema, description + f" ({low}-{high}, decimal digits; 400 "
                  "`invalid_query` otherwise; an empty value means the default)")


def _submit_params(tasks: TaskRegistry, allowed: tuple[str, ...]) -> list[Schema]:
    # exactly the tasks this roller runs over REST: with none allowed, no value
    # is valid (an empty enum), never "any string" that is then refused
    runnable = [name for name in dict.fromkeys(allowed) if name in tasks]
    task_schema: Schema = {"type": "string", "enum": runnable}
    return [
        _param("task_name", "query", task_schema,
               "The task to run. Required; a name that is not a task, or not allowed on this roller, "
               "is refused with 400 (`unknown_task`, `task_not_allowed`).", required=True),
        _int_query("priority", PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT,
                   "Higher runs first; overridden by the body's"),
        _param("reason", "query", {"type": "string", "maxLength": REASON_MAX},
               "Why (shown in history); overridden by the body's."),
    ]


def _submit_responses(created: str, *extra: str) -> dict[str, Schema]:
    location = {"Location": _header("The job: `/api/v1/jobs/{task_id}`.",
                                    {"type": "string", "pattern": "^/api/v1/jobs/"}, required=True)}
    return {
        "200": _json_response("The machine already has this task queued or running: that job.",
                              _ref(created), location, _links("", _JOB_LINKS)),
        "201": _json_response("Queued (persisted before this answer).", _ref(created), location,
                              _links("", _JOB_LINKS)),
        **_errors("400", "401", "403", "404", "415", "503", *extra),
    }


def _job_body() -> Schema:
    return {"required": False, "content": _json_content(_ref("JobRequest")),
            "description": "Optional: `params`, `reason`, `priority`."}


# ----------------------------------------------------------------- document


def openapi_document(tasks: TaskRegistry, allowed: tuple[str, ...], version: str) -> dict:
    """
    The OpenAPI 3.1.0 document of the REST API.

    @param tasks: the L{roller.tasks.TaskRegistry}; its allowed tasks'
        parameters make the job request body's C{params}.
    @param allowed: the task names reachable over REST (C{task_name}'s enum).
    @param version: roller's version, the document's C{info.version}.
    """
    from roller.web.openapi_batches import batch_paths, batch_schemas  # it uses the helpers above

    allowed = tuple(allowed)
    secured_note = ("Requires Hawk credentials (Taskcluster) with the scope "
                    "`<prefix><what>`, the prefix being `project:releng:roller:` by default.")
    paths: dict[str, Schema] = {
        "/api/v1/workers/{worker_id}/group/{worker_group}/jobs": {
            "post": _op(
                "createWorkerJob", "Run a task on a machine (Taskcluster form)", "jobs",
                _submit_responses("JobCreated"),
                parameters=[*_worker_path_params(True), *_submit_params(tasks, allowed)],
                body=_job_body(), secured=True,
                description="Queue `task_name` on the machine `worker_group`/`worker_id`. " + secured_note
                            + " Scope: `<prefix><task_name>`. A `Location` header names the job.",
            ),
            "options": _preflight("preflightWorkerJob", _worker_path_params(False)),
        },
        "/api/v1/jobs": {
            "get": _op(
                "listJobs", "List jobs, newest first", "jobs",
                {"200": _json_response("A page of jobs.", _ref("JobList")), **_errors("400", "401", "403", "503")},
                parameters=[
                    _param("state", "query",
                           {"type": "array", "items": {"type": "string", "enum": STATES}},
                           "Only jobs in these states (comma-separated).", style="form", explode=False),
                    _param("worker_id", "query", _string(WORKER_ID_PATTERN), "Only this worker id."),
                    _param("worker_group", "query", _string(WORKER_ID_PATTERN), "Only this worker group."),
                    _param("task_name", "query", {"type": "string"}, "Only this task."),
                    _param("batch_id", "query", {"type": "string", "pattern": "^$|" + BATCH_ID_PATTERN},
                           "Only the jobs of this batch (empty: no filter; 400 `invalid_query` for a value no "
                           "batch id can be)."),
                    _int_query("limit", 1, 1000, 50, "Page size"),
                    _int_query("before", 1, 2**62, None, "Jobs older than this cursor (`next_before`)"),
                ],
                secured=True,
                description=secured_note + " Scope: `<prefix>jobs:read`.",
            ),
            "post": _op(
                "createJob", "Run a task on a machine by worker id", "jobs",
                _submit_responses("JobCreatedByWorkerId", "409"),
                parameters=[
                    _param("tc_worker_id", "query", _string(WORKER_ID_PATTERN),
                           "The machine's worker id; 409 `ambiguous_worker` if it is in several "
                           "worker groups.", required=True),
                    *_submit_params(tasks, allowed),
                ],
                body=_job_body(), secured=True,
                description="The original roller form. " + secured_note + " Scope: `<prefix><task_name>`.",
            ),
            "options": _preflight("preflightJobs"),
        },
        "/api/v1/jobs/{task_id}": {
            "get": _op(
                "getJob", "A job and its events", "jobs",
                {"200": _json_response("The job, with up to 1000 events.", _ref("JobWithEvents")),
                 **_errors("401", "403", "404", "503")},
                parameters=[_task_id_param()], secured=True,
                description=secured_note + " Scope: `<prefix>jobs:read`.",
            ),
            "delete": _op(
                "cancelJob", "Cancel a job", "jobs",
                {"200": _json_response("The job, cancelled.", _ref("Job")),
                 **_errors("401", "403", "404", "409", "503")},
                parameters=[_task_id_param()], secured=True,
                description="A queued job is dropped; a running one is stopped. 409 `job_finished` if it "
                            "already ended. " + secured_note + " Scope: `<prefix>jobs:cancel`.",
            ),
            "options": _preflight("preflightJob", [_param("task_id", "path", {"type": "string"},
                                                          "The job's id (not validated by the preflight).")]),
        },
        **batch_paths(tasks, allowed, secured_note),
        "/api/v1/audit": {
            "get": _op(
                "listAudit", "The audit log, newest first", "audit",
                {"200": _json_response("A page of audit entries.", _ref("AuditList")),
                 **_errors("400", "401", "403", "503")},
                parameters=[
                    _param("target", "query", {"type": "string"}, "Only entries about this `worker_group/worker_id`."),
                    _int_query("limit", 1, 1000, 100, "Page size"),
                    _int_query("before", 1, 2**62, None, "Entries older than this cursor (`next_before`)"),
                ],
                secured=True,
                description="Every mutating action: who, from where, what, on what, with which result. "
                            "Scope: `<prefix>audit:read`.",
            ),
        },
        "/api/v1/loans": {
            "get": _op(
                "listLoans", "Machine loans, newest first", "loans",
                {"200": _json_response("A page of loans.", _ref("LoanList")),
                 **_errors("400", "401", "403", "503")},
                parameters=[
                    _param("active", "query", {"type": "string", "enum": ["true", "false", "1", "0"]},
                           "Only loans not returned yet (`true`) or returned ones (`false`)."),
                    _param("overdue", "query", {"type": "string", "enum": ["true", "false", "1", "0"]},
                           "Only active loans past their expiry (`true`), or loans that are not (`false`)."),
                    _param("worker_group", "query", _string(WORKER_ID_PATTERN), "Only this worker group."),
                    _param("worker_id", "query", _string(WORKER_ID_PATTERN), "Only this worker."),
                    _int_query("limit", 1, 1000, 100, "Page size"),
                    _int_query("offset", 0, 10**9, 0, "Loans to skip"),
                ],
                secured=True,
                description="Loans made by the `loan` task and ended by `return_loan`. "
                            "Scope: `<prefix>loans:read`.",
            ),
        },
        "/api/v1/tasks": {
            "get": _op("listTasks", "The tasks roller knows", "tasks",
                       {"200": _json_response("Every task, with `allowed` for those reachable over REST.",
                                              _ref("TaskList")), **_errors()}),
        },
        "/api/v1/machines": {
            "get": _op(
                "listMachines", "List machines", "machines",
                {"200": _json_response("A page of machines, by worker group and worker id.", _ref("MachineList")),
                 **_errors("400", "401", "403", "404", "503")},
                parameters=[
                    _param("worker_group", "query", _string(WORKER_ID_PATTERN), "Only this worker group."),
                    _param("pool", "query", {"type": "string"}, "Only this pool."),
                    _param("q", "query", {"type": "string"},
                           "Substring of the worker id, fqdn or ip."),
                    _param("health", "query", {"type": "string", "pattern": "^$|^(" + "|".join(HEALTH_STATES)
                                                          + ")(,(" + "|".join(HEALTH_STATES) + "))*$"},
                           "Only machines in these health states (comma-separated; empty: no filter)."),
                    _int_query("limit", 1, 1000, 100, "Page size"),
                    _int_query("offset", 0, 10**9, 0, "Machines to skip"),
                ],
                secured=True,
                description=secured_note + " Scope: `<prefix>machines:read`.",
            ),
            "post": _op(
                "createMachine", "Add a machine", "machines",
                {"201": _json_response("Added.", _ref("Machine"), {"Location": _header(
                    "The machine: `/api/v1/machines/{worker_group}/{worker_id}`.",
                    {"type": "string", "pattern": "^/api/v1/machines/"}, required=True)},
                    _links("", _MACHINE_LINKS)),
                 **_errors("400", "401", "403", "409", "415", "503")},
                body={"required": True, "content": _json_content(_ref("MachineInput"))},
                secured=True,
                description="409 `machine_exists` if it is already there. " + secured_note
                            + " Scope: `<prefix>inventory:write`.",
            ),
        },
        "/api/v1/machines/{worker_group}/{worker_id}": {
            "get": _op(
                "getMachine", "A machine", "machines",
                {"200": _json_response("The machine.", _ref("Machine")),
                 **_errors("400", "401", "403", "404", "503")},
                parameters=_machine_path_params(), secured=True,
                description=secured_note + " Scope: `<prefix>machines:read`.",
            ),
            "put": _op(
                "putMachine", "Replace or create a machine", "machines",
                {"200": _json_response("Replaced.", _ref("Machine"), links=_links("", _MACHINE_LINKS)),
                 "201": _json_response("Created.", _ref("Machine"), links=_links("", _MACHINE_LINKS)),
                 **_errors("400", "401", "403", "415", "503")},
                parameters=_machine_path_params(),
                body={"required": True, "content": _json_content(_ref("MachineReplace"))},
                secured=True,
                description=secured_note + " Scope: `<prefix>inventory:write`.",
            ),
            "delete": _op(
                "deleteMachine", "Remove a machine", "machines",
                {"204": {"description": "Removed."}, **_errors("400", "401", "403", "404", "503")},
                parameters=_machine_path_params(), secured=True,
                description="Its job history is kept. " + secured_note + " Scope: `<prefix>inventory:write`.",
            ),
        },
        "/api/v1/machines/{worker_group}/{worker_id}/health": {
            "get": _op(
                "getMachineHealth", "A machine's health: state, findings and transitions", "health",
                {"200": _json_response("Its health.", _ref("MachineHealth")),
                 **_errors("400", "401", "403", "404", "503")},
                parameters=_machine_path_params(), secured=True,
                description=secured_note + " Scope: `<prefix>health:read`.",
            ),
        },
        "/api/v1/machines/{worker_group}/{worker_id}/maintenance": {
            "put": _op(
                "putMaintenance", "Set or clear a machine's maintenance flag", "health",
                {"200": _json_response("Its health now.", _ref("MachineHealth")),
                 **_errors("400", "401", "403", "404", "415", "503")},
                parameters=_machine_path_params(),
                body={"required": True, "content": _json_content(_ref("Maintenance"))},
                secured=True,
                description="A machine in maintenance is never remediated. Audited. " + secured_note
                            + " Scope: `<prefix>health:admin`.",
            ),
        },
        "/api/v1/health": {
            "get": _op(
                "getHealth", "Fleet health: machines by pool and state, remediation paused or not", "health",
                {"200": _json_response("The fleet's health.", _ref("HealthStatus")),
                 **_errors("401", "403", "404", "503")},
                secured=True, description=secured_note + " Scope: `<prefix>health:read`.",
            ),
        },
        "/api/v1/health/pause": {
            "post": _op(
                "pauseRemediation", "Pause remediation (no new remediation starts)", "health",
                {"200": _json_response("Paused.", _ref("HealthStatus")), **_errors("401", "403", "404", "503")},
                secured=True, description="Audited; kept across restarts. " + secured_note
                                          + " Scope: `<prefix>health:admin`.",
            ),
        },
        "/api/v1/health/resume": {
            "post": _op(
                "resumeRemediation", "Resume remediation", "health",
                {"200": _json_response("Resumed.", _ref("HealthStatus")), **_errors("401", "403", "404", "503")},
                secured=True, description="Audited. " + secured_note + " Scope: `<prefix>health:admin`.",
            ),
        },
        "/api/v1/openapi.json": {
            "get": _op("getOpenApi", "This document", "meta",
                       {"200": _json_response("The OpenAPI 3.1 document.", {"type": "object"}), **_errors()}),
        },
        "/__lbheartbeat__": {
            "get": _op("lbHeartbeat", "Load balancer liveness (Dockerflow)", "ops",
                       {"200": _json_response("The process is serving.", _ref("LbHeartbeat")), **_errors()}),
        },
        "/__heartbeat__": {
            "get": _op("heartbeat", "Health of roller and its dependencies (Dockerflow)", "ops",
                       {"200": _json_response("Healthy.", _ref("Heartbeat")),
                        "500": _json_response("A dependency check failed (`status: error`).", _ref("Heartbeat")),
                        **_errors()}),
        },
        "/metrics": {
            "get": _op("metrics", "Prometheus metrics", "ops",
                       {"200": {"description": "The metrics in the Prometheus text exposition format "
                                               "(`roller_jobs_total`, `roller_jobs_queued`, `roller_jobs_running`, "
                                               "`roller_job_duration_seconds`, `roller_reactor_lag_seconds`).",
                                "content": {"text/plain": {"schema": {"type": "string"}}}},
                        **_errors()}),
        },
        "/__version__": {
            "get": _op("version", "The running version (Dockerflow)", "ops",
                       {"200": _json_response("The version.", _ref("Version")), **_errors()}),
        },
    }
    schemas: dict[str, Schema] = {
        "Error": {
            "type": "object",
            "description": "Every error: a stable machine-readable code and a readable message.",
            "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
            "required": ["error", "message"],
        },
        **_job_schemas(tasks, allowed),
        **_task_schemas(),
        **_machine_schemas(),
        **_access_output_schemas(),
        **_access_input_schemas(),
        **_ops_schemas(),
        **_health_schemas(),
        **batch_schemas(tasks, allowed),
    }
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "roller",
            "version": version,
            "summary": "Release Operations Controller: ping, reboot, power and re-image RelOps machines.",
            "description": "Errors are `{\"error\": code, \"message\": text}` with the status. Operations "
                           "that change anything, and reads of jobs, machines and the audit log, need Hawk credentials "
                           "with the operation's scope; tasks, this document and the ops endpoints are open.",
        },
        "tags": [
            {"name": "jobs", "description": "Running tasks on machines."},
            {"name": "batches", "description": "One task over many machines, rolled out within limits."},
            {"name": "machines", "description": "The inventory."},
            {"name": "tasks", "description": "What can be run."},
            {"name": "cors", "description": "CORS preflights."},
            {"name": "meta", "description": "This document."},
            {"name": "ops", "description": "Dockerflow endpoints and Prometheus metrics."},
        ],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": _error_components(),
            "securitySchemes": {
                "hawk": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "Hawk (`Authorization: Hawk id=\"...\", ts=\"...\", nonce=\"...\", "
                                   "mac=\"...\"`), as the Taskcluster clients sign requests; roller checks "
                                   "it with Taskcluster's `authenticate-hawk` (or itself, for the clients "
                                   "in its secrets file) and requires the operation's scope. (`http` with "
                                   "scheme `hawk` is not a registered HTTP authentication scheme, hence "
                                   "`apiKey`.)",
                },
            },
        },
    }
