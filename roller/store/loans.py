"""
The loans table: who borrowed which machine, why, until when.

A machine has at most one active loan (C{returned_at} is NULL), which a
partial unique index enforces: L{LoanTable.insert} of a second one fails
with L{AlreadyOnLoan}.
"""

from __future__ import annotations

import builtins
from typing import Any

from attrs import evolve, frozen
from twisted.internet.defer import Deferred

from roller.jobs import iso
from roller.store.db import Cursor, Database, integrity_errors
from roller.store.where import Where


class AlreadyOnLoan(Exception):
    """The machine already has an active loan."""


@frozen
class Loan:
    worker_group: str
    worker_id: str
    borrower: str
    reason: str
    started_at: float
    expires_at: float
    returned_at: float | None = None
    job_id: str | None = None
    return_job_id: str | None = None
    id: int | None = None

    @property
    def active(self) -> bool:
        return self.returned_at is None

    def overdue(self, now: float) -> bool:
        return self.returned_at is None and self.expires_at <= now

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id, "worker_group": self.worker_group, "worker_id": self.worker_id,
            "borrower": self.borrower, "reason": self.reason, "started_at": iso(self.started_at),
            "expires_at": iso(self.expires_at),
            "returned_at": None if self.returned_at is None else iso(self.returned_at),
            "active": self.active, "overdue": self.overdue(now),
            "job_id": self.job_id, "return_job_id": self.return_job_id,
        }


_COLUMNS = ("worker_group, worker_id, borrower, reason, started_at, expires_at, returned_at, job_id, "
            "return_job_id, id")


def _loan(r: Any) -> Loan:
    return Loan(*r)


class LoanTable:
    def __init__(self, db: Database):
        self._db = db

    def insert(self, loan: Loan) -> Deferred[Loan]:
        """Record a new active loan; L{AlreadyOnLoan} if the machine has one."""

        def run(c: Cursor) -> Loan:
            try:
                row = c.execute(
                    "INSERT INTO loans (worker_group, worker_id, borrower, reason, started_at, expires_at,"
                    " returned_at, job_id, return_job_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (loan.worker_group, loan.worker_id, loan.borrower, loan.reason, loan.started_at,
                     loan.expires_at, loan.returned_at, loan.job_id, loan.return_job_id)).fetchone()
            except integrity_errors():
                raise AlreadyOnLoan(f"{loan.worker_id} ({loan.worker_group}) is already on loan") from None
            return evolve(loan, id=row[0])

        return self._db.write(run)

    def active(self, worker_group: str, worker_id: str) -> Deferred[Loan | None]:
        def run(c: Cursor) -> Loan | None:
            r = c.execute(f"SELECT {_COLUMNS} FROM loans WHERE worker_group = ? AND worker_id = ?"
                          " AND returned_at IS NULL", (worker_group, worker_id)).fetchone()
            return None if r is None else _loan(r)

        return self._db.read(run)

    def close(self, loan_id: int, returned_at: float, return_job_id: str | None) -> Deferred[bool]:
        """Mark a loan returned; whether it was still active."""

        def run(c: Cursor) -> bool:
            c.execute("UPDATE loans SET returned_at = ?, return_job_id = ? WHERE id = ? AND returned_at IS NULL",
                      (returned_at, return_job_id, loan_id))
            return c.rowcount == 1

        return self._db.write(run)

    def list(self, *, active: bool | None = None, overdue_at: float | None = None,
             worker_group: str | None = None, worker_id: str | None = None,
             limit: int = 100, offset: int = 0) -> Deferred[builtins.list[Loan]]:
        """
        Loans, newest first.  C{overdue_at}: only active loans whose expiry
        is at or before that time.
        """
        w = Where()
        if active is True or overdue_at is not None:
            w.add("returned_at IS NULL")
        elif active is False:
            w.add("returned_at IS NOT NULL")
        if overdue_at is not None:
            w.add("expires_at <= ?", overdue_at)
        w.equal("worker_group", worker_group).equal("worker_id", worker_id)
        sql = f"SELECT {_COLUMNS} FROM loans{w.clause} ORDER BY id DESC LIMIT ? OFFSET ?"
        args = [*w.args, limit, offset]
        return self._db.read(lambda c: [_loan(r) for r in c.execute(sql, args).fetchall()])
