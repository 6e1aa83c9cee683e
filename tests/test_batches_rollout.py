"""The rollout decision (roller.batches.rollout.plan): pure, so checked exhaustively."""

from __future__ import annotations

import itertools
import random

import pytest

from roller.batches.model import Limit, Rollout
from roller.batches.rollout import Decision, plan, pool_limit, tripped

PCT25 = Limit(25, percent=True)


def test_no_limits_starts_everything_in_order():
    d = plan(Rollout(), total=5, pool_sizes={"a": 3, "b": 2}, pending={"a": [0, 2, 4], "b": [1, 3]},
             active=0, active_by_pool={})
    assert d == Decision(start=(0, 1, 2, 3, 4))


def test_max_concurrent_counts_and_percentages():
    pending = {"a": list(range(10))}
    assert plan(Rollout(max_concurrent=Limit(3)), total=10, pool_sizes={"a": 10}, pending=pending, active=0,
                active_by_pool={}).start == (0, 1, 2)
    assert plan(Rollout(max_concurrent=Limit(3)), total=10, pool_sizes={"a": 10}, pending=pending, active=2,
                active_by_pool={"a": 2}).start == (0,)
    assert plan(Rollout(max_concurrent=Limit(3)), total=10, pool_sizes={"a": 10}, pending=pending, active=3,
                active_by_pool={"a": 3}).start == ()
    # 10% of a batch of 10 is 1; of 35 is 3 (rounded down); never less than 1
    assert len(plan(Rollout(max_concurrent=Limit(10, percent=True)), total=10, pool_sizes={"a": 10},
                    pending=pending, active=0, active_by_pool={}).start) == 1
    assert len(plan(Rollout(max_concurrent=Limit(10, percent=True)), total=35, pool_sizes={"a": 35},
                    pending={"a": list(range(35))}, active=0, active_by_pool={}).start) == 3
    assert len(plan(Rollout(max_concurrent=Limit(1, percent=True)), total=5, pool_sizes={"a": 5},
                    pending={"a": list(range(5))}, active=0, active_by_pool={}).start) == 1


def test_max_per_pool_is_of_the_inventory_pool():
    r = Rollout(max_per_pool=PCT25)
    d = plan(r, total=6, pool_sizes={"a": 12, "b": 4}, pending={"a": [0, 2, 4, 5], "b": [1, 3]}, active=0,
             active_by_pool={})
    assert d.start == (0, 1, 2, 4)  # 3 of a (25% of 12), 1 of b (25% of 4)
    assert pool_limit(r, 3) == 1 and pool_limit(Rollout(), 3) == float("inf")


def test_active_and_elsewhere_use_the_pools_room():
    r = Rollout(max_per_pool=Limit(2))
    d = plan(r, total=6, pool_sizes={"a": 10, "b": 10}, pending={"a": [2, 4], "b": [3, 5]}, active=2,
             active_by_pool={"a": 1}, elsewhere_by_pool={"a": 1, "b": 1})
    assert d.start == (3,)


def test_a_pool_missing_from_the_sizes_counts_its_members():
    d = plan(Rollout(max_per_pool=Limit(50, percent=True)), total=4, pool_sizes={},
             pending={"": [0, 1, 2, 3]}, active=0, active_by_pool={})
    assert d.start == (0, 1)


def test_nothing_starts_when_halted_tripped_or_stopping():
    pending = {"a": [0, 1]}
    assert plan(Rollout(), total=2, pool_sizes={"a": 2}, pending=pending, active=0, active_by_pool={},
                running=False) == Decision()
    r = Rollout(stop_after_failures=2)
    assert plan(r, total=2, pool_sizes={"a": 2}, pending=pending, active=0, active_by_pool={}, failures=2) == Decision()
    assert plan(r, total=2, pool_sizes={"a": 2}, pending=pending, active=0, active_by_pool={}, failures=1).start
    assert tripped(r, 2) and not tripped(r, 1) and not tripped(Rollout(), 10_000)


def test_pause_between_one_at_a_time():
    r = Rollout(pause_between=10)
    pending = {"a": [0, 1, 2]}
    assert plan(r, total=3, pool_sizes={"a": 3}, pending=pending, active=0, active_by_pool={}, now=0,
                last_start=None) == Decision(start=(0,), wait=10)
    assert plan(r, total=3, pool_sizes={"a": 3}, pending=pending, active=1, active_by_pool={"a": 1}, now=4,
                last_start=0) == Decision(wait=6)
    assert plan(r, total=3, pool_sizes={"a": 3}, pending=pending, active=1, active_by_pool={"a": 1}, now=10,
                last_start=0) == Decision(start=(0,), wait=10)
    assert plan(r, total=3, pool_sizes={"a": 3}, pending={"a": [2]}, active=1, active_by_pool={"a": 1}, now=20,
                last_start=10) == Decision(start=(2,))
    assert plan(r, total=3, pool_sizes={"a": 3}, pending={}, active=1, active_by_pool={"a": 1}, now=21,
                last_start=20) == Decision()


@pytest.mark.parametrize("seed", range(40))
def test_random_states_never_exceed_a_limit(seed):
    """Whatever the state, starting what plan says never exceeds a limit, and never starts a non-pending member."""
    rnd = random.Random(seed)
    pools = {p: rnd.randint(1, 30) for p in "abcd"[:rnd.randint(1, 4)]}
    members = [(i, p) for i, p in enumerate(p for p, n in pools.items() for _ in range(rnd.randint(0, n)))]
    rnd.shuffle(members)
    total = len(members) or 1
    rollout = Rollout(max_concurrent=rnd.choice([None, Limit(rnd.randint(1, 20)), Limit(rnd.choice([10, 50]), True)]),
                      max_per_pool=rnd.choice([None, Limit(rnd.randint(1, 5)), PCT25]))
    states = {i: rnd.choice(["pending", "active", "done"]) for i, _ in members}
    pending: dict[str, list[int]] = {}
    active_by_pool: dict[str, int] = {}
    for i, p in sorted(members):
        if states[i] == "pending":
            pending.setdefault(p, []).append(i)
        elif states[i] == "active":
            active_by_pool[p] = active_by_pool.get(p, 0) + 1
    elsewhere = {p: rnd.randint(0, 2) for p in pools}
    active = sum(active_by_pool.values())
    d = plan(rollout, total=total, pool_sizes=pools, pending=pending, active=active, active_by_pool=active_by_pool,
             elsewhere_by_pool=elsewhere)
    pool_of = dict(members)
    assert all(states[i] == "pending" for i in d.start) and len(set(d.start)) == len(d.start)
    if rollout.max_concurrent is not None:
        assert active + len(d.start) <= max(active, rollout.max_concurrent.of(total))
    for p, size in pools.items():
        started = sum(1 for i in d.start if pool_of[i] == p)
        if rollout.max_per_pool is not None and started:
            assert active_by_pool.get(p, 0) + elsewhere[p] + started <= rollout.max_per_pool.of(size)
    # every pool's members start in rollout order
    for p, positions in pending.items():
        mine = [i for i in d.start if pool_of[i] == p]
        assert mine == positions[:len(mine)]
    # as many as the limits allow: a start left out would break one
    if rollout.max_concurrent is None or active + len(d.start) < rollout.max_concurrent.of(total):
        for p, positions in pending.items():
            started = sum(1 for i in d.start if pool_of[i] == p)
            if started < len(positions) and rollout.max_per_pool is not None:
                assert active_by_pool.get(p, 0) + elsewhere[p] + started >= rollout.max_per_pool.of(pools[p])
            elif started < len(positions):
                pytest.fail(f"pool {p} could start more")


def test_the_global_budget_goes_to_the_earliest_members_across_pools():
    pending = {"a": [0, 3, 6], "b": [1, 4, 7], "c": [2, 5, 8]}
    for n in range(1, 10):
        d = plan(Rollout(max_concurrent=Limit(n)), total=9, pool_sizes={"a": 3, "b": 3, "c": 3}, pending=pending,
                 active=0, active_by_pool={})
        assert d.start == tuple(range(n))


def test_simulated_rollout_holds_every_limit():
    """Run a whole rollout with plan: at no step are limits exceeded, and everything ends up started."""
    for mc, mpp in itertools.product([None, Limit(3), Limit(20, True)], [None, Limit(1), PCT25]):
        rollout = Rollout(max_concurrent=mc, max_per_pool=mpp)
        sizes = {"a": 8, "b": 5, "c": 1}
        order = [p for p in ("a", "b", "c") * 8]
        members = [p for p in order if sizes[p] > 0][:14]
        pending: dict[str, list[int]] = {}
        for i, p in enumerate(members):
            pending.setdefault(p, []).append(i)
        active: dict[int, str] = {}
        started = []
        rnd = random.Random(1)
        while pending or active:
            d = plan(rollout, total=len(members), pool_sizes=sizes, pending=pending, active=len(active),
                     active_by_pool={p: sum(1 for q in active.values() if q == p) for p in sizes})
            for i in d.start:
                p = members[i]
                pending[p].remove(i)
                if not pending[p]:
                    del pending[p]
                active[i] = p
                started.append(i)
            if mc is not None:
                assert len(active) <= mc.of(len(members))
            if mpp is not None:
                for p, size in sizes.items():
                    assert sum(1 for q in active.values() if q == p) <= mpp.of(size)
            assert active, "stuck"
            del active[rnd.choice(sorted(active))]
        assert sorted(started) == list(range(len(members)))
