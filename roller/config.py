"""
Settings: embedded defaults < TOML file < ROLLER_* environment < options.

Every key has a dotted name (C{queue.max_running}); its environment
variable is C{ROLLER_} plus the name upper-cased with dots as underscores
(C{ROLLER_QUEUE_MAX_RUNNING}).  A bad value raises L{ConfigError} naming
the key and the reason; the entry points print that one line and exit.

This module depends on nothing above it: names that other layers define
(task names, reboot methods) are checked by L{check_names}, which the entry
points call with them; endpoint strings are parsed here by Twisted's
strports rules (L{parse_endpoint}) and built into endpoints by the entry
points, on their reactor.
"""

from __future__ import annotations

import ipaddress
import json
import os
import string
import tomllib
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from attrs import field, frozen
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import getPlugins

from roller.jobs import State


class ConfigError(Exception):
    def __init__(self, key: str, reason: str, source: str = ""):
        where = f" (from {source})" if source else ""
        super().__init__(f"configuration error: {key}{where}: {reason}")
        self.key = key
        self.reason = reason


# -- value parsers: (raw value, from_text) -> clean value; raise ValueError(reason)


def _text(value: Any, from_text: bool) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _int(low: int, high: int | None = None) -> Callable[[Any, bool], int]:
    def parse(value: Any, from_text: bool) -> int:
        if from_text:
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {bound}, got {value}")
        return value

    parse.kind = f"integer {low}-{high}" if high is not None else f"integer >= {low}"  # type: ignore[attr-defined]
    return parse


def _float(low: float) -> Callable[[Any, bool], float]:
    def parse(value: Any, from_text: bool) -> float:
        if from_text:
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            raise ValueError(f"must be a number of at least {low:g}, got {value!r}")
        return float(value)

    parse.kind = f"number >= {low:g}"  # type: ignore[attr-defined]
    return parse


def _bool(value: Any, from_text: bool) -> bool:
    if from_text:
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"must be true or false, got {value!r}")
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _choice(*choices: str) -> Callable[[Any, bool], str]:
    def parse(value: Any, from_text: bool) -> str:
        if from_text:
            value = value.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    parse.kind = "one of " + ", ".join(choices)  # type: ignore[attr-defined]
    return parse


def _str_list(value: Any, from_text: bool) -> tuple[str, ...]:
    if from_text:
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a list of strings, got {value!r}")
    return tuple(value)


# -- Twisted server endpoint descriptions ("tcp:8000:interface=127.0.0.1")


@frozen
class EndpointDescription:
    """A strports description split by Twisted's rules: its type, positional and C{key=value} arguments."""

    kind: str
    args: tuple[str, ...]
    options: Mapping[str, str] = field(hash=False)


def parse_endpoint(desc: str) -> EndpointDescription:
    """
    Split C{desc} as L{twisted.internet.endpoints.serverFromString} documents
    it: C{:} separates arguments, the first C{=} of an argument makes it a
    keyword argument, a backslash takes the next character literally
    (C{interface=\\:\\:1}).
    """
    parts: list[list[str]] = [[""]]
    chars = iter(desc)
    for ch in chars:
        if ch == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError("ends with a lone backslash")
            parts[-1][-1] += escaped
        elif ch == ":":
            parts.append([""])
        elif ch == "=" and len(parts[-1]) == 1:
            parts[-1].append("")
        else:
            parts[-1][-1] += ch
    args = tuple(p[0] for p in parts[1:] if len(p) == 1)
    options = {p[0]: p[1] for p in parts[1:] if len(p) == 2}
    return EndpointDescription(kind=parts[0][0], args=args, options=options)


#: the arguments of Twisted's own server endpoint types, in positional order, and their defaults
_ENDPOINT_ARGS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "tcp": (("port", None), ("interface", ""), ("backlog", "50")),
    "tcp6": (("port", None), ("backlog", "50"), ("interface", "::")),
    "ssl": (("port", None), ("privateKey", "server.pem"), ("certKey", None), ("sslmethod", None),
            ("interface", ""), ("backlog", "50"), ("extraCertChain", None), ("dhParameters", None)),
    "unix": (("address", None), ("mode", "666"), ("backlog", "50"), ("lockfile", "1")),
}


def endpoint_arguments(d: EndpointDescription) -> dict[str, str | None]:
    """
    The named arguments of a C{tcp}, C{tcp6}, C{ssl} or C{unix} description,
    defaults filled in; ValueError(reason) for arguments the type does not take.
    """
    names = _ENDPOINT_ARGS[d.kind]
    if len(d.args) > len(names):
        raise ValueError(f"{d.kind} takes at most {len(names)} arguments")
    bound: dict[str, str | None] = dict(names)
    for (name, _), value in zip(names, d.args, strict=False):
        bound[name] = value
    for name, value in d.options.items():
        if name not in bound:
            raise ValueError(f"{d.kind} has no argument {name!r} (known: {', '.join(n for n, _ in names)})")
        if name in [n for n, _ in names][:len(d.args)]:
            raise ValueError(f"{name} is given twice")
        bound[name] = value
    if bound[names[0][0]] is None:
        raise ValueError(f"{d.kind} needs a {names[0][0]}")
    return bound


def _endpoint_kinds() -> set[str]:
    """Twisted's own server endpoint types and those its installed plugins add (C{systemd}, C{tls} ...)."""
    return set(_ENDPOINT_ARGS) | {p.prefix for p in getPlugins(IStreamServerEndpointStringParser)}


def _check_endpoint(desc: str) -> None:
    """ValueError(reason) unless C{desc} is a server endpoint string Twisted can build."""
    d = parse_endpoint(desc)
    if d.kind not in _ENDPOINT_ARGS:
        if d.kind not in _endpoint_kinds():
            raise ValueError(f"unknown endpoint type {d.kind!r}")
        return  # a plugin's: built (and checked) by the entry point, on its reactor
    a = endpoint_arguments(d)
    for name, base in (("port", 10), ("backlog", 10), ("mode", 8), ("lockfile", 10)):
        value = a.get(name)
        try:
            if value is not None and not 0 <= int(value, base) <= (65535 if name == "port" else 1 << 31):
                raise ValueError
        except ValueError:
            raise ValueError(f"{name} {value!r} is not a valid number") from None
    if d.kind == "ssl":
        cert = a["certKey"] or a["privateKey"]
        for path in (cert, a["privateKey"], a["extraCertChain"], a["dhParameters"]):
            if path is not None:
                with open(path, "rb"):  # OSError names the file: "No such file or directory: '...'"
                    pass


def _endpoints(value: Any, from_text: bool) -> tuple[str, ...]:
    if from_text:
        # endpoint strings contain commas only escaped; split on whitespace or ';'
        value = [v for v in value.replace(";", " ").split() if v]
    items = _str_list(value, False)
    if not items:
        raise ValueError("needs at least one endpoint")
    for desc in items:
        try:
            _check_endpoint(desc)
        except (ValueError, OSError) as e:
            raise ValueError(f"{desc!r} is not a Twisted server endpoint: {e}") from None
    return items


def _networks(value: Any, from_text: bool) -> tuple[str, ...]:
    """IP addresses or CIDR networks, normalised (C{"10.1.2.3/8"} -> C{"10.0.0.0/8"})."""
    out = []
    for item in _str_list(value, from_text):
        try:
            out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"{item[:60]!r} is not an IP address or CIDR network") from None
    return tuple(out)


def _allowed_hosts(value: Any, from_text: bool) -> tuple[str, ...]:
    """Host names, C{name:port}, C{[v6]:port} or C{*}; lower-cased, without a trailing dot."""
    out = []
    for item in _str_list(value, from_text):
        text = item.strip().lower()
        if text == "*":
            out.append(text)
            continue
        if text.startswith("["):
            name, sep, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ("" if not rest else None)
            ok = bool(sep) and port is not None and ":" in name
        else:
            name, _, port = text.partition(":")
            ok = ":" not in port
        ok = ok and bool(name) and not any(c.isspace() or c in "/?#@\\[]" for c in name)
        if not ok or (port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536)):
            raise ValueError(f"{item[:60]!r} is not a host name, name:port or [IPv6]:port")
        name = name.rstrip(".")
        out.append(f"[{name}]:{port}" if ":" in name and port else (f"[{name}]" if ":" in name else
                                                                    (f"{name}:{port}" if port else name)))
    return tuple(out)


def _root_url(value: Any, from_text: bool) -> str:
    """A Taskcluster root URL (C{https://tc.example.com}), or C{""} for none."""
    url = _text(value, from_text).strip().rstrip("/")
    if url and (not url.startswith(("http://", "https://")) or len(url) <= len("https://")
                or any(c.isspace() for c in url)):
        raise ValueError(f"must be an http(s) URL such as https://firefox-ci-tc.services.mozilla.com, got {url!r}")
    return url


def _timeouts(value: Any, from_text: bool) -> dict[str, float]:
    if from_text:
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("must look like ping=30,reboot=900")
        value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, Mapping):
        raise ValueError("must be a table of task name = seconds")
    out = {}
    for name, seconds in value.items():
        out[name] = _float(0.001)(seconds, isinstance(seconds, str))
    return out


def _database_url(value: Any, from_text: bool) -> str:
    """A C{postgresql://user@host:port/database} URL (no password: that is in the secrets file), or C{""}."""
    url = _text(value, from_text).strip()
    if url:
        from roller.store.pg import PgUrlError, parse_url  # the store's own parser; imported late (layering)

        try:
            parse_url(url)
        except PgUrlError as e:
            raise ValueError(str(e)) from None
    return url


def _http_url(value: Any, from_text: bool) -> str:
    """An http(s) base URL, or C{""} for none."""
    url = _text(value, from_text).strip().rstrip("/")
    if url and (not url.startswith(("http://", "https://")) or len(url) <= len("https://")
                or any(c.isspace() for c in url)):
        raise ValueError(f"must be an http(s) URL such as https://host.example.com, got {url[:100]!r}")
    return url


#: The fields a Bugzilla template may use (see L{roller.tasks.bugzilla}).
TEMPLATE_FIELDS = ("host", "fqdn", "ip", "worker_id", "worker_group", "requester", "reason", "job_id",
                   "attempts")


def _template(value: Any, from_text: bool) -> str:
    """A C{str.format} template using only L{TEMPLATE_FIELDS}."""
    text = _text(value, from_text)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as e:
        raise ValueError(f"is not a valid template ({e}); write {{{{ and }}}} for literal braces") from None
    unknown = sorted({n for n in names if n not in TEMPLATE_FIELDS})
    if unknown or "" in names:
        raise ValueError(f"uses unknown field(s) {', '.join(unknown) or '{}'} "
                         f"(known: {', '.join(TEMPLATE_FIELDS)})")
    return text


# -- notification rules ([[notify.rules]]; roller.notify sends what they select)

#: the event of a job starting; the others are its final states
STARTED = "started"
FINAL_STATES = tuple(s.value for s in State if s.final)
#: fleet health events: a machine entering a state, or a finding of a kind appearing
HEALTH_EVENTS = tuple(f"health.{name}" for name in (
    "healthy", "degraded", "down", "unknown", "loaned", "quarantined", "maintenance", "failing", "missing"))
_RULE_KEYS = ("tasks", "on", "email", "matrix_rooms", "slack_channels", "webhooks")


@frozen
class Rule:
    tasks: tuple[str, ...] = ("*",)
    on: tuple[str, ...] = (STARTED, *FINAL_STATES)
    email: tuple[str, ...] = ()
    matrix_rooms: tuple[str, ...] = ()
    slack_channels: tuple[str, ...] = ()
    webhooks: tuple[str, ...] = ()

    def matches(self, task_name: str, what: str) -> bool:
        return ("*" in self.tasks or task_name in self.tasks) and what in self.on

    def matches_health(self, events: Iterable[str]) -> bool:
        """A health rule (its C{tasks} do not apply): whether any of C{events} is one of its C{on}."""
        return any(e in self.on for e in events)


def parse_rules(value: Any, from_text: bool = False) -> tuple[Rule, ...]:
    """The C{notify.rules} setting; raises ValueError(reason)."""
    if from_text:
        try:
            value = json.loads(value) if value.strip() else []
        except ValueError:
            raise ValueError("must be a JSON list of rule objects") from None
    if not isinstance(value, list):
        raise ValueError("must be a list of rules ([[notify.rules]] tables)")
    rules = []
    for i, table in enumerate(value):
        if not isinstance(table, Mapping):
            raise ValueError(f"rule {i + 1} must be a table")
        unknown = sorted(set(table) - set(_RULE_KEYS))
        if unknown:
            raise ValueError(f"rule {i + 1}: unknown key(s) {', '.join(unknown)} (known: {', '.join(_RULE_KEYS)})")
        lists: dict[str, tuple[str, ...]] = {}
        for key in _RULE_KEYS:
            if key not in table:
                continue
            items = table[key]
            if isinstance(items, str):
                items = [items]
            if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
                raise ValueError(f"rule {i + 1}: {key} must be a list of strings")
            lists[key] = tuple(v.strip() for v in items)
        bad = [w for w in lists.get("on", ()) if w not in (STARTED, *FINAL_STATES, *HEALTH_EVENTS)]
        if bad:
            raise ValueError(f"rule {i + 1}: on has unknown event(s) {', '.join(bad)} "
                             f"(known: {', '.join((STARTED, *FINAL_STATES, *HEALTH_EVENTS))})")
        for url in lists.get("webhooks", ()):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"rule {i + 1}: webhook {url[:80]!r} is not an http(s) URL")
        rule = Rule(**lists)
        if not (rule.email or rule.matrix_rooms or rule.slack_channels or rule.webhooks):
            raise ValueError(f"rule {i + 1} notifies nobody: set email, matrix_rooms, slack_channels or webhooks")
        rules.append(rule)
    return tuple(rules)


def _tables(value: Any, from_text: bool) -> tuple[dict[str, Any], ...]:
    """An array of tables (C{[[health.policies]]}); what each table says is checked where it is used."""
    if from_text:
        raise ValueError("is an array of tables: set it in the configuration file")
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise ValueError("must be an array of tables ([[...]] in TOML)")
    return tuple(dict(t) for t in value)


def _share(value: Any, from_text: bool) -> float:
    """A number from 0 to 1."""
    number = _float(0)(value, from_text)
    if number > 1:
        raise ValueError(f"must be a number from 0 to 1, got {number:g}")
    return number


_share.kind = "number from 0 to 1"  # type: ignore[attr-defined]


def _limit(value: Any, from_text: bool) -> str:
    """A batch rollout limit: a count (C{10}), a percentage (C{"25%"}), or C{""} for none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    from roller.batches.model import Limit  # a leaf module; imported here so config stays below everything
    from roller.errors import BadRequest

    try:
        return str(Limit.parse("limit", value.strip() if isinstance(value, str) else value).to_json())
    except (ValueError, BadRequest):
        raise ValueError(f"must be a count (e.g. 10), a percentage (e.g. \"25%\") or empty for none, got "
                         f"{str(value)[:40]!r}") from None


_limit.kind = "count, percentage or empty"  # type: ignore[attr-defined]


#: What C{roller config} calls each parser's values (parsers made by
#: C{_int}, C{_float} and C{_choice} carry their own C{kind}).
_KINDS: dict[Callable[[Any, bool], Any], str] = {
    _text: "string", _bool: "boolean", _str_list: "list of strings",
    _endpoints: "list of Twisted endpoint strings", _networks: "list of addresses or CIDR networks",
    _root_url: "Taskcluster root URL", _timeouts: "table of task = seconds", _http_url: "http(s) URL",
    _template: "template", parse_rules: "array of tables", _tables: "array of tables",
}


def kind_of(parse: Callable[[Any, bool], Any]) -> str:
    """How C{roller config} names the values a parser takes."""
    return getattr(parse, "kind", None) or _KINDS.get(parse) or parse.__name__.strip("_").replace("_", " ")


# key -> (attribute, parser, default); "{state_dir}" in a default is filled in.
KEYS: dict[str, tuple[str, Callable[[Any, bool], Any], Any]] = {
    "state_dir": ("state_dir", _text, "state"),
    "secrets_file": ("secrets_file", _text, "{state_dir}/secrets.toml"),
    "demo": ("demo", _bool, False),
    "demo_fleet_size": ("demo_fleet_size", _int(0, 2000), 5),
    "demo_ssh_port": ("demo_ssh_port", _int(1, 65535), 2222),
    "server.listen": ("listen", _endpoints, ("tcp:8000:interface=127.0.0.1",)),
    "server.max_body": ("max_body", _int(1024, 64 << 20), 1 << 20),
    "server.header_timeout": ("header_timeout", _float(0.1), 10.0),
    "server.body_timeout": ("body_timeout", _float(0.1), 60.0),
    "server.idle_timeout": ("idle_timeout", _float(0.1), 75.0),
    "server.max_connections": ("max_connections", _int(0, 1_000_000), 0),
    "server.cors_origins": ("cors_origins", _str_list, ("https://firefox-ci-tc.services.mozilla.com",)),
    "server.trusted_proxies": ("trusted_proxies", _networks, ()),
    "server.shutdown_grace": ("shutdown_grace", _float(0), 30.0),
    "server.heartbeat_max_lag": ("heartbeat_max_lag", _float(0.01), 5.0),
    "server.version_file": ("version_file", _text, ""),
    "server.public_url": ("public_url", _http_url, ""),
    "server.allowed_hosts": ("allowed_hosts", _allowed_hosts, ()),
    "database.path": ("db_path", _text, "{state_dir}/roller.db"),
    "database.synchronous": ("db_synchronous", _choice("normal", "full"), "normal"),
    "database.url": ("db_url", _database_url, ""),
    "database.credential": ("db_credential", _text, ""),
    "auth.mode": ("auth_mode", _choice("none", "taskcluster", "local"), "taskcluster"),
    "auth.root_url": ("auth_root_url", _root_url, ""),
    "auth.timeout": ("auth_timeout", _float(0.1), 5.0),
    "auth.timestamp_skew": ("auth_timestamp_skew", _float(1), 60.0),
    "auth.max_requests_per_client": ("auth_max_requests_per_client", _int(1, 100_000), 6000),
    "auth.scope_prefix": ("scope_prefix", _text, "project:releng:roller:"),
    "queue.max_running": ("max_running", _int(1, 100_000), 200),
    "queue.endpoint_max_running": ("endpoint_max_running", _int(1, 1000), 1),
    "queue.endpoint_min_interval": ("endpoint_min_interval", _float(0), 0.0),
    "tasks.allowed": ("allowed_tasks", _str_list, (
        "ping", "ssh_reboot", "reboot", "reimage", "redfish_reboot", "xenapi_reboot",
        "ipmi_on", "ipmi_off", "ipmi_cycle", "ipmi_reset", "ipmi_status", "ipmi_list",
        "snmp_reboot", "power_on", "power_off", "power_cycle", "power_status")),
    "tasks.timeouts": ("task_timeouts", _timeouts, {}),
    "log.format": ("log_format", _choice("text", "json"), "text"),
    "ssh.known_hosts": ("ssh_known_hosts", _text, "{state_dir}/known_hosts"),
    "ssh.user": ("ssh_user", _text, "root"),
    "ssh.credential": ("ssh_credential", _text, ""),
    "ssh.host_key_policy": ("ssh_host_key_policy", _choice("strict", "accept-new"), "strict"),
    "ssh.connect_timeout": ("ssh_connect_timeout", _float(0.1), 15.0),
    "ssh.command_timeout": ("ssh_command_timeout", _float(0.1), 60.0),
    "ssh.max_sessions": ("ssh_max_sessions", _int(1, 10_000), 100),
    "reboot.methods": ("reboot_methods", _str_list, (
        "ssh_reboot", "ipmi_reset", "ipmi_cycle", "snmp_reboot", "redfish_reboot", "xenapi_reboot",
        "file_bugzilla_bug")),
    "ipmi.ipmitool": ("ipmi_ipmitool", _text, "ipmitool"),
    "ipmi.credential": ("ipmi_credential", _text, ""),
    "ipmi.cipher_suite": ("ipmi_cipher_suite", _int(-1, 255), 3),
    "ipmi.timeout": ("ipmi_timeout", _float(0.1), 30.0),
    "ipmi.request_timeout": ("ipmi_request_timeout", _int(1, 60), 1),
    "ipmi.request_retries": ("ipmi_request_retries", _int(1, 10), 2),
    "ipmi.retries": ("ipmi_retries", _int(0, 20), 3),
    "ipmi.retry_delay": ("ipmi_retry_delay", _float(0), 5.0),
    "ipmi.min_interval": ("ipmi_min_interval", _float(0), 5.0),
    "ipmi.power_wait": ("ipmi_power_wait", _float(0), 60.0),
    "ipmi.power_poll": ("ipmi_power_poll", _float(0.05), 2.0),
    "snmp.credential": ("snmp_credential", _text, ""),
    "snmp.timeout": ("snmp_timeout", _float(0.05), 2.0),
    "snmp.retries": ("snmp_retries", _int(0, 20), 2),
    "snmp.min_interval": ("snmp_min_interval", _float(0), 1.0),
    "snmp.settle_timeout": ("snmp_settle_timeout", _float(0.1), 30.0),
    "snmp.reboot_timeout": ("snmp_reboot_timeout", _float(0.1), 90.0),
    "snmp.poll_interval": ("snmp_poll_interval", _float(0.01), 1.0),
    "snmp.off_for": ("snmp_off_for", _float(0), 5.0),
    "snmp.community_version": ("snmp_community_version", _choice("model", "1", "2c"), "model"),
    "redfish.credential": ("redfish_credential", _text, ""),
    "redfish.request_timeout": ("redfish_request_timeout", _float(0.1), 20.0),
    "redfish.power_timeout": ("redfish_power_timeout", _float(1), 120.0),
    "redfish.poll_interval": ("redfish_poll_interval", _float(0.05), 2.0),
    "xen.url": ("xen_url", _text, ""),
    "xen.credential": ("xen_credential", _text, ""),
    "xen.ca_file": ("xen_ca_file", _text, ""),
    "xen.verify_tls": ("xen_verify_tls", _bool, True),
    "xen.timeout": ("xen_timeout", _float(0.1), 30.0),
    "xen.shutdown_timeout": ("xen_shutdown_timeout", _float(1), 120.0),
    "xen.start_delay": ("xen_start_delay", _float(0), 5.0),
    "reboot.down_timeout": ("reboot_down_timeout", _float(1), 300.0),
    "reboot.up_timeout": ("reboot_up_timeout", _float(1), 900.0),
    "reboot.poll_interval": ("reboot_poll_interval", _float(0.05), 5.0),
    "bugzilla.url": ("bugzilla_url", _http_url, ""),
    "bugzilla.credential": ("bugzilla_credential", _text, "bugzilla"),
    "bugzilla.timeout": ("bugzilla_timeout", _float(0.1), 30.0),
    "bugzilla.product": ("bugzilla_product", _text, "Infrastructure & Operations"),
    "bugzilla.component": ("bugzilla_component", _text, "DCOps"),
    "bugzilla.version": ("bugzilla_version", _text, "unspecified"),
    "bugzilla.summary": ("bugzilla_summary", _template, "{host} is unreachable"),
    "bugzilla.description": ("bugzilla_description", _template, (
        "{host} ({ip}) could not be rebooted by roller.\n\n"
        "Requested by {requester} (job {job_id}){reason}.\n\n"
        "Attempts:\n{attempts}\n")),
    "bugzilla.comment": ("bugzilla_comment", _template, (
        "{host} ({ip}) could not be rebooted by roller again.\n\n"
        "Requested by {requester} (job {job_id}){reason}.\n\n"
        "Attempts:\n{attempts}\n")),
    "bugzilla.cc": ("bugzilla_cc", _str_list, ()),
    "bugzilla.tracker_product": ("bugzilla_tracker_product", _text, "Infrastructure & Operations"),
    "bugzilla.tracker_component": ("bugzilla_tracker_component", _text, "CIDuty"),
    "bugzilla.tracker_summary": ("bugzilla_tracker_summary", _template, "{host} problem tracking"),
    "bugzilla.reopen_status": ("bugzilla_reopen_status", _text, "REOPENED"),
    "notify.rules": ("notify_rules", parse_rules, ()),
    "notify.root_url": ("notify_root_url", _root_url, ""),
    "notify.credential": ("notify_credential", _text, "taskcluster-notify"),
    "notify.webhook_credential": ("notify_webhook_credential", _text, "webhook"),
    "notify.timeout": ("notify_timeout", _float(0.1), 10.0),
    "loans.root_url": ("loans_root_url", _root_url, ""),
    "loans.credential": ("loans_credential", _text, "taskcluster-queue"),
    "loans.provisioner_id": ("loans_provisioner_id", _text, "releng-hardware"),
    "loans.max_duration": ("loans_max_duration", _float(3600), 90 * 86400.0),
    "loans.timeout": ("loans_timeout", _float(0.1), 30.0),
    "dashboard.session_idle": ("session_idle", _float(60), 12 * 3600.0),
    "dashboard.session_max": ("session_max", _float(60), 7 * 86400.0),
    "dashboard.login_max_failures": ("login_max_failures", _int(1, 1000), 5),
    "dashboard.login_ip_max_failures": ("login_ip_max_failures", _int(1, 100_000), 20),
    "dashboard.login_lockout": ("login_lockout", _float(1), 900.0),
    "dashboard.page_size": ("dashboard_page_size", _int(10, 1000), 200),
    "health.enabled": ("health_enabled", _bool, True),
    "health.sweep_interval": ("health_sweep_interval", _float(1), 300.0),
    "health.sweep_concurrency": ("health_sweep_concurrency", _int(1, 10_000), 100),
    "health.down_after": ("health_down_after", _int(1, 100), 2),
    "health.probe_timeout": ("health_probe_timeout", _float(0.1), 2.0),
    "health.tc_interval": ("health_tc_interval", _float(5), 120.0),
    "health.root_url": ("health_root_url", _root_url, ""),
    "health.credential": ("health_credential", _text, "taskcluster-health"),
    "health.missing_after": ("health_missing_after", _float(60), 3600.0),
    "health.fitness_window": ("health_fitness_window", _int(1, 100), 10),
    "health.min_success_rate": ("health_min_success_rate", _share, 0.85),
    "health.max_consecutive_failures": ("health_max_consecutive_failures", _int(0, 100), 3),
    "health.remediate": ("health_remediate", _bool, False),
    "health.tick": ("health_tick", _float(1), 10.0),
    "health.policies": ("health_policies", _tables, ()),
    "batches.max_concurrent": ("batches_max_concurrent", _limit, ""),
    "batches.max_per_pool": ("batches_max_per_pool", _limit, "25%"),
    "batches.stop_after_failures": ("batches_stop_after_failures", _int(0, 20_000), 0),
    "batches.pause_between": ("batches_pause_between", _float(0), 0.0),
    "history.keep_days": ("history_keep_days", _int(0, 100_000), 90),
    "history.keep_events_days": ("history_keep_events_days", _int(0, 100_000), 14),
    "history.keep_audit_days": ("history_keep_audit_days", _int(0, 100_000), 0),
    "history.keep_loans_days": ("history_keep_loans_days", _int(0, 100_000), 365),
    "history.prune_interval": ("history_prune_interval", _float(0), 3600.0),
    "cluster.takeover_after": ("cluster_takeover_after", _float(3), 30.0),
    "cluster.reach": ("cluster_reach", _str_list, ()),
    "cluster.poll_interval": ("cluster_poll_interval", _float(0.05), 1.0),
    "cluster.host": ("cluster_host", _text, ""),
}


#: key -> one-line meaning, shown by C{roller config} (with the type, default
#: and environment variable).  Every key of L{KEYS} needs one: a test fails
#: on a key without a description.  Add a new key's line here with the key.
HELP: dict[str, str] = {
    "state_dir": "Directory for roller's own state; the database, secrets file and known_hosts default to it.",
    "secrets_file": "TOML file (mode 0600) holding credentials and Hawk clients by name; re-read on SIGHUP.",
    "demo": "Add the demo machines and run a simulated fleet in-process (make run).",
    "demo_fleet_size": "How many simulated machines the demo fleet runs (sim-001 ...).",
    "demo_ssh_port": "SSH port of the demo fleet's simulated machines.",
    "server.listen": "Twisted server endpoint strings to listen on (tcp:..., ssl:... for TLS, unix:...).",
    "server.max_body": "Largest request body accepted, in bytes (413 above).",
    "server.header_timeout": "Seconds a request's headers may take to arrive (408 and close after).",
    "server.body_timeout": "Seconds a request's body may take to arrive after its headers (408 and close after).",
    "server.idle_timeout": "Seconds a keep-alive connection may stay silent before roller closes it.",
    "server.max_connections": "Client connections open at once (0: 10000, or what the open-files limit allows).",
    "server.cors_origins": "Browser origins allowed to call the API (CORS).",
    "server.trusted_proxies": "Addresses or networks of load balancers whose X-Forwarded-* headers are believed.",
    "server.shutdown_grace": "On SIGTERM, seconds running jobs get to finish before they are marked interrupted.",
    "server.heartbeat_max_lag": "/__heartbeat__ fails when the reactor lags more than this many seconds.",
    "server.version_file": "Dockerflow version.json served at /__version__ (empty: the built-in one).",
    "server.public_url": "roller's public base URL, used in links (notifications, actions).",
    "server.allowed_hosts": ("Host header names (name or name:port; '*' turns the check off) requests may use, "
        "besides the address they reached, localhost on loopback, the machine's names and public_url's host."),
    "database.path": "The SQLite database file.",
    "database.synchronous": "SQLite synchronous mode: normal (survives a crash) or full (also power loss).",
    "database.url": ("PostgreSQL instead of the SQLite file: postgresql://user@host:port/database (no password "
        "here; ?sslmode=... allowed). Empty: SQLite at database.path."),
    "database.credential": ("Credential (type password) in the secrets file holding the PostgreSQL password "
        "(and the user, if database.url names none). Empty: none (trust, peer or ~/.pgpass)."),
    "auth.mode": ("How API clients authenticate: taskcluster (Hawk via authenticate-hawk), local "
        "(Hawk clients in the secrets file) or none (loopback listeners only)."),
    "auth.root_url": "Taskcluster root URL for auth.mode = taskcluster.",
    "auth.timeout": "Seconds to wait for Taskcluster's authenticate-hawk.",
    "auth.timestamp_skew": ("Accepted clock difference of a Hawk request, seconds (local mode); also the "
        "replay window."),
    "auth.max_requests_per_client": ("Hawk requests one client may make within auth.timestamp_skew seconds "
        "(local mode); the client gets 429 beyond it, others are not affected."),
    "auth.scope_prefix": "Prefix of every scope roller checks (prefix + task name, prefix + jobs:read ...).",
    "queue.max_running": "Jobs running at once, over all machines.",
    "queue.endpoint_max_running": "Jobs running at once against one shared endpoint (a PDU or BMC host).",
    "queue.endpoint_min_interval": ("Seconds between the end of one job and the start of the next on one shared "
        "endpoint (the drivers add their own per-command intervals)."),
    "tasks.allowed": "Tasks reachable over REST and the dashboard (roller run on the command line may run any).",
    "tasks.timeouts": "Per-task timeout in seconds (task = seconds), overriding each task's default.",
    "log.format": "Log line format: text, or json (one object per line).",
    "ssh.known_hosts": "roller's own known_hosts file (OpenSSH format) that SSH host keys are checked against.",
    "ssh.user": "SSH user for machines whose ssh settings name none.",
    "ssh.credential": "Credential (private key) for machines whose ssh settings name none.",
    "ssh.host_key_policy": ("strict (unknown hosts refused) or accept-new (record a new host's key; a changed "
        "key is always refused)."),
    "ssh.connect_timeout": "Seconds for an SSH connection and authentication.",
    "ssh.command_timeout": "Seconds an SSH command may run.",
    "ssh.max_sessions": "SSH sessions open at once, over all machines.",
    "reboot.methods": "Default order of reboot methods for machines that name none.",
    "ipmi.ipmitool": "The ipmitool executable.",
    "ipmi.credential": "Credential (user and password) for BMCs whose ipmi settings name none.",
    "ipmi.cipher_suite": "ipmitool -C cipher suite for lanplus (-1: let ipmitool choose).",
    "ipmi.timeout": "Seconds one ipmitool run may take before it is killed.",
    "ipmi.request_timeout": "ipmitool -N: seconds per IPMI request.",
    "ipmi.request_retries": "ipmitool -R: retries per IPMI request.",
    "ipmi.retries": "How often a transient BMC error (busy, no session) is retried.",
    "ipmi.retry_delay": "Seconds before the first retry of a transient BMC error (doubling after).",
    "ipmi.min_interval": "Seconds between two commands to one BMC (weak BMCs fail under bursts).",
    "ipmi.power_wait": "Seconds a power change may take to read back from the BMC.",
    "ipmi.power_poll": "Seconds between power state reads while waiting for a change.",
    "snmp.credential": "Credential (community or v3 user) for PDUs whose pdu settings name none.",
    "snmp.timeout": "Seconds to wait for one SNMP answer before retrying.",
    "snmp.retries": "Retries of an unanswered SNMP request.",
    "snmp.min_interval": "Seconds between two operations on one PDU.",
    "snmp.settle_timeout": "Seconds an outlet may take to read back the state it was set to.",
    "snmp.reboot_timeout": "Seconds a PDU's own reboot command may take to read back on.",
    "snmp.poll_interval": "Seconds between outlet state reads while waiting.",
    "snmp.off_for": "Seconds an outlet stays off in an off/on power cycle (models without a native reboot).",
    "snmp.community_version": "SNMP version for community credentials: model (each PDU model's own), 1 or 2c.",
    "redfish.credential": "Credential (user and password) for Redfish services whose settings name none.",
    "redfish.request_timeout": "Seconds for one Redfish HTTP request.",
    "redfish.power_timeout": "Seconds a Redfish power change may take to read back.",
    "redfish.poll_interval": "Seconds between Redfish power state reads while waiting.",
    "xen.url": "XenAPI pool master URL for machines whose xen settings name none.",
    "xen.credential": "Credential (user and password) for the XenAPI pool.",
    "xen.ca_file": "CA bundle (PEM) for the XenAPI pool's TLS certificate (empty: the system's).",
    "xen.verify_tls": "Verify the XenAPI pool's TLS certificate.",
    "xen.timeout": "Seconds for one XenAPI call.",
    "xen.shutdown_timeout": "Seconds a clean VM shutdown may take before a hard shutdown.",
    "xen.start_delay": "Seconds between a VM's shutdown and its start.",
    "reboot.down_timeout": "Seconds a rebooted machine has to stop answering its liveness check.",
    "reboot.up_timeout": "Seconds a rebooted machine has to answer its liveness check again.",
    "reboot.poll_interval": "Seconds between liveness checks while waiting for down and up.",
    "bugzilla.url": "Bugzilla base URL for file_bugzilla_bug (empty: the step is skipped).",
    "bugzilla.credential": "Credential holding the Bugzilla API key.",
    "bugzilla.timeout": "Seconds for one Bugzilla request.",
    "bugzilla.product": "Product of filed bugs.",
    "bugzilla.component": "Component of filed bugs.",
    "bugzilla.version": "Version field of filed bugs.",
    "bugzilla.summary": "Summary template of a new bug (fields: " + ", ".join(TEMPLATE_FIELDS) + ").",
    "bugzilla.description": "Description template of a new bug.",
    "bugzilla.comment": "Comment template when the machine's bug already exists.",
    "bugzilla.cc": "Addresses cc'ed on filed bugs (besides the machine's bug_cc).",
    "bugzilla.tracker_product": "Product of a machine's tracker bug.",
    "bugzilla.tracker_component": "Component of a machine's tracker bug.",
    "bugzilla.tracker_summary": "Summary template of a machine's tracker bug.",
    "bugzilla.reopen_status": "Status a closed bug is reopened with.",
    "notify.rules": "[[notify.rules]] tables: which job outcomes notify whom (email, Matrix, Slack, webhooks).",
    "notify.root_url": "Taskcluster root URL for notify (empty: auth.root_url).",
    "notify.credential": "Credential (Taskcluster client) for the notify service.",
    "notify.webhook_credential": "Credential whose secret signs webhook notifications.",
    "notify.timeout": "Seconds for one notification request.",
    "loans.root_url": "Taskcluster root URL for loans (empty: auth.root_url).",
    "loans.credential": "Credential (Taskcluster client) that quarantines loaned workers.",
    "loans.provisioner_id": "Provisioner id for machines whose pool is a bare worker type.",
    "loans.max_duration": "Longest loan, in seconds.",
    "loans.timeout": "Seconds for one Taskcluster queue request of a loan.",
    "dashboard.session_idle": "Seconds a dashboard session lasts without use.",
    "dashboard.session_max": "Seconds a dashboard session lasts at most.",
    "dashboard.login_max_failures": "Failed sign-ins before an account is locked for login_lockout.",
    "dashboard.login_ip_max_failures": "Failed sign-ins from one address before it is locked for login_lockout.",
    "dashboard.login_lockout": "Seconds a locked account or address stays locked.",
    "dashboard.page_size": "Machines per page of the fleet page (its \"select all matching\" reaches beyond it).",
    "health.enabled": "Run liveness sweeps and Taskcluster fitness polls (fleet health).",
    "health.sweep_interval": "Seconds between two liveness probes of a machine; a round's probes are spread over it.",
    "health.sweep_concurrency": "Liveness probes in flight at once during a sweep.",
    "health.down_after": "Failed liveness probes in a row that make a machine down (one success brings it back).",
    "health.probe_timeout": "Seconds a sweep's liveness probe waits for an answer.",
    "health.tc_interval": "Seconds between two Taskcluster fitness polls of a pool.",
    "health.root_url": "Taskcluster root URL for fitness polls (empty: auth.root_url; both empty: no polls).",
    "health.credential": "Credential (Taskcluster client id and access token) that signs fitness polls.",
    "health.missing_after": ("Seconds without activity after which a worker is missing while its pool has "
                             "pending tasks."),
    "health.fitness_window": "How many of a worker's latest resolved task runs its success rate is taken over.",
    "health.min_success_rate": "A worker whose success rate is below this is failing (0 to 1).",
    "health.max_consecutive_failures": "Failed task runs in a row that make a worker failing (0: off).",
    "health.remediate": "Act on findings with [[health.policies]] (off: findings are only reported).",
    "health.tick": "Seconds between two remediation decisions.",
    "health.policies": "[[health.policies]] tables: which findings trigger which tasks, within which limits.",
    "batches.max_concurrent": ("Default for a batch's members in flight at once: a count or a percentage of the "
                               "batch (empty: no limit but queue.max_running)."),
    "batches.max_per_pool": ("Default for a batch's members in flight at once per pool: a count or a percentage "
                             "of the pool's machines (empty: no limit)."),
    "batches.stop_after_failures": "Default circuit breaker: a batch halts after this many failed members (0: never).",
    "batches.pause_between": "Default seconds between two member starts of a batch.",
    "history.keep_days": "Days finished jobs (with their events) and finished batches are kept (0: forever).",
    "history.keep_events_days": ("Days the output lines of succeeded jobs are kept; their state changes and result "
                                 "stay for history.keep_days (0: as long as the job)."),
    "history.keep_audit_days": "Days audit entries are kept (0: forever).",
    "history.keep_loans_days": "Days returned loans are kept (0: forever); active loans always stay.",
    "history.prune_interval": "Seconds between two prunings of the history by a running roller (0: never).",
    "cluster.takeover_after": ("PostgreSQL: seconds without a heartbeat after which another roller marks a roller's "
        "running jobs interrupted and runs its queued ones."),
    "cluster.reach": ("PostgreSQL: the worker groups this roller runs jobs for (empty: all); jobs of groups no "
        "running roller reaches stay queued."),
    "cluster.poll_interval": ("PostgreSQL: seconds between two looks at the shared queue and at the events of jobs "
        "other rollers run."),
    "cluster.host": ("PostgreSQL: the host name this roller registers under (empty: the machine's); rollers of one "
        "host name take over a stopped one's jobs at once, when its process is gone."),
}


@frozen
class Settings:
    state_dir: str
    secrets_file: str
    demo: bool
    demo_fleet_size: int
    demo_ssh_port: int
    listen: tuple[str, ...]
    max_body: int
    header_timeout: float
    body_timeout: float
    idle_timeout: float
    max_connections: int
    cors_origins: tuple[str, ...]
    trusted_proxies: tuple[str, ...]
    shutdown_grace: float
    heartbeat_max_lag: float
    version_file: str
    public_url: str
    allowed_hosts: tuple[str, ...]
    db_path: str
    db_synchronous: str
    db_url: str
    db_credential: str
    auth_mode: str
    auth_root_url: str
    auth_timeout: float
    auth_timestamp_skew: float
    auth_max_requests_per_client: int
    scope_prefix: str
    max_running: int
    endpoint_max_running: int
    endpoint_min_interval: float
    allowed_tasks: tuple[str, ...]
    task_timeouts: dict[str, float] = field(hash=False)
    log_format: str
    ssh_known_hosts: str
    ssh_user: str
    ssh_credential: str
    ssh_host_key_policy: str
    ssh_connect_timeout: float
    ssh_command_timeout: float
    ssh_max_sessions: int
    reboot_methods: tuple[str, ...]
    ipmi_ipmitool: str
    ipmi_credential: str
    ipmi_cipher_suite: int
    ipmi_timeout: float
    ipmi_request_timeout: int
    ipmi_request_retries: int
    ipmi_retries: int
    ipmi_retry_delay: float
    ipmi_min_interval: float
    ipmi_power_wait: float
    ipmi_power_poll: float
    snmp_credential: str
    snmp_timeout: float
    snmp_retries: int
    snmp_min_interval: float
    snmp_settle_timeout: float
    snmp_reboot_timeout: float
    snmp_poll_interval: float
    snmp_off_for: float
    snmp_community_version: str
    redfish_credential: str
    redfish_request_timeout: float
    redfish_power_timeout: float
    redfish_poll_interval: float
    xen_url: str
    xen_credential: str
    xen_ca_file: str
    xen_verify_tls: bool
    xen_timeout: float
    xen_shutdown_timeout: float
    xen_start_delay: float
    reboot_down_timeout: float
    reboot_up_timeout: float
    reboot_poll_interval: float
    bugzilla_url: str
    bugzilla_credential: str
    bugzilla_timeout: float
    bugzilla_product: str
    bugzilla_component: str
    bugzilla_version: str
    bugzilla_summary: str
    bugzilla_description: str
    bugzilla_comment: str
    bugzilla_cc: tuple[str, ...]
    bugzilla_tracker_product: str
    bugzilla_tracker_component: str
    bugzilla_tracker_summary: str
    bugzilla_reopen_status: str
    notify_rules: tuple[Rule, ...]
    notify_root_url: str
    notify_credential: str
    notify_webhook_credential: str
    notify_timeout: float
    loans_root_url: str
    loans_credential: str
    loans_provisioner_id: str
    loans_max_duration: float
    loans_timeout: float
    session_idle: float
    session_max: float
    login_max_failures: int
    login_ip_max_failures: int
    login_lockout: float
    dashboard_page_size: int
    health_enabled: bool
    health_sweep_interval: float
    health_sweep_concurrency: int
    health_down_after: int
    health_probe_timeout: float
    health_tc_interval: float
    health_root_url: str
    health_credential: str
    health_missing_after: float
    health_fitness_window: int
    health_min_success_rate: float
    health_max_consecutive_failures: int
    health_remediate: bool
    health_tick: float
    health_policies: tuple[dict[str, Any], ...] = field(hash=False)
    batches_max_concurrent: str = ""
    batches_max_per_pool: str = "25%"
    batches_stop_after_failures: int = 0
    batches_pause_between: float = 0.0
    history_keep_days: int = 90
    history_keep_events_days: int = 14
    history_keep_audit_days: int = 0
    history_keep_loans_days: int = 365
    history_prune_interval: float = 3600.0
    cluster_takeover_after: float = 30.0
    cluster_reach: tuple[str, ...] = ()
    cluster_poll_interval: float = 1.0
    cluster_host: str = ""
    config_file: str | None = None

    def listeners_on_loopback(self) -> bool:
        return all(endpoint_is_local(desc) for desc in self.listen)


def endpoint_is_local(desc: str) -> bool:
    """True if the server endpoint C{desc} only accepts local connections (a UNIX socket, or a loopback interface)."""
    d = parse_endpoint(desc)
    if d.kind == "unix":
        return True
    if d.kind not in ("tcp", "tcp6", "ssl"):
        return False  # a plugin's endpoint: roller cannot tell
    try:
        interface = endpoint_arguments(d)["interface"] or ""
    except ValueError:
        return False
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback  # "", "::" and "0.0.0.0" are not
    except ValueError:
        return False


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key != "tasks.timeouts":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def env_name(key: str) -> str:
    return "ROLLER_" + key.replace(".", "_").upper()


def describe(settings: Settings | None = None) -> list[dict[str, Any]]:
    """
    Every key, for C{roller config}: its name, kind of value, default,
    environment variable and meaning; with C{settings}, also the value in
    effect.
    """
    out = []
    for key, (attr, parse, default) in KEYS.items():
        entry: dict[str, Any] = {"key": key, "type": kind_of(parse), "default": default,
                                 "env": env_name(key), "help": HELP.get(key, "")}
        if settings is not None:
            entry["value"] = getattr(settings, attr)
        out.append(entry)
    return out


def load_settings(
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """
    Resolve the settings.  C{overrides} (from command-line options) hold
    dotted keys with text values; C{None} values are ignored.
    """
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get("ROLLER_CONFIG") or None
    layers: list[tuple[str, dict[str, Any], bool]] = []
    if config_file:
        try:
            with open(config_file, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("config", f"file {config_file} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError("config", f"cannot read {config_file}: {e}") from None
        layers.append((config_file, _flatten(data), False))
    layers.append(("environment", {k: environ[env_name(k)] for k in KEYS if env_name(k) in environ}, True))
    layers.append(("command line", {k: v for k, v in (overrides or {}).items() if v is not None}, True))

    values: dict[str, Any] = {}
    for source, layer, from_text in layers:
        for key, raw in layer.items():
            if key not in KEYS:
                raise ConfigError(key, f"unknown setting (known: {', '.join(sorted(KEYS))})", source)
            attr, parse, _ = KEYS[key]
            try:
                values[attr] = parse(raw, from_text and isinstance(raw, str))
            except ValueError as e:
                raise ConfigError(key, str(e), source) from None
    for attr, _, default in KEYS.values():
        if attr not in values:
            values[attr] = default
    for attr, _, _ in KEYS.values():
        if isinstance(values[attr], str) and "{state_dir}" in values[attr]:
            values[attr] = values[attr].replace("{state_dir}", values["state_dir"])
    settings = Settings(config_file=config_file, **values)
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    if s.auth_mode == "none" and not s.listeners_on_loopback():
        raise ConfigError(
            "auth.mode",
            "'none' is accepted only when every listener is on loopback "
            f"(interface=127.0.0.1 or ::1); server.listen is {', '.join(s.listen)}",
        )


def check_names(s: Settings, *, tasks: Collection[str], reboot_methods: Collection[str]) -> None:
    """
    Check the settings that name things other layers define: C{tasks.allowed}
    and C{tasks.timeouts} against the task names, C{reboot.methods} against
    the reboot methods.  The entry points (C{twistd roller}, the C{roller}
    command) call it with the names of the tasks they run; a bad name raises
    the same one-line L{ConfigError} as any other bad value.
    """
    known = ", ".join(tasks)
    for name in s.allowed_tasks:
        if name not in tasks:
            raise ConfigError("tasks.allowed", f"unknown task {name!r} (known: {known})")
    for name in s.reboot_methods:
        if name not in reboot_methods:
            raise ConfigError("reboot.methods", f"unknown method {name!r} (known: {', '.join(reboot_methods)})")
    for name in s.task_timeouts:
        if name not in tasks:
            raise ConfigError("tasks.timeouts", f"unknown task {name!r}")
