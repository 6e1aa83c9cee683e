"""
The lifecycle shared by the real-daemon fixtures (L{roller.sim.ipmisim}; the
tests' L{roller.testing.sshd}, C{snmpd}, C{sushy}): one child process on loopback, its output in a log
file, killed by its PID.

    class MyServer(DaemonProcess):
        name = "mydaemon"

        def start(self, timeout=10.0):
            self._spawn([...], log_path=self.log_path)
            return self._wait_ready(self._answers, timeout, MyStartError,
                                    where=f"{self.host}:{self.port}")

L{free_port} picks a port nobody is bound to right now (TCP or UDP);
L{DaemonProcess} starts the child in its own session with
C{subprocess.Popen} (so its PID is the daemon's), polls a readiness probe
until a deadline (failing early, with the log, if the child exited),
and stops it with SIGTERM, then SIGKILL.

Only the standard library.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["DaemonProcess", "free_port", "free_port_on", "free_udp_port"]

D = TypeVar("D", bound="DaemonProcess")


def free_port(host: str = "127.0.0.1", kind: str = "tcp") -> int:
    """A C{kind} (C{"tcp"} or C{"udp"}) port nobody is bound to right now on C{host}."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock_type = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}[kind]
    with socket.socket(family, sock_type) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_on(addresses: Sequence[str]) -> int:
    """A TCP port every one of C{addresses} can listen on (below the ephemeral range, so it stays free)."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        socks = []
        try:
            for address in addresses:
                s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port")


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port nobody is bound to right now on C{host}."""
    return free_port(host, "udp")


class DaemonProcess:
    """
    Mixin for a fixture that runs one daemon child process.

    Subclasses set L{name} (used in error messages) and L{log_path}, and
    call L{_spawn} then L{_wait_ready} from their C{start}.

    @ivar process: The child, once started.
    """

    #: The daemon's name in error messages (C{"sshd"}).
    name = "daemon"
    log_path: Path
    process: subprocess.Popen | None = None
    _log: Any = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Stop the daemon (each fixture knows how); L{_wait_ready} calls it on a timeout."""
        raise NotImplementedError

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    def _spawn(self, argv: Sequence[str], **popen: Any) -> subprocess.Popen:
        """
        Start C{argv} in a new session, stdout and stderr appended to
        L{log_path} (reopened), stdin from C{/dev/null}; C{popen}: more
        C{Popen} arguments (C{env}, C{cwd}).
        """
        self._close_log()
        self._log = open(self.log_path, "ab", buffering=0)
        self.process = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, **popen,
        )
        return self.process

    def _wait_ready(self: D, probe: Callable[[], bool], timeout: float,
                    error: Callable[[str], Exception], *, where: str, poll: float = 0.02,
                    cleanup: Callable[[], object] | None = None) -> D:
        """
        Return C{self} once C{probe()} is true.  Raise C{error(message)}
        (the message ends with L{log_text}) if the child exits first, or,
        after C{cleanup()} (L{stop} by default), if C{timeout} seconds pass.
        Sleeps C{poll} seconds between probes.
        """
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise error(f"{self.name} exited with status {self.process.returncode}:\n"
                            f"{self.log_text()}")
            if probe():
                return self
            if time.monotonic() > deadline:
                (cleanup or self.stop)()
                raise error(f"{self.name} did not answer on {where} within "
                            f"{timeout:g} s:\n{self.log_text()}")
            if poll:
                time.sleep(poll)

    def _kill(self) -> None:
        """Stop the child by its PID: SIGTERM, then SIGKILL after 5 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

