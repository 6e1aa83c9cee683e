"""
roller's persistent store: SQLite (or PostgreSQL) through adbapi, one component per table.

    store = await open_store(path, reactor)
    await store.machines.get(group, worker_id)
    await store.jobs.insert(job)
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import Deferred

from roller.store.audit import AuditEntry, AuditTable
from roller.store.batches import BatchTable
from roller.store.db import Database, IStoreReactor, StorageUnavailable, StoreError
from roller.store.health import HealthTable
from roller.store.jobs import JobTable
from roller.store.loans import LoanTable
from roller.store.machines import MachineTable
from roller.store.users import UserTable

__all__ = ["Store", "open_store", "StoreError", "StorageUnavailable", "AuditEntry", "IStoreReactor"]


@frozen
class Store:
    db: Database
    machines: MachineTable
    jobs: JobTable
    audit: AuditTable
    users: UserTable
    loans: LoanTable
    health: HealthTable
    batches: BatchTable

    def close(self) -> Deferred[None]:
        return self.db.close()


async def open_store(path: str, reactor: IStoreReactor, *, synchronous: str = "NORMAL",
                     db: Database | None = None, user: str | None = None, password: str | None = None) -> Store:
    """
    Open (creating and migrating as needed) the store at C{path}: a SQLite
    file, C{:memory:}, or a C{postgresql://} URL (logging in as C{user}
    with C{password} if given).
    """
    db = db or Database.connect(path, reactor, synchronous=synchronous, user=user, password=password)
    try:
        await db.migrate()
    except Exception:
        await db.close()
        raise
    store = Store(db=db, machines=MachineTable(db, reactor), jobs=JobTable(db), audit=AuditTable(db),
                  users=UserTable(db), loans=LoanTable(db), health=HealthTable(db),
                  batches=BatchTable(db))
    try:
        await store.machines.load()
    except Exception:
        await db.close()
        raise
    return store
