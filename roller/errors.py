"""
Errors that carry an HTTP status and a stable machine-readable code.

Raised anywhere below the web layer; the API turns them into
C{{"error": code, "message": message}} with the status.  Messages are
written for the operator reading them and never contain secrets.
"""

from __future__ import annotations


class RollerError(Exception):
    """An expected failure with a status, a code and a readable message."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class BadRequest(RollerError):
    status = 400
    code = "bad_request"


class Unauthorized(RollerError):
    status = 401
    code = "unauthorized"


class Forbidden(RollerError):
    status = 403
    code = "forbidden"


class NotFound(RollerError):
    status = 404
    code = "not_found"


class Conflict(RollerError):
    status = 409
    code = "conflict"


class UnavailableError(RollerError):
    status = 503
    code = "unavailable"


class ValidationError(BadRequest):
    """A value failed validation; C{field} names it (dotted path)."""

    code = "invalid"

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason
