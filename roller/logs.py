"""
Log observers: human-readable text by default, one JSON object per line
when C{log.format = "json"} (time, level, namespace, message and the
event's own structured fields, ready for a log pipeline).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from zope.interface import implementer


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def event_as_json(event: dict) -> str:
    out: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(timespec="milliseconds"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    message = out["message"]
    for key, value in event.items():
        if key.startswith(("log_", "_")) or key in out or (isinstance(value, str) and value == message):
            continue  # (a field that is the whole message is not repeated)
        out[key] = _plain(value)
    failure = event.get("log_failure")
    if failure is not None:
        out["failure"] = failure.getTraceback()
    return json.dumps(out, separators=(",", ":"))


@implementer(ILogObserver)
class JsonLinesObserver:
    def __init__(self, out: IO[str]):
        self._out = out

    def __call__(self, event: dict) -> None:
        self._out.write(event_as_json(event) + "\n")
        self._out.flush()


class _SecondsCache:
    """
    L{formatTime} (RFC 3339, local offset), worked out once per second:
    a busy API logs thousands of access lines a second.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second, self._text = second, formatTime(second)
        return self._text


def text_observer(out: IO[str]) -> ILogObserver:
    """Twisted's classic text lines (C{textFileLogObserver}'s format)."""
    cached = _SecondsCache()
    return FileLogObserver(out, lambda event: formatEventAsClassicLogText(event, formatTime=cached))


# Libraries that narrate every connection at info level: one reboot of a
# thousand machines would otherwise log tens of thousands of lines.
QUIET_NAMESPACES = ("twisted.conch", "twisted.internet.endpoints", "roller.sim.fleet")


def observer_for(fmt: str, out: IO[str], level: LogLevel = LogLevel.info) -> ILogObserver:
    base = JsonLinesObserver(out) if fmt == "json" else text_observer(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    for namespace in QUIET_NAMESPACES:
        predicate.setLogLevelForNamespace(namespace, LogLevel.warn)
    return FilteringLogObserver(base, [predicate])


def observer() -> ILogObserver:
    """
    For C{twistd --logger roller.logs.observer}: roller's own observer on
    standard output, C{info} and above, text unless C{ROLLER_LOG_FORMAT=json}
    (twistd's default observer also prints every C{debug} event).
    """
    import os
    import sys

    fmt = "json" if os.environ.get("ROLLER_LOG_FORMAT", "").strip().lower() == "json" else "text"
    return observer_for(fmt, sys.stdout)
