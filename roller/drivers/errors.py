"""
The one base of every driver error: a one-line message for the job log
and the endpoint it is about.

Each driver raises its own subclasses (L{roller.drivers.ssh.SshError},
L{roller.drivers.snmp.client.SnmpError}, ...); the power drivers raise
the shared tree of L{roller.drivers.power} (C{PowerError} and its kinds),
and a task turns any of them into a failed job with
L{roller.tasks.base.driver_errors}.
"""

from __future__ import annotations

__all__ = ["DriverError"]


class DriverError(Exception):
    """
    A driver could not do what it was asked.

    @ivar message: One operator-readable line (also C{str(error)}); it
        never holds a secret.
    @ivar host: The host (device, BMC, pool, agent) concerned, when known.
    @ivar port: Its port, when known.
    """

    def __init__(self, message: str, *, host: str | None = None, port: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.host = host
        self.port = port

    def __str__(self) -> str:
        return self.message
