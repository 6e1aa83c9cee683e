"""
Taskcluster worker actions for roller's allowed tasks (C{roller actions}).

Each definition is what Taskcluster's UI showed as a button on a worker::

    {"name": "reboot", "title": "Reboot", "context": "worker", "method": "POST",
     "url": "https://roller.example.com/api/v1/workers/<workerId>/group/<workerGroup>/jobs?task_name=reboot",
     "description": "..."}

L{batch_hook} is a Taskcluster hook definition (the body of
C{hooks.createHook}) whose task creates a batch (C{POST /api/v1/batches})
with the task's own credentials, through the worker's taskcluster-proxy.

Taskcluster removed C{queue.declareProvisioner} (and with it worker
actions) in v107.  L{register} still calls it (C{PUT
/api/queue/v1/provisioners/ID}, Hawk-signed) for a deployment that has
it; on one without it (404) it says so plainly, and roller is called from
a hook or an action task instead (see the README).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import mohawk
from treq.client import HTTPClient
from twisted.web.client import Agent

from roller import __version__
from roller.drivers.reactor import ITcpReactor
from roller.json_input import load_json
from roller.tasks import TaskRegistry

__all__ = ["ActionsError", "action_definitions", "batch_hook", "hook_scopes", "register"]

_UPPER = {"ipmi", "ssh", "snmp", "pdu", "xenapi", "bmc"}


class ActionsError(Exception):
    """Registration failed or is impossible; the message says why in one line."""


def _title(name: str) -> str:
    words = [w.upper() if w in _UPPER else w for w in name.split("_")]
    words[0] = words[0][:1].upper() + words[0][1:]
    return " ".join(words)


def action_definitions(tasks: TaskRegistry, allowed: Iterable[str], public_url: str) -> list[dict[str, Any]]:
    """The worker-context action of every allowed task, in the registry's order."""
    base = public_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ActionsError("roller's public URL is needed for the action URLs: set server.public_url "
                           "(or pass --url https://roller.example.com)")
    allowed = set(allowed)
    return [{
        "name": spec.name,
        "title": _title(spec.name),
        "context": "worker",
        "url": f"{base}/api/v1/workers/<workerId>/group/<workerGroup>/jobs?task_name={spec.name}",
        "method": "POST",
        "description": spec.description,
    } for spec in tasks if spec.name in allowed]


#: the container the hook's task runs in: curl and a POSIX shell
HOOK_IMAGE = "curlimages/curl:8.10.1"
#: seconds the hook's task may run (it only sends the request; the batch runs on roller)
HOOK_MAX_RUN_TIME = 300


def hook_scopes(body: dict[str, Any], scope_prefix: str) -> list[str]:
    """What creating the batch C{body} needs: the task's scope and C{batches:create}."""
    return [f"{scope_prefix}{body['task_name']}", f"{scope_prefix}batches:create"]


def _proxied(public_url: str) -> str:
    """
    C{public_url}'s C{/api/v1/batches} through taskcluster-proxy: its
    hostname form (C{http://taskcluster/HOST/PATH}) forwards to
    C{https://HOST/PATH}, signed with the task's credentials; so roller
    must be reachable over https, on port 443, by a dotted host name.
    """
    parts = urlsplit(public_url.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    host = parts.hostname or ""
    if parts.scheme != "https" or port not in (None, 443) or "." not in host or parts.path.strip("/"):
        raise ActionsError(f"the hook's task reaches roller through taskcluster-proxy, which forwards only to "
                           f"https://HOST/ (port 443, a dotted host name, no path): roller's public URL "
                           f"{public_url[:100]!r} is not one (set server.public_url or pass --url)")
    return f"http://taskcluster/{host}/api/v1/batches"


def _escape_jsone(value: Any) -> Any:
    """C{value} with every C{${} written C{$${}, so JSON-e (hooks render their task with it) leaves it as it is."""
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, list):
        return [_escape_jsone(v) for v in value]
    if isinstance(value, dict):
        return {k: _escape_jsone(v) for k, v in value.items()}
    return value


def batch_hook(body: dict[str, Any], public_url: str, *, task_queue: str, scope_prefix: str,
               owner: str, image: str = HOOK_IMAGE) -> dict[str, Any]:
    """
    A Taskcluster hook definition (the body of C{hooks.createHook}) whose
    task creates the batch C{body} (L{roller.batches.model.parse_request}'s
    fields) on roller.  The task holds the scopes L{hook_scopes} names (the
    hook's role must have them too) and sends the request through
    taskcluster-proxy (C{features.taskclusterProxy}), which signs it with
    the task's credentials; curl fails the task when roller refuses.
    """
    url = _proxied(public_url)
    data = json.dumps(_escape_jsone(body), separators=(",", ":"))
    script = (f"curl --silent --show-error --fail-with-body --max-time 60 --retry 5 --retry-connrefused "
              f"-X POST -H 'Content-Type: application/json' --data {shlex.quote(data)} {url}")
    name = f"roller batch: {body['task_name']}"
    description = (f"Creates a roller batch: {body['task_name']} on the machines "
                   f"{json.dumps(body.get('selector', {}), separators=(',', ':'))} "
                   f"(POST {public_url.rstrip('/')}/api/v1/batches). The hook's role needs "
                   f"{', '.join(hook_scopes(body, scope_prefix))} and queue:create-task for {task_queue}.")
    return {
        "metadata": {"name": name, "description": _escape_jsone(description), "owner": owner,
                     "emailOnError": True},
        "schedule": [],
        "triggerSchema": {"type": "object", "properties": {}, "additionalProperties": True},
        "task": {
            "taskQueueId": task_queue,
            "schedulerId": "-",
            "created": {"$fromNow": "0 seconds"},
            "deadline": {"$fromNow": "1 hour"},
            "expires": {"$fromNow": "30 days"},
            "scopes": hook_scopes(body, scope_prefix),
            "payload": {
                "image": image,
                "command": ["sh", "-c", script],
                "maxRunTime": HOOK_MAX_RUN_TIME,
                "features": {"taskclusterProxy": True},
            },
            "metadata": {"name": name, "description": _escape_jsone(description), "owner": owner,
                         "source": public_url.rstrip("/") + "/api/v1/openapi.json"},
        },
    }


async def register(reactor: ITcpReactor, root_url: str, provisioner_id: str, actions: list[dict[str, Any]],
                   client_id: str, access_token: str, *, http: HTTPClient | None = None,
                   timeout: float = 30.0) -> str:
    """
    Declare C{actions} on provisioner C{provisioner_id}; a line saying what
    happened.  L{ActionsError} when the deployment lacks the call or refuses.
    """
    root = root_url.rstrip("/")
    url = f"{root}/api/queue/v1/provisioners/{provisioner_id}"
    body = json.dumps({"actions": actions}).encode()
    header = mohawk.Sender(credentials={"id": client_id, "key": access_token, "algorithm": "sha256"},
                           url=url, method="PUT", content=body, content_type="application/json").request_header
    http = http or HTTPClient(Agent(reactor, connectTimeout=timeout))
    headers: dict[bytes | str, list[bytes | str]] = {
        "Content-Type": ["application/json"], "Authorization": [header], "User-Agent": [f"roller/{__version__}"]}
    d = http.put(url, data=body, headers=headers)
    d.addTimeout(timeout, reactor)
    try:
        response = await d
        raw = await response.content()
    except Exception as e:  # noqa: BLE001 -- every way the request can fail is one "cannot reach" line
        raise ActionsError(f"cannot reach {root}: {e.__class__.__name__}: {e}"[:300]) from None
    if response.code == 404:
        raise ActionsError(f"{root} has no queue.declareProvisioner (Taskcluster removed it and worker actions "
                           "in v107): nothing was registered. Call roller from a Taskcluster hook or an "
                           "action task instead (see the README).")
    if not 200 <= response.code < 300:
        try:
            message = load_json(raw).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        first = message.strip().splitlines()[0] if message.strip() else "no message"
        raise ActionsError(f"queue.declareProvisioner on {root} answered HTTP {response.code}: {first}"[:400])
    return f"declared {len(actions)} action(s) on provisioner {provisioner_id} at {root}"
