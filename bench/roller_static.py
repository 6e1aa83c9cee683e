"""
The static baseline of bench/dashboard.py, served by roller itself.

Imported before twistd runs roller (``python -c "import roller_static;
roller_static.install(); ..." roller ...``): roller's site then also answers
``GET /bench-static/<file>`` with the file of that name from the directory
in ``ROLLER_BENCH_STATIC_DIR``, through ``twisted.web.static.File``, after
the same session check as a dashboard page (``Dashboard.authorize``: the
session cookie looked up), with roller's security headers.  So a page and
its static copy differ only in how the bytes are made: same process,
reactor, site, HTTP stack, access log and sign-in check.  Bench only.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.python.failure import Failure
from twisted.web import resource, server, static

PREFIX = b"bench-static"


class _Checked(resource.Resource):
    """A file of the directory, after the dashboard's session check."""

    isLeaf = True

    def __init__(self, files: static.File, authorize: Any):
        super().__init__()
        self.files = files
        self.authorize = authorize

    def render_GET(self, request: server.Request) -> Any:
        name = request.postpath[0] if request.postpath else b""

        def allowed(_: Any) -> None:
            child = self.files.getChild(name, request)
            body = child.render(request)
            if body != server.NOT_DONE_YET:
                request.write(body)
                request.finish()

        def refused(failure: Failure) -> None:
            request.setResponseCode(401)
            request.write(b"not signed in\n")
            request.finish()

        self.authorize(request).addCallbacks(allowed, refused)
        return server.NOT_DONE_YET


class _Root(resource.Resource):
    def __init__(self, inner: resource.Resource, checked: resource.Resource):
        super().__init__()
        self.inner, self.checked = inner, checked

    def getChildWithDefault(self, name: bytes, request: Any) -> resource.Resource:
        if name == PREFIX:
            from roller.web.site import security_headers

            security_headers(request)
            return self.checked
        return self.inner.getChildWithDefault(name, request)

    def render(self, request: Any) -> Any:
        return self.inner.render(request)


def install() -> None:
    """Make roller's service put the checked static directory on its site."""
    import roller.service

    original = roller.service.root_resource
    directory = os.environ["ROLLER_BENCH_STATIC_DIR"]

    def root_resource(api: Any, dashboard: Any, hub: Any, **kw: Any) -> resource.Resource:
        files = static.File(directory)
        return _Root(original(api, dashboard, hub, **kw), _Checked(files, dashboard.authorize))

    roller.service.root_resource = root_resource  # type: ignore[assignment]
