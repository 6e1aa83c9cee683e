"""The roller command, run as a user would: a child process on a temp state dir."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

IPMI_JSON = {
    "types": {"moonshot": {"args": ["-B 0", "-b 7"], "map": {"c3n1": ["-T 0x86", "-t 0x72"]},
                           "commands": {"ipmi_on": ["chassis", "power", "on"]}}},
    "10.49.16.17": {"ipmi": {"user": "admin", "password": "s3cret-chassis-pw", "type": "moonshot"}},
    "10.49.58.3": {"ipmi": {"ip": "10.49.16.17", "addr": "c3n1"}},
}


def roller(state: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ROLLER_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "roller.cli", "--state-dir", str(state), *args],
        capture_output=True, text=True, env=env, timeout=60,
    )


def test_import_machines_and_secret(tmp_path):
    src = tmp_path / "ipmi.json"
    src.write_text(json.dumps(IPMI_JSON))
    r = roller(tmp_path / "state", "import", str(src), "--group", "mdc1")
    assert r.returncode == 0, r.stderr
    assert "imported" in r.stdout and "mdc1/10-49-58-3" in r.stdout
    assert "skipped" in r.stdout and "chassis" in r.stdout
    assert "s3cret-chassis-pw" not in r.stdout + r.stderr
    secrets = tmp_path / "state" / "secrets.toml"
    assert secrets.stat().st_mode & 0o077 == 0
    assert "s3cret-chassis-pw" in secrets.read_text()

    r = roller(tmp_path / "state", "machines", "--json")
    (m,) = json.loads(r.stdout)
    assert m["ipmi"]["host"] == "10.49.16.17"
    assert m["ipmi"]["bridge"] == ["-B", "0", "-b", "7", "-T", "0x86", "-t", "0x72"]
    assert m["ipmi"]["credential"] == "ipmi-10.49.16.17"

    # importing the same file again changes nothing
    r = roller(tmp_path / "state", "import", str(src), "--group", "mdc1")
    assert "unchanged" in r.stdout


def test_import_bad_file_is_a_readable_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = roller(tmp_path / "state", "import", str(bad))
    assert r.returncode == 2
    assert "not valid JSON" in r.stderr and "Traceback" not in r.stderr
    r = roller(tmp_path / "state", "import", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "cannot read" in r.stderr


@pytest.mark.skipif(shutil.which("ping") is None, reason="iputils-ping is not installed")
def test_run_ping_shows_log_and_records_job(tmp_path):
    state = tmp_path / "state"
    cfg = {"servers": {"lo1": {"ip": "127.0.0.1"}}}
    (tmp_path / "wc.json").write_text(json.dumps(cfg))
    r = roller(state, "import", str(tmp_path / "wc.json"), "--group", "g")
    assert r.returncode == 0, r.stdout + r.stderr
    r = roller(state, "run", "ping", "lo1", "--param", "count=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bytes from 127.0.0.1" in r.stdout
    assert "succeeded" in r.stdout
    r = roller(state, "jobs", "--state", "succeeded", "--json")
    jobs = json.loads(r.stdout)
    assert [j["worker_id"] for j in jobs] == ["lo1"] and jobs[0]["requester"] == "cli"


def test_errors_are_one_line(tmp_path):
    r = roller(tmp_path / "state", "run", "ping", "nosuch")
    assert r.returncode == 2 and r.stderr.strip() == "roller run: no machine nosuch"
    r = roller(tmp_path / "state", "jobs", "--state", "bogus")
    assert r.returncode == 2 and "'bogus' is not one of" in r.stderr
    env_bad = roller(tmp_path / "state", "--config", str(tmp_path / "nope.toml"), "machines")
    assert env_bad.returncode == 2 and "does not exist" in env_bad.stderr
    assert all("Traceback" not in x for x in (r.stderr, env_bad.stderr))


def test_audit_lists_imports_and_jobs(tmp_path):
    state = tmp_path / "state"
    (tmp_path / "wc.json").write_text(json.dumps({"servers": {"lo1": {"ip": "127.0.0.1"}}}))
    assert roller(state, "import", str(tmp_path / "wc.json"), "--group", "g").returncode == 0
    r = roller(state, "audit", "--json")
    assert r.returncode == 0, r.stderr
    (entry,) = json.loads(r.stdout)
    assert entry["action"] == "machines.import" and entry["actor"].startswith("cli:")
    assert entry["params"]["counts"]["imported"] == 1 and entry["params"]["file"] == "wc.json"
    r = roller(state, "audit")
    assert "machines.import" in r.stdout and r.stdout.rstrip().endswith("1 entry")


def test_config_lists_every_key_with_its_meaning(tmp_path):
    from roller import config

    r = roller(tmp_path / "state", "config")
    assert r.returncode == 0, r.stderr
    for key in config.KEYS:
        assert f"\n{key} = " in "\n" + r.stdout, key
    assert "snmp.min_interval = 1.0\n    Seconds between two operations on one PDU.\n" \
           "    type: number >= 0; environment: ROLLER_SNMP_MIN_INTERVAL\n" in r.stdout

    env_file = tmp_path / "roller.toml"
    env_file.write_text('[queue]\nmax_running = 9\n')
    r = roller(tmp_path / "state", "--config", str(env_file), "config", "--json", "queue")
    entries = json.loads(r.stdout)
    assert [e["key"] for e in entries] == [k for k in config.KEYS if k.startswith("queue.")]
    assert entries[0]["value"] == 9 and entries[0]["default"] == 200

    r = roller(tmp_path / "state", "config", "queue.nope")
    assert r.returncode == 2 and "unknown setting(s) queue.nope" in r.stderr and "Traceback" not in r.stderr


def test_maintenance_and_health_from_the_command_line(tmp_path):
    src = tmp_path / "ipmi.json"
    src.write_text(json.dumps(IPMI_JSON))
    state = tmp_path / "state"
    assert roller(state, "import", str(src), "--group", "mdc1").returncode == 0
    r = roller(state, "machines", "10-49-58-3", "--maintenance", "on", "--reason", "new disk")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("mdc1/10-49-58-3: maintenance on")
    r = roller(state, "health", "--json")
    (m,) = [m for m in json.loads(r.stdout)["machines"] if m["worker_id"] == "10-49-58-3"]
    assert m["maintenance"] and m["state"] == "maintenance"
    r = roller(state, "health", "pause")
    assert r.returncode == 0 and "remediation paused" in r.stdout
    shown = roller(state, "health")
    assert shown.returncode == 0 and "remediation paused by cli:" in shown.stdout
    assert "mdc1/10-49-58-3" in shown.stdout and "maintenance" in shown.stdout
    audit = json.loads(roller(state, "audit", "--json").stdout)
    assert {"machine.maintenance", "health.pause"} <= {e["action"] for e in audit}
    r = roller(state, "machines", "10-49-58-3", "--maintenance", "off")
    assert r.returncode == 0
    assert not [m for m in json.loads(roller(state, "health", "--json").stdout)["machines"] if m["maintenance"]]
    # mistakes are one readable line
    for args, message in ((("machines", "nope", "--maintenance", "on"), "no machine 'nope'"),
                          (("machines", "--maintenance", "on"), "--maintenance needs the machine"),
                          (("machines", "10-49-58-3"), "only with --maintenance")):
        r = roller(state, *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
