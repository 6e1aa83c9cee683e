"""
Log observers: human-readable text by default, one JSON object per line
when C{log.format = "json"}.
"""

from __future__ import annotations

from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)


def observer_for(fmt: str, out: IO[str], level: LogLevel = LogLevel.info) -> ILogObserver:
    base = jsonFileLogObserver(out, recordSeparator="") if fmt == "json" else textFileLogObserver(out)
    return FilteringLogObserver(base, [LogLevelFilterPredicate(defaultLogLevel=level)])


def json_observer() -> ILogObserver:
    """For C{twistd --logger roller.logs.json_observer}."""
    import sys

    return observer_for("json", sys.stdout)
