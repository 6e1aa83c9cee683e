"""
A twistd roller over a simulated fleet, both real processes, for end-to-end
tests that kill roller with C{kill -9} (the batch tests).

    with FleetProcess(tmp_path / "fleet", 20, "127.0.15.", hang=2) as fleet:
        roller = fleet_roller(tmp_path, fleet, clients={"admin": ADMIN_SCOPES})
        roller.start()
        signed(roller, "admin", "POST", "/api/v1/batches", {...})

L{FleetProcess} runs C{python -m roller.sim.fleet} (SSH servers on
loopback addresses that really go down and come back when rebooted) in a
process of its own, so the test's blocking HTTP calls never stall it.
L{fleet_roller} writes roller's configuration for it (C{auth.mode =
"local"} with the given Hawk clients, the fleet's key and host keys, short
reboot and SSH waits, fleet health off) and returns the
L{roller.testing.process.RollerProcess}; L{signed} sends a request signed
the way Taskcluster's Python client signs (C{mohawk.Sender}, sha256).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mohawk

from roller.secrets import HawkClient, Secrets, load_secrets, write_secrets
from roller.sim.daemon import free_port_on
from roller.sim.fleet import fleet_addresses
from roller.testing.process import REPO_ROOT, Response, RollerProcess, http_request, read_until

__all__ = ["FleetProcess", "fleet_roller", "signed", "token_of"]


def token_of(client_id: str) -> str:
    """The (test) access token of Hawk client C{client_id}."""
    return "tok-" + client_id.replace("/", "-") + "-0123456789abcdef"


class FleetProcess:
    """
    C{count} simulated machines in a child process: the last C{never_down}
    accept a reboot and never go down, the C{hang} before them never answer
    SSH.
    """

    def __init__(self, directory: str | os.PathLike, count: int, base: str, *, hang: int = 0,
                 never_down: int = 0, down_for: float = 0.5, reboot_delay: float = 0.05):
        self.directory = Path(directory)
        self.count = count
        self.base = base
        self.hang = hang
        self.never_down = never_down
        self.down_for = down_for
        self.reboot_delay = reboot_delay
        self.addresses = fleet_addresses(base, count)
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.output = ""

    def start(self, timeout: float = 60.0) -> FleetProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port_on(self.addresses)
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "roller.sim.fleet", "--count", str(self.count), "--base", self.base,
             "--dir", str(self.directory), "--ssh-port", str(self.port), "--down-for", str(self.down_for),
             "--reboot-delay", str(self.reboot_delay), "--hang", str(self.hang),
             "--never-down", str(self.never_down)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
            start_new_session=True)
        assert self.process.stdout is not None
        self.output = read_until(self.process.stdout, "Ctrl-C to stop", timeout)
        if "Ctrl-C to stop" not in self.output:
            self.close()
            raise AssertionError(f"the simulated fleet did not start:\n{self.output}")
        return self

    def inventory(self) -> list[dict[str, Any]]:
        """The machines' roller JSON (worker ids sim-001 ..., the special ones last)."""
        return list(json.loads((self.directory / "inventory.json").read_text()))

    def worker_id(self, index: int) -> str:
        return f"sim-{index + 1:0{max(3, len(str(self.count)))}d}"

    def close(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def __enter__(self) -> FleetProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def fleet_roller(workdir: str | os.PathLike, fleet: FleetProcess, *, clients: Mapping[str, Sequence[str]],
                 toml: str = "", env: Mapping[str, str] | None = None) -> RollerProcess:
    """
    A (not yet started) twistd roller for C{fleet}: Hawk C{clients} (id ->
    scopes; tokens from L{token_of}), the fleet's credential and host keys,
    quick reboot and SSH waits, health off; C{toml} appended to its
    configuration.
    """
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    fleet_secrets = load_secrets(fleet.directory / "secrets.toml")
    secrets = work / "secrets.toml"
    write_secrets(secrets, Secrets(fleet_secrets.as_dict(), clients={
        cid: HawkClient(cid, token_of(cid), tuple(scopes)) for cid, scopes in clients.items()}))
    config = work / "roller.toml"
    config.write_text(
        f'secrets_file = "{secrets}"\n'
        '[auth]\nmode = "local"\n'
        '[health]\nenabled = false\n'
        f'[ssh]\nknown_hosts = "{fleet.directory / "known_hosts.openssh"}"\n'
        'connect_timeout = 1.0\ncommand_timeout = 2.0\n'
        '[reboot]\ndown_timeout = 3.0\nup_timeout = 5.0\npoll_interval = 0.05\n' + toml)
    return RollerProcess(["--config", str(config)], state_dir=work / "state", env=env)


def signed(roller: RollerProcess, client_id: str | None, method: str, path: str, body: Any = None,
           timeout: float = 10.0) -> Response:
    """C{method} C{path} on C{roller}, Hawk-signed as C{client_id} (unsigned for None)."""
    url = roller.url(path)
    content = b"" if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if client_id is not None:
        sender = mohawk.Sender(credentials={"id": client_id, "key": token_of(client_id), "algorithm": "sha256"},
                               url=url, method=method, content=content,
                               content_type=headers.get("Content-Type", ""))
        headers["Authorization"] = sender.request_header
    return http_request(method, url, content if body is not None else None, headers, timeout)
