"""
Which tasks a machine's settings let roller run, and why not the others
(the machine page offers only the former; the latter are shown disabled
with the reason).

Tasks say what they need through their modules' C{not_applicable(machine)}
(C{ssh_reboot}: ssh settings and an address; the C{ipmi_*} tasks: ipmi
settings; C{snmp_reboot}: a pdu; C{redfish_*}: redfish; C{xenapi_reboot}:
xen), which the tasks themselves check before running; this module asks the
same questions ahead of time.  Tasks it does not know (plugins) are offered.
"""

from __future__ import annotations

from collections.abc import Callable

from roller.inventory import Machine
from roller.store.fleet import LoanState
from roller.tasks import ipmi, pdu, redfish, ssh_reboot, xen
from roller.tasks.reboot import METHODS

__all__ = ["why_not"]


def _address(machine: Machine) -> str | None:
    return None if machine.address is not None else "the machine has neither an ip nor an fqdn"


def _any_power(machine: Machine) -> str | None:
    if any(getattr(machine, attribute, None) is not None for _, attribute, _ in pdu.VIA):
        return None
    return "the machine has none of pdu, ipmi, redfish or xen settings"


def _bmc(machine: Machine) -> str | None:
    if machine.ipmi is None and machine.redfish is None:
        return "the machine has neither ipmi nor redfish settings (a one-time PXE boot needs its BMC)"
    return None


def _reboot(machine: Machine) -> str | None:
    """Some reboot method it would try (its own list, else any roller knows) has the settings it needs."""
    reason = _address(machine)
    if reason:
        return reason
    names = [n for n in (machine.reboot_methods or tuple(METHODS)) if n in METHODS]
    if any(METHODS[n].not_applicable(machine) is None for n in names):
        return None
    if machine.reboot_methods:
        return f"none of its reboot methods ({', '.join(machine.reboot_methods)}) has the settings it needs"
    return "the machine has none of ssh, ipmi, pdu, redfish or xen settings"


_CHECKS: dict[str, Callable[[Machine], str | None]] = {
    "ping": _address,
    "reboot": _reboot,
    "ssh_reboot": ssh_reboot.not_applicable,
    "snmp_reboot": pdu.not_applicable,
    "power_on": _any_power,
    "power_off": _any_power,
    "power_cycle": _any_power,
    "power_status": _any_power,
    "redfish_reboot": redfish.not_applicable,
    "redfish_power": redfish.not_applicable,
    "xenapi_reboot": xen.not_applicable,
    "reimage": _bmc,
}


def why_not(task_name: str, machine: Machine, loan: LoanState | None = None) -> str | None:
    """Why C{task_name} cannot run on C{machine} (a short phrase), or None when it can."""
    if task_name.startswith("ipmi_"):
        return ipmi.not_applicable(machine)
    if task_name == "return_loan":
        return None if loan is not None else "the machine is not on loan"
    if task_name == "loan" and loan is not None:
        return f"the machine is already on loan to {loan.borrower}"
    check = _CHECKS.get(task_name)
    return check(machine) if check is not None else None
