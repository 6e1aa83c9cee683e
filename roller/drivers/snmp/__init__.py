"""
SNMP: pysnmp's engine on the Twisted reactor, and PDU outlets over it.

  - L{carrier}: the Twisted transport dispatcher and UDP/UDP6 transports.
  - L{client}: L{SnmpClient} (GET/SET as Deferreds), L{SnmpTarget}, errors.
  - L{models}: the PDU models by name (L{MODELS}) and sysObjectID lookup.
  - L{pdu}: L{SnmpPdus} (per-process: client, per-PDU pacing, detected
    models) and L{PduOutletPower}, an L{roller.drivers.power.IPowerDriver}.

L{make_pdus} builds the per-process L{SnmpPdus} from the settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from roller.drivers.reactor import IUdpReactor
from roller.drivers.snmp.client import (
    SnmpAuthError,
    SnmpClient,
    SnmpConfigError,
    SnmpError,
    SnmpErrorStatus,
    SnmpNoSuchObject,
    SnmpProtocolError,
    SnmpTarget,
    SnmpTimeout,
    VarBind,
)
from roller.drivers.snmp.models import MODELS, OutletStatus, PduModel, model_for_sys_object_id
from roller.drivers.snmp.pdu import EndpointPacer, PduOutletPower, SnmpPdus

if TYPE_CHECKING:
    from roller.config import Settings

__all__ = [
    "EndpointPacer",
    "MODELS",
    "OutletStatus",
    "PduModel",
    "PduOutletPower",
    "SnmpAuthError",
    "SnmpClient",
    "SnmpConfigError",
    "SnmpError",
    "SnmpErrorStatus",
    "SnmpNoSuchObject",
    "SnmpPdus",
    "SnmpProtocolError",
    "SnmpTarget",
    "SnmpTimeout",
    "VarBind",
    "make_pdus",
    "model_for_sys_object_id",
]


def make_pdus(reactor: IUdpReactor, settings: Settings | None = None) -> SnmpPdus:
    """
    The process's L{SnmpPdus} (and its L{SnmpClient}) from the settings'
    C{snmp_*} values; defaults for any that are missing.
    """

    def s(name: str, default: Any) -> Any:
        value = getattr(settings, name, None) if settings is not None else None
        return default if value is None else value

    client = SnmpClient(reactor, timeout=s("snmp_timeout", 2.0), retries=s("snmp_retries", 2))
    version = s("snmp_community_version", "model")
    return SnmpPdus(
        reactor, client,
        min_interval=s("snmp_min_interval", 1.0),
        settle_timeout=s("snmp_settle_timeout", 30.0),
        reboot_timeout=s("snmp_reboot_timeout", 90.0),
        poll_interval=s("snmp_poll_interval", 1.0),
        default_off_for=s("snmp_off_for", 5.0),
        community_version=None if version == "model" else version,
        default_credential=s("snmp_credential", "") or None,
    )
