"""
A synchronous adbapi pool, so store code runs on real SQLite inside
C{task.Clock} tests and C{successResultOf} sees the result at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from roller.store import Database, Store, open_store
from roller.testing.results import result_of

# result_of is defined in roller.testing.results; many tests import it from here with the sync store.
__all__ = ["SyncClock", "result_of", "run", "sync_database", "sync_store"]


class _NonThreadPool:
    """Runs "threaded" work right away, in the calling thread."""

    def callInThreadWithCallback(self, onResult: Callable, f: Callable, *a: Any, **kw: Any) -> None:
        try:
            result = f(*a, **kw)
        except Exception:
            onResult(False, Failure())
        else:
            onResult(True, result)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class SyncClock(Clock):
    """A L{Clock} whose C{callFromThread} runs the call at once."""

    def callFromThread(self, f: Callable, *a: Any, **kw: Any) -> None:
        f(*a, **kw)

    def callWhenRunning(self, f: Callable, *a: Any, **kw: Any) -> None:
        """Never "running": the adbapi pool must not start real threads."""

    def addSystemEventTrigger(self, *a: Any, **kw: Any) -> None:
        pass

    def removeSystemEventTrigger(self, *a: Any) -> None:
        pass


def sync_database(path: str, clock: SyncClock) -> Database:
    db = Database.connect(path, clock)
    for pool in db.pools:
        pool.threadpool = _NonThreadPool()
        pool.running = True
    return db


def run(coro: Any) -> Any:
    """Run a coroutine that completes synchronously (on a sync store and clock); its result."""
    return result_of(Deferred.fromCoroutine(coro))


def sync_store(path: str = ":memory:", clock: SyncClock | None = None) -> tuple[Store, SyncClock]:
    """A real SQLite store that answers synchronously; and its clock."""
    clock = clock or SyncClock()
    return run(open_store(path, clock, db=sync_database(path, clock))), clock
