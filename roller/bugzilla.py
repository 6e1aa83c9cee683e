"""
A small Bugzilla REST client over treq.

The API key goes only in the C{X-BUGZILLA-API-KEY} header.  Every failure
is a L{BugzillaError} with one readable line: Bugzilla's own error objects
(C{{"error": true, "code": N, "message": "..."}}) keep their code and
message; transport problems, timeouts (a cancellation on the injected
clock) and non-JSON answers say what happened and where.  The key is
masked in every message, even if a peer echoes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from roller import __version__
from roller.drivers.reactor import ITcpReactor
from roller.http_client import close_pool, pooled_client
from roller.json_input import load_json

__all__ = ["API_KEY_HEADER", "BugzillaClient", "BugzillaError"]

log = Logger()

API_KEY_HEADER = "X-BUGZILLA-API-KEY"
MAX_BODY = 4 * 1024 * 1024


class BugzillaError(Exception):
    """
    A Bugzilla call failed.

    @ivar message: one readable line (also C{str(error)}); never the key.
    @ivar code: Bugzilla's error code, when it sent an error object.
    @ivar status: the HTTP status, when there was an answer.
    """

    def __init__(self, message: str, *, code: int | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __str__(self) -> str:
        return self.message


class BugzillaClient:
    """
    @param reactor: for connections and timeouts.
    @param url: the Bugzilla base URL (C{https://bugzilla.mozilla.org}).
    @param api_key: sent in L{API_KEY_HEADER}; C{""} for anonymous reads.
    @param timeout: seconds per call, answer included.
    @param treq_client: an L{HTTPClient}; by default one with its own pool.
    """

    def __init__(self, reactor: ITcpReactor, url: str, api_key: str = "", *, timeout: float = 30.0,
                 treq_client: HTTPClient | None = None):
        self.reactor = reactor
        self.url = url.rstrip("/")
        self._key = api_key
        self.timeout = timeout
        self._pool: HTTPConnectionPool | None = None
        if treq_client is None:
            treq_client, self._pool = pooled_client(reactor, connect_timeout=timeout)
        self.http = treq_client

    def __repr__(self) -> str:
        return f"BugzillaClient(url={self.url!r})"

    def close(self) -> Deferred:
        return close_pool(self._pool)

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    # -- the calls roller makes

    async def bug_by_alias(self, alias: str) -> dict[str, Any] | None:
        """The bug whose alias is C{alias}, or C{None}."""
        bugs = await self.search({"alias": alias})
        return bugs[0] if bugs else None

    async def search(self, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """C{GET /rest/bug?...}: the list of bugs matching C{params}."""
        answer = await self.call("GET", "/rest/bug", params=params)
        bugs = answer.get("bugs")
        if not isinstance(bugs, list):
            raise BugzillaError(f"Bugzilla at {self.url} answered a search without a list of bugs")
        return bugs

    async def create(self, fields: Mapping[str, Any]) -> int:
        """C{POST /rest/bug}: the new bug's id."""
        answer = await self.call("POST", "/rest/bug", body=fields)
        bug_id = answer.get("id")
        if not isinstance(bug_id, int):
            raise BugzillaError(f"Bugzilla at {self.url} created a bug but sent no id")
        return bug_id

    async def update(self, bug_id: int, fields: Mapping[str, Any]) -> dict[str, Any]:
        """C{PUT /rest/bug/ID} with C{fields} (comment, blocks, status...)."""
        return await self.call("PUT", f"/rest/bug/{int(bug_id)}", body=fields)

    # -- plumbing

    async def call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                   body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        url = self.url + path
        if params:
            url += "?" + urlencode(params, doseq=True)
        headers = {"Accept": ["application/json"], "User-Agent": [f"roller/{__version__}"]}
        if self._key:
            headers[API_KEY_HEADER] = [self._key]
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = ["application/json"]
        where = f"Bugzilla {method} {self.url}{path}"
        d = Deferred.fromCoroutine(self._exchange(method, url, headers, data))
        d.addTimeout(self.timeout, self.reactor)
        try:
            status, raw = await d
        except BugzillaError:
            raise
        except (DeferredTimeout, CancelledError):
            raise BugzillaError(f"{where}: no answer within {self.timeout:g} s") from None
        except Exception as e:  # noqa: BLE001 -- every other way the request fails is one redacted line
            raise BugzillaError(self.redact(f"{where}: {_describe(e)}")) from None
        try:
            answer = load_json(raw)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and answer.get("error"):
            code = answer.get("code")
            message = str(answer.get("message") or "no message")
            raise BugzillaError(self.redact(f"{where}: Bugzilla error {code}: {message}"[:500]),
                                code=code if isinstance(code, int) else None, status=status)
        if status >= 400:
            raise BugzillaError(f"{where}: HTTP {status}", status=status)
        if not isinstance(answer, dict):
            raise BugzillaError(f"{where}: the answer is not a JSON object (HTTP {status})", status=status)
        return answer

    async def _exchange(self, method: str, url: str, headers: dict, data: bytes | None) -> tuple[int, bytes]:
        response = await self.http.request(method, url, headers=headers, data=data)
        length = response.length
        if isinstance(length, int) and length > MAX_BODY:
            raise BugzillaError(f"Bugzilla {method} {self.url}: answer too large ({length} bytes)")
        raw = await response.content()
        return response.code, raw


def _describe(e: Exception) -> str:
    reasons = getattr(e, "reasons", None)  # ResponseFailed and friends wrap Failures
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
