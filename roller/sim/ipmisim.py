"""
A real IPMI BMC on loopback for tests (and the demo): OpenIPMI's C{ipmi_sim}.

    with IpmiSim() as bmc:                      # file-backed power, starts off
        target = bmc.target()                   # an IpmiTarget for roller's driver
        ...                                     # ipmitool -I lanplus -C 3 -H 127.0.0.1 -p bmc.port
        assert bmc.power == "on"
        assert bmc.calls()[-1] == "set power 1"

L{IpmiSim} writes a private C{lan.conf} (one LAN channel on 127.0.0.1 and a
free UDP port, user 2 = C{username}/C{password} with admin privilege) and
C{bmc.emu} (one BMC at 0x20 with a SEL, optionally pre-filled), starts
C{ipmi_sim -c lan.conf -f bmc.emu -s STATEDIR -n} with C{subprocess.Popen}
(so the PID is the simulator's), waits until it answers an RMCP presence
ping, and kills it by PID.

Power and boot device live behind C{ipmi_sim}'s C{chassis_control}
script, called as C{SCRIPT 0x20 get power boot} (answering C{power:0|1},
C{boot:DEV}) or C{SCRIPT 0x20 set power 1} / C{set reset 1} / C{set boot
pxe}.  Either

  - the state is a file in the work directory (the default):
    L{IpmiSim.power}, L{IpmiSim.set_power}; a reset of a powered-off
    machine leaves it off, like real hardware; L{IpmiSim.stick} makes the
    machine ignore power requests (for read-back mismatch tests); or
  - with C{power=PowerState(...)} and C{reactor=...}, a fleet machine's
    L{roller.sim.fleet.PowerState} is the state: the script is a small
    Python client of a UNIX socket that the simulator object serves on
    that reactor (L{ChassisControlServer}), so C{set power 0} really takes
    the simulated machine down.  The reactor must be running while BMC
    commands arrive (it is, under C{pytest_twisted} or in the demo);
    start with L{IpmiSim.start_listening} first.

Every script call is recorded (L{IpmiSim.calls}, e.g. C{"get power"},
C{"set power 0"}).  Notes from running it:

  - ipmitool must use C{-I lanplus -C 3}: without C{-C 3} every command
    stalls ~10 s on cipher-suite discovery.
  - C{chassis power cycle} is C{set power 0} then, about 1 s later,
    C{set power 1}; C{reset} is C{set reset 1}.
  - A wrong password gives C{RAKP 2 HMAC is invalid} (with C{-v}); an
    unknown user C{unauthorized name}.
  - UDP binds are shared (C{SO_REUSEADDR}): two simulators on one port both
    start; the free port is picked just before starting.

Skip real-BMC tests with L{skip_reason} when C{ipmi_sim} or C{ipmitool} is
missing (C{apt-get install -y openipmi ipmitool}).
"""

from __future__ import annotations

import os
import secrets as _secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorUNIX
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from roller.sim.daemon import DaemonProcess, free_udp_port

if TYPE_CHECKING:
    from roller.sim.fleet import PowerState

log = Logger()

__all__ = [
    "IPMI_SIM",
    "IPMITOOL",
    "ChassisControlServer",
    "IpmiSim",
    "IpmiSimStartError",
    "free_udp_port",
    "rmcp_ping",
    "skip_reason",
]

IPMI_SIM = "/usr/bin/ipmi_sim"
IPMITOOL = "/usr/bin/ipmitool"

#: Two SEL records (a system hardware failure, a power supply failure).
DEFAULT_SEL = (
    "0x02 0x00 0x00 0x00 0x00 0x20 0x00 0x04 0x12 0x01 0x6f 0x02 0xff 0xff",
    "0x02 0x00 0x00 0x00 0x00 0x20 0x00 0x04 0x08 0x02 0x6f 0x01 0xff 0xff",
)

_FILE_SCRIPT = """\
#!/bin/sh
# chassis_control of roller's test BMC (roller/sim/ipmisim.py): $1 is the MC address.
dir='{dir}'
shift
op=$1
shift
echo "$op $*" >> "$dir/calls"
put() {{ printf '%s\\n' "$2" > "$dir/$1.tmp" && mv -f "$dir/$1.tmp" "$dir/$1"; }}
case "$op" in
get)
    for item in "$@"; do
        case "$item" in
        power) echo "power:$(cat "$dir/power" 2>/dev/null || echo 0)" ;;
        boot) echo "boot:$(cat "$dir/boot" 2>/dev/null || echo default)" ;;
        esac
    done ;;
set)
    while [ $# -ge 2 ]; do
        case "$1" in
        power) [ -e "$dir/stuck" ] || put power "$2" ;;
        reset) [ -e "$dir/stuck" ] || [ "$(cat "$dir/power" 2>/dev/null)" != 1 ] || echo reset >> "$dir/resets" ;;
        boot) put boot "$2" ;;
        esac
        shift 2
    done ;;
esac
exit 0
"""

_SOCKET_SCRIPT = """\
#!{python} -I
# chassis_control of roller's test BMC (roller/sim/ipmisim.py), backed by a
# fleet PowerState served on a UNIX socket.
import socket, sys
with open({calls!r}, "a") as f:
    f.write(" ".join(sys.argv[2:]) + "\\n")
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect({sock!r})
s.sendall((" ".join(sys.argv[2:]) + "\\n").encode())
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode())
"""


class IpmiSimStartError(AssertionError):
    """ipmi_sim did not come up."""


def skip_reason(ipmi_sim: str = IPMI_SIM, ipmitool: str = IPMITOOL) -> str | None:
    """Why real-BMC tests cannot run here, or C{None}."""
    if not os.access(ipmi_sim, os.X_OK):
        return f"{ipmi_sim} is not installed (apt-get install -y openipmi)"
    if not os.access(ipmitool, os.X_OK):
        return f"{ipmitool} is not installed (apt-get install -y ipmitool)"
    return None


#: An RMCP/ASF presence ping (message tag 0x01).
_PING = bytes([0x06, 0x00, 0xFF, 0x06, 0x00, 0x00, 0x11, 0xBE, 0x80, 0x01, 0x00, 0x00])


def rmcp_ping(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether something answers an RMCP presence ping (a pong, type 0x40) on C{host:port}."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(_PING, (host, port))
            data, _ = s.recvfrom(512)
        except OSError:
            return False
    return len(data) >= 9 and data[:4] == _PING[:4] and data[8] == 0x40


class _ChassisControl(Protocol):
    """One script call: a request line in, the answer out, then close."""

    def __init__(self, server: ChassisControlServer):
        self.server = server
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None  # connected
        self.buffer += data
        if b"\n" not in self.buffer:
            if len(self.buffer) > 4096:
                self.transport.loseConnection()
            return
        line = self.buffer.split(b"\n", 1)[0].decode("utf-8", "replace")
        try:
            answer = self.server.handle(line.split())
        except Exception:  # noqa: BLE001 -- any failure answers empty (ipmi_sim reads an error) and is logged
            log.failure("chassis_control request {line!r} failed", line=line)
            answer = ""
        self.transport.write(answer.encode())
        self.transport.loseConnection()


class ChassisControlServer(Factory):
    """
    Answers chassis_control requests from a fleet L{PowerState}.

    C{set power 0} is C{power_off()}, C{set power 1} C{power_on()}, C{set
    reset 1} C{reboot(reset_down_for)} if the power is on (nothing if off).

    @ivar boot: The boot device last set.
    """

    def __init__(self, power: PowerState, reset_down_for: float | None = None):
        self.power = power
        self.reset_down_for = reset_down_for
        self.boot = "default"

    def buildProtocol(self, addr: Any) -> Protocol:
        return _ChassisControl(self)

    def handle(self, words: Sequence[str]) -> str:
        if not words:
            return ""
        op, args = words[0], list(words[1:])
        if op == "get":
            out = []
            for item in args:
                if item == "power":
                    out.append(f"power:{1 if self.power.on else 0}")
                elif item == "boot":
                    out.append(f"boot:{self.boot}")
            return "".join(line + "\n" for line in out)
        if op == "set":
            for name, value in zip(args[::2], args[1::2], strict=False):
                if name == "power":
                    if value == "0":
                        self.power.power_off()
                    else:
                        self.power.power_on()
                elif name == "reset":
                    if self.power.on:
                        self.power.reboot(self.reset_down_for)
                elif name == "boot":
                    self.boot = value
        return ""


class IpmiSim(DaemonProcess):
    """
    One C{ipmi_sim} child process on 127.0.0.1.

    @param workdir: Where its files go; a fresh directory under C{/tmp} by
        default (removed by L{stop}).
    @param port: A fixed UDP port; a free one by default.
    @param username: The admin user (IPMI user 2).
    @param password: Its password; a random one by default.
    @param on: The initial power (file-backed state only).
    @param sel: SEL records to pre-fill (each 13 bytes after the record
        type, as C{sel_add} takes them); L{DEFAULT_SEL} by default.
    @param power: A fleet L{PowerState} to use instead of a file.
    @param reactor: The reactor serving the L{ChassisControlServer}
        (required with C{power}).
    @param reset_down_for: Seconds a PowerState-backed machine stays down
        on a reset (its default by default).
    """

    host = "127.0.0.1"
    name = "ipmi_sim"

    def __init__(self, *, workdir: str | os.PathLike | None = None, port: int | None = None,
                 username: str = "admin", password: str | None = None, on: bool = False,
                 sel: Iterable[str] = DEFAULT_SEL, power: PowerState | None = None, reactor: IReactorUNIX | None = None,
                 reset_down_for: float | None = None, ipmi_sim: str = IPMI_SIM):
        if power is not None and reactor is None:
            raise ValueError("a PowerState-backed IpmiSim needs the reactor that serves it")
        self.ipmi_sim = ipmi_sim
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="roller-ipmisim-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self._port_given = port is not None
        self.port = port or free_udp_port(self.host)
        self.username = username
        self.password = password if password is not None else "pw-" + _secrets.token_hex(6)
        self.sel = tuple(sel)
        self.power_state = power
        self.reactor = reactor
        self.reset_down_for = reset_down_for
        self.control: ChassisControlServer | None = None
        self._listening: Any = None
        self.state_dir = self.dir / "state"
        self.config_path = self.dir / "lan.conf"
        self.emu_path = self.dir / "bmc.emu"
        self.script_path = self.dir / "chassis-control"
        self.socket_path = self.dir / "control.sock"
        self.calls_path = self.dir / "calls"
        self.log_path = self.dir / "ipmi_sim.log"
        self._write_files(on)

    def __repr__(self) -> str:
        return f"<IpmiSim {self.host}:{self.port} pid={self.pid} dir={self.dir}>"

    # -- files

    def _write_files(self, on: bool) -> None:
        self.state_dir.mkdir(exist_ok=True)
        self.calls_path.write_text("")
        if self.power_state is None:
            self.script_path.write_text(_FILE_SCRIPT.format(dir=self.dir))
            self.set_power(on)
        else:
            self.script_path.write_text(_SOCKET_SCRIPT.format(
                python=sys.executable, calls=str(self.calls_path), sock=str(self.socket_path)))
        self.script_path.chmod(0o755)
        for name in ("stuck", "resets", "boot"):
            (self.dir / name).unlink(missing_ok=True)
        self.emu_path.write_text(
            "mc_setbmc 0x20\n"
            "mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n"
            "sel_enable 0x20 1000 0x0a\n"
            + "".join(f"sel_add 0x20 {record}\n" for record in self.sel)
            + "mc_enable 0x20\n")

    def _config(self) -> str:
        auths = "none md2 md5 straight"
        return (
            'name "roller-test"\n'
            "set_working_mc 0x20\n"
            "  startlan 1\n"
            f"    addr {self.host} {self.port}\n"
            "    priv_limit admin\n"
            f"    allowed_auths_callback {auths}\n"
            f"    allowed_auths_user {auths}\n"
            f"    allowed_auths_operator {auths}\n"
            f"    allowed_auths_admin {auths}\n"
            f"    guid {_secrets.token_hex(16)}\n"
            "  endlan\n"
            f'  chassis_control "{self.script_path} 0x20"\n'
            f'user 2 true "{self.username}" "{self.password}" admin 10 {auths}\n'
        )

    # -- state

    @property
    def power(self) -> str:
        """C{"on"} or C{"off"}."""
        if self.power_state is not None:
            return "on" if self.power_state.on else "off"
        try:
            value = (self.dir / "power").read_text().strip()
        except FileNotFoundError:
            value = "0"
        return "on" if value == "1" else "off"

    def set_power(self, on: bool) -> None:
        """Set the (file-backed) power without going through the BMC."""
        if self.power_state is not None:
            (self.power_state.power_on if on else self.power_state.power_off)()
            return
        tmp = self.dir / "power.tmp"
        tmp.write_text("1\n" if on else "0\n")
        os.replace(tmp, self.dir / "power")

    def stick(self, stuck: bool = True) -> None:
        """Make the (file-backed) machine ignore power and reset requests (the BMC still says OK)."""
        path = self.dir / "stuck"
        if stuck:
            path.write_text("")
        else:
            path.unlink(missing_ok=True)

    @property
    def boot_device(self) -> str:
        """The boot device last set through the BMC (C{"default"} before)."""
        if self.control is not None:
            return self.control.boot
        try:
            return (self.dir / "boot").read_text().strip()
        except FileNotFoundError:
            return "default"

    def resets(self) -> int:
        """How many resets of a powered (file-backed) machine happened."""
        try:
            return len((self.dir / "resets").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def calls(self) -> list[str]:
        """The chassis_control calls so far, e.g. C{["get power", "set power 1"]}."""
        return self.calls_path.read_text().splitlines()

    def clear_calls(self) -> None:
        self.calls_path.write_text("")

    # -- for roller

    def target(self, **overrides: Any) -> Any:
        """An L{roller.drivers.ipmi.IpmiTarget} for this BMC (overrides: any field)."""
        from roller.drivers.ipmi import IpmiTarget

        kw: dict[str, Any] = dict(host=self.host, port=self.port, username=self.username,
                                  password=self.password, interface="lanplus",
                                  credential="ipmisim")
        kw.update(overrides)
        return IpmiTarget(**kw)

    def ipmitool_argv(self, *command: str) -> list[str]:
        """A plain ipmitool command line for this BMC (password from C{IPMI_PASSWORD})."""
        return [IPMITOOL, "-I", "lanplus", "-C", "3", "-H", self.host, "-p", str(self.port),
                "-U", self.username, "-E", *command]

    # -- lifecycle

    def start_listening(self) -> None:
        """Serve the chassis_control socket (PowerState-backed only; L{start} calls it)."""
        if self.power_state is None or self._listening is not None:
            return
        assert self.reactor is not None  # checked in __init__ when power_state is given
        self.socket_path.unlink(missing_ok=True)
        self.control = ChassisControlServer(self.power_state, self.reset_down_for)
        self._listening = self.reactor.listenUNIX(str(self.socket_path), self.control)

    def start(self, timeout: float = 10.0) -> IpmiSim:
        if self.running:
            raise RuntimeError(f"ipmi_sim is already running (pid {self.pid})")
        self.start_listening()
        for attempt in range(3):
            try:
                return self._start(timeout)
            except IpmiSimStartError:
                if self._port_given or attempt == 2:
                    raise
                self.port = free_udp_port(self.host)
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> IpmiSim:
        self.config_path.write_text(self._config())
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.state_dir.mkdir()
        self._spawn([self.ipmi_sim, "-c", str(self.config_path), "-f", str(self.emu_path),
                     "-s", str(self.state_dir), "-n"], cwd=str(self.dir))
        # No sleep between probes: the ping itself waits 0.05 s for a pong.
        return self._wait_ready(lambda: rmcp_ping(self.host, self.port, 0.05), timeout,
                                IpmiSimStartError, where=f"{self.host}:{self.port}", poll=0,
                                cleanup=self._kill)

    def stop(self, *, remove: bool = True) -> None:
        """
        Kill ipmi_sim by PID, stop serving the socket, remove an own work
        directory.  A fleet PowerState is its owner's to stop.
        """
        self._kill()
        self._close_log()
        if self._listening is not None:
            self._listening.stopListening()
            self._listening = None
        if remove and self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> IpmiSim:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
