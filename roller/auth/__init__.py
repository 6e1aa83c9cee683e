"""
Who is asking: the L{IAuthenticator} interface and the principals it yields.

The API authenticates every mutating request through the configured
authenticator and then checks the principal's scopes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attrs import field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Interface, implementer

from roller.auth.scopes import satisfies
from roller.errors import Unauthorized

if TYPE_CHECKING:
    from twisted.web.iweb import IRequest

    from roller.auth.hawk import RequestTarget

__all__ = ["IAuthenticator", "Principal", "AnonymousAuthenticator", "UnconfiguredAuthenticator", "satisfies"]


@frozen
class Principal:
    """
    @ivar id: the client id (Taskcluster C{clientId}) or user.
    @ivar scopes: what it may do (Taskcluster scope rules, L{satisfies}).
    @ivar expires: when its credentials expire (ISO 8601), if known.
    @ivar authorized_scopes: the request's C{ext.authorizedScopes}, when it
        sent them (they are then C{scopes}: the request is limited to them).
    @ivar held_scopes: the client's own scopes before C{authorizedScopes}
        limited them, when known (local clients; Taskcluster does not say).
    """

    id: str
    scopes: tuple[str, ...] = ()
    expires: str | None = None
    authorized_scopes: tuple[str, ...] | None = field(default=None, kw_only=True)
    held_scopes: tuple[str, ...] | None = field(default=None, kw_only=True)

    def has_scope(self, required: str) -> bool:
        return satisfies(self.scopes, required)

    def lacks(self, required: str) -> str:
        """Why a request by this principal is refused for lacking C{required} (a 403 message)."""
        message = f"{self.id} lacks the scope {required}"
        if self.authorized_scopes is None or satisfies(self.scopes, required):
            return message
        listed = ", ".join(self.authorized_scopes)[:300] or "an empty list"
        if self.held_scopes is None:  # Taskcluster checked the credentials: their own scopes are unknown here
            return (f"{message}: the request's authorizedScopes ({listed}) do not include it, so authorizedScopes "
                    "removed it if the client holds it; add it to authorizedScopes or send none")
        if satisfies(self.held_scopes, required):
            return (f"{message}: the client holds it, but the request's authorizedScopes ({listed}) removed it; "
                    "add it to authorizedScopes or send none")
        return f"{message} (the client does not hold it either; the request's authorizedScopes: {listed})"


class IAuthenticator(Interface):
    def authenticate(request: IRequest, target: RequestTarget | None = None) -> Deferred[Principal]:
        """
        The principal behind C{request}, or fail with L{Unauthorized}
        (whose message says why) when its credentials are missing or wrong.

        @param target: the method, resource, scheme, host, port and source
            address the client used, as the web layer worked them out
            (behind trusted proxies: C{roller.web.proxy.request_target});
            C{None}: the request as it reached roller, no proxy header
            believed (L{roller.auth.hawk.direct_target}).
        """


@implementer(IAuthenticator)
class AnonymousAuthenticator:
    """C{auth.mode = "none"}: everyone may do everything (loopback only)."""

    principal = Principal("anonymous", ("*",))

    def authenticate(self, request: IRequest, target: RequestTarget | None = None) -> Deferred[Principal]:
        return succeed(self.principal)


@implementer(IAuthenticator)
class UnconfiguredAuthenticator:
    """Refuses everyone, saying which setting is missing."""

    def __init__(self, reason: str):
        self.reason = reason

    def authenticate(self, request: IRequest, target: RequestTarget | None = None) -> Deferred[Principal]:
        return fail(Unauthorized(self.reason, code="auth_not_configured"))
