"""
What the drivers need of a reactor, as interfaces to type their
C{reactor} parameters with: each combines the C{IReactor*} interfaces a
driver really uses, with L{IReactorTime} always (every timeout is a
cancellation on the injected clock).  The process's reactor provides all
of them; tests pass C{MemoryReactorClock} or a fake of their own.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorCore, IReactorProcess, IReactorTCP, IReactorTime, IReactorUDP

__all__ = ["IDriverReactor", "IProcessReactor", "ITcpReactor", "IUdpReactor"]


class ITcpReactor(IReactorTCP, IReactorTime):
    """TCP connections and time: SSH, Redfish, XenAPI, TCP liveness."""


class IProcessReactor(IReactorProcess, IReactorTime):
    """Child processes and time: ipmitool, ping."""


class IUdpReactor(IReactorUDP, IReactorCore, IReactorTime):
    """UDP ports, time and name resolution (C{IReactorCore.resolve}): SNMP."""


class IDriverReactor(ITcpReactor, IProcessReactor, IUdpReactor):
    """Everything the drivers of one process use together (L{roller.drivers.registry.make_drivers})."""
