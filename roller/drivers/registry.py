"""
The drivers a running task may use, built once per process from the
settings and handed to tasks through their context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from attrs import frozen

from roller.drivers.liveness import ILiveness, liveness_for
from roller.drivers.reactor import IDriverReactor
from roller.inventory import Machine

if TYPE_CHECKING:
    from roller.bugzilla import BugzillaClient
    from roller.config import Settings
    from roller.drivers.ipmi import IpmiTool
    from roller.drivers.redfish import RedfishDriver
    from roller.drivers.snmp import SnmpPdus
    from roller.drivers.ssh import IRemoteShell
    from roller.drivers.xen import XenApiDriver


@frozen
class Drivers:
    shell: IRemoteShell
    liveness: Callable[[Machine], ILiveness]  # a quick liveness probe for a machine
    ipmi: IpmiTool | None = None
    pdus: SnmpPdus | None = None  # .client is the process's SnmpClient
    redfish: RedfishDriver | None = None
    xen: XenApiDriver | None = None
    bugzilla: BugzillaClient | None = None  # else built per job from the settings


def make_drivers(reactor: IDriverReactor, settings: Settings) -> Drivers:
    from roller.drivers.ssh import ConchShell

    shell = ConchShell(reactor, settings.ssh_known_hosts, connect_timeout=settings.ssh_connect_timeout,
                       command_timeout=settings.ssh_command_timeout, max_sessions=settings.ssh_max_sessions)

    def liveness(machine: Machine) -> ILiveness:
        if machine.liveness.method == "tcp":
            return liveness_for("tcp", reactor, port=machine.liveness.port, timeout=3.0)
        return liveness_for("icmp", reactor, count=1, timeout=3.0)

    from roller.drivers.ipmi import ipmitool_from_settings
    from roller.drivers.redfish import redfish_from_settings
    from roller.drivers.snmp import make_pdus
    from roller.drivers.xen import xen_from_settings

    return Drivers(shell=shell, liveness=liveness, ipmi=ipmitool_from_settings(reactor, settings),
                   pdus=make_pdus(reactor, settings), redfish=redfish_from_settings(reactor, settings),
                   xen=xen_from_settings(reactor, settings))
