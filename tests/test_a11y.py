"""
Accessibility as a test (issue 16): axe-core (tests/axe.py) on every page
of the dashboard, at 1440x900 and at a 390x844 phone, in the light and the
dark theme (C{prefers-color-scheme}), with the WCAG 2.0/2.1/2.2 A and AA
rules and axe's best practices: no violation.  At every size no page
scrolls sideways (C{document.scrollingElement.scrollWidth <= innerWidth}).

Against a real C{twistd -n roller --demo} on loopback (three simulated
machines), in Debian's chromium driven by Playwright, as test_browser.py;
the admin signs in through the form.  Pages: the fleet (plain and
filtered), a machine, a job, the queue, the jobs history, the charts, the
batches list, a batch's confirmation and its page, the audit log, the
inventory admin (add, edit, delete, import), a destructive task's
confirmation page, an error page, and sign-in.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from axe import axe_source, axe_violations, format_violations
from test_browser import CHROMIUM, CHROMIUM_ARGS, PASSWORD, _playwright, add_users, screenshot_dir

from roller.testing.process import RollerProcess, free_port, wait_for

#: (name, viewport, colour scheme)
LOOKS = (("desktop-light", (1440, 900), "light"), ("desktop-dark", (1440, 900), "dark"),
         ("phone-light", (390, 844), "light"), ("phone-dark", (390, 844), "dark"))


def test_every_page_passes_axe_in_both_themes_at_both_sizes(tmp_path: Path) -> None:
    sync_playwright = _playwright()
    axe_source()  # skipped, saying how to install it, when axe-core is missing
    from playwright.sync_api import expect

    shots = screenshot_dir(tmp_path)
    roller = RollerProcess(["--auth", "none", "--demo"], env={
        "ROLLER_DEMO_FLEET_SIZE": "3", "ROLLER_DEMO_SSH_PORT": str(free_port()),
        "ROLLER_REBOOT_POLL_INTERVAL": "0.2"})
    add_users(roller)
    roller.start()
    # a roller without any account yet: its one-time first-admin page (the link is in its log)
    fresh = RollerProcess(["--auth", "none"])
    fresh.start()
    try:
        setup_path = wait_for(lambda: (re.findall(r"/setup\?token=[-_A-Za-z0-9]+", fresh.log_text()) or [None])[0],
                              15, "the setup link in the log")
        setup_url = fresh.base_url + setup_path
        # a finished job and a failed one, so the fleet, machine and job pages show both
        ok = roller.post("/api/v1/jobs?tc_worker_id=sim-001&task_name=ping").json()["task_id"]
        bad = roller.post("/api/v1/jobs?tc_worker_id=demo-closed&task_name=ping").json()["task_id"]
        roller.wait_job(ok)
        roller.wait_job(bad)
        found: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                batch_url = None
                for name, (width, height), scheme in LOOKS:
                    batch_url = _walk(browser, roller, name, width, height, scheme, ok, batch_url,
                                      found, shots, expect, setup_url)
            finally:
                browser.close()
        assert not found, "\n" + "\n".join(found)
    except BaseException:
        print(f"\n---- roller log\n{roller.log_tail(80)}")
        raise
    finally:
        roller.close()
        fresh.close()


def _walk(browser: Any, roller: Any, look: str, width: int, height: int, scheme: str, job_id: str,
          batch_url: str | None, found: list[str], shots: Path, expect: Any, setup_url: str) -> str:
    base = roller.base_url
    context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=scheme,
                                  is_mobile=width < 500, has_touch=width < 500)
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    def check(label: str) -> None:
        where = f"[{look}] {label}: "
        page.wait_for_load_state("load")
        violations = axe_violations(page)
        if violations:
            found.append(format_violations(violations, where))
            page.screenshot(path=str(shots / f"a11y-{look}-{re.sub(r'[^a-z0-9]+', '-', label)}.png"), full_page=True)
        wide = page.evaluate("document.scrollingElement.scrollWidth - window.innerWidth")
        if wide > 0:
            found.append(f"{where}the page scrolls sideways by {wide} px")

    # -- signed out: the first-admin setup page (of the roller without accounts), the sign-in page
    page.goto(setup_url)
    expect(page.get_by_role("heading", name=re.compile("first admin", re.I))).to_be_visible()
    check("setup")
    page.goto(base + "/login")
    check("sign-in")
    page.get_by_label("User name").fill("ada")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".viewer-name")).to_have_text("ada")

    for label, path in (("fleet", "/"), ("fleet filtered", "/?pool=demo&sort=name&dir=desc"),
                        ("fleet empty", "/?q=no-such-machine"),
                        ("machine", "/machines/demo/sim-001"), ("machine without settings", "/machines/demo/demo-1"),
                        ("job", f"/jobs/{job_id}"), ("queue", "/queue"), ("jobs history", "/jobs"),
                        ("jobs history filtered", "/jobs?state=failed"), ("stats", "/stats"),
                        ("batches", "/batches"), ("audit", "/audit"), ("admin add", "/admin/machines/new"),
                        ("admin edit", "/admin/machines/demo/sim-001/edit"),
                        ("admin delete", "/admin/machines/demo/sim-001/delete"), ("admin import", "/admin/import"),
                        ("not found", "/no/such/page"), ("bad request", "/?state=bogus")):
        page.goto(base + path)
        check(label)

    # -- a busy queue (a reboot running, a ping waiting behind it): its tables and cancel buttons fit
    reboot = roller.post("/api/v1/jobs?tc_worker_id=sim-001&task_name=reboot").json()["task_id"]
    waiting = roller.post("/api/v1/jobs?tc_worker_id=sim-001&task_name=ping").json()["task_id"]
    page.goto(base + "/queue")
    expect(page.locator(f'input[name="job"][value="{waiting}"]')).to_have_count(1)
    check("queue with jobs")
    roller.wait_job(reboot, timeout=60)
    roller.wait_job(waiting, timeout=60)

    # -- a batch: its confirmation page, then (once) the batch page
    page.goto(base + "/?pool=demo")
    page.get_by_label("Select sim-002", exact=True).check()
    page.get_by_label("Run on the selected machines").select_option("ping")
    page.get_by_role("button", name="Review…").click()
    expect(page.get_by_role("heading", name=re.compile(r"^Run ping on"))).to_be_visible()
    check("batch confirmation")
    if batch_url is None:
        page.get_by_role("button", name=re.compile(r"^Yes, run ping")).click()
        expect(page).to_have_url(re.compile(r"/batches/[0-9a-f-]{36}$"))
        batch_url = page.url
    else:
        page.goto(batch_url)
    check("batch")

    # -- a destructive task's confirmation page (what a browser without JavaScript gets)
    page.goto(base + "/machines/demo/sim-003")
    page.locator("#destructive-tasks summary").click()
    page.evaluate("document.querySelectorAll('[data-confirm]').forEach(b => b.removeAttribute('data-confirm'))")
    page.get_by_role("button", name="Run reboot", exact=True).click()
    expect(page.get_by_role("heading", name=re.compile("reboot", re.I)).first).to_be_visible()
    check("task confirmation")
    assert not errors, errors
    context.close()
    return batch_url
