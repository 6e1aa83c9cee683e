"""
Shared pytest setup.

Until roller is installed into the test virtualenv (C{pip install -e .}),
make the checkout importable.  pytest-twisted needs nothing here: its plugin
registers itself and runs the default reactor for C{pytest_twisted} tests.

L{clean_reactor} (autouse) fails a test that leaves the global reactor
dirty: a DelayedCall it scheduled, a socket or pipe it opened, or a child
process it spawned, still there once the test and its fixtures have ended
and the reactor has had a few turns to finish closing what was closed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

#: the session's PostgreSQL server (postgres_server) and a store per engine (store_path)
pytest_plugins = ["roller.testing.postgres"]

#: How many reactor turns (of at most 10 ms each) a transport, a port or a
#: killed process gets to finish closing before the test is judged.
SETTLE_TURNS = 50


def _reactor_state(reactor: Any) -> dict[str, set[Any]]:
    from twisted.internet import process

    return {
        "delayed calls": {c for c in reactor.getDelayedCalls() if c.active()},
        "readers": set(reactor.getReaders()),
        "writers": set(reactor.getWriters()),
        "processes": set(process.reapProcessHandlers.values()),
    }


def _left(reactor: Any, before: dict[str, set[Any]]) -> dict[str, set[Any]]:
    now = _reactor_state(reactor)
    return {kind: items - before[kind] for kind, items in now.items() if items - before[kind]}


def _spin(reactor: Any) -> bool:
    """Give the reactor one turn, if pytest-twisted runs it; whether it could."""
    import pytest_twisted
    from twisted.internet.task import deferLater

    greenlet = pytest_twisted._instances.gr_twisted
    if greenlet is None or greenlet.dead:
        return False
    pytest_twisted.blockon(deferLater(reactor, 0.01, lambda: None))
    return True


def _describe(left: dict[str, set[Any]]) -> str:
    lines = []
    for kind, items in left.items():
        for item in items:
            text = repr(item)
            if kind == "delayed calls":
                text = str(item)  # func, args and where it was scheduled when debug is on
            lines.append(f"  {kind[:-1]}: {text}")
    return "\n".join(sorted(lines))


def _clean_up(left: dict[str, set[Any]]) -> None:
    """Close what the test left behind, so the next test starts clean and is judged on its own."""
    for call in left.get("delayed calls", ()):
        if call.active():
            call.cancel()
    for item in left.get("readers", set()) | left.get("writers", set()):
        for close in ("stopListening", "abortConnection", "loseConnection"):
            method = getattr(item, close, None)
            if method is not None:
                try:
                    method()
                except Exception:  # noqa: BLE001 -- best effort: the test has already failed
                    pass
                break
    for proc in left.get("processes", ()):
        try:
            proc.signalProcess("KILL")
        except Exception:  # noqa: BLE001 -- best effort: it may have exited meanwhile
            pass


@pytest.fixture(autouse=True)
def clean_reactor(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves DelayedCalls, sockets, pipes or processes on the global reactor."""
    if "twisted.internet.reactor" not in sys.modules:
        # Nothing has touched the reactor yet: pytest-twisted installs it at configure time, so this is
        # only a test run without the plugin.
        yield
        return
    from twisted.internet import reactor

    if not reactor.running:
        _spin(reactor)  # start it now, so its own wakers and triggers are not counted against the test
    before = _reactor_state(reactor)
    yield
    left = _left(reactor, before)
    turns = 0
    while left and turns < SETTLE_TURNS and _spin(reactor):
        turns += 1
        left = _left(reactor, before)
    if left:
        message = f"{request.node.nodeid} left the reactor dirty:\n{_describe(left)}"
        _clean_up(left)
        pytest.fail(message, pytrace=False)
