"""
Fast paths for the BER encoding and decoding of SNMPv1/v2c messages
inside pysnmp's engine.

pysnmp's community security model (C{pysnmp.proto.secmod.rfc2576})
serializes every outgoing v1/v2c message with pyasn1's generic BER
encoder, and its v1/v2c message processing model
(C{pysnmp.proto.mpmod.rfc2576}) parses every incoming one with pyasn1's
generic decoder: together about 40% of roller's CPU per SNMP request.

  - L{encode} produces the same bytes as pyasn1 for the shapes SNMP
    messages have (a C{Message} of version, community and one PDU of three
    INTEGERs and a list of (OID, value) varbinds, values being INTEGERs,
    OCTET STRINGs, NULLs with one tag, or OIDs);
  - L{decode} builds the same pyasn1 objects as pyasn1's decoder does
    with the engine's message spec (the same C{clone}s of the same spec
    components, set the same way), for definite-length messages made of
    SEQUENCEs, SEQUENCE OFs, untagged CHOICEs, INTEGERs, primitive OCTET
    STRINGs, NULLs and OIDs that span the whole datagram.

Anything else (another shape, an option, a component not set, malformed
or unusual bytes) goes to pyasn1 itself, so errors and unusual messages
behave exactly as before.  The engine still builds, caches, matches and
checks every message itself: only the (de)serialization of its message
objects is faster.

L{install} makes the two pysnmp modules use them (once per process, like
the engine itself).
"""

from __future__ import annotations

from typing import Any

from pyasn1.codec.ber import decoder as _ber_decoder
from pyasn1.codec.ber import encoder as _ber_encoder
from pyasn1.type import tag as _tag
from pyasn1.type import tagmap, univ
from pysnmp.proto import rfc1157, rfc1901, rfc1905
from twisted.logger import Logger

__all__ = ["PINNED", "decode", "encode", "install"]

log = Logger()

_pyasn1_encode = _ber_encoder.encode
_pyasn1_decode = _ber_decoder.decode


class _Unsupported(Exception):
    """Not a shape the fast path knows: pyasn1 encodes it."""


_MESSAGES = frozenset((rfc1157.Message, rfc1901.Message))
_PDUS = frozenset((
    rfc1157.GetRequestPDU, rfc1157.GetNextRequestPDU, rfc1157.GetResponsePDU,
    rfc1157.SetRequestPDU,
    rfc1905.GetRequestPDU, rfc1905.GetNextRequestPDU, rfc1905.ResponsePDU,
    rfc1905.SetRequestPDU, rfc1905.GetBulkRequestPDU, rfc1905.InformRequestPDU,
    rfc1905.SNMPv2TrapPDU, rfc1905.ReportPDU,
))
_VARBIND_LISTS = frozenset((rfc1157.VarBindList, rfc1905.VarBindList))
_VARBINDS = frozenset((rfc1157.VarBind, rfc1905.VarBind))

#: OID value tuples -> their BER TLV (pyasn1's own encoding); bounded.
_oids: dict[tuple, bytes] = {}
_OID_CACHE_SIZE = 4096


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def _tlv(head: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((head, n)) + content
    return bytes((head,)) + _length(n) + content


def _integer(v: int) -> bytes:
    """pyasn1's INTEGER contents, byte for byte (zero is one octet; a
    negative whose bit length is a multiple of 8 gets a sign octet more
    than DER would give it)."""
    if v == 0:
        return b"\x00"
    bits = v.bit_length()
    if bits % 8 == 0:
        bits += 1
    return v.to_bytes((bits + 7) // 8, "big", signed=True)


def _tag_octet(tag_set: Any, constructed: bool) -> int:
    """The one identifier octet of a single-tag, low-tag-number type."""
    key = (tag_set, constructed)
    found = _tags.get(key)
    if found is None:
        found = _tags[key] = _make_tag_octet(tag_set, constructed)
    return found


_tags: dict[tuple, int] = {}


def _make_tag_octet(tag_set: Any, constructed: bool) -> int:
    if len(tag_set) != 1:
        raise _Unsupported
    t = tag_set[0]
    if t.tagId >= 31:
        raise _Unsupported
    return t.tagClass | (_tag.tagFormatConstructed if constructed else _tag.tagFormatSimple) | t.tagId


def _leaf(value: Any) -> bytes:
    """One simple value's TLV."""
    if not value.isValue or isinstance(value, (univ.Boolean, univ.Any)):  # own encoders
        raise _Unsupported
    if isinstance(value, univ.Integer):
        return _tlv(_tag_octet(value.tagSet, False), _integer(int(value)))
    if isinstance(value, univ.OctetString):
        return _tlv(_tag_octet(value.tagSet, False), value.asOctets())
    if isinstance(value, univ.Null):
        return bytes((_tag_octet(value.tagSet, False), 0))
    if type(value) is univ.ObjectIdentifier or isinstance(value, univ.ObjectIdentifier):
        if len(value.tagSet) != 1 or value.tagSet != univ.ObjectIdentifier.tagSet:
            raise _Unsupported
        return _oid(value)
    raise _Unsupported


def _oid(value: Any) -> bytes:
    key = value.asTuple()
    found = _oids.get(key)
    if found is None:
        found = _pyasn1_encode(univ.ObjectIdentifier(key))
        if len(_oids) >= _OID_CACHE_SIZE:
            _oids.clear()
        _oids[key] = found
    return found


def _component(value: Any, index: int) -> Any:
    """
    The component set at C{index}, without pyasn1's recursive C{isValue}
    check (C{getComponentByPosition(..., instantiate=False)}) and without
    instantiating anything: what is not set, or not a value, is found at
    the leaves (L{_leaf}) or by the CHOICE accessors, and then pyasn1
    encodes (and reports) it.  Should pyasn1's storage ever change, the
    AttributeError sends every message to pyasn1.
    """
    values = value._componentValues
    if values is univ.noValue or index >= len(values):
        raise _Unsupported
    component = values[index]
    if component is univ.noValue:
        raise _Unsupported
    return component


def _varbind(varbind: Any) -> bytes:
    if type(varbind) not in _VARBINDS or len(varbind) != 2:
        raise _Unsupported
    name = _component(varbind, 0)
    if type(name) is not univ.ObjectIdentifier and not isinstance(name, univ.ObjectIdentifier):
        raise _Unsupported
    value = _component(varbind, 1)
    if isinstance(value, univ.Choice):
        if value.tagSet or value.getName(innerFlag=True) == "":
            raise _Unsupported
        value = value.getComponent(innerFlag=True)
        if isinstance(value, univ.Choice):
            raise _Unsupported
    return _tlv(0x30, _oid(name) + _leaf(value))


def _pdu(pdu: Any) -> bytes:
    if type(pdu) not in _PDUS or len(pdu) != 4:
        raise _Unsupported
    varbinds = _component(pdu, 3)
    if type(varbinds) not in _VARBIND_LISTS:
        raise _Unsupported
    parts = [_leaf(_component(pdu, 0)), _leaf(_component(pdu, 1)), _leaf(_component(pdu, 2))]
    count = len(varbinds)
    if not count and not varbinds.isValue:  # never set: pyasn1 says what is wrong
        raise _Unsupported
    # A missing element is noValue, which _varbind refuses.
    body = b"".join([_varbind(_component(varbinds, i)) for i in range(count)])
    parts.append(_tlv(0x30, body))
    return _tlv(_tag_octet(pdu.tagSet, True), b"".join(parts))


def _message(msg: Any) -> bytes:
    if len(msg) != 3:
        raise _Unsupported
    pdus = _component(msg, 2)
    if not isinstance(pdus, univ.Choice) or pdus.tagSet or pdus.getName() == "":
        raise _Unsupported
    return _tlv(0x30, _leaf(_component(msg, 0)) + _leaf(_component(msg, 1))
                + _pdu(pdus.getComponent()))


def encode(value: Any, **options: Any) -> bytes:
    """
    pyasn1's C{encoder.encode}, faster for SNMPv1/v2c messages (same
    bytes); everything else, and any option, goes to pyasn1.
    """
    if not options and type(value) in _MESSAGES:
        try:
            return _message(value)
        except _Unsupported:
            pass
        except Exception:  # noqa: BLE001 -- anything odd: pyasn1 decides, errors included
            pass
    return _pyasn1_encode(value, **options)


# -- decoding

_SEQUENCE_ID = univ.Sequence.typeId
_SEQUENCE_OF_ID = univ.SequenceOf.typeId
_CHOICE_ID = univ.Choice.typeId
_INTEGER_ID = univ.Integer.typeId
_OCTET_STRING_ID = univ.OctetString.typeId
_NULL_ID = univ.Null.typeId
_OID_ID = univ.ObjectIdentifier.typeId

#: identifier octet -> TagSet, as pyasn1's decoder makes it (short tags).
_tag_sets: dict[int, Any] = {}
#: OID contents -> value tuple (decoded by pyasn1 once); bounded.
_oid_values: dict[bytes, tuple] = {}


def _tag_set(octet: int) -> Any:
    found = _tag_sets.get(octet)
    if found is None:
        if octet & 0x1F == 0x1F:
            raise _Unsupported
        found = _tag_sets[octet] = _tag.TagSet(
            (), _tag.Tag(tagClass=octet & 0xC0, tagFormat=octet & 0x20, tagId=octet & 0x1F))
    return found


def _header(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(identifier octet, contents start, contents end) of the TLV at pos."""
    if pos + 2 > end:
        raise _Unsupported
    octet = data[pos]
    first = data[pos + 1]
    if first < 0x80:
        start, length = pos + 2, first
    else:
        size = first & 0x7F
        if not 1 <= size <= 4 or pos + 2 + size > end:  # indefinite, huge or short
            raise _Unsupported
        start = pos + 2 + size
        length = int.from_bytes(data[pos + 2:start], "big")
    stop = start + length
    if stop > end:
        raise _Unsupported
    return octet, start, stop


def _decode_tlv(data: bytes, pos: int, end: int, spec: Any) -> tuple[Any, int]:
    octet, start, stop = _header(data, pos, end)
    return _decode_value(data, start, stop, spec, octet, _tag_set(octet)), stop


def _plain(spec: Any) -> bool:
    """A SEQUENCE pyasn1 decodes component by component, in order."""
    types = spec.componentType
    return bool(types) and not types.hasOptionalOrDefault and not types.hasOpenTypes


def _decode_value(data: bytes, start: int, stop: int, spec: Any, octet: int, tag_set: Any) -> Any:
    # pyasn1's SingleItemDecoder: pick the spec for this tag...
    if spec.__class__ is tagmap.TagMap:
        chosen = spec.presentTypes.get(tag_set)
        if chosen is None:
            raise _Unsupported
    elif tag_set == spec.tagSet or tag_set in spec.tagMap:
        chosen = spec
    else:
        raise _Unsupported
    # ... and decode with the payload decoder of its type.
    type_id = chosen.typeId
    constructed = octet & 0x20
    if type_id == _INTEGER_ID:
        if constructed or isinstance(chosen, univ.Boolean):
            raise _Unsupported
        return chosen.clone(int.from_bytes(data[start:stop], "big", signed=True))
    if type_id == _OCTET_STRING_ID:
        if constructed:
            raise _Unsupported
        return chosen.clone(data[start:stop])
    if type_id == _NULL_ID:
        if constructed or stop != start:
            raise _Unsupported
        return chosen.clone("")
    if type_id == _OID_ID:
        if constructed:
            raise _Unsupported
        return chosen.clone(_oid_value(data[start:stop]))
    if type_id == _CHOICE_ID:
        obj = chosen.clone()
        if obj.tagSet == tag_set:  # an explicitly tagged CHOICE: not in SNMP
            raise _Unsupported
        component = _decode_value(data, start, stop, obj.componentTagMap, octet, tag_set)
        obj.setComponentByType(component.effectiveTagSet, component, verifyConstraints=False,
                               matchTags=False, matchConstraints=False, innerFlag=False)
        return obj
    if type_id == _SEQUENCE_ID:
        if not constructed or not _plain(chosen):
            raise _Unsupported
        obj = chosen.clone()
        obj.clear()
        types = chosen.componentType
        count = len(types)
        idx, pos = 0, start
        while pos < stop:
            if idx >= count:
                raise _Unsupported
            component, pos = _decode_tlv(data, pos, stop, types[idx].asn1Object)
            obj.setComponentByPosition(idx, component, verifyConstraints=False,
                                       matchTags=False, matchConstraints=False)
            idx += 1
        if idx != count:  # a required component missing
            raise _Unsupported
        return obj
    if type_id == _SEQUENCE_OF_ID:
        if not constructed:
            raise _Unsupported
        obj = chosen.clone()
        obj.clear()
        item = chosen.componentType
        idx, pos = 0, start
        while pos < stop:
            component, pos = _decode_tlv(data, pos, stop, item)
            obj.setComponentByPosition(idx, component, verifyConstraints=False,
                                       matchTags=False, matchConstraints=False)
            idx += 1
        return obj
    raise _Unsupported


def _oid_value(contents: bytes) -> tuple:
    found = _oid_values.get(contents)
    if found is None:
        # pyasn1's own OID decoding (and its checks), once per OID.
        value, rest = _pyasn1_decode(bytes((6,)) + _length(len(contents)) + contents,
                                     asn1Spec=univ.ObjectIdentifier())
        if rest:
            raise _Unsupported
        found = value.asTuple()
        if len(_oid_values) >= _OID_CACHE_SIZE:
            _oid_values.clear()
        _oid_values[contents] = found
    return found


def decode(substrate: Any, asn1Spec: Any = None, **options: Any) -> tuple[Any, bytes]:
    """
    pyasn1's C{decoder.decode}, faster for SNMPv1/v2c messages decoded
    with the engine's message spec (the same objects); everything else,
    and any option, goes to pyasn1.
    """
    if not options and type(asn1Spec) in _MESSAGES and type(substrate) is bytes:
        try:
            octet, start, stop = _header(substrate, 0, len(substrate))
            if stop == len(substrate):
                return _decode_value(substrate, start, stop, asn1Spec, octet, _tag_set(octet)), b""
        except _Unsupported:
            pass
        except Exception:  # noqa: BLE001 -- anything odd: pyasn1 decides, errors included
            pass
    return _pyasn1_decode(substrate, asn1Spec=asn1Spec, **options)


class _Decoder:
    """Stands in for the C{pyasn1.codec.ber.decoder} module in pysnmp's
    v1/v2c message processing model."""

    decode = staticmethod(decode)

    def __getattr__(self, name: str) -> Any:
        return getattr(_ber_decoder, name)


class _Encoder:
    """Stands in for the C{pyasn1.codec.ber.encoder} module in pysnmp's
    community security model."""

    encode = staticmethod(encode)

    def __getattr__(self, name: str) -> Any:
        return getattr(_ber_encoder, name)


#: The private names of pysnmp and pyasn1 the fast paths rely on, as
#: C{(module, name)}: L{roller.drivers.snmp.client} swaps the first (its
#: version peek), L{install} the next two, and L{_component} reads the
#: last one on every pyasn1 SEQUENCE it encodes.  Checked against
#: pysnmp 7.1 and pyasn1 0.6 (setup.py caps both); if one changes, the fast
#: path it serves is not installed (or falls back to pyasn1 for every
#: message) and L{install} logs a warning saying which.
PINNED = (
    ("pysnmp.proto.api.verdec", "decode_message_version"),
    ("pysnmp.proto.secmod.rfc2576", "encoder"),
    ("pysnmp.proto.mpmod.rfc2576", "decoder"),
    ("pyasn1.type.univ.SequenceAndSetBase", "_componentValues"),
)

#: The storage attribute L{_component} reads (the last of L{PINNED}).
_STORAGE_ATTRIBUTE = "_componentValues"

_warned: set[str] = set()


def warn_not_installed(what: str, why: str) -> None:
    """Log (once per process) that the fast path C{what} is not in use, and C{why}."""
    if what not in _warned:
        _warned.add(what)
        log.warn("SNMP fast path {what} is not in use: {why}; pyasn1 does that work (slower, same results). "
                 "Check roller.drivers.snmp.ber.PINNED against the installed pysnmp and pyasn1.",
                 what=what, why=why)


def swap(module: Any, name: str, original: Any, stand_in: type, what: str) -> bool:
    """
    Replace C{module.name}, which must be C{original}, by a C{stand_in()};
    whether the stand-in is in place.  A name that is missing or holds
    something else (the library changed) is left alone, with a warning
    (once per process).
    """
    current = getattr(module, name, None)
    if isinstance(current, stand_in):
        return True
    if current is not original:
        found = "missing" if current is None else f"not {getattr(original, '__name__', original)!s}"
        warn_not_installed(what, f"{module.__name__}.{name} is {found}")
        return False
    setattr(module, name, stand_in())
    return True


def component_storage_ok() -> bool:
    """
    Whether pyasn1 still keeps a SEQUENCE's components where L{_component}
    reads them; if not, every message goes to pyasn1's encoder (with a
    warning, once per process).
    """
    probe = rfc1905.VarBind()
    probe.setComponentByPosition(0, univ.ObjectIdentifier((1, 3)))
    if isinstance(getattr(probe, _STORAGE_ATTRIBUTE, None), list):
        return True
    warn_not_installed("encode", f"pyasn1 SEQUENCEs have no {_STORAGE_ATTRIBUTE} list")
    return False


def install() -> bool:
    """
    Make pysnmp's v1/v2c security model serialize with L{encode} and its
    v1/v2c message processing model parse with L{decode}; whether both
    are in place and usable.  What cannot be installed is logged as a
    warning (see L{PINNED}).
    """
    from pysnmp.proto.mpmod import rfc2576 as mpmod
    from pysnmp.proto.secmod import rfc2576 as secmod

    encoding = swap(secmod, "encoder", _ber_encoder, _Encoder, "encode") and component_storage_ok()
    decoding = swap(mpmod, "decoder", _ber_decoder, _Decoder, "decode")
    return encoding and decoding
