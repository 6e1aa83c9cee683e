"""
roller on an C{ssl:} endpoint: C{twistd -n roller --listen ssl:...} with a
self-signed certificate for 127.0.0.1 made here, checked with treq trusting
only that certificate.  The API and the dashboard answer over TLS, plain
HTTP on that port gets no answer, and the dashboard's cookies carry
C{Secure}.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import subprocess
import sys
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, threads
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.web.client import Agent
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from roller.testing.process import RollerProcess, free_port, roller_env

PASSWORD = "tls admin password"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A key and a self-signed certificate for the IP address 127.0.0.1 (key.pem, cert.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@implementer(IPolicyForHTTPS)
class TrustOnly:
    """Verify the server against one trust root (and its name, 127.0.0.1)."""

    def __init__(self, root: Certificate):
        self.root = root

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self.root)


def set_cookies(response: Any) -> dict[str, str]:
    """name -> the raw Set-Cookie header, for every cookie the response sets."""
    return {raw.split("=", 1)[0]: raw for raw in response.headers.getRawHeaders("set-cookie", [])}


@pytest_twisted.ensureDeferred
async def test_roller_serves_api_and_dashboard_over_tls(tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path)
    state = tmp_path / "state"
    added = subprocess.run(
        [sys.executable, "-m", "roller.cli", "--state-dir", str(state),
         "user", "add", "root", "--role", "admin", "--password-stdin"],
        input=PASSWORD + "\n", capture_output=True, text=True, env=roller_env(), timeout=60)
    assert added.returncode == 0, added.stderr

    tls_port = free_port()
    roller = RollerProcess(
        ["--auth", "none", "--listen", f"ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"],
        state_dir=state)
    await threads.deferToThread(roller.start)  # also answers plain HTTP on roller.port, for its readiness check
    try:
        base = f"https://127.0.0.1:{tls_port}"
        root = Certificate.loadPEM(cert.read_bytes())
        http = treq.client.HTTPClient(Agent(reactor, contextFactory=TrustOnly(root)))

        async def fetch(method: str, path: str, **kw: Any) -> tuple[Any, bytes]:
            r = await http.request(method, base + path, allow_redirects=False, **kw).addTimeout(10, reactor)
            return r, await treq.content(r)

        r, body = await fetch("GET", "/api/v1/tasks")
        assert r.code == 200 and b'"tasks"' in body
        r, body = await fetch("GET", "/__lbheartbeat__")
        assert r.code == 200

        # plain HTTP on the TLS port: the TLS server never answers it as HTTP
        plain_failed = False
        try:
            r = await treq.get(f"http://127.0.0.1:{tls_port}/__lbheartbeat__",
                               persistent=False).addTimeout(5, reactor)
            await treq.content(r)
        except Exception:
            plain_failed = True
        assert plain_failed, "plain HTTP got an HTTP answer from the TLS listener"

        # a client that does not trust the certificate is refused by its own verification
        stranger_failed = False
        try:
            await treq.get(base + "/__lbheartbeat__", persistent=False).addTimeout(5, reactor)
        except Exception:
            stranger_failed = True
        assert stranger_failed, "the self-signed certificate was accepted without being trusted"

        # the dashboard: sign in over TLS; every cookie it sets is Secure
        r, body = await fetch("GET", "/login")
        assert r.code == 200
        csrf_cookie = set_cookies(r)["roller_csrf"]
        assert "Secure" in csrf_cookie and "HttpOnly" in csrf_cookie
        token = re.search(rb'name="csrf_token" value="([^"]+)"', body).group(1).decode()
        jar = SimpleCookie()
        jar.load(csrf_cookie)
        r, body = await fetch(
            "POST", "/login", data={"csrf_token": token, "next": "/", "user": "root", "password": PASSWORD},
            headers={"Cookie": [f"roller_csrf={jar['roller_csrf'].value}"]})
        assert r.code == 303, body
        session = set_cookies(r)["roller_session"]
        assert "Secure" in session and "HttpOnly" in session and "samesite=strict" in session.lower()
        jar.load(session)
        r, body = await fetch("GET", "/", headers={"Cookie": [
            f"roller_csrf={jar['roller_csrf'].value}; roller_session={jar['roller_session'].value}"]})
        assert r.code == 200 and b"root" in body
    finally:
        await threads.deferToThread(roller.stop)
