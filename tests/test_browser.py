"""
The dashboard in a real browser: Debian's chromium driven by Playwright
against a real roller process with the demo fleet (simulated machines that
really reboot over SSH), on 127.0.0.1 only.

The roller under test is C{twistd -n roller --demo} (L{RollerProcess}).
Accounts (an operator, a viewer and an admin) are added with C{roller user
add --password-stdin} before it starts; the browser signs in through the
sign-in form (demo mode would let loopback in as "demo" without it, and the
test checks that the page says so).

What it walks through: sign-in (a wrong password first), search, a reboot
whose live log reaches C{succeeded}, cancelling a queued job, CSRF
rejection, hostile inventory text, a viewer without task buttons or admin
links, the inventory admin (add with a validation error shown next to its
field and a keyboard submit, edit, a failed job's reason, delete), a legacy
file imported by upload with its per-entry report, the audit log, a phone
width, and sign-out.

Screenshots of every page go to C{$ROLLER_SCREENSHOTS} if set (CI keeps
that directory as an artifact), else to C{screenshots/} under the test's
C{tmp_path}.  With C{ROLLER_UPDATE_SCREENSHOTS=1} the few shown in the
README are also copied over C{static/screenshots/} (never otherwise, so CI
does not rewrite tracked files).  Skipped, saying why,
when C{/usr/bin/chromium} or the C{playwright} package is missing; never
runs C{playwright install}.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from roller.testing.process import RollerProcess, roller_env

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
#: the screenshots refreshed in static/screenshots/ with ROLLER_UPDATE_SCREENSHOTS=1
README_SHOTS = ("fleet-search.png", "job-reboot-succeeded.png", "queue.png",
                "admin-add-invalid.png", "import-report.png")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


#: the IPMI password in the uploaded file: never shown on a page
SECRET = "Ipmi-Pa55-never-shown"
#: the legacy ipmi.json sample (as in tests/test_legacy_import.py), written to tmp_path and uploaded
LEGACY_IPMI = {
    "types": {"moonshot": {
        "args": ["-B 0", "-b 7"],
        "map": {"c1n1": ["-T 0x82", "-t 0x72"], "c3n1": ["-T 0x86", "-t 0x72"]},
        "commands": {"ipmi_reset": ["chassis", "power", "reset"], "ipmi_cycle": ["chassis", "power", "cycle"]},
    }},
    "10.49.16.17": {"ipmi": {"user": "username", "password": SECRET, "type": "moonshot"}},
    "10.49.58.3": {"ipmi": {"ip": "10.49.16.17", "addr": "c3n1"}},
}


# -- the roller under test ------------------------------------------------------------


#: dashboard accounts, made with `roller user add` before roller starts
USERS = {"olga": "operator", "vic": "viewer", "ada": "admin"}
PASSWORD = "browser-test password"


def add_users(roller: Any) -> None:
    """C{roller --state-dir STATE user add NAME --role ROLE --password-stdin}, as an admin would."""
    for name, role in USERS.items():
        done = subprocess.run(
            [sys.executable, "-m", "roller.cli", "--state-dir", str(roller.state_dir), "user", "add", name,
             "--role", role, "--password-stdin"],
            input=PASSWORD + "\n", env=roller_env(), cwd=roller.workdir, capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert PASSWORD not in done.stdout + done.stderr


@contextlib.contextmanager
def roller_with_dashboard() -> Iterator[Any]:
    """C{twistd -n roller --demo} on loopback, with the accounts in L{USERS}."""
    roller = RollerProcess(["--auth", "none", "--demo"], env={
        "ROLLER_DEMO_FLEET_SIZE": "3", "ROLLER_REBOOT_POLL_INTERVAL": "0.2"})
    add_users(roller)
    roller.start()
    try:
        yield roller
    except BaseException:
        sys.stdout.write(f"\n---- roller log\n{roller.log_tail(120)}\n")
        raise
    finally:
        roller.close()


# -- the test ---------------------------------------------------------------------------


def _playwright() -> Any:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (make system-deps)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install playwright (never `playwright install`)")
    return sync_playwright


def screenshot_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("ROLLER_SCREENSHOTS") or tmp_path / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_dashboard_in_chromium(tmp_path: Path) -> None:
    sync_playwright = _playwright()
    from playwright.sync_api import expect

    shots = screenshot_dir(tmp_path)
    update_readme = os.environ.get("ROLLER_UPDATE_SCREENSHOTS") == "1"

    def shot(page: Any, name: str) -> None:
        """A full-page screenshot as a test artifact (and, when asked, for the README)."""
        page.screenshot(path=str(shots / name), full_page=True)
        if update_readme and name in README_SHOTS:
            shutil.copyfile(shots / name, REPO / "static" / "screenshots" / name)

    with roller_with_dashboard() as roller, sync_playwright() as pw:
        base = roller.base_url
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            problems: list[str] = []
            expected = ("the server responded with a status of 400",  # the invalid machine form
                        "the server responded with a status of 403",  # the refused forgery below
                        "the server responded with a status of 401")  # the wrong password
            page.on("console", lambda m: problems.append(m.text)
                    if m.type == "error" and not any(x in m.text for x in expected) else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.set_default_timeout(15_000)

            def sign_in(name: str, password: str = PASSWORD) -> None:
                if page.get_by_role("button", name="Sign out").count():
                    page.get_by_role("button", name="Sign out").click()
                    expect(page.get_by_text("You are signed out.")).to_be_visible()
                else:
                    page.goto(base + "/login")
                page.get_by_label("User name").fill(name)
                page.get_by_label("Password").fill(password)
                page.get_by_role("button", name="Sign in").click()
                expect(page.locator(".viewer-name")).to_have_text(name)

            # -- demo mode lets loopback in as "demo" and says so; the operator signs in
            page.goto(base + "/")
            expect(page.locator("header .viewer")).to_contain_text("demo mode")
            page.goto(base + "/login")
            page.get_by_label("User name").fill("olga")
            page.get_by_label("Password").fill("not the password")
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_role("alert")).to_contain_text("Wrong user name or password.")
            shot(page, "login-refused.png")
            sign_in("olga")
            expect(page.locator("header .viewer")).to_contain_text("(operator)")

            # -- nothing has run yet: the queue says so plainly
            page.goto(base + "/queue")
            expect(page.locator("#queue-empty")).to_contain_text("The queue is empty")
            shot(page, "queue-empty.png")

            # -- the fleet: find sim-001 by search, with the keyboard
            page.goto(base + "/")
            expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
            expect(page.locator("table.fleet tbody tr")).to_have_count(7)  # demo-1..3, demo-closed, sim-001..003
            expect(page.get_by_role("link", name="Add a machine")).to_have_count(0)  # not for an operator
            page.get_by_label("Search").fill("sim-001")
            page.get_by_label("Search").press("Enter")
            expect(page.locator("table.fleet tbody tr")).to_have_count(1)
            shot(page, "fleet-search.png")
            page.get_by_role("link", name="sim-001", exact=True).click()

            # -- the machine page: reboot sim-001, confirming in the browser
            expect(page.get_by_role("heading", name=re.compile(r"^sim-001"))).to_be_visible()
            expect(page.get_by_text("demo-fleet-ssh").first).to_be_visible()  # credential by name
            shot(page, "machine-sim-001.png")
            dialogs: list[str] = []

            def accept(dialog: Any) -> None:
                dialogs.append(dialog.message)
                dialog.accept()

            page.once("dialog", accept)
            page.get_by_label("Reason").fill("browser test: reboot sim-001")
            page.get_by_text(re.compile(r"^Power, reboot and other disruptive tasks")).click()  # the menu
            page.get_by_role("button", name="Run reboot", exact=True).click()
            expect(page).to_have_url(re.compile(r"/jobs/[0-9a-f-]{36}$"))
            assert dialogs and "Run reboot on sim-001?" in dialogs[0]
            job_id = page.url.rsplit("/", 1)[1]

            # -- the job page: the live log reaches "succeeded" without a reload
            page.evaluate("window.__notReloaded = true")
            expect(page.locator("#live-status")).to_contain_text("Live", timeout=5_000)
            expect(page.locator("#job-state")).to_have_text("succeeded", timeout=45_000)
            assert page.evaluate("window.__notReloaded === true"), "the job page reloaded"
            expect(page.locator("#job-outcome")).to_contain_text("Succeeded: ssh_reboot")
            expect(page.locator("#timeline")).to_contain_text("up after")
            expect(page.locator("#job-cancel")).to_have_count(0)
            expect(page.locator("#live-status")).to_have_text("Finished: succeeded.")
            # the times the update filled in read like the others: relative, UTC in the tooltip
            for cell in ("#job-started", "#job-finished"):
                expect(page.locator(f"{cell} time")).to_have_text(re.compile(r"(ago|just now)$"))
                expect(page.locator(f"{cell} time")).to_have_attribute("title", re.compile(r" UTC$"))
            shot(page, "job-reboot-succeeded.png")
            assert roller.json("GET", f"/api/v1/jobs/{job_id}")["state"] == "succeeded"

            # -- the queue: a ping waits behind sim-002's reboot; cancel it there
            page.goto(base + "/machines/demo/sim-002")
            page.once("dialog", lambda d: d.accept())
            page.locator("#destructive-tasks summary").click()
            page.get_by_role("button", name="Run reboot", exact=True).click()
            expect(page).to_have_url(re.compile(r"/jobs/"))
            page.goto(base + "/machines/demo/sim-002")
            page.get_by_role("button", name="Run ping", exact=True).click()  # no confirmation for ping
            expect(page.locator("#job-outcome")).to_contain_text("Waiting in the queue")
            ping_id = page.url.rsplit("/", 1)[1]
            page.goto(base + "/queue")
            expect(page.get_by_role("heading", name=re.compile("^Waiting"))).to_be_visible()
            shot(page, "queue.png")
            cancel = page.get_by_role("button", name=f"Cancel job {ping_id[:8]} (ping on sim-002)")
            cancel.focus()
            page.keyboard.press("Enter")  # keyboard reachable
            expect(page).to_have_url(re.compile(r"/queue\?cancelled="))
            expect(page.get_by_role("status").first).to_contain_text(f"Cancelled job {ping_id[:8]}")
            shot(page, "queue-cancelled.png")
            assert roller.json("GET", f"/api/v1/jobs/{ping_id}")["state"] == "cancelled"

            # -- CSRF: a form from another site, and a POST without a token, are refused
            def no_sim_003_jobs() -> bool:
                return roller.json("GET", "/api/v1/jobs?worker_id=sim-003")["jobs"] == []

            evil = ('<!doctype html><title>prize</title><form method="post" '
                    f'action="{base}/machines/demo/sim-003/jobs"><input type="hidden" name="task" value="reboot">'
                    '<input type="hidden" name="confirm" value="yes"><button>Claim your prize</button></form>')
            page.route("http://evil.test/**", lambda route: route.fulfill(
                status=200, content_type="text/html", body=evil))
            page.goto("http://evil.test/")
            page.get_by_role("button", name="Claim your prize").click()
            expect(page.get_by_role("heading", name=re.compile("Not allowed"))).to_be_visible()
            expect(page.get_by_role("alert")).to_contain_text("another site")
            expect(page.get_by_text("Nothing was done.")).to_be_visible()
            shot(page, "csrf-rejected.png")
            r = page.request.post(base + "/machines/demo/sim-003/jobs", form={"task": "ping"},
                                  max_redirects=0)  # same browser, its cookie, but no token
            assert r.status == 403 and "no security token" in r.text()
            assert no_sim_003_jobs()

            # -- hostile inventory text is shown as text, never run
            evil_note = '<script>alert("note")</script><img src=x onerror=alert("img")>'
            roller.json("PUT", "/api/v1/machines/demo/xss-1", {"ip": "192.0.2.66", "notes": evil_note}, expect=201)
            alerts: list[str] = []
            page.on("dialog", lambda d: (alerts.append(d.message), d.dismiss()))
            page.goto(base + "/machines/demo/xss-1")
            expect(page.locator("dd.notes")).to_have_text(evil_note)
            assert alerts == [] and page.locator("dd.notes img, dd.notes script").count() == 0

            # -- a viewer sees no task buttons; only an admin reads the audit log
            sign_in("vic")
            page.goto(base + "/machines/demo/sim-003")
            expect(page.locator("#no-tasks")).to_contain_text("vic (viewer) may not run tasks")
            expect(page.get_by_role("button", name="Run reboot")).to_have_count(0)
            # nor links to the inventory admin pages, which would only refuse them
            expect(page.get_by_role("link", name="Edit sim-003")).to_have_count(0)
            expect(page.get_by_role("link", name="Delete sim-003")).to_have_count(0)
            shot(page, "machine-as-viewer.png")
            page.goto(base + "/")
            expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
            expect(page.get_by_role("link", name="Add a machine")).to_have_count(0)
            expect(page.get_by_role("link", name="Import a legacy inventory file")).to_have_count(0)
            sign_in("ada")

            # -- the admin adds a machine through the form; a bad IP is shown next to its field
            page.goto(base + "/")
            page.get_by_role("link", name="Add a machine").click()
            expect(page.get_by_role("heading", name="Add a machine")).to_be_visible()
            shot(page, "admin-add.png")
            page.get_by_label("Worker group").fill("browser")
            page.get_by_label("Worker id").fill("bt-001")
            page.get_by_label("IP address").fill("not an ip")
            page.get_by_label("Pool", exact=True).fill("bt-pool")
            page.get_by_label("Liveness check").select_option("tcp")
            page.get_by_label("Liveness TCP port").fill("9")
            page.get_by_label("Notes").fill("added by the browser test")
            page.get_by_role("button", name="Add the machine").click()
            expect(page.get_by_role("alert")).to_contain_text("Not saved.")
            ip_field = page.locator(".field.invalid")
            expect(ip_field).to_have_count(1)
            expect(ip_field.get_by_label("IP address")).to_have_attribute("aria-invalid", "true")
            expect(ip_field.locator(".field-error")).to_have_text("'not an ip' is not an IP address")
            expect(page.get_by_label("Pool", exact=True)).to_have_value("bt-pool")  # the form comes back as filled in
            expect(page.get_by_label("Notes")).to_have_value("added by the browser test")
            shot(page, "admin-add-invalid.png")
            page.get_by_label("IP address").fill("127.0.0.9")
            page.get_by_label("IP address").press("Enter")  # submit with the keyboard
            expect(page).to_have_url(re.compile(r"/machines/browser/bt-001\?saved=1$"))
            expect(page.get_by_role("heading", name=re.compile(r"^bt-001"))).to_be_visible()
            expect(page.locator("dl.facts")).to_contain_text("127.0.0.9")
            expect(page.locator("dl.facts")).to_contain_text("bt-pool")
            expect(page.get_by_text("No job has run on bt-001 yet.")).to_be_visible()
            page.goto(base + "/?q=bt-001")
            expect(page.locator("table.fleet tbody tr")).to_have_count(1)
            expect(page.get_by_role("link", name="bt-001", exact=True)).to_be_visible()

            # -- edit it from its machine page
            page.get_by_role("link", name="bt-001", exact=True).click()
            page.get_by_role("link", name="Edit bt-001").click()
            expect(page.get_by_role("heading", name=re.compile(r"^Edit bt-001"))).to_be_visible()
            expect(page.get_by_label("Worker id")).to_have_value("bt-001")
            expect(page.get_by_label("IP address")).to_have_value("127.0.0.9")
            page.get_by_label("Pool", exact=True).fill("bt-pool-2")
            page.get_by_role("button", name="Save bt-001").click()
            expect(page).to_have_url(re.compile(r"/machines/browser/bt-001\?saved=1$"))
            expect(page.locator("dl.facts")).to_contain_text("bt-pool-2")
            assert roller.json("GET", "/api/v1/machines/browser/bt-001")["pool"] == "bt-pool-2"

            # -- a failed job says why in plain words (its liveness port is closed)
            page.get_by_role("button", name="Run ping", exact=True).click()
            expect(page).to_have_url(re.compile(r"/jobs/[0-9a-f-]{36}$"))
            expect(page.locator("#job-state")).to_have_text("failed", timeout=30_000)
            expect(page.locator("#job-outcome")).to_have_text(
                re.compile(r"^Failed: 127\.0\.0\.9 is not answering: connection refused"))
            failed_reason = page.locator("#job-outcome").inner_text()
            assert "Traceback" not in failed_reason and "Failure" not in failed_reason, failed_reason
            shot(page, "job-failed.png")

            # -- delete it, after a confirmation page
            page.get_by_role("link", name="bt-001", exact=True).first.click()
            expect(page.get_by_role("cell", name="ping", exact=True)).to_be_visible()  # the job history
            page.get_by_role("link", name="Delete bt-001").click()
            expect(page.get_by_role("heading", name=re.compile(r"^Delete bt-001"))).to_be_visible()
            page.get_by_role("button", name="Yes, delete bt-001").click()
            expect(page.get_by_role("status")).to_contain_text("Deleted browser/bt-001.")
            page.goto(base + "/?q=bt-001")
            expect(page.get_by_text("No machine matches this search.")).to_be_visible()

            # -- import a legacy ipmi.json by upload: the per-entry report, no secret on the page
            upload = tmp_path / "ipmi.json"
            upload.write_text(json.dumps(LEGACY_IPMI))
            page.goto(base + "/")
            page.get_by_role("link", name="Import a legacy inventory file").click()
            expect(page.get_by_role("heading", name="Import a legacy inventory file")).to_be_visible()
            page.get_by_label("Legacy file").set_input_files(str(upload))
            page.get_by_label("Worker group for new machines").fill("legacy")
            page.get_by_role("button", name="Upload and import").click()
            expect(page.get_by_role("heading", name="Imported ipmi.json")).to_be_visible()
            report = page.locator("table.report tbody")
            expect(report.locator("tr")).to_have_count(2)
            imported = report.get_by_role("row", name=re.compile(r"^10\.49\.58\.3 "))
            expect(imported.get_by_role("cell").nth(0)).to_have_text("imported")
            expect(imported.get_by_role("link", name="legacy/10-49-58-3")).to_be_visible()
            skipped = report.get_by_role("row", name=re.compile(r"^10\.49\.16\.17 "))
            expect(skipped.get_by_role("cell").nth(0)).to_have_text("skipped")
            expect(skipped).to_contain_text("chassis BMC")
            expect(page.locator("#report-h + p")).to_contain_text("1 imported")
            expect(page.get_by_text("ipmi-10.49.16.17")).to_have_count(2)  # the reason, and the credential names
            assert SECRET not in page.content()
            shot(page, "import-report.png")
            assert roller.json("GET", "/api/v1/machines/legacy/10-49-58-3")["worker_id"] == "10-49-58-3"

            # -- audit, and a phone-sized fleet page
            page.goto(base + "/audit")
            expect(page.get_by_role("cell", name="job.cancel")).to_be_visible()
            for action in ("machine.create", "machine.put", "machine.delete", "machines.import"):
                expect(page.get_by_role("cell", name=action, exact=True).first).to_be_visible()
            assert SECRET not in page.content()
            shot(page, "audit.png")
            phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
            small = phone.new_page()
            small.goto(base + "/")
            assert small.evaluate("document.documentElement.scrollWidth") <= 390 + 1, "the page scrolls sideways"
            shot(small, "fleet-phone.png")
            phone.close()

            # -- sign out: back to the sign-in page
            page.get_by_role("button", name="Sign out").click()
            expect(page.get_by_text("You are signed out.")).to_be_visible()
            expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
            expect(page.get_by_label("User name")).to_be_visible()
            expect(page.get_by_label("Password")).to_be_visible()
            shot(page, "sign-in.png")
            assert not problems, problems  # no script errors, nothing blocked by the CSP
        finally:
            browser.close()
