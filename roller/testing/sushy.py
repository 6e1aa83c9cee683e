"""
A real sushy-emulator (Redfish, fake systems driver) on 127.0.0.1, for tests.

    with SushyEmulator([fake_system("s1"), fake_system("s2", "Off")],
                       users={"admin": "secret"}) as bmc:
        bmc.url                       # http://127.0.0.1:PORT
        bmc.power_state("s1")         # read back over HTTP, independently of roller
        bmc.set_delay(2)              # power changes now take 2 s
        bmc.requests()                # ["GET /redfish/v1/", ...] from its access log

L{SushyEmulator} writes a private config file (C{conf.py}: the fake
driver, the systems, a private C{SUSHY_EMULATOR_STATE_DIR} wiped at start,
optionally a bcrypt htpasswd C{SUSHY_EMULATOR_AUTH_FILE} and a TLS
certificate) and runs C{sushy-emulator --config conf.py} as a child
process (the console script itself, so the PID is the emulator's) on a free
port; it is ready when C{GET /redfish/v1/} answers (about 0.5 s).
L{stop} kills it by PID.

The fake driver applies a power change after C{random.randint(1, 11)}
seconds, observed on the next read.  The config file replaces the
driver module's C{random} with one whose C{randint} answers the number in
the state directory's C{delay} file (L{set_delay}; 0 by default: the
change shows on the next read).

What sushy-emulator 2.2 does (and real BMCs may not): basic auth only
(no SessionService); C{ResetType@Redfish.AllowableValues} lists On,
ForceOff, GracefulShutdown, GracefulRestart, ForceRestart, Nmi and ForceOn
(no PowerCycle), and Nmi answers 501; a restart reads C{Off} until applied;
a boot override C{Once} reads back C{Continuous}; a system addressed by
name answers 307 to its UUID; an unknown one 404.

L{make_tls_files} writes a CA and a server certificate for 127.0.0.1 and
C{localhost} (cryptography, no openssl binary needed).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
import uuid as uuidlib
from base64 import b64encode
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from roller.sim.daemon import DaemonProcess, free_port

__all__ = [
    "SushyEmulator",
    "SushyStartError",
    "emulator_path",
    "fake_system",
    "make_tls_files",
    "skip_reason",
]

HOST = "127.0.0.1"


class SushyStartError(AssertionError):
    """The emulator did not come up (it exited, or never answered)."""


def emulator_path() -> str | None:
    """The C{sushy-emulator} console script: next to this Python, else on PATH."""
    script = Path(sys.executable).with_name("sushy-emulator")
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    return shutil.which("sushy-emulator")


def skip_reason() -> str | None:
    """Why sushy tests cannot run here, or C{None}."""
    if emulator_path() is None:
        return "sushy-emulator is not installed (pip install sushy-tools)"
    try:
        import bcrypt  # noqa: F401  (htpasswd files for the auth tests)
    except ImportError:
        return "bcrypt is not installed (it comes with sushy-tools)"
    return None


def fake_system(name: str, power_state: str = "On", uuid: str | None = None) -> dict:
    """A C{SUSHY_EMULATOR_FAKE_SYSTEMS} entry (the uuid is derived from the name)."""
    return {
        "uuid": uuid or str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"{name}.sushy.roller.test")),
        "name": name,
        "power_state": power_state,
        "external_notifier": False,
        "nics": [{"mac": "00:5c:52:31:3a:9c", "ip": "127.0.0.1"}],
    }


def make_tls_files(directory: str | os.PathLike, hosts: Iterable[str] = ("127.0.0.1", "localhost"),
                   ) -> tuple[str, str, str]:
    """
    A throw-away CA and a server certificate signed by it for C{hosts}:
    C{(ca_file, cert_file, key_file)} in C{directory}.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "roller test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "roller test BMC")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "bmc.pem", directory / "bmc.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return str(ca_file), str(cert_file), str(key_file)


_CONFIG = """\
# Written by roller.testing.sushy for one test emulator.
SUSHY_EMULATOR_LISTEN_IP = {host!r}
SUSHY_EMULATOR_LISTEN_PORT = {port!r}
SUSHY_EMULATOR_FAKE_DRIVER = True
SUSHY_EMULATOR_STATE_DIR = {state_dir!r}
SUSHY_EMULATOR_FAKE_SYSTEMS = {systems}
{extra}
# Power changes take as many seconds as the delay file says (instead of 1-11).
from sushy_tools.emulator.resources.systems import fakedriver as _fakedriver


class _Delay:
    @staticmethod
    def randint(low, high):
        try:
            with open({delay_file!r}) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0


_fakedriver.random = _Delay
"""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ACCESS = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3})')


class SushyEmulator(DaemonProcess):
    """
    One sushy-emulator child process on 127.0.0.1.

    @param systems: C{SUSHY_EMULATOR_FAKE_SYSTEMS} entries (L{fake_system});
        one system C{"fake"} (On) by default.
    @param users: user -> password for an htpasswd (bcrypt) auth file;
        none: no authentication.
    @param tls: Serve HTTPS with a certificate from L{make_tls_files}
        (its CA is L{ca_file}).
    @param delay: Seconds a power change takes (L{set_delay}).
    @param workdir: Where its files go; a fresh directory by default
        (removed by L{close}).
    """

    host = HOST
    name = "sushy-emulator"

    def __init__(self, systems: Iterable[Mapping[str, Any]] | None = None, *,
                 users: Mapping[str, str] | None = None, tls: bool = False, delay: int = 0,
                 workdir: str | os.PathLike | None = None, port: int | None = None,
                 executable: str | None = None):
        self.systems = [dict(s) for s in (systems or [fake_system("fake")])]
        self.users = dict(users or {})
        self.tls = tls
        self.executable = executable or emulator_path()
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="roller-sushy-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self._port_given = port is not None
        self.port = port or free_port()
        self.state_dir = self.dir / "state"
        self.config_path = self.dir / "conf.py"
        self.log_path = self.dir / "sushy.log"
        self.delay_file = self.dir / "delay"
        self.auth_file = self.dir / "htpasswd" if self.users else None
        self.ca_file: str | None = None
        self.cert_file: str | None = None
        self.key_file: str | None = None
        if tls:
            self.ca_file, self.cert_file, self.key_file = make_tls_files(self.dir / "tls")
        self.set_delay(delay)

    # -- addresses and identities

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def uuid(self, name: str) -> str:
        """The uuid of the system called C{name} (its Redfish Id)."""
        for s in self.systems:
            if s["name"] == name or s["uuid"] == name:
                return s["uuid"]
        raise KeyError(name)

    # -- control

    def set_delay(self, seconds: int) -> None:
        """Power changes requested from now on take C{seconds} (whole) seconds."""
        tmp = self.delay_file.with_name(".delay.tmp")
        tmp.write_text(str(int(seconds)))
        os.replace(tmp, self.delay_file)

    def _write_files(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)  # the fake driver persists state there
        self.state_dir.mkdir(parents=True)
        extra = []
        if self.auth_file is not None:
            import bcrypt

            lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}"
                     for u, p in self.users.items()]
            self.auth_file.write_text("\n".join(lines) + "\n")
            extra.append(f"SUSHY_EMULATOR_AUTH_FILE = {str(self.auth_file)!r}")
        if self.tls:
            extra.append(f"SUSHY_EMULATOR_SSL_CERT = {self.cert_file!r}")
            extra.append(f"SUSHY_EMULATOR_SSL_KEY = {self.key_file!r}")
        self.config_path.write_text(_CONFIG.format(
            host=self.host, port=self.port, state_dir=str(self.state_dir),
            systems=repr(self.systems),
            extra="\n".join(extra), delay_file=str(self.delay_file)))

    def start(self, timeout: float = 60.0) -> SushyEmulator:
        if self.executable is None:
            raise SushyStartError("sushy-emulator is not installed (pip install sushy-tools)")
        if self.running:
            raise RuntimeError(f"sushy-emulator is already running (pid {self.pid})")
        for attempt in range(3):
            try:
                return self._start(timeout)
            except SushyStartError:
                if self._port_given or attempt == 2 or "Address already in use" not in self.log_text():
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> SushyEmulator:
        self._write_files()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUSHY_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["NO_COLOR"] = "1"
        assert self.executable is not None  # checked by start()
        self._spawn([self.executable, "--config", str(self.config_path)], cwd=self.dir, env=env)
        return self._wait_ready(self._answers, timeout, SushyStartError, where=self.url)

    def _answers(self) -> bool:
        try:
            return self.get("/redfish/v1/", auth=False, timeout=1)[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the emulator (SIGTERM, then SIGKILL), by its PID."""
        self._kill()
        self._close_log()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SushyEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- looking at it (blocking; the emulator is another process)

    def get(self, path: str, *, auth: bool = True, timeout: float = 5.0) -> tuple[int, Any]:
        """C{GET path} with C{urllib}: C{(status, parsed JSON or None)}."""
        headers = {"Accept": "application/json"}
        if auth and self.users:
            user, password = next(iter(self.users.items()))
            headers["Authorization"] = "Basic " + b64encode(f"{user}:{password}".encode()).decode()
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.ca_file)
        handlers: list[Any] = [urllib.request.ProxyHandler({})]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        opener = urllib.request.build_opener(*handlers)
        req = urllib.request.Request(self.url + path, headers=headers)
        try:
            with opener.open(req, timeout=timeout) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            with e:
                status, body = e.code, e.read()
        try:
            return status, json.loads(body) if body.strip() else None
        except ValueError:
            return status, None

    def system(self, name: str) -> dict:
        status, body = self.get(f"/redfish/v1/Systems/{self.uuid(name)}")
        if status != 200:
            raise AssertionError(f"GET system {name}: HTTP {status} {body}")
        return body

    def power_state(self, name: str) -> str:
        """The system's C{PowerState} as the emulator reports it now."""
        return self.system(name)["PowerState"]

    def log_text(self) -> str:
        try:
            return _ANSI.sub("", self.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return "(no log)"

    def requests(self) -> list[str]:
        """C{"METHOD PATH STATUS"} of every request in its access log, in order."""
        return [f"{m} {p} {s}" for m, p, s in _ACCESS.findall(self.log_text())]
