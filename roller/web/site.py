"""
One resource for everything roller serves over HTTP:

    /api/...              the REST API (roller.web.api)
    /__heartbeat__, /__lbheartbeat__, /__version__ (any /__*__), /metrics
                          the API's operational endpoints
    /static/...           CSS and JavaScript from the top-level static/ dir
    /events               live job events (Server-Sent Events, roller.web.events)
    /admin/...            inventory admin pages (roller.web.admin), when given
    anything else         the dashboard (roller.web.dashboard)

    site = RollerSite(root_resource(api, dashboard, hub), max_body=..., reactor=reactor)

The API and dashboard are Klein apps that route on the whole path, so
L{root_resource} hands them the request without consuming a segment.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import TYPE_CHECKING

from twisted.python.filepath import FilePath, InsecurePath
from twisted.web import resource
from twisted.web.iweb import IRequest

from roller.web.http import json_error

if TYPE_CHECKING:  # only for the annotations: this module stays importable without them
    from roller.web.admin import InventoryAdmin
    from roller.web.api import Api
    from roller.web.dashboard import Dashboard
    from roller.web.events import EventHub

__all__ = ["root_resource", "security_headers", "StaticFiles"]

#: first path segments that belong to the API
API_SEGMENTS = frozenset({b"api", b"metrics"})


#: the only kinds of file served from static/
CONTENT_TYPES = {
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
    ".woff2": b"font/woff2",
    ".txt": b"text/plain; charset=utf-8",
}
MAX_STATIC_BYTES = 4 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class StaticFiles(resource.Resource):
    """
    Small hand-written assets from one directory: no listings, no dot
    files, only the types in L{CONTENT_TYPES}, C{ETag} revalidation
    (C{Cache-Control: no-cache}: never stale after an upgrade).  Files are
    read whole (they are a few KB) and kept until their mtime or size
    changes; nothing here uses the global reactor.
    """

    isLeaf = True

    def __init__(self, directory: str | os.PathLike):
        super().__init__()
        self.root = FilePath(os.fspath(directory))
        self._cache: dict[str, tuple[tuple[float, int], bytes, bytes]] = {}

    def _not_found(self, request: IRequest) -> bytes:
        return json_error(request, 404, "not_found", "no such static file")

    def render_GET(self, request: IRequest) -> bytes:
        segments = request.postpath
        try:
            names = [s.decode("utf-8") for s in segments]
        except UnicodeDecodeError:
            return self._not_found(request)
        if not names or any(n == "" or n.startswith(".") or "/" in n or "\\" in n or _CONTROL.search(n)
                            for n in names):
            return self._not_found(request)  # NUL would make the file system calls raise
        try:
            path = self.root.descendant(names)
        except InsecurePath:
            return self._not_found(request)
        ctype = CONTENT_TYPES.get(os.path.splitext(names[-1])[1].lower())
        try:
            if ctype is None or not path.isfile():
                return self._not_found(request)
            stat = (path.getModificationTime(), path.getsize())
            cached = self._cache.get(path.path)
            if cached is None or cached[0] != stat:
                if stat[1] > MAX_STATIC_BYTES:
                    return self._not_found(request)
                body = path.getContent()
                etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
                cached = (stat, etag, body)
                self._cache[path.path] = cached
        except OSError:  # a name too long for the file system, a file gone meanwhile
            return self._not_found(request)
        _, etag, body = cached
        request.setHeader(b"Content-Type", ctype)
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"ETag", etag)
        if etag in [t.strip() for t in (request.getHeader(b"if-none-match") or b"").split(b",")]:
            request.setResponseCode(304)
            return b""
        request.setHeader(b"Content-Length", str(len(body)).encode())
        return body

    def render_HEAD(self, request: IRequest) -> bytes:
        self.render_GET(request)
        return b""

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return _READ_ONLY.render(request)
        return super().render(request)


#: how long a browser that reached roller over TLS keeps to TLS (one year)
HSTS = b"max-age=31536000"


def security_headers(request: IRequest) -> None:
    """
    The headers on every response roller's resources make: C{X-Content-Type-Options:
    nosniff} (a JSON answer is never read as a script or a page), and over TLS
    C{Strict-Transport-Security}.  Over plain HTTP (a listener without TLS, or
    behind a proxy that terminates TLS and should send its own) there is none:
    HSTS on a plain-HTTP answer means nothing to a browser.
    """
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    if request.isSecure():
        request.setHeader(b"Strict-Transport-Security", HSTS)


class _ReadOnly(resource.Resource):
    """405 JSON for a method other than GET and HEAD (Twisted's own answer is an HTML page, or a 501)."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        request.setHeader(b"Allow", b"GET, HEAD")
        method = request.method.decode("latin-1")[:20]
        return json_error(request, 405, "method_not_allowed", f"{method} is not allowed here; allowed: GET, HEAD")


_READ_ONLY = _ReadOnly()


class _BadHost(resource.Resource):
    """400 JSON for a C{Host} header that is not UTF-8 (Klein would answer a plain-text 400 and log a traceback)."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        return json_error(request, 400, "bad_request", "the Host header is not valid UTF-8")


_BAD_HOST = _BadHost()


class _Root(resource.Resource):
    """
    Dispatch on the first path segment; the chosen Klein app sees the whole
    path (the segment is put back before it routes).
    """

    def __init__(self, api: resource.Resource, dashboard: resource.Resource,
                 static_files: resource.Resource, events: resource.Resource,
                 admin: resource.Resource | None = None):
        super().__init__()
        self.api = api
        self.admin = admin
        self.dashboard = dashboard
        self.static_files = static_files
        self.events = events

    def getChildWithDefault(self, name: bytes, request: IRequest) -> resource.Resource:
        security_headers(request)
        try:
            (request.getHeader(b"host") or b"").decode("utf-8")
        except UnicodeDecodeError:
            return _BAD_HOST
        if name == b"static":
            return self.static_files
        if name == b"events" and not request.postpath:
            return self.events if request.method in (b"GET", b"HEAD") else _READ_ONLY
        if name == b"admin" and self.admin is not None:
            request.postpath.insert(0, request.prepath.pop())
            return self.admin
        target = self.api if name in API_SEGMENTS or (name.startswith(b"__") and name.endswith(b"__")) \
            else self.dashboard
        # Undo the traversal step: Klein matches request.postpath against its routes.
        request.postpath.insert(0, request.prepath.pop())
        return target

    def render(self, request: IRequest) -> bytes:  # only reached for an empty path
        security_headers(request)
        return self.dashboard.render(request)


def root_resource(api: Api, dashboard: Dashboard, hub: EventHub, *, static_dir: str | os.PathLike | None = None,
                  admin: InventoryAdmin | None = None) -> resource.Resource:
    """
    @param api: the L{roller.web.api.Api}.
    @param dashboard: the L{roller.web.dashboard.Dashboard}.
    @param hub: the L{roller.web.events.EventHub} (streams are authorized
        like dashboard pages).
    @param static_dir: overrides L{roller.web.dashboard.find_asset_dir}C{("static")}.
    @param admin: the L{roller.web.admin.InventoryAdmin}, served under C{/admin}.
    """
    from roller.web.dashboard import find_asset_dir

    files = StaticFiles(str(find_asset_dir("static", static_dir)))
    for app in (api.app, dashboard.app) + (() if admin is None else (admin.app,)):
        # "/a//b" is not "/a/b": a 404, never werkzeug's 308 (which Klein sends without a Location)
        app.url_map.merge_slashes = False
    return _Root(api.app.resource(), dashboard.app.resource(), files, hub.resource(dashboard.authorize),
                 None if admin is None else admin.app.resource())
