"""
treq clients for roller's HTTP peers (Taskcluster, Bugzilla, notify,
webhooks): each owner keeps one persistent connection pool and closes it
when it stops.  A request is never repeated by the pool on its own: these
are POSTs whose failure is reported, not retried blindly.
"""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.web.client import Agent, HTTPConnectionPool


def pooled_client(reactor: Any, *, connect_timeout: float | None = None,
                  max_per_host: int = 2) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client on a new persistent pool of its own; both."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.retryAutomatically = False
    agent = Agent(reactor, pool=pool, connectTimeout=connect_timeout)
    return HTTPClient(agent), pool


def close_pool(pool: HTTPConnectionPool | None) -> Deferred:
    """Close a pool's idle connections (nothing to do for a client given from outside)."""
    return succeed(None) if pool is None else pool.closeCachedConnections()
