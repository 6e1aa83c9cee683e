import io
import json

from twisted.logger import Logger, LogPublisher

from roller.logs import observer_for


def test_json_lines_carry_message_and_fields():
    out = io.StringIO()
    pub = LogPublisher(observer_for("json", out))
    log = Logger(namespace="roller.test", observer=pub)
    log.info("Job {job_id} queued for {worker}", job_id="j1", worker="w1")
    log.debug("hidden at the default level")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("Job {job_id} crashed", job_id="j2")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert first["message"] == "Job j1 queued for w1"
    assert (first["level"], first["namespace"], first["job_id"], first["worker"]) == ("info", "roller.test", "j1", "w1")
    assert second["level"] == "critical" and "ZeroDivisionError" in second["failure"]


def test_text_is_human_readable():
    out = io.StringIO()
    log = Logger(namespace="roller.test", observer=LogPublisher(observer_for("text", out)))
    log.info("Job {job_id} queued", job_id="j1")
    assert "[roller.test#info] Job j1 queued" in out.getvalue()


def test_twistd_logger_factory_filters_debug(monkeypatch, capsys):
    from roller.logs import observer

    monkeypatch.setenv("ROLLER_LOG_FORMAT", "json")
    log = Logger(namespace="roller.test", observer=LogPublisher(observer()))
    log.debug("noise")
    log.info("signal {n}", n=1)
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["message"] == "signal 1"


def test_chatty_library_namespaces_only_warn(capsys):
    out = io.StringIO()
    pub = LogPublisher(observer_for("text", out))
    Logger(namespace="twisted.conch.ssh.transport", observer=pub).info("kex alg=curve25519")
    Logger(namespace="twisted.conch.ssh.transport", observer=pub).warn("host key mismatch")
    Logger(namespace="roller.queue", observer=pub).info("job queued")
    text = out.getvalue()
    assert "kex alg" not in text and "host key mismatch" in text and "job queued" in text
