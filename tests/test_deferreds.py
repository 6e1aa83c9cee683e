"""roller.deferreds.all_of: several reads awaited together."""

from __future__ import annotations

import gc

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.logger import globalLogPublisher

from roller.deferreds import all_of
from roller.store.db import StorageUnavailable


def _run(d: Deferred) -> list:
    results: list = []
    d.addBoth(results.append)
    return results


def test_results_come_in_argument_order_whatever_order_they_fire_in() -> None:
    first, second = Deferred(), Deferred()
    out = _run(ensureDeferred(all_of(first, second, succeed("third"))))
    second.callback("second")
    assert out == []  # still waiting for the first
    first.callback("first")
    assert out == [["first", "second", "third"]]


def test_the_first_failure_is_raised_as_it_is_and_the_others_are_consumed() -> None:
    logged: list = []
    globalLogPublisher.addObserver(logged.append)
    try:
        late = Deferred()
        out = _run(ensureDeferred(all_of(succeed(1), fail(StorageUnavailable("locked", "the database is locked", 1)),
                                         late, fail(KeyError("second failure")))))
        assert out == []  # waits for every one, even after a failure
        late.callback(3)
        (failure,) = out
        assert failure.check(StorageUnavailable)  # not wrapped in FirstError: callers map it as usual
        del out, failure
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert not [e for e in logged if e.get("log_failure") is not None or "Unhandled" in str(e.get("log_format"))]


def test_nothing_to_wait_for() -> None:
    assert _run(ensureDeferred(all_of())) == [[]]


@pytest.mark.parametrize("bad", [0, 2])
def test_a_failure_first_or_last_fails_the_whole(bad: int) -> None:
    ds = [succeed(i) for i in range(3)]
    ds[bad] = fail(ValueError(f"read {bad}"))
    (failure,) = _run(ensureDeferred(all_of(*ds)))
    assert failure.check(ValueError) and str(failure.value) == f"read {bad}"
