"""
Remediation policies and the rails no policy can turn off.

A policy (one C{[[health.policies]]} table) says: for machines of these
C{pools} (globs), when a finding of these kinds (C{when}) has lasted
C{after} seconds, run the next task of C{do} (the first on the first
attempt, the second if the machine is still sick after it, ...), at most
C{max_concurrent} machines of a pool at once (a count, or a percentage of
the pool), a machine no sooner than C{cooldown} seconds after its last
remediation and at most C{max_per_day} times a day; with C{dry_run} it
only reports what it would do.

The rails, whatever the policies say: never a machine that is loaned, in
maintenance or quarantined; never one with a job queued or running;
nothing at all while remediation is paused; and only from findings that
are not C{unknown} (never on stale data).

L{plan} is pure: from the machines' health, the jobs in flight and the
remediation history it returns the actions to take now.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from attrs import frozen

from roller.health.model import OVERRIDES, MachineHealth

__all__ = ["Action", "Policy", "Remediation", "parse_policies", "plan"]

Key = tuple[str, str]

_KNOWN_KEYS = ("name", "pools", "when", "after", "do", "max_concurrent", "cooldown", "max_per_day", "dry_run")
_KINDS = ("down", "failing", "missing")


@frozen
class Policy:
    name: str
    pools: tuple[str, ...]
    when: tuple[str, ...]
    do: tuple[str, ...]
    after: float = 0.0
    max_concurrent: int | float = 1  # an int is a count; a float in (0, 1] a share of the pool
    cooldown: float = 3600.0
    max_per_day: int = 3
    dry_run: bool = False

    def matches_pool(self, pool: str) -> bool:
        return any(fnmatch.fnmatchcase(pool, glob) for glob in self.pools)

    def limit(self, pool_size: int) -> int:
        if isinstance(self.max_concurrent, float):
            return max(1, math.floor(self.max_concurrent * pool_size))
        return self.max_concurrent


@frozen
class Remediation:
    """One remediation started (or, in a dry run, that would have been)."""

    key: Key
    policy: str
    task: str
    time: float
    dry_run: bool = False
    active: bool = False  # its job is queued or running


@frozen
class Action:
    key: Key
    policy: Policy
    task: str
    step: int
    reason: str


def _count_or_share(key: str, value: Any) -> int | float:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            share = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"{key} must be a count or a percentage such as \"25%\", got {value!r}") from None
        if not 0 < share <= 1:
            raise ValueError(f"{key} must be a percentage from 1% to 100%, got {value!r}")
        return share
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a count of at least 1 or a percentage such as \"25%\", got {value!r}")
    return value


def _number(key: str, value: Any, low: float = 0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise ValueError(f"{key} must be a number of at least {low:g}, got {value!r}")
    return float(value)


def _strings(key: str, value: Any, allowed: Sequence[str] | None = None) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{key} must be a non-empty list of strings, got {value!r}"[:200])
    if allowed is not None:
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise ValueError(f"{key}: unknown {', '.join(unknown)} (known: {', '.join(allowed)})")
    return tuple(value)


def parse_policies(value: Any, known_tasks: Iterable[str]) -> tuple[Policy, ...]:
    """C{[[health.policies]]}: a list of tables; C{ValueError} naming the policy and key."""
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise ValueError("must be an array of tables ([[health.policies]])")
    tasks = tuple(known_tasks)
    out = []
    names: set[str] = set()
    for i, table in enumerate(value):
        where = f"policy {i + 1}"
        unknown = sorted(set(table) - set(_KNOWN_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(_KNOWN_KEYS)})")
        name = table.get("name", f"policy-{i + 1}")
        if not isinstance(name, str) or not name or name in names:
            raise ValueError(f"{where}: name must be a unique non-empty string, got {name!r}")
        names.add(name)
        where = f"policy {name!r}"
        try:
            for required in ("pools", "when", "do"):
                if required not in table:
                    raise ValueError(f"{required} is required")
            policy = Policy(
                name=name,
                pools=_strings("pools", table["pools"]),
                when=_strings("when", table["when"], _KINDS),
                do=_strings("do", table["do"], tasks),
                after=_number("after", table.get("after", 0)),
                max_concurrent=_count_or_share("max_concurrent", table.get("max_concurrent", 1)),
                cooldown=_number("cooldown", table.get("cooldown", 3600)),
                max_per_day=int(_number("max_per_day", table.get("max_per_day", 3), 1)),
                dry_run=table.get("dry_run", False),
            )
            if not isinstance(policy.dry_run, bool):
                raise ValueError(f"dry_run must be true or false, got {policy.dry_run!r}")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        out.append(policy)
    return tuple(out)


def plan(policies: Sequence[Policy], machines: Iterable[MachineHealth], *, now: float, paused: bool,
         busy: Callable[[Key], bool], history: Sequence[Remediation],
         pool_sizes: Mapping[str, int],
         mine: Callable[[Key], bool] | None = None) -> tuple[list[Action], list[str]]:
    """
    The remediations to start now, and why others were held back (lines
    for the log and the API).

    @param busy: whether a machine has a job queued or running.
    @param history: remediations of the last day at least (and every
        active one), any order.
    @param mine: with several rollers, the machines this one acts on (the
        others' still count in their pools' limits).
    """
    if paused:
        return [], ["remediation is paused"]
    actions: list[Action] = []
    held: list[str] = []
    by_key: dict[Key, list[Remediation]] = {}
    active: dict[tuple[str, str], int] = {}  # (policy, pool) -> active remediations
    for r in history:
        by_key.setdefault(r.key, []).append(r)
    pool_of: dict[Key, str] = {}
    candidates = sorted(machines, key=lambda h: h.key)
    for h in candidates:
        pool_of[h.key] = h.pool
    for r in history:
        if r.active and not r.dry_run:
            pool = pool_of.get(r.key, "")
            active[(r.policy, pool)] = active.get((r.policy, pool), 0) + 1
    for h in candidates:
        if h.state in OVERRIDES or (mine is not None and not mine(h.key)):
            continue
        for policy in policies:
            if not policy.matches_pool(h.pool):
                continue
            sick = [f for (_, kind), f in h.findings.items() if kind in policy.when and kind != "unknown"]
            if not sick:
                continue
            finding = min(sick, key=lambda f: f.since)
            if now - finding.since < policy.after:
                continue
            label = f"{h.key[0]}/{h.key[1]}"
            if busy(h.key):
                held.append(f"{label}: a job is queued or running")
                break
            past = [r for r in by_key.get(h.key, []) if r.policy == policy.name and r.dry_run == policy.dry_run]
            episode = [r for r in past if r.time >= finding.since]
            if len(episode) >= len(policy.do):
                held.append(f"{label}: every step of {policy.name} was tried since {finding.kind} began")
                break
            if past and now - max(r.time for r in past) < policy.cooldown:
                held.append(f"{label}: in its cooldown ({policy.cooldown:g} s) after the last remediation")
                break
            if sum(1 for r in past if now - r.time < 86400) >= policy.max_per_day:
                held.append(f"{label}: {policy.max_per_day} remediation(s) in the last day already")
                break
            slot = (policy.name, h.pool)
            limit = policy.limit(pool_sizes.get(h.pool, 1))
            if not policy.dry_run and active.get(slot, 0) >= limit:
                held.append(f"{label}: {limit} machine(s) of pool {h.pool or '(none)'} already under "
                            f"{policy.name}")
                break
            step = len(episode)
            reason = f"{policy.name}: {finding.kind} since {_ago(now - finding.since)}: {finding.detail}"
            actions.append(Action(h.key, policy, policy.do[step], step, reason[:500]))
            if not policy.dry_run:
                active[slot] = active.get(slot, 0) + 1
            break
    return actions, held


def _ago(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min"
