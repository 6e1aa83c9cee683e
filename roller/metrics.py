"""
Prometheus metrics, served by the API at C{GET /metrics}.

Each L{Metrics} has its own C{CollectorRegistry} (never the process-wide
default one), so several can live in one process (tests, several APIs):

  - C{roller_jobs_total{state,task}}: jobs that reached a final state;
  - C{roller_job_duration_seconds{task}}: running -> final, in seconds;
  - C{roller_jobs_queued}, C{roller_jobs_running},
    C{roller_endpoint_jobs_running{endpoint}}: read from the queue at
    scrape time;
  - C{roller_driver_errors_total{kind}}: failed attempts by method (the
    job log events carrying C{outcome="failed"} and a C{method});
  - C{roller_reactor_lag_seconds}: how late the last tick of a 1 s
    C{LoopingCall} on the injected clock fired (L{Metrics.start}/L{Metrics.stop});
  - C{roller_machines{health,pool}} (read from the health watcher when
    scraped) and C{roller_remediations_total{policy,task,outcome}};
  - C{roller_http_connections}, C{roller_http_connections_max},
    C{roller_http_connections_refused_total},
    C{roller_http_connections_dropped_total{reason}}: the web site's client
    connections (L{Metrics.watch_http}; see L{roller.web.http.RollerSite}).

    metrics = Metrics(queue, reactor)
    metrics.start()                # the lag loop; the service does this
    body = metrics.exposition()    # served as CONTENT_TYPE
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from roller.jobs import Job, JobEvent

if TYPE_CHECKING:
    from roller.queue import JobQueue

__all__ = ["Metrics", "CONTENT_TYPE", "LAG_INTERVAL_S"]

log = Logger()

CONTENT_TYPE = CONTENT_TYPE_LATEST
LAG_INTERVAL_S = 1.0

#: Task durations run from a second (ping) to an hour or more (re-image).
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, math.inf)


class _QueueCollector(Collector):
    """The queue's depth and running jobs, read when scraped."""

    def __init__(self, queue: JobQueue):
        self._queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("roller_jobs_queued", "Jobs waiting in the queue.", value=self._queue.depth)
        yield GaugeMetricFamily("roller_jobs_running", "Jobs running now.", value=len(self._queue.running()))
        endpoints = GaugeMetricFamily("roller_endpoint_jobs_running",
                                      "Jobs running now per shared endpoint (a PDU or BMC host).",
                                      labels=("endpoint",))
        load = getattr(self._queue, "endpoint_load", None)
        for endpoint, count in sorted((load() if load else {}).items()):
            endpoints.add_metric((endpoint,), count)
        yield endpoints

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("roller_jobs_queued", "Jobs waiting in the queue.")
        yield GaugeMetricFamily("roller_jobs_running", "Jobs running now.")
        yield GaugeMetricFamily("roller_endpoint_jobs_running",
                                "Jobs running now per shared endpoint (a PDU or BMC host).", labels=("endpoint",))


class _HTTPCollector(Collector):
    """The web site's connections, read when scraped (C{site.connection_stats()})."""

    def __init__(self, site: Any):
        self._site = site

    def collect(self) -> Iterator[Any]:
        stats = self._site.connection_stats()
        yield GaugeMetricFamily("roller_http_connections", "Client connections open now.", value=stats["open"])
        yield GaugeMetricFamily("roller_http_connections_max",
                                "Most client connections served at once (0: no cap).", value=stats["max"])
        yield CounterMetricFamily("roller_http_connections_refused",
                                  "Connections closed unread: at the cap with every connection busy.",
                                  value=stats["refused"])
        dropped = CounterMetricFamily(
            "roller_http_connections_dropped",
            "Connections closed before their request arrived: headers_timeout, body_timeout, "
            "or evicted (at the cap, to make room for a new connection).", labels=("reason",))
        for reason in ("headers_timeout", "body_timeout", "evicted"):
            dropped.add_metric((reason,), stats["dropped"].get(reason, 0))
        yield dropped


class _HealthCollector(Collector):
    """Machines by health state and pool, read when scraped (C{counts()}: pool -> state -> machines)."""

    def __init__(self, counts: Callable[[], dict[str, dict[str, int]]]):
        self._counts = counts

    def collect(self) -> Iterator[Any]:
        machines = GaugeMetricFamily("roller_machines", "Machines by health state and pool.",
                                     labels=("health", "pool"))
        for pool, states in sorted(self._counts().items()):
            for state, count in sorted(states.items()):
                machines.add_metric((state, pool), count)
        yield machines


class Metrics:
    """
    @param queue: the L{roller.queue.JobQueue} observed (subscribed to now).
    @param clock: the reactor (an C{IReactorTime}) the lag loop runs on.
    """

    def __init__(self, queue: JobQueue, clock: IReactorTime, *, lag_interval: float = LAG_INTERVAL_S):
        self.clock = clock
        self.lag_interval = lag_interval
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs_total = Counter(
            "roller_jobs", "Jobs that reached a final state.", ("state", "task"), registry=self.registry)
        self.job_duration = Histogram(
            "roller_job_duration_seconds", "Time from running to a final state.", ("task",),
            buckets=DURATION_BUCKETS, registry=self.registry)
        self.reactor_lag = Gauge(
            "roller_reactor_lag_seconds", f"How late the last {lag_interval:g} s reactor tick fired.",
            registry=self.registry)
        self.driver_errors = Counter(
            "roller_driver_errors", "Failed attempts to act on a machine, by method (ssh_reboot, ipmi_reset, ...).",
            ("kind",), registry=self.registry)
        self.remediations = Counter(
            "roller_remediations", "Remediations fleet health started (queued), only reported (dry_run) or "
            "could not queue (refused).", ("policy", "task", "outcome"), registry=self.registry)
        #: The last measured reactor lag in seconds (None before the first tick).
        self.lag: float | None = None
        self.registry.register(_QueueCollector(queue))
        self._unsubscribe: Callable[[], None] | None = queue.subscribe(self._job_event)
        self._loop: LoopingCall | None = None
        self._expected: float | None = None

    # -- jobs

    def _job_event(self, job: Job, event: JobEvent) -> None:
        if event.kind == "log":
            data = event.data or {}
            if data.get("outcome") == "failed" and isinstance(data.get("method"), str):
                self.driver_errors.labels(kind=data["method"]).inc()
            return
        if event.kind != "state" or not job.state.final:
            return
        self.jobs_total.labels(state=job.state.value, task=job.task_name).inc()
        if job.started_at is not None and job.finished_at is not None:
            self.job_duration.labels(task=job.task_name).observe(max(0.0, job.finished_at - job.started_at))

    # -- reactor lag

    def _next_tick(self, now: float) -> float:
        """When the LoopingCall schedules its next call after one that returned at C{now}."""
        start = self._loop.starttime if self._loop is not None and self._loop.starttime is not None else now
        return start + (math.floor((now - start) / self.lag_interval) + 1) * self.lag_interval

    def _tick(self) -> None:
        now = self.clock.seconds()
        if self._expected is not None:
            self.lag = max(0.0, now - self._expected)
            self.reactor_lag.set(self.lag)
        self._expected = self._next_tick(now)

    def start(self) -> None:
        """Measure the reactor's lag every C{lag_interval} seconds."""
        if self._loop is not None and self._loop.running:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._expected = self.clock.seconds() + self.lag_interval
        self._loop.start(self.lag_interval, now=False).addErrback(
            lambda f: log.failure("The reactor lag loop failed", f))

    def stop(self) -> None:
        """Stop the lag loop and stop observing the queue."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    # -- web connections

    def watch_http(self, site: Any) -> None:
        """Report C{site}'s connections (a L{roller.web.http.RollerSite}) from now on."""
        self.registry.register(_HTTPCollector(site))

    # -- fleet health

    def watch_health(self, counts: Callable[[], dict[str, dict[str, int]]]) -> None:
        """Report C{roller_machines{health,pool}} from C{counts()} from now on."""
        self.registry.register(_HealthCollector(counts))

    def remediation(self, policy: str, task: str, outcome: str) -> None:
        self.remediations.labels(policy=policy, task=task, outcome=outcome).inc()

    # -- exposition

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric (serve as L{CONTENT_TYPE})."""
        return generate_latest(self.registry)
