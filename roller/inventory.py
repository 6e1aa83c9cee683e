"""
The machine inventory model.

A L{Machine} is identified by its Taskcluster C{worker_id} and
C{worker_group}; the rest says how to reach it.  Each access method is its
own small frozen class.  Credentials are referenced by name only: the
secrets live in the secrets file (L{roller.secrets}).

Everything is parsed and validated once, at the edge, by
L{Machine.from_json}; the rest of roller trusts a L{Machine}.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from attrs import asdict, evolve, field, frozen

from roller.errors import ValidationError

WORKER_ID_RE = re.compile(r"^[-_0-9a-zA-Z]{1,128}$")
CREDENTIAL_RE = re.compile(r"^[-_.0-9a-zA-Z]{1,128}$")
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([0-9A-Za-z_]([-0-9A-Za-z_]{0,61}[0-9A-Za-z])?)"
    r"(\.[0-9A-Za-z_]([-0-9A-Za-z_]{0,61}[0-9A-Za-z])?)*\.?$"
)
TAG_RE = re.compile(r"^[-_.:/0-9a-zA-Z]{1,64}$")
EMAIL_RE = re.compile(r"^[^@\s,]{1,64}@[^@\s,]{1,255}$")
#: One ipmitool bridging argument (-B/-b/-T/-t or a value), e.g. a Moonshot cartridge's.
BRIDGE_ARG_RE = re.compile(r"^(-[BbTt]|0x[0-9a-fA-F]{1,2}|[0-9]{1,3})$")
SSH_USER_RE = re.compile(r"^[-_.a-zA-Z0-9]{1,64}$")
#: A PDU outlet: its number, after up to two letters of tower and infeed (Sentry3 "AA8").
OUTLET_RE = re.compile(r"^[A-Za-z]{0,2}[0-9]{1,4}$")
REDFISH_URL_RE = re.compile(r"^https?://[^\s/]+(/\S*)?$")
XEN_URL_RE = re.compile(r"^https?://\S+$")
VM_UUID_RE = re.compile(r"^[-_.0-9a-zA-Z]{1,128}$")
REBOOT_METHODS = (
    "ssh_reboot",
    "ipmi_reset",
    "ipmi_cycle",
    "snmp_reboot",
    "redfish_reboot",
    "xenapi_reboot",
    "file_bugzilla_bug",
)
PDU_MODELS = (
    "auto",
    "sentry3",
    "sentry4",
    "apc_rpdu",
    "apc_masterswitch",
    "raritan",
    "cyberpower",
    "baytech",
    "eaton",
)
NOTES_MAX = 4000


def valid_worker_id(value: str) -> bool:
    return isinstance(value, str) and WORKER_ID_RE.fullmatch(value) is not None


# -- small field parsers: each takes (path, value) and returns the clean value


def _str(path: str, value: Any, pattern: re.Pattern | None = None, what: str = "") -> str:
    if not isinstance(value, str):
        raise ValidationError(path, f"must be a string, got {_typename(value)}")
    if pattern is not None and not pattern.fullmatch(value):
        raise ValidationError(path, f"{what or 'value'} {value[:80]!r} is not valid")
    return value


def _opt_str(path, value, pattern=None, what=""):
    return None if value is None else _str(path, value, pattern, what)


def _host(path: str, value: Any) -> str:
    value = _str(path, value)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not HOSTNAME_RE.fullmatch(value):
        raise ValidationError(path, f"{value[:80]!r} is neither an IP address nor a host name")
    return value.lower()


def _opt_host(path, value):
    return None if value is None else _host(path, value)


def _ip(path: str, value: Any) -> str | None:
    if value is None:
        return None
    value = _str(path, value)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValidationError(path, f"{value[:80]!r} is not an IP address") from None


def _port(path: str, value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValidationError(path, f"must be a port number 1-65535, got {value!r}")
    return value


def _number(path: str, value: Any, default: float, low: float, high: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValidationError(path, f"must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _credential(path: str, value: Any) -> str | None:
    return _opt_str(path, value, CREDENTIAL_RE, "credential name")


def _choice(path: str, value: Any, choices: tuple, default: str | None = None) -> str:
    if value is None and default is not None:
        return default
    if value not in choices:
        raise ValidationError(path, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _str_list(path: str, value: Any, pattern: re.Pattern, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValidationError(path, f"must be a list of strings, got {_typename(value)}")
    return tuple(_str(f"{path}[{i}]", v, pattern, what) for i, v in enumerate(value))


def _typename(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _section(path: str, data: Any, known: set[str]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ValidationError(path, f"must be an object, got {_typename(data)}")
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValidationError(path, f"unknown field(s): {', '.join(map(str, unknown))}")
    return data


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None and v != () and v != ""}


# -- access methods


@frozen
class SshAccess:
    user: str | None = None
    port: int = 22
    credential: str | None = None
    host_key_policy: str | None = None  # None: the global policy

    @classmethod
    def from_json(cls, path: str, data: Any) -> SshAccess:
        d = _section(path, data, {"user", "port", "credential", "host_key_policy"})
        return cls(
            user=_opt_str(f"{path}.user", d.get("user"), SSH_USER_RE, "user name"),
            port=_port(f"{path}.port", d.get("port"), 22),
            credential=_credential(f"{path}.credential", d.get("credential")),
            host_key_policy=None if d.get("host_key_policy") is None
            else _choice(f"{path}.host_key_policy", d.get("host_key_policy"), ("strict", "accept-new")),
        )


@frozen
class IpmiAccess:
    host: str
    port: int = 623
    credential: str | None = None
    interface: str = "lanplus"
    # Extra ipmitool bridging arguments, e.g. ("-B", "0", "-b", "7", "-T", "0x82", "-t", "0x72")
    # for a Moonshot cartridge behind its chassis BMC.
    bridge: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, path: str, data: Any) -> IpmiAccess:
        d = _section(path, data, {"host", "port", "credential", "interface", "bridge"})
        bridge = d.get("bridge") or ()
        if not isinstance(bridge, (list, tuple)) or not all(
            isinstance(a, str) and BRIDGE_ARG_RE.fullmatch(a) for a in bridge
        ):
            raise ValidationError(f"{path}.bridge",
                                  "must be a list of ipmitool bridge arguments (-B/-b/-T/-t and values)")
        return cls(
            host=_host(f"{path}.host", d.get("host")),
            port=_port(f"{path}.port", d.get("port"), 623),
            credential=_credential(f"{path}.credential", d.get("credential")),
            interface=_choice(f"{path}.interface", d.get("interface"), ("lanplus", "lan"), "lanplus"),
            bridge=tuple(bridge),
        )


@frozen
class PduAccess:
    host: str
    outlet: str
    model: str = "auto"
    port: int = 161
    credential: str | None = None

    @classmethod
    def from_json(cls, path: str, data: Any) -> PduAccess:
        d = _section(path, data, {"host", "outlet", "model", "port", "credential"})
        outlet = d.get("outlet")
        if isinstance(outlet, int) and not isinstance(outlet, bool):
            outlet = str(outlet)
        return cls(
            host=_host(f"{path}.host", d.get("host")),
            outlet=_str(f"{path}.outlet", outlet, OUTLET_RE, "outlet"),
            model=_choice(f"{path}.model", d.get("model"), PDU_MODELS, "auto"),
            port=_port(f"{path}.port", d.get("port"), 161),
            credential=_credential(f"{path}.credential", d.get("credential")),
        )


@frozen
class RedfishAccess:
    url: str
    system: str | None = None
    credential: str | None = None
    ca_file: str | None = None
    verify_tls: bool = True

    @classmethod
    def from_json(cls, path: str, data: Any) -> RedfishAccess:
        d = _section(path, data, {"url", "system", "credential", "ca_file", "verify_tls"})
        url = _str(f"{path}.url", d.get("url"), REDFISH_URL_RE, "URL")
        verify = d.get("verify_tls", True)
        if not isinstance(verify, bool):
            raise ValidationError(f"{path}.verify_tls", "must be true or false")
        return cls(
            url=url,
            system=_opt_str(f"{path}.system", d.get("system")),
            credential=_credential(f"{path}.credential", d.get("credential")),
            ca_file=_opt_str(f"{path}.ca_file", d.get("ca_file")),
            verify_tls=verify,
        )


@frozen
class XenAccess:
    vm_uuid: str
    url: str | None = None
    credential: str | None = None

    @classmethod
    def from_json(cls, path: str, data: Any) -> XenAccess:
        d = _section(path, data, {"vm_uuid", "url", "credential"})
        return cls(
            vm_uuid=_str(f"{path}.vm_uuid", d.get("vm_uuid"), VM_UUID_RE, "VM uuid"),
            url=_opt_str(f"{path}.url", d.get("url"), XEN_URL_RE, "URL"),
            credential=_credential(f"{path}.credential", d.get("credential")),
        )


@frozen
class Liveness:
    method: str = "icmp"
    port: int | None = None

    @classmethod
    def from_json(cls, path: str, data: Any) -> Liveness:
        d = _section(path, data, {"method", "port"})
        method = _choice(f"{path}.method", d.get("method"), ("icmp", "tcp"), "icmp")
        port = d.get("port")
        if method == "tcp":
            port = _port(f"{path}.port", port, 22)
        elif port is not None:
            raise ValidationError(f"{path}.port", "only applies to the tcp method")
        return cls(method=method, port=port)


#: the access sections of a machine, by key, and their parsers
_ACCESS: dict[str, Callable[[str, Any], Any]] = {  # Any: each goes to its own Machine field
    "ssh": SshAccess.from_json,
    "ipmi": IpmiAccess.from_json,
    "pdu": PduAccess.from_json,
    "redfish": RedfishAccess.from_json,
    "xen": XenAccess.from_json,
}


@frozen
class Machine:
    worker_id: str
    worker_group: str
    fqdn: str | None = None
    ip: str | None = None
    pool: str | None = None
    tags: tuple[str, ...] = ()
    ssh: SshAccess | None = None
    ipmi: IpmiAccess | None = None
    pdu: PduAccess | None = None
    redfish: RedfishAccess | None = None
    xen: XenAccess | None = None
    liveness: Liveness = field(factory=Liveness)
    reboot_methods: tuple[str, ...] | None = None
    bug_cc: tuple[str, ...] = ()
    notes: str = ""

    FIELDS = frozenset(
        {"worker_id", "worker_group", "fqdn", "ip", "pool", "tags", "liveness",
         "reboot_methods", "bug_cc", "notes", *_ACCESS}
    )

    @property
    def key(self) -> tuple[str, str]:
        return (self.worker_group, self.worker_id)

    @property
    def address(self) -> str | None:
        """Where to reach the machine itself: its IP, else its host name."""
        return self.ip or self.fqdn

    @property
    def short_name(self) -> str:
        return (self.fqdn or self.worker_id).split(".")[0]

    @classmethod
    def from_json(cls, data: Any, *, worker_id: str | None = None, worker_group: str | None = None) -> Machine:
        """
        Parse and validate a machine from its JSON form.

        C{worker_id} and C{worker_group}, when given (from the URL), fill in
        or must agree with the body.
        """
        d = dict(_section("", data, set(cls.FIELDS)))
        for name, given in (("worker_id", worker_id), ("worker_group", worker_group)):
            if given is not None:
                if d.get(name) is not None and d[name] != given:
                    raise ValidationError(name, f"{d[name]!r} does not match the URL ({given!r})")
                d[name] = given
            if d.get(name) is None:
                raise ValidationError(name, "is required")
            _str(name, d[name], WORKER_ID_RE, name.replace("_", " "))
        reboot = d.get("reboot_methods")
        if reboot is not None:
            reboot = _str_list("reboot_methods", reboot, re.compile(r"^[a-z_]{1,32}$"), "method")
            for i, m in enumerate(reboot):
                _choice(f"reboot_methods[{i}]", m, REBOOT_METHODS)
        notes = d.get("notes") or ""
        if not isinstance(notes, str) or len(notes) > NOTES_MAX:
            raise ValidationError("notes", f"must be a string of at most {NOTES_MAX} characters")
        access = {
            name: None if d.get(name) is None else parse(name, d[name])
            for name, parse in _ACCESS.items()
        }
        return cls(
            worker_id=d["worker_id"],
            worker_group=d["worker_group"],
            fqdn=_opt_host("fqdn", d.get("fqdn")),
            ip=_ip("ip", d.get("ip")),
            pool=_opt_str("pool", d.get("pool"), TAG_RE, "pool"),
            tags=_str_list("tags", d.get("tags"), TAG_RE, "tag"),
            liveness=Liveness() if d.get("liveness") is None else Liveness.from_json("liveness", d["liveness"]),
            reboot_methods=reboot,
            bug_cc=_str_list("bug_cc", d.get("bug_cc"), EMAIL_RE, "e-mail address"),
            notes=notes,
            **access,
        )

    def to_json(self) -> dict:
        """The JSON form; the inverse of L{from_json}.  Holds no secrets."""

        def clean(inst: Any) -> Any:
            return _drop_none(asdict(inst, recurse=False, value_serializer=_listify))

        out: dict[str, Any] = {
            "worker_id": self.worker_id,
            "worker_group": self.worker_group,
            "fqdn": self.fqdn,
            "ip": self.ip,
            "pool": self.pool,
            "tags": list(self.tags),
            "liveness": clean(self.liveness),
            "reboot_methods": None if self.reboot_methods is None else list(self.reboot_methods),
            "bug_cc": list(self.bug_cc),
            "notes": self.notes,
        }
        for name in _ACCESS:
            value = getattr(self, name)
            out[name] = None if value is None else clean(value)
        return out

    def replace(self, **changes: Any) -> Machine:
        return evolve(self, **changes)

    def credentials(self) -> set[str]:
        """Names of every credential this machine refers to."""
        return {
            cred
            for name in _ACCESS
            if (access := getattr(self, name)) is not None
            and (cred := getattr(access, "credential", None))
        }


def _listify(inst: Any, attribute: Any, value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


