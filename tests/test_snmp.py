"""
Tests for L{roller.drivers.snmp.carrier} and L{roller.drivers.snmp.client}.

Unit tests run pysnmp's real engine on a L{task.Clock} with a fake UDP
port: requests are decoded and answered by the test, so timeouts, retries,
cancellation and late answers are exact.  Integration tests talk to a real
net-snmp C{snmpd} on 127.0.0.1 (L{roller.testing.snmpd.SnmpAgent}) through
C{pytest_twisted}; they are skipped only when snmpd is not installed.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

import pytest
import pytest_twisted
from pyasn1.codec.ber import decoder, encoder
from pysnmp.proto import api, rfc1902, rfc1905
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from roller.drivers.snmp.carrier import TwistedDispatcher, UdpTransport
from roller.drivers.snmp.client import (
    SnmpAuthError,
    SnmpClient,
    SnmpConfigError,
    SnmpErrorStatus,
    SnmpNoSuchObject,
    SnmpTarget,
    SnmpTimeout,
    VarBind,
    normalize_oid,
)
from roller.secrets import Credential
from roller.testing.results import failure_of, result_of
from roller.testing.snmpd import BENCH_OID, SilentAgent, SnmpAgent, skip_reason

SKIP = skip_reason()
needs_snmpd = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

SYS_OBJECT_ID = "1.3.6.1.2.1.1.2.0"
COMMUNITY = Credential(name="pdu-rw", kind="snmp-community", community="s3cret-rw",
                       read_community="s3cret-ro")


# ---------------------------------------------------------------- fakes


class FakePort:
    def __init__(self, reactor: "UdpClock", port: int, protocol: Any, interface: str):
        self.reactor = reactor
        self.port = port
        self.protocol = protocol
        self.interface = interface
        self.written: list[tuple[bytes, tuple]] = []
        self.listening = True

    def write(self, data: bytes, addr: tuple) -> None:
        assert self.listening
        self.written.append((data, addr))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.port)

    def stopListening(self) -> None:
        self.listening = False


class UdpClock(Clock):
    """A Clock that can also listenUDP (a FakePort per call)."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> FakePort:
        p = FakePort(self, port or 40000 + len(self.ports), protocol, interface)
        self.ports.append(p)
        protocol.makeConnection(p)
        return p


def decode(data: bytes) -> tuple[Any, Any, Any]:
    version = int(api.decodeMessageVersion(data))
    mod = api.PROTOCOL_MODULES[version]
    msg, _ = decoder.decode(data, asn1Spec=mod.Message())
    return mod, msg, mod.apiMessage.get_pdu(msg)


def request_info(data: bytes) -> dict:
    mod, msg, pdu = decode(data)
    return {
        "version": int(mod.apiMessage.get_version(msg)),
        "community": bytes(mod.apiMessage.get_community(msg)),
        "type": pdu.__class__.__name__,
        "request_id": int(mod.apiPDU.get_request_id(pdu)),
        "varbinds": [(str(o), v) for o, v in mod.apiPDU.get_varbinds(pdu)],
    }


def response(data: bytes, values: Optional[dict] = None, error_status: int = 0,
             error_index: int = 0) -> bytes:
    """The agent's answer to C{data}: echo (SET) or C{values} by OID (GET)."""
    mod, msg, pdu = decode(data)
    rsp = mod.apiMessage.get_response(msg)
    rsp_pdu = mod.apiMessage.get_pdu(rsp)
    varbinds = []
    for oid, value in mod.apiPDU.get_varbinds(pdu):
        if values and str(oid) in values:
            value = values[str(oid)]
        varbinds.append((oid, value))
    mod.apiPDU.set_varbinds(rsp_pdu, varbinds)
    mod.apiPDU.set_error_status(rsp_pdu, error_status)
    mod.apiPDU.set_error_index(rsp_pdu, error_index)
    return encoder.encode(rsp)


def deliver(clock: UdpClock, data: bytes, addr: tuple = ("127.0.0.1", 161)) -> None:
    clock.ports[0].protocol.datagramReceived(data, addr)


def idle(client: SnmpClient) -> bool:
    """Nothing left inside any engine for any request."""
    return (client.idle() and not client._inflight and not client.dispatcher.jobs_are_pending()
            and client.in_flight == 0)


@pytest.fixture
def clock() -> UdpClock:
    return UdpClock()


@pytest.fixture
def client(clock: UdpClock):
    c = SnmpClient(clock, timeout=1.0, retries=2)
    yield c
    c.close()


def target(**kw: Any) -> SnmpTarget:
    kw.setdefault("credential", COMMUNITY)
    return SnmpTarget(kw.pop("host", "127.0.0.1"), **kw)


# ---------------------------------------------------------------- unit


def test_get_goes_through_the_engine_and_fires_with_python_values(clock, client):
    d = client.get(target(), [SYS_OBJECT_ID, ".1.3.6.1.2.1.1.3.0"])
    [(data, addr)] = clock.ports[0].written
    info = request_info(data)
    assert addr == ("127.0.0.1", 161)
    assert info["version"] == 1  # v2c
    assert info["community"] == b"s3cret-ro"  # GETs use the read community
    assert info["type"] == "GetRequestPDU"
    assert [o for o, _ in info["varbinds"]] == [SYS_OBJECT_ID, "1.3.6.1.2.1.1.3.0"]
    deliver(clock, response(data, {SYS_OBJECT_ID: rfc1902.ObjectName("1.3.6.1.4.1.1718.3"),
                                   "1.3.6.1.2.1.1.3.0": rfc1902.TimeTicks(42)}))
    assert result_of(d) == [VarBind(SYS_OBJECT_ID, "1.3.6.1.4.1.1718.3"),
                            VarBind("1.3.6.1.2.1.1.3.0", 42)]
    assert idle(client)


def test_set_sends_typed_values_with_the_write_community(clock, client):
    d = client.set(target(version="1"), [("1.3.6.1.4.1.1718.3.2.3.1.11.1.1.8", 3),
                                         ("1.3.6.1.2.1.1.4.0", "ops")])
    [(data, _)] = clock.ports[0].written
    info = request_info(data)
    assert info["version"] == 0  # v1
    assert info["community"] == b"s3cret-rw"
    assert info["type"] == "SetRequestPDU"
    (o1, v1), (o2, v2) = info["varbinds"]
    assert v1.tagSet == rfc1902.Integer32.tagSet and int(v1) == 3
    assert v2.tagSet == rfc1902.OctetString.tagSet and bytes(v2) == b"ops"
    deliver(clock, response(data))
    assert result_of(d) == [VarBind("1.3.6.1.4.1.1718.3.2.3.1.11.1.1.8", 3),
                            VarBind("1.3.6.1.2.1.1.4.0", b"ops")]


def test_silence_is_retried_then_a_timeout_naming_the_credential_not_the_secret(clock, client):
    d = client.get(target(), [SYS_OBJECT_ID])
    port = clock.ports[0]
    assert len(port.written) == 1
    clock.advance(0.99)
    assert len(port.written) == 1
    clock.advance(0.01)
    assert len(port.written) == 2
    ids = {request_info(data)["request_id"] for data, _ in port.written}
    assert len(ids) == 2  # each attempt is a new request
    clock.advance(1.0)
    assert len(port.written) == 3
    clock.advance(1.0)
    failure = failure_of(d, SnmpTimeout)
    e = failure.value
    assert e.attempts == 3
    assert str(e).startswith("no answer from 127.0.0.1:161 to SNMPv2c GET after 3 attempts of 1 s")
    assert "'pdu-rw'" in str(e) and "s3cret" not in str(e)
    assert idle(client)
    clock.advance(300)
    assert len(port.written) == 3  # nothing sent behind our back


def test_a_late_answer_to_an_abandoned_attempt_is_dropped(clock, client):
    d = client.get(target(), [SYS_OBJECT_ID])
    first = clock.ports[0].written[0][0]
    clock.advance(1.0)
    second = clock.ports[0].written[1][0]
    deliver(clock, response(first, {SYS_OBJECT_ID: rfc1902.Integer32(1)}))
    assert not d.called
    deliver(clock, response(second, {SYS_OBJECT_ID: rfc1902.Integer32(2)}))
    assert result_of(d) == [VarBind(SYS_OBJECT_ID, 2)]
    assert idle(client)


def test_per_call_timeout_and_retries(clock, client):
    d = client.set(target(), [(BENCH_OID, 1)], timeout=0.25, retries=0)
    clock.advance(0.25)
    failure_of(d, SnmpTimeout)
    assert len(clock.ports[0].written) == 1


def test_cancel_releases_the_request_in_the_engine(clock, client):
    d = client.set(target(), [(BENCH_OID, 7)])
    data = clock.ports[0].written[0][0]
    d.cancel()
    failure_of(d, CancelledError)
    assert idle(client)
    clock.advance(500)
    assert len(clock.ports[0].written) == 1  # never retransmitted
    deliver(clock, response(data))  # a late answer is dropped quietly
    assert idle(client)


def test_error_status_names_the_status_and_the_oid(clock, client):
    d = client.set(target(), [("1.3.6.1.2.1.1.1.0", "x")])
    data = clock.ports[0].written[0][0]
    deliver(clock, response(data, error_status=17, error_index=1))
    failure = failure_of(d, SnmpErrorStatus)
    assert failure.value.status == "notWritable"
    assert failure.value.oid == "1.3.6.1.2.1.1.1.0"
    assert "notWritable at 1.3.6.1.2.1.1.1.0" in str(failure.value)


@pytest.mark.parametrize("value, kind", [(rfc1905.noSuchInstance, "noSuchInstance"),
                                         (rfc1905.noSuchObject, "noSuchObject")])
def test_no_such_varbinds_fail_even_with_no_error(clock, client, value, kind):
    d = client.set(target(), [("1.3.6.1.4.1.99.1.0", 1)])
    data = clock.ports[0].written[0][0]
    deliver(clock, response(data, {"1.3.6.1.4.1.99.1.0": value}))
    failure = failure_of(d, SnmpNoSuchObject)
    assert failure.value.kind == kind and failure.value.oid == "1.3.6.1.4.1.99.1.0"


def test_many_requests_in_flight_answered_out_of_order(clock, client):
    ds = [client.get(target(host=f"127.0.0.{1 + i % 5}"), [f"1.3.6.1.4.1.9.{i}"]) for i in range(200)]
    written = clock.ports[0].written
    assert len(written) == 200 and client.in_flight == 200
    for data, addr in reversed(written):
        oid = request_info(data)["varbinds"][0][0]
        deliver(clock, response(data, {oid: rfc1902.Integer32(int(oid.rsplit(".", 1)[1]))}), addr)
    assert [result_of(d)[0].value for d in ds] == list(range(200))
    assert idle(client)


def test_bad_input_fails_before_sending(clock, client):
    for d in (client.get(target(), ["not.an.oid"]), client.get(target(), []),
              client.set(target(), [(BENCH_OID, 1.5)]), client.set(target(), [(BENCH_OID, True)])):
        failure_of(d, SnmpConfigError)
    assert clock.ports == []
    with pytest.raises(SnmpConfigError, match="of type password"):
        target(credential=Credential(name="ipmi", kind="password", username="u", password="p"))
    with pytest.raises(SnmpConfigError):
        target(version="3")
    assert normalize_oid(".1.3.6.1") == "1.3.6.1"


def test_prepared_varbinds_are_reused_but_every_attempt_is_a_fresh_request(clock, client):
    d = client.get(target(), [BENCH_OID])
    d.addErrback(lambda f: f.trap(CancelledError))
    d.cancel()
    # a GET's cached Null varbind must not turn an invalid SET into a valid one
    failure_of(client.set(target(), [(BENCH_OID, None)]), SnmpConfigError)
    ds = [client.set(target(), [(BENCH_OID, 7), ("." + BENCH_OID, "seven")]) for _ in range(3)]
    sent = [request_info(data) for data, _ in clock.ports[0].written[1:]]
    assert [i["varbinds"] for i in sent] == [[(BENCH_OID, rfc1902.Integer32(7)),
                                              (BENCH_OID, rfc1902.OctetString(b"seven"))]] * 3
    assert len({i["request_id"] for i in sent}) == 3
    for data, addr in clock.ports[0].written[1:]:
        deliver(clock, response(data, {}), addr)
    assert [[(v.oid, v.value) for v in result_of(d)] for d in ds] == [
        [(BENCH_OID, 7), (BENCH_OID, b"seven")]] * 3
    assert idle(client)


def test_cached_names_never_stand_for_another_oid_or_value(clock, client):
    other = BENCH_OID[:-1] + "2"
    ints = tuple(int(p) for p in other.split("."))
    # a tuple of floats equals (and hashes like) the tuple of ints, but
    # normalizes to another OID: tuples are never served from a cache
    floats = tuple(float(p) for p in ints)
    sets = [(BENCH_OID, 1), (BENCH_OID, 2), (other, 2), ("." + other, 3), (BENCH_OID, "x"),
            (BENCH_OID, b"x"), (ints, 4), (floats, 4), (ints, 4)]
    ds = [client.set(target(), [vb]) for vb in sets]
    sent = [request_info(data)["varbinds"] for data, _ in clock.ports[0].written]
    assert sent == [
        [(BENCH_OID, rfc1902.Integer32(1))], [(BENCH_OID, rfc1902.Integer32(2))],
        [(other, rfc1902.Integer32(2))], [(other, rfc1902.Integer32(3))],
        [(BENCH_OID, rfc1902.OctetString(b"x"))], [(BENCH_OID, rfc1902.OctetString(b"x"))],
        [(other, rfc1902.Integer32(4))],
        [(".".join(str(p) for p in floats), rfc1902.Integer32(4))],
        [(other, rfc1902.Integer32(4))]]
    assert sorted(client._names_by_oid) == sorted([BENCH_OID, other, "." + other])
    for data, addr in clock.ports[0].written:
        deliver(clock, response(data, {}), addr)
    assert [[v.value for v in result_of(d)] for d in ds] == [
        [1], [2], [2], [3], [b"x"], [b"x"], [4], [4], [4]]
    assert idle(client)


@pytest.mark.parametrize("data", [
    b"", b"\x30", b"\x30\x03\x02\x01\x01", b"\x30\x03\x02\x01\x01\x00", b"\x30\x04\x02\x01\x01",
    b"\x30\x03\x02\x01\xff", b"\x30\x02\x02\x00", b"\x30\x81\x03\x02\x01\x01", b"\x30\x80\x02\x01\x01\x00\x00",
    b"\x30\x04\x02\x02\x00\x03", b"\x31\x03\x02\x01\x01", b"\x30\x03\x04\x01\x01",
    b"\x30\x81\x83\x02\x01\x03" + b"\x04\x7e" + b"x" * 126, b"\x30\x82\x00\x83\x02\x01\x03" + b"x" * 128,
])
def test_version_peek_answers_exactly_like_pysnmp(data, client):
    from pysnmp.proto.api import verdec

    from roller.drivers.snmp.client import _decode_message_version, _peek_message_version

    def outcome(fn: Any) -> Any:
        try:
            return int(fn(data))
        except Exception as e:
            return type(e)
    assert outcome(_peek_message_version) == outcome(_decode_message_version)
    assert verdec.decode_message_version is _peek_message_version  # installed by SnmpClient
    for mod, version in ((api.PROTOCOL_MODULES[0], 0), (api.PROTOCOL_MODULES[1], 1)):
        msg = mod.Message()
        mod.apiMessage.set_defaults(msg)
        mod.apiMessage.set_community(msg, b"c" * 200)
        pdu = mod.GetRequestPDU()
        mod.apiPDU.set_defaults(pdu)
        mod.apiMessage.set_pdu(msg, pdu)
        assert int(_peek_message_version(encoder.encode(msg))) == version


def cancelled(d: Deferred) -> Deferred:
    """C{d}, cancelled, its failure handled."""
    d.cancel()
    d.addErrback(lambda f: f.trap(CancelledError) and None)
    return d


def v3(name: str, user: str = "roller", auth: str = "SHA", auth_key: str = "k" * 8, priv: str = "AES",
       priv_key: str = "p" * 8) -> Credential:
    return Credential(name=name, kind="snmp-v3", user=user, auth_protocol=auth, auth_key=auth_key,
                      priv_protocol=priv, priv_key=priv_key)


def test_one_user_name_with_several_sets_of_keys_gets_one_engine_per_set(clock, client):
    a = v3("a")
    b = v3("b", auth_key="x" * 8)
    c = v3("c", auth="SHA256", priv="AES256")
    other = v3("other", user="someone-else", auth_key="y" * 8)
    ds = [client.get(target(credential=cred), [SYS_OBJECT_ID]) for cred in (a, b, c, other)]
    # every request went out (v3 discovery first), none was refused
    assert all(not d.called for d in ds)
    # communities and distinct user names share the first engine; each
    # further set of keys for "roller" has one of its own, with its own socket
    assert client.engines == 3
    assert len(clock.ports) == 3
    lanes = {cred.name: client._lane(target(credential=cred)) for cred in (a, b, c, other)}
    assert lanes["a"] is lanes["other"] is client._base
    assert len({id(lanes["a"]), id(lanes["b"]), id(lanes["c"])}) == 3
    # the same keys under another credential name use the same engine
    assert client._lane(target(credential=v3("a-again"))) is lanes["a"]
    for d in ds:
        assert cancelled(d).called
    assert idle(client)


def test_an_idle_extra_engine_is_closed_and_comes_back_when_used(clock, client):
    a, b = v3("a"), v3("b", auth_key="x" * 8)
    cancelled(client.get(target(credential=a), [SYS_OBJECT_ID]))
    d = client.get(target(credential=b), [SYS_OBJECT_ID])
    assert client.engines == 2
    clock.advance(client.idle_close + 1)  # a request in flight keeps it open however long
    assert client.engines == 2 and not d.called
    cancelled(d)
    extra = clock.ports[-1]
    clock.advance(client.idle_close - 1)
    assert client.engines == 2
    clock.advance(2)
    assert client.engines == 1 and not extra.listening
    # the first engine is never closed for idleness
    clock.advance(10 * client.idle_close)
    assert client.engines == 1 and clock.ports[0].listening
    # the keys register again when used again
    cancelled(client.get(target(credential=b), [SYS_OBJECT_ID]))
    assert client.engines == 2 and clock.ports[-1].listening
    client.close()
    assert clock.getDelayedCalls() == []
    assert not any(p.listening for p in clock.ports)


def test_dispatcher_ticks_only_with_transports_and_close_leaves_nothing(clock, client):
    assert not client.dispatcher.ticking
    d = client.get(target(), [SYS_OBJECT_ID])
    assert client.dispatcher.ticking
    before = client.dispatcher.get_timer_ticks()
    clock.advance(0.5)
    clock.advance(0.5)
    assert client.dispatcher.get_timer_ticks() > before
    client.close()
    failure_of(d, CancelledError)
    assert not client.dispatcher.ticking
    assert clock.getDelayedCalls() == []
    assert not clock.ports[0].listening


def test_transport_contract():
    clock = UdpClock()
    dispatcher = TwistedDispatcher(clock)
    transport = UdpTransport(clock).open_client_mode()
    assert UdpTransport.is_compatible_with_dispatcher(dispatcher)
    got = []
    transport.register_callback(lambda t, addr, data: got.append((addr, data)))
    transport.send_message(b"x", ("127.0.0.1", 161))
    assert clock.ports[0].written == [(b"x", ("127.0.0.1", 161))]
    transport.datagramReceived(b"y", ("127.0.0.1", 161))
    assert got == [(("127.0.0.1", 161), b"y")]
    transport.close_transport()
    assert not clock.ports[0].listening


# ---------------------------------------------------------------- real agent


@pytest.fixture(scope="module")
def agent():
    if SKIP:
        pytest.skip(SKIP)
    with SnmpAgent(pdus=False, ipv6=_has_ipv6_loopback()) as a:
        yield a


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def live():
    c = SnmpClient(global_reactor, timeout=1.0, retries=1)
    yield c
    c.close()


def on(agent: SnmpAgent, name: str, **kw: Any) -> SnmpTarget:
    return SnmpTarget(kw.pop("host", agent.host), agent.credentials()[name], port=agent.port, **kw)


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_v2c_set_and_get_back(agent, live):
    t = on(agent, "v2c")
    await live.set(t, [(BENCH_OID, 1234)])
    assert await live.get(t, [BENCH_OID]) == [VarBind(BENCH_OID, 1234)]
    [(oid, value)] = await live.get(on(agent, "v2c", version="1"), [SYS_OBJECT_ID])
    assert value == agent.sys_object_id


@needs_snmpd
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("user", ["roller-priv", "roller-sha512", "roller-auth", "roller-noauth"])
async def test_v3_security_levels_set_and_get(agent, live, user):
    t = on(agent, user)
    await live.set(t, [(BENCH_OID, len(user))])
    assert (await live.get(t, [BENCH_OID]))[0].value == len(user)


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_read_only_community_cannot_set(agent, live):
    t = on(agent, "v2c-ro")
    assert (await live.get(t, [SYS_OBJECT_ID]))[0].value == agent.sys_object_id
    with pytest.raises(SnmpErrorStatus) as e:
        await live.set(t, [(BENCH_OID, 1)])
    assert e.value.status in ("noAccess", "notWritable", "authorizationError")


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_wrong_community_is_a_clear_timeout_without_the_secret(agent, live):
    wrong = Credential(name="pdu-legacy", kind="snmp-community", community="not-the-community")
    t = SnmpTarget(agent.host, wrong, port=agent.port)
    with pytest.raises(SnmpTimeout) as e:
        await live.set(t, [(BENCH_OID, 1)], timeout=0.3, retries=1)
    message = str(e.value)
    assert "2 attempts" in message and "wrong write community" in message
    assert "'pdu-legacy'" in message and "not-the-community" not in message


@needs_snmpd
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("change, expect", [
    ({"auth_key": "wrong-auth-key"}, "wrong digest"),
    # net-snmp drops what it cannot decrypt: a timeout that says so
    ({"priv_key": "wrong-priv-key"}, "wrong privacy key"),
    ({"user": "nobody"}, "unknown user name"),
])
async def test_wrong_v3_credentials_are_clear_errors_without_secrets(agent, live, change, expect):
    good = agent.credentials()["roller-priv"]
    fields = dict(user=good.user, auth_protocol="SHA", auth_key=good.auth_key, priv_protocol="AES",
                  priv_key=good.priv_key)
    fields.update(change)
    bad = Credential(name="pdu-v3", kind="snmp-v3", **fields)
    with pytest.raises((SnmpAuthError, SnmpTimeout)) as e:
        await live.get(SnmpTarget(agent.host, bad, port=agent.port), [SYS_OBJECT_ID], timeout=0.5)
    message = str(e.value)
    if "priv_key" in change:
        assert isinstance(e.value, SnmpTimeout), message
    else:
        assert isinstance(e.value, SnmpAuthError), message
    assert expect in message and "'pdu-v3'" in message
    for secret in bad.secret_values() | good.secret_values():
        assert secret not in message


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_an_agent_that_never_answers_times_out_after_every_attempt(live):
    with SilentAgent() as silent:
        t = SnmpTarget(silent.host, COMMUNITY, port=silent.port)
        with pytest.raises(SnmpTimeout) as e:
            await live.get(t, [SYS_OBJECT_ID], timeout=0.2, retries=2)
        assert e.value.attempts == 3
        assert silent.received() == 3
        assert idle(live)


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_cancelling_a_live_request(live):
    with SilentAgent() as silent:
        d = live.set(SnmpTarget(silent.host, COMMUNITY, port=silent.port), [(BENCH_OID, 1)],
                     timeout=5.0)
        d.cancel()
        with pytest.raises(CancelledError):
            await d
        assert idle(live)


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_ipv6_and_host_names(agent, live):
    if not agent.ipv6:
        pytest.skip("no IPv6 loopback here")
    t6 = on(agent, "roller-priv", host="::1")
    await live.set(t6, [(BENCH_OID, 66)])
    assert (await live.get(t6, [BENCH_OID]))[0].value == 66
    by_name = on(agent, "v2c", host="localhost")
    assert (await live.get(by_name, [BENCH_OID]))[0].value == 66


@needs_snmpd
@pytest_twisted.ensureDeferred
async def test_concurrent_requests_on_one_engine(agent, live):
    from twisted.internet.defer import gatherResults

    creds = ["v2c", "roller-priv", "roller-auth"]
    ds = [live.get(on(agent, creds[i % 3]), [SYS_OBJECT_ID]) for i in range(60)]
    results = await gatherResults(ds)
    assert {r[0].value for r in results} == {agent.sys_object_id}
    assert idle(live)
