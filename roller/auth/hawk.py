"""
Hawk on roller's side: what a request looks like to the client that signed
it, and L{LocalHawkAuthenticator}, which verifies Hawk in-process for
clients listed in the secrets file (C{auth.mode = "local"}).

The signed request target
=========================

A Hawk MAC covers the method, the resource (path and query exactly as sent),
the host and the port the I{client} used (L{RequestTarget}).  Behind a
TLS-terminating load balancer roller sees another scheme and port, so the
web layer (C{roller.web.proxy.request_target}, which believes
C{X-Forwarded-*} headers only from C{server.trusted_proxies}) works out what
the client saw and passes it to C{authenticate(request, target)}.  Without
one, an authenticator reads the request as it reached roller
(L{direct_target}): host and port from the C{Host} header (lower-cased
host; the port defaults to 80 or 443 by scheme), the source IP is the TCP
peer, and no proxy header is believed.

Local clients and Taskcluster's C{ext}
======================================

L{LocalHawkAuthenticator} follows Taskcluster's auth service
(C{services/auth/src/signaturevalidator.js}) so the same credentials behave
the same in both modes:

  - C{ext.authorizedScopes}: every listed scope must be satisfied by the
    client's scopes (otherwise 401, like Taskcluster), and the principal
    then holds exactly the listed scopes -- the intersection of what the
    client has and what the request asks for;
  - C{ext.certificate} (temporary credentials, also named ones with an
    C{issuer}): the certificate signature (HMAC-SHA256 over its fields with
    the issuer's access token) and its validity window are checked, and the
    request must be signed with the derived temporary key;
  - replayed requests (same client, nonce and timestamp) are refused: the
    nonces of the last C{skew} seconds are remembered -- only once the MAC
    is verified, so unsigned garbage uses nobody's budget -- at most
    C{max_requests_per_client} per client (a client over it gets 429 with
    C{Retry-After}; the others go on) and 100 000 in all (L{NonceCache});
  - a payload hash, when the client sends one, must match the body; requests
    without one are accepted (Taskcluster's JavaScript client and the hawk
    library send none; the Python client hashes even an empty body).

No error message contains a MAC, a key or a token.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import ipaddress
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeGuard
from urllib.parse import urlparse

import mohawk
from attrs import field, frozen
from mohawk import exc as hawk_exc
from mohawk.util import calculate_payload_hash, parse_authorization_header
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from roller.auth import IAuthenticator, Principal
from roller.auth.scopes import satisfies
from roller.errors import BadRequest, RollerError, Unauthorized, UnavailableError
from roller.json_input import load_json

__all__ = [
    "NO_CREDENTIALS",
    "ClientOverBudget",
    "Credentials",
    "ExtError",
    "LocalHawkAuthenticator",
    "NonceCache",
    "RequestTarget",
    "authorization_header",
    "authorized_scopes_of",
    "decode_ext",
    "direct_target",
    "make_principal",
    "parse_address",
    "payload_hash",
    "peer_address",
    "request_body",
    "request_host",
    "request_line",
    "restrict",
    "split_host",
]

log = Logger()

NO_CREDENTIALS = "no credentials: sign the request with Hawk (Taskcluster credentials)"
DEFAULT_PORTS = {"http": 80, "https": 443}
#: Taskcluster's limits on temporary credentials.
CERT_SLACK_MS = 5 * 60 * 1000
CERT_MAX_MS = 31 * 24 * 60 * 60 * 1000
#: A message from a peer or a header value quoted in an error is cut to this.
QUOTE_MAX = 200

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# -- the request as the client signed it ------------------------------------------


def parse_address(text: str | None) -> Address | None:
    """An IP address from a peer or an X-Forwarded-For entry (port and brackets allowed)."""
    if not text:
        return None
    text = text.strip()
    candidates = [text]
    if text.startswith("["):  # "[2001:db8::1]:443" or "[2001:db8::1]"
        candidates.append(text[1:].split("]", 1)[0])
    elif text.count(":") == 1:  # "192.0.2.1:5678"
        candidates.append(text.split(":", 1)[0])
    for candidate in candidates:
        try:
            addr = ipaddress.ip_address(candidate.split("%", 1)[0])
        except ValueError:
            continue
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        return addr
    return None


def peer_address(request: IRequest) -> tuple[Address | None, str | None]:
    """
    The TCP peer of C{request}: its address (C{None} for a UNIX socket or
    an unparsable one) and how it is shown (an IPv4-mapped IPv6 address as
    IPv4).
    """
    return _peer(getattr(request.getClientAddress(), "host", None))


@lru_cache(maxsize=4096)
def _peer(text: str | None) -> tuple[Address | None, str | None]:
    """A TCP peer's address and how it is shown (remembered: a few hosts make every request)."""
    addr = parse_address(text)
    return addr, (str(addr) if addr is not None else text)


def split_host(value: str) -> tuple[str, int | None]:
    """
    C{("example.com", 8443)} from C{"Example.COM:8443"}; brackets off an IPv6 literal.

    @raise ValueError: not a host[:port].
    """
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(value)
        port_text = rest[1:] if rest else ""
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    elif ":" in value:
        raise ValueError(value)  # an IPv6 literal must be bracketed
    else:
        host, port_text = value, ""
    if not host or any(c.isspace() or c in "/?#@\\" for c in host):
        raise ValueError(value)
    if port_text == "":
        return host.lower(), None
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(value)
    return host.lower(), int(port_text)


@frozen
class RequestTarget:
    """
    What the client signed.

    @ivar method: upper-case.
    @ivar resource: path and query exactly as received.
    @ivar host: lower-case, without brackets for IPv6.
    @ivar source_ip: the client's address (behind trusted proxies), or C{None}.
    """

    method: str
    resource: str
    scheme: str
    host: str
    port: int
    source_ip: str | None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.resource}"

    def describe(self) -> str:
        """For error messages: C{POST https://roller.example.com:443/api/v1/...}."""
        return f"{self.method} {self.url}"[:QUOTE_MAX + 100]


def request_line(request: IRequest) -> tuple[str, str]:
    """
    The method (upper-case) and the resource (path and query exactly as received).

    @raise BadRequest: the request target is not UTF-8.
    """
    try:
        resource = request.uri.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the request target is not valid UTF-8", code="bad_request") from None
    return request.method.decode("ascii", "replace").upper(), resource


def request_host(request: IRequest) -> tuple[str, int | None]:
    """
    The host and port (C{None}: the scheme's default) the C{Host} header
    names, or, without one (HTTP/1.0), the address the client connected to.

    @raise BadRequest: the C{Host} header cannot be parsed.
    """
    raw_host = request.requestHeaders.getRawHeaders(b"host")
    if raw_host:
        text = raw_host[-1].decode("latin-1")
        try:
            return split_host(text)
        except ValueError:
            raise BadRequest(f"the Host header {text[:100]!r} is not a valid host[:port]",
                             code="invalid_host") from None
    local = request.getHost()
    return str(getattr(local, "host", "localhost")).lower(), getattr(local, "port", None)


def direct_target(request: IRequest) -> RequestTarget:
    """
    The method, resource, scheme, host, port and source address of
    C{request} as it reached roller, believing no proxy header.  Behind a
    trusted proxy the web layer works out what the client saw
    (C{roller.web.proxy.request_target}) and hands that to the
    authenticator instead.

    @raise BadRequest: the request target is not UTF-8 or the C{Host}
        header cannot be parsed.
    """
    method, resource = request_line(request)
    scheme = "https" if request.isSecure() else "http"
    host, port = request_host(request)
    return RequestTarget(method=method, resource=resource, scheme=scheme, host=host,
                         port=DEFAULT_PORTS[scheme] if port is None else port, source_ip=peer_address(request)[1])


def authorization_header(request: IRequest) -> str | None:
    """
    The C{Authorization} header, or C{None} when there is none.

    @raise Unauthorized: several of them, or not ASCII.
    """
    values = request.requestHeaders.getRawHeaders(b"authorization")
    if not values:
        return None
    if len(values) > 1:
        raise Unauthorized("several Authorization headers: send exactly one Hawk header")
    try:
        value = values[0].decode("ascii") if isinstance(values[0], bytes) else values[0]
    except UnicodeDecodeError:
        raise Unauthorized("the Authorization header is not ASCII: it is not a Hawk header") from None
    return value.strip() or None


def request_body(request: IRequest) -> tuple[bytes, str]:
    """
    The request body (the whole of it, whatever was read before) and its
    C{Content-Type} (C{""} when absent).  The body's read position is kept.
    """
    content = getattr(request, "content", None)
    body = b""
    if content is not None:
        try:
            position = content.tell()
            content.seek(0)
            body = content.read()
            content.seek(position)
        except (AttributeError, OSError, ValueError):
            body = b""
    ctype = request.getHeader(b"content-type") or b""
    return body, ctype.decode("latin-1")


def payload_hash(body: bytes, content_type: str) -> str:
    """Hawk's SHA-256 payload hash of C{body} (base64), as clients put it in C{hash}."""
    return calculate_payload_hash(body, "sha256", content_type).decode("ascii")


def make_principal(client_id: str, scopes: Iterable[str], expires: str | None = None, *,
                   authorized_scopes: Iterable[str] | None = None,
                   held_scopes: Iterable[str] | None = None) -> Principal:
    """
    A L{Principal}; C{authorized_scopes} (the request's ext.authorizedScopes)
    and C{held_scopes} (the client's before them) explain a 403 later.
    """
    return Principal(client_id, tuple(scopes), expires=expires,
                     authorized_scopes=None if authorized_scopes is None else tuple(authorized_scopes),
                     held_scopes=None if held_scopes is None else tuple(held_scopes))


def authorized_scopes_of(header: str) -> tuple[str, ...] | None:
    """The C{ext.authorizedScopes} of a (verified) Hawk header, or C{None} when it has none."""
    try:
        ext = parse_authorization_header(header).get("ext")
        value = decode_ext(ext).get("authorizedScopes") if ext else None
    except (hawk_exc.HawkFail, ValueError, KeyError, TypeError):
        return None
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    return None


# -- Taskcluster's ext --------------------------------------------------------------


class ExtError(ValueError):
    """An C{ext} (certificate, authorizedScopes) refused; the message says why."""


def decode_ext(ext: str) -> dict:
    """
    The JSON object in a Hawk C{ext}: base64 (standard or URL-safe alphabet)
    as Taskcluster's clients send it.

    @raise ExtError: not base64 JSON of an object.
    """
    text = ext.strip().replace("-", "+").replace("_", "/").rstrip("=")
    text += "=" * (-len(text) % 4)
    try:
        value = load_json(base64.b64decode(text, validate=True))
    except (ValueError, UnicodeDecodeError):
        raise ExtError("Failed to parse ext: it must be base64-encoded JSON") from None
    if not isinstance(value, dict):
        raise ExtError("Failed to parse ext: it must be a JSON object")
    return value


def _valid_scope(scope: object) -> bool:
    return isinstance(scope, str) and all(0x20 <= ord(c) <= 0x7E for c in scope)


def _js_number(value: int | float) -> str:
    """A number as JavaScript's C{String(n)} writes it (integral values without ".0")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if isinstance(value, int) else repr(value)


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@frozen
class Credentials:
    """What a Hawk header's id stands for once C{ext} is applied."""

    client_id: str
    key: str = field(repr=False)
    scopes: tuple[str, ...]
    expires: str | None = None
    #: ext.authorizedScopes when the request had them, and the scopes they narrowed
    authorized_scopes: tuple[str, ...] | None = None
    held_scopes: tuple[str, ...] | None = None


def restrict(
    credential_name: str,
    ext: Mapping[str, Any],
    clients: Mapping[str, tuple[str, Sequence[str]]],
    now_ms: float,
) -> Credentials:
    """
    Taskcluster's C{limitClientWithExt}: the key, scopes and expiry for the
    Hawk id C{credential_name} given the decoded C{ext}.

    @raise KeyError: the (issuing) client is unknown (its id is the argument).
    @raise ExtError: the certificate or authorizedScopes is refused.
    """
    cert = ext.get("certificate")
    # JavaScript truthiness, as in Taskcluster: an empty object is a certificate
    has_cert = bool(cert) or isinstance(cert, (Mapping, list))
    issuer = credential_name
    if has_cert and isinstance(cert, Mapping) and cert.get("issuer"):
        issuer = cert["issuer"]
        if not isinstance(issuer, str):
            raise ExtError("ext.certificate.issuer must be a string")
        if issuer == credential_name:
            raise ExtError("ext.certificate.issuer must differ from the supplied clientId")
    token, held = clients[issuer]
    scopes = tuple(held)
    key = token
    expires = None

    if has_cert:
        if not isinstance(cert, Mapping):
            raise ExtError("ext.certificate must be a JSON object")
        if cert.get("version") != 1 or isinstance(cert.get("version"), bool):
            raise ExtError("ext.certificate.version must be 1")
        seed = cert.get("seed")
        if not isinstance(seed, str):
            raise ExtError("ext.certificate.seed must be a string")
        if len(seed) != 44:
            raise ExtError("ext.certificate.seed must be 44 characters")
        start, expiry = cert.get("start"), cert.get("expiry")
        if not _number(start):
            raise ExtError("ext.certificate.start must be a number")
        if not _number(expiry):
            raise ExtError("ext.certificate.expiry must be a number")
        cert_scopes = cert.get("scopes")
        if not isinstance(cert_scopes, list):
            raise ExtError("ext.certificate.scopes must be an array")
        if not all(_valid_scope(s) for s in cert_scopes):
            raise ExtError("ext.certificate.scopes must be an array of valid scopes")
        if start > now_ms + CERT_SLACK_MS:
            raise ExtError("ext.certificate.start > now: the temporary credentials are not valid yet")
        if expiry < now_ms - CERT_SLACK_MS:
            raise ExtError("ext.certificate.expiry < now: the temporary credentials have expired")
        if expiry - start > CERT_MAX_MS:
            raise ExtError("ext.certificate cannot last longer than 31 days")
        if issuer != credential_name:
            create = f"auth:create-client:{credential_name}"
            if not satisfies(scopes, create):
                raise ExtError(f"ext.certificate issuer `{issuer}` doesn't have `{create}` for supplied clientId")
        elif "clientId" in cert:
            raise ExtError("ext.certificate.clientId must only be used with ext.certificate.issuer")
        missing = [s for s in cert_scopes if not satisfies(scopes, s)]
        if missing:
            raise ExtError(f"ext.certificate issuer `{issuer}` doesn't satisfy all certificate scopes "
                           f"({', '.join(missing)[:QUOTE_MAX]}): the temporary credentials were not "
                           "generated correctly")
        lines = ["version:1"]
        if cert.get("issuer"):
            lines += [f"clientId:{credential_name}", f"issuer:{issuer}"]
        lines += [f"seed:{seed}", f"start:{_js_number(start)}", f"expiry:{_js_number(expiry)}", "scopes:"]
        lines += cert_scopes
        expected = base64.b64encode(
            hmac.new(token.encode("utf-8"), "\n".join(lines).encode("utf-8"), hashlib.sha256).digest()
        )
        signature = cert.get("signature")
        if not isinstance(signature, str) or not hmac.compare_digest(signature.encode("utf-8"), expected):
            if cert.get("issuer"):
                raise ExtError("ext.certificate.signature is not valid, or wrong clientId provided")
            raise ExtError("ext.certificate.signature is not valid")
        key = base64.urlsafe_b64encode(
            hmac.new(token.encode("utf-8"), seed.encode("utf-8"), hashlib.sha256).digest()
        ).decode("ascii").rstrip("=")
        scopes = tuple(cert_scopes)
        expires = _iso(expiry)

    if "authorizedScopes" in ext and ext["authorizedScopes"] is not None:
        authorized = ext["authorizedScopes"]
        if not isinstance(authorized, list):
            raise ExtError("ext.authorizedScopes must be an array")
        if not all(_valid_scope(s) for s in authorized):
            raise ExtError("ext.authorizedScopes must be an array of valid scopes")
        missing = [s for s in authorized if not satisfies(scopes, s)]
        if missing:
            raise ExtError("Supplied credentials do not satisfy authorizedScopes; missing: "
                           + ", ".join(missing)[:QUOTE_MAX])
        return Credentials(client_id=credential_name, key=key, scopes=tuple(authorized), expires=expires,
                           authorized_scopes=tuple(authorized), held_scopes=scopes)

    return Credentials(client_id=credential_name, key=key, scopes=scopes, expires=expires)


# -- replay protection ----------------------------------------------------------------


class ClientOverBudget(RollerError):
    """429: one client made more Hawk requests than it may within the window."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class _Held:
    """One client's remembered (nonce, timestamp) pairs and their expiries (a heap)."""

    __slots__ = ("keys", "expiries")

    def __init__(self) -> None:
        self.keys: set[tuple[str, int]] = set()
        self.expiries: list[float] = []


class NonceCache:
    """
    The (client id, nonce, timestamp) triples seen within the timestamp
    window.  A request whose timestamp is outside the window is refused by
    the timestamp check anyway, so a triple is forgotten once its timestamp
    has left the window (at C{ts + window}).

    Each client may hold at most C{max_per_client} triples: a client over
    that is refused with 429 (L{ClientOverBudget}, with the seconds until
    its oldest triple is forgotten), and only that client -- the others go
    on.  All clients together hold at most C{max_entries} (which also bounds
    how many clients are tracked: a client is forgotten with its last
    triple); when that is reached, a client holding more than its fair
    share (C{max_entries} / clients tracked) gets 429, any other 503.
    """

    def __init__(self, clock: IReactorTime, window: float, max_entries: int = 100_000,
                 max_per_client: int | None = None):
        self.clock = clock
        self.window = window
        self.max_entries = max_entries
        self.max_per_client = min(max_per_client or max_entries, max_entries)
        self._clients: dict[str, _Held] = {}
        self._expiry: list[tuple[float, str, str, int]] = []
        self._total = 0

    def __len__(self) -> int:
        self._purge(self.clock.seconds())
        return self._total

    def clients(self) -> int:
        """How many clients have triples remembered."""
        self._purge(self.clock.seconds())
        return len(self._clients)

    def held_by(self, client_id: str) -> int:
        self._purge(self.clock.seconds())
        held = self._clients.get(client_id)
        return len(held.keys) if held is not None else 0

    def _purge(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, client_id, nonce, ts = heapq.heappop(self._expiry)
            held = self._clients.get(client_id)
            if held is None:
                continue
            held.keys.discard((nonce, ts))
            while held.expiries and held.expiries[0] < now:
                heapq.heappop(held.expiries)
            if not held.keys:
                del self._clients[client_id]
            self._total -= 1

    def _over(self, client_id: str, held: _Held, now: float, limit: int) -> ClientOverBudget:
        wait = held.expiries[0] - now if held.expiries else self.window
        log.warn("Hawk client {client} is over its budget of {limit} requests in {window:g} s: refused for "
                 "{wait:.0f} s", client=client_id[:QUOTE_MAX], limit=limit, window=self.window, wait=wait)
        return ClientOverBudget(
            f"client {client_id[:QUOTE_MAX]!r} made more than {limit} requests within {self.window:g} seconds "
            f"(auth.max_requests_per_client): slow down; retry in {max(1, math.ceil(wait))} s", retry_after=wait)

    def seen(self, client_id: str, nonce: str, ts: int) -> bool:
        """
        True if this triple was seen; else remember it and return False.

        @raise ClientOverBudget: this client holds C{max_per_client} fresh
            triples, or more than its share of a full cache.
        @raise UnavailableError: C{max_entries} fresh triples are held, by
            other clients (more authenticated requests than roller can track).
        """
        now = self.clock.seconds()
        self._purge(now)
        held = self._clients.get(client_id)
        key = (nonce, ts)
        if held is not None and key in held.keys:
            return True
        count = len(held.keys) if held is not None else 0
        if held is not None and count >= self.max_per_client:
            raise self._over(client_id, held, now, self.max_per_client)
        if self._total >= self.max_entries:
            share = self.max_entries // max(1, len(self._clients))
            if held is not None and count >= share:
                raise self._over(client_id, held, now, share)
            raise UnavailableError(
                f"more than {self.max_entries} authenticated requests in {2 * self.window:g} seconds from "
                f"{len(self._clients)} clients: retry shortly", code="auth_unavailable")
        if held is None:
            held = self._clients[client_id] = _Held()
        held.keys.add(key)
        heapq.heappush(held.expiries, ts + self.window)
        heapq.heappush(self._expiry, (ts + self.window, client_id, nonce, ts))
        self._total += 1
        return False


# -- local verification ---------------------------------------------------------------


@implementer(IAuthenticator)
class LocalHawkAuthenticator:
    """
    Verifies Hawk in-process against C{clients} (C{auth.mode = "local"}).

    @param clock: an L{IReactorTime}; its C{seconds()} is roller's idea of
        the time for timestamps, nonces and certificates.
    @param clients: client id -> (access token, scopes).
    @param skew: the largest accepted difference, in seconds, between a
        request's timestamp and the clock.
    @param max_nonces: at most this many recent nonces are kept (see
        L{NonceCache}).
    @param max_requests_per_client: at most this many of them per client
        (C{auth.max_requests_per_client}); a client over it gets 429.
    """

    def __init__(
        self,
        clock: IReactorTime,
        clients: Mapping[str, tuple[str, Sequence[str]]],
        skew: float = 60.0,
        max_nonces: int = 100_000,
        max_requests_per_client: int | None = None,
    ):
        self.clock = clock
        self.clients = {cid: (str(token), tuple(scopes)) for cid, (token, scopes) in clients.items()}
        self.skew = skew
        self.nonces = NonceCache(clock, skew, max_nonces, max_requests_per_client)

    def authenticate(self, request: IRequest, target: RequestTarget | None = None) -> Deferred[Principal]:
        try:
            return succeed(self.verify(request, target))
        except RollerError as e:
            return fail(e)

    def verify(self, request: IRequest, target: RequestTarget | None = None) -> Principal:
        """
        The principal behind C{request}, synchronously; raises L{Unauthorized}.

        @param target: what the client signed, from the web layer; by
            default the request as it reached roller (L{direct_target}).
        """
        header = authorization_header(request)
        if header is None:
            raise Unauthorized(NO_CREDENTIALS)
        if target is None:
            target = direct_target(request)
        try:
            attributes = parse_authorization_header(header)
        except (hawk_exc.HawkFail, ValueError, KeyError):
            raise Unauthorized(_MALFORMED) from None
        client_id = attributes.get("id")
        if not client_id or "ts" not in attributes or "nonce" not in attributes or "mac" not in attributes:
            raise Unauthorized(_MALFORMED + " (id, ts, nonce and mac are required)")
        now = self.clock.seconds()
        try:
            ext = decode_ext(attributes["ext"]) if attributes.get("ext") else {}
            creds = restrict(client_id, ext, self.clients, now * 1000)
        except KeyError as e:
            raise Unauthorized(f"unknown client {str(e.args[0])[:QUOTE_MAX]!r}: it is not in roller's "
                               "[clients] (auth.mode = \"local\")") from None
        except ExtError as e:
            raise Unauthorized(str(e)) from None

        # mohawk reads the resource back out of a URL; refuse the rare targets
        # (';' parameters in the path, an empty '?') whose text it would change.
        parsed = urlparse(target.url)
        seen_resource = parsed.path + (f"?{parsed.query}" if parsed.query else "")
        if seen_resource != target.resource:
            raise Unauthorized(f"cannot verify a Hawk signature for the request target "
                               f"{target.resource[:QUOTE_MAX]!r}; remove ';' from the path or an empty '?'")

        body, content_type = request_body(request)

        def lookup(cid: str) -> dict:
            if cid != client_id:
                raise LookupError(cid)
            return {"id": cid, "key": creds.key, "algorithm": "sha256"}

        def seen_nonce(cid: str, nonce: str, ts: str) -> bool:
            # mohawk calls this after checking the MAC and the payload hash,
            # just before its own timestamp check, which reads time.time()
            # (to the whole second).  Check the timestamp here against the
            # injected clock instead; a stale request's nonce is not kept.
            stamp = int(ts)
            if abs(stamp - math.floor(self.clock.seconds())) > self.skew:
                raise _Stale(stamp)
            return self.nonces.seen(cid, nonce, stamp)

        try:
            mohawk.Receiver(
                lookup, header, url=target.url, method=target.method,
                content=body, content_type=content_type,
                seen_nonce=seen_nonce,
                # checked in seen_nonce; mohawk's check (on the real time, offset
                # to the clock) is only a backstop
                localtime_offset_in_seconds=now - time.time(),
                timestamp_skew_in_seconds=self.skew + 2,
                accept_untrusted_content=True,
            )
        except (_Stale, hawk_exc.TokenExpired):
            delta = int(attributes["ts"]) - math.floor(now)
            raise Unauthorized(
                f"stale timestamp: the request's Hawk timestamp is {abs(delta)} s "
                f"{'ahead of' if delta > 0 else 'behind'} roller's clock (at most {self.skew:g} s "
                "allowed); check the client's clock") from None
        except hawk_exc.MacMismatch:
            raise Unauthorized(
                "the Hawk signature does not match: check the access token, and that the client "
                f"signed the URL roller received ({target.describe()})") from None
        except hawk_exc.MisComputedContentHash:
            raise Unauthorized("the Hawk payload hash does not match the request body") from None
        except hawk_exc.AlreadyProcessed:
            raise Unauthorized("replayed request: this Hawk nonce and timestamp were already used; "
                               "sign every request afresh") from None
        except hawk_exc.CredentialsLookupError:
            raise Unauthorized(f"unknown client {client_id[:QUOTE_MAX]!r}") from None
        except (hawk_exc.HawkFail, ValueError, KeyError, TypeError, UnicodeError):
            raise Unauthorized(_MALFORMED) from None
        log.debug("Hawk: {client} authenticated locally from {ip}", client=creds.client_id, ip=target.source_ip)
        return make_principal(creds.client_id, creds.scopes, creds.expires,
                              authorized_scopes=creds.authorized_scopes, held_scopes=creds.held_scopes)


class _Stale(Exception):
    """A timestamp outside the window (raised from inside mohawk's nonce hook)."""


_MALFORMED = "malformed Authorization header: expected Hawk id=\"...\", ts=\"...\", nonce=\"...\", mac=\"...\""
