"""
Taskcluster worker actions for roller's allowed tasks (C{roller actions}).

Each definition is what Taskcluster's UI showed as a button on a worker::

    {"name": "reboot", "title": "Reboot", "context": "worker", "method": "POST",
     "url": "https://roller.example.com/api/v1/workers/<workerId>/group/<workerGroup>/jobs?task_name=reboot",
     "description": "..."}

Taskcluster removed C{queue.declareProvisioner} (and with it worker
actions) in v107.  L{register} still calls it (C{PUT
/api/queue/v1/provisioners/ID}, Hawk-signed) for a deployment that has
it; on one without it (404) it says so plainly, and roller is called from
a hook or an action task instead (see the README).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import mohawk
from treq.client import HTTPClient
from twisted.web.client import Agent

from roller import __version__
from roller.drivers.reactor import ITcpReactor
from roller.json_input import load_json
from roller.tasks import TaskRegistry

__all__ = ["ActionsError", "action_definitions", "register"]

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
