"""
The request as its client sent it, behind load balancers: C{X-Forwarded-For},
C{X-Forwarded-Proto} and C{X-Forwarded-Port}.

They are believed only when the TCP peer is in C{server.trusted_proxies}
(IPs or CIDRs, L{parse_trusted_proxies}); from anyone else they are ignored
and the source IP is the peer.  When a header holds several values (a chain
of proxies appending), the last one -- set by the nearest, trusted, proxy --
is used for the scheme and port; the client address is the right-most
C{X-Forwarded-For} entry that is not itself a trusted proxy.

The API hands L{request_target} to its authenticator (a Hawk MAC covers the
scheme, host and port the I{client} used, and Taskcluster wants its
address); the API, the dashboard and the admin pages record L{client_ip} as
a job's origin and an audit entry's source; L{roller.web.hosts} checks the
authority of L{request_authority}.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from twisted.web.iweb import IRequest

from roller.auth.hawk import (
    DEFAULT_PORTS,
    Address,
    RequestTarget,
    parse_address,
    peer_address,
    request_host,
    request_line,
)

__all__ = ["Network", "client_ip", "parse_trusted_proxies", "request_authority", "request_target"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_trusted_proxies(values: Iterable[str | Network] | str) -> tuple[Network, ...]:
    """
    Networks from IPs or CIDRs (C{"10.0.0.5"}, C{"10.1.0.0/16"}, C{"::1"}).

    @raise ValueError: an entry is neither, naming it.
    """
    if isinstance(values, str):
        values = [values]
    out: list[Network] = []
    for value in values:
        if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            out.append(value)
            continue
        try:
            out.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{str(value)[:60]!r} is not an IP address or CIDR network") from None
    return tuple(out)


def _trusted(addr: Address | None, networks: Sequence[Network]) -> bool:
    return addr is not None and any(addr.version == net.version and addr in net for net in networks)


def _header_values(request: IRequest, name: bytes) -> list[str]:
    """Every comma-separated value of every C{name} header, in order."""
    out: list[str] = []
    for raw in request.requestHeaders.getRawHeaders(name) or ():
        text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        out.extend(v.strip() for v in text.split(","))
    return [v for v in out if v]


def client_ip(request: IRequest, trusted_proxies: Sequence[Network] = ()) -> str | None:
    """
    The address of the client: the TCP peer, or, when the peer is a trusted
    proxy, the address it forwarded in C{X-Forwarded-For} (see the module
    docstring).
    """
    peer, shown = peer_address(request)
    if peer is None or not trusted_proxies or not _trusted(peer, trusted_proxies):
        return shown
    source: Address = peer
    for entry in reversed(_header_values(request, b"x-forwarded-for")):
        addr = parse_address(entry)
        if addr is None:
            break  # garbage: believe no further; the proxy that passed it on is the source
        source = addr
        if not _trusted(addr, trusted_proxies):
            break
    return str(source)


def request_authority(request: IRequest, trusted_proxies: Sequence[Network] = ()) -> tuple[str, str, int]:
    """
    The scheme, host and port C{request} was sent to, as its client saw
    them: what a Hawk MAC covers.

    @raise BadRequest: the C{Host} header cannot be parsed.
    """
    forwarded = _trusted(peer_address(request)[0], trusted_proxies)
    scheme = "https" if request.isSecure() else "http"
    if forwarded:
        protos = [p.lower() for p in _header_values(request, b"x-forwarded-proto")]
        if protos and protos[-1] in DEFAULT_PORTS:
            scheme = protos[-1]
    host, port = request_host(request)
    if port is None:
        port = DEFAULT_PORTS[scheme]
    if forwarded:
        ports = _header_values(request, b"x-forwarded-port")
        if ports and ports[-1].isascii() and ports[-1].isdigit() and 0 < int(ports[-1]) < 65536:
            port = int(ports[-1])
    return scheme, host, port


def request_target(request: IRequest, trusted_proxies: Sequence[Network] = ()) -> RequestTarget:
    """
    The method, resource, scheme, host, port and source address of
    C{request} as its client saw them; what the API hands its
    authenticator.

    @raise BadRequest: the request target is not UTF-8 or the C{Host}
        header cannot be parsed.
    """
    method, resource = request_line(request)
    scheme, host, port = request_authority(request, trusted_proxies)
    return RequestTarget(method=method, resource=resource, scheme=scheme, host=host, port=port,
                         source_ip=client_ip(request, trusted_proxies))
