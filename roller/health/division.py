"""
A roller's share of the fleet's health work, with several rollers on one
PostgreSQL database (L{roller.cluster}); the health watcher asks it.

Each roller that sweeps (C{health.enabled}) probes, polls and remediates
only the machines whose owner, by rendezvous hashing over the live
sweeping rollers that reach their worker group (L{roller.cluster.shares}),
is this roller, and records only their health; the others' machines it
reads from the database, as their owners last wrote them.  A machine no
live roller reaches is probed by nobody: the first of the live sweeping
rollers records an C{unknown} finding saying so.

Remediation: the remediations other rollers started are read every tick
(so the rails count them), and one is recorded in the database before its
job is submitted, under a lock all rollers take, and only if nobody
remediated the machine, or its pool under that policy, since the history
it was decided on (L{roller.cluster.sql.reserve_remediation}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.logger import Logger

from roller.cluster import sql as cluster_sql
from roller.cluster.shares import Shares
from roller.health.model import Finding, Health, HealthTracker
from roller.health.policy import Action
from roller.inventory import Machine
from roller.store import Store, StoreError
from roller.store.health import RemediationRow

__all__ = ["Division", "HealthCluster", "RESERVED_FOR"]

log = Logger()

Key = tuple[str, str]

#: seconds a remediation recorded without its job yet counts as in flight (its roller may have died meanwhile)
RESERVED_FOR = 300.0


class HealthCluster(Protocol):
    """What the watcher asks of L{roller.cluster.node.ClusterNode}."""

    id: str
    membership: int  # changes whenever the live rollers do

    def shares(self) -> Shares: ...


class Division:
    def __init__(self, cluster: HealthCluster, store: Store, tracker: HealthTracker):
        self.cluster = cluster
        self.store = store
        self.tracker = tracker
        self._shares: Shares | None = None
        self._membership = -1
        self.share: dict[str, Any] | None = None  # as last swept: this roller's machines of the fleet
        self.seen = 0  # the newest remediation id read from the database
        self._own: set[int] = set()  # remediation ids this roller recorded
        self._active: set[int] = set()  # remediation ids whose job is in flight, on any roller

    # -- who does what

    def refresh(self) -> Shares:
        """Look at the live rollers again (at each round, poll and tick)."""
        self._membership = self.cluster.membership
        self._shares = self.cluster.shares()
        return self._shares

    def _now(self) -> Shares:
        if self._shares is None or self._membership != self.cluster.membership:
            return self.refresh()
        return self._shares

    def owns(self, key: Key) -> bool:
        """Whether this roller probes, polls and remediates the machine."""
        return self._now().mine(*key)

    def records(self, key: Key) -> bool:
        """Whether this roller writes the machine's health: its own, or one nobody reaches if it is the first."""
        shares = self._now()
        who = shares.owner(*key)
        return who == shares.me or (who is None and self._first(shares))

    @staticmethod
    def _first(shares: Shares) -> bool:
        return shares.ids[:1] == (shares.me,)

    def split(self, machines: Sequence[Machine]) -> tuple[list[Machine], list[Machine]]:
        """
        This round's machines: this roller's, and those nobody reaches
        that this roller records (as the first live sweeping roller).
        """
        shares = self.refresh()
        mine: list[Machine] = []
        unreached: list[Machine] = []
        for m in machines:
            who = shares.owner(m.worker_group, m.worker_id)
            if who == shares.me:
                mine.append(m)
            elif who is None:
                unreached.append(m)
        share = {"roller": shares.me, "rollers": len(shares.ids), "machines": len(mine), "fleet": len(machines),
                 "unreached": len(unreached)}
        if share != self.share:
            groups = sorted({m.worker_group for m in unreached})
            log.info("Health: this roller probes {mine} of {fleet} machines ({rollers} live roller(s) share them)"
                     "{unreached}", mine=len(mine), fleet=len(machines), rollers=len(shares.ids),
                     unreached=f"; {len(unreached)} machine(s) of worker group(s) {', '.join(groups[:10])} are "
                               "probed by no roller (no running roller reaches them)" if unreached else "")
            self.share = share
        return mine, unreached if self._first(shares) else []

    # -- the others' machines

    async def import_others(self) -> list[Key]:
        """Set the health of the machines other rollers record as they last wrote it; their keys."""
        try:
            rows = await self.store.health.all()
        except StoreError as e:
            log.warn("Health: the other rollers' machines could not be read ({error})", error=e)
            return []
        keys = []
        for row in rows:
            key = (row.worker_group, row.worker_id)
            if self.records(key):
                continue
            machine = self.store.machines.cached(key)
            h = self.tracker.get(key, (machine.pool if machine is not None else None) or "")
            # (a flag set through this roller shows before the owner records the state it makes)
            h.state = Health.maintenance if row.maintenance else Health(row.state)
            h.since, h.maintenance = row.since, row.maintenance
            h.findings = {(f["source"], f["kind"]): Finding(f["source"], f["kind"], f["since"], f["detail"])
                          for f in row.findings}
            # so that a machine this roller takes over goes on from where its previous owner left it
            h.liveness_known = row.state != Health.unknown.value
            h.liveness_failures = self.tracker.down_after if ("liveness", "down") in h.findings else 0
            keys.append(key)
        return keys

    # -- remediations

    def loaded(self, remediation_id: int) -> None:
        """A remediation read at start-up."""
        self.seen = max(self.seen, remediation_id)

    async def others_remediations(self, now: float) -> list[RemediationRow]:
        """The remediations other rollers recorded since the last look (and which are in flight, anywhere)."""
        try:
            rows = await self.store.health.remediations_after(self.seen)
            self._active = await self.store.db.read(cluster_sql.active_remediations, now - RESERVED_FOR)
        except StoreError as e:
            log.warn("Health: the other rollers' remediations could not be read ({error})", error=e)
            return []
        for r in rows:
            self.seen = max(self.seen, r.id)
        return [r for r in rows if r.id not in self._own]

    def in_flight(self, remediation_id: int | None) -> bool:
        return remediation_id in self._active

    async def machines_with_jobs(self) -> set[Key]:
        """Machines with a job queued or running on any roller (L{StoreError} if the database cannot say)."""
        return await self.store.db.read(cluster_sql.machines_with_jobs)

    async def reserve(self, action: Action, pool: str, now: float) -> int | None:
        """
        Record the remediation about to start; its id, or None if another
        roller acted on the machine or its pool since the history read.
        """
        reserved = await self.store.db.write(
            cluster_sql.reserve_remediation, action.key, action.policy.name, action.task, now,
            action.policy.dry_run, action.reason, pool, self.seen,
            tuple(sorted(i for i in self._own if i > self.seen)))
        if reserved is not None:
            self._own.add(reserved)
        return reserved

    async def settle(self, remediation_id: int, job_id: str | None) -> None:
        """The job a recorded remediation started; None: it did not start (the record goes)."""
        try:
            await self.store.db.write(cluster_sql.remediation_job, remediation_id, job_id)
        except StoreError as e:
            log.warn("Health: remediation {id} not updated ({error})", id=remediation_id, error=e)
