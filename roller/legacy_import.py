"""
Plan the import of the legacy inventory files into L{Machine}s.

Three legacy shapes are understood (see L{detect_format}):

  - C{ipmi}: C{ipmi.json}, host IPs to C{{"ipmi": {...}}} plus a C{types}
    table.  An entry with C{user}/C{password} is a BMC at that IP; an entry
    with C{ip}/C{addr} is a Moonshot cartridge behind the chassis BMC at
    C{ip}, reached by bridging (the type's C{args} plus C{map[addr]}).
  - C{xen}: C{xen.json}, FQDNs to C{{"xen_uuid": ...}}.
  - C{worker_config}: the old C{WORKER_CONFIG}, C{{"servers": {short host:
    {ssh, pdu, ipmi, xen, bug_cc, fqdn?, ip?}}, "types": ...,
    "snmp_community_string": ...}}.

Everything here is pure: L{plan_import} reads nothing and writes nothing.
It returns an L{ImportPlan} saying, per entry of the file, what would
happen (C{imported}, C{updated}, C{unchanged}, C{rejected}, C{skipped}) and
why, plus the L{Credential}s the imported machines refer to.  The caller
(API or CLI) shows the plan and, if asked, stores the machines and merges
the credentials into the secrets file (L{roller.secrets.Secrets.merged}).

Secret values (IPMI passwords, the SNMP community) go only into the plan's
credentials; entry reasons and L{ImportPlan.to_json} never contain them.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Iterable, Mapping
from typing import Any

from attrs import field, frozen
from attrs.validators import in_

from roller.errors import BadRequest, ValidationError
from roller.inventory import WORKER_ID_RE, Machine
from roller.secrets import Credential

FORMATS = ("ipmi", "xen", "worker_config")
ACTIONS = ("imported", "updated", "unchanged", "rejected", "skipped")
DEFAULT_GROUP = "legacy"
PDU_CREDENTIAL = "snmp-legacy"
LEGACY_PDU_MODEL = "sentry3"
ACCESS_SECTIONS = ("ssh", "ipmi", "pdu", "redfish", "xen")

# Keys whose values are secrets wherever they occur in a legacy file; their
# values are masked in every reason as a last line of defence.
_SECRET_KEYS = frozenset({"password", "passphrase", "community", "snmp_community_string",
                          "auth_key", "priv_key", "token", "secret"})
_CRED_NAME_BAD = re.compile(r"[^-_.0-9a-zA-Z]")


def _typename(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


class ImportFormatError(BadRequest):
    """The data as a whole is not a legacy inventory file roller understands."""

    code = "bad_import_format"


@frozen
class ImportEntry:
    """
    What happens to one entry of the legacy file.

    @ivar source_key: the entry's key in the file.
    @ivar action: one of L{ACTIONS}.
    @ivar reason: readable explanation; never holds a secret.
    @ivar machine: the machine as it will be stored (C{imported},
        C{updated}), as it is (C{unchanged}), else C{None}.
    """

    source_key: str
    action: str = field(validator=in_(ACTIONS))
    reason: str
    machine: Machine | None = None

    def to_json(self) -> dict:
        return {
            "source_key": self.source_key,
            "action": self.action,
            "reason": self.reason,
            "machine": None if self.machine is None else self.machine.to_json(),
        }


@frozen
class ImportPlan:
    """
    The outcome of L{plan_import}.

    @ivar entries: one per entry of the file, in file order.
    @ivar credentials: by name, the credentials that the non-rejected
        entries refer to, to be merged into the secrets file.
    @ivar format: the legacy format (one of L{FORMATS}).
    @ivar group: the worker group new machines go into.
    @ivar notes: remarks about the file as a whole (ignored parts).
    """

    entries: tuple[ImportEntry, ...]
    credentials: dict[str, Credential]
    format: str = ""
    group: str = DEFAULT_GROUP
    notes: tuple[str, ...] = ()

    def counts(self) -> dict[str, int]:
        """Number of entries per action (every action present, maybe 0)."""
        counts = dict.fromkeys(ACTIONS, 0)
        for entry in self.entries:
            counts[entry.action] += 1
        return counts

    def summary(self) -> str:
        """One line: counts per action and the number of credentials."""
        counts = ", ".join(f"{n} {action}" for action, n in self.counts().items())
        return f"{counts}; {len(self.credentials)} credential(s)"

    def machines(self) -> tuple[Machine, ...]:
        """The machines to store: those of C{imported} and C{updated} entries."""
        return tuple(e.machine for e in self.entries
                     if e.action in ("imported", "updated") and e.machine is not None)

    def to_json(self) -> dict:
        """The plan for the API/CLI; names credentials, never shows their values."""
        return {
            "format": self.format,
            "group": self.group,
            "summary": self.summary(),
            "counts": self.counts(),
            "entries": [e.to_json() for e in self.entries],
            "credentials": [self.credentials[n].public_json() for n in sorted(self.credentials)],
            "notes": list(self.notes),
        }


def detect_format(data: Any) -> str:
    """
    Which legacy format C{data} (parsed JSON) is in.

    @return: C{"ipmi"}, C{"xen"} or C{"worker_config"}.
    @raise ImportFormatError: none of them, with a readable reason.
    """
    if not isinstance(data, Mapping):
        raise ImportFormatError(f"a legacy inventory file holds a JSON object, got {_typename(data)}")
    if "servers" in data:
        return "worker_config"
    if not data:
        raise ImportFormatError("the file is an empty object: nothing to import")
    entries = [v for k, v in data.items() if k != "types"]
    has_ipmi = any(isinstance(v, Mapping) and "ipmi" in v for v in entries)
    has_xen = any(isinstance(v, Mapping) and "xen_uuid" in v for v in entries)
    if has_ipmi and has_xen:
        raise ImportFormatError("the file mixes ipmi.json entries ({\"ipmi\": ...}) and xen.json entries "
                                "({\"xen_uuid\": ...}); import them as separate files")
    if has_ipmi or ("types" in data and not has_xen):
        return "ipmi"
    if has_xen:
        return "xen"
    raise ImportFormatError(
        "not a known legacy inventory format: expected ipmi.json ({\"<ip>\": {\"ipmi\": {...}}, "
        "\"types\": {...}}), xen.json ({\"<fqdn>\": {\"xen_uuid\": \"...\"}}) or a WORKER_CONFIG "
        "({\"servers\": {...}})"
    )


def plan_import(
    data: Any,
    existing: Mapping[tuple[str, str], Machine],
    group: str = DEFAULT_GROUP,
    *,
    format: str | None = None,
) -> ImportPlan:
    """
    Plan importing the legacy inventory C{data} (parsed JSON).

    New machines go into worker group C{group}.  An entry whose machine
    already exists in C{existing} (keyed by C{(worker_group, worker_id)}) —
    same worker id in C{group}, or same IP or FQDN in any group — is merged
    into it: the access settings from the file replace the matching fields
    of the existing ones (other fields, e.g. an SSH port or a Xen pool URL,
    are kept), C{bug_cc} addresses are added, and a missing FQDN or IP is
    filled in; the existing worker id, group and address are never changed.

    @param format: force a format instead of L{detect_format}.
    @raise ImportFormatError: the file as a whole is unusable.
    @raise ValidationError: C{group} is not a valid worker group.
    """
    if not isinstance(group, str) or not WORKER_ID_RE.match(group):
        raise ValidationError("worker_group", f"{str(group)[:80]!r} is not a valid worker group")
    existing = existing or {}
    if format is None:
        format = detect_format(data)
    elif format not in FORMATS:
        raise ImportFormatError(f"unknown format {str(format)[:40]!r}; expected one of {', '.join(FORMATS)}")
    elif not isinstance(data, Mapping):
        raise ImportFormatError(f"a legacy inventory file holds a JSON object, got {_typename(data)}")
    candidates, notes = _PARSERS[format](data)
    entries, credentials = _Planner(existing, group, _secret_strings(data)).run(candidates)
    return ImportPlan(entries=tuple(entries), credentials=credentials, format=format,
                      group=group, notes=tuple(notes))


# -- candidates: what each entry of the file asks for, before looking at the inventory


class _Reject(Exception):
    """The entry cannot be imported; the message says why."""


@frozen
class _Candidate:
    """
    One entry of the file, parsed.

    @ivar machine_json: input for L{Machine.from_json} (without the group),
        or C{None} for an entry that is skipped.
    @ivar skip_reason: why the entry is skipped, if it is.
    @ivar reject_reason: why the entry is rejected, if it is.
    """

    source_key: str
    machine_json: dict | None = None
    credentials: dict[str, Credential] = field(factory=dict)
    notes: tuple[str, ...] = ()
    skip_reason: str | None = None
    reject_reason: str | None = None


def _rejected(key: str, reason: str) -> _Candidate:
    return _Candidate(source_key=key, reject_reason=reason)


def _identity(key: str) -> dict[str, str]:
    """
    Worker id and address from an entry key.

    An IP gives worker id C{10-49-58-3} and that IP; a dotted host name
    gives its first label and that FQDN; anything else is the worker id.
    """
    try:
        ip = ipaddress.ip_address(key)
    except ValueError:
        pass
    else:
        return {"worker_id": re.sub(r"[.:]", "-", str(ip)), "ip": str(ip)}
    if "." in key.rstrip("."):
        return {"worker_id": key.split(".")[0], "fqdn": key}
    return {"worker_id": key}


def _normal_host(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value.lower().rstrip(".")


def _credential_name(prefix: str, what: str) -> str:
    return f"{prefix}-{_CRED_NAME_BAD.sub('-', what)}"[:128]


def _ignored(where: str, section: Mapping, known: Iterable[str]) -> tuple[str, ...]:
    extra = sorted(str(k) for k in set(section) - set(known))
    if not extra:
        return ()
    prefix = f"{where} field(s)" if where else "field(s)"
    return (f"ignored {prefix}: {', '.join(extra)}",)


def _opt_string(section: Mapping, key: str, where: str) -> str | None:
    value = section.get(key)
    if value is not None and not isinstance(value, str):
        raise _Reject(f"{where}.{key}: must be a string, got {_typename(value)}")
    return value


def _string(section: Mapping, key: str, where: str) -> str:
    value = _opt_string(section, key, where)
    if not value:
        raise _Reject(f"{where}.{key}: is required")
    return value


def _types_notes(types: Mapping) -> list[str]:
    with_commands = sorted(str(n) for n, t in types.items() if isinstance(t, Mapping) and "commands" in t)
    if not with_commands:
        return []
    return [f"ignored the 'commands' table of IPMI type(s) {', '.join(with_commands)}: it maps task "
            "names to ipmitool arguments and holds no per-machine data"]


def _types(data: Mapping) -> Mapping:
    types = data.get("types", {})
    if types is None:
        return {}
    if not isinstance(types, Mapping):
        raise ImportFormatError(f"'types' must be an object, got {_typename(types)}")
    return types


# -- IPMI: BMCs, chassis and cartridges (shared by ipmi.json and WORKER_CONFIG)


@frozen
class _Bmc:
    """A BMC with credentials found in the file (possibly a chassis)."""

    source_key: str
    host: str
    type_name: str | None
    credential: Credential


class _Ipmi:
    """
    Resolve the C{ipmi} sections of a file.

    Call L{add} for every entry first, then L{resolve} per entry.
    """

    def __init__(self, types: Mapping):
        self.types = types
        self.bmcs: dict[str, _Bmc | str] = {}  # host -> BMC, or why its entry is unusable
        self.children: dict[str, int] = {}  # chassis host -> number of cartridges naming it

    @staticmethod
    def is_cartridge(section: Mapping) -> bool:
        return "addr" in section

    def add(self, key: str, section: Any, own_host: str) -> None:
        """Register the BMC or cartridge of entry C{key}."""
        if not isinstance(section, Mapping):
            return
        if self.is_cartridge(section):
            parent = section.get("ip")
            if isinstance(parent, str):
                parent = _normal_host(parent)
                self.children[parent] = self.children.get(parent, 0) + 1
            return
        try:
            bmc = self._bmc(key, section, own_host)
        except _Reject as e:
            ip = section.get("ip")
            host = ip if isinstance(ip, str) else own_host
            self.bmcs.setdefault(_normal_host(host), str(e))
        else:
            self.bmcs.setdefault(bmc.host, bmc)

    def _bmc(self, key: str, section: Mapping, own_host: str) -> _Bmc:
        user = _string(section, "user", "ipmi")
        password = _string(section, "password", "ipmi")
        type_name = _opt_string(section, "type", "ipmi")
        host = _normal_host(_opt_string(section, "ip", "ipmi") or own_host)
        if type_name is not None:
            self._type(type_name)
        name = _credential_name("ipmi", host)
        try:
            cred = Credential(name=name, kind="password", username=user, password=password)
        except ValidationError as e:
            raise _Reject(e.message) from None
        return _Bmc(source_key=key, host=host, type_name=type_name, credential=cred)

    def _type(self, name: str) -> Mapping:
        t = self.types.get(name)
        if t is None:
            known = ", ".join(sorted(map(str, self.types))) or "none"
            raise _Reject(f"ipmi.type: unknown IPMI type {name[:40]!r} (known: {known})")
        if not isinstance(t, Mapping):
            raise _Reject(f"IPMI type {name[:40]!r} must be an object, got {_typename(t)}")
        return t

    def is_chassis(self, host: str) -> bool:
        """Whether the BMC at C{host} is a chassis: cartridges name it and its type maps them."""
        bmc = self.bmcs.get(host)
        if not isinstance(bmc, _Bmc) or not self.children.get(host) or bmc.type_name is None:
            return False
        return isinstance(self.types.get(bmc.type_name), Mapping) and bool(self.types[bmc.type_name].get("map"))

    def resolve(self, key: str, section: Any, own_host: str) -> tuple[dict, Credential, tuple[str, ...]]:
        """
        The C{ipmi} JSON for a machine, its credential and notes.

        @raise _Reject: the section is unusable.
        """
        if not isinstance(section, Mapping):
            raise _Reject(f"ipmi: must be an object, got {_typename(section)}")
        if self.is_cartridge(section):
            return self._cartridge(section)
        bmc = self._bmc(key, section, own_host)
        ipmi = {"host": bmc.host, "credential": bmc.credential.name, "bridge": []}
        return ipmi, bmc.credential, _ignored("ipmi", section, ("user", "password", "type", "ip"))

    def _cartridge(self, section: Mapping) -> tuple[dict, Credential, tuple[str, ...]]:
        addr = _string(section, "addr", "ipmi")
        parent = section.get("ip")
        if not isinstance(parent, str) or not parent:
            raise _Reject("ipmi.ip: a cartridge (ipmi.addr) needs the IP of its chassis BMC")
        parent = _normal_host(parent)
        bmc = self.bmcs.get(parent)
        if bmc is None:
            raise _Reject(f"ipmi.ip: chassis BMC {parent} is not in the file (no entry with its user and password)")
        if isinstance(bmc, str):
            raise _Reject(f"ipmi.ip: the entry of chassis BMC {parent} is unusable ({bmc})")
        type_name = _opt_string(section, "type", "ipmi") or bmc.type_name
        if type_name is None:
            raise _Reject(f"ipmi: chassis BMC {parent} has no IPMI type, so cartridge {addr[:40]!r} cannot be bridged")
        bridge = self._bridge(type_name, addr)
        ipmi = {"host": bmc.host, "credential": bmc.credential.name, "bridge": bridge}
        return ipmi, bmc.credential, _ignored("ipmi", section, ("ip", "addr", "type"))

    def _bridge(self, type_name: str, addr: str) -> list[str]:
        t = self._type(type_name)
        mapping = t.get("map")
        if not isinstance(mapping, Mapping) or not mapping:
            raise _Reject(f"ipmi.addr: IPMI type {type_name[:40]!r} has no cartridge map")
        if addr not in mapping:
            known = ", ".join(sorted(map(str, mapping)))
            raise _Reject(f"ipmi.addr: unknown cartridge address {addr[:40]!r} for IPMI type "
                          f"{type_name[:40]!r} (known: {known})")
        return _tokens(t.get("args"), f"IPMI type {type_name[:40]!r} args") + _tokens(
            mapping[addr], f"IPMI type {type_name[:40]!r} map[{addr[:40]!r}]")


def _tokens(value: Any, what: str) -> list[str]:
    """Split C{["-B 0", "-b 7"]} (or C{"-B 0 -b 7"}) into separate arguments."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _Reject(f"{what}: must be a list of strings")
    return [token for v in value for token in v.split()]


# -- the three formats


def _parse_ipmi(data: Mapping) -> tuple[list[_Candidate], list[str]]:
    types = _types(data)
    ipmi = _Ipmi(types)
    entries = [(str(k), v) for k, v in data.items() if k != "types"]
    for key, value in entries:
        if isinstance(value, Mapping):
            ipmi.add(key, value.get("ipmi"), key)
    candidates = []
    for key, value in entries:
        if not isinstance(value, Mapping):
            candidates.append(_rejected(key, f"entry must be an object, got {_typename(value)}"))
            continue
        if "ipmi" not in value:
            candidates.append(_rejected(key, "entry has no 'ipmi' section"))
            continue
        try:
            section, cred, notes = ipmi.resolve(key, value["ipmi"], key)
        except _Reject as e:
            candidates.append(_rejected(key, str(e)))
            continue
        notes = _ignored("", value, ("ipmi",)) + notes
        if ipmi.is_chassis(section["host"]) and not ipmi.is_cartridge(value["ipmi"]):
            candidates.append(_chassis(key, ipmi, section["host"], cred, notes))
            continue
        candidates.append(_Candidate(source_key=key, machine_json={**_identity(key), "ipmi": section},
                                     credentials={cred.name: cred}, notes=notes))
    return candidates, _types_notes(types)


def _chassis(key: str, ipmi: _Ipmi, host: str, cred: Credential, notes: tuple[str, ...]) -> _Candidate:
    n = ipmi.children[host]
    reason = f"chassis BMC for {n} cartridge{'s' if n != 1 else ''}; credential stored as {cred.name}"
    return _Candidate(source_key=key, credentials={cred.name: cred}, notes=notes, skip_reason=reason)


def _parse_xen(data: Mapping) -> tuple[list[_Candidate], list[str]]:
    candidates = []
    for key, value in data.items():
        key = str(key)
        if not isinstance(value, Mapping):
            candidates.append(_rejected(key, f"entry must be an object, got {_typename(value)}"))
            continue
        if "xen_uuid" not in value:
            candidates.append(_rejected(key, "xen_uuid: is required"))
            continue
        candidates.append(_Candidate(
            source_key=key,
            machine_json={**_identity(key), "xen": {"vm_uuid": value["xen_uuid"]}},
            notes=_ignored("", value, ("xen_uuid",)),
        ))
    return candidates, []


_SERVER_FIELDS = ("ssh", "pdu", "ipmi", "xen", "bug_cc", "fqdn", "ip")
_WORKER_CONFIG_KEYS = ("servers", "types", "snmp_community_string")


def _parse_worker_config(data: Mapping) -> tuple[list[_Candidate], list[str]]:
    servers = data["servers"]
    if not isinstance(servers, Mapping):
        raise ImportFormatError(f"'servers' must be an object, got {_typename(servers)}")
    types = _types(data)
    community = data.get("snmp_community_string")
    if community is not None and not isinstance(community, str):
        raise ImportFormatError(f"'snmp_community_string' must be a string, got {_typename(community)}")
    snmp = None
    if community:
        snmp = Credential(name=PDU_CREDENTIAL, kind="snmp-community", community=community)
    notes = _types_notes(types)
    extra = sorted(str(k) for k in set(data) - set(_WORKER_CONFIG_KEYS))
    if extra:
        notes.append(f"ignored top-level key(s): {', '.join(extra)}")

    ipmi = _Ipmi(types)
    entries = [(str(k), v) for k, v in servers.items()]
    for key, server in entries:
        if isinstance(server, Mapping) and server.get("ipmi") is not None:
            ipmi.add(key, server["ipmi"], _own_host(key, server))
    candidates = []
    for key, server in entries:
        try:
            candidates.append(_server(key, server, ipmi, snmp))
        except _Reject as e:
            candidates.append(_rejected(key, str(e)))
    return candidates, notes


def _own_host(key: str, server: Mapping) -> str:
    """Where a server's own BMC is when its ipmi section names none: its IP, FQDN or name."""
    for name in ("ip", "fqdn"):
        if isinstance(server.get(name), str) and server[name]:
            return server[name]
    return key


def _server(key: str, server: Any, ipmi: _Ipmi, snmp: Credential | None) -> _Candidate:
    """One WORKER_CONFIG server entry."""
    if not isinstance(server, Mapping):
        raise _Reject(f"entry must be an object, got {_typename(server)}")
    machine: dict[str, Any] = {**_identity(key)}
    for name in ("fqdn", "ip"):
        if server.get(name) is not None:
            machine[name] = server[name]
    if server.get("bug_cc") is not None:
        machine["bug_cc"] = server["bug_cc"]
    creds: dict[str, Credential] = {}
    notes = list(_ignored("", server, _SERVER_FIELDS))

    if server.get("ssh") is not None:
        machine["ssh"], cred, more = _ssh(server["ssh"])
        if cred is not None:
            creds[cred.name] = cred
        notes += more
    if server.get("pdu") is not None:
        machine["pdu"] = _pdu(server["pdu"], snmp)
        if snmp is not None:
            creds[snmp.name] = snmp
        else:
            notes.append("the file has no snmp_community_string: the PDU has no credential")
    if server.get("xen") is not None:
        xen = server["xen"]
        if not isinstance(xen, Mapping):
            raise _Reject(f"xen: must be an object, got {_typename(xen)}")
        machine["xen"] = {"vm_uuid": xen.get("xen_uuid", xen.get("vm_uuid"))}
        notes += _ignored("xen", xen, ("xen_uuid", "vm_uuid"))
    if server.get("ipmi") is not None:
        section, cred, ipmi_notes = ipmi.resolve(key, server["ipmi"], _own_host(key, server))
        creds[cred.name] = cred
        notes += ipmi_notes
        others = [n for n in ("ssh", "pdu", "xen") if server.get(n) is not None]
        if not others and not ipmi.is_cartridge(server["ipmi"]) and ipmi.is_chassis(section["host"]):
            return _chassis(key, ipmi, section["host"], cred, tuple(notes))
        machine["ipmi"] = section
    return _Candidate(source_key=key, machine_json=machine, credentials=creds, notes=tuple(notes))


def _ssh(ssh: Any) -> tuple[dict, Credential | None, list[str]]:
    """C{{"user", "key_file"}} -> SSH access and an C{ssh-key} credential."""
    if not isinstance(ssh, Mapping):
        raise _Reject(f"ssh: must be an object, got {_typename(ssh)}")
    out = {k: ssh[k] for k in ("user", "port") if ssh.get(k) is not None}
    key_file = _opt_string(ssh, "key_file", "ssh")
    cred = None
    if key_file:
        stem = posixpath.splitext(posixpath.basename(key_file.rstrip("/")))[0] or "key"
        try:
            cred = Credential(name=_credential_name("ssh", stem), kind="ssh-key", path=key_file)
        except ValidationError as e:
            raise _Reject(e.message) from None
        out["credential"] = cred.name
    return out, cred, list(_ignored("ssh", ssh, ("user", "port", "key_file")))


def _pdu(pdu: Any, snmp: Credential | None) -> dict:
    """C{"pdu1.example.com:AA8"} -> PDU access (Sentry3, the legacy community)."""
    if not isinstance(pdu, str) or ":" not in pdu:
        shown = repr(pdu[:80]) if isinstance(pdu, str) else _typename(pdu)
        raise _Reject(f"pdu: must be 'host:outlet' (e.g. 'pdu1.example.com:AA8'), got {shown}")
    host, outlet = pdu.rsplit(":", 1)
    out = {"host": host, "outlet": outlet, "model": LEGACY_PDU_MODEL}
    if snmp is not None:
        out["credential"] = snmp.name
    return out


_PARSERS = {"ipmi": _parse_ipmi, "xen": _parse_xen, "worker_config": _parse_worker_config}


# -- deciding each entry against the inventory


def _secret_strings(data: Any) -> set[str]:
    """Every value under a secret-looking key anywhere in C{data}."""
    found: set[str] = set()
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            for k, v in item.items():
                if k in _SECRET_KEYS and isinstance(v, str) and v:
                    found.add(v)
                else:
                    stack.append(v)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')


def _redact(text: str, secrets: set[str]) -> str:
    """
    Mask C{secrets} inside the quoted values of C{text}.

    Reasons are built from field names and validated, non-secret values;
    any value echoed from the file (here or by L{Machine.from_json}) is
    quoted with C{repr}.  So only the quoted parts are searched: a secret
    that happens to be a plain word (a placeholder password "password")
    must not mangle field names in the message.
    """
    forms = sorted({f for s in secrets for f in (s, repr(s)[1:-1]) if f}, key=len, reverse=True)

    def mask(match: re.Match) -> str:
        quoted = match.group(0)
        for form in forms:
            quoted = quoted.replace(form, "***")
        return quoted

    return _QUOTED.sub(mask, text) if forms else text


class _Planner:
    """Decide each candidate against the existing inventory."""

    def __init__(self, existing: Mapping[tuple[str, str], Machine], group: str, secrets: set[str]):
        self.existing = existing
        self.group = group
        self.secrets = secrets
        self.by_ip: dict[str, list[Machine]] = {}
        self.by_fqdn: dict[str, list[Machine]] = {}
        for machine in existing.values():
            if machine.ip:
                self.by_ip.setdefault(machine.ip, []).append(machine)
            if machine.fqdn:
                self.by_fqdn.setdefault(_normal_host(machine.fqdn), []).append(machine)
        self.claimed: dict[tuple[str, str], str] = {}  # machine key -> source key
        self.credentials: dict[str, Credential] = {}
        self.cred_source: dict[str, str] = {}

    def run(self, candidates: list[_Candidate]) -> tuple[list[ImportEntry], dict[str, Credential]]:
        entries = [self._entry(c) for c in candidates]
        return entries, self.credentials

    def _entry(self, c: _Candidate) -> ImportEntry:
        try:
            action, reason, machine = self._decide(c)
            self._take_credentials(c)
        except _Reject as e:
            action, reason, machine = "rejected", str(e), None
        else:
            if machine is not None:
                self.claimed[machine.key] = c.source_key
            reason = "; ".join((reason, *c.notes))
        return ImportEntry(source_key=c.source_key, action=action,
                           reason=_redact(reason, self.secrets), machine=machine)

    def _decide(self, c: _Candidate) -> tuple[str, str, Machine | None]:
        if c.reject_reason is not None:
            raise _Reject(c.reject_reason)
        if c.skip_reason is not None:
            return "skipped", c.skip_reason, None
        assert c.machine_json is not None  # only a skipped or rejected entry has none
        data = {**c.machine_json, "worker_group": self.group}
        try:
            imported = Machine.from_json(data)
        except ValidationError as e:
            raise _Reject(e.message) from None
        current, how = self._match(imported)
        if current is None:
            self._check_unclaimed(imported.key)
            return "imported", f"new machine {_show(imported.key)}", imported
        self._check_unclaimed(current.key)
        merged, changed, kept = _merge(current, data, imported)
        matched = "" if how == "worker id" else f" (matched by {how})"
        if not changed:
            return "unchanged", f"existing {_show(current.key)}{matched} already has these settings", current
        reason = f"merged into existing {_show(current.key)}{matched}: changed {', '.join(changed)}"
        return "updated", "; ".join((reason, *kept)), merged

    def _match(self, imported: Machine) -> tuple[Machine | None, str]:
        """The existing machine the import is about, and how it was matched."""
        current = self.existing.get(imported.key)
        if current is not None:
            return current, "worker id"
        found: dict[tuple[str, str], tuple[Machine, str]] = {}
        if imported.ip:
            for m in self.by_ip.get(imported.ip, ()):
                found.setdefault(m.key, (m, f"ip {imported.ip}"))
        if imported.fqdn:
            for m in self.by_fqdn.get(_normal_host(imported.fqdn), ()):
                found.setdefault(m.key, (m, f"fqdn {imported.fqdn}"))
        if len(found) > 1:
            names = ", ".join(_show(k) for k in sorted(found))
            raise _Reject(f"matches several existing machines by ip/fqdn: {names}; import it by hand")
        if found:
            return next(iter(found.values()))
        return None, ""

    def _check_unclaimed(self, key: tuple[str, str]) -> None:
        if key in self.claimed:
            raise _Reject(f"machine {_show(key)} is already planned from entry {self.claimed[key]!r}")

    def _take_credentials(self, c: _Candidate) -> None:
        """Add the entry's credentials to the plan, refusing different values under one name."""
        for name, cred in c.credentials.items():
            if name in self.credentials and self.credentials[name] != cred:
                raise _Reject(f"credential {name} is already defined differently by entry "
                              f"{self.cred_source[name]!r}")
        for name, cred in c.credentials.items():
            self.credentials.setdefault(name, cred)
            self.cred_source.setdefault(name, c.source_key)


def _show(key: tuple[str, str]) -> str:
    return f"{key[0]}/{key[1]}"


def _merge(current: Machine, data: Mapping, imported: Machine) -> tuple[Machine, list[str], list[str]]:
    """
    Merge the imported settings into C{current}.

    @param data: the imported JSON, saying which fields the file set.
    @return: the merged machine, the names of the changed fields and notes
        about file values that were not taken.
    """
    merged = current.to_json()
    kept = []
    for name in ACCESS_SECTIONS:
        if data.get(name) is not None:
            merged[name] = {**(merged.get(name) or {}), **data[name]}
    for name in ("fqdn", "ip"):
        new, old = getattr(imported, name), getattr(current, name)
        if new is not None and old is None:
            merged[name] = new
        elif new is not None and new != old:
            kept.append(f"kept the existing {name} {old} (the file has {new})")
    merged["bug_cc"] = list(current.bug_cc) + [a for a in imported.bug_cc if a not in current.bug_cc]
    try:
        machine = Machine.from_json(merged)
    except ValidationError as e:
        raise _Reject(f"merging into {_show(current.key)}: {e.message}") from None
    changed = [name for name in sorted(Machine.FIELDS) if getattr(machine, name) != getattr(current, name)]
    return machine, changed, kept
