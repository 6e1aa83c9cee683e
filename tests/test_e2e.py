"""
End to end: roller as a real process (C{twistd -n roller}, C{twistd -ny
roller.tac}) on a loopback port, driven over HTTP with urllib, pinging
real loopback addresses with the system C{ping}.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from roller.testing.process import REPO_ROOT, RollerProcess, free_port, ping_skip_reason, run_twistd

needs_ping = pytest.mark.skipif(ping_skip_reason() is not None, reason=str(ping_skip_reason()))


def messages(job: dict) -> list[str]:
    return [e["message"] for e in job["events"]]


def assert_ping_output(job: dict) -> None:
    lines = messages(job)
    assert any("bytes from" in m or "packets transmitted" in m for m in lines), lines


@pytest.fixture(scope="module")
def demo_roller(tmp_path_factory):
    roller = RollerProcess(["--auth", "none", "--demo"], state_dir=tmp_path_factory.mktemp("demo") / "state")
    roller.start()
    yield roller
    roller.close()


@pytest.fixture
def demo(demo_roller):
    """The shared demo roller; its log tail is printed (shown on failure) after each test."""
    yield demo_roller
    print(demo_roller.log_tail(80))


def test_help_lists_options():
    r = run_twistd(["roller", "--help"])
    assert r.returncode == 0, r.stderr
    for option in ("--config", "--listen", "--db"):
        assert option in r.stdout, r.stdout


@needs_ping
def test_ping_demo_machine_taskcluster_form(demo):
    r = demo.post("/api/v1/workers/demo-1/group/demo/jobs?task_name=ping")
    assert r.status == 201, r
    body = r.json()
    assert body["task_name"] == "ping"
    assert body["worker_id"] == "demo-1"
    assert body["worker_group"] == "demo"
    assert r.headers["Location"] == f"/api/v1/jobs/{body['task_id']}"

    job = demo.wait_job(body["task_id"], timeout=20)
    assert job["state"] == "succeeded", job
    assert "127.0.0.2" in job["result"], job
    assert_ping_output(job)


@needs_ping
def test_ping_demo_machine_seed_form(demo):
    r = demo.post("/api/v1/jobs?tc_worker_id=demo-2&task_name=ping")
    assert r.status == 201, r
    body = r.json()
    assert body["tc_worker_id"] == "demo-2"
    assert body["worker_group"] == "demo"

    job = demo.wait_job(body["task_id"], timeout=20)
    assert job["state"] == "succeeded", job
    assert "127.0.0.3" in job["result"], job
    assert_ping_output(job)


def test_unreachable_demo_machine_fails_readably(demo):
    r = demo.post("/api/v1/workers/demo-closed/group/demo/jobs?task_name=ping")
    assert r.status == 201, r
    job = demo.wait_job(r.json()["task_id"], timeout=20)
    assert job["state"] == "failed", job
    error = job["error"]
    assert isinstance(error, str) and error.strip(), job
    assert "\n" not in error and "Traceback" not in error, error
    assert "127.0.0.5" in error, error
    assert job["result"] is None


@needs_ping
def test_added_machine_is_pinged(demo):
    machine = {"worker_id": "e2e-local", "worker_group": "e2e", "ip": "127.0.0.1", "pool": "e2e"}
    r = demo.post("/api/v1/machines", machine)
    assert r.status == 201, r
    assert r.json()["ip"] == "127.0.0.1"
    assert demo.json("GET", "/api/v1/machines/e2e/e2e-local")["worker_id"] == "e2e-local"

    r = demo.post("/api/v1/workers/e2e-local/group/e2e/jobs?task_name=ping")
    assert r.status == 201, r
    job = demo.wait_job(r.json()["task_id"], timeout=20)
    assert job["state"] == "succeeded", job
    assert "127.0.0.1" in job["result"], job
    assert_ping_output(job)

    listed = demo.json("GET", "/api/v1/jobs?worker_group=e2e")["jobs"]
    assert [j["task_id"] for j in listed] == [job["task_id"]]


def test_unknown_machine_is_404_json(demo):
    r = demo.post("/api/v1/jobs?tc_worker_id=no-such-machine&task_name=ping")
    assert r.status == 404, r
    assert r.headers["Content-Type"] == "application/json"
    assert r.json()["error"] == "unknown_machine"


def _assert_refused(r, key: str) -> None:
    output = r.stdout + r.stderr
    assert r.returncode != 0, output
    assert "Traceback" not in output, output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert key in lines[0], lines[0]


@pytest.mark.parametrize("source", ["environment", "toml"])
def test_invalid_setting_is_one_line_and_exit(tmp_path, source):
    args = ["roller", "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
            "--state-dir", str(tmp_path / "state")]
    env = {}
    if source == "environment":
        env["ROLLER_QUEUE_MAX_RUNNING"] = "abc"
    else:
        config = tmp_path / "roller.toml"
        config.write_text("[queue]\nmax_running = 0\n")
        args += ["--config", str(config)]
    r = run_twistd(args, env=env, timeout=20)
    _assert_refused(r, "queue.max_running")


def test_auth_none_on_all_interfaces_is_refused(tmp_path):
    r = run_twistd(["roller", "--auth", "none", "--listen", f"tcp:{free_port()}",
                    "--state-dir", str(tmp_path / "state")], timeout=20)
    _assert_refused(r, "auth.mode")


def test_default_auth_refuses_writes_and_scoped_reads(tmp_path):
    with RollerProcess(state_dir=tmp_path / "state") as roller:
        r = roller.post("/api/v1/jobs?tc_worker_id=demo-1&task_name=ping")
        assert r.status == 401, r
        assert r.headers["WWW-Authenticate"].startswith("Hawk"), dict(r.headers)
        assert r.headers["Content-Type"] == "application/json"
        assert r.json()["error"], r

        r = roller.post("/api/v1/machines", {"worker_id": "x", "worker_group": "g", "ip": "127.0.0.1"})
        assert r.status == 401, r

        r = roller.request("GET", "/api/v1/jobs")
        assert r.status == 401, r
        assert r.headers["WWW-Authenticate"].startswith("Hawk"), dict(r.headers)

        tasks = roller.json("GET", "/api/v1/tasks")
        assert tasks["tasks"]
        print(roller.log_tail())


@needs_ping
def test_tac_file_serves_the_same_api(tmp_path):
    tac = REPO_ROOT / "roller.tac"
    env = {"ROLLER_AUTH_MODE": "none", "ROLLER_DEMO": "true"}
    with RollerProcess(tac=tac, env=env, state_dir=tmp_path / "state") as roller:
        assert Path(roller.state_dir, "roller.db").exists()
        r = roller.post("/api/v1/workers/demo-1/group/demo/jobs?task_name=ping")
        assert r.status == 201, r
        job = roller.wait_job(r.json()["task_id"], timeout=20)
        assert job["state"] == "succeeded", job
        assert "127.0.0.2" in job["result"]
        assert_ping_output(job)
        # twistd ends a SIGTERM shutdown by re-raising the signal on itself
        assert roller.stop() in (0, -signal.SIGTERM)
        assert "Server Shut Down." in roller.log_text()
        print(roller.log_tail())
