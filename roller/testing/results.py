"""
The two ways tests look at asynchronous results, written once:

  - L{result_of} / L{failure_of}: what a Deferred has I{already} fired with
    (unit tests on C{task.Clock}, a synchronous store): no waiting at all.
  - L{eventually}: poll a condition on a running reactor until it holds
    (integration tests against real peers), with a deadline so that a
    broken condition fails the test instead of hanging it.  The deadline
    is a safety net, not a timing assertion: tests never assert how long
    something took (that is what C{bench/} is for).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

__all__ = ["eventually", "failure_of", "has_no_result", "result_of"]

T = TypeVar("T")

_NO_RESULT: Any = object()


def _outcome(d: Deferred[Any]) -> Any:
    """
    What C{d} has fired with, or C{_NO_RESULT}.  A success stays in C{d}
    for whoever looks next; a failure is taken out (and so handled).
    """
    if not d.called:
        return _NO_RESULT
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, f"{d!r} is paused, waiting on another Deferred"
    if not isinstance(box[0], Failure):
        value = box[0]
        d.addCallback(lambda _: value)
    return box[0]


def result_of(d: Deferred[T]) -> T:
    """The result C{d} already has; fails the test if it has none yet, raises its failure if it failed."""
    result = _outcome(d)
    assert result is not _NO_RESULT, f"{d!r} has no result yet"
    if isinstance(result, Failure):
        result.raiseException()
    return result


def failure_of(d: Deferred[Any], *types: type[BaseException]) -> Failure:
    """The failure C{d} already has, which must be one of C{types} (any, if none are given)."""
    result = _outcome(d)
    assert result is not _NO_RESULT, f"{d!r} has no result yet"
    assert isinstance(result, Failure), f"expected a failure, got {result!r}"
    assert not types or result.check(*types), f"expected one of {types}, got {result!r}"
    return result


def has_no_result(d: Deferred[Any]) -> bool:
    """Whether C{d} has not fired yet."""
    return not d.called


def _global_reactor() -> IReactorTime:
    from twisted.internet import reactor

    return reactor


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    what: str = "the condition",
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    reactor: IReactorTime | None = None,
    describe: Callable[[], object] | None = None,
) -> T:
    """
    Call C{check} (a plain or async function) on a running reactor until it
    returns something truthy, and return that.  Between calls the reactor
    runs for C{interval} seconds.  After C{timeout} seconds fail with
    C{AssertionError} naming C{what} (and C{describe()}, e.g. the last
    state seen), so a test that would wait forever fails instead.
    """
    clock = reactor if reactor is not None else _global_reactor()
    deadline = clock.seconds() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if clock.seconds() > deadline:
            extra = f": {describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        await deferLater(clock, interval, lambda: None)
