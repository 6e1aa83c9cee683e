"""
Which names roller answers to: the C{Host} check (C{server.allowed_hosts}).

A Hawk MAC covers the host and port the client sent the request to, and
roller reads them from the C{Host} header.  Without a check, a request
signed for another roller (sharing clients with this one) could be replayed
here within the timestamp window by sending it with the other roller's
C{Host}; and a browser page whose name was re-pointed at roller (DNS
rebinding) could talk to it as its own site.  So every request, before
anything reads it (Hawk, the dashboard, the event stream), must name a host
and port this roller answers to -- otherwise 421 C{bad_host}:

  - the address the connection reached, with its port (an IP literal names
    this very socket: C{127.0.0.1:8000}, C{[2001:db8::5]:8443});
  - on a loopback connection, C{localhost} and any loopback address, with
    the port;
  - the machine's host name (C{socket.gethostname()}), with the port the
    connection reached;
  - C{server.public_url}'s host and port (its scheme's default when it has
    none);
  - each entry of C{server.allowed_hosts}: C{name} (any port),
    C{name:port} or C{[IPv6]:port}; C{*} turns the check off.

Behind a trusted proxy (C{server.trusted_proxies}) the port is the one it
forwards in C{X-Forwarded-Port} (the same host and port Hawk verifies); the
proxy must pass the client's C{Host} on (roller does not read
C{X-Forwarded-Host}): list the public names in C{public_url} or
C{allowed_hosts}.  Over a UNIX socket only the configured names and
C{localhost} are accepted.  The load balancer's C{/__lbheartbeat__},
C{/__heartbeat__} and C{/__version__} answer whatever the C{Host}.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from twisted.internet.interfaces import IAddress
from twisted.web import resource
from twisted.web.iweb import IRequest

from roller.auth.hawk import DEFAULT_PORTS
from roller.config import Settings
from roller.errors import BadRequest
from roller.web.http import json_error
from roller.web.proxy import Network, parse_trusted_proxies, request_authority
from roller.web.site import security_headers

__all__ = ["AllowedHosts", "HostCheck", "host_check_from_settings"]

#: L{AllowedHosts.allows} answers remembered at most
ANSWERS_KEPT = 1024

#: answered whatever the Host (load balancers' health checks use all sorts)
EXEMPT_PATHS = frozenset({b"/__lbheartbeat__", b"/__heartbeat__", b"/__version__"})


def _name(text: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets; an IP literal in its normal form."""
    text = text.strip().lower().rstrip(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def _entry(text: str) -> tuple[str, int | None]:
    """C{("name", None)} from C{"name"}, C{("name", 8000)} from C{"name:8000"} or C{"[::1]:8000"}."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return _name(host), int(rest[1:]) if rest.startswith(":") else None
    host, sep, port = text.partition(":")
    return _name(host), int(port) if sep and port else None


def _loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class AllowedHosts:
    """
    The host names (and ports) a request may name (see the module docstring).

    @param names: C{server.allowed_hosts} entries.
    @param public_url: C{server.public_url} (or C{""}).
    @param machine_names: the machine's names, accepted at the port a
        connection reached (default: C{socket.gethostname()}).
    @param trusted_proxies: whose C{X-Forwarded-Port}/C{-Proto} count.
    """

    def __init__(self, names: Iterable[str] = (), public_url: str = "",
                 machine_names: Iterable[str] | None = None,
                 trusted_proxies: Iterable[str | Network] = ()):
        names = list(names)
        self.any = "*" in names
        self.fixed: set[tuple[str, int | None]] = {_entry(n) for n in names if n != "*"}
        if public_url:
            url = urlsplit(public_url)
            if url.hostname:
                self.fixed.add((_name(url.hostname), url.port or DEFAULT_PORTS.get(url.scheme, 443)))
        if machine_names is None:
            machine_names = [socket.gethostname()]
        self.machine_names = {_name(n) for n in machine_names if n}
        self.trusted_proxies: Sequence[Network] = parse_trusted_proxies(trusted_proxies)
        #: answers of L{allows} by (host, port, local address): a few names make every request
        self._answers: dict[tuple[str, int, str | None, object], bool] = {}

    def allows(self, host: str, port: int, local: IAddress | None = None) -> bool:
        """
        Whether C{host}:C{port} (from a request) names this roller for a
        connection that reached C{local} (the request's C{getHost()}).
        """
        if self.any:
            return True
        key = (host, port, getattr(local, "host", None), getattr(local, "port", None))
        answer = self._answers.get(key)
        if answer is None:
            if len(self._answers) >= ANSWERS_KEPT:  # (a client sending many names cannot grow it)
                self._answers.clear()
            answer = self._answers[key] = self._allows(host, port, local)
        return answer

    def _allows(self, host: str, port: int, local: IAddress | None) -> bool:
        host = _name(host)
        if (host, port) in self.fixed or (host, None) in self.fixed:
            return True
        local_host = getattr(local, "host", None)
        local_port = getattr(local, "port", None)
        if not isinstance(local_port, int):  # a UNIX socket: only the names configured, and localhost
            return host == "localhost"
        if port != local_port:
            return False
        if host in self.machine_names or host == _name(str(local_host)):
            return True
        return _loopback(_name(str(local_host))) and _loopback(host)

    def refusal(self, request: IRequest) -> tuple[int, str, str] | None:
        """The (status, code, message) to refuse C{request} with, or C{None}."""
        if self.any or request.path in EXEMPT_PATHS:
            return None
        try:
            (request.getHeader(b"host") or b"").decode("utf-8")
        except UnicodeDecodeError:
            return None  # the site answers 400 for that itself
        try:
            _, host, port = request_authority(request, self.trusted_proxies)
        except BadRequest as e:
            return e.status, e.code, e.message
        if self.allows(host, port, request.getHost()):
            return None
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return (421, "bad_host",
                f"this roller does not answer to {shown[:200]!r} (the request's Host): a request signed for "
                "another server is not accepted here. If that is this roller's name, add it to "
                "server.allowed_hosts (or set server.public_url)")


class _Refused(resource.Resource):
    isLeaf = True

    def __init__(self, status: int, code: str, message: str):
        super().__init__()
        self.answer = (status, code, message)

    def render(self, request: IRequest) -> bytes:
        security_headers(request)
        return json_error(request, *self.answer)


class HostCheck(resource.Resource):
    """
    A root resource that refuses requests for hosts L{AllowedHosts} does
    not allow, before C{wrapped} (the whole site) sees them.
    """

    def __init__(self, wrapped: resource.Resource, allowed: AllowedHosts):
        super().__init__()
        self.wrapped = wrapped
        self.allowed = allowed
        self.isLeaf = getattr(wrapped, "isLeaf", False)  # a Klein app's resource routes the whole path itself

    def getChildWithDefault(self, name: bytes, request: IRequest) -> resource.Resource:
        refusal = self.allowed.refusal(request)
        if refusal is not None:
            return _Refused(*refusal)
        return self.wrapped.getChildWithDefault(name, request)

    def render(self, request: IRequest) -> bytes:
        refusal = self.allowed.refusal(request)
        if refusal is not None:
            return _Refused(*refusal).render(request)
        return self.wrapped.render(request)


def host_check_from_settings(wrapped: resource.Resource, settings: Settings) -> HostCheck:
    """L{HostCheck} for C{server.allowed_hosts}, C{server.public_url} and C{server.trusted_proxies}."""
    return HostCheck(wrapped, AllowedHosts(settings.allowed_hosts, settings.public_url,
                                           trusted_proxies=settings.trusted_proxies))
