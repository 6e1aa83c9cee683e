"""
Hawk authentication: roller/auth/hawk.py (local clients, the signed request
target, Taskcluster's ext) and roller/auth/taskcluster.py (forwarding to
Taskcluster's authenticate-hawk, here the fake in roller/testing/tc_auth.py).

The first part runs synchronously on a L{Clock}; the second serves a real
L{Api} (real SQLite store, real queue) on 127.0.0.1 and signs requests with
C{mohawk.Sender} exactly as the official C{taskcluster} client does, and
with the official client itself.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import time
from typing import Any

import attrs
import mohawk
import pytest
import pytest_twisted
import taskcluster
import treq
from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from roller.auth import IAuthenticator, Principal
from roller.auth.hawk import (
    NO_CREDENTIALS,
    ClientOverBudget,
    ExtError,
    LocalHawkAuthenticator,
    NonceCache,
    decode_ext,
    payload_hash,
)
from roller.auth.taskcluster import TaskclusterAuthenticator
from roller.errors import BadRequest, Unauthorized, UnavailableError
from roller.inventory import Machine
from roller.queue import JobQueue
from roller.sim.web import listen_closing
from roller.store import open_store
from roller.tasks import TaskRegistry, TaskSpec
from roller.testing.tc_auth import FakeTaskclusterAuth
from roller.web.api import Api
from roller.web.http import RollerSite
from roller.web.proxy import client_ip, parse_trusted_proxies, request_target

PING = "project:releng:roller:ping"
CI = "project/releng/roller-ci"  # holds project:releng:roller:*
REBOOTER = "project/releng/rebooter"  # holds only project:releng:roller:reboot
ADMIN = "project/releng/admin"  # holds *
ISSUER = "project/releng/issuer"  # may create project/releng/named-* clients
CLIENTS: dict[str, tuple[str, list[str]]] = {
    CI: ("ci-TOKEN-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", ["project:releng:roller:*"]),
    REBOOTER: ("reboot-TOKEN-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", ["project:releng:roller:reboot"]),
    ADMIN: ("admin-TOKEN-cccccccccccccccccccccccccccccccccccccc", ["*"]),
    ISSUER: ("issuer-TOKEN-ddddddddddddddddddddddddddddddddddd",
             ["project:releng:roller:*", "auth:create-client:project/releng/named-*"]),
}
T0 = 1_700_000_000  # the Clock's time in the synchronous tests


# -- signing like the official client ---------------------------------------------


def _client_class() -> type:
    """An official taskcluster client class for roller's job submission."""
    return taskcluster.client.createApiClient("Roller", {"reference": {
        "serviceName": "roller", "apiVersion": "v1",
        "entries": [{
            "type": "function", "method": "post", "name": "submitJob", "stability": "stable",
            "route": "/workers/<workerId>/group/<workerGroup>/jobs", "args": ["workerId", "workerGroup"],
            "query": ["task_name", "reason", "priority"],
        }],
    }})


def official_client(base: str, credentials: dict, **options: Any) -> Any:
    """The official client, pointed at roller's /api/v1 (not Taskcluster's /api/<service>/v1)."""

    class RollerClient(_client_class()):
        def _constructUrl(self, route: str) -> str:
            return f"{base}/api/v1/{route}"

    return RollerClient({"rootUrl": base, "credentials": dict(credentials), "maxRetries": 0, **options})


def official_ext(credentials: dict, **options: Any) -> str | None:
    """The Hawk ext the official client sends for these credentials and options."""
    ext = official_client("http://unused.example", credentials, **options).makeHawkExt()
    return ext.decode("ascii") if ext else None


def sign(url: str, client_id: str = CI, *, token: str | None = None, method: str = "POST", ext: str | None = None,
         ts: int | None = None, nonce: str | None = None, content: bytes | str = "", content_type: str = "") -> str:
    """The Authorization header the official Python client sends (mohawk.Sender, sha256)."""
    return mohawk.Sender(
        credentials={"id": client_id, "key": token or CLIENTS[client_id][0], "algorithm": "sha256"},
        url=url, method=method, content=content, content_type=content_type, ext=ext,
        _timestamp=ts, nonce=nonce,
    ).request_header


# -- a request without a server, for the synchronous tests -----------------------------


class FakeRequest:
    """What the authenticators read from a twisted.web request."""

    def __init__(self, uri: str | bytes, *, method: bytes = b"POST", headers: dict[str, str] | None = None,
                 peer: str = "127.0.0.1", secure: bool = False, body: bytes = b"", local_port: int = 8000):
        self.uri = uri.encode() if isinstance(uri, str) else uri
        self.method = method
        self.requestHeaders = Headers()
        for name, value in (headers or {}).items():
            for v in value if isinstance(value, list) else [value]:
                self.requestHeaders.addRawHeader(name.encode(), v.encode("latin-1"))
        self._peer = (IPv6Address if ":" in peer else IPv4Address)("TCP", peer, 40000)
        self._secure = secure
        self.content = io.BytesIO(body)
        self.content.seek(len(body))  # as after the API read it
        self._local = IPv4Address("TCP", "127.0.0.1", local_port)

    def getClientAddress(self) -> Any:
        return self._peer

    def isSecure(self) -> bool:
        return self._secure

    def getHost(self) -> Any:
        return self._local

    def getHeader(self, name: bytes) -> bytes | None:
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None


def outcome(d: Deferred) -> Any:
    """The result of a fired Deferred, or its exception (not raised)."""
    out: list = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0].value if isinstance(out[0], Failure) else out[0]


def local_auth(clock: Clock | None = None, **kw: Any) -> LocalHawkAuthenticator:
    if clock is None:
        clock = Clock()
        clock.advance(T0)
    return LocalHawkAuthenticator(clock, {cid: (tok, scopes) for cid, (tok, scopes) in CLIENTS.items()}, **kw)


PATH = "/api/v1/workers/m1/group/g1/jobs?task_name=ping"
URL = "http://roller.test:8000" + PATH
HOST = {"Host": "roller.test:8000"}


def signed(header: str, path: str = PATH, **kw: Any) -> FakeRequest:
    headers = dict(HOST)
    headers.update(kw.pop("headers", {}))
    headers["Authorization"] = header
    return FakeRequest(path, headers=headers, **kw)


# -- the request target ------------------------------------------------------------------


def test_target_from_host_header() -> None:
    r = FakeRequest("/a/b?x=1&y=%20", headers={"Host": "Roller.Example.COM:8443"})
    t = request_target(r)
    assert (t.method, t.resource, t.scheme, t.host, t.port, t.source_ip) == \
        ("POST", "/a/b?x=1&y=%20", "http", "roller.example.com", 8443, "127.0.0.1")
    assert request_target(FakeRequest("/", headers={"Host": "h"})).port == 80
    assert request_target(FakeRequest("/", headers={"Host": "h"}, secure=True)).port == 443
    assert request_target(FakeRequest("/", headers={"Host": "[::1]:9"})).host == "::1"
    assert request_target(FakeRequest("/", headers={"Host": "[::1]"})).url == "http://[::1]:80/"
    # HTTP/1.0 without Host: the local address
    t = request_target(FakeRequest("/", local_port=8123))
    assert (t.host, t.port) == ("127.0.0.1", 8123)


@pytest.mark.parametrize("host", ["a:b", "a:0", "a:70000", "::1", "a b", "[::1", "a/b"])
def test_bad_host_header_is_400(host: str) -> None:
    with pytest.raises(BadRequest) as e:
        request_target(FakeRequest("/", headers={"Host": host}))
    assert e.value.code == "invalid_host"


FORGED = {"Host": "roller.example.com", "X-Forwarded-Proto": "https", "X-Forwarded-Port": "443",
          "X-Forwarded-For": "198.51.100.7"}


def test_forwarded_headers_ignored_from_untrusted_peer() -> None:
    t = request_target(FakeRequest("/", headers=FORGED, peer="203.0.113.5"), parse_trusted_proxies(["10.0.0.0/8"]))
    assert (t.scheme, t.host, t.port, t.source_ip) == ("http", "roller.example.com", 80, "203.0.113.5")


def test_forwarded_headers_honoured_from_trusted_peer() -> None:
    trusted = parse_trusted_proxies(["10.0.0.0/8", "2001:db8::1"])
    for peer in ("10.1.2.3", "2001:db8::1", "::ffff:10.0.0.1"):
        t = request_target(FakeRequest("/", headers=FORGED, peer=peer), trusted)
        assert (t.scheme, t.host, t.port, t.source_ip) == ("https", "roller.example.com", 443, "198.51.100.7"), peer


def test_forwarded_for_chain_takes_rightmost_untrusted() -> None:
    trusted = parse_trusted_proxies(["10.0.0.0/8"])

    def source(xff: str | list[str]) -> str | None:
        return client_ip(FakeRequest("/", headers={"X-Forwarded-For": xff}, peer="10.0.0.2"), trusted)

    # a client forging an entry in front of its real address gains nothing
    assert source("6.6.6.6, 198.51.100.7, 10.0.0.9") == "198.51.100.7"
    assert source(["6.6.6.6", "198.51.100.7"]) == "198.51.100.7"
    assert source("10.0.0.5, 10.0.0.9") == "10.0.0.5"  # all proxies: the left-most
    assert source("198.51.100.7:5555") == "198.51.100.7"
    assert source("[2001:db8::7]:443") == "2001:db8::7"
    assert source("garbage, 10.0.0.9") == "10.0.0.9"  # stop at garbage: the proxy that passed it on
    assert source("") == "10.0.0.2"
    assert client_ip(FakeRequest("/", headers={"X-Forwarded-For": "1.2.3.4"}, peer="10.0.0.2")) == "10.0.0.2"


def test_forwarded_proto_and_port_last_value_and_validated() -> None:
    trusted = parse_trusted_proxies(["127.0.0.1"])
    t = request_target(FakeRequest("/", headers={"Host": "h", "X-Forwarded-Proto": "http, https"}), trusted)
    assert (t.scheme, t.port) == ("https", 443)
    t = request_target(FakeRequest("/", headers={"Host": "h:8000", "X-Forwarded-Proto": "gopher",
                                                 "X-Forwarded-Port": "99999"}), trusted)
    assert (t.scheme, t.port) == ("http", 8000)
    t = request_target(FakeRequest("/", headers={"Host": "h:8000", "X-Forwarded-Port": "8443"}), trusted)
    assert t.port == 8443


def test_trusted_proxies_parse() -> None:
    nets = parse_trusted_proxies(["127.0.0.1", "10.0.0.0/8", "10.1.2.3/8", "::1"])
    assert [str(n) for n in nets] == ["127.0.0.1/32", "10.0.0.0/8", "10.0.0.0/8", "::1/128"]
    with pytest.raises(ValueError, match="'proxy.example.com' is not an IP address or CIDR"):
        parse_trusted_proxies(["proxy.example.com"])


# -- local verification (on a Clock) ---------------------------------------------------


def test_local_authenticator_provides_interface() -> None:
    verifyObject(IAuthenticator, local_auth())
    verifyObject(IAuthenticator, TaskclusterAuthenticator(Clock(), "https://tc.example", treq_client=object()))


def test_local_accepts_official_signature_on_injected_clock() -> None:
    # The clock says T0 (2023); the real time is later: only the clock counts.
    principal = outcome(local_auth().authenticate(signed(sign(URL, ts=T0))))
    assert isinstance(principal, Principal), principal
    assert principal.id == CI and principal.scopes == ("project:releng:roller:*",)
    assert principal.has_scope(PING)


def test_local_no_credentials() -> None:
    e = outcome(local_auth().authenticate(FakeRequest(PATH, headers=HOST)))
    assert isinstance(e, Unauthorized) and e.message == NO_CREDENTIALS


@pytest.mark.parametrize("header, reason", [
    ("Bearer abc", "malformed Authorization header"),
    ("Hawk", "malformed Authorization header"),
    ('Hawk id="x", ts="1", nonce="n"', "id, ts, nonce and mac are required"),
    ('Hawk id="nobody", ts="1", nonce="n", mac="m"', "unknown client 'nobody'"),
    ('Hawk id="a", id="b", ts="1", nonce="n", mac="m"', "malformed Authorization header"),
])
def test_local_malformed(header: str, reason: str) -> None:
    e = outcome(local_auth().authenticate(signed(header)))
    assert isinstance(e, Unauthorized) and reason in e.message, e


def test_local_bad_mac_names_target_never_the_mac() -> None:
    header = sign(URL, ts=T0, token="wrong-token")
    e = outcome(local_auth().authenticate(signed(header)))
    assert isinstance(e, Unauthorized)
    assert e.message == ("the Hawk signature does not match: check the access token, and that the client "
                         f"signed the URL roller received (POST {URL})")
    good_mac = sign(URL, ts=T0, nonce="samenonce").split('mac="')[1].split('"')[0]
    e = outcome(local_auth().authenticate(signed(sign(URL, ts=T0, nonce="samenonce", token="x"))))
    assert good_mac not in e.message and CLIENTS[CI][0] not in e.message


def test_local_wrong_host_port_or_path_fails() -> None:
    auth = local_auth()
    # (Hawk signs host and port, not the scheme)
    for url in ("http://roller.test:8001" + PATH, "https://roller.test" + PATH,
                "http://other.test:8000" + PATH, URL.replace("ping", "reboot")):
        e = outcome(auth.authenticate(signed(sign(url, ts=T0))))
        assert isinstance(e, Unauthorized) and "signature does not match" in e.message, url


def test_local_stale_timestamp_both_ways() -> None:
    auth = local_auth(skew=60)
    assert isinstance(outcome(auth.authenticate(signed(sign(URL, ts=T0 - 60)))), Principal)
    assert isinstance(outcome(auth.authenticate(signed(sign(URL, ts=T0 + 60)))), Principal)
    e = outcome(auth.authenticate(signed(sign(URL, ts=T0 - 61))))
    assert isinstance(e, Unauthorized)
    assert e.message == ("stale timestamp: the request's Hawk timestamp is 61 s behind roller's clock "
                         "(at most 60 s allowed); check the client's clock")
    e = outcome(auth.authenticate(signed(sign(URL, ts=T0 + 3600))))
    assert "3600 s ahead of roller's clock" in e.message
    assert len(auth.nonces) == 2  # stale requests are not remembered


def test_local_replay_refused_then_forgotten_with_the_window() -> None:
    clock = Clock()
    clock.advance(T0)
    auth = local_auth(clock, skew=60)
    header = sign(URL, ts=T0)
    assert isinstance(outcome(auth.authenticate(signed(header))), Principal)
    e = outcome(auth.authenticate(signed(header)))
    assert isinstance(e, Unauthorized) and e.message.startswith("replayed request")
    # same nonce and ts from another client is not a replay
    nonce = header.split('nonce="')[1].split('"')[0]
    assert isinstance(outcome(auth.authenticate(signed(sign(URL, ADMIN, ts=T0, nonce=nonce)))), Principal)
    clock.advance(60)
    assert isinstance(outcome(auth.authenticate(signed(header))), Unauthorized)  # still in the window
    clock.advance(1)
    e = outcome(auth.authenticate(signed(header)))
    assert isinstance(e, Unauthorized) and e.message.startswith("stale timestamp")  # and no longer held:
    auth.authenticate(signed(sign(URL, ts=T0 + 61)))
    assert len(auth.nonces) == 1


def test_nonce_cache_is_bounded() -> None:
    clock = Clock()
    cache = NonceCache(clock, window=10, max_entries=3)
    for n in range(3):
        assert cache.seen("c", f"n{n}", 0) is False
    assert cache.seen("c", "n1", 0) is True
    with pytest.raises(ClientOverBudget) as over:  # c holds everything: c is refused
        cache.seen("c", "n9", 0)
    assert over.value.status == 429 and over.value.retry_after == 10
    with pytest.raises(UnavailableError) as e:  # full, and d holds nothing it could give back
        cache.seen("d", "n9", 0)
    assert e.value.status == 503 and e.value.code == "auth_unavailable"
    clock.advance(10.5)  # their timestamps left the window
    assert cache.seen("c", "n9", 10) is False and len(cache) == 1 and cache.clients() == 1


def test_nonce_budget_is_per_client() -> None:
    clock = Clock()
    clock.advance(100)
    cache = NonceCache(clock, window=60, max_entries=1000, max_per_client=50)
    for n in range(50):
        assert cache.seen("flood", f"n{n}", 100 + n % 2) is False
    with pytest.raises(ClientOverBudget) as e:
        cache.seen("flood", "one-more", 101)
    assert e.value.code == "too_many_requests" and "'flood' made more than 50 requests within 60 seconds" \
        in e.value.message
    assert e.value.retry_after == 60  # when its oldest nonce leaves the window
    for n in range(50):  # everyone else goes on
        assert cache.seen(f"other{n % 5}", f"n{n}", 100) is False
    assert cache.seen("flood", "n0", 100) is True  # a replay is still a replay, not a 429
    clock.advance(60.5)  # the nonces stamped 100 are forgotten; those stamped 101 are not yet
    assert cache.held_by("flood") == 25 and cache.clients() == 1
    assert cache.seen("flood", "one-more", 161) is False
    clock.advance(1)
    assert len(cache) == 1 and cache.clients() == 1  # memory goes with the window, clients too


def test_nonce_cache_full_refuses_the_heavy_clients_first() -> None:
    clock = Clock()
    cache = NonceCache(clock, window=60, max_entries=100, max_per_client=80)
    for n in range(80):
        cache.seen("heavy", f"n{n}", 0)
    for n in range(20):
        cache.seen(f"light{n % 4}", f"n{n}", 0)
    assert len(cache) == 100  # full: heavy holds more than its share (100 / 5)
    with pytest.raises(ClientOverBudget):
        cache.seen("heavy", "x", 0)
    with pytest.raises(UnavailableError) as e:
        cache.seen("light0", "x", 0)
    assert e.value.status == 503


def test_local_flooding_client_is_refused_alone() -> None:
    clock = Clock()
    clock.advance(T0)
    auth = local_auth(clock, max_requests_per_client=20)
    for _ in range(20):  # a client with no roller scope at all can still sign requests
        assert isinstance(outcome(auth.authenticate(signed(sign(URL, REBOOTER, ts=T0)))), Principal)
    e = outcome(auth.authenticate(signed(sign(URL, REBOOTER, ts=T0))))
    assert isinstance(e, ClientOverBudget) and e.status == 429 and e.retry_after == 60
    assert isinstance(outcome(auth.authenticate(signed(sign(URL, CI, ts=T0)))), Principal)
    # garbage signed with a wrong key for CI's id uses none of CI's budget (checked after the MAC)
    for _ in range(50):
        e = outcome(auth.authenticate(signed(sign(URL, CI, ts=T0, token="forged-token"))))
        assert isinstance(e, Unauthorized) and "signature does not match" in e.message
    assert auth.nonces.held_by(CI) == 1 and auth.nonces.held_by(REBOOTER) == 20
    clock.advance(61)
    assert isinstance(outcome(auth.authenticate(signed(sign(URL, REBOOTER, ts=T0 + 61)))), Principal)


def test_local_payload_hash_checked_when_sent() -> None:
    auth = local_auth()
    body = b'{"reason":"stuck"}'
    good = sign(URL, ts=T0, content=body, content_type="application/json")
    req = signed(good, body=body, headers={"Content-Type": "application/json"})
    assert isinstance(outcome(auth.authenticate(req)), Principal)
    assert req.content.tell() == len(body)  # the read position is kept
    req = signed(sign(URL, ts=T0, content=body, content_type="application/json"),
                 body=b'{"reason":"other"}', headers={"Content-Type": "application/json"})
    e = outcome(auth.authenticate(req))
    assert isinstance(e, Unauthorized) and e.message == "the Hawk payload hash does not match the request body"
    # no hash at all (the JavaScript client, the hawk library): accepted, body unverified
    bare = mohawk.Sender(credentials={"id": CI, "key": CLIENTS[CI][0], "algorithm": "sha256"}, url=URL,
                         method="POST", always_hash_content=False, _timestamp=T0).request_header
    assert "hash=" not in bare
    req = signed(bare, body=body, headers={"Content-Type": "application/json"})
    assert isinstance(outcome(auth.authenticate(req)), Principal)


def test_local_authorized_scopes() -> None:
    auth = local_auth()
    ext = official_ext({"clientId": ADMIN, "accessToken": CLIENTS[ADMIN][0]},
                       authorizedScopes=["project:releng:roller:reboot"])
    p = outcome(auth.authenticate(signed(sign(URL, ADMIN, ts=T0, ext=ext))))
    assert p.scopes == ("project:releng:roller:reboot",) and not p.has_scope(PING)
    assert "the client holds it, but the request's authorizedScopes (project:releng:roller:reboot) removed it" \
        in p.lacks(PING)
    # a scope the client does not hold either: not blamed on authorizedScopes
    ext = official_ext({"clientId": REBOOTER, "accessToken": CLIENTS[REBOOTER][0]},
                       authorizedScopes=["project:releng:roller:reboot"])
    p = outcome(auth.authenticate(signed(sign(URL, REBOOTER, ts=T0, ext=ext))))
    assert p.lacks(PING) == (f"{REBOOTER} lacks the scope {PING} (the client does not hold it either; the "
                             "request's authorizedScopes: project:releng:roller:reboot)")
    # without authorizedScopes, the plain message
    p = outcome(auth.authenticate(signed(sign(URL, REBOOTER, ts=T0))))
    assert p.lacks(PING) == f"{REBOOTER} lacks the scope {PING}" and p.authorized_scopes is None
    # asking for more than the client holds fails, as in Taskcluster
    ext = official_ext({"clientId": REBOOTER, "accessToken": CLIENTS[REBOOTER][0]},
                       authorizedScopes=["project:releng:roller:*"])
    e = outcome(auth.authenticate(signed(sign(URL, REBOOTER, ts=T0, ext=ext))))
    assert isinstance(e, Unauthorized)
    assert e.message == ("Supplied credentials do not satisfy authorizedScopes; missing: "
                         "project:releng:roller:*")
    # an empty list leaves no scopes
    ext = official_ext({"clientId": CI, "accessToken": CLIENTS[CI][0]}, authorizedScopes=[])
    assert outcome(auth.authenticate(signed(sign(URL, ts=T0, ext=ext)))).scopes == ()
    # ext is covered by the MAC: it cannot be swapped
    wide = official_ext({"clientId": ADMIN, "accessToken": CLIENTS[ADMIN][0]}, authorizedScopes=["*"])
    header = sign(URL, ADMIN, ts=T0, ext=official_ext({"clientId": ADMIN, "accessToken": CLIENTS[ADMIN][0]},
                                                      authorizedScopes=["x"]))
    forged = header.split('ext="')[0] + f'ext="{wide}"' + '"'.join(header.split('ext="')[1].split('"')[1:])
    assert isinstance(outcome(auth.authenticate(signed(forged))), Unauthorized)


@pytest.mark.parametrize("ext, reason", [
    ("!!!", "Failed to parse ext"),
    (base64.b64encode(b"[1]").decode(), "Failed to parse ext: it must be a JSON object"),
    (base64.b64encode(b'{"authorizedScopes": "x"}').decode(), "ext.authorizedScopes must be an array"),
    (base64.b64encode(b'{"authorizedScopes": ["\\u00e9"]}').decode(), "must be an array of valid scopes"),
    (base64.b64encode(b'{"certificate": "x"}').decode(), "ext.certificate must be a JSON object"),
    (base64.b64encode(b'{"certificate": {}}').decode(), "ext.certificate.version must be 1"),
    (base64.b64encode(b"[" * 1200 + b"]" * 1200).decode(), "Failed to parse ext"),  # deeper than json recurses
])
def test_local_bad_ext(ext: str, reason: str) -> None:
    e = outcome(local_auth().authenticate(signed(sign(URL, ts=T0, ext=ext))))
    assert isinstance(e, Unauthorized) and reason in e.message, e


def test_decode_ext_refuses_deep_nesting_without_recursing() -> None:
    for raw in (b'{"a": ' * 5000 + b"1" + b"}" * 5000, b"[" * 100_000):
        with pytest.raises(ExtError, match="Failed to parse ext"):
            decode_ext(base64.b64encode(raw).decode())


def test_decode_ext_alphabets() -> None:
    raw = json.dumps({"authorizedScopes": ["a>?~~~"]}).encode()
    assert decode_ext(base64.b64encode(raw).decode()) == decode_ext(base64.urlsafe_b64encode(raw).decode())
    assert decode_ext(base64.b64encode(raw).decode().rstrip("=")) == {"authorizedScopes": ["a>?~~~"]}


def _temporary(issuer: str, scopes: list[str], *, start: float = T0 - 60, hours: float = 1,
               name: str | None = None) -> dict:
    """Temporary credentials made by the official client library."""
    utc = datetime.timezone.utc
    creds = taskcluster.createTemporaryCredentials(
        issuer, CLIENTS[issuer][0], datetime.datetime.fromtimestamp(start, utc),
        datetime.datetime.fromtimestamp(start + hours * 3600, utc), scopes, name=name)
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in creds.items()}


def _sign_temporary(creds: dict, ts: int = T0, **options: Any) -> str:
    return sign(URL, creds["clientId"], token=creds["accessToken"], ts=ts, ext=official_ext(creds, **options))


def test_local_temporary_credentials() -> None:
    auth = local_auth()
    creds = _temporary(CI, [PING])
    p = outcome(auth.authenticate(signed(_sign_temporary(creds))))
    assert isinstance(p, Principal), p
    assert (p.id, p.scopes) == (CI, (PING,))
    # with authorizedScopes on top
    p = outcome(auth.authenticate(signed(_sign_temporary(creds, authorizedScopes=[]))))
    assert p.scopes == ()
    # named temporary credentials: the issuer may create project/releng/named-*
    named = _temporary(ISSUER, [PING], name="project/releng/named-bot")
    p = outcome(auth.authenticate(signed(_sign_temporary(named))))
    assert (p.id, p.scopes) == ("project/releng/named-bot", (PING,))


@pytest.mark.parametrize("case, reason", [
    ("expired", "ext.certificate.expiry < now"),
    ("future", "ext.certificate.start > now"),
    ("too long", "cannot last longer than 31 days"),
    ("more scopes than issuer", "doesn't satisfy all certificate scopes"),
    ("tampered scopes", "ext.certificate.signature is not valid"),
    ("signed with the issuer key", "signature does not match"),
    ("named without create-client", "doesn't have `auth:create-client:project/releng/other`"),
    ("unknown issuer", "unknown client 'nobody'"),
])
def test_local_bad_temporary_credentials(case: str, reason: str) -> None:
    if case == "expired":
        creds = _temporary(CI, [PING], start=T0 - 7200, hours=1)
    elif case == "future":
        creds = _temporary(CI, [PING], start=T0 + 600)
    elif case == "too long":
        creds = _temporary(CI, [PING], hours=24 * 30)
        cert = json.loads(creds["certificate"])
        cert["expiry"] += 2 * 24 * 3600 * 1000
        creds["certificate"] = json.dumps(cert)
    elif case == "more scopes than issuer":
        creds = _temporary(REBOOTER, [PING])
    elif case == "tampered scopes":
        creds = _temporary(CI, [PING])
        cert = json.loads(creds["certificate"])
        cert["scopes"] = ["project:releng:roller:*"]
        creds["certificate"] = json.dumps(cert)
    elif case == "signed with the issuer key":
        creds = _temporary(CI, [PING])
        creds["accessToken"] = CLIENTS[CI][0]
    elif case == "named without create-client":
        creds = _temporary(ISSUER, [PING], name="project/releng/other")
    else:
        creds = _temporary(CI, [PING])
        cert = json.loads(creds["certificate"])
        cert["issuer"] = "nobody"
        creds["certificate"] = json.dumps(cert)
    e = outcome(local_auth().authenticate(signed(_sign_temporary(creds))))
    assert isinstance(e, Unauthorized), e
    assert reason in e.message, e.message
    assert CLIENTS[CI][0] not in e.message


def test_payload_hash_matches_mohawk() -> None:
    sender = mohawk.Sender(credentials={"id": "c", "key": "k", "algorithm": "sha256"}, url=URL, method="POST",
                           content=b"{}", content_type="application/json; charset=utf-8")
    assert f'hash="{payload_hash(b"{}", "application/json")}"' in sender.request_header


# -- over loopback: a real Api, store and queue ----------------------------------------------


@attrs.define
class Served:
    """An Api on 127.0.0.1 with a real SQLite store; tasks that wait until stopped."""

    store: Any
    queue: JobQueue
    tasks: TaskRegistry
    port: Any = None
    base: str = ""
    trusted: tuple[str, ...] = ()

    async def serve(self, authenticator: Any) -> None:
        if self.port is not None:
            await self.port.stopListening()
        api = Api(store=self.store, queue=self.queue, tasks=self.tasks, authenticator=authenticator,
                  allowed_tasks=("ping", "reboot"), clock=reactor, trusted_proxies=self.trusted)
        site = RollerSite(api.app.resource(), reactor=reactor)
        site.noisy = False
        self.port = listen_closing(reactor, site)  # its stop closes the official client's kept-alive connections
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    @property
    def url(self) -> str:
        return self.base + PATH

    async def post(self, path: str = PATH, headers: dict[str, str] | None = None, body: bytes | None = None,
                   timeout: float = 10) -> tuple[int, Any, Any]:
        response = await treq.request(
            "POST", self.base + path, headers={k: [v] for k, v in (headers or {}).items()},
            data=body, persistent=False).addTimeout(timeout, reactor)
        raw = await treq.content(response)
        return response.code, response.headers, json.loads(raw) if raw else None

    async def jobs(self) -> list:
        return await self.store.jobs.list(limit=100)


def _waiting_task(name: str) -> TaskSpec:
    async def run(ctx: Any, params: Any) -> str:
        await Deferred()  # until the queue stops and cancels it
        return "never"

    return TaskSpec(name=name, description=f"{name}, held", run=run, timeout=600.0)


async def _serve(tmp_path: Any) -> Served:
    store = await open_store(str(tmp_path / "auth.db"), reactor)
    tasks = TaskRegistry([_waiting_task("ping"), _waiting_task("reboot")])
    queue = JobQueue(store, tasks, reactor)
    await store.machines.put_many([
        Machine.from_json({"worker_id": "m1", "worker_group": "g1", "ip": "127.0.0.1"}),
        Machine.from_json({"worker_id": "m2", "worker_group": "g1", "ip": "127.0.0.1"}),
    ])
    await queue.start()
    return Served(store, queue, tasks)


async def _unserve(s: Served) -> None:
    if s.port is not None:
        await s.port.stopListening()
    await s.queue.stop()
    await s.store.close()


def _block(coro: Any) -> Any:
    return pytest_twisted.blockon(Deferred.fromCoroutine(coro))


@pytest.fixture
def served(tmp_path: Any) -> Any:
    s = _block(_serve(tmp_path))
    yield s
    _block(_unserve(s))


class Modes:
    """Builds the authenticator for a mode (and the fake Taskcluster), and closes them."""

    def __init__(self) -> None:
        self.fake = FakeTaskclusterAuth({cid: (tok, list(scopes)) for cid, (tok, scopes) in CLIENTS.items()})
        self.fake_port = self.fake.listen(reactor)
        self.made: list[Any] = []

    def make(self, mode: str, timeout: float = 5.0, root_url: str = "") -> Any:
        if mode == "local":
            auth = LocalHawkAuthenticator(reactor, CLIENTS)
        else:
            auth = TaskclusterAuthenticator(reactor, root_url or self.fake.url, timeout=timeout)
        self.made.append(auth)
        return auth

    async def close(self) -> None:
        for auth in self.made:
            if hasattr(auth, "close"):
                await auth.close()
        self.fake.release()
        await self.fake_port.stopListening()


@pytest.fixture
def modes() -> Any:
    m = Modes()
    yield m
    _block(m.close())


def _assert_401(code: int, headers: Any, body: Any, *fragments: str) -> None:
    assert code == 401, (code, body)
    assert headers.getRawHeaders("www-authenticate") == ["Hawk"]
    assert body["error"] == "unauthorized", body
    for fragment in fragments:
        assert fragment in body["message"], body["message"]


MODES = ["local", "taskcluster"]


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_no_header_is_401_and_nothing_queued(served: Served, modes: Modes, mode: str) -> None:
    await served.serve(modes.make(mode))
    code, headers, body = await served.post()
    _assert_401(code, headers, body)
    assert body["message"] == NO_CREDENTIALS
    assert await served.jobs() == []
    assert modes.fake.questions == []  # refused without asking Taskcluster


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_roller_star_scope_creates_job(served: Served, modes: Modes, mode: str) -> None:
    await served.serve(modes.make(mode))
    code, _, body = await served.post(headers={"Authorization": sign(served.url)})
    assert code == 201, body
    (job,) = await served.jobs()
    assert job.id == body["task_id"] and job.requester == CI and job.task_name == "ping"
    if mode == "taskcluster":
        (q,) = modes.fake.questions
        port = int(served.base.rsplit(":", 1)[1])
        assert q == {"method": "post", "resource": PATH, "host": "127.0.0.1", "port": port,
                     "authorization": q["authorization"], "sourceIp": "127.0.0.1"}
        assert q["authorization"].startswith('Hawk mac="')


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_bad_mac_is_401(served: Served, modes: Modes, mode: str) -> None:
    await served.serve(modes.make(mode))
    code, headers, body = await served.post(headers={"Authorization": sign(served.url, token="wrong")})
    _assert_401(code, headers, body, "Bad mac" if mode == "taskcluster" else "signature does not match")
    assert await served.jobs() == []


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_stale_timestamp_is_401(served: Served, modes: Modes, mode: str) -> None:
    await served.serve(modes.make(mode))
    ts = int(time.time()) - 3600  # beyond both 60 s (local) and Taskcluster's 15 min
    code, headers, body = await served.post(headers={"Authorization": sign(served.url, ts=ts)})
    _assert_401(code, headers, body, "Stale timestamp" if mode == "taskcluster" else "stale timestamp")
    assert await served.jobs() == []


@pytest_twisted.ensureDeferred
async def test_local_replay_is_401(served: Served, modes: Modes) -> None:
    await served.serve(modes.make("local"))
    header = sign(served.url)
    code, _, body = await served.post(headers={"Authorization": header})
    assert code == 201, body
    code, headers, body = await served.post(headers={"Authorization": header})
    _assert_401(code, headers, body, "replayed request")
    assert len(await served.jobs()) == 1


@pytest_twisted.ensureDeferred
async def test_local_flooding_client_gets_429_the_others_go_on(served: Served, modes: Modes) -> None:
    auth = LocalHawkAuthenticator(reactor, CLIENTS, max_requests_per_client=10)
    await served.serve(auth)
    for _ in range(10):  # valid credentials, no roller scope: 403, but each request holds a nonce
        code, _, body = await served.post(headers={"Authorization": sign(served.url, REBOOTER)})
        assert code == 403, body
    for _ in range(3):
        code, headers, body = await served.post(headers={"Authorization": sign(served.url, REBOOTER)})
        assert code == 429 and body["error"] == "too_many_requests", body
        assert "auth.max_requests_per_client" in body["message"] and REBOOTER in body["message"]
        assert 1 <= int(headers.getRawHeaders("retry-after")[0]) <= auth.skew + 1
    # unsigned garbage under the other client's id uses none of its budget
    for _ in range(20):
        code, _, _ = await served.post(headers={"Authorization": sign(served.url, CI, token="forged")})
        assert code == 401
    code, _, body = await served.post(headers={"Authorization": sign(served.url, CI)})
    assert code == 201, body
    assert auth.nonces.held_by(CI) == 1 and len(await served.jobs()) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_insufficient_scope_is_403_naming_it(served: Served, modes: Modes, mode: str) -> None:
    await served.serve(modes.make(mode))
    code, _, body = await served.post(headers={"Authorization": sign(served.url, REBOOTER)})
    assert code == 403, body
    assert body == {"error": "insufficient_scope", "message": f"{REBOOTER} lacks the scope {PING}"}
    assert await served.jobs() == []


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_authorized_scopes_restrict(served: Served, modes: Modes, mode: str) -> None:
    await served.serve(modes.make(mode))
    admin = {"clientId": ADMIN, "accessToken": CLIENTS[ADMIN][0]}
    narrow = official_ext(admin, authorizedScopes=["project:releng:roller:reboot"])
    code, _, body = await served.post(headers={"Authorization": sign(served.url, ADMIN, ext=narrow)})
    assert code == 403, body
    # the client holds ping (it holds *): the message says authorizedScopes removed it
    if mode == "local":
        assert body["message"] == (
            f"{ADMIN} lacks the scope {PING}: the client holds it, but the request's authorizedScopes "
            "(project:releng:roller:reboot) removed it; add it to authorizedScopes or send none")
    else:  # Taskcluster answers with the narrowed scopes only
        assert body["message"] == (
            f"{ADMIN} lacks the scope {PING}: the request's authorizedScopes (project:releng:roller:reboot) do "
            "not include it, so authorizedScopes removed it if the client holds it; add it to "
            "authorizedScopes or send none")
    assert await served.jobs() == []
    exact = official_ext(admin, authorizedScopes=[PING])
    code, _, body = await served.post(headers={"Authorization": sign(served.url, ADMIN, ext=exact)})
    assert code == 201, body
    # more than the client holds: 401 in both modes
    rebooter = {"clientId": REBOOTER, "accessToken": CLIENTS[REBOOTER][0]}
    wide = official_ext(rebooter, authorizedScopes=[PING])
    code, headers, body = await served.post(
        "/api/v1/workers/m2/group/g1/jobs?task_name=ping",
        headers={"Authorization": sign(served.base + "/api/v1/workers/m2/group/g1/jobs?task_name=ping",
                                       REBOOTER, ext=wide)})
    _assert_401(code, headers, body, "do not satisfy authorizedScopes")
    assert len(await served.jobs()) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_payload_hash_mismatch_is_401(served: Served, modes: Modes, mode: str) -> None:
    await served.serve(modes.make(mode))
    signed_body = json.dumps({"reason": "signed"}).encode()
    header = sign(served.url, content=signed_body, content_type="application/json")
    code, headers, body = await served.post(headers={"Authorization": header, "Content-Type": "application/json"},
                                            body=json.dumps({"reason": "swapped", "priority": 100}).encode())
    _assert_401(code, headers, body, "payload hash does not match")
    assert await served.jobs() == []
    header = sign(served.url, content=signed_body, content_type="application/json")
    code, _, body = await served.post(headers={"Authorization": header, "Content-Type": "application/json"},
                                      body=signed_body)
    assert code == 201, body
    assert (await served.jobs())[0].reason == "signed"


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_forged_forwarded_headers_from_untrusted_peer_are_ignored(
        served: Served, modes: Modes, mode: str) -> None:
    served.trusted = ("10.0.0.0/8",)  # 127.0.0.1 is not trusted
    await served.serve(modes.make(mode))
    port = int(served.base.rsplit(":", 1)[1])
    forged = {"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https", "X-Forwarded-Port": "443"}
    # signed for what the client really used: accepted, forged headers ignored
    code, _, body = await served.post(headers={"Authorization": sign(served.url), **forged})
    assert code == 201, body
    # signed for the forged scheme/port: refused
    code, headers, body = await served.post(
        "/api/v1/workers/m2/group/g1/jobs?task_name=ping",
        headers={"Authorization": sign("https://127.0.0.1:443/api/v1/workers/m2/group/g1/jobs?task_name=ping"),
                 **forged})
    assert code == 401, body
    if mode == "local":
        assert f"(POST http://127.0.0.1:{port}/api/v1/workers/m2" in body["message"]
    else:
        assert [(q["host"], q["port"], q["sourceIp"]) for q in modes.fake.questions] == \
            [("127.0.0.1", port, "127.0.0.1")] * 2


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_forwarded_headers_from_trusted_proxy_are_honoured(served: Served, modes: Modes, mode: str) -> None:
    served.trusted = ("127.0.0.1",)
    await served.serve(modes.make(mode))
    public = "https://roller.example.com" + PATH
    headers = {"Host": "roller.example.com", "X-Forwarded-Proto": "https", "X-Forwarded-Port": "443",
               "X-Forwarded-For": "6.6.6.6, 198.51.100.7", "Authorization": sign(public)}
    code, _, body = await served.post(headers=headers)
    assert code == 201, body
    if mode == "taskcluster":
        (q,) = modes.fake.questions
        assert (q["host"], q["port"], q["sourceIp"], q["resource"]) == \
            ("roller.example.com", 443, "198.51.100.7", PATH)


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_official_taskcluster_client(served: Served, modes: Modes, mode: str) -> None:
    await served.serve(modes.make(mode))
    ci = official_client(served.base, {"clientId": CI, "accessToken": CLIENTS[CI][0]})
    result = await threads.deferToThread(
        ci.submitJob, params={"workerId": "m1", "workerGroup": "g1"}, query={"task_name": "ping"})
    assert result["worker_id"] == "m1" and result["task_name"] == "ping"
    (job,) = await served.jobs()
    assert job.requester == CI
    rebooter = official_client(served.base, {"clientId": REBOOTER, "accessToken": CLIENTS[REBOOTER][0]})
    with pytest.raises(taskcluster.exceptions.TaskclusterRestFailure) as e:
        await threads.deferToThread(
            rebooter.submitJob, params={"workerId": "m2", "workerGroup": "g1"}, query={"task_name": "ping"})
    assert e.value.status_code == 403 and PING in str(e.value)
    wrong = official_client(served.base, {"clientId": CI, "accessToken": "wrong"})
    with pytest.raises(taskcluster.exceptions.TaskclusterAuthFailure) as e:
        await threads.deferToThread(
            wrong.submitJob, params={"workerId": "m2", "workerGroup": "g1"}, query={"task_name": "ping"})
    assert e.value.status_code == 401
    if mode == "local":  # temporary credentials made by the library, verified by roller
        temp = taskcluster.createTemporaryCredentials(
            CI, CLIENTS[CI][0], datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1),
            datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1), [PING])
        client = official_client(served.base, temp)
        result = await threads.deferToThread(
            client.submitJob, params={"workerId": "m2", "workerGroup": "g1"}, query={"task_name": "ping"})
        assert result["worker_id"] == "m2"
    assert len(await served.jobs()) == (2 if mode == "local" else 1)


# -- Taskcluster's auth service failing ---------------------------------------------------


def _unavailable(code: int, headers: Any, body: Any) -> None:
    assert code == 503, (code, body)
    assert headers.getRawHeaders("www-authenticate") is None
    assert body["error"] == "auth_unavailable", body


@pytest_twisted.ensureDeferred
async def test_auth_service_down_is_503_nothing_queued(served: Served, modes: Modes) -> None:
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    closed = f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()  # nothing listens there now: connection refused
    await served.serve(modes.make("taskcluster", root_url=closed))
    code, headers, body = await served.post(headers={"Authorization": sign(served.url)})
    _unavailable(code, headers, body)  # at once, on the refusal (not after a timeout: the message says why)
    assert body["message"].startswith(f"roller cannot reach the Taskcluster auth service at {closed} "
                                      "(ConnectionRefusedError")
    assert await served.jobs() == []


@pytest_twisted.ensureDeferred
async def test_slow_auth_service_is_503_after_timeout(served: Served, modes: Modes) -> None:
    modes.fake.behaviour = "hang"
    await served.serve(modes.make("taskcluster", timeout=0.3))
    started = reactor.seconds()
    code, headers, body = await served.post(headers={"Authorization": sign(served.url)}, timeout=5)
    _unavailable(code, headers, body)
    assert body["message"] == (f"the Taskcluster auth service at {modes.fake.url} did not answer within 0.3 s: "
                               "cannot authenticate the request now; retry later")
    assert reactor.seconds() >= started + 0.3  # roller's 0.3 s timeout, no sooner (reactor time)
    assert await served.jobs() == []
    assert len(modes.fake.questions) == 1
    # the call was cancelled: its connection closed, which ends the fake's wait
    for _ in range(100):
        if modes.fake.waiting == 0:
            break
        await deferLater(reactor, 0.02)
    assert modes.fake.waiting == 0


@pytest.mark.parametrize("behaviour, message", [
    ("error", "answered HTTP 500 to authenticate-hawk"),
    ("garbage", "with something that is not JSON"),
])
@pytest_twisted.ensureDeferred
async def test_auth_service_errors_are_503(served: Served, modes: Modes, behaviour: str, message: str) -> None:
    modes.fake.behaviour = behaviour
    await served.serve(modes.make("taskcluster"))
    code, headers, body = await served.post(headers={"Authorization": sign(served.url)})
    _unavailable(code, headers, body)
    assert message in body["message"]
    assert await served.jobs() == []


@pytest.mark.parametrize("answer, status, fragment", [
    ({"status": "auth-failed", "message": "Unauthorized: Bad mac"}, 401,
     "Taskcluster refused the credentials: Unauthorized: Bad mac"),
    ({"status": "auth-failed"}, 401, "Taskcluster refused the credentials: no reason given"),
    ({"status": "no-auth"}, 401, NO_CREDENTIALS),
    ({"status": "auth-success", "clientId": "c", "scopes": ["*"], "expires": "3000-01-01T00:00:00.000Z"}, 200, ""),
    ({"status": "auth-success", "clientId": "c"}, 503, "auth-success without a list of scopes"),
    ({"status": "auth-success", "scopes": []}, 503, "auth-success without a clientId"),
    ({"status": "maybe"}, 503, "an unknown status 'maybe'"),
    ([], 503, "JSON that is not an object"),
])
def test_taskcluster_answers(answer: Any, status: int, fragment: str) -> None:
    """The answer's interpretation, on a stub HTTP client (no network, no clock)."""
    from klein import Klein
    from treq.testing import StubTreq

    app = Klein()

    @app.route("/api/auth/v1/authenticate-hawk", methods=["POST"])
    def route(request: Any) -> bytes:
        return json.dumps(answer).encode()

    stub = StubTreq(app.resource())
    auth = TaskclusterAuthenticator(Clock(), "https://tc.example/", treq_client=stub)
    assert auth.url == "https://tc.example/api/auth/v1/authenticate-hawk"
    d = auth.authenticate(signed(sign(URL, ts=T0)))
    stub.flush()
    result = outcome(d)
    if status == 200:
        assert result == Principal("c", ("*",)) or (result.id, result.scopes) == ("c", ("*",))
    else:
        assert getattr(result, "status", None) == status, result
        assert fragment in result.message


def test_taskcluster_root_url_checked() -> None:
    with pytest.raises(ValueError, match="root_url must be an http"):
        TaskclusterAuthenticator(Clock(), "tc.example", treq_client=object())
