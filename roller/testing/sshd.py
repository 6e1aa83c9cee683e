"""
A real OpenSSH sshd on loopback for tests (and the demo).

    with SshServer() as server:
        server.authorize(user_public_key_line)
        server.behave("respond", stdout="rebooting\\n", exit_status=0)
        ...  # connect to server.host:server.port as server.user
        assert server.commands() == ["sudo reboot"]

L{SshServer} writes a private C{sshd_config} (own ed25519 host key, its
own C{PidFile} and C{AuthorizedKeysFile}, public-key authentication only,
C{MaxStartups 1000:30:1000} so many concurrent logins are not dropped),
starts C{sshd -D -e -f CONFIG} with C{subprocess.Popen} (so the PID is the
daemon's), waits until a real TCP connection gets its C{SSH-2.0-} banner,
and kills it by PID.

Every login runs a C{ForceCommand} script instead of the requested
command.  The script appends C{$SSH_ORIGINAL_COMMAND} to a record file
(L{SshServer.commands}) and C{"$$ $PPID $SSH_CONNECTION"} -- its own PID,
that of the sshd process serving the session, the client and dialed
addresses -- to a sessions file (L{SshServer.sessions}), then does what L{SshServer.behave} last said:

  - C{respond}: print the configured stdout and stderr, exit with
    C{exit_status};
  - C{execute}: run the requested command with C{/bin/sh -c} (tests only:
    it runs as the test user);
  - C{drop}: print the output, wait C{delay} seconds, then C{kill -9} the
    sshd session process: the connection drops without an exit status,
    like a host going down under a C{reboot};
  - C{signal}: print the output, then kill itself with C{signal}: the
    client gets an C{exit-signal};
  - C{hang}: print the output, then never exit (until the client goes
    away: it ends on the first write after sshd closed its pipe).

Run as root (CI), sshd switches to a dedicated system user,
L{TEST_USER}, created on first use with C{/bin/sh} as its shell and an
unlocked password field (C{*}: no password, but not C{!}-locked, which
sshd refuses with C{UsePAM no}); its home is C{/}.  Its files live in a
private 0755 directory under C{/tmp}, since pytest's C{tmp_path} is not
readable by that user.  Run as anyone else, sshd can only log in the
current user, so that is the user.

Skip real-sshd tests with L{skip_reason} when C{/usr/sbin/sshd} is missing
(C{apt-get install -y openssh-server}).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from roller.sim.daemon import DaemonProcess, free_port

__all__ = [
    "SSHD",
    "Session",
    "SshServer",
    "SshdStartError",
    "TEST_USER",
    "generate_key",
    "skip_reason",
    "sshd_version",
]

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"

#: The login user when running as root.
TEST_USER = "rollerssh"

ACTIONS = ("respond", "execute", "drop", "signal", "hang")

_SCRIPT = """\
#!/bin/sh
# ForceCommand of roller's test sshd (roller/testing/sshd.py).
dir='{dir}'
printf '%s\\n' "$SSH_ORIGINAL_COMMAND" >> "$dir/commands"
echo "$$ $PPID $SSH_CONNECTION" >> "$dir/sessions"
b="$dir/behaviour"
action=$(cat "$b/action" 2>/dev/null || echo respond)
if [ "$action" = execute ]; then
    exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
fi
cat "$b/stdout" 2>/dev/null
cat "$b/stderr" >&2 2>/dev/null
delay=$(cat "$b/delay" 2>/dev/null || echo 0)
[ "$delay" = 0 ] || sleep "$delay"
case "$action" in
    drop) kill -9 "$PPID"; exit 0 ;;
    signal) kill -s "$(cat "$b/signal")" $$; exit 99 ;;
    hang) while :; do sleep 0.1; printf '.' >&2 || exit 0; done ;;
esac
exit "$(cat "$b/exit_status" 2>/dev/null || echo 0)"
"""


class SshdStartError(AssertionError):
    """sshd did not come up."""


class Session(NamedTuple):
    """
    One login: the ForceCommand script's PID, its sshd parent's, and the
    address the client dialed (field 3 of C{$SSH_CONNECTION}).
    """

    script_pid: int
    sshd_pid: int
    dialed: str = ""


def skip_reason(sshd: str = SSHD) -> str | None:
    """Why real-sshd tests cannot run here, or C{None}."""
    if not os.access(sshd, os.X_OK):
        return f"{sshd} is not installed (apt-get install -y openssh-server)"
    if not os.access(SSH_KEYGEN, os.X_OK):
        return f"{SSH_KEYGEN} is not installed (apt-get install -y openssh-client)"
    return None


def sshd_version(sshd: str = SSHD) -> tuple[int, int]:
    """C{(major, minor)} of the OpenSSH sshd (it prints its version on C{-V})."""
    out = subprocess.run([sshd, "-V"], capture_output=True, text=True, timeout=10)
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def generate_key(path: str | os.PathLike, key_type: str = "ed25519", passphrase: str = "",
                 comment: str = "roller-test") -> str:
    """
    Write a new key pair (C{path}, C{path.pub}) with C{ssh-keygen}; return
    the public key line.
    """
    path = Path(path)
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    args = [SSH_KEYGEN, "-q", "-t", key_type, "-N", passphrase, "-C", comment, "-f", str(path)]
    if key_type == "rsa":
        args[4:4] = ["-b", "2048"]
    subprocess.run(args, check=True, capture_output=True, timeout=30)
    return path.with_name(path.name + ".pub").read_text().strip()


def _ensure_user(name: str) -> pwd.struct_passwd:
    """Create (or repair) the dedicated login user; root only."""
    with open(os.path.join(tempfile.gettempdir(), "roller-sshd-user.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/",
                            "--shell", "/bin/sh", name], check=True, capture_output=True, timeout=30)
            entry = pwd.getpwnam(name)
        else:
            if entry.pw_shell != "/bin/sh":
                subprocess.run(["usermod", "--shell", "/bin/sh", name], check=True,
                               capture_output=True, timeout=30)
        # "*": no password, but not locked ("!"), which sshd refuses with UsePAM no.
        shadow = subprocess.run(["getent", "shadow", name], capture_output=True, text=True,
                                timeout=30).stdout.split(":")
        if len(shadow) < 2 or shadow[1].startswith("!"):
            subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True, timeout=30)
        return pwd.getpwnam(name)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace C{path} atomically (concurrent sessions never read half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


class SshServer(DaemonProcess):
    """
    One sshd child process on 127.0.0.1.

    @param workdir: Where its files go; a fresh 0755 directory under
        C{/tmp} by default (removed by L{stop}).
    @param port: A fixed port; a free one by default.
    @param extra_config: More C{sshd_config} lines (e.g.
        C{"PubkeyAcceptedAlgorithms +ssh-rsa"}).
    """

    host = "127.0.0.1"
    name = "sshd"

    def __init__(self, *, workdir: str | os.PathLike | None = None, port: int | None = None,
                 extra_config: Iterable[str] = (), sshd: str = SSHD):
        self.sshd = sshd
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="roller-sshd-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self._port_given = port is not None
        self.port = port or free_port(self.host)
        self.extra_config = list(extra_config)
        if os.geteuid() == 0:
            entry = _ensure_user(TEST_USER)
        else:
            entry = pwd.getpwuid(os.getuid())
        self.user = entry.pw_name
        self._uid, self._gid = entry.pw_uid, entry.pw_gid
        self.host_key_path = self.dir / "ssh_host_ed25519_key"
        self.authorized_keys_path = self.dir / "authorized_keys"
        self.script_path = self.dir / "force-command.sh"
        self.config_path = self.dir / "sshd_config"
        self.log_path = self.dir / "sshd.log"
        self.commands_path = self.dir / "commands"
        self.sessions_path = self.dir / "sessions"
        self.behaviour_dir = self.dir / "behaviour"
        self._setup()

    # -- files

    def _setup(self) -> None:
        self.host_public_key = generate_key(self.host_key_path, comment="roller-test-host")
        self.host_key_path.chmod(0o600)
        self.behaviour_dir.mkdir(exist_ok=True)
        self.behaviour_dir.chmod(0o755)
        _write(self.script_path, _SCRIPT.format(dir=self.dir), 0o755)
        if not self.authorized_keys_path.exists():
            _write(self.authorized_keys_path, "")
        self.reset()

    def _user_file(self, path: Path) -> None:
        """An empty file the login user can append to."""
        path.write_text("")
        path.chmod(0o644)
        if os.geteuid() == 0:
            os.chown(path, self._uid, self._gid)

    def reset(self) -> None:
        """Forget recorded commands and sessions; behave C{respond} with no output, exit 0."""
        self._user_file(self.commands_path)
        self._user_file(self.sessions_path)
        self.behave("respond")

    def authorize(self, *public_keys: str | os.PathLike) -> None:
        """Let these keys (public key lines, or C{.pub} files) log in; replaces the list."""
        lines = []
        for key in public_keys:
            text = str(key)
            if not text.startswith(("ssh-", "ecdsa-", "sk-")):
                text = Path(key).read_text()
            lines.append(text.strip())
        _write(self.authorized_keys_path, "".join(line + "\n" for line in lines))

    def behave(self, action: str = "respond", *, stdout: str = "", stderr: str = "",
               exit_status: int = 0, delay: float = 0, signal: str = "TERM") -> None:
        """What the next logins do; see the module docstring."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        b = self.behaviour_dir
        _write(b / "stdout", stdout)
        _write(b / "stderr", stderr)
        _write(b / "exit_status", str(int(exit_status)))
        _write(b / "delay", f"{delay:g}")
        _write(b / "signal", signal)
        _write(b / "action", action)

    # -- what happened

    def commands(self) -> list[str]:
        """The commands requested so far, in order."""
        return self.commands_path.read_text().splitlines()

    def sessions(self) -> list[Session]:
        """The logins so far."""
        out = []
        for line in self.sessions_path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2:
                out.append(Session(int(parts[0]), int(parts[1]), parts[4] if len(parts) > 4 else ""))
        return out

    @staticmethod
    def alive(pid: int) -> bool:
        """Is C{pid} a live (not zombie) process?"""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")

    def known_hosts_line(self) -> str:
        """This server's known_hosts line (C{[127.0.0.1]:PORT ssh-ed25519 AAAA...})."""
        key_type, b64 = self.host_public_key.split()[:2]
        return f"[{self.host}]:{self.port} {key_type} {b64}"

    # -- lifecycle

    def _config(self) -> str:
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self.host_key_path}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys_path}",
            "StrictModes no",
            "UsePAM no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "AuthenticationMethods publickey",
            f"AllowUsers {self.user}",
            f"ForceCommand exec {self.script_path}",
            "MaxStartups 1000:30:1000",
            "LoginGraceTime 30",
            "UseDNS no",
            "PermitUserRC no",
            "PermitTTY no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            "LogLevel VERBOSE",
        ]
        if sshd_version(self.sshd) >= (9, 8):
            lines.append("PerSourcePenalties no")  # failed-auth tests must not lock us out
        return "\n".join(lines + self.extra_config) + "\n"

    def start(self, timeout: float = 10.0) -> SshServer:
        if self.running:
            raise RuntimeError(f"sshd is already running (pid {self.pid})")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        for attempt in range(3):
            try:
                return self._start(timeout)
            except SshdStartError:
                busy = "Address already in use" in self.log_text()
                if self._port_given or attempt == 2 or not busy:
                    raise
                self.port = free_port(self.host)
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> SshServer:
        _write(self.config_path, self._config())
        self._spawn([self.sshd, "-D", "-e", "-f", str(self.config_path)])
        return self._wait_ready(self._banner, timeout, SshdStartError,
                                where=f"{self.host}:{self.port}", poll=0.01)

    def _banner(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                return s.recv(64).startswith(b"SSH-2.0-")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill sshd (by PID) and any session it left behind; remove the directory."""
        self._kill()
        # Sessions outlive the listener; end those still running (their
        # PIDs were recorded by our ForceCommand, which they run).
        try:
            sessions = self.sessions()
        except OSError:
            sessions = []
        for session in sessions:
            for pid in session[:2]:
                if self.alive(pid) and self._ours(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        self._close_log()

    def _ours(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.script_path).encode() in cmdline or cmdline.startswith(b"sshd: ")

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SshServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
