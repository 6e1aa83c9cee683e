"""
Run roller as a real child process for end-to-end tests.

    with RollerProcess(["--auth", "none", "--demo"], state_dir=tmp_path) as roller:
        r = roller.post("/api/v1/jobs?tc_worker_id=demo-1&task_name=ping")
        assert r.status == 201

L{RollerProcess} picks a free loopback port, starts C{twistd -n roller}
(the venv's C{twistd} next to C{sys.executable}, run by that interpreter)
with C{PYTHONPATH} set to the source tree so its C{roller} package and
C{twisted/plugins} are the ones used, captures stdout and stderr to a log
file, and waits until C{/__lbheartbeat__} answers.  L{RollerProcess.stop}
sends SIGTERM (SIGKILL after a deadline); L{RollerProcess.kill} is
C{kill -9}.  Every failure message ends with the tail of roller's log.

The child runs in its own process group, so whatever it spawned (C{ping}
children left orphaned by C{kill -9}) is killed with it at the end, by
that group's id.

Only the standard library: the test side talks HTTP with C{urllib}.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from roller.drivers.liveness import CHILD_ENV
from roller.sim.daemon import free_port

__all__ = [
    "REPO_ROOT",
    "Response",
    "RollerProcess",
    "RollerStartError",
    "free_port",
    "http_request",
    "roller_env",
    "run_twistd",
    "twistd_command",
    "wait_for",
]

#: The source tree holding C{roller/} and C{twisted/plugins/}.
REPO_ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")


class RollerStartError(AssertionError):
    """roller did not come up (it exited, or never answered in time)."""


def twistd_command() -> list[str]:
    """
    The argv prefix that runs twistd with this interpreter: the venv's
    C{twistd} script next to C{sys.executable}, else the module.
    """
    script = Path(sys.executable).with_name("twistd")
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-c",
            "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def roller_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """
    The child's environment: ours without any C{ROLLER_*} variable (so the
    caller's shell cannot change a test), the source tree first on
    C{PYTHONPATH}, unbuffered output, plus C{extra}.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLER_")}
    # a demo fleet of its own for every roller, so rollers side by side never clash
    env["ROLLER_DEMO_SSH_PORT"] = str(free_port("127.0.1.1"))
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_twistd(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess:
    """
    Run C{twistd -n --pidfile= ARGS} to completion (e.g. C{["roller",
    "--help"]}, or a configuration roller must refuse) and return it with
    C{stdout} and C{stderr} as text.
    """
    with tempfile.TemporaryDirectory(prefix="roller-run-") as tmp:
        return subprocess.run(
            [*twistd_command(), "-n", "--pidfile=", *args],
            env=roller_env(env), cwd=cwd or tmp, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout,
        )


def wait_for(
    probe: Callable[[], T | None],
    timeout: float,
    what: str = "the condition",
    interval: float = 0.05,
    describe: Callable[[], str] | None = None,
) -> T:
    """
    Call C{probe} until it returns something truthy, and return that; fail
    with C{AssertionError} after C{timeout} seconds (with C{describe()}
    appended, e.g. the last state seen or a log tail).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{describe()}" if describe else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def ping_skip_reason() -> str | None:
    """Why tests that ping cannot run here, or None."""
    if shutil.which("ping", path=CHILD_ENV["PATH"]) is None:
        return "needs the ping binary (apt-get install iputils-ping)"
    return None


def db_states(db_path: str | os.PathLike) -> dict[str, str]:
    """Job states read straight from a roller's SQLite file, as another process sees them."""
    con = sqlite3.connect(db_path, timeout=5)
    try:
        return dict(con.execute("SELECT id, state FROM jobs").fetchall())
    finally:
        con.close()


def read_until(stream: Any, marker: str, timeout: float = 60.0) -> str:
    """
    The lines of a child's text C{stream} up to the first holding C{marker}
    (or its end, or C{timeout} seconds): all of them, for the caller to
    check.
    """
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            break
    return "".join(lines)


class Response:
    """An HTTP answer: C{status}, C{headers} (case-insensitive), C{body}."""

    def __init__(self, status: int, headers: Any, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:300]!r}>"


# Never route loopback test traffic through an http_proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_request(
    method: str,
    url: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Response:
    """
    One request with C{urllib}; C{body} is bytes, or anything else to send
    as JSON.  Error statuses are returned, not raised.
    """
    headers = dict(headers or {})
    data = None
    if body is not None:
        if isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _opener.open(req, timeout=timeout) as r:
            return Response(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        with e:
            return Response(e.code, e.headers, e.read())


class RollerProcess:
    """
    One roller child process.

    @param args: Arguments after C{roller} (e.g. C{["--auth", "none"]});
        C{--listen tcp:PORT:interface=127.0.0.1 --state-dir STATE_DIR} come
        before them.  (L{db_path} assumes no C{--db} among them.)
    @param state_dir: Its state directory; a fresh temporary one if C{None}.
    @param port: The loopback port; a free one if C{None}.
    @param env: Extra environment variables.
    @param tac: Run C{twistd -ny TAC} instead of the C{roller} plugin; then
        nothing is added to the command line: configure it with C{env}
        (the C{ROLLER_SERVER_LISTEN} and C{ROLLER_STATE_DIR} defaults are
        filled in).
    @param log_path: Where its stdout and stderr go, appended to across
        restarts (default C{STATE_DIR/../roller-PORT.log}).
    """

    def __init__(
        self,
        args: Iterable[str] = (),
        *,
        state_dir: str | os.PathLike | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        tac: str | os.PathLike | None = None,
        log_path: str | os.PathLike | None = None,
    ):
        self.args = list(args)
        self._tmp: tempfile.TemporaryDirectory | None = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="roller-e2e-")
            state_dir = Path(self._tmp.name) / "state"
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.workdir = self.state_dir.parent
        self._port_given = port is not None
        self.port = port or free_port()
        self.env = dict(env or {})
        self.tac = tac
        self._log_path = Path(log_path) if log_path else self.workdir / f"roller-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self._log_file: Any = None
        self.starts = 0

    # -- addresses

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def db_path(self) -> Path:
        return self.state_dir / "roller.db"

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        if self.tac is not None:
            return [*twistd_command(), "-n", "--pidfile=", "-y", str(self.tac)]
        return [*twistd_command(), "-n", "--pidfile=", "roller",
                "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--state-dir", str(self.state_dir), *self.args]

    def child_env(self) -> dict[str, str]:
        extra = dict(self.env)
        if self.tac is not None:
            extra.setdefault("ROLLER_SERVER_LISTEN", f"tcp:{self.port}:interface=127.0.0.1")
            extra.setdefault("ROLLER_STATE_DIR", str(self.state_dir))
        return roller_env(extra)

    # -- lifecycle

    def start(self, timeout: float = 60.0) -> RollerProcess:
        """
        Start it and wait until C{/__lbheartbeat__} answers 200.  If the
        port was picked here and someone took it meanwhile, pick another.
        """
        if self.running:
            raise RuntimeError(f"roller is already running (pid {self.pid})")
        for attempt in range(3):
            try:
                return self._start(timeout)
            except RollerStartError:
                if self._port_given or attempt == 2 or "Address already in use" not in self.log_text():
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> RollerProcess:
        self._close_log()
        self.starts += 1
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_file.write(f"==== start {self.starts}: {' '.join(self.command())}\n".encode())
        self.process = subprocess.Popen(
            self.command(), env=self.child_env(), cwd=self.workdir,
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                raise RollerStartError(
                    f"roller exited with status {process.returncode} before answering"
                    f"\n{self.log_tail()}")
            try:
                return self.get("/__lbheartbeat__", timeout=2).status == 200
            except OSError:
                return False

        try:
            wait_for(ready, timeout, f"roller to answer on {self.base_url}/__lbheartbeat__",
                     describe=self.log_tail)
        except BaseException:
            self.kill()
            self.stop()
            raise
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """
        SIGTERM, then SIGKILL after C{timeout}; its exit status (after a
        clean SIGTERM shutdown twistd re-raises the signal: C{-SIGTERM}).
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._reap_group()
        self._close_log()
        return self.process.returncode

    def kill(self) -> int | None:
        """
        C{kill -9} roller itself; its exit status.  What it had spawned is
        then killed too (by process group), rather than left to run on.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reap_group()
        self._close_log()
        return self.process.returncode

    def _reap_group(self) -> None:
        # Children roller left behind (ping after kill -9) are in its
        # process group, whose id is roller's pid.
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        """Stop it (if running), reap its process group, drop the temp dir."""
        try:
            self.stop()
        finally:
            self._close_log()
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> RollerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            sys.stdout.write(f"\n---- roller log ({self.log_path})\n{self.log_text()}\n")
        self.close()

    # -- the log

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    def log_tail(self, lines: int = 60) -> str:
        return f"---- last lines of roller's log ({self.log_path}):\n" + "\n".join(
            self.log_text().splitlines()[-lines:])

    def log_events(self, lines: int = 80, without: tuple[str, ...] = ("[roller.access#",)) -> str:
        """The end of roller's log without the lines naming any of C{without} (by default: who asked)."""
        kept = [line for line in self.log_text().splitlines() if not any(w in line for w in without)]
        return "\n".join(kept[-lines:])

    # -- HTTP

    def request(self, method: str, path: str, body: Any = None,
                headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> Response:
        return http_request(method, self.url(path), body, headers, timeout)

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("POST", path, body, **kw)

    def json(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        """Request and return the JSON body, asserting the status (log tail on mismatch)."""
        r = self.request(method, path, body)
        if r.status != expect:
            raise AssertionError(f"{method} {path}: expected {expect}, got {r!r}\n{self.log_tail()}")
        return r.json()

    def wait_job(self, task_id: str, timeout: float = 20.0,
                 final: Iterable[str] = ("succeeded", "failed", "cancelled", "timed_out", "interrupted"),
                 ) -> dict:
        """Poll C{GET /api/v1/jobs/ID} until its state is in C{final}; the job."""
        final = set(final)
        last: dict = {}

        def done() -> dict | None:
            last.update(self.json("GET", f"/api/v1/jobs/{task_id}"))
            return dict(last) if last.get("state") in final else None

        return wait_for(done, timeout, f"job {task_id} to reach {sorted(final)}", interval=0.2,
                        describe=lambda: f"last seen: {json.dumps(last)[:2000]}\n{self.log_tail()}")
