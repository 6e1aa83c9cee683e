"""
The reboot escalation on a task.Clock: fake shell and liveness whose
answers follow a simulated machine's power state.
"""

from __future__ import annotations

from typing import Any

import pytest
from attrs import evolve
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from roller.config import load_settings
from roller.drivers.liveness import LivenessResult
from roller.drivers.registry import Drivers
from roller.drivers.ssh import CommandResult, SshAuthFailed, SshConnectionLost
from roller.errors import ValidationError
from roller.inventory import Machine
from roller.jobs import Job
from roller.secrets import Credential, Secrets
from roller.tasks import TaskContext, TaskFailed
from roller.tasks import reboot, ssh_reboot


class Host:
    """A machine whose liveness and SSH answers follow its power state."""

    def __init__(self, clock: Clock, *, down_after: float | None = 2.0, up_after: float | None = 30.0,
                 answers: dict[str, Any] | None = None):
        self.clock = clock
        self.alive = True
        self.down_after = down_after
        self.up_after = up_after
        self.answers = answers or {}
        self.commands: list[str] = []
        self.checks: list[float] = []  # when liveness was checked

    def run(self, target, command, on_line=None) -> Deferred:
        self.commands.append(command)
        answer = self.answers.get(command, CommandResult(0, "", "", None))
        if isinstance(answer, SshConnectionLost):
            self._reboot()
        if isinstance(answer, Exception):
            return fail(answer)
        if answer.exit_status == 0:
            self._reboot()
        return succeed(answer)

    def _reboot(self) -> None:
        if self.down_after is None:
            return

        def down():
            self.alive = False
            if self.up_after is not None:
                self.clock.callLater(self.up_after, setattr, self, "alive", True)

        self.clock.callLater(self.down_after, down)

    def check(self, address: str) -> Deferred:
        self.checks.append(self.clock.seconds())
        return succeed(LivenessResult(alive=self.alive, detail="", lines=()))


def context(clock: Clock, host: Host, machine: Machine | None = None, worker_id: str = "w1", **settings: Any):
    s = load_settings(None, {}, {})
    s = evolve(s, reboot_down_timeout=60.0, reboot_up_timeout=300.0, reboot_poll_interval=1.0,
               ssh_credential="key", **settings)
    machine = machine or Machine.from_json({"worker_id": worker_id, "worker_group": "g", "ip": "127.0.0.9",
                                            "ssh": {"user": "u", "port": 2222}})
    events: list[tuple[str, dict]] = []
    secrets = Secrets({"key": Credential(name="key", kind="ssh-key", path="/dev/null")})
    drivers = Drivers(shell=host, liveness=lambda m: host)
    job = Job(id="j", task_name="reboot", worker_id=machine.worker_id, worker_group=machine.worker_group,
              created_at=0.0)
    ctx = TaskContext(job=job, machine=machine, reactor=clock, log=lambda m, **d: events.append((m, d)),
                      settings=s, secrets=secrets, drivers=drivers)
    return ctx, events


def start(ctx, params=None) -> Deferred:
    return Deferred.fromCoroutine(reboot.run(ctx, params or {}))


def outcome(d: Deferred) -> Any:
    out: list = []
    d.addBoth(out.append)
    assert out, "not finished"
    return out[0]


def test_ssh_reboot_verified_down_and_up():
    clock = Clock()
    host = Host(clock)
    ctx, events = context(clock, host, reboot_methods=("ssh_reboot",))
    d = start(ctx)
    assert host.commands == ["reboot"]
    clock.pump([1.0] * 40)
    result = outcome(d)
    assert result == "ssh_reboot: ssh reboot sent (`reboot` accepted). Completed in 32 seconds"
    messages = [m for m, _ in events]
    assert any(m.startswith("ssh_reboot: ssh reboot sent") and "waiting for down" in m for m in messages)
    assert "down after 2 s; waiting for up (up to 300 s)" in messages
    assert "up after 30 s" in messages
    assert events[-1][1] == {"method": "ssh_reboot", "outcome": "succeeded"}


def test_dropped_connection_counts_as_initiated():
    clock = Clock()
    host = Host(clock, answers={"reboot": SshConnectionLost("dropped", command_sent=True, confirmed=True)})
    ctx, _ = context(clock, host, reboot_methods=("ssh_reboot",))
    d = start(ctx)
    clock.pump([1.0] * 40)
    assert "connection dropped" in outcome(d)


def test_refused_commands_fall_through_to_next_command():
    clock = Clock()
    host = Host(clock, answers={"reboot": CommandResult(1, "", "reboot: must be superuser", None)})
    ctx, _ = context(clock, host, reboot_methods=("ssh_reboot",))
    d = start(ctx)
    assert host.commands == ["reboot", "sudo reboot"]
    clock.pump([1.0] * 40)
    assert "`sudo reboot` accepted" in outcome(d)


def test_unimplemented_and_inapplicable_methods_are_skipped_with_reasons():
    clock = Clock()
    host = Host(clock)
    machine = Machine.from_json({"worker_id": "w1", "worker_group": "g", "ip": "127.0.0.9"})
    ctx, events = context(clock, host, machine, reboot_methods=("ssh_reboot", "ipmi_reset", "file_bugzilla_bug"))
    failure = outcome(start(ctx))
    assert failure.check(TaskFailed)
    assert str(failure.value) == ("failed: ssh_reboot skipped: the machine has no ssh settings; "
                                  "ipmi_reset skipped: the machine has no ipmi settings; "
                                  "file_bugzilla_bug skipped: bugzilla.url is not configured")


def test_host_never_goes_down_then_next_method():
    clock = Clock()
    host = Host(clock, down_after=None)
    ctx, events = context(clock, host, reboot_methods=("ssh_reboot", "snmp_reboot"))
    d = start(ctx)
    clock.pump([1.0] * 70)
    failure = outcome(d)
    assert "host did not go down within 60 s" in str(failure.value)
    assert "snmp_reboot skipped" in str(failure.value)


def test_host_down_but_never_up():
    clock = Clock()
    host = Host(clock, up_after=None)
    ctx, _ = context(clock, host, reboot_methods=("ssh_reboot",))
    d = start(ctx)
    clock.pump([1.0] * 400)
    assert "down after 2 s but not up again within 300 s" in str(outcome(d).value)


def test_ssh_failure_is_recorded_and_escalates():
    clock = Clock()
    host = Host(clock, answers={"reboot": SshAuthFailed("the key was refused")})
    ctx, _ = context(clock, host, reboot_methods=("ssh_reboot", "ipmi_cycle"))
    failure = outcome(start(ctx))
    assert str(failure.value).startswith("failed: ssh_reboot failed: the key was refused; ipmi_cycle skipped")


def test_cancel_while_waiting_for_up():
    clock = Clock()
    host = Host(clock)
    ctx, events = context(clock, host, reboot_methods=("ssh_reboot",))
    d = start(ctx)
    clock.pump([1.0] * 10)
    assert any(m.startswith("down after") for m, _ in events)
    d.cancel()
    from twisted.internet.defer import CancelledError

    assert outcome(d).check(CancelledError)
    # the poll timer is gone: only the simulated host's own "power back on" remains
    assert [c.func for c in clock.getDelayedCalls()] == [setattr]


def test_methods_parameter_is_validated():
    spec = reboot.TASK
    assert spec.parse_params({"methods": "ssh_reboot, ipmi_reset"}) == {"methods": "ssh_reboot,ipmi_reset"}
    with pytest.raises(ValidationError):
        spec.parse_params({"methods": "ssh_reboot,format_disk"})


def test_methods_parameter_takes_a_list_like_reboot_methods():
    spec = reboot.TASK
    assert spec.parse_params({"methods": ["ssh_reboot", "ipmi_reset"]}) == {"methods": "ssh_reboot,ipmi_reset"}
    for bad in ([], ["ssh_reboot", 3], ["format_disk"], ["ssh_reboot,ipmi_reset"], [["ssh_reboot"]]):
        with pytest.raises(ValidationError) as e:
            spec.parse_params({"methods": bad})
        assert e.value.field == "params.methods"
    schema = spec.to_json()["params"]["methods"]
    assert schema["type"] == ["string", "array"] and schema["items"]["type"] == "string"


def test_ssh_reboot_task_alone_does_not_wait():
    clock = Clock()
    host = Host(clock)
    ctx, _ = context(clock, host)
    result = outcome(Deferred.fromCoroutine(ssh_reboot.run(ctx, {})))
    assert result == "ssh reboot sent (`reboot` accepted)"


def test_ssh_fails_then_next_method_is_verified(monkeypatch):
    clock = Clock()
    host = Host(clock, answers={cmd: CommandResult(1, "", "permission denied", None)
                                for cmd in ssh_reboot.COMMANDS})
    calls = []

    async def power_cycle(ctx):
        calls.append(ctx.machine.worker_id)
        host._reboot()
        return "chassis power cycle sent"

    monkeypatch.setitem(reboot.METHODS, "ipmi_cycle",
                        reboot.Method("ipmi_cycle", lambda machine: None, power_cycle))
    ctx, events = context(clock, host, reboot_methods=("ssh_reboot", "ipmi_cycle"))
    d = start(ctx)
    assert host.commands == list(ssh_reboot.COMMANDS)
    clock.pump([1.0] * 40)
    assert outcome(d) == "ipmi_cycle: chassis power cycle sent. Completed in 32 seconds"
    assert calls == ["w1"]
    outcomes = [(d["method"], d["outcome"]) for _, d in events if "outcome" in d]
    assert outcomes == [("ssh_reboot", "failed"), ("ipmi_cycle", "succeeded")]


def test_first_down_look_is_one_interval_after_the_reboot_was_sent():
    """The host was up a moment ago: no check right after the command, the next one a poll interval later."""
    clock = Clock()
    host = Host(clock, down_after=2.0, up_after=5.0)
    ctx, _ = context(clock, host, reboot_methods=("ssh_reboot",))
    d = start(ctx)
    assert host.checks == []  # no look before it either: the host ran the command, so it was up
    clock.pump([1.0] * 10)
    assert outcome(d).startswith("ssh_reboot: ssh reboot sent")
    assert host.checks == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_a_power_method_looks_first_and_a_host_already_down_only_has_to_come_up(monkeypatch):
    clock = Clock()
    host = Host(clock, down_after=0.0, up_after=6.0)
    host.alive = False  # dead before anything was sent

    async def power_on(ctx):
        clock.callLater(6.0, setattr, host, "alive", True)
        return "chassis power on sent"

    monkeypatch.setitem(reboot.METHODS, "ipmi_cycle", reboot.Method("ipmi_cycle", lambda machine: None, power_on))
    ctx, events = context(clock, host, reboot_methods=("ipmi_cycle",))
    d = start(ctx)
    assert host.checks == [0.0, 0.0]  # the look before (was it down already?), then for up at once
    clock.pump([1.0] * 10)
    assert outcome(d) == "ipmi_cycle: chassis power on sent. Completed in 6 seconds"
    messages = [m for m, _ in events]
    assert "ipmi_cycle: starting (the host is down now)" in messages
    assert "ipmi_cycle succeeded: up after 6 s (it was down before)" in messages
    assert not any("waiting for down" in m for m in messages)


def reboot_once(clock: Clock, worker_id: str, up_after: float, machine: Machine | None = None):
    host = Host(clock, down_after=2.0, up_after=up_after)
    ctx, events = context(clock, host, machine, worker_id=worker_id, reboot_methods=("ssh_reboot",))
    d = start(ctx)
    clock.pump([1.0] * 80)
    assert outcome(d).startswith("ssh_reboot: ssh reboot sent"), outcome(d)
    return host, [m for m, _ in events]


def test_machines_of_a_kind_are_not_polled_while_they_cannot_be_back_yet():
    """
    After three verified reboots of a kind (pool, task, method), a machine
    just seen down is first looked at after half the shortest recent time
    down, then polled as usual: seen up as soon as before, with fewer checks.
    """
    clock = Clock()
    for i, up_after in enumerate((30.0, 20.0, 40.0)):
        host, messages = reboot_once(clock, f"w{i}", up_after)
        ups = [t for t in host.checks if t >= host.checks[1]]  # from the look that saw it down
        assert len(ups) == up_after + 1  # polled every second
        assert f"up after {up_after:.0f} s" in messages
    host, messages = reboot_once(clock, "w3", 30.0)
    assert "down after 2 s; waiting for up (up to 300 s; first look after 10 s: machines like it took 20 s or more " \
           "lately)" in messages
    assert "up after 30 s" in messages  # as soon as before
    seen_down = host.checks[1]
    looks = [t - seen_down for t in host.checks[2:]]
    assert looks == [float(s) for s in range(10, 31)]  # 21 looks instead of 31


def test_a_fast_machine_of_a_slow_kind_is_seen_up_at_the_first_look():
    clock = Clock()
    for i in range(3):
        reboot_once(clock, f"w{i}", 40.0)
    _, messages = reboot_once(clock, "fast", 5.0)
    assert "up after 20 s" in messages  # the first look, half of 40 s after it was seen down


def test_other_kinds_still_polled_every_interval():
    clock = Clock()
    for i in range(3):
        reboot_once(clock, f"w{i}", 30.0)
    pooled = Machine.from_json({"worker_id": "p1", "worker_group": "g", "ip": "127.0.0.9", "pool": "other",
                                "ssh": {"user": "u", "port": 2222}})
    host, messages = reboot_once(clock, "p1", 30.0, machine=pooled)
    assert len([t for t in host.checks if t >= host.checks[1]]) == 31
    assert not any("first look" in m for m in messages)
    # a fresh clock (another process) has learnt nothing
    host, messages = reboot_once(Clock(), "w9", 30.0)
    assert not any("first look" in m for m in messages)


def test_down_times_remember_the_last_few_per_kind():
    from roller.tasks.down_times import KEEP, MIN_SEEN, DownTimes, down_times

    times = DownTimes()
    for _ in range(MIN_SEEN - 1):
        times.note("a", 10.0)
    assert times.quiet("a") == 0.0  # not enough seen yet
    times.note("a", 12.0)
    assert times.quiet("a") == 5.0
    assert times.quiet("b") == 0.0
    for _ in range(KEEP):
        times.note("a", 40.0)
    assert times.quiet("a") == 20.0  # the old short ones are forgotten
    clock = Clock()
    assert down_times(clock) is down_times(clock)
    assert down_times(clock) is not down_times(Clock())
