import io
import json

from twisted.logger import Logger, LogLevel, LogPublisher

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


def test_text_time_prefix_matches_twisted_and_follows_the_clock():
    from twisted.logger import formatTime

    out = io.StringIO()
    pub = LogPublisher(observer_for("text", out))
    for when in (1_700_000_000.25, 1_700_000_000.75, 1_700_000_001.0, 1_600_000_000.0):
        pub({"log_format": "at {n}", "n": when, "log_time": when, "log_namespace": "roller.test",
             "log_level": LogLevel.info})
    stamps = [line.split(" ", 1)[0] for line in out.getvalue().splitlines()]
    assert stamps == [formatTime(t) for t in (1_700_000_000, 1_700_000_000, 1_700_000_001, 1_600_000_000)]
    assert stamps[1] != stamps[2] and stamps[2] != stamps[3]


def test_json_does_not_repeat_a_field_that_is_the_message():
    out = io.StringIO()
    log = Logger(namespace="roller.access", observer=LogPublisher(observer_for("json", out)))
    log.info("{access_line}", access_line='127.0.0.1 "GET / HTTP/1.1" 200 5', status=200)
    (record,) = map(json.loads, out.getvalue().splitlines())
    assert record["message"] == '127.0.0.1 "GET / HTTP/1.1" 200 5' and record["status"] == 200
    assert "access_line" not in record
