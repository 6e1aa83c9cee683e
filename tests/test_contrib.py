"""
contrib/roller.service: its ExecStart line, run as is (binary and config
path swapped for this checkout's), starts roller, logs through
roller.logs.observer and stops cleanly on SIGTERM within TimeoutStopSec.
"""

from __future__ import annotations

import configparser
import shlex
import signal
from pathlib import Path

from roller.config import load_settings
from roller.testing.process import REPO_ROOT, RollerProcess, twistd_command

UNIT = Path(REPO_ROOT) / "contrib" / "roller.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNIT)
    return parser


class UnitProcess(RollerProcess):
    def __init__(self, argv: list[str], **kw):
        super().__init__(**kw)
        self.argv = argv

    def command(self) -> list[str]:
        return self.argv


def test_unit_runs_roller_and_stops_within_its_timeout(tmp_path):
    service = unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/twistd") and argv[1:4] == ["-n", "--pidfile=", "--logger"]
    assert service["User"] == "roller" and service["KillSignal"] == "SIGTERM"
    grace = load_settings(None, {}, {}).shutdown_grace
    assert float(service["TimeoutStopSec"]) > grace + 10
    config = tmp_path / "roller.toml"
    state = tmp_path / "state"
    config.write_text(f'state_dir = "{state}"\n[auth]\nmode = "none"\n')
    i = argv.index("--config")
    roller = UnitProcess([], state_dir=state)
    config.write_text(config.read_text() + f'[server]\nlisten = ["tcp:{roller.port}:interface=127.0.0.1"]\n')
    roller.argv = [*twistd_command(), *argv[1:i], "--config", str(config), *argv[i + 2:]]
    try:
        roller.start()
        assert roller.get("/__heartbeat__").status == 200
        # it stops by itself on SIGTERM within the unit's TimeoutStopSec (else stop() SIGKILLs: -9)
        assert roller.stop(timeout=float(service["TimeoutStopSec"])) in (0, -signal.SIGTERM)
        log = roller.log_text()
        assert "[roller.service#info] roller listening on" in log  # roller.logs.observer's text format
        assert "Traceback" not in log
    finally:
        roller.close()
