"""
Tests for L{roller.drivers.ssh} and L{roller.drivers.known_hosts}.

Unit tests run on L{MemoryReactorClock} with fakes of Conch's channel;
integration tests run Conch against a real OpenSSH sshd
(L{roller.testing.sshd.SshServer}) on 127.0.0.1 through C{pytest_twisted},
and are skipped only when C{/usr/sbin/sshd} is not installed.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.connection import EXTENDED_DATA_STDERR
from twisted.conch.ssh.keys import FingerprintFormats, Key
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides
from zope.interface.verify import verifyObject

from roller.drivers import known_hosts as kh
from roller.drivers.ssh import (
    MAX_OUTPUT,
    CommandResult,
    ConchShell,
    HostKeyChanged,
    HostKeyRevoked,
    HostKeyUnknown,
    IRemoteShell,
    SshAuthFailed,
    SshCommandTimeout,
    SshConfigError,
    SshConnectFailed,
    SshConnectionLost,
    SshKeyError,
    SshTarget,
    _CommandProtocol,
    _Run,
    _Stream,
    ssh_target,
)
from roller.inventory import Machine
from roller.secrets import Credential, Secrets
from roller.testing.results import eventually
from roller.testing.sshd import SshServer, generate_key, skip_reason

SKIP_SSHD = skip_reason()
needs_sshd = pytest.mark.skipif(SKIP_SSHD is not None, reason=SKIP_SSHD or "")


def _key() -> Key:
    return Key(ed25519.Ed25519PrivateKey.generate())


def _pub(key: Key) -> tuple[str, bytes]:
    public = key.public()
    return public.sshType().decode(), public.blob()


def _line(name: str, key: Key, comment: str = "") -> str:
    key_type, blob = _pub(key)
    return f"{name} {key_type} {base64.b64encode(blob).decode()}{' ' + comment if comment else ''}"


def _ecdsa_key() -> Key:
    return Key(ec.generate_private_key(ec.SECP256R1()))


def _write_key(path: Path, key: Key, passphrase: bytes | None = None) -> Path:
    """
    Unencrypted: OpenSSH v1 format.  Encrypted: PEM (so give an ECDSA key),
    because Conch encrypts v1 keys with 100 bcrypt rounds (~1 s each way);
    the real-sshd tests cover v1 keys encrypted by ssh-keygen.
    """
    subtype = "PEM" if passphrase else "v1"
    path.write_bytes(key.toString("openssh", subtype=subtype, passphrase=passphrase))
    path.chmod(0o600)
    return path


def _tempdir(case: SynchronousTestCase) -> Path:
    """A fresh directory removed after the test (trial's mktemp writes under the cwd)."""
    path = Path(tempfile.mkdtemp(prefix="roller-test-ssh-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


def _real_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# ---------------------------------------------------------------- known_hosts format


class KnownHostsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = _key()
        self.other = _key()
        self.type, self.blob = _pub(self.key)
        self.path = _tempdir(self) / "known_hosts"
        self.hosts = kh.KnownHosts(self.path)

    def lookup(self, host: str, port: int = 22, key: Key | None = None) -> kh.Lookup:
        key_type, blob = _pub(key or self.key)
        return self.hosts.lookup(host, port, key_type, blob)

    def test_host_name(self) -> None:
        self.assertEqual(kh.host_name("10.0.0.5", 22), "10.0.0.5")
        self.assertEqual(kh.host_name("Mac-01.Example.COM", 22), "mac-01.example.com")
        self.assertEqual(kh.host_name("127.0.0.1", 2222), "[127.0.0.1]:2222")

    def test_fingerprint_is_openssh_sha256(self) -> None:
        expected = self.key.public().fingerprint(FingerprintFormats.SHA256_BASE64).rstrip("=")
        self.assertEqual(kh.fingerprint(self.blob), "SHA256:" + expected)

    def test_missing_file_is_unknown(self) -> None:
        self.assertEqual(self.lookup("127.0.0.1").status, kh.UNKNOWN)

    def test_edits_take_effect_on_the_next_lookup(self) -> None:
        """The parsed file is kept, but an edit (another size or mtime) is seen at once."""
        self.path.write_text(_line("127.0.0.1", self.key))
        self.assertEqual(self.lookup("127.0.0.1").status, kh.KNOWN)
        self.assertEqual(self.lookup("127.0.0.2").status, kh.UNKNOWN)
        self.path.write_text(_line("127.0.0.1", self.other) + "\n" + _line("127.0.0.2", self.key) + "\n")
        self.assertEqual(self.lookup("127.0.0.1").status, kh.CHANGED)
        self.assertEqual(self.lookup("127.0.0.2").status, kh.KNOWN)
        self.path.unlink()
        self.assertEqual(self.lookup("127.0.0.2").status, kh.UNKNOWN)

    def test_wildcards_still_match_among_literal_lines(self) -> None:
        self.path.write_text(_line("10.0.0.1", self.other) + "\n" + _line("127.0.0.*", self.key) + "\n")
        self.assertEqual(self.lookup("127.0.0.9").status, kh.KNOWN)
        self.assertEqual(self.lookup("10.0.0.1", key=self.key).status, kh.CHANGED)

    def test_ports_are_distinct(self) -> None:
        """
        C{[HOST]:PORT} lines are per port, and a bare C{HOST} line is port
        22 only (Conch's KnownHostsFile would match them all).
        """
        self.path.write_text(_line("[127.0.0.1]:2222", self.key) + "\n" + _line("127.0.0.1", self.other) + "\n")
        self.assertEqual(self.lookup("127.0.0.1", 2222).status, kh.KNOWN)
        self.assertEqual(self.lookup("127.0.0.1", 2223).status, kh.UNKNOWN)
        changed = self.lookup("127.0.0.1", 22)
        self.assertEqual(changed.status, kh.CHANGED)
        self.assertEqual([e.line_number for e in changed.entries], [2])
        self.assertEqual(self.lookup("127.0.0.1", 22, self.other).status, kh.KNOWN)

    def test_brackets_are_not_glob_classes(self) -> None:
        self.path.write_text(_line("[127.0.0.1]:2222", self.key) + "\n")
        self.assertEqual(self.lookup("1", 2222).status, kh.UNKNOWN)

    def test_literal_hosts_build_no_pattern(self) -> None:
        """
        A fleet's literal lines are compared as strings: no regular
        expression per host (thousands of hosts would overflow the cache of
        compiled patterns and compile one per handshake).
        """
        self.path.write_text("".join(_line(f"[10.0.{i // 250}.{i % 250}]:2222", self.key) + "\n"
                                     for i in range(300)) + _line("WEB-1", self.key) + "\n")
        before = kh._glob.cache_info()
        self.assertEqual(self.lookup("10.0.1.7", 2222).status, kh.KNOWN)
        self.assertEqual(self.lookup("web-1").status, kh.KNOWN)
        self.assertEqual(self.lookup("10.0.1.7", 2223).status, kh.UNKNOWN)
        after = kh._glob.cache_info()
        self.assertEqual((after.hits, after.misses), (before.hits, before.misses))

    def test_patterns(self) -> None:
        self.path.write_text(
            "# comment\n\n"
            + _line("mac-01.example.com,10.0.0.5", self.key, "a comment with spaces") + "\n"
            + _line("*.pool.example.com,!bad.pool.example.com", self.key) + "\n"
            + _line("10.0.1.?", self.key) + "\n"
        )
        for host in ("MAC-01.example.com", "10.0.0.5", "a.pool.example.com", "10.0.1.7"):
            self.assertEqual(self.lookup(host).status, kh.KNOWN, host)
        for host in ("bad.pool.example.com", "10.0.1.17", "example.com"):
            self.assertEqual(self.lookup(host).status, kh.UNKNOWN, host)
        entry = kh.parse_text(self.path.read_text())[0]
        self.assertEqual(entry.comment, "a comment with spaces")

    def test_hashed(self) -> None:
        import hashlib
        import hmac

        salt = os.urandom(20)
        digest = hmac.new(salt, b"[10.0.0.9]:2222", hashlib.sha1).digest()
        hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
        self.path.write_text(_line(hashed, self.key) + "\n")
        self.assertEqual(self.lookup("10.0.0.9", 2222).status, kh.KNOWN)
        self.assertEqual(self.lookup("10.0.0.9", 22).status, kh.UNKNOWN)
        self.assertEqual(self.lookup("10.0.0.9", 2222, self.other).status, kh.CHANGED)

    def test_other_key_type_is_changed(self) -> None:
        """A host filed with another key type is CHANGED, not new."""
        rsa_like = "ssh-rsa " + base64.b64encode(b"not really rsa").decode()
        self.path.write_text(f"10.0.0.5 {rsa_like}\n")
        self.assertEqual(self.lookup("10.0.0.5").status, kh.CHANGED)

    def test_revoked_and_cert_authority(self) -> None:
        self.path.write_text(
            "@cert-authority * " + _line("", self.other).strip() + "\n"
            + _line("10.0.0.5", self.key) + "\n"
            + "@revoked * " + _line("", self.key).strip() + "\n"
        )
        found = self.lookup("10.0.0.5")
        self.assertEqual(found.status, kh.REVOKED)
        self.assertEqual(found.entries[0].line_number, 3)
        self.assertEqual(self.lookup("10.0.0.6", key=self.other).status, kh.UNKNOWN)

    def test_malformed_lines_skipped(self) -> None:
        self.path.write_text("garbage\n10.0.0.5 ssh-ed25519 !!!notbase64\n@bogus x y z\n"
                             + _line("10.0.0.5", self.key) + "\n")
        self.assertEqual(self.lookup("10.0.0.5").status, kh.KNOWN)

    def test_add_creates_0600_and_appends(self) -> None:
        found = self.hosts.add("127.0.0.1", 2222, self.type, self.blob, comment="roller  test")
        self.assertEqual(found.status, kh.UNKNOWN)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertEqual(self.path.read_text(), _line("[127.0.0.1]:2222", self.key, "roller test") + "\n")
        self.assertEqual(self.lookup("127.0.0.1", 2222).status, kh.KNOWN)

    def test_add_keeps_content_and_fixes_missing_newline(self) -> None:
        self.path.write_text("# mine")
        self.path.chmod(0o644)
        self.hosts.add("10.0.0.5", 22, self.type, self.blob)
        self.assertEqual(self.path.read_text(), "# mine\n" + _line("10.0.0.5", self.key) + "\n")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o644)

    def test_add_never_overrides(self) -> None:
        """Under the lock the file is re-read: a host known meanwhile is not added again."""
        self.path.write_text(_line("10.0.0.5", self.other) + "\n")
        before = self.path.read_text()
        self.assertEqual(self.hosts.add("10.0.0.5", 22, self.type, self.blob).status, kh.CHANGED)
        other_type, other_blob = _pub(self.other)
        self.assertEqual(self.hosts.add("10.0.0.5", 22, other_type, other_blob).status, kh.KNOWN)
        self.assertEqual(self.path.read_text(), before)


# ---------------------------------------------------------------- targets and keys


def _machine(**kw: Any) -> Machine:
    data = {"worker_id": "mac-01", "worker_group": "mdc1", "ip": "10.0.0.5", **kw}
    return Machine.from_json(data)


def _secrets(tmp_path: Path) -> Secrets:
    return Secrets({
        "relops": Credential(name="relops", kind="ssh-key", path=str(tmp_path / "id"), passphrase="hunter2"),
        "ipmi": Credential(name="ipmi", kind="password", username="admin", password="pw"),
    }, path="/etc/roller/secrets.toml")


def test_ssh_target_defaults(tmp_path: Path) -> None:
    target = ssh_target(_machine(), _secrets(tmp_path), default_user="relops",
                        default_credential="relops")
    assert target == SshTarget(host="10.0.0.5", port=22, user="relops", key_path=str(tmp_path / "id"),
                               passphrase="hunter2", host_key_policy="strict", credential="relops")
    assert "hunter2" not in repr(target)
    assert target.where == "relops@10.0.0.5:22"


def test_ssh_target_machine_overrides(tmp_path: Path) -> None:
    machine = _machine(ip=None, fqdn="mac-01.example.com",
                       ssh={"user": "admin", "port": 2222, "credential": "relops",
                            "host_key_policy": "accept-new"})
    target = ssh_target(machine, _secrets(tmp_path), default_user="relops", default_credential="x")
    assert (target.host, target.port, target.user, target.host_key_policy) == (
        "mac-01.example.com", 2222, "admin", "accept-new")


@pytest.mark.parametrize("machine_kw, defaults, message", [
    ({"ip": None}, {}, "mdc1/mac-01 has neither an ip nor an fqdn"),
    ({}, {"default_user": None}, "no SSH user"),
    ({}, {"default_credential": None}, "no SSH credential"),
    ({}, {"default_credential": "missing"}, "unknown credential 'missing' in /etc/roller/secrets.toml"),
    ({}, {"default_credential": "ipmi"}, "credential 'ipmi' is of type password, not ssh-key"),
    ({}, {"default_policy": "yolo"}, "host_key_policy must be one of strict, accept-new"),
])
def test_ssh_target_errors(tmp_path: Path, machine_kw: dict, defaults: dict, message: str) -> None:
    kw = {"default_user": "relops", "default_credential": "relops", **defaults}
    with pytest.raises(SshConfigError) as e:
        ssh_target(_machine(**machine_kw), _secrets(tmp_path), **kw)
    assert message in str(e.value)
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize("kw", [
    {"host": "-oProxyCommand=x"}, {"host": ""}, {"port": 0}, {"port": True},
    {"user": "a b"}, {"user": ""}, {"key_path": ""}, {"host_key_policy": "accept-all"},
])
def test_ssh_target_validation(kw: dict) -> None:
    base = {"host": "10.0.0.5", "user": "relops", "key_path": "/k"}
    with pytest.raises(SshConfigError):
        SshTarget(**{**base, **kw})


class KeyLoadingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = _tempdir(self)
        self.shell = ConchShell(MemoryReactorClock(), self.dir / "known_hosts")

    def target(self, path: Path, passphrase: str | None = None) -> SshTarget:
        return SshTarget(host="10.0.0.5", user="relops", key_path=str(path), passphrase=passphrase,
                         credential="relops")

    def load_error(self, path: Path, passphrase: str | None = None) -> str:
        with self.assertRaises(SshKeyError) as e:
            self.shell.load_key(self.target(path, passphrase))
        return str(e.exception)

    def test_plain_and_encrypted(self) -> None:
        key, ecdsa = _key(), _ecdsa_key()
        plain = _write_key(self.dir / "plain", key)
        enc = _write_key(self.dir / "enc", ecdsa, b"hunter2")
        self.assertEqual(self.shell.load_key(self.target(plain)).public(), key.public())
        loaded = self.shell.load_key(self.target(enc, "hunter2"))
        self.assertEqual(loaded.public(), ecdsa.public())
        self.assertIs(self.shell.load_key(self.target(enc, "hunter2")), loaded, "not cached")
        enc.write_bytes(plain.read_bytes() + b"\n")  # replaced: read again
        self.assertEqual(self.shell.load_key(self.target(enc, "hunter2")).public(), key.public())

    def test_wrong_passphrase(self) -> None:
        enc = _write_key(self.dir / "enc", _ecdsa_key(), b"hunter2")
        message = self.load_error(enc, "wrong-secret")
        self.assertIn("cannot decrypt SSH key", message)
        self.assertIn("credential 'relops'", message)
        self.assertNotIn("wrong-secret", message)
        self.assertNotIn("hunter2", message)

    def test_encrypted_without_passphrase(self) -> None:
        enc = _write_key(self.dir / "enc", _ecdsa_key(), b"hunter2")
        self.assertIn("is encrypted but no passphrase is configured", self.load_error(enc))

    def test_missing_public_and_garbage(self) -> None:
        self.assertIn("does not exist", self.load_error(self.dir / "nope"))
        pub = self.dir / "id.pub"
        pub.write_bytes(_key().public().toString("openssh"))
        self.assertIn("is a public key", self.load_error(pub))
        garbage = self.dir / "garbage"
        garbage.write_text("TOPSECRETMATERIAL\n")
        message = self.load_error(garbage)
        self.assertIn("not a private key", message)
        self.assertNotIn("TOPSECRET", message)

    def test_run_fails_before_connecting(self) -> None:
        reactor = MemoryReactorClock()
        shell = ConchShell(reactor, self.dir / "known_hosts")
        failure = self.failureResultOf(shell.run(self.target(self.dir / "nope"), "reboot"), SshKeyError)
        self.assertIn("does not exist", str(failure.value))
        self.failureResultOf(shell.run(self.target(self.dir / "nope"), ""), ValueError)
        self.assertEqual(reactor.tcpClients, [])


def test_shell_provides_interface(tmp_path: Path) -> None:
    verifyObject(IRemoteShell, ConchShell(MemoryReactorClock(), tmp_path / "known_hosts"))
    with pytest.raises(ValueError):
        ConchShell(MemoryReactorClock(), tmp_path / "kh", connect_timeout=0)


# ---------------------------------------------------------------- host key policy


class HostKeyPolicyTests(SynchronousTestCase):
    """L{_Run.check_host_key}: what Conch's C{verifyHostKey} calls."""

    def setUp(self) -> None:
        self.dir = _tempdir(self)
        self.path = self.dir / "known_hosts"
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_700_000_000)
        self.shell = ConchShell(self.reactor, self.path)
        self.server_key = _key()

    def check(self, policy: str = "strict", port: int = 2222) -> None:
        target = SshTarget(host="127.0.0.1", port=port, user="u", key_path="/k", host_key_policy=policy)
        _Run(self.shell, target, "reboot", _key(), None).check_host_key(self.server_key.public())

    def test_strict_unknown(self) -> None:
        with self.assertRaises(HostKeyUnknown) as e:
            self.check()
        fp = kh.fingerprint(self.server_key.public().blob())
        self.assertEqual(
            str(e.exception),
            f"host key of 127.0.0.1 (port 2222) is not in {self.path}; verify it and add it with "
            f"`ssh-keyscan -p 2222 127.0.0.1 >> {self.path}`, or set host_key_policy = accept-new "
            f"for this machine (it presented ssh-ed25519 {fp})")
        self.assertFalse(self.path.exists())

    def test_known(self) -> None:
        self.path.write_text(_line("[127.0.0.1]:2222", self.server_key) + "\n")
        self.check()
        self.check("accept-new")

    def test_accept_new_files_the_key(self) -> None:
        self.check("accept-new")
        self.assertEqual(self.path.read_text(), _line("[127.0.0.1]:2222", self.server_key,
                                                      "roller accept-new 2023-11-14T22:13:20Z") + "\n")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.check("strict")

    def test_changed_is_refused_whatever_the_policy(self) -> None:
        stale = _key()
        self.path.write_text("# roller\n" + _line("[127.0.0.1]:2222", stale) + "\n")
        for policy in ("strict", "accept-new"):
            with self.assertRaises(HostKeyChanged) as e:
                self.check(policy)
            message = str(e.exception)
            self.assertIn(f"{kh.fingerprint(stale.public().blob())} (line 2)", message)
            self.assertIn(kh.fingerprint(self.server_key.public().blob()), message)
            self.assertIn(f"ssh-keygen -R '[127.0.0.1]:2222' -f {self.path}", message)
            self.assertEqual(e.exception.expected, (f"ssh-ed25519 {kh.fingerprint(stale.public().blob())} (line 2)",))
        self.assertEqual(self.path.read_text().count("\n"), 2)

    def test_revoked(self) -> None:
        self.path.write_text("@revoked * " + _line("", self.server_key).strip() + "\n")
        with self.assertRaises(HostKeyRevoked):
            self.check("accept-new")

    def test_unreadable_file(self) -> None:
        self.path.mkdir()
        with self.assertRaises(SshConfigError) as e:
            self.check()
        self.assertIn(f"cannot read the known_hosts file {self.path}", str(e.exception))


# ---------------------------------------------------------------- the run, on a memory reactor


def _tcp_string_transport() -> StringTransport:
    transport = StringTransport()
    directlyProvides(transport, ITCPTransport)
    return transport


class MemoryReactorRunTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = _tempdir(self)
        key = _write_key(self.dir / "id", _key())
        self.reactor = MemoryReactorClock()
        self.shell = ConchShell(self.reactor, self.dir / "known_hosts", connect_timeout=5.0)
        self.target = SshTarget(host="10.0.0.5", port=2222, user="relops", key_path=str(key))

    def test_timeout_while_tcp_connecting(self) -> None:
        d = self.shell.run(self.target, "reboot")
        [(host, port, factory, timeout, bind)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("10.0.0.5", 2222))
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        failure = self.failureResultOf(d, SshConnectFailed)
        self.assertEqual(failure.value.reason, "timeout")
        self.assertIn("timed out after 5 s connecting to relops@10.0.0.5:2222 (no SSH handshake",
                      str(failure.value))
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_sessions_beyond_the_limit_wait_for_a_slot(self) -> None:
        """The connect timeout of a waiting run starts only when it gets its slot."""
        shell = ConchShell(self.reactor, self.dir / "known_hosts", connect_timeout=5.0, max_sessions=2)
        first, second = shell.run(self.target, "reboot"), shell.run(self.target, "reboot")
        third = shell.run(self.target, "reboot")
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(shell.sessions_waiting, 1)
        self.reactor.advance(5)  # the first two time out; the third starts connecting now
        self.failureResultOf(first, SshConnectFailed)
        self.failureResultOf(second, SshConnectFailed)
        self.assertEqual(len(self.reactor.tcpClients), 3)
        self.assertNoResult(third)
        self.reactor.advance(5)
        self.failureResultOf(third, SshConnectFailed)

    def test_cancel_while_waiting_for_a_slot_takes_none(self) -> None:
        shell = ConchShell(self.reactor, self.dir / "known_hosts", connect_timeout=5.0, max_sessions=1)
        running = shell.run(self.target, "reboot")
        waiting = shell.run(self.target, "reboot")
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(shell.sessions_waiting, 0)
        running.cancel()
        self.failureResultOf(running, CancelledError)
        after = shell.run(self.target, "reboot")  # the slot is free again
        self.assertEqual(len(self.reactor.tcpClients), 2)
        after.cancel()
        self.failureResultOf(after, CancelledError)

    def test_timeout_when_server_never_speaks(self) -> None:
        """Connected, but no SSH banner: the deadline aborts the connection."""
        d = self.shell.run(self.target, "reboot")
        factory = self.reactor.tcpClients[0][2]
        protocol = factory.buildProtocol(None)
        transport = _tcp_string_transport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"SSH-2.0-"))
        self.reactor.advance(5)
        self.assertEqual(self.failureResultOf(d, SshConnectFailed).value.reason, "timeout")
        self.assertTrue(transport.disconnected, "the connection was not aborted")

    def test_cancel_while_connecting(self) -> None:
        d = self.shell.run(self.target, "reboot")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_connection_refused(self) -> None:
        d = self.shell.run(self.target, "reboot")
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(self.reactor.connectors[0],
                                       Failure(error.ConnectionRefusedError()))
        failure = self.failureResultOf(d, SshConnectFailed)
        self.assertEqual(failure.value.reason, "refused")
        self.assertIn("connection refused by 10.0.0.5:2222", str(failure.value))


class FakeSshTransport:
    """What a channel's C{conn.transport} looks like to L{_CommandProtocol}."""

    def __init__(self) -> None:
        self.transport = _tcp_string_transport()
        self.lost: list[Any] = []

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.append(reason)


class FakeConnection:
    def __init__(self) -> None:
        self.transport = FakeSshTransport()
        self.eofs: list[Any] = []

    def sendEOF(self, channel: Any) -> None:
        self.eofs.append(channel)


class FakeChannel:
    """The parts of Conch's C{_CommandChannel} the protocol touches."""

    def __init__(self) -> None:
        self.conn = FakeConnection()
        self.ext: list[tuple[int, bytes]] = []

    def extReceived(self, data_type: int, data: bytes) -> None:
        self.ext.append((data_type, data))

    def request_exit_status(self, data: bytes) -> None:
        pass

    def request_exit_signal(self, data: bytes) -> None:
        pass


class CommandProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lines: list[str] = []
        target = SshTarget(host="10.0.0.5", user="relops", key_path="/k")
        self.protocol = _CommandProtocol(target, self.lines.append)
        self.channel = FakeChannel()
        self.protocol.makeConnection(self.channel)

    def test_output_status_and_lines(self) -> None:
        self.assertEqual(self.channel.conn.eofs, [self.channel], "stdin not closed")
        self.protocol.dataReceived(b"one\r\ntw")
        self.channel.extReceived(EXTENDED_DATA_STDERR, b"warn\xff\n")
        self.channel.extReceived(2, b"other")
        self.protocol.dataReceived(b"o\nthree")
        self.channel.request_exit_status(struct.pack(">L", 0))
        self.protocol.connectionLost(Failure(error.ConnectionDone()))
        result = self.successResultOf(self.protocol.finished)
        self.assertEqual(result, CommandResult(0, "one\r\ntwo\nthree", "warn\ufffd\n", None))
        self.assertEqual(self.lines, ["one", "warn\ufffd", "two", "three"])
        self.assertEqual(self.channel.ext, [(2, b"other")])

    def test_exit_signal(self) -> None:
        self.channel.request_exit_signal(NS(b"KILL") + b"\0" + NS(b"") + NS(b""))
        self.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.successResultOf(self.protocol.finished), CommandResult(None, "", "", "KILL"))

    def test_dropped_connection(self) -> None:
        """
        The TCP connection ends with no exit status: L{SshConnectionLost},
        although Conch itself would never tell the channel.
        """
        self.protocol.dataReceived(b"rebooting\n")
        self.channel.conn.transport.connectionLost(Failure(error.ConnectionLost("reset")))
        failure = self.failureResultOf(self.protocol.finished, SshConnectionLost)
        self.assertTrue(failure.value.command_sent)
        self.assertEqual(failure.value.stdout, "rebooting\n")
        self.assertIn("(last output: 'rebooting')", str(failure.value))
        self.assertEqual(len(self.channel.conn.transport.lost), 1, "Conch's handler not called")

    def test_exit_status_then_drop(self) -> None:
        self.channel.request_exit_status(struct.pack(">L", 7))
        self.channel.conn.transport.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.successResultOf(self.protocol.finished).exit_status, 7)

    def test_cancel_aborts(self) -> None:
        self.protocol.finished.cancel()
        self.failureResultOf(self.protocol.finished, CancelledError)
        self.assertTrue(self.channel.conn.transport.transport.disconnected)
        self.protocol.connectionLost(Failure(error.ConnectionDone()))  # ignored

    def test_on_line_errors_are_contained(self) -> None:
        def explode(line: str) -> None:
            raise RuntimeError("boom")

        stream = _Stream(explode)
        stream.feed(b"a\nb\n")
        self.assertEqual(stream.text(), "a\nb\n")
        self.flushLoggedErrors(RuntimeError)

    def test_output_is_capped(self) -> None:
        lines: list[str] = []
        stream = _Stream(lines.append)
        stream.feed(b"x" * (MAX_OUTPUT - 2) + b"\nyyyy\n")
        stream.feed(b"more\n")
        self.assertEqual(len(stream.text()), MAX_OUTPUT)
        self.assertEqual(lines[-1], f"[roller: output beyond {MAX_OUTPUT} bytes dropped]")
        self.assertTrue(stream.truncated)


# ---------------------------------------------------------------- against a real sshd


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if SKIP_SSHD:
        pytest.skip(SKIP_SSHD)
    d = tmp_path_factory.mktemp("ssh-keys")
    generate_key(d / "user")
    generate_key(d / "stranger")
    generate_key(d / "encrypted", passphrase="s3cret-pass")
    return {name: d / name for name in ("user", "stranger", "encrypted")}


@pytest.fixture(scope="module")
def sshd(keys: dict[str, Path]) -> Any:
    with SshServer() as server:
        server.authorize(keys["user"].with_suffix(".pub"), keys["encrypted"].with_suffix(".pub"))
        yield server


@pytest.fixture
def server(sshd: SshServer) -> SshServer:
    sshd.reset()
    return sshd


@pytest.fixture
def known_hosts(tmp_path: Path, server: SshServer) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text(server.known_hosts_line() + "\n")
    path.chmod(0o600)
    return path


def _target(server: SshServer, key: Path, **kw: Any) -> SshTarget:
    kw.setdefault("port", server.port)
    return SshTarget(host="127.0.0.1", user=server.user, key_path=str(key), credential="test", **kw)


async def _failure(d: Deferred, kind: type[BaseException]) -> Any:
    try:
        result = await d
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__}, got {result!r}")


@needs_sshd
@pytest_twisted.ensureDeferred
async def test_command_runs_and_is_recorded(server: SshServer, keys: dict, known_hosts: Path) -> None:
    server.behave("respond", stdout="stopping services\nrebooting now\n", stderr="warning: x\n", exit_status=3)
    lines: list[str] = []
    shell = ConchShell(_real_reactor(), known_hosts)
    result = await shell.run(_target(server, keys["user"]), "sudo reboot", lines.append)
    assert result == CommandResult(3, "stopping services\nrebooting now\n", "warning: x\n", None)
    assert sorted(lines) == ["rebooting now", "stopping services", "warning: x"]
    assert lines.index("stopping services") < lines.index("rebooting now")
    assert server.commands() == ["sudo reboot"]


@needs_sshd
@pytest_twisted.ensureDeferred
async def test_exit_zero_and_signal(server: SshServer, keys: dict, known_hosts: Path) -> None:
    shell = ConchShell(_real_reactor(), known_hosts)
    target = _target(server, keys["user"])
    assert await shell.run(target, "true") == CommandResult(0, "", "", None)
    server.behave("signal", signal="TERM")
    assert await shell.run(target, "x") == CommandResult(None, "", "", "TERM")


@needs_sshd
@pytest_twisted.ensureDeferred
async def test_encrypted_key(server: SshServer, keys: dict, known_hosts: Path) -> None:
    shell = ConchShell(_real_reactor(), known_hosts)
    ok = await shell.run(_target(server, keys["encrypted"], passphrase="s3cret-pass"), "uptime")
    assert ok.exit_status == 0
    e = await _failure(shell.run(_target(server, keys["encrypted"], passphrase="nope-nope"), "uptime"),
                       SshKeyError)
    assert "wrong passphrase" in str(e) and "nope-nope" not in str(e) and "s3cret" not in str(e)
    assert server.commands() == ["uptime"]


@needs_sshd
@pytest_twisted.ensureDeferred
async def test_wrong_user_key(server: SshServer, keys: dict, known_hosts: Path) -> None:
    shell = ConchShell(_real_reactor(), known_hosts)
    e = await _failure(shell.run(_target(server, keys["stranger"]), "reboot"), SshAuthFailed)
    assert f"{server.user}@127.0.0.1:{server.port} did not accept the key {keys['stranger']}" in str(e)
    assert "credential 'test'" in str(e)
    assert server.commands() == []


@needs_sshd
@pytest_twisted.ensureDeferred
async def test_changed_host_key(server: SshServer, keys: dict, tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    stale = _key()
    path.write_text(_line(f"[127.0.0.1]:{server.port}", stale) + "\n")
    before = path.read_text()
    shell = ConchShell(_real_reactor(), path)
    for policy in ("strict", "accept-new"):
        e = await _failure(shell.run(_target(server, keys["user"], host_key_policy=policy), "reboot"),
                           HostKeyChanged)
        assert "HOST KEY CHANGED for 127.0.0.1" in str(e)
        assert kh.fingerprint(stale.public().blob()) in str(e)
        server_blob = base64.b64decode(server.host_public_key.split()[1])
        assert e.fingerprint == kh.fingerprint(server_blob)
    assert server.commands() == []
    assert path.read_text() == before


@needs_sshd
@pytest_twisted.ensureDeferred
async def test_unknown_host_strict(server: SshServer, keys: dict, tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    shell = ConchShell(_real_reactor(), path)
    e = await _failure(shell.run(_target(server, keys["user"]), "reboot"), HostKeyUnknown)
    assert f"`ssh-keyscan -p {server.port} 127.0.0.1 >> {path}`" in str(e)
    assert server.commands() == []
    assert not path.exists()


@needs_sshd
@pytest_twisted.ensureDeferred
async def test_accept_new(server: SshServer, keys: dict, tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    shell = ConchShell(_real_reactor(), path)
    result = await shell.run(_target(server, keys["user"], host_key_policy="accept-new"), "reboot")
    assert result.exit_status == 0
    [line] = path.read_text().splitlines()
    assert line.startswith(server.known_hosts_line() + " roller accept-new ")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (await shell.run(_target(server, keys["user"]), "reboot")).exit_status == 0
    assert server.commands() == ["reboot", "reboot"]
    assert len(path.read_text().splitlines()) == 1


@needs_sshd
@pytest_twisted.ensureDeferred
async def test_server_that_never_speaks(tmp_path: Path, keys: dict) -> None:
    """A peer that accepts TCP and stays silent: a connect timeout that hangs up."""
    reactor = _real_reactor()
    closed: Deferred = Deferred()

    class Silent(Protocol):
        def connectionLost(self, reason: Any = None) -> None:
            closed.callback(None)

    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    try:
        shell = ConchShell(reactor, tmp_path / "known_hosts", connect_timeout=0.5)
        target = SshTarget(host="127.0.0.1", port=port.getHost().port, user="u", key_path=str(keys["user"]))
        started = reactor.seconds()
        e = await _failure(shell.run(target, "reboot"), SshConnectFailed)
        assert e.reason == "timeout"  # the 0.5 s connect timeout ended it, no sooner (reactor time)
        assert reactor.seconds() >= started + 0.5
        await closed.addTimeout(5, reactor)
    finally:
        await port.stopListening()


@needs_sshd
@pytest_twisted.ensureDeferred
async def test_connection_refused(tmp_path: Path, keys: dict) -> None:
    from roller.testing.process import free_port

    shell = ConchShell(_real_reactor(), tmp_path / "known_hosts")
    target = SshTarget(host="127.0.0.1", port=free_port(), user="u", key_path=str(keys["user"]))
    e = await _failure(shell.run(target, "reboot"), SshConnectFailed)
    assert e.reason == "refused"


@needs_sshd
@pytest_twisted.ensureDeferred
async def test_server_drops_the_connection(server: SshServer, keys: dict, known_hosts: Path) -> None:
    """The host goes down under the command: SshConnectionLost, command sent, output kept."""
    server.behave("drop", stdout="going down for reboot\n", delay=0.3)
    shell = ConchShell(_real_reactor(), known_hosts, command_timeout=10)
    # SshConnectionLost, not the 10 s command timeout: the drop was noticed.
    e = await _failure(shell.run(_target(server, keys["user"]), "sudo reboot"), SshConnectionLost)
    assert e.command_sent and e.confirmed
    assert e.stdout == "going down for reboot\n"
    assert server.commands() == ["sudo reboot"]


@needs_sshd
@pytest_twisted.ensureDeferred
async def test_concurrent_runs(server: SshServer, keys: dict, known_hosts: Path) -> None:
    from twisted.internet.defer import gatherResults

    server.behave("execute")
    shell = ConchShell(_real_reactor(), known_hosts, connect_timeout=20)
    target = _target(server, keys["user"])
    results = await gatherResults([shell.run(target, f"echo {i}; echo e{i} >&2; exit {i % 3}")
                                   for i in range(50)], consumeErrors=True)
    assert results == [CommandResult(i % 3, f"{i}\n", f"e{i}\n", None) for i in range(50)]
    assert sorted(server.commands()) == sorted(f"echo {i}; echo e{i} >&2; exit {i % 3}" for i in range(50))


async def _hanging_run(server: SshServer, shell: ConchShell, keys: dict) -> tuple[Deferred, Any]:
    server.behave("hang")
    d = shell.run(_target(server, keys["user"]), "sleep forever")
    await eventually(lambda: server.sessions(), what="the session to start")
    [session] = server.sessions()
    assert server.alive(session.sshd_pid)
    assert session.dialed == "127.0.0.1"
    return d, session


@needs_sshd
@pytest_twisted.ensureDeferred
async def test_cancel_closes_the_session(server: SshServer, keys: dict, known_hosts: Path) -> None:
    shell = ConchShell(_real_reactor(), known_hosts)
    d, session = await _hanging_run(server, shell, keys)
    d.cancel()
    await _failure(d, CancelledError)
    await eventually(lambda: not server.alive(session.sshd_pid), what="sshd's session to end")
    await eventually(lambda: not server.alive(session.script_pid), what="the command to end")


@needs_sshd
@pytest_twisted.ensureDeferred
async def test_command_timeout_closes_the_session(server: SshServer, keys: dict, known_hosts: Path) -> None:
    shell = ConchShell(_real_reactor(), known_hosts, command_timeout=0.5)
    d, session = await _hanging_run(server, shell, keys)
    e = await _failure(d, SshCommandTimeout)
    assert e.command_sent and "did not finish within 0.5 s" in str(e)
    await eventually(lambda: not server.alive(session.sshd_pid), what="sshd's session to end")


# ------------------------------------------------------------ Conch internals


def test_the_conch_internals_roller_relies_on_are_there():
    """Fails loudly when a Twisted release removes or changes one (see ssh.CONCH_INTERNALS)."""
    from roller.drivers import ssh

    assert ssh.conch_internals_problems() == []


def test_a_channel_still_looks_request_handlers_up_on_the_instance():
    """What the exit-status and exit-signal hooks need of SSHChannel.requestReceived."""
    from twisted.conch.ssh.channel import SSHChannel

    channel = SSHChannel()
    seen = []
    channel.request_exit_status = lambda data: seen.append(data) or 1
    assert channel.requestReceived(b"exit-status", b"\0\0\0\x07") == 1
    assert seen == [b"\0\0\0\x07"]


def test_a_changed_conch_internal_is_reported(monkeypatch):
    from twisted.conch import endpoints
    from twisted.conch.ssh.connection import SSHConnection

    from roller.drivers import ssh

    monkeypatch.delattr(endpoints, "_CommandChannel")
    monkeypatch.setattr(SSHConnection, "sendEOF", lambda self, channel, flush: None)
    problems = ssh.conch_internals_problems()
    assert problems[0] == "twisted.conch.endpoints._CommandChannel.extReceived is missing"
    assert problems[1] == ("twisted.conch.ssh.connection.SSHConnection.sendEOF takes (self, channel, flush), "
                           "not (self, channel)")


# ------------------------------------------------------------ authentication in one request


class _RecordingTransport:
    sessionID = b"session-id"

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []

    def sendPacket(self, kind: int, data: bytes) -> None:
        self.sent.append((kind, data))


def test_the_signed_public_key_request_is_sent_at_once(keys: dict) -> None:
    """
    No C{none} request and no "would this key do?" query first: the one
    request carries the key and its signature over the session id, as
    RFC 4252 section 7 defines it (verified here with the public key).
    """
    from twisted.conch.endpoints import _ConnectionReady
    from twisted.conch.ssh.common import getNS
    from twisted.conch.ssh.userauth import MSG_USERAUTH_REQUEST

    from roller.drivers import ssh

    key = Key.fromFile(str(keys["user"]))
    auth = ssh._QuickUserAuth(b"roller", _ConnectionReady(Deferred()))
    auth.keys = [key]
    transport = auth.transport = _RecordingTransport()
    auth.serviceStarted()
    [(kind, data)] = transport.sent
    assert kind == MSG_USERAUTH_REQUEST
    user, rest = getNS(data)
    service, rest = getNS(rest)
    method, rest = getNS(rest)
    assert (user, service, method, rest[:1]) == (b"roller", b"ssh-connection", b"publickey", b"\x01")
    key_type, rest = getNS(rest[1:])
    blob, rest = getNS(rest)
    signature, rest = getNS(rest)
    assert (key_type, blob, rest) == (key.sshType(), key.public().blob(), b"")
    signed = (NS(b"session-id") + bytes((MSG_USERAUTH_REQUEST,)) + NS(b"roller") + NS(b"ssh-connection")
              + NS(b"publickey") + b"\x01" + NS(key_type) + NS(blob))
    assert key.public().verify(signature, signed)
    assert auth.lastAuth == b"publickey"


def test_without_a_key_authentication_starts_as_conch_does() -> None:
    from twisted.conch.endpoints import _ConnectionReady

    from roller.drivers import ssh

    auth = ssh._QuickUserAuth(b"roller", _ConnectionReady(Deferred()))
    transport = auth.transport = _RecordingTransport()
    auth.serviceStarted()
    assert [data for _, data in transport.sent] == [NS(b"roller") + NS(b"ssh-connection") + NS(b"none")]


def test_roller_s_conch_subclasses_stay_as_quiet_as_conch() -> None:
    """Their log events keep Conch's namespaces (quieted by roller's log observer); no factory lines."""
    from roller.drivers import ssh
    from roller.logs import QUIET_NAMESPACES

    for cls in (ssh._Transport, ssh._QuickUserAuth):
        namespace = cls.__new__(cls)._log.namespace
        assert namespace.startswith(QUIET_NAMESPACES), namespace
    assert ssh._OneProtocolFactory(Protocol()).noisy is False
