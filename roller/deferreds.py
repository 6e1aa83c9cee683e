"""
Waiting for several Deferreds at once.

    jobs, audit = await all_of(store.jobs.list(...), store.audit.list(...))
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList

__all__ = ["all_of"]


async def all_of(*ds: Deferred[Any]) -> list[Any]:
    """
    The results of C{ds}, in order, once every one has fired.  If any
    failed, the first failure (in argument order) is raised as it is (not
    wrapped, so callers map it as they would a single read's), and the
    others' failures are consumed: none is left unhandled.
    """
    results = await DeferredList(list(ds), consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()
    return [value for _, value in results]
