"""A scripted liveness probe for unit tests of reboot verification."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from roller.drivers.liveness import LivenessResult


class DownThenUp:
    """Down at the first check (right after the reboot was sent), up from the second on."""

    def __init__(self) -> None:
        self.checks = 0

    def check(self, address: str) -> Deferred[LivenessResult]:
        self.checks += 1
        return succeed(LivenessResult(alive=self.checks > 1, detail="", lines=()))
