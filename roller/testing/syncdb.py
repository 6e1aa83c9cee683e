"""
A synchronous adbapi pool, so store code runs on real SQLite inside
C{task.Clock} tests and C{successResultOf} sees the result at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from roller.store import Database, IStoreReactor, Store, open_store
from roller.testing.results import result_of

# result_of is defined in roller.testing.results; many tests import it from here with the sync store.
__all__ = ["SyncClock", "result_of", "run", "sync_database", "sync_store"]


class _NonThreadPool(ThreadPool):
    """Runs "threaded" work right away, in the calling thread (no thread is ever started)."""

    def callInThreadWithCallback(self, onResult: Callable[[bool, Any], object] | None,
                                 func: Callable[..., Any], *args: Any, **kw: Any) -> None:
        try:
            result = func(*args, **kw)
        except Exception:  # noqa: BLE001 -- like ThreadPool: every error goes to onResult as a Failure
            if onResult is not None:
                onResult(False, Failure())
        else:
            if onResult is not None:
                onResult(True, result)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@implementer(IStoreReactor)
class SyncClock(Clock):
    """
    A L{Clock} that is the store's whole reactor: C{callFromThread} runs the
    call at once, and it is never "running" (the adbapi pool must not start
    real threads), so it never runs, stops or fires system events either.
    """

    running = False

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)

    def callWhenRunning(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        """Never "running": the adbapi pool must not start real threads."""

    def addSystemEventTrigger(self, *a: Any, **kw: Any) -> None:
        pass

    def removeSystemEventTrigger(self, *a: Any) -> None:
        pass

    def fireSystemEvent(self, eventType: str) -> None:
        pass

    def resolve(self, name: str, timeout: Sequence[int] = (1, 3, 11, 45)) -> Deferred[str]:
        raise NotImplementedError("the sync store never resolves names")

    def run(self) -> None:
        raise NotImplementedError("a SyncClock is advanced by hand, never run")

    def stop(self) -> None:
        raise NotImplementedError("a SyncClock is never running")

    def crash(self) -> None:
        raise NotImplementedError("a SyncClock is never running")

    def iterate(self, delay: float = 0) -> None:
        self.advance(delay)


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
