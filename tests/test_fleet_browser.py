"""
The fleet and machine pages in a real browser (issue 16): Debian's chromium
driven by Playwright against C{twistd -n roller --demo} (three simulated
machines that really answer, the demo machines, and 30 more added over the
API), on 127.0.0.1 only.

What it walks through: problems first (the machine whose ping failed is the
first row), compact rows (at least 25 visible at 1440x900, ids on one line),
C{/} focusing the search, the pool strip's links (each count lists as many
machines), a row and the counts updating live when a job ends (no reload;
the ticked checkboxes and the scroll position kept), the machine page
offering only the tasks its settings can run (destructive ones behind a
menu), times in the browser's time zone (UTC in the tooltip) and relative
times ticking (on Playwright's fake clock, not by waiting), and the dark
theme.  Screenshots (light, dark, phone) go to C{$ROLLER_SCREENSHOTS} or the
test's C{tmp_path}; C{ROLLER_UPDATE_SCREENSHOTS=1} refreshes the README's.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from test_browser import CHROMIUM, CHROMIUM_ARGS, PASSWORD, _playwright, add_users, screenshot_dir

from roller.testing.process import RollerProcess, free_port

REPO = Path(__file__).resolve().parent.parent
#: copied over static/screenshots/ with ROLLER_UPDATE_SCREENSHOTS=1
README_SHOTS = ("fleet.png", "fleet-dark.png", "fleet-phone.png", "machine.png")
BULK = 30  # machines added over the API, in pool "bulk"
ZONE = "Asia/Kolkata"  # UTC+05:30: local and UTC texts differ in hours and minutes


def test_fleet_and_machine_pages_in_chromium(tmp_path: Path) -> None:
    sync_playwright = _playwright()
    from playwright.sync_api import expect

    shots = screenshot_dir(tmp_path)
    update_readme = os.environ.get("ROLLER_UPDATE_SCREENSHOTS") == "1"

    def shot(page: Any, name: str, full_page: bool = False) -> None:
        page.screenshot(path=str(shots / name), full_page=full_page)
        if update_readme and name in README_SHOTS:
            shutil.copyfile(shots / name, REPO / "static" / "screenshots" / name)

    roller = RollerProcess(["--auth", "none", "--demo"], env={
        "ROLLER_DEMO_FLEET_SIZE": "3", "ROLLER_DEMO_SSH_PORT": str(free_port()),
        "ROLLER_REBOOT_POLL_INTERVAL": "0.2"})
    add_users(roller)
    roller.start()
    try:
        for i in range(BULK):
            roller.json("PUT", f"/api/v1/machines/bulk/pixel6-{i:03d}",
                        {"ip": f"127.0.2.{i + 1}", "pool": "bulk", "tags": ["gpu"] if i % 3 == 0 else []},
                        expect=201)
        failed = roller.post("/api/v1/jobs?tc_worker_id=demo-closed&task_name=ping").json()["task_id"]
        assert roller.wait_job(failed)["state"] == "failed"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                _walk(browser, roller, shot, expect)
            finally:
                browser.close()
    except BaseException:
        sys.stdout.write(f"\n---- roller log\n{roller.log_tail(120)}\n")
        raise
    finally:
        roller.close()


def _sign_in(page: Any, base: str, expect: Any, name: str = "ada") -> None:
    page.goto(base + "/login")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".viewer-name")).to_have_text(name)


def _walk(browser: Any, roller: Any, shot: Any, expect: Any) -> None:
    base = roller.base_url
    context = browser.new_context(viewport={"width": 1440, "height": 900}, timezone_id=ZONE)
    page = context.new_page()
    problems: list[str] = []
    expected = "the server responded with a status of 400"  # the bad filter below
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" and expected not in m.text else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.set_default_timeout(20_000)
    _sign_in(page, base, expect)

    # -- problems first: demo-closed's ping failed, so it leads; the rest by name
    page.goto(base + "/")
    rows = page.locator("table.fleet tbody tr")
    expect(rows).to_have_count(BULK + 7)
    expect(rows.first.locator("th")).to_have_text("demo-closed")
    expect(page.get_by_label("Sort by")).to_have_value("problems")
    names = rows.locator("th").all_inner_texts()
    assert names[1:] == sorted(names[1:], key=lambda n: ("bulk" if n.startswith("pixel6") else "demo", n)), names

    # -- compact rows: at least 25 on a 900 px screen, ids on one line
    page.locator("table.fleet thead").evaluate("e => window.scrollTo(0, e.getBoundingClientRect().top + scrollY)")
    visible = page.evaluate("""() => [...document.querySelectorAll('table.fleet tbody tr')]
        .filter(r => { const b = r.getBoundingClientRect(); return b.top >= 0 && b.bottom <= innerHeight; }).length""")
    assert visible >= 25, f"only {visible} rows fit in 900 px"
    wrapped = page.evaluate("""() => [...document.querySelectorAll('table.fleet tbody th a')]
        .filter(a => a.getClientRects().length !== 1).map(a => a.textContent)""")
    assert wrapped == [], wrapped
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "fleet.png")

    # -- "/" focuses the search
    page.locator("h1").click()
    page.keyboard.press("/")
    expect(page.get_by_label(re.compile("^Search"))).to_be_focused()
    page.keyboard.type("pixel6-00")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"q=pixel6-00"))
    expect(rows).to_have_count(10)

    # -- a filter by tag and liveness; a bad one is a readable 400 page
    page.goto(base + "/?tag=gpu")
    expect(rows).to_have_count(BULK // 3)
    page.goto(base + "/?liveness=down")
    expect(rows).to_have_count(1)
    page.goto(base + "/?loan=someday")
    expect(page.get_by_role("alert")).to_contain_text("loan must be one of loaned, overdue, free")

    # -- the pool strip: put demo-2 in maintenance; the strip's links list what they count
    page.goto(base + "/machines/demo/demo-2")
    page.get_by_label("Reason").first.fill("disk swap")
    page.get_by_role("button", name="Put in maintenance").click()
    expect(page.locator("#maintenance")).to_contain_text("in maintenance")
    page.goto(base + "/")
    strip = page.locator("#pool-strip")
    expect(strip.get_by_role("link", name="1 maintenance in demo-linux")).to_be_visible()
    links = strip.locator("a.n").evaluate_all(
        "as => as.filter(a => !a.classList.contains('n-running')).map(a => [a.getAttribute('href'), a.textContent])")
    assert links, "the strip has no count link"
    for href, count in links:
        page.goto(base + href)
        expect(page.locator("#showing")).to_contain_text(f"of {count}")
    page.goto(base + "/")
    strip.get_by_role("link", name="1 maintenance in demo-linux").click()
    expect(page).to_have_url(re.compile(r"/\?pool=demo-linux&health=maintenance$"))
    expect(rows).to_have_count(1)
    expect(rows.first.locator("th")).to_have_text("demo-2")
    strip.get_by_role("link", name="bulk", exact=True).click()
    expect(page).to_have_url(re.compile(r"/\?pool=bulk$"))
    expect(rows).to_have_count(BULK)

    # -- live: a job ends; its row and the counts change without a reload, the selection and scroll stay
    page.goto(base + "/")
    sim3 = page.locator("table.fleet tbody tr", has=page.get_by_role("link", name="sim-003", exact=True))
    expect(sim3.locator(".state")).to_have_text("never run")
    succeeded = page.locator("#fleet-counts a", has=page.locator(".state-succeeded"))
    expect(succeeded).to_have_count(0)
    page.get_by_label("Select sim-002", exact=True).check()
    page.get_by_label("Select pixel6-001", exact=True).check()
    expect(page.locator("#pick-count")).to_have_text("2 selected.")
    page.evaluate("window.scrollTo(0, 300); window.__notReloaded = true")
    scroll = page.evaluate("scrollY")
    job = roller.post("/api/v1/jobs?tc_worker_id=sim-003&task_name=ping").json()["task_id"]
    expect(sim3.locator(".state")).to_have_text("succeeded", timeout=30_000)
    expect(sim3.get_by_role("link", name="ping")).to_have_attribute("href", f"/jobs/{job}")
    expect(succeeded.locator("strong")).to_have_text("1", timeout=30_000)  # the counts too
    assert page.evaluate("window.__notReloaded === true"), "the fleet page reloaded"
    expect(page.get_by_label("Select sim-002", exact=True)).to_be_checked()
    expect(page.get_by_label("Select pixel6-001", exact=True)).to_be_checked()
    expect(page.get_by_label("Select sim-003", exact=True)).not_to_be_checked()
    expect(page.locator("#pick-count")).to_have_text("2 selected.")
    assert page.evaluate("scrollY") == scroll

    # -- the machine page: status first, only the tasks its settings can run
    page.goto(base + "/machines/demo/demo-1")  # an address only: ping, not reboot
    expect(page.get_by_role("button", name="Run ping", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Run reboot", exact=True)).to_have_count(0)
    page.get_by_text(re.compile(r"tasks? demo-1's settings cannot run")).click()
    expect(page.locator("#unavailable-tasks")).to_contain_text(
        "reboot: the machine has none of ssh, ipmi, pdu, redfish or xen settings")
    expect(page.get_by_text("Liveness", exact=True)).to_have_count(1)
    page.goto(base + "/machines/demo/sim-003")  # ssh: reboot offered, behind the destructive tasks' menu
    reboot = page.get_by_role("button", name="Run reboot", exact=True)
    expect(reboot).to_be_hidden()
    page.locator("#destructive-tasks summary").click()
    expect(reboot).to_be_visible()
    expect(page.get_by_role("link", name="All jobs of this machine")).to_have_attribute(
        "href", "/jobs?group=demo&worker=sim-003")
    shot(page, "machine.png", full_page=True)

    # -- times: local with UTC in the tooltip; one line of the job's timeline, checked against the zone
    page.goto(base + f"/jobs/{job}")
    stamp = page.locator("#timeline time").first
    iso = stamp.get_attribute("datetime")
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    expect(stamp).to_have_text(moment.astimezone(ZoneInfo(ZONE)).strftime("%H:%M:%S"))
    expect(stamp).to_have_attribute("title", moment.strftime("%Y-%m-%d %H:%M:%S UTC"))
    zone_note = re.compile(r"times are in your time zone \(Asia/(Kolkata|Calcutta)\)")  # ICU may say either
    expect(page.locator("footer")).to_contain_text(zone_note)
    context.close()

    # -- relative times tick: on Playwright's clock, five minutes pass in no time
    context = browser.new_context(viewport={"width": 1440, "height": 900}, timezone_id=ZONE)
    page = context.new_page()
    page.clock.install()
    _sign_in(page, base, expect)
    page.goto(base + "/machines/demo/sim-003")
    created = page.locator("#last-job time[data-relative]")
    expect(created).to_have_text(re.compile(r"(s ago|just now)$"))
    expect(created).to_have_attribute("title", re.compile(r" \(local\) · .* UTC$"))
    page.clock.fast_forward("06:00")
    expect(created).to_have_text(re.compile(r"^[5-7] min ago$"))
    context.close()

    # -- the dark theme, and a phone
    dark = browser.new_context(viewport={"width": 1440, "height": 900}, color_scheme="dark")
    page = dark.new_page()
    _sign_in(page, base, expect)
    page.goto(base + "/")
    background = page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
    assert max(int(x) for x in re.findall(r"\d+", background)[:3]) < 60, background  # a dark page
    text = page.evaluate("getComputedStyle(document.querySelector('h1')).color")
    assert min(int(x) for x in re.findall(r"\d+", text)[:3]) > 180, text  # light text on it
    shot(page, "fleet-dark.png")
    dark.close()
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = phone.new_page()
    _sign_in(page, base, expect)
    page.goto(base + "/")
    assert page.evaluate("document.scrollingElement.scrollWidth <= innerWidth"), "the phone page scrolls sideways"
    shot(page, "fleet-phone.png")
    search = page.get_by_label(re.compile("^Search"))
    expect(search).to_be_hidden()  # the filters are folded on a phone...
    page.get_by_text("Search and filters").click()
    expect(search).to_be_visible()
    page.goto(base + "/?pool=bulk")
    expect(search).to_be_visible()  # ...unless some are set
    phone.close()
    assert not problems, problems
