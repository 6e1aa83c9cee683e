"""
Batches in a real browser (issue 15): Debian's chromium driven by
Playwright against C{twistd -n roller --demo} with a simulated fleet larger
than one fleet page (C{dashboard.page_size} 10, 14 simulated machines in
pool C{demo} that really reboot over SSH), on 127.0.0.1 only.

An operator filters the fleet by pool, ticks the page, then "Select all 14
machines matching this filter" (the filter, beyond the page), chooses
reboot, reviews the one confirmation page (count, pools, the limits from
the configured defaults, edited and recalculated), confirms, and watches
the batch page's progress bar reach the end over Server-Sent Events,
without a reload and without polling.  A viewer gets no selection.  The
pages fit a 390 px phone.

Same harness and conventions as test_browser.py (accounts made with
C{roller user add}, screenshots to C{$ROLLER_SCREENSHOTS} or the test's
C{tmp_path}, C{ROLLER_UPDATE_SCREENSHOTS=1} refreshes the README's).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from test_browser import CHROMIUM, CHROMIUM_ARGS, PASSWORD, _playwright, add_users, screenshot_dir

from roller.testing.process import RollerProcess, free_port

REPO = Path(__file__).resolve().parent.parent
#: copied over static/screenshots/ with ROLLER_UPDATE_SCREENSHOTS=1
README_SHOTS = ("batch-confirm.png", "batch-running.png")
SIM = 14  # simulated machines: more than one fleet page of 10
PAGE = 10


def test_batch_from_the_fleet_page_in_chromium(tmp_path: Path) -> None:
    sync_playwright = _playwright()
    from playwright.sync_api import expect

    shots = screenshot_dir(tmp_path)
    update_readme = os.environ.get("ROLLER_UPDATE_SCREENSHOTS") == "1"

    def shot(page: Any, name: str) -> None:
        page.screenshot(path=str(shots / name), full_page=True)
        if update_readme and name in README_SHOTS:
            shutil.copyfile(shots / name, REPO / "static" / "screenshots" / name)

    roller = RollerProcess(["--auth", "none", "--demo"], env={
        "ROLLER_DEMO_FLEET_SIZE": str(SIM), "ROLLER_DEMO_SSH_PORT": str(free_port()),
        "ROLLER_REBOOT_POLL_INTERVAL": "0.2", "ROLLER_DASHBOARD_PAGE_SIZE": str(PAGE)})
    add_users(roller)
    roller.start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                _walk(browser, roller.base_url, roller, shot, expect)
            finally:
                browser.close()
    except BaseException:
        sys.stdout.write(f"\n---- roller log\n{roller.log_tail(120)}\n")
        raise
    finally:
        roller.close()


def _walk(browser: Any, base: str, roller: Any, shot: Any, expect: Any) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.set_default_timeout(15_000)

    def sign_in(name: str) -> None:
        page.goto(base + "/login")
        page.get_by_label("User name").fill(name)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator(".viewer-name")).to_have_text(name)

    # -- a viewer: no checkboxes, no action menu
    sign_in("vic")
    page.goto(base + "/?pool=demo")
    expect(page.locator("table.fleet tbody tr")).to_have_count(PAGE)
    expect(page.get_by_role("checkbox")).to_have_count(0)
    expect(page.get_by_label("Run on the selected machines")).to_have_count(0)
    page.get_by_role("button", name="Sign out").click()

    # -- an operator filters the fleet by pool: one page of 10 out of 14
    sign_in("olga")
    page.goto(base + "/")
    page.get_by_label("Pool").select_option("demo")
    page.get_by_role("button", name="Show").click()
    expect(page).to_have_url(re.compile(r"[?&]pool=demo(&|$)"))
    expect(page.locator("#showing")).to_have_text(f"Showing 1–{PAGE} of {SIM}.")
    rows = page.locator("table.fleet tbody tr")
    expect(rows).to_have_count(PAGE)
    expect(page.get_by_role("link", name="Next →")).to_be_visible()

    # nothing ticked yet: "Review" says so instead of posting
    page.get_by_role("button", name="Review…").click()
    expect(page.locator("#pick-count")).to_have_text("Tick machines first (or select all matching the filter).")
    expect(page).to_have_url(re.compile(r"[?&]pool=demo(&|$)"))

    # tick one row, then the whole page with the header checkbox
    page.get_by_label("Select sim-001", exact=True).check()
    expect(page.locator("#pick-count")).to_have_text("1 selected.")
    page.get_by_label("Select every machine on this page").check()
    expect(page.locator("#pick-count")).to_have_text(f"{PAGE} selected.")
    # beyond the page: every machine matching the filter
    page.get_by_label(f"Select all {SIM} machines matching this filter").check()
    expect(page.locator("#pick-count")).to_contain_text("All machines matching the filter are selected")
    page.get_by_label("Run on the selected machines").select_option("reboot")
    shot(page, "batch-fleet-selected.png")
    page.get_by_role("button", name="Review…").click()

    # -- the one confirmation page: task, count, pools, limits (defaults, editable)
    expect(page.get_by_role("heading", name=f"Run reboot on {SIM} machines?")).to_be_visible()
    expect(page.locator("dl.facts")).to_contain_text("every machine matching pool demo")
    pools = page.locator("table.pools tbody tr")
    expect(pools).to_have_count(1)
    expect(pools.first).to_contain_text(f"demo{SIM}{SIM}3")  # 25% of the pool's 14 machines: 3 at once
    expect(page.get_by_label("At most at once, per pool")).to_have_value("25%")
    page.get_by_label("At most at once, per pool").fill("50%")
    page.get_by_label("Reason").fill("browser test: a pool reboot")
    page.get_by_role("button", name="Recalculate").click()
    expect(pools.first).to_contain_text(f"demo{SIM}{SIM}7")
    expect(page.get_by_label("At most at once, per pool")).to_have_value("50%")
    expect(page.get_by_label("Reason")).to_have_value("browser test: a pool reboot")
    shot(page, "batch-confirm.png")
    page.get_by_role("button", name=f"Yes, run reboot on {SIM} machines").click()

    # -- the batch page: the progress bar reaches the end live, without a reload or polling
    expect(page).to_have_url(re.compile(r"/batches/[0-9a-f-]{36}$"))
    batch_id = page.url.rsplit("/", 1)[1]
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.evaluate("window.__notReloaded = true")
    expect(page.locator("#live-status")).to_contain_text("Live", timeout=10_000)
    bar = page.locator("#batch-progress")
    expect(bar).to_have_attribute("max", str(SIM))
    expect(page.locator("#count-succeeded strong")).not_to_have_text("0", timeout=120_000)
    shot(page, "batch-running.png")
    expect(bar).to_have_js_property("value", SIM, timeout=240_000)
    expect(page.locator("#batch-state")).to_have_text("succeeded", timeout=10_000)
    expect(page.locator("#live-status")).to_have_text("Finished: succeeded.")
    expect(page.locator("#batch-percent")).to_have_text("100%")
    expect(page.locator("#count-succeeded strong")).to_have_text(str(SIM))
    expect(page.locator("#members tbody .m-state")).to_have_text(["succeeded"] * SIM)
    expect(page.locator("#batch-cancel")).to_have_count(0)
    assert page.evaluate("window.__notReloaded === true"), "the batch page reloaded"
    assert not [u for u in requests if "/events" not in u], f"the batch page polled: {requests}"
    shot(page, "batch-succeeded.png")

    view = roller.json("GET", f"/api/v1/batches/{batch_id}")
    assert view["state"] == "succeeded" and view["total"] == SIM and view["requester"] == "user:olga"
    assert view["selector"] == {"pool": "demo"} and view["rollout"]["max_per_pool"] == "50%"
    assert view["reason"] == "browser test: a pool reboot"
    jobs = roller.json("GET", f"/api/v1/jobs?batch_id={batch_id}&limit=100")["jobs"]
    assert len(jobs) == SIM and {j["state"] for j in jobs} == {"succeeded"}

    # -- the batch list links to it
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Batches").click()
    expect(page.get_by_role("link", name=batch_id)).to_be_visible()

    # -- a phone: the batch page and the fleet's selection fit 390 px
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone.add_cookies(context.cookies())
    small = phone.new_page()
    for path in (f"/batches/{batch_id}", "/?pool=demo"):
        small.goto(base + path)
        assert small.evaluate("document.documentElement.scrollWidth") <= 390 + 1, f"{path} scrolls sideways"
    small.goto(base + f"/batches/{batch_id}")
    shot(small, "batch-phone.png")
    phone.close()

    assert problems == [], problems
    context.close()
