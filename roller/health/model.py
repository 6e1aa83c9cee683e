"""
A machine's health: its current findings and the state they make.

States: C{healthy}, C{degraded} (a finding such as C{failing} or
C{missing}), C{down} (its liveness check failed C{down_after} times in a
row; one success brings it back), C{unknown} (nothing known yet, or what
would be known cannot be asked now), and the overriding C{maintenance}
(an operator's flag), C{loaned} (lent to a person) and C{quarantined}
(Taskcluster quarantines it), in that order of precedence.

Findings have a source (C{liveness}, C{taskcluster}), a kind, the time
they were first seen (kept while they last) and a detail line.
L{HealthTracker} folds the sweeps' and pollers' results into findings and
reports each change of state to C{on_transition}, which records it (a
small table of transitions, not a job per probe).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping

from attrs import define, field, frozen
from twisted.internet.interfaces import IReactorTime

__all__ = ["Finding", "Health", "HealthTracker", "MachineHealth", "Transition", "OVERRIDES", "PROBLEMS"]

Key = tuple[str, str]  # (worker_group, worker_id)


class Health(enum.StrEnum):
    healthy = "healthy"
    degraded = "degraded"
    down = "down"
    unknown = "unknown"
    loaned = "loaned"
    quarantined = "quarantined"
    maintenance = "maintenance"


#: states set by people or by Taskcluster, never acted on by remediation
OVERRIDES = frozenset({Health.maintenance, Health.loaned, Health.quarantined})
#: finding kinds that make a machine degraded
PROBLEMS = frozenset({"failing", "missing"})


@frozen
class Finding:
    source: str  # "liveness" or "taskcluster"
    kind: str  # "down", "failing", "missing", "quarantined", "unknown"
    since: float
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"source": self.source, "kind": self.kind, "since": self.since, "detail": self.detail}


@frozen
class Transition:
    key: Key
    time: float
    old: Health
    new: Health
    reason: str


@define
class MachineHealth:
    key: Key
    pool: str = ""
    state: Health = Health.unknown
    since: float = 0.0
    findings: dict[tuple[str, str], Finding] = field(factory=dict)
    liveness_failures: int = 0
    liveness_known: bool = False
    maintenance: bool = False
    loaned: bool = False

    def finding_list(self) -> list[Finding]:
        return sorted(self.findings.values(), key=lambda f: (f.since, f.source, f.kind))


class HealthTracker:
    """
    Every machine's health, in memory; C{on_transition} hears each change
    of state (and may write it down).
    """

    def __init__(self, clock: IReactorTime, *, down_after: int = 2,
                 on_transition: Callable[[Transition], None] | None = None):
        self.clock = clock
        self.down_after = down_after
        self.on_transition = on_transition
        self.machines: dict[Key, MachineHealth] = {}

    def get(self, key: Key, pool: str = "") -> MachineHealth:
        h = self.machines.get(key)
        if h is None:
            h = self.machines[key] = MachineHealth(key, pool, since=self.clock.seconds())
        elif pool:
            h.pool = pool
        return h

    def forget(self, keys: Iterable[Key]) -> None:
        """Machines removed from the inventory."""
        for key in keys:
            self.machines.pop(key, None)

    # -- what the sources say

    def liveness(self, key: Key, alive: bool | None, detail: str, pool: str = "") -> None:
        """A probe's outcome: C{None} when the probe could not be carried out."""
        h = self.get(key, pool)
        if alive is None:
            self._set(h, "liveness", {"unknown": f"liveness could not be checked: {detail}"})
        elif alive:
            h.liveness_known = True
            h.liveness_failures = 0
            self._set(h, "liveness", {})
        else:
            h.liveness_known = True
            h.liveness_failures += 1
            found = {}
            if h.liveness_failures >= self.down_after:
                found["down"] = f"{h.liveness_failures} liveness checks in a row failed: {detail}"
            self._set(h, "liveness", found, keep_since=True)
        self._settle(h, detail)

    def fitness(self, keys: Iterable[Key], found: Mapping[Key, list[tuple[str, str]]] | None, error: str = "",
                pool: str = "") -> None:
        """
        A Taskcluster poll of a pool: each machine's findings, or (C{found}
        None) the reason Taskcluster could not be asked, which replaces
        every Taskcluster finding of those machines with C{unknown}.
        """
        for key in keys:
            h = self.get(key, pool)
            if found is None:
                self._set(h, "taskcluster", {"unknown": f"Taskcluster could not be asked: {error}"})
                self._settle(h, error)
            else:
                kinds = dict(found.get(key, []))
                self._set(h, "taskcluster", kinds)
                self._settle(h, "; ".join(kinds.values()) or "Taskcluster reports nothing wrong")

    def set_maintenance(self, key: Key, on: bool, reason: str) -> MachineHealth:
        h = self.get(key)
        h.maintenance = on
        self._settle(h, reason)
        return h

    def set_loaned(self, key: Key, on: bool, reason: str = "") -> None:
        h = self.get(key)
        if h.loaned != on:
            h.loaned = on
            self._settle(h, reason or ("loaned" if on else "loan returned"))

    # -- the state

    def _set(self, h: MachineHealth, source: str, kinds: Mapping[str, str], keep_since: bool = True) -> None:
        now = self.clock.seconds()
        for (src, kind) in [k for k in h.findings if k[0] == source and k[1] not in kinds]:
            del h.findings[(src, kind)]
        for kind, detail in kinds.items():
            old = h.findings.get((source, kind))
            since = old.since if old is not None and keep_since else now
            h.findings[(source, kind)] = Finding(source, kind, since, detail)

    @staticmethod
    def state_of(h: MachineHealth) -> Health:
        kinds = {kind for _, kind in h.findings}
        if h.maintenance:
            return Health.maintenance
        if h.loaned:
            return Health.loaned
        if "quarantined" in kinds:
            return Health.quarantined
        if "down" in kinds:
            return Health.down
        if kinds & PROBLEMS:
            return Health.degraded
        if "unknown" in kinds or not h.liveness_known:
            return Health.unknown
        return Health.healthy

    def _settle(self, h: MachineHealth, reason: str) -> None:
        new = self.state_of(h)
        if new is h.state:
            return
        t = Transition(h.key, self.clock.seconds(), h.state, new, reason[:500])
        h.state, h.since = new, t.time
        if self.on_transition is not None:
            self.on_transition(t)

    def counts(self) -> dict[str, dict[str, int]]:
        """pool -> state -> machines."""
        out: dict[str, dict[str, int]] = {}
        for h in self.machines.values():
            by = out.setdefault(h.pool, {s.value: 0 for s in Health})
            by[h.state.value] += 1
        return out
