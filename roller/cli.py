"""
The C{roller} command: run a task now, import legacy inventory, list
machines and jobs.  It works on the same database and secrets file as the
daemon (settings resolved the same way: --config, ROLLER_*, options).

    roller run ping demo-1              # the seed's `manage.py ping host`
    roller import ipmi.json --group mdc1
    roller machines --group mdc1
    roller jobs --state failed
    roller user add alice --role operator   # dashboard accounts: add, passwd, remove, list
    roller actions --url https://roller.example.com   # Taskcluster worker action definitions
    roller config [queue]               # every setting: type, default, environment variable, meaning
    roller batch reboot --pool P --max-concurrent 10 --max-per-pool 25%   # see roller.batch_cli
    roller db check | backup PATH | restore PATH | prune [--dry-run] | vacuum   # see roller.db_cli
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from roller import batch_cli, db_cli
from roller.auth.accounts import ROLES, check_password_policy, check_user_name, hash_password
from roller.config import ConfigError, Settings, check_names, load_settings
from roller.errors import RollerError
from roller.inventory import REBOOT_METHODS
from roller.jobs import JobEvent, State, iso
from roller.json_input import JSONInputError, load_json
from roller.legacy_import import ImportFormatError, plan_import
from roller.queue import JobQueue
from roller.secrets import SecretsError, load_secrets, write_secrets
from roller.store import AuditEntry, IStoreReactor, Store, StoreError
from roller.store.engine import open_configured_store
from roller.store.users import NoSuchUser, UserExists
from roller.tasks import builtin_tasks

if TYPE_CHECKING:
    from roller.service import IRollerReactor


class CliError(Exception):
    """A readable message; exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="roller", description="roller, the Release Operations Controller")
    p.add_argument("--config", help="TOML configuration file (default $ROLLER_CONFIG)")
    p.add_argument("--db", help="SQLite database (default STATE_DIR/roller.db)")
    p.add_argument("--state-dir", help="state directory (default ./state)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one task on one machine now, in this process, and show its log")
    run.add_argument("task")
    run.add_argument("worker_id")
    run.add_argument("--group", help="worker group (needed when the worker id is in several)")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="task parameter (VALUE parsed as JSON when it can be)")
    run.add_argument("--reason", default="", help="why (recorded with the job)")

    imp = sub.add_parser("import", help="import a legacy inventory file (ipmi.json, xen.json, WORKER_CONFIG)")
    imp.add_argument("file")
    imp.add_argument("--group", default="legacy", help="worker group for new machines (default legacy)")
    imp.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")
    imp.add_argument("--json", action="store_true", help="print the report as JSON")

    m = sub.add_parser("machines", help="list machines; or set a machine's maintenance flag")
    m.add_argument("worker_id", nargs="?", help="with --maintenance: the machine")
    m.add_argument("--group")
    m.add_argument("--pool")
    m.add_argument("--search", "-q")
    m.add_argument("--limit", type=int, default=1000)
    m.add_argument("--json", action="store_true")
    m.add_argument("--maintenance", choices=("on", "off"),
                   help="put WORKER_ID in maintenance (never remediated) or take it out")
    m.add_argument("--reason", default="", help="why (with --maintenance; recorded and audited)")

    hl = sub.add_parser("health", help="fleet health: machines by pool and state, the sick ones and why; "
                                       "pause or resume remediation")
    hl.add_argument("action", nargs="?", choices=("show", "pause", "resume"), default="show")
    hl.add_argument("--pool", help="only this pool")
    hl.add_argument("--all", action="store_true", help="list every machine, not only those with findings")
    hl.add_argument("--json", action="store_true")

    sub.add_parser("simulate", help="run a fleet of simulated machines (SSH servers that really reboot); "
                                    "see `roller simulate --help`")

    a = sub.add_parser("audit", help="the audit log, newest first")
    a.add_argument("--target", help="only entries about GROUP/WORKER_ID")
    a.add_argument("--limit", type=int, default=50)
    a.add_argument("--json", action="store_true")

    u = sub.add_parser("user", help="dashboard accounts: add, passwd, remove, list")
    usub = u.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    ua = usub.add_parser("add", help="add an account (asks for the password twice)")
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=ROLES,
                    help="viewer: read; operator: also run tasks and cancel jobs; admin: everything")
    ua.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    up = usub.add_parser("passwd", help="set an account's password (ends its sessions, clears its lock)")
    up.add_argument("name")
    up.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    ur = usub.add_parser("remove", help="remove an account (and end its sessions)")
    ur.add_argument("name")
    ul = usub.add_parser("list", help="list accounts (names, roles; never password hashes)")
    ul.add_argument("--json", action="store_true")

    ac = sub.add_parser("actions", help="print the Taskcluster worker actions (JSON) for the allowed tasks")
    ac.add_argument("--url", help="roller's public URL for the action URLs (default server.public_url)")
    ac.add_argument("--register", metavar="PROVISIONER_ID",
                    help="also declare them with queue.declareProvisioner (gone since Taskcluster v107)")
    ac.add_argument("--credential", default="taskcluster",
                    help="secrets file credential (type password: client id, access token) for --register")
    ac.add_argument("--batch", metavar="TASK",
                    help="instead: print a Taskcluster hook (hooks.createHook body) whose task creates a batch "
                         "of TASK on the machines the selector flags name")
    ac.add_argument("--task-queue", default="proj-releng/roller-hooks",
                    help="with --batch: the hook task's queue (a worker with taskcluster-proxy and docker)")
    ac.add_argument("--owner", help="with --batch: the hook's owner e-mail (default roller@ROLLER_HOST)")
    batch_cli.add_request_arguments(ac)

    c = sub.add_parser("config", help="every setting: its type, default, environment variable and meaning")
    c.add_argument("--json", action="store_true", help="print the list as JSON (with the values in effect)")
    c.add_argument("key", nargs="*", help="only these keys, or the keys of these sections (e.g. queue)")

    j = sub.add_parser("jobs", help="list jobs, newest first")
    j.add_argument("--state", help="comma-separated states: " + ",".join(s.value for s in State))
    j.add_argument("--worker")
    j.add_argument("--task")
    j.add_argument("--limit", type=int, default=50)
    j.add_argument("--json", action="store_true")

    batch_cli.add_parser(sub)  # roller batch TASK ... | show ID | list | cancel ID
    db_cli.add_parser(sub)  # roller db check | backup PATH | restore PATH | prune [--dry-run] | vacuum
    return p


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config, None, {"database.path": args.db, "state_dir": args.state_dir})
    check_names(settings, tasks=builtin_tasks().names(), reboot_methods=REBOOT_METHODS)
    return settings


def _cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid
        return f"cli:uid-{os.getuid()}"


def _param(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise CliError(f"--param {text!r}: expected NAME=VALUE")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


async def _with_store(reactor: IStoreReactor, settings: Settings, fn: Callable[[Store], Awaitable[int]]) -> int:
    store = await open_configured_store(settings, reactor)
    try:
        return await fn(store)
    finally:
        await store.close()


async def cmd_run(reactor: IRollerReactor, settings: Settings, args: argparse.Namespace, out: Any) -> int:
    params = dict(_param(p) for p in args.param)

    async def go(store: Store) -> int:
        if args.group:
            machine = await store.machines.get(args.group, args.worker_id)
            machines = [machine] if machine else []
        else:
            machines = await store.machines.by_worker_id(args.worker_id)
        if not machines:
            raise CliError(f"no machine {args.worker_id}" + (f" in group {args.group}" if args.group else ""))
        if len(machines) > 1:
            raise CliError(f"{args.worker_id} is in several groups "
                           f"({', '.join(m.worker_group for m in machines)}): pass --group")
        tasks = builtin_tasks()
        if args.task not in tasks:
            raise CliError(f"unknown task {args.task!r} (known: {', '.join(tasks.names())})")
        queue = JobQueue(store, tasks, reactor, secrets=load_secrets(settings.secrets_file))

        def show(job: Any, event: JobEvent) -> None:
            if event.kind == "log":
                out.write(f"  {event.message}\n")
            else:
                out.write(f"[{job.state.value}] {event.message}\n")
            out.flush()

        queue.subscribe(show)
        job, _ = await queue.submit(args.task, machines[0], params=params, requester="cli", reason=args.reason)
        final = await queue.wait(job.id)
        assert final is not None  # submitted by this queue
        out.write(f"job {final.id}: {final.state.value}\n")
        return 0 if final.state is State.succeeded else 1

    return await _with_store(reactor, settings, go)


async def cmd_import(reactor: IRollerReactor, settings: Settings, args: argparse.Namespace, out: Any) -> int:
    try:
        with open(args.file, "rb") as f:
            data = load_json(f.read())
    except OSError as e:
        raise CliError(f"cannot read {args.file}: {e.strerror}") from None
    except JSONInputError as e:
        raise CliError(f"{args.file} is not valid JSON: {e}") from None

    async def go(store: Store) -> int:
        existing = {m.key: m for m in await store.machines.list(limit=10**9)}
        plan = plan_import(data, existing, args.group)
        secrets = load_secrets(settings.secrets_file)
        merged = secrets.merged(plan.credentials) if plan.credentials else secrets
        if not args.dry_run:
            if plan.credentials:
                write_secrets(settings.secrets_file, merged)
            await store.machines.put_many(list(plan.machines()))
            await store.audit.add(AuditEntry(
                time=reactor.seconds(), actor=_cli_actor(), action="machines.import", target=None,
                params={"file": os.path.basename(args.file), "group": args.group, "counts": plan.counts(),
                        "credentials": sorted(plan.credentials)},
                result=plan.summary(),
            ))
        if args.json:
            out.write(json.dumps(plan.to_json(), indent=2) + "\n")
        else:
            for e in plan.entries:
                name = f"{e.machine.worker_group}/{e.machine.worker_id}" if e.machine else ""
                out.write(f"{e.action:<10} {e.source_key:<40} {name}{'  ' if name else ''}{e.reason}\n")
            out.write(("(dry run) " if args.dry_run else "") + plan.summary() + "\n")
        return 1 if any(e.action == "rejected" for e in plan.entries) else 0

    return await _with_store(reactor, settings, go)


async def cmd_machines(reactor: IRollerReactor, settings: Settings, args: argparse.Namespace, out: Any) -> int:
    if args.maintenance is not None:
        return await _maintenance(reactor, settings, args, out)
    if args.worker_id is not None:
        raise CliError("a worker id is given only with --maintenance on|off")

    async def go(store: Store) -> int:
        machines = await store.machines.list(worker_group=args.group, pool=args.pool, q=args.search,
                                             limit=args.limit)
        if args.json:
            out.write(json.dumps([m.to_json() for m in machines], indent=2) + "\n")
            return 0
        for m in machines:
            methods = ",".join(k for k in ("ssh", "ipmi", "pdu", "redfish", "xen") if getattr(m, k))
            out.write(f"{m.worker_group:<16} {m.worker_id:<32} {m.address or '-':<24} "
                      f"{m.pool or '-':<16} {methods or '-'}\n")
        out.write(f"{len(machines)} machine(s)\n")
        return 0

    return await _with_store(reactor, settings, go)


async def _maintenance(reactor: IRollerReactor, settings: Settings, args: argparse.Namespace, out: Any) -> int:
    if not args.worker_id:
        raise CliError("--maintenance needs the machine: roller machines WORKER_ID --maintenance on|off")
    if len(args.reason) > 1000:
        raise CliError("--reason must be at most 1000 characters")
    on = args.maintenance == "on"

    async def go(store: Store) -> int:
        found = await store.machines.by_worker_id(args.worker_id)
        if args.group is not None:
            found = [m for m in found if m.worker_group == args.group]
        if not found:
            raise CliError(f"no machine {args.worker_id[:100]!r}" + (f" in group {args.group!r}" if args.group else ""))
        if len(found) > 1:
            raise CliError(f"{args.worker_id} is in several groups ({', '.join(m.worker_group for m in found)}): "
                           "say which with --group")
        machine = found[0]
        actor = _cli_actor()
        text = f"{actor}: {args.reason}" if args.reason else actor
        now = reactor.seconds()
        await store.health.set_maintenance(machine.key, on, text, now)
        await store.audit.add(AuditEntry(time=now, actor=actor, action="machine.maintenance",
                                         target=f"{machine.worker_group}/{machine.worker_id}",
                                         result=args.maintenance, params={"reason": args.reason}))
        out.write(f"{machine.worker_group}/{machine.worker_id}: maintenance {args.maintenance}"
                  + (" (a running roller picks it up within health.tick seconds)\n"))
        return 0

    return await _with_store(reactor, settings, go)


async def cmd_health(reactor: IRollerReactor, settings: Settings, args: argparse.Namespace, out: Any) -> int:
    async def go(store: Store) -> int:
        actor = _cli_actor()
        if args.action in ("pause", "resume"):
            await store.health.set_flag("remediation_paused", actor if args.action == "pause" else "")
            await store.audit.add(AuditEntry(time=reactor.seconds(), actor=actor, action=f"health.{args.action}",
                                             target="health", result=f"remediation {args.action}d"))
            out.write(f"remediation {args.action}d (a running roller stops or starts within health.tick seconds)\n")
            return 0
        pools = {m.key: m.pool or "" for m in store.machines.snapshot()}
        rows = [r for r in await store.health.all() if (r.worker_group, r.worker_id) in pools
                and (args.pool is None or pools[(r.worker_group, r.worker_id)] == args.pool)]
        paused = await store.health.flag("remediation_paused")
        if args.json:
            out.write(json.dumps({"paused": bool(paused), "paused_by": paused or None, "machines": [
                {"worker_group": r.worker_group, "worker_id": r.worker_id,
                 "pool": pools[(r.worker_group, r.worker_id)], "state": r.state, "since": iso(r.since),
                 "maintenance": r.maintenance, "findings": list(r.findings)} for r in rows]}, indent=2) + "\n")
            return 0
        counts: dict[str, dict[str, int]] = {}
        for r in rows:
            by = counts.setdefault(pools[(r.worker_group, r.worker_id)], {})
            by[r.state] = by.get(r.state, 0) + 1
        out.write(f"remediation {'paused by ' + paused if paused else 'not paused'}\n")
        for pool, by in sorted(counts.items()):
            out.write(f"{pool or '(no pool)':<24} " + "  ".join(f"{k} {v}" for k, v in sorted(by.items())) + "\n")
        unseen = len(pools) - len(rows) if args.pool is None else 0
        if unseen > 0:
            out.write(f"{unseen} machine(s) not checked yet\n")
        for r in sorted(rows, key=lambda r: (r.state == "healthy", r.worker_group, r.worker_id)):
            if not args.all and not r.findings and r.state == "healthy":
                continue
            why = "; ".join(f"{f['kind']}: {f['detail']}" for f in r.findings) or "-"
            out.write(f"{r.worker_group}/{r.worker_id:<32} {r.state:<12} since {iso(r.since)}  {why}\n")
        return 0

    return await _with_store(reactor, settings, go)


async def cmd_jobs(reactor: IRollerReactor, settings: Settings, args: argparse.Namespace, out: Any) -> int:
    states = []
    for name in (args.state or "").split(","):
        if name and name not in State.__members__:
            raise CliError(f"--state: {name!r} is not one of {', '.join(State.__members__)}")
        if name:
            states.append(State(name))

    async def go(store: Store) -> int:
        jobs = await store.jobs.list(worker_id=args.worker, task_name=args.task, states=states, limit=args.limit)
        if args.json:
            out.write(json.dumps([j.to_json() for j in jobs], indent=2) + "\n")
            return 0
        for j in jobs:
            outcome = j.result if j.error is None else j.error
            out.write(f"{iso(j.created_at)}  {j.id}  {j.task_name:<12} {j.worker_group}/{j.worker_id:<24} "
                      f"{j.state.value:<11} {outcome or ''}\n")
        out.write(f"{len(jobs)} job(s)\n")
        return 0

    return await _with_store(reactor, settings, go)


async def cmd_audit(reactor: IRollerReactor, settings: Settings, args: argparse.Namespace, out: Any) -> int:
    async def go(store: Store) -> int:
        entries = await store.audit.list(target=args.target, limit=args.limit)
        if args.json:
            out.write(json.dumps([e.to_json() for e in entries], indent=2) + "\n")
            return 0
        for e in entries:
            out.write(f"{iso(e.time)}  {e.actor:<24} {e.source_ip or '-':<15} {e.action:<22} "
                      f"{e.target or '-':<32} {e.result}\n")
        out.write(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}\n")
        return 0

    return await _with_store(reactor, settings, go)


def _read_password(args: argparse.Namespace, stdin: Any) -> str:
    if args.password_stdin:
        password = stdin.readline().rstrip("\r\n")
    else:
        try:
            password = getpass.getpass(f"Password for {args.name}: ")
            if getpass.getpass("The same password again: ") != password:
                raise CliError("the two passwords differ; nothing changed")
        except (EOFError, KeyboardInterrupt):
            raise CliError("no password given; nothing changed") from None
    try:
        return check_password_policy(password)
    except RollerError as e:
        raise CliError(e.message) from None


async def cmd_user(reactor: IRollerReactor, settings: Settings, args: argparse.Namespace, out: Any,
                   stdin: Any = None) -> int:
    stdin = sys.stdin if stdin is None else stdin
    action = args.user_command
    if action != "list":
        try:
            check_user_name(args.name)
        except RollerError as e:
            raise CliError(e.message) from None
    password = _read_password(args, stdin) if action in ("add", "passwd") else ""  # only they use it

    async def go(store: Store) -> int:
        now = reactor.seconds()
        if action == "list":
            users = await store.users.list()
            if args.json:
                out.write(json.dumps([{"name": u.name, "role": u.role, "created": iso(u.created_at),
                                       "updated": iso(u.updated_at),
                                       "locked_until": iso(u.locked_until) if u.locked_until > now else None}
                                      for u in users], indent=2) + "\n")
                return 0
            for u in users:
                lock = f"  locked until {iso(u.locked_until)}" if u.locked_until > now else ""
                out.write(f"{u.name:<32} {u.role:<9} created {iso(u.created_at)}{lock}\n")
            out.write(f"{len(users)} user(s)\n")
            return 0
        target = f"user:{args.name}"
        if action == "add":
            try:
                await store.users.add(args.name, args.role, hash_password(password), now)
            except UserExists:
                raise CliError(f"user {args.name} exists already (change its password with "
                               f"`roller user passwd {args.name}`)") from None
            params, result = {"role": args.role}, f"created {args.role}"
        elif action == "passwd":
            try:
                await store.users.set_password(args.name, hash_password(password), now)
            except NoSuchUser:
                raise CliError(f"no user {args.name}") from None
            params, result = {}, "password changed, sessions ended"
        else:
            try:
                await store.users.remove(args.name)
            except NoSuchUser:
                raise CliError(f"no user {args.name}") from None
            params, result = {}, "removed"
        await store.audit.add(AuditEntry(time=now, actor=_cli_actor(), action=f"user.{action}", target=target,
                                         params=params or None, result=result))
        out.write(f"user {args.name}: {result}\n")
        return 0

    return await _with_store(reactor, settings, go)


async def cmd_actions(reactor: IRollerReactor, settings: Settings, args: argparse.Namespace, out: Any) -> int:
    from roller.actions import ActionsError, action_definitions, register

    if args.batch:
        return _batch_hook(settings, args, out)
    try:
        actions = action_definitions(builtin_tasks(), settings.allowed_tasks, args.url or settings.public_url)
        out.write(json.dumps(actions, indent=2) + "\n")
        if args.register:
            if not settings.auth_root_url:
                raise CliError("--register needs auth.root_url (the Taskcluster deployment)")
            cred = load_secrets(settings.secrets_file).get(args.credential)
            if not cred.username or not cred.password:
                raise CliError(f"credential {args.credential!r} must be of type password "
                               "(username = client id, password = access token)")
            out.write(await register(reactor, settings.auth_root_url, args.register, actions,
                                     cred.username, cred.password) + "\n")
    except ActionsError as e:
        raise CliError(str(e)) from None
    except KeyError as e:  # UnknownCredential
        raise CliError(str(e)) from None
    return 0


def _batch_hook(settings: Settings, args: argparse.Namespace, out: Any) -> int:
    from urllib.parse import urlsplit

    from roller.actions import ActionsError, batch_hook, hook_scopes
    from roller.batches.model import parse_request

    args.task = args.batch
    body = batch_cli.request_body(args)
    parse_request(body, tasks=builtin_tasks(), allowed_tasks=settings.allowed_tasks)  # RollerError: one line
    public_url = args.url or settings.public_url
    owner = args.owner or f"roller@{urlsplit(public_url).hostname or 'localhost'}"
    try:
        hook = batch_hook(body, public_url, task_queue=args.task_queue, scope_prefix=settings.scope_prefix,
                          owner=owner)
    except ActionsError as e:
        raise CliError(str(e)) from None
    out.write(json.dumps(hook, indent=2) + "\n")
    needs = [*hook_scopes(body, settings.scope_prefix), f"queue:create-task:lowest:{args.task_queue}",
             "queue:scheduler-id:-"]
    sys.stderr.write(f"# the hook's role (hook-id:GROUP/ID) needs: {', '.join(needs)}\n")
    return 0


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


async def cmd_config(reactor: IRollerReactor, settings: Settings, args: argparse.Namespace, out: Any) -> int:
    from roller.config import describe

    entries = describe(settings)
    if args.key:
        wanted = set(args.key)
        entries = [e for e in entries if e["key"] in wanted or e["key"].split(".")[0] in wanted]
        known = {e["key"] for e in entries} | {e["key"].split(".")[0] for e in entries}
        unknown = sorted(wanted - known)
        if unknown:
            raise CliError(f"unknown setting(s) {', '.join(unknown)} (`roller config` lists them all)")
    if args.json:
        out.write(json.dumps(entries, indent=2, default=str) + "\n")
        return 0
    for e in entries:
        default = e["default"]
        shown = default if isinstance(default, str) and "{state_dir}" in default else _toml_value(default)
        if isinstance(default, str):
            default = default.replace("{state_dir}", settings.state_dir)
        out.write(f"{e['key']} = {shown}\n    {e['help']}\n    type: {e['type']}; environment: {e['env']}")
        if e["value"] != default:
            out.write(f"; in effect: {_toml_value(e['value'])}")
        out.write("\n")
    return 0


COMMANDS = {"health": cmd_health, "config": cmd_config, "run": cmd_run, "import": cmd_import,
            "machines": cmd_machines, "jobs": cmd_jobs, "audit": cmd_audit, "user": cmd_user, "actions": cmd_actions,
            "batch": batch_cli.cmd_batch, "db": db_cli.cmd_db}


async def execute(reactor: IRollerReactor, args: argparse.Namespace, out: Any, err: Any) -> int:
    """Run the parsed command on a running reactor; its exit status (errors as one line on C{err})."""
    try:
        settings = _settings(args)
        return await COMMANDS[args.command](reactor, settings, args, out)
    except (CliError, ConfigError, SecretsError, StoreError, ImportFormatError, RollerError,
            batch_cli.BatchCliError) as e:
        err.write(f"roller {args.command}: {getattr(e, 'message', None) or e}\n")
        return 2


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:
        from roller.sim.fleet import main as fleet_main

        raise SystemExit(fleet_main(argv[1:]))
    args = _parser().parse_args(argv)

    async def run(reactor: IRollerReactor) -> None:
        code = await execute(reactor, args, sys.stdout, sys.stderr)
        if code:
            raise SystemExit(code)

    react(lambda reactor: ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
