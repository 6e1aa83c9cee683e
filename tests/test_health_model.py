"""Health states from findings, on task.Clock: down after N failures, back after one success, overrides."""

from __future__ import annotations

from twisted.internet.task import Clock

from roller.health.model import Health, HealthTracker, Transition

KEY = ("mdc1", "w1")


def tracker(down_after: int = 2) -> tuple[HealthTracker, Clock, list[Transition]]:
    clock = Clock()
    seen: list[Transition] = []
    return HealthTracker(clock, down_after=down_after, on_transition=seen.append), clock, seen


def test_down_after_n_failures_in_a_row_and_back_after_one_success() -> None:
    t, clock, seen = tracker(down_after=2)
    assert t.get(KEY).state is Health.unknown
    t.liveness(KEY, True, "3/3 replies")
    assert t.get(KEY).state is Health.healthy
    clock.advance(60)
    t.liveness(KEY, False, "no reply")
    assert t.get(KEY).state is Health.healthy  # one failure is not down
    clock.advance(60)
    t.liveness(KEY, False, "no reply")
    h = t.get(KEY)
    assert h.state is Health.down and h.since == 120
    (finding,) = h.finding_list()
    assert (finding.source, finding.kind, finding.since) == ("liveness", "down", 120)
    clock.advance(60)
    t.liveness(KEY, False, "no reply")
    assert t.get(KEY).finding_list()[0].since == 120  # a lasting finding keeps its first time
    assert "3 liveness checks in a row failed" in t.get(KEY).finding_list()[0].detail
    clock.advance(60)
    t.liveness(KEY, True, "1/1 replies")
    assert t.get(KEY).state is Health.healthy and t.get(KEY).findings == {}
    assert [(x.old, x.new, x.time) for x in seen] == [
        (Health.unknown, Health.healthy, 0), (Health.healthy, Health.down, 120), (Health.down, Health.healthy, 240)]
    assert seen[1].reason == "no reply"


def test_taskcluster_findings_degrade_and_unknown_when_it_cannot_be_asked() -> None:
    t, clock, seen = tracker()
    t.liveness(KEY, True, "ok")
    t.fitness([KEY], {KEY: [("failing", "4 of its last 10 task runs succeeded")]}, pool="p/t")
    assert t.get(KEY).state is Health.degraded and t.get(KEY).pool == "p/t"
    t.fitness([KEY], None, error="HTTP 503", pool="p/t")
    h = t.get(KEY)
    assert h.state is Health.unknown and [f.kind for f in h.finding_list()] == ["unknown"]
    assert "Taskcluster could not be asked: HTTP 503" in h.finding_list()[0].detail
    t.fitness([KEY], {}, pool="p/t")
    assert t.get(KEY).state is Health.healthy
    assert t.counts() == {"p/t": {**{s.value: 0 for s in Health}, "healthy": 1}}


def test_overrides_take_precedence_in_order() -> None:
    t, _, seen = tracker(down_after=1)
    t.liveness(KEY, False, "no reply")
    t.fitness([KEY], {KEY: [("quarantined", "quarantined in Taskcluster")]})
    assert t.get(KEY).state is Health.quarantined
    t.set_loaned(KEY, True)
    assert t.get(KEY).state is Health.loaned
    t.set_maintenance(KEY, True, "alice: new disk")
    assert t.get(KEY).state is Health.maintenance
    t.set_maintenance(KEY, False, "alice: done")
    t.set_loaned(KEY, False)
    assert t.get(KEY).state is Health.quarantined
    t.fitness([KEY], {})
    assert t.get(KEY).state is Health.down
    assert seen[-1].new is Health.down and seen[-1].old is Health.quarantined


def test_a_probe_that_cannot_run_is_unknown_not_down() -> None:
    t, _, _ = tracker(down_after=1)
    t.liveness(KEY, None, "machine has neither an ip nor an fqdn")
    h = t.get(KEY)
    assert h.state is Health.unknown and h.liveness_failures == 0
    assert h.finding_list()[0].detail == "liveness could not be checked: machine has neither an ip nor an fqdn"


def test_the_store_and_the_api_name_the_same_states() -> None:
    from roller.store.fleet import HEALTH_STATES

    assert tuple(h.value for h in Health) == HEALTH_STATES
