"""
A small Redfish BMC (Klein, on loopback) in front of a fleet machine's
L{roller.sim.fleet.PowerState}: the fleet simulator's Redfish
front-end, also usable alone in tests.

    bmc = RedfishBmc(power, users={"admin": "pw"}, system_id="sim-001")
    url = bmc.listen(reactor, "127.0.1.1", 8443)      # http://127.0.1.1:8443
    ...
    bmc.resets        # ["ForceRestart", ...] as received
    bmc.boots         # boot source of every power-on since: ["Pxe", "Hdd", ...]
    await bmc.stop()

What it serves (HTTP basic auth on everything but the service root; a
wrong user or password answers 401 with C{WWW-Authenticate: Basic}):

  - C{GET /redfish/v1/}: the service root (C{Systems}; no
    C{SessionService}, so clients use basic auth).
  - C{GET /redfish/v1/Systems}: one member, C{/redfish/v1/Systems/ID}.
  - C{GET /redfish/v1/Systems/ID}: a ComputerSystem with C{PowerState}
    (C{On} while the power is on I{or} a reboot is under way, i.e. the
    PowerState will come back by itself: a BMC keeps reporting On through
    a warm reset while the OS is down), C{Boot} (override target, enabled,
    mode, and the targets allowed) and the C{#ComputerSystem.Reset} action
    with C{ResetType@Redfish.AllowableValues} (L{reset_types}).  Another ID
    is 404.
  - C{POST .../Actions/ComputerSystem.Reset} C{{"ResetType": T}}: C{On},
    C{ForceOn} power on; C{ForceOff}, C{GracefulShutdown} power off;
    C{ForceRestart}, C{GracefulRestart} reboot (power down now, up after
    L{down_for}; a machine that is off is powered on); C{PowerCycle} the
    same as a cycle; C{Nmi} nothing.  A type not in L{reset_types} answers
    400 with a Redfish error body (C{ActionParameterNotSupported}).  204.
  - C{PATCH /redfish/v1/Systems/ID} C{{"Boot": {...}}}: sets the boot
    override.  C{Once} is kept until the next power-on, which uses it and
    resets it to C{Disabled}; C{Continuous} is used at every power-on.

Every request is recorded in L{requests} as C{"METHOD /path"}.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

from attrs import define, field
from klein import Klein
from twisted.internet.interfaces import IReactorTCP
from twisted.logger import Logger

from roller.sim.web import base_url, serve

if TYPE_CHECKING:
    from roller.sim.fleet import PowerState

log = Logger()

__all__ = ["RESET_TYPES", "BOOT_TARGETS", "RedfishBmc"]

#: What the simulated BMC advertises by default.
RESET_TYPES = ("On", "ForceOff", "GracefulShutdown", "GracefulRestart", "ForceRestart", "PowerCycle",
               "ForceOn", "Nmi")
BOOT_TARGETS = ("None", "Pxe", "Hdd", "Cd", "Usb", "BiosSetup")

ROOT = "/redfish/v1"


@define
class RedfishBmc:
    """
    The simulated BMC of one machine; see the module docstring.

    @ivar power: The machine's L{PowerState}.
    @ivar users: User name -> password for basic auth.
    @ivar system_id: The ComputerSystem's Id (its path's last part).
    @ivar down_for: Seconds a reboot or power cycle keeps the power down
        (C{None}: the PowerState's default).
    @ivar reset_types: The ResetTypes advertised and accepted.
    """

    power: PowerState
    users: dict[str, str] = field(factory=lambda: {"admin": "admin"})
    system_id: str = "1"
    down_for: float | None = None
    reset_types: tuple[str, ...] = RESET_TYPES
    boot_target: str = "None"
    boot_enabled: str = "Disabled"
    boot_mode: str = "UEFI"
    resets: list[str] = field(factory=list)
    boots: list[str] = field(factory=list)
    requests: list[str] = field(factory=list)
    _port: Any = field(default=None, init=False)

    app = Klein()

    def __attrs_post_init__(self) -> None:
        self.power.add_listener(self._power_changed)

    # -- lifecycle

    def listen(self, reactor: IReactorTCP, interface: str = "127.0.0.1", port: int = 0) -> str:
        """Start listening; the BMC's base URL (C{http://ADDRESS:PORT})."""
        self._port = serve(self.app, reactor, interface, port)
        return self.url

    @property
    def url(self) -> str:
        return base_url(self._port)

    @property
    def port(self) -> int:
        return self._port.getHost().port

    @property
    def system_path(self) -> str:
        return f"{ROOT}/Systems/{self.system_id}"

    async def stop(self) -> None:
        """Stop listening and detach from the PowerState."""
        self.power.remove_listener(self._power_changed)
        if self._port is not None:
            port, self._port = self._port, None
            await port.stopListening()

    # -- state

    @property
    def power_state(self) -> str:
        """C{"On"} or C{"Off"}, as the BMC reports it."""
        return "On" if self.power.on or self.power.pending is not None else "Off"

    def _power_changed(self, on: bool) -> None:
        if not on:
            return
        if self.boot_enabled in ("Once", "Continuous") and self.boot_target != "None":
            self.boots.append(self.boot_target)
            if self.boot_enabled == "Once":
                self.boot_enabled, self.boot_target = "Disabled", "None"
        else:
            self.boots.append("Hdd")

    def system(self) -> dict:
        return {
            "@odata.id": self.system_path,
            "@odata.type": "#ComputerSystem.v1_10_0.ComputerSystem",
            "Id": self.system_id,
            "Name": self.system_id,
            "PowerState": self.power_state,
            "Boot": {
                "BootSourceOverrideTarget": self.boot_target,
                "BootSourceOverrideEnabled": self.boot_enabled,
                "BootSourceOverrideMode": self.boot_mode,
                "BootSourceOverrideTarget@Redfish.AllowableValues": list(BOOT_TARGETS),
            },
            "Actions": {
                "#ComputerSystem.Reset": {
                    "target": f"{self.system_path}/Actions/ComputerSystem.Reset",
                    "ResetType@Redfish.AllowableValues": list(self.reset_types),
                },
            },
        }

    def reset(self, reset_type: str) -> None:
        """Apply C{reset_type} to the power (see the module docstring)."""
        self.resets.append(reset_type)
        if reset_type in ("On", "ForceOn"):
            if not self.power.on:
                self.power.power_on()
        elif reset_type in ("ForceOff", "GracefulShutdown"):
            self.power.power_off()
        elif reset_type in ("ForceRestart", "GracefulRestart"):
            if self.power.on:
                self.power.reboot(self.down_for)
            elif self.power.pending is None:
                self.power.power_on()
        elif reset_type == "PowerCycle":
            self.power.cycle(self.down_for)

    # -- HTTP

    def _json(self, request: Any, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"odata-version", b"4.0")
        return json.dumps(body).encode()

    def _error(self, request: Any, status: int, code: str, message: str) -> bytes:
        return self._json(request, status, {"error": {"code": f"Base.1.8.{code}", "message": message,
                                                      "@Message.ExtendedInfo": []}})

    def _record(self, request: Any) -> None:
        self.requests.append(f"{request.method.decode()} {request.path.decode()}")

    def _authorized(self, request: Any) -> bool:
        header = request.getHeader(b"authorization") or b""
        if not header.startswith(b"Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return user in self.users and self.users[user] == password

    def _refuse(self, request: Any) -> bytes:
        request.setHeader(b"www-authenticate", b'Basic realm="roller-sim"')
        return self._error(request, 401, "NoValidSession", "authentication required")

    @app.route("/redfish/v1", methods=["GET"])
    @app.route("/redfish/v1/", methods=["GET"])
    def root(self, request: Any) -> bytes:
        self._record(request)
        return self._json(request, 200, {
            "@odata.id": f"{ROOT}/", "@odata.type": "#ServiceRoot.v1_5_0.ServiceRoot", "Id": "RootService",
            "Name": "roller fleet BMC", "RedfishVersion": "1.8.0",
            "Systems": {"@odata.id": f"{ROOT}/Systems"},
        })

    @app.route("/redfish/v1/Systems", strict_slashes=False, methods=["GET"])
    def systems(self, request: Any) -> bytes:
        self._record(request)
        if not self._authorized(request):
            return self._refuse(request)
        return self._json(request, 200, {
            "@odata.id": f"{ROOT}/Systems", "Name": "Computer System Collection",
            "Members@odata.count": 1, "Members": [{"@odata.id": self.system_path}],
        })

    @app.route("/redfish/v1/Systems/<system_id>", strict_slashes=False, methods=["GET", "PATCH"])
    def system_resource(self, request: Any, system_id: str) -> bytes:
        self._record(request)
        if not self._authorized(request):
            return self._refuse(request)
        if system_id != self.system_id:
            return self._error(request, 404, "ResourceMissingAtURI", f"no system {system_id}")
        if request.method == b"PATCH":
            try:
                body = json.loads(request.content.read() or b"{}")
                boot = body["Boot"]
                if not isinstance(boot, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                return self._error(request, 400, "MalformedJSON", "expected {\"Boot\": {...}}")
            target = boot.get("BootSourceOverrideTarget", self.boot_target)
            enabled = boot.get("BootSourceOverrideEnabled", self.boot_enabled)
            mode = boot.get("BootSourceOverrideMode", self.boot_mode)
            if target not in BOOT_TARGETS or enabled not in ("Once", "Continuous", "Disabled") \
                    or mode not in ("UEFI", "Legacy"):
                return self._error(request, 400, "PropertyValueNotInList", f"bad Boot values {boot!r}"[:200])
            self.boot_target, self.boot_enabled, self.boot_mode = target, enabled, mode
        return self._json(request, 200, self.system())

    @app.route("/redfish/v1/Systems/<system_id>/Actions/ComputerSystem.Reset", methods=["POST"])
    def reset_action(self, request: Any, system_id: str) -> bytes:
        self._record(request)
        if not self._authorized(request):
            return self._refuse(request)
        if system_id != self.system_id:
            return self._error(request, 404, "ResourceMissingAtURI", f"no system {system_id}")
        try:
            reset_type = json.loads(request.content.read() or b"{}").get("ResetType")
        except (ValueError, AttributeError):
            return self._error(request, 400, "MalformedJSON", "expected {\"ResetType\": ...}")
        if reset_type not in self.reset_types:
            return self._error(request, 400, "ActionParameterNotSupported",
                               f"ResetType {reset_type!r} is not supported")
        self.reset(reset_type)
        request.setResponseCode(204)
        return b""
