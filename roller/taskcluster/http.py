"""
Hawk-signed GETs to a Taskcluster deployment, as the official clients send
them (C{mohawk.Sender}, sha256, an empty payload hash), answered as JSON.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

import mohawk
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime

from roller import __version__
from roller.json_input import load_json

__all__ = ["TaskclusterError", "TaskclusterHttp", "segment"]


class TaskclusterError(Exception):
    """A Taskcluster call failed; one line saying which and why, never a secret."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


def segment(text: str) -> str:
    """One URL path segment (a worker id may hold any character)."""
    return quote(text, safe="")


class TaskclusterHttp:
    """
    Signed JSON GETs to C{root_url} with the client id and access token of
    a credential; each call times out after C{timeout} seconds on C{clock}.
    """

    def __init__(self, clock: IReactorTime, http: HTTPClient, root_url: str, client_id: str,
                 access_token: str, *, timeout: float = 30.0):
        self.clock = clock
        self.http = http
        self.root_url = root_url.rstrip("/")
        self._credentials = {"id": client_id, "key": access_token, "algorithm": "sha256"}
        self.timeout = timeout

    def get(self, what: str, path: str, query: dict[str, str] | None = None) -> Deferred[Any]:
        """GET C{root_url + path}; the decoded JSON answer, or L{TaskclusterError} naming C{what}."""
        url = self.root_url + path + ("?" + urlencode(query) if query else "")
        d = Deferred.fromCoroutine(self._get(what, url))
        d.addTimeout(self.timeout, self.clock)
        d.addErrback(self._failed, what)
        return d

    async def _get(self, what: str, url: str) -> Any:
        sender = mohawk.Sender(credentials=self._credentials, url=url, method="GET", content="",
                               content_type="")
        headers: dict[bytes | str, list[bytes | str]] = {
            "Authorization": [sender.request_header], "User-Agent": [f"roller/{__version__}"]}
        response = await self.http.get(url, headers=headers)
        body = await response.content()
        if response.code != 200:
            try:
                error = load_json(body)
                detail = f"{error.get('code', '')}: {error.get('message', '')}".strip(": ")
            except (ValueError, AttributeError):
                detail = body[:200].decode("utf-8", "replace")
            first = detail.strip().splitlines()[0] if detail.strip() else "no message"
            raise TaskclusterError(f"{what}: HTTP {response.code} {first}"[:300], status=response.code)
        try:
            return load_json(body, max_depth=64)
        except ValueError:
            raise TaskclusterError(f"{what}: the answer is not JSON") from None

    def _failed(self, f: Any, what: str) -> Any:
        if f.check(TaskclusterError):
            return f
        if f.check(TimeoutError, CancelledError):
            raise TaskclusterError(f"{what}: no answer from {self.root_url} within {self.timeout:g} s")
        why = f.getErrorMessage() or f.type.__name__
        raise TaskclusterError(f"{what}: {self.root_url} is unreachable: {why}"[:300])
