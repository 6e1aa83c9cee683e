"""
The Host check (roller/web/hosts.py, C{server.allowed_hosts}): a request
must name this roller -- the address it reached, localhost on loopback, the
machine's name, C{public_url}'s host or an allowed name -- before Hawk (or
anything) reads it, so a request signed for another roller cannot be
replayed here and a rebound DNS name cannot reach the dashboard.

The rules on fixed addresses; then over real HTTP on 127.0.0.1: an Api with
local Hawk clients behind the check (signed with mohawk as the official
client signs), and a whole RollerService as C{make run} starts it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import treq
from attrs import evolve
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from roller.auth.hawk import LocalHawkAuthenticator
from roller.config import ConfigError, load_settings
from roller.service import RollerService
from roller.web.api import Api
from roller.web.hosts import AllowedHosts, HostCheck
from roller.web.http import RollerSite
from test_auth_hawk import CI, CLIENTS, PATH, Served, _block, _serve, _unserve, sign

LOOP = IPv4Address("TCP", "127.0.0.1", 8000)
PUBLIC_IP = IPv4Address("TCP", "10.0.0.5", 8000)  # a listener on 0.0.0.0, reached at 10.0.0.5


def test_default_names_are_the_address_reached_loopback_and_the_machine() -> None:
    hosts = AllowedHosts(machine_names=["Roller1"])
    assert hosts.allows("127.0.0.1", 8000, LOOP)
    assert hosts.allows("localhost", 8000, LOOP) and hosts.allows("LOCALHOST.", 8000, LOOP)
    assert hosts.allows("::1", 8000, LOOP) and hosts.allows("127.0.0.2", 8000, LOOP)
    assert hosts.allows("roller1", 8000, LOOP)
    assert not hosts.allows("localhost", 8001, LOOP)  # another port: another server
    assert not hosts.allows("roller-b.example", 8000, LOOP)
    # all interfaces: the address reached and the machine's name, at the port reached; never localhost
    assert hosts.allows("10.0.0.5", 8000, PUBLIC_IP) and hosts.allows("roller1", 8000, PUBLIC_IP)
    assert not hosts.allows("localhost", 8000, PUBLIC_IP) and not hosts.allows("10.0.0.6", 8000, PUBLIC_IP)
    assert not hosts.allows("roller1", 9000, PUBLIC_IP) and not hosts.allows("evil.example", 8000, PUBLIC_IP)
    v6 = IPv6Address("TCP", "2001:db8::5", 8443)
    assert hosts.allows("2001:db8:0::5", 8443, v6) and not hosts.allows("2001:db8::6", 8443, v6)
    # a UNIX socket (a local proxy in front): only the names configured, and localhost
    unix = UNIXAddress(b"/run/roller.sock")
    assert hosts.allows("localhost", 80, unix) and not hosts.allows("roller1", 80, unix)


def test_remembered_answers_stay_right_and_bounded() -> None:
    from roller.web import hosts as hosts_module

    hosts = AllowedHosts(["alias.example"], machine_names=["roller1"])
    for _ in range(2):  # the second time from memory: the same answers
        assert hosts.allows("alias.example", 1234, PUBLIC_IP)
        assert hosts.allows("127.0.0.1", 8000, LOOP) and not hosts.allows("127.0.0.1", 8001, LOOP)
        assert hosts.allows("roller1", 8000, PUBLIC_IP) and not hosts.allows("roller1", 8000, IPv4Address("TCP", "127.0.0.1", 9))
        assert not hosts.allows("evil.example", 8000, PUBLIC_IP)
        assert not hosts.allows("localhost", 8000, PUBLIC_IP)  # loopback names only on a loopback connection
    for i in range(3 * hosts_module.ANSWERS_KEPT):  # a client trying many names
        assert not hosts.allows(f"n{i}.example", 8000, PUBLIC_IP)
    assert len(hosts._answers) <= hosts_module.ANSWERS_KEPT
    assert hosts.allows("alias.example", 1234, PUBLIC_IP) and not hosts.allows("evil.example", 8000, PUBLIC_IP)


def test_public_url_and_allowed_hosts() -> None:
    hosts = AllowedHosts(["alias.example", "other.example:8443", "[2001:db8::1]:8000"],
                         public_url="https://Roller.Example.com", machine_names=[])
    assert hosts.allows("roller.example.com", 443, PUBLIC_IP)
    assert not hosts.allows("roller.example.com", 8000, PUBLIC_IP)  # public_url names its port (443)
    assert hosts.allows("alias.example", 1234, PUBLIC_IP)  # a name without a port: any port
    assert hosts.allows("other.example", 8443, PUBLIC_IP) and not hosts.allows("other.example", 8000, PUBLIC_IP)
    assert hosts.allows("2001:db8::1", 8000, PUBLIC_IP)
    assert AllowedHosts(["*"], machine_names=[]).allows("anything.example", 1, PUBLIC_IP)
    assert AllowedHosts(public_url="http://r.example:8080", machine_names=[]).allows("r.example", 8080, LOOP)


def test_allowed_hosts_setting_is_checked() -> None:
    s = load_settings(None, {"ROLLER_SERVER_ALLOWED_HOSTS": "Roller.Example., alias:8000, [::1]:80"}, {})
    assert s.allowed_hosts == ("roller.example", "alias:8000", "[::1]:80")
    assert load_settings(None, {}, {}).allowed_hosts == ()
    for bad in ("a b", "x:0", "x:port", "::1", "a/b"):
        with pytest.raises(ConfigError, match="server.allowed_hosts"):
            load_settings(None, {}, {"server.allowed_hosts": bad})


# -- over loopback: an Api with local Hawk clients behind the check ----------------------------


@pytest.fixture
def served(tmp_path: Any) -> Any:
    s = _block(_serve(tmp_path))
    yield s
    _block(_unserve(s))


async def _serve_checked(s: Served, allowed: AllowedHosts) -> LocalHawkAuthenticator:
    auth = LocalHawkAuthenticator(reactor, CLIENTS)
    if s.port is not None:
        await s.port.stopListening()
    api = Api(store=s.store, queue=s.queue, tasks=s.tasks, authenticator=auth, allowed_tasks=("ping",),
              clock=reactor, trusted_proxies=allowed.trusted_proxies)
    site = RollerSite(HostCheck(api.app.resource(), allowed), reactor=reactor)
    site.noisy = False
    s.port = reactor.listenTCP(0, site, interface="127.0.0.1")
    s.base = f"http://127.0.0.1:{s.port.getHost().port}"
    return auth


@pytest_twisted.ensureDeferred
async def test_a_request_signed_for_another_host_is_refused_before_hawk(served: Served) -> None:
    auth = await _serve_checked(served, AllowedHosts(machine_names=[]))
    port = served.port.getHost().port
    other = f"roller-a.example:{port}"
    # signed for roller-a, sent here with roller-a's Host: the MAC would verify, the Host check refuses it
    header = sign(f"http://{other}{PATH}")
    code, headers, body = await served.post(headers={"Host": other, "Authorization": header})
    assert (code, body["error"]) == (421, "bad_host"), body
    assert "'roller-a.example:%d'" % port in body["message"] and "server.allowed_hosts" in body["message"]
    assert headers.getRawHeaders("content-type") == ["application/json"]
    assert await served.jobs() == [] and auth.nonces.held_by(CI) == 0  # Hawk never ran
    # the names this roller has by default
    for host, machine in ((f"127.0.0.1:{port}", "m1"), (f"localhost:{port}", "m2")):
        path = f"/api/v1/workers/{machine}/group/g1/jobs?task_name=ping"
        code, _, body = await served.post(path, headers={"Host": host, "Authorization": sign(f"http://{host}{path}")})
        assert code == 201, (host, body)
    assert len(await served.jobs()) == 2


@pytest_twisted.ensureDeferred
async def test_an_allowed_host_is_accepted(served: Served) -> None:
    await _serve_checked(served, AllowedHosts(["roller-a.example"], machine_names=[]))
    port = served.port.getHost().port
    other = f"roller-a.example:{port}"
    code, _, body = await served.post(headers={"Host": other, "Authorization": sign(f"http://{other}{PATH}")})
    assert code == 201, body
    (job,) = await served.jobs()
    assert job.requester == CI


@pytest_twisted.ensureDeferred
async def test_behind_a_trusted_proxy_the_forwarded_port_counts(served: Served) -> None:
    allowed = AllowedHosts(public_url="https://roller.example.com", machine_names=[], trusted_proxies=["127.0.0.1"])
    await _serve_checked(served, allowed)
    proxied = {"Host": "roller.example.com", "X-Forwarded-Proto": "https", "X-Forwarded-Port": "443"}
    code, _, body = await served.post(headers={**proxied,
                                               "Authorization": sign("https://roller.example.com" + PATH)})
    assert code == 201, body
    code, _, body = await served.post("/api/v1/workers/m2/group/g1/jobs?task_name=ping",
                                      headers={**proxied, "X-Forwarded-Port": "8443"})
    assert (code, body["error"]) == (421, "bad_host"), body


# -- the whole service, as `make run` starts it ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_service_answers_only_to_its_names(tmp_path: Any) -> None:
    s = load_settings(None, {}, {"server.listen": "tcp:0:interface=127.0.0.1", "state_dir": str(tmp_path / "st"),
                                 "auth.mode": "none"})
    service = RollerService(evolve(s, allowed_tasks=("ping",)), reactor)
    service.startService()
    await service.ready
    try:
        port = service.ports[0].getHost().port

        async def get(path: str, host: str) -> tuple[int, bytes]:
            r = await treq.get(f"http://127.0.0.1:{port}{path}", headers={"Host": [host]}, allow_redirects=False,
                               persistent=False).addTimeout(10, reactor)
            return r.code, await treq.content(r)

        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            assert (await get("/api/v1/tasks", host))[0] == 200, host
            assert (await get("/", host))[0] == 303, host  # the dashboard: sign in
        for path in ("/api/v1/tasks", "/", "/events", "/static/roller.css", "/admin/"):
            code, body = await get(path, f"rebound.example:{port}")  # a DNS-rebound page, or another roller
            assert code == 421 and json.loads(body)["error"] == "bad_host", (path, body)
        assert (await get("/__lbheartbeat__", "10.9.8.7"))[0] == 200  # health checks answer whatever the Host
        # and the ones an operator names
        await service.stopService()
        service = RollerService(evolve(s, allowed_tasks=("ping",), allowed_hosts=("rebound.example",)), reactor)
        service.startService()
        await service.ready
        port = service.ports[0].getHost().port
        assert (await get("/api/v1/tasks", f"rebound.example:{port}"))[0] == 200
    finally:
        await service.stopService()
