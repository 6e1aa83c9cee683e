"""
Storage faults: the database locked by another process, a full disk, a
read-only file system.

On a L{task.Clock} with a real (synchronous) SQLite store, the write lock
held by another connection is the fault: storage errors become 503
C{storage_unavailable} with C{Retry-After}, are logged once (again at most
once a minute) and recovery once; job state changes the database refused
are retried with back-off until written and meanwhile never contradicted.
Then against real faults: a tmpfs mounted by the test, filled up or
remounted read-only, and a roller run by twistd, driven over HTTP; and a
lock held by another process.  Database files are created owner-only.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from roller.config import load_settings
from roller.errors import Conflict
from roller.inventory import Machine
from roller.jobs import State
from roller.queue import RECORD_RETRY_FIRST, RECORD_RETRY_MAX, JobQueue, QueueLimits
from roller.service import RollerService
from roller.store import AuditEntry, StorageUnavailable, StoreError
from roller.store.db import FAULT_LOG_INTERVAL, check_writable, storage_fault
from roller.store.jobs import INTERRUPTED_ERROR
from roller.tasks import TaskRegistry, TaskSpec
from roller.testing.process import RollerProcess, db_states, free_port, ping_skip_reason, run_twistd, wait_for
from roller.testing.syncdb import result_of, run, sync_database, sync_store

# -- helpers ---------------------------------------------------------------------------------------


def failure_of(d: Deferred, kind: type = StorageUnavailable) -> Any:
    out: list = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    assert isinstance(out[0], Failure), f"expected a failure, got {out[0]!r}"
    assert out[0].check(kind), out[0]
    return out[0].value


class Lock:
    """Another connection holding the database's write lock (BEGIN EXCLUSIVE) until released."""

    def __init__(self, path: str):
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def no_waiting(store: Any) -> None:
    """The writer gives up on a lock at once instead of after 5 s (busy_timeout)."""
    result_of(store.db.pools[0].runWithConnection(lambda conn: conn.execute("PRAGMA busy_timeout = 0")))


def lines(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events]


def stored(store: Any, job_id: str) -> Any:
    return result_of(store.jobs.get(job_id))


class Tasks:
    """A task whose runs the test ends by hand."""

    def __init__(self) -> None:
        self.runs: dict[str, Deferred] = {}
        self.started: list[str] = []

    def registry(self) -> TaskRegistry:
        async def go(ctx: Any, params: Any) -> str:
            self.started.append(ctx.job.id)
            ctx.log(f"working on {ctx.machine.worker_id}")
            d: Deferred = Deferred()
            self.runs[ctx.job.id] = d
            return await d

        return TaskRegistry([TaskSpec(name="work", description="work", run=go, timeout=3600.0)])


def machine(n: int) -> Machine:
    return Machine.from_json({"worker_id": f"m{n}", "worker_group": "g", "ip": f"192.0.2.{n}"})


@pytest.fixture
def qenv(tmp_path: Path) -> Any:
    path = str(tmp_path / "q.db")
    store, clock = sync_store(path)
    clock.advance(1_700_000_000)
    tasks = Tasks()

    def make(**limits: Any) -> JobQueue:
        q = JobQueue(store, tasks.registry(), clock, limits=QueueLimits(**limits))
        run(q.start())
        return q

    return path, store, clock, tasks, make


# -- the store: one error, one log line, recovery ---------------------------------------------------


def test_a_locked_database_is_503_logged_once_then_again_a_minute_later_and_recovers(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    store, clock = sync_store(path)
    no_waiting(store)
    entry = AuditEntry(time=1.0, actor="a", action="x", result="ok")
    lock = Lock(path)
    with capturedLogs() as events:
        for _ in range(5):
            e = failure_of(store.audit.add(entry))
            assert (e.status, e.code, e.kind, e.retry_after) == (503, "storage_unavailable", "locked", 5)
            assert e.message == "the database is locked by another process; try again later"
            assert "SQLITE_BUSY" in e.detail
        assert store.db.fault is e
        # reads are not held up by the lock (WAL)
        assert result_of(store.audit.list()) == []
        said = lines(events)
        assert len(said) == 1, said
        assert said[0].startswith(f"Database {path} unavailable: the database is locked by another process")
        assert not any(ev.get("log_failure") for ev in events)  # no traceback
        clock.advance(FAULT_LOG_INTERVAL)
        failure_of(store.db.check_write())
        said = lines(events)
        assert len(said) == 2 and "still unavailable after 60 s" in said[1] and "5 operation(s)" in said[1], said
        lock.release()
        result_of(store.audit.add(entry))
        assert store.db.fault is None
        said = lines(events)
        assert len(said) == 3 and said[2].startswith(f"Database {path} takes writes again, after 60 s"), said


def test_storage_fault_maps_sqlite_errors() -> None:
    for text, kind in [("database or disk is full", "disk_full"), ("attempt to write a readonly database", "read_only"),
                       ("disk I/O error", "io_error"), ("unable to open database file", "cannot_open"),
                       ("database is locked", "locked")]:
        fault = storage_fault(sqlite3.OperationalError(text))
        assert fault is not None and fault.kind == kind, text
        assert fault.retry_after == (5 if kind == "locked" else 30)
    assert storage_fault(sqlite3.IntegrityError("UNIQUE constraint failed: jobs.id")) is None
    assert storage_fault(sqlite3.OperationalError("no such table: nope")) is None
    # the fault behind a failed ROLLBACK TO is still found
    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.Error:
            raise sqlite3.OperationalError("no such savepoint: w")
    except sqlite3.Error as e:
        assert storage_fault(e).kind == "disk_full"


def test_the_heartbeat_write_is_real_and_does_not_grow_the_database(tmp_path: Path) -> None:
    store, clock = sync_store(str(tmp_path / "h.db"))
    pages = result_of(store.db.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0]))
    for i in range(200):
        clock.advance(1)
        result_of(store.db.check_write())
    rows = result_of(store.db.read(lambda c: c.execute("SELECT id, at FROM heartbeat").fetchall()))
    assert [tuple(r) for r in rows] == [(1, clock.seconds())]
    assert result_of(store.db.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])) == pages


# -- the queue: state changes retried until written, never contradicted -----------------------------


def test_a_final_state_the_database_refuses_is_shown_retried_with_back_off_and_written(qenv: Any) -> None:
    path, store, clock, tasks, make = qenv
    q = make()
    job, _ = run(q.submit("work", machine(1)))
    assert q.active(job.id).state is State.running and stored(store, job.id).state is State.running
    no_waiting(store)
    lock = Lock(path)
    with capturedLogs() as events:
        tasks.runs[job.id].callback("done")
        # ended in memory and in every read, although the database still says running
        assert q.active(job.id).state is State.succeeded and q.active(job.id).result == "done"
        assert q.running() == [] and q.unrecorded == 1
        assert stored(store, job.id).state is State.running
        with pytest.raises(Conflict, match="already ended: succeeded"):
            run(q.cancel(job.id))
        waited = q.wait(job.id)
        assert not waited.called
        # back-off on the clock: 1, 2, 4 ... s
        delays = []
        for _ in range(6):
            (call,) = [c for c in clock.getDelayedCalls() if c.active()]
            delays.append(call.getTime() - clock.seconds())
            clock.advance(delays[-1])
        assert delays == [RECORD_RETRY_FIRST * 2 ** i for i in range(5)] + [RECORD_RETRY_MAX]
        assert stored(store, job.id).state is State.running and q.unrecorded == 1
        lock.release()
        clock.advance(RECORD_RETRY_MAX)
        assert stored(store, job.id).state is State.succeeded
        assert stored(store, job.id).result == "done"
        assert result_of(waited).state is State.succeeded
        assert q.unrecorded == 0 and q.active(job.id) is None
        assert [c for c in clock.getDelayedCalls() if c.active()] == []
        said = lines(events)
        assert not any(ev.get("log_failure") for ev in events), said
        assert sum("Holding job state changes" in s for s in said) == 1, said
        assert sum("are recorded" in s for s in said) == 1, said
        # the events in the order they happened, each once
        kinds = [(e.kind, e.message) for e in result_of(store.jobs.events(job.id))]
        assert kinds == [("state", "queued by anonymous"), ("state", "running"), ("log", "working on m1"),
                         ("state", "succeeded: done")]


def test_a_job_does_not_act_before_running_is_recorded(qenv: Any) -> None:
    path, store, clock, tasks, make = qenv
    q = make(max_running=1)
    a, _ = run(q.submit("work", machine(1)))
    b, _ = run(q.submit("work", machine(2)))
    assert tasks.started == [a.id]
    no_waiting(store)
    lock = Lock(path)
    tasks.runs[a.id].callback("ok")  # a's end and b's start both wait for the database
    assert q.active(b.id).state is State.running
    assert tasks.started == [a.id]  # b has not touched its machine
    clock.advance(RECORD_RETRY_FIRST)
    assert tasks.started == [a.id]
    lock.release()
    clock.advance(2 * RECORD_RETRY_FIRST)
    assert tasks.started == [a.id, b.id]
    assert stored(store, a.id).state is State.succeeded and stored(store, b.id).state is State.running


def test_cancelling_a_job_whose_running_is_not_recorded_records_both_in_order(qenv: Any) -> None:
    path, store, clock, tasks, make = qenv
    q = make(max_running=1)
    a, _ = run(q.submit("work", machine(1)))
    b, _ = run(q.submit("work", machine(2)))
    no_waiting(store)
    lock = Lock(path)
    tasks.runs[a.id].callback("ok")
    assert q.active(b.id).state is State.running and tasks.started == [a.id]
    cancelled = run(q.cancel(b.id, by="alice"))  # answered with the end, its write held
    assert cancelled.state is State.cancelled and q.active(b.id).state is State.cancelled
    assert stored(store, b.id).state is State.queued
    lock.release()
    clock.advance(RECORD_RETRY_FIRST)
    assert tasks.started == [a.id]  # never ran
    assert stored(store, b.id).state is State.cancelled
    assert [e.message for e in result_of(store.jobs.events(b.id))] == [
        "queued by anonymous", "running", "cancelled: cancelled by alice"]


def test_cancelling_a_queued_job_the_database_refuses_leaves_it_queued(qenv: Any) -> None:
    path, store, clock, tasks, make = qenv
    q = make(max_running=1)
    run(q.submit("work", machine(1)))
    b, _ = run(q.submit("work", machine(2)))
    no_waiting(store)
    lock = Lock(path)
    d = Deferred.fromCoroutine(q.cancel(b.id))
    assert failure_of(d).kind == "locked"
    assert q.active(b.id).state is State.queued and [j.id for j in q.queued()] == [b.id]
    assert stored(store, b.id).state is State.queued
    lock.release()
    assert run(q.cancel(b.id)).state is State.cancelled
    assert stored(store, b.id).state is State.cancelled and q.queued() == []


def test_log_lines_wait_with_the_state_and_are_bounded(qenv: Any, monkeypatch: Any) -> None:
    import roller.queue
    monkeypatch.setattr(roller.queue, "MAX_PENDING_LOG_EVENTS", 3)
    path, store, clock, tasks, make = qenv
    q = make()
    job, _ = run(q.submit("work", machine(1)))
    no_waiting(store)
    lock = Lock(path)
    for i in range(10):
        q._log(job.id, f"line {i}", {})
    tasks.runs[job.id].callback("ok")
    lock.release()
    clock.advance(RECORD_RETRY_FIRST)
    messages = [e.message for e in result_of(store.jobs.events(job.id))]
    assert messages == ["queued by anonymous", "running", "working on m1", "line 0", "line 1", "line 2",
                        "7 more log line(s) were not kept while the database was unavailable", "succeeded: ok"]


def test_stopping_with_an_unrecorded_end_logs_it_and_a_restart_claims_nothing_false(qenv: Any) -> None:
    path, store, clock, tasks, make = qenv
    q = make()
    job, _ = run(q.submit("work", machine(1)))
    no_waiting(store)
    lock = Lock(path)
    tasks.runs[job.id].callback("rebooted")
    with capturedLogs() as events:
        run(q.stop())  # one more attempt, then given up: logged with the outcome
    said = lines(events)
    assert any(f"Job {job.id} (work on m1) ended succeeded (rebooted) but roller could not record it" in s
               for s in said), said
    assert stored(store, job.id).state is State.running
    lock.release()
    again = JobQueue(store, tasks.registry(), clock)
    assert run(again.start()) == (1, 0)
    after = stored(store, job.id)
    assert after.state is State.interrupted and after.error == INTERRUPTED_ERROR
    assert "while the job was running" not in after.error


def test_stopping_writes_an_end_the_database_takes_again(qenv: Any) -> None:
    path, store, clock, tasks, make = qenv
    q = make()
    job, _ = run(q.submit("work", machine(1)))
    no_waiting(store)
    lock = Lock(path)
    tasks.runs[job.id].callback("rebooted")
    lock.release()  # before the back-off fires
    run(q.stop())
    assert stored(store, job.id).state is State.succeeded
    run(JobQueue(store, tasks.registry(), clock).start())
    assert stored(store, job.id).state is State.succeeded  # not turned into interrupted


# -- database files are owner-only -------------------------------------------------------------------


def test_database_files_are_created_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "new" / "roller.db"
        store, clock = sync_store(str(path))
        result_of(store.db.check_write())
        names = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        for p in names:
            assert p.exists(), p
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, (p, oct(os.stat(p).st_mode))
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        result_of(store.close())
        other = tmp_path / "checked.db"
        with capturedLogs() as events:
            check_writable(str(other), 1.0)
            assert stat.S_IMODE(os.stat(other).st_mode) == 0o600
            assert lines(events) == []
            os.chmod(other, 0o644)  # made by an older roller
            check_writable(str(other), 2.0)
        assert lines(events) == [f"The database {other} is readable or writable by other users (mode 644); it "
                                 f"holds password hashes and the audit log: chmod 600 {other}*"]
    finally:
        os.umask(old)


# -- real faults: a tmpfs the test mounts --------------------------------------------------------


class Tmpfs:
    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True, capture_output=True)

    def fill(self) -> None:
        """Write a file until the file system is full."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Any:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield Tmpfs(mnt)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], capture_output=True)
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True, capture_output=True)


_KILLED = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("UPDATE heartbeat SET at = 2")
os._exit(0)  # like kill -9: the -wal and -shm files stay
"""


def crashed_roller_left(path: str) -> None:
    """A database a killed roller left behind: with its -wal and -shm files."""
    subprocess.run([sys.executable, "-c", _KILLED, path], check=True)
    assert os.path.exists(f"{path}-wal") and os.path.exists(f"{path}-shm")


def test_a_connection_opened_read_only_recovers_once_the_file_system_is_writable(tmpfs: Tmpfs) -> None:
    path = str(tmpfs.path / "roller.db")
    store, clock = sync_store(path)
    result_of(store.db.check_write())
    result_of(store.close())
    crashed_roller_left(path)
    # With -wal and -shm present SQLite opens the database on a read-only file
    # system without complaint, and that connection stays read-only for good.
    tmpfs.remount("ro")
    with pytest.raises(StoreError, match=f"the database {path} cannot take a write: .*read-only"):
        check_writable(path, 1.0)
    db = sync_database(path, clock)  # as a roller that was started on it
    with capturedLogs() as events:
        assert result_of(db.read(lambda c: c.execute("SELECT at FROM heartbeat").fetchone()[0])) == 2
        assert failure_of(db.check_write()).kind == "read_only"
        failure_of(db.check_write())
        tmpfs.remount("rw")
        # SQLite keeps a connection opened on a read-only file system read-only: it is reopened
        result_of(db.check_write())
        assert db.fault is None
    said = lines(events)
    assert len(said) == 2 and "unavailable" in said[0] and "takes writes again" in said[1], said
    result_of(db.close())


pytestmark_ping = pytest.mark.skipif(ping_skip_reason() is not None, reason=str(ping_skip_reason()))


def _roller_on(tmpfs: Tmpfs) -> RollerProcess:
    # the state (database) on the tmpfs, the log next to it, outside
    return RollerProcess(["--auth", "none"], state_dir=tmpfs.path)


def _assert_storage_503(r: Any, what: str) -> None:
    assert r.status == 503, r
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Retry-After"] in ("5", "30"), dict(r.headers)
    assert r.json() == {"error": "storage_unavailable", "message": f"{what}; try again later"}, r.json()


@pytestmark_ping
def test_full_disk_503_heartbeat_fails_final_state_kept_and_recovery(tmpfs: Tmpfs) -> None:
    roller = _roller_on(tmpfs)
    try:
        roller.start()
        for n in (1, 2):
            roller.json("POST", "/api/v1/machines", {"worker_id": f"full-{n}", "worker_group": "full",
                                                     "ip": f"127.0.0.{40 + n}", "liveness": {"method": "icmp"}},
                        expect=201)
        assert roller.get("/__heartbeat__").status == 200
        job_id = roller.json("POST", "/api/v1/workers/full-1/group/full/jobs?task_name=ping",
                             {"params": {"count": 5}}, expect=201)["task_id"]
        # the task acts only once "running" is committed: wait for its first output line (not just the
        # state a read shows at once), so the disk fills while the ping runs, not before it may start
        wait_for(lambda: any(e["kind"] == "log" for e in roller.json("GET", f"/api/v1/jobs/{job_id}")["events"]),
                 20, "the ping job to run", describe=roller.log_tail)
        tmpfs.fill()

        for _ in range(3):
            r = roller.post("/api/v1/workers/full-2/group/full/jobs?task_name=ping")
            _assert_storage_503(r, "the disk holding the database is full")
            assert r.headers["Retry-After"] == "30"
        hb = roller.get("/__heartbeat__")
        assert hb.status == 500, hb
        assert hb.json()["checks"]["database"] == "error: not writable: the disk holding the database is full"

        # the job ends while the disk is full: reads show its end, the database still says running
        job = roller.wait_job(job_id, timeout=30)
        assert job["state"] == "succeeded", job
        assert db_states(roller.db_path)[job_id] == "running"
        assert roller.get("/__heartbeat__").json()["queue"]["unrecorded"] == 1
        assert job["events"][-1]["message"].startswith("succeeded: "), job["events"]  # held, shown
        listed = roller.json("GET", "/api/v1/jobs?worker_group=full&state=running")["jobs"]
        assert [j for j in listed if j["task_id"] == job_id] == [], listed  # not "running" in a list either
        r = roller.request("DELETE", f"/api/v1/jobs/{job_id}")
        assert r.status == 409 and r.json()["message"] == f"job {job_id} already ended: succeeded", r

        tmpfs.free()
        wait_for(lambda: db_states(roller.db_path)[job_id] == "succeeded", 60,
                 "the held final state to be written", describe=roller.log_tail)
        assert roller.get("/__heartbeat__").status == 200
        new = roller.json("POST", "/api/v1/workers/full-2/group/full/jobs?task_name=ping",
                          {"params": {"count": 1}}, expect=201)["task_id"]
        assert roller.wait_job(new, timeout=30)["state"] == "succeeded"
        assert roller.json("GET", f"/api/v1/jobs/{job_id}")["state"] == "succeeded"

        log = roller.log_text()
        assert "Traceback" not in log, roller.log_tail(100)
        assert log.count("unavailable: the disk holding the database is full") == 1, roller.log_tail(100)
        assert "takes writes again" in log and "are recorded" in log, roller.log_tail(100)
    except BaseException:
        print(roller.log_tail(150))
        raise
    finally:
        roller.close()


def test_read_only_database_refuses_to_start_in_one_line(tmpfs: Tmpfs) -> None:
    path = str(tmpfs.path / "roller.db")
    check_writable(path, 1.0)
    crashed_roller_left(path)  # the case that used to start without complaint
    tmpfs.remount("ro")
    args = ["roller", "--auth", "none", "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
            "--state-dir", str(tmpfs.path)]
    r = run_twistd(args, timeout=30)
    output = r.stdout + r.stderr
    assert r.returncode != 0, output
    assert "Traceback" not in output, output
    said = r.stderr.strip().splitlines()
    assert len(said) == 1, r.stderr
    assert said[0].startswith(f"roller: the database {tmpfs.path / 'roller.db'} cannot take a write: "), said
    tmpfs.remount("rw")
    with RollerProcess(["--auth", "none"], state_dir=tmpfs.path) as roller:
        assert roller.get("/__heartbeat__").status == 200


class _NotStopping:
    """The reactor, except that a service failing to start must not stop it (pytest-twisted runs on it)."""

    running = False

    def __init__(self, reactor: Any):
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@pytest_twisted.ensureDeferred
async def test_the_service_refuses_a_database_opened_read_only(tmpfs: Tmpfs) -> None:
    from twisted.internet import reactor

    path = str(tmpfs.path / "roller.db")
    store, _ = sync_store(path)  # migrated: opening it writes nothing
    result_of(store.close())
    crashed_roller_left(path)
    tmpfs.remount("ro")
    s = load_settings(None, {}, {"server.listen": "tcp:0:interface=127.0.0.1", "state_dir": str(tmpfs.path),
                                 "auth.mode": "none"})
    service = RollerService(s, _NotStopping(reactor))
    service.startService()
    with pytest.raises(StorageUnavailable, match=f"the database {path} cannot take a write: the database is "
                                                 "read-only"):
        await service.ready
    assert service.failed and service.ports == []
    await service.stopService()


_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
conn.close()
"""


def test_database_locked_by_another_process_is_503_then_recovers(tmp_path: Path) -> None:
    roller = RollerProcess(["--auth", "none"], state_dir=tmp_path / "state")
    holder = None
    try:
        roller.start()
        roller.json("POST", "/api/v1/machines", {"worker_id": "lk-1", "worker_group": "lk", "ip": "127.0.0.51"},
                    expect=201)
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(roller.db_path)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        answers: list = []

        def submit() -> None:
            answers.append(roller.post("/api/v1/workers/lk-1/group/lk/jobs?task_name=ping", timeout=30))

        threads = [threading.Thread(target=submit) for _ in range(3)]
        for t in threads:
            t.start()
        hb = roller.get("/__heartbeat__", timeout=30)
        for t in threads:
            t.join()
        assert len(answers) == 3
        for r in answers:
            _assert_storage_503(r, "the database is locked by another process")
            assert r.headers["Retry-After"] == "5"
        assert hb.status == 500 and hb.json()["checks"]["database"].startswith("error: not writable"), hb
        assert roller.get("/api/v1/machines/lk/lk-1").status == 200  # reads go on

        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(10) == 0
        assert roller.get("/__heartbeat__").status == 200
        r = roller.post("/api/v1/workers/lk-1/group/lk/jobs?task_name=ping")
        assert r.status == 201, r
        log = roller.log_text()
        assert "Traceback" not in log, roller.log_tail(100)
        assert log.count("unavailable: the database is locked by another process") == 1, roller.log_tail(100)
        assert "takes writes again" in log
    except BaseException:
        print(roller.log_tail(150))
        raise
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        roller.close()


# -- the dashboard: a readable page ---------------------------------------------------------------


def test_dashboard_post_during_a_fault_is_a_readable_503_page(tmp_path: Path) -> None:
    from test_dashboard import csrf_of, make_env

    env = make_env(tmp_path)
    env.add_machine("m1", "g1", ip="192.0.2.1")
    token = csrf_of(env.get("/machines/g1/m1").text)
    no_waiting(env.store)
    lock = Lock(str(tmp_path / "dash.db"))
    with capturedLogs() as events:
        r = env.post("/machines/g1/m1/jobs", form={"task": "ping", "csrf_token": token})
    assert r.code == 503, r.text
    assert r.header("content-type") == "text/html; charset=utf-8"
    assert r.header("retry-after") == "5"
    assert "Unavailable" in r.text and "the database is locked by another process; try again later" in r.text
    assert "Traceback" not in r.text
    assert not any(ev.get("log_failure") for ev in events)
    lock.release()
    r = env.post("/machines/g1/m1/jobs", form={"task": "ping", "csrf_token": token})
    assert r.code == 303, r.text


def test_an_event_written_while_a_job_is_read_is_in_the_answer(qenv: Any) -> None:
    """GET /api/v1/jobs/<id> takes the unwritten events before reading the stored ones: an event
    whose write lands between the two is in one of them, never in neither."""
    from treq.testing import StubTreq

    from roller.auth import AnonymousAuthenticator
    from roller.web.api import Api

    path, store, clock, tasks, make = qenv
    q = make()
    job, _ = run(q.submit("work", machine(1)))
    real_update, real_events = store.jobs.update, store.jobs.events
    gates: list[tuple[Deferred, tuple]] = []

    def held_update(*args: Any) -> Deferred:
        gates.append((Deferred(), args))
        return gates[-1][0]

    def events_then_write_lands(*args: Any, **kw: Any) -> Deferred:
        read = real_events(*args, **kw)  # the stored events, before the write below commits
        for gate, update_args in gates:
            real_update(*update_args).chainDeferred(gate)
        return read

    store.jobs.update = held_update
    tasks.runs[job.id].callback("done")
    assert gates and q.active(job.id).state is State.succeeded
    store.jobs.events = events_then_write_lands
    api = Api(store, q, TaskRegistry([]), AnonymousAuthenticator(), allowed_tasks=(), clock=clock)
    client = StubTreq(api.app.resource())
    d = client.get(f"http://127.0.0.1/api/v1/jobs/{job.id}")
    client.flush()
    body = result_of(result_of(d).json())
    assert q.unrecorded == 0 and stored(store, job.id).state is State.succeeded
    messages = [e["message"] for e in body["events"]]
    assert messages == ["queued by anonymous", "running", "working on m1", "succeeded: done"], messages
