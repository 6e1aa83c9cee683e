"""
How long machines stayed down lately, per kind of machine and way of
rebooting: a reboot wave does not poll a machine every second while it
cannot be back yet.

Each verified reboot notes how long the machine took to come back once it
was seen down, under its key (the machine's pool, else its worker group;
the task; the method).  Once L{MIN_SEEN} such reboots are known,
L{DownTimes.quiet} is L{QUIET_SHARE} of the shortest of the last L{KEEP}:
the first "is it up?" look waits that long, then the usual polling
resumes.  A machine of that kind back sooner than half the fastest
recent one is seen up later than it could have been; every other one as
soon as before, with fewer checks (a machine down for ten seconds,
polled every second, is checked six times instead of ten).

The times are kept in memory per reactor (the process's, or a test's
clock), never stored: a restarted roller polls every interval again until
it has seen L{MIN_SEEN} reboots of a kind.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Hashable

__all__ = ["DownTimes", "KEEP", "MIN_SEEN", "QUIET_SHARE", "down_times"]

#: reboots remembered per key
KEEP = 20
#: reboots seen before any look is skipped
MIN_SEEN = 3
#: share of the shortest recent time down that passes before the first look
QUIET_SHARE = 0.5


class DownTimes:
    """Recent times down (seconds until up again, once seen down) per key."""

    def __init__(self) -> None:
        self._seen: dict[Hashable, deque[float]] = {}

    def note(self, key: Hashable, seconds: float) -> None:
        """A machine of C{key} was up again C{seconds} after it was seen down."""
        recent = self._seen.get(key)
        if recent is None:
            recent = self._seen[key] = deque(maxlen=KEEP)
        recent.append(max(0.0, seconds))

    def quiet(self, key: Hashable) -> float:
        """Seconds a machine of C{key}, just seen down, is not looked at; 0 until L{MIN_SEEN} are known."""
        recent = self._seen.get(key)
        if recent is None or len(recent) < MIN_SEEN:
            return 0.0
        return QUIET_SHARE * min(recent)


_BY_REACTOR: weakref.WeakKeyDictionary[object, DownTimes] = weakref.WeakKeyDictionary()


def down_times(reactor: object) -> DownTimes:
    """The L{DownTimes} of the jobs run on C{reactor}."""
    times = _BY_REACTOR.get(reactor)
    if times is None:
        times = _BY_REACTOR[reactor] = DownTimes()
    return times
