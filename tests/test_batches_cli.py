"""
C{roller batch} as a user runs it: a child process, against a running
twistd roller (C{--url}, Hawk-signed with the TASKCLUSTER_* credentials,
auth.mode = "local") or in process on a database of its own, over a
simulated fleet (its own process: 8 machines that really reboot, 2 that
never answer SSH).  Output, the summary table, exit statuses, dry runs,
confirmation and the progress bar on a terminal (a pty), Ctrl-C, and bad
flags as one readable line.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from roller.inventory import Machine
from roller.testing.fleet_roller import FleetProcess, fleet_roller, signed, token_of
from roller.testing.process import REPO_ROOT, read_until, roller_env, wait_for
from roller.testing.syncdb import result_of, sync_store

PREFIX = "project:releng:roller:"
ADMIN = "project/releng/relops"
READER = "project/releng/reader"
POOLS = {"p1": ["sim-001", "sim-002", "sim-003", "sim-004"], "p2": ["sim-005", "sim-006", "sim-007", "sim-008"],
         "hung": ["sim-009", "sim-010"]}
BATCH_LINE = re.compile(r"^batch ([-0-9a-f]{36}): reboot on (\d+) machine\(s\)$", re.M)


class Env:
    def __init__(self, tmp: Path, fleet: FleetProcess, roller: Any):
        self.tmp = tmp
        self.fleet = fleet
        self.roller = roller
        self.config = tmp / "roller" / "roller.toml"

    def env(self, client: str | None = ADMIN, token: str | None = None) -> dict[str, str]:
        env = roller_env()
        env.pop("TASKCLUSTER_CLIENT_ID", None)
        env.pop("TASKCLUSTER_ACCESS_TOKEN", None)
        env.update(COLUMNS="120", TERM="dumb")
        if client is not None:
            env.update(TASKCLUSTER_CLIENT_ID=client, TASKCLUSTER_ACCESS_TOKEN=token or token_of(client))
        return env

    def argv(self, *args: str, url: bool = True, state_dir: Path | None = None) -> list[str]:
        out = [sys.executable, "-m", "roller.cli", "--config", str(self.config)]
        if state_dir is not None:
            out += ["--state-dir", str(state_dir)]
        out += ["batch", *args]
        if url:
            out += ["--url", self.roller.base_url]
        return out

    def run(self, *args: str, url: bool = True, client: str | None = ADMIN, token: str | None = None,
            state_dir: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args, url=url, state_dir=state_dir), env=self.env(client, token),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                              cwd=str(self.tmp))

    def api(self, method: str, path: str, expect: int = 200) -> Any:
        r = signed(self.roller, ADMIN, method, path)
        assert r.status == expect, r
        return r.json()

    def batches(self) -> list[dict]:
        return list(self.api("GET", "/api/v1/batches?limit=1000")["batches"])


@pytest.fixture(scope="module")
def env(tmp_path_factory: Any) -> Any:
    tmp = tmp_path_factory.mktemp("batches-cli")
    fleet = FleetProcess(tmp / "fleet", 10, "127.0.17.", hang=2, down_for=1.0, reboot_delay=0.05)
    roller = None
    try:
        fleet.start()
        roller = fleet_roller(tmp / "roller", fleet, clients={ADMIN: [PREFIX + "*"],
                                                             READER: [PREFIX + "reboot", PREFIX + "jobs:read"]})
        roller.start()
        pool_of = {w: p for p, ws in POOLS.items() for w in ws}
        for entry in fleet.inventory():
            entry["pool"] = pool_of[entry["worker_id"]]
            r = signed(roller, ADMIN, "POST", "/api/v1/machines", entry)
            assert r.status == 201, r
        yield Env(tmp, fleet, roller)
    except BaseException:
        if roller is not None:
            print(roller.log_tail(200))
        raise
    finally:
        if roller is not None:
            roller.close()
        fleet.close()


def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("roller batch: "), r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# -- against a running roller


def test_url_batch_shows_progress_and_a_summary_and_exits_0(env: Env) -> None:
    r = env.run("reboot", "--pool", "p1", "--max-concurrent", "2", "--max-per-pool", "none", "--yes",
                "--reason", "cli test")
    assert r.returncode == 0, (r.stdout, r.stderr)
    m = BATCH_LINE.search(r.stdout)
    assert m is not None and m.group(2) == "4", r.stdout
    batch_id = m.group(1)
    assert "  pools:  p1 4" in r.stdout
    assert "limits: at most 2 at once (max_concurrent 2); no per-pool limit; no circuit breaker" in r.stdout
    # not a terminal: plain progress lines, the last one complete
    progress = [line for line in r.stdout.splitlines() if line.startswith(f"batch {batch_id}: [")]
    assert progress and "4/4 done, 0 running, 0 queued, 0 failed (succeeded)" in progress[-1], r.stdout
    assert "\r" not in r.stdout
    table = r.stdout[r.stdout.index("MACHINE"):].splitlines()
    assert re.match(r"MACHINE\s+POOL\s+STATE\s+JOB\s+ERROR$", table[0]), table[0]
    assert sorted(line.split()[0] for line in table[1:5]) == [f"sim/{w}" for w in POOLS["p1"]]
    assert all(line.split()[2] == "succeeded" and re.fullmatch(r"[-0-9a-f]{36}", line.split()[3])
               for line in table[1:5]), table
    assert table[5] == f"batch {batch_id} succeeded: 4 succeeded"
    view = env.api("GET", f"/api/v1/batches/{batch_id}")
    assert view["state"] == "succeeded" and view["requester"] == ADMIN and view["reason"] == "cli test"


def test_url_batch_with_failures_exits_1_with_the_errors(env: Env) -> None:
    r = env.run("reboot", "--machine", "sim/sim-009", "--machine", "sim/sim-005", "--max-concurrent", "1",
                "--stop-after-failures", "1", "--yes")
    assert r.returncode == 1, (r.stdout, r.stderr)
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("sim/")}
    assert "failed" in rows["sim/sim-009"] and "timed out" in rows["sim/sim-009"]
    assert rows["sim/sim-005"].split()[2] == "skipped" and rows["sim/sim-005"].split()[3] == "-"
    last = r.stdout.strip().splitlines()[-1]
    assert re.match(r"batch \S+ halted: 1 failed, 1 skipped; stopped after 1 failed member; last: sim/sim-009",
                    last), last


def test_dry_run_prints_the_plan_and_starts_nothing(env: Env) -> None:
    before = len(env.batches())
    r = env.run("reboot", "--pool", "p2", "--max-concurrent", "50%", "--dry-run")
    assert r.returncode == 0, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[0] == "dry run: nothing started"
    assert lines[1] == "reboot on 4 machine(s)"
    assert "  pools:  p2 4" in lines
    assert any(line.startswith("  limits: at most 2 at once (max_concurrent 50%); per pool p2 1") for line in lines)
    assert sorted(line.split()[0] for line in lines if line.startswith("  sim/")) == [f"sim/{w}"
                                                                                      for w in POOLS["p2"]]
    assert len(env.batches()) == before


@pytest.mark.parametrize("args, words", [
    (["reboot", "--pool", "p1", "--max-concurrent", "lots"], ["--max-concurrent 'lots'", "percentage"]),
    (["reboot", "--machine", "nogroup"], ["--machine 'nogroup'", "WORKER_GROUP/WORKER_ID"]),
    (["reboot", "--pool", "p1", "--param", "count"], ["--param 'count'", "NAME=VALUE"]),
    (["reboot"], ["HTTP 400 invalid_body", "at least one filter"]),
    (["reboot", "--pool", "p1", "--max-per-pool", "150%"], ["HTTP 400 invalid_body", "max_per_pool"]),
    (["nope", "--pool", "p1"], ["HTTP 400 unknown_task", "nope"]),
    (["reboot", "--pool", "no-such-pool", "--yes"], ["HTTP 400 empty_selection"]),
    (["show"], ["needs the batch id"]),
    (["show", "0190e0e0-0000-7000-8000-000000000000"], ["HTTP 404 unknown_batch"]),
    (["list", "extra"], ["unexpected argument 'extra'"]),
    (["reboot", "sim-001"], ["unexpected argument 'sim-001'", "--machine"]),
    (["reboot", "--pool", "p1", "--running"], ["--running goes with roller batch cancel"]),
])
def test_bad_usage_is_one_readable_line(env: Env, args: list[str], words: list[str]) -> None:
    before = len(env.batches())
    _one_line_error(env.run(*args), *words)
    assert len(env.batches()) == before


def test_unknown_flags_and_unreachable_rollers_are_readable(env: Env) -> None:
    r = env.run("reboot", "--pool", "p1", "--frobnicate")
    assert r.returncode == 2 and "unrecognized arguments: --frobnicate" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(env.argv("reboot", "--pool", "p1", url=False) + ["--url", "http://127.0.0.1:9"],
                       env=env.env(), capture_output=True, text=True, timeout=60)
    _one_line_error(r, "cannot reach roller at http://127.0.0.1:9")
    r = subprocess.run(env.argv("list", url=False) + ["--url", "ftp://roller.example"], env=env.env(),
                       capture_output=True, text=True, timeout=60)
    _one_line_error(r, "--url must be roller's http:// or https:// URL")


def test_scopes_and_credentials(env: Env) -> None:
    line = _one_line_error(env.run("reboot", "--pool", "p1", "--yes", client=READER),
                           "HTTP 403 insufficient_scope", PREFIX + "batches:create")
    assert token_of(READER) not in line
    wrong = "not-the-token-0123456789"
    line = _one_line_error(env.run("list", token=wrong), "HTTP 401")
    assert wrong not in line
    _one_line_error(env.run("list", client=None), "HTTP 401")


def test_ctrl_c_leaves_the_batch_running_and_says_how_to_cancel(env: Env) -> None:
    # a long pause between members keeps the batch running while show, list and cancel run on a busy machine
    child = subprocess.Popen(env.argv("reboot", "--pool", "p2", "--max-concurrent", "1", "--pause-between", "600",
                                      "--yes"),
                             env=env.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=str(env.tmp))
    try:
        assert child.stdout is not None
        head = read_until(child.stdout, ": [", timeout=60)  # the first progress line: it is following the batch
        m = BATCH_LINE.search(head)
        assert m is not None, head
        batch_id = m.group(1)
        child.send_signal(signal.SIGINT)
        rest = child.stdout.read()
        assert child.wait(30) == 130, head + rest
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert "Traceback" not in rest
    assert f"interrupted: batch {batch_id} keeps running on {env.roller.base_url}." in rest
    assert f"roller batch cancel {batch_id} --url {env.roller.base_url}" in rest
    assert env.api("GET", f"/api/v1/batches/{batch_id}?members=false")["state"] == "running"

    shown = env.run("show", batch_id)
    assert shown.returncode == 0 and f"batch {batch_id}: running" in shown.stdout, shown.stdout
    listed = env.run("list")
    assert listed.returncode == 0 and batch_id in listed.stdout
    cancelled = env.run("cancel", batch_id, "--running")
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"batch {batch_id}: cancelled" in cancelled.stdout
    view = env.api("GET", f"/api/v1/batches/{batch_id}?members=false")
    assert view["state"] == "cancelled" and view["halt_reason"] == f"cancelled by {ADMIN}"
    again = env.run("cancel", batch_id)
    wait_for(lambda: env.api("GET", f"/api/v1/batches/{batch_id}?members=false")["finished"], 30,
             "the cancelled batch to finish")
    assert again.returncode in (0, 2)  # 2 (batch_finished) once its last member ended


# -- on a terminal


def _pty_run(argv: list[str], env: dict[str, str], answer: str | None, timeout: float = 120) -> tuple[int, str]:
    """Run C{argv} on a pseudo-terminal, answering the confirmation with C{answer}; (status, output)."""
    import pty

    master, slave = pty.openpty()
    child = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    answered = answer is None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                out += data
                if not answered and b"[y/N]" in out:
                    os.write(master, answer.encode() + b"\n")
                    answered = True
            elif child.poll() is not None:
                break
        return child.wait(30), out.decode("utf-8", "replace")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)


def test_terminal_asks_to_confirm_and_draws_a_progress_bar(env: Env) -> None:
    before = len(env.batches())
    code, out = _pty_run(env.argv("reboot", "--pool", "p1", "--max-concurrent", "2"), env.env(), "n")
    assert code == 1, out
    assert "reboot on 4 machine(s)" in out and "pools:  p1 4" in out
    assert "Run reboot on these 4 machine(s)? [y/N]" in out and "not confirmed: nothing started" in out
    assert len(env.batches()) == before

    code, out = _pty_run(env.argv("reboot", "--pool", "p1", "--max-concurrent", "2"), env.env(), "y")
    assert code == 0, out
    assert len(env.batches()) == before + 1
    # one line redrawn in place (carriage returns), ending complete, then the table
    assert re.search(r"\r\[[#-]+\] \d/4 done", out), out
    assert re.search(r"\r\[#+\] 4/4 done, 0 running, 0 queued, 0 failed \(succeeded\)", out), out
    assert "MACHINE" in out and re.search(r"batch \S+ succeeded: 4 succeeded", out)


# -- in process


@pytest.fixture
def local_db(env: Env, tmp_path: Path) -> Path:
    """A state directory of its own, with the fleet's machines in its database."""
    state = tmp_path / "state"
    state.mkdir()
    store, _ = sync_store(str(state / "roller.db"))
    pool_of = {w: p for p, ws in POOLS.items() for w in ws}
    for entry in env.fleet.inventory():
        result_of(store.machines.put(Machine.from_json({**entry, "pool": pool_of[entry["worker_id"]]})))
    result_of(store.close())
    return state


def test_in_process_batch_runs_here(env: Env, local_db: Path) -> None:
    r = env.run("reboot", "--pool", "p2", "--max-concurrent", "2", "--yes", url=False, state_dir=local_db)
    assert r.returncode == 0, (r.stdout, r.stderr)
    m = BATCH_LINE.search(r.stdout)
    assert m is not None, r.stdout
    batch_id = m.group(1)
    assert r.stdout.strip().splitlines()[-1] == f"batch {batch_id} succeeded: 4 succeeded"
    assert batch_id not in [b["batch_id"] for b in env.batches()]  # not the running roller's
    shown = env.run("show", batch_id, url=False, state_dir=local_db)
    assert shown.returncode == 0 and f"batch {batch_id}: succeeded" in shown.stdout
    assert "by cli:" in shown.stdout
    listed = env.run("list", url=False, state_dir=local_db)
    assert batch_id in listed.stdout and "1 batch(es)" in listed.stdout


def test_in_process_ctrl_c_cancels_the_batch(env: Env, local_db: Path) -> None:
    child = subprocess.Popen(env.argv("reboot", "--pool", "p1", "--max-concurrent", "1", "--yes", url=False,
                                      state_dir=local_db),
                             env=env.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=str(env.tmp))
    try:
        assert child.stdout is not None
        head = read_until(child.stdout, ": [", timeout=60)
        m = BATCH_LINE.search(head)
        assert m is not None, head
        child.send_signal(signal.SIGINT)
        rest = child.stdout.read()
        assert child.wait(30) == 130, head + rest
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert f"interrupted: cancelling batch {m.group(1)}" in rest and "Traceback" not in rest
    assert re.search(rf"batch {m.group(1)} cancelled: .*skipped", rest), rest
    shown = env.run("show", m.group(1), url=False, state_dir=local_db)
    assert f"batch {m.group(1)}: cancelled" in shown.stdout


def test_in_process_refuses_a_database_a_roller_serves(env: Env, local_db: Path) -> None:
    from roller.store.sqlite import acquire_lock

    lock = acquire_lock(str(local_db / "roller.db"), "a roller")  # what a running roller holds
    try:
        for args in (["reboot", "--pool", "p2", "--yes"], ["cancel", "0" * 8 + "-0000-7000-8000-" + "0" * 12]):
            r = env.run(*args, url=False, state_dir=local_db)
            line = _one_line_error(r, "in use by a roller", "--url")
            assert str(os.getpid()) in line
        dry = env.run("reboot", "--pool", "p2", "--dry-run", url=False, state_dir=local_db)
        assert dry.returncode == 0 and "4 machine(s)" in dry.stdout, (dry.stdout, dry.stderr)
    finally:
        lock.release()


def test_in_process_batch_leaves_other_unfinished_batches_alone(env: Env, local_db: Path) -> None:
    # a batch left unfinished in the database (its roller stopped before starting any member): a
    # later `roller batch` in process runs its own batch only and starts none of the other's members
    from roller.batches.model import Batch, Limit, Member, Rollout, Selector

    other = "01900000-0000-7000-8000-000000000001"
    group = env.fleet.inventory()[0]["worker_group"]
    batch = Batch(id=other, task_name="ping", selector=Selector(pool="p1"), rollout=Rollout(max_concurrent=Limit(4)),
                  created_at=time.time(), requester="alice", origin_ip="127.0.0.1", params={}, reason="",
                  priority=50, total=4)
    store, _ = sync_store(str(local_db / "roller.db"))
    try:
        result_of(store.batches.insert(batch, [Member(other, i, group, w, pool="p1")
                                               for i, w in enumerate(POOLS["p1"])], pool_sizes={"p1": 4}))
    finally:
        result_of(store.close())
    mine = env.run("reboot", "--pool", "p2", "--yes", url=False, state_dir=local_db)
    assert mine.returncode == 0, (mine.stdout, mine.stderr)
    shown = env.run("show", other, "--json", url=False, state_dir=local_db)
    assert shown.returncode == 0, (shown.stdout, shown.stderr)
    view = json.loads(shown.stdout)
    assert view["state"] == "running" and view["counts"].get("pending") == 4, view["counts"]
    assert all(m["task_id"] is None for m in view["members"]), view["members"]


def test_actions_prints_a_hook_that_creates_the_batch(env: Env) -> None:
    import json

    argv = [sys.executable, "-m", "roller.cli", "actions", "--batch", "reboot", "--pool", "p1", "--max-per-pool",
            "25%", "--stop-after-failures", "3", "--url", "https://roller.example.com", "--reason", "weekly"]
    r = subprocess.run(argv, env={**roller_env(), "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
                       timeout=60, cwd=str(env.tmp))
    assert r.returncode == 0, r.stderr
    hook = json.loads(r.stdout)
    task = hook["task"]
    assert task["scopes"] == [PREFIX + "reboot", PREFIX + "batches:create"]
    assert task["payload"]["features"] == {"taskclusterProxy": True}
    script = task["payload"]["command"][-1]
    assert "http://taskcluster/roller.example.com/api/v1/batches" in script
    body = json.loads(script.split("--data ")[1].split("' ")[0].strip("'"))
    assert body == {"task_name": "reboot", "selector": {"pool": "p1"}, "params": {}, "reason": "weekly",
                    "priority": 50, "rollout": {"max_per_pool": "25%", "stop_after_failures": 3}}
    assert PREFIX + "batches:create" in r.stderr and "queue:create-task" in r.stderr
    r = subprocess.run(argv[:-4] + ["--url", "http://roller.example.com:8000"],
                       env={**roller_env(), "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
                       timeout=60, cwd=str(env.tmp))
    assert r.returncode == 2 and "taskcluster-proxy" in r.stderr and "Traceback" not in r.stderr
