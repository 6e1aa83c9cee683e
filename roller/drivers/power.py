"""
Power control of one machine, whatever carries it: a PDU outlet over SNMP,
a BMC over IPMI or Redfish, or a Xen VM through its pool's XenAPI.

The generic tasks (C{power_on}, C{power_off}, C{power_cycle},
C{power_status}) only see L{IPowerDriver}; each kind of power method
provides it through its driver's C{for_machine(machine, secrets,
on_progress=...)}: L{roller.drivers.snmp.pdu.PduOutletPower} for PDU
outlets, L{roller.drivers.ipmi.IpmiPower}, L{roller.drivers.redfish.RedfishPower}
and L{roller.drivers.xen.XenPower}.  Which one a machine uses is decided
by L{roller.tasks.pdu.power_driver}.
Every action returns a Deferred that fires once the new state has been
I{read back} from the device (or fails with L{PowerError}), and cancelling
it cancels what the driver is waiting for.
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from roller.drivers.errors import DriverError
from roller.secrets import Credential

__all__ = [
    "POWER_STATES",
    "DriverError",
    "IPowerDriver",
    "PowerActionError",
    "PowerAuthError",
    "PowerConnError",
    "PowerError",
    "PowerResult",
    "PowerSettingError",
    "PowerStateMismatch",
    "PowerTimeout",
    "password_login",
]

#: What L{PowerResult.state} can be.
POWER_STATES = ("on", "off", "changing", "unknown")


@frozen
class PowerResult:
    """
    The outcome of a power action or status query.

    @ivar state: C{"on"}, C{"off"}, C{"changing"} or C{"unknown"}, as read
        from the device.
    @ivar detail: One readable line for the job log (what was sent, what
        was read, how long it took).
    @ivar raw: The device's own word for the state (C{"offWait"},
        C{"outletStatusOn"}), if any.
    """

    state: str
    detail: str
    raw: str | None = None


class PowerError(DriverError):
    """
    A power action failed: the device refused it, did not answer, or did
    not reach the requested state.  The message is one line for the job
    log; it never holds a secret.

    Drivers raise the subclasses below (or their own subclasses of them,
    e.g. L{roller.drivers.ipmi.IpmiAuthFailed} is a L{PowerAuthError}),
    never a private tree translated afterwards.

    @ivar kind: C{"timeout"}, C{"auth"}, C{"refused"}, C{"config"},
        C{"unreached"} (commanded, but the state was not read back in time)
        or C{"protocol"}; each subclass has its own.
    @ivar sent: Whether a command may have reached the device (so the
        machine may have changed state even though this failed).
    """

    #: The default of L{kind} for this class.
    kind: str = "protocol"
    #: The default of L{sent} for this class.
    default_sent: bool = False

    def __init__(self, message: str, kind: str | None = None, sent: bool | None = None, *,
                 host: str | None = None, port: int | None = None) -> None:
        super().__init__(message, host=host, port=port)
        self.kind = type(self).kind if kind is None else kind
        self.sent = type(self).default_sent if sent is None else sent


class PowerSettingError(PowerError):
    """The driver cannot be used as configured (inventory, settings, secrets); nothing was sent."""

    kind = "config"


class PowerAuthError(PowerError):
    """The device refused the credential (or its privilege); nothing was run."""

    kind = "auth"


class PowerConnError(PowerError):
    """The device could not be reached (refused, unreachable, unresolvable, TLS)."""

    kind = "refused"


class PowerActionError(PowerError):
    """The device answered but refused the command, or does not offer it."""

    kind = "refused"


class PowerTimeout(PowerError):
    """The device did not answer at all."""

    kind = "timeout"


class PowerStateMismatch(PowerError):
    """The command was accepted but the state read back is not the one wanted in time."""

    kind = "unreached"
    default_sent = True


class IPowerDriver(Interface):
    """
    Switches one machine's power and reads it back.
    """

    description = Attribute("One line naming the device and outlet/BMC, for logs (no secrets).")

    def status() -> Deferred[PowerResult]:
        """Read the current power state."""

    def on() -> Deferred[PowerResult]:
        """Power on; fires when the device reads back on."""

    def off() -> Deferred[PowerResult]:
        """Power off; fires when the device reads back off."""

    def cycle(off_for: float | None = None) -> Deferred[PowerResult]:
        """
        Power off then on.  With C{off_for=None} the device's own cycle is
        used where it has one (a PDU's reboot command, IPMI chassis power
        cycle); with a number of seconds, roller switches off, waits that
        long and switches on, reading back both.  Fires when the device
        reads back on.
        """

    def reset() -> Deferred[PowerResult]:
        """
        A hard reset.  For a BMC: chassis reset (power stays on).  For a PDU
        outlet, which has no reset line: the same as C{cycle()}.
        """


def password_login(credential: Credential) -> tuple[str, str]:
    """
    The user name and password of a credential of type C{password} (which
    L{Credential} guarantees to have both).

    @raise PowerSettingError: It has not (it is of another type).
    """
    if credential.username is None or credential.password is None:
        raise PowerSettingError(f"credential {credential.name!r} is of type {credential.kind}, not password")
    return credential.username, credential.password
