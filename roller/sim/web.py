"""
What the Klein fakes of roller's HTTP peers share (Taskcluster auth and
notify, Bugzilla, XenAPI, Redfish BMCs): serving an app on loopback, and
JSON answers.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.server import Site


def serve(app: Klein, reactor: Any, interface: str = "127.0.0.1", port: int = 0) -> Any:
    """Serve C{app} on C{interface}; the listening port (C{stopListening} it)."""
    site = Site(app.resource())
    site.noisy = False
    return reactor.listenTCP(port, site, interface=interface)


def base_url(listening: Any) -> str:
    """C{http://HOST:PORT} of a listening port (IPv6 hosts bracketed)."""
    address = listening.getHost()
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"http://{host}:{address.port}"


def json_answer(request: IRequest, body: Any, status: int = 200, *,
                content_type: bytes = b"application/json; charset=utf-8") -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", content_type)
    return json.dumps(body).encode()
