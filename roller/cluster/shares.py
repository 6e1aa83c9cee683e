"""
Which roller looks after which machine: rendezvous (highest random weight)
hashing of (roller id, machine) over the live rollers that reach the
machine's worker group.

Every roller computes the same answer from the same list of rollers, with
no coordination; when a roller joins or dies, only the machines it gains
or held change hands (each machine's weights for the other rollers do not
move).  A machine no live roller reaches has no owner: nobody probes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["Shares", "owner", "weight"]


def weight(roller_id: str, worker_group: str, worker_id: str) -> int:
    """The rendezvous weight of a machine for one roller (the same on every host and run)."""
    digest = hashlib.blake2b(f"{roller_id}\0{worker_group}\0{worker_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def reaches(roller: Mapping[str, Any], worker_group: str) -> bool:
    reach: Sequence[str] = roller.get("reach") or ()
    return not reach or worker_group in reach


def owner(worker_group: str, worker_id: str, rollers: Iterable[Mapping[str, Any]]) -> str | None:
    """The id of the roller of C{rollers} (each with C{id} and C{reach}) owning the machine; None: none reaches it."""
    best: tuple[int, str] | None = None
    for r in rollers:
        if not reaches(r, worker_group):
            continue
        w = (weight(r["id"], worker_group, worker_id), r["id"])
        if best is None or w > best:
            best = w
    return None if best is None else best[1]


class Shares:
    """
    A snapshot of the live rollers (L{roller.cluster.node.ClusterNode.shares}):
    the owner of each machine by L{owner}, computed once per machine.
    """

    def __init__(self, me: str, rollers: list[dict[str, Any]]):
        self.me = me
        self.rollers = rollers
        self.ids = tuple(sorted(r["id"] for r in rollers))
        self._owners: dict[tuple[str, str], str | None] = {}

    def owner(self, worker_group: str, worker_id: str) -> str | None:
        key = (worker_group, worker_id)
        if key not in self._owners:
            self._owners[key] = owner(worker_group, worker_id, self.rollers)
        return self._owners[key]

    def mine(self, worker_group: str, worker_id: str) -> bool:
        return self.owner(worker_group, worker_id) == self.me
