"""
The SSH known_hosts file roller owns: reading, matching, appending.

Format
======

The file is OpenSSH's own C{known_hosts} format (sshd(8), "SSH_KNOWN_HOSTS
FILE FORMAT"), so an operator can fill it with C{ssh-keyscan} and check it
with C{ssh -o UserKnownHostsFile=FILE}::

    # comment
    10.49.16.17 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI... roller accept-new 2025-01-31T03:12:00Z
    [10.49.16.18]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI...
    mac-01.example.com,10.49.16.19 ecdsa-sha2-nistp256 AAAAE2VjZHNh...
    |1|F1E1KeoE/eEWhi10WpGv4OdiO6Y=|3988QV0VE8wmZL7suNrYQLITLCg= ssh-rsa AAAAB3...
    @revoked * ssh-rsa AAAAB3...

One key per line: comma-separated host patterns, the key type, the
base64 public key blob, an optional comment.

  - A host on port 22 is written as C{HOST}; on any other port as
    C{[HOST]:PORT}, exactly as C{ssh} and C{ssh-keyscan -p PORT} write it.
    Unlike Conch's C{KnownHostsFile} (which ignores ports), a lookup here
    is by host I{and} port, so many machines behind one address (a fleet
    simulator on 127.0.0.1, port-forwarded consoles) each keep their own
    key.  Host names are matched case-insensitively.
  - Hashed patterns (C{|1|salt|hmac}, C{ssh-keyscan -H}), wildcards C{*}
    and C{?}, and negations C{!pattern} are understood.
  - C{@revoked} lines name keys that are refused for the hosts they match;
    C{@cert-authority} lines are ignored (Conch offers no host
    certificates).
  - Lines that cannot be parsed are skipped (and logged with their line
    number), like OpenSSH does.

Lookup semantics (L{KnownHosts.lookup}): if any line for the host carries
the presented key, the key is L{KNOWN}; if the host has lines but none
with this key -- whatever their key type -- it is L{CHANGED} (this is
stricter than OpenSSH, which would call a key of a type it has no line for
"new"; an attacker must not be able to dodge a pinned key by offering
another algorithm); if the host has no line at all it is L{UNKNOWN}.

L{KnownHosts.add} appends one plain C{HOST keytype base64 comment} line
under an exclusive C{flock}, after re-reading the file under that lock,
with a single C{write(2)} on a descriptor opened with C{O_APPEND}: existing
lines are never rewritten, two roller processes cannot both add a key for
the same host, and a reader never sees half a line.  A new file is created
with mode 0600.

This module knows the file format only; the policy (strict or
accept-new) and the errors operators see are in L{roller.drivers.ssh}.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import functools
import hashlib
import hmac
import os
import re
from collections.abc import Iterable

from attrs import frozen
from twisted.logger import Logger

log = Logger()

__all__ = [
    "CHANGED",
    "KNOWN",
    "KnownHostEntry",
    "KnownHosts",
    "Lookup",
    "REVOKED",
    "UNKNOWN",
    "fingerprint",
    "host_name",
]

KNOWN = "known"
UNKNOWN = "unknown"
CHANGED = "changed"
REVOKED = "revoked"

_MARKERS = ("@revoked", "@cert-authority")


def host_name(host: str, port: int) -> str:
    """
    The name a host is filed under: C{host} on port 22, else C{[host]:port}
    (what C{ssh} and C{ssh-keyscan} write).
    """
    host = host.lower()
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(blob: bytes) -> str:
    """
    The SHA-256 fingerprint of a public key blob as OpenSSH prints it
    (C{ssh-keygen -lf}): C{SHA256:} and unpadded base64.
    """
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        try:
            _, _, salt, digest = pattern.split("|", 3)
            salt_b = base64.b64decode(salt, validate=True)
            digest_b = base64.b64decode(digest, validate=True)
        except (ValueError, binascii.Error):
            return False
        mac = hmac.new(salt_b, name.encode("utf-8"), hashlib.sha1).digest()
        return hmac.compare_digest(mac, digest_b)
    if "*" not in pattern and "?" not in pattern:  # a literal: no regular expression to build
        return pattern.lower() == name
    return _glob(pattern.lower()).fullmatch(name) is not None


@functools.lru_cache(maxsize=4096)
def _glob(pattern: str) -> re.Pattern[str]:
    """OpenSSH host patterns: C{*} and C{?} are wildcards, all else literal (C{[} too)."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                              for c in pattern), re.DOTALL)


@frozen
class KnownHostEntry:
    """
    One parsed line.

    @ivar line_number: 1-based, for messages.
    @ivar marker: C{None}, C{"@revoked"} or C{"@cert-authority"}.
    @ivar patterns: The host patterns, as written.
    @ivar key_type: E.g. C{"ssh-ed25519"}.
    @ivar blob: The decoded public key blob.
    @ivar comment: The rest of the line.
    """

    line_number: int
    marker: str | None
    patterns: tuple[str, ...]
    key_type: str
    blob: bytes
    comment: str = ""

    @classmethod
    def parse(cls, line: str, line_number: int) -> KnownHostEntry | None:
        """
        Parse one line; C{None} for blank lines and comments.

        @raise ValueError: The line is malformed.
        """
        text = line.strip()
        if not text or text.startswith("#"):
            return None
        fields = text.split(None, 4 if text.startswith("@") else 3)
        marker = None
        if fields[0].startswith("@"):
            marker = fields.pop(0)
            if marker not in _MARKERS:
                raise ValueError(f"unknown marker {marker[:20]!r}")
        if len(fields) < 3:
            raise ValueError("expected HOSTS KEYTYPE BASE64 [COMMENT]")
        patterns, key_type, b64 = fields[0], fields[1], fields[2]
        try:
            blob = base64.b64decode(b64, validate=True)
        except (ValueError, binascii.Error):
            raise ValueError("the key is not valid base64") from None
        if not blob:
            raise ValueError("the key is empty")
        return cls(
            line_number=line_number,
            marker=marker,
            patterns=tuple(p for p in patterns.split(",") if p),
            key_type=key_type,
            blob=blob,
            comment=fields[3] if len(fields) > 3 else "",
        )

    def matches(self, name: str) -> bool:
        """
        Does this line apply to C{name} (from L{host_name})?  A matching
        negated pattern (C{!pattern}) excludes the line whatever else
        matches.
        """
        name = name.lower()
        hit = False
        for pattern in self.patterns:
            if pattern.startswith("!"):
                if _pattern_matches(pattern[1:], name):
                    return False
            elif _pattern_matches(pattern, name):
                hit = True
        return hit

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.blob)

    def describe(self) -> str:
        """E.g. C{"ssh-ed25519 SHA256:abc... (line 3)"}."""
        return f"{self.key_type} {self.fingerprint} (line {self.line_number})"


@frozen
class Lookup:
    """
    What the file says about a presented key.

    @ivar status: L{KNOWN}, L{UNKNOWN}, L{CHANGED} or L{REVOKED}.
    @ivar name: The name looked up (C{HOST} or C{[HOST]:PORT}).
    @ivar entries: The lines filed for that name (for L{CHANGED}: what was
        expected; for L{REVOKED}: the C{@revoked} line).
    """

    status: str
    name: str
    entries: tuple[KnownHostEntry, ...] = ()


def lookup_in(entries: Iterable[KnownHostEntry], name: str, key_type: str, blob: bytes) -> Lookup:
    """Apply the lookup semantics of the module docstring to parsed lines."""
    filed: list[KnownHostEntry] = []
    for entry in entries:
        if entry.marker == "@cert-authority" or not entry.matches(name):
            continue
        if entry.marker == "@revoked":
            if entry.blob == blob:
                return Lookup(REVOKED, name, (entry,))
            continue
        filed.append(entry)
    if any(e.blob == blob and e.key_type == key_type for e in filed):
        return Lookup(KNOWN, name, tuple(filed))
    if filed:
        return Lookup(CHANGED, name, tuple(filed))
    return Lookup(UNKNOWN, name)


def parse_text(text: str, path: str = "known_hosts") -> list[KnownHostEntry]:
    """Parse a whole file's text, skipping (and logging) malformed lines."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = KnownHostEntry.parse(line, number)
        except ValueError as e:
            log.warn("{path}:{line}: skipping malformed known_hosts line: {why}",
                     path=path, line=number, why=str(e))
            continue
        if entry is not None:
            entries.append(entry)
    return entries


@frozen
class _Parsed:
    """A file's lines as parsed at one identity, literal patterns indexed."""

    ident: tuple[int, int, int, int]
    entries: tuple[KnownHostEntry, ...]
    literal: dict[str, list[KnownHostEntry]]
    other: tuple[KnownHostEntry, ...]  # wildcard, negated or hashed patterns: always scanned

    @classmethod
    def of(cls, ident: tuple[int, int, int, int], entries: list[KnownHostEntry]) -> _Parsed:
        literal: dict[str, list[KnownHostEntry]] = {}
        other = []
        for e in entries:
            if all(not (set(p) & set("*?!|")) for p in e.patterns):
                for p in e.patterns:
                    literal.setdefault(p.lower(), []).append(e)
            else:
                other.append(e)
        return cls(ident, tuple(entries), literal, tuple(other))

    def candidates(self, name: str) -> list[KnownHostEntry]:
        """The lines that may match C{name}, in file order."""
        found = self.literal.get(name.lower(), [])
        if not self.other:
            return found
        return sorted([*found, *self.other], key=lambda e: e.line_number)


class KnownHosts:
    """
    One known_hosts file.  Every lookup checks the file's identity (one
    C{stat}: device, inode, mtime, size), so an operator's edit takes effect
    on the next connection; the parsed lines are kept until it changes,
    with literal host patterns indexed (a fleet of thousands of hosts costs
    a dict lookup per handshake, not a parse).

    @ivar path: The file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._parsed: _Parsed | None = None

    def __repr__(self) -> str:
        return f"KnownHosts({self.path!r})"

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def _current(self) -> _Parsed | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        ident = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if self._parsed is None or self._parsed.ident != ident:
            try:
                with open(self.path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            self._parsed = _Parsed.of(ident, parse_text(data.decode("utf-8", "replace"), self.path))
        return self._parsed

    def entries(self) -> list[KnownHostEntry]:
        """
        The parsed lines; none if the file does not exist.

        @raise OSError: It exists but cannot be read.
        """
        parsed = self._current()
        return [] if parsed is None else list(parsed.entries)

    def lookup(self, host: str, port: int, key_type: str, blob: bytes) -> Lookup:
        """
        Look up the key C{host}:C{port} presented.

        @raise OSError: The file exists but cannot be read.
        """
        name = host_name(host, port)
        parsed = self._current()
        return lookup_in(() if parsed is None else parsed.candidates(name), name, key_type, blob)

    def add(self, host: str, port: int, key_type: str, blob: bytes, comment: str = "") -> Lookup:
        """
        File the key for C{host}:C{port} unless the file (re-read under an
        exclusive lock) already has lines for that host.

        @return: The lookup made under the lock: L{UNKNOWN} if the line was
            appended (now known), otherwise what the file says (L{KNOWN},
            L{CHANGED}, L{REVOKED}) -- nothing was written then.

        @raise OSError: The file cannot be created, read or written.
        """
        name = host_name(host, port)
        line = f"{name} {key_type} {base64.b64encode(blob).decode('ascii')}"
        if comment:
            line += " " + " ".join(comment.split())
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            data = b"".join(chunks)
            found = lookup_in(parse_text(data.decode("utf-8", "replace"), self.path),
                              name, key_type, blob)
            if found.status != UNKNOWN:
                return found
            prefix = b"\n" if data and not data.endswith(b"\n") else b""
            payload = prefix + line.encode("utf-8") + b"\n"
            written = os.write(fd, payload)
            if written != len(payload):  # pragma: no cover - regular files write whole
                raise OSError(f"short write to {self.path}")
            os.fsync(fd)
            log.info("added the {key_type} host key of {name} ({fp}) to {path}",
                     key_type=key_type, name=name, fp=fingerprint(blob), path=self.path)
            return found
        finally:
            os.close(fd)  # also releases the lock
