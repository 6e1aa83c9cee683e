"""
C{roller db}: keep roller's database for years.

    roller db check [--quick] [--json]      # integrity, schema version against this roller's, rows per table
    roller db backup PATH [--overwrite]     # a consistent copy while roller runs (SQLite's online backup API)
    roller db restore PATH                  # refused while a roller runs on the database; the old file kept aside
    roller db prune [--dry-run] [--json]    # what history.* lets go (a running roller does it every prune_interval)
    roller db vacuum                        # rewrite the file once (roller stopped): pruning then shrinks it

Every one but C{check} refuses a database from a newer roller (one line,
naming both versions).

On PostgreSQL (C{database.url}), C{check} and C{prune} work the same;
C{backup}, C{restore} and C{vacuum} say in one line that PostgreSQL's own
tools do that (C{pg_dump}, C{pg_restore}, autovacuum).  Exit status: 0 done (C{check}: the database is
sound); 1 C{check} found a problem; 2 refused, with one line saying why.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any

from roller import __version__
from roller.config import Settings
from roller.store import sqlite as sq
from roller.store.db import StoreError, newer_schema_message
from roller.store.engine import database_login, database_target, is_postgresql, open_configured_store
from roller.store.retention import Pruner, RetentionPolicy
from roller.store.schema import MIGRATIONS

if TYPE_CHECKING:
    from roller.service import IRollerReactor

__all__ = ["add_parser", "cmd_db"]

#: seconds a C{roller db prune} waits between its transactions while a roller runs on the database,
#: so the roller's writes (waiting in SQLite's busy handler, which polls) get the lock in between
CLI_PRUNE_PAUSE = 0.02


def add_parser(sub: Any) -> None:
    """The C{db} sub-command's arguments (C{sub}: the C{roller} parser's subparsers)."""
    d = sub.add_parser("db", help="the database: check, backup, restore, prune, vacuum",
                       description="Keep roller's SQLite database: check it, back it up while roller runs, "
                                   "restore a backup (roller stopped), prune the history, vacuum it.")
    dsub = d.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    c = dsub.add_parser("check", help="integrity check, schema version against this roller's, rows per table")
    c.add_argument("--quick", action="store_true", help="PRAGMA quick_check instead of the full integrity_check")
    c.add_argument("--json", action="store_true")
    b = dsub.add_parser("backup", help="a consistent copy of the database in PATH (mode 0600), while roller runs")
    b.add_argument("path", metavar="PATH")
    b.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")
    b.add_argument("--json", action="store_true")
    r = dsub.add_parser("restore", help="replace the database with the backup PATH (refused while a roller runs)")
    r.add_argument("path", metavar="PATH")
    p = dsub.add_parser("prune", help="remove the history the history.* settings let go")
    p.add_argument("--dry-run", action="store_true", help="count what would go; change nothing")
    p.add_argument("--json", action="store_true")
    dsub.add_parser("vacuum", help="rewrite the file once (roller stopped): afterwards pruning shrinks it")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _show_check(report: sq.Check, out: Any) -> None:
    out.write(f"database {report.path}: {'ok' if report.ok else 'PROBLEMS'}\n")
    for problem in report.problems():
        out.write(f"  problem: {problem}\n")
    out.write(f"integrity: {'ok' if report.integrity == ['ok'] else 'FAILED'}\n")
    by = f", upgraded by roller {report.upgraded_by}" if report.upgraded_by else ""
    out.write(f"schema version {report.version}{by}; this roller ({__version__}) knows up to {report.known}\n")
    out.write(f"size {_mb(report.size)} ({report.pages} pages of {report.page_size} bytes, {report.free_pages} free);"
              f" auto_vacuum {report.auto_vacuum}\n")
    width = max((len(t) for t in report.counts), default=5)
    for table, n in report.counts.items():
        out.write(f"  {table:<{width}}  {n:>12,}\n" if n >= 0 else f"  {table:<{width}}  {'unreadable':>12}\n")


#: what C{roller db backup/restore/vacuum} say on PostgreSQL
PG_TOOLS = {
    "backup": "back it up with pg_dump (e.g. pg_dump -Fc -f roller.dump DBNAME), while rollers run",
    "restore": "restore a pg_dump archive with pg_restore (rollers stopped), e.g. pg_restore --clean -d DBNAME "
               "roller.dump",
    "vacuum": "PostgreSQL's autovacuum reclaims pruned rows by itself (VACUUM FULL rewrites tables, rollers stopped)",
}


def _pg_check(settings: Settings, args: argparse.Namespace, out: Any) -> int:
    from roller.store import pg

    login = database_login(settings)
    try:
        report = pg.check(database_target(settings), user=login.user, password=login.password)
    except pg.PgCheckError as e:
        raise StoreError(str(e)) from None
    problems = []
    if report["schema_version"] == 0:
        problems.append("not a roller database (no schema version)")
    elif report["schema_version"] > len(MIGRATIONS):
        problems.append(newer_schema_message(report["path"], report["schema_version"], report["upgraded_by"]))
    report.update(ok=not problems, problems=problems, roller_schema_version=len(MIGRATIONS),
                  roller_version=__version__, engine="postgresql")
    if args.json:
        out.write(json.dumps(report, indent=2) + "\n")
        return 0 if report["ok"] else 1
    out.write(f"database {report['path']}: {'ok' if report['ok'] else 'PROBLEMS'}\n")
    for problem in problems:
        out.write(f"  problem: {problem}\n")
    by = f", upgraded by roller {report['upgraded_by']}" if report["upgraded_by"] else ""
    out.write(f"schema version {report['schema_version']}{by}; this roller ({__version__}) knows up to "
              f"{len(MIGRATIONS)}\n")
    out.write(f"PostgreSQL {report['server_version']}; size {_mb(report['size'])} (pages are checked by the server; "
              "pg_amcheck checks indexes)\n")
    counts = report["counts"]
    width = max((len(t) for t in counts), default=5)
    for table, n in counts.items():
        out.write(f"  {table:<{width}}  {n:>12,}\n")
    return 0 if report["ok"] else 1


async def cmd_db(reactor: IRollerReactor, settings: Settings, args: argparse.Namespace, out: Any) -> int:
    path = settings.db_path
    action = args.db_command
    if is_postgresql(settings):
        if action == "check":
            return _pg_check(settings, args, out)
        if action in PG_TOOLS:
            raise StoreError(f"the database is PostgreSQL ({database_target(settings)}): {PG_TOOLS[action]}")
        return await _prune(reactor, settings, args, RetentionPolicy.from_settings(settings), 0.0, out)
    if action == "check":
        report = sq.check(path, quick=args.quick)
        if args.json:
            out.write(json.dumps(report.to_json(), indent=2) + "\n")
        else:
            _show_check(report, out)
        return 0 if report.ok else 1
    if action == "backup":
        done = sq.backup(path, args.path, overwrite=args.overwrite)
        if args.json:
            out.write(json.dumps({"path": done.path, "size": done.size, "pages": done.pages,
                                  "seconds": round(done.seconds, 3), "steps": done.steps, "restarts": done.restarts,
                                  "schema_version": done.check.version, "counts": done.check.counts}, indent=2) + "\n")
        else:
            out.write(f"backup {done.path}: {_mb(done.size)} in {done.seconds:.1f} s ({done.steps} step(s)); "
                      f"quick_check ok; schema version {done.check.version}; "
                      f"{done.check.counts.get('jobs', 0):,} jobs\n")
        return 0
    if action == "restore":
        def checked(report: sq.Check) -> None:
            out.write(f"backup {os.path.abspath(args.path)}: integrity ok, schema version {report.version}, "
                      f"{report.counts.get('jobs', 0):,} jobs, {report.counts.get('machines', 0):,} machines\n")

        restored = sq.restore(args.path, path, now=reactor.seconds(), on_checked=checked)
        if restored.aside:
            out.write(f"the database it replaced is kept as {restored.aside} (with its -wal, if any)\n")
        out.write(f"restored into {path}; start roller (it upgrades an older schema at start)\n")
        return 0
    if action == "vacuum":
        before, after = sq.vacuum_file(path)
        out.write(f"vacuumed {path}: {_mb(before)} -> {_mb(after)}; incremental auto-vacuum on: pruning now "
                  "shrinks the file\n")
        return 0
    # prune
    sq.check_schema(path)
    policy = RetentionPolicy.from_settings(settings)
    try:  # no roller runs on the database: no pause needed, and none starts meanwhile
        lock = sq.acquire_lock(path, "roller db prune")
        pause = 0.0
    except sq.DatabaseInUse:  # a roller runs: its writes go between the transactions
        lock, pause = None, CLI_PRUNE_PAUSE
    try:
        return await _prune(reactor, settings, args, policy, pause, out)
    finally:
        if lock is not None:
            lock.release()


async def _prune(reactor: IRollerReactor, settings: Settings, args: argparse.Namespace, policy: RetentionPolicy,
                 pause: float, out: Any) -> int:
    store = await open_configured_store(settings, reactor)
    try:
        pruner = Pruner(store.db, clock=reactor, pause=pause)
        now = reactor.seconds()
        if args.dry_run:
            counts = await pruner.count(policy, now)
            if args.json:
                out.write(json.dumps({"dry_run": True, "counts": counts}, indent=2) + "\n")
            else:
                for kind, n in counts.items():
                    out.write(f"  {kind.replace('_', ' '):<20} {n:>12,}\n")
                out.write(f"(dry run) would remove {sum(counts.values()):,} row(s); nothing changed\n")
            return 0
        pruned = await pruner.prune(policy, now)
    finally:
        await store.close()
    if args.json:
        out.write(json.dumps(pruned.to_json(), indent=2) + "\n")
    else:
        for kind, n in pruned.counts.items():
            out.write(f"  {kind.replace('_', ' '):<20} {n:>12,}\n")
        out.write(pruned.summary() + "\n")
    return 0
