"""
Hawk authentication wired into roller: the [clients] of the secrets file,
the auth.* and server.trusted_proxies settings, make_authenticator, the
Api's client address behind proxies, the OpenAPI 503, and a RollerService
in each mode on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
from typing import Any

import mohawk
import pytest
import pytest_twisted
import treq
from attrs import evolve
from treq.testing import StubTreq
from twisted.internet import reactor

from roller import __version__
from roller.auth import AnonymousAuthenticator, Principal, UnconfiguredAuthenticator
from roller.auth.hawk import LocalHawkAuthenticator
from roller.auth.taskcluster import TaskclusterAuthenticator
from roller.config import ConfigError, load_settings
from roller.inventory import Machine
from roller.secrets import Credential, HawkClient, Secrets, SecretsError, load_secrets, write_secrets
from roller.service import RollerService, make_authenticator
from roller.tasks import builtin_tasks
from roller.testing.tc_auth import FakeTaskclusterAuth
from roller.web.openapi import openapi_document

TOKEN = "tok-Secret-0123456789abcdef"
CLIENTS_TOML = f"""\
[credentials.bugzilla]
type = "token"
value = "tk-ApiToken-XYZ"

[clients."project/releng/roller-ci"]
access_token = "{TOKEN}"
scopes = ["project:releng:roller:*"]

[clients.reader]
access_token = "tok-Reader-0123456789abcdef"
"""


def write(tmp_path: Any, text: str, name: str = "secrets.toml") -> Any:
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


# -- the secrets file ------------------------------------------------------------------


def test_clients_parsed_and_token_never_shown(tmp_path: Any) -> None:
    secrets = load_secrets(write(tmp_path, CLIENTS_TOML))
    ci = secrets.clients["project/releng/roller-ci"]
    assert (ci.id, ci.access_token, ci.scopes) == ("project/releng/roller-ci", TOKEN, ("project:releng:roller:*",))
    assert secrets.clients["reader"].scopes == ()
    assert secrets.names() == ("bugzilla",)  # clients are not credentials
    assert TOKEN not in repr(ci) and TOKEN not in str(secrets) and "roller-ci" in repr(secrets)
    assert ci.public_json() == {"id": "project/releng/roller-ci", "scopes": ["project:releng:roller:*"]}
    assert secrets.redact(f"header key {TOKEN}!") == "header key ***!"


@pytest.mark.parametrize("table, reason", [
    ('[clients.c]\nscopes = []\n', "clients.c.access_token: is required"),
    ('[clients.c]\naccess_token = "short"\n', "clients.c.access_token: must be at least 16"),
    ('[clients.c]\naccess_token = "has spaces in it 0123"\n', "without spaces"),
    ('[clients.c]\naccess_token = 12345678901234567\n', "must be a string, got an integer"),
    (f'[clients.c]\naccess_token = "{TOKEN}"\nscopes = "x"\n', "clients.c.scopes: must be a list"),
    (f'[clients.c]\naccess_token = "{TOKEN}"\nscopes = [1]\n', "clients.c.scopes: must be a list of scopes"),
    (f'[clients.c]\naccess_token = "{TOKEN}"\nscope = []\n', "unknown key(s): scope"),
    (f'[clients."a b"]\naccess_token = "{TOKEN}"\n', "client id 'a b' is not valid"),
    (f'[clients.project.ci]\naccess_token = "{TOKEN}"\n', 'must be quoted, e.g. [clients."project.ci"]'),
    ('clients = 3\n', "clients must be a table"),
    ('[client.c]\n', "unknown top-level key(s) client; expected only [credentials.NAME] and [clients.ID]"),
])
def test_bad_clients(tmp_path: Any, table: str, reason: str) -> None:
    with pytest.raises(SecretsError) as e:
        load_secrets(write(tmp_path, table))
    assert reason in str(e.value)
    assert TOKEN not in str(e.value)


def test_clients_survive_write_and_merge(tmp_path: Any) -> None:
    secrets = load_secrets(write(tmp_path, CLIENTS_TOML))
    merged = secrets.merged({"new": Credential("new", "token", value="tk-New-123")})
    assert merged.clients == secrets.clients
    target = tmp_path / "out.toml"
    write_secrets(target, merged)
    again = load_secrets(target)
    assert again.clients == secrets.clients and again.names() == ("bugzilla", "new")
    with pytest.raises(ValueError):
        Secrets({}, clients={"a": HawkClient("b", TOKEN)})


# -- settings ----------------------------------------------------------------------------


def test_auth_settings(tmp_path: Any) -> None:
    s = load_settings(None, {}, {})
    assert (s.auth_mode, s.auth_root_url, s.auth_timeout, s.auth_timestamp_skew, s.trusted_proxies) == \
        ("taskcluster", "", 5.0, 60.0, ())
    config = write(tmp_path, '[auth]\nmode = "local"\ntimeout = 2\ntimestamp_skew = 300\n'
                             'root_url = "https://tc.example.com/"\n'
                             '[server]\ntrusted_proxies = ["10.1.2.3/8", "::1", "192.0.2.7"]\n', "roller.toml")
    s = load_settings(str(config), {}, {})
    assert (s.auth_mode, s.auth_root_url, s.auth_timeout, s.auth_timestamp_skew) == \
        ("local", "https://tc.example.com", 2.0, 300.0)
    assert s.trusted_proxies == ("10.0.0.0/8", "::1/128", "192.0.2.7/32")
    s = load_settings(None, {"ROLLER_SERVER_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8",
                             "ROLLER_AUTH_MODE": "LOCAL"}, {})
    assert s.trusted_proxies == ("127.0.0.1/32", "10.0.0.0/8") and s.auth_mode == "local"


@pytest.mark.parametrize("env, key, reason", [
    ({"ROLLER_SERVER_TRUSTED_PROXIES": "lb.example.com"}, "server.trusted_proxies", "'lb.example.com' is not an IP"),
    ({"ROLLER_AUTH_ROOT_URL": "tc.example.com"}, "auth.root_url", "must be an http(s) URL"),
    ({"ROLLER_AUTH_TIMEOUT": "0"}, "auth.timeout", "at least 0.1"),
    ({"ROLLER_AUTH_MODE": "hawk"}, "auth.mode", "must be one of none, taskcluster, local"),
])
def test_bad_auth_settings(env: dict, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(None, env, {})
    assert e.value.key == key and reason in str(e.value)


def test_make_authenticator(tmp_path: Any) -> None:
    base = load_settings(None, {}, {"state_dir": str(tmp_path)})
    assert isinstance(make_authenticator(evolve(base, auth_mode="none"), reactor), AnonymousAuthenticator)
    unconfigured = make_authenticator(base, reactor)
    assert isinstance(unconfigured, UnconfiguredAuthenticator) and "auth.root_url is not set" in unconfigured.reason
    tc = make_authenticator(evolve(base, auth_root_url="https://tc.example.com", auth_timeout=2.5,
                                   trusted_proxies=("10.0.0.0/8",)), reactor)
    assert isinstance(tc, TaskclusterAuthenticator)
    assert (tc.url, tc.timeout) == ("https://tc.example.com/api/auth/v1/authenticate-hawk", 2.5)
    # server.trusted_proxies are the web layer's (roller.web.proxy): the Api hands the authenticator the target
    assert not hasattr(tc, "trusted_proxies")
    local = evolve(base, auth_mode="local", auth_timestamp_skew=90.0)
    none = make_authenticator(local, reactor, Secrets())
    assert isinstance(none, UnconfiguredAuthenticator) and "has no [clients.ID] tables" in none.reason
    auth = make_authenticator(local, reactor, load_secrets(write(tmp_path, CLIENTS_TOML)))
    assert isinstance(auth, LocalHawkAuthenticator) and auth.skew == 90.0
    assert auth.clients["project/releng/roller-ci"] == (TOKEN, ("project:releng:roller:*",))


# -- the Api and its document ------------------------------------------------------------------


def test_secured_operations_document_503() -> None:
    doc = openapi_document(builtin_tasks(), ("ping",), __version__)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if op.get("security"):
                assert "503" in op["responses"], (method, path)
    assert "auth_unavailable" in doc["components"]["responses"]["Unavailable"]["description"]


@pytest.mark.parametrize("trusted, origin", [((), "127.0.0.1"), (("127.0.0.0/8",), "198.51.100.7")])
def test_api_origin_ip_behind_trusted_proxy(tmp_path: Any, trusted: tuple, origin: str) -> None:
    from roller.queue import JobQueue
    from roller.testing.syncdb import sync_store
    from roller.web.api import Api

    store, clock = sync_store(str(tmp_path / "api.db"))
    tasks = builtin_tasks()
    queue = JobQueue(store, tasks, clock)
    api = Api(store, queue, tasks, AnonymousAuthenticator(), allowed_tasks=(), clock=clock,
              trusted_proxies=trusted)
    client = StubTreq(api.app.resource())
    d = client.post("http://roller.test/api/v1/machines", data=json.dumps(
        {"worker_id": "m1", "worker_group": "g1", "ip": "192.0.2.1"}).encode(),
        headers={"Content-Type": ["application/json"], "X-Forwarded-For": ["6.6.6.6, 198.51.100.7"]})
    client.flush()
    assert d.result.code == 201
    entries = []
    store.audit.list(limit=10).addCallback(entries.extend)
    (entry,) = entries
    assert entry.source_ip == origin


# -- RollerService in each mode -------------------------------------------------------------------


async def _service(tmp_path: Any, **settings: Any) -> tuple[RollerService, str]:
    s = load_settings(None, {}, {"server.listen": "tcp:0:interface=127.0.0.1", "state_dir": str(tmp_path / "state")})
    s = evolve(s, secrets_file=str(write(tmp_path, CLIENTS_TOML)), allowed_tasks=("ping",), **settings)
    service = RollerService(s, reactor)
    service.startService()
    await service.ready
    await service.store.machines.put(Machine.from_json({"worker_id": "m1", "worker_group": "g1"}))
    return service, f"http://127.0.0.1:{service.ports[0].getHost().port}"


async def _submit(base: str, token: str = TOKEN) -> tuple[int, dict]:
    url = base + "/api/v1/workers/m1/group/g1/jobs?task_name=ping"
    header = mohawk.Sender(credentials={"id": "project/releng/roller-ci", "key": token, "algorithm": "sha256"},
                           url=url, method="POST", content="", content_type="").request_header
    response = await treq.post(url, headers={"Authorization": [header]}, persistent=False).addTimeout(10, reactor)
    return response.code, await response.json()


@pytest_twisted.ensureDeferred
async def test_service_local_mode(tmp_path: Any) -> None:
    service, base = await _service(tmp_path, auth_mode="local")
    try:
        code, body = await _submit(base, "wrong-token-0123456789")
        assert code == 401 and "signature does not match" in body["message"], body
        code, body = await _submit(base)
        assert code == 201, body
        job = await service.store.jobs.get(body["task_id"])
        assert job.requester == "project/releng/roller-ci"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_service_taskcluster_mode(tmp_path: Any) -> None:
    fake = FakeTaskclusterAuth({"project/releng/roller-ci": (TOKEN, ["project:releng:roller:ping"])})
    port = fake.listen(reactor)
    try:
        service, base = await _service(tmp_path, auth_root_url=fake.url, auth_timeout=2.0)
        try:
            code, body = await _submit(base)
            assert code == 201, body
            assert [q["resource"] for q in fake.questions] == ["/api/v1/workers/m1/group/g1/jobs?task_name=ping"]
        finally:
            await service.stopService()  # also closes the pooled connection to the auth service
    finally:
        await port.stopListening()
    principal = Principal("c", ("*",), expires="3000-01-01T00:00:00.000Z")
    assert principal.expires == "3000-01-01T00:00:00.000Z"


@pytest_twisted.ensureDeferred
async def test_secrets_reload_rotates_a_token(tmp_path: Any) -> None:
    service, base = await _service(tmp_path, auth_mode="local")
    new_token = "tok-Rotated-0123456789abcdef"
    try:
        assert (await _submit(base, new_token))[0] == 401
        # a file others may read is refused: the secrets in force stay
        path = write(tmp_path, CLIENTS_TOML.replace(TOKEN, new_token))
        os.chmod(path, 0o644)
        assert service.reload_secrets() is False
        assert (await _submit(base))[0] == 201
        os.chmod(path, 0o600)
        assert service.reload_secrets() is True
        code, body = await _submit(base, new_token)
        assert code in (200, 201), body
        assert (await _submit(base))[0] == 401
    finally:
        await service.stopService()
