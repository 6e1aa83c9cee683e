"""Remediation policies: parsing with clear errors, and the plan with its rails."""

from __future__ import annotations

import pytest

from roller.health.model import Finding, Health, MachineHealth
from roller.health.policy import Policy, Remediation, parse_policies, plan

TASKS = ("reboot", "loan", "file_bugzilla_bug", "ping")
NOW = 100_000.0


def sick(n: int, kind: str = "down", since: float = NOW - 900, pool: str = "gecko-t-linux",
         state: Health = Health.down) -> MachineHealth:
    h = MachineHealth(("mdc1", f"w{n:02d}"), pool, state=state)
    h.findings[("liveness" if kind == "down" else "taskcluster", kind)] = Finding("liveness", kind, since, "x")
    return h


def policy(**kw: object) -> Policy:
    base = {"name": "reboot-down", "pools": ["gecko-*"], "when": ["down"], "do": ["reboot", "loan"], "after": 600,
            "max_concurrent": 2, "cooldown": 1800, "max_per_day": 3}
    return parse_policies([{**base, **kw}], TASKS)[0]


def run(policies: list[Policy], machines: list[MachineHealth], history: list[Remediation] | None = None,
        busy: set = frozenset(), paused: bool = False, sizes: dict | None = None) -> tuple[list, list]:
    return plan(policies, machines, now=NOW, paused=paused, busy=lambda k: k in busy, history=history or [],
                pool_sizes=sizes or {"gecko-t-linux": 20})


@pytest.mark.parametrize("table, message", [
    ({"pools": ["p"], "when": ["down"]}, "policy 'p1': do is required"),
    ({"pools": ["p"], "when": ["sad"], "do": ["reboot"]}, "when: unknown sad"),
    ({"pools": ["p"], "when": ["down"], "do": ["format_disk"]}, "do: unknown format_disk"),
    ({"pools": ["p"], "when": ["down"], "do": ["reboot"], "max_concurrent": "150%"}, "from 1% to 100%"),
    ({"pools": ["p"], "when": ["down"], "do": ["reboot"], "max_concurrent": 0}, "max_concurrent must be a count"),
    ({"pools": ["p"], "when": ["down"], "do": ["reboot"], "cooldown": -1}, "cooldown must be a number"),
    ({"pools": ["p"], "when": ["down"], "do": ["reboot"], "dry_run": "yes"}, "dry_run must be true or false"),
    ({"pools": ["p"], "when": ["down"], "do": ["reboot"], "colour": "red"}, "unknown key(s) colour"),
])
def test_bad_policies_name_the_policy_and_key(table: dict, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_policies([{"name": "p1", **table}], TASKS)
    assert message in str(e.value)


def test_percentage_of_the_pool() -> None:
    p = policy(max_concurrent="10%")
    assert p.limit(20) == 2 and p.limit(5) == 1


def test_a_finding_younger_than_after_waits() -> None:
    actions, _ = run([policy()], [sick(1, since=NOW - 100)])
    assert actions == []
    actions, _ = run([policy()], [sick(1, since=NOW - 601)])
    assert [(a.key, a.task, a.step) for a in actions] == [(("mdc1", "w01"), "reboot", 0)]
    assert actions[0].reason.startswith("reboot-down: down since 10 min: ")


def test_rails_loaned_maintenance_quarantined_busy_paused_and_unknown_are_never_touched() -> None:
    machines = [sick(1, state=Health.loaned), sick(2, state=Health.maintenance), sick(3, state=Health.quarantined),
                sick(4), sick(5, kind="unknown", state=Health.unknown)]
    actions, held = run([policy(when=["down", "missing"], max_concurrent=10)], machines, busy={("mdc1", "w04")})
    assert actions == [] and held == ["mdc1/w04: a job is queued or running"]
    assert run([policy()], [sick(6)], paused=True) == ([], ["remediation is paused"])


def test_never_more_than_max_concurrent_of_a_pool() -> None:
    machines = [sick(n) for n in range(10)]
    actions, held = run([policy(max_concurrent=2)], machines)
    assert len(actions) == 2 and sum("already under reboot-down" in h for h in held) == 8
    # two already running: none more
    history = [Remediation(("mdc1", "w00"), "reboot-down", "reboot", NOW - 60, active=True),
               Remediation(("mdc1", "w01"), "reboot-down", "reboot", NOW - 60, active=True)]
    actions, _ = run([policy(max_concurrent=2)], machines, history)
    assert actions == []
    # other pools are counted apart
    other = [sick(20, pool="gecko-t-win")]
    actions, _ = run([policy(max_concurrent=2)], machines + other, history, sizes={"gecko-t-win": 3})
    assert [a.key for a in actions] == [("mdc1", "w20")]


def test_steps_cooldown_and_max_per_day() -> None:
    p = policy(cooldown=1800, max_per_day=2)
    h = sick(1, since=NOW - 7200)
    rebooted = Remediation(h.key, "reboot-down", "reboot", NOW - 3600)
    actions, _ = run([p], [h], [rebooted])  # still down an hour after the reboot: the next step
    assert [(a.task, a.step) for a in actions] == [("loan", 1)]
    actions, held = run([p], [h], [Remediation(h.key, "reboot-down", "reboot", NOW - 600)])
    assert actions == [] and "in its cooldown" in held[0]
    both = [rebooted, Remediation(h.key, "reboot-down", "loan", NOW - 1900)]
    actions, held = run([p], [h], both)
    assert actions == [] and "every step of reboot-down was tried" in held[0]
    # a new episode (down again since after those) starts at step 0, within the daily limit
    fresh = sick(1, since=NOW - 1000)
    actions, held = run([p], [fresh], [Remediation(h.key, "reboot-down", "reboot", NOW - 80_000),
                                       Remediation(h.key, "reboot-down", "loan", NOW - 2000)])
    assert actions == [] and "2 remediation(s) in the last day" in held[0]


def test_dry_run_reports_without_taking_capacity() -> None:
    actions, _ = run([policy(dry_run=True, max_concurrent=1)], [sick(n) for n in range(3)])
    assert len(actions) == 3 and all(a.policy.dry_run for a in actions)
