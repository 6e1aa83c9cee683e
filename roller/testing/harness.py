"""
End-to-end test scaffolding: a real L{RollerService} on the real reactor
over a simulated fleet, driven through its REST API with treq.

    fleet = Fleet(reactor, 2, "127.0.4.", free_port("127.0.4.1"), ...)
    await fleet.start()
    h = await start_roller(tmp_path, fleet, reboot_up_timeout=5.0)
    job = await h.run("sim-001", "reboot")
    await h.stop()
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import treq
from attrs import evolve
from twisted.internet.address import IPv4Address
from twisted.web.client import HTTPConnectionPool

from roller.config import load_settings
from roller.inventory import Machine
from roller.secrets import load_secrets, write_secrets
from roller.service import IRollerReactor, RollerService
from roller.sim.daemon import free_port
from roller.sim.fleet import Fleet
from roller.testing.results import eventually

__all__ = ["FAST", "ApiHarness", "free_port", "start_roller"]

#: what the harness settles for by default: short waits, simulated machines
FAST = dict(reboot_down_timeout=3.0, reboot_up_timeout=5.0, reboot_poll_interval=0.05,
            ssh_connect_timeout=1.0, ssh_command_timeout=2.0)


def _finished(job: dict) -> bool:
    return job["state"] not in ("queued", "running")


class ApiHarness:
    """The service, its fleet, and its REST API at C{url}."""

    def __init__(self, service: RollerService, fleet: Fleet | None, reactor: IRollerReactor, group: str = "sim"):
        self.service = service
        self.fleet = fleet
        self.reactor = reactor
        self.group = group
        address = service.ports[0].getHost()
        assert isinstance(address, IPv4Address)
        self.url = f"http://127.0.0.1:{address.port}"
        #: the harness's own connections, closed by L{stop} (treq's global pool would keep them open)
        self.pool = HTTPConnectionPool(reactor)

    async def post(self, worker_id: str, task: str = "reboot", body: dict | None = None) -> dict:
        """POST a job (Taskcluster form); the 201 answer."""
        r = await treq.post(f"{self.url}/api/v1/workers/{worker_id}/group/{self.group}/jobs?task_name={task}",
                            json=body, pool=self.pool)
        payload = json.loads(await r.content())
        assert r.code == 201, payload
        return payload

    async def job(self, task_id: str) -> dict:
        r = await treq.get(f"{self.url}/api/v1/jobs/{task_id}", pool=self.pool)
        return json.loads(await r.content())

    async def wait(self, task_id: str, deadline: float = 30.0,
                   until: Callable[[dict], bool] = _finished) -> dict:
        """Poll the job until C{until(job)}; fails the test after C{deadline} seconds."""
        last: dict = {}

        async def check() -> dict:
            last.update(await self.job(task_id))
            return dict(last) if until(last) else {}

        return await eventually(check, f"job {task_id}", timeout=deadline, interval=0.05, reactor=self.reactor,
                                describe=lambda: f"still {last.get('state')}: {last.get('events', [])[-3:]}")

    async def run(self, worker_id: str, task: str, body: dict | None = None, deadline: float = 30.0) -> dict:
        """POST a job and wait for it to end."""
        return await self.wait((await self.post(worker_id, task, body))["task_id"], deadline)

    async def stop(self) -> None:
        await self.pool.closeCachedConnections()
        await self.service.stopService()
        if self.fleet is not None:
            await self.fleet.stop()


async def start_roller(tmp_path: Path, fleet: Fleet, reactor: IRollerReactor, *,
                       credentials: Mapping[str, Any] | None = None,
                       inventory: Callable[[list[dict]], list[dict]] = lambda entries: entries,
                       harness: type[ApiHarness] = ApiHarness, **settings: Any) -> ApiHarness:
    """
    Start roller (auth none, loopback, a fresh state dir under C{tmp_path})
    for a started C{fleet}: its secrets (plus C{credentials}) and
    known_hosts, L{FAST} waits overridden by C{settings}, and its machines
    (through C{inventory}) in the store; a C{harness} (subclass) for it.
    """
    files = fleet.write_client_files(str(tmp_path / "fleet"))
    secrets_file = tmp_path / "secrets.toml"
    write_secrets(secrets_file, {**load_secrets(files.secrets).as_dict(), **dict(credentials or {})})
    s = load_settings(None, {}, {"auth.mode": "none", "server.listen": "tcp:0:interface=127.0.0.1",
                                 "state_dir": str(tmp_path / "state")})
    s = evolve(s, secrets_file=str(secrets_file), ssh_known_hosts=files.known_hosts_openssh,
               **{**FAST, **settings})
    service = RollerService(s, reactor)
    service.startService()
    await service.ready
    assert service.store is not None  # ready
    for entry in inventory(fleet.inventory_json("sim")):
        await service.store.machines.put(Machine.from_json(entry))
    return harness(service, fleet, reactor)
