"""
C{roller batch}: one task over many machines, rolled out within limits,
from the command line.

    roller batch reboot --pool gecko-t-linux --max-concurrent 10 --max-per-pool 25% --stop-after-failures 3
    roller batch reboot --machine mdc1/m001 --machine mdc1/m002 --dry-run
    roller batch show ID | roller batch list | roller batch cancel ID [--running]

In process (like C{roller run}: the store, the job queue and the batch
service run in this process until the batch ends; for a database no roller
is serving) or against a running roller with C{--url URL} (L{roller.client}:
Hawk-signed with C{TASKCLUSTER_CLIENT_ID} / C{TASKCLUSTER_ACCESS_TOKEN}).

Without C{--yes} and on a terminal, the dry run (how many machines, which
pools, the limits) is shown and must be confirmed.  While the batch runs: a
progress bar redrawn on one line on a terminal, plain progress lines
otherwise; at the end a table of the members (machine, state, job, error).
Exit status: 0 every member succeeded; 1 some failed, or the batch was
halted or cancelled (or not confirmed); 2 bad usage or a request roller
refused (one readable line, never a traceback); 130 interrupted (Ctrl-C:
with C{--url} the batch keeps running on roller, and how to cancel it is
printed; in process it is cancelled).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from twisted.internet.defer import Deferred

from roller.config import Settings
from roller.jobs import PRIORITY_DEFAULT

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from roller.service import IRollerReactor

__all__ = ["add_parser", "cmd_batch"]

#: seconds between two polls of a running roller (C{--url})
POLL_INTERVAL = 0.5
#: seconds between two plain progress lines (not a terminal)
LINE_INTERVAL = 2.0
#: exit status when interrupted (Ctrl-C)
INTERRUPTED = 130
ACTIONS = ("show", "list", "cancel")


class BatchCliError(Exception):
    """A readable one-line message; exit status 2."""


def add_parser(sub: Any) -> None:
    """The C{batch} sub-command's arguments (C{sub}: the C{roller} parser's subparsers)."""
    b = sub.add_parser(
        "batch", help="run a task on many machines, rolled out within limits; show, list or cancel batches",
        description="roller batch TASK [selector] [rollout] runs TASK on every selected machine, at most "
                    "--max-concurrent at once and --max-per-pool of each pool; roller batch show ID, "
                    "roller batch list, roller batch cancel ID [--running].",
        epilog="Exit status: 0 every member succeeded; 1 members failed, or the batch was halted or "
               "cancelled; 2 bad usage; 130 interrupted.")
    b.add_argument("task", metavar="TASK", help="the task to run (or show, list, cancel)")
    b.add_argument("batch_id", nargs="?", metavar="ID", help="with show and cancel: the batch")
    add_request_arguments(b)
    b.add_argument("--dry-run", action="store_true", help="show the machines and the limits; start nothing")
    b.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation on a terminal")
    b.add_argument("--url", help="a running roller (default: run the batch in this process); Hawk credentials "
                                 "from TASKCLUSTER_CLIENT_ID and TASKCLUSTER_ACCESS_TOKEN")
    b.add_argument("--running", action="store_true", help="with cancel: also cancel the running jobs")
    b.add_argument("--limit", type=int, default=20, help="with list: how many (default 20)")
    b.add_argument("--json", action="store_true", help="print JSON (show, list, cancel, --dry-run)")


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that make a batch request: which machines, how, the task's parameters (C{roller actions} too)."""
    sel = p.add_argument_group("which machines (an explicit list, or a filter of at least one field)")
    sel.add_argument("--machine", action="append", default=[], metavar="GROUP/ID",
                     help="this machine (repeat; kept in this order)")
    sel.add_argument("--pool", help="machines of this pool")
    sel.add_argument("--group", help="machines of this worker group")
    sel.add_argument("--tag", action="append", default=[], metavar="TAG", help="machines with this tag (repeat: all)")
    sel.add_argument("--q", metavar="TEXT", help="machines whose worker id, fqdn or ip contains TEXT")
    sel.add_argument("--health", action="append", default=[], metavar="STATE",
                     help="machines in this health state (repeat: any)")
    sel.add_argument("--last-state", action="append", default=[], metavar="STATE",
                     help="machines whose last job ended in this state, or none (repeat: any)")
    sel.add_argument("--include-loaned", action="store_true", help="keep loaned machines (left out by default)")
    sel.add_argument("--include-maintenance", action="store_true",
                     help="keep machines in maintenance (left out by default)")
    ro = p.add_argument_group("how (left out: the batches.* settings)")
    ro.add_argument("--max-concurrent", metavar="N|N%", help="members in flight at once (none: no limit)")
    ro.add_argument("--max-per-pool", metavar="N|N%", help="machines of one pool in flight at once, a count or a "
                                                          "percentage of the pool (none: no limit)")
    ro.add_argument("--stop-after-failures", metavar="K", help="halt after K failed members (none: never)")
    ro.add_argument("--pause-between", metavar="S", help="seconds between two member starts")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="task parameter (VALUE parsed as JSON when it can be)")
    p.add_argument("--reason", default="", help="why (recorded with the batch and every job)")
    p.add_argument("--priority", type=int, default=PRIORITY_DEFAULT, help="job priority (higher runs first)")


# ---------------------------------------------------------------- the request


def _param(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise BatchCliError(f"--param {text!r}: expected NAME=VALUE")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def _limit(flag: str, text: str) -> int | str | None:
    value = text.strip()
    if value.lower() == "none":
        return None
    if value.isascii() and value.isdigit():
        return int(value)
    if value.endswith("%"):
        return value
    raise BatchCliError(f"{flag} {text!r}: expected a count (10), a percentage (25%) or none")


def _count(flag: str, text: str) -> int | None:
    value = text.strip()
    if value.lower() == "none":
        return None
    if not (value.isascii() and value.isdigit()):
        raise BatchCliError(f"{flag} {text!r}: expected a count or none")
    return int(value)


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The C{POST /api/v1/batches} body the flags ask for (validated by whoever receives it)."""
    selector: dict[str, Any] = {}
    if args.machine:
        machines = []
        for text in args.machine:
            group, sep, worker = text.partition("/")
            if not sep or not group or not worker:
                raise BatchCliError(f"--machine {text!r}: expected WORKER_GROUP/WORKER_ID")
            machines.append({"worker_group": group, "worker_id": worker})
        selector["machines"] = machines
    for name, value in (("pool", args.pool), ("group", args.group), ("q", args.q), ("tags", args.tag),
                        ("health", args.health), ("state", args.last_state)):
        if value:
            selector[name] = value
    if args.include_loaned:
        selector["include_loaned"] = True
    if args.include_maintenance:
        selector["include_maintenance"] = True
    rollout: dict[str, Any] = {}
    if args.max_concurrent is not None:
        rollout["max_concurrent"] = _limit("--max-concurrent", args.max_concurrent)
    if args.max_per_pool is not None:
        rollout["max_per_pool"] = _limit("--max-per-pool", args.max_per_pool)
    if args.stop_after_failures is not None:
        rollout["stop_after_failures"] = _count("--stop-after-failures", args.stop_after_failures)
    if args.pause_between is not None:
        try:
            rollout["pause_between"] = float(args.pause_between)
        except ValueError:
            raise BatchCliError(f"--pause-between {args.pause_between!r}: expected seconds") from None
    body: dict[str, Any] = {"task_name": args.task, "selector": selector,
                            "params": dict(_param(p) for p in args.param), "reason": args.reason,
                            "priority": args.priority}
    if rollout:
        body["rollout"] = rollout
    return body


# ---------------------------------------------------------------- where batches run


class Backend(Protocol):
    async def dry_run(self, body: dict[str, Any]) -> dict[str, Any]: ...
    async def create(self, body: dict[str, Any]) -> dict[str, Any]: ...
    async def view(self, batch_id: str, members: bool = True) -> dict[str, Any]: ...
    async def list(self, limit: int) -> list[dict[str, Any]]: ...
    async def cancel(self, batch_id: str, running: bool) -> dict[str, Any]: ...
    def changed(self, batch_id: str, listener: Callable[[], None]) -> Callable[[], None]: ...
    async def close(self) -> None: ...
    #: how an interruption leaves the batch: "cancel" (in process) or "leave" (it runs on roller)
    on_interrupt: str
    #: seconds between two looks at a running batch when nothing says it changed
    poll: float


class UrlBackend:
    """A running roller, over its REST API."""

    on_interrupt = "leave"
    poll = POLL_INTERVAL

    def __init__(self, client: Any):
        self.client = client

    async def dry_run(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(await self.client.request("POST", "/api/v1/batches?dry_run=true", body))

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(await self.client.request("POST", "/api/v1/batches", body))

    async def view(self, batch_id: str, members: bool = True) -> dict[str, Any]:
        query = "" if members else "?members=false"
        return dict(await self.client.request("GET", f"/api/v1/batches/{quote(batch_id, safe='')}{query}"))

    async def list(self, limit: int) -> list[dict[str, Any]]:
        return list((await self.client.request("GET", f"/api/v1/batches?limit={limit}"))["batches"])

    async def cancel(self, batch_id: str, running: bool) -> dict[str, Any]:
        query = "?running=cancel" if running else ""
        return dict(await self.client.request("DELETE", f"/api/v1/batches/{quote(batch_id, safe='')}{query}"))

    def changed(self, batch_id: str, listener: Callable[[], None]) -> Callable[[], None]:
        return lambda: None  # polled

    async def close(self) -> None:
        http = getattr(self.client, "http", None)
        pool = getattr(getattr(http, "_agent", None), "_pool", None)
        if pool is not None:
            await pool.closeCachedConnections()


class LocalBackend:
    """The store, a job queue and a batch service in this process."""

    on_interrupt = "cancel"
    poll = 1.0

    def __init__(self, reactor: IRollerReactor, settings: Settings):
        self.reactor = reactor
        self.settings = settings
        self.store: Any = None
        self.queue: Any = None
        self.service: Any = None
        self.tasks: Any = None
        self._lock: Any = None

    async def open(self, action: str = "show", batch_id: str | None = None) -> LocalBackend:
        """
        Open the store; to create or cancel a batch, first take the
        database's lock: a roller serving it would run the same machines'
        jobs beside this process, so that is refused (C{--url} runs it there).
        """
        from roller.batches.service import BatchService, rollout_defaults
        from roller.drivers.registry import make_drivers
        from roller.queue import JobQueue
        from roller.secrets import load_secrets
        from roller.service import queue_limits
        from roller.store.engine import is_postgresql, open_configured_store
        from roller.tasks import builtin_tasks

        s = self.settings
        if action in ("create", "cancel") and not is_postgresql(s):
            from roller.store.sqlite import DatabaseInUse, acquire_lock

            try:
                self._lock = acquire_lock(s.db_path, "roller batch")
            except DatabaseInUse as e:
                raise BatchCliError(f"{e}: to {action} a batch on the roller serving it, pass --url URL") from None
        self.store = await open_configured_store(s, self.reactor)
        self.tasks = builtin_tasks()
        self.queue = JobQueue(self.store, self.tasks, self.reactor, limits=queue_limits(s), settings=s,
                              secrets=load_secrets(s.secrets_file), drivers=make_drivers(self.reactor, s))
        self.service = BatchService(self.store, self.queue, self.tasks, self.reactor, defaults=rollout_defaults(s))
        # like `roller run`, the queue does not take over the database's queued jobs, and the service
        # follows only the batch it creates (or the one it cancels), not other unfinished ones
        await self.service.start(resume=[batch_id] if action == "cancel" and batch_id else False)
        return self

    def _request(self, body: dict[str, Any]) -> Any:
        from roller.batches.model import parse_request

        # like `roller run`, the command line may run any task, not only those allowed over REST
        return parse_request(body, tasks=self.tasks, allowed_tasks=self.tasks.names(),
                             defaults=self.service.defaults)

    async def dry_run(self, body: dict[str, Any]) -> dict[str, Any]:
        request = self._request(body)
        return dict(self.service.dry_run(request, await self.service.resolve(request)))

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        from roller.cli import _cli_actor
        from roller.store import AuditEntry

        request = self._request(body)
        actor = _cli_actor()

        def audit(batch: Any) -> AuditEntry:
            return AuditEntry(time=batch.created_at, actor=actor, action=f"batch.create:{batch.task_name}",
                              target=f"batch/{batch.id}", result=f"created {batch.id}: {batch.total} member(s)",
                              params={"params": batch.params, "selector": batch.selector.to_json(),
                                      "rollout": batch.rollout.to_json(), "priority": batch.priority,
                                      "reason": batch.reason})

        return dict(await self.service.create(request, requester=actor, audit=audit))

    async def view(self, batch_id: str, members: bool = True) -> dict[str, Any]:
        view = await self.service.view(batch_id, members=members)
        if view is None:
            raise BatchCliError(f"no batch {batch_id}")
        return dict(view)

    async def list(self, limit: int) -> list[dict[str, Any]]:
        batches, _ = await self.service.list(limit=limit)
        return list(batches)

    async def cancel(self, batch_id: str, running: bool) -> dict[str, Any]:
        from roller.cli import _cli_actor
        from roller.store import AuditEntry

        actor = _cli_actor()
        view = dict(await self.service.cancel(batch_id, by=actor, running=running))
        await self.store.audit.add(AuditEntry(time=self.reactor.seconds(), actor=actor, action="batch.cancel",
                                              target=f"batch/{batch_id}", result=f"{view.get('state')} {batch_id}",
                                              params={"running": running}))
        return view

    def changed(self, batch_id: str, listener: Callable[[], None]) -> Callable[[], None]:
        return self.service.subscribe(lambda changed_id: listener() if changed_id == batch_id else None)

    async def close(self) -> None:
        if self.service is not None:
            await self.service.stop()
        if self.queue is not None:
            await self.queue.stop("roller batch (in process) ended while the job was running")
        if self.service is not None:
            await self.service.flush()  # the members whose jobs' ends were recorded just now
            self.service.close()
        if self.store is not None:
            await self.store.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


# ---------------------------------------------------------------- output


def _machine(m: dict[str, Any]) -> str:
    return f"{m['worker_group']}/{m['worker_id']}"


def _pools(view: dict[str, Any]) -> str:
    pools = view.get("pools") or {}
    return ", ".join(f"{pool or '(no pool)'} {n}" for pool, n in pools.items()) or "none"


def _limits(view: dict[str, Any]) -> str:
    rollout, limits = view.get("rollout") or {}, view.get("limits") or {}
    parts = [f"at most {limits.get('max_concurrent')} at once"]
    if rollout.get("max_concurrent") is not None:
        parts[0] += f" (max_concurrent {rollout['max_concurrent']})"
    per_pool = limits.get("max_per_pool")
    if per_pool:
        shown = ", ".join(f"{pool or '(no pool)'} {n}" for pool, n in per_pool.items())
        parts.append(f"per pool {shown} (max_per_pool {rollout.get('max_per_pool')})")
    else:
        parts.append("no per-pool limit")
    stop = rollout.get("stop_after_failures")
    parts.append(f"halt after {stop} failed" if stop else "no circuit breaker")
    if rollout.get("pause_between"):
        parts.append(f"{rollout['pause_between']:g} s between starts")
    return "; ".join(parts)


def describe(view: dict[str, Any]) -> list[str]:
    """The lines that say what a batch (or a dry run) is: task, machines, pools, limits, who is left out."""
    lines = [f"{view['task_name']} on {view['total']} machine(s)", f"  pools:  {_pools(view)}",
             f"  limits: {_limits(view)}"]
    excluded = view.get("excluded") or []
    if excluded:
        reasons: dict[str, int] = {}
        for e in excluded:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
        lines.append(f"  left out: {len(excluded)} (" + ", ".join(f"{r} {n}" for r, n in reasons.items()) + ")")
    wave = view.get("first_wave")
    if wave:
        shown = ", ".join(_machine(m) for m in wave[:8]) + (f" and {len(wave) - 8} more" if len(wave) > 8 else "")
        lines.append(f"  first:  {shown}")
    return lines


def _counts(view: dict[str, Any]) -> dict[str, int]:
    return dict(view.get("counts") or {})


def progress_line(view: dict[str, Any], width: int = 30) -> str:
    c = _counts(view)
    total = int(view.get("total") or 0)
    done = total - c.get("pending", 0) - c.get("queued", 0) - c.get("running", 0)
    failed = c.get("failed", 0) + c.get("timed_out", 0) + c.get("interrupted", 0)
    filled = int(width * done / total) if total else width
    bar = "#" * filled + "-" * (width - filled)
    text = (f"[{bar}] {done}/{total} done, {c.get('running', 0)} running, {c.get('queued', 0)} queued, "
            f"{failed} failed")
    if c.get("skipped"):
        text += f", {c['skipped']} skipped"
    if c.get("cancelled"):
        text += f", {c['cancelled']} cancelled"
    if view.get("state") not in (None, "running"):
        text += f" ({view['state']})"
    return text


class Progress:
    """One redrawn line on a terminal; otherwise a plain line when something changed (every few seconds)."""

    def __init__(self, out: Any, tty: bool, clock: Any):
        self.out = out
        self.tty = tty
        self.clock = clock
        self.last_line = ""
        self.last_time: float | None = None
        self.drawn = False

    def update(self, view: dict[str, Any], final: bool = False) -> None:
        if self.tty:
            width = shutil.get_terminal_size((100, 24)).columns
            line = progress_line(view, width=max(10, min(40, width - 70)))[: width - 1]
            self.out.write("\r" + line + " " * max(0, len(self.last_line) - len(line)))
            self.out.flush()
            self.last_line, self.drawn = line, True
            return
        line = progress_line(view, width=20)
        now = self.clock.seconds()
        if line == self.last_line and not final:
            return
        if not final and self.last_time is not None and now - self.last_time < LINE_INTERVAL:
            return
        self.out.write(f"batch {view.get('batch_id')}: {line}\n")
        self.out.flush()
        self.last_line, self.last_time = line, now

    def end(self) -> None:
        if self.tty and self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False


def summary(view: dict[str, Any]) -> list[str]:
    """The members' table and the batch's outcome."""
    members = view.get("members") or []
    rows = [("MACHINE", "POOL", "STATE", "JOB", "ERROR")]
    for m in members:
        state = m["state"] + (" (joined)" if m.get("joined") else "")
        rows.append((_machine(m), m.get("pool") or "-", state, m.get("task_id") or "-",
                     (m.get("error") or "").replace("\n", " ")[:100]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [("  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths, strict=True)) + "  " + r[4]).rstrip()
             for r in rows]
    counts = ", ".join(f"{n} {state}" for state, n in _counts(view).items() if n)
    outcome = f"batch {view.get('batch_id')} {view.get('state')}: {counts or 'no members'}"
    if view.get("halt_reason"):
        outcome += f"; {view['halt_reason']}"
    return [*lines, outcome]


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------- the command


class _Waker:
    """Wait until something changed, a timeout passed or the user interrupted."""

    def __init__(self, clock: Any):
        self.clock = clock
        self.interrupted = False
        self._d: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None

    def wake(self) -> None:
        d, self._d = self._d, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if d is not None and not d.called:
            d.callback(None)

    def interrupt(self) -> None:
        self.interrupted = True
        self.wake()

    def wait(self, timeout: float) -> Deferred[None]:
        self._d = Deferred()
        self._timer = self.clock.callLater(timeout, self.wake)
        return self._d


async def _follow(backend: Backend, batch_id: str, progress: Progress, waker: _Waker, clock: Any) -> dict[str, Any]:
    """Show the batch's progress until it has finished or the user interrupts; its last view."""
    unsubscribe = backend.changed(batch_id, waker.wake)
    try:
        while True:
            view = await backend.view(batch_id, members=False)
            if view.get("finished") is not None or waker.interrupted:
                progress.update(view, final=True)
                return view
            progress.update(view)
            await waker.wait(backend.poll)
    finally:
        unsubscribe()


def _confirm(view: dict[str, Any], out: Any, stdin: Any) -> bool:
    out.write("\n".join(describe(view)) + "\n")
    out.write(f"Run {view['task_name']} on these {view['total']} machine(s)? [y/N] ")
    out.flush()
    try:
        answer = stdin.readline()
    except (EOFError, KeyboardInterrupt):
        answer = ""
    return answer.strip().lower() in ("y", "yes")


async def cmd_batch(reactor: IRollerReactor, settings: Settings, args: argparse.Namespace, out: Any,
                    stdin: Any = None, environ: Any = None) -> int:
    from roller.client import ApiError, ClientError, RollerClient
    from roller.errors import RollerError

    stdin = sys.stdin if stdin is None else stdin
    action = args.task if args.task in ACTIONS else "create"
    if action in ("show", "cancel") and not args.batch_id:
        raise BatchCliError(f"roller batch {action} needs the batch id: roller batch {action} ID")
    if action in ("create", "list") and args.batch_id:
        raise BatchCliError(f"unexpected argument {args.batch_id!r}" + (
            f" (roller batch {args.task} takes no batch id)" if action == "list" else
            " (machines are given with --machine GROUP/ID, filters with --pool, --group, --tag ...)"))
    if args.running and action != "cancel":
        raise BatchCliError("--running goes with roller batch cancel ID")
    body = request_body(args) if action == "create" else None
    backend: Any
    if args.url:
        try:
            backend = UrlBackend(RollerClient.from_env(reactor, args.url, environ))
        except ClientError as e:
            raise BatchCliError(str(e)) from None
    else:
        backend = LocalBackend(reactor, settings)
    try:
        if isinstance(backend, LocalBackend):
            await backend.open(action if action != "create" or not args.dry_run else "show", args.batch_id)
        if action == "show":
            view = await backend.view(args.batch_id)
            _print_view(view, args, out)
            return 0
        if action == "list":
            batches = await backend.list(max(1, min(args.limit, 1000)))
            if args.json:
                out.write(json.dumps(batches, indent=2) + "\n")
            for b in [] if args.json else batches:
                out.write(f"{b['batch_id']}  {b['created']}  {b['task_name']:<12} {b['state']:<10} "
                          f"{b['total']:>5} machine(s)  {b['requester']}  {b.get('halt_reason') or ''}\n".rstrip()
                          + "\n")
            if not args.json:
                out.write(f"{len(batches)} batch(es)\n")
            return 0
        if action == "cancel":
            view = await backend.cancel(args.batch_id, args.running)
            if args.json:
                out.write(json.dumps(view, indent=2) + "\n")
            else:
                out.write(f"batch {args.batch_id}: {view.get('state')}; {progress_line(view)}\n")
            return 0
        assert body is not None
        return await _create(reactor, backend, body, args, out, stdin)
    except ApiError as e:
        raise BatchCliError(f"roller answered {e}") from None
    except ClientError as e:
        raise BatchCliError(str(e)) from None
    except RollerError as e:
        raise BatchCliError(e.message) from None
    finally:
        await backend.close()


def _print_view(view: dict[str, Any], args: argparse.Namespace, out: Any) -> None:
    if args.json:
        out.write(json.dumps(view, indent=2) + "\n")
        return
    out.write(f"batch {view.get('batch_id')}: {view['state']}, created {view['created']} by {view['requester']}"
              + (f", finished {view['finished']}" if view.get("finished") else "") + "\n")
    out.write("\n".join(describe(view)) + "\n")
    out.write(progress_line(view) + "\n")
    out.write("\n".join(summary(view)) + "\n")


async def _create(reactor: IRollerReactor, backend: Any, body: dict[str, Any], args: argparse.Namespace,
                  out: Any, stdin: Any) -> int:
    if args.dry_run:
        view = await backend.dry_run(body)
        if args.json:
            out.write(json.dumps(view, indent=2) + "\n")
            return 0
        out.write("dry run: nothing started\n" + "\n".join(describe(view)) + "\n")
        for m in view.get("members") or []:
            out.write(f"  {_machine(m):<40} {m.get('pool') or '-'}\n")
        return 0
    if not args.yes and _is_tty(stdin):
        preview = await backend.dry_run(body)
        if not preview.get("total"):
            out.write("\n".join(describe(preview)) + "\n")
            raise BatchCliError("no machine to run on: nothing started")
        if not _confirm(preview, out, stdin):
            out.write("not confirmed: nothing started\n")
            return 1
    view = await backend.create(body)
    batch_id = view["batch_id"]
    out.write(f"batch {batch_id}: " + "\n".join(describe(view)) + "\n")
    out.flush()
    waker = _Waker(reactor)
    previous = _on_sigint(reactor, waker.interrupt)
    progress = Progress(out, _is_tty(out), reactor)
    try:
        view = await _follow(backend, batch_id, progress, waker, reactor)
        if waker.interrupted:
            progress.end()
            return await _interrupted(backend, batch_id, args, out, reactor, progress)
    finally:
        progress.end()
        _restore_sigint(previous)
    view = await backend.view(batch_id)
    out.write("\n".join(summary(view)) + "\n")
    return 0 if view.get("state") == "succeeded" else 1


async def _interrupted(backend: Any, batch_id: str, args: argparse.Namespace, out: Any, clock: Any,
                       progress: Progress) -> int:
    if backend.on_interrupt == "leave":
        url = args.url.rstrip("/")
        out.write(f"interrupted: batch {batch_id} keeps running on {url}.\n"
                  f"  follow it:  roller batch show {batch_id} --url {url}\n"
                  f"  cancel it:  roller batch cancel {batch_id} --url {url} [--running]\n")
        return INTERRUPTED
    out.write(f"interrupted: cancelling batch {batch_id} (members not started are skipped, its jobs cancelled)\n")
    out.flush()
    try:
        await backend.cancel(batch_id, True)
    except Exception as e:  # noqa: BLE001 -- it may have ended meanwhile (batch_finished)
        out.write(f"  {getattr(e, 'message', None) or e}\n")
    waker = _Waker(clock)
    view = await _follow(backend, batch_id, progress, waker, clock)
    progress.end()
    view = await backend.view(batch_id)
    out.write("\n".join(summary(view)) + "\n")
    return INTERRUPTED


def _on_sigint(reactor: Any, interrupt: Callable[[], None]) -> Any:
    """Ctrl-C calls C{interrupt} (in the reactor thread) instead of stopping the reactor; the previous handler."""
    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(interrupt)

    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (tests driving the command in a thread)
        return signal.getsignal(signal.SIGINT)


def _restore_sigint(previous: Any) -> None:
    if previous is None:  # a handler not installed from Python: leave ours (the process ends soon)
        return
    try:
        signal.signal(signal.SIGINT, previous)
    except ValueError:  # not the main thread
        pass
