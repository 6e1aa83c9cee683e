"""Settings: defaults < TOML < ROLLER_* < options, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from roller import config
from roller.config import ConfigError, endpoint_is_local, env_name, load_settings, parse_endpoint
from roller.tap import Options, settings_from_options


def write(tmp_path, text: str) -> str:
    path = tmp_path / "roller.toml"
    path.write_text(text)
    return str(path)


def test_defaults_just_work():
    s = load_settings(None, {}, {})
    assert s.listen == ("tcp:8000:interface=127.0.0.1",)
    assert s.db_path == "state/roller.db"
    assert s.secrets_file == "state/secrets.toml"
    assert s.auth_mode == "taskcluster"
    assert {"ping", "ssh_reboot", "reboot", "ipmi_reset"} <= set(s.allowed_tasks)


def test_precedence_file_env_options(tmp_path):
    path = write(tmp_path, '[queue]\nmax_running = 5\nendpoint_min_interval = 2.5\n'
                           '[database]\npath = "/tmp/from-file.db"\n')
    s = load_settings(path, {}, {})
    assert (s.max_running, s.endpoint_min_interval, s.db_path) == (5, 2.5, "/tmp/from-file.db")
    s = load_settings(path, {"ROLLER_QUEUE_MAX_RUNNING": "7"}, {})
    assert s.max_running == 7
    s = load_settings(path, {"ROLLER_DATABASE_PATH": "/tmp/env.db"}, {"database.path": "/tmp/opt.db"})
    assert s.db_path == "/tmp/opt.db"


def test_config_file_from_environment(tmp_path):
    path = write(tmp_path, 'state_dir = "/srv/roller"\n')
    s = load_settings(None, {"ROLLER_CONFIG": path}, {})
    assert s.db_path == "/srv/roller/roller.db"
    assert s.config_file == path


@pytest.mark.parametrize(
    "source, key",
    [
        ({"ROLLER_QUEUE_MAX_RUNNING": "abc"}, "queue.max_running"),
        ({"ROLLER_QUEUE_MAX_RUNNING": "0"}, "queue.max_running"),
        ({"ROLLER_QUEUE_ENDPOINT_MIN_INTERVAL": "-1"}, "queue.endpoint_min_interval"),
        ({"ROLLER_AUTH_MODE": "open"}, "auth.mode"),
        ({"ROLLER_DEMO": "maybe"}, "demo"),
        ({"ROLLER_SERVER_LISTEN": "carrier-pigeon:1"}, "server.listen"),
        ({"ROLLER_SERVER_LISTEN": "tcp:http"}, "server.listen"),
        ({"ROLLER_SERVER_LISTEN": "tcp:80:interface=127.0.0.1:mode=600"}, "server.listen"),
        ({"ROLLER_SERVER_LISTEN": "unix:/tmp/r.sock:mode=999"}, "server.listen"),
        ({"ROLLER_SERVER_LISTEN": "ssl:8443:privateKey=/nonexistent/key.pem"}, "server.listen"),
        ({"ROLLER_TASKS_TIMEOUTS": "ping"}, "tasks.timeouts"),
    ],
)
def test_bad_environment_value_names_key(source, key):
    with pytest.raises(ConfigError) as e:
        load_settings(None, source, {})
    assert e.value.key == key
    assert str(e.value).startswith(f"configuration error: {key}")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "source, key",
    [
        ({"ROLLER_TASKS_ALLOWED": "ping,nuke"}, "tasks.allowed"),
        ({"ROLLER_TASKS_TIMEOUTS": "nuke=3"}, "tasks.timeouts"),
        ({"ROLLER_REBOOT_METHODS": "ssh_reboot,prayer"}, "reboot.methods"),
    ],
)
def test_names_of_tasks_and_reboot_methods_checked_at_start_up(source, key):
    """The entry points check the names roller.config does not know (it depends on nothing above it)."""
    assert load_settings(None, source, {})  # roller.config alone cannot tell
    with pytest.raises(ConfigError) as e:
        settings_from_options(Options(), source)
    assert e.value.key == key
    assert str(e.value).startswith(f"configuration error: {key}")
    assert "\n" not in str(e.value)


def test_config_imports_nothing_above_it():
    code = ("import sys, roller.config; print(sorted(m for m in sys.modules if m.startswith("
            "('roller.', 'twisted.internet.testing'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['roller.config', 'roller.jobs', 'roller.timetext']"  # timetext: stdlib only


def test_bad_file_values(tmp_path):
    with pytest.raises(ConfigError, match=r"queue.max_running .*must be an integer"):
        load_settings(write(tmp_path, '[queue]\nmax_running = "many"\n'), {}, {})
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(write(tmp_path, '[queue]\nmax_runing = 3\n'), {}, {})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(write(tmp_path, '[queue\n'), {}, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(str(tmp_path / "missing.toml"), {}, {})


def test_timeouts_table(tmp_path):
    s = load_settings(write(tmp_path, '[tasks]\ntimeouts = { ping = 12 }\n'), {}, {})
    assert s.task_timeouts == {"ping": 12.0}
    assert load_settings(None, {"ROLLER_TASKS_TIMEOUTS": "ping=3"}, {}).task_timeouts == {"ping": 3.0}


def test_auth_none_only_on_loopback():
    assert load_settings(None, {}, {"auth.mode": "none"}).auth_mode == "none"
    with pytest.raises(ConfigError) as e:
        load_settings(None, {}, {"auth.mode": "none", "server.listen": "tcp:8000"})
    assert e.value.key == "auth.mode"
    with pytest.raises(ConfigError):
        load_settings(None, {}, {"auth.mode": "none",
                                 "server.listen": "tcp:8000:interface=127.0.0.1 tcp:8001:interface=10.1.2.3"})
    s = load_settings(None, {}, {"auth.mode": "none", "server.listen": "tcp:8000:interface=\\:\\:1"})
    assert s.listen == ("tcp:8000:interface=\\:\\:1",)


@pytest.mark.parametrize(
    "desc, local",
    [
        ("tcp:80:interface=127.0.0.1", True),
        ("tcp:80:interface=127.1.2.3", True),
        ("tcp6:80:interface=\\:\\:1", True),
        ("unix:/tmp/roller.sock", True),
        ("tcp:80:127.0.0.1", True),  # interface as tcp's second positional argument
        ("tcp:80:localhost", True),
        ("tcp6:80:interface=\\:\\:1", True),
        ("tcp6:80", False),  # tcp6 listens on :: by default
        ("ssl:443:privateKey=k.pem:interface=127.0.0.1", True),
        ("ssl:443:privateKey=k.pem", False),
        ("systemd:domain=INET:index=0", False),  # a plugin's endpoint: not known to be local
        ("tcp:80", False),
        ("tcp:80:interface=0.0.0.0", False),
        ("tcp:80:interface=192.0.2.1", False),
    ],
)
def test_endpoint_is_local(desc, local):
    assert endpoint_is_local(desc) is local


def test_env_name():
    assert env_name("queue.max_running") == "ROLLER_QUEUE_MAX_RUNNING"
    assert env_name("state_dir") == "ROLLER_STATE_DIR"


def test_every_key_has_a_description():
    """`roller config` explains every key: a key added without a line in HELP fails here."""
    missing = sorted(set(config.KEYS) - set(config.HELP))
    assert missing == [], f"keys without a description in roller.config.HELP: {missing}"
    assert sorted(set(config.HELP) - set(config.KEYS)) == []
    for key, text in config.HELP.items():
        assert len(text.strip()) >= 10 and "\n" not in text, key


def test_describe_names_type_default_environment_and_value():
    settings = config.load_settings(None, {"ROLLER_QUEUE_MAX_RUNNING": "7"}, {})
    entries = {e["key"]: e for e in config.describe(settings)}
    assert list(entries) == list(config.KEYS)
    e = entries["queue.max_running"]
    assert (e["type"], e["default"], e["env"], e["value"]) == ("integer 1-100000", 200, "ROLLER_QUEUE_MAX_RUNNING", 7)
    assert entries["snmp.min_interval"]["type"] == "number >= 0"
    assert entries["log.format"]["type"] == "one of text, json"
    assert entries["server.trusted_proxies"]["type"] == "list of addresses or CIDR networks"
    # every parser has a readable name, not a Python identifier
    for e in entries.values():
        assert e["type"] and not e["type"].startswith("parse"), e


def test_endpoint_strings_split_by_twisteds_rules():
    d = parse_endpoint("ssl:8443:privateKey=C\\:/k.pem:interface=\\:\\:1:x")
    assert (d.kind, d.args, dict(d.options)) == ("ssl", ("8443", "x"), {"privateKey": "C:/k.pem", "interface": "::1"})
    assert parse_endpoint("unix:/a=b").options == {"/a": "b"}  # as Twisted reads it
    assert parse_endpoint("tcp:80:interface=a=b").options == {"interface": "a=b"}  # only the first = assigns
