"""
The IPMI driver and tasks on a L{MemoryReactorClock} with a fake
C{IReactorProcess}: the exact argument list, the password only in the
environment, classification of ipmitool's messages, retries with back-off,
the per-BMC line and minimum interval, cancellation and deadlines killing
the child, power read-back.  No real process, no real sleep.

The same code against a real C{ipmi_sim} and C{ipmitool} is in
C{test_ipmi_integration.py}.
"""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from roller.drivers.ipmi import (
    CHILD_ENV,
    IIpmi,
    IpmiAuthFailed,
    IpmiCommandFailed,
    IpmiConfigError,
    IpmiStateMismatch,
    IpmiTarget,
    IpmiTimeout,
    IpmiTool,
    IpmiUnreachable,
    classify,
    ipmi_target,
    ipmitool_from_settings,
    sel_lines,
)
from roller.drivers.power import IPowerDriver, PowerError, PowerResult, PowerTimeout
from roller.inventory import Machine
from roller.jobs import Job
from roller.secrets import Credential, Secrets
from roller.tasks import TaskContext, TaskFailed
from roller.tasks import ipmi as ipmi_tasks
from roller.testing.syncdb import result_of

PASSWORD = "Sup3r-s3cret!"

WRONG_PASSWORD = """Loading IANA PEN Registry...
> RAKP 2 HMAC is invalid
Error: Unable to establish IPMI v2 / RMCP+ session
"""
WRONG_USER = """Loading IANA PEN Registry...
RAKP 2 message indicates an error : unauthorized name
Error: Unable to establish IPMI v2 / RMCP+ session
"""
NO_ANSWER = """Loading IANA PEN Registry...
Get Auth Capabilities error
Error issuing Get Channel Authentication Capabilities request
Error: Unable to establish IPMI v2 / RMCP+ session
"""
INSUFFICIENT = """Error in open session response message : insufficient resources for session
Error: Unable to establish IPMI v2 / RMCP+ session
"""
BUSY = "Set Chassis Power Control to Cycle failed: Node busy\n"
LAN_WRONG_PASSWORD = """Activate Session command failed
Error: Unable to establish LAN session
Error: Unable to establish IPMI v1.5 / RMCP session
"""
NO_CIPHER = """RAKP 2 ... 
Error in open session response message : no cipher suite match with proposed security algorithms
Error: Unable to establish IPMI v2 / RMCP+ session
"""


# ------------------------------------------------------------ fakes


class FakeChild:
    """What L{FakeProcessReactor.spawnProcess} returns; the test plays ipmitool."""

    def __init__(self, protocol: Any, executable: str, args: list[str], env: Any, path: Any):
        self.protocol = protocol
        self.executable = executable
        self.args = list(args)
        self.env = dict(env) if env is not None else None
        self.path = path
        self.pid = 4242
        self.signals: list[str] = []
        self.stdin_closed = False
        self.exited = False

    @property
    def command(self) -> list[str]:
        """The ipmitool command after the options (from the first word that is not an option or value)."""
        i = self.args.index("-v") + 1
        return self.args[i:]

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signal: str) -> None:
        if self.exited:
            raise error.ProcessExitedAlready()
        self.signals.append(signal)

    def finish(self, code: int = 0, stdout: str = "", stderr: str = "") -> None:
        if stdout:
            self.protocol.childDataReceived(1, stdout.encode())
        if stderr:
            self.protocol.childDataReceived(2, stderr.encode())
        self.exited = True
        if code == 0:
            self.protocol.processEnded(Failure(error.ProcessDone(0)))
        else:
            self.protocol.processEnded(Failure(error.ProcessTerminated(exitCode=code)))

    def killed(self, signal: int = 9) -> None:
        self.exited = True
        self.protocol.processEnded(Failure(error.ProcessTerminated(signal=signal)))


@implementer(IReactorProcess)
class FakeProcessReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.children: list[FakeChild] = []

    def spawnProcess(self, processProtocol: Any, executable: str, args: Any = (), env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: bool = False,
                     childFDs: Any = None) -> FakeChild:
        child = FakeChild(processProtocol, executable, args, env, path)
        self.children.append(child)
        processProtocol.makeConnection(child)
        return child


def failure(d: Deferred, *types: type) -> Any:
    out: list = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    assert isinstance(out[0], Failure), f"expected a failure, got {out[0]!r}"
    assert out[0].check(*types), f"expected {types}, got {out[0]!r}"
    return out[0].value


def pending(d: Deferred) -> bool:
    out: list = []
    d.addBoth(lambda r: out.append(r) or r)
    return not out


@pytest.fixture
def fake_ipmitool(tmp_path: Path) -> str:
    path = tmp_path / "ipmitool"
    path.write_text("#!/bin/sh\nexit 99\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def reactor() -> FakeProcessReactor:
    return FakeProcessReactor()


def make_tool(reactor: Any, ipmitool: str, **kw: Any) -> IpmiTool:
    defaults: dict[str, Any] = dict(ipmitool=ipmitool, timeout=10.0, retries=2, retry_delay=2.0,
                                    min_interval=5.0, power_wait=30.0, power_poll=1.0)
    defaults.update(kw)
    return IpmiTool(reactor, **defaults)


def target(**kw: Any) -> IpmiTarget:
    values: dict[str, Any] = dict(host="10.0.0.1", port=623, username="admin", password=PASSWORD,
                                  credential="ipmi-admin")
    values.update(kw)
    return IpmiTarget(**values)


class Events(list):
    def __call__(self, message: str, **data: Any) -> None:
        self.append((message, data))

    def messages(self) -> list[str]:
        return [m for m, _ in self]


def no_password(*texts: Any) -> None:
    for text in texts:
        assert PASSWORD not in str(text), text


# ------------------------------------------------------------ argv and environment


def test_argv_exactly_and_password_only_in_env(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool)
    d = tool.status(target())
    [child] = reactor.children
    assert child.executable == fake_ipmitool
    assert child.args == [fake_ipmitool, "-I", "lanplus", "-H", "10.0.0.1", "-p", "623", "-U", "admin",
                          "-E", "-C", "3", "-N", "1", "-R", "2", "-v", "chassis", "power", "status"]
    assert child.env == {**CHILD_ENV, "IPMI_PASSWORD": PASSWORD}
    assert child.path == "/"
    assert child.stdin_closed
    no_password(*child.args)
    child.finish(0, "Chassis Power is on\n")
    assert result_of(d) == "on"


def test_argv_lan_bridge_and_options_off(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, cipher_suite=None, request_timeout=None,
                     request_retries=None, verbose=False)
    bridge = ("-B", "0", "-b", "7", "-T", "0x86", "-t", "0x72")
    assert tool.argv(target(bridge=bridge), ["chassis", "power", "on"]) == [
        fake_ipmitool, "-I", "lanplus", "-H", "10.0.0.1", "-p", "623", "-U", "admin", "-E",
        *bridge, "chassis", "power", "on"]
    lan = make_tool(reactor, fake_ipmitool, cipher_suite=17, request_timeout=3, request_retries=1)
    # -C is a lanplus option; IPMI 1.5 has no cipher suites.
    assert lan.argv(target(interface="lan", port=6230), ["sel", "list", "last", "15"]) == [
        fake_ipmitool, "-I", "lan", "-H", "10.0.0.1", "-p", "6230", "-U", "admin", "-E",
        "-N", "3", "-R", "1", "-v", "sel", "list", "last", "15"]
    assert lan.argv(target(), ["chassis", "power", "status"])[10:12] == ["-C", "17"]


def test_bridged_moonshot_command(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool)
    bridge = ("-B", "0", "-b", "7", "-T", "0x82", "-t", "0x72")
    tool.power(target(bridge=bridge), "cycle")
    [child] = reactor.children
    assert child.args[-11:] == [*bridge, "chassis", "power", "cycle"]


def test_ipmitool_looked_up_in_child_path(reactor):
    tool = IpmiTool(reactor, ipmitool="sh")
    assert tool._executable() in ("/usr/bin/sh", "/bin/sh")
    assert tool.argv(target(), ["chassis", "power", "status"])[0] == "sh"


def test_missing_ipmitool_is_a_config_error(reactor, tmp_path):
    tool = make_tool(reactor, str(tmp_path / "nope"))
    e = failure(tool.status(target()), IpmiConfigError)
    assert "apt-get install -y ipmitool" in str(e)
    assert reactor.children == []


def test_spawn_error_is_reported(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool)

    def boom(*a: Any, **kw: Any) -> None:
        raise OSError(24, "Too many open files")

    reactor.spawnProcess = boom
    e = failure(tool.status(target()), IpmiConfigError)
    assert "Too many open files" in str(e)


def test_rejects_option_injection_in_commands(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool)
    failure(tool.run(target(), ["-o", "x"]), ValueError)
    failure(tool.run(target(), []), ValueError)
    failure(tool.power(target(), "explode"), ValueError)
    failure(tool.set_boot_device(target(), "usb;reboot"), ValueError)
    failure(tool.sel_list(target(), 0), ValueError)
    failure(tool.run("10.0.0.1", ["chassis"]), TypeError)
    assert reactor.children == []


def test_provides_interface(reactor, fake_ipmitool):
    assert verifyObject(IIpmi, make_tool(reactor, fake_ipmitool))


def test_constructor_validation(reactor):
    for kw in (dict(timeout=0), dict(retries=-1), dict(cipher_suite="3"), dict(min_interval=-1),
               dict(request_timeout=0), dict(request_retries=0), dict(power_poll=0), dict(ipmitool="")):
        with pytest.raises(ValueError):
            IpmiTool(reactor, **kw)


# ------------------------------------------------------------ target


def test_target_validation_never_shows_the_password():
    with pytest.raises(IpmiConfigError):
        target(host="-oProxyCommand=x")
    with pytest.raises(IpmiConfigError):
        target(host="10.0.0.1; reboot")
    with pytest.raises(IpmiConfigError):
        target(username="-P")
    with pytest.raises(IpmiConfigError):
        target(username="a" * 17)
    with pytest.raises(IpmiConfigError):
        target(interface="serial")
    with pytest.raises(IpmiConfigError):
        target(bridge=("-P", "x"))
    long = "L0ng-" + "x" * 20
    with pytest.raises(IpmiConfigError) as e:
        target(password=long)
    assert "longer than 20 bytes" in str(e.value) and long not in str(e.value)
    with pytest.raises(IpmiConfigError) as e:
        target(password="x" * 17, interface="lan")
    assert "longer than 16 bytes" in str(e.value)
    t = target()
    no_password(repr(t), str(t))
    assert t.address == "10.0.0.1:623" and t.bmc == "BMC 10.0.0.1:623"
    assert target(host="::1").address == "[::1]:623"
    assert "bridged -B 0" in target(bridge=("-B", "0", "-b", "7")).bmc


def machine(**ipmi: Any) -> Machine:
    data: dict[str, Any] = {"worker_id": "ms-1", "worker_group": "mdc1", "ip": "10.49.58.3"}
    if ipmi:
        data["ipmi"] = ipmi
    return Machine.from_json(data)


SECRETS = Secrets({
    "ipmi-admin": Credential(name="ipmi-admin", kind="password", username="admin", password=PASSWORD),
    "ssh": Credential(name="ssh", kind="ssh-key", path="/dev/null"),
})


def test_ipmi_target_from_machine_and_secrets():
    m = machine(host="10.49.16.17", credential="ipmi-admin", bridge=["-B", "0", "-b", "7", "-T", "0x86", "-t", "0x72"])
    t = ipmi_target(m, SECRETS)
    assert (t.host, t.port, t.username, t.password, t.interface, t.credential) == (
        "10.49.16.17", 623, "admin", PASSWORD, "lanplus", "ipmi-admin")
    assert t.bridge == ("-B", "0", "-b", "7", "-T", "0x86", "-t", "0x72")
    assert ipmi_target(machine(host="10.49.16.17"), SECRETS, "ipmi-admin").credential == "ipmi-admin"
    assert t.slot == ipmi_target(machine(host="10.49.16.17"), SECRETS, "ipmi-admin").slot


@pytest.mark.parametrize("m,secrets,default,expected", [
    (machine(), SECRETS, None, "has no ipmi settings"),
    (machine(host="10.0.0.1"), SECRETS, None, "no IPMI credential"),
    (machine(host="10.0.0.1", credential="nope"), SECRETS, None, "unknown credential 'nope'"),
    (machine(host="10.0.0.1", credential="ssh"), SECRETS, None, "of type ssh-key, not password"),
    (machine(host="10.0.0.1", credential="ipmi-admin"), None, None, "no secrets file"),
])
def test_ipmi_target_errors(m, secrets, default, expected):
    with pytest.raises(IpmiConfigError) as e:
        ipmi_target(m, secrets, default)
    assert expected in str(e.value)
    no_password(e.value)


# ------------------------------------------------------------ classification


@pytest.mark.parametrize("stderr,kind,transient,maybe_sent,words", [
    (WRONG_PASSWORD, IpmiAuthFailed, False, False, "wrong password"),
    (WRONG_USER, IpmiAuthFailed, False, False, "unknown user name"),
    (LAN_WRONG_PASSWORD, IpmiAuthFailed, False, False, "wrong password"),
    (NO_ANSWER, IpmiUnreachable, True, False, "is not answering"),
    (INSUFFICIENT, IpmiCommandFailed, True, False, "insufficient resources for session"),
    (BUSY, IpmiCommandFailed, True, False, "is busy"),
    (NO_CIPHER, IpmiCommandFailed, False, False, "cipher suite"),
    ("Set Chassis Power Control to Cycle failed: Timeout\n", IpmiCommandFailed, True, True, "timed out"),
    ("Set Chassis Power Control to Cycle failed: Command not supported in present state\n",
     IpmiCommandFailed, False, True, "Command not supported in present state"),
])
def test_classify(stderr, kind, transient, maybe_sent, words):
    e = classify(target(), ("chassis", "power", "cycle"), 1, "", stderr)
    assert type(e) is kind
    assert (e.transient, e.maybe_sent) == (transient, maybe_sent)
    assert words in str(e)
    assert "Loading IANA" not in str(e)
    assert (e.host, e.port, e.exit_code) == ("10.0.0.1", 623, 1)


def test_auth_failure_message():
    e = classify(target(), ("chassis", "power", "status"), 1, "", WRONG_PASSWORD)
    assert str(e).startswith("authentication failed for user admin at BMC 10.0.0.1:623 "
                             "(credential 'ipmi-admin'): wrong password")


# ------------------------------------------------------------ retries


def test_transient_then_success_is_retried_with_back_off(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=0.0)
    events = Events()
    d = tool.run(target(), ("chassis", "power", "status"), events)
    reactor.children[0].finish(1, stderr=INSUFFICIENT)
    assert len(reactor.children) == 1 and pending(d)
    assert events.messages() == [
        "ipmi chassis power status: BMC 10.0.0.1:623 is busy: Error in open session response message : "
        "insufficient resources for session; Error: Unable to establish IPMI v2 / RMCP+ session; "
        "retrying in 2 s (attempt 2 of 3)"]
    assert events[0][1]["attempt"] == 2 and events[0][1]["bmc"] == "10.0.0.1:623"
    reactor.advance(1.9)
    assert len(reactor.children) == 1
    reactor.advance(0.1)
    assert len(reactor.children) == 2
    reactor.children[1].finish(0, "Chassis Power is on\n")
    r = result_of(d)
    assert r.attempts == 2 and r.stdout == "Chassis Power is on\n"


def test_back_off_doubles_then_gives_up(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=0.0, retries=3, retry_delay=2.0, retry_max_delay=5.0)
    events = Events()
    d = tool.status(target(), events)
    spawned_at = []
    for _ in range(4):
        spawned_at.append(reactor.seconds())
        reactor.children[-1].finish(1, stderr=BUSY)
        reactor.advance(reactor.getDelayedCalls()[0].getTime() - reactor.seconds() if reactor.getDelayedCalls() else 0)
    assert [b - a for a, b in zip(spawned_at, spawned_at[1:])] == [2.0, 4.0, 5.0]
    e = failure(d, IpmiCommandFailed)
    assert str(e).endswith("(gave up after 4 attempts)") and e.attempts == 4
    assert len(events) == 3
    assert reactor.getDelayedCalls() == []


def test_auth_failure_is_not_retried(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool)
    d = tool.status(target())
    reactor.children[0].finish(1, stderr=WRONG_PASSWORD)
    e = failure(d, IpmiAuthFailed)
    assert "authentication failed for user admin at BMC 10.0.0.1:623" in str(e)
    assert len(reactor.children) == 1
    no_password(e, e.detail)


def test_unanswered_session_is_retried_even_for_cycle(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=0.0, retries=1)
    d = tool.power(target(), "cycle", verify=False)
    reactor.children[0].finish(1, stderr=NO_ANSWER)
    reactor.advance(2)
    reactor.children[1].finish(0, "Chassis Power Control: Cycle\n")
    assert result_of(d) == "BMC 10.0.0.1:623: Chassis Power Control: Cycle"


def test_unanswered_gives_up_with_readable_error(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, retries=0)
    d = tool.status(target())
    reactor.children[0].finish(1, stderr=NO_ANSWER)
    e = failure(d, IpmiUnreachable)
    assert str(e) == ("BMC 10.0.0.1:623 is not answering (ipmitool: Get Auth Capabilities error; Error issuing "
                      "Get Channel Authentication Capabilities request; Error: Unable to establish IPMI v2 / "
                      "RMCP+ session)")


def test_password_echoed_by_a_bmc_is_scrubbed(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, retries=0)
    d = tool.status(target())
    reactor.children[0].finish(1, stderr=f"Error: weird BMC says password {PASSWORD}\n")
    e = failure(d, IpmiCommandFailed)
    assert "password ***" in str(e)
    no_password(e, e.detail, e.args)


# ------------------------------------------------------------ deadlines and cancellation


def test_timeout_kills_child_and_retries_idempotent(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, timeout=10.0, retries=1, min_interval=0.0)
    events = Events()
    d = tool.status(target(), events)
    child = reactor.children[0]
    child.protocol.childDataReceived(2, b"Loading IANA PEN Registry...\n")
    reactor.advance(9.9)
    assert child.signals == []
    reactor.advance(0.1)
    assert child.signals == ["KILL"]
    child.killed(9)  # the reaping: ignored
    assert "did not complete `chassis power status` within 10 s; roller killed ipmitool" in events.messages()[0]
    reactor.advance(2.0)
    assert len(reactor.children) == 2
    reactor.advance(10.0)
    e = failure(d, IpmiTimeout)
    assert str(e).startswith("BMC 10.0.0.1:623 did not complete `chassis power status` within 10 s")
    assert str(e).endswith("(gave up after 2 attempts)")


def test_timeout_of_cycle_is_not_repeated(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, timeout=5.0, retries=3)
    d = tool.power(target(), "cycle")
    reactor.advance(5.0)
    assert reactor.children[0].signals == ["KILL"]
    e = failure(d, IpmiTimeout)
    assert "did not complete `chassis power cycle` within 5 s" in str(e)
    assert len(reactor.children) == 1


def test_busy_cycle_is_repeated(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, retries=1, min_interval=0.0)
    d = tool.power(target(), "cycle", verify=False)
    reactor.children[0].finish(1, stderr=BUSY)
    reactor.advance(2.0)
    reactor.children[1].finish(0, "Chassis Power Control: Cycle\n")
    assert "Cycle" in result_of(d)


def test_cancel_kills_child_and_frees_the_bmc(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=5.0)
    t = target()
    first = tool.status(t)
    second = tool.status(t)
    assert len(reactor.children) == 1
    reactor.advance(1.0)
    first.cancel()
    failure(first, CancelledError)
    assert reactor.children[0].signals == ["KILL"]
    reactor.children[0].killed(9)
    # The BMC is free again; the next command still keeps the interval.
    reactor.advance(4.9)
    assert len(reactor.children) == 1
    reactor.advance(0.1)
    assert len(reactor.children) == 2
    reactor.children[1].finish(0, "Chassis Power is off\n")
    assert result_of(second) == "off"
    assert not tool.busy(t)


def test_cancel_after_child_exited_already(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool)
    d = tool.status(target())
    reactor.children[0].exited = True
    d.cancel()
    failure(d, CancelledError)
    assert reactor.children[0].signals == []


def test_cancel_while_waiting_in_line_never_spawns(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=5.0)
    t = target()
    first = tool.status(t)
    waiting = tool.status(t)
    third = tool.status(t)
    waiting.cancel()
    failure(waiting, CancelledError)
    reactor.children[0].finish(0, "Chassis Power is on\n")
    assert result_of(first) == "on"
    reactor.advance(5.0)
    assert len(reactor.children) == 2  # the third, not the cancelled second
    reactor.children[1].finish(0, "Chassis Power is on\n")
    assert result_of(third) == "on"


def test_cancel_during_interval_wait(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=5.0)
    t = target()
    tool.status(t)
    reactor.children[0].finish(0, "Chassis Power is on\n")
    d = tool.status(t)
    reactor.advance(2.0)
    d.cancel()
    failure(d, CancelledError)
    assert reactor.getDelayedCalls() == []
    # The cancelled wait does not push the interval further: 5 s after the first command ended.
    d2 = tool.status(t)
    reactor.advance(3.0)
    assert len(reactor.children) == 2
    reactor.children[1].finish(0, "Chassis Power is on\n")
    assert result_of(d2) == "on"


def test_cancel_during_back_off(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool)
    d = tool.status(target())
    reactor.children[0].finish(1, stderr=BUSY)
    d.cancel()
    failure(d, CancelledError)
    assert reactor.getDelayedCalls() == []


# ------------------------------------------------------------ the line per BMC


def test_min_interval_between_commands_to_one_bmc(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=5.0)
    t = target()
    a, b = tool.status(t), tool.status(t)
    other = tool.status(target(host="10.0.0.2"))
    assert len(reactor.children) == 2  # the other BMC runs at once
    assert reactor.children[1].args[4] == "10.0.0.2"
    reactor.advance(3.0)
    reactor.children[0].finish(0, "Chassis Power is on\n")
    assert result_of(a) == "on"
    reactor.advance(4.9)
    assert len(reactor.children) == 2
    reactor.advance(0.1)  # 5 s after the end of the first, not its start
    assert len(reactor.children) == 3
    reactor.children[2].finish(0, "Chassis Power is off\n")
    assert result_of(b) == "off"
    reactor.children[1].finish(0, "Chassis Power is on\n")
    assert result_of(other) == "on"


def test_bridged_targets_share_the_chassis_bmc(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool)
    c1 = target(bridge=("-B", "0", "-b", "7", "-T", "0x82", "-t", "0x72"))
    c3 = target(bridge=("-B", "0", "-b", "7", "-T", "0x86", "-t", "0x72"))
    tool.status(c1)
    tool.status(c3)
    assert len(reactor.children) == 1
    assert tool.busy(c3)


def test_retry_waits_for_interval_too(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=5.0, retry_delay=1.0)
    d = tool.status(target())
    reactor.children[0].finish(1, stderr=INSUFFICIENT)
    reactor.advance(1.0)  # back-off over, the interval not
    assert len(reactor.children) == 1
    reactor.advance(4.0)
    assert len(reactor.children) == 2
    reactor.children[1].finish(0, "Chassis Power is on\n")
    assert result_of(d) == "on"


# ------------------------------------------------------------ operations


def drive(reactor: FakeProcessReactor, answers: dict[str, list[tuple[int, str, str]]], steps: int = 200,
          step: float = 0.5) -> list[str]:
    """Answer every spawned child from C{answers} (by command; the last answer repeats) while time passes."""
    commands = []
    for _ in range(steps):
        while any(not c.exited for c in reactor.children):
            child = next(c for c in reactor.children if not c.exited)
            command = " ".join(child.command)
            commands.append(command)
            queue = answers[command]
            code, out, err = queue.pop(0) if len(queue) > 1 else queue[0]
            child.finish(code, out, err)
        if not reactor.getDelayedCalls():
            break
        reactor.advance(step)
    return commands


def test_power_on_reads_back(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=1.0, power_poll=1.0)
    events = Events()
    d = tool.on(target(), events)
    commands = drive(reactor, {
        "chassis power on": [(0, "Chassis Power Control: Up/On\n", "")],
        "chassis power status": [(0, "Chassis Power is off\n", ""), (0, "Chassis Power is on\n", "")],
    })
    assert commands == ["chassis power on", "chassis power status", "chassis power status"]
    assert result_of(d) == "BMC 10.0.0.1:623: Chassis Power Control: Up/On; power is on (read back after 2 s)"
    assert events.messages()[0] == "ipmi 10.0.0.1:623: chassis power on"
    assert events.messages()[-1] == "ipmi 10.0.0.1:623: chassis power is on"
    no_password(events)


def test_power_off_mismatch(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=1.0, power_poll=2.0, power_wait=10.0)
    d = tool.off(target())
    drive(reactor, {
        "chassis power off": [(0, "Chassis Power Control: Down/Off\n", "")],
        "chassis power status": [(0, "Chassis Power is on\n", "")],
    })
    e = failure(d, IpmiStateMismatch)
    assert str(e) == ("BMC 10.0.0.1:623 accepted `chassis power off` but the power still on after 10 s "
                      "(expected off)")
    assert (e.expected, e.actual) == ("off", "on")


def test_cycle_accepts_on_after_off(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=0.5, power_poll=0.5)
    d = tool.cycle(target())
    drive(reactor, {
        "chassis power cycle": [(0, "Chassis Power Control: Cycle\n", "")],
        "chassis power status": [(0, "Chassis Power is off\n", "")] * 3 + [(0, "Chassis Power is on\n", "")],
    })
    assert result_of(d).startswith("BMC 10.0.0.1:623: Chassis Power Control: Cycle; power is on")


def test_read_back_survives_a_silent_moment(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=0.5, retries=0)
    events = Events()
    d = tool.reset(target(), events)
    drive(reactor, {
        "chassis power reset": [(0, "Chassis Power Control: Reset\n", "")],
        "chassis power status": [(1, "", NO_ANSWER), (0, "Chassis Power is on\n", "")],
    })
    assert "power is on" in result_of(d)
    assert any("cannot read the power state yet" in m for m in events.messages())


def test_status_unexpected_answer(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool)
    d = tool.status(target())
    reactor.children[0].finish(0, "Chassis Power is confused\n")
    assert "unexpected answer to `chassis power status`" in str(failure(d, IpmiCommandFailed))


def test_killed_by_someone_else(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, retries=0)
    d = tool.status(target())
    reactor.children[0].killed(15)
    assert "killed by signal 15" in str(failure(d, IpmiCommandFailed))


def test_sel_list_and_bootdev(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=0.0)
    d = tool.sel_list(target())
    child = reactor.children[0]
    assert child.command == ["sel", "list", "last", "15"]
    child.finish(0, "   1 | Pre-Init | System Event | Asserted\n\n   2 | Pre-Init | Power Supply | Asserted\n")
    assert result_of(d) == ["   1 | Pre-Init | System Event | Asserted", "   2 | Pre-Init | Power Supply | Asserted"]
    d = tool.set_boot_device(target(), "pxe", efi=True)
    assert reactor.children[1].command == ["chassis", "bootdev", "pxe", "options=efiboot"]
    reactor.children[1].finish(0, "Set Boot Device to pxe\n")
    assert result_of(d) == "Set Boot Device to pxe"
    tool.set_boot_device(target(), "pxe")
    assert reactor.children[2].command == ["chassis", "bootdev", "pxe"]


VERBOSE_SEL = """SEL Record ID          : 0001
 Record Type           : 02
 Timestamp             : S+ 70/001 S+ 70/001
 Generator ID          : 0020
 EvM Revision          : 04
 Sensor Type           : System Event
 Sensor Number         : 01
 Event Type            : Sensor-specific Discrete
 Event Direction       : Assertion Event
 Event Data            : 02ffff
 Description           : Undetermined system hardware failure

SEL Record ID          : 00a2
 Record Type           : 02
 Timestamp             : 03/04/2024 10:11:12
 Sensor Type           : Power Supply
 Sensor Number         : 02
 Event Direction       : Deassertion Event
 Description           : Failure detected

SEL Record ID          : 00a3
 Record Type           : e0
 Manufacturer ID       : 00000b
 OEM Defined           : 0102030405 [Unknown]

"""


def test_sel_lines():
    assert sel_lines(VERBOSE_SEL) == [
        "1 | S+ 70/001 | System Event #0x01 | Undetermined system hardware failure | Asserted",
        "162 | 03/04/2024 10:11:12 | Power Supply #0x02 | Failure detected | Deasserted",
        "163 | Record Type: e0 | Manufacturer ID: 00000b | OEM Defined: 0102030405 [Unknown]",
    ]
    assert sel_lines("   1 | Pre-Init |0000003957| System Event #0x01 | Asserted\n\n") == [
        "   1 | Pre-Init |0000003957| System Event #0x01 | Asserted"]
    assert sel_lines("") == []


def test_from_settings(reactor):
    settings = SimpleNamespace(ipmi_ipmitool="/usr/bin/ipmitool", ipmi_cipher_suite=3, ipmi_timeout=20.0,
                               ipmi_request_timeout=1, ipmi_request_retries=2, ipmi_retries=3,
                               ipmi_retry_delay=5.0, ipmi_min_interval=5.0, ipmi_power_wait=60.0,
                               ipmi_power_poll=2.0, ipmi_credential="ipmi-admin")
    tool = ipmitool_from_settings(reactor, settings)
    assert (tool.ipmitool, tool.cipher_suite, tool.min_interval, tool.default_credential) == (
        "/usr/bin/ipmitool", 3, 5.0, "ipmi-admin")
    settings.ipmi_cipher_suite = -1
    settings.ipmi_credential = ""
    tool = ipmitool_from_settings(reactor, settings)
    assert tool.cipher_suite is None and tool.default_credential is None


def test_power_driver(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool, min_interval=0.5, power_poll=0.5)
    events = Events()
    power = tool.for_machine(machine(host="10.0.0.1", credential="ipmi-admin"), SECRETS, on_progress=events)
    assert verifyObject(IPowerDriver, power)
    assert power.description == "IPMI BMC 10.0.0.1:623 (user admin)"
    no_password(repr(power), power.description)
    d = power.status()
    drive(reactor, {"chassis power status": [(0, "Chassis Power is off\n", "")]})
    assert result_of(d) == PowerResult("off", "BMC 10.0.0.1:623: chassis power is off")
    d = power.cycle(3.0)
    commands = drive(reactor, {"chassis power off": [(0, "Chassis Power Control: Down/Off\n", "")],
                               "chassis power on": [(0, "Chassis Power Control: Up/On\n", "")],
                               "chassis power status": [(0, "Chassis Power is off\n", ""),
                                                        (0, "Chassis Power is on\n", "")]})
    assert commands == ["chassis power off", "chassis power status", "chassis power on", "chassis power status"]
    assert result_of(d) == PowerResult("on", "BMC 10.0.0.1:623: cycled (off, 3 s, on), read back on")
    d = power.reset()
    drive(reactor, {"chassis power reset": [(0, "Chassis Power Control: Reset\n", "")],
                    "chassis power status": [(0, "Chassis Power is on\n", "")]})
    assert result_of(d).state == "on"
    d = power.off()
    drive(reactor, {"chassis power off": [(1, "", WRONG_PASSWORD)]})
    e = failure(d, PowerError)
    assert (e.kind, e.sent) == ("auth", False)
    failure(power.cycle(-1), ValueError)
    with pytest.raises(PowerError) as err:
        tool.for_machine(machine(), SECRETS)
    assert err.value.kind == "config"


@pytest.mark.parametrize("error,kind,sent,timeout", [
    (IpmiConfigError("x"), "config", False, False),
    (IpmiAuthFailed("x"), "auth", False, False),
    (IpmiUnreachable("x"), "timeout", False, True),
    (IpmiTimeout("x"), "timeout", True, True),
    (IpmiCommandFailed("x"), "refused", True, False),
    (IpmiCommandFailed("x", maybe_sent=False), "refused", False, False),
    (IpmiStateMismatch("x", expected="on", actual="off"), "unreached", True, False),
])
def test_errors_are_power_errors(error, kind, sent, timeout):
    assert isinstance(error, PowerError)
    assert (error.kind, error.sent, error.maybe_sent) == (kind, sent, sent)
    assert isinstance(error, PowerTimeout) is timeout


# ------------------------------------------------------------ tasks


def task_context(reactor: Any, tool: IpmiTool, m: Machine | None = None):
    m = m or machine(host="10.0.0.1", credential="ipmi-admin")
    events = Events()
    job = Job(id="j", task_name="ipmi_status", worker_id=m.worker_id, worker_group=m.worker_group, created_at=0.0)
    ctx = TaskContext(job=job, machine=m, reactor=reactor, log=events, settings=None, secrets=SECRETS,
                      drivers=SimpleNamespace(ipmi=tool))
    return ctx, events


def spec(name: str):
    return {t.name: t for t in ipmi_tasks.TASKS}[name]


def test_task_names_and_endpoints():
    assert [t.name for t in ipmi_tasks.TASKS] == [
        "ipmi_on", "ipmi_off", "ipmi_cycle", "ipmi_reset", "ipmi_status", "ipmi_list", "ipmi_pxe"]
    m = machine(host="10.49.16.17", credential="ipmi-admin")
    for t in ipmi_tasks.TASKS:
        assert t.endpoints(m) == ("bmc:10.49.16.17",)
        assert t.endpoints(machine()) == ()
    assert spec("ipmi_list").parse_params({}) == {"last": 15}
    assert spec("ipmi_pxe").parse_params({"efi": True}) == {"efi": True}


def test_task_status(reactor, fake_ipmitool):
    ctx, events = task_context(reactor, make_tool(reactor, fake_ipmitool))
    d = Deferred.fromCoroutine(spec("ipmi_status").run(ctx, {}))
    reactor.children[0].finish(0, "Chassis Power is off\n")
    assert result_of(d) == "BMC 10.0.0.1:623: chassis power is off"
    assert events[-1] == ("chassis power is off", {"power": "off"})


def test_task_retry_is_a_job_event_and_errors_are_task_failed(reactor, fake_ipmitool):
    ctx, events = task_context(reactor, make_tool(reactor, fake_ipmitool, retries=1, min_interval=0))
    d = Deferred.fromCoroutine(spec("ipmi_off").run(ctx, {}))
    reactor.children[0].finish(1, stderr=INSUFFICIENT)
    assert "retrying in 2 s (attempt 2 of 2)" in events.messages()[-1]
    reactor.advance(2.0)
    reactor.children[1].finish(1, stderr=WRONG_PASSWORD)
    e = failure(d, TaskFailed)
    assert str(e).startswith("authentication failed for user admin at BMC 10.0.0.1:623")
    no_password(e, events)


def test_task_without_ipmi_or_credential(reactor, fake_ipmitool):
    tool = make_tool(reactor, fake_ipmitool)
    ctx, _ = task_context(reactor, tool, machine())
    assert "has no ipmi settings" in str(failure(Deferred.fromCoroutine(spec("ipmi_on").run(ctx, {})), TaskFailed))
    ctx, _ = task_context(reactor, tool, machine(host="10.0.0.1"))
    assert "no IPMI credential" in str(failure(Deferred.fromCoroutine(spec("ipmi_on").run(ctx, {})), TaskFailed))
    assert reactor.children == []


def test_task_list(reactor, fake_ipmitool):
    ctx, events = task_context(reactor, make_tool(reactor, fake_ipmitool))
    d = Deferred.fromCoroutine(spec("ipmi_list").run(ctx, {"last": 15}))
    reactor.children[0].finish(0, "   1 | Pre-Init | System Event #0x01 | Asserted\n", "SEL has no entries\n")
    assert result_of(d) == "BMC 10.0.0.1:623: 1 SEL entry:\n   1 | Pre-Init | System Event #0x01 | Asserted"
    d = Deferred.fromCoroutine(spec("ipmi_list").run(ctx, {"last": 15}))
    reactor.advance(5)
    reactor.children[1].finish(0, "", "SEL has no entries\n")
    assert result_of(d) == "BMC 10.0.0.1:623: the SEL has no entries"


def test_task_pxe(reactor, fake_ipmitool):
    ctx, _ = task_context(reactor, make_tool(reactor, fake_ipmitool))
    d = Deferred.fromCoroutine(spec("ipmi_pxe").run(ctx, {"efi": True}))
    assert reactor.children[0].command == ["chassis", "bootdev", "pxe", "options=efiboot"]
    reactor.children[0].finish(0, "Set Boot Device to pxe\n")
    assert result_of(d) == "BMC 10.0.0.1:623: Set Boot Device to pxe (EFI)"


def test_task_cancel_kills_ipmitool(reactor, fake_ipmitool):
    ctx, _ = task_context(reactor, make_tool(reactor, fake_ipmitool))
    d = Deferred.fromCoroutine(spec("ipmi_cycle").run(ctx, {}))
    d.cancel()
    failure(d, CancelledError)
    assert reactor.children[0].signals == ["KILL"]
    assert not ctx.drivers.ipmi.busy(ipmi_target(ctx.machine, SECRETS))


def test_reboot_methods(reactor, fake_ipmitool):
    assert ipmi_tasks.not_applicable(machine()) == "the machine has no ipmi settings"
    assert ipmi_tasks.not_applicable(machine(host="10.0.0.1")) is None
    tool = make_tool(reactor, fake_ipmitool, min_interval=0.0)
    # A machine that is on: reset sent, no read-back wait (the reboot task watches liveness).
    ctx, _ = task_context(reactor, tool)
    d = Deferred.fromCoroutine(ipmi_tasks.initiate_reset(ctx))
    commands = drive(reactor, {"chassis power status": [(0, "Chassis Power is on\n", "")],
                               "chassis power reset": [(0, "Chassis Power Control: Reset\n", "")]})
    assert commands == ["chassis power status", "chassis power reset"]
    assert result_of(d) == "ipmi power reset sent: BMC 10.0.0.1:623: Chassis Power Control: Reset"
    # A machine that is off: reset fails at once, cycle powers it on.
    d = Deferred.fromCoroutine(ipmi_tasks.initiate_reset(ctx))
    drive(reactor, {"chassis power status": [(0, "Chassis Power is off\n", "")]})
    assert "chassis power is off; a reset would not start it" in str(failure(d, TaskFailed))
    d = Deferred.fromCoroutine(ipmi_tasks.initiate_cycle(ctx))
    commands = drive(reactor, {"chassis power status": [(0, "Chassis Power is off\n", ""),
                                                        (0, "Chassis Power is on\n", "")],
                               "chassis power on": [(0, "Chassis Power Control: Up/On\n", "")]})
    assert commands == ["chassis power status", "chassis power on", "chassis power status"]
    assert result_of(d).startswith("ipmi power on (the machine was off): BMC 10.0.0.1:623: Chassis Power "
                                "Control: Up/On; power is on")
