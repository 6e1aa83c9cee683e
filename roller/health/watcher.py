"""
The health watcher: one per roller, in the reactor.

  - a L{LivenessSweep} probes every machine (in-process ICMP where the
    kernel allows it, else the C{ping} binary; TCP for machines whose
    liveness is a port) and feeds the L{HealthTracker};
  - every C{health.tc_interval} seconds a L{FitnessPoller} asks Taskcluster
    about each pool that maps to a worker pool; a pool it cannot ask gets
    C{unknown} findings, never stale ones;
  - each change of state is written down (the machine's row and a
    transition, never one row per probe), counted in the metrics and handed
    to the notifier;
  - every C{health.tick} seconds, when C{health.remediate} is on and
    remediation is not paused, L{plan} picks remediations within the rails,
    each submitted as an ordinary job (requester C{roller/health}, a reason
    naming the finding, audited) — or, for a dry-run policy, only recorded.

With several rollers on one database (L{roller.cluster}), each probes,
polls, records and remediates only its share of the fleet, and every tick
reads the others' machines and remediations from the database, so its API
and dashboard show the whole fleet and the rails count every roller's
remediations (L{roller.health.division}).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from roller.config import ConfigError, Settings
from roller.drivers.liveness import IcmpPing, ILiveness, LivenessResult, TcpConnect
from roller.drivers.reactor import IDriverReactor
from roller.errors import RollerError
from roller.health.division import Division, HealthCluster
from roller.health.fitness import FitnessPoller, FitnessRules
from roller.health.icmp import IcmpEcho, IcmpReactor
from roller.health.model import Health, HealthTracker, MachineHealth, Transition
from roller.health.policy import Action, Policy, Remediation, parse_policies, plan
from roller.health.sweep import LivenessSweep
from roller.http_client import close_pool, pooled_client
from roller.inventory import Machine
from roller.quarantine import QuarantineError, worker_pool
from roller.queue import JobQueue
from roller.store import AuditEntry, Store, StoreError
from roller.store.health import TransitionRow
from roller.taskcluster.http import TaskclusterError, TaskclusterHttp

__all__ = ["HealthWatcher", "REQUESTER", "policies_from_settings"]

log = Logger()

REQUESTER = "roller/health"
PAUSED_FLAG = "remediation_paused"

Key = tuple[str, str]


class _Notifier(Protocol):
    def health_transition(self, worker_group: str, worker_id: str, old: str, new: str, reason: str,
                          kinds: Iterable[str] = ()) -> None: ...


def policies_from_settings(settings: Settings, tasks: Iterable[str]) -> tuple[Policy, ...]:
    """The C{[[health.policies]]} of the settings; one-line L{ConfigError} naming the key when bad."""
    try:
        return parse_policies(list(settings.health_policies), tasks)
    except ValueError as e:
        raise ConfigError("health.policies", str(e)) from None


class IHealthReactor(IDriverReactor, IcmpReactor):
    """What the watcher uses: the drivers' reactor (TCP and ping probes, Taskcluster) and a reader (ICMP)."""


class HealthWatcher:
    def __init__(self, reactor: IHealthReactor, store: Store, queue: JobQueue, settings: Settings, *,
                 policies: tuple[Policy, ...] = (),
                 credential: Callable[[str], tuple[str, str] | None] = lambda name: None,
                 notifier: _Notifier | None = None, metrics: Any = None,
                 probe: Callable[[Machine], Deferred[LivenessResult]] | None = None,
                 cluster: HealthCluster | None = None):
        self.reactor = reactor
        self.cluster = cluster
        self._rem_ids: dict[int, int] = {}  # history index -> remediation id (several rollers)
        self.clock: IReactorTime = reactor
        self.store = store
        self.queue = queue
        self.settings = settings
        self.policies = policies
        self.credential = credential
        self.notifier = notifier
        self.metrics = metrics
        self.paused = False
        self.paused_by = ""
        self.tracker = HealthTracker(reactor, down_after=settings.health_down_after,
                                     on_transition=self._transition)
        #: several rollers: this roller's share of the fleet
        self.division = Division(cluster, store, self.tracker) if cluster is not None else None
        self._icmp: IcmpEcho | None = None
        self._probe = probe or self._default_probe
        self.sweep = LivenessSweep(reactor, self._swept, self._probe, self._probed,
                                   interval=settings.health_sweep_interval,
                                   concurrency=settings.health_sweep_concurrency,
                                   skip=(lambda m: not self._owns(m.key)) if cluster is not None else None)
        self._fitness: FitnessPoller | None = None
        self._tc_client: tuple[HTTPClient, HTTPConnectionPool] | None = None
        self._tc_loop: LoopingCall | None = None
        self._tick_loop: LoopingCall | None = None
        self._dirty: dict[Key, Transition | None] = {}
        self._unwritten: dict[Key, list[TransitionRow]] = {}  # transitions being written
        self._saved: dict[Key, tuple[str, frozenset[tuple[str, str]], bool]] = {}
        self._flush_call: IDelayedCall | None = None
        self._history: list[Remediation] = []
        self._jobs_of: dict[int, str | None] = {}
        self.held: list[str] = []
        self.tc_status: dict[str, str] = {}  # pool -> "ok" or the reason it could not be asked
        self.remediated: list[tuple[str, str, str]] = []  # (policy, task, outcome), for metrics and tests

    # -- lifecycle

    async def start(self) -> None:
        now = self.clock.seconds()
        for row in await self.store.health.all():
            key = (row.worker_group, row.worker_id)
            h = self.tracker.get(key)
            h.maintenance = row.maintenance
            h.state, h.since = Health(row.state), row.since
            self._saved[key] = (row.state, frozenset((f["source"], f["kind"]) for f in row.findings), row.maintenance)
        flag = await self.store.health.flag(PAUSED_FLAG)
        self.paused, self.paused_by = bool(flag), flag or ""
        for r in await self.store.health.remediations(now - 2 * 86400):
            self._history.append(Remediation((r.worker_group, r.worker_id), r.policy, r.task, r.time, r.dry_run))
            self._jobs_of[len(self._history) - 1] = r.job_id
            self._rem_ids[len(self._history) - 1] = r.id
            if self.division is not None:
                self.division.loaded(r.id)
        await self._refresh_loans()
        if not self.settings.health_enabled:
            if self.cluster is not None:  # the rollers that sweep record the fleet's health: shown here too
                self._tick_loop = LoopingCall(self._follow)
                self._tick_loop.clock = self.clock
                self._tick_loop.start(self.settings.health_tick, now=True).addErrback(
                    lambda f: log.failure("Health import loop stopped", f))
            return
        if self._probe == self._default_probe:
            self._icmp = IcmpEcho.open(self.reactor, timeout=self.settings.health_probe_timeout, count=1)
            log.info("Liveness sweeps: every {interval:g} s, {how}", interval=self.settings.health_sweep_interval,
                     how=("in-process ICMP (" + ("raw socket" if self._icmp.raw else "ping socket") + ")")
                     if self._icmp else "the ping binary (in-process ICMP is not allowed here: see "
                                        "net.ipv4.ping_group_range or CAP_NET_RAW)")
        self.sweep.start()
        self._tc_loop = LoopingCall(self._poll_taskcluster)
        self._tc_loop.clock = self.clock
        self._tc_loop.start(self.settings.health_tc_interval, now=True).addErrback(
            lambda f: log.failure("Taskcluster fitness loop stopped", f))
        self._tick_loop = LoopingCall(self._tick)
        self._tick_loop.clock = self.clock
        self._tick_loop.start(self.settings.health_tick, now=False).addErrback(
            lambda f: log.failure("Remediation loop stopped", f))

    async def stop(self) -> None:
        self.sweep.stop()
        for loop in (self._tc_loop, self._tick_loop):
            if loop is not None and loop.running:
                loop.stop()
        if self._icmp is not None:
            self._icmp.close()
            self._icmp = None
        await self._flush()
        if self._tc_client is not None:
            await close_pool(self._tc_client[1])
            self._tc_client = None

    # -- liveness

    def _machines(self) -> list[Machine]:
        return self.store.machines.snapshot()

    # -- this roller's share of the fleet (several rollers)

    @property
    def share(self) -> dict[str, Any] | None:
        return self.division.share if self.division is not None else None

    def _owns(self, key: Key) -> bool:
        """Whether this roller probes, polls and remediates the machine."""
        return self.division is None or self.division.owns(key)

    def _records(self, key: Key) -> bool:
        """Whether this roller writes the machine's health."""
        return self.division is None or self.division.records(key)

    def _swept(self) -> list[Machine]:
        """The machines of this round: the whole fleet, or with several rollers this roller's share."""
        machines = self._machines()
        if self.division is None:
            return machines
        mine, unreached = self.division.split(machines)
        for m in unreached:  # recorded here: nobody probes them
            self.tracker.liveness(m.key, None, f"no running roller reaches worker group {m.worker_group} "
                                               "(cluster.reach): nobody probes it", m.pool or "")
            self._mark(m.key)
        return mine

    async def _import_others(self) -> None:
        """The health of the machines other rollers record, as they last wrote it (their owners looked up again)."""
        if self.division is None:
            return
        self.division.refresh()
        for key in await self.division.import_others():
            h = self.tracker.machines[key]
            self._saved[key] = (h.state.value, frozenset(h.findings), h.maintenance)
            self._dirty.pop(key, None)

    async def _follow(self) -> None:
        """A roller that does not sweep (health.enabled off) shows the health the others record."""
        await self._import_others()
        await self._refresh_flags()

    async def _sync_remediations(self, now: float) -> None:
        """The remediations other rollers started since the last look."""
        if self.division is None:
            return
        for r in await self.division.others_remediations(now):
            self._history.append(Remediation((r.worker_group, r.worker_id), r.policy, r.task, r.time, r.dry_run))
            self._jobs_of[len(self._history) - 1] = r.job_id
            self._rem_ids[len(self._history) - 1] = r.id

    def _default_probe(self, machine: Machine) -> Deferred[LivenessResult]:
        address = machine.address
        if address is None:
            raise ValueError(f"machine {machine.worker_id} has neither an ip nor an fqdn")
        timeout = self.settings.health_probe_timeout
        check: ILiveness
        port = machine.liveness.port
        if machine.liveness.method == "tcp" and port is not None:
            check = TcpConnect(self.reactor, port, timeout=timeout)
        elif self._icmp is not None and _ipv4(address):
            check = self._icmp
        else:
            check = IcmpPing(self.reactor, count=1, timeout=max(1.0, timeout))
        return check.check(address)

    def _probed(self, machine: Machine, result: LivenessResult | None, error: str | None) -> None:
        if result is None:
            self.tracker.liveness(machine.key, None, error or "unknown error", machine.pool or "")
        else:
            self.tracker.liveness(machine.key, result.alive, result.detail, machine.pool or "")
        self._mark(machine.key)

    # -- Taskcluster fitness

    def _tc(self) -> TaskclusterHttp | str:
        root = self.settings.health_root_url or self.settings.auth_root_url
        if not root:
            return ""
        creds = self.credential(self.settings.health_credential)
        if creds is None:
            return (f"credential {self.settings.health_credential!r} (health.credential) is not in the "
                    "secrets file")
        if self._tc_client is None:
            self._tc_client = pooled_client(self.reactor, connect_timeout=30, max_per_host=8)
        return TaskclusterHttp(self.clock, self._tc_client[0], root, *creds, timeout=30)

    def _rules(self) -> FitnessRules:
        s = self.settings
        return FitnessRules(missing_after=s.health_missing_after, window=s.health_fitness_window,
                            min_success_rate=s.health_min_success_rate,
                            max_consecutive_failures=s.health_max_consecutive_failures)

    async def _poll_taskcluster(self) -> None:
        tc = self._tc()
        pools: dict[tuple[str, str], list[Machine]] = {}
        if self.division is not None:
            self.division.refresh()
        for m in self._machines():
            if not m.pool or not self._owns(m.key):
                continue
            try:
                pools.setdefault(worker_pool(m, self.settings.loans_provisioner_id), []).append(m)
            except QuarantineError:
                continue
        if tc == "":
            return  # Taskcluster is not configured: no fitness findings at all
        now = self.clock.seconds()
        for (provisioner, worker_type), machines in sorted(pools.items()):
            label = f"{provisioner}/{worker_type}"
            keys = [m.key for m in machines]
            if isinstance(tc, str):
                self.tc_status[label] = tc
                self.tracker.fitness(keys, None, tc, pool=machines[0].pool or "")
            else:
                if self._fitness is None:
                    self._fitness = FitnessPoller(tc, self._rules())
                self._fitness.tc = tc  # the credential in force now (SIGHUP); the run caches stay
                try:
                    result = await self._fitness.poll(provisioner, worker_type, keys, now)
                except TaskclusterError as e:
                    self.tc_status[label] = e.message
                    self.tracker.fitness(keys, None, e.message, pool=machines[0].pool or "")
                else:
                    self.tc_status[label] = "ok"
                    self.tracker.fitness(keys, result.findings, pool=machines[0].pool or "")
            for key in keys:
                self._mark(key)

    # -- overrides

    async def _refresh_loans(self) -> None:
        try:
            loans = await self.store.loans.list(active=True, limit=100_000)
        except StoreError as e:
            log.warn("Health: active loans could not be read ({error}); loaned states kept as they were", error=e)
            return
        loaned = {(loan.worker_group, loan.worker_id) for loan in loans}
        for key in loaned | {k for k, h in self.tracker.machines.items() if h.loaned}:
            self.tracker.set_loaned(key, key in loaned)
            self._mark(key)

    async def set_maintenance(self, key: Key, on: bool, actor: str, reason: str = "", *,
                              source_ip: str | None = None, via: str = "api") -> MachineHealth:
        """Set or clear a machine's maintenance flag, recorded and audited."""
        text = f"{actor}: {reason}" if reason else actor
        await self.store.health.set_maintenance(key, on, text, self.clock.seconds())
        await self._audit(actor, source_ip, "machine.maintenance", f"{key[0]}/{key[1]}", "on" if on else "off",
                          {"reason": reason, "via": via})
        h = self.tracker.set_maintenance(key, on, f"maintenance {'on' if on else 'off'} by {text}")
        self._mark(key)
        await self._flush()
        return h

    async def _refresh_flags(self) -> None:
        """Maintenance flags and the pause that another process (the C{roller} command) set."""
        try:
            flags = await self.store.health.maintenance()
            paused = await self.store.health.flag(PAUSED_FLAG)
        except StoreError as e:
            log.warn("Health: maintenance flags could not be read ({error})", error=e)
            return
        for key, reason in flags.items():
            h = self.tracker.machines.get(key)
            if h is None or not h.maintenance:
                self.tracker.set_maintenance(key, True, f"maintenance on by {reason or 'another process'}")
                self._mark(key)
        for key, h in list(self.tracker.machines.items()):
            if h.maintenance and key not in flags:
                self.tracker.set_maintenance(key, False, "maintenance off (by another process)")
                self._mark(key)
        self.paused, self.paused_by = bool(paused), paused or ""

    async def set_paused(self, paused: bool, actor: str, *, source_ip: str | None = None,
                         via: str = "api") -> None:
        """Pause remediation (no new one starts from the next tick on) or resume it; kept and audited."""
        what = "paused" if paused else "resumed"
        await self.store.health.set_flag(PAUSED_FLAG, actor if paused else "")
        await self._audit(actor, source_ip, "health.pause" if paused else "health.resume", "health",
                          f"remediation {what}", {"via": via})
        self.paused, self.paused_by = paused, actor if paused else ""
        log.info("Remediation {what} by {actor}", what=what, actor=actor)

    async def _audit(self, actor: str, source_ip: str | None, action: str, target: str, result: str,
                     params: dict[str, Any]) -> None:
        await self.store.audit.add(AuditEntry(time=self.clock.seconds(), actor=actor, source_ip=source_ip,
                                              action=action, target=target, result=result, params=params))

    # -- recording

    def _transition(self, t: Transition) -> None:
        if not self._records(t.key):
            return  # another roller's machine: it records (and announces) the change
        self._dirty[t.key] = t
        if t.old is not t.new:
            log.info("Health: {group}/{worker} {old} -> {new}: {reason}", group=t.key[0], worker=t.key[1],
                     old=t.old.value, new=t.new.value, reason=t.reason)
        if self.notifier is not None:
            h = self.tracker.machines.get(t.key)
            kinds = sorted({k for _, k in h.findings}) if h else []
            self.notifier.health_transition(t.key[0], t.key[1], t.old.value, t.new.value, t.reason, kinds)
        self._schedule_flush()

    def _mark(self, key: Key) -> None:
        h = self.tracker.machines.get(key)
        if h is None or not self._records(key):
            return
        signature = (h.state.value, frozenset(h.findings), h.maintenance)
        if self._saved.get(key) != signature and key not in self._dirty:
            self._dirty[key] = None
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_call is None or not self._flush_call.active():
            self._flush_call = self.clock.callLater(0, lambda: Deferred.fromCoroutine(self._flush()))

    async def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        dirty, self._dirty = self._dirty, {}
        for key, t in dirty.items():
            h = self.tracker.machines.get(key)
            if h is None or not self._records(key):
                continue
            row = None if t is None else TransitionRow(t.time, t.old.value, t.new.value, t.reason)
            if row is not None:
                self._unwritten.setdefault(key, []).append(row)
            try:
                await self.store.health.save(key, h.state.value, h.since, [f.to_json() for f in h.finding_list()],
                                             row)
            except StoreError as e:
                log.warn("Health of {group}/{worker} not recorded yet ({error}); retried at the next change or "
                         "tick", group=key[0], worker=key[1], error=e)
                self._dirty.setdefault(key, t)
                continue
            finally:
                if row is not None:
                    self._written(key, row)
            self._saved[key] = (h.state.value, frozenset(h.findings), h.maintenance)

    def _written(self, key: Key, row: TransitionRow) -> None:
        rows = self._unwritten.get(key, [])
        if row in rows:
            rows.remove(row)
        if not rows:
            self._unwritten.pop(key, None)

    def _pending(self, key: Key) -> list[TransitionRow]:
        """A machine's transitions not in the database yet (being written, or to be), oldest first."""
        rows = list(self._unwritten.get(key, []))
        t = self._dirty.get(key)
        if t is not None:
            rows.append(TransitionRow(t.time, t.old.value, t.new.value, t.reason))
        return rows

    # -- remediation

    def _active(self, index: int) -> bool:
        job_id = self._jobs_of.get(index)
        if not job_id:
            return False
        job = self.queue.active(job_id)
        return job is not None and not job.state.final

    def _active_anywhere(self, index: int) -> bool:
        return self._active(index) or (self.division is not None and self.division.in_flight(self._rem_ids.get(index)))

    async def _tick(self) -> None:
        await self._import_others()
        await self._refresh_loans()
        await self._refresh_flags()
        if self._dirty:
            await self._flush()
        if not self.settings.health_remediate or not self.policies:
            self.held = ["health.remediate is off"] if not self.settings.health_remediate else ["no policies"]
            return
        now = self.clock.seconds()
        busy = self.queue.machines_with_jobs()
        if self.division is not None:
            await self._sync_remediations(now)
            try:
                busy |= await self.division.machines_with_jobs()  # on any roller
            except StoreError as e:
                self.held = [f"the jobs of the other rollers could not be read: {e}"]
                return
        history = [Remediation(r.key, r.policy, r.task, r.time, r.dry_run, self._active_anywhere(i))
                   for i, r in enumerate(self._history)]
        sizes: dict[str, int] = {}
        for m in self._machines():
            sizes[m.pool or ""] = sizes.get(m.pool or "", 0) + 1
        actions, self.held = plan(self.policies, self.tracker.machines.values(), now=now, paused=self.paused,
                                  busy=lambda k: k in busy, history=history, pool_sizes=sizes,
                                  mine=self._owns if self.division is not None else None)
        for action in actions:
            if self.paused:  # paused while earlier actions of this tick were submitted
                break
            await self._remediate(action, now)

    async def _remediate(self, action: Action, now: float) -> None:
        group, worker = action.key
        machine = await self.store.machines.get(group, worker)
        if machine is None:
            return
        policy = action.policy
        job_id: str | None = None
        reserved: int | None = None
        if self.division is not None:
            # recorded first, under the lock every roller takes: only if nobody acted since the history read
            h = self.tracker.machines.get(action.key)
            try:
                reserved = await self.division.reserve(action, (h.pool if h is not None else "") or machine.pool or "",
                                                       now)
            except StoreError as e:
                log.warn("Health: {policy} on {group}/{worker} not started ({error})", policy=policy.name,
                         group=group, worker=worker, error=e)
                return
            if reserved is None:
                log.info("Health: {policy} on {group}/{worker} left for the next tick: another roller remediated "
                         "it or its pool meanwhile", policy=policy.name, group=group, worker=worker)
                return
        if policy.dry_run:
            outcome = "dry_run"
            log.info("Health (dry run): {policy} would run {task} on {group}/{worker}: {reason}",
                     policy=policy.name, task=action.task, group=group, worker=worker, reason=action.reason)
        else:
            def audit(job: Any) -> AuditEntry:
                return AuditEntry(time=now, actor=REQUESTER, action=f"job.create:{action.task}",
                                  result=f"queued {job.id}", target=f"{group}/{worker}",
                                  params={"policy": policy.name, "step": action.step, "reason": action.reason})
            try:
                job, _ = await self.queue.submit(action.task, machine, requester=REQUESTER, reason=action.reason,
                                                 audit=audit)
            except (RollerError, StoreError) as e:
                outcome = "refused"
                log.warn("Health: {policy} could not queue {task} on {group}/{worker}: {error}",
                         policy=policy.name, task=action.task, group=group, worker=worker, error=e)
                self._count(policy.name, action.task, outcome)
                if self.division is not None and reserved is not None:
                    await self.division.settle(reserved, None)
                return
            job_id, outcome = job.id, "queued"
            log.info("Health: {policy} queued {task} on {group}/{worker} (job {job}): {reason}",
                     policy=policy.name, task=action.task, group=group, worker=worker, job=job.id,
                     reason=action.reason)
        self._history.append(Remediation(action.key, policy.name, action.task, now, policy.dry_run))
        self._jobs_of[len(self._history) - 1] = job_id
        self._count(policy.name, action.task, outcome)
        if self.division is not None and reserved is not None:
            self._rem_ids[len(self._history) - 1] = reserved
            if job_id is not None:
                await self.division.settle(reserved, job_id)
            return
        try:
            await self.store.health.add_remediation(action.key, policy.name, action.task, now, policy.dry_run,
                                                    job_id, action.reason)
        except StoreError as e:
            log.warn("Health: remediation of {group}/{worker} not recorded ({error})", group=group, worker=worker,
                     error=e)

    def _count(self, policy: str, task: str, outcome: str) -> None:
        self.remediated.append((policy, task, outcome))
        if self.metrics is not None:
            self.metrics.remediation(policy, task, outcome)

    # -- reading

    def status(self) -> dict[str, Any]:
        pools: dict[str, dict[str, int]] = {}
        for h in self.tracker.machines.values():
            by = pools.setdefault(h.pool, {s.value: 0 for s in Health})
            by[h.state.value] += 1
        last = self.sweep.rounds[-1] if self.sweep.rounds else None
        return {
            "enabled": self.settings.health_enabled, "paused": self.paused, "paused_by": self.paused_by or None,
            "remediate": self.settings.health_remediate, "policies": [p.name for p in self.policies],
            "pools": pools, "taskcluster": dict(sorted(self.tc_status.items())),
            "held": self.held[:100], "share": self.share,
            "sweep": None if last is None else {
                "round": last.number, "started": last.started, "machines": last.machines, "probed": last.probed,
                "errors": last.errors, "late": last.late, "skipped": last.skipped, "moved": last.moved,
                "duration": last.duration,
                "probe": "in-process ICMP" if self._icmp is not None else "ping binary",
                "recent": [{"round": r.number, "started": r.started, "machines": r.machines, "probed": r.probed,
                            "late": r.late, "duration": r.duration} for r in list(self.sweep.rounds)[-10:]]},
        }

    def health_of(self, key: Key) -> MachineHealth | None:
        return self.tracker.machines.get(key)

    def state_of(self, key: Key) -> str:
        """A machine's health state; C{unknown} for one not checked yet."""
        h = self.tracker.machines.get(key)
        return h.state.value if h is not None else Health.unknown.value

    def transitions(self, key: Key, limit: int = 50) -> Deferred[list[TransitionRow]]:
        """
        A machine's transitions, newest first: those recorded, and those
        still being written (so they agree with L{health_of} at once).
        """
        if self.store is None:
            return succeed([])
        before = self._pending(key)

        def merge(rows: list[TransitionRow]) -> list[TransitionRow]:
            pending = before + [r for r in self._pending(key) if r not in before]
            return ([r for r in reversed(pending) if r not in rows] + rows)[:limit]

        return self.store.health.transitions(key, limit).addCallback(merge)


def _ipv4(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).version == 4
    except ValueError:
        return False
