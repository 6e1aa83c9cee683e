"""
Upgrades: a database made at every earlier schema version, holding data in
every table that version has, is upgraded by this roller with its data
intact; a database from a newer roller is refused at start in one line
and never downgraded.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from roller import __version__
from roller.batches.model import Rollout, Selector
from roller.inventory import Machine
from roller.jobs import Job, State, new_job_id
from roller.store import AuditEntry
from roller.store.dialect import SQLITE, ddl
from roller.store.schema import MIGRATIONS
from roller.testing.process import free_port, run_twistd
from roller.testing.syncdb import result_of, sync_store

T = 1_700_000_000.0
JOB = "01a00000-0000-7000-8000-000000000001"
OLD_JOB = "01a00000-0000-7000-8000-000000000000"
MACHINE = {"worker_id": "t-linux64-ms-280", "worker_group": "mdc1", "fqdn": "t-linux64-ms-280.test.example.com",
           "ip": "10.49.40.85", "pool": "gecko-t-linux-talos", "tags": ["moonshot"],
           "ssh": {"user": "root", "credential": "ssh-relops"},
           "ipmi": {"host": "moon-chassis-7.example.com", "credential": "ipmi-admin"}}


def tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def build(path: Path, version: int) -> None:
    """A database as a roller at schema C{version} left it: MIGRATIONS[:version] applied, rows in its tables."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")  # as Database.migrate makes it
    conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
    for script in MIGRATIONS[:version]:
        for statement in ddl(script, SQLITE):  # as a SQLite roller applies them (no PostgreSQL-only ones)
            conn.execute(statement)
    have = tables(conn)
    if "machines" in have:
        conn.execute("INSERT INTO machines VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     ("mdc1", MACHINE["worker_id"], MACHINE["fqdn"], MACHINE["ip"], MACHINE["pool"],
                      json.dumps(Machine.from_json(MACHINE).to_json()), T, T + 1))
        columns = "id, task_name, worker_group, worker_id, params, requester, origin_ip, reason, priority, state," \
                  " created_at, started_at, finished_at, result, error"
        conn.execute(f"INSERT INTO jobs ({columns}) VALUES (?, 'ping', 'mdc1', ?, '{{\"count\": 2}}', 'tc:client',"
                     " '10.0.0.1', 'weekly', 60, 'succeeded', ?, ?, ?, '2/2 replies', NULL)",
                     (OLD_JOB, MACHINE["worker_id"], T, T + 1, T + 3))
        conn.execute(f"INSERT INTO jobs ({columns}) VALUES (?, 'reboot', 'mdc1', ?, '{{}}', 'user:alice', NULL, '',"
                     " 50, 'running', ?, ?, NULL, NULL, NULL)", (JOB, MACHINE["worker_id"], T + 10, T + 11))
        conn.executemany("INSERT INTO job_events (job_id, time, kind, message, data) VALUES (?, ?, ?, ?, ?)", [
            (OLD_JOB, T, "state", "queued", '{"state": "queued"}'), (OLD_JOB, T + 2, "log", "64 bytes from", None),
            (OLD_JOB, T + 3, "state", "succeeded: 2/2 replies", '{"state": "succeeded"}'),
            (JOB, T + 10, "state", "queued", '{"state": "queued"}')])
        conn.execute("INSERT INTO audit (time, actor, source_ip, action, target, params, result) VALUES"
                     " (?, 'tc:client', '10.0.0.1', 'job.submit', 'mdc1/t-linux64-ms-280', '{\"task\": \"ping\"}',"
                     " 'queued')", (T,))
    if "users" in have:
        conn.execute("INSERT INTO users VALUES ('alice', 'operator', '$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA',"
                     " ?, ?, 2, 0)", (T, T))
        conn.execute("INSERT INTO sessions VALUES ('h1', 'alice', ?, ?, ?)", (T, T + 10 ** 9, T))
    if "loans" in have:
        conn.execute("INSERT INTO loans (worker_group, worker_id, borrower, reason, started_at, expires_at)"
                     " VALUES ('mdc1', ?, 'bob@example.com', 'bug 1', ?, ?)", (MACHINE["worker_id"], T, T + 86400))
    if "heartbeat" in have:
        conn.execute("INSERT INTO heartbeat VALUES (1, ?)", (T,))
    if "health" in have:
        findings = json.dumps([{"source": "sweep", "kind": "unreachable", "since": 1, "detail": "no reply"}])
        conn.execute("INSERT INTO health VALUES ('mdc1', ?, 'down', ?, ?, 1, 'rack move')",
                     (MACHINE["worker_id"], T, findings))
        conn.execute("INSERT INTO health_transitions (worker_group, worker_id, time, old, new, reason) VALUES"
                     " ('mdc1', ?, ?, 'healthy', 'down', 'no reply')", (MACHINE["worker_id"], T))
        conn.execute("INSERT INTO remediations (worker_group, worker_id, policy, task, time, dry_run, job_id, reason)"
                     " VALUES ('mdc1', ?, 'down-reboot', 'reboot', ?, 0, ?, 'down')", (MACHINE["worker_id"], T, JOB))
        conn.execute("INSERT INTO health_flags VALUES ('remediation_paused', 'cli:root')")
    if "batches" in have:
        conn.execute("UPDATE jobs SET batch_id = 'b1' WHERE id = ?", (JOB,))
        conn.execute("INSERT INTO batches (id, task_name, params, selector, rollout, requester, priority, state,"
                     " created_at, total) VALUES ('b1', 'reboot', '{}', ?, ?, 'user:alice', 50, 'running', ?, 1)",
                     (json.dumps(Selector(pool="gecko-t-linux-talos").to_json()), json.dumps(Rollout().to_json()),
                      T + 9))
        conn.execute("INSERT INTO batch_members (batch_id, position, worker_group, worker_id, pool, state, job_id,"
                     " attempts, started_at) VALUES ('b1', 0, 'mdc1', ?, 'gecko-t-linux-talos', 'running', ?, 1, ?)",
                     (MACHINE["worker_id"], JOB, T + 10))
    conn.close()


@pytest.mark.parametrize("version", range(1, len(MIGRATIONS)))
def test_every_earlier_schema_upgrades_with_its_data(tmp_path: Path, version: int) -> None:
    path = tmp_path / f"v{version}.db"
    build(path, version)
    before = sqlite3.connect(path)
    have = tables(before)
    rows_before = {t: before.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in have}
    before.close()

    store, _ = sync_store(str(path))
    try:
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT version, roller_version FROM schema_version").fetchall() == [
            (len(MIGRATIONS), __version__)]
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        for t, n in rows_before.items():  # no row lost in any table
            assert conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] == n, t
        conn.close()

        # read back through this roller's store
        m = result_of(store.machines.get("mdc1", MACHINE["worker_id"]))
        assert m == Machine.from_json(MACHINE)
        old = result_of(store.jobs.get(OLD_JOB))
        assert old is not None and old.state is State.succeeded and old.params == {"count": 2}
        assert (old.requester, old.origin_ip, old.reason, old.priority, old.result) == (
            "tc:client", "10.0.0.1", "weekly", 60, "2/2 replies")
        assert [e.message for e in result_of(store.jobs.events(OLD_JOB))] == [
            "queued", "64 bytes from", "succeeded: 2/2 replies"]
        running = result_of(store.jobs.get(JOB))
        assert running is not None and running.state is State.running
        assert running.batch_id == ("b1" if version >= 7 else None)
        assert [e.action for e in result_of(store.audit.list())] == ["job.submit"]
        # a job left running is recovered as interrupted, as after any restart
        interrupted, queued = result_of(store.jobs.recover(T + 100))
        assert [j.id for j in interrupted] == [JOB] and queued == []
        if version >= 2:
            user = result_of(store.users.get("alice"))
            assert user is not None and user.role == "operator" and user.failed_logins == 2
            assert result_of(store.users.session("h1")) is not None
        if version >= 3:
            loan = result_of(store.loans.active("mdc1", MACHINE["worker_id"]))
            assert loan is not None and loan.borrower == "bob@example.com" and loan.reason == "bug 1"
        if version >= 6:
            [h] = result_of(store.health.all())
            assert (h.state, h.maintenance, h.maintenance_reason) == ("down", True, "rack move")
            assert h.findings[0]["kind"] == "unreachable"
            assert [t.new for t in result_of(store.health.transitions(("mdc1", MACHINE["worker_id"])))] == ["down"]
            assert [r.job_id for r in result_of(store.health.remediations(0))] == [JOB]
            assert result_of(store.health.flag("remediation_paused")) == "cli:root"
        if version >= 7:
            record = result_of(store.batches.get("b1"))
            assert record is not None and record.batch.selector.pool == "gecko-t-linux-talos"
            assert [(mb.worker_id, mb.job_id) for mb in record.members] == [(MACHINE["worker_id"], JOB)]
            assert [r.batch.id for r in result_of(store.batches.unfinished())] == ["b1"]
        # and the upgraded database takes new writes
        new = result_of(store.jobs.insert(Job(id=new_job_id(), task_name="ping", worker_id=MACHINE["worker_id"],
                                              worker_group="mdc1", created_at=T + 200)))
        assert new.seq is not None and new.seq > (old.seq or 0)
        result_of(store.audit.add(AuditEntry(time=T + 200, actor="cli:root", action="db.upgrade", result="ok")))
        result_of(store.machines.put(Machine.from_json({**MACHINE, "pool": "other"})))
        assert result_of(store.machines.get("mdc1", MACHINE["worker_id"])).pool == "other"
    finally:
        result_of(store.close())


def test_the_current_schema_opens_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "now.db"
    build(path, len(MIGRATIONS))
    store, _ = sync_store(str(path))
    result_of(store.close())
    conn = sqlite3.connect(path)
    # nothing to upgrade: the version stays, and so does who wrote it (NULL here)
    assert conn.execute("SELECT version, roller_version FROM schema_version").fetchall() == [(len(MIGRATIONS), None)]
    conn.close()


def test_a_newer_database_is_refused_at_start_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = state / "roller.db"
    build(path, len(MIGRATIONS))
    newer = len(MIGRATIONS) + 2
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = ?, roller_version = '2.0.0'", (newer,))
    conn.commit()
    conn.close()
    r = run_twistd(["roller", "--auth", "none", "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
                    "--state-dir", str(state)])
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"roller: the database {path} is at schema version {newer}, upgraded by roller 2.0.0; this "
                     f"roller ({__version__}) knows schema versions up to {len(MIGRATIONS)} and never downgrades "
                     "one: run roller 2.0.0 or newer, or restore a backup this roller made"], r.stderr
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == newer  # untouched
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2
    conn.close()
