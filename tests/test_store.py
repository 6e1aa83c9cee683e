"""
The contract suite for L{roller.store}.

Every contract test runs on real databases, never a mock, three times: on
an in-memory SQLite database, on a SQLite file in C{tmp_path} and on a
database of its own on a real PostgreSQL server (L{roller.testing.postgres},
one server for the session), all through L{roller.testing.syncdb.sync_store} (the adbapi pool answers at once, so
results are checked synchronously).  A few tests use a pool whose "thread"
work is held until the test releases it, to pin down group commit
deterministically; the rest of the concurrency and durability checks run
the real threaded pool on the real reactor through C{pytest_twisted}.

No test sleeps.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from attrs import evolve
from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure

from roller.errors import Conflict
from roller.inventory import Machine
from roller.jobs import Job, JobEvent, State, new_job_id
from roller.store import AuditEntry, Store, StoreError, open_store
from roller.store.db import integrity_errors
from roller.store.schema import MIGRATIONS
from roller.testing.postgres import PostgresServer, pg_rows
from roller.testing.results import failure_of, has_no_result, result_of
from roller.testing.syncdb import SyncClock, sync_database, sync_store

# -- helpers


def machine(worker_id: str, group: str = "mdc1", **fields: Any) -> Machine:
    return Machine.from_json({"worker_id": worker_id, "worker_group": group, **fields})


FULL_MACHINE_JSON = {
    "worker_id": "t-linux64-ms-280",
    "worker_group": "mdc1",
    "fqdn": "t-linux64-ms-280.test.releng.mdc1.mozilla.com",
    "ip": "10.49.40.85",
    "pool": "gecko-t-linux-talos",
    "tags": ["moonshot", "chassis:7", "rack/12"],
    "ssh": {"user": "root", "port": 2222, "credential": "ssh-relops", "host_key_policy": "accept-new"},
    "ipmi": {
        "host": "moon-chassis-7.inband.releng.mdc1.mozilla.com",
        "port": 6230,
        "credential": "ipmi-admin",
        "interface": "lan",
        "bridge": ["-B", "0", "-b", "7", "-T", "0x82", "-t", "0x72"],
    },
    "pdu": {"host": "10.49.1.20", "outlet": "AA8", "model": "sentry3", "port": 1161, "credential": "snmp-legacy"},
    "redfish": {
        "url": "https://bmc.example.test/redfish/v1",
        "system": "/redfish/v1/Systems/1",
        "credential": "redfish-admin",
        "ca_file": "/etc/roller/ca.pem",
        "verify_tls": False,
    },
    "xen": {"vm_uuid": "4f2c1a9e-0000-4bd2-9d1e-000000000001", "url": "https://xen.example.test", "credential": "xen-pool"},
    "liveness": {"method": "tcp", "port": 2222},
    "reboot_methods": ["ssh_reboot", "ipmi_reset", "snmp_reboot", "file_bugzilla_bug"],
    "bug_cc": ["relops@example.com", "someone@example.org"],
    "notes": "Loaned to dev \u2014 see bug 1234567; 100% \"quoted\" _notes_",
}


def job(worker_id: str = "w1", group: str = "mdc1", *, task: str = "reboot", created: float = 1000.0, **kw: Any) -> Job:
    return Job(id=new_job_id(), task_name=task, worker_id=worker_id, worker_group=group, created_at=created, **kw)


class HeldThreadPool:
    """
    A stand-in for the adbapi pool's thread pool that holds each piece of
    "threaded" work until the test runs it, so that what is in flight and
    what is queued behind it is up to the test.  Like Twisted's
    L{ThreadPool}, C{stop} finishes the work already handed over and then
    silently ignores new work.
    """

    def __init__(self) -> None:
        self.queue: list[tuple[Callable, Callable, tuple, dict]] = []
        self.submitted = 0
        self.joined = False

    def callInThreadWithCallback(self, onResult: Callable, f: Callable, *a: Any, **kw: Any) -> None:
        if self.joined:
            return
        self.submitted += 1
        self.queue.append((onResult, f, a, kw))

    def run_one(self) -> None:
        onResult, f, a, kw = self.queue.pop(0)
        try:
            result = f(*a, **kw)
        except Exception:
            onResult(False, Failure())
        else:
            onResult(True, result)

    def run_all(self) -> None:
        while self.queue:
            self.run_one()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.joined = True
        self.run_all()


def held_store(path: str) -> tuple[Store, HeldThreadPool, SyncClock]:
    clock = SyncClock()
    db = sync_database(path, clock)
    pool = HeldThreadPool()
    for each in db.pools:
        each.threadpool = pool
    d = Deferred.fromCoroutine(open_store(path, clock, db=db))
    pool.run_all()
    return result_of(d), pool, clock


def sqlite_rows(path: str, sql: str, *args: Any) -> list[tuple]:
    """Ask a separate, plain sqlite3 (or psycopg, for a URL) connection."""
    if path.startswith("postgresql://"):
        return pg_rows(path, sql, *args)
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


# -- fixtures: the same contract on an in-memory DB and on a file


class Opened:
    def __init__(self, path: str):
        self.path = path
        self.store, self.clock = sync_store(path)

    @property
    def is_file(self) -> bool:
        """A SQLite file."""
        return self.path != ":memory:" and not self.is_postgresql

    @property
    def is_postgresql(self) -> bool:
        return self.path.startswith("postgresql://")

    @property
    def durable(self) -> bool:
        """What a reopened store finds again."""
        return self.path != ":memory:"

    def reopen(self) -> Store:
        assert self.durable
        result_of(self.store.close())
        self.store, self.clock = sync_store(self.path)
        return self.store


def database(kind: str, request: pytest.FixtureRequest, tmp_path: Path, name: str = "roller.db") -> str:
    """Where a test's database is, for each engine: memory, file (SQLite) or postgresql (a new database)."""
    if kind == "memory":
        return ":memory:"
    if kind == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        return server.create_database()
    return str(tmp_path / name)


ENGINES = ["memory", "file", "postgresql"]


@pytest.fixture(params=ENGINES)
def opened(request: pytest.FixtureRequest, tmp_path: Path):
    o = Opened(database(request.param, request, tmp_path))
    yield o
    result_of(o.store.close())


@pytest.fixture(params=["memory", "file"])
def sqlite_opened(request: pytest.FixtureRequest, tmp_path: Path):
    o = Opened(database(request.param, request, tmp_path))
    yield o
    result_of(o.store.close())


@pytest.fixture(params=["file", "postgresql"])
def durable_path(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file or a PostgreSQL database: what survives closing the store."""
    return database(request.param, request, tmp_path, "r.db")


@pytest.fixture
def store(opened: Opened) -> Store:
    return opened.store


@pytest.fixture
def file_opened(tmp_path: Path):
    o = Opened(str(tmp_path / "sub" / "dir" / "roller.db"))
    yield o
    result_of(o.store.close())


def pragma(store: Store, name: str, *, reader: bool = False) -> Any:
    read = store.db.read if reader else store.db.read_on_writer
    return result_of(read(lambda c: c.execute(f"PRAGMA {name}").fetchone()[0]))


def schema_version(store: Store) -> int:
    return result_of(store.db.read(lambda c: c.execute("SELECT version FROM schema_version").fetchone()[0]))


# -- migrations


def test_fresh_database_is_at_the_latest_version(store: Store) -> None:
    assert len(MIGRATIONS) >= 1
    assert schema_version(store) == len(MIGRATIONS)
    rows = result_of(store.db.read(lambda c: c.execute("SELECT count(*) FROM schema_version").fetchone()[0]))
    assert rows == 1
    sql = ("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
           if store.db.dialect.postgresql else "SELECT name FROM sqlite_master WHERE type = 'table'")
    tables = result_of(store.db.read(lambda c: {r[0] for r in c.execute(sql)}))
    assert {"machines", "jobs", "job_events", "audit", "schema_version"} <= tables


def test_migrate_again_is_a_no_op(store: Store) -> None:
    result_of(store.machines.put(machine("w1")))
    assert result_of(store.db.migrate()) == len(MIGRATIONS)
    assert result_of(store.db.migrate()) == len(MIGRATIONS)
    assert schema_version(store) == len(MIGRATIONS)
    assert result_of(store.machines.count()) == 1


def test_reopening_a_file_is_idempotent(file_opened: Opened) -> None:
    assert Path(file_opened.path).exists()  # parent directories were made
    store = file_opened.store
    result_of(store.machines.put(machine("w1")))
    inserted = result_of(store.jobs.insert(job("w1")))
    for _ in range(2):
        store = file_opened.reopen()
        assert schema_version(store) == len(MIGRATIONS)
        assert result_of(store.machines.get("mdc1", "w1")) == machine("w1")
        assert result_of(store.jobs.get(inserted.id)) == inserted
    assert sqlite_rows(file_opened.path, "SELECT version FROM schema_version") == [(len(MIGRATIONS),)]


def test_newer_schema_version_is_refused(store: Store) -> None:
    newer = len(MIGRATIONS) + 3
    result_of(store.db.write(lambda c: c.execute("UPDATE schema_version SET version = ?", (newer,))))
    f = failure_of(store.db.migrate(), StoreError)
    message = str(f.value)
    assert str(newer) in message and str(len(MIGRATIONS)) in message
    assert schema_version(store) == newer  # the refused migration changed nothing


def test_opening_a_file_with_a_newer_schema_fails(tmp_path: Path) -> None:
    path = str(tmp_path / "r.db")
    result_of(sync_store(path)[0].close())
    newer = len(MIGRATIONS) + 1
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE schema_version SET version = ?", (newer,))
    conn.close()
    with pytest.raises(StoreError) as e:
        sync_store(path)
    assert f"schema version {newer}" in str(e.value)
    assert f"up to {len(MIGRATIONS)} " in str(e.value)
    # The failed open closed its connection and left the file as it was.
    assert sqlite_rows(path, "SELECT version FROM schema_version") == [(newer,)]


def test_connection_pragmas(sqlite_opened: Opened) -> None:
    opened = sqlite_opened
    store = opened.store
    assert pragma(store, "journal_mode") == ("wal" if opened.is_file else "memory")
    assert pragma(store, "foreign_keys") == 1
    assert pragma(store, "synchronous") == 1  # NORMAL
    assert pragma(store, "busy_timeout") == 5000
    # reads: their own connection on a file (never queued behind writes), read-only; WAL
    # checkpoints on a third (never inside the writer's COMMIT)
    assert len(store.db.pools) == (3 if opened.is_file else 1)
    assert pragma(store, "wal_autocheckpoint") == (0 if opened.is_file else 1000)
    if opened.is_file:
        assert pragma(store, "query_only", reader=True) == 1
        assert pragma(store, "journal_mode", reader=True) == "wal"
        failure_of(store.db.read(lambda c: c.execute("DELETE FROM jobs")), sqlite3.OperationalError)


def test_a_read_is_not_queued_behind_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "two.db")
    clock = SyncClock()
    db = sync_database(path, clock)
    writer, reader = HeldThreadPool(), HeldThreadPool()
    db.pools[0].threadpool, db.pools[1].threadpool = writer, reader
    opening = Deferred.fromCoroutine(open_store(path, clock, db=db))
    writer.run_all()
    store = result_of(opening)
    inserted = store.jobs.insert(job("w0"))
    assert len(writer.queue) == 1  # in flight, not run
    counted = store.jobs.counts()
    assert len(reader.queue) == 1
    reader.run_one()  # answered while the write is still in flight: it sees the last commit
    assert result_of(counted) == {}
    writer.run_all()
    assert result_of(inserted).seq is not None
    counted = store.jobs.counts()
    reader.run_one()
    assert result_of(counted) == {"queued": 1}
    closing = store.close()
    writer.run_all()
    reader.run_all()
    result_of(closing)


def test_wal_checkpoints_run_beside_the_writer_one_at_a_time(tmp_path: Path) -> None:
    from roller.store.db import CHECKPOINT_EVERY

    path = str(tmp_path / "ckpt.db")
    clock = SyncClock()
    db = sync_database(path, clock)
    checkpointer = HeldThreadPool()
    db.pools[2].threadpool = checkpointer
    store = result_of(Deferred.fromCoroutine(open_store(path, clock, db=db)))
    committed = checkpointer.submitted  # the migrations' commits may have asked for one already
    checkpointer.run_all()
    for i in range(CHECKPOINT_EVERY):
        result_of(store.jobs.insert(job(f"a{i}")))  # each write answered at its commit, not after a checkpoint
    assert checkpointer.submitted == committed + 1 and len(checkpointer.queue) == 1
    for i in range(2 * CHECKPOINT_EVERY):
        result_of(store.jobs.insert(job(f"b{i}")))
    assert len(checkpointer.queue) == 1  # never two at once

    def file_pages() -> int:  # the database file's own header: what checkpoints have copied into it
        with open(path, "rb") as f:
            return int.from_bytes(f.read(100)[28:32], "big")

    before = file_pages()
    result_of(store.jobs.insert(job("big", params={"blob": "x" * 4_500_000})))  # > 1000 pages: in the WAL only
    assert file_pages() == before  # the writer's commits never checkpoint
    checkpointer.run_one()
    assert file_pages() > before + 1000
    for i in range(CHECKPOINT_EVERY):
        result_of(store.jobs.insert(job(f"c{i}")))
    assert len(checkpointer.queue) == 1  # the next one, CHECKPOINT_EVERY commits later
    closing = store.close()
    checkpointer.run_all()
    result_of(closing)
    assert sqlite_rows(path, "SELECT count(*) FROM jobs") == [(4 * CHECKPOINT_EVERY + 1,)]


def test_foreign_keys_are_enforced(store: Store) -> None:
    failure_of(store.jobs.add_events([JobEvent("no-such-job", 1.0, "log", "x")]), *integrity_errors())


# -- machines


def test_machine_insert_and_get(store: Store) -> None:
    m = machine("w1", fqdn="w1.example.com", ip="10.0.0.1", pool="p1")
    assert result_of(store.machines.insert(m)) == m
    assert result_of(store.machines.get("mdc1", "w1")) == m
    assert result_of(store.machines.get("mdc2", "w1")) is None
    assert result_of(store.machines.get("mdc1", "w2")) is None


def test_machine_insert_duplicate_is_a_conflict(store: Store) -> None:
    result_of(store.machines.insert(machine("w1", notes="first")))
    f = failure_of(store.machines.insert(machine("w1", notes="second")), Conflict)
    assert f.value.code == "machine_exists"
    assert f.value.status == 409
    assert "mdc1/w1" in f.value.message
    assert result_of(store.machines.get("mdc1", "w1")).notes == "first"
    # Same worker id, other group: a different machine.
    result_of(store.machines.insert(machine("w1", "mdc2")))
    assert result_of(store.machines.count()) == 2


def test_machine_by_worker_id_across_groups(store: Store) -> None:
    result_of(store.machines.put_many([machine("w1", "zz"), machine("w1", "aa"), machine("w2", "aa")]))
    found = result_of(store.machines.by_worker_id("w1"))
    assert [m.key for m in found] == [("aa", "w1"), ("zz", "w1")]
    assert result_of(store.machines.by_worker_id("w3")) == []


def test_machine_put_creates_then_replaces(store: Store) -> None:
    first = machine("w1", pool="old", fqdn="a.example.com", ip="10.0.0.1", notes="n1", tags=["x"])
    assert result_of(store.machines.put(first)) is True
    second = machine("w1", pool="new", fqdn="b.example.com", notes="n2")
    assert result_of(store.machines.put(second)) is False
    got = result_of(store.machines.get("mdc1", "w1"))
    assert got == second and got.ip is None and got.tags == ()
    assert result_of(store.machines.count()) == 1
    # The indexed columns were replaced too, not only the JSON.
    assert result_of(store.machines.list(pool="old")) == []
    assert result_of(store.machines.list(pool="new")) == [second]
    assert result_of(store.machines.list(q="a.example")) == []
    assert result_of(store.machines.list(q="10.0.0.1")) == []


def test_machine_put_keeps_created_at_and_bumps_updated_at(opened: Opened) -> None:
    store, clock = opened.store, opened.clock
    clock.advance(100)
    result_of(store.machines.put(machine("w1")))
    clock.advance(50)
    result_of(store.machines.put(machine("w1", notes="changed")))
    row = result_of(store.db.read(lambda c: tuple(c.execute(
        "SELECT created_at, updated_at FROM machines").fetchone())))
    assert row == (100.0, 150.0)


def test_machine_delete(store: Store) -> None:
    result_of(store.machines.put_many([machine("w1"), machine("w1", "mdc2")]))
    assert result_of(store.machines.delete("mdc1", "w1")) is True
    assert result_of(store.machines.delete("mdc1", "w1")) is False
    assert result_of(store.machines.delete("mdc1", "never")) is False
    assert result_of(store.machines.get("mdc1", "w1")) is None
    assert result_of(store.machines.get("mdc2", "w1")) == machine("w1", "mdc2")


def test_machine_put_many_and_count(store: Store) -> None:
    assert result_of(store.machines.count()) == 0
    assert result_of(store.machines.put_many([])) == 0
    batch = [machine(f"w{i}", pool="p") for i in range(25)]
    assert result_of(store.machines.put_many(batch)) == 25
    assert result_of(store.machines.count()) == 25
    # Again, overlapping: updates, not duplicates.
    again = [machine(f"w{i}", pool="q") for i in range(20, 30)]
    assert result_of(store.machines.put_many(again)) == 10
    assert result_of(store.machines.count()) == 30
    assert len(result_of(store.machines.list(pool="q"))) == 10
    assert len(result_of(store.machines.list(pool="p"))) == 20


def test_machine_with_every_section_round_trips(store: Store) -> None:
    m = Machine.from_json(FULL_MACHINE_JSON)
    assert all(getattr(m, name) is not None for name in ("ssh", "ipmi", "pdu", "redfish", "xen"))
    result_of(store.machines.insert(m))
    got = result_of(store.machines.get("mdc1", "t-linux64-ms-280"))
    assert got == m
    assert got.to_json() == m.to_json()
    assert got.ipmi.bridge == ("-B", "0", "-b", "7", "-T", "0x82", "-t", "0x72")
    assert got.redfish.verify_tls is False
    assert got.liveness.port == 2222
    assert result_of(store.machines.list()) == [m]
    assert result_of(store.machines.by_worker_id("t-linux64-ms-280")) == [m]


@pytest.fixture
def fleet(store: Store) -> list[Machine]:
    machines = [
        machine("a_1", "g2", pool="p1", fqdn="a_1.example.com", ip="10.0.0.1"),
        machine("ax1", "g2", pool="p1", fqdn="ax1.example.com", ip="10.0.0.2"),
        machine("b-2", "g1", pool="p2", fqdn="b-2.example.com", ip="10.0.1.3"),
        machine("c3", "g1", pool="p1", fqdn="c3.other.org", ip="192.168.5.4"),
        machine("d4", "g1"),
    ]
    result_of(store.machines.put_many(machines))
    return machines


def keys(machines: list[Machine]) -> list[tuple[str, str]]:
    return [m.key for m in machines]


def test_machine_list_ordering_and_filters(store: Store, fleet: list[Machine]) -> None:
    everything = result_of(store.machines.list())
    assert keys(everything) == [("g1", "b-2"), ("g1", "c3"), ("g1", "d4"), ("g2", "a_1"), ("g2", "ax1")]
    assert sorted(everything, key=lambda m: m.key) == sorted(fleet, key=lambda m: m.key)
    assert keys(result_of(store.machines.list(worker_group="g2"))) == [("g2", "a_1"), ("g2", "ax1")]
    assert keys(result_of(store.machines.list(pool="p1"))) == [("g1", "c3"), ("g2", "a_1"), ("g2", "ax1")]
    assert keys(result_of(store.machines.list(pool="p1", worker_group="g1"))) == [("g1", "c3")]
    assert result_of(store.machines.list(worker_group="nope")) == []


def test_machine_list_q_matches_worker_id_fqdn_and_ip(store: Store, fleet: list[Machine]) -> None:
    assert keys(result_of(store.machines.list(q="c3"))) == [("g1", "c3")]
    assert keys(result_of(store.machines.list(q="OTHER.org"))) == [("g1", "c3")]  # case-insensitive
    assert keys(result_of(store.machines.list(q="10.0.0."))) == [("g2", "a_1"), ("g2", "ax1")]
    assert keys(result_of(store.machines.list(q="192.168"))) == [("g1", "c3")]
    assert keys(result_of(store.machines.list(q="example", worker_group="g1"))) == [("g1", "b-2")]
    assert result_of(store.machines.list(q="")) == result_of(store.machines.list())


def test_machine_list_q_wildcards_are_literal(store: Store, fleet: list[Machine]) -> None:
    # "_" is a LIKE wildcard; here it only matches a real underscore.
    assert keys(result_of(store.machines.list(q="a_1"))) == [("g2", "a_1")]
    assert keys(result_of(store.machines.list(q="_"))) == [("g2", "a_1")]
    # "%" is in no machine's fields, so it matches nothing (not everything).
    assert result_of(store.machines.list(q="%")) == []
    assert result_of(store.machines.list(q="a%1")) == []
    # The escape character itself is literal too.
    assert result_of(store.machines.list(q="\\")) == []
    assert result_of(store.machines.list(q="a\\_1")) == []


def test_machine_list_limit_and_offset(store: Store, fleet: list[Machine]) -> None:
    everything = keys(result_of(store.machines.list()))
    pages = [keys(result_of(store.machines.list(limit=2, offset=o))) for o in (0, 2, 4, 6)]
    assert pages == [everything[0:2], everything[2:4], everything[4:5], []]
    assert keys(result_of(store.machines.list(pool="p1", limit=1, offset=1))) == [("g2", "a_1")]
    assert result_of(store.machines.list(limit=0)) == []


# -- jobs


def test_job_insert_assigns_increasing_seq(store: Store) -> None:
    jobs = [job(f"w{i}") for i in range(5)]
    inserted = [result_of(store.jobs.insert(j)) for j in jobs]
    seqs = [j.seq for j in inserted]
    assert all(isinstance(s, int) for s in seqs)
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    for original, stored in zip(jobs, inserted):
        assert original.seq is None
        assert stored == evolve(original, seq=stored.seq)


def test_job_get_round_trips_every_field(store: Store) -> None:
    j = job(
        "w1", "mdc2", task="reimage", created=1234.5,
        params={"image": "ubuntu-22.04", "force": True, "n": [1, 2]},
        requester="client:relops/ci", origin_ip="2001:db8::1", reason="bug 1234567",
        priority=90,
    )
    stored = result_of(store.jobs.insert(j))
    assert result_of(store.jobs.get(j.id)) == stored
    assert result_of(store.jobs.get("no-such-job")) is None


def test_job_insert_with_first_event(store: Store) -> None:
    j = job()
    result_of(store.jobs.insert(j, JobEvent(j.id, 1000.0, "state", "queued", {"state": "queued"})))
    (event,) = result_of(store.jobs.events(j.id))
    assert (event.job_id, event.time, event.kind, event.message, event.data) == (
        j.id, 1000.0, "state", "queued", {"state": "queued"})
    assert isinstance(event.id, int)


def test_job_insert_duplicate_id_fails(store: Store) -> None:
    j = result_of(store.jobs.insert(job()))
    failure_of(store.jobs.insert(evolve(job(), id=j.id)), *integrity_errors())
    assert len(result_of(store.jobs.list())) == 1


def test_job_update_with_event(store: Store) -> None:
    j = result_of(store.jobs.insert(job()))
    running = j.transition(State.running, 1001.0)
    assert result_of(store.jobs.update(running, JobEvent(j.id, 1001.0, "state", "running"))) == running
    assert result_of(store.jobs.get(j.id)) == running
    done = running.transition(State.failed, 1003.5, result="no", error="BMC said no")
    result_of(store.jobs.update(done, JobEvent(j.id, 1003.5, "state", "failed", {"state": "failed"})))
    got = result_of(store.jobs.get(j.id))
    assert got == done
    assert (got.state, got.started_at, got.finished_at, got.result, got.error) == (
        State.failed, 1001.0, 1003.5, "no", "BMC said no")
    assert got.seq == j.seq
    assert [e.message for e in result_of(store.jobs.events(j.id))] == ["running", "failed"]
    # An update without an event adds none.
    result_of(store.jobs.update(done))
    assert len(result_of(store.jobs.events(j.id))) == 2


def test_job_events_order_after_and_limit(store: Store) -> None:
    a, b = result_of(store.jobs.insert(job("a"))), result_of(store.jobs.insert(job("b")))
    result_of(store.jobs.add_events([JobEvent(a.id, 1.0 + i, "log", f"a{i}") for i in range(3)]))
    result_of(store.jobs.add_events([JobEvent(b.id, 5.0, "log", "b0", {"line": 1})]))
    result_of(store.jobs.add_events([JobEvent(a.id, 0.5, "log", "a3")]))  # an earlier time, a later event
    events = result_of(store.jobs.events(a.id))
    assert [e.message for e in events] == ["a0", "a1", "a2", "a3"]
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert all(e.job_id == a.id and e.data == {} for e in events)
    assert [e.message for e in result_of(store.jobs.events(a.id, after=ids[1]))] == ["a2", "a3"]
    assert result_of(store.jobs.events(a.id, after=ids[-1])) == []
    assert [e.message for e in result_of(store.jobs.events(a.id, limit=2))] == ["a0", "a1"]
    assert [(e.message, e.data) for e in result_of(store.jobs.events(b.id))] == [("b0", {"line": 1})]
    assert result_of(store.jobs.events("no-such-job")) == []
    assert result_of(store.jobs.add_events([])) is None


@pytest.fixture
def history(store: Store) -> list[Job]:
    specs = [
        ("w1", "mdc1", "reboot", State.succeeded),
        ("w2", "mdc1", "ping", State.queued),
        ("w1", "mdc2", "reboot", State.failed),
        ("w1", "mdc1", "ping", State.running),
        ("w3", "mdc2", "reimage", State.queued),
        ("w1", "mdc1", "reboot", State.queued),
    ]
    return [
        result_of(store.jobs.insert(job(w, g, task=t, created=1000.0 + i, state=s)))
        for i, (w, g, t, s) in enumerate(specs)
    ]


def seqs(jobs: list[Job]) -> list[int]:
    return [j.seq for j in jobs]


def test_job_list_newest_first_with_filters(store: Store, history: list[Job]) -> None:
    h = history
    assert result_of(store.jobs.list()) == h[::-1]
    assert seqs(result_of(store.jobs.list(worker_id="w1"))) == seqs([h[5], h[3], h[2], h[0]])
    assert seqs(result_of(store.jobs.list(worker_id="w1", worker_group="mdc1"))) == seqs([h[5], h[3], h[0]])
    assert seqs(result_of(store.jobs.list(worker_group="mdc2"))) == seqs([h[4], h[2]])
    assert seqs(result_of(store.jobs.list(task_name="reboot"))) == seqs([h[5], h[2], h[0]])
    assert seqs(result_of(store.jobs.list(states=[State.queued]))) == seqs([h[5], h[4], h[1]])
    assert seqs(result_of(store.jobs.list(states=[State.failed, State.succeeded]))) == seqs([h[2], h[0]])
    assert seqs(result_of(store.jobs.list(states=[State.queued], task_name="ping"))) == seqs([h[1]])
    assert seqs(result_of(store.jobs.list(states=iter([State.running])))) == seqs([h[3]])
    assert result_of(store.jobs.list(worker_id="nobody")) == []
    assert result_of(store.jobs.list(states=[State.interrupted])) == []


def test_job_list_before_cursor_and_limit(store: Store, history: list[Job]) -> None:
    assert result_of(store.jobs.list(limit=2)) == [history[5], history[4]]
    pages, before = [], None
    while True:
        page = result_of(store.jobs.list(limit=4, before=before))
        if not page:
            break
        pages.append(seqs(page))
        before = page[-1].seq
    assert pages == [seqs(history[:1:-1]), seqs(history[1::-1])]
    assert seqs(result_of(store.jobs.list(worker_id="w1", before=history[3].seq))) == seqs([history[2], history[0]])
    assert result_of(store.jobs.list(before=history[0].seq)) == []


def test_recover_interrupts_running_and_orders_queued(opened: Opened) -> None:
    store = opened.store
    specs = [
        ("q-low", State.queued, 10),
        ("r1", State.running, 50),
        ("q-mid-1", State.queued, 50),
        ("done", State.succeeded, 99),
        ("q-high", State.queued, 90),
        ("r2", State.running, 100),
        ("q-mid-2", State.queued, 50),
        ("gone", State.cancelled, 50),
    ]
    stored = {}
    for name, state, priority in specs:
        j = job(name, state=state, priority=priority, started_at=1001.0 if state is State.running else None)
        stored[name] = result_of(store.jobs.insert(j))
    result_of(store.jobs.add_events([JobEvent(stored["r1"].id, 1001.0, "state", "running")]))

    interrupted, queued = result_of(store.jobs.recover(2000.0))

    assert [j.worker_id for j in interrupted] == ["r1", "r2"]
    for j in interrupted:
        assert j.state is State.interrupted
        assert j.finished_at == 2000.0 and j.started_at == 1001.0
        assert j.error and "running" in j.error
        assert result_of(store.jobs.get(j.id)) == j
        last = result_of(store.jobs.events(j.id))[-1]
        assert (last.time, last.kind, last.data) == (2000.0, "state", {"state": "interrupted"})
        assert "interrupted" in last.message
    assert [e.message for e in result_of(store.jobs.events(stored["r1"].id))][0] == "running"
    assert [j.worker_id for j in queued] == ["q-high", "q-mid-1", "q-mid-2", "q-low"]
    assert queued == [stored[n] for n in ("q-high", "q-mid-1", "q-mid-2", "q-low")]
    assert result_of(store.jobs.get(stored["done"].id)) == stored["done"]
    assert result_of(store.jobs.counts()) == {"queued": 4, "interrupted": 2, "succeeded": 1, "cancelled": 1}

    # Again (the next start-up): nothing more to interrupt, the same queue.
    store = opened.reopen() if opened.durable else store
    again_interrupted, again_queued = result_of(store.jobs.recover(3000.0))
    assert again_interrupted == [] and again_queued == queued
    assert len(result_of(store.jobs.events(stored["r2"].id))) == 1


def test_job_counts(store: Store) -> None:
    assert result_of(store.jobs.counts()) == {}
    for state in (State.queued, State.queued, State.running, State.timed_out):
        result_of(store.jobs.insert(job(state=state)))
    assert result_of(store.jobs.counts()) == {"queued": 2, "running": 1, "timed_out": 1}


# -- audit


def test_audit_add_and_list(store: Store) -> None:
    entries = [
        AuditEntry(time=1.0, actor="alice", action="machine.put", result="ok", target="mdc1/w1",
                   source_ip="10.0.0.9", params={"pool": "p1", "n": [1, 2]}),
        AuditEntry(time=2.0, actor="client:tc", action="job.create", result="ok", target="mdc1/w2"),
        AuditEntry(time=3.0, actor="bob", action="machine.delete", result="not_found", target="mdc1/w1"),
        AuditEntry(time=2.5, actor="bob", action="login", result="ok"),
    ]
    for e in entries:
        assert result_of(store.audit.add(e)) is None
    listed = result_of(store.audit.list())
    assert [e.actor for e in listed] == ["bob", "bob", "client:tc", "alice"]  # newest (by id) first
    assert [evolve(e, id=None) for e in listed] == entries[::-1]
    ids = [e.id for e in listed]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 4
    on_w1 = result_of(store.audit.list(target="mdc1/w1"))
    assert [e.action for e in on_w1] == ["machine.delete", "machine.put"]
    assert on_w1[1].params == {"pool": "p1", "n": [1, 2]} and on_w1[1].source_ip == "10.0.0.9"
    assert [e.id for e in result_of(store.audit.list(before=ids[1]))] == ids[2:]
    assert [e.id for e in result_of(store.audit.list(target="mdc1/w1", before=ids[0]))] == [ids[1], ids[3]]
    assert [e.id for e in result_of(store.audit.list(target="mdc1/w1", before=ids[1]))] == [ids[3]]
    assert [e.id for e in result_of(store.audit.list(limit=1))] == ids[:1]
    assert result_of(store.audit.list(target="nothing")) == []
    assert listed[-1].to_json()["time"] == "1970-01-01T00:00:01.000Z"


# -- closed database


def test_write_after_close_fails(opened: Opened) -> None:
    store = opened.store
    result_of(store.close())
    for d in (
        store.machines.put(machine("w1")),
        store.machines.insert(machine("w1")),
        store.machines.put_many([machine("w1")]),
        store.machines.delete("mdc1", "w1"),
        store.jobs.insert(job()),
        store.jobs.add_events([]),
        store.audit.add(AuditEntry(time=1.0, actor="a", action="x", result="ok")),
        store.db.migrate(),
    ):
        assert "closed" in str(failure_of(d, StoreError).value)
    assert result_of(store.close()) is None  # closing twice is fine


def test_read_after_close_fails(opened: Opened) -> None:
    store = opened.store
    result_of(store.machines.put(machine("w1")))
    result_of(store.close())
    for d in (store.machines.get("mdc1", "w1"), store.machines.list(), store.jobs.list(), store.audit.list()):
        failure_of(d, StoreError)


# -- group commit, deterministically (a held "thread" pool on real SQLite)


@pytest.fixture(params=ENGINES)
def held(request: pytest.FixtureRequest, tmp_path: Path):
    path = database(request.param, request, tmp_path, "held.db")
    store, pool, clock = held_store(path)
    yield store, pool
    d = store.close()
    pool.run_all()
    result_of(d)


def test_writes_issued_while_one_is_in_flight_commit_together(held) -> None:
    store, pool = held
    before = pool.submitted
    first = store.jobs.insert(job("w0"))
    rest = [store.jobs.insert(job(f"w{i}")) for i in range(1, 6)]
    m = store.machines.put(machine("w1"))
    a = store.audit.add(AuditEntry(time=1.0, actor="a", action="x", result="ok"))
    assert len(pool.queue) == 1  # only the first transaction is in flight
    assert all(has_no_result(d) for d in [first, *rest, m, a])
    pool.run_one()
    assert result_of(first).seq is not None
    assert all(has_no_result(d) for d in [*rest, m, a])
    assert len(pool.queue) == 1  # everything else: one transaction
    pool.run_one()
    assert pool.submitted - before == 2
    assert [result_of(d).worker_id for d in rest] == [f"w{i}" for i in range(1, 6)]
    assert seqs([result_of(first)] + [result_of(d) for d in rest]) == sorted(
        seqs([result_of(first)] + [result_of(d) for d in rest]))
    assert result_of(m) is True and result_of(a) is None
    assert pool.queue == []


def test_one_failing_write_fails_only_itself(held) -> None:
    store, pool = held
    existing = store.jobs.insert(job("w0"))
    pool.run_all()
    existing = result_of(existing)

    blocker = store.audit.add(AuditEntry(time=1.0, actor="a", action="first", result="ok"))
    ok1 = store.jobs.insert(job("w1"))
    dup = store.jobs.insert(evolve(job("dup"), id=existing.id), JobEvent(existing.id, 2.0, "log", "never stored"))
    conflict = store.machines.insert(machine("m1"))
    conflict2 = store.machines.insert(machine("m1"))  # same batch, after its twin
    ok2 = store.jobs.insert(job("w2"))
    assert len(pool.queue) == 1
    pool.run_one()  # the blocker
    result_of(blocker)
    assert len(pool.queue) == 1
    pool.run_one()  # the batch with the failures
    failure_of(dup, *integrity_errors())
    assert failure_of(conflict2, Conflict).value.code == "machine_exists"
    assert result_of(conflict) == machine("m1")
    j1, j2 = result_of(ok1), result_of(ok2)
    assert j2.seq > j1.seq > existing.seq

    # The failed write left nothing behind: not its event, not its row.
    read = store.jobs.list()
    pool.run_all()
    listed = result_of(read)
    assert [j.id for j in listed] == [j2.id, j1.id, existing.id]
    read = store.jobs.events(existing.id)
    pool.run_all()
    assert result_of(read) == []
    read = store.machines.count()
    pool.run_all()
    assert result_of(read) == 1


@pytest.fixture(params=["memory", "file"])
def sqlite_held(request: pytest.FixtureRequest, tmp_path: Path):
    store, pool, clock = held_store(database(request.param, request, tmp_path, "held.db"))
    yield store, pool
    d = store.close()
    pool.run_all()
    result_of(d)


def test_a_burst_of_submissions_is_one_insert_per_table(sqlite_held) -> None:
    store, pool = sqlite_held  # SQLite's trace callback counts the statements
    statements: list[str] = []
    traced = store.db.read_on_writer(lambda c: c.connection.set_trace_callback(statements.append))
    pool.run_all()
    result_of(traced)
    blocker = store.audit.add(AuditEntry(time=1.0, actor="a", action="first", result="ok"))
    jobs = [job(f"w{i}") for i in range(5)]
    inserts = [
        store.jobs.insert(j, JobEvent(j.id, 2.0, "state", "queued", {"state": "queued"}),
                          AuditEntry(time=2.0, actor="a", action="job.create", target=j.worker_id, result=j.id))
        for j in jobs
    ]
    pool.run_one()
    result_of(blocker)
    del statements[:]
    pool.run_one()
    inserted = [result_of(d) for d in inserts]
    assert [s.split(" (")[0] for s in statements if s.startswith("INSERT")] == [
        "INSERT INTO jobs", "INSERT INTO job_events", "INSERT INTO audit"]
    # each job got its own row's seq, in submission order
    assert [j.id for j in inserted] == [j.id for j in jobs]
    stored = store.db.read(lambda c: dict(c.execute("SELECT id, seq FROM jobs").fetchall()))
    pool.run_all()
    assert {j.id: j.seq for j in inserted} == result_of(stored)
    assert [j.seq for j in inserted] == sorted(j.seq for j in inserted)
    events = [store.jobs.events(j.id) for j in jobs]
    audit = store.audit.list()
    pool.run_all()
    assert [[e.message for e in result_of(d)] for d in events] == [["queued"]] * 5
    assert sorted(e.result for e in result_of(audit) if e.action == "job.create") == sorted(j.id for j in jobs)


def test_combined_inserts_keep_their_order_around_other_writes(held) -> None:
    store, pool = held
    blocker = store.audit.add(AuditEntry(time=1.0, actor="a", action="first", result="ok"))
    a, b, c = job("wa"), job("wb"), job("wc")
    da, db_ = store.jobs.insert(a), store.jobs.insert(b)
    moved = store.jobs.update(a.transition(State.running, 5.0))  # after a's insert, before c's
    dc = store.jobs.insert(c)
    pool.run_all()
    result_of(blocker)
    assert result_of(moved).state is State.running
    ja, jb, jc = result_of(da), result_of(db_), result_of(dc)
    assert ja.seq < jb.seq < jc.seq
    read = store.jobs.get(a.id)
    pool.run_all()
    assert result_of(read).state is State.running


def test_a_write_issued_from_a_write_callback_runs(held) -> None:
    store, pool = held
    seen: list = []

    def then(j: Job) -> Deferred:
        return store.jobs.update(j.transition(State.running, 5.0)).addCallback(seen.append)

    first = store.jobs.insert(job("w0")).addCallback(then)
    second = store.jobs.insert(job("w1")).addCallback(then)
    pool.run_all()
    assert [j.state for j in seen] == [State.running, State.running]
    assert result_of(first) is None and result_of(second) is None
    assert len(pool.queue) == 0


def test_close_finishes_writes_already_accepted(held) -> None:
    store, pool = held
    writes = [store.jobs.insert(job(f"w{i}")) for i in range(5)]
    assert len(pool.queue) == 1 and pool.queue  # one in flight, four waiting
    closed = store.close()
    late = store.jobs.insert(job("late"))
    failure_of(late, StoreError)
    pool.run_all()
    assert [result_of(d).worker_id for d in writes] == [f"w{i}" for i in range(5)]
    assert result_of(closed) is None


# -- durability on a file (sync pool)


def test_committed_before_the_callback(durable_path: str) -> None:
    path = durable_path
    store, _ = sync_store(path)
    seen: list = []

    def look(j: Job) -> None:
        seen.append(sqlite_rows(path, "SELECT id, state FROM jobs WHERE seq = ?", j.seq))

    j = job()
    store.jobs.insert(j).addCallback(look)
    assert seen == [[(j.id, "queued")]]
    store.machines.put(machine("w1")).addCallback(
        lambda _: seen.append(sqlite_rows(path, "SELECT worker_id FROM machines")))
    assert seen[-1] == [("w1",)]
    result_of(store.close())


# -- the real threaded pool on the real reactor


def _real_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest_twisted.ensureDeferred
async def test_threaded_open_pragmas_and_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "r.db")
    store = await open_store(path, _real_reactor())
    try:
        assert await store.db.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
        assert await store.db.read_on_writer(lambda c: c.execute("PRAGMA foreign_keys").fetchone()[0]) == 1
        assert await store.db.read(lambda c: c.execute("PRAGMA query_only").fetchone()[0]) == 1
        assert await store.machines.put(Machine.from_json(FULL_MACHINE_JSON)) is True
    finally:
        await store.close()
    store = await open_store(path, _real_reactor())
    try:
        assert await store.db.read(lambda c: c.execute("SELECT version FROM schema_version").fetchone()[0]) == len(MIGRATIONS)
        assert await store.machines.list() == [Machine.from_json(FULL_MACHINE_JSON)]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_threaded_newer_schema_fails(tmp_path: Path) -> None:
    path = str(tmp_path / "r.db")
    await (await open_store(path, _real_reactor())).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE schema_version SET version = 999")
    conn.close()
    with pytest.raises(StoreError, match=rf"version 999, .* up to {len(MIGRATIONS)} "):
        await open_store(path, _real_reactor())


@pytest_twisted.ensureDeferred
async def test_threaded_200_concurrent_inserts(durable_path: str) -> None:
    path = durable_path
    store = await open_store(path, _real_reactor())
    jobs = [job(f"w{i}", created=float(i)) for i in range(200)]
    try:
        results = await DeferredList([store.jobs.insert(j) for j in jobs], consumeErrors=True)
        assert all(ok for ok, _ in results), [r for ok, r in results if not ok][:3]
        inserted = [r for _, r in results]
        got_seqs = [j.seq for j in inserted]
        assert len(set(got_seqs)) == 200
        assert got_seqs == sorted(got_seqs)  # committed in the order asked
        assert [j.id for j in inserted] == [j.id for j in jobs]
    finally:
        await store.close()

    store = await open_store(path, _real_reactor())
    try:
        listed = await store.jobs.list(limit=1000)
        assert sorted(j.id for j in listed) == sorted(j.id for j in jobs)
        assert {j.seq for j in listed} == set(got_seqs)
        assert await store.jobs.counts() == {"queued": 200}
    finally:
        await store.close()
    assert sqlite_rows(path, "SELECT count(*) FROM jobs") == [(200,)]


@pytest_twisted.ensureDeferred
async def test_threaded_failing_write_in_a_batch(durable_path: str) -> None:
    path = durable_path
    store = await open_store(path, _real_reactor())
    try:
        first = job("w0")
        twin = job("w1")
        ds = [
            store.jobs.insert(first),  # in flight alone; the rest wait and commit together
            store.jobs.insert(twin),
            store.jobs.insert(evolve(job("dup0"), id=first.id)),
            store.jobs.insert(job("w2")),
            store.jobs.insert(evolve(job("dup1"), id=twin.id)),
            store.jobs.insert(job("w3")),
        ]
        results = await DeferredList(ds, consumeErrors=True)
        oks = [ok for ok, _ in results]
        assert oks == [True, True, False, True, False, True]
        for ok, value in results:
            if not ok:
                assert value.check(*integrity_errors())
    finally:
        await store.close()
    rows = sqlite_rows(path, "SELECT worker_id FROM jobs ORDER BY seq")
    assert rows == [("w0",), ("w1",), ("w2",), ("w3",)]


@pytest_twisted.ensureDeferred
async def test_threaded_write_is_on_disk_when_its_deferred_fires(durable_path: str) -> None:
    path = durable_path
    store = await open_store(path, _real_reactor())
    try:
        for i in range(3):
            j = await store.jobs.insert(job(f"w{i}"))
            assert sqlite_rows(path, "SELECT id FROM jobs WHERE seq = ?", j.seq) == [(j.id,)]
        running = j.transition(State.running, 5.0)
        await store.jobs.update(running, JobEvent(j.id, 5.0, "state", "running"))
        assert sqlite_rows(path, "SELECT state FROM jobs WHERE id = ?", j.id) == [("running",)]
        assert sqlite_rows(path, "SELECT message FROM job_events WHERE job_id = ?", j.id) == [("running",)]
        await store.audit.add(AuditEntry(time=1.0, actor="a", action="x", result="ok"))
        assert sqlite_rows(path, "SELECT actor FROM audit") == [("a",)]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_threaded_close_finishes_accepted_writes(durable_path: str) -> None:
    reactor = _real_reactor()
    path = durable_path
    store = await open_store(path, reactor)
    writes = [store.jobs.insert(job(f"w{i}")) for i in range(20)]
    reads = [store.jobs.counts()]
    closing = store.close()
    late = store.jobs.insert(job("late"))
    everything = DeferredList([*writes, *reads, closing], consumeErrors=True)
    # A timeout, not a sleep: if a write was dropped the test fails in 10 s instead of hanging.
    everything.addTimeout(10, reactor)
    results = await everything
    assert all(ok for ok, _ in results), [r for ok, r in results if not ok][:3]
    with pytest.raises(StoreError):
        await late
    assert sqlite_rows(path, "SELECT count(*) FROM jobs") == [(20,)]


@pytest_twisted.ensureDeferred
async def test_threaded_read_and_write_after_close_fail(tmp_path: Path) -> None:
    reactor = _real_reactor()
    store = await open_store(str(tmp_path / "r.db"), reactor)
    await store.close()
    for d in (store.jobs.insert(job()), store.machines.list(), store.jobs.get("x")):
        d.addTimeout(10, reactor)
        with pytest.raises(StoreError):
            await d


# -- the in-memory inventory and changes made by another process


def test_machines_written_elsewhere_appear_after_refresh(durable_path: str) -> None:
    path = durable_path
    daemon, _ = sync_store(path)
    cli, _ = sync_store(path)  # e.g. `roller import` in another process
    assert result_of(daemon.machines.refresh()) is False
    result_of(cli.machines.put(machine("w9")))
    assert result_of(daemon.machines.get("mdc1", "w9")) is None
    assert result_of(daemon.machines.refresh()) is True
    assert result_of(daemon.machines.get("mdc1", "w9")).worker_id == "w9"
    assert [m.worker_id for m in result_of(daemon.machines.by_worker_id("w9"))] == ["w9"]
    result_of(cli.machines.delete("mdc1", "w9"))
    assert result_of(daemon.machines.refresh()) is True
    assert result_of(daemon.machines.get("mdc1", "w9")) is None
    # its own writes need no refresh, and do not trigger a reload
    result_of(daemon.machines.put(machine("w10")))
    assert result_of(daemon.machines.get("mdc1", "w10")) is not None
    assert result_of(daemon.machines.refresh()) is False


def _inventory(store: Store) -> dict[tuple[str, str], dict[str, Any]]:
    return {m.key: m.to_json() for m in store.machines.snapshot()}


def test_postgresql_rollers_reload_only_the_machines_another_changed(request: pytest.FixtureRequest,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from roller.store import machines as machines_module

    url = database("postgresql", request, tmp_path)
    a, _ = sync_store(url)
    b, _ = sync_store(url)  # another roller on the same database
    try:
        result_of(a.machines.put_many([machine(f"w{i}") for i in range(50)]))
        assert result_of(b.machines.refresh()) is True
        full_loads: list[int] = []
        real_load = b.machines._load

        async def counting_load() -> int:
            full_loads.append(1)
            return await real_load()

        monkeypatch.setattr(b.machines, "_load", counting_load)
        rng = random.Random(7)
        for step in range(60):
            choice = rng.randrange(4)
            wid = f"w{rng.randrange(70)}"
            if choice == 0:
                result_of(a.machines.delete("mdc1", wid))
            elif choice == 1:
                result_of(a.machines.put(machine(wid, pool=f"p{step}")))
            elif choice == 2:
                result_of(b.machines.put(machine(wid, fqdn=f"{wid}.example.com")))
            else:
                result_of(a.machines.put(machine(wid, "mdc2")))
            if rng.random() < 0.4:
                result_of(b.machines.refresh())
        result_of(b.machines.refresh())
        result_of(a.machines.refresh())  # b's changes
        assert full_loads == []  # only the changed machines were read
        fresh, _ = sync_store(url)
        assert _inventory(b) == _inventory(a) == _inventory(fresh)
        result_of(fresh.close())
        assert result_of(b.machines.refresh()) is False

        # an import of more machines than one change records: one "everything" row, a full reload
        result_of(a.machines.put_many([machine(f"bulk{i}") for i in range(machines_module.CHANGES_PER_WRITE + 1)]))
        assert result_of(b.machines.refresh()) is True
        assert full_loads == [1]
        assert _inventory(b) == _inventory(a)

        # further behind than the kept changes: a full reload too
        monkeypatch.setattr(machines_module, "CHANGES_KEPT", 2)
        for i in range(100):  # the 100th version prunes the older ones
            result_of(a.machines.put(machine("w1", pool=f"again{i}")))
        assert result_of(b.machines.refresh()) is True
        assert full_loads == [1, 1]
        assert _inventory(b) == _inventory(a)
    finally:
        result_of(a.close())
        result_of(b.close())


def test_job_ids_are_uuid7_time_ordered_and_unguessable(monkeypatch):
    import uuid as uuid_module

    from roller import jobs as jobs_module

    now = [1_700_000_000_000_000_000]
    monkeypatch.setattr(jobs_module.time, "time_ns", lambda: now[0])
    same_ms = [new_job_id() for _ in range(200)]
    now[0] += 1_000_000  # one millisecond later
    later = new_job_id()
    for text in same_ms + [later]:
        parsed = uuid_module.UUID(text)
        assert str(parsed) == text and parsed.version == 7 and parsed.variant == uuid_module.RFC_4122
        assert parsed.int >> 80 == now[0] // 1_000_000 - (text != later)
    assert len(set(same_ms)) == 200  # the 74 random bits differ
    assert max(same_ms) < later
