"""
The secrets file: named credentials that machines refer to by name.

The file is TOML with one table per credential::

    [credentials.ipmi-admin]
    type = "password"
    username = "admin"
    password = "..."

    [credentials.ssh-relops]
    type = "ssh-key"
    path = "/etc/roller/keys/relops_ed25519"
    passphrase = "..."            # optional

    [credentials.snmp-legacy]
    type = "snmp-community"
    community = "..."
    read_community = "..."        # optional; defaults to C{community}

    [credentials.snmp-v3-pdu]
    type = "snmp-v3"
    user = "roller"
    auth_protocol = "SHA256"      # SHA SHA224 SHA256 SHA384 SHA512 MD5 none
    auth_key = "..."
    priv_protocol = "AES"         # AES AES192 AES256 DES none
    priv_key = "..."

    [credentials.bugzilla]
    type = "token"
    value = "..."

Hawk clients that roller verifies itself (C{auth.mode = "local"}), one
table per Taskcluster-style client id; the access token is a secret, the
scopes are not::

    [clients."project/releng/roller-ci"]
    access_token = "..."          # at least 16 printable ASCII characters
    scopes = ["project:releng:roller:*"]

Credential names may contain dots (C{ipmi-10.49.16.17}); in TOML such a
name must be quoted (C{[credentials."ipmi-10.49.16.17"]}), otherwise the
dots make nested tables.  L{write_secrets} quotes them.

The secret values never leave this module in a readable form by accident:
the C{repr}/C{str} of a L{Credential} masks them, L{Credential.public_json}
gives only the name and type, and every L{SecretsError} message names the
file and the field, never a value.  L{Secrets.redact} masks secret values in
any text (logs, command output, error messages from peers).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import tomli_w
from attrs import field, fields, frozen

from roller.errors import ValidationError
from roller.inventory import CREDENTIAL_RE

KINDS = ("password", "ssh-key", "snmp-community", "snmp-v3", "token")
AUTH_PROTOCOLS = ("SHA", "SHA224", "SHA256", "SHA384", "SHA512", "MD5")
PRIV_PROTOCOLS = ("AES", "AES192", "AES256", "DES")
NONE = "none"
REDACTED = "***"

# Attribute names holding secret values; never shown, always redacted.
SECRET_FIELDS = frozenset(
    {"password", "passphrase", "community", "read_community", "auth_key", "priv_key", "value"}
)

# Per kind: (required fields, optional fields).  snmp-v3 keys are checked
# against their protocols in L{_check_snmp_v3}.
_KIND_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "password": (("username", "password"), ()),
    "ssh-key": (("path",), ("passphrase",)),
    "snmp-community": (("community",), ("read_community",)),
    "snmp-v3": (("user",), ("auth_protocol", "auth_key", "priv_protocol", "priv_key")),
    "token": (("value",), ()),
}

# SNMPv3 (RFC 3414 / net-snmp) refuses pass phrases shorter than 8 characters.
SNMP_V3_MIN_KEY = 8

# Taskcluster's clientId characters; every one is valid in a Hawk header.
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9!@/:.+|_-]{1,128}$")
CLIENT_TOKEN_MIN = 16
_CLIENT_KEYS = ("access_token", "scopes")


class SecretsError(Exception):
    """
    The secrets file cannot be used.

    The message is one line naming the file and the reason; it never holds
    a secret value.

    @ivar path: the file, or C{None} when no file is involved.
    @ivar reason: the reason alone.
    """

    def __init__(self, reason: str, path: str | None = None):
        self.path = path
        self.reason = reason
        message = f"secrets file {path}: {reason}" if path is not None else reason
        super().__init__(" ".join(message.split()))
        self.message = str(self)


class UnknownCredential(KeyError):
    """No credential of that name is in the secrets file."""

    def __init__(self, name: str, path: str | None = None):
        super().__init__(name)
        self.name = name
        self.path = path

    def __str__(self) -> str:
        where = f" in {self.path}" if self.path else ""
        return f"unknown credential {self.name!r}{where}"


def _check_table(section: str, name: str, what: str, table: Any, key: str, missing: str) -> None:
    """
    C{[section.name]} must be a table holding C{key}; a table of tables is
    an unquoted dotted name, which the message says how to write.
    """
    where = f"{section}.{name}"
    if not isinstance(table, Mapping):
        raise ValidationError(where, f"must be a table, got {_typename(table)}")
    if key not in table:
        if table and all(isinstance(v, Mapping) for v in table.values()):
            raise ValidationError(where, f"has no {key}; {what} containing dots must be quoted, "
                                  f'e.g. [{section}."{name}.{next(iter(table))}"]')
        raise ValidationError(f"{where}.{key}", missing)


class CredentialConflict(SecretsError):
    """
    L{Secrets.merged} was asked to replace credentials with different values.

    @ivar names: the conflicting credential names, sorted.
    """

    def __init__(self, names: Iterable[str]):
        self.names = tuple(sorted(names))
        super().__init__(
            "credential(s) already exist with a different value: "
            + ", ".join(self.names)
            + " (remove or rename them first, or replace them explicitly)"
        )


def _typename(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


@frozen(repr=False)
class Credential:
    """
    A named secret.

    Only the fields of its C{kind} are set (see the module docstring); the
    others are C{None}.  Construction validates, raising L{ValidationError}
    whose field is C{credentials.NAME.FIELD} and whose reason never shows a
    secret value.

    @ivar name: how machines refer to it.
    @ivar kind: one of L{KINDS} (the C{type} key in the file).
    """

    name: str
    kind: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    path: str | None = None
    passphrase: str | None = field(default=None, repr=False)
    community: str | None = field(default=None, repr=False)
    read_community: str | None = field(default=None, repr=False)
    user: str | None = None
    auth_protocol: str | None = None
    auth_key: str | None = field(default=None, repr=False)
    priv_protocol: str | None = None
    priv_key: str | None = field(default=None, repr=False)
    value: str | None = field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not CREDENTIAL_RE.match(self.name):
            shown = self.name[:80] if isinstance(self.name, str) else _typename(self.name)
            raise ValidationError("credentials", f"credential name {shown!r} is not valid "
                                  "(letters, digits, '-', '_', '.'; at most 128)")
        where = f"credentials.{self.name}"
        if self.kind not in KINDS:
            shown = self.kind if isinstance(self.kind, str) else _typename(self.kind)
            raise ValidationError(f"{where}.type", f"unknown type {str(shown)[:40]!r}; "
                                  f"expected one of {', '.join(KINDS)}")
        required, optional = _KIND_FIELDS[self.kind]
        for name in _field_names():
            value = getattr(self, name)
            if value is None:
                if name in required:
                    raise ValidationError(f"{where}.{name}", f"is required for type {self.kind}")
                continue
            if name not in required and name not in optional:
                raise ValidationError(f"{where}.{name}", f"does not apply to type {self.kind}")
            if not isinstance(value, str):
                raise ValidationError(f"{where}.{name}", f"must be a string, got {_typename(value)}")
            if value == "":
                raise ValidationError(f"{where}.{name}", "must not be empty")
        if self.kind == "snmp-v3":
            _check_snmp_v3(self, where)

    @classmethod
    def from_toml(cls, name: str, table: Any) -> Credential:
        """
        Parse the table C{[credentials.NAME]}.

        @raise ValidationError: unknown keys, a missing or ill-typed field.
        """
        where = f"credentials.{name}"
        _check_table("credentials", name, "a name", table, "type", f"is required (one of {', '.join(KINDS)})")
        kind = table["type"]
        if not isinstance(kind, str):
            raise ValidationError(f"{where}.type", f"must be a string, got {_typename(kind)}")
        unknown = sorted(set(table) - {"type"} - set(_field_names()))
        if unknown:
            raise ValidationError(where, f"unknown key(s): {', '.join(unknown)}")
        kwargs = {k: v for k, v in table.items() if k != "type"}
        if kind == "snmp-v3":
            for key in ("auth_protocol", "priv_protocol"):
                if isinstance(kwargs.get(key), str):
                    kwargs[key] = _canonical_protocol(kwargs[key])
        return cls(name=name, kind=kind, **kwargs)

    def to_toml(self) -> dict[str, str]:
        """The table for the secrets file: C{type} and the set fields."""
        out = {"type": self.kind}
        out.update((n, v) for n in _field_names() if (v := getattr(self, n)) is not None)
        return out

    def public_json(self) -> dict[str, str]:
        """What the API and dashboard may show: the name and the type."""
        return {"name": self.name, "type": self.kind}

    def secret_values(self) -> frozenset[str]:
        """Every secret string this credential holds."""
        return frozenset(v for n in SECRET_FIELDS if (v := getattr(self, n)))

    def __repr__(self) -> str:
        parts = [f"name={self.name!r}", f"kind={self.kind!r}"]
        for name in _field_names():
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={REDACTED if name in SECRET_FIELDS else repr(value)}")
        return f"Credential({', '.join(parts)})"

    __str__ = __repr__


def _printable(value: str) -> bool:
    return all(0x20 <= ord(c) <= 0x7E for c in value)


@frozen(repr=False)
class HawkClient:
    """
    A Hawk client of C{auth.mode = "local"}: the table C{[clients.ID]}.

    Construction validates, raising L{ValidationError} whose field is
    C{clients.ID.KEY} and whose reason never shows the token.
    """

    id: str
    access_token: str = field(repr=False)
    scopes: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.id, str) or not CLIENT_ID_RE.match(self.id):
            shown = self.id[:80] if isinstance(self.id, str) else _typename(self.id)
            raise ValidationError("clients", f"client id {shown!r} is not valid (letters, digits and "
                                  "!@/:.+|_- ; at most 128)")
        where = f"clients.{self.id}"
        token = self.access_token
        if not isinstance(token, str):
            raise ValidationError(f"{where}.access_token", f"must be a string, got {_typename(token)}")
        if len(token) < CLIENT_TOKEN_MIN or not _printable(token) or " " in token:
            raise ValidationError(f"{where}.access_token", f"must be at least {CLIENT_TOKEN_MIN} printable "
                                  "ASCII characters without spaces")
        if not isinstance(self.scopes, tuple) or not all(isinstance(v, str) and _printable(v) for v in self.scopes):
            raise ValidationError(f"{where}.scopes", "must be a list of scopes (printable ASCII strings)")

    @classmethod
    def from_toml(cls, client_id: str, table: Any) -> HawkClient:
        """
        Parse the table C{[clients.ID]}.

        @raise ValidationError: unknown keys, a missing or ill-typed field.
        """
        where = f"clients.{client_id}"
        _check_table("clients", client_id, "a client id", table, "access_token", "is required")
        unknown = sorted(set(table) - set(_CLIENT_KEYS))
        if unknown:
            raise ValidationError(where, f"unknown key(s): {', '.join(unknown)} (expected "
                                  f"{', '.join(_CLIENT_KEYS)})")
        scopes = table.get("scopes", [])
        if not isinstance(scopes, list):
            raise ValidationError(f"{where}.scopes", f"must be a list of scopes, got {_typename(scopes)}")
        return cls(id=client_id, access_token=table["access_token"], scopes=tuple(scopes))

    def to_toml(self) -> dict[str, Any]:
        return {"access_token": self.access_token, "scopes": list(self.scopes)}

    def public_json(self) -> dict[str, Any]:
        """What may be shown: the id and the scopes, never the token."""
        return {"id": self.id, "scopes": list(self.scopes)}

    def secret_values(self) -> frozenset[str]:
        return frozenset({self.access_token})

    def __repr__(self) -> str:
        return f"HawkClient(id={self.id!r}, access_token={REDACTED}, scopes={self.scopes!r})"

    __str__ = __repr__


def _field_names() -> tuple[str, ...]:
    """The value fields of L{Credential} (everything but name and kind)."""
    return tuple(a.name for a in fields(Credential)[2:])


def _canonical_protocol(value: str) -> str:
    return NONE if value.lower() == NONE else value.upper()


def _check_snmp_v3(cred: Credential, where: str) -> None:
    """Check the protocol/key pairs of an C{snmp-v3} credential."""
    pairs = (
        ("auth_protocol", "auth_key", AUTH_PROTOCOLS),
        ("priv_protocol", "priv_key", PRIV_PROTOCOLS),
    )
    for proto_name, key_name, choices in pairs:
        proto = getattr(cred, proto_name) or NONE
        key = getattr(cred, key_name)
        if proto != NONE and proto not in choices:
            raise ValidationError(f"{where}.{proto_name}", f"unknown protocol {proto[:20]!r}; expected one of "
                                  f"{', '.join(choices)} or none")
        if proto == NONE and key is not None:
            raise ValidationError(f"{where}.{key_name}", f"is set but {proto_name} is none")
        if proto != NONE and key is None:
            raise ValidationError(f"{where}.{key_name}", f"is required when {proto_name} is {proto}")
        if key is not None and len(key) < SNMP_V3_MIN_KEY:
            raise ValidationError(f"{where}.{key_name}", f"must be at least {SNMP_V3_MIN_KEY} characters")
    if (cred.priv_protocol or NONE) != NONE and (cred.auth_protocol or NONE) == NONE:
        raise ValidationError(f"{where}.priv_protocol", "privacy needs authentication: set auth_protocol too")


def _credential_dict(credentials: Mapping[str, Credential]) -> dict[str, Credential]:
    return dict(credentials)


def _client_dict(clients: Mapping[str, HawkClient]) -> dict[str, HawkClient]:
    return dict(clients)


@frozen(repr=False)
class Secrets:
    """
    The credentials of one secrets file, by name.

    @ivar path: the file they came from, if any (used in messages).
    """

    _credentials: Mapping[str, Credential] = field(factory=dict, converter=_credential_dict)
    path: str | None = None
    #: The Hawk clients of C{auth.mode = "local"}, by id.
    clients: Mapping[str, HawkClient] = field(factory=dict, converter=_client_dict)

    def __attrs_post_init__(self) -> None:
        for name, cred in self._credentials.items():
            if not isinstance(cred, Credential) or cred.name != name:
                raise ValueError(f"credential registered as {name!r} is not a Credential named {name!r}")
        for cid, client in self.clients.items():
            if not isinstance(client, HawkClient) or client.id != cid:
                raise ValueError(f"client registered as {cid!r} is not a HawkClient with id {cid!r}")

    def get(self, name: str) -> Credential:
        """
        The credential called C{name}.

        @raise UnknownCredential: there is none.
        """
        try:
            return self._credentials[name]
        except (KeyError, TypeError):
            raise UnknownCredential(name, self.path) from None

    def names(self) -> tuple[str, ...]:
        """The credential names, sorted."""
        return tuple(sorted(self._credentials))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._credentials

    def __len__(self) -> int:
        return len(self._credentials)

    def __iter__(self) -> Iterator[str]:
        """The credential names, sorted (like a mapping)."""
        return iter(self.names())

    def __repr__(self) -> str:
        clients = f", clients={sorted(self.clients)!r}" if self.clients else ""
        return f"Secrets(path={self.path!r}, names={list(self.names())!r}{clients})"

    __str__ = __repr__

    def as_dict(self) -> dict[str, Credential]:
        """A copy of the name -> credential mapping."""
        return dict(self._credentials)

    def secret_values(self) -> set[str]:
        """Every secret string of every credential and client."""
        values = {v for cred in self._credentials.values() for v in cred.secret_values()}
        return values | {v for client in self.clients.values() for v in client.secret_values()}

    def redact(self, text: str) -> str:
        """
        Replace every secret value occurring in C{text} with C{***}.

        Longer secrets are replaced first, so a secret containing another is
        masked whole.  The backslash-escaped form a secret takes inside a
        Python C{repr} is masked too.
        """
        forms = set()
        for secret in self.secret_values():
            forms.add(secret)
            forms.add(repr(secret)[1:-1])
        for form in sorted(forms, key=len, reverse=True):
            if form:
                text = text.replace(form, REDACTED)
        return text

    def conflicts(self, new: Mapping[str, Credential]) -> tuple[str, ...]:
        """Names in C{new} that exist here with a different value, sorted."""
        return tuple(sorted(
            name for name, cred in new.items()
            if name in self._credentials and self._credentials[name] != cred
        ))

    def merged(self, new: Mapping[str, Credential], *, replace: bool = False) -> Secrets:
        """
        These credentials plus C{new}.

        A name already present with the same value is kept as is.  A name
        present with a different value is never overwritten silently: unless
        C{replace} is true, L{CredentialConflict} is raised listing every
        such name, and nothing is merged.  Use L{conflicts} to check first.

        @raise CredentialConflict: see above.
        @raise ValueError: a key of C{new} is not its credential's name.
        """
        for name, cred in new.items():
            if not isinstance(cred, Credential) or cred.name != name:
                raise ValueError(f"credential registered as {name!r} is not a Credential named {name!r}")
        clashes = self.conflicts(new)
        if clashes and not replace:
            raise CredentialConflict(clashes)
        merged = dict(self._credentials)
        merged.update(new)
        return Secrets(merged, path=self.path, clients=self.clients)


def parse_secrets(data: Mapping[str, Any], path: str | None = None) -> Secrets:
    """
    Build L{Secrets} from a parsed secrets document.

    @raise SecretsError: unknown top-level keys, unknown type, missing or
        ill-typed fields.
    """
    unknown = sorted(set(data) - {"credentials", "clients"})
    if unknown:
        raise SecretsError(f"unknown top-level key(s) {', '.join(unknown)}; "
                           "expected only [credentials.NAME] and [clients.ID] tables", path)
    tables = data.get("credentials", {})
    if not isinstance(tables, Mapping):
        raise SecretsError(f"credentials must be a table, got {_typename(tables)}", path)
    creds = {}
    for name, table in tables.items():
        try:
            creds[name] = Credential.from_toml(name, table)
        except ValidationError as e:
            raise SecretsError(e.message, path) from None
    client_tables = data.get("clients", {})
    if not isinstance(client_tables, Mapping):
        raise SecretsError(f"clients must be a table, got {_typename(client_tables)}", path)
    clients = {}
    for cid, table in client_tables.items():
        try:
            clients[cid] = HawkClient.from_toml(cid, table)
        except ValidationError as e:
            raise SecretsError(e.message, path) from None
    return Secrets(creds, path=path, clients=clients)


def load_secrets(path: str | os.PathLike) -> Secrets:
    """
    Read and validate the secrets file at C{path}.

    A missing file is not an error: it yields an empty L{Secrets} and no
    message at all (a fresh install has no secrets yet; machines naming a
    credential then fail with L{UnknownCredential} when used).  Every other
    problem is refused.

    @raise SecretsError: the file is not a regular file, is accessible by
        group or others (C{mode & 0o077}), cannot be read, is not UTF-8 TOML,
        or holds an unknown type or a missing or ill-typed field.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return Secrets(path=path)
    except OSError as e:
        raise SecretsError(f"cannot open: {e.strerror}", path) from None
    try:
        st = os.fstat(fd)  # the file opened, not whatever the path names now
        if not stat.S_ISREG(st.st_mode):
            raise SecretsError("is not a regular file", path)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise SecretsError(f"is accessible by group or others (mode {mode:04o}); "
                               f"run: chmod 600 {path}", path)
        try:
            raw = _read_all(fd)
        except OSError as e:
            raise SecretsError(f"cannot read: {e.strerror}", path) from None
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SecretsError(f"is not UTF-8 (byte {e.start})", path) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SecretsError(f"is not valid TOML: {e}", path) from None
    return parse_secrets(data, path)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def merge_into_secrets_file(path: str | os.PathLike, credentials: Mapping[str, Credential]) -> None:
    """
    Add C{credentials} to the secrets file at C{path} and write it back
    atomically (L{Secrets.merged}: a name already there with other values
    is a L{CredentialConflict}).  Blocking (it fsyncs): call it in a thread
    from the reactor.
    """
    write_secrets(path, load_secrets(path).merged(credentials))


def write_secrets(path: str | os.PathLike, secrets: Secrets | Mapping[str, Credential]) -> None:
    """
    Write C{secrets} to C{path} atomically, mode 0600.

    The content goes to a temporary file in the same directory (created
    0600), is flushed and fsynced, then renamed over C{path}; the directory
    is fsynced so the rename survives a crash.  Readers see the old file or
    the new one, never a mix.  The whole file is rewritten: comments and
    formatting of the previous file are not kept.  A symlink at C{path} is
    replaced by the regular file.  The C{[clients.ID]} tables written are
    those of C{secrets} (none when it is a plain mapping of credentials).
    """
    path = os.fspath(path)
    creds = secrets.as_dict() if isinstance(secrets, Secrets) else dict(secrets)
    clients = dict(secrets.clients) if isinstance(secrets, Secrets) else {}
    Secrets(creds, clients=clients)  # validates that keys match names
    document: dict[str, Any] = {"credentials": {name: creds[name].to_toml() for name in sorted(creds)}}
    if clients:
        document["clients"] = {cid: clients[cid].to_toml() for cid in sorted(clients)}
    payload = tomli_w.dumps(document).encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
