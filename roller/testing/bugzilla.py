"""
A fake of the Bugzilla REST API, enough for roller's C{file_bugzilla_bug}.

  - C{GET /rest/bug?alias=A&id=1,2&...}: search (by alias, id, product,
    component, summary, status, resolution); answers C{{"bugs": [...]}};
  - C{POST /rest/bug}: create; C{product}, C{component}, C{summary} and
    C{version} are required, the product/component pair must exist, an
    alias must be unused, C{blocks} and C{depends_on} must name existing bugs;
    answers C{{"id": N}};
  - C{PUT /rest/bug/N}: C{comment.body}, C{blocks.add/remove},
    C{cc.add/remove}, C{status}, C{resolution}; answers C{{"bugs": [...]}}.

Writes need the C{X-BUGZILLA-API-KEY} header holding C{api_key}; a wrong
key is Bugzilla's error 306, none error 410.  Errors have Bugzilla's shape
C{{"error": true, "code": N, "message": "...", "documentation": "..."}}.
Every request is kept in C{requests} (method, path, headers, body).

    fake = FakeBugzilla(api_key="k", products={"Infrastructure & Operations": ["DCOps", "CIDuty"]})
    port = fake.listen(reactor)      # 127.0.0.1, a free port; fake.url is set
"""

from __future__ import annotations

import json
from typing import Any

from attrs import define, field
from klein import Klein
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.web.iweb import IRequest

from roller.sim.web import base_url, json_answer, serve

__all__ = ["FakeBugzilla"]

OPEN_STATUSES = ("UNCONFIRMED", "NEW", "ASSIGNED", "REOPENED")
STATUSES = OPEN_STATUSES + ("RESOLVED", "VERIFIED", "CLOSED")
REQUIRED = ("product", "component", "summary", "version")


class _BzError(Exception):
    def __init__(self, code: int, message: str, status: int = 400):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@define
class FakeBugzilla:
    api_key: str
    products: dict[str, list[str]]
    bugs: dict[int, dict[str, Any]] = field(factory=dict)
    comments: dict[int, list[str]] = field(factory=dict)
    requests: list[dict[str, Any]] = field(factory=list)
    url: str = ""
    _next_id: int = 1000

    app = Klein()

    def listen(self, reactor: IReactorTCP, port: int = 0) -> IListeningPort:
        listening = serve(self.app, reactor, port=port)
        self.url = base_url(listening)
        return listening

    # -- test set-up helpers

    def add_bug(self, summary: str, *, alias: str | None = None, status: str = "NEW", resolution: str = "",
                product: str = "", component: str = "", blocks: tuple[int, ...] = (), cc: tuple[str, ...] = (),
                description: str = "") -> int:
        product = product or next(iter(self.products))
        component = component or self.products[product][0]
        bug_id = self._next_id
        self._next_id += 1
        self.bugs[bug_id] = {
            "id": bug_id, "alias": alias, "summary": summary, "status": status, "resolution": resolution,
            "is_open": status in OPEN_STATUSES, "product": product, "component": component,
            "version": "unspecified", "blocks": list(blocks), "depends_on": [], "cc": list(cc),
        }
        self.comments[bug_id] = [description]
        for other in blocks:
            self.bugs[other]["depends_on"].append(bug_id)
        return bug_id

    # -- routes

    def _record(self, request: IRequest, body: Any = None) -> None:
        self.requests.append({
            "method": request.method.decode(),
            "path": request.path.decode(),
            "args": {k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()},
            "headers": {k.decode().lower(): [v.decode() for v in vs]
                        for k, vs in request.requestHeaders.getAllRawHeaders()},
            "body": body,
        })

    def _check_key(self, request: IRequest, required: bool) -> None:
        key = request.getHeader(b"x-bugzilla-api-key")
        if key is None:
            if required:
                raise _BzError(410, "You must log in before using this part of Bugzilla.", 401)
            return
        if key.decode() != self.api_key:
            raise _BzError(306, "The API key you specified is invalid. Please check that you typed it correctly.")

    def _handle(self, request: IRequest, work: Any) -> bytes:
        try:
            return json_answer(request, work())
        except _BzError as e:
            return json_answer(request, {"error": True, "code": e.code, "message": e.message,
                                   "documentation": "https://bmo.readthedocs.io/en/latest/api/"}, e.status)

    @app.route("/rest/bug", methods=["GET"])
    def search(self, request: IRequest) -> bytes:
        self._record(request)

        def work() -> Any:
            self._check_key(request, required=False)
            args = {k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()}
            found = list(self.bugs.values())
            for name, values in args.items():
                if name == "id":
                    ids = {int(i) for v in values for i in v.split(",") if i.strip().isdigit()}
                    found = [b for b in found if b["id"] in ids]
                elif name in ("alias", "product", "component", "summary", "status", "resolution"):
                    wanted = {"" if v == "---" else v for v in values}
                    found = [b for b in found if (b[name] or "") in wanted]
                elif name in ("include_fields", "limit"):
                    continue
                else:
                    raise _BzError(108, f"Unknown search parameter {name!r}.")
            return {"bugs": [dict(b) for b in found], "faults": []}

        return self._handle(request, work)

    @app.route("/rest/bug", methods=["POST"])
    def create(self, request: IRequest) -> bytes:
        body = _body(request)
        self._record(request, body)

        def work() -> Any:
            self._check_key(request, required=True)
            if not isinstance(body, dict):
                raise _BzError(32614, "The request body is not a JSON object.")
            for name in REQUIRED:
                if not isinstance(body.get(name), str) or not body[name].strip():
                    raise _BzError(50, f"You must enter a {name} for this bug.")
            product, component = body["product"], body["component"]
            if product not in self.products:
                raise _BzError(51, f"There is no product named '{product}'.")
            if component not in self.products[product]:
                raise _BzError(51, f"There is no component named '{component}' in the '{product}' product.")
            alias = body.get("alias")
            if alias and any(b["alias"] == alias for b in self.bugs.values()):
                raise _BzError(103, f"{alias} has already been taken as a bug alias by another bug.")
            blocks = _ids(body.get("blocks", []))
            for other in blocks:
                self._bug(other)
            cc = body.get("cc", [])
            if not isinstance(cc, list) or not all(isinstance(c, str) and "@" in c for c in cc):
                raise _BzError(504, "cc must be a list of Bugzilla login names.")
            bug_id = self.add_bug(body["summary"], alias=alias, product=product, component=component,
                                  blocks=tuple(blocks), cc=tuple(cc), description=str(body.get("description", "")))
            return {"id": bug_id}

        return self._handle(request, work)

    @app.route("/rest/bug/<int:bug_id>", methods=["PUT"])
    def update(self, request: IRequest, bug_id: int) -> bytes:
        body = _body(request)
        self._record(request, body)

        def work() -> Any:
            self._check_key(request, required=True)
            bug = self._bug(bug_id)
            if not isinstance(body, dict):
                raise _BzError(32614, "The request body is not a JSON object.")
            known = {"comment", "blocks", "cc", "status", "resolution", "ids"}
            unknown = set(body) - known
            if unknown:
                raise _BzError(104, f"Unknown field(s): {', '.join(sorted(unknown))}.")
            changes: dict[str, Any] = {}
            if "status" in body:
                status = body["status"]
                if status not in STATUSES:
                    raise _BzError(60, f"There is no status named '{status}'.")
                if status in OPEN_STATUSES and not bug["is_open"] and status != "REOPENED":
                    raise _BzError(60, f"You are not allowed to change the bug status from {bug['status']} "
                                       f"to {status}.")
                changes["status"] = {"removed": bug["status"], "added": status}
                bug["status"] = status
                bug["is_open"] = status in OPEN_STATUSES
                if bug["is_open"]:
                    bug["resolution"] = ""
            if "resolution" in body:
                bug["resolution"] = body["resolution"]
            if "blocks" in body:
                add = _ids(body["blocks"].get("add", []))
                for other in add:
                    self._bug(other)
                    if other not in bug["blocks"]:
                        bug["blocks"].append(other)
                        self.bugs[other]["depends_on"].append(bug_id)
            if "cc" in body:
                for who in body["cc"].get("add", []):
                    if who not in bug["cc"]:
                        bug["cc"].append(who)
            if "comment" in body:
                comment = body["comment"]
                if not isinstance(comment, dict) or not str(comment.get("body", "")).strip():
                    raise _BzError(54, "You must enter a comment body.")
                self.comments[bug_id].append(comment["body"])
            return {"bugs": [{"id": bug_id, "alias": bug["alias"], "changes": changes}]}

        return self._handle(request, work)

    def _bug(self, bug_id: int) -> dict[str, Any]:
        if bug_id not in self.bugs:
            raise _BzError(101, f"Bug #{bug_id} does not exist.", 404)
        return self.bugs[bug_id]


def _body(request: IRequest) -> Any:
    try:
        return json.loads(request.content.read() or b"null")
    except ValueError:
        return None


def _ids(values: Any) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
        raise _BzError(32000, "bug ids must be a list of integers.")
    return values
