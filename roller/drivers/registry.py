"""
The drivers a running task may use, built once per process from the
settings and handed to tasks through their context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import frozen

from roller.drivers.liveness import ILiveness, liveness_for
from roller.inventory import Machine


@frozen
class Drivers:
    shell: Any  # roller.drivers.ssh.IRemoteShell
    liveness: Callable[[Machine], ILiveness]  # a quick liveness probe for a machine
    ipmi: Any = None  # roller.drivers.ipmi.IpmiTool
    pdus: Any = None  # roller.drivers.snmp.SnmpPdus (.client is the process's SnmpClient)
    redfish: Any = None  # roller.drivers.redfish.RedfishDriver
    xen: Any = None  # roller.drivers.xen.XenApiDriver
    bugzilla: Any = None  # roller.bugzilla.BugzillaClient; else built per job from the settings


def make_drivers(reactor: Any, settings: Any) -> Drivers:
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
