"""
The dashboard in a real browser: Debian's chromium driven by Playwright
against a real roller process with the demo fleet (simulated machines that
really reboot over SSH), on 127.0.0.1 only.

Until the dashboard is wired into C{roller/service.py}, the roller under
test is this file run as a script (C{python tests/test_browser.py --serve
...}): the same store, queue, demo fleet and API as C{twistd roller --demo},
plus the dashboard, event hub and C{root_resource}, composed exactly as the
integration snippet does.  Once C{roller.service} imports C{root_resource}
the test runs C{twistd -n roller --demo} itself (L{RollerProcess}).

Accounts (an operator, a viewer and an admin) are added to the database
before roller starts; the browser signs in through the sign-in form (demo
mode would let loopback in as "demo" without it, and the test checks that
the page says so).

Screenshots go to C{test-artifacts/} (git-ignored).  Skipped, saying why,
when C{/usr/bin/chromium} or the C{playwright} package is missing; never
runs C{playwright install}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


# -- the roller under test ------------------------------------------------------------


def serve(port: int, state_dir: str, ssh_port: int) -> None:
    """
    Run roller with the demo fleet and the dashboard on 127.0.0.1:PORT until
    SIGTERM: what RollerService._start does, plus the dashboard wiring.
    """
    from attrs import evolve
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import globalLogBeginner

    from roller.config import load_settings
    from roller.demo import seed_demo_fleet, start_demo_fleet
    from roller.drivers.registry import make_drivers
    from roller.logs import observer_for
    from roller.queue import JobQueue
    from roller.secrets import load_secrets
    from roller.service import make_authenticator, queue_limits
    from roller.store import open_store
    from roller.tasks import builtin_tasks
    from roller.web.api import Api
    from roller.web.dashboard import Dashboard, LoopbackDashboardAuth
    from roller.web.events import EventHub
    from roller.web.http import RollerSite
    from roller.web.site import root_resource

    globalLogBeginner.beginLoggingTo([observer_for("text", sys.stdout)])
    parts: dict[str, Any] = {}

    async def start() -> None:
        s = load_settings(None, {}, {
            "state_dir": state_dir, "server.listen": f"tcp:{port}:interface=127.0.0.1", "auth.mode": "none",
            "demo": "true", "reboot.poll_interval": "0.2",
        })
        secrets = load_secrets(s.secrets_file)
        store = await open_store(s.db_path, reactor)
        demo = await start_demo_fleet(reactor, s.state_dir, count=3, ssh_port=ssh_port, down_for=3.0,
                                      reboot_delay=0.3)
        parts.update(store=store, demo=demo)
        secrets = secrets.merged(demo.secrets.as_dict(), replace=True)
        s = evolve(s, ssh_known_hosts=demo.known_hosts)
        await seed_demo_fleet(store, demo.fleet.inventory_json("demo"))
        tasks = builtin_tasks()
        queue = JobQueue(store, tasks, reactor, limits=queue_limits(s), settings=s, secrets=secrets,
                         drivers=make_drivers(reactor, s))
        # -- the integration snippet ------------------------------------------
        hub = EventHub(queue, reactor)
        hub.start()  # before queue.start(): it sees the events of recovered jobs too
        await queue.start()
        api = Api(store=store, queue=queue, tasks=tasks, authenticator=make_authenticator(s, reactor, secrets),
                  allowed_tasks=s.allowed_tasks, scope_prefix=s.scope_prefix, cors_origins=s.cors_origins,
                  clock=reactor, trusted_proxies=s.trusted_proxies)
        dashboard = Dashboard(store, queue, tasks, s.allowed_tasks, clock=reactor, hub=hub,
                              auth=LoopbackDashboardAuth(), scope_prefix=s.scope_prefix,
                              trusted_proxies=s.trusted_proxies)
        site = RollerSite(root_resource(api, dashboard, hub), max_body=s.max_body, reactor=reactor)
        site.noisy = False
        # -----------------------------------------------------------------------
        parts.update(queue=queue, hub=hub)
        for desc in s.listen:
            await serverFromString(reactor, desc).listen(site)
        print(f"roller (browser test) listening on 127.0.0.1:{port}", flush=True)

    async def stop() -> None:
        if "hub" in parts:
            parts["hub"].stop()
        if "queue" in parts:
            await parts["queue"].stop()
        if "store" in parts:
            await parts["store"].close()
        if "demo" in parts:
            await parts["demo"].fleet.stop()

    def failed(f: Any) -> None:
        print(f"roller (browser test) could not start: {f.getTraceback()}", flush=True)
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(start()).addErrback(failed))
    reactor.addSystemEventTrigger("before", "shutdown", lambda: ensureDeferred(stop()))
    reactor.run()


def dashboard_is_wired() -> bool:
    import roller.service

    return "root_resource" in vars(roller.service)


class StandaloneRoller:
    """This file's L{serve} as a child process (the RollerProcess interface the test uses)."""

    def __init__(self) -> None:
        from roller.testing.process import free_port, http_request, roller_env

        self._http = http_request
        self.tmp = tempfile.TemporaryDirectory(prefix="roller-browser-")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(self.tmp.name) / "roller.log"
        self.env = roller_env()
        self.ssh_port = int(self.env["ROLLER_DEMO_SSH_PORT"])
        self.process: subprocess.Popen | None = None

    def start(self) -> "StandaloneRoller":
        from roller.testing.process import wait_for

        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, __file__, "--serve", "--port", str(self.port), "--ssh-port", str(self.ssh_port),
                 "--state-dir", str(Path(self.tmp.name) / "state")],
                env=self.env, cwd=self.tmp.name, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"roller exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                return self.get("/__lbheartbeat__", timeout=2).status == 200
            except OSError:
                return False

        wait_for(ready, 20, "roller to listen", describe=self.log_tail)
        return self

    def get(self, path: str, **kw: Any) -> Any:
        return self._http("GET", self.base_url + path, **kw)

    def json(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        r = self._http(method, self.base_url + path, body)
        assert r.status == expect, (r, self.log_tail())
        return r.json()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.tmp.cleanup()


#: dashboard accounts made before roller starts (as `roller user add` would)
USERS = {"olga": "operator", "vic": "viewer", "ada": "admin"}
PASSWORD = "browser-test password"


def add_users(db_path: Path) -> None:
    from roller.auth.accounts import hash_password
    from roller.testing.syncdb import result_of, sync_store

    store, clock = sync_store(str(db_path))
    try:
        for name, role in USERS.items():
            result_of(store.users.add(name, role, hash_password(PASSWORD, ln=10), 0.0))
    finally:
        result_of(store.close())


@contextlib.contextmanager
def roller_with_dashboard() -> Iterator[Any]:
    if dashboard_is_wired():
        from roller.testing.process import RollerProcess

        roller = RollerProcess(["--auth", "none", "--demo"], env={
            "ROLLER_DEMO_FLEET_SIZE": "3", "ROLLER_REBOOT_POLL_INTERVAL": "0.2"})
        add_users(roller.db_path)
    else:
        roller = StandaloneRoller()
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


def test_dashboard_in_chromium() -> None:
    sync_playwright = _playwright()
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    with roller_with_dashboard() as roller, sync_playwright() as pw:
        base = roller.base_url
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            problems: list[str] = []
            expected = ("the server responded with a status of 403",  # the refused forgery below
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
            page.screenshot(path=str(ARTIFACTS / "login-refused.png"), full_page=True)
            sign_in("olga")
            expect(page.locator("header .viewer")).to_contain_text("(operator)")

            # -- the fleet: find sim-001 by search, with the keyboard
            page.goto(base + "/")
            expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
            expect(page.locator("table.fleet tbody tr")).to_have_count(7)  # demo-1..3, demo-closed, sim-001..003
            page.get_by_label("Search").fill("sim-001")
            page.get_by_label("Search").press("Enter")
            expect(page.locator("table.fleet tbody tr")).to_have_count(1)
            page.screenshot(path=str(ARTIFACTS / "fleet-search.png"), full_page=True)
            page.get_by_role("link", name="sim-001", exact=True).click()

            # -- the machine page: reboot sim-001, confirming in the browser
            expect(page.get_by_role("heading", name=re.compile(r"^sim-001"))).to_be_visible()
            expect(page.get_by_text("demo-fleet-ssh").first).to_be_visible()  # credential by name
            page.screenshot(path=str(ARTIFACTS / "machine-sim-001.png"), full_page=True)
            dialogs: list[str] = []

            def accept(dialog: Any) -> None:
                dialogs.append(dialog.message)
                dialog.accept()

            page.once("dialog", accept)
            page.get_by_label("Reason").fill("browser test: reboot sim-001")
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
            page.screenshot(path=str(ARTIFACTS / "job-reboot-succeeded.png"), full_page=True)
            assert roller.json("GET", f"/api/v1/jobs/{job_id}")["state"] == "succeeded"

            # -- the queue: a ping waits behind sim-002's reboot; cancel it there
            page.goto(base + "/machines/demo/sim-002")
            page.once("dialog", lambda d: d.accept())
            page.get_by_role("button", name="Run reboot", exact=True).click()
            expect(page).to_have_url(re.compile(r"/jobs/"))
            page.goto(base + "/machines/demo/sim-002")
            page.get_by_role("button", name="Run ping", exact=True).click()  # no confirmation for ping
            expect(page.locator("#job-outcome")).to_contain_text("Waiting in the queue")
            ping_id = page.url.rsplit("/", 1)[1]
            page.goto(base + "/queue")
            expect(page.get_by_role("heading", name=re.compile("^Waiting"))).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "queue.png"), full_page=True)
            cancel = page.get_by_role("button", name=f"Cancel job {ping_id[:8]} (ping on sim-002)")
            cancel.focus()
            page.keyboard.press("Enter")  # keyboard reachable
            expect(page).to_have_url(re.compile(r"/queue\?cancelled="))
            expect(page.get_by_role("status").first).to_contain_text(f"Cancelled job {ping_id[:8]}")
            page.screenshot(path=str(ARTIFACTS / "queue-cancelled.png"), full_page=True)
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
            page.screenshot(path=str(ARTIFACTS / "csrf-rejected.png"), full_page=True)
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
            page.screenshot(path=str(ARTIFACTS / "machine-as-viewer.png"), full_page=True)
            sign_in("ada")

            # -- audit, and a phone-sized fleet page
            page.goto(base + "/audit")
            expect(page.get_by_role("cell", name="job.cancel")).to_be_visible()
            phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
            small = phone.new_page()
            small.goto(base + "/")
            assert small.evaluate("document.documentElement.scrollWidth") <= 390 + 1, "the page scrolls sideways"
            small.screenshot(path=str(ARTIFACTS / "fleet-phone.png"), full_page=True)
            phone.close()
            assert not problems, problems  # no script errors, nothing blocked by the CSP
        finally:
            browser.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="roller with the dashboard, for the browser test")
    parser.add_argument("--serve", action="store_true", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ssh-port", type=int, required=True)
    parser.add_argument("--state-dir", required=True)
    a = parser.parse_args()
    serve(a.port, a.state_dir, a.ssh_port)
