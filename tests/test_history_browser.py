"""
The job history and the charts in a real browser: Debian's chromium driven
by Playwright against a real roller process (C{twistd -n roller}) whose
database was given a history first (300 jobs over two days, reboot jobs
with their attempts' events, remediations), through roller's own store in
a process of its own.

A viewer signs in, filters C{/jobs} with the form (states ticked, a task
chosen), pages to older jobs and back, gets a readable 400 for a bad date,
opens C{/stats}: every chart is an image with its name, and its table
alternative opens to the same figures; the fleet's sparkline leads there.
Light and dark screenshots go where tests/test_browser.py puts them (and,
with C{ROLLER_UPDATE_SCREENSHOTS=1}, those the README shows over
C{static/screenshots/}).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from test_browser import CHROMIUM, CHROMIUM_ARGS, PASSWORD, REPO, _playwright, add_users, screenshot_dir

from roller.testing.process import RollerProcess, roller_env

#: the screenshots the README shows, refreshed with ROLLER_UPDATE_SCREENSHOTS=1
README_SHOTS = ("jobs-filtered.png", "stats.png", "stats-dark.png")

SEED = r'''
import sys, time
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from roller.inventory import Machine
from roller.jobs import Job, JobEvent, State
from roller.store import open_store

async def main(reactor, path):
    store = await open_store(path, reactor)
    try:
        await store.machines.put_many([Machine.from_json({"worker_id": f"hist-{i}", "worker_group": "lab",
            "ip": f"127.0.9.{i + 1}", "pool": ("mac", "linux", "win")[i % 3]}) for i in range(6)])
        now = time.time()
        states = [State.succeeded] * 5 + [State.failed, State.timed_out, State.cancelled]
        for i in range(300):
            created = now - 48 * 3600 + i * 570
            state = states[i % len(states)]
            task_name = ("reboot", "ping", "ping")[i % 3]
            job = Job(id=f"00000000-0000-7000-8000-{i:012d}", task_name=task_name, worker_id=f"hist-{i % 6}",
                      worker_group="lab", created_at=created, params={}, requester=("vic", "roller/health")[i % 2],
                      state=state, started_at=created + 2, finished_at=created + 95,
                      result="ssh_reboot: done" if state is State.succeeded else None,
                      error=None if state is State.succeeded else f"failure number {i}",
                      batch_id="batch-browser" if i % 10 == 0 else None)
            await store.jobs.insert(job)
            if task_name == "reboot":
                ok = state is State.succeeded
                await store.jobs.add_events([
                    JobEvent(job.id, created + 3, "log", "ssh_reboot: starting", {"method": "ssh_reboot", "step": "initiate"}),
                    JobEvent(job.id, created + 40, "log", "ssh_reboot", {"method": "ssh_reboot", "outcome": "failed" if not ok else "succeeded"}),
                ] + ([] if ok else [
                    JobEvent(job.id, created + 41, "log", "ipmi_cycle: starting", {"method": "ipmi_cycle", "step": "initiate"}),
                    JobEvent(job.id, created + 90, "log", "ipmi_cycle", {"method": "ipmi_cycle", "outcome": "failed"})]))
        for d in range(5):
            await store.health.add_remediation(("lab", "hist-1"), "down", "reboot", now - d * 86400, d % 2 == 1, None, "down")
    finally:
        await store.close()

task.react(lambda reactor: ensureDeferred(main(reactor, sys.argv[1])))
'''


def seed(roller: RollerProcess) -> None:
    done = subprocess.run([sys.executable, "-c", SEED, str(roller.db_path)], env=roller_env(), cwd=roller.workdir,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_history_and_charts_in_chromium(tmp_path: Path) -> None:
    sync_playwright = _playwright()
    from playwright.sync_api import expect

    shots = screenshot_dir(tmp_path)
    roller = RollerProcess(["--auth", "none"], state_dir=tmp_path / "state")
    seed(roller)
    add_users(roller)
    roller.start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                run_browser(browser, roller.base_url, shots, expect)
            finally:
                browser.close()
    except BaseException:
        sys.stdout.write(f"\n---- roller log\n{roller.log_tail(80)}\n")
        raise
    finally:
        roller.close()


def run_browser(browser: Any, base: str, shots: Path, expect: Any) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text)
            if m.type == "error" and "status of 400" not in m.text else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.set_default_timeout(15_000)

    page.goto(base + "/login?next=%2Fjobs")
    page.get_by_label("User name").fill("vic")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/jobs$"))

    # -- the history: 100 a page, newest first
    rows = page.locator("table.history tbody tr")
    expect(rows).to_have_count(100)
    expect(rows.first).to_contain_text("hist-5")  # job 299 ran on hist-5
    def shot(name: str, target: Any = None, full_page: bool = True) -> None:
        (target or page).screenshot(path=str(shots / name), full_page=full_page)
        if os.environ.get("ROLLER_UPDATE_SCREENSHOTS") == "1" and name in README_SHOTS:
            shutil.copyfile(shots / name, REPO / "static" / "screenshots" / name)

    shot("jobs.png")

    # -- filters from the form: failed and timed out reboots
    page.get_by_label("failed", exact=True).check()
    page.get_by_label("timed out", exact=True).check()
    page.get_by_label("Task").select_option("reboot")
    page.get_by_role("button", name="Show").click()
    expect(page).to_have_url(re.compile(r"state=failed&state=timed_out&task=reboot"))
    expect(page.get_by_role("status").first).to_contain_text("failed or timed out, task reboot")
    states = rows.locator("td:nth-child(4)").all_inner_texts()
    tasks = rows.locator("td:nth-child(2)").all_inner_texts()
    # jobs i with i % 3 == 0 (reboot) and i % 8 in (5, 6): 25 of them
    assert len(states) == 25 and set(states) <= {"failed", "timed out"} and set(tasks) == {"reboot"}
    expect(page.get_by_label("failed", exact=True)).to_be_checked()
    expect(page.get_by_label("succeeded", exact=True)).not_to_be_checked()
    shot("jobs-filtered.png", full_page=False)

    # -- one machine's jobs, from a row's machine link, and its job page
    page.goto(base + "/jobs?group=lab&worker=hist-3")
    expect(rows).to_have_count(50)
    expect(page.get_by_role("link", name="machine page")).to_have_attribute("href", "/machines/lab/hist-3")
    rows.first.get_by_role("link").first.click()
    expect(page).to_have_url(re.compile(r"/jobs/00000000-0000-7000-8000-0000000002"))

    # -- older pages, and back to the newest
    page.goto(base + "/jobs")
    page.get_by_role("link", name="Older →").click()
    expect(rows).to_have_count(100)
    expect(page).to_have_url(re.compile(r"before=\d+"))
    page.get_by_role("link", name="Older →").click()
    expect(rows).to_have_count(100)
    expect(page.get_by_role("link", name="Older →")).to_have_count(0)
    page.get_by_role("link", name="← Newest").click()
    expect(page).to_have_url(re.compile(r"/jobs$"))

    # -- a bad date is a readable 400 page
    page.get_by_label("Since").fill("last tuesday")
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_role("heading", name=re.compile("Bad request"))).to_be_visible()
    expect(page.get_by_role("alert")).to_contain_text("since 'last tuesday' is not an ISO-8601 date")

    # -- the charts: images with their names; each table alternative opens to the figures
    page.goto(base + "/stats")
    for name in ("Jobs per hour by final state, last 24 hours (UTC)", "Jobs per hour by final state, last 7 days (UTC)",
                 "Failed jobs by pool, last 7 days", "Reboot success rate by method, last 7 days",
                 "Median time to recover by reboot method, last 7 days", "Remediations per day, last 7 days (UTC)"):
        expect(page.get_by_role("img", name=name)).to_be_visible()
    day = page.locator("#jobs-24h")
    assert day.locator("rect.bar").count() > 20
    table = page.locator("#table-day")
    expect(table).to_be_hidden()
    page.locator("section", has=page.locator("#jobs-24h")).get_by_text("Table of these figures").click()
    expect(table).to_be_visible()
    expect(table.locator("tbody tr")).to_have_count(24)
    total = int(table.locator("tfoot td").last.inner_text())
    assert 140 <= total <= 160  # one job every 9.5 minutes: about 151 in 24 hours
    methods = page.locator("#table-methods")
    page.locator("section", has=methods).get_by_text("Table of these figures").click()
    ssh = methods.locator("tbody tr").first.locator("td").all_inner_texts()
    assert methods.locator("tbody tr").first.locator("th").inner_text() == "ssh" and ssh[-1] == "37 s"
    shot("stats-full.png")
    page.locator("details[open]").evaluate_all("ds => ds.forEach(d => d.open = false)")
    page.evaluate("window.scrollTo(0, 0)")
    shot("stats.png", full_page=False)
    dark = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="dark",
                               storage_state=context.storage_state())
    dpage = dark.new_page()
    dpage.goto(base + "/stats")
    fill = dpage.evaluate("getComputedStyle(document.querySelector('#jobs-24h .fill.s-succeeded')).fill")
    assert fill == "rgb(92, 196, 106)", fill  # the dark theme's colour
    shot("stats-dark.png", dpage, full_page=False)
    dark.close()

    # -- the fleet's sparkline leads to the charts
    page.goto(base + "/")
    spark = page.get_by_role("img", name=re.compile(r"^Jobs per hour, last 24 hours: \d+ ended"))
    expect(spark).to_be_visible()
    spark.click()
    expect(page).to_have_url(re.compile(r"/stats$"))
    assert problems == [], problems
    state = context.storage_state()
    context.close()
    check_accessibility(browser, base, state, shots)


#: the pages of this test, as axe-core checks them (the stats page with its tables open)
AXE_PAGES = ("/jobs", "/jobs?state=failed&state=timed_out&task=reboot", "/jobs?group=lab&worker=hist-3",
             "/jobs?before=101", "/stats")


def check_accessibility(browser: Any, base: str, state: Any, shots: Path) -> None:
    """
    axe-core (tests/axe.py) on every page of the history and the charts at
    1440x900 and 390x844, light and dark: no violation; and no sideways
    scrolling of the page on a phone.
    """
    try:
        from axe import axe_violations, format_violations
    except ImportError:  # tests/axe.py comes with the accessibility tests
        return
    found = []
    for width, height in ((1440, 900), (390, 844)):
        for scheme in ("light", "dark"):
            context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=scheme,
                                          storage_state=state, bypass_csp=True)
            page = context.new_page()
            for path in AXE_PAGES:
                page.goto(base + path)
                page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
                where = f"{path} at {width}x{height} {scheme}: "
                found += [format_violations([v], where) for v in axe_violations(page)]
                overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                if overflow > 0:
                    found.append(f"{where}the page scrolls sideways by {overflow} px")
            if width == 390:
                page.goto(base + "/stats")
                page.screenshot(path=str(shots / f"stats-phone-{scheme}.png"), full_page=True)
                page.goto(base + "/jobs")
                page.screenshot(path=str(shots / f"jobs-phone-{scheme}.png"), full_page=True)
            context.close()
    assert not found, "\n".join(found)
