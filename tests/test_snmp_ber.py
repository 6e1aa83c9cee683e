"""
Tests for L{roller.drivers.snmp.ber}: the fast SNMPv1/v2c BER paths must
give exactly what pyasn1 gives (bytes when encoding; the same pyasn1
objects, or the same error, when decoding), for valid and damaged input.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from pyasn1.codec.ber import decoder, encoder
from pyasn1.type import univ
from pysnmp.proto import rfc1902, rfc1905
from pysnmp.proto.api import v1, v2c

from roller.drivers.snmp import ber
from roller.drivers.snmp.client import SnmpClient

V2C_PDUS = [v2c.GetRequestPDU, v2c.SetRequestPDU, v2c.ResponsePDU, v2c.GetNextRequestPDU,
            v2c.GetBulkRequestPDU, v2c.InformRequestPDU, v2c.TrapPDU, v2c.ReportPDU]
V1_PDUS = [v1.GetRequestPDU, v1.SetRequestPDU, v1.GetResponsePDU, v1.GetNextRequestPDU]
V2_ONLY = (rfc1902.Counter64, rfc1902.Unsigned32, rfc1905.NoSuchObject, rfc1905.NoSuchInstance,
           rfc1905.EndOfMibView)


def _value(rnd: random.Random) -> Any:
    return rnd.choice([
        lambda: rfc1902.Integer32(rnd.randint(-2 ** 31, 2 ** 31 - 1)),
        lambda: rfc1902.Integer32(rnd.choice([0, 1, -1, 127, 128, -128, -129, 255, 256, -32768])),
        lambda: rfc1902.OctetString(rnd.randbytes(rnd.choice([0, 1, 5, 127, 128, 300]))),
        lambda: rfc1902.IpAddress("10.1.2.3"),
        lambda: rfc1902.Counter32(rnd.randint(0, 2 ** 32 - 1)),
        lambda: rfc1902.Gauge32(7),
        lambda: rfc1902.TimeTicks(12345),
        lambda: rfc1902.Counter64(rnd.randint(0, 2 ** 64 - 1)),
        lambda: rfc1902.Opaque(b"xx"),
        lambda: rfc1902.ObjectIdentifier("1.3.6.1.4.1.99999.1"),
        lambda: None,
        lambda: rfc1905.noSuchObject,
        lambda: rfc1905.noSuchInstance,
        lambda: rfc1905.endOfMibView,
        lambda: rfc1902.Unsigned32(4000000000),
        lambda: rfc1902.Bits("\x01"),
    ])()


def _messages(seed: int, count: int) -> list[tuple[Any, Any]]:
    rnd = random.Random(seed)
    out = []
    for api, pdus in ((v2c, V2C_PDUS), (v1, V1_PDUS)):
        for _ in range(count):
            pdu_class = rnd.choice(pdus)
            pdu = pdu_class()
            api.apiPDU.set_defaults(pdu)
            api.apiPDU.set_request_id(pdu, rnd.randint(0, 2 ** 31 - 1))
            if rnd.random() < 0.2 and pdu_class is not v2c.GetBulkRequestPDU:
                api.apiPDU.set_error_status(pdu, rnd.randint(0, 18))
                api.apiPDU.set_error_index(pdu, rnd.randint(0, 5))
            varbinds = []
            for i in range(rnd.choice([0, 1, 2, 5, 40])):
                oid = (1, 3, 6, 1, rnd.randint(0, 2 ** 32 - 1), rnd.randint(0, 200), i)
                value = _value(rnd)
                if api is v1 and isinstance(value, V2_ONLY):
                    value = None
                varbinds.append((rfc1902.ObjectName(oid), value))
            api.apiPDU.set_varbinds(pdu, varbinds)
            msg = api.Message()
            api.apiMessage.set_defaults(msg)
            api.apiMessage.set_community(msg, rnd.randbytes(rnd.choice([0, 6, 200])))
            api.apiMessage.set_pdu(msg, pdu)
            out.append((api, msg))
    return out


def _same(a: Any, b: Any, path: str = "msg") -> None:
    """Two pyasn1 objects are the same types, tags, constraints and values, all the way down."""
    assert type(a) is type(b), path
    assert a.tagSet == b.tagSet and a.isValue == b.isValue, path
    assert a.subtypeSpec == b.subtypeSpec, path
    if isinstance(a, univ.Choice):
        assert a.getName() == b.getName(), path
        _same(a.getComponent(), b.getComponent(), f"{path}.{a.getName()}")
    elif isinstance(a, (univ.SequenceAndSetBase, univ.SequenceOfAndSetOfBase)):
        assert len(a) == len(b), path
        for i in range(len(a)):
            _same(a.getComponentByPosition(i, instantiate=False),
                  b.getComponentByPosition(i, instantiate=False), f"{path}[{i}]")
    else:
        assert a == b and repr(a) == repr(b) and a.prettyPrint() == b.prettyPrint(), path
        assert getattr(a, "namedValues", None) == getattr(b, "namedValues", None), path


def _outcome(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        return e


def _check_decode(api: Any, data: bytes) -> bool:
    """pyasn1 and the fast path agree on C{data}; whether the fast path did it."""
    expected = _outcome(decoder.decode, data, asn1Spec=api.Message())
    got = _outcome(ber.decode, data, asn1Spec=api.Message())
    if isinstance(expected, Exception):
        assert type(got) is type(expected) and str(got) == str(expected), data.hex()
    else:
        assert not isinstance(got, Exception), (data.hex(), got)
        assert got[1] == expected[1], data.hex()
        _same(got[0], expected[0])
        assert encoder.encode(got[0]) == encoder.encode(expected[0])
    try:
        octet, start, stop = ber._header(data, 0, len(data))
        ber._decode_value(data, start, stop, api.Message(), octet, ber._tag_set(octet))
    except Exception:
        return False
    return stop == len(data)


def test_encode_gives_pyasn1s_bytes():
    fast = 0
    for _, msg in _messages(1, 200):
        assert ber.encode(msg) == encoder.encode(msg)
        try:
            ber._message(msg)
            fast += 1
        except ber._Unsupported:
            pass
    assert fast == 400  # every one of these took the fast path


def test_encode_leaves_everything_else_to_pyasn1():
    incomplete = v2c.Message()
    expected = _outcome(encoder.encode, incomplete)
    got = _outcome(ber.encode, incomplete)
    assert type(got) is type(expected) and str(got) == str(expected)
    # a v1 trap: another PDU shape
    msg = v1.Message()
    v1.apiMessage.set_defaults(msg)
    trap = v1.TrapPDU()
    v1.apiTrapPDU.set_defaults(trap)
    v1.apiMessage.set_pdu(msg, trap)
    assert ber.encode(msg) == encoder.encode(msg)
    # values with encoders of their own, set by hand into a varbind
    for value in (univ.Boolean(True), univ.Any(b"\x02\x01\x05"), univ.Enumerated(3)):
        pdu = v2c.SetRequestPDU()
        v2c.apiPDU.set_defaults(pdu)
        varbind = rfc1905.VarBind()
        varbind.setComponentByPosition(0, rfc1902.ObjectName("1.3.6.1.2.1.1.5.0"))
        varbind.setComponentByPosition(1, value, verifyConstraints=False, matchTags=False,
                                       matchConstraints=False)
        pdu.setComponentByPosition(3).getComponentByPosition(3).setComponentByPosition(
            0, varbind, verifyConstraints=False, matchTags=False, matchConstraints=False)
        msg2 = v2c.Message()
        v2c.apiMessage.set_defaults(msg2)
        v2c.apiMessage.set_pdu(msg2, pdu)
        expected = _outcome(encoder.encode, msg2)
        got = _outcome(ber.encode, msg2)
        assert type(got) is type(expected) and str(got) == str(expected), value
    # not a message, or options: pyasn1 as is
    assert ber.encode(rfc1902.Integer32(-128)) == encoder.encode(rfc1902.Integer32(-128))
    assert ber.encode(msg, defMode=False) == encoder.encode(msg, defMode=False)


def test_decode_builds_pyasn1s_objects():
    for api, msg in _messages(2, 200):
        assert _check_decode(api, encoder.encode(msg))


def test_decode_of_damaged_messages_matches_pyasn1():
    rnd = random.Random(3)
    fast = 0
    for api, msg in _messages(4, 80):
        data = encoder.encode(msg)
        for _ in range(8):
            damaged = bytearray(data)
            kind = rnd.random()
            if kind < 0.4:
                damaged[rnd.randrange(len(damaged))] = rnd.randrange(256)
            elif kind < 0.6:
                damaged = damaged[:rnd.randrange(len(damaged))]
            elif kind < 0.8:
                damaged += rnd.randbytes(rnd.randint(1, 3))
            else:
                del damaged[rnd.randrange(len(damaged))]
            fast += _check_decode(api, bytes(damaged))
    assert fast  # some damage still decodes, and then exactly as pyasn1 does


@pytest.mark.parametrize("data", [
    b"", b"\x30", b"\x30\x00", b"\x30\x80\x02\x01\x01\x00\x00", b"\x30\x03\x02\x01\x01",
    bytes.fromhex("302f020101040770726976617465a221020301e24002010002010030143012060d2b06010401"
                  "bf08ce0fce0f010002012a"),
    # the same answer with a 0x80 OID octet, a constructed INTEGER, a long-form length
    bytes.fromhex("302f020101040770726976617465a221020301e24002010002010030143012060d2b06010401"
                  "8008ce0fce0f010002012a"),
    bytes.fromhex("302f020101040770726976617465a221220301e24002010002010030143012060d2b06010401"
                  "bf08ce0fce0f010002012a"),
    bytes.fromhex("30812f020101040770726976617465a221020301e24002010002010030143012060d2b0601"
                  "0401bf08ce0fce0f010002012a"),
])
def test_decode_edge_cases_match_pyasn1(data):
    _check_decode(v2c, data)
    _check_decode(v1, data)


def test_decode_leaves_everything_else_to_pyasn1():
    data = encoder.encode(_messages(5, 1)[0][1])
    # not bytes: pyasn1's answer (here, its error)
    expected = _outcome(decoder.decode, bytearray(data), asn1Spec=v2c.Message())
    got = _outcome(ber.decode, bytearray(data), asn1Spec=v2c.Message())
    assert type(got) is type(expected) and str(got) == str(expected)
    got = ber.decode(data, asn1Spec=v2c.Message(), decodeOpenTypes=False)
    _same(got[0], decoder.decode(data, asn1Spec=v2c.Message())[0])
    assert ber.decode(encoder.encode(rfc1902.Integer32(5)))[0] == 5  # no spec


def test_the_client_installs_both_into_pysnmp():
    from pysnmp.proto.mpmod import rfc2576 as mpmod
    from pysnmp.proto.secmod import rfc2576 as secmod
    from twisted.internet.task import Clock

    SnmpClient(Clock())
    assert secmod.encoder.encode is ber.encode
    assert mpmod.decoder.decode is ber.decode
    assert secmod.encoder.Encoder is encoder.Encoder  # the rest is pyasn1's
    ber.install()  # idempotent
    assert mpmod.decoder.decode is ber.decode


def test_the_same_bytes_decode_per_spec():
    """The same bytes decoded with the v1 and the v2c message spec give
    each version's own types, every time, and always new objects."""
    for _, msg in _messages(6, 20):
        data = encoder.encode(msg)
        for api in (v2c, v1, v2c, v1):
            _check_decode(api, data)
    response = bytes.fromhex("302f020101040770726976617465a221020301e24002010002010030143012060d"
                             "2b06010401bf08ce0fce0f010002012a")
    first = ber.decode(response, asn1Spec=v2c.Message())[0]
    second = ber.decode(response, asn1Spec=v2c.Message())[0]
    _same(first, second)
    assert first is not second and first[2] is not second[2]
    v1_answer = ber.decode(response, asn1Spec=v1.Message())[0]
    _same(v1_answer, decoder.decode(response, asn1Spec=v1.Message())[0])
    assert type(v1.apiPDU.get_request_id(v1_answer[2].getComponent())) is not type(
        v2c.apiPDU.get_request_id(first[2].getComponent()))


# ------------------------------------------------------------ pinned internals


@pytest.fixture()
def warnings_logged(monkeypatch):
    """The warnings logged meanwhile (formatted), the once-per-process memory cleared."""
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    monkeypatch.setattr(ber, "_warned", set())
    seen: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_level") == LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_every_pinned_name_is_there():
    import importlib

    for module_name, name in ber.PINNED:
        module_path, _, owner = module_name.rpartition(".")
        if owner[:1].isupper():  # read on instances of that class
            assert isinstance(getattr(importlib.import_module(module_path), owner), type)
            assert name == ber._STORAGE_ATTRIBUTE and ber.component_storage_ok()
        else:
            assert hasattr(importlib.import_module(module_name), name), (module_name, name)
    assert ber.install() is True


@pytest.mark.parametrize("change", ["missing", "replaced"])
def test_install_warns_when_pysnmp_changed_the_encoder(monkeypatch, warnings_logged, change):
    from pysnmp.proto.secmod import rfc2576 as secmod

    if change == "missing":
        monkeypatch.delattr(secmod, "encoder")
    else:
        monkeypatch.setattr(secmod, "encoder", object())
    assert ber.install() is False
    assert len(warnings_logged) == 1
    assert "SNMP fast path encode is not in use" in warnings_logged[0]
    assert "pysnmp.proto.secmod.rfc2576.encoder is " + ("missing" if change == "missing" else "not") \
        in warnings_logged[0]
    ber.install()
    assert len(warnings_logged) == 1  # once per process


def test_install_warns_when_pysnmp_changed_the_decoder(monkeypatch, warnings_logged):
    from pysnmp.proto.mpmod import rfc2576 as mpmod

    monkeypatch.delattr(mpmod, "decoder")
    assert ber.install() is False
    assert ["pysnmp.proto.mpmod.rfc2576.decoder is missing" in w for w in warnings_logged] == [True]


def test_install_warns_when_pyasn1_moved_its_component_storage(monkeypatch, warnings_logged):
    monkeypatch.setattr(ber, "_STORAGE_ATTRIBUTE", "_noSuchStorage")
    assert ber.install() is False
    assert ["pyasn1 SEQUENCEs have no _noSuchStorage list" in w for w in warnings_logged] == [True]


def test_the_client_warns_when_the_version_peek_has_nothing_to_replace(monkeypatch, warnings_logged):
    from pysnmp.proto.api import verdec
    from twisted.internet.task import Clock

    monkeypatch.delattr(verdec, "decode_message_version")
    SnmpClient(Clock())
    assert ["verdec.decode_message_version is missing" in w for w in warnings_logged] == [True]
