"""
A real SNMP agent for tests and benchmarks: net-snmp C{snmpd} on loopback,
with PDU outlet tables of every model roller drives emulated by a
C{pass_persist} script.

    with SnmpAgent(sys_object_id="1.3.6.1.4.1.1718.3") as agent:
        agent.port                      # UDP port on 127.0.0.1
        agent.credentials()             # roller Credentials it accepts
        agent.outlet_state("sentry3", "AA8")   # "on"/"off", from the emulator
        ...

L{SnmpAgent} writes a private C{snmpd.conf} (C{-C}: no system config) and
starts C{snmpd -f} as a child process (its PID is snmpd's), waits until a
real GET answers, and kills it by PID in L{SnmpAgent.stop}.  It accepts:

  - v2c: community C{private} (read-write) and C{public} (read-only);
  - v3 (see L{V3_USERS}): C{roller-priv} (SHA/AES, authPriv),
    C{roller-sha512} (SHA-512/AES-256, authPriv), C{roller-auth}
    (SHA-256, authNoPriv), C{roller-noauth} (noAuthNoPriv); all read-write.

C{sysContact.0} is writable natively (C-speed SETs for benchmarks);
C{sysObjectID.0} is what the constructor says (for model auto-detection).

The emulator (C{python -m roller.testing.snmpd pass-persist SUBTREE}) is
written from the vendors' MIBs independently of
L{roller.drivers.snmp.models}, so the driver is checked against it rather
than against itself.  It keeps each outlet's state in a JSON file in the
agent's directory (one file per subtree process) so tests can read it.
A command takes C{settle} seconds to show (status reads a transitional
value meanwhile, where the MIB has one); a reboot keeps the outlet off for
C{reboot_off} seconds.

Only the standard library on the test side (the C{snmpget} binary is used
for the readiness probe).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from roller.sim.daemon import DaemonProcess, free_udp_port

__all__ = [
    "BENCH_OID",
    "SNMPD",
    "V3_USERS",
    "SnmpAgent",
    "agent_credentials",
    "SnmpdStartError",
    "SilentAgent",
    "free_udp_port",
    "skip_reason",
]

SNMPD = "/usr/sbin/snmpd"
SNMPGET = "/usr/bin/snmpget"

COMMUNITY = "private"
#: An Integer32 that SETs change in snmpd's memory (C{override -rw}): the
#: fastest writable object net-snmp has, for benchmarks.  (C{sysContact.0}
#: is writable too, but snmpd saves it to disk after every SET: ~200/s.)
BENCH_OID = "1.3.6.1.4.1.8072.9999.9999.1.0"
READ_COMMUNITY = "public"

#: user -> (auth protocol, auth key, priv protocol, priv key, level), in
#: roller's secrets-file spelling.
V3_USERS: dict[str, tuple[str, str | None, str, str | None, str]] = {
    "roller-priv": ("SHA", "auth-pass-phrase-1", "AES", "priv-pass-phrase-1", "priv"),
    "roller-sha512": ("SHA512", "auth-pass-phrase-2", "AES256", "priv-pass-phrase-2", "priv"),
    "roller-auth": ("SHA256", "auth-pass-phrase-3", "none", None, "auth"),
    "roller-noauth": ("none", None, "none", None, "noauth"),
}
_NETSNMP_AUTH = {"SHA": "SHA", "SHA224": "SHA-224", "SHA256": "SHA-256", "SHA384": "SHA-384",
                 "SHA512": "SHA-512", "MD5": "MD5"}
_NETSNMP_PRIV = {"AES": "AES", "AES192": "AES-192", "AES256": "AES-256", "DES": "DES"}

#: The enterprise subtrees the emulator serves, one pass_persist process each.
SUBTREES = {
    "servertech": "1.3.6.1.4.1.1718",
    "apc": "1.3.6.1.4.1.318",
    "cyberpower": "1.3.6.1.4.1.3808",
    "raritan": "1.3.6.1.4.1.13742",
    "baytech": "1.3.6.1.4.1.4779",
    "eaton": "1.3.6.1.4.1.534",
}


def skip_reason() -> str | None:
    """Why agent tests cannot run here, or None."""
    for binary, package in ((SNMPD, "snmpd"), (SNMPGET, "snmp")):
        if not os.access(binary, os.X_OK):
            return f"{binary} is not installed (apt-get install {package})"
    return None


def agent_credentials(users: dict[str, tuple] | None = None) -> dict[str, Any]:
    """
    roller L{Credential}s that an L{SnmpAgent} accepts, by name: the
    communities, and one per v3 user (of C{users}, by default L{V3_USERS},
    which every agent made without C{users} has).
    """
    from roller.secrets import Credential

    out = {
        "v2c": Credential(name="v2c", kind="snmp-community", community=COMMUNITY,
                          read_community=READ_COMMUNITY),
        "v2c-ro": Credential(name="v2c-ro", kind="snmp-community", community=READ_COMMUNITY),
    }
    for user, (auth, auth_key, priv, priv_key, _) in (V3_USERS if users is None else users).items():
        out[user] = Credential(name=user, kind="snmp-v3", user=user,
                               auth_protocol=auth if auth != "none" else None,
                               auth_key=auth_key,
                               priv_protocol=priv if priv != "none" else None,
                               priv_key=priv_key)
    return out


class SnmpdStartError(AssertionError):
    """snmpd did not come up."""


class SilentAgent:
    """
    A UDP socket on 127.0.0.1 that receives requests and never answers:
    the agent that is down, filtered, or hung.
    """

    def __init__(self, host: str = "127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.host = host
        self.port = self.sock.getsockname()[1]

    def received(self) -> int:
        """How many datagrams arrived (drains them)."""
        self.sock.setblocking(False)
        n = 0
        while True:
            try:
                self.sock.recv(65536)
            except BlockingIOError:
                return n
            n += 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SilentAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SnmpAgent(DaemonProcess):
    """
    One snmpd child on 127.0.0.1 (and [::1] with C{ipv6=True}).

    @param sys_object_id: The agent's C{sysObjectID.0}.
    @param settle: Seconds an emulated outlet takes to reach a commanded state.
    @param reboot_off: Seconds an emulated reboot keeps the outlet off.
    @param pdus: Emulate the PDU tables (pass_persist); off for benchmarks.
    @param users: The v3 users (as L{V3_USERS}, the default): e.g. the same
        user name with other keys on each of several agents.
    @param host: The loopback address to listen on (127.0.0.1 by default).
    """

    host = "127.0.0.1"
    name = "snmpd"

    def __init__(self, *, sys_object_id: str = "1.3.6.1.4.1.8072.3.2.10", settle: float = 0.05,
                 reboot_off: float = 0.2, pdus: bool = True, ipv6: bool = False,
                 workdir: str | os.PathLike | None = None, snmpd: str = SNMPD,
                 users: dict[str, tuple] | None = None, host: str | None = None):
        self.snmpd = snmpd
        if host is not None:
            self.host = host  # another loopback address: another PDU host for roller's queue
        #: user -> (auth protocol, auth key, priv protocol, priv key, level),
        #: as in L{V3_USERS} (the default); L{change_keys} updates it.
        self.users = dict(V3_USERS if users is None else users)
        self.sys_object_id = sys_object_id.lstrip(".")
        self.settle = settle
        self.reboot_off = reboot_off
        self.pdus = pdus
        self.ipv6 = ipv6
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="roller-snmpd-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_udp_port(self.host)
        self.config_path = self.dir / "snmpd.conf"
        self.log_path = self.dir / "snmpd.log"
        self.pid_path = self.dir / "snmpd.pid"
        self.state_dir = self.dir / "state"
        self.persist_dir = self.dir / "persist"

    # -- credentials

    def credentials(self) -> dict[str, Any]:
        """roller L{Credential}s by name: C{v2c}, C{v2c-ro} and one per v3 user (its keys now)."""
        return agent_credentials(self.users)

    def change_keys(self, user: str, auth_key: str | None = None, priv_key: str | None = None,
                    timeout: float = 10.0) -> None:
        """
        Give C{user} new pass phrases in the running agent, as an operator
        rotating keys would: rewrite its configuration and send snmpd
        SIGHUP (snmpd reconfigures itself, keeping its engine id and boot
        count); returns once the new keys answer.
        """
        auth, old_auth, priv, old_priv, level = self.users[user]
        self.users[user] = (auth, auth_key or old_auth, priv, priv_key or old_priv, level)
        self.config_path.write_text(self._config())
        assert self.process is not None  # running
        os.kill(self.process.pid, signal.SIGHUP)
        self._wait_ready(lambda: self._answers_v3(user), timeout, SnmpdStartError,
                         where=f"{self.host}:{self.port} (new keys of {user})")

    def _answers_v3(self, user: str) -> bool:
        auth, auth_key, priv, priv_key, level = self.users[user]
        argv = [SNMPGET, "-v3", "-u", user, "-t", "0.2", "-r", "0", "-On", "-M", "/dev/null"]
        if auth == "none":
            argv += ["-l", "noAuthNoPriv"]
        else:
            argv += ["-l", "authPriv" if priv != "none" else "authNoPriv", "-a", _NETSNMP_AUTH[auth],
                     "-A", auth_key]
            if priv != "none":
                argv += ["-x", _NETSNMP_PRIV[priv], "-X", priv_key]
        argv += [f"{self.host}:{self.port}", ".1.3.6.1.2.1.1.2.0"]
        r = subprocess.run(argv, capture_output=True, text=True, env={"MIBS": "", "PATH": "/usr/bin:/bin"})
        return r.returncode == 0 and self.sys_object_id in r.stdout

    # -- files

    def _script(self) -> Path:
        path = self.dir / "pdu-emulator"
        root = str(Path(__file__).resolve().parents[2])
        path.write_text(
            f"#!{sys.executable}\n"
            "import sys\n"
            f"sys.path.insert(0, {root!r})\n"
            "from roller.testing.snmpd import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
        path.chmod(0o755)
        return path

    def _config(self) -> str:
        lines = [
            f"agentaddress udp:{self.host}:{self.port}"
            + (f",udp6:[::1]:{self.port}" if self.ipv6 else ""),
            f"rwcommunity {COMMUNITY} 127.0.0.1",
            f"rocommunity {READ_COMMUNITY} 127.0.0.1",
        ]
        if self.ipv6:
            lines += [f"rwcommunity6 {COMMUNITY} ::1", f"rocommunity6 {READ_COMMUNITY} ::1"]
        for user, (auth, auth_key, priv, priv_key, level) in self.users.items():
            create = f"createUser {user}"
            if auth != "none":
                create += f' {_NETSNMP_AUTH[auth]} "{auth_key}"'
                if priv != "none":
                    create += f' {_NETSNMP_PRIV[priv]} "{priv_key}"'
            lines += [create, f"rwuser {user} {level}"]
        lines += [
            f"sysObjectID .{self.sys_object_id}",
            "sysServices 72",
            f"override -rw .{BENCH_OID} integer 0",
            "dontLogTCPWrappersConnects yes",
        ]
        if self.pdus:
            script = self._script()
            for name, subtree in SUBTREES.items():
                lines.append(f"pass_persist .{subtree} {script} pass-persist {name} "
                             f"{self.state_dir} {self.settle:g} {self.reboot_off:g}")
        return "\n".join(lines) + "\n"

    # -- emulator state seen from the test

    def outlet_state(self, model: str, port: str) -> str:
        """C{"on"} or C{"off"}: the emulated outlet's settled state now."""
        tree = _MODEL_TREE[model]
        path = self.state_dir / f"{tree}.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        key = f"{model}:{_port_key(model, port)}"
        outlet = state.get(key)
        if outlet is None:
            return "on"
        return "on" if _settled(outlet, time.time()) else "off"

    def commands(self, model: str) -> list[list]:
        """Every SET the emulator accepted for C{model}: C{[time, port, action]}."""
        tree = _MODEL_TREE[model]
        try:
            state = json.loads((self.state_dir / f"{tree}.json").read_text())
        except (OSError, ValueError):
            return []
        return [c for c in state.get("_log", []) if c[1].startswith(model + ":")]

    # -- lifecycle

    def start(self, timeout: float = 10.0) -> SnmpAgent:
        if self.running:
            raise RuntimeError(f"snmpd is already running (pid {self.pid})")
        for attempt in range(3):
            try:
                return self._start(timeout)
            except SnmpdStartError:
                if attempt == 2 or "in use" not in self.log_text():
                    raise
                self.port = free_udp_port(self.host)
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> SnmpAgent:
        shutil.rmtree(self.state_dir, ignore_errors=True)
        shutil.rmtree(self.persist_dir, ignore_errors=True)
        self.state_dir.mkdir(parents=True)
        self.persist_dir.mkdir(parents=True)
        self.config_path.write_text(self._config())
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SNMP_PERSISTENT_DIR": str(self.persist_dir),
               "MIBS": "", "HOME": str(self.dir)}
        self._spawn([self.snmpd, "-f", "-C", "-c", str(self.config_path), "-p", str(self.pid_path),
                     "-Lf", str(self.log_path), "-M", "/dev/null"], env=env)
        return self._wait_ready(self._answers, timeout, SnmpdStartError,
                                where=f"{self.host}:{self.port}")

    def _answers(self) -> bool:
        r = subprocess.run([SNMPGET, "-v2c", "-c", READ_COMMUNITY, "-t", "0.2", "-r", "0", "-On",
                            "-M", "/dev/null", f"{self.host}:{self.port}", ".1.3.6.1.2.1.1.2.0"],
                           capture_output=True, text=True, env={"MIBS": "", "PATH": "/usr/bin:/bin"})
        return r.returncode == 0 and self.sys_object_id in r.stdout

    def stop(self) -> None:
        """Kill snmpd by PID (its pass_persist children get EOF and exit)."""
        self._kill()
        self._close_log()

    def pause(self) -> None:
        """SIGSTOP snmpd: it stops answering (a hung agent)."""
        if self.running and self.process is not None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running and self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def close(self) -> None:
        self.resume()
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SnmpAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- emulator
#
# Written from the vendors' MIBs, independently of roller's driver tables.
# Each model: where its outlets are, what its control column accepts, what
# its status column reads.  "index" lists the outlet instance suffixes.

_LETTERS = "ABCDEFGH"

# name -> spec.  control: (column OID, {value: action}); status: (column,
# {"on": v, "off": v, "pending_on": v|None, "pending_off": v|None});
# control_reads: what a GET of the control column returns.
_SPECS: dict[str, dict[str, Any]] = {
    # Sentry3-MIB outletTable: index tower.infeed.outlet; outletStatus(5)
    # off(0) on(1) offWait(2) onWait(3) ...; outletControlAction(11) none(0)
    # on(1) off(2) reboot(3), reads none(0).
    "sentry3": {
        "tree": "servertech",
        "instances": [(t, f, o) for t in (1, 2) for f in (1, 2) for o in range(1, 17)],
        "control": ("1.3.6.1.4.1.1718.3.2.3.1.11", {1: "on", 2: "off", 3: "reboot"}),
        "status": ("1.3.6.1.4.1.1718.3.2.3.1.5", {"on": 1, "off": 0, "pending_on": 3, "pending_off": 2}),
        "control_reads": "zero",
    },
    # Sentry4-MIB st4OutletControlTable(.8.5): index unit.cord.outlet;
    # st4OutletControlAction(2) none(0) on(1) off(2) reboot(3);
    # st4OutletStatusTable(.8.3) st4OutletState(1) unknown(0) on(1) off(2).
    "sentry4": {
        "tree": "servertech",
        "instances": [(u, 1, o) for u in (1, 2) for o in range(1, 17)],
        "control": ("1.3.6.1.4.1.1718.4.1.8.5.1.2", {1: "on", 2: "off", 3: "reboot"}),
        "status": ("1.3.6.1.4.1.1718.4.1.8.3.1.1", {"on": 1, "off": 2}),
        "control_reads": "zero",
    },
    # PowerNet-MIB rPDUOutletControlOutletCommand(.12.3.3.1.1.4.N)
    # immediateOn(1) immediateOff(2) immediateReboot(3) ... reads 1/2;
    # rPDUOutletStatusOutletState(.12.3.5.1.1.4.N) on(1) off(2).
    "apc_rpdu": {
        "tree": "apc",
        "instances": [(o,) for o in range(1, 25)],
        "control": ("1.3.6.1.4.1.318.1.1.12.3.3.1.1.4", {1: "on", 2: "off", 3: "reboot"}),
        "status": ("1.3.6.1.4.1.318.1.1.12.3.5.1.1.4", {"on": 1, "off": 2}),
        "control_reads": "state12",
    },
    # PowerNet-MIB sPDUOutletCtl(.4.4.2.1.3.N) outletOn(1) outletOff(2)
    # outletReboot(3); the same column reads the state.
    "apc_masterswitch": {
        "tree": "apc",
        "instances": [(o,) for o in range(1, 9)],
        "control": ("1.3.6.1.4.1.318.1.1.4.4.2.1.3", {1: "on", 2: "off", 3: "reboot"}),
        "status": None,
        "control_reads": "state12",
    },
    # CyberPower ePDU MIB ePDUOutletControlOutletCommand(.3.3.3.1.1.4.N)
    # immediateOn(1) immediateOff(2) immediateReboot(3);
    # ePDUOutletStatusOutletState(.3.3.5.1.1.4.N) on(1) off(2).
    "cyberpower": {
        "tree": "cyberpower",
        "instances": [(o,) for o in range(1, 25)],
        "control": ("1.3.6.1.4.1.3808.1.1.3.3.3.1.1.4", {1: "on", 2: "off", 3: "reboot"}),
        "status": ("1.3.6.1.4.1.3808.1.1.3.3.5.1.1.4", {"on": 1, "off": 2}),
        "control_reads": "state12",
    },
    # PDU2-MIB outletSwitchControlTable: index pduId.outletId;
    # switchingOperation(2) off(0) on(1) cycle(2); outletSwitchingState(3)
    # on(7) off(8) (SensorStateEnumeration).
    "raritan": {
        "tree": "raritan",
        "instances": [(1, o) for o in range(1, 25)],
        "control": ("1.3.6.1.4.1.13742.6.4.1.2.1.2", {1: "on", 0: "off", 2: "reboot"}),
        "status": ("1.3.6.1.4.1.13742.6.4.1.2.1.3", {"on": 7, "off": 8}),
        "control_reads": "raritan",
    },
    # Baytech RPC MIB sBTAModulesRPCOutletState(.1.3.5.3.1.3.M.N) off(0)
    # on(1) reboot(2) (write); reads 0/1.
    "baytech": {
        "tree": "baytech",
        "instances": [(1, o) for o in range(1, 21)],
        "control": ("1.3.6.1.4.1.4779.1.3.5.3.1.3", {1: "on", 0: "off", 2: "reboot"}),
        "status": None,
        "control_reads": "state01",
    },
    # EATON-EPDU-MIB outletControlTable(.6.6.7.6.6.1): index strapping(0 =
    # master).outlet; outletControlStatus(2) off(0) on(1) pendingOff(2)
    # pendingOn(3); outletControlOffCmd(3)/OnCmd(4)/RebootCmd(5) take a
    # delay in seconds (0 = now, -1 = cancel); they read -1 when idle.
    "eaton": {
        "tree": "eaton",
        "instances": [(u, o) for u in (0, 1) for o in range(1, 25)],
        "eaton": True,
        "status": ("1.3.6.1.4.1.534.6.6.7.6.6.1.2", {"on": 1, "off": 0, "pending_on": 3, "pending_off": 2}),
    },
}
_EATON_CMDS = {"1.3.6.1.4.1.534.6.6.7.6.6.1.3": "off", "1.3.6.1.4.1.534.6.6.7.6.6.1.4": "on",
               "1.3.6.1.4.1.534.6.6.7.6.6.1.5": "reboot"}
_MODEL_TREE = {name: spec["tree"] for name, spec in _SPECS.items()}


def _port_key(model: str, port: str) -> str:
    """The emulator's instance key for a roller-style port (C{"AA8"}, C{"8"})."""
    letters = "".join(c for c in port if c.isalpha()).upper()
    number = int("".join(c for c in port if c.isdigit()))
    first = _LETTERS.index(letters[0]) + 1 if letters else 1
    if model in ("sentry3", "sentry4"):
        second = _LETTERS.index(letters[1]) + 1 if len(letters) > 1 else 1
        return f"{first}.{second}.{number}"
    if model == "eaton":
        return f"{first - 1}.{number}"
    if model in ("raritan", "baytech"):
        return f"{first}.{number}"
    return str(number)


def _settled(outlet: dict, now: float) -> bool:
    """Whether the outlet is on now, given its schedule."""
    on = outlet["on"]
    for at, value in outlet.get("plan", []):
        if at <= now:
            on = value
    return on


class _Emulator:
    """The state machine of one pass_persist process."""

    def __init__(self, tree: str, state_dir: str, settle: float, reboot_off: float):
        self.tree = tree
        self.path = Path(state_dir) / f"{tree}.json"
        self.settle = settle
        self.reboot_off = reboot_off
        self.models = {n: s for n, s in _SPECS.items() if s["tree"] == tree}
        self.state: dict[str, Any] = {"_log": []}
        self.objects = self._objects()
        self.sorted = sorted(self.objects, key=_oid_key)

    def _objects(self) -> dict[str, tuple[str, str, Any]]:
        """OID -> (model, instance key, column kind)."""
        out: dict[str, tuple[str, str, Any]] = {}
        for model, spec in self.models.items():
            for inst in spec["instances"]:
                suffix = ".".join(map(str, inst))
                key = f"{model}:{suffix}"
                if spec.get("eaton"):
                    for column, action in _EATON_CMDS.items():
                        out[f"{column}.{suffix}"] = (model, key, ("eaton", action))
                else:
                    out[f"{spec['control'][0]}.{suffix}"] = (model, key, ("control",))
                if spec.get("status"):
                    out[f"{spec['status'][0]}.{suffix}"] = (model, key, ("status",))
        return out

    def _outlet(self, key: str) -> dict:
        return self.state.setdefault(key, {"on": True, "plan": []})

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.path)

    def _now_state(self, key: str) -> tuple[bool, bool | None]:
        """(settled on?, pending target or None)."""
        outlet = self._outlet(key)
        now = time.time()
        on = outlet["on"]
        pending = None
        for at, value in outlet["plan"]:
            if at <= now:
                on = value
            elif pending is None:
                pending = value
        return on, pending

    def read(self, oid: str) -> tuple[str, str] | None:
        entry = self.objects.get(oid)
        if entry is None:
            return None
        model, key, column = entry
        spec = self.models[model]
        on, pending = self._now_state(key)
        if column[0] == "eaton":
            return ("integer", "-1")
        if column[0] == "status":
            values = spec["status"][1]
            if pending is not None and not pending and values.get("pending_off") is not None:
                return ("integer", str(values["pending_off"]))
            if pending is not None and pending and values.get("pending_on") is not None:
                return ("integer", str(values["pending_on"]))
            return ("integer", str(values["on" if on else "off"]))
        reads = spec["control_reads"]
        if reads == "zero":
            return ("integer", "0")
        if reads == "state12":
            return ("integer", "1" if on else "2")
        if reads == "state01":
            return ("integer", "1" if on else "0")
        if reads == "raritan":
            return ("integer", "1" if on else "0")
        raise AssertionError(reads)

    def write(self, oid: str, type_value: str) -> str:
        entry = self.objects.get(oid)
        if entry is None:
            return "not-writable"
        model, key, column = entry
        spec = self.models[model]
        if column[0] == "status":
            return "not-writable"
        parts = type_value.split(None, 1)
        if len(parts) != 2 or parts[0].lower() not in ("integer", "integer32"):
            return "wrong-type"
        try:
            value = int(parts[1])
        except ValueError:
            return "wrong-type"
        if column[0] == "eaton":
            if value == -1:
                self._outlet(key)["plan"] = []
                self._save()
                return "DONE"
            if value != 0:
                # A delayed command: accepted by real units; the emulator
                # only does immediate ones.
                return "wrong-value"
            action = column[1]
        else:
            actions = spec["control"][1]
            if value not in actions:
                return "wrong-value"
            action = actions[value]
        self._command(key, action)
        return "DONE"

    def _command(self, key: str, action: str) -> None:
        outlet = self._outlet(key)
        now = time.time()
        on, _ = self._now_state(key)
        outlet["on"] = on
        if action == "on":
            outlet["plan"] = [[now + self.settle, True]]
        elif action == "off":
            outlet["plan"] = [[now + self.settle, False]]
        else:
            outlet["plan"] = [[now, False], [now + self.settle + self.reboot_off, True]]
        self.state["_log"].append([now, key, action])
        self._save()

    def next_oid(self, oid: str) -> str | None:
        k = _oid_key(oid)
        for candidate in self.sorted:
            if _oid_key(candidate) > k:
                return candidate
        return None


def _oid_key(oid: str) -> tuple[int, ...]:
    return tuple(int(p) for p in oid.strip(".").split(".") if p)


def pass_persist(tree: str, state_dir: str, settle: float, reboot_off: float,
                 stdin: Any = None, stdout: Any = None) -> int:
    """The pass_persist loop (net-snmp's protocol) for one subtree."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    emulator = _Emulator(tree, state_dir, settle, reboot_off)
    emulator._save()

    def answer(*lines: str) -> None:
        stdout.write("".join(line + "\n" for line in lines))
        stdout.flush()

    while True:
        line = stdin.readline()
        if not line:
            return 0
        command = line.strip()
        if command == "":
            continue  # snmpd sends a blank line after each set
        if command == "PING":
            answer("PONG")
        elif command in ("get", "getnext"):
            oid = stdin.readline().strip().lstrip(".")
            if command == "getnext":
                oid = emulator.next_oid(oid) or ""
            found = emulator.read(oid) if oid else None
            if found is None:
                answer("NONE")
            else:
                answer("." + oid, *found)
        elif command == "set":
            oid = stdin.readline().strip().lstrip(".")
            value = stdin.readline().strip()
            answer(emulator.write(oid, value))
        else:
            answer("NONE")


def main(argv: Iterable[str]) -> int:
    args = list(argv)
    if len(args) == 5 and args[0] == "pass-persist":
        return pass_persist(args[1], args[2], float(args[3]), float(args[4]))
    sys.stderr.write("usage: python -m roller.testing.snmpd pass-persist TREE STATE_DIR SETTLE REBOOT_OFF\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
