"""
A small client for a running roller's REST API: what C{roller batch
--url URL} talks through.

Requests are signed with Hawk the way Taskcluster's clients sign them
(C{mohawk.Sender}, sha256, the body hashed), with the credentials in
C{TASKCLUSTER_CLIENT_ID} / C{TASKCLUSTER_ACCESS_TOKEN} (and
C{TASKCLUSTER_CERTIFICATE} for temporary credentials); without them no
C{Authorization} header is sent, which a roller with C{auth.mode = "none"}
accepts.

    client = RollerClient.from_env(reactor, "https://roller.example.com")
    view = await client.request("POST", "/api/v1/batches", {...})

An answer of 400 or above raises L{ApiError} (the roller's error code and
message); not reaching roller, a timeout or an answer that is not JSON
raise L{ClientError}.  No message contains the access token.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from typing import Any

import mohawk
from attrs import define, field, frozen
from treq.client import HTTPClient
from twisted.web.client import Agent

from roller import __version__
from roller.drivers.reactor import ITcpReactor

__all__ = ["ApiError", "ClientError", "Credentials", "RollerClient"]


class ClientError(Exception):
    """roller could not be asked, or answered something unreadable; the message says which, in one line."""


class ApiError(ClientError):
    """roller answered an error: its HTTP status, error code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@frozen(repr=False)
class Credentials:
    """Taskcluster credentials: a client id, its access token, and a certificate for temporary ones."""

    client_id: str
    access_token: str
    certificate: str | None = None

    def __repr__(self) -> str:
        return f"Credentials(client_id={self.client_id!r}, access_token=<redacted>)"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Credentials | None:
        """From C{TASKCLUSTER_CLIENT_ID} and C{TASKCLUSTER_ACCESS_TOKEN}; None if either is unset."""
        client_id = environ.get("TASKCLUSTER_CLIENT_ID", "").strip()
        token = environ.get("TASKCLUSTER_ACCESS_TOKEN", "").strip()
        if not client_id or not token:
            return None
        return cls(client_id, token, environ.get("TASKCLUSTER_CERTIFICATE", "").strip() or None)

    def ext(self) -> str | None:
        """The Hawk C{ext} Taskcluster's clients send: the certificate of temporary credentials."""
        if self.certificate is None:
            return None
        try:
            cert = json.loads(self.certificate)
        except ValueError:
            raise ClientError("TASKCLUSTER_CERTIFICATE is not JSON") from None
        return base64.b64encode(json.dumps({"certificate": cert}).encode()).decode()


@define
class RollerClient:
    reactor: ITcpReactor
    base_url: str = field(converter=lambda url: url.rstrip("/"))
    credentials: Credentials | None = None
    timeout: float = 30.0
    http: HTTPClient | None = None

    @classmethod
    def from_env(cls, reactor: ITcpReactor, base_url: str, environ: Mapping[str, str] | None = None,
                 **kw: Any) -> RollerClient:
        if not base_url.startswith(("http://", "https://")):
            raise ClientError(f"--url must be roller's http:// or https:// URL, got {base_url[:100]!r}")
        return cls(reactor, base_url, Credentials.from_env(os.environ if environ is None else environ), **kw)

    def _http(self) -> HTTPClient:
        if self.http is None:
            self.http = HTTPClient(Agent(self.reactor, connectTimeout=self.timeout))
        return self.http

    def authorization(self, method: str, url: str, content: bytes, content_type: str) -> str | None:
        """The C{Authorization} header for this request, or None without credentials."""
        if self.credentials is None:
            return None
        sender = mohawk.Sender(
            credentials={"id": self.credentials.client_id, "key": self.credentials.access_token,
                         "algorithm": "sha256"},
            url=url, method=method, content=content, content_type=content_type, ext=self.credentials.ext())
        return str(sender.request_header)

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """C{method} C{path} (with its query) with C{body} as JSON; the JSON answer."""
        url = self.base_url + path
        content = b"" if body is None else json.dumps(body).encode()
        content_type = "" if body is None else "application/json"
        headers: dict[bytes | str, list[bytes | str]] = {"User-Agent": [f"roller-cli/{__version__}"],
                                                         "Accept": ["application/json"]}
        if content_type:
            headers["Content-Type"] = [content_type]
        auth = self.authorization(method, url, content, content_type)
        if auth is not None:
            headers["Authorization"] = [auth]
        d = self._http().request(method, url, data=content or None, headers=headers)
        d.addTimeout(self.timeout, self.reactor)
        try:
            response = await d
            d2 = response.content()
            d2.addTimeout(self.timeout, self.reactor)
            raw = await d2
        except Exception as e:  # noqa: BLE001 -- every way the request can fail is one "cannot reach" line
            reason = str(e) or type(e).__name__
            raise ClientError(f"cannot reach roller at {self.base_url}: {type(e).__name__}: {reason}"[:300]) from None
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = None
            if response.code < 400:
                raise ClientError(f"{method} {path}: roller answered HTTP {response.code} with a body that is "
                                  "not JSON") from None
        if response.code >= 400:
            if isinstance(answer, dict) and isinstance(answer.get("error"), str):
                raise ApiError(response.code, answer["error"], str(answer.get("message", "")))
            raise ApiError(response.code, "http_error", f"{method} {path} answered HTTP {response.code}")
        return answer
