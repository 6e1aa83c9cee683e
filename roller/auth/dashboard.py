"""
Who is looking at the dashboard: L{Viewer}, the L{IDashboardAuth}
interface sessions plug into, and L{LoopbackDashboardAuth} (anyone on
loopback is an admin: tests and the demo fallback).

The dashboard (L{roller.web.dashboard}) asks an L{IDashboardAuth} for the
viewer of every page; L{roller.auth.accounts.AccountAuth} is the one roller
runs with.  This module is below the web layer: it imports nothing from
C{roller.web}.
"""

from __future__ import annotations

import ipaddress

from attrs import field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.web.iweb import IRequest
from zope.interface import Interface, implementer

from roller.auth import Principal
from roller.auth.scopes import satisfies
from roller.errors import Forbidden

__all__ = ["IDashboardAuth", "LoopbackDashboardAuth", "Viewer"]


@frozen
class Viewer:
    """
    Who is looking at the dashboard.

    @ivar id: recorded as the requester of jobs and the actor in the audit log.
    @ivar name: shown in the page header.
    @ivar scopes: what they may do, with the API's scope rules
        (C{<prefix><task>}, C{<prefix>jobs:cancel}).
    @ivar session: what CSRF tokens are bound to and sign-out ends (the hash
        of the session id, L{roller.auth.accounts}); empty without sessions.
    @ivar note: one line shown next to the name (the role, or how they were let in).
    @ivar role: the account's role (viewer, operator, admin), if any.
    """

    id: str
    name: str
    scopes: tuple[str, ...] = ()
    session: str = field(default="", repr=False)
    note: str = ""
    role: str = ""

    def may(self, scope: str) -> bool:
        return satisfies(self.scopes, scope)

    @property
    def principal(self) -> Principal:
        """The same L{Principal} the API would check."""
        return Principal(self.id, self.scopes)


class IDashboardAuth(Interface):
    """How the dashboard learns who is looking (sessions plug in here)."""

    def viewer(request: IRequest) -> Deferred[Viewer]:
        """
        The L{Viewer} behind C{request}; or fail with L{roller.errors.Unauthorized}
        or L{Forbidden}, whose message the dashboard shows as the page.
        """


_FORWARDING_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")


@implementer(IDashboardAuth)
class LoopbackDashboardAuth:
    """
    No accounts yet: anyone connecting over loopback (or a UNIX socket) is
    the local operator and may do everything; anyone else is refused.  A
    request relayed by a proxy (C{Forwarded}, C{X-Forwarded-For}) is
    refused too: behind a proxy every client would look local.
    """

    def viewer(self, request: IRequest) -> Deferred[Viewer]:
        for name in _FORWARDING_HEADERS:
            if request.getHeader(name) is not None:
                return fail(Forbidden(
                    "this roller's dashboard has no login yet and cannot be used through a proxy; "
                    "open it on the roller host itself (http://127.0.0.1:…)", code="dashboard_local_only"))
        peer = request.getClientAddress()
        host = getattr(peer, "host", None)
        if host is not None:
            try:
                local = ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
            except ValueError:
                local = False
            if not local:
                return fail(Forbidden(
                    f"this roller's dashboard has no login yet and answers only on loopback "
                    f"(127.0.0.1, ::1); you connected from {host}", code="dashboard_local_only"))
        return succeed(Viewer(id="dashboard:local", name="local operator", scopes=("*",),
                              note="loopback, no login"))
