"""
What a hostile client or a hostile page can send roller, over real HTTP to a
real roller process (C{twistd -n roller --auth none --demo}, the demo's and
C{make run}'s set-up, with a TLS listener next to the plain one):

  - cross-site requests: what a browser sends for a form POST and for a
    C{no-cors} fetch from a page on another origin, to every mutating API
    route, is refused (403 C{cross_site_request}) and queues nothing, while
    curl, Taskcluster-shaped clients, roller's own origin, C{public_url} and
    C{cors_origins} go through; and Chromium itself, opening a page served
    from another loopback origin, queues nothing;
  - JSON nested deeper than L{MAX_JSON_DEPTH} (a RecursionError, a 500,
    before) on every JSON route, C{/admin/import} and C{roller import};
  - protocol edges: NUL and invalid UTF-8 in paths and queries, double
    slashes, huge and duplicate query values, non-UTF-8 bodies: 4xx, never
    500, JSON on the API;
  - C{X-Content-Type-Options: nosniff} on every response, C{Strict-Transport-
    Security} on the TLS listener only; the OpenAPI C{task_name} enum is the
    allowed tasks, no more.

Each wait on the network is bounded by a socket timeout that only a hang
reaches.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import attrs
import pytest

from roller.json_input import MAX_JSON_DEPTH, JSONTooDeep, json_depth, load_json
from roller.testing.process import RollerProcess, free_port, roller_env
from roller.testing.sushy import make_tls_files
from roller.web.api import Api

TIMEOUT = 20  # seconds; only a hang reaches it
PUBLIC_URL = "https://roller.example.test"
CORS_ORIGIN = "https://tc.example.test"
EVIL = "http://evil.example.test"
#: a machine whose ping fails at once (no address): a job that got through shows in the jobs list
TARGET = ("g1", "m1")


# -- a raw HTTP client (any bytes in the request line) -----------------------------------


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), (self.status, self.headers)
        return json.loads(self.body)

    def error(self) -> str:
        body = self.json()
        assert set(body) == {"error", "message"} and body["message"], body
        return body["error"]


def send(port: int, method: str, target: bytes | str, headers: dict[str, str] | None = None,
         body: bytes = b"", *, ca: str | None = None) -> Answer:
    """One request on its own connection; C{target} goes on the wire as given."""
    if isinstance(target, str):
        target = target.encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    if ca is not None:
        sock = ssl.create_default_context(cafile=ca).wrap_socket(sock, server_hostname="127.0.0.1")
    try:
        head = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1:%d" % port, b"Connection: close"]
        head += [f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT", "DELETE"):
            head.append(b"Content-Length: %d" % len(body))
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        data = response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        sock.close()


# -- the roller under test ---------------------------------------------------------------


@pytest.fixture(scope="module")
def roller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RollerProcess]:
    tmp = tmp_path_factory.mktemp("hostile")
    ca, cert, key = make_tls_files(tmp / "tls", hosts=("127.0.0.1",))
    tls_port = free_port()
    r = RollerProcess(
        ["--auth", "none", "--demo",
         "--listen", f"ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"],
        state_dir=tmp / "state",
        env={"ROLLER_DEMO_FLEET_SIZE": "0", "ROLLER_SERVER_PUBLIC_URL": PUBLIC_URL,
             "ROLLER_SERVER_CORS_ORIGINS": CORS_ORIGIN})
    r.tls_port, r.ca = tls_port, ca
    r.start()
    try:
        for group, wid in (TARGET, ("g1", "m2")):
            assert r.request("PUT", f"/api/v1/machines/{group}/{wid}", {}).status in (200, 201)
        yield r
    except BaseException:
        sys.stdout.write(f"\n{r.log_tail(80)}\n")
        raise
    finally:
        r.close()


def jobs_of(roller: RollerProcess, worker_id: str = TARGET[1]) -> list[dict]:
    return roller.json("GET", f"/api/v1/jobs?worker_id={worker_id}&limit=1000")["jobs"]


def machines(roller: RollerProcess) -> set[tuple[str, str]]:
    listed = roller.json("GET", "/api/v1/machines?limit=1000")["machines"]
    return {(m["worker_group"], m["worker_id"]) for m in listed}


# -- cross-site requests ----------------------------------------------------------------


def mutating_routes() -> list[tuple[str, str]]:
    """(method, path) of every API route that may change something, placeholders filled in."""
    group, wid = TARGET
    values = {"worker_group": group, "worker_id": wid, "task_id": "00000000-0000-0000-0000-000000000000",
              "batch_id": "00000000-0000-0000-0000-000000000000"}
    routes = []
    for rule in Api.app.url_map.iter_rules():
        for method in sorted((rule.methods or set()) - {"GET", "HEAD", "OPTIONS"}):
            path = rule.rule
            for name, value in values.items():
                path = path.replace(f"<{name}>", value)
            assert "<" not in path, f"fill in the placeholder of {rule.rule}"
            routes.append((method, path + "?task_name=ping&tc_worker_id=" + wid))
    assert {m for m, _ in routes} == {"POST", "PUT", "DELETE"}, routes
    return routes


def other_origin(roller: RollerProcess) -> str:
    return f"http://127.0.0.1:{roller.port + 1 if roller.port < 65535 else roller.port - 1}"


def browser_forgeries(roller: RollerProcess) -> dict[str, tuple[dict[str, str], bytes]]:
    """The headers (and body) Chromium and Firefox send for requests a page on another origin makes."""
    loopback = other_origin(roller)  # another port of the same host: "same-site" to a browser
    form = {"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Mode": "navigate",
            "Sec-Fetch-Dest": "iframe", "Upgrade-Insecure-Requests": "1",
            "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
    no_cors = {"Content-Type": "text/plain;charset=UTF-8", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "empty",
               "Accept": "*/*"}
    return {
        "empty form, other loopback port": ({**form, "Origin": loopback, "Sec-Fetch-Site": "same-site",
                                             "Referer": loopback + "/"}, b""),
        "form with a field, other site": ({**form, "Origin": EVIL, "Sec-Fetch-Site": "cross-site",
                                           "Referer": EVIL + "/"}, b"reason=x"),
        "multipart form, other site": ({**form, "Content-Type": "multipart/form-data; boundary=b", "Origin": EVIL,
                                        "Sec-Fetch-Site": "cross-site"},
                                       b'--b\r\nContent-Disposition: form-data; name="reason"\r\n\r\nx\r\n--b--\r\n'),
        "form from a sandboxed frame": ({**form, "Origin": "null", "Sec-Fetch-Site": "cross-site"}, b""),
        "no-cors fetch, other site": ({**no_cors, "Origin": EVIL, "Sec-Fetch-Site": "cross-site"}, b"{}"),
        "no-cors fetch without a body": ({**no_cors, "Origin": loopback, "Sec-Fetch-Site": "same-site"}, b""),
        # an old or privacy-minded browser that leaves Origin out still marks the fetch
        "no Origin, Sec-Fetch-Site cross-site": ({**no_cors, "Sec-Fetch-Site": "cross-site"}, b""),
        "no Origin, Sec-Fetch-Site same-site": ({**form, "Sec-Fetch-Site": "same-site"}, b""),
        # the attacker's own origin spelled like roller's (another scheme)
        "https origin of roller's host and port": ({"Origin": f"https://127.0.0.1:{roller.port}",
                                                    "Sec-Fetch-Site": "cross-site"}, b""),
    }


def test_browser_forgeries_are_refused_on_every_mutating_route(roller: RollerProcess) -> None:
    before_jobs, before_machines = jobs_of(roller), machines(roller)
    refused = 0
    for method, path in mutating_routes():
        for what, (headers, body) in browser_forgeries(roller).items():
            a = send(roller.port, method, path, headers, body)
            assert a.status == 403, (what, method, path, a)
            assert a.error() == "cross_site_request", (what, method, path)
            assert "access-control-allow-origin" not in a.headers
            refused += 1
    assert refused == len(mutating_routes()) * len(browser_forgeries(roller))
    assert jobs_of(roller) == before_jobs and machines(roller) == before_machines


def test_curl_taskcluster_and_allowed_origins_still_work(roller: RollerProcess) -> None:
    group, wid = TARGET
    url = f"/api/v1/workers/{wid}/group/{group}/jobs?task_name=ping"
    allowed = {
        # curl -X POST: no Origin, no Sec-Fetch-*, no body
        "curl": {"User-Agent": "curl/8.5.0", "Accept": "*/*"},
        # curl -d '' sends a form content type with an empty body
        "curl -d ''": {"User-Agent": "curl/8.5.0", "Content-Type": "application/x-www-form-urlencoded"},
        # Taskcluster's clients: Hawk header, no body (auth.mode none ignores it)
        "taskcluster client": {"Authorization": 'Hawk id="c", ts="1", nonce="n", mac="m"',
                               "User-Agent": "taskcluster-client-py"},
        # roller's own pages (same origin), public_url and a configured CORS origin
        "same origin": {"Origin": f"http://127.0.0.1:{roller.port}", "Sec-Fetch-Site": "same-origin",
                        "Content-Type": "application/json"},
        "public_url": {"Origin": PUBLIC_URL, "Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"},
        "cors origin": {"Origin": CORS_ORIGIN, "Sec-Fetch-Site": "cross-site", "Content-Type": "application/json",
                        "Authorization": 'Hawk id="c", ts="1", nonce="n", mac="m"'},
        "typed URL": {"Sec-Fetch-Site": "none"},
    }
    for what, headers in allowed.items():
        a = send(roller.port, "POST", url, headers)
        assert a.status in (200, 201), (what, a)
        assert a.json()["task_id"], what
        if headers.get("Origin") == CORS_ORIGIN:
            assert a.headers.get("access-control-allow-origin") == CORS_ORIGIN
        roller.wait_job(a.json()["task_id"])
    # a JSON body from an allowed origin is read; a form body from it is not JSON
    a = send(roller.port, "POST", url, {"Origin": CORS_ORIGIN, "Content-Type": "application/json"},
             json.dumps({"reason": "from the Taskcluster UI"}).encode())
    assert a.status in (200, 201), a
    roller.wait_job(a.json()["task_id"])
    a = send(roller.port, "POST", url, {"Origin": CORS_ORIGIN, "Content-Type": "text/plain"}, b'{"reason": "x"}')
    assert (a.status, a.error()) == (415, "unsupported_media_type")
    # reading is never refused, from anywhere
    a = send(roller.port, "GET", "/api/v1/jobs", {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"})
    assert a.status == 200 and "access-control-allow-origin" not in a.headers
    a = send(roller.port, "OPTIONS", url, {"Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert a.status == 204 and "access-control-allow-origin" not in a.headers


ATTACK_PAGE = """<!doctype html>
<html><head><title>innocent page</title></head><body>
<iframe name="sink" id="sink"></iframe>
<form id="f" method="post" action="{target}/api/v1/workers/{wid}/group/{group}/jobs?task_name=ping" target="sink">
</form>
<form id="g" method="post" action="{target}/api/v1/jobs?tc_worker_id={wid}&task_name=ping" target="sink">
  <input name="reason" value="forged">
</form>
<script>
window.results = [];
const sink = document.getElementById("sink");
let loads = 0;
sink.addEventListener("load", () => {{
  loads += 1;
  if (loads === 1) document.getElementById("g").submit();
  if (loads === 2) window.results.push("forms");
}});
document.getElementById("f").submit();
const url = "{target}/api/v1/workers/{wid}/group/{group}/jobs?task_name=ping";
Promise.all([
  fetch(url, {{method: "POST", mode: "no-cors"}}),
  fetch(url, {{method: "POST", mode: "no-cors", body: "{{}}", headers: {{"Content-Type": "text/plain"}}}}),
  fetch("{target}/api/v1/machines", {{method: "POST", mode: "no-cors", body: "worker_id=x&worker_group=g1",
        headers: {{"Content-Type": "application/x-www-form-urlencoded"}}}}),
]).then(() => window.results.push("fetches"), (e) => window.results.push("fetch error " + e));
</script>
</body></html>
"""


@pytest.fixture
def attack_site(roller: RollerProcess) -> Iterator[str]:
    """A page on another loopback origin (another port) that forges requests to roller."""
    group, wid = TARGET
    page = ATTACK_PAGE.format(target=roller.base_url, group=group, wid=wid).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


def test_chromium_page_from_another_origin_queues_nothing(roller: RollerProcess, attack_site: str) -> None:
    from test_browser import CHROMIUM, CHROMIUM_ARGS, _playwright

    sync_playwright = _playwright()
    before_jobs, before_machines = jobs_of(roller), machines(roller)
    log_before = len(roller.log_text())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(attack_site)
            page.wait_for_function("window.results.length === 2", timeout=TIMEOUT * 1000)
            assert sorted(page.evaluate("window.results")) == ["fetches", "forms"]
        finally:
            browser.close()
    assert jobs_of(roller) == before_jobs and machines(roller) == before_machines
    # the five forged requests did reach roller, and were refused
    access = [line for line in roller.log_text()[log_before:].splitlines() if '"POST /api/v1/' in line]
    assert len(access) == 5, access
    assert all('HTTP/1.1" 403 ' in line for line in access), "\n".join(access)


# -- JSON nested too deep ----------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b'{"params": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_json_depth_measure() -> None:
    assert json_depth("1") == 0 and json_depth("[]") == 1 and json_depth('{"a": [{}]}') == 3
    assert json_depth('["[[[[", "\\\\", "\\"[[", {"k]": "{"}]') == 2  # brackets in strings do not count
    assert json_depth("[" * 100_000) == 100_000
    assert load_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    for text in (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), b"[" * 1_000_000):
        with pytest.raises(JSONTooDeep, match=f"at most {MAX_JSON_DEPTH}"):
            load_json(text)
    with pytest.raises(ValueError, match="not UTF-8"):
        load_json(b'{"a": "\xe9"}')


def json_routes() -> list[tuple[str, str]]:
    group, wid = TARGET
    return [("POST", f"/api/v1/workers/{wid}/group/{group}/jobs?task_name=ping"),
            ("POST", f"/api/v1/jobs?tc_worker_id={wid}&task_name=ping"),
            ("POST", "/api/v1/machines"),
            ("PUT", "/api/v1/machines/g1/deep")]


@pytest.mark.parametrize("body", [
    nested(MAX_JSON_DEPTH + 1), nested(1200), b"[" * 200_000, b'{"a":' * 50_000,
    b'{"params": {"x": ' + b"[" * 5000 + b'"]]]]"' + b"]" * 5000 + b"}}",
], ids=["limit+1", "1200", "200000-open", "50000-objects", "5000-with-strings"])
def test_deep_json_is_400_on_every_json_route(roller: RollerProcess, body: bytes) -> None:
    before = jobs_of(roller)
    for method, path in json_routes():
        a = send(roller.port, method, path, {"Content-Type": "application/json"}, body)
        assert (a.status, a.error()) == (400, "bad_json"), (method, path, a)
        assert f"at most {MAX_JSON_DEPTH}" in a.json()["message"]
    assert jobs_of(roller) == before and ("g1", "deep") not in machines(roller)
    assert "RecursionError" not in roller.log_text()


def test_deep_json_never_reaches_authentication_as_a_500(tmp_path: Path) -> None:
    # auth.mode unset: every call is refused, and a deep body before that is a 400, never a 500
    from treq.testing import StubTreq

    from roller.auth import UnconfiguredAuthenticator
    from roller.queue import JobQueue
    from roller.tasks import TaskRegistry, ping
    from roller.testing.syncdb import result_of, run, sync_store

    store, clock = sync_store(str(tmp_path / "api.db"))
    tasks = TaskRegistry([ping.TASK])
    queue = JobQueue(store, tasks, clock)
    run(queue.start())
    api = Api(store, queue, tasks, UnconfiguredAuthenticator("auth.mode is not set"), allowed_tasks=("ping",),
              clock=clock)
    client = StubTreq(api.app.resource())
    for method, path in json_routes():
        d = client.request(method, "http://roller.test" + path, data=b"[" * 100_000,
                           headers={"Content-Type": ["application/json"]})
        client.flush()
        response = result_of(d)
        body = json.loads(result_of(client.content(response)))
        assert (response.code, body["error"]) in ((400, "bad_json"), (401, "auth_not_configured")), body


def test_json_within_the_limit_is_read(roller: RollerProcess) -> None:
    # as deep as allowed: read, then refused for what it says (params of ping), not as JSON
    group, wid = TARGET
    a = send(roller.port, "POST", f"/api/v1/workers/{wid}/group/{group}/jobs?task_name=ping",
             {"Content-Type": "application/json"}, nested(MAX_JSON_DEPTH))
    assert a.status == 400 and a.error() not in ("invalid_json", "bad_json"), a


@pytest.mark.parametrize("body", [
    '{"reason": "caf\u00e9"}'.encode("latin-1"),  # Latin-1, not UTF-8
    '{"reason": "x"}'.encode("utf-16"),
    b"\xff\xfe\xfd", b'{"reason": "\xed\xa0\x80"}',  # a UTF-8-encoded surrogate
], ids=["latin-1", "utf-16", "garbage", "surrogate"])
def test_non_utf8_body_is_400_json(roller: RollerProcess, body: bytes) -> None:
    for method, path in json_routes():
        a = send(roller.port, method, path, {"Content-Type": "application/json"}, body)
        assert (a.status, a.error()) == (400, "invalid_json"), (method, path, a)


def test_deep_inventory_file_upload_and_roller_import(roller: RollerProcess, tmp_path: Path) -> None:
    # /admin/import: the demo lets loopback in as an admin; the form's token and cookie first
    form = send(roller.port, "GET", "/admin/import")
    assert form.status == 200, form
    token = re.search(rb'name="csrf_token" value="([^"]+)"', form.body).group(1).decode()
    cookie = "; ".join(c.split(";", 1)[0] for c in [form.headers.get("set-cookie", "")] if c)
    deep = b'{"10.0.0.1": {"ipmi": ' + b"[" * 3000 + b"]" * 3000 + b"}}"
    boundary = "hostileboundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\n{token}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="ipmi.json"\r\n'
            f"Content-Type: application/json\r\n\r\n").encode() + deep + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
               "Origin": roller.base_url, "Sec-Fetch-Site": "same-origin"}
    if cookie:
        headers["Cookie"] = cookie
    a = send(roller.port, "POST", "/admin/import", headers, body)
    assert a.status == 400, a
    assert b"ipmi.json is not valid JSON" in a.body and f"at most {MAX_JSON_DEPTH}".encode() in a.body

    # roller import: the same file, a readable error and exit status 2, no traceback
    path = tmp_path / "ipmi.json"
    path.write_bytes(deep)
    done = subprocess.run([sys.executable, "-m", "roller.cli", "--state-dir", str(tmp_path / "state"),
                           "import", str(path), "--dry-run"],
                          env=roller_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "is not valid JSON" in done.stderr and f"at most {MAX_JSON_DEPTH}" in done.stderr, done.stderr


def nested_multipart(depth: int) -> bytes:
    body = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
                    for i in range(depth))
    return body + b"x\r\n" + b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth)))


def test_deeply_nested_multipart_is_refused_not_dropped(roller: RollerProcess) -> None:
    # Twisted's own form parsing (off: RollerSite) and /admin/import's recursed once per level
    log_before = len(roller.log_text())
    body = nested_multipart(3000)
    for path in ("/admin/import", "/login", "/machines/g1/m1/jobs", "/api/v1/machines",
                 f"/api/v1/jobs?tc_worker_id={TARGET[1]}&task_name=ping"):
        a = send(roller.port, "POST", path, {"Content-Type": "multipart/form-data; boundary=b0"}, body)
        assert 400 <= a.status < 500, (path, a)
    logged = roller.log_text()[log_before:]
    assert "Unhandled Error" not in logged and "RecursionError" not in logged, logged[-3000:]


# -- protocol edges ----------------------------------------------------------------------


HOSTILE_TARGETS = [
    # NUL, control characters and over-long names under /static/
    b"/static/roller%00.css", b"/static/%00", b"/static/a%0a.css", b"/static/roller.css%00",
    b"/static/" + b"a" * 4000 + b".css", b"/static/%ff.css", b"/static/..%2f..%2fetc%2fpasswd",
    # double slashes
    b"/api/v1/machines/x//y", b"/api//v1/jobs", b"//api/v1/jobs", b"/api/v1/jobs//", b"/machines/g1//m1",
    b"/admin//import", b"/queue//", b"//", b"///static/roller.css",
    # NUL and invalid UTF-8 in path segments and queries
    b"/api/v1/jobs/%00", b"/api/v1/jobs/%ff%fe", b"/api/v1/machines/g1/m%00", b"/api/v1/machines/%ff/m1",
    b"/api/v1/jobs?state=%00", b"/api/v1/jobs?limit=%00", b"/api/v1/jobs?limit=%ff", b"/api/v1/jobs?task_name=%ff",
    b"/api/v1/jobs?worker_id=%00", b"/api/v1/machines?q=%00", b"/api/v1/machines?q=%ff%fe",
    b"/api/v1/audit?target=%ff", b"/api/v1/loans?active=%00", b"/jobs/%00", b"/jobs/%ff", b"/machines/%ff/x",
    b"/?q=%00", b"/?q=%ff", b"/queue?x=%ff", b"/audit?target=%00", b"/events?job=%ff", b"/events?job=%00",
    b"/%00", b"/api/v1/%00", b"/__heartbeat__%00", b"/api/v1/jobs/\xff",
    # huge and duplicate query values
    b"/api/v1/machines?q=" + b"x" * 7000, b"/?q=" + b"x" * 7000, b"/api/v1/jobs?task_name=" + b"%41" * 2300,
    b"/api/v1/jobs?limit=1&limit=x", b"/api/v1/jobs?state=running&state=%ff", b"/api/v1/jobs?limit=99999999999999999999",
    b"/api/v1/jobs?before=-1", b"/api/v1/audit?before=1e9", b"/api/v1/loans?offset=" + b"9" * 500,
]


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_hostile_targets_never_500(roller: RollerProcess, method: str) -> None:
    failures = []
    for target in HOSTILE_TARGETS:
        a = send(roller.port, method, target)
        path = target.split(b"?")[0]
        api = path.startswith((b"/api", b"/static", b"/events"))
        problem = None
        if a.status >= 500:
            problem = "5xx"
        elif 300 <= a.status < 400 and not a.headers.get("location"):
            problem = "redirect without Location"
        elif api and a.status != 200 and not a.headers.get("content-type", "").startswith("application/json"):
            problem = "not JSON"
        elif a.headers.get("x-content-type-options") != "nosniff":
            problem = "no nosniff"
        if problem:
            failures.append((problem, target[:80], a.status, a.body[:120]))
    assert not failures, "\n".join(map(repr, failures))
    assert "Unhandled error" not in roller.log_text() and "Traceback" not in roller.log_text()


def test_hostile_host_headers(roller: RollerProcess) -> None:
    for host in (b"\xff\xfe", b"roller.example\xe9:8080"):
        for target in (b"/api/v1/tasks", b"/", b"/static/roller.css"):
            sock = socket.create_connection(("127.0.0.1", roller.port), timeout=TIMEOUT)
            try:
                sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
                response = http.client.HTTPResponse(sock, method="GET")
                response.begin()
                body = response.read()
            finally:
                sock.close()
            assert response.status == 400 and json.loads(body)["error"] == "bad_request", (host, target, body)
    assert "Traceback" not in roller.log_text()


def test_double_slashes_are_404_json_on_the_api(roller: RollerProcess) -> None:
    for target in ("/api/v1/machines/x//y", "/api//v1/jobs", "/api/v1/machines/g1//m1"):
        a = send(roller.port, "GET", target)
        assert (a.status, a.error()) == (404, "not_found"), (target, a)
    a = send(roller.port, "GET", "/static//roller.css")
    assert a.status == 404


def test_static_nul_is_404(roller: RollerProcess) -> None:
    for target in ("/static/roller%00.css", "/static/%00", "/static/roller.css%00"):
        a = send(roller.port, "GET", target)
        assert (a.status, a.error()) == (404, "not_found"), (target, a)
    assert send(roller.port, "GET", "/static/roller.css").status == 200
    a = send(roller.port, "POST", "/static/roller.css")
    assert (a.status, a.error()) == (405, "method_not_allowed") and a.headers["allow"] == "GET, HEAD"


# -- response headers --------------------------------------------------------------------


HEADER_TARGETS = ["/api/v1/tasks", "/api/v1/jobs/nope", "/api/v1/openapi.json", "/__lbheartbeat__",
                  "/__version__", "/metrics", "/static/roller.css", "/static/nope.css", "/login", "/",
                  "/no-such-page", "/admin"]


def test_nosniff_everywhere_and_hsts_over_tls_only(roller: RollerProcess) -> None:
    for target in HEADER_TARGETS:
        plain = send(roller.port, "GET", target)
        tls = send(roller.tls_port, "GET", target, ca=roller.ca)
        assert plain.status < 500 and tls.status == plain.status, (target, plain, tls)
        for a in (plain, tls):
            assert a.headers.get("x-content-type-options") == "nosniff", (target, a.headers)
        assert "strict-transport-security" not in plain.headers, target
        assert tls.headers.get("strict-transport-security") == "max-age=31536000", (target, tls.headers)
    # errors made by the API's error handlers and mutating routes too
    a = send(roller.tls_port, "POST", "/api/v1/jobs?tc_worker_id=m1&task_name=ping",
             {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}, ca=roller.ca)
    assert a.status == 403 and a.headers.get("x-content-type-options") == "nosniff"
    assert a.headers.get("strict-transport-security") == "max-age=31536000"


# -- the OpenAPI document ----------------------------------------------------------------


def test_openapi_task_name_enum_is_the_allowed_tasks(roller: RollerProcess) -> None:
    doc = roller.json("GET", "/api/v1/openapi.json")
    tasks = roller.json("GET", "/api/v1/tasks")["tasks"]
    allowed = {t["name"] for t in tasks if t["allowed"]}
    for path in ("/api/v1/jobs", "/api/v1/workers/{worker_id}/group/{worker_group}/jobs"):
        (param,) = [p for p in doc["paths"][path]["post"]["parameters"] if p["name"] == "task_name"]
        assert set(param["schema"]["enum"]) == allowed, path


def test_openapi_task_name_enum_follows_tasks_allowed(tmp_path: Path) -> None:
    # a roller allowing only ping: every name in the enum is accepted, the other tasks are not in it
    with RollerProcess(["--auth", "none"], state_dir=tmp_path / "state",
                       env={"ROLLER_TASKS_ALLOWED": "ping"}) as r:
        doc = r.json("GET", "/api/v1/openapi.json")
        (param,) = [p for p in doc["paths"]["/api/v1/jobs"]["post"]["parameters"] if p["name"] == "task_name"]
        assert param["schema"]["enum"] == ["ping"]
        assert r.request("PUT", "/api/v1/machines/g1/m1", {}).status == 201
        for name in param["schema"]["enum"]:
            assert r.request("POST", f"/api/v1/jobs?tc_worker_id=m1&task_name={name}").status == 201
        refused = r.request("POST", "/api/v1/jobs?tc_worker_id=m1&task_name=reboot")
        assert refused.status == 400 and refused.json()["error"] == "task_not_allowed"


def test_openapi_with_no_task_allowed_accepts_no_task_name() -> None:
    from openapi_spec_validator import validate

    from roller import __version__
    from roller.tasks import builtin_tasks
    from roller.web.openapi import openapi_document

    doc = openapi_document(builtin_tasks(), (), __version__)
    validate(doc)
    (param,) = [p for p in doc["paths"]["/api/v1/jobs"]["post"]["parameters"] if p["name"] == "task_name"]
    assert param["schema"] == {"type": "string", "enum": []}

