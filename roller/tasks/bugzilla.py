"""
C{file_bugzilla_bug}: ask a human for help through Bugzilla (also the last
step of the C{reboot} escalation).

  1. Find the machine's tracker bug by alias (its short host name); create
     it from the C{bugzilla.tracker_*} settings if there is none, reopen it
     (C{bugzilla.reopen_status}) if it is closed.
  2. Look for an open reboot bug for the machine: same product, component
     and rendered C{bugzilla.summary}.  If there is one, comment on it
     (C{bugzilla.comment}) and make sure it blocks the tracker; otherwise
     file one (C{bugzilla.description}, cc C{bugzilla.cc} plus the
     machine's C{bug_cc}) blocking the tracker.

Templates are C{str.format} strings over L{roller.config.TEMPLATE_FIELDS}:
host (short name), fqdn, ip, worker_id, worker_group, requester, reason
(C{", reason: ..."} or empty), job_id and attempts (one line per reboot
attempt).  The API key comes from the secrets file credential
C{bugzilla.credential} (type C{token}) and never appears in a message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from roller.bugzilla import BugzillaClient, BugzillaError
from roller.secrets import UnknownCredential
from roller.tasks.base import TaskContext, TaskFailed, TaskSpec, driver_errors


def not_applicable(ctx: TaskContext) -> str | None:
    """Why Bugzilla cannot be used, or C{None}."""
    if getattr(ctx.drivers, "bugzilla", None) is not None:
        return None
    if not getattr(ctx.settings, "bugzilla_url", ""):
        return "bugzilla.url is not configured"
    return None


def client(ctx: TaskContext) -> BugzillaClient:
    """The process's client (C{ctx.drivers.bugzilla}), else one built from the settings."""
    existing = getattr(ctx.drivers, "bugzilla", None)
    if existing is not None:
        return existing
    s = ctx.config
    key = ""
    if s.bugzilla_credential:
        try:
            if ctx.secrets is None:
                raise UnknownCredential(s.bugzilla_credential)
            cred = ctx.secrets.get(s.bugzilla_credential)
        except UnknownCredential:
            raise TaskFailed(f"the Bugzilla credential {s.bugzilla_credential!r} is not in the secrets file") from None
        key = cred.value or cred.password or ""
    return BugzillaClient(ctx.reactor, s.bugzilla_url, key, timeout=s.bugzilla_timeout)


def template_fields(ctx: TaskContext, attempts: Sequence[str]) -> dict[str, str]:
    m, job = ctx.machine, ctx.job
    return {
        "host": m.short_name,
        "fqdn": m.fqdn or m.worker_id,
        "ip": m.ip or "no IP",
        "worker_id": m.worker_id,
        "worker_group": m.worker_group,
        "requester": job.requester,
        "reason": f", reason: {job.reason}" if job.reason else "",
        "job_id": job.id,
        "attempts": "\n".join(f"- {a}" for a in attempts) or "- none (filed directly)",
    }


async def file_bug(ctx: TaskContext, attempts: Sequence[str]) -> str:
    """File or update the machine's reboot bug; a line saying what was done.  L{TaskFailed} otherwise."""
    bz = client(ctx)
    try:
        with driver_errors(BugzillaError, redact=bz.redact):
            return await _file_bug(ctx, bz, attempts)
    finally:
        if getattr(ctx.drivers, "bugzilla", None) is None:
            bz.close()


async def _file_bug(ctx: TaskContext, bz: BugzillaClient, attempts: Sequence[str]) -> str:
    s = ctx.config
    values = template_fields(ctx, attempts)
    alias = values["host"]
    tracker = await bz.bug_by_alias(alias)
    if tracker is None:
        tracker_id = await bz.create({
            "product": s.bugzilla_tracker_product,
            "component": s.bugzilla_tracker_component,
            "version": s.bugzilla_version,
            "summary": s.bugzilla_tracker_summary.format(**values),
            "alias": alias,
            "description": f"Tracker for problems with {values['fqdn']} ({values['ip']}).",
        })
        ctx.log(f"created tracker bug {tracker_id} (alias {alias})", bug=tracker_id, step="tracker_created")
    else:
        tracker_id = int(tracker["id"])
        if tracker.get("is_open") is False:
            await bz.update(tracker_id, {"status": s.bugzilla_reopen_status, "comment": {
                "body": f"Reopened by roller: {values['fqdn']} could not be rebooted (job {values['job_id']})."}})
            ctx.log(f"reopened tracker bug {tracker_id} (alias {alias})", bug=tracker_id, step="tracker_reopened")
        else:
            ctx.log(f"found tracker bug {tracker_id} (alias {alias})", bug=tracker_id, step="tracker_found")

    summary = s.bugzilla_summary.format(**values)
    candidates = await bz.search({"product": s.bugzilla_product, "component": s.bugzilla_component,
                                  "summary": summary, "resolution": "---"})
    open_bugs = sorted((b for b in candidates if b.get("is_open", True) and b.get("summary") == summary
                        and isinstance(b.get("id"), int)), key=lambda b: b["id"])
    cc = sorted(set(s.bugzilla_cc) | set(ctx.machine.bug_cc))
    if open_bugs:
        bug = open_bugs[0]
        change: dict[str, Any] = {"comment": {"body": s.bugzilla_comment.format(**values)}}
        if tracker_id not in (bug.get("blocks") or []):
            change["blocks"] = {"add": [tracker_id]}
        if cc:
            change["cc"] = {"add": cc}
        await bz.update(bug["id"], change)
        ctx.log(f"commented on reboot bug {bug['id']}", bug=bug["id"], step="bug_commented")
        return f"commented on bug {bug['id']} (blocks tracker bug {tracker_id})"
    fields: dict[str, Any] = {
        "product": s.bugzilla_product,
        "component": s.bugzilla_component,
        "version": s.bugzilla_version,
        "summary": summary,
        "description": s.bugzilla_description.format(**values),
        "blocks": [tracker_id],
    }
    if cc:
        fields["cc"] = cc
    bug_id = await bz.create(fields)
    ctx.log(f"filed reboot bug {bug_id}", bug=bug_id, step="bug_filed")
    return f"filed bug {bug_id} blocking tracker bug {tracker_id}"


async def run(ctx: TaskContext, params: Mapping[str, Any]) -> str:
    reason = not_applicable(ctx)
    if reason:
        raise TaskFailed(f"cannot file a Bugzilla bug: {reason}")
    return await file_bug(ctx, ())


TASK = TaskSpec(
    name="file_bugzilla_bug",
    description="File (or comment on) the machine's reboot bug in Bugzilla, blocking its tracker bug "
                "(alias: the short host name), so a human looks at it.",
    run=run,
    timeout=300.0,
)
