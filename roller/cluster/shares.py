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

__all__ = ["owner", "weight"]


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
