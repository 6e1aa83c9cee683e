"""
The machine page's job and audit rows built in Python (roller/web/machine_html.py) must be
the HTML the dashboard's macros make of the same rows, byte for byte.
"""

from __future__ import annotations

import itertools

from roller.jobs import Job, State
from roller.store import AuditEntry
from roller.web.dashboard import ago, duration, template_environment
from roller.web.machine_html import audit_rows_html, job_rows_html

NOW = 1_700_000_000.0
HOSTILE = "<script>alert('x')</script> & \"quoted\""
LONG = "word " * 60  # past the error line's 160-character cut

#: what the page rendered before, through the shared macros
JOB_ROWS = """{% import "_macros.html" as m with context %}{% for j in jobs %}<tr>
<td><a href="{{ job_url(j.id) }}">{{ j.task_name }}</a></td>
<td>{{ m.state(j.state.value) }}{% if j.state.value in ('failed', 'timed_out', 'interrupted') %}\
{{ m.error_line(j.error) }}{% endif %}</td>
<td>{{ j.requester }}</td>
<td>{{ m.when(j.created_at) }}</td>
<td>{{ (j.finished_at - j.started_at)|duration if j.finished_at and j.started_at else '—' }}</td>
</tr>
{% endfor %}"""
AUDIT_ROWS = """{% import "_macros.html" as m with context %}{% for a in audit %}<tr><td>{{ m.when(a.time) }}</td>\
<td>{{ a.actor }}{% if a.source_ip %} <span class="muted">from {{ a.source_ip }}</span>{% endif %}</td>\
<td>{{ a.action }}</td><td>{{ a.result }}</td></tr>
{% endfor %}"""


def _jobs() -> list[Job]:
    jobs = []
    ids = ["0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b", "job/../x", "id:with:colons", "ünï"]
    tasks = ["reboot", HOSTILE, "ipmi_reset"]
    errors = [None, "", HOSTILE, LONG, "no reply"]
    times = [(None, None), (NOW - 100, None), (NOW - 100, NOW - 95.5), (NOW - 9000, NOW - 100), (NOW - 30, NOW - 30)]
    for i, (state, error, (started, finished)) in enumerate(itertools.product(State, errors, times)):
        jobs.append(Job(id=ids[i % len(ids)], task_name=tasks[i % len(tasks)], worker_id="m1", worker_group="g",
                        created_at=[NOW - 5, NOW - 200_000, NOW + 30, 0.0][i % 4], requester=[HOSTILE, "ci"][i % 2],
                        state=state, started_at=started, finished_at=finished, error=error))
    return jobs


def _entries() -> list[AuditEntry]:
    return [AuditEntry(time=t, actor=actor, action=action, result=result, source_ip=ip)
            for t, actor, action, result, ip in itertools.product(
                [NOW - 3, NOW - 86_400 * 3, 0.0], ["ops@example.com", HOSTILE], ["job.create:reboot", HOSTILE],
                ["queued 0190a1b2", HOSTILE, ""], [None, "", "10.0.0.1", HOSTILE])]


def _macro(source: str, **context: object) -> str:
    return template_environment().from_string(source).render(now=NOW, ago=lambda ts: ago(ts, NOW), **context)


def test_job_rows_are_the_macro_rows() -> None:
    jobs = _jobs()
    assert len(jobs) > 100
    built = str(job_rows_html(jobs, lambda ts: ago(ts, NOW), duration))
    assert built == _macro(JOB_ROWS, jobs=jobs)
    assert "<script>" not in built and "&lt;script&gt;" in built


def test_audit_rows_are_the_macro_rows() -> None:
    entries = _entries()
    built = str(audit_rows_html(entries, lambda ts: ago(ts, NOW)))
    assert built == _macro(AUDIT_ROWS, audit=entries)
    assert "<script>" not in built


def test_nothing_to_show() -> None:
    assert str(job_rows_html([], str, duration)) == "" == str(audit_rows_html([], str))
