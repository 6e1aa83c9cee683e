"""
The staff dashboard (Klein + Jinja2): fleet, machine, job, queue, batch and
audit pages, and the POST routes behind their buttons.

Batches (L{roller.web.batches_html}): the fleet page's rows carry checkboxes
and an action menu (for viewers holding the task's scope and
C{batches:create}); C{POST /batches} answers the confirmation page (a dry
run: count, pools, machines left out, editable limits) and, confirmed,
creates the batch and redirects to C{/batches/<id>}, whose progress, counts
and members update live (C{/events?batch=<id>}).  The queue page cancels a
selection of jobs at once (C{POST /queue/cancel}).

    dashboard = Dashboard(store, queue, tasks, allowed_tasks, clock=reactor, hub=hub)
    resource = root_resource(api, dashboard, hub)      # roller.web.site

Who is looking comes from an L{IDashboardAuth}: every page gets its
L{Viewer} (shown in the header; its id is recorded as the requester of the
jobs and the actor of the audit entries it causes; its scopes decide which
buttons it may press).  roller runs it with
L{roller.auth.accounts.AccountAuth}: accounts with roles (viewer, operator,
admin, mapped to the API's scopes), sessions, sign-in at C{/login} (POST
C{/logout} to sign out) and the one-time first-admin page C{/setup}; a
page asked for without a session redirects to C{/login?next=...}.
L{LoopbackDashboardAuth} (anyone on loopback is an admin) stays for tests
and as the demo fallback.

Every mutating request is a POST of a form carrying C{csrf_token}
(L{CsrfProtection}: a signed double-submit token; the secret comes from
C{os.urandom} at start).  A POST without a valid token is refused with 403
and a page saying why, and nothing is done.

Templates live in the top-level C{templates/} directory and the CSS and
JavaScript in C{static/} (L{find_asset_dir} says where they are looked for).
Every template is autoescaped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import sysconfig
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from attrs import define, field, frozen
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound

import roller
from roller import __version__
from roller.auth.accounts import AccountAuth
from roller.auth.dashboard import IDashboardAuth, LoopbackDashboardAuth, Viewer
from roller.batches.model import Batch, parse_request
from roller.batches.service import BatchService
from roller.deferreds import all_of
from roller.errors import BadRequest, Conflict, Forbidden, NotFound, RollerError, Unauthorized
from roller.health.watcher import HealthWatcher
from roller.inventory import TAG_RE, Machine, valid_worker_id
from roller.jobs import Job, JobEvent, State, iso
from roller.queue import JobQueue
from roller.store import AuditEntry, Store, StoreError
from roller.store.fleet import (
    FILTER_STATES,
    HEALTH_STATES,
    LIVENESS_STATES,
    LOAN_STATES,
    PROBLEMS,
    SORTS,
    STRIP,
    FleetFilter,
    FleetPage,
    FleetQueries,
)
from roller.tasks import TaskRegistry
from roller.web import history_html, stats_html
from roller.web.batches_html import FILTER_FIELDS, MEMBERS_SHOWN, filter_selector, form_request, limit_fields, pool_rows
from roller.web.events import EventHub
from roller.web.fleet_html import RowCache, fleet_rows_html, pool_strip
from roller.web.http import query_arg
from roller.web.machine_html import audit_rows_html, job_rows_html
from roller.web.proxy import client_ip, parse_trusted_proxies
from roller.web.runnable import why_not
from roller.web.times import utc

__all__ = [
    "CsrfError",
    "CsrfProtection",
    "Dashboard",
    "FleetFilter",
    "FleetPage",
    "FleetQueries",
    "IDashboardAuth",
    "LoopbackDashboardAuth",
    "Viewer",
    "find_asset_dir",
]

log = Logger()

#: what each asset directory must hold to be taken for roller's
_MARKERS = {"templates": "base.html", "static": "roller.css"}


def find_asset_dir(name: str, override: str | os.PathLike | None = None) -> Path:
    """
    Where roller's top-level C{templates/} or C{static/} directory is.

    With C{override}, that directory (it must exist).  Otherwise the first
    of: next to the C{roller} package (a source checkout, an editable
    install, C{PYTHONPATH=checkout}); C{<prefix>/share/roller/<name>} (where
    C{setup.py}'s C{data_files} install them with C{pip install .}).
    """
    if override is not None:
        path = Path(override)
        if not path.is_dir():
            raise FileNotFoundError(f"roller's {name} directory {path} does not exist")
        return path
    marker = _MARKERS.get(name, "")
    candidates = [Path(roller.__file__).resolve().parent.parent / name]
    for prefix in (sys.prefix, sysconfig.get_path("data"), sys.base_prefix):
        candidates.append(Path(prefix) / "share" / "roller" / name)
    for path in candidates:
        if (path / marker).is_file():
            return path
    raise FileNotFoundError(
        f"cannot find roller's {name}/ directory (looked in {', '.join(map(str, dict.fromkeys(candidates)))}); "
        f"reinstall roller or pass its location"
    )


#: what is worked out once per request and kept on it: the viewer (the error pages show it), the CSRF nonce
VIEWER_ATTR, NONCE_ATTR = "_roller_viewer", "_roller_csrf_nonce"


# -- CSRF ----------------------------------------------------------------------


class CsrfError(Forbidden):
    code = "csrf"


_NONCE = re.compile(r"[A-Za-z0-9_-]{43}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@define
class CsrfProtection:
    """
    Signed double-submit tokens.

    The browser holds a random nonce in an C{HttpOnly; SameSite=Strict}
    cookie; every form carries C{v1.<time>.<HMAC-SHA256(secret, nonce |
    viewer session | viewer id | time)>}.  Another site can neither read
    the cookie nor compute the signature, so it cannot forge a form; a
    token is good for C{max_age} seconds and only with its cookie, for its
    viewer, until roller restarts (the secret is made at start).  The
    C{Origin} header, when sent, must also name this host.
    """

    secret: bytes = field(factory=lambda: os.urandom(32), repr=False)
    max_age: float = 12 * 3600.0
    cookie_name: str = "roller_csrf"
    field_name: str = "csrf_token"

    def nonce(self, request: IRequest) -> str:
        """This browser's nonce, setting the cookie if it has none yet."""
        cached: str | None = getattr(request, NONCE_ATTR, None)
        if cached is not None:
            return cached
        raw = request.getCookie(self.cookie_name.encode())
        value = raw.decode("ascii", "replace") if raw else ""
        if not _NONCE.fullmatch(value):
            value = _b64(os.urandom(32))
            request.addCookie(self.cookie_name.encode(), value.encode(), path=b"/",  # type: ignore[call-arg]
                              httpOnly=True, sameSite="strict",  # (IRequest.addCookie omits them; Request has them)
                              secure=request.isSecure())
        setattr(request, NONCE_ATTR, value)
        return value

    def _sign(self, nonce: str, viewer: Viewer, issued: int) -> str:
        msg = f"{nonce}|{viewer.session}|{viewer.id}|{issued}".encode()
        return _b64(hmac.new(self.secret, msg, hashlib.sha256).digest())

    def token(self, request: IRequest, viewer: Viewer, now: float) -> str:
        issued = int(now)
        return f"v1.{issued}.{self._sign(self.nonce(request), viewer, issued)}"

    def verify(self, request: IRequest, form: dict[str, str], viewer: Viewer, now: float) -> None:
        """Raise L{CsrfError} (403) with a readable reason unless the POST is genuine."""
        reload = "Reload the page and try again."
        origin = request.getHeader(b"origin")
        if origin is not None:
            host = (request.getHeader(b"host") or b"").decode("latin-1").lower()
            netloc = urlsplit(origin.decode("latin-1")).netloc.lower()
            if not netloc or netloc != host:
                raise CsrfError(f"This form was sent from another site ({origin.decode('latin-1')[:100]}); "
                                "roller only accepts its own forms.")
        site = request.getHeader(b"sec-fetch-site")
        if site is not None and site.lower() == b"cross-site":
            raise CsrfError("This form was sent from another site; roller only accepts its own forms.")
        token = form.get(self.field_name, "")
        if not token:
            raise CsrfError(f"The form has no security token (csrf_token), so it cannot be trusted. {reload}")
        raw = request.getCookie(self.cookie_name.encode())
        nonce = raw.decode("ascii", "replace") if raw else ""
        if not _NONCE.fullmatch(nonce):
            raise CsrfError("Your browser did not send roller's security cookie with the form; cookies "
                            f"must be enabled for this site. {reload}")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != "v1" or not parts[1].isdigit() or len(parts[1]) > 12:
            raise CsrfError(f"The form's security token is malformed. {reload}")
        issued = int(parts[1])
        if not hmac.compare_digest(parts[2], self._sign(nonce, viewer, issued)):
            raise CsrfError("The form's security token is not valid (roller restarted since the page was "
                            f"loaded, or the form came from elsewhere). {reload}")
        if now - issued > self.max_age or issued - now > 300:
            raise CsrfError(f"The page is too old (its form expired after {self.max_age / 3600:g} h). {reload}")


# -- presentation helpers -----------------------------------------------------------


def ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    delta = now - ts
    future = delta < 0
    delta = abs(delta)
    if delta < 1:
        return "just now"
    if delta < 90:
        text = f"{delta:.0f} s"
    elif delta < 90 * 60:
        text = f"{delta / 60:.0f} min"
    elif delta < 36 * 3600:
        text = f"{delta / 3600:.0f} h"
    else:
        text = f"{delta / 86400:.0f} days"
    return f"in {text}" if future else f"{text} ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def outcome(job: Job, position: int | None = None, queued: int = 0) -> str:
    """What happened to a job, in one plain sentence."""
    s = job.state
    if s is State.queued:
        where = f" (position {position} of {queued})" if position else ""
        return f"Waiting in the queue{where}: it starts when the machine and its power/BMC endpoints are free."
    if s is State.running:
        return "Running now; the log below updates live."
    if s is State.succeeded:
        return f"Succeeded: {job.result}" if job.result else "Succeeded."
    if s is State.failed:
        return f"Failed: {job.error}" if job.error else "Failed, without a reason recorded."
    if s is State.timed_out:
        return f"Gave up: the job {job.error or 'timed out'}, and was stopped."
    if s is State.cancelled:
        return f"Cancelled ({job.error})." if job.error else "Cancelled."
    if s is State.interrupted:
        return ("Interrupted: roller stopped while this job was running, so its outcome is unknown. "
                "Check the machine and run the task again if needed.")
    return s.value


def machine_url(worker_group: str, worker_id: str) -> str:
    return f"/machines/{quote(worker_group, safe='')}/{quote(worker_id, safe='')}"


def job_url(job_id: str) -> str:
    return f"/jobs/{quote(job_id, safe='')}"


def batch_url(batch_id: str) -> str:
    return f"/batches/{quote(batch_id, safe='')}"


def template_environment(templates_dir: str | None = None,
                         scope_prefix: str = "project:releng:roller:") -> Environment:
    """The dashboard's Jinja2 environment: autoescaped, strict, with its filters and globals."""
    env = Environment(
        loader=FileSystemLoader(str(find_asset_dir("templates", templates_dir))),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["iso"] = iso
    env.filters["duration"] = duration
    env.filters["hms"] = lambda ts: utc(ts, "time")
    env.filters["utc"] = utc
    env.filters["compact_json"] = lambda v: json.dumps(v, sort_keys=True, separators=(", ", ": "))
    env.globals["machine_url"] = machine_url
    env.globals["job_url"] = job_url
    env.globals["batch_url"] = batch_url
    env.globals["version"] = __version__
    env.globals["scope_prefix"] = scope_prefix
    env.globals["batches_enabled"] = False
    return env


def _event_key(e: JobEvent) -> tuple[float, str, str]:
    return (round(e.time, 6), e.kind, e.message)


def merge_events(stored: list[JobEvent], live: list[JobEvent]) -> list[JobEvent]:
    """
    A job's timeline: the stored events plus those only the hub has seen
    yet (the queue announces an event before its write commits).  Events
    are matched by (time, kind, message), counting repeats.
    """
    have: dict[tuple, int] = {}
    for e in stored:
        k = _event_key(e)
        have[k] = have.get(k, 0) + 1
    extra = []
    for e in live:
        k = _event_key(e)
        if have.get(k, 0) > 0:
            have[k] -= 1
        else:
            extra.append(e)
    if not extra:
        return stored
    return sorted([*stored, *extra], key=lambda e: e.time)


_JOB_ID = re.compile(r"[-0-9A-Za-z]{1,64}")
_BATCH_ID = re.compile(r"[-_0-9A-Za-z]{1,64}")
_NEXT = re.compile(r"/(queue|jobs/[-0-9A-Za-z]{1,64}|machines/[-_0-9A-Za-z]{1,128}/[-_0-9A-Za-z]{1,128})?")
_INT = re.compile(r"[0-9]{1,9}")
#: jobs listed per table of the queue page (and so checked at most, per table, for "Cancel selected")
_QUEUE_LIMIT = 500
_FORM_MAX = 64 * 1024

_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_TITLES = {400: "Bad request", 401: "Sign-in needed", 403: "Not allowed", 404: "Not found",
           405: "Method not allowed", 409: "Conflict", 413: "Too large", 500: "Internal error",
           503: "Unavailable"}


#: renders the sign-in and setup forms (CSRF tokens bound to no one)
_ANONYMOUS = Viewer(id="anonymous", name="")
_UNSAFE_NEXT = re.compile(r"[\x00-\x20\\\x7f]")


def _safe_next(value: str | None) -> str | None:
    """C{value} if it is a path on this site to go back to after sign-in, else None."""
    if (not value or len(value) > 1000 or not value.startswith("/") or value.startswith("//")
            or _UNSAFE_NEXT.search(value) or value.startswith(("/login", "/logout", "/setup"))):
        return None
    return value


def _last(form: dict[str, list[str]], name: str) -> str:
    values = form.get(name) or [""]
    return values[-1]


def _arg(request: IRequest, name: str) -> str | None:
    """A query parameter, stripped; None when missing or blank."""
    return (query_arg(request, name) or "").strip() or None


def _form(request: IRequest) -> dict[str, str]:
    """
    The urlencoded form body (never the query string).  Anything that is
    not a urlencoded form reads as an empty form, which then lacks its
    CSRF token.
    """
    return {k: v[-1] for k, v in form_lists(request).items()}


def form_lists(request: IRequest, max_fields: int = 50) -> dict[str, list[str]]:
    """
    The urlencoded form body with every value of each field (checkboxes
    sharing a name), at most C{max_fields} fields; as L{_form} otherwise.
    """
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != b"application/x-www-form-urlencoded" or request.content is None:
        return {}
    request.content.seek(0)
    raw = request.content.read(_FORM_MAX + 1)
    if len(raw) > _FORM_MAX:
        raise BadRequest(f"the form is larger than {_FORM_MAX} bytes", code="payload_too_large", status=413)
    try:
        return parse_qs(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=max_fields)
    except UnicodeDecodeError:
        raise BadRequest("the form is not valid UTF-8 form data", code="invalid_form") from None
    except ValueError:
        raise BadRequest(f"the form has more than {max_fields} fields", code="invalid_form") from None


@frozen
class TaskButton:
    name: str
    description: str
    destructive: bool
    permitted: bool


@define
class Dashboard:
    """
    @param store: the store (machines, jobs, audit; and its C{db} for
        L{FleetQueries}).
    @param queue: where buttons submit and cancel jobs.
    @param tasks: the task registry.
    @param allowed_tasks: the task names offered (the API's allow-list).
    @param clock: the injected clock.
    @param hub: the L{roller.web.events.EventHub} (for the job page's live
        log); without one the pages are static.
    @param auth: an L{IDashboardAuth}.
    @param csrf: the L{CsrfProtection} (a fresh random secret by default).
    @param scope_prefix: as the API's: a viewer needs C{prefix + task} to
        run a task and C{prefix + "jobs:cancel"} to cancel.
    @param templates_dir: overrides L{find_asset_dir}C{("templates")}.
    @param page_size: machines per fleet page.
    @param trusted_proxies: as the API's: whose C{X-Forwarded-For} names the
        client recorded with jobs and audit entries.
    @param batches: the L{BatchService}; without one the fleet page offers
        no selection and C{/batches} is a 404.
    """

    store: Store
    queue: JobQueue
    tasks: TaskRegistry
    allowed_tasks: tuple[str, ...]
    clock: IReactorTime = field(kw_only=True)
    hub: EventHub | None = field(default=None, kw_only=True)
    auth: IDashboardAuth = field(factory=LoopbackDashboardAuth, kw_only=True)
    csrf: CsrfProtection = field(factory=CsrfProtection, kw_only=True)
    scope_prefix: str = field(default="project:releng:roller:", kw_only=True)
    templates_dir: str | None = field(default=None, kw_only=True)
    page_size: int = field(default=200, kw_only=True)
    trusted_proxies: tuple = field(default=(), converter=parse_trusted_proxies, kw_only=True)
    #: fleet health (L{roller.health.watcher.HealthWatcher}), when the service runs one
    health: HealthWatcher | None = field(default=None, kw_only=True)
    #: batches (L{roller.batches.service.BatchService}): the fleet page's selection, the batch pages
    batches: BatchService | None = field(default=None, kw_only=True)
    fleet: FleetQueries = field(init=False, default=None)
    fleet_rows: RowCache = field(init=False, factory=RowCache)
    env: Environment = field(init=False, default=None)

    app = Klein()

    def __attrs_post_init__(self) -> None:
        self.fleet = FleetQueries(self.store, clock=self.clock)
        self.env = template_environment(self.templates_dir, self.scope_prefix)
        self.env.globals["batches_enabled"] = self.batches is not None
        if self.hub is not None and self.batches is not None:
            self.hub.watch_batches(self.batches)  # the batch pages' live stream

    def authorize(self, request: IRequest) -> Deferred[Viewer]:
        """The viewer behind C{request} (for other resources, e.g. the event stream)."""
        return self.auth.viewer(request)

    # -- rendering

    def _headers(self, request: IRequest) -> None:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", _CSP.encode())
        request.setHeader(b"X-Frame-Options", b"DENY")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"same-origin")

    def render(self, request: IRequest, template: str, viewer: Viewer | None, *, status: int = 200,
               **context: Any) -> bytes:
        now = self.clock.seconds()
        self._headers(request)
        request.setResponseCode(status)
        token = self.csrf.token(request, viewer, now) if viewer is not None else ""
        path = request.path.decode("utf-8", "replace")
        html = self.env.get_template(template).render(
            viewer=viewer, csrf_token=token, csrf_field_name=self.csrf.field_name, now=now, path=path,
            ago=lambda ts: ago(ts, now), section=context.pop("section", ""), **context,
        )
        return html.encode("utf-8")

    def _error_page(self, request: IRequest, status: int, message: str, viewer: Viewer | None = None,
                    csrf: bool = False) -> bytes:
        return self.render(request, "error.html", viewer, status=status, title=_TITLES.get(status, "Error"),
                           status_code=status, message=message, csrf=csrf)

    # -- errors as pages

    @app.handle_errors(RollerError)
    def _roller_error(self, request: IRequest, failure: Any) -> bytes:
        e = failure.value
        if isinstance(e, Unauthorized) and e.code in ("sign_in_required", "session_expired"):
            if getattr(self.auth, "login", None) is not None:
                return self._to_login(request, e)
        if getattr(e, "retry_after", None) is not None:  # StorageUnavailable: 503, readable page
            request.setHeader(b"Retry-After", str(int(e.retry_after)).encode())
        return self._error_page(request, e.status, e.message, getattr(request, VIEWER_ATTR, None),
                                csrf=isinstance(e, CsrfError))

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request: IRequest, failure: Any) -> bytes:
        allowed = sorted(set(failure.value.valid_methods or ()))
        request.setHeader(b"Allow", ", ".join(allowed).encode())
        return self._error_page(request, 405, f"{request.method.decode('latin-1')} is not allowed here.")

    @app.handle_errors(RouteNotFound)
    def _route_not_found(self, request: IRequest, failure: Any) -> bytes:
        return self._error_page(request, 404, "There is no such page in roller's dashboard.")

    @app.handle_errors(HTTPException)
    def _http_exception(self, request: IRequest, failure: Any) -> bytes:
        e = failure.value
        return self._error_page(request, e.code or 400, e.description or e.name)

    @app.handle_errors(Exception)
    def _internal(self, request: IRequest, failure: Any) -> bytes:
        error_id = secrets.token_hex(4)
        log.failure("Dashboard error in {method} {path} (id {error_id})", failure,
                    method=request.method.decode("latin-1"), path=request.path.decode("latin-1")[:200],
                    error_id=error_id)
        return self._error_page(request, 500, f"Something went wrong inside roller; the server log has the "
                                              f"details under id {error_id}.")

    # -- plumbing

    async def _viewer(self, request: IRequest) -> Viewer:
        viewer = await self.auth.viewer(request)
        setattr(request, VIEWER_ATTR, viewer)
        return viewer

    async def _post(self, request: IRequest) -> tuple[Viewer, dict[str, str]]:
        """Viewer and form of a POST whose CSRF token checked out."""
        viewer = await self._viewer(request)
        form = _form(request)
        self.csrf.verify(request, form, viewer, self.clock.seconds())
        return viewer, form

    async def _post_lists(self, request: IRequest, max_fields: int) -> tuple[Viewer, dict[str, list[str]]]:
        """As L{_post}, keeping every value of a field (checkboxes)."""
        viewer = await self._viewer(request)
        lists = form_lists(request, max_fields)
        self.csrf.verify(request, {k: v[-1] for k, v in lists.items()}, viewer, self.clock.seconds())
        return viewer, lists

    @staticmethod
    def _redirect(request: IRequest, location: str) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"Location", location.encode("utf-8"))
        request.setHeader(b"Cache-Control", b"no-store")
        return b""

    def _buttons(self, viewer: Viewer) -> list[TaskButton]:
        out = []
        for name in self.allowed_tasks:
            spec = self.tasks.get(name)
            if spec is not None:
                out.append(TaskButton(name, spec.description, spec.destructive,
                                      viewer.may(self.scope_prefix + name)))
        return out

    def _batch_tasks(self, viewer: Viewer) -> list[TaskButton]:
        """The tasks C{viewer} may run as a batch (none without C{batches:create}, or without batches)."""
        if self.batches is None or not viewer.may(self.scope_prefix + "batches:create"):
            return []
        return [b for b in self._buttons(viewer) if b.permitted]

    def _live(self, job: Job) -> Job:
        return self.queue.active(job.id) or job

    # -- sign-in, sign-out and first-admin setup (L{roller.auth.accounts.AccountAuth})

    def _accounts(self) -> AccountAuth:
        if not isinstance(self.auth, AccountAuth):
            raise NotFound("This roller's dashboard has no accounts to sign in to.", code="no_accounts")
        return self.auth

    def _to_login(self, request: IRequest, e: Unauthorized) -> bytes:
        if request.method in (b"GET", b"HEAD"):
            target = request.uri.decode("utf-8", "replace")
            query = {"next": target} if _safe_next(target) not in ("/", None) else {}
            if e.code == "session_expired":
                query["expired"] = "1"
            return self._redirect(request, "/login" + ("?" + urlencode(query) if query else ""))
        return self._error_page(request, 401, f"{e.message} (nothing was done)")

    async def _signed_in(self, request: IRequest) -> Viewer | None:
        try:
            viewer = await self.auth.viewer(request)
        except Unauthorized:
            return None
        return viewer if viewer.session else None

    def _login_page(self, request: IRequest, *, status: int = 200, error: str | None = None, name: str = "",
                    next_: str = "/", notice: str | None = None, setup: bool = False) -> bytes:
        return self.render(request, "login.html", _ANONYMOUS, status=status, error=error, name=name,
                           next_url=next_, notice=notice, setup=setup)

    @app.route("/login", methods=["GET"])
    async def login_page(self, request: IRequest) -> bytes:
        auth = self._accounts()
        next_ = _safe_next(_arg(request, "next")) or "/"
        if await self._signed_in(request) is not None:
            return self._redirect(request, next_)
        notice = None
        if _arg(request, "expired") == "1":
            notice = "Your session has expired; sign in again."
        elif _arg(request, "signed_out") == "1":
            notice = "You are signed out."
        return self._login_page(request, next_=next_, notice=notice, setup=await auth.setup_pending())

    @app.route("/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        auth = self._accounts()
        form = _form(request)
        self.csrf.verify(request, form, _ANONYMOUS, self.clock.seconds())
        name, password = form.get("user", "").strip(), form.get("password", "")
        next_ = _safe_next(form.get("next")) or "/"
        ip = client_ip(request, self.trusted_proxies)
        try:
            user, session_id = await auth.login(name, password, ip)
        except RollerError as e:
            log.info("Dashboard sign-in refused for {name!r} from {ip}: {code}", name=name[:64], ip=ip, code=e.code)
            retry_after = getattr(e, "retry_after", None)
            if retry_after:
                request.setHeader(b"Retry-After", str(retry_after).encode())
            return self._login_page(request, status=e.status, error=e.message, name=name[:64], next_=next_)
        auth.set_cookie(request, session_id)
        await self.store.audit.add(AuditEntry(
            time=self.clock.seconds(), actor=f"user:{user.name}", source_ip=ip, action="user.login",
            target=f"user:{user.name}", result="signed in", params={"via": "dashboard"}))
        return self._redirect(request, next_)

    @app.route("/logout", methods=["POST"])
    async def logout(self, request: IRequest) -> bytes:
        auth = self._accounts()
        viewer, _ = await self._post(request)
        await auth.logout(viewer)
        auth.clear_cookie(request)
        if viewer.session:
            await self.store.audit.add(AuditEntry(
                time=self.clock.seconds(), actor=viewer.id, source_ip=client_ip(request, self.trusted_proxies),
                action="user.logout", target=viewer.id, result="signed out", params={"via": "dashboard"}))
        return self._redirect(request, "/login?signed_out=1")

    @app.route("/setup", methods=["GET"])
    async def setup_page(self, request: IRequest) -> bytes:
        auth = self._accounts()
        if not await auth.setup_pending():
            raise NotFound("Setup is done: sign in with your account.", code="setup_done")
        token = _arg(request, "token") or ""
        auth.check_setup_token(token)
        return self.render(request, "setup.html", _ANONYMOUS, token=token, error=None, name="")

    @app.route("/setup", methods=["POST"])
    async def setup(self, request: IRequest) -> bytes:
        auth = self._accounts()
        form = _form(request)
        self.csrf.verify(request, form, _ANONYMOUS, self.clock.seconds())
        if not await auth.setup_pending():
            raise NotFound("Setup is done: sign in with your account.", code="setup_done")
        token, name = form.get("token", ""), form.get("user", "").strip()
        auth.check_setup_token(token)
        password = form.get("password", "")
        if password != form.get("password2", ""):
            return self.render(request, "setup.html", _ANONYMOUS, status=400, token=token, name=name[:64],
                               error="The two passwords differ.")
        try:
            user = await auth.setup_admin(token, name, password)
        except BadRequest as e:
            return self.render(request, "setup.html", _ANONYMOUS, status=400, token=token, name=name[:64],
                               error=e.message)
        ip = client_ip(request, self.trusted_proxies)
        await self.store.audit.add(AuditEntry(
            time=self.clock.seconds(), actor="setup-token", source_ip=ip, action="user.add",
            target=f"user:{user.name}", result="created admin", params={"role": "admin", "via": "setup page"}))
        _, session_id = await auth.login(name, password, ip)
        auth.set_cookie(request, session_id)
        return self._redirect(request, "/")

    # -- pages

    @app.route("/", methods=["GET"])
    async def fleet_page(self, request: IRequest) -> bytes:
        viewer = await self._viewer(request)
        group, pool, state = _arg(request, "group"), _arg(request, "pool"), _arg(request, "state")
        q, health = _arg(request, "q"), _arg(request, "health")
        liveness, loan, tag = _arg(request, "liveness"), _arg(request, "loan"), _arg(request, "tag")
        if health is not None and health not in HEALTH_STATES:
            raise BadRequest(f"health must be one of {', '.join(HEALTH_STATES)}")
        if liveness is not None and liveness not in LIVENESS_STATES:
            raise BadRequest(f"liveness must be one of {', '.join(LIVENESS_STATES)}")
        if loan is not None and loan not in LOAN_STATES:
            raise BadRequest(f"loan must be one of {', '.join(LOAN_STATES)}")
        if tag is not None and not TAG_RE.fullmatch(tag):
            raise BadRequest("tag must be a tag (letters, digits and -_.:/)")
        if group is not None and not valid_worker_id(group):
            raise BadRequest("group must be a worker group name (letters, digits, '-' and '_')")
        if pool is not None and not TAG_RE.fullmatch(pool):
            raise BadRequest("pool must be a pool name (letters, digits and -_.:/)")
        if state is not None and state not in FILTER_STATES:
            raise BadRequest(f"state must be one of {', '.join(FILTER_STATES)}")
        if q is not None and len(q) > 200:
            raise BadRequest("the search text must be at most 200 characters")
        sort = _arg(request, "sort") or PROBLEMS
        if sort not in SORTS:
            raise BadRequest(f"sort must be one of {', '.join(SORTS)}")
        direction = _arg(request, "dir") or SORTS[sort][2]
        if direction not in ("asc", "desc"):
            raise BadRequest("dir must be asc or desc")
        raw_page = _arg(request, "page") or "1"
        if not _INT.fullmatch(raw_page) or int(raw_page) < 1:
            raise BadRequest("page must be a number from 1")
        page_no = int(raw_page)
        now = self.clock.seconds()
        filt = FleetFilter(q=q, group=group, pool=pool, state=state, health=health, liveness=liveness, loan=loan,
                           tag=tag)
        page = await self.fleet.page(filt, sort=sort, direction=direction, limit=self.page_size,
                                     offset=(page_no - 1) * self.page_size, now=now)
        rows = []
        for row in page.rows:
            state_now = row.last.state if row.last else None
            if row.last is not None and state_now in ("queued", "running"):
                active = self.queue.active(row.last.id)
                if active is not None:
                    state_now = active.state.value
            rows.append((row, state_now))
        filter_values = {"q": q, "group": group, "pool": pool, "state": state, "health": health,
                         "liveness": liveness, "loan": loan, "tag": tag}
        params = {k: v for k, v in (*filter_values.items(),
                                    ("sort", None if sort == PROBLEMS else sort),
                                    ("dir", None if direction == SORTS[sort][2] else direction)) if v}

        def link(**changes: Any) -> str:
            merged = {**params, **changes}
            merged = {k: v for k, v in merged.items() if v not in (None, "", 1)}
            return "/" + ("?" + urlencode(merged) if merged else "")

        def sort_link(key: str) -> str:
            default = SORTS[key][2]
            new = ("desc" if direction == "asc" else "asc") if key == sort else default
            return link(sort=None if key == PROBLEMS else key, dir=None if new == default else new, page=None)

        def aria_sort(key: str) -> str | None:
            return None if key != sort else ("ascending" if direction == "asc" else "descending")

        pages = max(1, -(-page.total // self.page_size))
        batch_tasks = self._batch_tasks(viewer)
        running_jobs = self.queue.running()
        stream_url = None
        if self.hub is not None:
            stream_url = "/events?" + urlencode({"kinds": "state", "after": self.hub.last_id})
        return self.render(
            request, "fleet.html", viewer, section="fleet", rows=rows, page=page, filt=filt, sort=sort,
            direction=direction, sorts=SORTS, states=FILTER_STATES, page_no=page_no, pages=pages,
            page_size=self.page_size, link=link, sort_link=sort_link, aria_sort=aria_sort,
            rows_html=fleet_rows_html(rows, lambda ts: ago(ts, now), self.fleet_rows, now=now,
                                      pick=bool(batch_tasks)),
            batch_tasks=batch_tasks,
            batch_filter=[(k, v) for k, v in filter_values.items() if v and k in FILTER_FIELDS],
            # "select all matching" only for filters a batch selector says the same way
            filter_active=bool(filter_selector(filter_values)) and not (liveness or loan or tag),
            filtered=any(filter_values.values()),
            running=len(running_jobs), queued=self.queue.depth, stream_url=stream_url,
            pool_strip=pool_strip(page.strip if page.strip is not None else await self.fleet.pools(),
                                  self._running_by_pool(running_jobs)),
            machine_total=sum(page.counts.values()), health_states=HEALTH_STATES, strip_columns=STRIP,
            liveness_states=LIVENESS_STATES, loan_states=LOAN_STATES, default_sort=PROBLEMS,
            history_since=iso(now - 86400)[:19] + "Z",
            health=self.health, may_admin_health=viewer.may(self.scope_prefix + "health:admin"),
            sparkline=await stats_html.fleet_sparkline(self),
        )

    def _running_by_pool(self, running: list[Job]) -> dict[str, int]:
        """Machines running a job now, by pool (from the queue: what runs this very moment)."""
        out: dict[str, int] = {}
        seen: set[tuple[str, str]] = set()
        for job in running:
            key = (job.worker_group, job.worker_id)
            machine = self.store.machines.cached(key)
            if key in seen or machine is None or not machine.pool:
                continue
            seen.add(key)
            out[machine.pool] = out.get(machine.pool, 0) + 1
        return out

    @app.route("/machines/<worker_group>/<worker_id>", methods=["GET"])
    async def machine_page(self, request: IRequest, worker_group: str, worker_id: str) -> bytes:
        viewer = await self._viewer(request)
        machine = await self._machine(worker_group, worker_id)
        # the three reads are asked for at once: the reader runs them back to back, and the page
        # waits for one hand-off from its thread instead of three in turn
        jobs_d = self.store.jobs.list(worker_id=worker_id, worker_group=worker_group, limit=25)
        audit_d: Deferred[Any] = succeed(None)  # left out for viewers who may not read it
        if viewer.may(self.scope_prefix + "audit:read"):
            audit_d = self.store.audit.list(target=f"{worker_group}/{worker_id}", limit=50)
        found, audit, (loan, liveness, _) = await all_of(jobs_d, audit_d,
                                                         self.fleet.machine_extras(worker_group, worker_id))
        jobs = [self._live(j) for j in found]
        now = self.clock.seconds()
        health = self.health.health_of(machine.key) if self.health is not None else None
        buttons, unavailable = [], []
        for b in self._buttons(viewer):
            reason = why_not(b.name, machine, loan)
            if reason is None:
                buttons.append(b)
            else:
                unavailable.append((b, reason))
        return self.render(
            request, "machine.html", viewer, section="fleet", machine=machine, jobs=jobs, audit=audit,
            job_rows=job_rows_html(jobs, lambda ts: ago(ts, now), duration),
            audit_rows=audit_rows_html(audit or (), lambda ts: ago(ts, now)),
            health=health, health_state=self.health.state_of(machine.key) if self.health is not None else None,
            may_admin_health=viewer.may(self.scope_prefix + "health:admin"),
            loan=loan, loan_overdue=loan is not None and loan.overdue(now), liveness=liveness,
            buttons=buttons, unavailable=unavailable, any_tasks=bool(buttons or unavailable),
            credentials=sorted(machine.credentials()), access=_access_rows(machine),
            history_url="/jobs?" + urlencode({"group": machine.worker_group, "worker": machine.worker_id}),
        )

    async def _machine(self, worker_group: str, worker_id: str) -> Machine:
        machine = None
        if valid_worker_id(worker_group) and valid_worker_id(worker_id):
            machine = await self.store.machines.get(worker_group, worker_id)
        if machine is None:
            raise NotFound(f"There is no machine {worker_id[:128]} in worker group {worker_group[:128]}.",
                           code="unknown_machine")
        return machine

    @app.route("/machines/<worker_group>/<worker_id>/jobs", methods=["POST"])
    async def submit_job(self, request: IRequest, worker_group: str, worker_id: str) -> bytes:
        viewer, form = await self._post(request)
        machine = await self._machine(worker_group, worker_id)
        task_name = form.get("task", "")
        spec = self.tasks.get(task_name) if task_name in self.allowed_tasks else None
        if spec is None:
            raise BadRequest(f"{task_name[:64]!r} is not a task this roller runs from the dashboard.",
                             code="unknown_task")
        if not viewer.may(self.scope_prefix + task_name):
            raise Forbidden(f"{viewer.name} may not run {task_name} (needs {self.scope_prefix + task_name}).",
                            code="insufficient_scope")
        reason = form.get("reason", "").strip()
        if len(reason) > 1000:
            raise BadRequest("the reason must be at most 1000 characters", code="invalid_form")
        if spec.destructive and form.get("confirm") != "yes":
            return self.render(request, "confirm.html", viewer, section="fleet", machine=machine, spec=spec,
                               reason=reason)
        target = f"{machine.worker_group}/{machine.worker_id}"
        ip = client_ip(request, self.trusted_proxies)
        job, created = await self.queue.submit(
            task_name, machine, requester=viewer.id, origin_ip=ip, reason=reason,
            audit=lambda job: AuditEntry(
                time=job.created_at, actor=viewer.id, source_ip=ip, action=f"job.create:{task_name}",
                target=target, result=f"queued {job.id}",
                params={"params": job.params, "priority": job.priority, "reason": reason, "via": "dashboard"},
            ),
        )
        self.fleet.forget()
        location = f"/jobs/{quote(job.id, safe='')}"
        return self._redirect(request, location if created else location + "?existing=1")

    @app.route("/machines/<worker_group>/<worker_id>/maintenance", methods=["POST"])
    async def set_maintenance(self, request: IRequest, worker_group: str, worker_id: str) -> bytes:
        viewer, form = await self._post(request)
        machine = await self._machine(worker_group, worker_id)
        self._may_admin_health(viewer)
        on = form.get("maintenance")
        if on not in ("on", "off"):
            raise BadRequest("maintenance must be on or off", code="invalid_form")
        reason = form.get("reason", "").strip()
        if len(reason) > 1000:
            raise BadRequest("the reason must be at most 1000 characters", code="invalid_form")
        watcher = self._watcher()
        await watcher.set_maintenance(machine.key, on == "on", viewer.id, reason,
                                      source_ip=client_ip(request, self.trusted_proxies), via="dashboard")
        self.fleet.forget()  # the fleet page shows it at once
        return self._redirect(request, machine_url(machine.worker_group, machine.worker_id))

    @app.route("/health/<action>", methods=["POST"])
    async def pause_or_resume(self, request: IRequest, action: str) -> bytes:
        viewer, form = await self._post(request)
        if action not in ("pause", "resume"):
            raise NotFound("no such page", code="not_found")
        self._may_admin_health(viewer)
        watcher = self._watcher()
        await watcher.set_paused(action == "pause", viewer.id, source_ip=client_ip(request, self.trusted_proxies),
                                 via="dashboard")
        return self._redirect(request, "/")

    def _may_admin_health(self, viewer: Viewer) -> None:
        if not viewer.may(self.scope_prefix + "health:admin"):
            raise Forbidden(f"{viewer.name} may not change fleet health settings (needs "
                            f"{self.scope_prefix}health:admin).", code="insufficient_scope")

    def _watcher(self) -> HealthWatcher:
        if self.health is None:
            raise NotFound("fleet health is not running in this roller", code="not_found")
        return self.health

    @app.route("/jobs", methods=["GET"])
    async def jobs_history(self, request: IRequest) -> bytes:
        """Finished and live jobs, filtered and paged (L{roller.web.history_html})."""
        viewer = await self._viewer(request)
        return await history_html.jobs_page(self, request, viewer)

    @app.route("/stats", methods=["GET"])
    async def stats(self, request: IRequest) -> bytes:
        """Charts of the job history (L{roller.web.stats_html})."""
        viewer = await self._viewer(request)
        return await stats_html.stats_page(self, request, viewer)

    @app.route("/jobs/<job_id>", methods=["GET"])
    async def job_page(self, request: IRequest, job_id: str) -> bytes:
        viewer = await self._viewer(request)
        job = await self._job(job_id)
        stored = await self.store.jobs.events(job_id, limit=1000)
        # Everything the hub numbered up to now is either stored or in its
        # buffer; the page's stream resumes after it.
        job = self._live(job)
        stream_url, timeline = None, stored
        if self.hub is not None:
            upto = self.hub.last_number
            if len(stored) < 1000:
                timeline = merge_events(stored, [e.event for e in self.hub.recent(job_id, upto=upto)])
            if not job.state.final:
                stream_url = "/events?" + urlencode({"job": job.id, "after": self.hub.wire_id(upto)})
        position = None
        queued = self.queue.queued() if job.state is State.queued else []
        for i, j in enumerate(queued, 1):
            if j.id == job.id:
                position = i
                break
        try:
            machine = await self.store.machines.get(job.worker_group, job.worker_id)
        except StoreError:  # the job page shows without its machine's details
            machine = None
        return self.render(
            request, "job.html", viewer, section="queue", job=job, events=timeline, stream_url=stream_url,
            truncated=len(stored) >= 1000, outcome=outcome(job, position, len(queued)), machine=machine,
            may_cancel=viewer.may(self.scope_prefix + "jobs:cancel"),
            existing=_arg(request, "existing") == "1", cancelled=_arg(request, "cancelled") == "1",
        )

    async def _job(self, job_id: str) -> Job:
        job = None
        if _JOB_ID.fullmatch(job_id):
            job = self.queue.active(job_id) or await self.store.jobs.get(job_id)
        if job is None:
            raise NotFound(f"There is no job {job_id[:64]}.", code="unknown_job")
        return job

    @app.route("/jobs/<job_id>/cancel", methods=["POST"])
    async def cancel_job(self, request: IRequest, job_id: str) -> bytes:
        viewer, form = await self._post(request)
        if not viewer.may(self.scope_prefix + "jobs:cancel"):
            raise Forbidden(f"{viewer.name} may not cancel jobs (needs {self.scope_prefix}jobs:cancel).",
                            code="insufficient_scope")
        await self._job(job_id)
        job = await self.queue.cancel(job_id, by=viewer.id)
        await self.store.audit.add(AuditEntry(
            time=self.clock.seconds(), actor=viewer.id, source_ip=client_ip(request, self.trusted_proxies),
            action="job.cancel",
            target=f"{job.worker_group}/{job.worker_id}", result=f"{job.state.value} {job.id}",
            params={"via": "dashboard"},
        ))
        back = form.get("next", "")
        if not _NEXT.fullmatch(back):
            back = f"/jobs/{quote(job.id, safe='')}"
        if back == "/queue":
            return self._redirect(request, "/queue?" + urlencode({"cancelled": job.id}))
        if back.startswith("/jobs/"):
            return self._redirect(request, back + "?cancelled=1")
        return self._redirect(request, back)

    @app.route("/queue", methods=["GET"])
    async def queue_page(self, request: IRequest) -> bytes:
        viewer = await self._viewer(request)
        notice = None
        cancelled = _arg(request, "cancelled")
        if cancelled and _JOB_ID.fullmatch(cancelled):
            job = await self.store.jobs.get(cancelled)
            if job is not None:
                notice = (f"Cancelled job {job.id[:8]}… ({job.task_name} on {job.worker_id}): "
                          f"it is now {job.state.value}.")
        return self._queue_page(request, viewer, notice=notice)

    @app.route("/queue/cancel", methods=["POST"])
    async def cancel_jobs(self, request: IRequest) -> bytes:
        """Cancel the checked jobs of the queue page, each as the single cancel does; say what became of each."""
        viewer, form = await self._post_lists(request, 2 * _QUEUE_LIMIT + 10)
        if not viewer.may(self.scope_prefix + "jobs:cancel"):
            raise Forbidden(f"{viewer.name} may not cancel jobs (needs {self.scope_prefix}jobs:cancel).",
                            code="insufficient_scope")
        ids = list(dict.fromkeys(form.get("job", [])))
        bad = [i for i in ids if not _JOB_ID.fullmatch(i)]
        if bad:
            raise BadRequest(f"{bad[0][:64]!r} is not a job id", code="invalid_form")
        if not ids:
            return self._queue_page(request, viewer, status=400,
                                    notice="No job was selected: tick the jobs to cancel first. Nothing was done.")
        ip = client_ip(request, self.trusted_proxies)
        cancelled: list[Job] = []
        ended: list[Job] = []
        unknown: list[str] = []
        for job_id in ids:
            try:
                job = await self.queue.cancel(job_id, by=viewer.id)
            except NotFound:
                unknown.append(job_id)
                continue
            except Conflict:
                stored = await self.store.jobs.get(job_id)
                if stored is None:
                    unknown.append(job_id)
                else:
                    ended.append(stored)
                continue
            cancelled.append(job)
            await self.store.audit.add(AuditEntry(
                time=self.clock.seconds(), actor=viewer.id, source_ip=ip, action="job.cancel",
                target=f"{job.worker_group}/{job.worker_id}", result=f"{job.state.value} {job.id}",
                params={"via": "dashboard"},
            ))
        return self._queue_page(request, viewer, summary={"cancelled": cancelled, "ended": ended,
                                                          "unknown": unknown})

    def _queue_page(self, request: IRequest, viewer: Viewer, *, notice: str | None = None,
                    summary: dict[str, Any] | None = None, status: int = 200) -> bytes:
        running = sorted(self.queue.running(), key=lambda j: j.started_at or 0)
        queued = self.queue.queued()
        limit = _QUEUE_LIMIT
        stream_url = None
        if self.hub is not None:
            stream_url = "/events?" + urlencode({"kinds": "state", "after": self.hub.last_id})
        return self.render(
            request, "queue.html", viewer, status=status, section="queue", running=running[:limit],
            queued=queued[:limit], stream_url=stream_url,
            running_total=len(running), queued_total=len(queued), limit=limit, notice=notice, summary=summary,
            may_cancel=viewer.may(self.scope_prefix + "jobs:cancel"),
        )

    # -- batches

    def _batches(self) -> BatchService:
        if self.batches is None:
            raise NotFound("batches are not running in this roller", code="not_found")
        return self.batches

    @app.route("/batches", methods=["POST"])
    async def batch_form(self, request: IRequest) -> bytes:
        """
        The fleet page's selection: without C{confirm=yes}, the confirmation
        page (what would run where, within which limits); with it, the batch.
        """
        service = self._batches()
        viewer, form = await self._post_lists(request, self.page_size + 50)
        body, hidden, typed = form_request(form)
        task_name = body["task_name"]
        spec = self.tasks.get(task_name) if task_name in self.allowed_tasks else None
        if spec is None:
            raise BadRequest(f"{task_name[:64]!r} is not a task this roller runs from the dashboard.",
                             code="unknown_task")
        for scope in (self.scope_prefix + task_name, self.scope_prefix + "batches:create"):
            if not viewer.may(scope):
                raise Forbidden(f"{viewer.name} may not run {task_name} on several machines at once (needs "
                                f"{scope}).", code="insufficient_scope")
        if len(body["reason"]) > 1000:
            raise BadRequest("the reason must be at most 1000 characters", code="invalid_form")
        error = None
        try:
            batch_request = parse_request(body, tasks=self.tasks, allowed_tasks=self.allowed_tasks,
                                          defaults=service.defaults)
        except BadRequest as e:
            if "rollout" not in body or e.code != "invalid_body" or not e.message.startswith("rollout"):
                raise
            error = f"The limits were not accepted: {e.message}. Nothing was done."
            batch_request = parse_request({**body, "rollout": None}, tasks=self.tasks,
                                          allowed_tasks=self.allowed_tasks, defaults=service.defaults)
        else:
            typed = limit_fields(batch_request.rollout)
        if error is None and _last(form, "confirm") == "yes":
            ip = client_ip(request, self.trusted_proxies)

            def audit(created: Batch) -> AuditEntry:
                return AuditEntry(
                    time=created.created_at, actor=viewer.id, source_ip=ip,
                    action=f"batch.create:{created.task_name}", target=f"batch/{created.id}",
                    result=f"created {created.id}: {created.total} member(s)",
                    params={"params": created.params, "selector": created.selector.to_json(),
                            "rollout": created.rollout.to_json(), "priority": created.priority,
                            "reason": created.reason, "via": "dashboard"},
                )

            view = await service.create(batch_request, requester=viewer.id, origin_ip=ip, audit=audit)
            return self._redirect(request, batch_url(view["batch_id"]))
        resolution = await service.resolve(batch_request)
        dry = service.dry_run(batch_request, resolution)
        return self.render(
            request, "batch_confirm.html", viewer, status=400 if error else 200, section="batches", spec=spec,
            dry=dry, pools=pool_rows(dry, resolution.pool_sizes), hidden=hidden, limits=typed, error=error,
            reason=batch_request.reason, selector=batch_request.selector, matched=resolution.matched,
            members_shown=MEMBERS_SHOWN,
        )

    @app.route("/batches", methods=["GET"])
    async def batches_page(self, request: IRequest) -> bytes:
        viewer = await self._viewer(request)
        service = self._batches()
        raw = _arg(request, "before")
        before = None
        if raw is not None:
            if not _INT.fullmatch(raw):
                raise BadRequest("before must be a batch number")
            before = int(raw)
        batches, next_before = await service.list(limit=50, before=before)
        older = None if next_before is None else "/batches?" + urlencode({"before": next_before})
        return self.render(request, "batches.html", viewer, section="batches", batches=batches, older=older,
                           newest=before is not None)

    @app.route("/batches/<batch_id>", methods=["GET"])
    async def batch_page(self, request: IRequest, batch_id: str) -> bytes:
        viewer = await self._viewer(request)
        view = await self._batch_view(batch_id)
        stream_url = None
        if self.hub is not None and view.get("finished") is None:
            stream_url = "/events?" + urlencode({"batch": view["batch_id"]})
        members = view.get("members") or []
        return self.render(
            request, "batch.html", viewer, section="batches", batch=view, members=members[:MEMBERS_SHOWN],
            member_total=len(members), pools=pool_rows(view), stream_url=stream_url,
            done=sum(n for s, n in view["counts"].items() if s not in ("pending", "queued", "running")),
            may_cancel=viewer.may(self.scope_prefix + "jobs:cancel"),
            cancelled=_arg(request, "cancelled") == "1",
        )

    async def _batch_view(self, batch_id: str) -> dict[str, Any]:
        service = self._batches()
        view = await service.view(batch_id) if _BATCH_ID.fullmatch(batch_id) else None
        if view is None:
            raise NotFound(f"There is no batch {batch_id[:64]}.", code="unknown_batch")
        return view

    @app.route("/batches/<batch_id>/cancel", methods=["POST"])
    async def cancel_batch(self, request: IRequest, batch_id: str) -> bytes:
        viewer, form = await self._post(request)
        service = self._batches()
        if not viewer.may(self.scope_prefix + "jobs:cancel"):
            raise Forbidden(f"{viewer.name} may not cancel batches (needs {self.scope_prefix}jobs:cancel).",
                            code="insufficient_scope")
        await self._batch_view(batch_id)
        running = form.get("running") == "1"
        view = await service.cancel(batch_id, by=viewer.id, running=running)
        counts = view.get("counts", {})
        await self.store.audit.add(AuditEntry(
            time=self.clock.seconds(), actor=viewer.id, source_ip=client_ip(request, self.trusted_proxies),
            action="batch.cancel", target=f"batch/{batch_id}",
            result=f"{view.get('state')} {batch_id}: {counts.get('skipped', 0)} skipped, "
                   f"{counts.get('cancelled', 0)} cancelled",
            params={"running": running, "via": "dashboard"},
        ))
        return self._redirect(request, batch_url(batch_id) + "?cancelled=1")

    @app.route("/audit", methods=["GET"])
    async def audit_page(self, request: IRequest) -> bytes:
        viewer = await self._viewer(request)
        if not viewer.may(self.scope_prefix + "audit:read"):
            raise Forbidden(f"{viewer.name} may not read the audit log (needs {self.scope_prefix}audit:read).",
                            code="insufficient_scope")
        target = _arg(request, "target")
        if target is not None and len(target) > 300:
            raise BadRequest("target must be at most 300 characters")
        raw = _arg(request, "before")
        before = None
        if raw is not None:
            if not _INT.fullmatch(raw):
                raise BadRequest("before must be an audit entry number")
            before = int(raw)
        limit = 100
        entries = await self.store.audit.list(target=target, before=before, limit=limit)
        older = None
        if len(entries) == limit:
            older = "/audit?" + urlencode({k: v for k, v in (("target", target), ("before", entries[-1].id)) if v})
        return self.render(request, "audit.html", viewer, section="audit", entries=entries, target=target,
                           older=older, newest=before is not None)


def _access_rows(machine: Machine) -> list[tuple[str, str]]:
    """How roller reaches the machine, one line per method; credentials by name only."""
    rows = []
    if machine.ssh is not None:
        s = machine.ssh
        rows.append(("SSH", f"user {s.user or '(default)'}, port {s.port}"
                     + (f", credential {s.credential}" if s.credential else "")
                     + (f", host keys {s.host_key_policy}" if s.host_key_policy else "")))
    if machine.ipmi is not None:
        i = machine.ipmi
        rows.append(("IPMI", f"{i.host}:{i.port} ({i.interface})"
                     + (f", credential {i.credential}" if i.credential else "")
                     + (f", bridge {' '.join(i.bridge)}" if i.bridge else "")))
    if machine.pdu is not None:
        p = machine.pdu
        rows.append(("PDU", f"{p.host}:{p.port} outlet {p.outlet} ({p.model})"
                     + (f", credential {p.credential}" if p.credential else "")))
    if machine.redfish is not None:
        r = machine.redfish
        rows.append(("Redfish", f"{r.url}" + (f" system {r.system}" if r.system else "")
                     + (f", credential {r.credential}" if r.credential else "")
                     + ("" if r.verify_tls else ", TLS not verified")))
    if machine.xen is not None:
        x = machine.xen
        rows.append(("Xen", f"VM {x.vm_uuid}" + (f" at {x.url}" if x.url else "")
                     + (f", credential {x.credential}" if x.credential else "")))
    return rows  # (the liveness check is in the status header's one "Liveness" row)
