"""
C{roller db}: backup while a real twistd roller takes submissions, restore
refused while it runs (and a second roller too), check, prune, vacuum;
every refusal is one readable line.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from roller.store.retention import DAY
from roller.store.schema import MIGRATIONS
from roller.store.sqlite import acquire_lock
from roller.testing.process import REPO_ROOT, RollerProcess, free_port, run_twistd

NOW = time.time()


def roller_cli(state: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLER_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "roller.cli", "--state-dir", str(state), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr.strip()


def seed_history(db: Path, jobs: int, events_each: int = 10, days_ago: float = 200, machines: int = 50) -> None:
    """Finished pings straight into the file (roller stopped): C{jobs} of them, ended C{days_ago}."""
    conn = sqlite3.connect(db)
    with conn:
        job_rows, event_rows = [], []
        for n in range(jobs):
            jid = f"00000000-0000-7000-8000-{n:012d}"
            at = NOW - days_ago * DAY + n
            job_rows.append((jid, "ping", "seed", f"s{n % machines}", "bench", "succeeded", at - 2, at - 1, at, "ok"))
            event_rows += [(jid, at - 1 + i / 100, "log" if i else "state", f"line {i} " + "x" * 60)
                           for i in range(events_each)]
        conn.executemany("INSERT INTO jobs (id, task_name, worker_group, worker_id, requester, state, created_at,"
                         " started_at, finished_at, result, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 50)",
                         job_rows)
        conn.executemany("INSERT INTO job_events (job_id, time, kind, message) VALUES (?, ?, ?, ?)", event_rows)
    conn.close()


def ids_in(db: Path | str) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM jobs")}
    finally:
        conn.close()


class Submitter(threading.Thread):
    """POSTs jobs to a roller until stopped; every 201 (a new job) with the time it was answered."""

    def __init__(self, roller: RollerProcess, worker: str):
        super().__init__(daemon=True)
        self.roller = roller
        self.worker = worker
        self.answered: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                r = self.roller.post(f"/api/v1/workers/{self.worker}/group/mdc1/jobs?task_name=ping")
            except OSError as e:
                self.errors.append(repr(e))
                continue
            if r.status == 201:
                self.answered.append((time.monotonic(), r.json()["task_id"]))
            elif r.status != 200:  # 200: the machine's same job already queued or running (not a new one)
                self.errors.append(repr(r))

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


def test_backup_while_roller_takes_submissions_then_restore(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert roller_cli(state, "jobs").returncode == 0  # creates and migrates the database
    db = state / "roller.db"
    seed_history(db, 30_000)  # a database big enough that the copy takes many steps
    closed = free_port()
    backup = tmp_path / "backups" / "roller-1.db"
    backup.parent.mkdir()
    with RollerProcess(["--auth", "none"], state_dir=state) as roller:
        roller.json("POST", "/api/v1/machines", {"worker_id": "w1", "worker_group": "mdc1", "ip": "127.0.0.1",
                                                 "liveness": {"method": "tcp", "port": closed}}, expect=201)
        submitter = Submitter(roller, "w1")
        submitter.start()
        try:
            while len(submitter.answered) < 20:
                assert submitter.is_alive() and not submitter.errors, submitter.errors
                time.sleep(0.01)
            started = time.monotonic()
            before = {task_id for _, task_id in submitter.answered}  # every 201 answered before the backup began
            r = roller_cli(state, "db", "backup", str(backup))
            ended = time.monotonic()
            during = [t for t, _ in submitter.answered if started <= t <= ended]
        finally:
            submitter.stop()
        assert r.returncode == 0, r.stderr
        assert f"backup {backup}" in r.stdout and "quick_check ok" in r.stdout
        assert not submitter.errors, submitter.errors[:5]
        assert during, "no submission was answered while the backup ran"  # roller kept taking them

        # the backup: private, sound, and holds every job answered 201 before it began
        assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600
        assert not Path(str(backup) + ".partial").exists()
        conn = sqlite3.connect(backup)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
        conn.close()
        in_backup = ids_in(backup)
        assert before <= in_backup
        assert len(in_backup) >= 30_000 + len(before)
        assert r.stdout.count("\n") == 1

        # check of the live database, while roller runs
        r = roller_cli(state, "db", "check")
        assert r.returncode == 0 and f"database {db}: ok" in r.stdout and "integrity: ok" in r.stdout, r.stdout
        assert f"knows up to {len(MIGRATIONS)}" in r.stdout

        # restore is refused while roller runs, and a second roller on the database too
        line = one_line(roller_cli(state, "db", "restore", str(backup)))
        assert line.startswith(f"roller db: the database {db} is in use by a roller (pid {roller.pid})"), line
        assert one_line(roller_cli(state, "db", "vacuum")).startswith(f"roller db: the database {db} is in use")
        second = run_twistd(["roller", "--auth", "none", "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
                             "--state-dir", str(state)])
        assert second.returncode != 0
        assert f"roller: the database {db} is in use by a roller (pid {roller.pid})" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert roller.get("/__lbheartbeat__").status == 200  # the first one is untouched
        after = {task_id for _, task_id in submitter.answered} - in_backup
        assert after  # submitted after the backup: not in it

    # roller stopped: restore puts the backup in place and keeps the old database aside
    r = roller_cli(state, "db", "restore", str(backup))
    assert r.returncode == 0, r.stderr
    asides = sorted(state.glob("roller.db.before-restore-*"))
    assert [p.name for p in asides if not p.name.endswith(("-wal", "-shm"))] and f"kept as {asides[0]}" in r.stdout
    assert after <= ids_in(asides[0])  # the replaced database, with its last jobs, is kept
    assert ids_in(db) == in_backup
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    with RollerProcess(["--auth", "none"], state_dir=state) as roller:
        some = sorted(before)[0]
        assert roller.json("GET", f"/api/v1/jobs/{some}")["task_id"] == some
        assert roller.get(f"/api/v1/jobs/{sorted(after)[0]}").status == 404


def test_check_finds_corruption_and_restore_refuses_a_bad_backup(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert roller_cli(state, "jobs").returncode == 0
    seed_history(state / "roller.db", 2000)
    good = tmp_path / "good.db"
    assert roller_cli(state, "db", "backup", str(good)).returncode == 0
    bad = tmp_path / "bad.db"
    data = bytearray(good.read_bytes())
    conn = sqlite3.connect(good)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    schema = {n for (n,) in conn.execute(  # (the schema's pages stay readable: a file whose schema is
        "SELECT pageno FROM dbstat WHERE name IN ('sqlite_schema', 'sqlite_master')")}  # gone is "not a database")
    conn.close()
    for p in range(3, len(data) // page, 2):  # damage every other page (numbered from 1) of the tables and indexes
        if p + 1 not in schema:
            data[p * page + 100:p * page + 400] = os.urandom(300)
    bad.write_bytes(bytes(data))
    other = tmp_path / "other"
    r = roller_cli(other, "--db", str(bad), "db", "check")
    assert r.returncode == 1 and "PROBLEMS" in r.stdout and "integrity check failed" in r.stdout, r.stdout
    line = one_line(roller_cli(state, "db", "restore", str(bad)))
    assert line.startswith(f"roller db: not restoring {bad}: integrity check failed"), line
    assert ids_in(state / "roller.db") == ids_in(good)  # untouched
    assert one_line(roller_cli(state, "db", "restore", str(tmp_path / "missing.db"))).endswith(
        f"no database file {tmp_path / 'missing.db'}")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    assert "is not a readable SQLite database" in one_line(roller_cli(state, "db", "restore", str(junk)))
    assert one_line(roller_cli(state, "db", "backup", str(good))).endswith(
        f"{good} exists already (remove it, or use --overwrite)")


def test_a_newer_database_is_refused_by_every_db_command(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert roller_cli(state, "jobs").returncode == 0
    db = state / "roller.db"
    newer = len(MIGRATIONS) + 1
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE schema_version SET version = ?, roller_version = '99.0'", (newer,))
    conn.close()
    want = (f"the database {db} is at schema version {newer}, upgraded by roller 99.0; this roller (")
    for args in (["db", "backup", str(tmp_path / "b.db")], ["db", "prune"], ["db", "prune", "--dry-run"],
                 ["db", "vacuum"], ["jobs"]):
        line = one_line(roller_cli(state, *args))
        assert want in line and f"knows schema versions up to {len(MIGRATIONS)} and never downgrades one" in line, line
    r = roller_cli(state, "db", "check")
    assert r.returncode == 1 and want in r.stdout
    # a backup of a newer database is not restored over an older one
    other = tmp_path / "other"
    assert roller_cli(other, "jobs").returncode == 0
    line = one_line(roller_cli(other, "db", "restore", str(db)))
    assert line.startswith(f"roller db: not restoring {db}: ") and want in line
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == newer  # never downgraded
    conn.close()


def test_prune_dry_run_then_prune(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert roller_cli(state, "jobs").returncode == 0
    db = state / "roller.db"
    seed_history(db, 500, events_each=3, machines=10)  # 490 may go: each machine's newest ping stays
    r = roller_cli(state, "db", "prune", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "jobs" in r.stdout and "490" in r.stdout and "(dry run) would remove" in r.stdout
    assert len(ids_in(db)) == 500
    r = roller_cli(state, "db", "prune", "--json")
    assert r.returncode == 0, r.stderr
    import json

    report = json.loads(r.stdout)
    assert report["counts"]["jobs"] == 490 and report["counts"]["job_events"] == 490 * 3
    # in small transactions (what keeps each write-lock hold short; its duration is the machine's, not asserted)
    assert report["transactions"] >= 4 and report["max_hold_ms"] >= 0, report
    assert len(ids_in(db)) == 10
    r = roller_cli(state, "db", "prune", "--dry-run")
    assert "would remove 0 row(s)" in r.stdout


def test_vacuum_converts_an_old_database(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db = state / "roller.db"
    conn = sqlite3.connect(db)  # made the way roller did before incremental auto-vacuum
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    assert roller_cli(state, "jobs").returncode == 0
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    lock = acquire_lock(str(db), "a test")
    try:
        line = one_line(roller_cli(state, "db", "vacuum"))
        assert f"in use by a test (pid {os.getpid()})" in line
    finally:
        assert lock is not None
        lock.release()
    r = roller_cli(state, "db", "vacuum")
    assert r.returncode == 0 and "incremental auto-vacuum on" in r.stdout, r.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    conn.close()


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_backup_to_a_bad_place_is_one_line(tmp_path: Path, what: str) -> None:
    state = tmp_path / "state"
    assert roller_cli(state, "jobs").returncode == 0
    target = tmp_path / "nowhere" / "b.db" if what == "missing" else tmp_path
    line = one_line(roller_cli(state, "db", "backup", str(target)))
    assert line.startswith("roller db: "), line
