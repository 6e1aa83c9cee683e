"""
Inventory admin pages, mounted under C{/admin} (L{roller.web.site}):

    GET  /admin                              links, and what was just done
    GET  /admin/machines/new                 the form for a new machine
    POST /admin/machines                     add it
    GET  /admin/machines/<group>/<id>/edit   the form, filled in
    POST /admin/machines/<group>/<id>        save it
    GET  /admin/machines/<group>/<id>/delete asks first
    POST /admin/machines/<group>/<id>/delete delete it
    GET  /admin/import                       upload a legacy JSON file
    POST /admin/import                       import it (or only plan it), show the per-entry report

It rides on the L{Dashboard}: the same viewer (its L{IDashboardAuth}), CSRF
tokens (L{CsrfProtection}), templates and error pages.  Every POST needs the
token; the viewer needs C{<prefix>inventory:write}, as the API does.  A form
is turned into the machine's JSON form and validated by
L{Machine.from_json}: its error is shown next to the field it names, in the
form as the user filled it.  Writes go through the store and are audited as
the API's machine CRUD (C{machine.create}, C{machine.put},
C{machine.delete}) and the CLI's import (C{machines.import}) are, with
C{"via": "dashboard"}.
"""

from __future__ import annotations

import re
from email.parser import BytesParser
from email.policy import HTTP
from functools import partial
from typing import Any
from urllib.parse import urlencode

from attrs import define, field
from klein import Klein
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound

from roller.auth.dashboard import Viewer
from roller.errors import BadRequest, Conflict, Forbidden, NotFound, RollerError, ValidationError
from roller.inventory import PDU_MODELS, Machine
from roller.json_input import JSONInputError, load_json
from roller.legacy_import import DEFAULT_GROUP, plan_import
from roller.secrets import SecretsError, merge_into_secrets_file
from roller.store import AuditEntry, Store
from roller.web.dashboard import VIEWER_ATTR, Dashboard, _form, machine_url
from roller.web.proxy import client_ip

__all__ = ["InventoryAdmin", "form_to_json", "machine_to_form"]

log = Logger()

#: the largest legacy file accepted by upload
UPLOAD_MAX = 4 << 20

#: access sections and their form fields (C{section.key}); the rest are top-level
SECTIONS: dict[str, tuple[str, ...]] = {
    "ssh": ("user", "port", "credential", "host_key_policy"),
    "ipmi": ("host", "port", "credential", "interface", "bridge"),
    "pdu": ("host", "outlet", "model", "port", "credential"),
    "redfish": ("url", "system", "credential", "ca_file", "verify_tls"),
    "xen": ("vm_uuid", "url", "credential"),
    "liveness": ("method", "port"),
}
TOP = ("worker_group", "worker_id", "fqdn", "ip", "pool", "tags", "reboot_methods", "bug_cc", "notes")
#: form fields holding lists (comma or space separated)
LISTS = {"tags", "reboot_methods", "bug_cc", "ipmi.bridge"}
_SPLIT = re.compile(r"[\s,]+")
_PORT = re.compile(r"[0-9]{1,5}")


def form_to_json(form: dict[str, str]) -> dict[str, Any]:
    """
    A machine form as L{Machine.from_json} takes it: empty fields are left
    out, a section is present when any of its fields is filled, port
    numbers become integers, lists are split on commas and spaces.
    """
    out: dict[str, Any] = {}

    def value(name: str) -> Any:
        raw = form.get(name, "").strip()
        if not raw:
            return None
        if name in LISTS:
            return [v for v in _SPLIT.split(raw) if v]
        if name.endswith(".port") and _PORT.fullmatch(raw):
            return int(raw)
        return raw

    for name in TOP:
        v = value(name)
        if v is not None:
            out[name] = v
    for section, keys in SECTIONS.items():
        d = {}
        for key in keys:
            name = f"{section}.{key}"
            if key == "verify_tls":
                continue
            v = value(name)
            if v is not None:
                d[key] = v
        if section == "liveness" and d.get("method") == "icmp" and "port" not in d:
            d = {}  # the default
        if d:
            if section == "redfish":
                d["verify_tls"] = form.get("redfish.verify_tls") == "yes"
            out[section] = d
    return out


def machine_to_form(machine: Machine) -> dict[str, str]:
    """The form fields of an existing machine."""
    data = machine.to_json()
    form: dict[str, str] = {}
    for name in TOP:
        v = data.get(name)
        if isinstance(v, list):
            form[name] = ", ".join(v) if name == "bug_cc" else " ".join(v)
        elif v is not None:
            form[name] = str(v)
    for section, keys in SECTIONS.items():
        d = data.get(section) or {}
        for key in keys:
            v = d.get(key)
            if key == "verify_tls":
                form[f"{section}.{key}"] = "" if v is False else "yes"
            elif isinstance(v, list):
                form[f"{section}.{key}"] = " ".join(v)
            elif v is not None:
                form[f"{section}.{key}"] = str(v)
    return form


def _multipart(request: IRequest) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """
    The fields and files of a C{multipart/form-data} body: C{({name: text},
    {name: (file name, content)})}.  Anything else reads as an empty form
    (which then lacks its CSRF token).
    """
    ctype = request.getHeader(b"content-type") or b""
    if ctype.split(b";")[0].strip().lower() != b"multipart/form-data" or request.content is None:
        return {}, {}
    request.content.seek(0)
    raw = request.content.read(UPLOAD_MAX + 64 * 1024 + 1)
    if len(raw) > UPLOAD_MAX + 64 * 1024:
        raise BadRequest(f"the upload is larger than {UPLOAD_MAX >> 20} MB", code="payload_too_large", status=413)
    try:
        msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype + b"\r\n\r\n" + raw)
    except RecursionError:  # multiparts nested in multiparts; a browser's form never nests them
        raise BadRequest("the form nests multipart bodies too deep", code="invalid_form") from None
    if not msg.is_multipart():
        return {}, {}
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name or not isinstance(name, str):  # (a str; a tuple only for an RFC 2231 value)
            continue
        payload = part.get_payload(decode=True) or b""
        if not isinstance(payload, bytes):  # decode=True gives bytes for a part that is not multipart
            continue
        filename = part.get_filename()
        if filename is not None:
            files[name] = (filename.replace("\\", "/").rsplit("/", 1)[-1][:200], payload)
        else:
            try:
                fields[name] = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(f"the form field {name[:40]} is not valid UTF-8", code="invalid_form") from None
    return fields, files


@define
class InventoryAdmin:
    """
    @param dashboard: whose auth, CSRF protection, templates and error
        pages these pages share.
    @param store: where machines are written and audited.
    @param secrets_file: where an import merges the credentials it finds
        (as C{roller import} does); without one, an import that brings
        credentials is refused.
    """

    dashboard: Dashboard
    store: Store
    secrets_file: str | None = field(default=None, kw_only=True)
    #: where the secrets file is rewritten (it is fsynced), off the reactor
    #: thread; None: in the calling thread
    threadpool: ThreadPool | None = field(default=None, kw_only=True)

    app = Klein()

    # -- errors as pages (the dashboard's)

    @app.handle_errors(RollerError)
    def _roller_error(self, request: IRequest, failure: Any) -> bytes:
        return self.dashboard._roller_error(request, failure)

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request: IRequest, failure: Any) -> bytes:
        return self.dashboard._method_not_allowed(request, failure)

    @app.handle_errors(RouteNotFound)
    def _route_not_found(self, request: IRequest, failure: Any) -> bytes:
        return self.dashboard._route_not_found(request, failure)

    @app.handle_errors(HTTPException)
    def _http_exception(self, request: IRequest, failure: Any) -> bytes:
        return self.dashboard._http_exception(request, failure)

    @app.handle_errors(Exception)
    def _internal(self, request: IRequest, failure: Any) -> bytes:
        return self.dashboard._internal(request, failure)

    # -- plumbing

    @property
    def scope(self) -> str:
        return self.dashboard.scope_prefix + "inventory:write"

    async def _viewer(self, request: IRequest) -> Viewer:
        viewer = await self.dashboard.auth.viewer(request)
        setattr(request, VIEWER_ATTR, viewer)
        return viewer

    async def _writer(self, request: IRequest, form: dict[str, str] | None = None) -> Viewer:
        """The viewer, who must hold the inventory scope; with C{form}, a POST whose token checks out."""
        viewer = await self._viewer(request)
        if form is not None:
            self.dashboard.csrf.verify(request, form, viewer, self.dashboard.clock.seconds())
        if not viewer.may(self.scope):
            raise Forbidden(f"{viewer.name} may not change the inventory (needs {self.scope}).",
                            code="insufficient_scope")
        return viewer

    async def _audit(self, request: IRequest, viewer: Viewer, action: str, target: str | None, result: str,
                     params: dict) -> None:
        await self.store.audit.add(AuditEntry(
            time=self.dashboard.clock.seconds(), actor=viewer.id,
            source_ip=client_ip(request, self.dashboard.trusted_proxies),
            action=action, target=target, result=result, params={**params, "via": "dashboard"},
        ))

    async def _machine(self, worker_group: str, worker_id: str) -> Machine:
        return await self.dashboard._machine(worker_group, worker_id)

    def _render(self, request: IRequest, template: str, viewer: Viewer, status: int = 200, **context: Any) -> bytes:
        return self.dashboard.render(request, template, viewer, status=status, section="admin", **context)

    def _form_page(self, request: IRequest, viewer: Viewer, form: dict[str, str], *, machine: Machine | None,
                   error: ValidationError | RollerError | None = None) -> bytes:
        field_name = getattr(error, "field", None) if error is not None else None
        # "ipmi" (the section) or "ipmi.port" or "tags[2]": the form field to mark
        if field_name:
            field_name = field_name.split("[", 1)[0]
        return self._render(
            request, "admin_machine.html", viewer, status=400 if error is not None else 200, form=form,
            machine=machine, error=error, error_field=field_name, pdu_models=PDU_MODELS,
            action=("/admin/machines" if machine is None
                    else f"/admin{machine_url(machine.worker_group, machine.worker_id)}"),
        )

    # -- pages

    @app.route("/admin", methods=["GET"])
    async def index(self, request: IRequest) -> bytes:
        viewer = await self._viewer(request)
        deleted = request.args.get(b"deleted", [b""])[-1].decode("utf-8", "replace")[:260]
        return self._render(request, "admin.html", viewer, deleted=deleted, may_write=viewer.may(self.scope))

    @app.route("/admin/machines/new", methods=["GET"])
    async def new_machine(self, request: IRequest) -> bytes:
        viewer = await self._writer(request)
        form = {"worker_group": request.args.get(b"group", [b""])[-1].decode("utf-8", "replace")[:128]}
        return self._form_page(request, viewer, form, machine=None)

    @app.route("/admin/machines", methods=["POST"])
    async def create_machine(self, request: IRequest) -> bytes:
        form = _form(request)
        viewer = await self._writer(request, form)
        try:
            machine = Machine.from_json(form_to_json(form))
            await self.store.machines.insert(machine)
        except (ValidationError, Conflict) as e:
            return self._form_page(request, viewer, form, machine=None, error=e)
        await self._audit(request, viewer, "machine.create", f"{machine.worker_group}/{machine.worker_id}",
                          "created", machine.to_json())
        return self.dashboard._redirect(request, machine_url(machine.worker_group, machine.worker_id) + "?saved=1")

    @app.route("/admin/machines/<worker_group>/<worker_id>/edit", methods=["GET"])
    async def edit_machine(self, request: IRequest, worker_group: str, worker_id: str) -> bytes:
        viewer = await self._writer(request)
        machine = await self._machine(worker_group, worker_id)
        return self._form_page(request, viewer, machine_to_form(machine), machine=machine)

    @app.route("/admin/machines/<worker_group>/<worker_id>", methods=["POST"])
    async def save_machine(self, request: IRequest, worker_group: str, worker_id: str) -> bytes:
        form = _form(request)
        viewer = await self._writer(request, form)
        current = await self._machine(worker_group, worker_id)
        form = {**form, "worker_group": worker_group, "worker_id": worker_id}  # fixed by the URL
        try:
            machine = Machine.from_json(form_to_json(form), worker_id=worker_id, worker_group=worker_group)
        except ValidationError as e:
            return self._form_page(request, viewer, form, machine=current, error=e)
        created = await self.store.machines.put(machine)
        await self._audit(request, viewer, "machine.put", f"{worker_group}/{worker_id}",
                          "created" if created else "updated", machine.to_json())
        return self.dashboard._redirect(request, machine_url(worker_group, worker_id) + "?saved=1")

    @app.route("/admin/machines/<worker_group>/<worker_id>/delete", methods=["GET"])
    async def confirm_delete(self, request: IRequest, worker_group: str, worker_id: str) -> bytes:
        viewer = await self._writer(request)
        machine = await self._machine(worker_group, worker_id)
        return self._render(request, "admin_delete.html", viewer, machine=machine)

    @app.route("/admin/machines/<worker_group>/<worker_id>/delete", methods=["POST"])
    async def delete_machine(self, request: IRequest, worker_group: str, worker_id: str) -> bytes:
        form = _form(request)
        viewer = await self._writer(request, form)
        await self._machine(worker_group, worker_id)
        if not await self.store.machines.delete(worker_group, worker_id):
            raise NotFound(f"There is no machine {worker_id} in worker group {worker_group}.", code="unknown_machine")
        await self._audit(request, viewer, "machine.delete", f"{worker_group}/{worker_id}", "deleted", {})
        return self.dashboard._redirect(request, "/admin?" + urlencode({"deleted": f"{worker_group}/{worker_id}"}))

    @app.route("/admin/import", methods=["GET"])
    async def import_form(self, request: IRequest) -> bytes:
        viewer = await self._writer(request)
        return self._render(request, "admin_import.html", viewer, plan=None, group=DEFAULT_GROUP, error=None,
                            dry_run=False, filename=None)

    @app.route("/admin/import", methods=["POST"])
    async def import_file(self, request: IRequest) -> bytes:
        fields, files = _multipart(request)
        viewer = await self._writer(request, fields)
        group = fields.get("group", "").strip() or DEFAULT_GROUP
        dry_run = fields.get("dry_run") == "yes"
        filename, content = files.get("file", ("", b""))

        def again(message: str) -> bytes:
            return self._render(request, "admin_import.html", viewer, status=400, plan=None, group=group,
                                error=message, dry_run=dry_run, filename=filename or None)

        if not content:
            return again("Choose a legacy inventory file (ipmi.json, xen.json or WORKER_CONFIG) to upload.")
        try:
            data = load_json(content)
        except JSONInputError as e:
            return again(f"{filename or 'The file'} is not valid JSON ({str(e)[:120]}).")
        existing = {m.key: m for m in await self.store.machines.list(limit=10**9)}
        try:
            plan = plan_import(data, existing, group)
        except (BadRequest, ValidationError) as e:
            return again(e.message)
        if not dry_run:
            if plan.credentials:
                if not self.secrets_file:
                    return again("This file brings credentials, and this roller has no secrets file to put "
                                 "them in; use `roller import` on the roller host.")
                merge = partial(merge_into_secrets_file, self.secrets_file, plan.credentials)
                try:
                    if self.threadpool is None:
                        merge()
                    else:
                        # the dashboard's clock is the reactor when a thread pool is given (roller.service)
                        reactor = IReactorFromThreads(self.dashboard.clock)
                        await deferToThreadPool(reactor, self.threadpool, merge)
                except SecretsError as e:
                    return again(f"The credentials could not be merged into the secrets file: {e}")
            await self.store.machines.put_many(list(plan.machines()))
            await self._audit(request, viewer, "machines.import", None, plan.summary(), {
                "file": filename, "group": group, "counts": plan.counts(), "credentials": sorted(plan.credentials),
            })
        return self._render(request, "admin_import.html", viewer, status=200, plan=plan, group=group, error=None,
                            dry_run=dry_run, filename=filename)

