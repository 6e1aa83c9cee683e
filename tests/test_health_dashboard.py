"""
Fleet health on the dashboard with signed-in accounts: only an account
holding C{<prefix>health:admin} (the C{admin} role) sees the pause button
and the maintenance toggle, and only its POSTs change anything; a
C{viewer}'s POSTs (with a valid CSRF token) are refused with 403 and leave
the pause, the maintenance flag and the audit log as they were.

Same in-memory harness as test_dashboard.py and test_dashboard_login.py
(real SQLite, a L{Clock}, nothing sleeps), with a L{HealthWatcher} that
does not sweep (what is tested here is who may change it).
"""

from __future__ import annotations

from pathlib import Path

from attrs import evolve
from test_dashboard import BASE, Env, csrf_of
from test_dashboard_login import make, sign_in

from roller.config import load_settings
from roller.health.watcher import PAUSED_FLAG, HealthWatcher
from roller.testing.syncdb import result_of, run

ORIGIN = {"Origin": BASE}


def health_env(tmp_path: Path) -> tuple[Env, HealthWatcher]:
    e = make(tmp_path, {"vic": "viewer", "ann": "admin"})
    result_of(e.store.machines.put(evolve(result_of(e.store.machines.get("g1", "m1")), pool="mac")))
    settings = evolve(load_settings(None, {}, {}), health_enabled=False)
    watcher = HealthWatcher(e.clock, e.store, e.queue, settings)  # type: ignore[arg-type]
    run(watcher.start())
    e.dashboard.health = watcher
    return e, watcher


def health_audit(e: Env) -> list[tuple[str, str, str]]:
    return [(a.actor, a.action, a.result) for a in e.audit()
            if a.action in ("health.pause", "health.resume", "machine.maintenance")]


def test_viewer_sees_no_pause_or_maintenance_controls_and_its_posts_are_refused(tmp_path: Path) -> None:
    e, watcher = health_env(tmp_path)
    assert sign_in(e, "vic").code == 303
    fleet = e.get("/")
    assert fleet.code == 200 and "Remediation is off" in fleet.text  # the status is shown
    assert 'action="/health/pause"' not in fleet.text and "Pause remediation" not in fleet.text
    page = e.get("/machines/g1/m1")
    assert page.code == 200 and "Health:" in page.text
    assert "/machines/g1/m1/maintenance" not in page.text and "Put in maintenance" not in page.text
    token = csrf_of(page.text)  # a valid token of this session: the refusal is about the scope

    r = e.post("/health/pause", form={"csrf_token": token}, headers=ORIGIN)
    assert r.code == 403 and "health:admin" in r.text, r.text
    assert not watcher.paused and not result_of(e.store.health.flag(PAUSED_FLAG))
    r = e.post("/machines/g1/m1/maintenance", form={"csrf_token": token, "maintenance": "on", "reason": "mine"},
               headers=ORIGIN)
    assert r.code == 403 and "health:admin" in r.text, r.text
    assert not watcher.tracker.get(("g1", "m1")).maintenance
    assert result_of(e.store.health.maintenance()) == {}
    assert health_audit(e) == []

    # paused by someone who may: the viewer cannot resume it either
    run(watcher.set_paused(True, "user:ann"))
    assert e.post("/health/resume", form={"csrf_token": token}, headers=ORIGIN).code == 403
    assert watcher.paused and result_of(e.store.health.flag(PAUSED_FLAG)) == "user:ann"
    assert "Resume remediation" not in e.get("/").text
    assert [a for _, a, _ in health_audit(e)] == ["health.pause"]  # only the admin's


def test_admin_sees_and_uses_pause_and_maintenance_recorded_and_audited(tmp_path: Path) -> None:
    e, watcher = health_env(tmp_path)
    assert sign_in(e, "ann").code == 303
    fleet = e.get("/")
    assert 'action="/health/pause"' in fleet.text and "Pause remediation" in fleet.text
    token = csrf_of(fleet.text)
    r = e.post("/health/pause", form={"csrf_token": token}, headers=ORIGIN)
    assert r.code == 303 and watcher.paused and watcher.paused_by == "user:ann"
    assert result_of(e.store.health.flag(PAUSED_FLAG)) == "user:ann"
    fleet = e.get("/")
    assert "Remediation is paused" in fleet.text and "Resume remediation" in fleet.text
    r = e.post("/health/resume", form={"csrf_token": token}, headers=ORIGIN)
    assert r.code == 303 and not watcher.paused and not result_of(e.store.health.flag(PAUSED_FLAG))

    page = e.get("/machines/g1/m1").text
    assert "/machines/g1/m1/maintenance" in page and "Put in maintenance" in page
    r = e.post("/machines/g1/m1/maintenance", form={"csrf_token": token, "maintenance": "on", "reason": "disk"},
               headers=ORIGIN)
    assert r.code == 303 and watcher.tracker.get(("g1", "m1")).maintenance
    assert watcher.state_of(("g1", "m1")) == "maintenance"
    assert result_of(e.store.health.maintenance()) == {("g1", "m1"): "user:ann: disk"}
    assert "End maintenance" in e.get("/machines/g1/m1").text
    assert health_audit(e)[::-1] == [("user:ann", "health.pause", "remediation paused"),
                                     ("user:ann", "health.resume", "remediation resumed"),
                                     ("user:ann", "machine.maintenance", "on")]
    entry = next(a for a in e.audit() if a.action == "machine.maintenance")
    assert entry.target == "g1/m1" and entry.params == {"reason": "disk", "via": "dashboard"}
