"""The health tables on a real SQLite store: current health, transitions, remediations, flags."""

from __future__ import annotations

from roller.store.health import TransitionRow
from roller.testing.syncdb import result_of, sync_store

KEY = ("mdc1", "w1")


def test_health_is_saved_with_its_transition_and_read_back(store_path: str) -> None:
    store, _ = sync_store(store_path)
    finding = {"source": "liveness", "kind": "down", "since": 10.0, "detail": "2 checks failed"}
    result_of(store.health.save(KEY, "down", 20.0, [finding], TransitionRow(20.0, "healthy", "down", "no reply")))
    result_of(store.health.set_maintenance(KEY, True, "alice: disk", 25.0))
    # a later save (the watcher's) does not touch the flag another process set
    result_of(store.health.save(KEY, "maintenance", 30.0, [finding],
                                TransitionRow(30.0, "down", "maintenance", "alice: disk")))
    result_of(store.health.save(("mdc1", "w2"), "healthy", 5.0, [], None))
    assert result_of(store.health.maintenance()) == {KEY: "alice: disk"}
    rows = {(r.worker_group, r.worker_id): r for r in result_of(store.health.all())}
    assert rows[KEY].state == "maintenance" and rows[KEY].maintenance and rows[KEY].maintenance_reason == "alice: disk"
    assert rows[KEY].findings == (finding,) and rows[("mdc1", "w2")].state == "healthy"
    assert [(t.old, t.new) for t in result_of(store.health.transitions(KEY))] == [
        ("down", "maintenance"), ("healthy", "down")]
    assert result_of(store.health.transitions(("mdc1", "w2"))) == []
    result_of(store.health.set_maintenance(KEY, False, "", 40.0))
    assert result_of(store.health.maintenance()) == {}
    result_of(store.health.set_maintenance(("mdc1", "w9"), True, "new", 41.0))  # no health row yet
    assert result_of(store.health.maintenance()) == {("mdc1", "w9"): "new"}
    result_of(store.health.forget(KEY))
    assert sorted(r.worker_id for r in result_of(store.health.all())) == ["w2", "w9"]


def test_remediations_and_flags(store_path: str) -> None:
    store, _ = sync_store(store_path)
    first = result_of(store.health.add_remediation(KEY, "reboot-down", "reboot", 100.0, False, "job-1", "down"))
    result_of(store.health.add_remediation(KEY, "reboot-down", "loan", 200.0, True, None, "still down"))
    rows = result_of(store.health.remediations(150.0))
    assert [(r.task, r.dry_run, r.job_id) for r in rows] == [("loan", True, None)]
    assert [r.id for r in result_of(store.health.remediations(0))][0] == first
    assert result_of(store.health.flag("paused")) is None
    result_of(store.health.set_flag("paused", "alice"))
    result_of(store.health.set_flag("paused", "bob"))
    assert result_of(store.health.flag("paused")) == "bob"
