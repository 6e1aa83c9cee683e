"""
Tests for L{roller.drivers.redfish} and L{roller.tasks.redfish}.

Integration tests drive a real sushy-emulator (L{roller.testing.sushy}) on
127.0.0.1 through C{pytest_twisted}, each power change read back from the
emulator itself; they are skipped only when sushy-emulator is not
installed.  Session authentication (which sushy-emulator lacks) is tested
against a small Klein BMC on loopback; timeouts against a socket that
accepts and never answers.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from attrs import define, field
from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.server import Site
from zope.interface import Interface

from roller.config import load_settings
from roller.drivers.redfish import (
    RedfishAuthFailed,
    RedfishConfigError,
    RedfishConnectFailed,
    RedfishDriver,
    RedfishHttpError,
    RedfishNotFound,
    RedfishPowerResult,
    RedfishPowerTimeout,
    RedfishTarget,
    RedfishTimeout,
    RedfishUnsupported,
    choose_reset_type,
    redfish_target,
)
from roller.inventory import Machine
from roller.jobs import Job
from roller.secrets import Credential, Secrets
from roller.tasks import TaskContext, TaskFailed
from roller.tasks import redfish as redfish_task
from roller.testing.liveness import DownThenUp
from roller.testing.results import eventually
from roller.testing.sushy import SushyEmulator, fake_system, skip_reason

SKIP_SUSHY = skip_reason()
PASSWORD = "s3cret-Pa55word"


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _driver(**kw: Any) -> RedfishDriver:
    kw.setdefault("request_timeout", 5.0)
    kw.setdefault("power_timeout", 10.0)
    kw.setdefault("poll_interval", 0.05)
    return RedfishDriver(_reactor(), **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _failure(d: Any) -> BaseException:
    try:
        result = await d
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


# ---------------------------------------------------------------- emulators

SYSTEMS = [
    ("status", "On"), ("status-off", "Off"), ("off", "On"), ("on", "Off"), ("reset", "On"),
    ("reset-off", "Off"), ("cycle", "On"), ("boot", "On"), ("slow", "On"), ("nmi", "On"),
    ("task", "On"), ("task-pxe", "On"), ("power-task", "Off"), ("graceful", "On"),
]


@pytest.fixture(scope="module")
def bmc():
    if SKIP_SUSHY:
        pytest.skip(SKIP_SUSHY)
    with SushyEmulator([fake_system(n, s) for n, s in SYSTEMS]) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def bmc_auth():
    if SKIP_SUSHY:
        pytest.skip(SKIP_SUSHY)
    with SushyEmulator([fake_system("only")], users={"admin": PASSWORD}) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def bmc_tls():
    if SKIP_SUSHY:
        pytest.skip(SKIP_SUSHY)
    with SushyEmulator([fake_system("tls")], tls=True) as emulator:
        yield emulator


def _target(emulator: SushyEmulator, system: str | None, **kw: Any) -> RedfishTarget:
    fields: dict[str, Any] = dict(url=emulator.url, system=system, username="admin",
                                  password=PASSWORD, credential="bmc-admin", name=f"test/{system}")
    fields.update(kw)
    return RedfishTarget(**fields)


# ---------------------------------------------------------------- power, read back


@pytest_twisted.ensureDeferred
async def test_status(bmc):
    d = _driver()
    assert await d.status(_target(bmc, "status")) == "on"
    assert await d.status(_target(bmc, "status-off")) == "off"


@pytest_twisted.ensureDeferred
async def test_off_then_already_off(bmc):
    d = _driver()
    lines: list[str] = []
    result = await d.power(_target(bmc, "off"), "off", lines.append)
    assert isinstance(result, RedfishPowerResult)
    assert (result.action, result.reset_types, result.state) == ("off", ("ForceOff",), "Off")
    assert bmc.power_state("off") == "Off"
    assert any("ComputerSystem.Reset ForceOff -> HTTP 204" in line for line in lines)
    again = await d.off(_target(bmc, "off"))
    assert again.endswith("was already Off")


@pytest_twisted.ensureDeferred
async def test_on(bmc):
    result = await _driver().power(_target(bmc, "on"), "on")
    assert (result.reset_types, result.state) == (("On",), "On")
    assert bmc.power_state("on") == "On"


@pytest_twisted.ensureDeferred
async def test_reset_prefers_force_restart(bmc):
    result = await _driver().power(_target(bmc, "reset"), "reset")
    assert (result.action, result.reset_types, result.state) == ("reset", ("ForceRestart",), "On")
    assert bmc.power_state("reset") == "On"
    uuid = bmc.uuid("reset")
    assert f"POST /redfish/v1/Systems/{uuid}/Actions/ComputerSystem.Reset 204" in bmc.requests()


@pytest_twisted.ensureDeferred
async def test_reset_of_a_system_that_is_off_powers_it_on(bmc):
    result = await _driver().power(_target(bmc, "reset-off"), "reset")
    assert (result.reset_types, result.state) == (("On",), "On")
    assert "was off" in result.detail
    assert bmc.power_state("reset-off") == "On"


@pytest_twisted.ensureDeferred
async def test_cycle_without_power_cycle_is_force_off_then_on(bmc):
    # sushy-emulator does not offer PowerCycle
    allowed = bmc.system("cycle")["Actions"]["#ComputerSystem.Reset"]["ResetType@Redfish.AllowableValues"]
    assert "PowerCycle" not in allowed
    result = await _driver().power(_target(bmc, "cycle"), "cycle")
    assert (result.action, result.reset_types, result.state) == ("cycle", ("ForceOff", "On"), "On")
    assert bmc.power_state("cycle") == "On"
    # the IPowerDriver verb: the same, summed up in one line
    summary = await _driver().cycle(_target(bmc, "cycle"))
    assert summary == f"ForceOff then On sent; /redfish/v1/Systems/{bmc.uuid('cycle')} is On"


@pytest_twisted.ensureDeferred
async def test_graceful_off(bmc):
    result = await _driver().power(_target(bmc, "graceful"), "off", graceful=True)
    assert (result.reset_types, result.state) == (("GracefulShutdown",), "Off")
    assert bmc.power_state("graceful") == "Off"


@pytest_twisted.ensureDeferred
async def test_pxe_boot_once_reads_back_continuous(bmc):
    result = await _driver().boot_override(_target(bmc, "boot"), "pxe", once=True)
    assert (result.target, result.enabled) == ("Pxe", "Continuous")
    assert "the BMC reports Continuous" in result.detail
    boot = bmc.system("boot")["Boot"]
    assert boot["BootSourceOverrideTarget"] == "Pxe"


@pytest_twisted.ensureDeferred
async def test_pxe_boot_with_uefi_mode(bmc):
    summary = await _driver().set_boot_device(_target(bmc, "boot"), "pxe", efi=True)
    assert summary.startswith("boot override Pxe (Once, UEFI) set on ")
    boot = bmc.system("boot")["Boot"]
    assert (boot["BootSourceOverrideTarget"], boot["BootSourceOverrideMode"]) == ("Pxe", "UEFI")


@pytest_twisted.ensureDeferred
async def test_boot_target_not_offered(bmc):
    e = await _failure(_driver().set_boot_device(_target(bmc, "boot"), "Floppy"))
    assert isinstance(e, RedfishUnsupported)
    assert "'Floppy' is not offered" in str(e) and "Pxe" in str(e)


@pytest_twisted.ensureDeferred
async def test_power_state_is_polled_until_applied_or_timeout(bmc):
    bmc.set_delay(2)  # the fake driver applies changes 1-2 s later (whole seconds)
    try:
        t = _target(bmc, "slow")
        e = await _failure(_driver(power_timeout=0.3).off(t))
        assert isinstance(e, RedfishPowerTimeout)
        assert e.last_state == "On"
        assert "is still On 0.3 s after ForceOff (wanted Off)" in str(e)

        lines: list[str] = []
        result = await _driver(poll_interval=0.1).power(t, "off", lines.append)
        assert result.state == "Off" and bmc.power_state("slow") == "Off"
        reads = [r for r in bmc.requests() if r == f"GET /redfish/v1/Systems/{bmc.uuid('slow')} 200"]
        assert len(reads) >= 4  # discovery + several polls: it really waited for the change
    finally:
        bmc.set_delay(0)


# ---------------------------------------------------------------- errors


@pytest_twisted.ensureDeferred
async def test_unknown_system_is_404_naming_the_systems_there(bmc):
    e = await _failure(_driver().status(_target(bmc, "no-such-system")))
    assert isinstance(e, RedfishNotFound)
    assert e.status == 404
    assert "system 'no-such-system' not found" in str(e)
    assert bmc.uuid("status") in str(e)


@pytest_twisted.ensureDeferred
async def test_reset_type_the_bmc_cannot_do_is_501(bmc):
    # Nmi is advertised by sushy-emulator but its fake driver answers 501
    e = await _failure(_driver().reset(_target(bmc, "nmi"), reset_type="Nmi"))
    assert isinstance(e, RedfishUnsupported)
    assert e.status == 501
    assert "does not support ResetType 'Nmi'" in str(e) and "HTTP 501" in str(e)
    assert bmc.power_state("nmi") == "On"


@pytest_twisted.ensureDeferred
async def test_reset_type_not_offered_is_refused_before_sending(bmc):
    e = await _failure(_driver().reset(_target(bmc, "nmi"), reset_type="PowerCycle"))
    assert isinstance(e, RedfishUnsupported)
    assert e.status is None
    assert "'PowerCycle' is not offered" in str(e) and "ForceRestart" in str(e)
    assert not [r for r in bmc.requests() if "PowerCycle" in r]


@pytest_twisted.ensureDeferred
async def test_several_systems_and_none_chosen(bmc):
    e = await _failure(_driver().status(_target(bmc, None)))
    assert isinstance(e, RedfishConfigError)
    assert f"has {len(SYSTEMS)} systems" in str(e) and "set redfish.system" in str(e)


@pytest_twisted.ensureDeferred
async def test_basic_auth_and_the_only_system(bmc_auth):
    assert await _driver().status(_target(bmc_auth, None)) == "on"


@pytest_twisted.ensureDeferred
async def test_wrong_password_names_the_credential_not_the_password(bmc_auth):
    t = _target(bmc_auth, None, password="not-" + PASSWORD)
    e = await _failure(_driver().reset(t))
    assert isinstance(e, RedfishAuthFailed)
    assert e.status == 401
    assert str(e) == (f"Redfish {bmc_auth.url}: credential 'bmc-admin' (user 'admin') was refused "
                      "(HTTP 401: Incorrect username or password)")
    assert PASSWORD not in repr(e.args) and PASSWORD not in repr(t)
    assert bmc_auth.power_state("only") == "On"


@pytest_twisted.ensureDeferred
async def test_connection_refused():
    url = f"http://127.0.0.1:{_free_port()}"
    e = await _failure(_driver().status(RedfishTarget(url=url, username="u", password="p")))
    assert isinstance(e, RedfishConnectFailed)
    assert e.reason == "refused"
    assert str(e) == f"cannot connect to Redfish {url}: connection refused"


class _Silent(Protocol):
    def connectionMade(self) -> None:
        self.factory.connected.append(self)

    def connectionLost(self, reason: Any) -> None:
        self.factory.lost.append(self)


@pytest.fixture
def silent_server():
    factory = Factory.forProtocol(_Silent)
    factory.connected, factory.lost = [], []
    port = _reactor().listenTCP(0, factory, interface="127.0.0.1")
    factory.url = f"http://127.0.0.1:{port.getHost().port}"
    yield factory
    for p in factory.connected:
        p.transport.abortConnection()
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_bmc_not_answering_times_out_and_hangs_up(silent_server):
    started = _reactor().seconds()
    e = await _failure(_driver(request_timeout=0.3).status(
        RedfishTarget(url=silent_server.url, username="u", password="p")))
    assert isinstance(e, RedfishTimeout)  # roller's 0.3 s timeout ended it (the server never answers)
    assert str(e) == f"Redfish {silent_server.url} did not answer GET /redfish/v1/ within 0.3 s"
    assert _reactor().seconds() >= started + 0.3
    await eventually(lambda: len(silent_server.lost) == len(silent_server.connected) == 1)


@pytest_twisted.ensureDeferred
async def test_cancel_hangs_up(silent_server):
    d = _driver().status(RedfishTarget(url=silent_server.url, username="u", password="p"))
    await eventually(lambda: silent_server.connected)
    d.cancel()
    e = await _failure(d)
    assert isinstance(e, CancelledError)
    await eventually(lambda: silent_server.lost)


# ---------------------------------------------------------------- TLS


@pytest_twisted.ensureDeferred
async def test_tls_with_the_machines_ca_file(bmc_tls):
    t = _target(bmc_tls, "tls", ca_file=bmc_tls.ca_file)
    assert t.url.startswith("https://")
    assert await _driver().status(t) == "on"


@pytest_twisted.ensureDeferred
async def test_tls_is_verified_by_default(bmc_tls):
    e = await _failure(_driver().status(_target(bmc_tls, "tls")))
    assert isinstance(e, RedfishConnectFailed)
    assert e.reason == "tls"
    assert "certificate verify failed" in str(e) and "ca_file" in str(e)


@pytest_twisted.ensureDeferred
async def test_tls_verification_off_only_when_asked_and_warned_once(bmc_tls):
    warnings: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "roller.drivers.redfish" and event.get("log_level") == LogLevel.warn:
            warnings.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        d = _driver()
        t = _target(bmc_tls, "tls", verify_tls=False, name="g/unverified")
        assert await d.status(t) == "on"
        assert await d.status(t) == "on"
    finally:
        globalLogPublisher.removeObserver(observe)
    assert len(warnings) == 1
    assert warnings[0]["machine"] == "g/unverified"


def test_bad_ca_file(tmp_path):
    (tmp_path / "empty.pem").write_text("nothing here\n")
    for path, expected in ((tmp_path / "missing.pem", "cannot read CA file"),
                           (tmp_path / "empty.pem", "holds no PEM certificate")):
        d = _driver().status(RedfishTarget(url="https://127.0.0.1:1", username="u", password="p",
                                           ca_file=str(path)))
        failures: list = []
        d.addErrback(failures.append)
        assert failures and failures[0].check(RedfishConfigError)
        assert expected in str(failures[0].value)


# ---------------------------------------------------------------- session auth (Klein BMC)


@define
class SessionBmc:
    """A BMC with a SessionService: one system, On, reachable with a token only."""

    login_status: int = 201
    password: str = PASSWORD
    tokens: set = field(factory=set)
    seen: list = field(factory=list)
    deleted: list = field(factory=list)
    url: str = ""

    app = Klein()

    def _record(self, request: Any) -> str:
        token = request.getHeader("x-auth-token")
        basic = request.getHeader("authorization")
        kind = "token" if token in self.tokens else "basic" if basic else "none"
        self.seen.append((request.method.decode(), request.path.decode(), kind))
        request.setHeader("content-type", "application/json")
        return kind

    @app.route("/redfish/v1/", methods=["GET"])
    def root(self, request: Any) -> bytes:
        self._record(request)
        return b'{"@odata.id": "/redfish/v1/", "Systems": {"@odata.id": "/redfish/v1/Systems"},' \
               b' "Links": {"Sessions": {"@odata.id": "/redfish/v1/SessionService/Sessions"}}}'

    @app.route("/redfish/v1/SessionService/Sessions", methods=["POST"])
    def login(self, request: Any) -> bytes:
        import json

        self._record(request)
        body = json.loads(request.content.read())
        if self.login_status != 201:
            request.setResponseCode(self.login_status)
            return b'{"error": {"message": "no sessions here"}}'
        if body != {"UserName": "admin", "Password": self.password}:
            request.setResponseCode(401)
            return b'{"error": {"message": "Invalid credentials"}}'
        token = f"token-{len(self.tokens)}"
        self.tokens.add(token)
        request.setResponseCode(201)
        request.setHeader("X-Auth-Token", token)
        request.setHeader("Location", f"/redfish/v1/SessionService/Sessions/{token}")
        return b'{"@odata.id": "/redfish/v1/SessionService/Sessions/x"}'

    @app.route("/redfish/v1/SessionService/Sessions/<sid>", methods=["DELETE"])
    def logout(self, request: Any, sid: str) -> bytes:
        self._record(request)
        self.deleted.append(sid)
        self.tokens.discard(sid)
        request.setResponseCode(204)
        return b""

    @app.route("/redfish/v1/Systems", methods=["GET"])
    def systems(self, request: Any) -> bytes:
        if self._record(request) == "none":
            request.setResponseCode(401)
            return b'{"error": {"message": "log in"}}'
        return b'{"Members": [{"@odata.id": "/redfish/v1/Systems/1"}]}'

    @app.route("/redfish/v1/Systems/moved", methods=["GET"])
    def moved(self, request: Any) -> bytes:
        self._record(request)
        request.setResponseCode(307)
        request.setHeader("Location", self.url.replace("127.0.0.1", "127.0.0.2") + "/redfish/v1/Systems/1")
        return b""

    @app.route("/redfish/v1/Systems/1", methods=["GET"])
    def system(self, request: Any) -> bytes:
        if self._record(request) == "none":
            request.setResponseCode(401)
            return b'{"error": {"message": "log in"}}'
        return b'{"@odata.id": "/redfish/v1/Systems/1", "PowerState": "On"}'


@pytest.fixture
def session_bmc():
    bmc = SessionBmc()
    port = _reactor().listenTCP(0, Site(bmc.app.resource()), interface="127.0.0.1")
    bmc.url = f"http://127.0.0.1:{port.getHost().port}"
    yield bmc
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_session_auth_when_advertised_and_logout(session_bmc):
    t = RedfishTarget(url=session_bmc.url, username="admin", password=PASSWORD, credential="bmc")
    assert await _driver().status(t) == "on"
    assert session_bmc.seen == [
        ("GET", "/redfish/v1/", "none"),
        ("POST", "/redfish/v1/SessionService/Sessions", "none"),
        ("GET", "/redfish/v1/Systems", "token"),
        ("GET", "/redfish/v1/Systems/1", "token"),
        ("DELETE", "/redfish/v1/SessionService/Sessions/token-0", "token"),
    ]
    assert session_bmc.deleted == ["token-0"]


@pytest_twisted.ensureDeferred
async def test_session_login_refused(session_bmc):
    t = RedfishTarget(url=session_bmc.url, username="admin", password="wrong", credential="bmc")
    e = await _failure(_driver().status(t))
    assert isinstance(e, RedfishAuthFailed)
    assert "credential 'bmc' (user 'admin') was refused (HTTP 401: Invalid credentials)" in str(e)


@pytest_twisted.ensureDeferred
async def test_no_session_falls_back_to_basic(session_bmc):
    session_bmc.login_status = 405
    t = RedfishTarget(url=session_bmc.url, username="admin", password=PASSWORD)
    assert await _driver().status(t) == "on"
    assert [k for m, p, k in session_bmc.seen if p.startswith("/redfish/v1/Systems")] == ["basic", "basic"]
    assert session_bmc.deleted == []


@pytest_twisted.ensureDeferred
async def test_redirect_to_another_origin_is_not_followed(session_bmc):
    t = RedfishTarget(url=session_bmc.url, system="moved", username="admin", password=PASSWORD)
    e = await _failure(_driver().status(t))
    assert isinstance(e, RedfishHttpError) and e.status == 307
    assert "GET /redfish/v1/Systems/moved failed (HTTP 307)" in str(e)
    # the token went nowhere else, and the session was closed
    assert session_bmc.deleted == ["token-0"]


# ---------------------------------------------------------------- units


def test_choose_reset_type():
    allowed = ("On", "ForceOff", "GracefulRestart")
    assert choose_reset_type(allowed, ("ForceRestart", "GracefulRestart")) == "GracefulRestart"
    assert choose_reset_type(allowed, ("PowerCycle",)) is None
    assert choose_reset_type(None, ("ForceRestart", "GracefulRestart")) == "ForceRestart"


def test_target_url_and_repr():
    t = RedfishTarget(url="https://bmc.example:8443/redfish/v1/", username="u", password=PASSWORD)
    assert t.url == "https://bmc.example:8443"
    assert PASSWORD not in repr(t)
    for bad in ("ftp://bmc", "https://user:pw@bmc", "https://bmc/some/where"):
        with pytest.raises(RedfishConfigError):
            RedfishTarget(url=bad, username="u", password="p")


def _machine(**redfish: Any) -> Machine:
    data: dict[str, Any] = {"worker_id": "w1", "worker_group": "g", "ip": "127.0.0.9"}
    if redfish:
        data["redfish"] = redfish
    return Machine.from_json(data)


SECRETS = Secrets({
    "bmc": Credential(name="bmc", kind="password", username="admin", password=PASSWORD),
    "key": Credential(name="key", kind="ssh-key", path="/dev/null"),
})


def test_redfish_target_from_inventory():
    t = redfish_target(_machine(url="https://10.0.0.5", system="System.Embedded.1", credential="bmc",
                                ca_file="/etc/roller/bmc-ca.pem"), SECRETS)
    assert (t.url, t.system, t.username, t.password, t.credential, t.ca_file, t.verify_tls, t.name) == (
        "https://10.0.0.5", "System.Embedded.1", "admin", PASSWORD, "bmc", "/etc/roller/bmc-ca.pem", True,
        "g/w1")
    assert redfish_target(_machine(url="https://10.0.0.5"), SECRETS, default_credential="bmc").credential == "bmc"
    cases = [
        (_machine(), None, "has no redfish settings"),
        (_machine(url="https://10.0.0.5"), None, "no Redfish credential"),
        (_machine(url="https://10.0.0.5", credential="nope"), None, "unknown credential 'nope'"),
        (_machine(url="https://10.0.0.5", credential="key"), None, "is of type ssh-key, not password"),
    ]
    for machine, default, message in cases:
        with pytest.raises(RedfishConfigError, match=message):
            redfish_target(machine, SECRETS, default_credential=default)


class _IPowerVerbs(Interface):
    """The power verbs roller's drivers share (as L{roller.drivers.ipmi.IIpmi} has them)."""

    def status(target, on_event=None):
        pass

    def on(target, on_event=None):
        pass

    def off(target, on_event=None):
        pass

    def cycle(target, on_event=None):
        pass

    def reset(target, on_event=None):
        pass

    def set_boot_device(target, device="pxe", efi=False, on_event=None):
        pass


def test_power_verbs_shape():
    from zope.interface import directlyProvides
    from zope.interface.verify import verifyObject

    driver = _driver()
    directlyProvides(driver, _IPowerVerbs)
    assert verifyObject(_IPowerVerbs, driver)


# ---------------------------------------------------------------- tasks


def _context(machine: Machine, driver: RedfishDriver | None = None, secrets: Secrets = SECRETS):
    events: list[str] = []
    job = Job(id="j", task_name="redfish_reboot", worker_id=machine.worker_id,
              worker_group=machine.worker_group, created_at=0.0)
    ctx = TaskContext(job=job, machine=machine, reactor=_reactor(),
                      log=lambda m, **d: events.append(m), settings=load_settings(None, {}, {}),
                      secrets=secrets, drivers=SimpleNamespace(redfish=driver or _driver()))
    return ctx, events


@pytest_twisted.ensureDeferred
async def test_redfish_reboot_task(bmc):
    machine = _machine(url=bmc.url, system="task", credential="bmc")
    ctx, events = _context(machine)
    params = redfish_task.TASK.parse_params({})
    result = await redfish_task.TASK.run(ctx, params)
    assert result.startswith("redfish reboot: ForceRestart sent;") and result.endswith("is On")
    assert any("ComputerSystem.Reset ForceRestart -> HTTP 204" in e for e in events)
    assert bmc.power_state("task") == "On"
    assert redfish_task.TASK.endpoints(machine) == ("bmc:127.0.0.1",)
    assert redfish_task.not_applicable(machine) is None


@pytest_twisted.ensureDeferred
async def test_redfish_reboot_task_with_pxe(bmc):
    ctx, _ = _context(_machine(url=bmc.url, system="task-pxe", credential="bmc"))
    result = await redfish_task.TASK.run(ctx, redfish_task.TASK.parse_params({"pxe": True}))
    assert "boot override Pxe (Once) set" in result and "ForceRestart sent" in result
    assert bmc.system("task-pxe")["Boot"]["BootSourceOverrideTarget"] == "Pxe"


@pytest_twisted.ensureDeferred
async def test_redfish_reboot_initiate_builds_its_driver_from_settings(bmc):
    ctx, _ = _context(_machine(url=bmc.url, system="task", credential="bmc"))
    ctx = TaskContext(job=ctx.job, machine=ctx.machine, reactor=ctx.reactor, log=ctx.log,
                      settings=ctx.settings, secrets=ctx.secrets, drivers=SimpleNamespace())
    assert "ForceRestart sent" in await redfish_task.initiate(ctx)


@pytest_twisted.ensureDeferred
async def test_redfish_power_task(bmc):
    ctx, _ = _context(_machine(url=bmc.url, system="power-task", credential="bmc"))
    run = redfish_task.POWER_TASK.run
    parse = redfish_task.POWER_TASK.parse_params
    assert await run(ctx, parse({})) == "power is off"
    assert "On sent" in await run(ctx, parse({"action": "on"}))
    assert await run(ctx, parse({"action": "status"})) == "power is on"
    assert bmc.power_state("power-task") == "On"


@pytest_twisted.ensureDeferred
async def test_redfish_reboot_task_failures_are_readable(bmc_auth):
    wrong = Secrets({"bmc": Credential(name="bmc", kind="password", username="admin", password="nope-" + PASSWORD)})
    ctx, _ = _context(_machine(url=bmc_auth.url, credential="bmc"), secrets=wrong)
    with pytest.raises(TaskFailed) as info:
        await redfish_task.TASK.run(ctx, {})
    assert "credential 'bmc' (user 'admin') was refused (HTTP 401" in str(info.value)
    assert PASSWORD not in str(info.value)

    ctx, _ = _context(_machine())
    with pytest.raises(TaskFailed, match="cannot reboot over Redfish: the machine has no redfish settings"):
        await redfish_task.TASK.run(ctx, {})
    ctx, _ = _context(_machine(url=bmc_auth.url))
    with pytest.raises(TaskFailed, match="no Redfish credential"):
        await redfish_task.initiate(ctx)


# ---------------------------------------------------------------- as a method of the reboot task


@pytest_twisted.ensureDeferred
async def test_reboot_task_escalates_to_redfish(bmc):
    from attrs import evolve

    from roller.tasks import reboot

    machine = _machine(url=bmc.url, system="task", credential="bmc")
    ctx, events = _context(machine)
    liveness = DownThenUp()
    settings = evolve(ctx.settings, reboot_poll_interval=0.05, reboot_down_timeout=5.0, reboot_up_timeout=5.0)
    ctx = TaskContext(job=ctx.job, machine=machine, reactor=ctx.reactor, log=ctx.log, settings=settings,
                      secrets=ctx.secrets, drivers=SimpleNamespace(redfish=_driver(),
                                                                   liveness=lambda m: liveness))
    result = await reboot.run(ctx, {"methods": "ssh_reboot,redfish_reboot"})
    assert result.startswith("redfish_reboot: redfish reboot: ForceRestart sent;")
    assert "ssh_reboot skipped: the machine has no ssh settings" in events
