"""
Notifications when a job ends (and when a job other than C{ping} starts).

Rules (C{[[notify.rules]]} in the TOML file, or JSON in C{ROLLER_NOTIFY_RULES})
say which tasks notify whom::

    [[notify.rules]]
    tasks = ["reboot", "reimage"]     # or ["*"]
    on = ["failed", "timed_out"]      # job states; "started" for a job start;
                                      # default: started and every final state
    email = ["relops@example.com"]    # Taskcluster notify
    matrix_rooms = ["!room:mozilla.org"]
    slack_channels = ["C0123456"]
    webhooks = ["https://hooks.example.com/roller"]

Taskcluster notify (C{POST {root}/api/notify/v1/email|matrix|slack}) is
called with Hawk-signed requests (C{mohawk.Sender}, sha256, payload hash
included) with the client id and access token of the secrets file
credential C{notify.credential} (type C{password}: username = client id,
password = access token).  Webhooks receive the JSON document
C{{"event": "job.finished"|"job.started", "job": {...}}} with
C{X-Roller-Signature-256: sha256=HEX}, the HMAC-SHA256 of the raw body
keyed with the C{token} credential C{notify.webhook_credential}, and
C{X-Roller-Event}.

A notification that fails (unreachable, timeout, non-2xx) is logged and
dropped: it never changes the job.  Credentials never appear in a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import mohawk
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from roller import __version__
from roller.config import STARTED, Rule, Settings, parse_rules
from roller.drivers.reactor import ITcpReactor
from roller.http_client import close_pool, pooled_client
from roller.jobs import Job, JobEvent, State
from roller.secrets import Credential, Secrets

if TYPE_CHECKING:
    from roller.queue import JobQueue

__all__ = ["Notifier", "Rule", "SIGNATURE_HEADER", "parse_rules", "webhook_signature"]

log = Logger()

SIGNATURE_HEADER = "X-Roller-Signature-256"


def webhook_signature(secret: str, body: bytes) -> str:
    """The value of L{SIGNATURE_HEADER} for C{body}."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def hawk_header(client_id: str, access_token: str, url: str, body: bytes) -> str:
    """The C{Authorization} header of a Taskcluster call, as its client makes it."""
    sender = mohawk.Sender(credentials={"id": client_id, "key": access_token, "algorithm": "sha256"},
                           url=url, method="POST", content=body, content_type="application/json")
    return sender.request_header


def _summary(job: Job, what: str) -> str:
    host = f"{job.worker_id} ({job.worker_group})"
    if what == STARTED:
        return f"roller: {job.task_name} started on {host}"
    return f"roller: {job.task_name} {job.state.value} on {host}"


def _details(job: Job, link: str | None) -> str:
    lines = [f"Task: {job.task_name}", f"Machine: {job.worker_id} (group {job.worker_group})",
             f"State: {job.state.value}", f"Requested by: {job.requester}"]
    if job.reason:
        lines.append(f"Reason: {job.reason}")
    if job.result:
        lines.append(f"Result: {job.result}")
    if job.error:
        lines.append(f"Error: {job.error}")
    lines.append(f"Job: {link or job.id}")
    return "\n".join(lines)


class Notifier:
    """
    @param reactor: for HTTP and timeouts.
    @param rules: from L{parse_rules}.
    @param credentials: returns C{(client_id, access_token)} for Taskcluster
        and the webhook secret, read when sending (so a SIGHUP reload applies);
        C{None} for one that is not configured.
    @param root_url: the Taskcluster deployment for notify.
    @param dashboard_url: roller's public URL (C{server.public_url}), for a link to the job.
    """

    def __init__(self, reactor: ITcpReactor, rules: Sequence[Rule], *, root_url: str = "",
                 taskcluster: Callable[[], tuple[str, str] | None] = lambda: None,
                 webhook_secret: Callable[[], str | None] = lambda: None,
                 dashboard_url: str = "", timeout: float = 10.0, treq_client: HTTPClient | None = None):
        self.reactor = reactor
        self.rules = tuple(rules)
        self.root_url = root_url.rstrip("/")
        self.taskcluster = taskcluster
        self.webhook_secret = webhook_secret
        self.dashboard_url = dashboard_url.rstrip("/")
        self.timeout = timeout
        self._pool: HTTPConnectionPool | None = None
        if treq_client is None:
            treq_client, self._pool = pooled_client(reactor, connect_timeout=timeout)
        self.http = treq_client
        self._pending: set[Deferred] = set()
        self._unsubscribe: Callable[[], None] | None = None
        #: (kind, target, outcome) of every delivery, for tests and the log
        self.sent: list[tuple[str, str, str]] = []

    # -- wiring

    def start(self, queue: JobQueue) -> None:
        if self.rules and self._unsubscribe is None:
            self._unsubscribe = queue.subscribe(self.job_event)

    def stop(self) -> Deferred:
        """Stop listening; fires once the deliveries under way have ended."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        d = DeferredList(list(self._pending), consumeErrors=True) if self._pending else succeed(None)
        d.addBoth(lambda _: close_pool(self._pool))
        return d

    def job_event(self, job: Job, event: JobEvent) -> None:
        if event.kind != "state":
            return
        if job.state is State.running:
            if job.task_name == "ping":
                return
            what = STARTED
        elif job.state.final:
            what = job.state.value
        else:
            return
        for rule in self.rules:
            if rule.matches(job.task_name, what):
                self.notify(rule, job, what)

    # -- delivery

    def health_transition(self, worker_group: str, worker_id: str, old: str, new: str, reason: str,
                          kinds: Iterable[str] = ()) -> None:
        """
        A machine's health changed to C{new}: the rules whose C{on} names
        C{health.<new>}, or C{health.<kind>} of a finding it has now, hear of it.
        """
        events = [f"health.{new}", *(f"health.{k}" for k in kinds)]
        rules = [r for r in self.rules if r.matches_health(events)]
        if not rules:
            return
        target = f"{worker_group}/{worker_id}"
        link = (f"{self.dashboard_url}/machines/{quote(worker_group, safe='')}/{quote(worker_id, safe='')}"
                if self.dashboard_url else None)
        subject = f"roller: {target} is {new} (was {old})"
        text = f"{target} is {new} (was {old}): {reason}" + (f"\n{link}" if link else "")
        payload = {"event": f"health.{new}", "machine": {"worker_group": worker_group, "worker_id": worker_id},
                   "old": old, "new": new, "reason": reason, "findings": sorted(set(kinds))}
        for rule in rules:
            self._deliver(rule, subject, text, link, payload)

    def notify(self, rule: Rule, job: Job, what: str) -> Deferred:
        """Send every notification of C{rule} about C{job}; fires when all have ended (never fails)."""
        link = f"{self.dashboard_url}/jobs/{job.id}" if self.dashboard_url else None
        event = "job.started" if what == STARTED else "job.finished"
        return self._deliver(rule, _summary(job, what), _details(job, link), link,
                             {"event": event, "job": job.to_json()})

    def _deliver(self, rule: Rule, subject: str, text: str, link: str | None,
                 payload: dict[str, Any]) -> Deferred:
        calls: list[Deferred] = []
        for address in rule.email:
            body: dict[str, Any] = {"address": address, "subject": subject, "content": text, "template": "simple"}
            if link:
                body["link"] = {"href": link, "text": "The job in roller"}
            calls.append(self._taskcluster("email", address, body))
        for room in rule.matrix_rooms:
            calls.append(self._taskcluster("matrix", room, {"roomId": room, "body": f"{subject}\n{text}",
                                                            "msgtype": "m.notice"}))
        for channel in rule.slack_channels:
            calls.append(self._taskcluster("slack", channel, {"channelId": channel, "text": f"*{subject}*\n{text}"}))
        for url in rule.webhooks:
            calls.append(self._webhook(url, payload))
        return DeferredList(calls, consumeErrors=True)

    def _taskcluster(self, kind: str, target: str, body: dict) -> Deferred:
        creds = self.taskcluster()
        if not self.root_url or creds is None:
            log.warn("Notification by {kind} to {target} not sent: notify.root_url or notify.credential is "
                     "not configured", kind=kind, target=target)
            self.sent.append((kind, target, "not configured"))
            return succeed(None)
        url = f"{self.root_url}/api/notify/v1/{kind}"
        raw = json.dumps(body).encode()
        headers = {"Content-Type": ["application/json"], "Authorization": [hawk_header(*creds, url, raw)]}
        return self._post(kind, target, url, raw, headers)

    def _webhook(self, url: str, payload: dict[str, Any]) -> Deferred:
        raw = json.dumps(payload).encode()
        headers = {"Content-Type": ["application/json"], "X-Roller-Event": [payload["event"]]}
        secret = self.webhook_secret()
        if secret:
            headers[SIGNATURE_HEADER] = [webhook_signature(secret, raw)]
        return self._post("webhook", url, url, raw, headers)

    def _post(self, kind: str, target: str, url: str, raw: bytes, headers: dict) -> Deferred:
        headers["User-Agent"] = [f"roller/{__version__}"]
        d = Deferred.fromCoroutine(self._send(url, raw, headers))
        d.addTimeout(self.timeout, self.reactor)

        def done(code: int) -> None:
            if 200 <= code < 300:
                self.sent.append((kind, target, "ok"))
            else:
                self.sent.append((kind, target, f"HTTP {code}"))
                log.warn("Notification by {kind} to {target} refused: HTTP {code}", kind=kind, target=target,
                         code=code)

        def failed(f: Any) -> None:
            why = f.getErrorMessage() or f.type.__name__
            self.sent.append((kind, target, f"failed: {why}"))
            log.warn("Notification by {kind} to {target} failed: {why}", kind=kind, target=target, why=why)

        d.addCallbacks(done, failed)
        self._pending.add(d)
        d.addBoth(lambda _: self._pending.discard(d))
        return d

    async def _send(self, url: str, raw: bytes, headers: dict) -> int:
        response = await self.http.post(url, data=raw, headers=headers)
        await response.content()  # read it so the connection can be reused
        return response.code


def notifier_from_settings(settings: Settings, reactor: ITcpReactor,
                           secrets: Callable[[], Secrets | None]) -> Notifier | None:
    """The process's notifier, or C{None} when no rule is configured."""
    s = settings
    if not s.notify_rules:
        return None

    def credential(name: str) -> Credential | None:
        if not name:
            return None
        current = secrets()
        try:
            if current is None:
                raise KeyError(name)
            return current.get(name)
        except KeyError:
            log.warn("Notification credential {name!r} is not in the secrets file", name=name)
            return None

    def taskcluster() -> tuple[str, str] | None:
        cred = credential(s.notify_credential)
        if cred is None or not cred.username or not cred.password:
            return None
        return cred.username, cred.password

    def webhook_secret() -> str | None:
        cred = credential(s.notify_webhook_credential)
        return (cred.value or cred.password) if cred is not None else None

    return Notifier(reactor, s.notify_rules, root_url=s.notify_root_url or s.auth_root_url,
                    taskcluster=taskcluster, webhook_secret=webhook_secret, dashboard_url=s.public_url,
                    timeout=s.notify_timeout)
