"""
RollerService: the store, the job queue and the web listeners, started and
stopped in order on one reactor.
"""

from __future__ import annotations

import sys
from typing import cast

from attrs import evolve
from twisted.application.service import IServiceCollection, MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorCore, IReactorThreads
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from roller.auth import AnonymousAuthenticator, IAuthenticator, UnconfiguredAuthenticator
from roller.auth.accounts import AccountAuth, PasswordHasher
from roller.auth.hawk import LocalHawkAuthenticator
from roller.auth.taskcluster import IAuthReactor, TaskclusterAuthenticator
from roller.batches.service import BatchService, rollout_defaults
from roller.cluster.node import ClusterNode
from roller.config import Settings
from roller.demo import DemoFleet, seed_demo_fleet, start_demo_fleet
from roller.drivers.registry import Drivers, make_drivers
from roller.health.watcher import HealthWatcher, IHealthReactor, policies_from_settings
from roller.logs import observer_for
from roller.metrics import Metrics
from roller.notify import Notifier, notifier_from_settings
from roller.queue import JobQueue, QueueLimits
from roller.secrets import Secrets, SecretsError, load_secrets
from roller.store import IStoreReactor, StorageUnavailable, Store
from roller.store.engine import database_target, is_postgresql, open_configured_store
from roller.store.retention import PruneLoop, Pruner, RetentionPolicy, ensure_incremental_vacuum
from roller.store.sqlite import DatabaseLock, acquire_lock
from roller.tasks import builtin_tasks
from roller.version import load_version
from roller.web.admin import InventoryAdmin
from roller.web.api import Api
from roller.web.dashboard import Dashboard
from roller.web.events import EventHub
from roller.web.hosts import host_check_from_settings
from roller.web.http import RollerSite, connection_limit
from roller.web.site import root_resource

log = Logger()
INVENTORY_REFRESH_S = 2.0


class IRollerReactor(IHealthReactor, IStoreReactor, IAuthReactor, IReactorThreads):
    """
    Everything roller's process uses of its reactor: the drivers' TCP, UDP,
    processes and clock, the store's threads and triggers, the thread pool
    of password hashing and imports.  The global reactor provides it
    (L{roller.tap}); tests pass a C{MemoryReactorClock} or the real one.
    """


def make_authenticator(settings: Settings, reactor: IRollerReactor, secrets: Secrets | None = None) -> IAuthenticator:
    """
    The authenticator for C{auth.mode}: C{none} lets everyone in (loopback
    only); C{taskcluster} asks C{auth.root_url}'s auth service; C{local}
    verifies Hawk itself for the C{[clients.ID]} of the secrets file.  A mode
    missing its configuration refuses every request, saying what to set.
    """
    mode = settings.auth_mode
    if mode == "none":
        return AnonymousAuthenticator()
    if mode == "local":
        clients = secrets.clients if secrets is not None else {}
        if not clients:
            return UnconfiguredAuthenticator(
                f"auth.mode is \"local\" but the secrets file {settings.secrets_file} has no [clients.ID] "
                "tables: no request can be authenticated")
        return LocalHawkAuthenticator(
            reactor, {cid: (c.access_token, c.scopes) for cid, c in clients.items()},
            skew=settings.auth_timestamp_skew, max_requests_per_client=settings.auth_max_requests_per_client)
    if not settings.auth_root_url:
        return UnconfiguredAuthenticator(
            "auth.root_url is not set, so roller cannot ask Taskcluster to verify Hawk credentials: no request "
            "can be authenticated (set auth.root_url, e.g. https://firefox-ci-tc.services.mozilla.com; or "
            "auth.mode = \"local\" with [clients.ID] in the secrets file; or \"none\" on a loopback-only "
            "roller to develop)")
    # server.trusted_proxies reach the Api, which works out what the client signed behind them
    return TaskclusterAuthenticator(reactor, settings.auth_root_url, timeout=settings.auth_timeout)


def make_dashboard_auth(settings: Settings, store: Store, reactor: IRollerReactor) -> AccountAuth:
    """
    The dashboard's accounts and sessions.  Only C{--demo} with C{auth.mode
    = "none"} on loopback listeners also lets loopback visitors in without
    signing in (as the admin C{demo}), so the demo works at once.
    """
    s = settings
    return AccountAuth(
        store.users, reactor, PasswordHasher(reactor, reactor.getThreadPool()), scope_prefix=s.scope_prefix,
        tasks=s.allowed_tasks, session_idle=s.session_idle, session_max=s.session_max,
        max_failures=s.login_max_failures, ip_max_failures=s.login_ip_max_failures, lockout=s.login_lockout,
        demo_loopback=s.demo and s.auth_mode == "none" and s.listeners_on_loopback(),
    )


def max_connections(settings: Settings, reactor: IReactorCore) -> int:
    """
    C{server.max_connections}, or 10000, within the open-files limit less a
    reserve for roller itself: 64 descriptors (database, logs, listeners)
    plus 3 per job that may run at once (an SSH or HTTP socket, ipmitool's
    or ping's pipes).  A C{select()} reactor cannot watch more than 1024.
    """
    select = "select" in type(reactor).__module__
    return connection_limit(settings.max_connections, 64 + 3 * settings.max_running,
                            ceiling=1024 if select else 10_000, can_raise=not select)


def queue_limits(settings: Settings) -> QueueLimits:
    return QueueLimits(
        max_running=settings.max_running,
        endpoint_max_running=settings.endpoint_max_running,
        endpoint_min_interval=settings.endpoint_min_interval,
        timeouts=dict(settings.task_timeouts),
    )


class RollerService(MultiService):
    """
    Opens the store, recovers and starts the queue, then listens.

    @ivar ready: fires once roller is listening (with this service), or
        fails if it could not start.
    """

    name = "roller"

    def __init__(self, settings: Settings, reactor: IRollerReactor):
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.store: Store | None = None
        self.queue: JobQueue | None = None
        self.dashboard_auth: AccountAuth | None = None
        self.secrets: Secrets | None = None
        self.authenticator: IAuthenticator | None = None
        self.ready: Deferred = Deferred()
        self._starting: Deferred | None = None
        self.ports: list[IListeningPort] = []
        self.demo: DemoFleet | None = None
        self.drivers: Drivers | None = None
        self.hub: EventHub | None = None
        self.api: Api | None = None
        self.metrics: Metrics | None = None
        self.notifier: Notifier | None = None
        self.health: HealthWatcher | None = None
        self.batches: BatchService | None = None
        self.retention: PruneLoop | None = None
        self._db_lock: DatabaseLock | None = None
        self._refresh: LoopingCall | None = None
        self.cluster: ClusterNode | None = None
        self.failed = False

    def setServiceParent(self, parent: IServiceCollection) -> None:
        # twistd starts its logger after building the application, and uses
        # an ILogObserver component of the application when there is one:
        # that is how log.format = "json" reaches twistd.
        if isinstance(parent, Componentized) and self.settings.log_format == "json":
            parent.setComponent(ILogObserver, observer_for("json", sys.stdout))
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        self._starting = ensureDeferred(self._start())
        self._starting.addCallbacks(lambda _: self.ready.callback(self), self._failed)

    async def _start(self) -> None:
        s = self.settings
        self.secrets = load_secrets(s.secrets_file)
        try:
            self.store = store = await open_configured_store(s, self.reactor, secrets=self.secrets)
            await store.db.check_write()  # migrating may have written nothing
        except StorageUnavailable as e:
            where = self.store.db.path if self.store is not None else database_target(s)
            raise StorageUnavailable(e.kind, f"the database {where} cannot take a write: {e.what}",
                                     e.retry_after, e.detail) from None
        if not is_postgresql(s):  # several rollers share a PostgreSQL database; a SQLite file has one
            self._db_lock = acquire_lock(s.db_path)  # held while roller runs: restore and a second roller refuse
        await ensure_incremental_vacuum(store.db)
        if s.demo:
            self.secrets = await self._start_demo(store, self.secrets)
            s = self.settings
        tasks = builtin_tasks()
        self.drivers = make_drivers(self.reactor, s)
        if is_postgresql(s):  # several rollers may share it: jobs are claimed in the database
            self.cluster = ClusterNode(store, self.reactor, s)
            await self.cluster.join()
        self.queue = JobQueue(store, tasks, self.reactor, limits=queue_limits(s), cluster=self.cluster,
                              settings=s, secrets=self.secrets, drivers=self.drivers)
        self.notifier = notifier_from_settings(s, self.reactor, lambda: self.secrets)
        if self.notifier is not None:
            self.notifier.start(self.queue)  # job start and end notifications (roller.notify)
        # live streams show other rollers' jobs too (EventHub needs only the queue's subscribe)
        self.hub = EventHub(cast(JobQueue, self.queue.relayed()), self.reactor)
        self.hub.start()  # before queue.start(): it also sees the jobs queued again at start-up
        self.metrics = Metrics(self.queue, self.reactor)
        self.metrics.start()  # the reactor lag loop
        interrupted, requeued = await self.queue.start()
        if self.cluster is not None:
            self.cluster.start(self.queue)  # heartbeats, takeovers, the shared queue, other rollers' events
        self.health = HealthWatcher(self.reactor, store, self.queue, s,
                                    policies=policies_from_settings(s, tasks.names()),
                                    credential=self._credential, notifier=self.notifier, metrics=self.metrics,
                                    cluster=self.cluster)
        self.metrics.watch_health(self.health.tracker.counts)
        await self.health.start()
        # batches submit through the queue: resumed once it runs (and after health, whose states they read)
        self.batches = BatchService(store, self.queue, tasks, self.reactor, health=self.health,
                                    defaults=rollout_defaults(s), cluster=self.cluster)
        # with several rollers, each unfinished batch is resumed by one of them (its owner, or an adopter)
        await self.batches.start()
        self.retention = PruneLoop(Pruner(store.db, clock=self.reactor), RetentionPolicy.from_settings(s),
                                   self.reactor, s.history_prune_interval)
        self.retention.start()  # history.*: the first pruning one interval from now
        # pick up inventory changes other processes (roller import) commit
        self._refresh = LoopingCall(self._refresh_inventory)
        self._refresh.clock = self.reactor
        self._refresh.start(INVENTORY_REFRESH_S, now=False)
        self.authenticator = make_authenticator(s, self.reactor, self.secrets)
        self.api = api = Api(
            store=self.store, queue=self.queue, tasks=tasks, authenticator=self.authenticator,
            allowed_tasks=s.allowed_tasks, scope_prefix=s.scope_prefix, cors_origins=s.cors_origins,
            clock=self.reactor, trusted_proxies=s.trusted_proxies, metrics=self.metrics,
            max_lag=s.heartbeat_max_lag, version_info=load_version(s.version_file), public_url=s.public_url,
            health=self.health, batches=self.batches,
        )
        self.dashboard_auth = dashboard_auth = make_dashboard_auth(s, self.store, self.reactor)
        dashboard = Dashboard(
            self.store, self.queue, tasks, s.allowed_tasks, clock=self.reactor, hub=self.hub,
            auth=dashboard_auth, scope_prefix=s.scope_prefix, trusted_proxies=s.trusted_proxies, health=self.health,
            batches=self.batches, page_size=s.dashboard_page_size,
        )
        admin = InventoryAdmin(dashboard, self.store, secrets_file=s.secrets_file,
                               threadpool=self.reactor.getThreadPool())
        # every request must name this roller in its Host (server.allowed_hosts), before Hawk or anything reads it
        site = RollerSite(host_check_from_settings(root_resource(api, dashboard, self.hub, admin=admin), s),
                          max_body=s.max_body,
                          header_timeout=s.header_timeout, body_timeout=s.body_timeout,
                          idle_timeout=s.idle_timeout, max_connections=max_connections(s, self.reactor),
                          reactor=self.reactor)
        site.noisy = False
        self.metrics.watch_http(site)
        for desc in s.listen:
            self.ports.append(await serverFromString(self.reactor, desc).listen(site))
            log.info("roller listening on {endpoint} (auth: {auth})", endpoint=desc, auth=s.auth_mode)
        if dashboard_auth.demo_loopback:
            log.info("Demo mode: the dashboard lets loopback visitors in as the admin \"demo\" without "
                     "signing in; accounts (roller user add) can still sign in")
        await dashboard_auth.start(lambda path: log.warn(
            "No dashboard account exists yet. Create the first admin by opening {path} on this roller "
            "({endpoints}); the link works once, until an admin exists. Or run "
            "`roller user add NAME --role admin`.", path=path, endpoints=", ".join(s.listen)))

    async def _start_demo(self, store: Store, secrets: Secrets) -> Secrets:
        """Start the demo fleet and add its machines; the secrets with its credentials."""
        s = self.settings
        extra: list[dict] = []
        if s.demo_fleet_size:
            self.demo = await start_demo_fleet(self.reactor, s.state_dir, count=s.demo_fleet_size,
                                               ssh_port=s.demo_ssh_port)
            secrets = secrets.merged(self.demo.secrets.as_dict(), replace=True)
            self.settings = evolve(s, ssh_known_hosts=self.demo.known_hosts)
            extra = self.demo.fleet.inventory_json("demo")
            log.info("Demo fleet: {count} simulated machines with SSH on 127.0.1.x port {port}",
                     count=s.demo_fleet_size, port=s.demo_ssh_port)
        added = await seed_demo_fleet(store, extra)
        log.info("Demo machines in worker group 'demo': {added} new", added=added)
        return secrets

    def _credential(self, name: str) -> tuple[str, str] | None:
        """A password credential's (username, password) from the secrets in force, or None."""
        try:
            cred = self.secrets.get(name) if self.secrets is not None else None
        except KeyError:
            return None
        if cred is None or not cred.username or not cred.password:
            return None
        return cred.username, cred.password

    async def _refresh_inventory(self) -> None:
        if self.store is None:
            return
        try:
            if await self.store.machines.refresh():
                log.info("Inventory changed by another process: reloaded")
        except StorageUnavailable:
            pass  # the store logs the fault once; the next refresh tries again
        except Exception:  # noqa: BLE001 -- logged; the next refresh (a LoopingCall) must still run
            log.failure("Could not refresh the inventory")

    def reload_secrets(self) -> bool:
        """
        Read the secrets file again (SIGHUP): new jobs and, in local mode,
        new requests use it.  A refused file (readable by others, invalid)
        keeps the secrets in force and logs why; True if reloaded.
        """
        try:
            secrets = load_secrets(self.settings.secrets_file)
        except SecretsError as e:
            log.error("Secrets not reloaded, keeping the ones in force: {why}", why=str(e))
            return False
        if self.demo is not None:
            secrets = secrets.merged(self.demo.secrets.as_dict(), replace=True)
        self.secrets = secrets
        if self.queue is not None:
            self.queue.set_secrets(secrets)
        if self.api is not None and self.settings.auth_mode == "local":  # the Hawk clients live in it
            fresh = make_authenticator(self.settings, self.reactor, secrets)
            if isinstance(self.authenticator, LocalHawkAuthenticator) and isinstance(fresh, LocalHawkAuthenticator):
                # the clients change in place: the nonces already seen stay, so
                # no request from before the reload can be replayed after it
                self.authenticator.clients = fresh.clients
            else:
                self.authenticator = fresh
                self.api.authenticator = fresh
        log.info("Secrets reloaded from {path}: {count} credential(s), {clients} Hawk client(s)",
                 path=self.settings.secrets_file, count=len(secrets.names()), clients=len(secrets.clients))
        return True

    def _release_db_lock(self) -> None:
        if self._db_lock is not None:
            self._db_lock.release()
            self._db_lock = None

    def _failed(self, failure: Failure) -> None:
        log.critical("roller could not start: {why}", why=failure.getErrorMessage())
        self._release_db_lock()
        self.failed = True
        self.ready.errback(failure)
        self.ready.addErrback(lambda f: None)
        if getattr(self.reactor, "running", False):
            self.reactor.stop()

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            try:
                await self._starting
            except Exception:  # noqa: BLE001 -- a failed start was reported by _failed; stop what did start
                pass
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        if self.cluster is not None:
            self.cluster.stop_polling()  # the heartbeat goes on while the running jobs finish
        if self.retention is not None:
            await self.retention.stop()  # a pruning in progress ends after its current transaction
        if self.health is not None:
            await self.health.stop()  # no sweep, poll or remediation after this
        if self.batches is not None:
            await self.batches.stop()  # no member starts after this; members in flight are still followed
        if self.queue is not None:
            # still listening: new submissions get 503 shutting_down while the
            # running jobs finish (up to server.shutdown_grace); queued jobs
            # stay queued in the store for the next start
            await self.queue.drain(self.settings.shutdown_grace)
        if self.notifier is not None:
            await self.notifier.stop()  # the notifications of the jobs that just ended go out
        if self.hub is not None:
            self.hub.stop()  # ends the live-event streams
        if self.metrics is not None:
            self.metrics.stop()
        for port in self.ports:
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        self.ports = []
        close = getattr(self.authenticator, "close", None)
        if close is not None:
            await close()  # idle connections to Taskcluster's auth service
        await super().stopService()
        if self.queue is not None:
            await self.queue.stop()
        if self.cluster is not None:
            await self.cluster.leave()  # its running jobs are recorded as ended by now
        if self.batches is not None:
            await self.batches.flush()  # the members that ended while draining
            self.batches.close()
        pdus = getattr(self.drivers, "pdus", None)
        if pdus is not None:
            pdus.client.close()
        if self.store is not None:
            await self.store.close()
        self._release_db_lock()
        if self.demo is not None:
            await self.demo.fleet.stop()

    def stopService(self) -> Deferred:
        return ensureDeferred(self._stop())
