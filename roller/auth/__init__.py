"""
Who is asking: the L{IAuthenticator} interface and the principals it yields.

The API authenticates every mutating request through the configured
authenticator and then checks the principal's scopes.
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Interface, implementer

from roller.auth.scopes import satisfies
from roller.errors import Unauthorized

__all__ = ["IAuthenticator", "Principal", "AnonymousAuthenticator", "UnconfiguredAuthenticator", "satisfies"]


@frozen
class Principal:
    """
    @ivar id: the client id (Taskcluster C{clientId}) or user.
    @ivar scopes: what it may do (Taskcluster scope rules, L{satisfies}).
    @ivar expires: when its credentials expire (ISO 8601), if known.
    """

    id: str
    scopes: tuple[str, ...] = ()
    expires: str | None = None

    def has_scope(self, required: str) -> bool:
        return satisfies(self.scopes, required)


class IAuthenticator(Interface):
    def authenticate(request) -> "Deferred[Principal]":
        """
        The principal behind C{request}, or fail with L{Unauthorized}
        (whose message says why) when its credentials are missing or wrong.
        """


@implementer(IAuthenticator)
class AnonymousAuthenticator:
    """C{auth.mode = "none"}: everyone may do everything (loopback only)."""

    principal = Principal("anonymous", ("*",))

    def authenticate(self, request) -> "Deferred[Principal]":
        return succeed(self.principal)


@implementer(IAuthenticator)
class UnconfiguredAuthenticator:
    """Refuses everyone, saying which setting is missing."""

    def __init__(self, reason: str):
        self.reason = reason

    def authenticate(self, request) -> "Deferred[Principal]":
        return fail(Unauthorized(self.reason, code="auth_not_configured"))
